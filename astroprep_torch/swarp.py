"""SWarp's configuration keys for one frame resampled onto a target ``.head`` (the ``astroprep reproject
... swarp=<file.swarp> head=<target.head>`` drop-in, :func:`astroprep_torch.classic.run_reproject`).

What SWarp 2.41 does to one input frame, as far as this drop-in reproduces it:

* ``FSCALE_KEYWORD`` (``FLXSCALE``) / ``FSCALE_DEFAULT``: the frame is multiplied by that header value
  (the default when the header has none), and ``FSCALASTRO_TYPE FIXED`` by the ratio of the output to
  the input pixel area (``VARIABLE``: per pixel, the Jacobian); the weights are divided by the square of
  the whole factor.
* ``SUBTRACT_BACK Y`` with ``BACK_TYPE AUTO`` subtracts SExtractor's back.c background (``BACK_SIZE``,
  ``BACK_FILTERSIZE``); ``BACK_TYPE MANUAL`` subtracts ``BACK_DEFAULT``.
* weights: SWarp turns the input weights into variances (``WEIGHT_TYPE NONE``: the square of the
  frame's global background RMS -- the median of its background meshes' rms, SExtractor's "RMS" --
  everywhere; ``BACKGROUND``: the background rms map itself, not squared, as SWarp 2.41's weight_to_var
  does; ``MAP_WEIGHT``: 1 / weight, pixels at or
  below ``WEIGHT_THRESH`` bad; ``MAP_RMS``: rms^2; ``MAP_VARIANCE``: as given), resamples them with the
  image's kernel (sampled ``h - 1/2`` input pixels off the image's positions, as SWarp 2.41 does: see
  :func:`resample_variance`) and writes ``1 / variance`` as the output weight map: 0 where the kernel
  touched a bad-weight pixel (the image keeps its interpolated value there) or reached outside the frame.
  ``RESCALE_WEIGHTS Y`` (SWarp's default) rescales ``MAP_*`` weights to the measured noise: not
  implemented (warned; ``RESCALE_WEIGHTS N`` is exact).
* pixels no input pixel reached are 0 in the image (SWarp's blank value) and 0 in the weight map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

#: SWarp 2.41 defaults of the keys the drop-in reads (``SWarp -dd``)
SWARP_DEFAULTS = {"IMAGEOUT_NAME": "coadd.fits", "WEIGHTOUT_NAME": "coadd.weight.fits", "COMBINE": "Y",
                  "COMBINE_TYPE": "MEDIAN", "RESAMPLING_TYPE": "LANCZOS3", "FSCALASTRO_TYPE": "FIXED",
                  "FSCALE_KEYWORD": "FLXSCALE", "FSCALE_DEFAULT": "1.0", "SUBTRACT_BACK": "Y", "BACK_TYPE": "AUTO",
                  "BACK_DEFAULT": "0.0", "BACK_SIZE": "128", "BACK_FILTERSIZE": "3", "WEIGHT_TYPE": "NONE",
                  "WEIGHT_IMAGE": "", "WEIGHT_SUFFIX": ".weight.fits", "WEIGHT_THRESH": "", "RESCALE_WEIGHTS": "Y",
                  "RESAMPLE_SUFFIX": ".resamp.fits", "HEADER_SUFFIX": ".head", "BLANK_BADPIXELS": "N"}
#: COMBINE_TYPE values that leave one frame as it is
SINGLE_FRAME_COMBINE = {"MEDIAN", "AVERAGE", "MIN", "MAX", "WEIGHTED", "CLIPPED", "SUM", "WEIGHTED_WEIGHT",
                        "MEDIAN_WEIGHT"}


def _first(value: str) -> str:
    return value.split(",")[0].strip()


def flux_scale(keys: dict, header) -> float:
    """``FSCALE_KEYWORD``'s header value, else ``FSCALE_DEFAULT``."""
    kw = _first(keys["FSCALE_KEYWORD"]).upper()
    if header is not None and kw and kw in header:
        return float(header[kw])
    return float(_first(keys["FSCALE_DEFAULT"]))


def background(keys: dict, image: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SExtractor's back.c background of the frame with ``BACK_SIZE`` / ``BACK_FILTERSIZE``: (background
    map, rms map, global rms (B,))."""
    from .background import background_2d, global_rms

    size = [int(float(v)) for v in keys["BACK_SIZE"].split(",")]
    fsz = [int(float(v)) for v in keys["BACK_FILTERSIZE"].split(",")]
    mesh = {}
    res = background_2d(image, mask, box_size=size[0] if len(size) == 1 else (size[1], size[0]),
                        filter_size=fsz[0] if len(fsz) == 1 else (fsz[1], fsz[0]), method="sextractor", mesh_out=mesh)
    return res.background, res.rms, global_rms(mesh["mesh"])


def weight_file(keys: dict, input_path: Path) -> Path:
    """``WEIGHT_IMAGE`` when given, else the input's name with ``WEIGHT_SUFFIX`` for ``.fits``."""
    name = _first(keys["WEIGHT_IMAGE"])
    if name:
        p = Path(name)
    else:
        p = input_path.with_name(input_path.name[: -len(".fits")] + _first(keys["WEIGHT_SUFFIX"])
                                 if input_path.name.endswith(".fits") else input_path.name + _first(keys["WEIGHT_SUFFIX"]))
    if not p.is_file():
        raise FileNotFoundError(f"SWarp WEIGHT_TYPE {keys['WEIGHT_TYPE']}: weight map {p} not found (WEIGHT_IMAGE / WEIGHT_SUFFIX)")
    return p


