"""Server-rendered pages (Jinja2 + htmx): nights, fields, objects, candidates, reports, export."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path
from typing import Optional
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from . import queries as Q
from .auth import authenticate, csrf_token, require_role
from .deps import DB, PageUser, session_user
from .export import export_labels
from .images import panel_png
from .models import Candidate, Field, Frame, MovingObject, Night, Run
from .mpc import night_reports

router = APIRouter(include_in_schema=False)


def render(request: Request, name: str, status_code: int = 200, **ctx) -> HTMLResponse:
    ctx.setdefault("user", None)
    return request.app.state.templates.TemplateResponse(
        request, name, {"csrf": csrf_token(request), **ctx}, status_code=status_code)


def _is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def _float_or_none(v: Optional[str], name: str) -> Optional[float]:
    if v is None or str(v).strip() == "":
        return None
    try:
        return float(v)
    except ValueError:
        raise HTTPException(422, f"{name} must be a number, got {v!r}") from None


# ---------------------------------------------------------------------------------------------- login
@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/nights"):
    return render(request, "login.html", next=next if next.startswith("/") and not next.startswith("//") else "/nights")


@router.post("/login")
async def login(request: Request, db: DB, username: str = Form(...), password: str = Form(...),
                next: str = Form("/nights")):
    from .auth import check_csrf

    await check_csrf(request)
    user = authenticate(db, username, password)
    if user is None:
        return render(request, "login.html", status_code=401, next=next, error="Wrong user name or password.")
    request.session.clear()
    request.session["uid"] = user.id
    csrf_token(request)
    target = next if next.startswith("/") and not next.startswith("//") else "/nights"
    return RedirectResponse(target, status_code=303)


@router.post("/logout")
def logout(request: Request, user: PageUser):
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


@router.get("/")
def home():
    return RedirectResponse("/nights", status_code=303)


# ---------------------------------------------------------------------------------------------- nights
@router.get("/nights", response_class=HTMLResponse)
def nights_page(request: Request, db: DB, user: PageUser):
    return render(request, "nights.html", user=user, nights=Q.nights_overview(db))


def _night_name(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > 128:
        raise HTTPException(422, "a night needs a name of 1 to 128 characters")
    return name


@router.post("/nights")
def create_night(request: Request, db: DB, user: PageUser, name: str = Form(...), notes: str = Form("")):
    require_role(user, "admin")
    db.add(Night(name=_night_name(name), status="CREATED", notes=notes[:10000]))
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise HTTPException(409, f"a night named {name.strip()!r} already exists") from None
    return RedirectResponse("/nights", status_code=303)


@router.get("/nights/{night_id}", response_class=HTMLResponse)
def night_page(night_id: int, request: Request, db: DB, user: PageUser):
    night = Q.get_or_404(db, Night, night_id, "night")
    return render(request, "night.html", user=user, night=night, fields=Q.fields_overview(db, night_id))


@router.post("/nights/{night_id}/edit")
def edit_night(night_id: int, db: DB, user: PageUser, name: str = Form(...), notes: str = Form(""),
               status: str = Form(...)):
    require_role(user, "admin")
    night = Q.get_or_404(db, Night, night_id, "night")
    if status not in ("CREATED", "LOADED"):
        raise HTTPException(422, f"status must be CREATED or LOADED, got {status!r}")
    night.name, night.notes, night.status = _night_name(name), notes[:10000], status
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise HTTPException(409, f"a night named {name.strip()!r} already exists") from None
    return RedirectResponse(f"/nights/{night_id}", status_code=303)


@router.post("/nights/{night_id}/delete")
def delete_night(night_id: int, db: DB, user: PageUser):
    require_role(user, "admin")
    db.delete(Q.get_or_404(db, Night, night_id, "night"))
    db.commit()
    return RedirectResponse("/nights", status_code=303)


@router.get("/nights/{night_id}/files", response_class=HTMLResponse)
def night_files(night_id: int, request: Request, db: DB, user: PageUser, show: int = 1):
    Q.get_or_404(db, Night, night_id, "night")
    rows = db.execute(select(Frame, Field.name).join(Field, Field.id == Frame.field_id)
                      .where(Field.night_id == night_id).order_by(Frame.kind, Frame.mjd, Frame.name)).all() if show else []
    return render(request, "_files.html", night_id=night_id, rows=rows, show=show)


# ---------------------------------------------------------------------------------------------- fields
@router.get("/fields/{field_id}", response_class=HTMLResponse)
def field_page(field_id: int, request: Request, db: DB, user: PageUser, label: str = "",
               min_score: Optional[str] = None, sort: str = "id"):
    f = Q.get_or_404(db, Field, field_id, "field")
    ms = _float_or_none(min_score, "min_score")
    objs = Q.list_objects(db, field_id, label=label or None, min_score=ms, sort=sort)
    return render(request, "field.html", user=user, field=f, night=db.get(Night, f.night_id), objects=objs,
                  counts=Q.counts(db, MovingObject, MovingObject.field_id == field_id),
                  n_candidates=Q.counts(db, Candidate, Candidate.field_id == field_id),
                  label=label, min_score=min_score or "", sort=sort)


# ---------------------------------------------------------------------------------------------- objects
def _object_ctx(db, o: MovingObject) -> dict:
    import math

    dets = o.detections
    avg = {}
    for k in ("e", "fwhm", "theta", "mag"):
        vals = [getattr(d, k) for d in dets if getattr(d, k) is not None and math.isfinite(getattr(d, k))]
        avg[k] = sum(vals) / len(vals) if vals else None
    th = [math.radians(2 * d.theta) for d in dets if d.theta is not None and math.isfinite(d.theta)]
    if th:  # THETA is an axis (period 180 deg): the mean direction of the doubled angles, halved
        avg["theta"] = 0.5 * math.degrees(math.atan2(sum(map(math.sin, th)), sum(map(math.cos, th))))
    return {"object": o, "detections": dets, "avg": avg, "history": Q.history(db, object_id=o.id),
            "counts": Q.counts(db, MovingObject, MovingObject.field_id == o.field_id)}


@router.get("/objects/{object_id}", response_class=HTMLResponse)
def object_page(object_id: int, request: Request, db: DB, user: PageUser):
    o = Q.object_detail(db, object_id)
    prev, nxt = Q.neighbours(db, o)
    f = db.get(Field, o.field_id)
    return render(request, "object.html", user=user, field=f, night=db.get(Night, f.night_id), prev=prev, next=nxt,
                  **_object_ctx(db, o))


@router.post("/objects/{object_id}/label")
def object_label(object_id: int, request: Request, db: DB, user: PageUser, label: str = Form(...),
                 comment: str = Form("")):
    require_role(user, "validator")
    Q.set_labels(db, MovingObject, [object_id], label, comment, user)
    if _is_htmx(request):
        return render(request, "_object_panel.html", user=user, **_object_ctx(db, Q.object_detail(db, object_id)))
    return RedirectResponse(f"/objects/{object_id}", status_code=303)


# ---------------------------------------------------------------------------------------------- candidates
@router.get("/fields/{field_id}/candidates", response_class=HTMLResponse)
def candidates_page(field_id: int, request: Request, db: DB, user: PageUser, page: int = Query(1, ge=1),
                    sort: str = "score", label: str = "", min_score: Optional[str] = None):
    f = Q.get_or_404(db, Field, field_id, "field")
    ms = _float_or_none(min_score, "min_score")
    rows, total = Q.list_candidates(db, field_id, page=page, sort=sort, label=label or None, min_score=ms)
    query = {"sort": sort, "label": label, "min_score": min_score or ""}
    return render(request, "candidates.html", user=user, field=f, night=db.get(Night, f.night_id), rows=rows,
                  total=total, page=page, pages=max(1, -(-total // Q.PAGE_SIZE)), sort=sort, label=label,
                  min_score=min_score or "", query=urlencode(query),
                  counts=Q.counts(db, Candidate, Candidate.field_id == field_id))


@router.post("/fields/{field_id}/candidates/label")
async def candidates_label(field_id: int, request: Request, db: DB, user: PageUser, label: str = Form(...),
                           comment: str = Form(""), back: str = Form("")):
    require_role(user, "validator")
    form = await request.form()
    try:
        ids = [int(v) for v in form.getlist("ids")]
    except ValueError:
        raise HTTPException(422, "ids must be candidate numbers") from None
    if not ids:
        raise HTTPException(422, "select at least one candidate first")
    owned = set(db.scalars(select(Candidate.id).where(Candidate.id.in_(ids), Candidate.field_id == field_id)).all())
    if owned != set(ids):
        raise HTTPException(404, f"candidates {sorted(set(ids) - owned)[:5]} are not in field {field_id}")
    Q.set_labels(db, Candidate, ids, label, comment, user)
    target = back if back.startswith(f"/fields/{field_id}/candidates") else f"/fields/{field_id}/candidates"
    return RedirectResponse(target, status_code=303)


# ---------------------------------------------------------------------------------------------- reports
@router.get("/nights/{night_id}/reports", response_class=HTMLResponse)
def reports_page(night_id: int, request: Request, db: DB, user: PageUser, generate: int = 0):
    night = Q.get_or_404(db, Night, night_id, "night")
    obs80, ades = night_reports(db, night_id) if generate else ("", "")
    n_valid = Q.counts(db, MovingObject, MovingObject.field_id.in_(select(Field.id).where(Field.night_id == night_id)))
    tmpl = "_reports.html" if _is_htmx(request) else "reports.html"
    return render(request, tmpl, user=user, night=night, obs80=obs80, ades=ades, generated=bool(generate),
                  counts=n_valid)


# ---------------------------------------------------------------------------------------------- export
@router.get("/export", response_class=HTMLResponse)
def export_page(request: Request, db: DB, user: PageUser):
    return render(request, "export.html", user=user,
                  objects=Q.counts(db, MovingObject, MovingObject.id.is_not(None)),
                  candidates=Q.counts(db, Candidate, Candidate.id.is_not(None)))


@router.get("/export/labels.zip")
def export_zip(db: DB, user: PageUser):
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        export_labels(db, tmp)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for p in sorted(Path(tmp).rglob("*")):
                if p.is_file():
                    z.write(p, p.relative_to(tmp).as_posix())
    return Response(buf.getvalue(), media_type="application/zip",
                    headers={"Content-Disposition": 'attachment; filename="astroprep_labels.zip"'})


# ---------------------------------------------------------------------------------------------- files
@router.get("/files/{field_id}/{path:path}")
def run_file(field_id: int, path: str, request: Request, db: DB, row: Optional[int] = Query(None, ge=0)):
    """A file of an ingested run (sequences, cutouts), or with ``row`` one thumbnail panel of a
    ``.u8.npy`` file as PNG: only inside that run's folder, for a logged-in user."""
    if session_user(request, db) is None:
        raise HTTPException(401, "log in to see files")
    run_path = db.scalar(select(Run.path).join(Field, Field.run_id == Run.id).where(Field.id == field_id))
    if run_path is None:
        raise HTTPException(404, f"field {field_id} does not exist")
    root = Path(run_path).resolve()
    try:
        target = (root / path).resolve()
    except (OSError, ValueError):
        raise HTTPException(404, "no such file") from None
    if not target.is_relative_to(root) or not target.is_file():
        raise HTTPException(404, "no such file in this run")
    cache = {"Cache-Control": "private, max-age=3600"}
    if row is None:
        return FileResponse(target, headers=cache)
    if not target.name.endswith(".u8.npy"):
        raise HTTPException(404, "row= applies to thumbnail panels (.u8.npy) only")
    try:
        return Response(panel_png(target, row), media_type="image/png", headers=cache)
    except (IndexError, ValueError, OSError):
        raise HTTPException(404, f"no thumbnail {row} in {path}") from None
