"""Users, passwords (argon2), API tokens (itsdangerous), page sessions and CSRF tokens.

* API: ``POST /api/token`` gives a signed, timed token carrying the user id and a fingerprint of the
  password hash (changing the password revokes old tokens); calls send ``Authorization: Bearer``.
* Pages: Starlette's signed session cookie holds the user id and a random CSRF token; every
  state-changing request made with the cookie must echo that token in the ``csrf_token`` form field
  or the ``X-CSRF-Token`` header (htmx sends it from ``hx-headers`` on ``<body>``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Optional

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import HTTPException, Request
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import ROLES, User

_HASHER = PasswordHasher()
TOKEN_MAX_AGE = 30 * 24 * 3600
RANK = {"viewer": 0, "validator": 1, "admin": 2}
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def upsert_user(session: Session, name: str, role: str, password: str) -> tuple[User, bool]:
    """Create the user ``name`` or update its role and password; returns (user, created)."""
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > 64:
        raise ValueError(f"name must be a non-empty user name of at most 64 characters, got {name!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}")
    if not isinstance(password, str) or len(password) < 4:
        raise ValueError("password must be a string of at least 4 characters")
    user = session.scalars(select(User).where(User.name == name.strip())).first()
    created = user is None
    if created:
        user = User(name=name.strip(), role=role, password_hash=hash_password(password))
        session.add(user)
    else:
        user.role, user.password_hash = role, hash_password(password)
    session.commit()
    return user, created


def authenticate(session: Session, name: str, password: str) -> Optional[User]:
    user = session.scalars(select(User).where(User.name == name)).first()
    if user is None:
        hash_password(password)  # same work whether or not the user exists
        return None
    return user if verify_password(user.password_hash, password) else None


def _fingerprint(user: User) -> str:
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:16]


def make_token(secret: str, user: User) -> str:
    return URLSafeTimedSerializer(secret, salt="astroprep-api").dumps({"uid": user.id, "pw": _fingerprint(user)})


def user_from_token(secret: str, session: Session, token: str) -> Optional[User]:
    try:
        data = URLSafeTimedSerializer(secret, salt="astroprep-api").loads(token, max_age=TOKEN_MAX_AGE)
    except (BadSignature, SignatureExpired):
        return None
    user = session.get(User, data.get("uid")) if isinstance(data, dict) else None
    return user if user is not None and hmac.compare_digest(_fingerprint(user), str(data.get("pw"))) else None


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made on first use)."""
    tok = request.session.get("csrf")
    if not tok:
        tok = secrets.token_urlsafe(32)
        request.session["csrf"] = tok
    return tok


async def check_csrf(request: Request) -> None:
    """403 unless a state-changing cookie request carries the session's CSRF token."""
    if request.method in SAFE_METHODS:
        return
    expected = request.session.get("csrf")
    sent = request.headers.get("x-csrf-token")
    if sent is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        sent = (await request.form()).get("csrf_token")
    if not expected or not sent or not hmac.compare_digest(str(expected), str(sent)):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


def require_role(user: User, role: str) -> User:
    if RANK.get(user.role, -1) < RANK[role]:
        raise HTTPException(403, f"user {user.name!r} ({user.role}) may not do this: it needs the {role} role")
    return user
