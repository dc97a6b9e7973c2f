"""Pipeline mode: a Hydra-configured graph of named stages over a dictionary of tensors.

The graph is the one place where the flow of data is visible. Each :class:`Stage` wraps a module
(any stage of this package, or a small glue module below) and declares what it *reads* from the
batch dictionary (``{argument: key}``) and what it *writes* (``{result field: key}``, a list of keys
for tuple results, or one key). :class:`Pipeline` runs the stages in order, so a reader can draw the
paper's Fig. 5 from ``configs/pipeline/gwac.yaml`` alone::

    quality -> mask bad patches -> background (science, reference) -> align science to reference
      -> subtract -> detect on the difference (candidates + triplet cutouts)
      -> detect on the science frame (catalog for light curves) -> grey-scale products

Batch keys used by the default graph (B frames of one field, one reference):

===================  ==============================================================
``science``          ``(B, 1, H, W)`` frames in ADU
``science_mask``     bool ``(B, 1, H, W)``, True = bad
``science_wcs``      :class:`~astroprep_torch.wcs.TanWCS` with B elements (or absent)
``reference``        ``(B, 1, H', W')`` the reference, repeated per frame
``reference_wcs``    :class:`~astroprep_torch.wcs.TanWCS` with B elements (or absent)
===================  ==============================================================

and the stages add ``quality_*``, ``*_background``, ``*_rms``, ``aligned``, ``difference``,
``difference_variance``, ``candidates``, ``triplets``, ``catalog``, ``science_norm``, ...

:class:`PreprocessModule` runs a pipeline in ``Trainer.predict`` over a
:class:`~astroprep_torch.data.FitsFrameDataModule`; :class:`FrameWriter` writes each frame's
products atomically (FITS with WCS, ECSV catalogs, tensor shards) and a manifest, so that a rerun
skips finished frames and a bad file is reported, never fatal. :func:`run_from_config` is what
``astroprep run`` calls.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from ._checks import InputError, RunError

log = logging.getLogger(__name__)

try:
    import lightning as L
    from lightning.pytorch.callbacks import BasePredictionWriter

    _LightningModule = L.LightningModule
except Exception:  # pragma: no cover
    _LightningModule = nn.Module  # type: ignore[assignment,misc]
    BasePredictionWriter = object  # type: ignore[assignment,misc]

Reads = Union[Mapping[str, str], Sequence[str]]
Writes = Union[Mapping[str, str], Sequence[str], str]


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------
class Stage(nn.Module):
    """One node of the graph: call ``module`` with inputs read from the batch, store its outputs.

    Args:
        module: the stage (an ``nn.Module`` or any callable).
        reads: ``{argument name: batch key}`` (a list means argument name = key). A key ending in
            ``?`` is optional: the argument is left out when the key is missing or None.
        writes: where the result goes: a key (the whole result), a list of keys (a tuple result,
            in order) or ``{field: key}`` (fields of a NamedTuple/dataclass/dict result).
        enabled: ``False`` skips the stage (handy from the command line:
            ``pipeline.stages.quality.enabled=false``).
        compile: ``False`` keeps the stage eager when the graph is compiled
            (``PreprocessModule(compile=True)``, ``astroprep run compile=true``): for stages whose
            shapes depend on the data (detection, catalogs), where compilation would recompile on
            every frame. ``None`` (default) follows the graph's setting.
        after: names of earlier stages this one also waits for when stages run at once
            (``Pipeline(workers > 1)``), beyond what the reads and writes require: an ordering
            hint, e.g. to keep light work off the cores while a stage that uses all of them runs.
    """

    def __init__(self, module, reads: Reads = (), writes: Writes = (), enabled: bool = True,
                 compile: Optional[bool] = None, after: Sequence[str] = ()):
        super().__init__()
        self.module = module
        self.compile = compile
        self.after = [after] if isinstance(after, str) else list(after)
        self.reads = {k: k for k in reads} if not isinstance(reads, Mapping) else dict(reads)
        if isinstance(writes, str):
            self.writes: Union[str, list, dict] = writes
        elif isinstance(writes, Mapping):
            self.writes = dict(writes)
        else:
            self.writes = list(writes)
        self.enabled = bool(enabled)

    def inputs(self, batch: Mapping[str, Any]) -> dict:
        kwargs = {}
        for arg, key in self.reads.items():
            optional = key.endswith("?")
            key = key.rstrip("?")
            if key not in batch or batch[key] is None:
                if optional:
                    continue
                raise KeyError(f"stage needs batch key {key!r} for argument {arg!r}; the batch has {sorted(batch)}")
            kwargs[arg] = batch[key]
        return kwargs

    def forward(self, batch: dict) -> dict:
        out = self.module(**self.inputs(batch))
        if isinstance(self.writes, str):
            if self.writes:
                batch[self.writes] = out
        elif isinstance(self.writes, list):
            if self.writes:
                values = list(out) if isinstance(out, (tuple, list)) else [out]
                if len(values) < len(self.writes):
                    raise ValueError(f"stage returned {len(values)} values, but writes lists {len(self.writes)} keys")
                for key, value in zip(self.writes, values):
                    batch[key] = value
        else:
            for field, key in self.writes.items():
                if isinstance(out, Mapping):
                    batch[key] = out[field]
                else:
                    batch[key] = getattr(out, field)
        return batch


class Pipeline(nn.Module):
    """Named stages run in order over a batch dictionary.

    Args:
        stages: ``{name: Stage}`` in running order (a list of ``(name, Stage)`` works too).
        timed: record each stage's wall time (seconds) in ``self.timings`` on every call, and the
            whole call's in ``self.wall``.
        workers: stages that may run at the same time, in threads (1: one after the other).  The
            dependencies come from what the stages read and write: a stage waits for every earlier
            stage that writes a key it reads, or that reads or writes a key it writes, so the
            results equal the sequential run's.  On a CPU, stages made of many small operations
            (detection, photometry) leave cores idle; the science-frame catalog, for one, can then
            be made while the difference image is.  Stage timings overlap in this mode, and a stage
            started beside ``k`` others runs ``1 / (k + 1)`` of the caller's intra-op threads.  The
            GWAC graph's config uses 2: a 4096^2 frame took 2.2-2.6 s instead of 2.7-3.2 s with 1
            on the 2-core CPU (``experiments/pipeline_table2.py``).

    ``forward(batch) -> batch``: the same dictionary with every stage's outputs added.
    ``skip=`` (a set of names) skips stages for one call.
    """

    def __init__(self, stages: Union[Mapping[str, Stage], Sequence], timed: bool = True, workers: int = 1):
        super().__init__()
        items = list(stages.items() if isinstance(stages, Mapping) else stages)
        names = [str(k) for k, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for j, (name, st) in enumerate(items):
            if not isinstance(st, Stage):
                raise TypeError(f"stage {name!r} must be a pipeline.Stage, got {type(st).__name__}")
            for other in st.after:
                if other not in names[:j]:
                    raise ValueError(f"stage {name!r}: after={other!r} must name an earlier stage, one of {names[:j]}")
        # A ModuleList (not a ModuleDict) so that any name works, "double" or "to" included.
        self.names = names
        self._stages = nn.ModuleList([st for _, st in items])
        self.timed = timed
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.timings: dict[str, float] = {}
        self.wall = 0.0

    @property
    def stages(self) -> "OrderedDict[str, Stage]":
        """``{name: Stage}`` in running order."""
        return OrderedDict(zip(self.names, self._stages))

    def forward(self, batch: dict, skip: Sequence[str] = ()) -> dict:
        batch = dict(batch)
        self.timings = {}
        t_start = time.perf_counter()
        todo = [(name, st) for name, st in self.stages.items() if st.enabled and name not in skip]
        if self.workers > 1 and len(todo) > 1 and not torch.compiler.is_compiling():
            self._run_concurrent(batch, todo)
        else:
            for name, stage in todo:
                self._run_stage(name, stage, batch)
        self.wall = time.perf_counter() - t_start
        return batch

    def _run_stage(self, name: str, stage: "Stage", batch: dict) -> None:
        if self.timed:
            _sync(batch)
            t0 = time.perf_counter()
        try:
            stage(batch)
        except Exception as exc:
            raise PipelineError(f"stage {name!r} failed: {type(exc).__name__}: {exc}") from exc
        if self.timed:
            _sync(batch)
            self.timings[name] = time.perf_counter() - t0

    @staticmethod
    def dependencies(todo: Sequence) -> list:
        """For ``[(name, Stage), ...]`` in running order: the set of earlier positions each stage
        must wait for (it reads what they write, or writes what they read or write, or names them
        in ``after``, which :class:`Pipeline` checks names earlier stages; a disabled or skipped one
        is not waited for)."""
        rw = []
        for _, st in todo:
            reads = {k.rstrip("?") for k in st.reads.values()}
            w = st.writes
            if isinstance(w, str):
                writes = {w} if w else set()
            else:
                writes = set(w.values() if isinstance(w, dict) else w)
            rw.append((reads, writes))
        deps = []
        pos = {name: i for i, (name, _) in enumerate(todo)}
        for j, (rj, wj) in enumerate(rw):
            d = {i for i in range(j) if (rj & rw[i][1]) or (wj & (rw[i][0] | rw[i][1]))}
            d |= {pos[name] for name in todo[j][1].after if name in pos}
            deps.append(d)
        return deps

    def _run_concurrent(self, batch: dict, todo: Sequence) -> None:
        """Run ``todo`` on ``self.workers`` threads, each stage once its dependencies are done (the
        earliest ready stage first).  The first failure stops new stages and is raised once the
        running ones are done.  Autograd / inference mode of the caller carry over to the threads,
        and its intra-op thread count, shared among the stages running at once."""
        from concurrent.futures import FIRST_COMPLETED, wait

        from ._runtime import thread_pool, with_caller_modes

        deps = self.dependencies(todo)
        done: set = set()
        running: dict = {}
        started: set = set()
        # the stages' own pool: a stage may wait on _runtime.thread_pool's jobs from one of these threads
        pool = thread_pool(self.workers, name="astroprep-stage")
        # Each stage runs under the caller's autograd / inference modes. Its intra-op thread count is
        # the caller's, divided among the stages running when it starts: a stage started beside k
        # others gets n // (k + 1) threads (at least 1), so concurrent stages share the cores
        # instead of oversubscribing them (2 cores: 2.25 -> 2.1 s per 4096^2 GWAC frame).
        n_threads = torch.get_num_threads()

        def run(i: int):
            return self._run_stage(todo[i][0], todo[i][1], batch)

        error = None
        while len(done) < len(todo):
            if error is None:
                for i in range(len(todo)):
                    if i not in started and deps[i] <= done and len(running) < self.workers:
                        started.add(i)
                        share = max(1, n_threads // (len(running) + 1))
                        running[pool.submit(with_caller_modes(run, threads=share), i)] = i
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                i = running.pop(fut)
                exc = fut.exception()
                if exc is not None and error is None:
                    error = exc
                done.add(i)
        if error is not None:
            raise error

    def describe(self) -> str:
        """One line per stage: ``name: reads -> writes`` (the graph as text)."""
        lines = []
        for name, st in self.stages.items():
            w = st.writes if isinstance(st.writes, str) else (list(st.writes.values()) if isinstance(st.writes, dict) else st.writes)
            state = "" if st.enabled else "  (disabled)"
            lines.append(f"{name}: {sorted(set(k.rstrip('?') for k in st.reads.values()))} -> {w}{state}")
        return "\n".join(lines)


class PipelineError(RuntimeError):
    """A stage failed; the message names it."""


def _sync(batch: Mapping) -> None:
    if torch.cuda.is_available():
        for v in batch.values():
            if isinstance(v, Tensor) and v.is_cuda:
                torch.cuda.synchronize(v.device)
                return


# --------------------------------------------------------------------------------------------
# Glue modules: the small steps between stages, so that the config spells out the whole flow
# --------------------------------------------------------------------------------------------
class MaskUnion(nn.Module):
    """``a | b`` for bool masks (either may be None)."""

    def forward(self, a: Optional[Tensor] = None, b: Optional[Tensor] = None) -> Optional[Tensor]:
        if a is None:
            return b
        if b is None:
            return a
        return a | b


class SubtractMap(nn.Module):
    """``image - other`` (e.g. the background)."""

    def forward(self, image: Tensor, other: Tensor) -> Tensor:
        return image - other


class Square(nn.Module):
    """``x ** 2`` (rms -> variance)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * x


