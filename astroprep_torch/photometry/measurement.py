"""``measure``: SExtractor's measurements for every object of a fixed segmentation, and the
``Photometry`` module.  The orchestration of the steps in the sibling modules: isophotal quantities over
the segmentation pixels (:mod:`.isophotal`), then the stamp stages per object -- apertures
(:mod:`.apertures`), Kron radius and AUTO (:mod:`.kron`), growth curve (:mod:`.growth`), windowed
position (:mod:`.winpos`) -- and the flags (:mod:`.flags`).

Neighbours (MASK_TYPE CORRECT, SExtractor's default): every pixel above the detection threshold in the
filtered image that is not the object's own is "blanked": excluded from the Kron moment, and in every
flux sum replaced by the pixel symmetric about the centre (or 0 when that one is blanked too / outside
the image; SExtractor's ``(int)(2 c + 0.49999 - x)`` truncates toward zero, so a mirror coordinate in
(-1, 0) reads pixel 0).  ``BLANK`` replaces by 0; ``NONE`` does nothing.  SExtractor's CLEAN changes
that state: the pixels of a swallowed object are pasted back into the image (``unblanked``) except the
rows its scan had not blanked yet, which stay blanked for every object (``always_blanked``); the
detector (or, on SExtractor's own segmentation, a CLEAN N run: experiments/photometry_parity.py)
supplies them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._checks import check_image, check_mask
from .._runtime import one_intraop_thread, thread_pool, with_caller_modes
from .apertures import APER_OVERSAMP, _stage_aper
from .flags import (
    FLAG_APER_INCOMPLETE,
    FLAG_CROWDED,
    MeshBackground,
    _aperture_box_flags,
    _blended_flags,
    _border_flags,
    _saturated_flags,
)
from .growth import _stage_growth
from .isophotal import _isophotal_fluxes, _isophotal_shape, _position_errors, _Shape, sextractor_filter
from .kron import _stage_auto, _stage_kron
from .segments import SegmentPixels, _object_pixels, _ObjectPixels
from .stamps import _as_map, _at_pixels, _Frame, _Objects
from .winpos import WINPOS_MAX_RADIUS, _stage_winpos, revert_winpos

_MASK_TYPES = ("correct", "blank", "none")
_SPLIT_MIN = 2000  # objects per call below which the stamp stages run on one thread


# ----------------------------------------------------------------------------------------------
# the stamp stages, split over threads
# ----------------------------------------------------------------------------------------------
class _StampResults(NamedTuple):
    """Per-object outputs of the stamp stages (one row per object)."""

    flux_aper: Tensor
    var_aper: Tensor
    area_aper: Tensor
    kron_factor: Tensor  # step 1 (0: no usable pixel)
    kron_crowded: Tensor
    kron_flag: Tensor
    flux_auto: Tensor
    var_auto: Tensor
    auto_factor: Tensor  # the factor of the elliptical AUTO aperture (0 where circular)
    auto_crowded: Tensor
    auto_flag: Tensor
    flux_radii: Tensor  # (N, 1 + n_fracs): half light, then flux_fracs
    growth_flag: Tensor
    xwin: Tensor
    ywin: Tensor
    win_flag: Tensor  # window box clipped or window radius capped
    win_niter: Tensor
    win_flags: Tensor  # SExtractor's windowed-moment flags


def _split_run(fn, geo: _Objects, n: int, workers: int):
    """``fn(geo)`` with the per-object tensors of ``geo`` split into ``workers`` interleaved groups,
    each run by its own thread (the calling thread takes the first; the others come from
    :func:`~astroprep_torch._runtime.thread_pool`); outputs (tuples of tensors with one row per object)
    are put back in the objects' order.  One group when ``workers < 2``, on GPU, or for fewer than
    ``_SPLIT_MIN`` objects per call.  Every object depends only on its own rows, so the results equal
    the one-group run's (up to the summation order inside shared stamp batches)."""
    dev = geo.x.device
    k = min(int(workers), n // max(_SPLIT_MIN // 2, 1))
    if k < 2 or dev.type != "cpu":
        return fn(geo)
    # interleaved groups (object i to group i % k): each gets the same mix of stamp sizes and of
    # frame regions, so the threads finish together (contiguous halves were slower)
    parts = [geo.rows(slice(i, None, k)) for i in range(k)]
    run = with_caller_modes(fn, threads=1)  # one intra-op thread per group, as the caller's
    jobs = [thread_pool(k - 1, name="astroprep-groups").submit(run, p) for p in parts[1:]]
    try:
        res = [run(parts[0])]
    finally:
        for j in jobs:
            j.exception()  # waits: no group outlives the call, even when the first one failed
    res += [j.result() for j in jobs]
    out = []
    for j in range(len(res[0])):
        first = res[0][j]
        o = first.new_empty((n, *first.shape[1:]))
        for i in range(k):
            o[i::k] = res[i][j]
        out.append(o)
    return type(res[0])(*out) if hasattr(res[0], "_fields") else tuple(out)


def _stamp_stages(geo: _Objects, *, fr: _Frame, radii: Sequence[float], aper_subpix: int, kron_fact: float,
                  min_radius: float, autoapers: Sequence[float], fracs: Sequence[float], gain_v: float,
                  winpos_max_radius: Optional[float], max_elems: int) -> _StampResults:
    """The stamp stages for the objects of ``geo`` (aper, Kron, AUTO, growth curve, windowed centroid:
    each object depends only on its own earlier results)."""
    fa, va, ara = _stage_aper(fr, geo, radii, aper_subpix, max_elems, gain_v)
    kf, _, crowd1, kflag = _stage_kron(fr, geo, kron_fact, min_radius, float(autoapers[0]), max_elems)
    fauto, vauto, kf2, crowd2, aflag2 = _stage_auto(fr, geo, kf, float(autoapers[1]), max_elems)
    frad, hl, gflag = _stage_growth(fr, geo, fauto, fracs, float(autoapers[0]), max_elems)
    xw, yw, wflag, w_niter, w_flags = _stage_winpos(fr, geo, hl * 2.0 / 2.35, max_elems, winpos_max_radius)
    return _StampResults(fa, va, ara, kf, crowd1, kflag, fauto, vauto, kf2, crowd2, aflag2, frad, gflag,
                         xw, yw, wflag, w_niter, w_flags)


# ----------------------------------------------------------------------------------------------
# inputs: checks, noise, blanked neighbours
# ----------------------------------------------------------------------------------------------
class _Noise(NamedTuple):
    """The noise as given (``map``: rms when ``is_rms``, else variance; broadcastable, never expanded)
    and the analysis threshold (``thresh`` map, or None: ``nsigma`` times the rms)."""

    map: Tensor
    is_rms: bool
    thresh: Optional[Tensor]
    nsigma: float

    def nsigma_thresh(self, n_: Tensor) -> Tensor:
        """The default threshold from noise values (rms or variance)."""
        return self.nsigma * (n_ if self.is_rms else torch.sqrt(n_))

    def thresh_at(self, idx: Tensor, B: int, H: int, W: int) -> Tensor:
        if self.thresh is not None:
            return _at_pixels(self.thresh, idx, B, H, W)
        return self.nsigma_thresh(_at_pixels(self.map, idx, B, H, W))

    def var_at(self, idx: Tensor, B: int, H: int, W: int) -> Tensor:
        varp = _at_pixels(self.map, idx, B, H, W)
        return varp * varp if self.is_rms else varp


def _noise(image: Tensor, rms, var, thresh, thresh_nsigma: float) -> _Noise:
    """Noise maps stay as given (an rms map is squared only where it is gathered: no frame-sized
    variance, rms or threshold copies)."""
    if rms is None and var is None:
        raise ValueError("give the noise as rms= (scalar, (B,) or map) or var=")
    noise = _as_map(var, image, "var") if var is not None else _as_map(rms, image, "rms")
    threshmap = _as_map(thresh, image, "thresh") if thresh is not None else None  # None: nsigma rms
    return _Noise(noise, var is None, threshmap, thresh_nsigma)


def _check_segmentation(segmentation, image: Tensor) -> None:
    if isinstance(segmentation, SegmentPixels):
        return
    if not isinstance(segmentation, Tensor) or segmentation.shape != image.shape:
        raise ValueError(f"segmentation must be a SegmentPixels or a tensor shaped like image "
                         f"{tuple(image.shape)}, got {getattr(segmentation, 'shape', type(segmentation))}")
    if segmentation.is_floating_point() or segmentation.dtype == torch.bool:
        raise TypeError(f"segmentation must hold integer labels, got dtype {segmentation.dtype}")


def _filtered_image(image: Tensor, segmentation, filtered: Optional[Tensor], filter_kernel) -> Optional[Tensor]:
    """The detection-filtered image for a dense segmentation (None for :class:`SegmentPixels`, which
    carries the filtered values at its pixels)."""
    if isinstance(segmentation, SegmentPixels):
        return None
    if filtered is None:
        return sextractor_filter(image, filter_kernel)
    if filtered.shape != image.shape:
        raise ValueError(f"filtered must be shaped like image {tuple(image.shape)}, got {tuple(filtered.shape)}")
    return filtered


class _CleanBlanking(NamedTuple):
    """Where SExtractor's blanking of detected pixels departs from "every neighbour pixel above the
    detection threshold" (MASK_TYPE CORRECT / BLANK), as bool ``(B, 1, H, W)`` maps or None.

    ``unblanked``: detected pixels no aperture treats as blanked (SExtractor pastes the pixels of an object
    removed by CLEAN back into the image once their rows have been blanked by the scan).  ``always``:
    pixels blanked in every object's apertures, its own included (the rows of a CLEANed object that
    the scan had not yet blanked when it was pasted back -- the last row of the detection whose
    completion triggered the CLEAN -- are blanked afterwards, also for the object that swallowed it)."""

    unblanked: Optional[Tensor] = None
    always: Optional[Tensor] = None

    @staticmethod
    def of(unblanked, always_blanked, image: Tensor) -> "_CleanBlanking":
        return _CleanBlanking(check_mask(unblanked, image, "unblanked"),
                              check_mask(always_blanked, image, "always_blanked"))


def _blank_labels(segmentation: SegmentPixels, obj: _ObjectPixels, mask: Optional[Tensor], mask_type: str,
                  n_pixels: int, clean: _CleanBlanking) -> Optional[Tensor]:
    """Label of blanked pixels, -1 elsewhere (as :class:`_Frame` builds it), from the pixel lists."""
    if mask_type == "none" and mask is None:
        return None
    bseg = torch.full((n_pixels,), -1, dtype=torch.int32, device=obj.pidx.device)
    if mask_type != "none":
        bseg.index_fill_(0, segmentation.detected, 0)
    if mask is not None:
        bseg.masked_fill_(mask.reshape(-1), 0)
    bseg.index_put_((obj.pidx,), obj.label.to(torch.int32).index_select(0, obj.inv))
    keep = segmentation.unblanked
    if mask_type != "none" and clean.unblanked is not None:
        extra = torch.nonzero(clean.unblanked.reshape(-1)).flatten()
        keep = extra if keep is None else torch.cat([keep, extra])
    if mask_type != "none" and keep is not None and keep.numel():
        if mask is not None:
            keep = keep[~mask.reshape(-1).index_select(0, keep)]
        bseg.index_fill_(0, keep, -1)
    if mask_type != "none" and clean.always is not None:
        bseg.masked_fill_(clean.always.reshape(-1), 0)
    return bseg


def _blank_map(image: Tensor, filtered: Tensor, noise: _Noise, mask: Optional[Tensor], mask_type: str,
               detect_thresh, clean: _CleanBlanking) -> Optional[Tensor]:
    """The blanked pixels of a dense segmentation: above the detection threshold in ``filtered``
    (unless MASK_TYPE NONE; less ``clean.unblanked``, plus ``clean.always``) or bad in ``mask``."""
    blank = None
    if mask_type != "none":
        if detect_thresh is not None:
            dthreshmap = _as_map(detect_thresh, image, "detect_thresh")
        elif noise.thresh is not None:
            dthreshmap = noise.thresh
        else:
            dthreshmap = noise.nsigma_thresh(noise.map)
        blank = filtered.detach() > dthreshmap
        if clean.unblanked is not None:
            blank &= ~clean.unblanked
        if clean.always is not None:
            blank |= clean.always
    if mask is not None:
        blank = mask if blank is None else (blank | mask)
    return blank


def _measurement_frame(image: Tensor, segmentation, obj: _ObjectPixels, noise: _Noise, filtered, mask,
                       mask_type: str, detect_thresh, clean: _CleanBlanking) -> _Frame:
    """The :class:`_Frame` the stamp stages gather from, with the blanked neighbour pixels."""
    B, _, H, W = image.shape
    if isinstance(segmentation, SegmentPixels):
        blank, bseg = None, _blank_labels(segmentation, obj, mask, mask_type, B * H * W, clean)
    else:
        blank, bseg = _blank_map(image, filtered, noise, mask, mask_type, detect_thresh, clean), None
        if clean.always is not None and mask_type != "none":  # blanked for their own object too: label 0
            bseg = obj.seg.reshape(-1).to(torch.int32, copy=True).masked_fill_(~blank.reshape(-1), -1)
            bseg.masked_fill_(clean.always.reshape(-1), 0)
    fr = _Frame(image, obj.seg, noise.map, blank, H, W, mask_type if mask_type != "none" else "correct",
                bseg=bseg, var_is_rms=noise.is_rms)
    if mask_type == "none" and mask is not None:
        fr.mask_type = "blank"  # bad pixels only: contribute nothing
    return fr


# ----------------------------------------------------------------------------------------------
# flags and columns
# ----------------------------------------------------------------------------------------------
def _isophotal_flags(image: Tensor, segmentation, obj: _ObjectPixels, shape: _Shape, peak: Tensor, blended,
                     saturation, background) -> Tensor:
    """FLAGS 8 (border), 2 (blended) and 4 (saturated) from the segmentation pixels."""
    B, _, H, W = image.shape
    flags = _border_flags(obj.px, obj.py, obj.inv, obj.n, H, W)
    seg = obj.seg
    if blended is None and seg is None:
        seg = segmentation.dense(image.shape)  # touching labels need the dense map
    flags |= _blended_flags(blended, seg, obj.pidx, obj.inv, obj.n)
    if saturation is not None:
        bkg = background
        if not isinstance(background, MeshBackground):
            bkg = _as_map(background if background is not None else 0.0, image, "background")
        flags |= _saturated_flags(peak, bkg, obj.bidx, shape.x, shape.y, saturation)
    return flags


def _stamp_flags(res: _StampResults, shape: _Shape, radii, H: int, W: int) -> Tensor:
    """FLAGS 16 (an aperture, AUTO, growth-curve or window box clipped by the border, or the window
    capped) and 1 (crowded) from the stamp stages."""
    aflag = _aperture_box_flags(shape.x, shape.y, radii, H, W)
    aflag |= res.kron_flag | (res.auto_flag & (res.kron_factor > 0))
    aflag |= res.growth_flag
    aflag |= res.win_flag
    return aflag.long() * FLAG_APER_INCOMPLETE | (res.kron_crowded | res.auto_crowded).long() * FLAG_CROWDED


def _columns(obj: _ObjectPixels, shape: _Shape, errs, iso, res: _StampResults, xw, yw, flags, gain_v: float,
             dt) -> dict[str, Tensor]:
    """The output columns of :func:`measure`."""
    va, vauto, fa, fauto = res.var_aper, res.var_auto, res.flux_aper, res.flux_auto
    if gain_v > 0:
        va = va + torch.clamp(fa, min=0) / gain_v
        vauto = vauto + torch.clamp(fauto, min=0) / gain_v
    kron = torch.where(fauto > 0, res.auto_factor.to(dt), torch.zeros_like(fauto))
    emx2, emy2, emxy = errs
    return {
        "batch_index": obj.bidx,
        "label": obj.label,
        "x": shape.x.to(dt),
        "y": shape.y.to(dt),
        "x2": shape.x2.to(dt),
        "y2": shape.y2.to(dt),
        "xy": shape.xy.to(dt),
        "a": shape.a.to(dt),
        "b": shape.b.to(dt),
        "theta": torch.rad2deg(shape.theta).to(dt),
        "cxx": shape.cxx.to(dt),
        "cyy": shape.cyy.to(dt),
        "cxy": shape.cxy.to(dt),
        "errx2": emx2.to(dt),
        "erry2": emy2.to(dt),
        "errxy": emxy.to(dt),
        "npix": iso.npix,
        "fdnpix": iso.fdnpix,
        "peak": iso.peak,
        "flux_iso": iso.flux_iso,
        "fluxerr_iso": iso.fluxerr_iso,
        "flux_aper": fa,
        "fluxerr_aper": torch.sqrt(torch.clamp(va, min=0)),
        "area_aper": res.area_aper,
        "kron_radius": kron,
        "flux_auto": fauto,
        "fluxerr_auto": torch.sqrt(torch.clamp(vauto, min=0)),
        "flux_radius": res.flux_radii[:, 0].to(dt),
        "flux_radius_fracs": res.flux_radii[:, 1:].to(dt),
        "xwin": xw.to(dt),
        "ywin": yw.to(dt),
        "flags": flags,
        "winpos_niter": res.win_niter,
        "win_flags": res.win_flags,
    }


# ----------------------------------------------------------------------------------------------
# main entry
# ----------------------------------------------------------------------------------------------
def _caller_threads_as_workers(fn):
    """Run ``fn`` (a measurement on many small stamps) with one intra-op thread on CPU, restoring the
    caller's setting on exit, and with ``workers`` (when not given) the caller's thread count: OpenMP
    fork/join on small stamp operations costs more than it gains, so the objects are split over Python
    threads instead (torch ops release the GIL), one group each."""

    @functools.wraps(fn)
    def run(image, *args, workers: Optional[int] = None, **kwargs):
        cpu = isinstance(image, Tensor) and image.device.type == "cpu"
        with one_intraop_thread(cpu) as nthreads:
            if workers is None:
                workers = nthreads if cpu and nthreads > 1 else 1
            return fn(image, *args, workers=workers, **kwargs)

    return run


@_caller_threads_as_workers
def measure(
    image: Tensor, segmentation: Union[Tensor, SegmentPixels], rms=None, *, var=None,
    filtered: Optional[Tensor] = None, filter_kernel: Union[str, Tensor, None] = "default",
    thresh=None, detect_thresh=None, thresh_nsigma: float = 1.5,
    phot_apertures: Sequence[float] = (10.0,), kron_fact: float = 2.5, min_radius: float = 3.5,
    autoapers: Sequence[float] = (0.0, 0.0), flux_fracs: Sequence[float] = (0.5,), gain: Optional[float] = None,
    mask: Optional[Tensor] = None, mask_type: str = "correct", saturation: Optional[float] = None, background=None,
    isophotal: Optional[dict] = None, blended: Optional[Tensor] = None, unblanked: Optional[Tensor] = None,
    always_blanked: Optional[Tensor] = None, aper_subpix: int = APER_OVERSAMP,
    winpos_revert: bool = True, winpos_max_radius: Optional[float] = WINPOS_MAX_RADIUS,
    max_elems: int = 1 << 22, workers: Optional[int] = None,
) -> dict[str, Tensor]:
    """SExtractor measurements for every object of a fixed segmentation.

    Args:
        image: background-subtracted ``(B, 1, H, W)`` float image (measurement = detection image).
        segmentation: ``(B, 1, H, W)`` integer labels (0 = background), e.g. SExtractor's SEGMENTATION
            check image or :class:`astroprep_torch.detect.SourceExtractor`'s map; or a
            :class:`SegmentPixels` (the detector's pixel lists, which carry the filtered values and the
            detected pixels: ``filtered``, ``filter_kernel`` and ``detect_thresh`` are then unused and
            no frame-sized segmentation, filtered image or blank map is made).
        rms: noise (ADU): scalar, ``(B,)`` or ``(B, 1, H, W)``; or give ``var`` (variance) instead.
            SExtractor without weight map = one global scalar (its printed background RMS).
        filtered: the detection-filtered image (SExtractor's FILTERED check image); computed with
            ``filter_kernel`` when None.  Barycentres and second moments use it (as SExtractor).
        thresh: analysis threshold in ADU (scalar or map) for ``npix`` (ISOAREA_IMAGE); default
            ``thresh_nsigma * rms`` (1.5 rms), made only at the pixels where it is used.  ``detect_thresh``:
            detection threshold in ADU (scalar or map) on ``filtered`` defining the blanked neighbour
            pixels; default ``thresh``.
        phot_apertures: aperture *diameters* in pixels (SExtractor's PHOT_APERTURES).
        kron_fact, min_radius: PHOT_AUTOPARAMS.  autoapers: PHOT_AUTOAPERS (diameters).
        flux_fracs: PHOT_FLUXFRAC, for ``flux_radius_fracs``.
        gain: e-/ADU (None or 0: no Poisson term, as SExtractor's GAIN 0).
        mask: bool ``(B,1,H,W)``, True = bad pixel: treated as blanked (like a zero-weight pixel).
        mask_type: "correct" (SExtractor's default), "blank" or "none" (MASK_TYPE).
        saturation, background: SATUR_LEVEL and the background (map, scalar, :class:`MeshBackground`): flag 4.
        isophotal: optional per-object overrides (NaN = compute) of what SExtractor fixes before the
            final segmentation exists: ``x``, ``y`` (0-based) of deblended objects (SExtractor keeps the
            deblending-branch barycentre; second moments are then taken about it over all pixels);
            ``x2``, ``y2``, ``xy`` and ``npix`` of objects that swallowed CLEANed neighbours
            (SExtractor merges the pixels and fluxes but keeps the master's moments and ISOAREA).
        blended: optional bool per object for flag 2 (default: inferred from touching labels).
        unblanked, always_blanked: optional bool ``(B, 1, H, W)`` maps of detected pixels never blanked /
            blanked for every object, its own included (SExtractor's CLEAN paste-back, ignored under
            MASK_TYPE NONE: see :class:`_CleanBlanking`).
        aper_subpix: 5 = SExtractor's sub-sampling of FLUX_APER; 0 = exact circular overlap.
        winpos_revert: as SExtractor 2.25 (winpos.c), report the isophotal position as ``xwin, ywin``
            when the window's flux or moments are not positive or the windowed centroid lies more
            than 1 px (in x and in y) outside the isophotal ellipse (older SExtractor: False).
        winpos_max_radius: cap (px) of the windowed centroid's integration radius ``4 sig``; ``None``
            = no cap (SExtractor's window is only truncated by its image buffer).  Only objects with a
            half-light radius above ``1.18 * winpos_max_radius / 4`` (37.6 px by default: saturated
            stars, their halos, large galaxies) are affected; they get FLAGS 16, as SExtractor flags a
            truncated window.  The cap bounds their cost: a window is iterated up to 16 times.
        max_elems: memory bound (elements per stamp chunk).
        workers: CPU threads for the stamp stages (objects split into this many interleaved groups,
            each measured by its own thread with one intra-op thread; used for >= 2,000 objects and
            no autograd).  Default: the caller's ``torch.get_num_threads()`` on CPU, else 1.  (On CPU the
            call itself runs with one intra-op thread, restored on exit.)

    Returns:
        dict of flat tensors, one row per object ordered by ``(batch_index, label)``: ``batch_index``,
        ``label``, ``x``, ``y`` (0-based), ``x2, y2, xy, a, b, theta, cxx, cyy, cxy, errx2, erry2,
        errxy``, ``npix`` (ISOAREA), ``fdnpix`` (segment pixels), ``peak`` (FLUX_MAX), ``flux_iso``,
        ``fluxerr_iso``, ``flux_aper``/``fluxerr_aper``/``area_aper`` ``(N, n_apertures)``,
        ``kron_radius``, ``flux_auto``, ``fluxerr_auto``, ``flux_radius`` (half light),
        ``flux_radius_fracs`` ``(N, len(flux_fracs))``, ``xwin``, ``ywin``, ``flags``,
        ``winpos_niter`` and ``win_flags`` (SExtractor's windowed-moment flags).
    """
    check_image(image, "image", channels=1)
    _check_segmentation(segmentation, image)
    if mask_type not in _MASK_TYPES:
        raise ValueError(f"mask_type must be one of {_MASK_TYPES}, got {mask_type!r}")
    mask = check_mask(mask, image)
    noise = _noise(image, rms, var, thresh, thresh_nsigma)
    filtered = _filtered_image(image, segmentation, filtered, filter_kernel)
    gain_v = float(gain) if gain else 0.0
    B, _, H, W = image.shape  # isophotal measurements over the segmentation pixels, then the stamps
    obj = _object_pixels(segmentation, filtered, H, W)
    shape = _isophotal_shape(obj, isophotal, H, W)
    varp = noise.var_at(obj.pidx, B, H, W)
    v = image.reshape(-1).index_select(0, obj.pidx)
    iso = _isophotal_fluxes(obj, v, varp, noise.thresh_at(obj.pidx, B, H, W), gain_v, isophotal)
    errs = _position_errors(obj, shape, varp, gain_v)
    flags = _isophotal_flags(image, segmentation, obj, shape, iso.peak, blended, saturation, background)
    fr = _measurement_frame(image, segmentation, obj, noise, filtered, mask, mask_type, detect_thresh,
                            _CleanBlanking.of(unblanked, always_blanked, image))
    geo = _Objects(obj.bidx, obj.label, shape.x, shape.y, shape.a, shape.b, shape.cxx, shape.cyy, shape.cxy)
    radii = [float(d) / 2.0 for d in phot_apertures]
    stages = functools.partial(
        _stamp_stages, fr=fr, radii=radii, aper_subpix=aper_subpix, kron_fact=kron_fact, min_radius=min_radius,
        autoapers=autoapers, fracs=(0.5,) + tuple(float(f) for f in flux_fracs), gain_v=gain_v,
        winpos_max_radius=winpos_max_radius, max_elems=max_elems)
    grad = image.requires_grad or any(isinstance(t_, Tensor) and t_.requires_grad for t_ in (var, rms))
    res = _split_run(stages, geo, obj.n, (workers or 1) if not grad else 1)
    xw, yw = res.xwin, res.ywin
    if winpos_revert:
        xw, yw = revert_winpos(xw, yw, shape, res.win_flags)
    flags |= _stamp_flags(res, shape, radii, H, W)
    return _columns(obj, shape, errs, iso, res, xw, yw, flags, gain_v, image.dtype)


#: ``measure`` without the thread handling (runs with the caller's intra-op threads; ``workers``
#: default 1).
_measure = measure.__wrapped__


class Photometry(nn.Module):
    """``nn.Module`` wrapper of :func:`measure` holding SExtractor's photometry settings (plain values,
    Hydra-friendly).  ``forward(image, segmentation, rms, **per_call)`` returns the dict of
    :func:`measure`; per-call keyword arguments (``filtered``, ``thresh``, ``detect_thresh``, ``mask``,
    ``background``, ``isophotal``, ``blended``, ``unblanked``, ``always_blanked``, ``var``) are passed through."""

    def __init__(self, phot_apertures: Sequence[float] = (10.0,), kron_fact: float = 2.5,
                 min_radius: float = 3.5, autoapers: Sequence[float] = (0.0, 0.0),
                 flux_fracs: Sequence[float] = (0.5,), gain: Optional[float] = None,
                 mask_type: str = "correct", saturation: Optional[float] = None,
                 filter_kernel: Optional[str] = "default", aper_subpix: int = APER_OVERSAMP,
                 winpos_revert: bool = True, winpos_max_radius: Optional[float] = WINPOS_MAX_RADIUS):
        super().__init__()
        if mask_type not in _MASK_TYPES:
            raise ValueError(f"mask_type must be one of {_MASK_TYPES}, got {mask_type!r}")
        self.kw = dict(phot_apertures=tuple(float(a) for a in phot_apertures), kron_fact=float(kron_fact),
                       min_radius=float(min_radius), autoapers=tuple(float(a) for a in autoapers),
                       flux_fracs=tuple(float(f) for f in flux_fracs), gain=gain, mask_type=mask_type,
                       saturation=saturation, filter_kernel=filter_kernel, aper_subpix=int(aper_subpix),
                       winpos_revert=bool(winpos_revert),
                       winpos_max_radius=None if winpos_max_radius is None else float(winpos_max_radius))

    def forward(self, image: Tensor, segmentation: Tensor, rms=None, **kwargs) -> dict[str, Tensor]:
        return measure(image, segmentation, rms, **{**self.kw, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())


