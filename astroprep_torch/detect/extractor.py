"""The detection stage: :func:`detect_sources` (filter, threshold, label, deblend, clean as named
steps) and :class:`SourceExtractor` (detection + ``photometry.measure`` -> :class:`~.catalog.Catalog`)."""

from __future__ import annotations

import importlib
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._checks import all_finite, bad_pixels, check_image, check_mask
from .._runtime import adapt_to_load, freed_memory_kept, serial_on_cpu
from ..photometry import FLAG_BLENDED, FLAG_SATURATED, FLAG_TRUNCATED
from ._index import _argsort, _g, _host, _unique_roots
from .analyse import Analysis, _analyse, _mthresh, _overrides, _segment_max, _segment_min, _segment_sum, isophotal_moments
from .catalog import Catalog, _LazySegmentation
from .clean import _clean, _follow_masters
from .deblend import MAXDEBAREA, _deblend
from .gatherup_random import ScanOrder, list_order_key
from .filter import filter_image
from .labels import _components_on_host, _pixel_edges, connected_components
from .threshold import _detected_pixels, _noise_base, _noise_map, _undetectable, check_rms


# ----------------------------------------------------------------------------------------------
# detect_sources, step by step
# ----------------------------------------------------------------------------------------------
class _Pixels(NamedTuple):
    """The detected pixels, sorted by linear index over (B, H, W)."""

    idx: Tensor  #: linear index
    b: Tensor  #: image (batch index)
    x: Tensor  #: column (int64)
    y: Tensor  #: row (int64)
    f: Tensor  #: filtered value (float64)
    val: Tensor  #: unfiltered value (float64)
    tp: Tensor  #: detection threshold there (float64)

    def take(self, sel: Tensor) -> "_Pixels":
        return _Pixels(*(_g(t, sel) for t in self))


class _Objects(NamedTuple):
    """Objects as pixel lists: ``obj`` (P,) the object of each pixel, per object its threshold ``t0``,
    whether it is a deblended branch, its branch-core ``centre`` and the ``gathered`` pixels (None
    when nothing was deblended)."""

    obj: Tensor
    n: int
    t0: Tensor
    blended: Tensor
    centre: Optional[tuple]
    gathered: Optional[Tensor]
    list_key: Optional[Tensor] = None  #: order of a detection's branches in SExtractor's list


def _pixel_table(image: Tensor, idx: Tensor, f: Tensor, noise: Tensor, thresh: float) -> _Pixels:
    """Coordinates, values and thresholds of the detected pixels ``idx`` (never bad pixels)."""
    B, _, H, W = image.shape
    b = idx // (H * W)
    rem = idx % (H * W)
    yi, xi = rem // W, rem % W
    val = image.reshape(-1).index_select(0, idx).double()
    if noise.shape[-2:] == (1, 1):  # one threshold per image: no frame-sized copy
        tp = _g((thresh * noise)[:, 0, 0, 0].expand(B), b).double()
    else:
        tp = (thresh * noise.expand(B, 1, H, W)[b, 0, yi, xi]).double()
    return _Pixels(idx, b, xi, yi, f.double(), val, tp)