class SquareRoot(nn.Module):
    """``sqrt(clamp(x, 0))`` (variance -> rms)."""

    def forward(self, x: Tensor) -> Tensor:
        out = x.clamp(min=0)  # a new tensor: the root is taken in place (one frame-sized buffer, not two)
        return out.sqrt_() if not (out.requires_grad and torch.is_grad_enabled()) else out.sqrt()


class SourceVariance(nn.Module):
    """``rms^2 + max(image, 0) / gain``: the background variance plus the sources' Poisson term.

    ``image`` is background-subtracted (ADU) and ``gain`` in e-/ADU (``None``: the background term
    alone). Without the source term the variance of a difference is too small at star cores and
    every bright star leaves false 5-sigma peaks. A gain below the true one overstates the source
    term (conservative)."""

    def __init__(self, gain: Optional[float] = 1.0):
        super().__init__()
        if gain is not None and not gain > 0:
            raise ValueError(f"gain must be positive or None, got {gain!r}")
        self.gain = gain

    def forward(self, rms: Tensor, image: Tensor) -> Tensor:
        var = rms.square()
        if self.gain is None:
            return var
        return var.add_(image.clamp(min=0), alpha=1.0 / float(self.gain)) if not var.requires_grad else \
            var + image.clamp(min=0) / float(self.gain)


class AlignedFrames(NamedTuple):
    """Output of :class:`AlignToReference`: frames on the reference grid.

    ``image`` ``(B, 1, H, W)`` (0 where not covered), ``extra`` the other maps aligned with it
    (``(B, C, H, W)`` or None), ``mask`` bool (True where not fully covered or bad), ``footprint``
    in [0, 1], ``method`` (``"wcs"`` or ``"stars"``) and ``variance``: the input variance propagated
    through the interpolation weights (``sum_i w_i^2 var_i``; 0 where not covered) or None.
    """

    image: Tensor
    extra: Optional[Tensor]
    mask: Tensor
    footprint: Tensor
    method: str
    variance: Optional[Tensor] = None


