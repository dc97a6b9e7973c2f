"""Quick-look figures (eager mode, headless).

Every function returns a :class:`matplotlib.figure.Figure` and, when ``path=`` is given, also
saves it there (format from the extension, at the figure's own ``dpi``, so a PNG is exactly
``figsize * dpi`` pixels). Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas
directly: no pyplot, no global backend switch, no GUI, nothing kept alive by pyplot's figure
manager, so they work on headless servers and inside notebooks alike. matplotlib is imported
lazily, on the first call.

Images are shown with ``origin="lower"`` (FITS/DS9 convention: pixel (0, 0) at the bottom left),
0-based pixel axes (x = column, y = row), grey scale from :class:`~astroprep_torch.stretch.ZScale`
unless limits are given. With a FITS header, an astropy WCS or a
:class:`~astroprep_torch.wcs.TanWCS`, axes are RA/Dec via astropy's WCSAxes.

Inputs may be tensors ``(H, W)``, ``(1, H, W)``, ``(B, C, H, W)`` (``index`` picks the batch
element, channel 0) or numpy arrays. Plotting necessarily moves data to the host (``.cpu()``):
this module is the edge of the pipeline.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "show_image",
    "plot_catalog",
    "plot_triplet",
    "plot_background",
    "plot_quality",
    "plot_histograms",
]

ArrayLike = Union[Tensor, np.ndarray]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _new_figure(figsize, dpi):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig, path):
    if path is not None:
        fig.savefig(path, dpi=fig.dpi)
    return fig


def _plane(x: ArrayLike, name: str, index: int = 0, channel: int = 0) -> np.ndarray:
    """One 2-D float64 numpy plane out of a tensor/array shaped (H, W), (C, H, W) or (B, C, H, W)."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu")
        x = x.to(torch.float64) if x.is_floating_point() or x.dtype != torch.bool else x
        arr = x.numpy()
    else:
        arr = np.asarray(x)
    if arr.ndim == 4:
        if not -arr.shape[0] <= index < arr.shape[0]:
            raise IndexError(f"index {index} out of range for {name} with batch size {arr.shape[0]}")
        arr = arr[index, channel]
    elif arr.ndim == 3:
        arr = arr[channel]
    elif arr.ndim != 2:
        raise ValueError(f"{name} must be shaped (H, W), (C, H, W) or (B, C, H, W), got shape {arr.shape}")
    return arr if arr.dtype == bool else arr.astype(np.float64, copy=False)


def _astropy_wcs(wcs: Any = None, header: Any = None, index: int = 0):
    """astropy WCS from a header, an astropy WCS or a TanWCS (or None)."""
    if wcs is None and header is None:
        return None
    from astropy.wcs import WCS

    if wcs is not None:
        if isinstance(wcs, WCS):
            return wcs.celestial
        if hasattr(wcs, "to_header"):  # astroprep_torch.wcs.TanWCS
            return WCS(wcs.to_header(index)).celestial
        raise TypeError(f"wcs must be an astropy WCS or a TanWCS, got {type(wcs).__name__}")
    w = WCS(header)
    return w.celestial if w.has_celestial else None


def _zscale_limits(arr: np.ndarray, mask: Optional[np.ndarray] = None) -> tuple[float, float]:
    from .stretch import zscale

    t = torch.as_tensor(arr, dtype=torch.float64)[None, None]
    m = None if mask is None else torch.as_tensor(mask, dtype=torch.bool)[None, None]
    lim = zscale(t, m)
    lo, hi = float(lim.vmin), float(lim.vmax)
    if not np.isfinite(lo) or not np.isfinite(hi):
        return 0.0, 1.0
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _image_axes(fig, spec, wcs):
    ax = fig.add_subplot(spec, projection=wcs) if wcs is not None else fig.add_subplot(spec)
    if wcs is not None:
        ax.coords[0].set_axislabel("Right ascension")
        ax.coords[1].set_axislabel("Declination")
        ax.coords.grid(color="white", alpha=0.25, linestyle=":")
    else:
        ax.set_xlabel("x [pixel]")
        ax.set_ylabel("y [pixel]")
    return ax


