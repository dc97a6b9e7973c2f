"""Load a run's products into the web database: ``astroprep ingest run=<dir> night=<name> db=<url>``.

A run is the output folder of ``astroprep night`` (``night.json``, ``tracklets.ecsv``,
``sequences/``, ``cutouts/``, per-frame products; see the night contract) or of ``astroprep run``
(``manifest.rank*.jsonl`` + ``<frame>.candidates.ecsv`` + ``<frame>.triplets.pt``). It becomes one
*field* of the night. Everything is read and checked first; thumbnail panels are written under
``<run>/web/`` (one uint8 array per frame / object; the database keeps ``<file>#<row>``); then all rows are inserted in ONE transaction, so
a broken run is reported and nothing of it is loaded. The run is keyed on its resolved path and a
SHA-256 of the files read: ingesting the same run again adds nothing.

Candidate scores: a ``score`` / ``drb`` / ``rb`` column of the candidates table when present, else
the classifier given by ``classifier`` (a braai folder / ``.h5``, or a TorchScript ``.pt`` mapping raw
triplets to probabilities) over the triplets, else null. An object's score is the mean score of the
candidates lying within 2 px of its detections (same frame), null when none does.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from sqlalchemy import insert, select
from sqlalchemy.exc import SQLAlchemyError

from .images import side_by_side, to_uint8, write_panels
from .models import Candidate, Detection, Field, Frame, MovingObject, Night, Run

TRACKLET_COLUMNS = ("trksub", "tracklet", "frame", "exposure", "mjd", "ra", "dec", "x", "y", "mag", "mag_err",
                    "snr", "e", "fwhm", "theta", "rate", "pa", "rms", "obs80")
SCORE_COLUMNS = ("score", "SCORE", "drb", "rb", "RB")
WEB_DIR = "web"


class IngestError(ValueError):
    """A run folder that cannot be ingested (the message names the file and what was expected)."""


@dataclass
class FrameCandidates:
    frame: str
    number: np.ndarray
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    snr: np.ndarray
    score: np.ndarray  # NaN = none
    ra: np.ndarray
    dec: np.ndarray
    triplets: Optional[torch.Tensor]
    triplets_file: str


@dataclass
class RunProducts:
    root: Path
    kind: str
    meta: dict
    frames: list[dict]
    candidates: list[FrameCandidates] = field(default_factory=list)
    tracklets: Optional[dict] = None  # column -> numpy array
    files: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise IngestError(f"{path}: not readable JSON ({err})") from err


def _read_manifest(root: Path) -> list[dict]:
    rows = {}
    for mf in sorted(root.glob("manifest.rank*.jsonl")):
        for i, line in enumerate(mf.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as err:
                raise IngestError(f"{mf} line {i + 1}: not JSON ({err})") from err
            name = r.get("name") or r.get("frame")
            if not name:
                raise IngestError(f"{mf} line {i + 1}: no 'name'/'frame' key")
            rows[name] = {"name": name, "path": r.get("path") or r.get("input") or "", "mjd": r.get("mjd"),
                          "exptime": r.get("exptime"), "status": r.get("status", "ok"), "reason": r.get("reason") or None}
    return list(rows.values())


def _night_frames(root: Path, meta: dict) -> list[dict]:
    frames = meta.get("frames")
    if not isinstance(frames, list):
        raise IngestError(f"{root / 'night.json'}: 'frames' must be a list of frame objects")
    out = []
    for i, f in enumerate(frames):
        if not isinstance(f, dict) or not f.get("name"):
            raise IngestError(f"{root / 'night.json'}: frames[{i}] must be an object with a 'name'")
        out.append({"name": str(f["name"]), "path": str(f.get("path") or ""), "mjd": f.get("mjd"),
                    "exptime": f.get("exptime"), "status": f.get("status", "ok"), "reason": f.get("reason"),
                    "kind": f.get("kind", "science")})
    return out


def _read_table(path: Path):
    from astropy.table import Table

    try:
        return Table.read(path, format="ascii.ecsv")
    except Exception as err:  # astropy raises many kinds on a broken file
        raise IngestError(f"{path}: not a readable ECSV table ({type(err).__name__}: {err})") from err


def _wcs_radec(root: Path, frame: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RA/Dec of 0-based pixels from the WCS of ``<frame>.diff.fits`` (NaN without one)."""
    nan = np.full(len(x), np.nan)
    path = root / f"{frame}.diff.fits"
    if not path.is_file() or len(x) == 0:
        return nan, nan
    from astropy.io import fits
    from astropy.wcs import WCS

    try:
        w = WCS(fits.getheader(path))
        if not w.has_celestial:
            return nan, nan
        ra, dec = w.celestial.all_pix2world(x, y, 0)
        return np.asarray(ra, float), np.asarray(dec, float)
    except Exception:  # a header without a usable WCS: positions stay unknown, not wrong
        return nan, nan


