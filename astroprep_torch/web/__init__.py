"""Web application for people to validate candidates and moving objects (optional extra ``web``).

``create_app(db_url)`` builds the FastAPI application (pages + JSON API); ``astroprep serve``,
``astroprep user``, ``astroprep ingest`` and ``astroprep export-labels`` drive it from the shell.
The core library never imports this package.
"""

from __future__ import annotations

__all__ = ["create_app"]


def create_app(*args, **kwargs):
    """See :func:`astroprep_torch.web.app.create_app`."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