def _imshow(fig, ax, arr, vmin, vmax, cmap, label, norm=None):
    kwargs = dict(origin="lower", cmap=cmap, interpolation="nearest")
    if norm is not None:
        im = ax.imshow(arr, norm=norm, **kwargs)
    else:
        im = ax.imshow(arr, vmin=vmin, vmax=vmax, **kwargs)
    cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
    cb.set_label(label)
    return im


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def show_image(
    image: ArrayLike, *, mask: Optional[ArrayLike] = None, header: Any = None, wcs: Any = None,
    index: int = 0, vmin: Optional[float] = None, vmax: Optional[float] = None, cmap: str = "gray",
    title: Optional[str] = None, unit: str = "ADU", figsize=(6.4, 5.6), dpi: int = 100, path=None,
):
    """An image with zscale grey levels and a colour bar.

    Args:
        image: ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)`` (``index`` picks the batch element).
        mask: optional bool, True = bad: excluded from the zscale limits and shown in red.
        header / wcs: FITS header, astropy WCS or TanWCS: RA/Dec axes (WCSAxes); else pixel axes.
        vmin, vmax: grey-scale limits (default: zscale of the good pixels).
        unit: colour-bar label.
    """
    arr = _plane(image, "image", index)
    m = None if mask is None else _plane(mask, "mask", index).astype(bool)
    lo, hi = _zscale_limits(arr, m)
    lo = lo if vmin is None else vmin
    hi = hi if vmax is None else vmax
    fig = _new_figure(figsize, dpi)
    ax = _image_axes(fig, 111, _astropy_wcs(wcs, header, index))
    _imshow(fig, ax, arr, lo, hi, cmap, f"{unit} (zscale {lo:.4g} .. {hi:.4g})" if vmin is None and vmax is None else unit)
    if m is not None and m.any():
        overlay = np.zeros(arr.shape + (4,))
        overlay[m] = (1.0, 0.1, 0.1, 0.6)
        ax.imshow(overlay, origin="lower", interpolation="nearest")
    ax.set_title(title if title is not None else f"image {arr.shape[1]} x {arr.shape[0]} px")
    return _finish(fig, path)


def _catalog_columns(catalog, index: int):
    def col(name, required=True):
        try:
            v = catalog[name]
        except (KeyError, TypeError, AttributeError):
            v = getattr(catalog, name, None)
        if v is None:
            if required:
                raise KeyError(f"catalog must have a {name!r} column (1-D)")
            return None
        return np.asarray(v.detach().cpu().numpy() if isinstance(v, Tensor) else v, dtype=np.float64).reshape(-1)

    cols = {k: col(k) for k in ("x", "y", "a", "b", "theta")}
    n = cols["x"].shape[0]
    for k, v in cols.items():
        if v.shape[0] != n:
            raise ValueError(f"catalog column {k!r} has {v.shape[0]} rows, 'x' has {n}")
    bi = col("batch_index", required=False)
    if bi is not None:
        keep = bi == index
        cols = {k: v[keep] for k, v in cols.items()}
    return cols


