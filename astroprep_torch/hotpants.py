"""HOTPANTS' command-line semantics around :class:`~astroprep_torch.subtract.ImageSubtraction`.

What ``hotpants`` (v5.1.11, main.c / alard.c / functions.c) does before and after its kernel fit, for
the ``astroprep subtract ... hotpants="<flags>"`` drop-in (:func:`astroprep_torch.classic.run_subtract`):

* inputs: ``-ip``/``-tp`` pedestals subtracted from the frames (and from the thresholds); ``-ini``/``-tni``
  noise images (sigma, squared to variances) instead of the ``|image| / gain + (rdnoise / gain)^2``
  model; ``-imi``/``-tmi`` mask images (their values OR-ed into HOTPANTS' mask bits, ``0x20`` where > 0);
  pixels ``== -fi``, ``>= -iu/-tu`` or ``<= -il/-tl`` flagged ``0x80`` (input bad) with their reason bit;
  the bad pixels spread by ``int(-r * -mins) // 2`` for the stamp search (``-iuk``/``-tuk``: the stamp
  stars' own saturation levels).
* outputs: HOTPANTS' output mask (``-omi``): the outer ``-r`` pixels, the unconvolved image's bad
  pixels, the convolved image's bad pixel itself, and pixels whose kernel footprint has less than
  ``-kfm`` of the kernel's ``sum |K|`` on good pixels (``0x8000`` | ``0x10``; ``0x40`` where the
  footprint touched a flagged pixel but kept enough); those pixels get ``-fi`` in the difference and
  ``-fin`` in the noise image (unless ``-mous`` < 0).  ``-convvar``: the variance convolved with K
  instead of K^2.  ``-okn``: the noise of "OK" pixels (flagged, not output-bad) scaled up by the ratio of
  empirical / expected noise there over that of the good pixels, when > 1.  ``-ond`` / ``-ndm``: the
  difference over the noise.  ``-cim`` / ``-ndm`` / ``-nim`` / ``-allm``: extra HDUs of the difference
  file (convolved, noise-scaled, noise, in that order).  ``-sht`` / ``-obs`` / ``-obz`` (``-nsht`` /
  ``-nbs`` / ``-nbz`` for the noise): 16-bit integer images with BSCALE / BZERO, values clipped to the
  representable range (and flagged).  ``-nc``: refuse to overwrite.  ``-savexy``: the stamp lists
  (``<file>``, ``.all``, ``.skipped``) as ds9 boxes.  The difference's header: the science header plus
  HOTPANTS' keys (``PHOTNORM``, ``NREGION``, ``MASKVAL``, ``REGION00``, ``CONVOL00``, ``KSUM00``,
  ``TARGET``, ``TEMPLATE``, ``DIFFIM``, ``DIFFCMD``).

Masks here are HOTPANTS' integer bit masks (int32 tensors), not the project's bool masks; the bool
mask of bad output pixels is ``(mask & FLAG_OUTPUT_ISBAD) != 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

#: HOTPANTS' mask bits (defaults.h)
FLAG_BAD_PIXVAL, FLAG_SAT_PIXEL, FLAG_LOW_PIXEL = 0x01, 0x02, 0x04
FLAG_BAD_CONV, FLAG_INPUT_MASK, FLAG_OK_CONV, FLAG_INPUT_ISBAD = 0x10, 0x20, 0x40, 0x80
FLAG_OUTPUT_ISBAD = 0x8000


@dataclass
class HotpantsOptions:
    """The HOTPANTS flags that act outside the kernel fit (their v5.1.11 defaults); pairs are
    ``[science (-i..), template (-t..)]``."""

    pedestal: list = field(default_factory=lambda: [0.0, 0.0])  # -ip / -tp
    kernel_saturation: list = field(default_factory=lambda: [None, None])  # -iuk / -tuk
    fill: float = 1.0e-30  # -fi
    fill_noise: float = 0.0  # -fin
    kernel_fraction: float = 0.99  # -kfm
    mask_spread: float = 1.0  # -mins
    mask_output: bool = True  # -mous >= 0
    convolve_variance: bool = False  # -convvar
    rescale_ok: bool = False  # -okn
    layers: list = field(default_factory=list)  # -cim / -ndm / -nim / -allm: "convolved", "sigma", "noise"
    no_clobber: bool = False  # -nc
    short: list = field(default_factory=lambda: [False, 1.0, 0.0])  # -sht, -obs, -obz
    noise_short: list = field(default_factory=lambda: [False, 1.0, 0.0])  # -nsht, -nbs, -nbz
    find_more_stamps: bool = True  # -afssc
    scale_threshold: float = 0.5  # -sft
    min_stamp_fraction: float = 0.1  # -nft
    regions: list = field(default_factory=lambda: [1, 1])  # -nrx, -nry
    command: str = ""


class HotpantsCommand(NamedTuple):
    """A parsed HOTPANTS command line (:func:`astroprep_torch.classic.parse_hotpants_command`):
    ImageSubtraction keywords (HOTPANTS' defaults filled in, raw thresholds), ``{role: file}``, the
    flags not implemented (as written) and the :class:`HotpantsOptions`."""

    kw: dict
    files: dict
    unsupported: list
    options: HotpantsOptions


class HotpantsInputs(NamedTuple):
    """The pair as HOTPANTS sees it: pedestal-subtracted frames (B,1,H,W), their variances, the bool
    masks handed to the stamp search and HOTPANTS' integer bit masks of each frame."""

    science: torch.Tensor
    template: torch.Tensor
    science_var: torch.Tensor
    template_var: torch.Tensor
    stamp_mask: torch.Tensor
    bits_science: torch.Tensor
    bits_template: torch.Tensor
    header: object


def _read_same(path, shape, what: str) -> np.ndarray:
    from astropy.io import fits

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"HOTPANTS {what} not found: {p}")
    data = fits.getdata(p)
    if data is None or data.shape != tuple(shape):
        raise ValueError(f"HOTPANTS {what} {p}: expected a {shape[1]}x{shape[0]} image, got "
                         f"{None if data is None else data.shape[::-1]}")
    return data


