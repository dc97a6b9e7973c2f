"""Per-object image sequences: the stamps of a tracklet's detections across a night.

* :func:`sequence_stamps` -- science and difference stamps ``(N, 1, S, S)`` around N detections
  that lie on F frames (one gather per image kind through :func:`~astroprep_torch.cutouts.extract`,
  no loop over detections): the tensor form for models.
* :func:`sequence_frames` -- the animation frames for people: science | difference side by side,
  each with zscale limits shared by the whole sequence (so the noise does not flicker from frame to
  frame) and an asinh stretch (:mod:`astroprep_torch.stretch`), as ``uint8``.
* :func:`write_gif` / :func:`write_sequence` -- an animated GIF (Pillow) and the ``.pt`` tensors,
  as ``astroprep night`` writes them (``sequences/<trksub>.gif`` and ``.pt``).
* :func:`write_ceres_cutouts` -- the CERES dataset layout: one 200x200 FITS cutout per detection
  with ``TRKSUB``, ``FRAME``, ``MJD``, ``RA``, ``DEC`` and ``LABEL`` ('undefined' until a person
  labels it), read back by :func:`~astroprep_torch.cutouts.read_ceres_cutouts` and by
  ``astroprep train-classifier data.source=fits_folder data.root=<dir>/cutouts model.in_channels=1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ._checks import check_image
from .cutouts import extract

__all__ = ["SequenceStamps", "sequence_stamps", "sequence_frames", "write_gif", "write_sequence",
           "write_ceres_cutouts", "CERES_SIZE"]

#: side of a CERES cutout (px)
CERES_SIZE = 200


class SequenceStamps(NamedTuple):
    """``science``, ``difference`` (N, 1, S, S) float32 (NaN outside the frame); ``mask`` (N, 1, S, S)
    bool, True = outside the frame or bad."""

    science: Tensor
    difference: Tensor
    mask: Tensor


def sequence_stamps(science: Tensor, difference: Tensor, xy: Tensor, frame_index: Tensor, size: int = 64, *,
                    mask: Optional[Tensor] = None) -> SequenceStamps:
    """Stamps of ``size`` x ``size`` px centred on ``xy`` (N, 2; 0-based, x = column) in frame
    ``frame_index`` (N,) of ``science`` and ``difference`` (F, 1, H, W, on one pixel grid: the
    aligned frames and their differences). Pixels off the frame are NaN and masked."""
    check_image(science, "science", channels=1)
    check_image(difference, "difference", channels=1)
    if science.shape != difference.shape:
        raise ValueError(f"science and difference must share one shape, got {tuple(science.shape)} and {tuple(difference.shape)}")
    nan = float("nan")
    s = extract(science, xy, size, frame_index, mask=mask, fill_value=nan)
    d = extract(difference, xy, size, frame_index, mask=mask, fill_value=nan)
    return SequenceStamps(s.stamps.float(), d.stamps.float(), s.mask | d.mask)


def _shared_limits_normalise(stamps: Tensor, stretch: str, a: Optional[float]) -> Tensor:
    """[0, 1] images with one zscale interval for all ``stamps`` (n, 1, S, S) (stacked into one
    image for the limits), then the stretch."""
    from .stretch import Stretch, ZScale, normalize

    n, _, s, w = stamps.shape
    finite = torch.isfinite(stamps)
    if not finite.any():
        return torch.zeros_like(stamps)
    tall = torch.where(finite, stamps, torch.zeros_like(stamps)).reshape(1, 1, n * s, w)
    out = normalize(tall, ~finite.reshape(1, 1, n * s, w), interval=ZScale(), stretch=Stretch(stretch, a))
    return torch.where(finite, out.reshape(n, 1, s, w), torch.zeros_like(stamps))


def sequence_frames(science: Tensor, difference: Tensor, *, stretch: str = "asinh", a: Optional[float] = 0.1,
                    gap: int = 2, zoom: int = 3) -> Tensor:
    """Animation frames ``(n, zoom*S, zoom*(2S + gap))`` uint8: science | difference side by side.

    ``science`` / ``difference`` (n, 1, S, S) are one object's stamps in time order. Each half has
    zscale limits shared by the sequence and the ``stretch`` (default asinh, astropy's a = 0.1);
    NaN (off the frame) is black; ``gap`` px of mid grey separate the halves; ``zoom`` repeats
    pixels (nearest) so that small stamps are visible. The first row is at the bottom (FITS as DS9
    shows it: north up for the usual WCS).
    """
    from .stretch import to_uint8

    if science.shape != difference.shape or science.dim() != 4 or science.shape[1] != 1:
        raise ValueError(f"science and difference must be (n, 1, S, S) of one shape, got {tuple(science.shape)}, {tuple(difference.shape)}")
    sci = to_uint8(_shared_limits_normalise(science.float(), stretch, a))[:, 0]
    dif = to_uint8(_shared_limits_normalise(difference.float(), stretch, a))[:, 0]
    sep = torch.full((sci.shape[0], sci.shape[1], gap), 128, dtype=torch.uint8)
    frames = torch.cat([sci, sep, dif], dim=2).flip(1)  # first row at the bottom, as DS9 shows FITS
    if zoom > 1:
        frames = frames.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
    return frames


def write_gif(path, frames: Tensor, *, duration_ms: int = 500) -> Path:
    """Write ``frames`` (n, H, W) uint8 as an endlessly looping animated GIF (Pillow)."""
    from PIL import Image

    if frames.dtype != torch.uint8 or frames.dim() != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be a non-empty (n, H, W) uint8 tensor, got {frames.dtype} {tuple(frames.shape)}")
    images = [Image.fromarray(f.cpu().numpy(), mode="L") for f in frames]
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(duration_ms), loop=0,
                   optimize=False, disposal=1)
    return path


def write_sequence(out_dir, trksub: str, stamps: SequenceStamps, mjd, frames: Sequence[str], *, zoom: int = 3,
                   duration_ms: int = 500) -> tuple:
    """``<out_dir>/<trksub>.gif`` (animation) and ``<trksub>.pt`` ({"science", "difference": (n, 1, S, S)
    float32, "mjd": (n,) float64, "frame": list[str]}), detections in time order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mjd = torch.as_tensor(np.asarray(mjd, dtype=np.float64))
    order = torch.argsort(mjd)
    sci, dif = stamps.science[order].contiguous(), stamps.difference[order].contiguous()
    frames = [frames[i] for i in order.tolist()]
    gif = write_gif(out_dir / f"{trksub}.gif", sequence_frames(sci, dif, zoom=zoom), duration_ms=duration_ms)
    pt = out_dir / f"{trksub}.pt"
    torch.save({"science": sci.cpu(), "difference": dif.cpu(), "mjd": mjd[order].cpu(), "frame": frames}, pt)
    return gif, pt


def write_ceres_cutouts(out_dir, trksub: str, science: Tensor, *, frames: Sequence[str], mjd, ra, dec,
                        difference: Optional[Tensor] = None, label: str = "undefined", start: int = 0) -> list:
    """One FITS file per detection, ``<out_dir>/<trksub>_<k>.fits`` (k = start, start + 1, ...):
    the primary HDU holds the science cutout (n, 1, 200, 200 -> 200x200 float32, NaN off the frame)
    with ``TRKSUB``, ``FRAME``, ``MJD`` (mid-exposure UTC), ``RA``, ``DEC`` (deg) and ``LABEL``
    ('undefined', 'valid' or 'invalid'); ``difference`` (same shape), if given, is an image
    extension ``DIFF``."""
    from astropy.io import fits

    if science.dim() != 4 or science.shape[1] != 1:
        raise ValueError(f"science must be (n, 1, S, S), got {tuple(science.shape)}")
    n = science.shape[0]
    for name, v in (("frames", frames), ("mjd", mjd), ("ra", ra), ("dec", dec)):
        if len(v) != n:
            raise ValueError(f"{name} has {len(v)} entries for {n} cutouts")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        h = fits.Header()
        h["TRKSUB"] = (trksub, "temporary designation of the tracklet")
        h["FRAME"] = (str(frames[k]), "frame name")
        h["MJD"] = (float(mjd[k]), "mid-exposure MJD (UTC)")
        h["RA"] = (float(ra[k]), "deg")
        h["DEC"] = (float(dec[k]), "deg")
        h["LABEL"] = (label, "undefined | valid | invalid")
        hdus = [fits.PrimaryHDU(science[k, 0].detach().float().cpu().numpy(), header=h)]
        if difference is not None:
            hdus.append(fits.ImageHDU(difference[k, 0].detach().float().cpu().numpy(), name="DIFF"))
        p = out_dir / f"{trksub}_{start + k}.fits"
        fits.HDUList(hdus).writeto(p, overwrite=True)
        paths.append(p)
    return paths