def _read_candidates(root: Path, frame: str) -> Optional[FrameCandidates]:
    path = root / f"{frame}.candidates.ecsv"
    if not path.is_file():
        return None
    t = _read_table(path)
    need = ("X_IMAGE", "Y_IMAGE")
    missing = [c for c in need if c not in t.colnames]
    if missing:
        raise IngestError(f"{path}: missing columns {missing}")
    n = len(t)
    col = lambda name: np.asarray(t[name], float) if name in t.colnames else np.full(n, np.nan)  # noqa: E731
    x, y = col("X_IMAGE") - 1.0, col("Y_IMAGE") - 1.0  # SExtractor 1-based -> 0-based
    flux, ferr = col("FLUX_AUTO"), col("FLUXERR_AUTO")
    snr = np.where(ferr > 0, flux / np.where(ferr > 0, ferr, 1.0), np.nan)
    score = next((col(c) for c in SCORE_COLUMNS if c in t.colnames), np.full(n, np.nan))
    number = np.asarray(t["NUMBER"], int) if "NUMBER" in t.colnames else np.arange(1, n + 1)
    tp = root / f"{frame}.triplets.pt"
    trip = None
    if tp.is_file():
        try:
            trip = torch.load(tp, map_location="cpu", weights_only=True)
        except Exception as err:
            raise IngestError(f"{tp}: not a readable torch tensor file ({err})") from err
        if isinstance(trip, dict):
            trip = trip.get("triplets")
        if not isinstance(trip, torch.Tensor) or trip.dim() != 4 or trip.shape[0] != n:
            raise IngestError(f"{tp}: expected a (N={n}, 3, S, S) tensor matching {path.name}, "
                              f"got {getattr(trip, 'shape', type(trip).__name__)}")
    ra, dec = _wcs_radec(root, frame, x, y)
    return FrameCandidates(frame, number, x, y, flux, snr, score, ra, dec, trip, tp.name if trip is not None else "")


def _read_tracklets(root: Path) -> Optional[dict]:
    path = root / "tracklets.ecsv"
    if not path.is_file():
        return None
    t = _read_table(path)
    missing = [c for c in TRACKLET_COLUMNS if c not in t.colnames]
    if missing:
        raise IngestError(f"{path}: missing columns {missing} (the night contract lists {list(TRACKLET_COLUMNS)})")
    cols = {c: np.asarray(t[c]) for c in TRACKLET_COLUMNS}
    for c in ("trksub", "frame", "obs80"):
        cols[c] = np.asarray([str(v) for v in t[c]], dtype=object)
    bad = [c for c in ("mjd", "ra", "dec", "x", "y") if not np.all(np.isfinite(cols[c].astype(float)))]
    if bad:
        raise IngestError(f"{path}: non-finite values in columns {bad}")
    return cols