def _input_bits(image: torch.Tensor, nonfinite, upper: float, lower: float, fill: float, mask_file) -> torch.Tensor:
    """HOTPANTS' makeInputMask bits of one frame (int32): the mask file's values (``| 0x20`` where > 0),
    then ``0x80`` with 0x01 (== fill value), 0x02 (>= upper), 0x04 (<= lower)."""
    bits = torch.zeros(image.shape, dtype=torch.int32)
    if mask_file is not None:
        m = torch.from_numpy(np.asarray(mask_file, dtype=np.int64).astype(np.int32))[None, None]
        bits |= m | torch.where(m > 0, FLAG_INPUT_MASK, 0).to(torch.int32)
    for cond, flag in ((image == np.float32(fill), FLAG_BAD_PIXVAL), (image >= upper, FLAG_SAT_PIXEL),
                       (image <= lower, FLAG_LOW_PIXEL)):
        bits |= torch.where(cond, FLAG_INPUT_ISBAD | flag, 0).to(torch.int32)
    if nonfinite is not None:
        bits |= torch.where(nonfinite, FLAG_INPUT_ISBAD | FLAG_BAD_PIXVAL, 0).to(torch.int32)
    return bits


def _noise_model(image: torch.Tensor, gain: float, read_noise: float) -> torch.Tensor:
    """HOTPANTS' makeNoiseImage4: ``|image| / gain + (read_noise / gain)^2`` (ADU^2)."""
    return image.abs() / gain + (read_noise / gain) ** 2