def _components(pix: _Pixels, H: int, W: int, minarea: int):
    """8-connected components of at least ``minarea`` pixels: ``(pix, u, v, obj, n)``, the kept
    pixels, their 8-neighbour edges and their object (0..n-1)."""
    P = pix.idx.numel()
    u, v = _pixel_edges(pix.idx, pix.x, pix.y, H, W)
    if P and _host(pix.idx) and H * W * (int(pix.idx[-1]) // (H * W) + 1) <= 8 * P:
        obj = _components_on_host(pix.idx, H, W)  # the same labels, one pass over a frame-sized mask
        n_comp = int(obj.max()) + 1
    else:
        roots, obj = _unique_roots(connected_components(P, u, v))
        n_comp = roots.numel()
    big = torch.bincount(obj, minlength=n_comp) >= minarea
    keep_pix = _g(big, obj)
    if not bool(keep_pix.all()):  # drop small components, renumber
        newid = torch.cumsum(big.long(), 0) - 1
        sel = keep_pix.nonzero().squeeze(1)
        remap = torch.full((P,), -1, dtype=torch.int64, device=pix.idx.device)
        remap[sel] = torch.arange(sel.numel(), device=pix.idx.device)
        eok = _g(keep_pix, u) & _g(keep_pix, v)
        u, v = _g(remap, _g(u, eok)), _g(remap, _g(v, eok))
        pix = pix.take(sel)
        obj = _g(newid, _g(obj, sel))
    return pix, u, v, obj, int(big.sum())


def _split_candidates(u, v, f, obj, n: int, minarea: int) -> Tensor:
    """Objects that can split: at least two local maxima of the filtered image among detected
    8-neighbours (from the edge list, no full-frame pass) and ``2 min(minarea, 3)`` pixels."""
    fu, fv = _g(f, u), _g(f, v)
    not_max = torch.zeros(obj.numel(), dtype=torch.bool, device=obj.device)
    not_max.index_fill_(0, _g(u, fu < fv), True)
    not_max.index_fill_(0, _g(v, fv < fu), True)
    nmax = torch.bincount(_g(obj, ~not_max), minlength=n)
    return (nmax >= 2) & (torch.bincount(obj, minlength=n) >= 2 * min(minarea, MAXDEBAREA))


def _deblend_objects(pix: _Pixels, u, v, obj, n: int, xd, yd, *, minarea, nthresh, cont, scan=None) -> _Objects:
    """Deblend the objects (:func:`~.deblend._deblend`) and compact the ids of the split ones."""
    t0_obj = _segment_min(pix.tp, obj, n)
    blended = torch.zeros(n, dtype=torch.bool, device=obj.device)
    if not (nthresh > 1 and cont < 1.0 and n > 0):
        return _Objects(obj, n, t0_obj, blended, None, None)
    r = _deblend(
        obj, n, u, v, xd, yd, pix.f, pix.val, t0_obj, _segment_max(pix.f, obj, n), _segment_sum(pix.f, obj, n),
        nthresh=nthresh, mincont=cont, minarea=minarea, candidates=_split_candidates(u, v, pix.f, obj, n, minarea),
        scan=scan,
    )
    if r.n == n:
        return _Objects(r.obj, n, t0_obj, r.blended, r.centre, r.gathered, r.list_key)
    # objects that were split leave empty ids: compact and carry per-object data along
    present = torch.bincount(r.obj, minlength=r.n) > 0
    t0_full = torch.cat([t0_obj, _segment_min(pix.tp, r.obj, r.n)[n:]])
    newid = torch.cumsum(present.long(), 0) - 1
    centre = (r.centre[0][present], r.centre[1][present])
    return _Objects(_g(newid, r.obj), int(present.sum()), _g(t0_full, present), _g(r.blended, present), centre,
                    r.gathered, None if r.list_key is None else _g(r.list_key, present))


def _raster_order(idx: Tensor, o: _Objects) -> _Objects:
    """Renumber the objects by batch index, then first raster pixel (SExtractor-like numbering)."""
    first = _segment_min(idx.double(), o.obj, o.n).long()
    order = _argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(o.n, device=order.device)
    centre = None if o.centre is None else (o.centre[0][order], o.centre[1][order])
    return _Objects(_g(rank, o.obj), o.n, _g(o.t0, order), _g(o.blended, order), centre, o.gathered,
                    None if o.list_key is None else _g(o.list_key, order))


def _analyse_objects(o: _Objects, xd, yd, pix: _Pixels) -> Analysis:
    """Analysis of the final objects at the detection threshold ("robust": the branch-core centre
    kept for deblended ones)."""
    an = _analyse(o.obj, o.n, xd, yd, pix.f, pix.val, o.t0)
    if o.centre is not None and bool(o.blended.any()):
        centre = (torch.where(o.blended, o.centre[0], an.mx), torch.where(o.blended, o.centre[1], an.my))
        an = _analyse(o.obj, o.n, xd, yd, pix.f, pix.val, o.t0, centre=centre)
    return an


def _completion_key(pix: _Pixels, obj: Tensor, n: int, W: int) -> Tensor:
    """Per pixel, when SExtractor's scan completes (``sortit``) the pixel's detection: while reading
    the row after its last row ``ymax``, past the end of its last segment there; the key is
    ``ymax * (W + 1) + x_end`` (``x_end`` the rightmost column on row ``ymax``, plus one)."""
    ymax = _segment_max(pix.y.double(), obj, n)
    last_row = pix.y.double() == _g(ymax, obj)
    xend = _segment_max(torch.where(last_row, pix.x.double(), -1.0), obj, n) + 1
    return _g(ymax.long() * (W + 1) + xend.long(), obj)


def _scan_order(pix: _Pixels, obj: Tensor, n: int, H: int, W: int) -> ScanOrder:
    """The order in which SExtractor's scan deblends each detected pixel's detection (its completion:
    :func:`_completion_key`); :mod:`.gatherup_random` adds the place in the detection's pixel list."""
    return ScanOrder(pix.b, _completion_key(pix, obj, n, W))


def _arrival(o: _Objects, parent_key: Tensor) -> Tensor:
    """Per object, its rank in the order SExtractor hands objects to ``clean``: by the completion of
    its detection (:func:`_completion_key`), the branches of one detection in the order SExtractor's
    deblender lists them (``list_key``; by object index without it)."""
    within = torch.arange(o.n, device=o.obj.device)
    if o.list_key is not None:
        within = _argsort(o.list_key * o.n + within).argsort()
    key = _segment_max(parent_key.double(), o.obj, o.n) * o.n + within
    rank = torch.empty(o.n, dtype=torch.int64, device=o.obj.device)
    rank[_argsort(key)] = torch.arange(o.n, device=o.obj.device)
    return rank


def _pasted_back(o: _Objects, alive: Tensor, master: Tensor, pix: _Pixels, parent_ymax: Tensor):
    """The pixels of the objects removed by CLEAN that SExtractor leaves in the image, and those it
    blanks again (flat indices): ``(unblanked, reblanked)``.

    ``clean.c`` pastes a removed object's pixels back when the later of the two objects (remover and
    removed) is sorted out, i.e. while the scan reads row ``Y + 1``, ``Y`` the last row of that
    object's detection (before deblending); ``scan.c`` has then blanked the rows up to ``Y - 1``
    only, and blanks row ``Y`` at the end of that line: the removed object's pixels on row ``Y``
    (and below it, none) are blanked again, for every object's measurement, the remover's too (its
    own pixel list, pasted back when it is measured, holds none of them); those above stay.
    ``parent_ymax`` (P,) is ``Y`` of each pixel's detection, ``master`` the direct remover of each
    object (itself for survivors)."""
    obj_ymax = _segment_max(parent_ymax, o.obj, o.n)
    later = torch.maximum(obj_ymax, _g(obj_ymax, master))
    removed = _g(~alive, o.obj)
    above = pix.y.double() < _g(later, o.obj)
    return _g(pix.idx, removed & above), _g(pix.idx, removed & ~above)


def _clean_objects(o: _Objects, an: Analysis, bobj: Tensor, pix: _Pixels, comp: Tensor, *, minarea,
                   clean_param, H, W):
    """CLEAN (:func:`~.clean._clean`): removed objects merge into their remover (SExtractor's
    ``mergeobject`` adds their fluxes and keeps the remover's centre). Returns ``(objects, analysis,
    batch index, ate, unblanked, reblanked)``, ``ate`` marking the objects that swallowed others and
    ``unblanked`` / ``reblanked`` the flat indices of the removed objects' pixels that SExtractor
    pastes back into the image (no measurement blanks them as neighbours) / blanks for every
    measurement (:func:`_pasted_back`)."""
    if o.gathered is None:
        order_key = list_order_key(pix.x, pix.y, o.obj, H, W)
    else:  # a branch's own pixels in its list's order, then those it gathered in its detection's order
        own = list_order_key(pix.x, pix.y, torch.where(o.gathered, o.n + o.obj, o.obj), H, W)
        order_key = torch.where(o.gathered, list_order_key(pix.x, pix.y, comp, H, W), own)
    mthresh = _mthresh(pix.f - pix.tp, o.obj, o.n, minarea, o.gathered, order_key=order_key)
    parent_key = _completion_key(pix, comp, int(comp.max()) + 1, W)
    alive, master = _clean(bobj, an, o.t0, mthresh, clean_param, H, W, arrival=_arrival(o, parent_key))
    unblanked, reblanked = _pasted_back(o, alive, master, pix, (parent_key // (W + 1)).double())
    master = _follow_masters(master)
    ate = torch.zeros(o.n, dtype=torch.bool, device=bobj.device)
    ate[master[~alive]] = True
    newid = torch.cumsum(alive.long(), 0) - 1
    obj = _g(newid, _g(master, o.obj))
    sel = alive.nonzero().squeeze(1)
    n = sel.numel()
    an = an.take(sel)
    an = an._replace(fdflux=_segment_sum(pix.f, obj, n), fdnpix=torch.bincount(obj, minlength=n).to(torch.float64))
    o = _Objects(obj, n, _g(o.t0, sel), _g(o.blended, sel), None, None)
    return o, an, _g(bobj, sel), _g(ate, sel), unblanked, reblanked


def _labels(bobj: Tensor, B: int) -> Tensor:
    """Labels 1..n per image of objects ordered by batch index."""
    counts = torch.bincount(bobj, minlength=B)
    start = torch.cumsum(counts, 0) - counts
    return torch.arange(bobj.numel(), device=bobj.device) - _g(start, bobj) + 1


def _dense_segmentation(idx: Tensor, pixel_label: Tensor, shape) -> Tensor:
    B, _, H, W = shape
    seg = torch.zeros(B * H * W, dtype=torch.int64, device=idx.device)
    seg.scatter_(0, idx, pixel_label)
    return seg.view(B, 1, H, W)


@serial_on_cpu
def detect_sources(
    image: Tensor,
    rms,
    mask: Optional[Tensor] = None,
    *,
    thresh: float = 1.5,
    minarea: int = 5,
    filter_kernel: Union[str, Tensor, None] = "default",
    deblend_nthresh: int = 32,
    deblend_cont: float = 0.005,
    clean: bool = True,
    clean_param: float = 1.0,
    dense: bool = True,
    gatherup: str = "sextractor",
) -> dict:
    """Segment a background-subtracted (B,1,H,W) image. Returns a dict of tensors.

    ``segmentation`` (B,1,H,W) int64 labels 1..n per image (0 = sky), and per object (ordered by
    batch index then label): ``batch_index``, ``label``, ``blended`` (bool), ``thresh`` (detection
    threshold t0), ``xmin, xmax, ymin, ymax`` (int), ``cpeak`` (filtered peak), ``cflux`` (filtered
    flux) and the detection-image moments ``mx, my`` (0-based); ``filtered`` is the filtered image.

    Always present, the sparse form: ``detected`` (P,) sorted linear indices (over B*H*W) of every
    pixel above threshold, ``pixels`` (Q,) the sorted linear indices of the labelled ones, ``pixel_row``
    (Q,) their object (row) index, ``pixel_filtered`` (Q,) their filtered value and ``unblanked`` the
    pixels of objects removed by CLEAN (never blanked as neighbours, as SExtractor), ``reblanked``
    those of their pixels SExtractor blanks for every measurement (:func:`_pasted_back`). ``dense=False``
    leaves out ``segmentation`` and ``filtered`` (None): on CPU the image is then filtered and
    thresholded strip by strip and no frame-sized array is made at all.

    ``gatherup``: how the deblender gives a split detection's pixels below its branches to a branch:
    ``"sextractor"`` draws it at random exactly as SExtractor 2.25 does (glibc's unseeded ``rand()``,
    in SExtractor's order: :mod:`.gatherup_random`), ``"probable"`` takes the most probable branch
    (deterministic, independent of the other detections).
    """
    if gatherup not in ("sextractor", "probable"):
        raise ValueError(f"gatherup must be 'sextractor' or 'probable', got {gatherup!r}")
    check_image(image, "image", channels=1)
    mask = check_mask(mask, image)
    B, _, H, W = image.shape
    noise = _noise_base(rms, image)
    det_idx, f, filt = _detected_pixels(image, noise, thresh, filter_kernel, _undetectable(image, mask), dense)
    pix, u, v, obj, n = _components(_pixel_table(image, det_idx, f, noise, thresh), H, W, minarea)
    xd, yd = pix.x.double(), pix.y.double()
    comp = obj  # the detection (connected component) of each pixel
    scan = _scan_order(pix, obj, n, H, W) if gatherup == "sextractor" else None
    o = _deblend_objects(pix, u, v, obj, n, xd, yd, minarea=minarea, nthresh=deblend_nthresh, cont=deblend_cont,
                         scan=scan)
    o = _raster_order(pix.idx, o)
    bobj = torch.zeros(o.n, dtype=torch.int64, device=image.device).scatter_(0, o.obj, pix.b)
    an = _analyse_objects(o, xd, yd, pix)
    ate = torch.zeros(o.n, dtype=torch.bool, device=image.device)
    unblanked = reblanked = pix.idx[:0]
    if clean and o.n > 1:
        o, an, bobj, ate, unblanked, reblanked = _clean_objects(o, an, bobj, pix, comp, minarea=minarea, clean_param=clean_param, H=H, W=W)
    obj, n = o.obj, o.n
    label = _labels(bobj, B)
    return dict(
        segmentation=_dense_segmentation(pix.idx, _g(label, obj), image.shape) if dense else None,
        detected=det_idx,
        pixels=pix.idx,
        pixel_row=obj,
        pixel_filtered=pix.f,
        unblanked=unblanked,
        reblanked=reblanked,
        batch_index=bobj,
        label=label,
        blended=o.blended,
        thresh=o.t0.to(image.dtype),
        xmin=_segment_min(xd, obj, n).long(), xmax=_segment_max(xd, obj, n).long(),
        ymin=_segment_min(yd, obj, n).long(), ymax=_segment_max(yd, obj, n).long(),
        cpeak=_segment_max(pix.f, obj, n).to(image.dtype),
        cflux=an.fdflux.to(image.dtype),
        mx=an.mx.to(image.dtype),
        my=an.my.to(image.dtype),
        isophotal=_overrides(an, o.blended, ate),
        filtered=filt,
    )


# ----------------------------------------------------------------------------------------------
# SourceExtractor
# ----------------------------------------------------------------------------------------------
def _photometry_module():
    try:
        return importlib.import_module("astroprep_torch.photometry")
    except ImportError:
        return None


def _detection_flags(det: dict, meas: dict, H: int, W: int) -> Tensor:
    """FLAGS from the measurement (its bit 2 replaced by the detector's), 2 (blended), 8 (truncated)."""
    flags = torch.zeros(len(det["label"]), dtype=torch.int64, device=det["label"].device)
    if "flags" in meas:
        flags |= meas["flags"].to(torch.int64) & ~FLAG_BLENDED
    flags |= torch.where(det["blended"], FLAG_BLENDED, 0)
    trunc = (det["xmin"] == 0) | (det["ymin"] == 0) | (det["xmax"] == W - 1) | (det["ymax"] == H - 1)
    return flags | torch.where(trunc, FLAG_TRUNCATED, 0)


def _saturation_flags(image: Tensor, det: dict, saturated) -> Tensor:
    """FLAGS 4 from a ``saturated`` mask (calibrate.saturation_mask: saturated pixels and bleed
    trails): an object touching it. SATUR_LEVEL itself is photometry's rule (SExtractor's
    ``peak + background >= SATUR_LEVEL``, :func:`astroprep_torch.photometry.flags._saturated_flags`)."""
    n = len(det["label"])
    flags = torch.zeros(n, dtype=torch.int64, device=image.device)
    if saturated is not None:
        hit = saturated.expand(image.shape).reshape(-1).index_select(0, det["pixels"]).to(image.dtype)
        flags |= torch.where(_segment_max(hit, det["pixel_row"], n) > 0, FLAG_SATURATED, 0)
    return flags


def _always_blanked(det: dict, image: Tensor) -> Optional[Tensor]:
    """The ``reblanked`` pixels as a bool map (``photometry.measure(always_blanked=)``): pixels of
    CLEANed objects SExtractor blanks for every measurement, their remover's included, while they stay
    in the remover's pixel list (its isophotal sums, as ``mergeobject``); None when there are none."""
    rb = det.get("reblanked")
    if rb is None or rb.numel() == 0:
        return None
    out = torch.zeros(image.numel(), dtype=torch.bool, device=image.device)
    out[rb] = True
    return out.view(image.shape)


class SourceExtractor(nn.Module):
    """SExtractor-style source extraction on background-subtracted images.

    Args:
        thresh: detection threshold in units of the background rms (``DETECT_THRESH``).
        minarea: minimum number of pixels above threshold (``DETECT_MINAREA``).
        filter_kernel: ``"default"`` (SExtractor's default.conv), a 2-D tensor/list, or ``None``.
        deblend_nthresh, deblend_cont: ``DEBLEND_NTHRESH``, ``DEBLEND_MINCONT``.
        clean, clean_param: ``CLEAN``, ``CLEAN_PARAM``.
        phot_apertures: aperture *diameters* in pixels (``PHOT_APERTURES``).
        kron_fact, min_radius: ``PHOT_AUTOPARAMS``.
        saturation: ``SATUR_LEVEL`` in the units of ``image + background`` (flag 4), or ``None``.
        gain: e-/ADU for Poisson terms of the flux errors (``None`` or 0: background noise only).
        winpos_max_radius: cap (px) of the XWIN window radius (``photometry.measure``'s
            ``winpos_max_radius``; ``None`` = SExtractor's uncapped window): bounds the cost of huge
            objects (saturated stars, halos); capped objects get FLAGS 16.

    ``forward(image, rms, mask=None, *, background=None) -> Catalog``: ``image`` (B,1,H,W)
    background-subtracted; ``rms`` the background rms map (B,1,H,W), one value per image (B,) or a
    float; ``mask`` bool (True = bad); ``background`` (optional) is added to an object's peak for the
    ``saturation`` test (SExtractor's ``peak + background >= SATUR_LEVEL``, at the barycentre's pixel); ``saturated`` (optional bool (B,1,H,W)) flags (4) the objects that touch it.
    See the module docstring for the algorithm.

    Noise semantics: SExtractor without a weight map (``WEIGHT_TYPE NONE``, its default) thresholds
    the filtered image at ``thresh`` x ONE global background RMS per image (the median of its rms
    meshes, the "RMS" it prints; :func:`astroprep_torch.background.global_rms`) and uses that value
    for every error: pass that scalar (or ``(B,)`` tensor) to reproduce SExtractor's catalog.  Passing
    an rms MAP instead thresholds every pixel at ``thresh`` x its local rms and uses the map in the
    errors, as SExtractor does with ``WEIGHT_TYPE BACKGROUND`` or ``MAP_RMS``: where the local rms is
    below the global value (sky-dominated regions of a frame with a brighter corner, say) more faint
    pixels pass and more objects are found, and fewer where it is above (near bright stars, whose
    light raises the mesh rms).  ``astroprep extract`` passes the global value (configs/pipeline/
    extract_only.yaml), ``astroprep extract sex=<file.sex>`` follows the file's WEIGHT_TYPE.
    """

    def __init__(
        self,
        thresh: float = 1.5,
        minarea: int = 5,
        filter_kernel="default",
        deblend_nthresh: int = 32,
        deblend_cont: float = 0.005,
        clean: bool = True,
        clean_param: float = 1.0,
        phot_apertures: Sequence[float] = (10.0,),
        kron_fact: float = 2.5,
        min_radius: float = 3.5,
        saturation: Optional[float] = None,
        gain: Optional[float] = None,
        mask_type: str = "correct",
        flux_fracs: Sequence[float] = (0.5,),
        autoapers: Sequence[float] = (0.0, 0.0),
        winpos_max_radius: Optional[float] = 128.0,
    ):
        super().__init__()
        if thresh <= 0:
            raise ValueError(f"thresh must be > 0, got {thresh}")
        if int(minarea) < 1:
            raise ValueError(f"minarea must be >= 1, got {minarea}")
        if int(deblend_nthresh) < 1:
            raise ValueError(f"deblend_nthresh must be >= 1, got {deblend_nthresh}")
        if not 0.0 <= deblend_cont <= 1.0:
            raise ValueError(f"deblend_cont must be in [0, 1], got {deblend_cont}")
        if clean_param <= 0:
            raise ValueError(f"clean_param must be > 0, got {clean_param}")
        self.thresh = float(thresh)
        self.minarea = int(minarea)
        if filter_kernel is not None and not isinstance(filter_kernel, str):
            filter_kernel = torch.as_tensor(filter_kernel, dtype=torch.float64)
        self.filter_kernel = filter_kernel
        self.deblend_nthresh = int(deblend_nthresh)
        self.deblend_cont = float(deblend_cont)
        self.clean = bool(clean)
        self.clean_param = float(clean_param)
        self.phot_apertures = tuple(float(a) for a in (phot_apertures if isinstance(phot_apertures, (list, tuple)) else [phot_apertures]))
        self.kron_fact = float(kron_fact)
        self.min_radius = float(min_radius)
        self.saturation = None if saturation is None else float(saturation)
        self.gain = None if not gain else float(gain)
        if mask_type not in ("correct", "blank", "none"):
            raise ValueError(f"mask_type must be 'correct', 'blank' or 'none', got {mask_type!r}")
        self.mask_type = mask_type
        self.flux_fracs = tuple(float(v) for v in flux_fracs)
        self.autoapers = tuple(float(v) for v in autoapers)
        self.winpos_max_radius = None if winpos_max_radius is None else float(winpos_max_radius)

    def extra_repr(self) -> str:
        return (
            f"thresh={self.thresh}, minarea={self.minarea}, deblend_nthresh={self.deblend_nthresh}, "
            f"deblend_cont={self.deblend_cont}, clean={self.clean}, clean_param={self.clean_param}"
        )


    @adapt_to_load
    def forward(self, image: Tensor, rms, mask: Optional[Tensor] = None, *, background: Optional[Tensor] = None,
                saturated: Optional[Tensor] = None) -> Catalog:
        # the call's many large temporaries reuse the pages freed before them (no fresh page faults)
        with freed_memory_kept():
            return self._extract(image, rms, mask, background, saturated)

    def _extract(self, image: Tensor, rms, mask, background, saturated) -> Catalog:
        check_image(image, "image", channels=1)
        mask = check_mask(mask, image)
        mask = check_rms(rms, image, mask)
        if not all_finite(image):  # unmasked NaN/inf pixels are masked here, for photometry too
            mask = bad_pixels(image, mask)
        B, _, H, W = image.shape
        det = detect_sources(
            image, rms, mask,
            thresh=self.thresh, minarea=self.minarea, filter_kernel=self.filter_kernel,
            deblend_nthresh=self.deblend_nthresh, deblend_cont=self.deblend_cont,
            clean=self.clean, clean_param=self.clean_param, dense=False,
        )
        seg = _LazySegmentation(det["pixels"], _g(det["label"], det["pixel_row"]), (B, 1, H, W))
        # pixels of the objects CLEAN merged into others (classic_params: own-pixel columns)
        seg.cleaned = torch.cat([det["unblanked"], det["reblanked"]])
        meas = self._measure(image, rms, mask, det, background)
        if meas is None:
            meas = isophotal_moments(image, seg.dense(), filter_image(image, self.filter_kernel))
        cols = {"batch_index": det["batch_index"], "number": det["label"]}
        for k in ("xmin", "xmax", "ymin", "ymax"):
            cols[k] = det[k]
        cols.update({k: v for k, v in meas.items() if k not in ("batch_index", "label", "flags")})
        cols["thresh"] = det["thresh"]
        cols["flags"] = _detection_flags(det, meas, H, W) | _saturation_flags(image, det, saturated)
        return Catalog(cols, seg)

    def _measure(self, image: Tensor, rms, mask, det: dict, background) -> Optional[dict]:
        """``photometry.measure`` on the detector's sparse segmentation; None without that module."""
        phot = _photometry_module()
        if phot is None or not hasattr(phot, "measure"):
            return None
        rms_map = _noise_map(rms, image)  # a view: thresholds are made where they are used
        segments = phot.SegmentPixels(*(det[k] for k in phot.SegmentPixels._fields))
        return phot.measure(
            image, segments, rms_map,
            thresh_nsigma=self.thresh,
            phot_apertures=self.phot_apertures, kron_fact=self.kron_fact, min_radius=self.min_radius,
            autoapers=self.autoapers, flux_fracs=self.flux_fracs,
            gain=self.gain, mask=mask, mask_type=self.mask_type,
            saturation=self.saturation, background=background,
            isophotal=det["isophotal"], blended=det["blended"],
            winpos_max_radius=self.winpos_max_radius, always_blanked=_always_blanked(det, image),
        )