def read_run(root) -> RunProducts:
    """Read and check every product of a run folder (no database, no writes)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise IngestError(f"run={root} is not a folder (expected the output folder of astroprep night or astroprep run)")
    files = []
    if (root / "night.json").is_file():
        meta = _read_json(root / "night.json")
        if meta.get("kind") != "night":
            raise IngestError(f"{root / 'night.json'}: 'kind' must be 'night', got {meta.get('kind')!r}")
        kind, frames = "night", _night_frames(root, meta)
        files.append(root / "night.json")
    elif any(root.glob("manifest.rank*.jsonl")):
        kind, meta, frames = "run", {}, _read_manifest(root)
    else:
        raise IngestError(f"{root}: neither night.json nor manifest.rank*.jsonl found: not an astroprep output folder")
    files += sorted(root.glob("manifest.rank*.jsonl"))
    names = [f["name"] for f in frames]
    if len(set(names)) != len(names):
        raise IngestError(f"{root}: frame names are not unique")
    prod = RunProducts(root, kind, meta, frames, files=files)
    for f in frames:
        c = _read_candidates(root, f["name"])
        if c is not None:
            prod.candidates.append(c)
            prod.files.append(root / f"{f['name']}.candidates.ecsv")
            if c.triplets_file:
                prod.files.append(root / c.triplets_file)
    prod.tracklets = _read_tracklets(root)
    if prod.tracklets is not None:
        prod.files.append(root / "tracklets.ecsv")
        unknown = sorted(set(prod.tracklets["frame"]) - set(names))
        if unknown:
            raise IngestError(f"{root / 'tracklets.ecsv'}: frames {unknown[:5]} are not frames of the run")
        prod.files += sorted((root / "sequences").glob("*.pt"))
    return prod


def content_hash(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(set(files)):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# scores and thumbnails
# ------------------------------------------------------------------------------------------------
def load_scorer(classifier):
    """A callable raw triplets (N, 3, S, S) -> probabilities (N,), or None when ``classifier`` is None."""
    if classifier in (None, "", "null", "none"):
        return None
    p = Path(classifier).expanduser()
    if not p.exists():
        raise IngestError(f"classifier={p} does not exist (a braai folder or .h5, or a TorchScript .pt)")
    if p.is_dir() or p.suffix == ".h5" or p.name.endswith(".architecture.json"):
        from ..classify import load_braai

        model = load_braai(p)
    else:
        model = torch.jit.load(str(p), map_location="cpu").eval()

    def score(trip: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            out = torch.cat([model(b.float()).reshape(-1) for b in trip.split(1024)]) if len(trip) else torch.zeros(0)
        if out.numel() and (out.min() < 0 or out.max() > 1):
            out = torch.sigmoid(out)
        return out.double().numpy()

    return score


def _candidate_thumbs(prod: RunProducts) -> dict[str, list[str]]:
    """Write ``web/cand/<frame>.u8.npy`` (science | reference | difference panels, one row per
    candidate); returns per frame the thumbnail references ``<file>#<row>``."""
    out = {}
    for c in prod.candidates:
        if c.triplets is None:
            out[c.frame] = [""] * len(c.x)
            continue
        rel = f"{WEB_DIR}/cand/{c.frame}.u8.npy"
        write_panels(side_by_side(to_uint8(c.triplets)), prod.root / rel)
        out[c.frame] = [f"{rel}#{k}" for k in range(len(c.x))]
    return out


def _sequence_thumbs(prod: RunProducts, trksub: str, n: int) -> list[str]:
    """Per-detection panels (science | difference) from ``sequences/<trksub>.pt`` into
    ``web/seq/<trksub>.u8.npy``; the references ``<file>#<k>`` ("" when there is no sequence)."""
    src = prod.root / "sequences" / f"{trksub}.pt"
    if not src.is_file():
        return [""] * n
    try:
        seq = torch.load(src, map_location="cpu", weights_only=True)
        stamps = torch.cat([seq["science"], seq["difference"]], dim=1)
    except Exception as err:
        raise IngestError(f"{src}: expected a dict with 'science' and 'difference' (n, 1, S, S) tensors ({err})") from err
    if stamps.shape[0] != n:
        raise IngestError(f"{src}: {stamps.shape[0]} stamps for {n} detections of {trksub} in tracklets.ecsv")
    rel = f"{WEB_DIR}/seq/{trksub}.u8.npy"
    write_panels(side_by_side(to_uint8(stamps)), prod.root / rel)
    return [f"{rel}#{k}" for k in range(n)]


def _none(v) -> Optional[float]:
    v = float(v)
    return v if math.isfinite(v) else None


