"""The queries behind the pages and the JSON API (a fixed number per page: no query per row)."""

from __future__ import annotations

from datetime import timezone
from typing import Optional

from fastapi import HTTPException
from sqlalchemy import Select, case, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from .models import LABELS, Candidate, Field, Frame, LabelEvent, MovingObject, Night, User

PAGE_SIZE = 50
CANDIDATE_SORTS = {"score": (Candidate.score.desc(), Candidate.id), "-score": (Candidate.score.asc(), Candidate.id),
                   "snr": (Candidate.snr.desc(), Candidate.id), "id": (Candidate.id,)}
OBJECT_SORTS = {"id": (MovingObject.id,), "score": (MovingObject.score.desc(), MovingObject.id),
                "rate": (MovingObject.rate.desc(), MovingObject.id), "mag": (MovingObject.mag.asc(), MovingObject.id)}


def get_or_404(db: Session, model, ident: int, what: str):
    row = db.get(model, ident)
    if row is None:
        raise HTTPException(404, f"{what} {ident} does not exist")
    return row


def check_label(label) -> str:
    if label not in LABELS:
        raise HTTPException(422, f"label must be one of {list(LABELS)}, got {label!r}")
    return label


def _label_counts(model, where) -> Select:
    cols = [func.sum(case((model.label == lab, 1), else_=0)).label(lab) for lab in LABELS]
    return select(*cols).where(where)


def counts(db: Session, model, where) -> dict:
    row = db.execute(_label_counts(model, where)).one()
    return {lab: int(v or 0) for lab, v in zip(LABELS, row)}


def nights_overview(db: Session) -> list[dict]:
    """Each night with its number of fields, frames, objects and objects per label (3 queries)."""
    nights = db.scalars(select(Night).order_by(Night.name)).all()
    nf = dict(db.execute(select(Field.night_id, func.count(Field.id)).group_by(Field.night_id)).all())
    obj = {r[0]: r[1:] for r in db.execute(
        select(Field.night_id, func.count(MovingObject.id),
               *[func.sum(case((MovingObject.label == lab, 1), else_=0)) for lab in LABELS])
        .join(MovingObject, MovingObject.field_id == Field.id).group_by(Field.night_id)).all()}
    out = []
    for n in nights:
        o = obj.get(n.id, (0, 0, 0, 0))
        out.append({"id": n.id, "name": n.name, "status": n.status, "notes": n.notes, "n_fields": nf.get(n.id, 0),
                    "n_objects": int(o[0] or 0), "counts": {lab: int(v or 0) for lab, v in zip(LABELS, o[1:])}})
    return out


def fields_overview(db: Session, night_id: int) -> list[dict]:
    fields = db.scalars(select(Field).where(Field.night_id == night_id).order_by(Field.id)).all()
    ids = [f.id for f in fields]
    per = lambda model: {r[0]: r[1:] for r in db.execute(  # noqa: E731
        select(model.field_id, func.count(model.id), *[func.sum(case((model.label == lab, 1), else_=0)) for lab in LABELS])
        .where(model.field_id.in_(ids)).group_by(model.field_id)).all()} if ids else {}
    objs, cands = per(MovingObject), per(Candidate)
    nfr = dict(db.execute(select(Frame.field_id, func.count(Frame.id)).where(Frame.field_id.in_(ids))
                          .group_by(Frame.field_id)).all()) if ids else {}
    out = []
    for f in fields:
        o, c = objs.get(f.id, (0, 0, 0, 0)), cands.get(f.id, (0, 0, 0, 0))
        out.append({"id": f.id, "name": f.name, "night_id": f.night_id, "n_frames": nfr.get(f.id, 0),
                    "n_objects": int(o[0] or 0), "objects": {lab: int(v or 0) for lab, v in zip(LABELS, o[1:])},
                    "n_candidates": int(c[0] or 0), "candidates": {lab: int(v or 0) for lab, v in zip(LABELS, c[1:])}})
    return out


def object_json(o: MovingObject) -> dict:
    return {"id": o.id, "field_id": o.field_id, "designation": o.designation, "label": o.label,
            "n_detections": o.n_detections, "rate": o.rate, "pa": o.pa, "rms": o.rms, "mag": o.mag, "score": o.score}


def candidate_json(c: Candidate, frame_name: str = "") -> dict:
    return {"id": c.id, "field_id": c.field_id, "frame": frame_name, "number": c.number, "x": c.x, "y": c.y,
            "ra": c.ra, "dec": c.dec, "snr": c.snr, "score": c.score, "label": c.label,
            "thumb_url": thumb_url(c.thumb, c.field_id) if c.thumb else None}


def thumb_url(thumb: str, field_id: int) -> str:
    """URL of a stored thumbnail reference ``<file>`` or ``<file>#<row>`` of a field's run (a PNG)."""
    from urllib.parse import quote

    path, _, row = (thumb or "").partition("#")
    return f"/files/{field_id}/{quote(path)}" + (f"?row={int(row)}" if row else "")


