"""MPC reports (obs80 and ADES PSV) of a night's VALID objects, from the stored detection rows,
formatted by the library's report writer (:mod:`astroprep_torch.reports`)."""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Detection, Field, MovingObject, Run


def valid_detections(db: Session, night_id: int) -> tuple[list[dict], dict]:
    """Detection rows of the night's objects labelled valid (time order per object) and the report
    metadata: the runs' night.json ``report`` block (station, observers, telescope, catalogue, as
    ``configs/report/default.yaml``), else the station from night.json's ``observatory`` or from
    columns 78-80 of the obs80 lines."""
    rows = db.execute(
        select(MovingObject.designation, Detection.mjd, Detection.ra, Detection.dec, Detection.mag,
               Detection.mag_err, Detection.snr, Detection.obs80)
        .join(Detection, Detection.object_id == MovingObject.id).join(Field, Field.id == MovingObject.field_id)
        .where(Field.night_id == night_id, MovingObject.label == "valid")
        .order_by(MovingObject.designation, Detection.mjd)).all()
    dets = [dict(r._mapping) for r in rows]
    metas = [m or {} for m in db.scalars(select(Run.meta).where(Run.night_id == night_id))]
    meta = dict(next((m["report"] for m in metas if isinstance(m.get("report"), dict)), {}))
    obs = next((m.get("observatory") for m in metas if isinstance(m.get("observatory"), dict)), {}) or {}
    for key in ("submitter", "observers", "measurers", "telescope"):
        meta.setdefault(key, obs.get(key))
    code = str(meta.get("station") or obs.get("code") or "").strip()
    if len(code) != 3:
        found = Counter(d["obs80"][77:80].strip() for d in dets if len(d["obs80"]) >= 80)
        code = found.most_common(1)[0][0] if found else "500"
    meta["station"] = code
    meta.setdefault("catalog", next((c for c in (m.get("astCat") or (m.get("observatory") or {}).get("astCat")
                                               for m in metas) if c), None) or "UNK")
    return dets, meta


def render_reports(dets: list[dict], meta: dict) -> tuple[str, str]:
    """(obs80 text with its header block, ADES PSV version=2022 text) of detection rows, both
    formatted by :mod:`astroprep_torch.reports`; the obs80 lines are the stored ones, and the band
    is column 71 of each (``G`` when blank)."""
    from .. import reports

    meta = dict(meta)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    comments = [f"astroprep web report {stamp}, {len({d['designation'] for d in dets})} objects"]
    if not (meta.get("observers") or meta.get("submitter")):
        comments.append("add the submitter, observers, measurers and telescope blocks before sending it to the MPC")
    given = meta.get("comment")
    meta["comment"] = ([given] if isinstance(given, str) else list(given or [])) + comments
    obs80 = reports.obs80_header(meta) + [d["obs80"] for d in dets if d["obs80"]]
    obs = {"trkSub": [d["designation"] for d in dets], "mjd": [d["mjd"] for d in dets],
           "ra": [d["ra"] for d in dets], "dec": [d["dec"] for d in dets],
           "mag": [math.nan if d["mag"] is None else d["mag"] for d in dets],
           "logSNR": [math.log10(d["snr"]) if d["snr"] and d["snr"] > 0 else math.nan for d in dets],
           "band": [(d["obs80"][70:71].strip() if len(d["obs80"]) >= 71 else "") or "G" for d in dets]}
    return "\n".join(obs80) + "\n", "\n".join(reports.format_ades_psv(obs, meta)) + "\n"


def night_reports(db: Session, night_id: int) -> tuple[str, str]:
    return render_reports(*valid_detections(db, night_id))
