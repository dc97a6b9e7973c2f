import math
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.time import Time

from astroprep_torch import moving, sim
from astroprep_torch.moving import TrackletLinker, Tracklets, link_tracklets, shape_on_sky

CSS_PSV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mpc_reports" / "ades_master" / \
    "G96_20131004_1A_N20016_01_0001.mpcd.xml.psv"


def _movers(ra0, dec0, rate, pa, minutes):
    """Great-circle positions (deg) of movers at ``minutes`` from their reference position."""
    ra0, dec0, rate, pa = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (ra0, dec0, rate, pa))
    t = np.asarray(minutes, dtype=float)
    d = rate[:, None] * t[None, :]
    c = SkyCoord(np.repeat(ra0, t.size) * u.deg, np.repeat(dec0, t.size) * u.deg)
    pa_full = np.repeat(pa, t.size) + np.where(d.ravel() < 0, 180.0, 0.0)
    out = c.directional_offset_by(pa_full * u.deg, np.abs(d.ravel()) * u.arcsec)
    return out.ra.deg.reshape(d.shape), out.dec.deg.reshape(d.shape)


def _night(ra0, dec0, rate, pa, *, n_stars=300, n_exp=5, spread=0.2, noise=0.1, seed=0, field=(150.0, 30.0)):
    """Flat detections: stationary stars + movers, 7 min cadence. Returns columns and truth ids."""
    g = np.random.default_rng(seed)
    minutes = np.arange(n_exp) * 7.0 - 14.0
    mjd = 60400.0 + (minutes + 14.0) / 1440.0
    # Stars uniform on the cap of radius ``spread`` degrees around the field centre.
    cap = SkyCoord(field[0] * u.deg, field[1] * u.deg).directional_offset_by(
        g.uniform(0, 360, n_stars) * u.deg, spread * np.sqrt(g.uniform(0, 1, n_stars)) * u.deg)
    sra, sdec = cap.ra.deg, cap.dec.deg
    mra, mdec = _movers(ra0, dec0, rate, pa, minutes)
    ra, dec, t, obj = [], [], [], []
    for k in range(n_exp):
        ra += [sra, mra[:, k]]
        dec += [sdec, mdec[:, k]]
        t += [np.full(n_stars + mra.shape[0], mjd[k])]
        obj += [np.full(n_stars, -1), np.arange(mra.shape[0])]
    ra, dec = np.concatenate(ra), np.concatenate(dec)
    c = SkyCoord(ra * u.deg, dec * u.deg).directional_offset_by(
        g.uniform(0, 360, ra.size) * u.deg, np.abs(g.normal(0, noise, ra.size)) * u.arcsec)
    return (torch.tensor(c.ra.deg), torch.tensor(c.dec.deg), torch.tensor(np.concatenate(t)),
            torch.tensor(np.concatenate(obj)))


def _grouping_ok(labels: torch.Tensor, obj: torch.Tensor, n_obj: int) -> bool:
    """Every object is exactly one tracklet and nothing else is linked."""
    if bool((labels[obj < 0] >= 0).any()):
        return False
    for m in range(n_obj):
        lab = labels[obj == m]
        if bool((lab < 0).any()) or lab.unique().numel() != 1 or int((labels == lab[0]).sum()) != lab.numel():
            return False
    return True


def test_links_movers_among_stars_with_rate_and_pa():
    rate = [0.5, 3.0, 12.0, 40.0]
    pa = [10.0, 100.0, 200.0, 300.0]
    ra, dec, mjd, obj = _night([150.05, 149.9, 150.1, 149.95], [30.05, 29.9, 29.95, 30.1], rate, pa)
    tr = link_tracklets(ra, dec, mjd, tolerance_floor=1.0)
    assert _grouping_ok(tr.labels, obj, 4)
    assert bool(tr.stationary[obj < 0].all())
    order = torch.stack([tr.labels[obj == m][0] for m in range(4)])
    np.testing.assert_allclose(tr.rate[order].numpy(), rate, rtol=0.03)
    dpa = (tr.pa[order].numpy() - np.array(pa) + 180) % 360 - 180
    assert np.abs(dpa).max() < 2.0
    assert bool((tr.n == 5).all()) and bool((tr.rms < 0.5).all())


