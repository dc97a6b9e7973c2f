"""Image-quality scoring speed on one 4096x4096 frame: the current QualityScorer vs the previous
implementation (kept below as a reference: 16-pixel block medians via permute + median, full
medians of 4M neighbour differences, a full-resolution Laplacian, torch.asinh, an NCHW GELU
autoencoder and a conv_transpose2d full-resolution mask).

Usage: python experiments/quality_speed.py [--repeat 5]
Writes experiments/results/quality_speed.md. Timings are medians after a warm-up, same process,
same frame; the reference runs an untrained network of the previous architecture (timing only).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

from astroprep_torch import sim  # noqa: E402
from astroprep_torch.quality import PRETRAINED_PATH, QualityAutoencoder, QualityScorer, normalize_frame  # noqa: E402


# ---- the previous implementation (reference for the speed ratio only) -------------------------
def old_normalize(image: torch.Tensor, k: int = 4) -> torch.Tensor:
    b = image.shape[0]
    bad = ~torch.isfinite(image)
    flat = image.reshape(b, -1)
    step = max(1, flat.shape[1] // (1 << 20))
    sample = torch.where(bad.reshape(b, -1)[:, ::step], torch.full_like(flat[:, ::step], float("nan")), flat[:, ::step])
    med = torch.nanmedian(sample, dim=1).values.nan_to_num(0.0)
    x = torch.where(bad, med.view(b, 1, 1, 1), image)
    rstep = max(1, x.shape[-2] // 1024)
    d = (x[..., ::rstep, 1:] - x[..., ::rstep, :-1]).reshape(b, -1)
    mad = (d - d.median(dim=1, keepdim=True).values).abs().median(dim=1).values
    sigma = (1.4826 * mad / math.sqrt(2.0)).view(b, 1, 1, 1)
    hb, wb = x.shape[-2] // k, x.shape[-1] // k
    blocks = x.reshape(b, 1, hb, k, wb, k).permute(0, 1, 2, 4, 3, 5).reshape(b, 1, hb, wb, k * k)
    bmed = blocks.median(dim=-1).values
    bmax = F.max_pool2d(x, k)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    lap = 4 * x - xp[..., :-2, 1:-1] - xp[..., 2:, 1:-1] - xp[..., 1:-1, :-2] - xp[..., 1:-1, 2:]
    lmax = F.max_pool2d(lap, k)
    m = med.view(b, 1, 1, 1)
    return torch.cat([torch.asinh((bmed - m) / (3 * sigma)), torch.asinh((bmax - bmed) / (10 * sigma)),
                      torch.asinh(lmax / (10 * sigma))], dim=1)


def old_model(width=16, depth=3, latent=4) -> nn.Module:
    enc, c = [], 2
    for i in range(depth):
        co = width * 2**i
        enc += [nn.Conv2d(c, co, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(co, co, 3, padding=1), nn.GELU()]
        c = co
    enc += [nn.Conv2d(c, latent, 1)]
    dec = [nn.Conv2d(latent, c, 1), nn.GELU()]
    for i in reversed(range(depth)):
        co = width * 2 ** max(i - 1, 0)
        dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, co, 3, padding=1), nn.GELU()]
        c = co
    dec += [nn.Conv2d(c, 3, 3, padding=1)]
    return nn.Sequential(*enc, *dec).eval()


def old_score(image, net, p=128, k=4, thr=0.1):
    x = old_normalize(image, k)
    y = net(x[:, :2])
    y = torch.cat([torch.tanh(y[:, :1]), y[:, 1:]], dim=1)
    err = ((y - x) ** 2).mean(dim=1, keepdim=True)
    pe = F.avg_pool2d(err, p // k, ceil_mode=True, count_include_pad=False)
    flat = pe.reshape(pe.shape[0], -1)
    score = flat.topk(max(1, math.ceil(0.1 * flat.shape[1])), dim=1).values.mean(dim=1)
    ones = torch.ones(1, 1, p, p)
    cover = F.conv_transpose2d((pe > thr).float(), ones, stride=p)[..., : image.shape[-2], : image.shape[-1]]
    return score, cover > 0.5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    img = sim.simulate_frame((4096, 4096), n_stars=20000, seed=5).image
    scorer = (QualityScorer.pretrained() if PRETRAINED_PATH.is_file() else QualityScorer(QualityAutoencoder(2, 16, 3, 4))).eval()
    net = old_model()
    rows = []
    with torch.no_grad():
        x = normalize_frame(img)
        xo = old_normalize(img)
        fns = {"new": lambda: scorer(img), "norm": lambda: normalize_frame(img), "net": lambda: scorer.model(x),
               "old": lambda: old_score(img, net), "onorm": lambda: old_normalize(img), "onet": lambda: net(xo[:, :2])}
        for f in fns.values():  # warm-up
            f()
        # Interleaved rounds, so that a change of machine load hits both implementations alike.
        times = {k: [] for k in fns}
        for _ in range(args.repeat):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    t_new, t_norm, t_net, t_old, t_onorm, t_onet = (statistics.median(times[k]) for k in fns)
    rows += [f"| QualityScorer.forward (total) | {t_old:.3f} | {t_new:.3f} | {t_old / t_new:.1f}x |",
             f"| normalize_frame | {t_onorm:.3f} | {t_norm:.3f} | {t_onorm / t_norm:.1f}x |",
             f"| autoencoder on the 1024^2 binned grid | {t_onet:.3f} | {t_net:.3f} | {t_onet / t_net:.1f}x |"]
    lines = ["# Image quality: scoring speed, one 4096x4096 frame", "", machine(), "",
             f"Median of {args.repeat} interleaved rounds after a warm-up, seconds. 'before' = the previous implementation "
             "(reference copy in this script, NCHW GELU network), 'now' = QualityScorer.pretrained().", "",
             "| step | before (s) | now (s) | speed-up |", "|---|---|---|---|", *rows, "",
             f"Target: <= 1 s per 4096^2 frame; now {t_new:.3f} s ({'met' if t_new <= 1.0 else 'NOT met'} at this load)."]
    text = "\n".join(lines) + "\n"
    print(text)
    print(write_result("quality_speed", text))


if __name__ == "__main__":
    main()
