"""Throughput of pipeline mode: is the I/O hidden behind computation?

Usage:
    python experiments/pipeline_throughput.py                      # 100 frames of 2048^2 (issue #9)
    python experiments/pipeline_throughput.py --frames 8 --size 512 --blocks 2 --plan compute,w2,w0,w2sync \
        --name pipeline_throughput_quick

The issue's evidence: on 100 frames of 2048^2 with 2 reader workers, pipeline mode runs within 10% of
the compute-only rate. The script

1. writes ``--frames`` simulated 2048^2 FITS frames (one simulated GWAC-like field, fresh noise per
   frame, TAN-SIP WCS) and the reference epoch to a temporary folder;
2. **compute-only** (``compute`` in ``--plan``): reads the frames into memory first, then times
   ``PreprocessModule.predict_step`` (the default graph, configs/pipeline/gwac.yaml, built with Hydra)
   over the in-memory batches: no reading, no writing;
3. **pipeline mode** (``w2``: 2 workers; ``w0``; ``w2sync``: writer in the loop): ``Trainer.predict``
   over ``FitsFrameDataModule`` + ``PreprocessModule`` + ``FrameWriter`` (every default product: 5
   FITS images with WCS, 2 ECSV catalogs, 2 tensor shards per frame, and the manifest);
4. reports frames/s and the ratio to compute-only, and where the main thread's time went (waiting for
   data, computing, writing), plus the single-threaded cost of reading and writing one frame.

The machine is shared, so the frames are split into ``--blocks`` blocks and every block runs the
whole plan in turn: load changes from other users then hit every mode alike, and each block gives
a paired ratio.

Disk: one frame's products take ~100 MB at 2048^2. A run keeps its products, as a real run does
(the kernel then also writes them back to disk), and they are deleted after the run, outside the
timing: a block of 10 frames needs ~1 GB. ``--delete-as-you-go`` (for small disks) instead deletes a
frame's products once the next batches are written, in the main thread, which then pays the unlink
(ext4 with ``discard``: several ms per file). The writer process of pipeline mode is started before
the first block (it lives as long as the Python process, as the graph's warm-up does).
Writes experiments/results/<name>.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin (2-core machine)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPUTE = "compute-only (frames in memory, no writing)"


def build_pipeline(overrides=()):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["output=/tmp/unused", *overrides])
    return instantiate(cfg.pipeline)


def write_frames(folder: Path, n: int, size: int, stars: int, seed: int = 0):
    """One simulated field (reference + science epoch), ``n`` science frames with fresh noise each."""
    from astroprep_torch import sim
    from astroprep_torch.io import write_fits

    pair = sim.simulate_pair((size, size), n_stars=stars, sip=True, shift=(3.3, -2.7), rotation=0.05,
                             n_transients=20, n_moving=5, seed=seed)
    ref_path = folder / "reference.fits"
    write_fits(ref_path, pair.reference.image, header=pair.reference.header)
    frames = folder / "frames"
    frames.mkdir()
    sci = pair.science
    sigma = sci.variance.clamp(min=0).sqrt()
    gen = torch.Generator().manual_seed(seed + 1)
    paths = []
    for i in range(n):
        img = sci.noiseless + sigma * torch.randn(sci.noiseless.shape, generator=gen)
        p = frames / f"frame{i:04d}.fits"
        write_fits(p, img, header=sci.header)
        paths.append(p)
    return paths, ref_path


class MainThreadClock:
    """Where the main (compute) thread spends its time: per batch, compute and write seconds."""

    def __init__(self):
        self.compute: list[float] = []
        self.write: list[float] = []
        self.batch_end: list[float] = []
        self.frames_per_batch: list[int] = []


def timed_module(module, clock: MainThreadClock):
    step = module.predict_step

    def predict_step(batch, batch_idx=0, dataloader_idx=0):
        t0 = time.perf_counter()
        out = step(batch, batch_idx, dataloader_idx)
        clock.compute.append(time.perf_counter() - t0)
        clock.frames_per_batch.append(len(batch["name"]))
        return out

    module.predict_step = predict_step
    return module


def make_callbacks(writer, clock: MainThreadClock, keep: bool):
    import lightning as L

    write = writer.write_on_batch_end

    def write_on_batch_end(*args, **kwargs):
        t0 = time.perf_counter()
        write(*args, **kwargs)
        clock.write.append(time.perf_counter() - t0)

    writer.write_on_batch_end = write_on_batch_end

    class Tick(L.Callback):
        """Timestamps batch ends; deletes products of frames written two batches ago (disk space)."""

        def __init__(self):
            self.seen = 0

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            clock.batch_end.append(time.perf_counter())
            if keep:
                return
            rows = list(writer.rows)  # rows appended by the writer (its thread, when asynchronous)
            for r in rows[self.seen: max(self.seen, len(rows) - 4)]:
                for f in r["outputs"]:
                    (writer.output_dir / f).unlink(missing_ok=True)
            self.seen = max(self.seen, len(rows) - 4)

    return [writer, Tick()]


def load_reference(ref_path):
    from astroprep_torch.io import read_fits

    return read_fits(ref_path)


_WARM = set()


def run_compute_only(pipeline, ref, paths, batch_size: int, warmup: int):
    """predict_step over frames already in memory (collated batches); returns (steady, fps_all, timings),
    ``steady`` = (frames, seconds) after the warm-up frames."""
    from astroprep_torch.data import FitsFrameDataset, collate_frames
    from astroprep_torch.pipeline import PreprocessModule

    ds = FitsFrameDataset(paths)
    batches = [collate_frames([ds[j] for j in range(i, min(i + batch_size, len(ds)))]) for i in range(0, len(ds), batch_size)]
    module = PreprocessModule(pipeline, reference=ref.data, reference_mask=ref.mask, reference_header=ref.header)
    if id(pipeline) not in _WARM:  # first call of the graph: allocations, lazy imports
        module.predict_step(batches[0])
        _WARM.add(id(pipeline))
    ends, t0 = [], time.perf_counter()
    stages: dict[str, float] = {}
    with torch.inference_mode():
        for i, b in enumerate(batches):
            out = module.predict_step(b, i)
            assert not out["failed"], out["failed"]
            for k, v in out["timings"].items():
                stages[k] = stages.get(k, 0.0) + v
            del out
            ends.append(time.perf_counter())
    n = len(paths)
    steady = _steady_fps(ends, [batch_size] * len(batches), warmup, t0)
    return steady, n / (ends[-1] - t0), {k: v / n for k, v in stages.items()}


def _steady_fps(ends, frames_per_batch, warmup_frames, t_start):
    """(frames, seconds) between the end of the batch that completes ``warmup_frames`` and the last end."""
    done, k = 0, -1
    for k, f in enumerate(frames_per_batch):
        done += f
        if done >= warmup_frames:
            break
    if k < 0 or k >= len(ends) - 1:
        return sum(frames_per_batch), ends[-1] - t_start
    return sum(frames_per_batch) - done, ends[-1] - ends[k]


def writer_of(step: str, default: str):
    """FrameWriter(asynchronous=...) of a plan step w<N>[sync|thread|process]."""
    mode = next((m for m in ("sync", "thread", "process") if step.endswith(m)), "")
    return {"sync": False, "thread": "thread", "process": "process"}.get(mode, default)


def run_pipeline_mode(pipeline, ref, paths, out_dir: Path, workers: int, batch_size: int, warmup: int,
                      async_write: bool, keep: bool, loader_context=None):
    import lightning as L

    from astroprep_torch.data import FitsFrameDataModule
    from astroprep_torch.pipeline import FrameWriter, PreprocessModule, read_manifest

    if out_dir.exists():
        shutil.rmtree(out_dir)
    clock = MainThreadClock()
    writer = FrameWriter(out_dir, reference_header=ref.header, asynchronous=async_write)
    dm = FitsFrameDataModule(paths, batch_size=batch_size, num_workers=workers, prefetch_factor=2, pin_memory=False,
                             multiprocessing_context=loader_context)
    module = timed_module(PreprocessModule(pipeline, reference=ref.data, reference_mask=ref.mask,
                                           reference_header=ref.header), clock)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=make_callbacks(writer, clock, keep))
    t0 = time.perf_counter()
    trainer.predict(module, datamodule=dm, return_predictions=False)
    wall = time.perf_counter() - t0
    rows = read_manifest(out_dir)
    ok = sum(r["status"] == "ok" for r in rows.values())
    n = len(paths)
    steady = _steady_fps(clock.batch_end, clock.frames_per_batch, warmup, t0)
    w = min(max(1, warmup // batch_size), len(clock.batch_end) - 1)  # batches left out of the profile
    if w < 1:
        raise SystemExit("pipeline_throughput: a run needs at least 2 batches (more frames per block)")
    idx = range(w, len(clock.batch_end))  # batch i: from the end of batch i-1 to the end of batch i
    gaps = [clock.batch_end[i] - clock.batch_end[i - 1] for i in idx]
    prof = {
        "compute": statistics.fmean(clock.compute[i] for i in idx) / batch_size,
        "write (main thread)": statistics.fmean(clock.write[i] for i in idx) / batch_size,
    }
    prof["other (waiting for data, loop)"] = statistics.fmean(gaps) / batch_size - prof["compute"] - prof["write (main thread)"]
    wt = getattr(writer, "write_seconds", None)
    if wt:
        prof["write (writer thread/process, overlapped)"] = statistics.fmean(wt[warmup:] or wt)
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"steady": steady, "all": n / wall, "ok": ok, "n": n, "profile": prof}


def profile_io(paths, ref, pipeline, out_dir: Path, reps: int = 3):
    """Single-threaded cost of the I/O parts for one frame: read (worker's work), write every product."""
    from astroprep_torch.data import FitsFrameDataset, collate_frames
    from astroprep_torch.pipeline import FrameWriter, PreprocessModule

    ds = FitsFrameDataset(paths)
    t_read = []
    for i in range(reps):
        t0 = time.perf_counter()
        collate_frames([ds[i]])
        t_read.append(time.perf_counter() - t0)
    module = PreprocessModule(pipeline, reference=ref.data, reference_mask=ref.mask, reference_header=ref.header)
    pred = module.predict_step(collate_frames([ds[0]]))
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = FrameWriter(out_dir, reference_header=ref.header)
    per_product: dict[str, list] = {}
    from astropy.io import fits

    header = fits.Header.fromstring(pred["headers"][0])
    for _ in range(reps):
        for key, (kind, suffix, grid, *rows_of) in writer.products.items():
            if key not in pred["outputs"]:
                continue
            h = writer.reference_header if grid == "reference" else header
            cat = pred["outputs"].get(rows_of[0]) if rows_of else None
            t0 = time.perf_counter()
            writer._write_one("frame", pred["outputs"][key], kind, suffix, h, 0, 1, cat)
            per_product.setdefault(f"{key} ({kind})", []).append(time.perf_counter() - t0)
    shutil.rmtree(out_dir, ignore_errors=True)
    return statistics.median(t_read), {k: statistics.median(v) for k, v in per_product.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--stars", type=int, default=None, help="default: GWAC density (20000 per 4136x4096)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--plan", default="compute,w2",
                    help="runs in order: compute (compute-only), w<N> (pipeline mode, N workers), w<N>sync (writer in the loop)")
    ap.add_argument("--warmup", type=int, default=None, help="frames left out of the steady rate (default 5%%, >= 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=10,
                    help="split the frames into this many blocks and run the whole plan on each block in turn")
    ap.add_argument("--delete-as-you-go", action="store_true",
                    help="delete each frame's products during the run (disk space), not after it")
    ap.add_argument("--tmp", default=None, help="folder for the frames and outputs (default: system temp)")
    ap.add_argument("--name", default="pipeline_throughput")
    ap.add_argument("--writer", default="process", choices=("process", "thread"),
                    help="where plan steps w<N> write (w<N>thread / w<N>process / w<N>sync name it)")
    ap.add_argument("--no-retain", action="store_true",
                    help="leave glibc malloc's defaults (astroprep run calls astroprep_torch.retain_freed_memory())")
    ap.add_argument("--loader-context", default=None, choices=("fork", "spawn", "forkserver"),
                    help="FitsFrameDataModule(multiprocessing_context=...) (default: configs/data/fits.yaml's)")
    args = ap.parse_args()
    from omegaconf import OmegaConf

    loader_context = args.loader_context or OmegaConf.load(ROOT / "configs" / "data" / "fits.yaml").get(
        "multiprocessing_context")
    torch.set_num_threads(args.threads)
    if not args.no_retain:
        from astroprep_torch import retain_freed_memory

        retain_freed_memory()  # as `astroprep run` does (config retain_memory: true)
    stars = args.stars if args.stars is not None else int(round(20000 * args.size ** 2 / (4136 * 4096)))
    warmup = args.warmup if args.warmup is not None else max(2, args.frames // 20)
    command = "python experiments/pipeline_throughput.py " + " ".join(sys.argv[1:])
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        paths, ref_path = write_frames(tmp, args.frames, args.size, stars)
        t_sim = time.perf_counter() - t0
        print(f"wrote {args.frames} frames of {args.size}^2 ({stars} stars) in {t_sim:.1f} s", flush=True)
        ref = load_reference(ref_path)
        pipeline = build_pipeline()

        t_read, t_write = profile_io(paths, ref, pipeline, tmp / "profile")
        print(f"read one frame {t_read:.3f} s; write products {sum(t_write.values()):.3f} s {t_write}", flush=True)

        steps = [st.strip().partition("@g")[0] for st in args.plan.split(",")]
        if any(st.startswith("w") and writer_of(st, args.writer) == "process" for st in steps):
            from astroprep_torch.pipeline import _writer_service

            _writer_service()  # the writer process starts once per Python process (seconds): before timing
        results: dict[str, list] = {}
        stages: dict[str, float] = {}
        blocks = max(1, args.blocks)
        chunks = [paths[i * len(paths) // blocks:(i + 1) * len(paths) // blocks] for i in range(blocks)]
        w_block = 1 if blocks > 1 else warmup  # frames left out of each run's steady rate
        graphs = {None: pipeline}  # graph-workers override (plan step suffix @g<N>) -> pipeline
        for bi, chunk in enumerate(chunks):
            for step in args.plan.split(","):
                step, _, gw = step.strip().partition("@g")
                gw = int(gw) if gw else None
                if gw not in graphs:
                    graphs[gw] = build_pipeline([f"pipeline.workers={gw}"])
                pipe = graphs[gw]
                suffix = f" [graph workers {gw}]" if gw is not None else ""
                if step == "compute":
                    label = COMPUTE + suffix
                    steady, allfps, st = run_compute_only(pipe, ref, chunk, args.batch_size, w_block)
                    if gw is None:
                        for k, v in st.items():
                            stages[k] = stages.get(k, 0.0) + v * len(chunk) / len(paths)
                    r = {"steady": steady, "all": allfps, "profile": {}}
                elif step.startswith("w"):
                    mode = next((m for m in ("sync", "thread", "process") if step.endswith(m)), "")
                    w = int(step[1:len(step) - len(mode)])
                    async_write = writer_of(step, args.writer)
                    where = {False: "in the loop", "thread": "on a thread", "process": "in a writer process"}[async_write]
                    label = f"pipeline mode, num_workers={w}, writer {where}" + suffix
                    r = run_pipeline_mode(pipe, ref, chunk, tmp / "out", w, args.batch_size, w_block, async_write,
                                          not args.delete_as_you_go, loader_context)
                else:
                    raise SystemExit(f"--plan: unknown step {step!r} (compute, w<N>, w<N>sync, w<N>thread, w<N>process, "
                                     "each optionally @g<N> for the graph's pipeline.workers)")
                r["block"] = bi
                results.setdefault(label, []).append(r)
                fr, sec = r["steady"]
                print(f"[{time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.2f}] block {bi}: {label}: "
                      f"{fr / sec:.3f} frames/s steady, {r['all']:.3f} overall, profile {r['profile']}", flush=True)
    load_after = os.getloadavg()

    def pooled(rs):
        return sum(r["steady"][0] for r in rs) / sum(r["steady"][1] for r in rs)

    base = pooled(results[COMPUTE])
    import astropy
    import lightning

    order = (f"{blocks} interleaved blocks of {len(paths) // blocks} frames, each block running {args.plan} in turn "
             f"(so load drift from other users hits every mode alike); steady rate of a run: after its first frame"
             if blocks > 1 else f"runs in this order: {args.plan}; steady rate: after the first {warmup} frames")
    deletion = ("each frame's products are deleted during the run (--delete-as-you-go)" if args.delete_as_you_go
                else "a run keeps its products (deleted after it, untimed)")
    lines = [f"# Pipeline-mode throughput ({args.frames} frames of {args.size}x{args.size})", "",
             f"Command: `{command}`", "",
             machine() + f"; 1-min load average before the run {load_before[0]:.2f}, after {load_after[0]:.2f} "
             f"(other agents share the 2 cores). torch {torch.__version__}, lightning {lightning.__version__}, "
             f"astropy {astropy.__version__}, Python {sys.version.split()[0]}.", "",
             f"Frames: one simulated GWAC-like field ({stars} stars, TAN-SIP WCS, 20 transients), fresh noise per "
             f"frame, float32 FITS ({args.size ** 2 * 4 / 1e6:.1f} MB each); the reference epoch given. Graph: "
             f"configs/pipeline/gwac.yaml (eager), batch size {args.batch_size}, {args.threads} torch threads in the "
             f"main process (DataLoader workers use 1 thread each, started by {loader_context or 'fork'}). Pipeline mode writes every default product "
             f"(5 FITS images with WCS, 2 ECSV catalogs, 2 tensor shards per frame) and the manifest; "
             f"{deletion}; "
             f"the writer process is started before the first block. Order: {order}. "
             f"Frames/s pooled over runs = steady frames / steady seconds; the ratio divides by compute-only's "
             f"({base:.3f} frames/s; a '[graph workers N]' row by the compute-only row of that graph, "
             f"pipeline.workers=N, when the plan ran it); 'per-block ratio' compares each block's runs (median, "
             f"range). Freed memory "
             f"{'stays in the process (astroprep_torch.retain_freed_memory(), as astroprep run does)' if not args.no_retain else 'goes back to the OS (glibc defaults, --no-retain)'}.", "",
             "| mode | runs | frames/s steady (pooled) | frames/s whole runs (mean) | ratio to compute-only (pooled) | per-block ratio median [min, max] |",
             "|---|---|---|---|---|---|"]
    for label, rs in results.items():
        # the baseline: compute-only of the same graph (same "[graph workers N]" suffix) when it ran
        g = label[label.index(" [graph workers"):] if " [graph workers" in label else ""
        base_label = COMPUTE + g if COMPUTE + g in results else COMPUTE
        base_by_block = {r["block"]: r["steady"][0] / r["steady"][1] for r in results[base_label]}
        per_block = sorted((r["steady"][0] / r["steady"][1]) / base_by_block[r["block"]] for r in rs
                           if r["block"] in base_by_block)
        pb = f"{statistics.median(per_block):.3f} [{per_block[0]:.3f}, {per_block[-1]:.3f}]" if per_block else "-"
        lines.append(f"| {label} | {len(rs)} | {pooled(rs):.3f} | {statistics.fmean(r['all'] for r in rs):.3f} | "
                     f"{pooled(rs) / pooled(results[base_label]):.3f} | {pb} |")
    keys = ["compute", "write (main thread)", "other (waiting for data, loop)", "write (writer thread/process, overlapped)"]
    lines += ["", "Goal (issue #9): pipeline mode with 2 workers within 10% of the compute-only rate (ratio >= 0.90).", "",
              "Main-thread time per frame in pipeline mode (s, steady state, mean over runs):", "",
              "| mode | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, rs in results.items():
        if not rs[0]["profile"]:
            continue
        cells = []
        for k in keys:
            vals = [r["profile"][k] for r in rs if k in r["profile"]]
            cells.append(f"{statistics.fmean(vals):.3f}" if vals else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Single-threaded I/O cost of one frame: read + decode + mask + header (a worker's work) "
              f"{t_read:.3f} s; writing every product {sum(t_write.values()):.3f} s:", "",
              "| product | seconds |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in t_write.items()]
    lines += ["", "Compute-only per-stage seconds per frame: " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()), ""]
    text = "\n".join(lines)
    print(text)
    print(write_result(args.name, text + "\n"))


if __name__ == "__main__":
    main()