def plot_catalog(
    image: ArrayLike, catalog, *, index: int = 0, scale: float = 3.0, theta_units: str = "deg",
    header: Any = None, wcs: Any = None, color: str = "tab:orange", title: Optional[str] = None,
    figsize=(6.4, 5.6), dpi: int = 100, path=None,
):
    """Image (zscale) with one ellipse per source.

    ``catalog`` is anything indexable or with attributes ``x, y, a, b, theta`` (1-D tensors or
    arrays; 0-based pixels; ``a, b`` semi-axes in pixels; ``theta`` counter-clockwise from +x,
    degrees as SExtractor's THETA_IMAGE and our detect ``Catalog``, or radians with
    ``theta_units="rad"`` as sep) and optionally ``batch_index`` (rows of image ``index`` shown).
    Ellipses are drawn at ``scale`` times the semi-axes (3: SExtractor's isophotal-size convention).
    """
    from matplotlib.patches import Ellipse

    if theta_units not in ("deg", "rad"):
        raise ValueError(f"theta_units must be 'deg' or 'rad', got {theta_units!r}")
    cols = _catalog_columns(catalog, index)
    arr = _plane(image, "image", index)
    lo, hi = _zscale_limits(arr)
    fig = _new_figure(figsize, dpi)
    w = _astropy_wcs(wcs, header, index)
    ax = _image_axes(fig, 111, w)
    _imshow(fig, ax, arr, lo, hi, "gray", "ADU (zscale)")
    theta = cols["theta"] if theta_units == "deg" else np.rad2deg(cols["theta"])
    extra = {"transform": ax.get_transform("pixel")} if w is not None else {}
    for x, y, a, b, t in zip(cols["x"], cols["y"], cols["a"], cols["b"], theta):
        if not np.all(np.isfinite([x, y, a, b, t])):
            continue
        ax.add_patch(Ellipse((x, y), 2 * scale * a, 2 * scale * b, angle=t, fill=False, edgecolor=color,
                             linewidth=0.8, **extra))
    ax.set_xlim(-0.5, arr.shape[1] - 0.5)
    ax.set_ylim(-0.5, arr.shape[0] - 0.5)
    n = cols["x"].shape[0]
    ax.set_title(title if title is not None else f"{n} sources (ellipses at {scale:g} x a, b)")
    return _finish(fig, path)


def plot_triplet(
    science: ArrayLike, reference: ArrayLike, difference: ArrayLike, *, index: int = 0,
    titles: Sequence[str] = ("science", "reference", "difference"), shared_limits: bool = False,
    header: Any = None, wcs: Any = None, figsize=(15.0, 4.8), dpi: int = 100, path=None,
):
    """Science / reference / difference side by side.

    Science and reference each get their own zscale limits (``shared_limits=True``: both use the
    science frame's, so a flux change shows as a change in grey when the frames are photometrically
    matched); the difference uses symmetric limits ``+-max(|zscale|)`` on a diverging map.
    """
    sci, ref, diff = (_plane(x, n, index) for x, n in ((science, "science"), (reference, "reference"),
                                                        (difference, "difference")))
    if not (sci.shape == ref.shape == diff.shape):
        raise ValueError(f"science, reference and difference must have the same shape, got {sci.shape}, "
                         f"{ref.shape}, {diff.shape}")
    lims = [_zscale_limits(sci)]
    lims.append(lims[0] if shared_limits else _zscale_limits(ref))
    dlo, dhi = _zscale_limits(diff)
    d = max(abs(dlo), abs(dhi)) or 1.0
    fig = _new_figure(figsize, dpi)
    w = _astropy_wcs(wcs, header, index)
    specs = fig.add_gridspec(1, 3)
    for k, (arr, title) in enumerate(zip((sci, ref, diff), titles)):
        ax = _image_axes(fig, specs[0, k], w)
        if k < 2:
            _imshow(fig, ax, arr, *lims[k], "gray", "ADU (science zscale)" if shared_limits else "ADU (zscale)")
        else:
            _imshow(fig, ax, arr, -d, d, "RdBu_r", "ADU (symmetric)")
        ax.set_title(title)
    return _finish(fig, path)