class AlignToReference(nn.Module):
    """Bring frames onto the reference grid: WCS reprojection, or star matching without a WCS.

    Args:
        method: ``"auto"`` (WCS when both WCS are given, else stars), ``"wcs"`` or ``"stars"``.
        interpolation: resampling kernel (``"bilinear"``, ``"bicubic"``, ``"lanczos3"``, ``"nearest"``).
        grid_step: WCS mapping evaluated every ``grid_step`` pixels and interpolated (None: exact).
        transform: ``"similarity"`` or ``"affine"`` for star matching.
        fused: WCS reprojection through ``torch.compile``-fused resampling kernels
            (``align.reproject(fused=True)``; set by ``PreprocessModule(compile=True)``).
        min_inlier_fraction, scale_range, max_rotation: plausibility bounds of a star-matching
            registration: the fraction of the matched sources that supports it, its scale and its
            rotation (degrees). A registration outside them raises ``AlignmentError`` (a frame of
            another field, or chance matches) instead of producing a wrong alignment.

    ``forward(image, reference, mask=None, reference_mask=None, src_wcs=None, dst_wcs=None,
    extra=None, variance=None) -> AlignedFrames``: ``extra`` ``(B, C, H, W)`` maps go along,
    resampled as images; ``variance`` ``(B, 1, H, W)`` is propagated through the interpolation
    weights (use it for noise maps: an rms map resampled as an image overstates the noise).
    Without a reference WCS every frame is registered by star matching: said once (a warning).
    """

    def __init__(self, method: str = "auto", interpolation: str = "bilinear", grid_step: Optional[int] = 32,
                 transform: str = "similarity", fused: bool = False, min_inlier_fraction: float = 0.1,
                 scale_range: Sequence[float] = (0.9, 1.1), max_rotation: float = 180.0):
        super().__init__()
        if method not in ("auto", "wcs", "stars"):
            raise ValueError(f"method must be 'auto', 'wcs' or 'stars', got {method!r}")
        self.method, self.interpolation, self.grid_step, self.transform = method, interpolation, grid_step, transform
        self.fused = bool(fused)
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"scale_range must be (low <= 1, high >= 1) with low > 0, got {scale_range!r}")
        self.min_inlier_fraction, self.scale_range, self.max_rotation = float(min_inlier_fraction), (lo, hi), float(max_rotation)
        self._said_stars = False

    def _check_plausible(self, r) -> None:
        """Raise ``AlignmentError`` for a star-matching registration outside the bounds."""
        from .align import AlignmentError, transform_scale_rotation

        for b in range(r.matrix.shape[0]):
            scale, rot = transform_scale_rotation(r.matrix[b])
            if not self.scale_range[0] <= scale <= self.scale_range[1] or abs(rot) > self.max_rotation:
                raise AlignmentError(
                    f"frame {b}: implausible registration (scale {scale:.3f} outside {self.scale_range} or rotation "
                    f"{rot:.1f} deg beyond {self.max_rotation:g}; {int(r.n_inliers[b])} star pairs): a frame of "
                    "another field? (AlignToReference scale_range / max_rotation)")

    def _say_stars(self, dst_wcs) -> None:
        if self.method == "auto" and not self._said_stars:
            import warnings

            self._said_stars = True
            warnings.warn(f"AlignToReference: {'the reference has no WCS' if dst_wcs is None else 'a frame has no WCS'}"
                          ": frames are registered by star matching (said once)", stacklevel=3)

    def forward(self, image: Tensor, reference: Tensor, mask: Optional[Tensor] = None,
                reference_mask: Optional[Tensor] = None, src_wcs=None, dst_wcs=None,
                extra: Optional[Tensor] = None, variance: Optional[Tensor] = None) -> AlignedFrames:
        from . import align

        c = image.shape[1]
        # Bad pixels become NaN, which spreads to every output pixel whose kernel touches them (as in
        # reproject); that is exact for masking and much cheaper than renormalised masked sampling.
        # The frame (marked) and the extra maps are written into one new stack: one frame-sized
        # allocation, not two.
        if mask is None and extra is None:
            stack = image
        else:
            ce = 0 if extra is None else extra.shape[1]
            stack = image.new_empty((image.shape[0], c + ce, *image.shape[-2:]))
            stack[:, :c] = image
            if mask is not None:
                stack[:, :c].masked_fill_(mask.expand_as(image), float("nan"))
            if extra is not None:
                stack[:, c:] = extra
        use_wcs = self.method == "wcs" or (self.method == "auto" and src_wcs is not None and dst_wcs is not None)
        if use_wcs:
            if src_wcs is None or dst_wcs is None:
                raise ValueError("AlignToReference(method='wcs') needs src_wcs and dst_wcs")
            r = align.reproject(stack, src_wcs, dst_wcs, tuple(reference.shape[-2:]), None,
                                interpolation=self.interpolation, grid_step=self.grid_step, fused=self.fused,
                                variance=variance)
            out, footprint, method, var_out = r.image, r.footprint, "wcs", r.variance
        else:
            self._say_stars(dst_wcs)
            r = align.register(image, reference, mask, reference_mask, transform=self.transform,
                               interpolation=self.interpolation, min_inlier_fraction=self.min_inlier_fraction)
            self._check_plausible(r)
            out, footprint, method = r.image, r.footprint, "stars"
            var_out = None if variance is None else align.warp_variance(variance, r.matrix, reference.shape[-2:],
                                                                        out[:, :c], interpolation=self.interpolation)
            if extra is not None:  # align's warp (closed-form 2x2 inverse: no batched LAPACK call)
                warped, _ = align.warp_affine(extra, r.matrix.to(extra.dtype), tuple(reference.shape[-2:]))
                out = torch.cat([out, warped], dim=1)
        if method == "wcs":
            # reproject's footprint is 0 wherever any channel is not finite (those pixels hold NaN)
            # and 1 elsewhere: the footprint alone marks the bad pixels, and the NaNs become 0 in place
            # (the output is reproject's own new tensor)
            bad = footprint < 0.999
            out.nan_to_num_(nan=0.0)
        else:
            bad = ~torch.isfinite(out[:, :c]).all(dim=1, keepdim=True) | (footprint < 0.999)
            out = torch.nan_to_num(out, nan=0.0)
        if reference_mask is not None:
            bad = bad | reference_mask
        if var_out is not None:
            var_out = var_out[:, :c].nan_to_num(nan=0.0)
        return AlignedFrames(out[:, :c], out[:, c:] if extra is not None else None, bad, footprint, method, var_out)


class CandidateTriplets(nn.Module):
    """Science / reference / difference cutouts ``(N, 3, size, size)`` at catalog positions."""

    def __init__(self, size: int = 63):
        super().__init__()
        self.size = int(size)

    def forward(self, science: Tensor, reference: Tensor, difference: Tensor, catalog) -> Tensor:
        from .cutouts import make_triplets

        xy = torch.stack([catalog["x"], catalog["y"]], dim=1)
        return make_triplets(science, reference, difference, xy, size=self.size, batch_index=catalog["batch_index"]).stamps


# --------------------------------------------------------------------------------------------
# Pipeline mode with Lightning: predict over FITS frames, write products, keep a manifest
# --------------------------------------------------------------------------------------------
#: What the writer can write: batch key -> (kind, file suffix, pixel grid[, rows of]).
#: kind: "fits" (image with the grid's WCS), "catalog" (ECSV), "tensor" (a .pt shard). A tensor with
#: "rows of" a catalog key holds one row per source of that catalog (split by its batch_index);
#: other tensors are split along the batch axis.
DEFAULT_PRODUCTS = {
    "aligned": ("fits", "aligned", "reference"),
    "difference": ("fits", "diff", "reference"),
    "difference_variance": ("fits", "diffvar", "reference"),
    "science_background": ("fits", "bkg", "science"),
    "science_rms": ("fits", "rms", "science"),
    "candidates": ("catalog", "candidates", "reference"),
    "catalog": ("catalog", "cat", "science"),
    "triplets": ("tensor", "triplets", "reference", "candidates"),
    "science_norm": ("tensor", "norm", "science"),
}


def _per_frame(value, i: int, n: int):
    """The part of a batched value that belongs to frame ``i`` of ``n``."""
    if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == n:
        return value[i : i + 1]
    return value


class PreprocessModule(_LightningModule):
    """Runs a :class:`Pipeline` in ``Trainer.predict`` over batches from ``FitsFrameDataModule``.

    Args:
        pipeline: the graph.
        reference: optional ``(1, 1, H, W)`` reference frame (repeated over each batch).
        reference_mask: its bool mask; ``reference_header``: its FITS header (for its WCS).
        compile: compile the per-frame graph: every stage's module goes through ``torch.compile``
            (static shapes), except the glue modules and stages marked ``compile=False`` (detection:
            data-dependent shapes); the alignment uses its fused compiled resampling kernels
            (``align.reproject(fused=True)``). A stage that fails to compile runs eager, with a
            warning. The first frame pays the compilation (minutes on a 2-core CPU).
        compile_options: keyword arguments for ``torch.compile`` (e.g. ``{"backend": "eager"}``).

    ``predict_step`` returns ``{"names", "paths", "outputs", "failed", "timings"}``; frames whose
    file could not be read, or whose batch failed in a stage, are listed in ``failed`` with the
    reason and the run goes on.
    """

    def __init__(self, pipeline: Pipeline, reference: Optional[Tensor] = None, reference_mask: Optional[Tensor] = None,
                 reference_header=None, compile: bool = False, compile_options: Optional[Mapping] = None):
        super().__init__()
        self.pipeline = pipeline
        self.reference = reference
        self.reference_mask = reference_mask
        self.reference_header = reference_header
        self.compiled = bool(compile)
        if compile:
            compile_graph(self.pipeline, **dict(compile_options or {}))

    def forward(self, batch: dict) -> dict:
        return self.pipeline(batch)

    def make_inputs(self, images: Tensor, masks: Tensor, headers: Sequence[str]) -> dict:
        from astropy.io import fits

        from .calibrate import header_saturation

        b = images.shape[0]
        inputs = {"science": images, "science_mask": masks}
        hdrs = [fits.Header.fromstring(h) if isinstance(h, str) else h for h in headers]
        inputs["science_wcs"] = _try_wcs(hdrs, images)
        inputs["science_saturation"] = header_saturation(hdrs, images)  # SATURATE (NaN: none)
        if self.reference is not None:
            ref = self.reference.to(images.device, images.dtype)
            inputs["reference"] = ref.expand(b, -1, -1, -1)
            rm = self.reference_mask if self.reference_mask is not None else torch.zeros_like(self.reference, dtype=torch.bool)
            inputs["reference_mask"] = rm.to(images.device).expand(b, -1, -1, -1)
            if self.reference_header is not None:
                inputs["reference_wcs"] = _try_wcs([self.reference_header] * b, images)
                inputs["reference_saturation"] = header_saturation([self.reference_header] * b, images)
        return inputs

    def unusable(self, image: Tensor, mask: Tensor, header: str, checked: bool = False) -> str:
        """Why one frame ``(1, 1, H, W)`` cannot be processed ("" when it can): too small, empty
        (unless ``checked``: the reader did that), or (when both have a WCS) outside the reference's
        footprint."""
        from ._checks import frame_problem

        problem = "" if checked else frame_problem(image, mask)
        if problem or self.reference is None or self.reference_header is None:
            return problem
        from astropy.io import fits

        sci = _try_wcs([fits.Header.fromstring(header) if isinstance(header, str) else header], image)
        ref = _try_wcs([self.reference_header], image)
        if sci is not None and ref is not None and not footprints_overlap(sci, image.shape[-2:], ref, self.reference.shape[-2:]):
            return "no overlap: the frame's footprint (its WCS) does not overlap the reference"
        return ""

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> dict:
        names, paths = batch["name"], batch["path"]
        checked = batch.get("checked") or [False] * len(names)
        errors = [e or self.unusable(batch["image"][i : i + 1], batch["mask"][i : i + 1], batch["header"][i], checked[i])
                  for i, e in enumerate(batch["error"])]
        failed = [(n, p, e) for n, p, e in zip(names, paths, errors) if e]
        good = [i for i, e in enumerate(errors) if not e]
        result = {"names": [names[i] for i in good], "paths": [paths[i] for i in good], "outputs": {},
                  "failed": failed, "timings": {}, "headers": [batch["header"][i] for i in good]}
        if not good:
            return result
        idx = torch.tensor(good, device=batch["image"].device)
        try:
            inputs = self.make_inputs(batch["image"].index_select(0, idx), batch["mask"].index_select(0, idx),
                                      [batch["header"][i] for i in good])
            with torch.no_grad():
                result["outputs"] = self.pipeline(inputs)
            result["timings"] = dict(self.pipeline.timings)
        except Exception as exc:  # the whole batch failed in a stage: report, go on
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("batch %d failed: %s", batch_idx, reason)
            result["failed"] += [(names[i], paths[i], reason) for i in good]
            result["names"], result["paths"], result["outputs"] = [], [], {}
        return result


