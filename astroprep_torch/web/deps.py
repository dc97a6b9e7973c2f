"""Request dependencies: the database session and the user (bearer token or session cookie)."""

from __future__ import annotations

from typing import Annotated, Iterator, Optional

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from .auth import SAFE_METHODS, check_csrf, user_from_token
from .models import User


class LoginRequired(Exception):
    """A page that needs a logged-in user (answered with a redirect to /login)."""


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as db:
        yield db


DB = Annotated[Session, Depends(get_db)]


def session_user(request: Request, db: Session) -> Optional[User]:
    uid = request.session.get("uid")
    return db.get(User, uid) if isinstance(uid, int) else None


async def api_user(request: Request, db: DB) -> User:
    """The caller of an API route: ``Authorization: Bearer <token>``, or the page session (GET
    only without a CSRF header, so a cookie alone can never change anything)."""
    auth = request.headers.get("authorization", "")
    if auth:
        scheme, _, token = auth.partition(" ")
        user = user_from_token(request.app.state.secret, db, token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HTTPException(401, "invalid or expired token: POST /api/token for a new one",
                                headers={"WWW-Authenticate": "Bearer"})
        return user
    user = session_user(request, db)
    if user is None:
        raise HTTPException(401, "authentication required: send 'Authorization: Bearer <token>' (POST /api/token)",
                            headers={"WWW-Authenticate": "Bearer"})
    if request.method not in SAFE_METHODS:
        await check_csrf(request)
    return user


async def page_user(request: Request, db: DB) -> User:
    """The logged-in user of a page; a change (POST) also needs the session's CSRF token."""
    user = session_user(request, db)
    if user is None:
        if request.method in SAFE_METHODS:
            raise LoginRequired()
        raise HTTPException(401, "log in first (your session has ended)")
    await check_csrf(request)
    return user


ApiUser = Annotated[User, Depends(api_user)]
PageUser = Annotated[User, Depends(page_user)]
