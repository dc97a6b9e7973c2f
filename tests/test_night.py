"""`astroprep night` on a small simulated night: movers found, reports valid, bad input handled."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time

from astroprep_torch import night as N

ROOT = Path(__file__).resolve().parent.parent
SIM = dict(shape=(320, 320), n_frames=5, pixel_scale=1.0, n_stars=250, n_movers=6, rate_range=(0.5, 6.0),
           n_transients=3, n_cosmics=10, n_hot_pixels=5, exptime=30.0, seed=3)
FAST = ["subtract.spatial_order=1", "subtract.stamp_grid=[4,4]", "trainer.enable_progress_bar=false",
        "data.num_workers=0", "async_write=false", "sequence.size=32"]


def _night_cfg(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from astroprep_torch.cli import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="night", overrides=list(overrides))


def run_night(*overrides):
    return N.run_night(_night_cfg([*FAST, *overrides]))


@pytest.fixture(scope="module")
def sim_night(tmp_path_factory):
    """5 frames (frame02 with its times in TT, as some observatories write them) + a frame without
    any time + the movers' truth."""
    from astroprep_torch.sim import simulate_night

    d = tmp_path_factory.mktemp("night")
    paths = N.write_simulated_night(simulate_night(**SIM), d / "frames")
    tt = Path(paths["frames"][2])
    with fits.open(tt, mode="update") as h:
        start = Time(h[0].header["MJD-OBS"], format="mjd", scale="utc")
        h[0].header["DATE-OBS"] = start.tt.isot
        h[0].header["MJD-OBS"] = start.tt.mjd
        h[0].header["TIMESYS"] = "TT"
    bad = d / "frames" / "frame99.fits"
    shutil.copy(paths["frames"][0], bad)
    with fits.open(bad, mode="update") as h:
        for k in ("DATE-OBS", "MJD-OBS"):
            del h[0].header[k]
    return d, paths


@pytest.fixture(scope="module")
def night_run(sim_night, tmp_path_factory):
    d, _ = sim_night
    out = tmp_path_factory.mktemp("out")
    doc = run_night(f"input={d / 'frames'}", f"output={out}")
    return out, doc


def _check_contract(out: Path):
    doc = json.loads((out / "night.json").read_text())
    assert doc["kind"] == "night" and doc["version"] == 1 and doc["observatory"]["code"] == "XXX"
    rows = Table.read(out / "tracklets.ecsv")
    cols = ["trksub", "tracklet", "frame", "exposure", "mjd", "ra", "dec", "x", "y", "mag", "mag_err", "snr", "e",
            "fwhm", "theta", "rate", "pa", "rms", "obs80"]
    assert rows.colnames == cols
    assert doc["n_linked"] == len(rows) and doc["n_tracklets"] == len(set(rows["tracklet"]))
    # astropy's ECSV reader strips the leading blanks of the obs80 lines (the file holds them)
    assert all(len(s.rjust(80)) == 80 for s in rows["obs80"]) and all(len(t) <= 7 for t in rows["trksub"])
    text = (out / "tracklets.ecsv").read_text()
    assert all(f'"{s.rjust(80)}"' in text for s in rows["obs80"])
    return doc, rows


def test_night_without_reference_finds_the_movers(night_run, sim_night):
    out, doc = night_run
    _, paths = sim_night
    doc, rows = _check_contract(out)
    assert doc["template"] == "night" and doc["detections"] == "science" and (out / "template.fits").exists()
    score = N.score_tracklets(rows, Table.read(paths["truth"]))
    assert score["findable"] >= 4
    assert score["found"] >= score["findable"] - 1, score
    assert score["purity"] == 1.0 and score["median_rate_error"] < 0.02 and score["median_pa_error_deg"] < 1.0, score
    # the products of every frame and one sequence + cutouts per tracklet
    for t in set(rows["trksub"]):
        n = int((rows["trksub"] == t).sum())
        seq = torch.load(out / "sequences" / f"{t}.pt")
        assert seq["science"].shape == (n, 1, 32, 32) and list(seq["frame"]) == list(rows["frame"][rows["trksub"] == t])
        assert torch.isfinite(seq["difference"][:, :, 16, 16]).all()
        assert (out / "sequences" / f"{t}.gif").exists() and len(list((out / "cutouts").glob(f"{t}_*.fits"))) == n
    with fits.open(next((out / "cutouts").glob("*.fits"))) as h:
        assert h[0].data.shape == (200, 200) and h[0].header["LABEL"] == "undefined"


def test_night_bad_frames_and_mixed_time_systems(night_run, sim_night):
    out, _ = night_run
    doc = json.loads((out / "night.json").read_text())
    frames = {f["name"]: f for f in doc["frames"]}
    assert frames["frame99"]["status"] == "failed" and "DATE-OBS" in frames["frame99"]["reason"]
    assert "MJD-OBS" in frames["frame99"]["reason"] and frames["frame99"]["mjd"] is None
    # frame02's TT times were converted to UTC: its mid-exposure sits with the others' cadence
    truth = Table.read(sim_night[1]["truth"])
    t02 = float(truth["mjd"][truth["frame"] == "frame02"][0])
    assert frames["frame02"]["status"] == "ok" and abs(frames["frame02"]["mjd"] - t02) * 86400 < 0.01