_GLUE = (MaskUnion, SubtractMap, Square, SquareRoot, SourceVariance)


class CompiledStageModule(nn.Module):
    """A stage's module behind ``torch.compile``, falling back to eager when compilation fails.

    ``module`` stays the eager module (same parameters, same ``state_dict`` keys); the compiled
    callable is kept outside the module tree. The first call that raises inside the compiled path
    is retried eagerly: when the eager call works, the stage stays eager from then on (with a
    warning naming it); when it fails too, its error is the stage's error.
    """

    def __init__(self, module: nn.Module, name: str = "", **options):
        super().__init__()
        self.module = module
        self.name = name
        options.setdefault("dynamic", False)
        object.__setattr__(self, "_compiled", torch.compile(module, **options))
        self.failed: Optional[str] = None

    def forward(self, *args, **kwargs):
        if self.failed is None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as exc:
                out = self.module(*args, **kwargs)  # raises the real error when the input is at fault
                self.failed = _short_reason(exc)
                log.warning("torch.compile of stage %r failed (%s); it runs eager", self.name, self.failed)
                return out
        return self.module(*args, **kwargs)


def _short_reason(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of an exception, with its cause (a compiler error wraps the real one)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}"
    cause = getattr(exc, "inner_exception", None) or exc.__cause__
    if cause is not None and cause is not exc:
        text += f" ({type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]})"
    return text[:limit]


def compile_graph(pipeline: Pipeline, **options) -> Pipeline:
    """Compile ``pipeline``'s per-frame graph in place (see ``PreprocessModule(compile=True)``).

    Returns the pipeline; ``{name: how}`` in ``pipeline.compiled_stages`` says what each stage got
    (``"torch.compile"``, ``"fused kernels"``, ``"eager"``). Sets ``pipeline.workers = 1``.
    """
    how = {}
    for name, stage in pipeline.stages.items():
        m = stage.module
        if stage.compile is False or not isinstance(m, nn.Module) or isinstance(m, _GLUE):
            how[name] = "eager"
        elif isinstance(m, AlignToReference):
            m.fused = True
            how[name] = "fused kernels"
        elif isinstance(m, CompiledStageModule):
            how[name] = "torch.compile"
        else:
            stage.module = CompiledStageModule(m, name, **options)
            how[name] = "torch.compile"
    pipeline.compiled_stages = how
    # compiled stages run one after the other: torch.compile does not support tracing from several
    # threads at once
    pipeline.workers = 1
    return pipeline


def footprints_overlap(wcs_a, shape_a, wcs_b, shape_b, n: int = 17) -> bool:
    """Whether two pixel grids (one WCS each, shapes ``(H, W)``) overlap on the sky: an ``n x n``
    lattice over each frame (edges included) mapped into the other; any point inside is overlap."""
    def inside(src, shape_src, dst, shape_dst) -> bool:
        h, w = shape_src
        ys = torch.linspace(-0.5, h - 0.5, n, dtype=torch.float64)
        xs = torch.linspace(-0.5, w - 0.5, n, dtype=torch.float64)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        x, y = src.pixel_to_pixel(dst, xx.reshape(1, -1), yy.reshape(1, -1))
        hd, wd = shape_dst
        ok = (x >= -0.5) & (x <= wd - 0.5) & (y >= -0.5) & (y <= hd - 0.5)
        return bool(ok.any())

    a, b = wcs_a.to(device="cpu"), wcs_b.to(device="cpu")
    return inside(a, shape_a, b, shape_b) or inside(b, shape_b, a, shape_a)


def _try_wcs(headers, like: Tensor):
    """A batched TanWCS from headers, or None when any header lacks a supported celestial WCS."""
    try:
        from .wcs import TanWCS

        return TanWCS.from_header(list(headers)).to(device=like.device)
    except Exception:
        return None


