"""Datasets and LightningDataModules for pipeline mode.

* :class:`FitsFrameDataset` / :class:`FitsFrameDataModule` -- FITS frames from paths, globs, folders
  or a list file, read by worker processes (``num_workers``, ``prefetch_factor``, pinned memory) so
  that reading hides behind computation. A file that cannot be read, or holds no usable image (too
  small, every pixel bad, constant), does not stop the run: its item carries ``error`` (the reason)
  and the pipeline records it in the manifest and moves on. Output names are unique per run
  (:func:`frame_names`).

An item is a dict: ``image`` ``(1, H, W)`` float32, ``mask`` ``(1, H, W)`` bool (True = bad),
``header`` (the FITS header as a string, so that it crosses process boundaries cheaply), ``name``
(the file stem, used to name outputs), ``path``, ``error`` (``""`` when the read succeeded and the
image is usable) and ``checked`` (True: the image was checked, see :func:`~astroprep_torch._checks.frame_problem`).
A frame with a per-pixel variance map beside it (``<stem>.var.fits``, as ``astroprep calibrate``
writes for ``<stem>.cal.fits``: :func:`variance_path`) also carries ``variance`` ``(1, H, W)`` (ADU^2).
:func:`collate_frames` stacks same-shape images into ``(B, 1, H, W)`` and keeps the rest as lists.
"""

from __future__ import annotations

import functools
import glob
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

try:  # Lightning is a runtime dependency, but keep the dataset usable without it.
    import lightning as L
    _DataModuleBase = L.LightningDataModule
except Exception:  # pragma: no cover
    _DataModuleBase = object  # type: ignore[assignment,misc]

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz", ".fz")

PathLike = Union[str, os.PathLike]


def resolve_inputs(inputs: Union[PathLike, Sequence[PathLike]]) -> list[Path]:
    """Expand ``inputs`` into a sorted, de-duplicated list of FITS paths.

    Each entry may be a file, a folder (its FITS files, not recursive), a glob pattern, or a text
    file ending in ``.txt`` / ``.lst`` listing one path per line (``#`` starts a comment). A
    missing file or a pattern that matches nothing raises ``FileNotFoundError`` naming it. A folder
    or a pattern expands to its frames only: the calibration products written beside frames (a
    frame's variance map ``<stem>.var.fits``, the masters ``master_<kind>.fits``, see
    :mod:`astroprep_torch.calibrate`) are not frames; a file named on its own is always taken.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[Path] = []
    for entry in inputs:
        s = str(entry)
        p = Path(s).expanduser()
        if p.is_dir():
            out += _frames_only(sorted(q for q in p.iterdir() if q.is_file() and q.name.lower().endswith(FITS_SUFFIXES)))
        elif p.is_file() and p.suffix.lower() in (".txt", ".lst"):
            for line in p.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    q = Path(line).expanduser()
                    out.append(q if q.is_absolute() else p.parent / q)
        elif p.is_file():
            out.append(p)
        elif any(ch in s for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(s)))
            if not matches:
                raise FileNotFoundError(f"inputs: the pattern {s!r} matches no file")
            out += _frames_only([m for m in matches if m.is_file()])
        else:
            raise FileNotFoundError(f"inputs: {s!r} is neither a file, a folder, a list file nor a glob pattern that matches")
    seen, unique = set(), []
    for q in out:
        key = str(q.resolve())
        if key not in seen:
            seen.add(key)
            unique.append(q)
    return unique


def _frames_only(paths: list[Path]) -> list[Path]:
    """``paths`` less the calibration products among them: variance maps of frames in ``paths`` and
    masters written by :mod:`astroprep_torch.calibrate` (``IMAGETYP`` "master ...")."""
    claimed = {variance_path(q) for q in paths} - {None}
    return [q for q in paths if q not in claimed and not _is_master(q)]


def _is_master(path: Path) -> bool:
    if not (path.name.startswith("master_") and path.name.endswith(".fits")):
        return False
    from astropy.io import fits

    try:
        return str(fits.getval(path, "IMAGETYP", ext=0)).lower().startswith("master")
    except (OSError, KeyError):
        return False


def frame_name(path: PathLike) -> str:
    """The output stem of a frame: its file name without the FITS suffix(es)."""
    name = Path(path).name
    for suf in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def frame_names(paths: Sequence[PathLike]) -> list[str]:
    """Output stems for the frames of one run, unique within the run.

    A frame keeps its plain :func:`frame_name` (``a`` for ``night1/a.fits``) when no other input has
    the same one. Frames whose plain names collide are named by their path relative to the folder
    the colliding inputs share, with ``__`` for each ``/`` (``collide/a.fits`` and
    ``collide2/a.fits`` become ``collide__a`` and ``collide2__a``), so that no frame's products
    overwrite another's. Inputs that still collide (``a.fits`` beside ``a.fits.gz``: one frame in two
    files?) are refused with a ``ValueError`` naming them: rename one or run them separately.
    """
    paths = [Path(p) for p in paths]
    plain = [frame_name(p) for p in paths]
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(plain):
        groups.setdefault(n, []).append(i)
    names = list(plain)
    for n, members in groups.items():
        if len(members) < 2:
            continue
        dirs = [paths[i].resolve().parent for i in members]
        root = Path(os.path.commonpath([str(d) for d in dirs]))
        for i, d in zip(members, dirs):
            names[i] = "__".join(d.relative_to(root).parts + (n,))
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise ValueError(f"inputs: {paths[seen[n]]} and {paths[i]} would both be frame {n!r} (their products "
                             "would overwrite each other); rename one of them or process them in separate runs")
        seen[n] = i
    return names


VARIANCE_SUFFIX = ".var.fits"


def variance_path(path: PathLike) -> Optional[Path]:
    """The per-pixel variance map beside a frame, or None: ``<stem>.var.fits`` where ``<stem>`` is
    the name before ``.fits`` (or ``.fit``/``.fts``), less a trailing ``.cal`` (calibrated frames are
    ``<raw>.cal.fits`` beside ``<raw>.var.fits``: :func:`~astroprep_torch.calibrate.calibrate_files`).
    A variance map itself has none."""
    path = Path(path)
    name = path.name
    if name.endswith(VARIANCE_SUFFIX):
        return None
    stem = next((name[: name.index(s)] for s in (".fits", ".fit", ".fts") if s in name), path.stem)
    for s in (stem, stem[:-4] if stem.endswith(".cal") else None):
        if s and (path.parent / f"{s}{VARIANCE_SUFFIX}").is_file():
            return path.parent / f"{s}{VARIANCE_SUFFIX}"
    return None


def read_variance(path: PathLike, shape: Sequence[int]) -> Optional[torch.Tensor]:
    """The variance map beside the frame ``path`` (:func:`variance_path`) as ``(1, 1, H, W)`` float32,
    or None when there is none. Its non-finite or negative pixels become NaN (no per-pixel value
    there: the graph uses its model). Raises ``ValueError`` naming the file when its shape is not the
    frame's ``shape`` (``(..., H, W)``)."""
    from .io import read_fits

    vp = variance_path(path)
    if vp is None:
        return None
    var = read_fits(vp).data
    if tuple(var.shape[-2:]) != tuple(shape[-2:]):
        raise ValueError(f"variance map {vp}: shape {tuple(var.shape[-2:])}, expected the frame's {tuple(shape[-2:])}")
    return var.masked_fill(~(var >= 0) | ~torch.isfinite(var), float("nan"))