def test_night_reports_pass_the_iau_validator(night_run, tmp_path):
    from test_reports import iau_decode, iau_validate

    from astroprep_torch import reports

    out, _ = night_run
    assert iau_validate(out / "report.ades.psv", tmp_path) == []
    obs80 = reports.read_obs80(out / "report.obs80.txt")
    rows = Table.read(out / "tracklets.ecsv")
    assert len(obs80) == len(rows) and dict(obs80.meta["header"])["COD"] == "XXX"
    for line, row in zip(rows["obs80"], rows):
        d = iau_decode(line.rjust(80))
        assert d["trkSub"] == row["trksub"] and abs(float(d["ra"]) - row["ra"]) < 1e-4


def test_night_too_few_frames_or_no_detections_give_empty_results(night_run, sim_night, tmp_path):
    d, _ = sim_night
    out = night_run[0]
    # the per-frame products are reused (resume); only the night-level steps run again
    few = tmp_path / "few"
    shutil.copytree(out, few)
    doc = run_night(f"input={d / 'frames'}", f"output={few}", "linking.min_detections=6")
    assert doc["n_tracklets"] == 0 and "fewer than linking.min_detections = 6" in doc["message"]
    assert len(Table.read(few / "tracklets.ecsv")) == 0
    from astroprep_torch import reports

    assert len(reports.read_ades_psv(few / "report.ades.psv")) == 0 and len(reports.read_obs80(few / "report.obs80.txt")) == 0
    none = tmp_path / "none"
    shutil.copytree(out, none)
    doc = run_night(f"input={d / 'frames'}", f"output={none}", "min_snr=1e9")
    assert doc["n_tracklets"] == 0 and len(Table.read(none / "tracklets.ecsv")) == 0


def test_night_without_any_usable_frame_names_the_problem(sim_night, tmp_path):
    d, _ = sim_night
    with pytest.raises(ValueError, match="no input frame has a usable observation time.*DATE-OBS"):
        run_night(f"input={d / 'frames' / 'frame99.fits'}", f"output={tmp_path}")
    assert json.loads((tmp_path / "night.json").read_text())["frames"][0]["status"] == "failed"


def test_night_with_reference_and_science_detections(sim_night, tmp_path):
    from astroprep_torch.io import write_fits
    from astroprep_torch.sim import simulate_night

    d, paths = sim_night
    ref = simulate_night(**dict(SIM, n_frames=1, n_movers=0, n_transients=0, seed=SIM["seed"]))
    write_fits(tmp_path / "ref.fits", ref.frames[0].image, header=ref.frames[0].header)
    doc = run_night(f"input={d / 'frames'}", f"output={tmp_path / 'ref'}", f"reference={tmp_path / 'ref.fits'}")
    assert doc["template"] == "reference" and doc["detections"] == "difference"
    truth = Table.read(paths["truth"])
    for out in (tmp_path / "ref",):
        score = N.score_tracklets(Table.read(out / "tracklets.ecsv"), truth)
        assert score["found"] >= score["findable"] - 1 and score["purity"] == 1.0, score
    doc = run_night(f"input={d / 'frames'}", f"output={tmp_path / 'ref'}", f"reference={tmp_path / 'ref.fits'}",
                    "detections=science")
    score = N.score_tracklets(Table.read(tmp_path / "ref" / "tracklets.ecsv"), truth)
    assert score["found"] >= score["findable"] - 1 and score["purity"] == 1.0, score


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------
def test_commands_are_registered(capsys):
    from astroprep_torch import cli

    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "night" in out and "simulate-night" in out


def test_shapes_on_sky_through_an_astropy_wcs():
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 30.0]
    w.wcs.crpix = [50, 50]
    w.wcs.cdelt = [-2 / 3600, 2 / 3600]  # 2"/px, north up, east left
    a, b, pa = N._shapes_on_sky(w, np.array([49.0, 49.0]), np.array([49.0, 49.0]), np.array([3.0, 3.0]),
                                np.array([1.0, 1.0]), np.array([90.0, 0.0]))
    np.testing.assert_allclose(a, [6.0, 6.0], rtol=1e-4)
    np.testing.assert_allclose(b, [2.0, 2.0], rtol=1e-4)
    np.testing.assert_allclose(pa, [0.0, 90.0], atol=1e-3)  # along +y = north; along +x = west (PA 270 = 90 mod 180)


def test_readme_moving_objects_section_runs(tmp_path, monkeypatch):
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Moving objects"): text.index("## Development")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), ns)
    assert len(ns["trk"]) >= 10 and (tmp_path / "report.ades.psv").exists()
    from test_reports import iau_validate

    assert iau_validate(tmp_path / "report.ades.psv", tmp_path) == []


