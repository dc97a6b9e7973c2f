"""The graph (Stage, Pipeline), the writer and manifest, resume, and bad inputs in pipeline mode."""

import json

import pytest
import torch
import torch.nn as nn

from astroprep_torch import pipeline as P
from astroprep_torch.data import FitsFrameDataset, collate_frames, resolve_inputs


class Affine(nn.Module):
    def __init__(self, a=2.0, b=1.0):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, image, offset=None):
        out = image * self.a + self.b
        return out if offset is None else out + offset


class Pair(nn.Module):
    def forward(self, image):
        return image.mean(), image.std()


def test_stage_reads_writes_and_optional_keys():
    st = P.Stage(Affine(), reads={"image": "x", "offset": "off?"}, writes="y")
    batch = st({"x": torch.ones(1, 1, 2, 2)})
    assert torch.equal(batch["y"], torch.full((1, 1, 2, 2), 3.0))
    batch = st({"x": torch.ones(1, 1, 2, 2), "off": torch.tensor(1.0)})
    assert torch.equal(batch["y"], torch.full((1, 1, 2, 2), 4.0))
    st2 = P.Stage(Pair(), reads={"image": "x"}, writes=["m", "s"])
    b2 = st2({"x": torch.arange(4.0)})
    assert b2["m"].item() == 1.5


def test_pipeline_order_timings_and_errors():
    pipe = P.Pipeline({
        "first": P.Stage(Affine(1.0, 1.0), reads={"image": "x"}, writes="y"),
        "second": P.Stage(Affine(2.0, 0.0), reads={"image": "y"}, writes="z"),
    })
    out = pipe({"x": torch.zeros(1, 1, 2, 2)})
    assert out["z"].sum().item() == 8.0
    assert set(pipe.timings) == {"first", "second"}
    assert "first" in pipe.describe() and "['y'] -> z" in pipe.describe()
    # A missing key names the stage and the key.
    with pytest.raises(P.PipelineError, match="first.*'x'"):
        pipe({"w": torch.zeros(1)})
    # Skipping a stage.
    out = pipe({"x": torch.zeros(1, 1, 2, 2), "y": torch.ones(1, 1, 2, 2)}, skip=["first"])
    assert out["z"].sum().item() == 8.0


def test_glue_modules():
    a = torch.tensor([True, False]); b = torch.tensor([False, False])
    assert torch.equal(P.MaskUnion()(a, b), a)
    assert P.MaskUnion()(None, b) is b
    assert torch.equal(P.SquareRoot()(P.Square()(torch.tensor([-2.0, 3.0]))), torch.tensor([2.0, 3.0]))
    shared = P.SharedReference(Affine())
    out = shared(image=torch.arange(8.0).reshape(2, 1, 2, 2))
    assert out.shape == (2, 1, 2, 2) and torch.equal(out[0], out[1])


def _write_frames(tmp_path, n=3, corrupt=True):
    from astroprep_torch import sim
    from astroprep_torch.io import write_fits

    paths = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        f = sim.simulate_frame((32, 32), n_stars=5, seed=i)
        p = tmp_path / f"frame{i}.fits"
        write_fits(p, f.image, header=f.header)
        paths.append(p)
    if corrupt:
        bad = tmp_path / "broken.fits"
        bad.write_bytes(b"SIMPLE  =                    T" + b"\0" * 100)
        paths.append(bad)
    return paths


def test_dataset_reports_corrupt_files(tmp_path):
    paths = _write_frames(tmp_path)
    ds = FitsFrameDataset(resolve_inputs(tmp_path))
    items = [ds[i] for i in range(len(ds))]
    errors = {it["name"]: it["error"] for it in items}
    assert errors["broken"] and all(not errors[f"frame{i}"] for i in range(3))
    batch = collate_frames(items)
    assert batch["image"].shape == (4, 1, 32, 32)
    with pytest.raises(FileNotFoundError, match="nothing"):
        resolve_inputs(tmp_path / "nothing*.fits")


def _tiny_pipeline():
    return P.Pipeline({"double": P.Stage(Affine(2.0, 0.0), reads={"image": "science"}, writes="difference")})


def test_predict_writer_manifest_and_resume(tmp_path):
    import lightning as L

    from astroprep_torch.data import FitsFrameDataModule

    _write_frames(tmp_path / "in")
    out = tmp_path / "out"
    products = {"difference": ("fits", "diff", "science")}

    def run():
        writer = P.FrameWriter(out, products=products)
        dm = FitsFrameDataModule(tmp_path / "in", batch_size=2, skip=writer.finished)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[writer])
        trainer.predict(P.PreprocessModule(_tiny_pipeline()), datamodule=dm, return_predictions=False)
        return writer, dm

    writer, dm = run()
    manifest = P.read_manifest(out)
    assert {k: v["status"] for k, v in manifest.items()} == {
        "frame0": "ok", "frame1": "ok", "frame2": "ok", "broken": "failed"}
    assert "broken" in manifest and manifest["broken"]["reason"]
    for i in range(3):
        assert (out / f"frame{i}.diff.fits").exists()
    from astroprep_torch.io import read_fits

    d = read_fits(out / "frame1.diff.fits")
    src = read_fits(tmp_path / "in" / "frame1.fits")
    torch.testing.assert_close(d.data, 2 * src.data)
    assert d.wcs is not None  # the product carries the frame's WCS
    # Resume: finished frames are skipped; only the broken one is tried again.
    writer2, dm2 = run()
    assert [p.name for p in dm2.dataset.paths] == ["broken.fits"]
    # An interrupted run: a frame whose output vanished is redone.
    (out / "frame2.diff.fits").unlink()
    writer3, dm3 = run()
    assert sorted(p.name for p in dm3.dataset.paths) == ["broken.fits", "frame2.fits"]
    assert (out / "frame2.diff.fits").exists()