@pytest.mark.parametrize("field", [(359.999, 10.0), (0.0, -20.0), (123.0, 89.9), (45.0, -89.95)])
def test_ra_wrap_and_poles(field):
    ra0 = np.array([field[0], field[0] + 0.01]) % 360.0
    dec0 = np.array([field[1], field[1] - 0.01])
    rate, pa = [5.0, 20.0], [80.0, 265.0]
    ra, dec, mjd, obj = _night(ra0, dec0, rate, pa, n_stars=100, field=field, spread=0.05)
    tr = link_tracklets(ra, dec, mjd)
    assert _grouping_ok(tr.labels, obj, 2)
    order = torch.stack([tr.labels[obj == m][0] for m in range(2)])
    np.testing.assert_allclose(tr.rate[order].numpy(), rate, rtol=0.03)
    # PA at the tracklet's mean time; the truth PA is given at the same (reference) time.
    dpa = (tr.pa[order].numpy() - np.array(pa) + 180) % 360 - 180
    assert np.abs(dpa).max() < 2.0
    assert bool(((tr.ra >= 0) & (tr.ra < 360)).all())


def test_min_detections_two_with_two_exposures():
    ra, dec, mjd, obj = _night([150.0, 150.1], [30.0, 30.05], [2.0, 25.0], [45.0, 190.0], n_exp=2, n_stars=200)
    assert link_tracklets(ra, dec, mjd).labels.max() == -1  # 2 exposures < min_detections = 3
    tr = link_tracklets(ra, dec, mjd, min_detections=2)
    assert _grouping_ok(tr.labels, obj, 2)
    np.testing.assert_allclose(sorted(tr.rate.tolist()), [2.0, 25.0], rtol=0.03)


def test_each_detection_in_at_most_one_tracklet_crossing_paths():
    # Two movers crossing at the middle exposure, plus one missing detection.
    ra, dec, mjd, obj = _night([150.0, 150.0], [30.0, 30.0], [10.0, 10.0], [90.0, 0.0], n_stars=50)
    tr = link_tracklets(ra, dec, mjd)
    assert len(tr) == 2
    for k in range(len(tr)):
        assert tr.members(k).numel() >= 4
        assert obj[tr.members(k)].unique().numel() == 1


def test_shuffle_invariant_grouping():
    ra, dec, mjd, obj = _night([150.05, 149.9, 150.1], [30.05, 29.9, 29.95], [1.0, 8.0, 30.0], [0.0, 120.0, 250.0])
    perm = torch.randperm(ra.numel(), generator=torch.Generator().manual_seed(3))
    tr = link_tracklets(ra[perm], dec[perm], mjd[perm])
    assert _grouping_ok(tr.labels, obj[perm], 3)


def test_magnitude_and_trail_consistency():
    ra, dec, mjd, obj = _night([150.0], [30.0], [10.0], [60.0], n_stars=0)
    mag = torch.full_like(ra, 18.0)
    assert _grouping_ok(link_tracklets(ra, dec, mjd, mag=mag).labels, obj, 1)
    mag[2] = 14.0  # one detection 4 mag off: dropped from the tracklet
    tr = link_tracklets(ra, dec, mjd, mag=mag)
    assert int(tr.labels[2]) == -1 and int(tr.n[0]) == 4
    # Trails across the motion (PA 60 deg) are not this mover; along it they are.
    a, b = torch.full_like(ra, 5.0), torch.full_like(ra, 1.0)
    assert len(link_tracklets(ra, dec, mjd, a=a, b=b, theta=torch.full_like(ra, 150.0))) == 0
    assert len(link_tracklets(ra, dec, mjd, a=a, b=b, theta=torch.full_like(ra, 240.0))) == 1


