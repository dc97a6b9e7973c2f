"""The FastAPI application: ``create_app(db_url)`` (pages, JSON API, static files, error pages)."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from .db import DEFAULT_URL, open_database
from .deps import LoginRequired
from .models import Setting
from .queries import thumb_url

HERE = Path(__file__).resolve().parent
log = logging.getLogger("astroprep.web")


def _secret(sessionmaker, given: Optional[str]) -> str:
    """The signing secret: given, else $ASTROPREP_WEB_SECRET, else one made once and kept in the database."""
    if given or os.environ.get("ASTROPREP_WEB_SECRET"):
        return given or os.environ["ASTROPREP_WEB_SECRET"]
    with sessionmaker() as db:
        row = db.get(Setting, "secret_key")
        if row is None:
            db.add(Setting(key="secret_key", value=secrets.token_urlsafe(48)))
            try:
                db.commit()
            except SQLAlchemyError:  # another process made it first
                db.rollback()
        return db.scalar(select(Setting.value).where(Setting.key == "secret_key"))


def _fmt(v, spec: str = ".2f", empty: str = "–") -> str:
    try:
        return empty if v is None or v != v else format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", "")


def _error(request: Request, status: int, message: str, headers=None):
    if _wants_json(request):
        return JSONResponse({"detail": message}, status_code=status, headers=headers)
    from .pages import render

    return render(request, "error.html", status_code=status, status=status, message=message)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired):
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no page at {request.url.path}"
        return _error(request, exc.status_code, msg, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "form"))
            parts.append(f"{where or 'request'}: {e.get('msg', 'invalid')}")
        return _error(request, 422, "bad input: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(request, 500, f"internal error ({type(exc).__name__}); the server log has the details")


def create_app(db_url: str = DEFAULT_URL, *, secret_key: Optional[str] = None, upgrade: bool = True) -> FastAPI:
    """The web application on the database ``db_url`` (created and migrated when ``upgrade``)."""
    engine, sessionmaker = open_database(db_url, upgrade=upgrade)
    # no /docs or /redoc: FastAPI serves their JavaScript from a CDN, and the app must work offline;
    # the OpenAPI description is at /openapi.json
    app = FastAPI(title="astroprep validation", version="1", docs_url=None, redoc_url=None,
                  description="Validate transient candidates and moving objects; labels, MPC reports, exports.")
    app.state.engine, app.state.sessionmaker = engine, sessionmaker
    app.state.secret = _secret(sessionmaker, secret_key)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["fmt"] = _fmt
    templates.env.filters["thumb_url"] = thumb_url
    app.state.templates = templates
    app.add_middleware(SessionMiddleware, secret_key=app.state.secret, session_cookie="astroprep_session",
                       max_age=14 * 24 * 3600, same_site="lax", https_only=False)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    from .api import router as api_router
    from .pages import router as pages_router

    app.include_router(api_router)
    app.include_router(pages_router)
    _install_handlers(app)
    return app
