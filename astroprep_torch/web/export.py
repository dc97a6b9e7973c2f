"""Export people's labels as a training set: ``astroprep export-labels db=<url> output=<dir>``.

Layout (what ``astroprep train-classifier data.source=fits_folder data.root=<dir>`` reads):

* ``valid/<designation>_<k>.fits`` and ``invalid/<designation>_<k>.fits``: the 200x200 cutout of
  every detection of each labelled moving object, with ``LABEL`` set in the header;
* ``labels.csv``: ``filename,label,kind,id,user,time`` for every exported cutout (usable as
  ``data.labels_csv``);
* ``candidates.pt``: ``{"triplets": (N, 3, S, S), "labels": (N,) int64 (1 = valid), "ids": list}``
  of the labelled transient candidates (triplets read back from the runs' ``<frame>.triplets.pt``),
  and ``candidates.csv`` (``index,label,kind,id,user,time``).

Objects and candidates whose current label is ``undefined`` are left out.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import Candidate, Detection, Field, LabelEvent, MovingObject, Run, User


def _last_events(db: Session, col) -> dict:
    last = select(col.label("item"), func.max(LabelEvent.id).label("eid")).where(col.is_not(None)).group_by(col).subquery()
    rows = db.execute(select(last.c.item, User.name, LabelEvent.time).join(LabelEvent, LabelEvent.id == last.c.eid)
                      .join(User, User.id == LabelEvent.user_id)).all()
    return {r[0]: (r[1], r[2].isoformat() if r[2] else "") for r in rows}


def _export_objects(db: Session, out: Path, writer) -> int:
    from astropy.io import fits

    who = _last_events(db, LabelEvent.object_id)
    rows = db.execute(select(MovingObject.id, MovingObject.designation, MovingObject.label, Detection.cutout,
                             Detection.exposure, Run.path)
                      .join(Detection, Detection.object_id == MovingObject.id)
                      .join(Field, Field.id == MovingObject.field_id).join(Run, Run.id == Field.run_id)
                      .where(MovingObject.label != "undefined", Detection.cutout != "")
                      .order_by(MovingObject.id, Detection.exposure)).all()
    n = 0
    for oid, des, label, cutout, k, run_path in rows:
        src = Path(run_path) / cutout
        if not src.is_file():
            continue
        name = f"{label}/{des}_{oid}_{k}.fits"
        with fits.open(src, memmap=False) as hdul:
            hdul[0].header["LABEL"] = label
            (out / label).mkdir(exist_ok=True)
            hdul.writeto(out / name, overwrite=True)
        user, time = who.get(oid, ("", ""))
        writer.writerow([name, label, "object", oid, user, time])
        n += 1
    return n


def _export_candidates(db: Session, out: Path, writer) -> int:
    who = _last_events(db, LabelEvent.candidate_id)
    rows = db.execute(select(Candidate.id, Candidate.label, Candidate.stamp, Run.path)
                      .join(Field, Field.id == Candidate.field_id).join(Run, Run.id == Field.run_id)
                      .where(Candidate.label != "undefined", Candidate.stamp != "").order_by(Candidate.id)).all()
    cache: dict = {}
    trips, labels, ids = [], [], []
    for cid, label, stamp, run_path in rows:
        fname, _, k = stamp.rpartition(":")
        src = Path(run_path) / fname
        if src not in cache:
            cache.clear()  # one triplet file in memory at a time (rows are grouped by run/frame order)
            cache[src] = torch.load(src, map_location="cpu", weights_only=True) if src.is_file() else None
        t = cache[src]
        if t is None or int(k) >= len(t):
            continue
        trips.append(t[int(k)])
        labels.append(1 if label == "valid" else 0)
        ids.append(cid)
        user, time = who.get(cid, ("", ""))
        writer.writerow([len(ids) - 1, label, "candidate", cid, user, time])
    if ids:
        torch.save({"triplets": torch.stack(trips), "labels": torch.tensor(labels, dtype=torch.int64), "ids": ids},
                   out / "candidates.pt")
    return len(ids)


def export_labels(db: Session, output) -> dict:
    """Write the labelled training set under ``output``; returns the counts written."""
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filename", "label", "kind", "id", "user", "time"])
        n_obj = _export_objects(db, out, w)
    with open(out / "candidates.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "label", "kind", "id", "user", "time"])
        n_cand = _export_candidates(db, out, w)
    return {"output": str(out), "object_cutouts": n_obj, "candidates": n_cand}