class FrameWriter(BasePredictionWriter):
    """Writes each frame's products atomically and appends a manifest row per frame.

    Products are named ``<frame>.<suffix>.<ext>`` in ``output_dir`` (``DEFAULT_PRODUCTS`` lists what
    each batch key becomes: e.g. ``<frame>.diff.fits``, ``<frame>.candidates.ecsv``,
    ``<frame>.cat.ecsv``, ``<frame>.triplets.pt``). FITS products carry the WCS of their pixel grid
    (the science frame's or the reference's). The manifest (``manifest.rank<r>.jsonl``, merged by
    :func:`read_manifest`) holds one JSON row per frame: name, input path, status (``ok`` /
    ``failed``), reason, outputs, per-stage timings. A frame counts as finished when its row says
    ``ok`` and its outputs exist, so a rerun skips it (:meth:`finished`).

    Args:
        output_dir: where the products and the manifest go.
        products: ``{batch key: (kind, suffix, grid[, rows of])}`` (default :data:`DEFAULT_PRODUCTS`).
        reference_header: FITS header of the reference grid (its WCS goes into reference-grid products).
        asynchronous: write while the next batch computes, so that pipeline mode hides its I/O:
            ``"process"`` in a writer process (one per process, spawned when prediction starts and
            kept for later runs; the product tensors reach it through shared memory), ``True`` / ``"thread"`` on a background thread, ``False`` in
            the predict loop. The process keeps the writing's Python work (FITS headers, catalog
            formatting) off the interpreter lock that the computing thread needs between its tensor
            operations; a thread is cheaper to start (small runs, tests). The loop hands over only
            the product tensors and waits only when ``max_pending`` batches are still being written;
            the queue is drained at the end of ``Trainer.predict`` (:meth:`flush`), so every output
            and manifest row exists when ``predict`` returns.
        max_pending: batches that may wait for the writer (bounds the memory held).
        flush_to_disk: each product is on disk before its rename, and its pages leave the page cache
            (:func:`~astroprep_torch.io.flush_to_disk`): a crash never leaves an empty file under a
            product's name, and a long run does not fill the page cache with outputs nobody reads
            back. On virtual machines this also takes most of the writing's CPU time away (the
            kernel reuses the dropped pages instead of taking fresh ones). ``False`` leaves the
            write-back to the kernel.
    """

    def __init__(self, output_dir, products: Optional[Mapping[str, Sequence]] = None, reference_header=None,
                 asynchronous: Union[bool, str] = True, max_pending: int = 2, flush_to_disk: bool = True):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.products = {k: tuple(v) for k, v in (products or DEFAULT_PRODUCTS).items()}
        self.reference_header = reference_header
        if asynchronous not in (True, False, "thread", "process"):
            raise ValueError(f"asynchronous must be True, False, 'thread' or 'process', got {asynchronous!r}")
        self.mode = "loop" if asynchronous is False else ("process" if asynchronous == "process" else "thread")
        self.asynchronous = self.mode != "loop"
        self.max_pending = max(1, int(max_pending))
        self.flush_to_disk = bool(flush_to_disk)
        self.rows: list[dict] = []
        self.write_seconds: list[float] = []  # per frame, measured in the thread that writes
        self._done: Optional[dict[str, dict]] = None
        self._queue = None
        self._thread = None
        self._proc = None  # the writer service (process mode)
        self._wid = 0
        self._outstanding = 0  # batches handed to the writer process, not yet reported written
        self._slots: Optional[_SharedSlots] = None  # shared-memory buffers of the writer process's inputs
        self._error: Optional[BaseException] = None

    # -- resume --------------------------------------------------------------------------------
    def finished(self, name: str) -> bool:
        """True when a previous run finished ``name`` (the manifest is read once, on the first call)."""
        if self._done is None:
            self._done = read_manifest(self.output_dir)
        row = self._done.get(name)
        return bool(row) and row["status"] == "ok" and all((self.output_dir / p).exists() for p in row["outputs"])

    # -- writing -------------------------------------------------------------------------------
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        rank = getattr(trainer, "global_rank", 0) if trainer is not None else 0
        if not self.asynchronous:
            self.write_prediction(prediction, rank)
            return
        if self.mode == "process":
            self._collect(block=False)
            self._raise_pending_error()
            if self._proc is None:
                self._start_process()
            while self._outstanding >= self.max_pending:  # wait while max_pending batches are queued
                self._collect(block=True, until="rows")
                self._raise_pending_error()
            self._outstanding += 1
            self._proc.jobs.put(("write", self._wid, self._slim(prediction, for_process=True), rank))
            return
        self._raise_pending_error()
        if self._thread is None:
            self._start()
        self._queue.put((self._slim(prediction), rank))  # blocks while max_pending batches wait

    def _slim(self, prediction: dict, for_process: bool = False) -> dict:
        """The prediction with only what the products need (frees the graph's other tensors now).
        For the writer process also: tensors on the CPU, catalogs without their segmentation."""
        outputs = prediction.get("outputs") or {}
        keep = set(self.products) | {v[3] for v in self.products.values() if len(v) > 3}
        outputs = {k: v for k, v in outputs.items() if k in keep}
        if for_process:
            if self._slots is None:
                self._slots = self._proc.take_slots(self.max_pending)
            outputs = {k: _portable(v, self._slots, k) for k, v in outputs.items()}
            self._slots.next_turn()
        return dict(prediction, outputs=outputs)

    # -- the writer process ----------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        from .io import remove_stale_temporaries

        gone = remove_stale_temporaries(self.output_dir)  # left by an earlier run killed mid-write
        if gone:
            log.info("removed %d temporary files of an interrupted run from %s", len(gone), self.output_dir)
        if self.mode == "process":
            self._start_process()  # the process starts while the first frames compute

    def _start_process(self) -> None:
        if self._proc is not None:
            return
        self._proc = _writer_service()
        self._wid = self._proc.register()
        header = self.reference_header.tostring() if self.reference_header is not None else None
        self._proc.jobs.put(("config", self._wid, str(self.output_dir), self.products, header, self.max_pending,
                             self.flush_to_disk))

    def _collect(self, block: bool, until: str = "flushed") -> None:
        """Take this writer's reports from the writer process (manifest rows, timings, errors);
        with ``block``, wait until one of kind ``until`` arrived ("rows": a batch written;
        "flushed": everything queued before the flush request is written)."""
        if self._proc is None:
            return
        for kind, payload in self._proc.messages(self._wid, block, until):
            if kind == "rows":
                rows, secs = payload
                self.rows += rows
                self.write_seconds += secs
                self._outstanding -= 1
            elif kind == "error":
                self._outstanding = 0
                if self._error is None:
                    full = payload.startswith(OutputDiskFull.__name__ + ": ")
                    self._error = OutputDiskFull(payload.split(": ", 1)[1]) if full else _WriterProcessError(payload)

    def _start(self) -> None:
        import queue
        import threading

        self._queue = queue.Queue(maxsize=self.max_pending)
        self._thread = threading.Thread(target=self._work, name="astroprep-frame-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a fatal error, drain without writing
                    self.write_prediction(*item)
            except BaseException as exc:  # e.g. the manifest cannot be written: re-raised in the loop
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            if isinstance(exc, OutputDiskFull):
                raise exc
            what = str(exc) if isinstance(exc, _WriterProcessError) else f"{type(exc).__name__}: {exc}"
            raise RuntimeError(f"FrameWriter: writing outputs failed: {what}") from exc

    def flush(self) -> None:
        """Wait until every queued batch is written, stop the writer thread, re-raise its error."""
        self._stop()
        self._raise_pending_error()

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread, self._queue = None, None
        if self._proc is not None:
            if self._proc.alive():
                self._proc.jobs.put(("flush", self._wid))
            self._collect(block=True, until="flushed")
            self._proc.unregister(self._wid)
            if self._slots is not None:
                self._proc.return_slots(self._slots)
            self._proc, self._outstanding, self._slots = None, 0, None

    def on_predict_end(self, trainer, pl_module) -> None:
        self.flush()

    def on_exception(self, trainer, pl_module, exception) -> None:
        # Keep what was computed before the failure (or the interruption): finish the queued writes,
        # without hiding the exception that stopped the run.
        self._stop()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop()

    def write_prediction(self, prediction: dict, rank: int = 0) -> list[dict]:
        from astropy.io import fits

        self.output_dir.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        rows = []
        outputs = prediction["outputs"]
        n = len(prediction["names"])
        for i, (name, path) in enumerate(zip(prediction["names"], prediction["paths"])):
            written, reason = [], ""
            try:
                sci_header = fits.Header.fromstring(prediction["headers"][i]) if prediction.get("headers") else None
                for key, (kind, suffix, grid, *rows_of) in self.products.items():
                    if key not in outputs or outputs[key] is None:
                        continue
                    header = self.reference_header if grid == "reference" and self.reference_header is not None else sci_header
                    catalog = outputs.get(rows_of[0]) if rows_of else None
                    written.append(self._write_one(name, outputs[key], kind, suffix, header, i, n, catalog))
                status = "ok"
            except Exception as exc:
                status, reason = "failed", f"writing outputs: {type(exc).__name__}: {exc}"
                self._remove(written)  # a failed frame leaves no product behind
                written = []
                if _disk_full(exc, self.output_dir):
                    rows.append({"name": name, "path": path, "status": status, "reason": reason, "outputs": [], "rank": rank})
                    self._record(rows, rank, missing_ok=True)
                    raise OutputDiskFull(f"output disk full writing frame {name!r} in {self.output_dir} ({exc})") from exc
            rows.append({"name": name, "path": path, "status": status, "reason": reason, "outputs": written,
                         "timings": prediction.get("timings", {}), "rank": rank})
        if n:
            self.write_seconds += [(time.perf_counter() - t_start) / n] * n
        for name, path, reason in prediction["failed"]:
            rows.append({"name": name, "path": path, "status": "failed", "reason": reason, "outputs": [], "rank": rank})
        self._record(rows, rank)
        return rows

    def _remove(self, files: Sequence[str]) -> None:
        for f in files:
            try:
                (self.output_dir / f).unlink()
            except FileNotFoundError:
                pass

    def _record(self, rows: list, rank: int, missing_ok: bool = False) -> None:
        """Append ``rows`` to the manifest (whole lines or none); with ``missing_ok``, a manifest that
        cannot be written (the disk is full) only logs: the caller is already failing."""
        try:
            _append_jsonl(self.output_dir / f"manifest.rank{rank}.jsonl", rows)
        except OSError as exc:
            if not missing_ok:
                if _disk_full(exc, self.output_dir):
                    for r in rows:
                        self._remove(r["outputs"])  # products without a manifest row would be redone anyway
                    raise OutputDiskFull(f"output disk full writing the manifest in {self.output_dir} ({exc})") from exc
                raise
            log.warning("manifest rows not written: %s", exc)
        self.rows += rows

    def _write_one(self, name, value, kind, suffix, header, i, n, catalog=None) -> str:
        from .detect import rows_of_image
        from .io import write_fits

        if kind == "fits":
            fname = f"{name}.{suffix}.fits"
            img = _per_frame(value, i, n)
            write_fits(self.output_dir / fname, img.detach().float().cpu(), header=_image_header(header), overwrite=True,
                       flush=self.flush_to_disk)
        elif kind == "catalog":
            fname = f"{name}.{suffix}.ecsv"
            table = value.to_table(batch_index=i)
            _atomic(self.output_dir / fname, lambda p: write_ecsv(table, p), self.flush_to_disk)
        elif kind == "tensor":
            fname = f"{name}.{suffix}.pt"
            if catalog is not None:
                t = value[rows_of_image(catalog["batch_index"], i)]  # one row per source of this frame
            else:
                t = _per_frame(value, i, n)[0] if isinstance(value, Tensor) and value.shape[0] == n else value
            _atomic(self.output_dir / fname, lambda p: torch.save(_compact(t), p), self.flush_to_disk)
        else:
            raise ValueError(f"unknown product kind {kind!r}")
        return fname


def _compact(t: Tensor) -> Tensor:
    """``t`` on the CPU with a storage of its own size: ``torch.save`` writes a view's whole storage
    (every frame of a batch), so a view into a larger storage is copied first."""
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


class _WriterProcessError(RuntimeError):
    """An error reported by the writer process (its message names the original exception)."""


def _write_mode(value):
    """``async_write`` of the config: true/false, or "thread"/"process"."""
    if isinstance(value, str) and value.lower() in ("thread", "process"):
        return value.lower()
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return bool(value)


#: Product tensors from this size on reach the writer process through reused shared-memory slots;
#: smaller ones (catalog columns) are pickled by value.
_SLOT_MIN_BYTES = 1 << 20


class _SharedSlots:
    """Shared-memory buffers, reused frame after frame, that carry large product tensors to the
    writer process.

    Handing a tensor to another process moves it into new shared memory: a copy into fresh pages
    (page faults, zeroing) in this process and a new mapping in the writer, about 25k page faults per
    100 MB on either side, every frame. Here each product key owns ``ring`` grow-only buffers,
    shared once; a frame's tensor is copied into the buffer of its turn and sent as a view of it.
    The writer keeps the buffers it received mapped (torch's shared-storage cache finds them again
    by file identity), so a frame costs one copy into pages already mapped on both sides.

    ``ring`` must be at least the number of batches that may wait for the writer: a buffer is
    reused only when the batch that last used it has been reported written.
    """

    def __init__(self, ring: int):
        self.ring = max(1, int(ring))
        self.turn = 0
        self.buffers: dict[str, list] = {}

    def next_turn(self) -> None:
        self.turn = (self.turn + 1) % self.ring

    def put(self, key: str, t: Tensor) -> Tensor:
        nbytes = t.numel() * t.element_size()
        ring = self.buffers.setdefault(key, [None] * self.ring)
        buf = ring[self.turn]
        if buf is None or buf.numel() < nbytes:
            grow = nbytes if buf is None else nbytes + nbytes // 4  # a growing product (cutouts) grows once
            buf = ring[self.turn] = torch.empty(grow, dtype=torch.uint8).share_memory_()
        out = buf[:nbytes].view(t.dtype).view(t.shape)
        out.copy_(t.detach())
        return out


def _portable(value, slots: _SharedSlots, key: str):
    """A product as the writer process gets it: large tensors in ``slots``, small ones and catalog
    columns as numpy arrays (pickled by value: no file descriptor to pass per column).
    :func:`_unportable` turns it back."""
    from .detect import Catalog

    if isinstance(value, Tensor):
        if value.numel() * value.element_size() >= _SLOT_MIN_BYTES:
            return slots.put(key, value)
        return _by_value(value)
    if isinstance(value, Catalog):
        return ("catalog", {k: _by_value(v) for k, v in value.columns.items()})
    return value


def _by_value(t: Tensor):
    """A small tensor as a numpy array (pickled by value); dtypes numpy lacks (bfloat16) stay tensors."""
    t = t.detach().cpu()
    try:
        return t.numpy()
    except TypeError:
        return t


def _unportable(value):
    """The writer process's side of :func:`_portable`: tensors and catalogs again."""
    import numpy as np

    from .detect import Catalog

    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "catalog":
        return Catalog({k: _unportable(v) for k, v in value[1].items()}, None)
    return value


class _WriterService:
    """One writer process per parent process, shared by every process-mode :class:`FrameWriter`
    (a Python and torch start costs seconds: paid once, not per run or per ``Trainer.predict``).
    Jobs go in one queue, in order: ``("config", id, ...)``, ``("write", id, prediction, rank)``,
    ``("flush", id)``; reports come back tagged with the writer's id."""

    def __init__(self):
        import itertools

        import torch.multiprocessing as mp

        from ._orphans import resource_tracker_in_own_session

        resource_tracker_in_own_session()  # it cleans up after a killed run (see there)
        ctx = mp.get_context("spawn")  # not fork: the parent's OpenMP threads do not survive a fork
        self.jobs = ctx.Queue()
        self.results = ctx.Queue()
        self.proc = ctx.Process(target=_writer_process, name="astroprep-frame-writer", daemon=True,
                                args=(self.jobs, self.results, os.getpid()))
        self.proc.start()
        self.pid = os.getpid()
        self._ids = itertools.count(1)
        self._inbox: dict = {}  # reports for writers other than the one collecting
        self._slots: list = []  # shared buffers of finished writers, for the next ones

    def take_slots(self, ring: int) -> "_SharedSlots":
        """Shared buffers for a writer: a finished writer's, when one had as many (each writer
        owns its set until :meth:`return_slots`: a set never serves two writers at once)."""
        for i, slots in enumerate(self._slots):
            if slots.ring == ring:
                return self._slots.pop(i)
        return _SharedSlots(ring)

    def return_slots(self, slots: "_SharedSlots") -> None:
        slots.turn = 0
        self._slots = [slots] + self._slots[:1]  # keep two sets at most

    def alive(self) -> bool:
        return self.proc.is_alive()

    def register(self) -> int:
        wid = next(self._ids)
        self._inbox[wid] = []
        return wid

    def unregister(self, wid: int) -> None:
        self._inbox.pop(wid, None)

    def messages(self, wid: int, block: bool, until: str):
        """Reports for writer ``wid``: what is there now; with ``block``, up to the first of kind
        ``until`` (an error report or the process's death also ends the wait)."""
        import queue as _q

        mine = self._inbox.setdefault(wid, [])
        out = []
        while True:
            while mine:
                kind, payload = mine.pop(0)
                out.append((kind, payload))
                if block and kind in (until, "error"):
                    return out
            try:
                msg = self.results.get(timeout=1.0) if block else self.results.get_nowait()
            except _q.Empty:
                if not block:
                    return out
                if not self.alive():  # died without reporting (killed): say so
                    out.append(("error", f"the writer process exited with code {self.proc.exitcode}"))
                    return out
                continue
            kind, owner, payload = msg
            self._inbox.setdefault(owner, []).append((kind, payload))


_SERVICE: Optional[_WriterService] = None


def _writer_service() -> _WriterService:
    """The writer process of this process (started on first use, again after fork or its death)."""
    global _SERVICE
    if _SERVICE is None or _SERVICE.pid != os.getpid() or not _SERVICE.alive():
        _SERVICE = _WriterService()
    return _SERVICE


def _writer_process(jobs, results, parent_pid: Optional[int] = None) -> None:
    """Body of the writer process: for each job, write in the loop with the writer its ``config``
    job set up and report back; after a writer's fatal error, its later batches are drained
    without writing (as the writer thread does). It dies with its parent (a killed run leaves no
    writer behind)."""
    from ._orphans import die_with_parent

    die_with_parent(parent_pid)
    torch.set_num_threads(1)
    from astropy.io import fits

    from ._runtime import retain_freed_memory

    retain_freed_memory()
    import collections

    writers: dict = {}
    # The last batches' shared buffers stay mapped here: the next frames arrive in the same buffers
    # (see _SharedSlots), which torch's shared-storage cache then finds mapped already.
    held: collections.deque = collections.deque(maxlen=2)
    failed: set = set()
    while True:
        job = jobs.get()
        kind, wid = job[0], job[1]
        if kind == "config":
            _, _, output_dir, products, header, ring, flush = job
            writers[wid] = FrameWriter(output_dir, products=products, asynchronous=False, flush_to_disk=flush,
                                       reference_header=fits.Header.fromstring(header) if header is not None else None)
            if held.maxlen < ring:
                held = collections.deque(held, maxlen=ring)
        elif kind == "flush":
            writers.pop(wid, None)
            failed.discard(wid)
            results.put(("flushed", wid, None))
        elif kind == "write":
            if wid in failed or wid not in writers:
                continue
            w = writers[wid]
            try:
                n0 = len(w.write_seconds)
                prediction = dict(job[2], outputs={k: _unportable(v) for k, v in job[2]["outputs"].items()})
                held.append([v for v in prediction["outputs"].values() if isinstance(v, Tensor)])
                rows = w.write_prediction(prediction, *job[3:])
                results.put(("rows", wid, (rows, w.write_seconds[n0:])))
            except BaseException as exc:  # e.g. the manifest cannot be written
                failed.add(wid)
                results.put(("error", wid, f"{type(exc).__name__}: {exc}"))
        del job


#: Text formats of float32/float16 ECSV values (a Python float's repr would print the float64
#: expansion: 17 digits, 3x slower and longer, for the same float32 value).
_ECSV_FORMATS = {"f4": "%.9g", "f2": "%.5g"}


def write_ecsv(table, path) -> None:
    """Write an astropy ``Table`` as ECSV, several times faster than ``table.write(format="ascii.ecsv")``.

    The header (column names, datatypes, units, meta) is astropy's own; the data rows of plain 1-D
    numeric and bool columns are formatted in one ``%``-operation per row: float64 and integer
    columns with ``repr`` (shortest round-trip text), float32 with 9 significant digits and float16
    with 5, the fewest that round-trip every value of those types. Reading the file back gives the
    same values bit for bit. Any other table (masked, string or multidimensional columns) goes
    through astropy's writer unchanged.
    """
    import io as _io

    import numpy as np

    cols = list(table.columns.values())
    plain = all(getattr(c, "mask", None) is None and c.ndim == 1 and c.dtype.kind in "fiub" for c in cols)
    if not plain or not cols:
        table.write(str(path), format="ascii.ecsv", overwrite=True)
        return
    buf = _io.StringIO()
    table[:0].write(buf, format="ascii.ecsv")
    fmt = " ".join(_ECSV_FORMATS.get(np.dtype(c.dtype).str[1:], "%r") for c in cols)
    values = [np.asarray(c).tolist() for c in cols]
    body = "\n".join([fmt % row for row in zip(*values)])
    with open(path, "w") as fh:
        fh.write(buf.getvalue())
        if body:
            fh.write(body + "\n")


def _image_header(header):
    """A header to write an image with: the input's keywords minus structural ones."""
    if header is None:
        return None
    h = header.copy()
    for key in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "BZERO", "BSCALE", "BLANK", "XTENSION",
                "PCOUNT", "GCOUNT", "CHECKSUM", "DATASUM"):
        h.remove(key, ignore_missing=True, remove_all=True)
    return h


