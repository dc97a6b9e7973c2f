"""The JSON API (described by FastAPI's OpenAPI at /openapi.json)."""

from __future__ import annotations

from typing import Literal, Optional

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field as PField
from sqlalchemy import select

from . import queries as Q
from .auth import authenticate, make_token, require_role
from .deps import DB, ApiUser
from .models import Candidate, Frame, MovingObject, Night
from .mpc import night_reports

router = APIRouter(prefix="/api", tags=["api"])


class TokenRequest(BaseModel):
    username: str = PField(min_length=1, max_length=64)
    password: str = PField(min_length=1, max_length=1024)


class LabelRequest(BaseModel):
    label: Literal["undefined", "valid", "invalid"]
    comment: str = PField(default="", max_length=2000)


class BulkLabelRequest(LabelRequest):
    ids: list[int] = PField(min_length=1, max_length=1000)


@router.post("/token")
def token(body: TokenRequest, request: Request, db: DB) -> dict:
    """A bearer token for ``{"username", "password"}`` (valid 30 days, revoked by a password change)."""
    user = authenticate(db, body.username, body.password)
    if user is None:
        raise HTTPException(401, "wrong user name or password")
    return {"token": make_token(request.app.state.secret, user), "user": user.name, "role": user.role}


@router.get("/nights")
def nights(db: DB, user: ApiUser) -> list[dict]:
    return Q.nights_overview(db)


@router.get("/nights/{night_id}/fields")
def fields(night_id: int, db: DB, user: ApiUser) -> list[dict]:
    Q.get_or_404(db, Night, night_id, "night")
    return Q.fields_overview(db, night_id)


@router.get("/fields/{field_id}/objects")
def objects(field_id: int, db: DB, user: ApiUser, label: Optional[str] = None,
            min_score: Optional[float] = None, sort: str = "id") -> list[dict]:
    from .models import Field

    Q.get_or_404(db, Field, field_id, "field")
    return [Q.object_json(o) for o in Q.list_objects(db, field_id, label=label, min_score=min_score, sort=sort)]


@router.get("/fields/{field_id}/candidates")
def candidates(field_id: int, db: DB, user: ApiUser, page: int = Query(1, ge=1), sort: str = "score",
               label: Optional[str] = None, min_score: Optional[float] = None) -> list[dict]:
    """One page (50) of the field's candidates; the ``X-Total-Count`` header is not used: see /pages."""
    from .models import Field

    Q.get_or_404(db, Field, field_id, "field")
    rows, _ = Q.list_candidates(db, field_id, page=page, sort=sort, label=label, min_score=min_score)
    return [Q.candidate_json(c, fname) for c, fname in rows]


@router.get("/objects/{object_id}")
def object_detail(object_id: int, db: DB, user: ApiUser) -> dict:
    o = Q.object_detail(db, object_id)
    dets = [{k: getattr(d, k) for k in ("id", "frame", "exposure", "mjd", "ra", "dec", "x", "y", "mag", "mag_err",
                                         "snr", "e", "fwhm", "theta", "obs80")} for d in o.detections]
    return Q.object_json(o) | {"detections": dets}


@router.post("/objects/{object_id}/label")
def label_object(object_id: int, body: LabelRequest, db: DB, user: ApiUser) -> dict:
    require_role(user, "validator")
    return Q.object_json(Q.set_labels(db, MovingObject, [object_id], body.label, body.comment, user)[0])


@router.post("/candidates/{candidate_id}/label")
def label_candidate(candidate_id: int, body: LabelRequest, db: DB, user: ApiUser) -> dict:
    require_role(user, "validator")
    c = Q.set_labels(db, Candidate, [candidate_id], body.label, body.comment, user)[0]
    return Q.candidate_json(c, db.scalar(select(Frame.name).where(Frame.id == c.frame_id)) or "")


@router.post("/candidates/label")
def label_candidates(body: BulkLabelRequest, db: DB, user: ApiUser) -> list[dict]:
    """Bulk validate / invalidate: the same label and comment for every id."""
    require_role(user, "validator")
    return [Q.candidate_json(c) for c in Q.set_labels(db, Candidate, body.ids, body.label, body.comment, user)]


@router.get("/objects/{object_id}/history")
def object_history(object_id: int, db: DB, user: ApiUser) -> list[dict]:
    Q.get_or_404(db, MovingObject, object_id, "object")
    return Q.history(db, object_id=object_id)


@router.get("/candidates/{candidate_id}/history")
def candidate_history(candidate_id: int, db: DB, user: ApiUser) -> list[dict]:
    Q.get_or_404(db, Candidate, candidate_id, "candidate")
    return Q.history(db, candidate_id=candidate_id)


@router.get("/nights/{night_id}/report.obs80", response_class=PlainTextResponse)
def report_obs80(night_id: int, db: DB, user: ApiUser) -> PlainTextResponse:
    n = Q.get_or_404(db, Night, night_id, "night")
    return PlainTextResponse(night_reports(db, night_id)[0], headers={
        "Content-Disposition": f'attachment; filename="{_safe(n.name)}.obs80.txt"'})


@router.get("/nights/{night_id}/report.ades.psv", response_class=PlainTextResponse)
def report_ades(night_id: int, db: DB, user: ApiUser) -> PlainTextResponse:
    n = Q.get_or_404(db, Night, night_id, "night")
    return PlainTextResponse(night_reports(db, night_id)[1], headers={
        "Content-Disposition": f'attachment; filename="{_safe(n.name)}.ades.psv"'})


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "night"
