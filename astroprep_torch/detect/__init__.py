"""Source detection at SExtractor parity: filter, threshold, label, deblend, clean -> :class:`Catalog`.

One file per SExtractor step: ``filter`` (1), ``threshold`` (2), ``labels`` (3), ``deblend`` (4),
``clean`` (5), ``analyse`` (moments, via :mod:`astroprep_torch._moments`), ``catalog`` and
``extractor`` (:func:`detect_sources`, :class:`SourceExtractor`).

The algorithm follows SExtractor (Bertin & Arnouts 1996) and its library port sep, stage by stage:

1. **Matched filter.** The background-subtracted image is convolved (``conv2d``, zero padding, as
   SExtractor's line convolution treats pixels outside the frame) with the detection kernel,
   normalised to unit sum of absolute values as SExtractor does for ``CONV NORM`` kernels.
   ``filter_kernel="default"`` is SExtractor's ``default.conv`` 3x3 pyramid ``[[1,2,1],[2,4,2],[1,2,1]]``.
2. **Threshold.** A pixel is detected when its *filtered* value exceeds ``thresh * rms`` where ``rms`` is
   the *unfiltered* background rms (a map, or one value per image: SExtractor without weight maps
   uses one global value, the background-mesh median it prints as ``RMS``). Masked pixels are never
   detected (their value is set to 0 before filtering).
   On CPU (no autograd, separable kernel such as the default) steps 1-2 run strip by strip of rows
   with reused buffers: the same float operations, but no frame-sized filtered image, threshold map,
   boolean map or index temporaries (a fresh frame-sized temporary costs page faults that can exceed
   the arithmetic); each strip is compacted at once to the detected pixels.
3. **8-connected components** on the compacted list of detected pixels only (no full-frame
   iteration): the right-hand neighbour of a pixel can only be the next list entry, the three below
   it are found with one ``searchsorted`` on the sorted linear indices; components
   by hooking roots onto the smallest neighbouring root (``scatter_reduce`` amin) followed by full
   pointer jumping. Each round at least halves the number of distinct roots per component, so a
   4096^2 frame converges in a handful of rounds. Components smaller than ``minarea`` are dropped.
4. **Deblending** exactly as SExtractor's ``deblend.c``: ``deblend_nthresh`` sub-thresholds
   ``t_k = t0 (peak/t0)^(k/N)`` between the detection threshold ``t0`` and the object's filtered
   peak; at each level the object's pixels above ``t_k`` split into 8-connected branches of at least
   ``min(minarea, 3)`` pixels (SExtractor's ``MAXDEBAREA``); walking the tree from the top, a node splits when more than one of its
   children holds ``sum(f - t_k) > deblend_cont * sum(f)`` of the object (``sum(f)`` the filtered
   flux of the whole object). Vectorisation: only objects with at least two local maxima of the
   filtered image and ``2 * minarea`` pixels can split (an upper level set of a function with one
   regional maximum on a connected pixel graph is connected), and for those the components of
   every level grow from one union-find fed from the top level down (no ``(pixel, level)`` nodes).
   The tree walk is a loop over the ``deblend_nthresh`` *levels* (vectorised over every component
   of every object), not over objects.
   Pixels below the split are given to a branch by SExtractor's ``gatherup`` rule: each branch is a
   Gaussian of amplitude ``amp = t0 exp(npix / (2 pi abcor a b))`` (capped at ``4 x`` its filtered
   peak) and shape ``(cxx, cyy, cxy)/abcor``; SExtractor draws the branch at random from these
   probabilities, we take the most probable one (deterministic; the difference only affects
   faint pixels in the overlap).
5. **Cleaning** as SExtractor's ``clean``: a brighter object (filtered flux) with a Moffat-like
   profile ``amp (1 + alpha r^2)^(-clean_param)`` fitted to its isophotal area removes a fainter one
   within ``CLEAN_ZONE = 10 (a_1 + a_2)`` whose ``minarea``-th brightest pixel above threshold lies
   below the profile. An object is removed when an object that is itself kept removes it
   (brightness order, computed as a fixed point over all pairs at once). The removed object's
   pixels are merged into the segmentation label of the object that removed it, as SExtractor's
   ``mergeobject`` does.
6. **Measurements** for the final segmentation come from :func:`astroprep_torch.photometry.measure`
   when that module is present; otherwise the isophotal barycentre, second moments, ``npix``,
   ``peak`` and ``flux_iso`` are computed here (:func:`isophotal_moments`). The detection stage
   owns flags 2 (blended), 4 (saturated), 8 (truncated at the border) and 1 (crowded: more than
   10% of the pixels of the object's Kron ellipse, or of its isophotal footprint grown by one
   pixel when no Kron radius is known, belong to other objects).

``SourceExtractor.forward`` keeps the segmentation sparse (its labelled pixels) and hands the
pixel lists, their filtered values and the detected pixels to ``photometry.measure``; the dense
(B,1,H,W) int64 map (128 MB at 4096^2) is made only when ``Catalog.segmentation`` is read.

What remains a data-dependent Python loop in ``forward``: the number of hooking rounds of the
connected-component labelling (each round is one vectorised pass over the still-open edges and
needs one host synchronisation to test convergence) and the loop over the ``deblend_nthresh``
levels of the deblending tree. Nothing loops over pixels or objects.

Coordinates are 0-based pixel centres (x = column, y = row); :meth:`Catalog.to_table` writes
SExtractor's 1-based ``X_IMAGE``/``Y_IMAGE``.
"""

from __future__ import annotations

from .._moments import segment_max as _segment_max  # noqa: F401
from .._moments import segment_min as _segment_min  # noqa: F401
from .._moments import segment_sum as _segment_sum  # noqa: F401

# SExtractor's FLAGS bits, defined once in photometry (which sets most of them).
from ..photometry import (  # noqa: F401
    FLAG_APER_INCOMPLETE,
    FLAG_BLENDED,
    FLAG_CROWDED,
    FLAG_ISO_INCOMPLETE,
    FLAG_SATURATED,
    FLAG_TRUNCATED,
)
from ._index import _argsort, _g, _host, _unique_roots  # noqa: F401
from .analyse import _analyse, _kth_largest, _mthresh, _object_index, _overrides, isophotal_moments  # noqa: F401
from .catalog import SEXTRACTOR_COLUMNS, Catalog, _LazySegmentation, rows_of_image  # noqa: F401
from .clean import CLEAN_ZONE, _clean, _neighbour_pairs  # noqa: F401
from .deblend import MAXDEBAREA, _deblend, _find_roots, _level_roots  # noqa: F401
from .extractor import SourceExtractor, _photometry_module, detect_sources  # noqa: F401
from .filter import (  # noqa: F401
    _as_kernel,
    _filter_threshold_strips,
    _separable,
    _separable_filter,
    _strip_kernel,
    default_kernel,
    filter_image,
)
from .labels import _pixel_edges, connected_components, label_image  # noqa: F401
from .threshold import _noise_base, _noise_map, check_rms, detection_threshold  # noqa: F401

__all__ = [
    "Catalog",
    "SourceExtractor",
    "default_kernel",
    "filter_image",
    "detection_threshold",
    "connected_components",
    "label_image",
    "detect_sources",
    "isophotal_moments",
    "FLAG_CROWDED",
    "FLAG_BLENDED",
    "FLAG_SATURATED",
    "FLAG_TRUNCATED",
    "FLAG_APER_INCOMPLETE",
    "FLAG_ISO_INCOMPLETE",
]

CROWD_THRESHOLD = 0.1  # SExtractor: fraction of the Kron aperture held by other objects for flag 1