class FitsFrameDataset(Dataset):
    """Map-style dataset of FITS frames (see the module docstring for the item layout).

    Args:
        paths: FITS paths (use :func:`resolve_inputs` for globs, folders and list files).
        hdu: HDU index or name; ``None`` picks the first image HDU.
        skip: optional callable ``name -> bool``; frames for which it is True are left out
            (pipeline mode uses it to resume: finished frames are skipped).
        names: the frames' output names; default :func:`frame_names` of ``paths`` (unique per run).
    """

    def __init__(self, paths: Sequence[PathLike], hdu=None, skip: Optional[Callable[[str], bool]] = None,
                 names: Optional[Sequence[str]] = None):
        paths = [Path(p) for p in paths]
        names = frame_names(paths) if names is None else list(names)
        if len(names) != len(paths):
            raise ValueError(f"names: {len(names)} names for {len(paths)} paths")
        keep = [i for i, n in enumerate(names) if skip is None or not skip(n)]
        self.paths = [paths[i] for i in keep]
        self.names = [names[i] for i in keep]
        self.hdu = hdu

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        from ._checks import frame_problem
        from .io import read_fits

        path = self.paths[index]
        item = {"name": self.names[index], "path": str(path), "error": "", "header": "", "checked": True}
        try:
            f = read_fits(path, hdu=self.hdu)
            item["image"] = f.data[0]
            item["mask"] = f.mask[0]
            item["header"] = f.header.tostring()
            item["error"] = frame_problem(f.data, f.mask)  # too small, empty: said here, in the reader
            var = read_variance(path, f.data.shape)
            if var is not None:
                item["variance"] = var[0]
        except Exception as exc:  # a bad file is reported, never fatal
            item["error"] = f"{type(exc).__name__}: {exc}"
            item["image"] = torch.zeros(1, 1, 1)
            item["mask"] = torch.ones(1, 1, 1, dtype=torch.bool)
        return item