def test_night_products_ingest_into_the_web_app_and_report(night_run, tmp_path):
    """The real ``astroprep night`` output goes through ``ingest``; a validated object's report
    carries exactly its obs80 lines from ``tracklets.ecsv`` (columns 1-80, leading blanks included)."""
    pytest.importorskip("fastapi", reason="the web extra is not installed")
    from fastapi.testclient import TestClient

    from astroprep_torch.web import create_app
    from astroprep_torch.web.auth import upsert_user
    from astroprep_torch.web.db import open_database
    from astroprep_torch.web.ingest import ingest_run

    out, _ = night_run
    rows = Table.read(out / "tracklets.ecsv")
    url = f"sqlite:///{tmp_path / 'web.db'}"
    _, maker = open_database(url)
    info = ingest_run(maker, out, "2026-12-07")
    assert info["added"] and info["detections"] == len(rows)
    assert not ingest_run(maker, out, "2026-12-07")["added"]
    with maker() as s:
        upsert_user(s, "val", "validator", "val-pw")
        s.commit()
    client = TestClient(create_app(url, secret_key="test"))
    h = {"Authorization": "Bearer " + client.post("/api/token", json={"username": "val", "password": "val-pw"}).json()["token"]}
    night = client.get("/api/nights", headers=h).json()[0]
    field = client.get(f"/api/nights/{night['id']}/fields", headers=h).json()[0]
    objs = client.get(f"/api/fields/{field['id']}/objects", headers=h).json()
    assert sorted(o["designation"] for o in objs) == sorted(set(rows["trksub"]))
    first = objs[0]
    assert client.post(f"/api/objects/{first['id']}/label", json={"label": "valid"}, headers=h).status_code == 200
    report = client.get(f"/api/nights/{night['id']}/report.obs80", headers=h).text
    lines = [ln for ln in report.splitlines() if len(ln) == 80 and ln[14] == "C"]
    expected = [s.rjust(80) for s in rows["obs80"][rows["trksub"] == first["designation"]]]
    assert sorted(lines) == sorted(expected)


def test_night_from_raw_frames_with_bias_and_flat(tmp_path):
    """``astroprep night ... bias= flat=``: raw frames (bias pattern, overscan, vignetted flat) are
    calibrated once into ``<output>/calibrated/`` and the night is linked from the calibrated frames."""
    from astroprep_torch import sim

    night = sim.simulate_night(**SIM)
    cam = sim.make_camera(SIM["shape"], overscan=16, gain=night.frames[0].gain, seed=1)
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    for k, frame in enumerate(night.frames):
        sim.write_raw(raw_dir / f"frame{k:02d}.fits", sim.simulate_raw(frame, cam, seed=10 + k))
    cal = sim.simulate_calibration_frames(cam, n_bias=3, n_dark=0, n_flat=3, seed=2)
    for kind in ("bias", "flat"):
        for i, fr in enumerate(cal[kind]):
            sim.write_raw(tmp_path / f"{kind}{i}.fits", fr)
    out = tmp_path / "out"
    doc = run_night(f"input={raw_dir}", f"output={out}", f"bias={tmp_path / 'bias*.fits'}", f"flat={tmp_path / 'flat*.fits'}")
    calibrated = sorted((out / "calibrated").glob("frame*.cal.fits"))
    assert len(calibrated) == SIM["n_frames"]
    with fits.open(calibrated[0]) as h:
        assert h[0].header.get("BIASCORR") and h[0].header.get("FLATCORR") and h[0].data.shape == SIM["shape"]
    assert all(f["status"] == "ok" for f in doc["frames"]) and "calibrate" in doc["timings"]
    assert doc["n_tracklets"] >= 1


@pytest.mark.slow
def test_night_with_astrometry_before_alignment(tmp_path):
    """Frames whose headers are off by 20" and 0.5 deg: with astrometry.catalog the night solves them
    first (the template and the alignment go through the solved WCS) and finds the movers as with the
    exact headers."""
    import math

    from astroprep_torch.sim import simulate_night

    night = simulate_night(**SIM)
    paths = N.write_simulated_night(night, tmp_path / "frames")
    Table({"ra": night.stars["ra"].numpy(), "dec": night.stars["dec"].numpy(),
           "mag": night.stars["mag"].numpy()}).write(tmp_path / "stars.ecsv")
    c, s = math.cos(math.radians(0.5)), math.sin(math.radians(0.5))
    for p in paths["frames"]:
        with fits.open(p, mode="update") as hdul:
            h = hdul[0].header
            h["CRVAL1"] += 20 / 3600 / math.cos(math.radians(h["CRVAL2"]))
            h["CRVAL2"] -= 20 / 3600
            cd = np.array([[h["CD1_1"], h["CD1_2"]], [h["CD2_1"], h["CD2_2"]]]) @ np.array([[c, -s], [s, c]])
            h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = cd.ravel()
    out = tmp_path / "out"
    run_night(f"input={tmp_path / 'frames'}", f"output={out}", f"astrometry.catalog={tmp_path / 'stars.ecsv'}")
    assert sorted(p.name for p in (out / "solved").glob("*.fits")) == sorted(Path(p).name for p in paths["frames"])
    score = N.score_tracklets(Table.read(out / "tracklets.ecsv"), Table.read(paths["truth"]))
    assert score["findable"] >= 4 and score["found"] >= score["findable"] - 1 and score["purity"] == 1.0, score
