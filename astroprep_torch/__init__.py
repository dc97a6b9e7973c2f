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

__version__ = "0.1.0"

_SUBMODULES = (
    "io", "wcs", "sim", "quality", "background", "align", "subtract", "detect", "photometry",
    "stretch", "cutouts", "classify", "pipeline", "data", "viz", "cli",
)

__all__ = list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
