"""The `astroprep` command: simulate, run end to end, resume, bad files, DDP with 2 CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from astroprep_torch import cli

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["sim.shape=[256,256]", "sim.n_stars=150", "sim.n_transients=6", "sim.n_moving=1", "quicklook=false",
         "subtract.spatial_order=1", "subtract.stamp_grid=[4,4]",
         "trainer.enable_progress_bar=false", "data.num_workers=0"]


def _astroprep(*args, timeout=600, env=None):
    cmd = [sys.executable, "-m", "astroprep_torch.cli", *args]
    e = dict(os.environ, **(env or {}))
    e.pop("ASTROPREP_COMMAND", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=e)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_usage_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "run" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2


def test_simulate_writes_fits_with_wcs(tmp_path):
    out = _astroprep("simulate", f"output={tmp_path}", "sim.shape=[128,128]", "sim.n_stars=40")
    assert "simulated a 128x128 epoch pair" in out
    from astroprep_torch.io import read_fits

    f = read_fits(tmp_path / "science.fits")
    assert f.data.shape == (1, 1, 128, 128) and f.wcs is not None


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    stdout = _astroprep("run", f"output={out}", *SMALL)
    return out, stdout


def test_run_end_to_end_on_embedded_field(demo_run):
    out, stdout = demo_run
    assert "astroprep run summary" in stdout and "per-stage time" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processed"] == 1 and not metrics["failed"]
    for stage in ("quality", "background_science", "align", "subtract", "detect_candidates", "detect_science", "stretch"):
        assert stage in metrics["stage_seconds"], stage
    for suffix in ("aligned.fits", "diff.fits", "diffvar.fits", "bkg.fits", "rms.fits", "candidates.ecsv", "cat.ecsv", "triplets.pt", "norm.pt"):
        assert (out / f"science.{suffix}").exists(), suffix
    assert (out / "config.yaml").exists()
    # Transients injected into the science frame are found in the difference.
    assert metrics["transients_recovered"] >= 0.8 * metrics["transients_injected"]
    import torch
    from astropy.table import Table

    cat = Table.read(out / "science.cat.ecsv")
    assert {"X_IMAGE", "Y_IMAGE", "FLUX_AUTO", "FLUX_APER"} <= set(cat.colnames)
    trip = torch.load(out / "science.triplets.pt", weights_only=True)
    assert trip.shape[1:] == (3, 63, 63) and trip.shape[0] == metrics["candidates"]


def test_rerun_resumes(demo_run, tmp_path):
    out, _ = demo_run
    stdout = _astroprep("run", f"output={out}", *SMALL)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_finished"] == 1 and metrics["processed"] == 0


def test_folder_with_a_corrupt_file_and_ddp(demo_run, tmp_path):
    src, _ = demo_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    sci = (src / "inputs" / "science.fits").read_bytes()
    for i in range(4):
        (inputs / f"f{i}.fits").write_bytes(sci)
    (inputs / "corrupt.fits").write_bytes(sci[: len(sci) // 3])  # truncated
    out = tmp_path / "out"
    _astroprep("run", f"input={inputs}", f"reference={src / 'inputs' / 'reference.fits'}", f"output={out}",
               "trainer.devices=2", "trainer.strategy=ddp", "async_write=thread", *SMALL[4:],
               env={"OMP_NUM_THREADS": "1"})
    from astroprep_torch.pipeline import read_manifest

    rows = read_manifest(out)
    assert {k: v["status"] for k, v in rows.items()} == {"f0": "ok", "f1": "ok", "f2": "ok", "f3": "ok", "corrupt": "failed"}
    assert "corrupt" in rows and rows["corrupt"]["reason"]
    # Both ranks worked, each frame was written once.
    lines = [json.loads(l) for f in out.glob("manifest.rank*.jsonl") for l in f.read_text().splitlines()]
    assert sorted(r["name"] for r in lines) == ["corrupt", "f0", "f1", "f2", "f3"]
    assert {r["rank"] for r in lines} == {0, 1}


def test_classic_tool_presets(demo_run, tmp_path):
    """Drop-in presets: SExtractor check images and catalogs, SWarp-like reprojection."""
    src, _ = demo_run
    sci, ref = src / "inputs" / "science.fits", src / "inputs" / "reference.fits"
    fast = ["trainer.enable_progress_bar=false", "async_write=thread"]  # the writer process is tested elsewhere
    _astroprep("background", f"input={sci}", f"output={tmp_path / 'b'}", *fast)
    assert (tmp_path / "b" / "science.bkg.fits").exists() and (tmp_path / "b" / "science.rms.fits").exists()
    _astroprep("extract", f"input={sci}", f"output={tmp_path / 'e'}", *fast)
    from astropy.table import Table

    assert len(Table.read(tmp_path / "e" / "science.cat.ecsv")) > 50
    _astroprep("reproject", f"input={sci}", f"reference={ref}", f"output={tmp_path / 'r'}",
               *fast, "pipeline.stages.align.module.interpolation=bilinear")
    from astroprep_torch.io import read_fits

    aligned = read_fits(tmp_path / "r" / "science.aligned.fits")
    assert aligned.data.shape == read_fits(ref).data.shape and aligned.wcs is not None


def test_multirun_sweep_writes_metrics_per_run(tmp_path):
    """`astroprep run -m background.box_size=32,64`: one run per value, each with its metrics and config."""
    sweep = tmp_path / "sweep"
    tiny = ["sim.shape=[192,192]", "sim.n_stars=80", "sim.n_transients=4", "sim.n_moving=0", "async_write=thread",
            *SMALL[4:]]
    _astroprep("run", "-m", "background.box_size=32,64", f"hydra.sweep.dir={sweep}", *tiny)
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    metrics = [json.loads((p / "metrics.json").read_text()) for p in runs]
    for m, box in zip(metrics, (32, 64)):
        assert m["processed"] == 1 and not m["failed"]
        assert f"background.box_size={box}" in m["overrides"]
        assert {"catalog_sources", "candidates", "stage_seconds"} <= set(m)
    import yaml

    boxes = [yaml.safe_load((p / "config.yaml").read_text())["background"]["box_size"] for p in runs]
    assert boxes == [32, 64]
    # The swept parameter changed the products: the background maps differ between the runs.
    from astroprep_torch.io import read_fits

    b0, b1 = (read_fits(p / "science.bkg.fits").data for p in runs)
    assert (b0 - b1).abs().max() > 0
    # One comparable row per run in <sweep dir>/sweep.jsonl.
    rows = [json.loads(line) for line in (sweep / "sweep.jsonl").read_text().splitlines()]
    assert sorted(r["job"] for r in rows) == [0, 1]
    assert {r["output"] for r in rows} == {str(p) for p in runs}


def test_killed_mid_run_then_rerun_loses_and_duplicates_nothing(demo_run, tmp_path):
    """SIGKILL a run over a folder once its first frames are written, rerun the same command: every
    frame ends up with all its products exactly once, finished frames are not redone, the manifest
    lists each frame once as ok, and no half-written or temporary file is left behind."""
    import signal
    import time

    from astroprep_torch.pipeline import read_manifest

    src, _ = demo_run
    sci = (src / "inputs" / "science.fits").read_bytes()
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = [f"f{i:02d}" for i in range(10)]
    for n in names:
        (inputs / f"{n}.fits").write_bytes(sci)
    out = tmp_path / "out"
    args = ["run", f"input={inputs}", f"reference={src / 'inputs' / 'reference.fits'}", f"output={out}",
            "async_write=process", *SMALL[4:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ASTROPREP_COMMAND", None)
    proc = subprocess.Popen([sys.executable, "-m", "astroprep_torch.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.glob("f*.diff.fits"))) >= 2:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its writer / reader processes
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_before = {k for k, v in read_manifest(out).items() if v["status"] == "ok"}
    assert len(done_before) < len(names)

    _astroprep(*args, env={"OMP_NUM_THREADS": "1"})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_finished"] == len(done_before), (metrics, done_before)
    assert metrics["processed"] == len(names) - len(done_before)
    rows = read_manifest(out)
    assert {k: v["status"] for k, v in rows.items()} == {n: "ok" for n in names}
    lines = [json.loads(l) for f in out.glob("manifest.rank*.jsonl") for l in f.read_text().splitlines()]
    ok_rows = [r["name"] for r in lines if r["status"] == "ok"]
    assert sorted(ok_rows) == sorted(names), "a frame was finished twice or not at all"
    suffixes = {p.name[len("f00"):] for p in out.glob("f00.*")}
    assert {".diff.fits", ".cat.ecsv", ".candidates.ecsv"} <= suffixes, suffixes
    from astroprep_torch.io import read_fits

    for n in names:
        assert {p.name[len(n):] for p in out.glob(f"{n}.*")} == suffixes, n
        assert read_fits(out / f"{n}.diff.fits").data.shape[-2:] == (256, 256)
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name], "temporary files left behind"


def test_import_sets_the_openmp_wait_policy_before_torch():
    """Issue 19 item 4: `import astroprep_torch` (and so the CLI) sets OMP_WAIT_POLICY=PASSIVE when
    unset, before torch loads; an explicit value wins; imported after torch it warns."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = root

    def run(code, **extra):
        return subprocess.run([sys.executable, "-W", "always", "-c", code], env={**env, **extra},
                              capture_output=True, text=True, check=True)

    first = run("import os, astroprep_torch, torch; print(os.environ['OMP_WAIT_POLICY'])")
    assert first.stdout.strip() == "PASSIVE" and "RuntimeWarning" not in first.stderr
    assert run("import os, astroprep_torch; print(os.environ['OMP_WAIT_POLICY'])",
               OMP_WAIT_POLICY="ACTIVE").stdout.strip() == "ACTIVE"
    late = run("import torch, astroprep_torch")
    assert "imported after torch" in late.stderr


def test_gpu_check_fails_clearly_without_cuda():
    """Issue 19 item 6: experiments/gpu_check.sh refuses at once, saying why, where torch sees no CUDA."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the script would run the GPU check")
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(["bash", str(root / "experiments" / "gpu_check.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stderr
