"""The validation pages in a real browser: Debian's Chromium driven by Python Playwright.

Never ``playwright install`` (it downloads a browser): the test uses /usr/bin/chromium and skips,
with the reason, when it or the playwright package is absent. Screenshots of each page go to
``$ASTROPREP_WEB_SCREENSHOTS`` when set (e.g. experiments/results/web_screenshots), else a tmp dir.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")

CHROMIUM = Path(os.environ.get("ASTROPREP_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """uvicorn on 127.0.0.1 (free port, in a thread) over an SQLite database with a synthetic night."""
    import uvicorn

    from astroprep_torch.web import create_app
    from astroprep_torch.web.auth import upsert_user
    from astroprep_torch.web.ingest import ingest_run
    from astroprep_torch.web.synthetic import write_synthetic_night

    tmp = tmp_path_factory.mktemp("browser")
    app = create_app(f"sqlite:///{tmp / 'web.db'}", secret_key="browser-test")
    ingest_run(app.state.sessionmaker, write_synthetic_night(tmp / "field-17", n_frames=5, n_objects=3, n_candidates=14),
               "2025-11-21")
    with app.state.sessionmaker() as db:
        upsert_user(db, "val", "validator", "val-pw")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not srv.started:
        if time.monotonic() - t0 > 30 or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)
    app.state.engine.dispose()


@pytest.fixture
def page(tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent (Debian package chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        pg = ctx.new_page()
        pg.set_default_timeout(15000)
        yield pg
        ctx.close()
        browser.close()


def test_validate_in_the_browser(server, page, tmp_path):
    shots = Path(os.environ.get("ASTROPREP_WEB_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    expect = sync_api.expect
    snap = lambda name: page.screenshot(path=str(shots / f"{name}.png"), full_page=True)  # noqa: E731

    page.goto(f"{server}/nights")
    expect(page).to_have_url(f"{server}/login?next=/nights")
    page.fill("input[name=username]", "val")
    page.fill("input[name=password]", "val-pw")
    snap("01_login")
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Nights")
    snap("02_nights")

    page.click("text=2025-11-21")
    expect(page.locator("h1")).to_contain_text("Night 2025-11-21")
    page.click("#show-files")
    expect(page.locator("#files table")).to_contain_text("frame004")
    snap("03_night_files_shown")
    page.click("#hide-files")
    expect(page.locator("#files table")).to_have_count(0)

    page.click("text=field-17")
    expect(page.locator("h1")).to_contain_text("Field field-17")
    expect(page.locator("#counts")).to_contain_text("UNDEFINED 3")
    snap("04_field")

    page.click("text=AP00001")
    expect(page.locator("h1")).to_have_text("AP00001")
    counter = page.locator(".player .k")
    first = counter.inner_text()
    expect(counter).not_to_have_text(first, timeout=5000)  # the sequence plays: "Playing k / 5"
    page.click(".playpause")
    expect(page.locator(".player .state")).to_have_text("Paused")
    snap("05_object")
    page.keyboard.press("v")
    expect(page.locator("#label")).to_have_text("VALID")
    expect(page.locator("#counts")).to_contain_text("VALID 1")
    expect(page.locator("#counts")).to_contain_text("UNDEFINED 2")
    expect(page.locator("#history")).to_contain_text("by val")
    snap("06_object_validated")
    page.keyboard.press("ArrowRight")
    expect(page.locator("h1")).to_have_text("AP00002")
    page.keyboard.press("i")
    expect(page.locator("#counts")).to_contain_text("INVALID 1")
    snap("07_next_object_invalidated")

    page.goto(f"{server}/fields/1/candidates")
    expect(page.locator(".cand")).to_have_count(50)
    page.locator(".cand input[name=ids]").nth(0).check()
    page.locator(".cand input[name=ids]").nth(1).check()
    snap("08_candidates")
    page.click("button[value=valid]")
    expect(page.locator("#counts")).to_contain_text("VALID 2")

    page.goto(f"{server}/nights/1/reports")
    page.click("#generate")
    expect(page.locator("#obs80")).to_contain_text("AP00001")
    snap("09_reports")
    with page.expect_download() as dl:
        page.click("#download-obs80")
    text = Path(dl.value.path()).read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("     AP")]
    assert len(lines) == 5 and all(ln.startswith("     AP00001") and len(ln) == 80 for ln in lines)

    page.goto(f"{server}/export")
    expect(page.locator("h1")).to_have_text("Export labels")
    snap("10_export")
    assert len(list(shots.glob("*.png"))) >= 10