def read_inputs(science, template, kw: dict, opts: HotpantsOptions, files: dict, read) -> HotpantsInputs:
    """Read the pair (``read(path) -> (image, header, nonfinite mask)``) and build what HOTPANTS builds
    before its fit (see the module docstring); ``kw`` holds the raw ``-iu/-tu/-il/-tl/-ig/-tg/-ir/-tr``."""
    from ._masks import grow_mask

    frames, hdr = [], None
    for j, (path, who) in enumerate(((science, "i"), (template, "t"))):
        img, h, bad = read(path)
        hdr = h if j == 0 else hdr
        if frames and img.shape != frames[0][0].shape:
            raise ValueError(f"HOTPANTS: the template {path} is {img.shape[-1]}x{img.shape[-2]}, the image "
                             f"{frames[0][0].shape[-1]}x{frames[0][0].shape[-2]} (give aligned frames of one size)")
        img = img - opts.pedestal[j] if opts.pedestal[j] else img
        shape = img.shape[-2:]
        noise = files.get(("science" if j == 0 else "template") + "_noise")
        var = (torch.from_numpy(_read_same(noise, shape, f"-{who}ni noise image").astype(np.float32))[None, None] ** 2
               if noise else _noise_model(img, kw["gain"][j], kw["read_noise"][j]))
        mfile = files.get(("science" if j == 0 else "template") + "_mask")
        mask = _read_same(mfile, shape, f"-{who}mi mask image") if mfile else None
        bits = _input_bits(img, bad, kw["saturation"][j] - opts.pedestal[j], kw["lower_limit"][j] - opts.pedestal[j],
                           opts.fill, mask)
        frames.append((img, var, bits))
    r = int(kw["kernel_half_width"])
    skip = ((frames[0][2] | frames[1][2]) & (FLAG_INPUT_ISBAD | FLAG_INPUT_MASK)) != 0
    spread = int(r * opts.mask_spread) // 2
    stamp_mask = grow_mask(skip, spread) if spread > 0 else skip
    return HotpantsInputs(frames[0][0], frames[1][0], frames[0][1], frames[1][1], stamp_mask, frames[0][2],
                          frames[1][2], hdr)