def plot_background(
    background: ArrayLike, rms: Optional[ArrayLike] = None, *, image: Optional[ArrayLike] = None, index: int = 0,
    unit: str = "ADU", figsize=None, dpi: int = 100, path=None,
):
    """Background and background-rms maps (and the image, if given), each with its own colour bar
    (maps scaled to their 0.5 .. 99.5 percentiles, the image to its zscale). ``background`` may be
    a :class:`~astroprep_torch.background.BackgroundResult` (then ``rms`` is taken from it)."""
    if rms is None:
        if not (hasattr(background, "background") and hasattr(background, "rms")):
            raise TypeError("rms is required unless background is a BackgroundResult (background, rms)")
        background, rms = background.background, background.rms
    panels = []
    if image is not None:
        img = _plane(image, "image", index)
        panels.append((img, "image", *_zscale_limits(img), "gray", f"{unit} (zscale)"))
    bkg = _plane(background, "background", index)
    noise = _plane(rms, "rms", index)
    if bkg.shape != noise.shape:
        raise ValueError(f"background and rms must have the same shape, got {bkg.shape} and {noise.shape}")
    for arr, title, cmap in ((bkg, "background", "viridis"), (noise, "background rms", "magma")):
        lo, hi = np.nanpercentile(arr, [0.5, 99.5]) if np.isfinite(arr).any() else (0.0, 1.0)
        panels.append((arr, title, lo, hi if hi > lo else lo + 1.0, cmap, f"{unit} (0.5 .. 99.5 %)"))
    figsize = figsize or (5.0 * len(panels), 4.6)
    fig = _new_figure(figsize, dpi)
    specs = fig.add_gridspec(1, len(panels))
    for k, (arr, title, lo, hi, cmap, label) in enumerate(panels):
        ax = fig.add_subplot(specs[0, k])
        ax.set_xlabel("x [pixel]")
        ax.set_ylabel("y [pixel]")
        _imshow(fig, ax, arr, lo, hi, cmap, label)
        ax.set_title(f"{title}: median {np.nanmedian(arr):.4g}")
    return _finish(fig, path)


