"""The detection catalog: :class:`Catalog` (flat per-source columns + segmentation), the lazily dense
segmentation map, SExtractor's column names and :func:`rows_of_image`."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

# our column -> (SExtractor column, add 1 for FITS 1-based pixel convention)
SEXTRACTOR_COLUMNS = {
    "number": ("NUMBER", False),
    "batch_index": ("BATCH_INDEX", False),
    "x": ("X_IMAGE", True),
    "y": ("Y_IMAGE", True),
    "xwin": ("XWIN_IMAGE", True),
    "ywin": ("YWIN_IMAGE", True),
    "xpeak": ("XPEAK_IMAGE", True),
    "ypeak": ("YPEAK_IMAGE", True),
    "xmin": ("XMIN_IMAGE", True),
    "xmax": ("XMAX_IMAGE", True),
    "ymin": ("YMIN_IMAGE", True),
    "ymax": ("YMAX_IMAGE", True),
    "x2": ("X2_IMAGE", False),
    "y2": ("Y2_IMAGE", False),
    "xy": ("XY_IMAGE", False),
    "errx2": ("ERRX2_IMAGE", False),
    "erry2": ("ERRY2_IMAGE", False),
    "errxy": ("ERRXY_IMAGE", False),
    "a": ("A_IMAGE", False),
    "b": ("B_IMAGE", False),
    "theta": ("THETA_IMAGE", False),
    "cxx": ("CXX_IMAGE", False),
    "cyy": ("CYY_IMAGE", False),
    "cxy": ("CXY_IMAGE", False),
    "npix": ("ISOAREA_IMAGE", False),
    "peak": ("FLUX_MAX", False),
    "flux_iso": ("FLUX_ISO", False),
    "fluxerr_iso": ("FLUXERR_ISO", False),
    "flux_aper": ("FLUX_APER", False),
    "fluxerr_aper": ("FLUXERR_APER", False),
    "kron_radius": ("KRON_RADIUS", False),
    "flux_auto": ("FLUX_AUTO", False),
    "fluxerr_auto": ("FLUXERR_AUTO", False),
    "flux_radius": ("FLUX_RADIUS", False),
    "thresh": ("THRESHOLD", False),
    "flags": ("FLAGS", False),
}


class _LazySegmentation:
    """A segmentation map kept as its labelled pixels (sorted flat indices over (B, H, W) and their
    labels) and made into the dense (B,1,H,W) int64 map only when asked for: at 4096^2 the dense map
    is 128 MB of int64 that catalogues alone never need."""

    def __init__(self, pixels: Tensor, labels: Tensor, shape):
        self.pixels, self.labels, self.shape = pixels, labels, tuple(shape)
        self._dense = None

    def dense(self) -> Tensor:
        if self._dense is None:
            seg = torch.zeros(math.prod(self.shape), dtype=torch.int64, device=self.pixels.device)
            seg.index_put_((self.pixels,), self.labels)
            self._dense = seg.view(self.shape)
        return self._dense


def rows_of_image(batch_index: Tensor, index: int):
    """The rows whose ``batch_index`` equals ``index``, as an indexer for dimension 0.

    A ``slice`` when those rows are contiguous (the usual case: catalogs are written image by image,
    and a batch of one holds only rows of image 0), so that indexing gives views instead of
    copies; otherwise the boolean row mask.
    """
    hit = batch_index.reshape(-1) == index
    n = int(hit.sum())
    if n == hit.numel():
        return slice(None)
    if n == 0:
        return slice(0, 0)
    first = int(hit.to(torch.uint8).argmax())
    if bool(hit[first:first + n].all()):
        return slice(first, first + n)
    return hit


class Catalog:
    """Sources of a batch of images as flat 1-D tensors (one row per source) plus the segmentation.

    ``columns`` maps names to tensors whose first axis is the source axis (``flux_aper`` is
    (N, n_apertures)); ``batch_index`` (N,) int64 says which image a row belongs to and ``label``
    (N,) its value in ``segmentation`` (B,1,H,W) int64 (1..n per image, 0 = sky). Rows are ordered
    by (batch_index, label). Pixel coordinates are 0-based (x = column, y = row); only
    :meth:`to_table` switches to SExtractor's 1-based ``X_IMAGE`` etc. Columns are reachable as
    attributes (``cat.x``) or items (``cat["x"]``). ``SourceExtractor`` keeps the segmentation as
    its labelled pixels and makes the dense map on first access of ``segmentation``.
    """

    def __init__(self, columns: dict, segmentation):
        if "batch_index" not in columns:
            raise ValueError("columns must hold 'batch_index'")
        n = columns["batch_index"].shape[0]
        for k, v in columns.items():
            if v.shape[0] != n:
                raise ValueError(f"column {k!r} has {v.shape[0]} rows, batch_index has {n}")
        self.columns = dict(columns)
        self._segmentation = segmentation

    @property
    def segmentation(self) -> Tensor:
        """(B,1,H,W) int64 labels (1..n per image, 0 = sky)."""
        seg = self._segmentation
        return seg.dense() if isinstance(seg, _LazySegmentation) else seg

    @segmentation.setter
    def segmentation(self, value) -> None:
        self._segmentation = value

    def __len__(self) -> int:
        return int(self.columns["batch_index"].shape[0])

    def __getattr__(self, name):
        cols = self.__dict__.get("columns")
        if cols is not None and name in cols:
            return cols[name]
        raise AttributeError(name)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key]
        return Catalog({k: v[key] for k, v in self.columns.items()}, self._segmentation)

    def __contains__(self, name) -> bool:
        return name in self.columns

    def keys(self):
        return self.columns.keys()

    def __repr__(self) -> str:
        return f"Catalog({len(self)} sources, columns={list(self.columns)})"

    def to(self, *args, **kwargs) -> "Catalog":
        return Catalog({k: v.to(*args, **kwargs) for k, v in self.columns.items()}, self.segmentation.to(*args, **kwargs))

    def select(self, batch_index: int) -> "Catalog":
        """Rows of one image (views, not copies, when its rows are contiguous, as detection writes them)."""
        return self[rows_of_image(self.columns["batch_index"], batch_index)]

    def to_table(self, batch_index: Optional[int] = None):
        """An astropy ``Table`` with SExtractor column names (``X_IMAGE`` etc. 1-based, as SExtractor writes them).

        Columns without a SExtractor name keep their own (upper-cased) name. Writable as ECSV or
        FITS binary table. ``batch_index`` selects one image.
        """
        from astropy.table import Table

        cat = self if batch_index is None else self.select(batch_index)
        t = Table()
        for k, v in cat.columns.items():
            name, one_based = SEXTRACTOR_COLUMNS.get(k, (k.upper(), False))
            a = v.detach().cpu()
            if a.dtype == torch.bool:
                a = a.to(torch.uint8)
            a = a.numpy()
            if one_based:
                a = a + 1
            if a.ndim == 2 and a.shape[1] == 1:
                a = a[:, 0]
            t[name] = a
        return t

    def write(self, path, overwrite: bool = False, **kwargs) -> None:
        """Write :meth:`to_table` (format from the extension: ``.ecsv``, ``.fits``...)."""
        self.to_table().write(str(path), overwrite=overwrite, **kwargs)