def _object_scores(prod: RunProducts, radius: float = 2.0) -> np.ndarray:
    """Per detection of ``prod.tracklets``: the score of the nearest candidate within ``radius`` px (NaN)."""
    t = prod.tracklets
    out = np.full(len(t["x"]), np.nan)
    for c in prod.candidates:
        sel = np.nonzero(t["frame"] == c.frame)[0]
        if not len(sel) or not len(c.x):
            continue
        d = torch.cdist(torch.as_tensor(np.stack([t["x"][sel], t["y"][sel]], 1), dtype=torch.float64),
                        torch.as_tensor(np.stack([c.x, c.y], 1), dtype=torch.float64))
        dmin, j = d.min(dim=1)
        ok = dmin.numpy() <= radius
        out[sel[ok]] = c.score[j.numpy()[ok]]
    return out


def _obs80(line) -> str:
    """The 80-column line; ECSV writers strip leading blanks (columns 1-5, the packed number of an
    unnumbered object), so a shorter line is right-aligned back to 80 columns."""
    line = str(line).rstrip("\r\n")
    return line.rjust(80) if 0 < len(line) < 80 else line


def _cutout_index(prod: RunProducts) -> dict[str, list[str]]:
    """``cutouts/<trksub>_<k>.fits`` grouped by trksub, in k order (one listing of the folder)."""
    groups: dict[str, list[tuple[int, str]]] = {}
    folder = prod.root / "cutouts"
    if folder.is_dir():
        for p in folder.iterdir():
            stem, _, k = p.name.removesuffix(".fits").rpartition("_")
            if p.name.endswith(".fits") and stem and k.isdigit():
                groups.setdefault(stem, []).append((int(k), f"cutouts/{p.name}"))
    return {t: [rel for _, rel in sorted(v)] for t, v in groups.items()}


def _cutout_paths(index: dict, trksub: str, n: int) -> list[str]:
    rel = index.get(trksub, [])
    return rel + [""] * (n - len(rel)) if len(rel) <= n else rel[:n]


def _insert_objects(session, prod: RunProducts, field_id: int) -> int:
    t = prod.tracklets
    if t is None or not len(t["trksub"]):
        return 0
    det_score = _object_scores(prod)
    order = np.lexsort((t["exposure"], t["mjd"], t["tracklet"]))
    groups: dict[str, list[int]] = {}
    for i in order:
        groups.setdefault(t["trksub"][i], []).append(int(i))
    objs = []
    for trk, idx in groups.items():
        s = det_score[idx]
        objs.append({"field_id": field_id, "designation": trk, "tracklet": int(t["tracklet"][idx[0]]),
                     "rate": _none(t["rate"][idx[0]]), "pa": _none(t["pa"][idx[0]]), "rms": _none(t["rms"][idx[0]]),
                     "mag": _none(np.nanmean(t["mag"][idx].astype(float))) if np.isfinite(t["mag"][idx].astype(float)).any() else None,
                     "score": _none(np.nanmean(s)) if np.isfinite(s).any() else None, "n_detections": len(idx),
                     "sequence_gif": f"sequences/{trk}.gif" if (prod.root / "sequences" / f"{trk}.gif").is_file() else "",
                     "sequence_pt": f"sequences/{trk}.pt" if (prod.root / "sequences" / f"{trk}.pt").is_file() else ""})
    ids = session.scalars(insert(MovingObject).returning(MovingObject.id, sort_by_parameter_order=True), objs).all()
    dets = []
    cutout_index = _cutout_index(prod)
    for oid, (trk, idx) in zip(ids, groups.items()):
        thumbs, cutouts = _sequence_thumbs(prod, trk, len(idx)), _cutout_paths(cutout_index, trk, len(idx))
        for k, i in enumerate(idx):
            row = {c: _none(t[c][i]) for c in ("mjd", "ra", "dec", "x", "y", "mag", "mag_err", "snr", "e", "fwhm", "theta")}
            row.update(object_id=oid, frame=str(t["frame"][i]), exposure=int(t["exposure"][i]),
                       obs80=_obs80(t["obs80"][i]), cutout=cutouts[k], thumb=thumbs[k])
            dets.append(row)
    session.execute(insert(Detection), dets)
    return len(dets)


