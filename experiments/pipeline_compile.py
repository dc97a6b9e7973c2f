"""``compile=true``: the per-frame graph compiled vs eager, speed and agreement.

Usage:
    python experiments/pipeline_compile.py                 # one 2048^2 GWAC-like frame (issue #9)
    python experiments/pipeline_compile.py --size 512 --repeat 2 --name pipeline_compile_512

Builds the default graph (configs/pipeline/gwac.yaml) twice with Hydra and runs
``PreprocessModule.predict_step`` on the same in-memory frame (a simulated TAN-SIP pair, the
reference given): eager, and with ``compile=True`` (what ``astroprep run compile=true`` does:
``torch.compile`` of every stage with static shapes, detection and cutouts left eager, the alignment
on its fused compiled kernels). Reports the compilation cost (first call), the median time per
frame of both after warm-up, per stage, and how far the compiled outputs are from eager
(max |difference| of each image product in units of the frame's median background rms; catalog
sizes). Writes experiments/results/<name>.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402
from pipeline_throughput import build_pipeline  # noqa: E402

IMAGES = ("science_background", "science_rms", "science_sub", "aligned", "difference", "difference_variance",
          "science_norm")
CATALOGS = ("candidates", "catalog")


def frame_batch(size: int, stars: int, seed: int = 0):
    from astroprep_torch import sim

    pair = sim.simulate_pair((size, size), n_stars=stars, sip=True, shift=(3.3, -2.7), rotation=0.05,
                             n_transients=max(4, min(20, size // 100)), n_moving=2, seed=seed)
    sci = pair.science
    batch = {"image": sci.image, "mask": sci.mask, "header": [sci.header.tostring()], "name": ["science"],
             "path": ["science.fits"], "error": [""]}
    return pair.reference, batch


def time_module(module, batch, repeat: int):
    totals, stages = [], {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = module.predict_step(batch)
        totals.append(time.perf_counter() - t0)
        assert not out["failed"], out["failed"]
        for k, v in out["timings"].items():
            stages.setdefault(k, []).append(v)
    return statistics.median(totals), {k: statistics.median(v) for k, v in stages.items()}, out


def compare(eager: dict, compiled: dict) -> dict:
    """Max |compiled - eager| of each image product in units of the median background rms; catalog sizes."""
    rms = float(eager["science_rms"].median())
    res = {}
    for k in IMAGES:
        if k in eager and k in compiled:
            a, b = eager[k].double(), compiled[k].double()
            scale = 1.0 if k == "science_norm" else rms  # the normalised frame is already unitless
            res[k] = float((a - b).abs().max()) / scale
    for k in CATALOGS:
        if k in eager and k in compiled:
            res[k] = (int(eager[k].columns["batch_index"].numel()), int(compiled[k].columns["batch_index"].numel()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--stars", type=int, default=None, help="default: GWAC density (20000 per 4136x4096)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls of each after the first (the heap settles)")
    ap.add_argument("--no-retain", action="store_true",
                    help="leave glibc malloc's defaults (astroprep run calls astroprep_torch.retain_freed_memory())")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--override", action="append", default=[], help="Hydra override for the graph (repeatable)")
    ap.add_argument("--name", default="pipeline_compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from astroprep_torch.pipeline import PreprocessModule

    if not args.no_retain:
        from astroprep_torch import retain_freed_memory

        retain_freed_memory()  # as `astroprep run` does (config retain_memory: true)

    stars = args.stars if args.stars is not None else int(round(20000 * args.size ** 2 / (4136 * 4096)))
    load_before = os.getloadavg()[0]
    ref, batch = frame_batch(args.size, stars)
    kw = dict(reference=ref.image, reference_mask=ref.mask, reference_header=ref.header)
    eager = PreprocessModule(build_pipeline(args.override), **kw)
    compiled = PreprocessModule(build_pipeline(args.override), compile=True, compile_options={"backend": args.backend}, **kw)
    with torch.inference_mode():
        t0 = time.perf_counter()
        eager.predict_step(batch)
        t_eager_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled.predict_step(batch)
        t_compile = time.perf_counter() - t0
        print(f"first call: eager {t_eager_first:.2f} s, compiled {t_compile:.2f} s (compilation)", flush=True)
        for _ in range(args.warmup):
            time_module(eager, batch, 1)
            time_module(compiled, batch, 1)
        # Interleave the timed runs so that load drift hits both alike.
        te, tc, se, sc = [], [], [], []
        for _ in range(args.repeat):
            a, sa, out_e = time_module(eager, batch, 1)
            b, sb, out_c = time_module(compiled, batch, 1)
            te.append(a); tc.append(b); se.append(sa); sc.append(sb)
    t_e, t_c = statistics.median(te), statistics.median(tc)
    stages_e = {k: statistics.median(s[k] for s in se) for k in se[0]}
    stages_c = {k: statistics.median(s[k] for s in sc) for k in sc[0]}
    diffs = compare(out_e["outputs"], out_c["outputs"])
    how = compiled.pipeline.compiled_stages
    fell_back = {n: st.module.failed for n, st in compiled.pipeline.stages.items() if getattr(st.module, "failed", None)}
    load_after = os.getloadavg()[0]

    lines = [f"# compile=true vs eager: the per-frame graph ({args.size}x{args.size})", "",
             f"Command: `python experiments/pipeline_compile.py {' '.join(sys.argv[1:])}`", "",
             machine() + f"; 1-min load average before {load_before:.2f}, after {load_after:.2f} (shared machine).", "",
             f"One simulated GWAC-like frame ({stars} stars, TAN-SIP, reference given), configs/pipeline/gwac.yaml, "
             f"batch of 1, `PreprocessModule.predict_step` on the in-memory frame. torch.compile backend "
             f"`{args.backend}`, static shapes. Median of {args.repeat} interleaved runs after the first call and "
             f"{args.warmup} untimed interleaved calls of each (the heap settles); freed memory "
             f"{'kept in the process (retain_freed_memory(), as astroprep run does)' if not args.no_retain else 'returned to the OS (--no-retain)'}. "
             "The first compiled call compiles every stage, reading inductor's on-disk cache where an "
             "earlier run left it (a cold cache costs more).", "",
             f"- first call: eager {t_eager_first:.2f} s, compiled {t_compile:.2f} s (includes compilation)",
             f"- **time per frame: eager {t_e:.3f} s, compiled {t_c:.3f} s, speed-up {t_e / t_c:.2f}x**",
             f"- stages that fell back to eager: {fell_back or 'none'}", "",
             "| stage | compiled as | eager (s) | compiled (s) |", "|---|---|---|---|"]
    for k in stages_e:
        lines.append(f"| {k} | {how.get(k, '-')} | {stages_e[k]:.3f} | {stages_c.get(k, float('nan')):.3f} |")
    lines += ["", "Agreement (compiled vs eager): max |difference| per image product in units of the median "
              "background rms (science_norm: in its own [0, 1] units); catalog sizes (eager, compiled):", "",
              "| product | max abs difference |", "|---|---|"]
    for k, v in diffs.items():
        lines.append(f"| {k} | {v if isinstance(v, tuple) else format(v, '.2e')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    print(write_result(args.name, text))


if __name__ == "__main__":
    main()