def collate_frames(items: list[dict]) -> dict:
    """Stack frames of one shape into ``(B, 1, H, W)``; other fields become lists.

    Frames whose read failed (``error`` set) keep a placeholder. Frames of different shapes cannot
    share a batch: the most common shape (the larger one on a tie) is stacked, and each frame of
    another shape is reported as failed with the reason (run it with ``data.batch_size=1``), like
    any bad frame, so one odd file never stops a batched run.
    """
    items = [dict(it) for it in items]
    variances = [it.pop("variance", None) for it in items]
    shapes = [tuple(it["image"].shape) for it in items if not it["error"]]
    if shapes:
        shape = max(dict.fromkeys(shapes), key=lambda s: (shapes.count(s), s[-1] * s[-2]))
        for it in items:
            if not it["error"] and tuple(it["image"].shape) != shape:
                it["error"] = (f"image shape {tuple(it['image'].shape[-2:])} differs from "
                               f"{shape[-2:]} of the other frames of its batch, which stacks same-shape "
                               "frames only: process it with data.batch_size=1")
    else:
        shape = tuple(items[0]["image"].shape)
    batch: dict = {k: [it[k] for it in items] for k in items[0] if k not in ("image", "mask")}
    batch["image"] = torch.stack([torch.zeros(shape) if it["error"] else it["image"] for it in items])
    batch["mask"] = torch.stack([torch.ones(shape, dtype=torch.bool) if it["error"] else it["mask"] for it in items])
    if any(v is not None for v in variances):  # frames without a map (or failed): NaN, the graph's model
        batch["variance"] = torch.stack([torch.full(shape, float("nan")) if v is None or it["error"] else v
                                         for v, it in zip(variances, items)])
    return batch


class FitsFrameDataModule(_DataModuleBase):
    """LightningDataModule over FITS frames for ``Trainer.predict`` (pipeline mode).

    Args:
        inputs: a path, folder, glob, list file, or a sequence of them (:func:`resolve_inputs`).
        batch_size: frames per batch (same-shape frames only when > 1).
        num_workers: reader processes; with ``>= 1`` reading overlaps computation.
        prefetch_factor: batches read ahead per worker.
        pin_memory: pin host memory (useful with a GPU; ignored when CUDA is not available, where
            it would only cost a copy).
        hdu: HDU to read (default: the first image HDU).
        skip: callable ``name -> bool`` marking finished frames (resume).
        multiprocessing_context: how reader processes start: ``None`` (torch's default: ``fork`` on
            Linux), ``"fork"``, ``"spawn"`` or ``"forkserver"``. ``"forkserver"`` forks them from a
            small server process started once per process, with torch and the FITS reader already
            imported: a fork of the computing process would make its whole heap copy-on-write,
            and it would then copy every page it writes again (for a few frames after each
            ``Trainer.predict`` starts). Like ``spawn``, it needs the ``if __name__ == "__main__":``
            guard in scripts.
        names: the frames' output names, one per resolved input (default :func:`frame_names`).

    Reader processes die with the process that started them (a parent-death signal), so a killed
    run leaves none behind.
    """

    def __init__(self, inputs=(), batch_size: int = 1, num_workers: int = 0, prefetch_factor: int = 2,
                 pin_memory: bool = False, hdu=None, skip: Optional[Callable[[str], bool]] = None,
                 multiprocessing_context: Optional[str] = None, names: Optional[Sequence[str]] = None):
        super().__init__()
        self.inputs = inputs
        self.names = names
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.prefetch_factor = int(prefetch_factor)
        self.pin_memory = bool(pin_memory)
        self.hdu = hdu
        self.skip = skip
        if multiprocessing_context not in (None, "fork", "spawn", "forkserver"):
            raise ValueError("multiprocessing_context must be None, 'fork', 'spawn' or 'forkserver', "
                             f"got {multiprocessing_context!r}")
        self.multiprocessing_context = multiprocessing_context
        self.dataset: Optional[FitsFrameDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.dataset is None:
            self.dataset = FitsFrameDataset(resolve_inputs(self.inputs), hdu=self.hdu, skip=self.skip, names=self.names)

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        kw = dict(batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                  collate_fn=collate_frames, pin_memory=self.pin_memory and torch.cuda.is_available())
        if self.num_workers > 0:
            from ._orphans import reader_init, resource_tracker_in_own_session

            resource_tracker_in_own_session()
            kw.update(prefetch_factor=self.prefetch_factor, persistent_workers=False,
                      worker_init_fn=functools.partial(reader_init, os.getpid()))
            if self.multiprocessing_context is not None:
                kw["multiprocessing_context"] = _worker_context(self.multiprocessing_context)
        return DataLoader(self.dataset, **kw)

    test_dataloader = predict_dataloader


def _worker_context(method: str):
    """The multiprocessing context of the reader processes; a fork server (started on first use,
    once per process) gets torch and the FITS reader imported first, so each reader forks ready."""
    import multiprocessing as mp

    ctx = mp.get_context(method)
    if method == "forkserver":
        from ._orphans import FORKSERVER_PARENT

        # astroprep_torch._orphans first: the fork server dies with this process (see that module),
        # also when this process dies before the fork server has asked (it checks the pid set here)
        os.environ[FORKSERVER_PARENT] = str(os.getpid())
        ctx.set_forkserver_preload(["astroprep_torch._orphans", "torch", "astropy.io.fits", "astroprep_torch.data",
                                    "astroprep_torch.io"])
    return ctx


__all__ = ["FitsFrameDataModule", "FitsFrameDataset", "collate_frames", "frame_name", "frame_names", "read_variance",
           "resolve_inputs", "variance_path"]