def stamp_grid(kw: dict, shape) -> tuple[int, int]:
    """HOTPANTS' stamp grid for a frame: ``-nsy x -nsx``, unless a cell minus the kernel width is smaller
    than a substamp (``2 -rss + 1``): then cells of ``2 -rss + 1 + 2 -r + 1`` px (odd), as many as fit
    ("too many stamps requested", main.c)."""
    h, w = shape
    fw_kernel = 2 * int(kw["kernel_half_width"]) + 1
    fw_ks = 2 * int(kw["stamp_half_width"]) + 1
    ny, nx = kw["stamp_grid"]
    fw = min(w // nx, h // ny) - fw_kernel
    fw -= 1 if fw % 2 == 0 else 0
    if fw >= fw_ks:
        return ny, nx
    fw = fw_ks + fw_kernel
    fw -= 1 if fw % 2 == 0 else 0
    return max(h // fw, 1), max(w // fw, 1)


class Region(NamedTuple):
    """A HOTPANTS region: its good data ``[x0, x1] x [y0, y1]`` and the buffered box fitted around it
    (inclusive, 0-based)."""

    x0: int
    x1: int
    y0: int
    y1: int
    bx0: int
    bx1: int
    by0: int
    by1: int


def regions(shape, kw: dict, nrx: int, nry: int) -> list:
    """HOTPANTS' ``-nrx x -nry`` regions (main.c): ``[i * xmax / nrx, (i + 1) * xmax / nrx]`` (integer
    division, ``xmax = W - 1``: neighbours share a pixel, the later one wins), buffered by half a stamp
    cell when there are several (by ``-r`` for one)."""
    h, w = shape
    xmax, ymax = w - 1, h - 1
    if nrx * nry == 1:
        buf = int(kw["kernel_half_width"])
    else:
        fw_kernel = 2 * int(kw["kernel_half_width"]) + 1
        ny, nx = kw["stamp_grid"]
        fw = min(w // nrx // nx, h // nry // ny) - fw_kernel
        fw -= 1 if fw % 2 == 0 else 0
        if fw < 2 * int(kw["stamp_half_width"]) + 1:
            fw = 2 * int(kw["stamp_half_width"]) + 1 + fw_kernel
            fw -= 1 if fw % 2 == 0 else 0
        buf = fw // 2
    out = []
    for j in range(nry):
        for i in range(nrx):
            x0, y0 = i * xmax // nrx, j * ymax // nry
            x1, y1 = min((i + 1) * xmax // nrx, xmax), min((j + 1) * ymax // nry, ymax)
            out.append(Region(x0, x1, y0, y1, max(0, x0 - buf), min(xmax, x1 + buf), max(0, y0 - buf), min(ymax, y1 + buf)))
    return out


def crop(inp: HotpantsInputs, reg: Region) -> HotpantsInputs:
    """The inputs cut to a region's buffered box."""
    ys, xs = slice(reg.by0, reg.by1 + 1), slice(reg.bx0, reg.bx1 + 1)
    return HotpantsInputs(*(t[..., ys, xs] for t in inp[:7]), inp.header)


def paste(parts: list, shape, opts: HotpantsOptions) -> "HotpantsProducts":
    """The regions' products (``[(Region, HotpantsProducts)]``) into full frames: each region's good data;
    pixels of no fitted region hold the fill values, flagged output-bad."""
    proto = parts[0][1][:5]
    fills = (opts.fill, opts.fill, opts.fill_noise, opts.fill, FLAG_OUTPUT_ISBAD)
    full = [np.full(shape, v, dtype=a.dtype) for a, v in zip(proto, fills)]
    for reg, prod in parts:
        oy, ox = reg.y0 - reg.by0, reg.x0 - reg.bx0
        for f, a in zip(full, prod[:5]):
            f[reg.y0:reg.y1 + 1, reg.x0:reg.x1 + 1] = a[oy:oy + reg.y1 - reg.y0 + 1, ox:ox + reg.x1 - reg.x0 + 1]
    return HotpantsProducts(*full, parts[0][1].ok_noise_scale)


def fit_keywords(kw: dict, opts: HotpantsOptions, shape=None) -> dict:
    """ImageSubtraction keywords in pedestal-subtracted units; the stamp stars' saturation is
    ``min(-iu, -iuk)`` (``-tu``, ``-tuk``): HOTPANTS refuses both for stamps; with the frame ``shape``
    (H, W) HOTPANTS' own reduction of a stamp grid too fine for ``-rss`` (:func:`stamp_grid`)."""
    out = dict(kw)
    if shape is not None:
        out["stamp_grid"] = stamp_grid(kw, shape)
    sat = []
    for j in range(2):
        k = opts.kernel_saturation[j]
        sat.append(min(kw["saturation"][j], k if k is not None else kw["saturation"][j]) - opts.pedestal[j])
    out["saturation"] = tuple(sat)
    out["lower_limit"] = tuple(kw["lower_limit"][j] - opts.pedestal[j] for j in range(2))
    return out


def term_kernels(result, kw: dict) -> torch.Tensor:
    """The fitted kernel's spatial terms (B, S, 2r+1, 2r+1) (true-convolution kernels; the kernel at
    (x, y) is ``sum_p P_p(x, y) K_p`` with :func:`~astroprep_torch.subtract.spatial_terms`)."""
    from .subtract import _term_kernels, kernel_basis

    basis = kernel_basis(int(kw["kernel_half_width"]), kw["gaussians"], dtype=torch.float64)
    return _term_kernels(result.kernel_coefficients.double(), basis, int(kw["spatial_order"]))


def kernel_at(result, kw: dict, x: float, y: float, shape) -> torch.Tensor:
    """The fitted kernel (B, 2r+1, 2r+1) at pixel ``(x, y)`` (0-based), as a true-convolution kernel."""
    from .subtract import spatial_terms

    t = spatial_terms(torch.tensor(float(x), dtype=torch.float64), torch.tensor(float(y), dtype=torch.float64),
                      int(kw["spatial_order"]), shape)
    return torch.einsum("bsvu,s->bvu", term_kernels(result, kw), t)


def _local_bad_fraction(bad: torch.Tensor, where: torch.Tensor, kp: torch.Tensor, order: int,
                        chunk: int = 16384) -> torch.Tensor:
    """``sum |K| bad / sum |K|`` at the pixels ``where`` with the kernel HOTPANTS uses there: evaluated at
    the centre of the pixel's ``2r+1`` block (spatial_convolve's -kcs default); 0 elsewhere."""
    from .subtract import spatial_terms

    b, _, h, w = bad.shape
    k = kp.shape[-1]
    r = k // 2
    out = torch.zeros(bad.shape, dtype=torch.float64)
    padded = torch.nn.functional.pad(bad.to(torch.float64), (r, r, r, r))
    dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    bi, _, yi, xi = torch.nonzero(where, as_tuple=True)
    for s in range(0, len(yi), chunk):
        bb, yy, xx = bi[s:s + chunk], yi[s:s + chunk], xi[s:s + chunk]
        # block centres: (i - r) // k * k + 2r (main.c: i0 = i1 * kcs + r, kernel at i0 + r)
        xc = (torch.div(xx - r, k, rounding_mode="floor") * k + 2 * r).to(torch.float64)
        yc = (torch.div(yy - r, k, rounding_mode="floor") * k + 2 * r).to(torch.float64)
        ak = torch.einsum("nsvu,ns->nvu", kp[bb], spatial_terms(xc, yc, order, (h, w))).abs()
        patch = padded[bb[:, None, None], 0, yy[:, None, None] + r + dy, xx[:, None, None] + r + dx]
        # image offset (dy, dx) meets kernel element [r - dy, r - dx]
        frac = (ak.flip(-1, -2) * patch).sum((-1, -2)) / ak.sum((-1, -2))
        out[bb, 0, yy, xx] = frac
    return out


def _convolve_same(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``x`` (B,1,H,W) convolved with ``kernel`` (B, k, k) (a true convolution, zero outside), same size:
    one FFT per frame."""
    b, _, h, w = x.shape
    k = kernel.shape[-1]
    r = k // 2
    size = (h + k - 1, w + k - 1)
    out = torch.fft.irfft2(torch.fft.rfft2(x[:, 0], s=size) * torch.fft.rfft2(kernel.to(x.dtype), s=size), s=size)
    return out[:, r:r + h, r:r + w].unsqueeze(1)


def output_mask(inp: HotpantsInputs, conv_science: torch.Tensor, kp: torch.Tensor, order: int,
                kernel_fraction: float) -> torch.Tensor:
    """HOTPANTS' output mask (int32, (B,1,H,W)): spatial_convolve's propagation of the convolved frame's
    bits through ``|K|`` (``kp``: :func:`term_kernels`; the kernel of each 2r+1 block when it varies),
    the unconvolved frame's bits, the edges."""
    cs = conv_science.view(-1, 1, 1, 1)
    conv_bits = torch.where(cs, inp.bits_science, inp.bits_template)
    other = torch.where(cs, inp.bits_template, inp.bits_science)
    from ._masks import grow_mask

    r = kp.shape[-1] // 2
    bad = (conv_bits & FLAG_INPUT_ISBAD) != 0
    touched = grow_mask(conv_bits != 0, r)
    if not bool(bad.any()):
        frac_bad = torch.zeros(bad.shape, dtype=torch.float64)
    elif order == 0:
        ak = kp[:, 0].abs()
        frac_bad = _convolve_same(bad.to(torch.float64), ak) / ak.sum((-1, -2)).view(-1, 1, 1, 1)
    else:
        frac_bad = _local_bad_fraction(bad, grow_mask(bad, r), kp, order)
    good_frac = 1.0 - frac_bad
    m = conv_bits | torch.where((conv_bits & FLAG_INPUT_ISBAD) != 0, FLAG_OUTPUT_ISBAD, 0).to(torch.int32)
    lost = touched & (good_frac < kernel_fraction - 1e-12)
    m |= torch.where(lost, FLAG_OUTPUT_ISBAD | FLAG_BAD_CONV, torch.where(touched, FLAG_OK_CONV, 0)).to(torch.int32)
    m |= other | torch.where((other & FLAG_INPUT_ISBAD) != 0, FLAG_OUTPUT_ISBAD, 0).to(torch.int32)
    edge = torch.ones_like(m, dtype=torch.bool)
    edge[..., r:m.shape[-2] - r, r:m.shape[-1] - r] = False
    return m | torch.where(edge, FLAG_OUTPUT_ISBAD, 0).to(torch.int32)


def noise_image(inp: HotpantsInputs, result, kw: dict, opts: HotpantsOptions) -> torch.Tensor:
    """HOTPANTS' noise image (sigma): the unconvolved frame's variance plus the convolved frame's
    variance through K^2 (``-convvar``: through K), scaled like the difference."""
    from .subtract import apply_kernel, kernel_basis

    cs = result.convolved_science.view(-1, 1, 1, 1)
    var_c = torch.where(cs, inp.science_var, inp.template_var).double()
    var_t = torch.where(cs, inp.template_var, inp.science_var).double()
    basis = kernel_basis(int(kw["kernel_half_width"]), kw["gaussians"], dtype=torch.float64)
    conv_v, conv_v2 = apply_kernel(var_c, result.kernel_coefficients.double(), basis, int(kw["spatial_order"]),
                                   var_c if not opts.convolve_variance else None)
    var_k = conv_v if opts.convolve_variance else conv_v2
    ksum = result.kernel_sum.double()
    down = result.convolved_science if kw["normalize"] == "science" else ~result.convolved_science
    scale = torch.where(down, 1.0 / ksum, torch.ones_like(ksum)).view(-1, 1, 1, 1)
    return ((var_t + var_k).clamp(min=0).sqrt() * scale).float()


def _robust_sd(x: torch.Tensor) -> float:
    if x.numel() < 10:
        return float("nan")
    med = x.median()
    return float(1.4826 * (x - med).abs().median())


def rescale_ok_noise(diff: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``-okn``: the noise of "OK" pixels (``mask & 0xff``, not output-bad) times the ratio of the
    empirical / expected noise there over that of the clean pixels (``mask == 0``) when it exceeds 1.
    The empirical noise is a robust sigma (1.4826 MAD); HOTPANTS' own is a histogram statistic."""
    good = mask == 0
    ok = ((mask & 0xFF) != 0) & ((mask & FLAG_OUTPUT_ISBAD) == 0)
    if not bool(ok.any()) or not bool(good.any()):
        return noise, 1.0
    rat_good = _robust_sd(diff[good]) / float(noise[good].mean())
    rat_ok = _robust_sd(diff[ok]) / float(noise[ok].mean())
    ratio = rat_ok / rat_good if np.isfinite(rat_ok) and rat_good > 0 else 1.0
    if ratio > 1:
        noise = torch.where(ok, noise * ratio, noise)
    return noise, float(ratio)


class HotpantsProducts(NamedTuple):
    """The images HOTPANTS writes (float32 (H, W) arrays) and its integer output mask."""

    difference: np.ndarray
    convolved: np.ndarray
    noise: np.ndarray
    sigma: np.ndarray
    mask: np.ndarray
    ok_noise_scale: float


def products(inp: HotpantsInputs, result, kw: dict, opts: HotpantsOptions) -> HotpantsProducts:
    """Difference, convolved image, noise and noise-scaled difference of the first batch element, with
    HOTPANTS' output mask applied (``-fi`` / ``-fin``) unless ``-mous`` < 0."""
    r = int(kw["kernel_half_width"])
    h, w = inp.science.shape[-2:]
    mask = output_mask(inp, result.convolved_science, term_kernels(result, kw), int(kw["spatial_order"]),
                       opts.kernel_fraction)
    diff = result.difference.detach().float()
    noise = noise_image(inp, result, kw, opts)
    scale = 1.0
    if opts.rescale_ok:
        noise, scale = rescale_ok_noise(diff, noise, mask)
    bad = (mask & FLAG_OUTPUT_ISBAD) != 0
    edge = torch.ones_like(bad)
    edge[..., r:h - r, r:w - r] = False
    conv = result.convolved.detach().float().masked_fill(edge, opts.fill)
    if opts.mask_output:
        diff = diff.masked_fill(bad, opts.fill)
        noise = noise.masked_fill(bad, opts.fill_noise)
    # HOTPANTS never convolves the outer r pixels: the difference is the fill value there, the noise
    # that of the unconvolved frame alone (unscaled)
    diff = diff.masked_fill(edge, opts.fill)
    var_u = torch.where(result.convolved_science.view(-1, 1, 1, 1), inp.template_var, inp.science_var)
    noise = torch.where(edge, var_u.clamp(min=0).sqrt().float(), noise)
    sigma = torch.where(diff != np.float32(opts.fill), diff / noise, diff)
    sigma = torch.where(torch.isfinite(sigma), sigma, torch.full_like(sigma, opts.fill))
    one = lambda t: t[0, 0].cpu().numpy()  # noqa: E731
    return HotpantsProducts(one(diff), one(conv), one(noise), one(sigma), one(mask), scale)


def _hdu_data(a: np.ndarray, short: list, bad: Optional[np.ndarray] = None):
    """``(data, bscale, bzero)`` as HOTPANTS writes a layer: float32, or with ``-sht`` 16-bit integers of
    ``(a - bzero) / bscale`` clipped to the int16 range (hp_fits_correct_data; the clipped pixels flagged
    in ``bad``)."""
    if not short[0]:
        return a.astype(np.float32), None, None
    bscale, bzero = float(short[1]), float(short[2])
    hi, lo = 32767.0 * bscale + bzero, -32768.0 * bscale + bzero
    if bad is not None:
        bad |= (a > hi) | (a < lo)
    q = np.rint((np.clip(a, lo, hi) - bzero) / bscale)
    return q.astype(np.int16), bscale, bzero


def _hdu(a: np.ndarray, short: list, header=None, primary: bool = True, bad=None):
    from astropy.io import fits

    data, bscale, bzero = _hdu_data(a, short, bad)
    hdu = (fits.PrimaryHDU if primary else fits.ImageHDU)(data, header=header)
    if bscale is not None:
        hdu.header["BSCALE"], hdu.header["BZERO"] = bscale, bzero
    return hdu


def header_keys(header, fits_per_region: list, kw: dict, opts: HotpantsOptions, names: dict):
    """The science header with HOTPANTS' keys; ``fits_per_region``: ``[(Region, result, products)]``."""
    from astropy.io import fits

    hdr = fits.Header() if header is None else header.copy()
    for k in ("BSCALE", "BZERO", "BLANK"):
        hdr.remove(k, ignore_missing=True, remove_all=True)
    hdr["SOFTNAME"] = ("astroprep_torch", "HOTPANTS drop-in: astroprep subtract")
    for i, (reg, result, prod) in enumerate(fits_per_region):
        hdr[f"REGION{i:02d}"] = (f"[{reg.x0 + 1}:{reg.x1 + 1},{reg.y0 + 1}:{reg.y1 + 1}]", "")
        hdr[f"CONVOL{i:02d}"] = ("IMAGE" if bool(result.convolved_science[0]) else "TEMPLATE", "")
        hdr[f"KSUM{i:02d}"] = (f"{float(result.kernel_sum[0]):.4f}", "Kernel Sum")
        if opts.rescale_ok:
            hdr[f"NSCALO{i:02d}"] = (f"{prod.ok_noise_scale:.4f}", "")
    cmd = opts.command
    if len(cmd) <= 68:
        hdr["DIFFCMD"] = cmd
    else:  # the whole command line as HISTORY (long-string cards of paths do not verify in astropy)
        hdr["DIFFCMD"] = cmd[:68]
        for k in range(0, len(cmd), 70):
            hdr["HISTORY"] = cmd[k:k + 70]
    for key, role in (("TARGET", "science"), ("TEMPLATE", "template"), ("DIFFIM", "difference")):
        hdr[key] = Path(names.get(role, "")).name[:68]
    hdr["PHOTNORM"] = ({"science": "i", "template": "t"}[kw["normalize"]], "Direction of photometric normalization")
    hdr["NREGION"] = (len(fits_per_region), "Number of independent regions")
    hdr["MASKVAL"] = (opts.fill, "Value of Masked Pixels")
    return hdr


def _writeto(hdul, path: Path, no_clobber: bool) -> str:
    if no_clobber and path.exists():
        raise FileExistsError(f"HOTPANTS -nc: {path} exists (not overwritten)")
    hdul.writeto(path, overwrite=True)
    return str(path)


def write_products(prod: HotpantsProducts, hdr, files: dict, out: Path, default_name: str,
                   opts: HotpantsOptions) -> dict:
    """Write the difference (with its ``-cim``/``-ndm``/``-nim`` layers), ``-oci``, ``-oni``, ``-ond`` and
    ``-omi`` files under ``out`` (their base names); returns ``{role: path}``."""
    from astropy.io import fits

    bad = (prod.mask & FLAG_OUTPUT_ISBAD) != 0
    layer = {"convolved": (prod.convolved, opts.short, "Convolved Image"),
             "sigma": (prod.sigma, opts.short, "Noise-scaled (sigma) Difference Image"),
             "noise": (prod.noise, opts.noise_short, "HOTPanTS Noise Image")}
    hdus = [_hdu(prod.difference, opts.short, hdr, bad=bad)]
    for name in ("convolved", "sigma", "noise"):
        if name in opts.layers:
            a, short, obj = layer[name]
            hdus.append(_hdu(a, short, primary=False))
            hdus[-1].header["OBJECT"] = obj
    written = {"difference": _writeto(fits.HDUList(hdus), out / Path(files.get("difference", default_name)).name,
                                      opts.no_clobber)}
    for role, key in (("convolved", "convolved"), ("noise", "noise"), ("sigma", "sigma")):
        if role in files:
            a, short, obj = layer[key]
            hdu = _hdu(a, short, hdr)
            hdu.header["OBJECT"] = obj
            if role == "noise":
                hdu.header["MASKVAL"] = opts.fill_noise
            written[role] = _writeto(fits.HDUList([hdu]), out / Path(files[role]).name, opts.no_clobber)
    if "mask" in files:
        m = (prod.mask | np.where(bad, FLAG_OUTPUT_ISBAD, 0)).astype(np.uint16)
        hdu = fits.PrimaryHDU(m, header=hdr)
        hdu.header["OBJECT"] = "Hotpants output Mask Image"
        written["mask"] = _writeto(fits.HDUList([hdu]), out / Path(files["mask"]).name, opts.no_clobber)
    return written


def write_savexy(stats, path: Path, stamp_half_width: int, offsets=((0, 0),)) -> list[str]:
    """``-savexy file``: the used stamps (``file``), all (``file.all``) and the rejected
    (``file.skipped``) as ds9 boxes, 1-based, as HOTPANTS' savexy; ``stats`` one StampStats or a list
    (one per region, placed by ``offsets`` (x, y))."""
    fw = 2 * int(stamp_half_width) + 1
    regions = []
    for st, (ox, oy) in zip(stats if isinstance(stats, (list, tuple)) else [stats], offsets):
        regions.append(list(zip((st.x.round().long() + ox).tolist(), (st.y.round().long() + oy).tolist(), st.used.tolist())))
    paths = []
    for suffix, colour, want in (("", "green", (True,)), (".all", "yellow", (True, False)),
                                 (".skipped", "red", (False,))):
        lines = []
        for rows in regions:  # HOTPANTS appends each region's list under its own header line
            lines += ["#%4s %4s" % ("X", "Y")] + [f"image;box({a + 1:4d},{b + 1:4d},{fw},{fw}) # color={colour}"
                                                  for a, b, u in rows if bool(u) in want]
        p = Path(str(path) + suffix)
        p.write_text("\n".join(lines) + "\n")
        paths.append(str(p))
    return paths