def test_stationary_transient_is_not_a_mover():
    ra, dec, mjd, obj = _night([150.0], [30.0], [10.0], [60.0], n_stars=0)
    # A transient seen in three exposures at one place.
    ra = torch.cat([ra, torch.full((3,), 150.2, dtype=torch.float64)])
    dec = torch.cat([dec, torch.full((3,), 30.1, dtype=torch.float64)])
    mjd = torch.cat([mjd, mjd.unique()[:3]])
    tr = link_tracklets(ra, dec, mjd)
    assert len(tr) == 1 and bool(tr.stationary[-3:].all()) and bool((tr.labels[-3:] == -1).all())


def test_bad_input():
    ra, dec, mjd, _ = _night([150.0], [30.0], [10.0], [60.0], n_stars=5)
    bad = ra.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="ra has 1 non-finite"):
        link_tracklets(bad, dec, mjd)
    with pytest.raises(ValueError, match="dec must be a 1-D tensor of"):
        link_tracklets(ra, dec[:-1], mjd)
    with pytest.raises(ValueError, match="ra must be a 1-D"):
        link_tracklets(ra[None], dec[None], mjd[None])
    with pytest.raises(ValueError, match="min_detections"):
        link_tracklets(ra, dec, mjd, min_detections=1)
    with pytest.raises(ValueError, match="pos_err"):
        link_tracklets(ra, dec, mjd, pos_err=-torch.ones_like(ra))
    empty = link_tracklets(torch.zeros(0), torch.zeros(0), torch.zeros(0))
    assert len(empty) == 0 and empty.labels.numel() == 0 and len(empty.to_table()) == 0
    # Fewer exposures than min_detections: an honest empty result.
    two = mjd <= mjd.unique()[1]
    few = link_tracklets(ra[two], dec[two], mjd[two])
    assert len(few) == 0 and bool((few.labels == -1).all())


def test_to_table_and_module():
    ra, dec, mjd, obj = _night([150.0, 150.1], [30.0, 29.9], [3.0, 9.0], [30.0, 120.0], n_stars=20)
    tr = TrackletLinker(min_detections=3, tolerance_floor=1.0)(ra, dec, mjd, mag=torch.full_like(ra, 19.0))
    assert isinstance(tr, Tracklets)
    t = tr.to_table()
    assert len(t) == 2 and {"tracklet", "n", "rate", "pa", "rms", "mag", "mjd", "ra", "dec"} <= set(t.colnames)
    assert str(t["rate"].unit) == "arcsec / min"
    np.testing.assert_allclose(t["mag"], 19.0)
    with pytest.raises(ValueError, match="unknown parameters"):
        TrackletLinker(tolerance=3.0)


def test_hydra_config_instantiates():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "moving" / "default.yaml")
    linker = instantiate(cfg)
    assert isinstance(linker, TrackletLinker) and linker.params["min_detections"] == 3


def test_greedy_matches_sequential():
    g = torch.Generator().manual_seed(0)
    members = torch.randint(-1, 40, (300, 4), generator=g)
    score = torch.rand(300, generator=g, dtype=torch.float64)
    got = moving._greedy(members, score, 40)
    taken, want = set(), torch.zeros(300, dtype=torch.bool)
    for c in torch.argsort(score, descending=True).tolist():
        m = {int(v) for v in members[c] if v >= 0}
        if not m & taken:
            want[c] = True
            taken |= m
    assert torch.equal(got, want)


def _read_psv(path: Path) -> dict:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith(("#", "!"))]
    head = [h.strip() for h in lines[0].split("|")]
    rows = [[c.strip() for c in ln.split("|")] for ln in lines[1:]]
    return {h: [r[i] for r in rows] for i, h in enumerate(head)}


