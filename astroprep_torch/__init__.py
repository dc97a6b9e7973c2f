"""astroprep_torch: PyTorch-native, differentiable preprocessing for astronomical images.

Every stage is an ``nn.Module`` working on batched tensors ``(B, C, H, W)`` on CPU or GPU:

==============  ==========================================================
module          what it does
==============  ==========================================================
``io``          FITS <-> tensors (astropy underneath)
``wcs``         ``TanWCS``: batched TAN (+SIP / TPV) pixel <-> sky
``sim``         seeded star-field simulator with truth catalogs
``quality``     autoencoder image-quality scorer
``background``  ``Background2D``: tiles, sigma clipping, mesh filter, spline
``align``       ``Reproject`` (WCS + grid_sample), star matching, refinement
``subtract``    ``ImageSubtraction``: Alard-Lupton / HOTPANTS kernel fit
``detect``      ``SourceExtractor``: filter, threshold, deblend, clean, measure
``photometry``  apertures, Kron/AUTO, windowed centroids
``stretch``     zscale, intervals, stretches, histogram equalisation
``cutouts``     stamps / triplets, ZTF alert reading
``classify``    braai port, torchvision backbones, ``AlertClassifier``
``pipeline``    Hydra-configured graph of stages, Lightning predict
``astrometry``  WCS solutions (TAN-SIP / TPV) against a reference catalog
``stack``       co-adds onto one grid (mean, weighted, median, clipped)
``moving``      linking a night's detections into tracklets (rate, PA)
``reports``     MPC 80-column and ADES PSV writers and readers
``obstime``     mid-exposure UTC times from FITS headers
``sequences``   per-object stamp sequences, GIFs, CERES cutouts
``night``       ``astroprep night``: a night of frames to moving objects
``viz``         quick-look figures
==============  ==========================================================

Conventions: pixel coordinates are 0-based, ``x`` = column, ``y`` = row; FITS' 1-based
convention is converted only at the FITS/WCS boundary. Masks are ``bool`` with ``True`` = bad.
Images are float32 unless asked otherwise.

Submodules are imported lazily, so ``import astroprep_torch as ap`` is cheap and
``ap.background.Background2D`` works without importing every stage.
"""

from __future__ import annotations

import importlib
import os

# Large CPU tensors on transparent huge pages (PyTorch's documented switch, read once, before the
# first allocation; numpy does the same by default): touching a fresh multi-MB tensor otherwise
# costs one page fault per 4 kB, more than a pass of arithmetic over it (measured in
# experiments/results/runtime.md). Has no effect when torch allocated before this import; an explicit
# THP_MEM_ALLOC_ENABLE in the environment wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _set_openmp_wait_policy() -> None:
    """OpenMP's idle workers sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless the
    environment says otherwise. Spinning workers take the core of a thread that is still working
    when another process holds a core: stages then ran 3-10x slower on a shared machine
    (``experiments/busy_machine.py``). The OpenMP runtime reads the variable when torch loads:
    imported after torch, this can only warn."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    import sys

    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules:
        import warnings

        warnings.warn("astroprep_torch was imported after torch: OpenMP's wait policy stays ACTIVE (spinning); "
                      "import astroprep_torch first or export OMP_WAIT_POLICY=PASSIVE (slow stages on a busy machine "
                      "otherwise)", RuntimeWarning, stacklevel=3)


_set_openmp_wait_policy()

__version__ = "0.1.0"

_SUBMODULES = (
    "io", "wcs", "sim", "calibrate", "quality", "background", "align", "subtract", "detect", "photometry",
    "stretch", "cutouts", "classify", "pipeline", "data", "viz", "cli", "astrometry", "stack",
    "moving", "reports", "obstime", "sequences", "night",
)

__all__ = list(_SUBMODULES) + ["__version__", "retain_freed_memory"]


def __getattr__(name: str):
    if name == "retain_freed_memory":  # see astroprep_torch._runtime.retain_freed_memory
        from ._runtime import retain_freed_memory

        return retain_freed_memory
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
