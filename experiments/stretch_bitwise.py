"""Bitwise guard for refactors of ``stretch`` / ``quality`` (issue 23): save the outputs of every
stretch path (float32 and float64; eager in-place, owned buffer, autograd graph, module; below and
above the numpy threshold; clip on/off, ``invalid``), normalize, equalize_hist (hard, smooth, graph,
masked), zscale, Lupton RGB, quality's asinh, normalize_frame and patch errors on fixed inputs;
then compare two such files with torch.equal (NaN positions included).

    git stash; python experiments/stretch_bitwise.py save /tmp/before.pt; git stash pop
    python experiments/stretch_bitwise.py save /tmp/after.pt
    python experiments/stretch_bitwise.py compare /tmp/before.pt /tmp/after.pt
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from astroprep_torch import quality as Q  # noqa: E402
from astroprep_torch import stretch as S  # noqa: E402


def save(path: str) -> None:
    torch.manual_seed(0)
    out = {}
    kinds = {"linear": None, "sqrt": None, "squared": None, "power": 0.7, "log": None, "asinh": None, "sinh": None, "powerdist": None}
    for dt in (torch.float32, torch.float64):
        for n in (5000, 300_000):  # below/above numpy threshold
            x = (torch.rand(n, dtype=dt) * 1.4 - 0.2)
            x[::97] = float("nan")
            x[5] = 1e20; x[6] = -1e20
            for kind, a in kinds.items():
                for clip in (True, False):
                    for inv in (None, -1.0):
                        extra = dict(slope=1.5, intercept=0.1) if kind == "linear" else {}
                        key = f"{dt}-{n}-{kind}-{clip}-{inv}"
                        with torch.no_grad():
                            out[key + "-eager"] = S.apply_stretch(x, kind, a, clip=clip, invalid=inv, **extra)
                            xo = x.clone()
                            out[key + "-owned"] = S.apply_stretch(xo, kind, a, clip=clip, invalid=inv, _owned=True, **extra)
                        xg = x.clone().requires_grad_(True)
                        out[key + "-graph"] = S.apply_stretch(xg, kind, a, clip=clip, invalid=inv, **extra).detach()
                        if kind != "linear":
                            out[key + "-module"] = S.Stretch(kind, a, clip=clip, invalid=inv)(x).detach()
            img = torch.rand(2, 3, 64, 80, dtype=dt) * 100 if n == 5000 else torch.rand(1, 1, 600, 600, dtype=dt) * 100
            img[0, 0, 3, 3] = float("nan")
            for kind, a in kinds.items():
                for clip in (True, False):
                    for inv in (None, -2.0):
                        st = S.Stretch(kind, a, invalid=inv)
                        out[f"norm-{dt}-{n}-{kind}-{clip}-{inv}"] = S.normalize(img, stretch=st, clip=clip)
                        out[f"normg-{dt}-{n}-{kind}-{clip}-{inv}"] = S.normalize(img.clone().requires_grad_(True), stretch=st, clip=clip).detach()
            out[f"eq-{dt}-{n}"] = S.equalize_hist(img)
            out[f"eqs-{dt}-{n}"] = S.equalize_hist(img, smooth=True)
            out[f"eqg-{dt}-{n}"] = S.equalize_hist(img.clone().requires_grad_(True)).detach()
            m = torch.zeros_like(img, dtype=torch.bool); m[..., :5, :] = True
            out[f"eqm-{dt}-{n}"] = S.equalize_hist(img, m, per_channel=False)
            out[f"zs-{dt}-{n}"] = torch.stack(S.zscale(img))
            out[f"zsm-{dt}-{n}"] = torch.stack(S.zscale(img, m, per_channel=True))
            out[f"lup-{dt}-{n}"] = S.lupton_asinh(img)
            r, g, b = img[0, :1], img[0, :1] * 0.5, img[0, :1] * 2
            out[f"rgb-{dt}-{n}"] = S.make_lupton_rgb(r, g, b)
            out[f"rgbf-{dt}-{n}"] = S.make_lupton_rgb(r, g, b, minimum=[1.0, 2.0, 3.0], output_dtype=dt)
            out[f"rgbs-{dt}-{n}"] = S.make_lupton_rgb(r, g, b, interval=S.ZScale(), stretch_object=S.Stretch("asinh"), output_dtype=dt)
            z = (torch.randn(n, dtype=dt) * 30)
            z[3] = 1e30; z[4] = -1e30; z[7] = 0.0
            out[f"qasinh-{dt}-{n}"] = Q._asinh(z.clone())
            out[f"qasinhg-{dt}-{n}"] = Q._asinh(z.clone().requires_grad_(True)).detach()
    frames = torch.rand(2, 1, 256, 300) * 50 + 1000
    frames[0, 0, 10:20, 10:20] += 5000
    out["qnorm"] = Q.normalize_frame(frames)
    sc = Q.QualityScorer.pretrained()
    with torch.no_grad():
        out["qpe"] = sc.patch_errors(frames)
    torch.save(out, path)
    print(len(out), "outputs")


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    assert a.keys() == b.keys(), set(a) ^ set(b)
    bad = 0
    for k in a:
        if not torch.equal(a[k].nan_to_num(123.0), b[k].nan_to_num(123.0)) or not torch.equal(a[k].isnan(), b[k].isnan()):
            print("DIFF", k, float((a[k].double() - b[k].double()).abs().nan_to_num(0).max()))
            bad += 1
    print(f"{len(a)} outputs compared, {bad} differ")
    return bad


if __name__ == "__main__":
    if sys.argv[1:2] == ["save"]:
        save(sys.argv[2])
    else:
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