@pytest.mark.skipif(not CSS_PSV.exists(), reason="../shared/data/mpc_reports (real CSS ADES field) not present")
@pytest.mark.parametrize("min_detections", [2, 3, 4])
def test_real_catalina_field_recovers_23_tracklets(min_detections):
    col = _read_psv(CSS_PSV)
    ra = torch.tensor([float(v) for v in col["ra"]], dtype=torch.float64)
    dec = torch.tensor([float(v) for v in col["dec"]], dtype=torch.float64)
    mjd = torch.tensor(Time([v.rstrip("Z") for v in col["obsTime"]], format="isot", scale="utc").mjd)
    mag = torch.tensor([float(v) for v in col["mag"]], dtype=torch.float64)
    err = torch.tensor([max(float(a), float(b)) for a, b in zip(col["rmsRA"], col["rmsDec"])], dtype=torch.float64)
    trk = np.array(col["trkSub"])
    perm = torch.randperm(ra.numel(), generator=torch.Generator().manual_seed(min_detections))
    tr = link_tracklets(ra[perm], dec[perm], mjd[perm], mag=mag[perm], pos_err=err[perm],
                        min_detections=min_detections)
    lab, t = tr.labels.numpy(), trk[perm.numpy()]
    assert len(tr) == 23 and (lab >= 0).all()
    groups = {frozenset(np.nonzero(lab == k)[0]) for k in range(len(tr))}
    truth = {frozenset(np.nonzero(t == s)[0]) for s in set(trk)}
    assert groups == truth
    assert bool((tr.rate > 0.2).all()) and bool((tr.rate < 2.0).all())
    # Without positional errors and magnitudes the default tolerance floor (2") alone does it too.
    bare = link_tracklets(ra[perm], dec[perm], mjd[perm], min_detections=min_detections)
    lab = bare.labels.numpy()
    assert {frozenset(np.nonzero(lab == k)[0]) for k in range(len(bare))} == truth


def test_links_a_simulated_night_catalog():
    night = sim.simulate_night((512, 512), n_stars=300, pixel_scale=1.0, n_movers=20, n_transients=5,
                               rate_range=(1.0, 30.0), seed=4)
    d = sim.simulate_detections(night, n_spurious=10, seed=5)
    tr = link_tracklets(d["ra"], d["dec"], d["mjd"], mag=d["mag"], pos_err=d["pos_err"], tolerance_floor=0.5)
    obj = d["object"]
    counts = torch.bincount(obj[obj >= 0], minlength=20)
    findable = torch.nonzero(counts >= 3).flatten().tolist()
    linked = {int(obj[tr.members(k)][0]) for k in range(len(tr)) if obj[tr.members(k)].unique().numel() == 1}
    assert len(set(findable) & linked) >= 0.9 * len(findable)
    pure = sum(obj[tr.members(k)].unique().numel() == 1 and int(obj[tr.members(k)][0]) >= 0 for k in range(len(tr)))
    assert pure >= len(tr) - 1


def test_round_detections_cannot_be_fast_movers():
    ra, dec, mjd, obj = _night([150.0], [30.0], [20.0], [60.0], n_stars=0)  # 20"/min: 10" trail in 30 s
    round_ = dict(a=torch.full_like(ra, 1.0), b=torch.full_like(ra, 1.0), theta=torch.zeros_like(ra), exptime=30.0)
    assert len(link_tracklets(ra, dec, mjd, **round_)) == 0
    a = math.sqrt(1.0 + 10.0**2 / 12.0)  # rms along a 10" trail smeared by a 1" PSF
    trail = dict(a=torch.full_like(ra, a), b=torch.full_like(ra, 1.0), theta=torch.full_like(ra, 60.0), exptime=30.0)
    assert _grouping_ok(link_tracklets(ra, dec, mjd, **trail).labels, obj, 1)
    # Slow movers are round: no constraint.
    ra, dec, mjd, obj = _night([150.0], [30.0], [0.5], [60.0], n_stars=0)
    assert _grouping_ok(link_tracklets(ra, dec, mjd, **round_).labels, obj, 1)


def test_detector_artefact_at_fixed_pixel_is_not_linked():
    # A hot pixel: fixed detector pixel, sky position drifting linearly with the pointing.
    ra, dec, mjd, obj = _night([150.0], [30.0], [2.0], [90.0], n_stars=0)
    x, y = torch.full_like(ra, 100.0), torch.full_like(ra, 200.0)
    assert len(link_tracklets(ra, dec, mjd)) == 1
    tr = link_tracklets(ra, dec, mjd, x=x, y=y)
    assert len(tr) == 0 and bool(tr.stationary.all())
    # A real mover moves on the detector too.
    x = x + torch.arange(ra.numel(), dtype=torch.float64) * 4.0
    assert len(link_tracklets(ra, dec, mjd, x=x, y=y)) == 1


