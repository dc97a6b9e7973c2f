"""Pipeline mode with Lightning: :class:`PreprocessModule` runs a graph in ``Trainer.predict`` over
batches of FITS frames (their masks, WCS and saturation levels from the headers), and reports the
frames it cannot process instead of failing."""

from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
from astropy.io import fits
from torch import Tensor

from .._checks import frame_problem
from ..calibrate import header_saturation
from ..wcs import TanWCS
from .compiled import compile_graph
from .graph import Pipeline

log = logging.getLogger("astroprep_torch.pipeline")

try:
    import lightning as L

    _LightningModule = L.LightningModule
except Exception:  # pragma: no cover
    _LightningModule = nn.Module  # type: ignore[assignment,misc]

class PreprocessModule(_LightningModule):
    """Runs a :class:`Pipeline` in ``Trainer.predict`` over batches from ``FitsFrameDataModule``.

    Args:
        pipeline: the graph.
        reference: optional ``(1, 1, H, W)`` reference frame (repeated over each batch).
        reference_mask: its bool mask; ``reference_header``: its FITS header (for its WCS).
        reference_variance: optional ``(1, 1, H', W')`` per-pixel variance of the reference (ADU^2;
            NaN where unknown), e.g. its calibrated ``.var.fits``: the graph's ``reference_pixel_variance``.
        compile: compile the per-frame graph: every stage's module goes through ``torch.compile``
            (static shapes), except the glue modules and stages marked ``compile=False`` (detection:
            data-dependent shapes); the alignment uses its fused compiled resampling kernels
            (``align.reproject(fused=True)``). A stage that fails to compile runs eager, with a
            warning. The first frame pays the compilation.
        compile_options: keyword arguments for ``torch.compile`` (e.g. ``{"backend": "eager"}``).

    ``predict_step`` returns ``{"names", "paths", "outputs", "failed", "timings"}``; frames whose
    file could not be read, or whose batch failed in a stage, are listed in ``failed`` with the
    reason and the run goes on.
    """

    def __init__(self, pipeline: Pipeline, reference: Optional[Tensor] = None, reference_mask: Optional[Tensor] = None,
                 reference_header=None, compile: bool = False, compile_options: Optional[Mapping] = None,
                 reference_variance: Optional[Tensor] = None):
        super().__init__()
        self.pipeline = pipeline
        self.reference = reference
        self.reference_mask = reference_mask
        self.reference_header = reference_header
        self.reference_variance = reference_variance
        self.compiled = bool(compile)
        if compile:
            compile_graph(self.pipeline, **dict(compile_options or {}))

    def forward(self, batch: dict) -> dict:
        return self.pipeline(batch)

    def make_inputs(self, images: Tensor, masks: Tensor, headers: Sequence[str],
                    variances: Optional[Tensor] = None) -> dict:
        """The graph's batch keys; ``variances``: the frames' per-pixel variance maps (``(B, 1, H, W)``,
        NaN where unknown), given as ``science_pixel_variance`` (and the reference's, when set, as
        ``reference_pixel_variance``); without them the graph models the variance."""
        b = images.shape[0]
        inputs = {"science": images, "science_mask": masks}
        if variances is not None:
            inputs["science_pixel_variance"] = variances.to(images.device, images.dtype)
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
            if self.reference_variance is not None:
                inputs["reference_pixel_variance"] = self.reference_variance.to(images.device, images.dtype).expand(b, -1, -1, -1)
        return inputs

    def unusable(self, image: Tensor, mask: Tensor, header: str, checked: bool = False) -> str:
        """Why one frame ``(1, 1, H, W)`` cannot be processed ("" when it can): too small, empty
        (unless ``checked``: the reader did that), or (when both have a WCS) outside the reference's
        footprint."""
        problem = "" if checked else frame_problem(image, mask)
        if problem or self.reference is None or self.reference_header is None:
            return problem
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
            var = batch.get("variance")
            inputs = self.make_inputs(batch["image"].index_select(0, idx), batch["mask"].index_select(0, idx),
                                      [batch["header"][i] for i in good],
                                      var.index_select(0, idx.to(var.device)) if var is not None else None)
            with torch.no_grad():
                result["outputs"] = self.pipeline(inputs)
            result["timings"] = dict(self.pipeline.timings)
        except Exception as exc:  # the whole batch failed in a stage: report, go on
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("batch %d failed: %s", batch_idx, reason)
            result["failed"] += [(names[i], paths[i], reason) for i in good]
            result["names"], result["paths"], result["outputs"] = [], [], {}
        return result


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
        return TanWCS.from_header(list(headers)).to(device=like.device)
    except Exception:
        return None
