"""Product files of a run: what each batch key becomes (:data:`DEFAULT_PRODUCTS`), a frame's part of
a batched value, fast exact ECSV catalogs, FITS headers for images, and atomic writes (a product
is whole under its name, or absent)."""

from __future__ import annotations

import io as _io
import os
from pathlib import Path

import numpy as np
from torch import Tensor

from ..io import flush_to_disk, temporary_path

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


def _compact(t: Tensor) -> Tensor:
    """``t`` on the CPU with a storage of its own size: ``torch.save`` writes a view's whole storage
    (every frame of a batch), so a view into a larger storage is copied first."""
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


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
    tmp = temporary_path(path, path.suffix)  # the writer overwrites the empty file
    try:
        write(tmp)
        if flush:
            flush_to_disk(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
