"""Speed of the validation web application on a big field.

A synthetic night (astroprep_torch.web.synthetic, the night contract's layout) of 100 frames with
100 candidates each (10,000 candidates, with scores) and 500 moving objects seen on 5 frames each is
ingested (timed: the issue asks < 30 s), 100 objects and 200 candidates are labelled, then every page
and API list is requested in-process (FastAPI TestClient, no network) ``--repeat`` times after one
warm-up; the table gives the median and the number of SQL statements (the issue asks < 150 ms).

    PYTHONPATH=$PWD python experiments/web_speed.py [--db URL] [--workdir DIR] [--repeat 7]

``--db`` defaults to a new SQLite file in the work dir; pass ``postgresql+psycopg://...`` to time
PostgreSQL (an empty database).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_rev, machine, write_result  # noqa: E402

PAGES = ["/nights", "/nights/1", "/nights/1/files?show=1", "/fields/1", "/fields/1?label=valid&min_score=0.3",
         "/fields/1/candidates", "/fields/1/candidates?page=150&sort=-score&min_score=0.2", "/objects/250",
         "/nights/1/reports", "/nights/1/reports?generate=1", "/export"]
API = ["/api/nights", "/api/nights/1/fields", "/api/fields/1/objects", "/api/fields/1/candidates?page=1",
       "/api/fields/1/candidates?page=200&sort=snr", "/api/objects/250", "/api/objects/1/history",
       "/api/nights/1/report.obs80", "/api/nights/1/report.ades.psv"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)

    from fastapi.testclient import TestClient
    from sqlalchemy import event

    from astroprep_torch.web import create_app
    from astroprep_torch.web.auth import upsert_user
    from astroprep_torch.web.ingest import ingest_run
    from astroprep_torch.web.synthetic import write_synthetic_night

    work = Path(args.workdir or tempfile.mkdtemp(prefix="web_speed_"))
    run = work / "night100"
    t0 = time.perf_counter()
    if not (run / "night.json").is_file():
        write_synthetic_night(run, n_frames=100, n_objects=500, n_candidates=100, detections_per_object=5, scores=True)
    t_write = time.perf_counter() - t0
    url = args.db or f"sqlite:///{work / 'speed.db'}"
    app = create_app(url, secret_key="speed")
    S = app.state.sessionmaker
    t0 = time.perf_counter()
    out = ingest_run(S, run, "2025-11-21")
    t_ingest = time.perf_counter() - t0
    if not out["added"]:
        raise SystemExit(f"{url} already holds this run: use an empty database")
    t0 = time.perf_counter()
    again = ingest_run(S, run, "2025-11-21")
    t_again = time.perf_counter() - t0
    with S() as db:
        upsert_user(db, "speed", "validator", "speed-pw")
    n_sql = [0]
    event.listen(app.state.engine, "before_cursor_execute", lambda *a, **k: n_sql.__setitem__(0, n_sql[0] + 1))
    rows = []
    with TestClient(app) as c:
        h = {"Authorization": "Bearer " + c.post("/api/token", json={"username": "speed", "password": "speed-pw"}).json()["token"]}
        for i in range(1, 101):
            c.post(f"/api/objects/{i * 5}/label", json={"label": "valid" if i % 3 else "invalid"}, headers=h)
        c.post("/api/candidates/label", json={"ids": list(range(1, 201)), "label": "invalid"}, headers=h)
        csrf_page = c.get("/login").text
        import re

        csrf = re.search(r'name="csrf_token" value="([^"]+)"', csrf_page).group(1)
        c.post("/login", data={"username": "speed", "password": "speed-pw", "csrf_token": csrf})
        for url_ in PAGES + API:
            hdr = h if url_.startswith("/api") else None
            r = c.get(url_, headers=hdr)
            assert r.status_code == 200, (url_, r.status_code, r.text[:300])
            times = []
            for _ in range(args.repeat):
                n_sql[0] = 0
                t = time.perf_counter()
                r = c.get(url_, headers=hdr)
                times.append(time.perf_counter() - t)
            rows.append((url_, statistics.median(times) * 1000, max(times) * 1000, n_sql[0], len(r.content)))
    backend = app.state.engine.dialect.name
    lines = [f"# Web application speed ({backend})", "",
             f"Machine: {machine()} (shared by other jobs: times are noisy). Commit {git_rev()}.",
             f"Command: `PYTHONPATH=$PWD python experiments/web_speed.py{' --db <' + backend + ' url>' if args.db else ''}`", "",
             f"Synthetic night: 100 frames x 100 candidates = {out['candidates']} candidates, 500 objects x 5 = "
             f"{out['detections']} detections (written in {t_write:.1f} s, not counted).", "",
             f"- ingest of the 100-frame run: **{t_ingest:.2f} s** (limit 30 s); the same run again: {t_again:.2f} s, "
             f"added nothing ({again['added']})", "",
             "| request | median (ms) | max (ms) | SQL statements | bytes |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| `{u}` | {m:.1f} | {mx:.1f} | {q} | {b} |" for u, m, mx, q, b in rows]
    worst = max(rows, key=lambda r: r[1])
    lines += ["", f"Slowest median: `{worst[0]}` {worst[1]:.1f} ms (limit 150 ms)."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_result(f"web_speed_{backend}", text)
    app.state.engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
