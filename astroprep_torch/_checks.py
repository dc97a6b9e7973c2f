"""Argument checks shared by every stage.

Each check names the argument and says what was expected, so that bad input fails loudly at the
boundary of a stage instead of corrupting data further down.
"""

from __future__ import annotations

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
