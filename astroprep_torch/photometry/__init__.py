"""Measurements for a fixed segmentation, at SExtractor parity, vectorised over objects.

``measure(image, segmentation, rms, ...)`` returns one row per labelled object (ordered by
``(batch_index, label)``) with SExtractor's isophotal, aperture, AUTO (Kron), FLUX_RADIUS and windowed
measurements.  Standalone helpers (``sum_circle``, ``sum_ellipse``, ``kron_radius``,
``windowed_centroid``) work like sep's functions on batched tensors.

Conventions
-----------
* ``image`` is background-subtracted, ``(B, 1, H, W)``; ``segmentation`` ``(B, 1, H, W)`` int labels,
  0 = no object, or a :class:`SegmentPixels` (the detector's pixel lists).  Pixel coordinates are
  0-based, ``x`` = column, ``y`` = row (SExtractor's ``X_IMAGE`` = ``x + 1``).  ``theta`` in degrees,
  counter-clockwise from +x (SExtractor).
* Noise: ``rms`` a scalar, a ``(B,)`` tensor or a ``(B, 1, H, W)`` map.  SExtractor without a weight
  map uses ONE global noise value (its "RMS" printed at start-up) for every error and threshold;
  pass that scalar for parity.  A map is used per pixel (as SExtractor does with a weight map).

One module per SExtractor step (source: analyse.c/scan.c/photom.c/growth.c/winpos.c of SExtractor 2.x);
their docstrings say where SExtractor and sep differ:

=================  ============================================================================
``segments``       :class:`SegmentPixels`: the segmentation as pixel lists
``isophotal``      detection filter, barycentre and moments of the filtered image, ISO fluxes
``stamps``         per-object stamps, neighbour masking (MASK_TYPE), size buckets
``apertures``      FLUX_APER (5x5 sub-sampled circles), ``sum_circle``, ``sum_ellipse``
``kron``           KRON_RADIUS and FLUX_AUTO, ``kron_radius``
``growth``         the growth curve, FLUX_RADIUS and the half-light radius
``winpos``         XWIN/YWIN, ``windowed_centroid``
``flags``          the FLAGS bits and their rules
``measurement``    :func:`measure` and :class:`Photometry`
=================  ============================================================================

Fluxes are linear in the pixel values, so everything is differentiable w.r.t. the image for a fixed
segmentation (the discrete choices -- which pixels, the Kron factor -- are constants).
"""

# re-exports: the public API, and the internals the tests reach for (the names of the former module)
# ruff: noqa: F401
from .apertures import APER_OVERSAMP, EXACT_SUBROWS, _circle_fraction, _stage_aper, sum_circle, sum_ellipse
from .flags import (
    FLAG_APER_INCOMPLETE,
    FLAG_BLENDED,
    FLAG_CROWDED,
    FLAG_ISO_INCOMPLETE,
    FLAG_SATURATED,
    FLAG_TRUNCATED,
    MeshBackground,
    _box_flag_round,
    _box_flag_trunc,
)
from .growth import GROWTH_MINHLRAD, GROWTH_NSIG, GROWTH_NSTEP, GROWTH_OVERSAMP, _growth_curve, _stage_growth
from .isophotal import DEFAULT_CONV, sextractor_filter
from .kron import CROWD_THRESHOLD, KRON_NSIG, _stage_auto, _stage_kron, kron_radius
from .measurement import _MASK_TYPES, _SPLIT_MIN, Photometry, _measure, _split_run, measure
from .segments import SegmentPixels
from .stamps import _as_map, _Frame, _rect_buckets, _reach, _side, _size_buckets
from .winpos import (
    WINPOS_FAC,
    WINPOS_MAX_RADIUS,
    WINPOS_NITERMAX,
    WINPOS_NSIG,
    WINPOS_OVERSAMP,
    WINPOS_STEPMIN,
    _stage_winpos,
    windowed_centroid,
)

__all__ = [
    "measure",
    "Photometry",
    "SegmentPixels",
    "MeshBackground",
    "sum_circle",
    "sum_ellipse",
    "kron_radius",
    "windowed_centroid",
    "sextractor_filter",
    "DEFAULT_CONV",
    "FLAG_CROWDED",
    "FLAG_BLENDED",
    "FLAG_SATURATED",
    "FLAG_TRUNCATED",
    "FLAG_APER_INCOMPLETE",
    "FLAG_ISO_INCOMPLETE",
]