def _insert_candidates(session, prod: RunProducts, field_id: int, frame_ids: dict[str, int]) -> int:
    thumbs = _candidate_thumbs(prod)
    rows = []
    for c in prod.candidates:
        for k in range(len(c.x)):
            rows.append({"field_id": field_id, "frame_id": frame_ids[c.frame], "number": int(c.number[k]),
                         "x": float(c.x[k]), "y": float(c.y[k]), "ra": _none(c.ra[k]), "dec": _none(c.dec[k]),
                         "flux": _none(c.flux[k]), "snr": _none(c.snr[k]), "score": _none(c.score[k]),
                         "thumb": thumbs[c.frame][k], "stamp": f"{c.triplets_file}:{k}" if c.triplets_file else ""})
    if rows:
        session.execute(insert(Candidate), rows)
    return len(rows)


def _apply_scores(prod: RunProducts, classifier) -> str:
    """Fill NaN candidate scores from ``classifier``; says where the scores came from."""
    if all(np.isfinite(c.score).all() for c in prod.candidates if len(c.x)):
        return "run"
    scorer = load_scorer(classifier)
    if scorer is None:
        return "none"
    for c in prod.candidates:
        if c.triplets is not None and len(c.x):
            missing = ~np.isfinite(c.score)
            c.score = np.where(missing, scorer(c.triplets), c.score)
    return f"classifier:{Path(classifier).name}"


def ingest_run(sessionmaker, run, night: str, *, field: Optional[str] = None, classifier=None) -> dict:
    """Ingest the run folder ``run`` as a field of the night ``night`` (created when new).

    Returns ``{"added": bool, "run_id", "field_id", "night_id", "frames", "candidates",
    "detections", "scores"}``; ``added`` is False when this exact run (path and content) is already in.
    Raises :class:`IngestError` on a broken run (nothing is written to the database then).
    """
    if not isinstance(night, str) or not night.strip():
        raise IngestError("night must be a non-empty name, e.g. night=2026-12-07")
    prod = read_run(run)
    digest = content_hash(prod.root, prod.files)
    with sessionmaker() as s:
        prior = s.execute(select(Run.id, Run.content_hash, Field.id, Night.id).join(Field, Field.run_id == Run.id)
                          .join(Night, Night.id == Run.night_id).where(Run.path == str(prod.root))).first()
    if prior is not None:
        if prior[1] == digest:
            return {"added": False, "run_id": prior[0], "field_id": prior[2], "night_id": prior[3]}
        raise IngestError(f"{prod.root} was ingested before (run {prior[0]}) with different content; "
                          "delete that night or field first, or ingest the new products from another folder")
    scores = _apply_scores(prod, classifier)
    try:
        with sessionmaker() as s, s.begin():
            n = s.scalars(select(Night).where(Night.name == night.strip())).first()
            if n is None:
                n = Night(name=night.strip(), status="LOADED", notes="")
                s.add(n)
            n.status = "LOADED"
            s.flush()
            r = Run(night_id=n.id, path=str(prod.root), content_hash=digest, kind=prod.kind,
                    meta={k: v for k, v in prod.meta.items() if k != "frames"} | {"scores": scores})
            s.add(r)
            s.flush()
            f = Field(night_id=n.id, run_id=r.id, name=field or str(prod.meta.get("field") or prod.root.name))
            s.add(f)
            s.flush()
            frows = [{"field_id": f.id, **{k: fr.get(k) for k in ("name", "path", "mjd", "exptime", "status", "reason")},
                      "kind": fr.get("kind", "science")} for fr in prod.frames]
            fids = s.scalars(insert(Frame).returning(Frame.id, sort_by_parameter_order=True), frows).all() if frows else []
            n_cand = _insert_candidates(s, prod, f.id, dict(zip([fr["name"] for fr in prod.frames], fids)))
            n_det = _insert_objects(s, prod, f.id)
            out = {"added": True, "run_id": r.id, "field_id": f.id, "night_id": n.id, "frames": len(fids),
                   "candidates": n_cand, "detections": n_det, "scores": scores}
    except SQLAlchemyError as err:
        raise IngestError(f"{prod.root}: the database refused the run ({getattr(err, 'orig', err)}); "
                          "nothing was loaded") from err
    return out