def _atomic(path: Path, write, flush: bool = False) -> None:
    """Write through ``write(tmp_path)`` then rename onto ``path`` (never half-written); with ``flush``,
    the data are on disk and out of the page cache before the rename (:func:`~astroprep_torch.io.flush_to_disk`)."""
    from .io import flush_to_disk, temporary_path

    tmp = temporary_path(path, path.suffix)  # the writer overwrites the empty file
    try:
        write(tmp)
        if flush:
            flush_to_disk(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class OutputDiskFull(RunError, OSError):
    """The output folder's disk (or quota) is full: the run stops, since every later frame would
    fail the same way."""


def _disk_full(exc: BaseException, folder=None) -> bool:
    """Whether ``exc`` says the disk is full: ENOSPC / EDQUOT anywhere in its chain, or an OSError
    without errno (astropy's "Not enough space on disk") while ``folder``'s disk has < 1 MiB free."""
    import errno
    import shutil

    e = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    if isinstance(exc, OSError) and folder is not None:
        try:
            return shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            return False
    return False


def _append_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """Append ``rows`` as JSON lines, each whole or absent: one ``os.write`` of all the lines on an
    ``O_APPEND`` descriptor, then ``fsync``. A partial line at the end (left by a crash or a full
    disk) is cut off first, so that no row is ever glued onto it; a short write (a full disk) is
    cut off again and raises ``OSError(ENOSPC)``."""
    import errno

    if not rows:
        return
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = _drop_partial_line(fd)
        try:
            n = os.write(fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, f"short write: {n} of {len(data)} bytes", str(path))
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # no half row left behind
            raise
    finally:
        os.close(fd)


def _drop_partial_line(fd: int) -> int:
    """Cut a file open on ``fd`` back to its last complete line; returns its size then."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
    keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
    os.ftruncate(fd, keep)
    return keep


def read_manifest(output_dir) -> dict[str, dict]:
    """The merged manifest of a run: ``{frame name: last row}`` over every rank's file. A line cut
    short (an interrupted write, a full disk) is dropped."""
    rows: dict[str, dict] = {}
    for f in sorted(Path(output_dir).glob("manifest.rank*.jsonl")):
        for line in f.read_bytes().decode("utf-8", "replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a row cut short by an interruption
                continue
            if isinstance(r, dict) and "name" in r:
                rows[r["name"]] = r
    return rows


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: Tensor) -> Tensor:
    """A floating tensor's bit patterns (an integer view; other dtypes as they are): ``torch.equal``
    on them is exact and NaN-safe, where on the floats a single NaN (a blank pixel) makes two
    identical images unequal."""
    if t.is_floating_point() and t.element_size() in _SAME_SIZE_INT:
        return t.view(_SAME_SIZE_INT[t.element_size()])
    return t


class SharedReference(nn.Module):
    """Run ``module`` once on the first batch element and repeat its tensor outputs over the batch.

    The reference is the same for every frame of a batch; this avoids B identical computations
    (its background, for instance). Every tensor argument is sliced to its first element.

    Args:
        module: the stage to run on the reference.
        cache: keep the last result and reuse it while the inputs are the same: a survey run
            processes thousands of frames against one reference, so its products are made once.
            "The same" is checked exactly (``torch.equal`` of the bit patterns against a kept copy
            of the inputs, one pass over them; NaN pixels compare equal to themselves), never by
            identity or a hash, so a changed reference is never missed.
    """

    def __init__(self, module: nn.Module, cache: bool = True):
        super().__init__()
        self.module = module
        self.cache = bool(cache)
        self._kept: Optional[tuple] = None  # (inputs, output)

    def _hit(self, args: dict):
        if self._kept is None:
            return None
        kept, out = self._kept
        if kept.keys() != args.keys():
            return None
        for k, v in args.items():
            w = kept[k]
            if isinstance(v, Tensor) != isinstance(w, Tensor):
                return None
            if isinstance(v, Tensor):
                if (v.shape != w.shape or v.dtype != w.dtype or v.device != w.device
                        or not (v is w or torch.equal(_bits(v), _bits(w)))):
                    return None
            elif v is not w:
                try:
                    if not bool(v == w):
                        return None
                except Exception:  # no plain equality (arrays, WCS objects): not the same
                    return None
        return out

    def forward(self, **kwargs):
        b = next(v.shape[0] for v in kwargs.values() if isinstance(v, Tensor))
        args = {k: (v[:1] if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
        grad = torch.is_grad_enabled() and any(isinstance(v, Tensor) and v.requires_grad for v in args.values())
        out = None if (grad or not self.cache) else self._hit(args)
        if out is None:
            out = self.module(**args)
            if self.cache and not grad:
                self._kept = ({k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in args.items()}, out)

        def rep(v):
            return v.expand(b, *v.shape[1:]) if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == 1 else v

        if isinstance(out, tuple) and hasattr(out, "_fields"):
            return type(out)(*[rep(v) for v in out])
        if isinstance(out, tuple):
            return tuple(rep(v) for v in out)
        return rep(out)


# --------------------------------------------------------------------------------------------
# `astroprep run`
# --------------------------------------------------------------------------------------------
def pick_reference(paths: Sequence, scorer=None) -> Path:
    """Choose a reference among frames: the best quality score, then the smallest FWHM (header
    ``FWHM``/``SEEING`` when present)."""
    from .io import read_fits

    best, best_key = None, None
    for p in paths:
        try:
            f = read_fits(p)
        except Exception:
            continue
        q = float(scorer(f.data, f.mask).score[0]) if scorer is not None else 0.0
        fwhm = float(f.header.get("FWHM", f.header.get("SEEING", 0.0)) or 0.0)
        key = (q, fwhm)
        if best_key is None or key < best_key:
            best, best_key = Path(p), key
    if best is None:
        raise FileNotFoundError("pick_reference: none of the inputs could be read")
    return best


def read_reference(path):
    """Read and check a run's reference frame; any problem is an :class:`InputError` naming it."""
    from ._checks import frame_problem
    from .io import read_fits

    try:
        ref = read_fits(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"reference {path}: {exc}") from None
    problem = frame_problem(ref.data, ref.mask)
    if problem:
        raise InputError(f"reference {path}: {problem}")
    return ref


def run_from_config(cfg) -> dict:
    """What ``astroprep run`` does: see the module docstring and ``configs/config.yaml``."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from . import data as data_mod

    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("retain_memory", True):
        from ._runtime import retain_freed_memory

        retain_freed_memory()  # frame after frame reuses the same pages (see its docstring)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    truth = None
    inputs, reference_path = cfg.get("input"), cfg.get("reference")
    if inputs is None:  # the embedded demo: a simulated GWAC-like two-epoch field
        from ._runners import write_simulated_pair

        t0 = time.perf_counter()
        pair = instantiate(cfg.sim)
        paths = write_simulated_pair(pair, out_dir / "inputs")
        print(f"[astroprep] simulated a {pair.science.shape[0]}x{pair.science.shape[1]} two-epoch field "
              f"({time.perf_counter() - t0:.1f} s) -> {out_dir / 'inputs'}")
        inputs, reference_path, truth = [str(paths["science"])], str(paths["reference"]), pair.transients
    try:
        paths = data_mod.resolve_inputs(inputs)
    except OSError as exc:
        raise InputError(str(exc)) from None
    if not paths:
        raise InputError(f"input: no FITS files in {inputs}")
    if any(cfg.get(k) for k in ("bias", "dark", "flat")):  # raw frames: CCD calibration first
        paths, reference_path = _calibrate_inputs(cfg, paths, reference_path, out_dir / "calibrated")
    pipeline: Pipeline = instantiate(cfg.pipeline)
    adapt_quality(pipeline, list(paths) + ([reference_path] if reference_path else []),
                  cfg.get("quality_adapt", "auto"), int(cfg.get("quality_adapt_frames", 16)))
    ref = None
    if cfg.get("needs_reference", True):
        if reference_path is None:
            reference_path = pick_reference(paths)
            print(f"[astroprep] picked the reference: {reference_path}")
        ref = read_reference(reference_path)
        paths = [p for p in paths if Path(p).resolve() != Path(reference_path).resolve()] or paths
    try:
        all_names = data_mod.frame_names(paths)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    products = {k: tuple(v) for k, v in cfg.products.items()} if cfg.get("products") else None
    writer = FrameWriter(out_dir, products=products, reference_header=ref.header if ref is not None else None,
                         asynchronous=_write_mode(cfg.get("async_write", True)),
                         flush_to_disk=bool(cfg.get("flush_outputs", True)))
    dm = data_mod.FitsFrameDataModule(paths, names=all_names, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                                      prefetch_factor=cfg.data.prefetch_factor, pin_memory=cfg.data.pin_memory,
                                      skip=writer.finished if cfg.get("resume", True) else None,
                                      multiprocessing_context=cfg.data.get("multiprocessing_context"))
    module = PreprocessModule(pipeline, reference=ref.data if ref is not None else None,
                              reference_mask=ref.mask if ref is not None else None,
                              reference_header=ref.header if ref is not None else None,
                              compile=bool(cfg.get("compile", False)),
                              compile_options=dict(cfg.get("compile_options") or {}))
    trainer = instantiate(cfg.trainer, callbacks=[writer])
    t0 = time.perf_counter()
    dm.setup("predict")
    n_todo = len(dm.dataset)
    try:
        trainer.predict(module, datamodule=dm, return_predictions=False)
    except OutputDiskFull as exc:  # stop at once: every later frame would fail the same way
        raise OutputDiskFull(f"{exc}; stopped after {sum(r['status'] == 'ok' for r in writer.rows)} frame(s) "
                             f"written of {n_todo}: free space in {out_dir} and rerun (finished frames are skipped)") from None
    trainer.strategy.barrier()  # every rank has written its frames and manifest rows
    wall = time.perf_counter() - t0
    manifest = read_manifest(out_dir)
    names = set(all_names)
    todo = set(dm.dataset.names)
    rows = [r for n, r in manifest.items() if n in todo] if trainer.world_size > 1 else writer.rows
    summary = summarize(rows, wall, n_todo, len(names))
    if truth is not None:
        summary.update(_truth_summary(rows, out_dir, truth))
    if trainer.global_rank != 0:
        return summary
    if cfg.get("quicklook", True) and ref is not None:
        summary["quicklook"] = _quicklook(out_dir, rows, ref)
    summary["world_size"] = trainer.world_size
    job = _hydra_job()
    summary.update(job)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    if job.get("sweep_dir"):  # a multirun: one row per run in <sweep dir>/sweep.jsonl, to compare them
        _append_jsonl(Path(job["sweep_dir"]) / "sweep.jsonl", [dict(summary, output=str(out_dir))])
    print(format_summary(summary, pipeline))
    return summary


def adapt_quality(pipeline: Pipeline, paths: Sequence, mode="auto", max_frames: int = 16) -> Optional[float]:
    """Adapt the graph's quality scorer to the instrument from the night's own frames (up to
    ``max_frames``, evenly spaced; at least 3), see :meth:`QualityScorer.adapt`.

    ``mode``: ``"auto"`` adapts the shipped model (``QualityScorer.pretrained()``) unless it is already
    adapted; ``True`` always; ``False`` never. Returns the new threshold, or None when nothing changed.
    """
    from .io import read_fits
    from .quality import QualityScorer

    stage = pipeline.stages.get("quality")
    scorer = getattr(stage, "module", None)
    if mode in (False, "false", None) or stage is None or not stage.enabled or not isinstance(scorer, QualityScorer):
        return None
    if mode == "auto" and (scorer.baseline is not None or not scorer.scope):
        return None
    picked = [paths[int(i)] for i in torch.linspace(0, len(paths) - 1, min(len(paths), max_frames)).round().long().unique()]
    frames = []
    for p in picked:
        try:
            f = read_fits(p)
            frames.append((f.data, f.mask))
        except Exception as exc:  # an unreadable frame is reported later by the data module
            log.warning("quality adaptation: skipped %s (%s)", p, exc)
    if len(frames) < 3:
        print(f"[astroprep] quality: {len(frames)} frame(s), too few to adapt the thresholds (>= 3); "
              f"the shipped model's threshold stays ({scorer.scope})")
        return None
    t0 = time.perf_counter()
    thr = scorer.adapt([d for d, _ in frames], mask=None)
    print(f"[astroprep] quality: thresholds adapted to this instrument from {len(frames)} frames "
          f"({time.perf_counter() - t0:.1f} s; patch error ratio > {thr:.2f} is bad)")
    return thr


def _calibrate_inputs(cfg, paths, reference_path, folder: Path):
    """Calibrate the raw inputs (and the reference) with the night's bias/dark/flat frames."""
    from .calibrate import calibrate_from_config

    raw = list(paths) + ([Path(reference_path)] if reference_path is not None else [])
    t0 = time.perf_counter()
    out = calibrate_from_config(cfg, inputs=[str(p) for p in raw], output=folder)
    print(f"[astroprep] calibrated {len(out)} raw frame(s) ({time.perf_counter() - t0:.1f} s) -> {folder}")
    return out[: len(paths)], (str(out[-1]) if reference_path is not None else None)


def _hydra_job() -> dict:
    """The command-line overrides of this Hydra run (and, in a multirun, the job number and sweep folder)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        info = {"overrides": list(hc.overrides.task)}
        if hc.mode == RunMode.MULTIRUN:
            info.update(job=int(hc.job.num), sweep_dir=str(hc.sweep.dir))
        return info
    except Exception:  # not run by Hydra (e.g. composed in a script)
        return {}


def summarize(rows: Sequence[dict], wall: float, n_todo: int, n_inputs: int) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    stages: dict[str, list] = {}
    for r in ok:
        for k, v in r.get("timings", {}).items():
            stages.setdefault(k, []).append(v)
    return {
        "inputs": n_inputs, "skipped_finished": n_inputs - n_todo, "processed": len(ok),
        "failed": [{"name": r["name"], "reason": r["reason"]} for r in rows if r["status"] != "ok"],
        "wall_seconds": wall,
        "stage_seconds": {k: sum(v) / len(v) for k, v in stages.items()},
    }


def _truth_summary(rows, out_dir: Path, truth: dict) -> dict:
    from astropy.table import Table

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return {}
    name = ok[0]["name"]
    res = {}
    cand = out_dir / f"{name}.candidates.ecsv"
    if cand.exists():
        t = Table.read(cand, format="ascii.ecsv")
        res["candidates"] = len(t)
        if len(t) and "X_IMAGE" in t.colnames:
            x = torch.as_tensor(t["X_IMAGE"].data - 1.0)
            y = torch.as_tensor(t["Y_IMAGE"].data - 1.0)
            d = torch.cdist(torch.stack([truth["x_ref"].cpu(), truth["y_ref"].cpu()], 1).double(), torch.stack([x, y], 1).double())
            res["transients_injected"] = int(truth["x_ref"].numel())
            res["transients_recovered"] = int((d.min(dim=1).values < 2.0).sum()) if d.numel() else 0
    cat = out_dir / f"{name}.cat.ecsv"
    if cat.exists():
        res["catalog_sources"] = len(Table.read(cat, format="ascii.ecsv"))
    return res


def _quicklook(out_dir: Path, rows, ref) -> Optional[str]:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    name = ok[0]["name"]
    diff = out_dir / f"{name}.diff.fits"
    if not diff.exists():
        return None
    try:
        from . import viz
        from .io import read_fits

        d = read_fits(diff).data
        aligned = out_dir / f"{name}.aligned.fits"
        sci = read_fits(aligned).data if aligned.exists() else read_fits(ok[0]["path"]).data
        png = out_dir / f"{name}.quicklook.png"
        viz.plot_triplet(sci if sci.shape == d.shape else d, ref.data, d, path=png,
                         titles=("science (aligned, background removed)", "reference", "difference"))
        return str(png)
    except Exception as exc:  # a figure must never fail the run
        log.warning("quick-look figure failed: %s", exc)
        return None


def format_summary(summary: dict, pipeline: Optional[Pipeline] = None) -> str:
    lines = ["", "astroprep run summary", "---------------------"]
    lines.append(f"inputs {summary['inputs']}, processed {summary['processed']}, "
                 f"skipped (already finished) {summary['skipped_finished']}, failed {len(summary['failed'])}")
    for f in summary["failed"]:
        lines.append(f"  failed: {f['name']}: {f['reason']}")
    if summary["stage_seconds"]:
        lines.append("per-stage time per batch (s):")
        for k, v in summary["stage_seconds"].items():
            lines.append(f"  {k:<24}{v:8.3f}")
        lines.append(f"  {'total (stages)':<24}{sum(summary['stage_seconds'].values()):8.3f}")
    lines.append(f"wall time {summary['wall_seconds']:.2f} s")
    for k in ("catalog_sources", "candidates", "transients_injected", "transients_recovered", "quicklook"):
        if k in summary:
            lines.append(f"{k.replace('_', ' ')}: {summary[k]}")
    return "\n".join(lines)
