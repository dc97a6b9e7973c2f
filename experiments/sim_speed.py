"""Simulator speed at GWAC size and a quick-look PNG of a simulated epoch pair (zscale).

Usage: python experiments/sim_speed.py
Writes experiments/results/sim_speed.md and experiments/results/sim_pair.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, timeit, write_result  # noqa: E402

from astroprep_torch import sim  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    lines = ["# Simulator speed", "", machine(), "", "| frame | stars | PSF | median time (s) |", "|---|---|---|---|"]
    for shape, n, psf in [((4096, 4096), 20000, "gaussian"), ((4136, 4096), 20000, "gaussian"), ((4096, 4096), 20000, "moffat")]:
        t = timeit(lambda: sim.simulate_frame(shape, n_stars=n, psf=psf, seed=1), repeat=3)
        lines.append(f"| {shape[0]}x{shape[1]} | {n} | {psf} | {t:.2f} |")
        print(lines[-1], flush=True)
    pair = sim.simulate_pair((1024, 1024), n_stars=1500, shift=(12.3, -7.6), rotation=0.5, seed=4)
    try:
        from astroprep_torch import viz

        fig = viz.plot_triplet(pair.science.image, pair.reference.image, pair.science.image - pair.reference.image,
                               path=RESULTS / "sim_pair.png")
    except Exception:  # viz not there yet: a plain zscale figure
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from astropy.visualization import ZScaleInterval

        fig, axes = plt.subplots(1, 2, figsize=(10, 5))
        for ax, frame, title in zip(axes, (pair.reference, pair.science), ("reference (FWHM 2.5 px)", "science (FWHM 3.0 px, shifted)")):
            data = frame.image[0, 0].numpy()
            lo, hi = ZScaleInterval().get_limits(data)
            im = ax.imshow(data, origin="lower", cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(title)
            ax.set_xlabel("x (pixel)")
            ax.set_ylabel("y (pixel)")
            fig.colorbar(im, ax=ax, shrink=0.8, label="ADU")
        fig.tight_layout()
        RESULTS.mkdir(exist_ok=True, parents=True)
        fig.savefig(RESULTS / "sim_pair.png", dpi=80)
    lines += ["", "Quick look of a simulated pair: experiments/results/sim_pair.png"]
    print(write_result("sim_speed", "\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
