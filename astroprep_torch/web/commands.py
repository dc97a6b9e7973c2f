"""The shell commands of the web application (called from :mod:`astroprep_torch._runners`)."""

from __future__ import annotations

import getpass
import os

from omegaconf import DictConfig


def _need_web():
    try:
        import fastapi  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as err:  # pragma: no cover
        raise SystemExit(f"astroprep: the web commands need the 'web' extra (pip install 'astroprep_torch[web]'): {err}")


def serve(cfg: DictConfig) -> None:
    """``astroprep serve db=<url> host=127.0.0.1 port=8000``."""
    _need_web()
    import uvicorn

    from .app import create_app

    app = create_app(cfg.db, secret_key=cfg.get("secret_key"))
    print(f"astroprep web on http://{cfg.host}:{cfg.port} (database {app.state.engine.url.render_as_string()})")
    uvicorn.run(app, host=cfg.host, port=int(cfg.port), log_level=cfg.get("log_level", "info"),
                workers=None, proxy_headers=bool(cfg.get("proxy_headers", False)))


def user(cfg: DictConfig) -> dict:
    """``astroprep user name=<n> role=<viewer|validator|admin> password=<p> db=<url>``."""
    _need_web()
    from .auth import upsert_user
    from .db import open_database

    password = cfg.password or os.environ.get("ASTROPREP_USER_PASSWORD") or getpass.getpass(f"password for {cfg.name}: ")
    _, sessionmaker = open_database(cfg.db)
    with sessionmaker() as db:
        try:
            u, created = upsert_user(db, cfg.name, cfg.role, str(password))
        except ValueError as err:
            raise SystemExit(f"astroprep user: {err}")
        print(f"{'created' if created else 'updated'} user {u.name!r} ({u.role}) in {cfg.db}")
        return {"name": u.name, "role": u.role, "created": created}


def ingest(cfg: DictConfig) -> dict:
    """``astroprep ingest run=<dir> night=<name> db=<url>`` (idempotent, atomic)."""
    _need_web()
    import time

    from .db import open_database
    from .ingest import IngestError, ingest_run

    if not cfg.run:
        raise SystemExit("astroprep ingest: run=<output folder of astroprep night or astroprep run> is required")
    _, sessionmaker = open_database(cfg.db)
    t0 = time.perf_counter()
    try:
        out = ingest_run(sessionmaker, cfg.run, str(cfg.night), field=cfg.get("field"), classifier=cfg.get("classifier"))
    except IngestError as err:
        raise SystemExit(f"astroprep ingest: {err}")
    if out["added"]:
        print(f"ingested {cfg.run} as field {out['field_id']} of night {cfg.night!r}: {out['frames']} frames, "
              f"{out['candidates']} candidates (scores: {out['scores']}), {out['detections']} detections "
              f"in {time.perf_counter() - t0:.2f} s")
    else:
        print(f"{cfg.run} is already in the database (field {out['field_id']}): nothing added")
    return out


def export(cfg: DictConfig) -> dict:
    """``astroprep export-labels db=<url> output=<dir>``."""
    _need_web()
    from .db import open_database
    from .export import export_labels

    _, sessionmaker = open_database(cfg.db)
    with sessionmaker() as db:
        out = export_labels(db, cfg.output)
    print(f"exported {out['object_cutouts']} labelled object cutouts and {out['candidates']} labelled candidates "
          f"to {out['output']}")
    return out
