"""SExtractor's star/galaxy classifier (``CLASS_STAR``): the feed-forward network of a ``.nnw`` file.

The network (SExtractor 2.25 ``neurro.c``): inputs scaled as ``n0 = input * inscale + inbias``, then per
layer ``n_{l+1} = sigmoid(W_l n_l + b_l)``, output ``(n_last - outbias) / outscale``.  The ``.nnw`` text
format: a first line starting with ``NNW``; then, skipping ``#`` comments and blank lines, one line
with the number of layers and the neurons per layer, one line of input biases, one of input scales,
for every layer ``l`` and neuron ``j`` of layer ``l + 1`` one line holding the ``nn[l]`` weights into
``j`` and its bias, then a line of output biases and one of output scales.

The inputs SExtractor feeds it (``analyse.c``), for an object with isophotal areas ``ISO0..ISO7``
(pixels above the 8 levels of :func:`astroprep_torch.photometry.isoprofile.isophotal_areas`), peak
``FLUX_MAX`` and the analysis threshold ``thresh`` (ADU, the global one): with ``fac2 = (seeing_fwhm /
pixscale)^2`` (arcsec / arcsec-per-pixel), ``log10(ISO0 / fac2)``, ``log10(peak / thresh)``,
``log10(ISO1..ISO7 / fac2)`` and ``log10(seeing_fwhm)``; an empty area gives ``log10(0.01)``, a
non-positive peak ``log10(0.1)`` and a non-positive threshold ``-1``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Union

import torch
from torch import Tensor, nn


class NNW(NamedTuple):
    """The contents of a ``.nnw`` file (float64 tensors); ``weights[l]`` is ``(nn[l+1], nn[l])``."""

    sizes: tuple
    inbias: Tensor
    inscale: Tensor
    weights: tuple
    biases: tuple
    outbias: Tensor
    outscale: Tensor


def _nnw_lines(path: Path) -> list[list[float]]:
    lines = path.read_text(errors="replace").splitlines()
    if not lines or not lines[0].startswith("NNW"):
        raise ValueError(f"STARNNW_NAME {path}: not a NNW table (the first line must start with 'NNW')")
    rows = []
    for ln in lines[1:]:
        s = ln.lstrip(" \t")
        if not s.strip() or s.startswith("#"):
            continue
        try:
            rows.append([float(v) for v in s.split()])
        except ValueError as e:
            raise ValueError(f"STARNNW_NAME {path}: expected numbers, got {ln!r}") from e
    return rows


def read_nnw(path: Union[str, Path]) -> NNW:
    """Read a SExtractor neural-network weight file (``STARNNW_NAME``, e.g. ``default.nnw``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STARNNW_NAME {path}: no such file")
    rows = _nnw_lines(path)
    try:
        nl = int(rows[0][0])
        sizes = tuple(int(v) for v in rows[0][1:1 + nl])
        need = 3 + sum(sizes[1:]) + 2
        if nl < 2 or len(sizes) != nl or len(rows) < need:
            raise IndexError
        t = lambda r, n: torch.tensor(r[:n], dtype=torch.float64)  # noqa: E731
        inbias, inscale = t(rows[1], sizes[0]), t(rows[2], sizes[0])
        k, weights, biases = 3, [], []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            block = [rows[k + j] for j in range(n_out)]
            if any(len(r) < n_in + 1 for r in block):
                raise IndexError
            weights.append(torch.tensor([r[:n_in] for r in block], dtype=torch.float64))
            biases.append(torch.tensor([r[n_in] for r in block], dtype=torch.float64))
            k += n_out
        outbias, outscale = t(rows[k], sizes[-1]), t(rows[k + 1], sizes[-1])
        if outbias.numel() != sizes[-1] or outscale.numel() != sizes[-1] or inbias.numel() != sizes[0]:
            raise IndexError
    except (IndexError, ValueError) as e:
        raise ValueError(f"STARNNW_NAME {path}: inconsistent NNW table (layers, biases, weights, "
                         "output bias and scale expected)") from e
    return NNW(sizes, inbias, inscale, tuple(weights), tuple(biases), outbias, outscale)


class NeuralNetwork(nn.Module):
    """SExtractor's feed-forward network (sigmoid neurons) with the weights of a :class:`NNW`.
    ``forward(inputs (N, nn[0])) -> (N, nn[-1])`` in float64."""

    def __init__(self, nnw: Union[NNW, str, Path]):
        super().__init__()
        nnw = nnw if isinstance(nnw, NNW) else read_nnw(nnw)
        self.sizes = nnw.sizes
        self.register_buffer("inbias", nnw.inbias)
        self.register_buffer("inscale", nnw.inscale)
        self.register_buffer("outbias", nnw.outbias)
        self.register_buffer("outscale", nnw.outscale)
        self.layers = nn.ModuleList()
        for w, b in zip(nnw.weights, nnw.biases):
            lin = nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            lin.requires_grad_(False)  # the file's weights (the output stays differentiable in the inputs)
            self.layers.append(lin)

    def forward(self, inputs: Tensor) -> Tensor:
        n = inputs.to(torch.float64) * self.inscale + self.inbias
        for lin in self.layers:
            n = torch.sigmoid(lin(n))
        return (n - self.outbias) / self.outscale


def class_star_inputs(iso: Tensor, peak: Tensor, thresh: float, seeing_fwhm: float, pixscale: float) -> Tensor:
    """The 10 inputs SExtractor feeds its classifier (module docstring): ``iso`` (N, 8) isophotal areas,
    ``peak`` (N,) FLUX_MAX, ``thresh`` the global analysis threshold (ADU), ``seeing_fwhm`` (arcsec,
    > 0) and ``pixscale`` (arcsec per pixel)."""
    if seeing_fwhm <= 0 or pixscale <= 0:
        raise ValueError(f"CLASS_STAR needs SEEING_FWHM > 0 and a pixel scale > 0, got {seeing_fwhm}, {pixscale}")
    fac2 = (float(seeing_fwhm) / float(pixscale)) ** 2
    iso = iso.to(torch.float64)
    areas = torch.log10(torch.where(iso > 0, iso / fac2, torch.full_like(iso, 0.01)))
    pk = peak.to(torch.float64)
    if thresh > 0:
        pin = torch.log10(torch.where(pk > 0, pk / float(thresh), torch.full_like(pk, 0.1)))
    else:
        pin = torch.full_like(pk, -1.0)
    seeing = torch.full_like(pk, math.log10(float(seeing_fwhm)))
    return torch.cat([areas[:, :1], pin[:, None], areas[:, 1:], seeing[:, None]], dim=1)


def class_star(iso: Tensor, peak: Tensor, thresh: float, seeing_fwhm: float, pixscale: float,
               nnw: Union[NNW, NeuralNetwork, str, Path]) -> Tensor:
    """``CLASS_STAR`` (N,) float32: the network of ``nnw`` (a ``.nnw`` path, :class:`NNW` or
    :class:`NeuralNetwork`) on :func:`class_star_inputs`."""
    net = nnw if isinstance(nnw, NeuralNetwork) else NeuralNetwork(nnw)
    x = class_star_inputs(iso, peak, thresh, seeing_fwhm, pixscale)
    if x.shape[1] != net.sizes[0]:
        raise ValueError(f"the NNW table takes {net.sizes[0]} inputs; CLASS_STAR gives {x.shape[1]}")
    with torch.no_grad():
        return net.to(x.device)(x)[:, 0].to(torch.float32)


__all__ = ["NNW", "read_nnw", "NeuralNetwork", "class_star_inputs", "class_star"]
