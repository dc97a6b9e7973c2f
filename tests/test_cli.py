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


def _astroprep(*args, timeout=600, env=None, status=0):
    """Run `astroprep`; its exit status must be ``status`` (1: some frames failed)."""
    cmd = [sys.executable, "-m", "astroprep_torch.cli", *args]
    e = dict(os.environ, **(env or {}))
    e.pop("ASTROPREP_COMMAND", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=e)
    assert proc.returncode == status, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
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
    _astroprep("run", f"output={out}", *SMALL)
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
               env={"OMP_NUM_THREADS": "1"}, status=1)  # a frame failed: exit status 1
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


# -- #20: honest exit codes, unique names, no orphans, a wheel that runs --------------------------
def _astroprep_rc(*args, timeout=600, env=None, cwd=ROOT, exe=None):
    cmd = [*(exe or [sys.executable, "-m", "astroprep_torch.cli"]), *args]
    e = dict(os.environ, **(env or {}))
    e.pop("ASTROPREP_COMMAND", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=e)
    return proc.returncode, proc.stdout, proc.stderr


def test_mixed_folder_unique_names_bad_frames_and_exit_status(demo_run, tmp_path):
    """Two folders with a frame `a` each, a 1x1 file, an all-NaN and an all-zero frame, a frame of
    another field, batched by 2: both `a` frames get their own products, every bad frame is failed
    with what is wrong with it, the run exits 1 and says how many failed; a rerun skips the two."""
    import numpy as np
    from astropy.io import fits

    from astroprep_torch.pipeline import read_manifest

    src, _ = demo_run
    sci = src / "inputs" / "science.fits"
    (tmp_path / "collide").mkdir()
    (tmp_path / "collide2").mkdir()
    (tmp_path / "collide" / "a.fits").write_bytes(sci.read_bytes())
    (tmp_path / "collide2" / "a.fits").write_bytes(sci.read_bytes())
    with fits.open(sci) as h:
        header, shape = h[0].header, h[0].data.shape
    fits.writeto(tmp_path / "collide" / "one.fits", np.ones((1, 1), np.float32))
    fits.writeto(tmp_path / "collide" / "nan.fits", np.full(shape, np.nan, np.float32), header)
    fits.writeto(tmp_path / "collide2" / "zero.fits", np.zeros(shape, np.float32), header)
    far = header.copy()
    far["CRVAL1"] = (far["CRVAL1"] + 40.0) % 360.0
    fits.writeto(tmp_path / "collide2" / "far.fits", fits.getdata(sci), far)
    out = tmp_path / "out"
    args = ["run", f"input=[{tmp_path / 'collide'},{tmp_path / 'collide2'}]", f"reference={src / 'inputs' / 'reference.fits'}",
            f"output={out}", "data.batch_size=2", "async_write=thread", *SMALL[4:]]
    rc, stdout, stderr = _astroprep_rc(*args)
    assert rc == 1, stderr[-3000:]
    assert "4 of 6 frame(s) failed" in stderr
    rows = read_manifest(out)
    assert {k: v["status"] for k, v in rows.items()} == {
        "collide__a": "ok", "collide2__a": "ok", "one": "failed", "nan": "failed", "zero": "failed", "far": "failed"}
    assert rows["one"]["reason"] == "frame too small: 1x1 pixels (at least 16x16 needed)"
    assert rows["nan"]["reason"].startswith("empty frame: every pixel is NaN")
    assert rows["zero"]["reason"] == "empty frame: every usable pixel equals 0"
    assert rows["far"]["reason"].startswith("no overlap")
    assert (out / "collide__a.diff.fits").exists() and (out / "collide2__a.diff.fits").exists()
    assert "stamp" not in stdout
    rc, _, _ = _astroprep_rc(*args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert rc == 1 and metrics["skipped_finished"] == 2 and metrics["processed"] == 0 and len(metrics["failed"]) == 4


def test_bad_reference_message_exit_2_no_traceback(demo_run, tmp_path):
    src, _ = demo_run
    rc, _, stderr = _astroprep_rc("run", f"input={src / 'inputs' / 'science.fits'}", f"reference={tmp_path / 'missing.fits'}",
                                  f"output={tmp_path / 'out'}", *SMALL[4:], timeout=300)
    assert rc == 2 and "astroprep run: error: reference" in stderr and "FITS file not found" in stderr, stderr
    assert "Traceback" not in stderr and "Error executing job" not in stderr


def _descendants(pid: int) -> list:
    children: dict = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _shm_files(pids) -> set:
    found = set()
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    found.add(line.split()[5])
        except (OSError, IndexError):
            pass
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_run_and_look(demo_run, tmp_path, group: bool):
    """Start a run over a folder (reader process from a fork server, writer process), SIGKILL it
    once every helper is up; returns the helpers still alive and the /dev/shm files still there."""
    import signal
    import time

    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc (Linux)")
    src, _ = demo_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(6):
        (inputs / f"f{i}.fits").write_bytes((src / "inputs" / "science.fits").read_bytes())
    args = ["run", f"input={inputs}", f"reference={src / 'inputs' / 'reference.fits'}", f"output={tmp_path / 'out'}",
            "async_write=process", "data.num_workers=1", "data.multiprocessing_context=forkserver", *SMALL[4:-1]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ASTROPREP_COMMAND", None)
    proc = subprocess.Popen([sys.executable, "-m", "astroprep_torch.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    helpers, shm = set(), set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            kids = _descendants(proc.pid)
            helpers |= set(kids)
            shm |= _shm_files([proc.pid, *kids])
            cmds = " ".join(Path(f"/proc/{k}/cmdline").read_text(errors="replace") for k in kids if _alive(k))
            if "forkserver" in cmds and "spawn_main" in cmds and len(kids) >= 4:  # tracker, writer, server, reader
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before its helpers were all up"
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (any(_alive(p) for p in helpers) or any(Path(s).exists() for s in shm)):
        time.sleep(0.2)
    left = [(p, _cmdline(p)) for p in helpers if _alive(p)]
    for p, _ in left:  # do not leave them to the next test
        os.kill(p, signal.SIGKILL)
    return left, sorted(s for s in shm if Path(s).exists()), helpers


def test_kill_9_leaves_no_orphans_nor_shared_memory(demo_run, tmp_path):
    left, shm, helpers = _kill_run_and_look(demo_run, tmp_path, group=False)
    assert len(helpers) >= 4
    assert not left, f"helpers outlived the killed run: {left}"
    assert not shm, f"left in /dev/shm: {shm}"


@pytest.mark.slow
def test_kill_9_of_the_process_group_leaves_nothing_in_dev_shm(demo_run, tmp_path):
    left, shm, _ = _kill_run_and_look(demo_run, tmp_path, group=True)
    assert not left and not shm, (left, shm)


def _build_wheel(tmp_path) -> Path:
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    for name in ("astroprep_torch", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "wheel")], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("astroprep_torch-*.whl")
    return wheel


def test_wheel_ships_every_config(tmp_path):
    import zipfile

    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "astroprep_torch/configs/config.yaml" in names
    want = {f"astroprep_torch/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert want <= names, sorted(want - names)
    assert "astroprep_torch/weights/quality_default.pt" in names


@pytest.mark.slow
def test_cli_from_a_wheel_in_a_fresh_venv(tmp_path):
    """Install the wheel (no deps) into a fresh venv that sees this environment's packages (torch is
    not downloaded again) but not this checkout, and run `astroprep` from an unrelated folder."""
    import site
    import sysconfig

    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if Path(p).is_dir()]
    Path(purelib, "_outer_env.pth").write_text("\n".join(deps) + "\n")  # plain paths: no editable hooks
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    exe = [str(venv / "bin" / "astroprep")]
    env = {"PYTHONPATH": ""}
    work = tmp_path / "elsewhere"
    work.mkdir()
    rc, out, err = _astroprep_rc("--help", exe=exe, env=env, cwd=work)
    assert rc == 0 and "simulate" in out, err
    where = subprocess.run([str(py), "-c", "import astroprep_torch.cli as c; print(c.__file__, c.config_dir())"],
                           capture_output=True, text=True, cwd=work, env=dict(os.environ, PYTHONPATH="")).stdout
    assert str(venv) in where and str(ROOT) not in where, where
    rc, out, err = _astroprep_rc("simulate", f"output={work / 'sim'}", "sim.shape=[128,128]", "sim.n_stars=40",
                                 exe=exe, env=env, cwd=work)
    assert rc == 0 and (work / "sim" / "science.fits").exists(), err[-3000:]
    rc, out, err = _astroprep_rc("run", f"output={work / 'run'}", *SMALL, exe=exe, env=env, cwd=work)
    assert rc == 0 and "astroprep run summary" in out, err[-3000:]

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