def test_shape_on_sky_through_the_wcs():
    from astroprep_torch.wcs import TanWCS

    hdr = sim.make_header((256, 256), ra=150.0, dec=30.0, pixel_scale=2.0, rotation=30.0)
    w = TanWCS.from_header(hdr)
    x, y = torch.tensor([10.0, 128.0]), torch.tensor([20.0, 128.0])
    a, b, pa = shape_on_sky(w, x, y, torch.tensor([3.0, 3.0]), torch.tensor([1.0, 1.0]), torch.tensor([90.0, 0.0]))
    np.testing.assert_allclose(a.numpy(), 6.0, rtol=1e-3)
    np.testing.assert_allclose(b.numpy(), 2.0, rtol=1e-3)
    # make_header's CD matrix with rotation t = 30 deg: +y points to PA t, +x to PA t - 90 (mod 180).
    np.testing.assert_allclose(pa.numpy(), [30.0, 120.0], atol=0.05)


def test_config_group_files_instantiate():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    root = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(root / "moving"), version_base=None):
        fine = instantiate(compose(config_name="fine"))
    assert fine.params["tolerance_floor"] == 0.5 and fine.params["min_detections"] == 3
    from omegaconf import OmegaConf

    night_cfg = OmegaConf.load(root / "sim" / "gwac_night.yaml")
    night_cfg.seed = 1
    night_cfg.shape = [128, 128]
    night_cfg.n_stars = 20
    night = instantiate(night_cfg, render=False)
    assert len(night.headers) == 5 and night.pixel_scale == 11.7


def test_numpy_input_and_given_exposure_ids():
    ra, dec, mjd, obj = _night([150.0, 150.1], [30.0, 29.95], [4.0, 15.0], [20.0, 290.0], n_stars=50)
    ids = torch.unique(mjd, return_inverse=True)[1]
    exposure = (40 - 7 * ids).numpy()  # arbitrary ids, decreasing with time
    tr = link_tracklets(ra.numpy(), dec.numpy(), mjd.numpy(), exposure=exposure)
    assert _grouping_ok(tr.labels, obj, 2)
    with pytest.raises(ValueError, match="exposure must be an integer tensor"):
        link_tracklets(ra, dec, mjd, exposure=mjd)


def test_trail_centroids_get_larger_along_track_tolerance():
    ra, dec, mjd, obj = _night([150.0], [30.0], [20.0], [60.0], n_stars=0, noise=0.0)
    # The middle detection's centroid slid 2" along its 10" trail (a faint end lost to the isophote).
    c = SkyCoord(ra[2:3].numpy() * u.deg, dec[2:3].numpy() * u.deg).directional_offset_by(60.0 * u.deg, 2.0 * u.arcsec)
    ra[2], dec[2] = float(c.ra.deg[0]), float(c.dec.deg[0])
    err = torch.full_like(ra, 0.1)
    assert int(link_tracklets(ra, dec, mjd, pos_err=err).n[0]) == 4
    a, b = torch.full_like(ra, math.sqrt(1.0 + 100.0 / 12.0)), torch.ones_like(ra)
    tr = link_tracklets(ra, dec, mjd, pos_err=err, a=a, b=b, theta=torch.full_like(ra, 60.0), exptime=30.0)
    assert int(tr.n[0]) == 5


def test_pairs_prefer_slow_consistent_partners():
    # Two exposures; detection A can pair with B (slow, same magnitude) or C (fast, 0.8 mag off).
    t = torch.tensor([60400.0, 60400.0 + 30 / 1440, 60400.0 + 30 / 1440], dtype=torch.float64)
    ra = torch.tensor([150.0, 150.0 + 60 / 3600 / math.cos(math.radians(30)), 150.0], dtype=torch.float64)
    dec = torch.tensor([30.0, 30.0, 30.0 + 900 / 3600], dtype=torch.float64)
    tr = link_tracklets(ra, dec, t, mag=torch.tensor([18.0, 18.0, 18.8]), min_detections=2)
    assert tr.labels.tolist() == [0, 0, -1]
