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

The package, by responsibility: :mod:`.graph` (``Stage``, ``Pipeline``), :mod:`.glue` (the small
modules between stages), :mod:`.alignment` (``AlignToReference``), :mod:`.compiled`
(``compile_graph``), :mod:`.predict` (``PreprocessModule``), :mod:`.writer` (``FrameWriter``),
:mod:`.writer_process` and :mod:`.transfer` (the writer process and its shared-memory inputs),
:mod:`.products` (product files), :mod:`.manifest` (the manifest), :mod:`.run` (``run_from_config``
and its summary), :mod:`.astrometry_step` (frames' WCS solved before alignment). Every name is importable from ``astroprep_torch.pipeline``.
"""

from .alignment import AlignedFrames, AlignToReference
from .astrometry_step import astrometry_requested, solve_inputs
from .compiled import _GLUE as _GLUE
from .compiled import CompiledStageModule, compile_graph
from .compiled import _short_reason as _short_reason
from .glue import _SAME_SIZE_INT as _SAME_SIZE_INT
from .glue import CandidateTriplets, CorrelatedNoise, MaskUnion, SharedReference, SourceVariance, Square, SquareRoot, SubtractMap
from .glue import _bits as _bits
from .graph import Pipeline, PipelineError, Reads, Stage, Writes
from .graph import _sync as _sync
from .manifest import OutputDiskFull, read_manifest
from .manifest import _append_jsonl as _append_jsonl
from .manifest import _disk_full as _disk_full
from .manifest import _drop_partial_line as _drop_partial_line
from .predict import PreprocessModule, footprints_overlap
from .predict import _LightningModule as _LightningModule
from .predict import _try_wcs as _try_wcs
from .predict import log as log
from .products import _ECSV_FORMATS as _ECSV_FORMATS
from .products import DEFAULT_PRODUCTS, write_ecsv
from .products import _atomic as _atomic
from .products import _compact as _compact
from .products import _image_header as _image_header
from .products import _per_frame as _per_frame
from .run import RunInputs, adapt_quality, format_summary, pick_reference, read_reference, run_from_config, summarize
from .run import _calibrate_inputs as _calibrate_inputs
from .run import _hydra_job as _hydra_job
from .run import _quicklook as _quicklook
from .run import _truth_summary as _truth_summary
from .transfer import _SLOT_MIN_BYTES as _SLOT_MIN_BYTES
from .transfer import _by_value as _by_value
from .transfer import _portable as _portable
from .transfer import _SharedSlots as _SharedSlots
from .transfer import _unportable as _unportable
from .writer import BasePredictionWriter as BasePredictionWriter
from .writer import FrameWriter
from .writer import _write_mode as _write_mode
from .writer_process import _writer_process as _writer_process
from .writer_process import _writer_service as _writer_service
from .writer_process import _WriterProcessError as _WriterProcessError
from .writer_process import _WriterService as _WriterService

__all__ = [
    "Stage", "Pipeline", "PipelineError", "Reads", "Writes",
    "MaskUnion", "SubtractMap", "Square", "SquareRoot", "SourceVariance", "SharedReference", "CandidateTriplets", "CorrelatedNoise",
    "AlignedFrames", "AlignToReference", "CompiledStageModule", "compile_graph",
    "PreprocessModule", "footprints_overlap", "DEFAULT_PRODUCTS", "write_ecsv", "FrameWriter", "OutputDiskFull",
    "read_manifest", "RunInputs", "run_from_config", "pick_reference", "read_reference", "adapt_quality",
    "summarize", "format_summary", "astrometry_requested", "solve_inputs",
]
