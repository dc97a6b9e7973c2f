"""Compiling a graph: each stage's module behind ``torch.compile`` (eager again when that fails), the
alignment through its fused kernels, the glue modules and data-dependent stages left eager."""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from .alignment import AlignToReference
from .glue import MaskUnion, SourceVariance, Square, SquareRoot, SubtractMap
from .graph import Pipeline

log = logging.getLogger("astroprep_torch.pipeline")

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
