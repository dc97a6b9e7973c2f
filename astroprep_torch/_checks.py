"""Argument checks shared by every stage.

Each check names the argument and says what was expected, so that bad input fails loudly at the
boundary of a stage instead of corrupting data further down.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def check_image(image, name: str = "image", *, allow_3d: bool = False, channels: Optional[int] = None) -> Tensor:
    """Check that ``image`` is a floating tensor shaped ``(B, C, H, W)``.

    With ``allow_3d`` a ``(C, H, W)`` tensor is accepted too and returned unchanged (callers that
    accept it add and remove the batch axis themselves). ``channels`` fixes ``C``.
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor shaped (B, C, H, W), got {type(image).__name__}")
    ok_dims = (3, 4) if allow_3d else (4,)
    if image.dim() not in ok_dims:
        want = "(B, C, H, W) or (C, H, W)" if allow_3d else "(B, C, H, W)"
        raise ValueError(f"{name} must be shaped {want}, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32 or float64), got dtype {image.dtype}")
    if channels is not None and image.shape[-3] != channels:
        raise ValueError(f"{name} must have {channels} channel(s) on axis -3, got shape {tuple(image.shape)}")
    if image.shape[-1] == 0 or image.shape[-2] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(image.shape)}")
    return image


def check_mask(mask, image: Tensor, name: str = "mask") -> Optional[Tensor]:
    """Check that ``mask`` is ``None`` or a bool tensor broadcastable to ``image`` (True = bad).

    Returns the mask expanded to ``image``'s shape (a view, no copy), or ``None``.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor (True = bad) or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = bad pixel), got {mask.dtype}")
    try:
        return mask.expand_as(image)
    except RuntimeError:
        raise ValueError(
            f"{name} shape {tuple(mask.shape)} does not broadcast to the image shape {tuple(image.shape)}"
        ) from None


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def all_finite(x: Tensor) -> bool:
    """Whether every element of ``x`` is finite (one host sync).

    A sum is one vectorised pass and is finite exactly when no element is NaN or infinite, unless
    it overflows; only then is the elementwise test run. ``torch.isfinite`` on a CPU float tensor
    costs four passes (abs, compare, compare, and)."""
    if not x.is_floating_point() and not x.is_complex():
        return True
    with torch.no_grad():
        if bool(torch.isfinite(x.sum())):
            return True
        return bool(torch.isfinite(x).all())


def bad_pixels(image: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Bool map of pixels that must not enter statistics: masked, NaN or infinite (a new tensor,
    safe to update in place)."""
    if all_finite(image):
        if mask is None:
            return torch.zeros_like(image, dtype=torch.bool)
        return mask.expand(image.shape).clone()
    bad = ~torch.isfinite(image)
    if mask is not None:
        bad = bad | mask
    return bad


def as_pair(value, name: str) -> tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of positive ints (an int means a square)."""
    if isinstance(value, int):
        pair = (value, value)
    else:
        try:
            pair = tuple(int(v) for v in value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or a pair (h, w) of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


class RunError(Exception):
    """An error of a whole run whose message says everything (bad input, a full disk): the command
    line prints it without a traceback and exits with status 2."""


class InputError(RunError, ValueError):
    """A run's input cannot be used (a missing or unreadable reference, colliding frame names, ...)."""


def check_float_dtype(x: Tensor, name: str, *, allowed=(torch.float32, torch.float64)) -> Tensor:
    """Refuse half precision and other dtypes the stage cannot compute in faithfully: float16 and
    bfloat16 hold 3 and 2 significant digits (ADU values of 10^4 lose whole units), so the caller
    converts (``x.float()``) knowing what it costs."""
    if x.dtype not in allowed:
        names = " or ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must be {names}, got {x.dtype}; convert it first (e.g. {name}.float())")
    return x


def check_wcs(wcs, name: str):
    """``wcs`` must map pixels and sky (``pixel_to_world`` / ``world_to_pixel``, e.g. a TanWCS)."""
    if wcs is None or not (hasattr(wcs, "pixel_to_world") and hasattr(wcs, "world_to_pixel")):
        raise TypeError(f"{name} must be a WCS with pixel_to_world / world_to_pixel (e.g. a TanWCS from "
                        f"TanWCS.from_header), got {type(wcs).__name__}")
    return wcs


def check_batch_nonempty(x: Tensor, name: str) -> Tensor:
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): nothing to compute")
    return x


def check_finite(x: Tensor, name: str, mask: Optional[Tensor] = None, hint: str = "") -> None:
    """Raise naming ``name`` when it holds NaN or infinite values outside ``mask`` (True = bad)."""
    if all_finite(x):
        return
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & ~mask
    n = int(bad.sum())
    if n:
        raise ValueError(f"{name} has {n} NaN or infinite value(s) outside the mask{hint}")


def frame_problem(image: Tensor, mask: Optional[Tensor] = None, min_size: int = 16) -> str:
    """Why a single frame ``(1, 1, H, W)`` (or ``(H, W)``) cannot be processed, in words; ``""``
    when it can. Catches what would otherwise end deep in a stage with a message about something
    else: a frame too small, with no usable pixel, or constant (all zero)."""
    h, w = image.shape[-2:]
    if h < min_size or w < min_size:
        return f"frame too small: {h}x{w} pixels (at least {min_size}x{min_size} needed)"
    with torch.no_grad():
        bad = bad_pixels(image, mask)
        if not bool(bad.any()):
            lo, hi = (float(v) for v in torch.aminmax(image))
        elif bool(bad.all()):
            return "empty frame: every pixel is NaN, infinite or masked"
        else:
            lo = float(image.masked_fill(bad, math.inf).amin())
            hi = float(image.masked_fill(bad, -math.inf).amax())
    if lo == hi:
        return f"empty frame: every usable pixel equals {lo:g}"
    return ""