def input_variance(keys: dict, input_path: Path, image: torch.Tensor, rms_map, global_rms) -> Optional[torch.Tensor]:
    """The input variance SWarp derives from ``WEIGHT_TYPE`` (None for NONE: the constant global rms^2,
    applied after resampling); non-finite (``inf``) where the pixel is bad."""
    from astropy.io import fits

    wt = _first(keys["WEIGHT_TYPE"]).upper()
    if wt == "NONE":
        return None
    if wt == "BACKGROUND":  # SWarp 2.41 (weight_to_var) takes the rms map itself as the variance
        return rms_map.double().clone()
    p = weight_file(keys, Path(input_path))
    w = torch.from_numpy(np.asarray(fits.getdata(p), dtype=np.float64))[None, None]
    if w.shape != image.shape:
        raise ValueError(f"SWarp weight map {p}: {w.shape[-1]}x{w.shape[-2]}, the image {image.shape[-1]}x{image.shape[-2]}")
    thresh = _first(keys["WEIGHT_THRESH"])
    inf = torch.full_like(w, float("inf"))
    if wt == "MAP_WEIGHT":
        t = float(thresh) if thresh else 0.0
        return torch.where(w > t, 1.0 / w, inf)
    t = float(thresh) if thresh else float("inf")
    if wt == "MAP_RMS":
        return torch.where(w < t, w * w, inf)
    if wt == "MAP_VARIANCE":
        return torch.where(w < t, w, inf)
    raise ValueError(f"SWarp WEIGHT_TYPE {wt!r}: expected NONE, BACKGROUND, MAP_WEIGHT, MAP_RMS or MAP_VARIANCE")


#: half width of SWarp's interpolation kernels: an output pixel is covered when the input position of its
#: centre lies within [h - 1, N - h] (0-based; NEAREST: within the frame)
KERNEL_HALF_WIDTH = {"NEAREST": 0, "BILINEAR": 1, "LANCZOS2": 2, "LANCZOS3": 3, "LANCZOS4": 4}


def covered(src, dst, in_shape, out_shape, resampling: str) -> torch.Tensor:
    """(1, 1, H, W) bool: the output pixels SWarp resamples (their centres' input positions at least
    ``h - 1`` px inside the input frame, ``h`` the kernel half width)."""
    h = KERNEL_HALF_WIDTH.get(resampling, 3)
    yy, xx = torch.meshgrid(torch.arange(out_shape[0], dtype=torch.float64),
                            torch.arange(out_shape[1], dtype=torch.float64), indexing="ij")
    x, y = dst.pixel_to_pixel(src, xx.reshape(1, -1), yy.reshape(1, -1))
    lo = -0.5 if h == 0 else h - 1.0
    ok = (x >= lo) & (y >= lo) & (x <= in_shape[1] - 1 - lo) & (y <= in_shape[0] - 1 - lo)
    return ok.reshape(1, 1, *out_shape)


def resample_variance(var_in: torch.Tensor, header, dst, reproject, resampling: str):
    """The input variance resampled as SWarp 2.41 resamples it: with the image's kernel, but sampled
    ``h - 1/2`` input pixels lower in x and y than the image (``h`` the kernel half width; measured
    against SWarp with linear weight ramps: 2.5 px for LANCZOS3, 0.5 for BILINEAR, 0 for NEAREST).
    Returns (variance (B,1,H,W), bool map of the output pixels whose kernel touched a bad pixel, at the
    image's positions: that agrees with SWarp's zero weights)."""
    from .wcs import TanWCS

    shift = max(KERNEL_HALF_WIDTH.get(resampling, 3) - 0.5, 0.0)
    h = header.copy()
    h["CRPIX1"], h["CRPIX2"] = float(h["CRPIX1"]) - shift, float(h["CRPIX2"]) - shift
    bad = ~torch.isfinite(var_in)
    var = reproject(torch.nan_to_num(var_in, posinf=0.0), TanWCS.from_header(h), dst, None).image
    if not bool(bad.any()):
        return var, torch.zeros_like(var, dtype=torch.bool)
    # the bad pixels reach the output pixels whose kernel (at the image's own positions) touches them
    touched = reproject(bad.to(var_in.dtype), TanWCS.from_header(header), dst, None).image
    return var, torch.nan_to_num(touched, nan=1.0).abs() > 1e-9


def output_weight(var_out: Optional[torch.Tensor], footprint: torch.Tensor, global_rms, factor) -> torch.Tensor:
    """``1 / (variance * factor^2)`` where the output pixel was resampled (``footprint``: bool), 0
    elsewhere (``factor``: the flux scale applied to the image, a number or a per-pixel map)."""
    covered = footprint
    if var_out is None:
        var_out = (global_rms.double() ** 2).view(-1, 1, 1, 1).expand_as(footprint)
    v = var_out * (torch.as_tensor(factor, dtype=torch.float64) ** 2)
    ok = covered & torch.isfinite(v) & (v > 0)
    return torch.where(ok, 1.0 / torch.where(ok, v, torch.ones_like(v)), torch.zeros_like(v))


def unimplemented(given: dict, keys: dict, no_effect: set) -> list[str]:
    """Keys of the ``.swarp`` file (or overrides) the drop-in does not implement, with their values."""
    out = [k for k in given if k not in SWARP_DEFAULTS and k not in no_effect]
    ct = _first(keys["COMBINE_TYPE"]).upper()
    if ct not in SINGLE_FRAME_COMBINE:
        out.append(f"COMBINE_TYPE {ct} (one frame: written as resampled)")
    if _first(keys["WEIGHT_TYPE"]).upper().startswith("MAP_") and keys["RESCALE_WEIGHTS"].upper().startswith("Y"):
        out.append("RESCALE_WEIGHTS Y (the MAP_* weights are used as given; give RESCALE_WEIGHTS N)")
    return out