def plot_quality(
    image: ArrayLike, patch_error: ArrayLike, *, bad: Optional[ArrayLike] = None,
    threshold: Optional[float] = None, patch_size: Optional[int] = None, stride: Optional[int] = None,
    index: int = 0, alpha: float = 0.45, figsize=(12.0, 5.2), dpi: int = 100, path=None,
):
    """Per-patch quality error map over the image, bad patches outlined in red (``patch_error`` may
    be a :class:`~astroprep_torch.quality.QualityResult`).

    Args:
        image: the frame (zscale grey levels).
        patch_error: ``(nh, nw)`` (or ``(B, 1, nh, nw)`` as ``QualityResult.patch_error``) errors.
        bad: bool ``(nh, nw)`` patch flags; default ``patch_error > threshold`` if a threshold is
            given, else none.
        patch_size, stride: patch geometry in pixels (default: the image split evenly into the
            ``nh x nw`` grid). Patch ``(i, j)`` covers rows ``i*stride ..`` and columns
            ``j*stride ..``, ``patch_size`` wide, clipped at the image edge.
    Left: image with the error map overlaid (log colour scale) and bad patches outlined; right: the
    error map alone.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    if hasattr(patch_error, "patch_error"):  # a QualityResult
        patch_error = patch_error.patch_error
    arr = _plane(image, "image", index)
    err = _plane(patch_error, "patch_error", index)
    nh, nw = err.shape
    h, w = arr.shape
    if bad is None:
        flags = err > threshold if threshold is not None else np.zeros_like(err, dtype=bool)
    else:
        flags = _plane(bad, "bad", index).astype(bool)
        if flags.shape != err.shape:
            raise ValueError(f"bad must be shaped like patch_error {err.shape}, got {flags.shape}")
    sy = stride or (h / nh)
    sx = stride or (w / nw)
    py = patch_size or sy
    px = patch_size or sx
    extent = (-0.5, -0.5 + min(w, sx * (nw - 1) + px), -0.5, -0.5 + min(h, sy * (nh - 1) + py))
    pos = err[np.isfinite(err) & (err > 0)]
    norm = LogNorm(vmin=pos.min(), vmax=max(pos.max(), pos.min() * 1.0001)) if pos.size else None
    lo, hi = _zscale_limits(arr)
    fig = _new_figure(figsize, dpi)
    specs = fig.add_gridspec(1, 2)
    ax = fig.add_subplot(specs[0, 0])
    ax.imshow(arr, origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    im = ax.imshow(err, origin="lower", cmap="inferno", norm=norm, alpha=alpha, extent=extent,
                   interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
    cb.set_label("patch error (log)")
    for i, j in zip(*np.nonzero(flags)):
        x0, y0 = j * sx - 0.5, i * sy - 0.5
        ax.add_patch(Rectangle((x0, y0), min(px, w - 0.5 - x0), min(py, h - 0.5 - y0), fill=False,
                               edgecolor="red", linewidth=1.5))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(-0.5, h - 0.5)
    ax.set_xlabel("x [pixel]")
    ax.set_ylabel("y [pixel]")
    ax.set_title(f"quality: {int(flags.sum())} of {flags.size} patches bad")
    ax2 = fig.add_subplot(specs[0, 1])
    im2 = ax2.imshow(err, origin="lower", cmap="inferno", norm=norm, interpolation="nearest")
    for i, j in zip(*np.nonzero(flags)):
        ax2.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    cb2 = fig.colorbar(im2, ax=ax2, shrink=0.9, pad=0.02)
    cb2.set_label("patch error (log)")
    ax2.set_xlabel("patch column")
    ax2.set_ylabel("patch row")
    ax2.set_title("per-patch error" + (f" (threshold {threshold:.3g})" if threshold is not None else ""))
    return _finish(fig, path)


def plot_histograms(
    image: ArrayLike, transformed: Optional[ArrayLike] = None, *, transform=None, mask: Optional[ArrayLike] = None,
    bins: int = 256, index: int = 0, log: bool = True, figsize=(11.0, 4.4), dpi: int = 100, path=None,
):
    """Pixel histograms before and after a grey-scale transform.

    Give either ``transformed`` (the output) or ``transform`` (a callable such as
    :class:`~astroprep_torch.stretch.Normalize`, applied to ``image``; default zscale + linear).
    The left panel covers the raw image's 0.5 .. 99.5 percentile range (widened to its zscale
    limits, which it marks); ``log`` puts counts on a log axis.
    """
    raw = _plane(image, "image", index)
    m = None if mask is None else _plane(mask, "mask", index).astype(bool)
    if transformed is None:
        if transform is None:
            from .stretch import Normalize

            transform = Normalize()
        t = torch.as_tensor(raw)[None, None]
        transformed = transform(t) if m is None else transform(t, torch.as_tensor(m)[None, None])
    out = _plane(transformed, "transformed", index if np.ndim(transformed) == 4 else 0)
    good = np.isfinite(raw) & (True if m is None else ~m)
    lo, hi = _zscale_limits(raw, m)
    fig = _new_figure(figsize, dpi)
    specs = fig.add_gridspec(1, 2)
    ax = fig.add_subplot(specs[0, 0])
    vals = raw[good]
    p_lo, p_hi = np.percentile(vals, [0.5, 99.5]) if vals.size else (lo, hi)
    rng = (min(p_lo, lo), max(p_hi, hi))
    ax.hist(vals, bins=bins, range=rng if rng[1] > rng[0] else None, color="tab:blue", log=log)
    ax.axvline(lo, color="tab:red", linestyle="--", label=f"zscale {lo:.4g}, {hi:.4g}")
    ax.axvline(hi, color="tab:red", linestyle="--")
    ax.set_xlabel("pixel value [ADU] (0.5 .. 99.5 % range)")
    ax.set_ylabel("pixels")
    ax.set_title("before")
    ax.legend(loc="upper right", fontsize=8)
    ax2 = fig.add_subplot(specs[0, 1])
    ovals = out[good & np.isfinite(out)] if out.shape == raw.shape else out[np.isfinite(out)]
    ax2.hist(ovals, bins=bins, color="tab:green", log=log)
    ax2.set_xlabel("transformed value")
    ax2.set_ylabel("pixels")
    name = type(transform).__name__ if transform is not None else "transform"
    ax2.set_title(f"after ({name})")
    return _finish(fig, path)
