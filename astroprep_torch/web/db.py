"""Database engine, sessions and migrations (Alembic scripts shipped in ``migrations/``).

One URL: ``sqlite:///<file>`` (embedded; ``PRAGMA foreign_keys=ON`` and WAL set on each connection,
Alembic in batch mode) or ``postgresql+psycopg://...`` for a team. :func:`open_database` creates
and migrates the schema to the newest revision on first use.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DEFAULT_URL = "sqlite:///astroprep.db"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite connections get foreign keys, a busy timeout and WAL."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"db must be a database URL such as {DEFAULT_URL!r}, got {url!r}")
    try:
        u = make_url(url)
    except Exception as err:  # sqlalchemy.exc.ArgumentError
        raise ValueError(f"db={url!r} is not a database URL (e.g. {DEFAULT_URL!r} or "
                         "'postgresql+psycopg://user@host/name')") from err
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (Alembic ``upgrade``)."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Take the schema back to ``revision`` (Alembic ``downgrade``; ``base`` drops every table)."""
    from alembic import command

    command.downgrade(alembic_config(engine), revision)


def open_database(url: str = DEFAULT_URL, *, upgrade: bool = True) -> tuple[Engine, sessionmaker[Session]]:
    """Engine and session factory for ``url``, migrated to the newest schema when ``upgrade``."""
    engine = make_engine(url)
    if upgrade:
        migrate(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)