def list_objects(db: Session, field_id: int, *, label: Optional[str] = None, min_score: Optional[float] = None,
                 sort: str = "id") -> list[MovingObject]:
    q = select(MovingObject).where(MovingObject.field_id == field_id)
    if label:
        q = q.where(MovingObject.label == check_label(label))
    if min_score is not None:
        q = q.where(MovingObject.score >= min_score)
    if sort not in OBJECT_SORTS:
        raise HTTPException(422, f"sort must be one of {list(OBJECT_SORTS)}, got {sort!r}")
    return list(db.scalars(q.order_by(*OBJECT_SORTS[sort])).all())


def list_candidates(db: Session, field_id: int, *, page: int = 1, sort: str = "score", label: Optional[str] = None,
                    min_score: Optional[float] = None, page_size: int = PAGE_SIZE) -> tuple[list, int]:
    """One page of (candidate, frame name) rows and the number of matching candidates (2 queries)."""
    if page < 1:
        raise HTTPException(422, f"page must be >= 1, got {page}")
    if sort not in CANDIDATE_SORTS:
        raise HTTPException(422, f"sort must be one of {list(CANDIDATE_SORTS)}, got {sort!r}")
    where = [Candidate.field_id == field_id]
    if label:
        where.append(Candidate.label == check_label(label))
    if min_score is not None:
        where.append(Candidate.score >= min_score)
    total = db.scalar(select(func.count(Candidate.id)).where(*where))
    rows = db.execute(select(Candidate, Frame.name).join(Frame, Frame.id == Candidate.frame_id).where(*where)
                      .order_by(*CANDIDATE_SORTS[sort]).offset((page - 1) * page_size).limit(page_size)).all()
    return rows, int(total or 0)


def object_detail(db: Session, object_id: int) -> MovingObject:
    o = db.scalars(select(MovingObject).where(MovingObject.id == object_id)
                   .options(selectinload(MovingObject.detections))).first()
    if o is None:
        raise HTTPException(404, f"object {object_id} does not exist")
    return o


def neighbours(db: Session, o: MovingObject) -> tuple[Optional[int], Optional[int]]:
    """Ids of the previous and next object of the same field (by id)."""
    prev = db.scalar(select(func.max(MovingObject.id)).where(MovingObject.field_id == o.field_id, MovingObject.id < o.id))
    nxt = db.scalar(select(func.min(MovingObject.id)).where(MovingObject.field_id == o.field_id, MovingObject.id > o.id))
    return prev, nxt


def history(db: Session, *, object_id: Optional[int] = None, candidate_id: Optional[int] = None) -> list[dict]:
    col = LabelEvent.object_id if object_id is not None else LabelEvent.candidate_id
    ident = object_id if object_id is not None else candidate_id
    rows = db.execute(select(LabelEvent, User.name).join(User, User.id == LabelEvent.user_id)
                      .where(col == ident).order_by(LabelEvent.id)).all()
    return [{"id": e.id, "user": name, "time": _iso_utc(e.time), "label": e.label, "comment": e.comment}
            for e, name in rows]


def _iso_utc(t) -> Optional[str]:
    """ISO time in UTC (SQLite gives naive datetimes back: they were written in UTC)."""
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).isoformat()


def set_labels(db: Session, model, ids: list[int], label: str, comment: str, user: User) -> list:
    """Append one label event per item and set the items' current label, in one transaction.

    The items are locked first (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite serialises writers),
    so the cached ``label`` is always that of the latest event, and concurrent decisions are all kept.
    """
    check_label(label)
    if not isinstance(comment, str) or len(comment) > 2000:
        raise HTTPException(422, "comment must be a string of at most 2000 characters")
    ids = sorted({int(i) for i in ids})
    if not ids:
        raise HTTPException(422, "no item ids given")
    what = "object" if model is MovingObject else "candidate"
    found = set(db.scalars(select(model.id).where(model.id.in_(ids)).order_by(model.id).with_for_update()).all())
    missing = [i for i in ids if i not in found]
    if missing:
        db.rollback()
        raise HTTPException(404, f"{what} {missing[0]} does not exist")
    key = "object_id" if model is MovingObject else "candidate_id"
    try:
        db.execute(insert(LabelEvent), [{key: i, "user_id": user.id, "label": label, "comment": comment} for i in ids])
        db.execute(update(model).where(model.id.in_(ids)).values(label=label))
        db.commit()
    except IntegrityError as err:
        db.rollback()
        raise HTTPException(409, f"the {what} changed while labelling it; try again") from err
    return list(db.scalars(select(model).where(model.id.in_(ids)).order_by(model.id).execution_options(populate_existing=True)).all())
