"""Observation times from headers as observatories write them."""

import pytest
from astropy.io import fits
from astropy.time import Time

from astroprep_torch.obstime import ObservationTimeError, observation_time

START = Time("2018-05-02T21:13:45.120", scale="utc")
MID = START.mjd + 30.0 / 86400  # 60 s exposure


def _h(**cards):
    h = fits.Header()
    for k, v in cards.items():
        h[k.replace("_", "-")] = v
    return h


@pytest.mark.parametrize("cards", [
    dict(DATE_OBS="2018-05-02T21:13:45.120", EXPTIME=60.0),
    dict(DATE_OBS="2018-05-02", TIME_OBS="21:13:45.12", EXPTIME=60.0),
    dict(DATE_OBS="2018-05-02", UT="21:13:45.12", EXPOSURE=60),
    dict(DATE_OBS="2018-05-02", UTC_OBS="21 13 45.12", EXPTIME=60.0),
    dict(DATE_OBS="2018-05-02", UTCSTART="21:13:45.120", EXPTIME=60.0),
    dict(DATE_OBS="2018-05-02", UT=21 + 13 / 60 + 45.12 / 3600, EXPTIME=60.0),
    dict(MJD_OBS=START.mjd, EXPTIME=60.0),
    dict(JD=START.jd, EXPTIME=60.0),
    dict(DATE_AVG="2018-05-02T21:14:15.120", EXPTIME=60.0, DATE_OBS="1999-01-01T00:00:00"),
    dict(MJD_AVG=MID, EXPTIME=60.0),
    dict(DATE_OBS="02/05/98", TIME_OBS="21:13:45.12", EXPTIME=60.0),  # old DD/MM/YY form: 1998
])
def test_header_conventions_give_the_mid_exposure_utc(cards):
    t = observation_time(_h(**cards))
    expected = MID if cards.get("DATE-OBS", cards.get("DATE_OBS")) != "02/05/98" else Time("1998-05-02T21:14:15.12").mjd
    assert t.mjd == pytest.approx(expected, abs=2e-8)  # 2 ms
    assert t.exptime == 60.0
    assert t.source


def test_time_systems_are_converted_to_utc():
    tt = START.tt.isot
    t_tt = observation_time(_h(DATE_OBS=tt, TIMESYS="TT", EXPTIME=60.0))
    t_utc = observation_time(_h(DATE_OBS=START.isot, TIMESYS="UTC", EXPTIME=60.0))
    t_tai = observation_time(_h(MJD_OBS=START.tai.mjd, TIMESYS="TAI", EXPTIME=60.0))
    t_gps = observation_time(_h(MJD_OBS=(START.tai.mjd - 19.0 / 86400), TIMESYS="GPS", EXPTIME=60.0))
    for t in (t_tt, t_utc, t_tai, t_gps):
        assert t.mjd == pytest.approx(MID, abs=2e-8)
    # without conversion TT would be 69.184 s late: the test can fail
    assert abs(Time(tt).mjd - START.mjd) * 86400 > 60


def test_missing_or_bad_times_name_the_keywords():
    with pytest.raises(ObservationTimeError, match="DATE-OBS.*TIME-OBS.*MJD-OBS") as err:
        observation_time(_h(EXPTIME=60.0, OBJECT="x"), name="frame_07.fits")
    assert "frame_07.fits" in str(err.value)
    with pytest.raises(ObservationTimeError, match="TIMESYS"):
        observation_time(_h(DATE_OBS=START.isot, TIMESYS="LOCAL"))
    with pytest.raises(ObservationTimeError, match="EXPTIME"):
        observation_time(_h(DATE_OBS=START.isot, EXPTIME="long"))
    with pytest.raises(ObservationTimeError, match="cannot read"):
        observation_time(_h(DATE_OBS="2018-05-02", UT="late evening"))
    # a date without a time of day is not a time
    with pytest.raises(ObservationTimeError, match="no observation time"):
        observation_time(_h(DATE_OBS="2018-05-02", EXPTIME=60.0))


def test_without_exposure_time_the_start_is_used():
    t = observation_time(_h(DATE_OBS=START.isot))
    assert t.mjd == pytest.approx(START.mjd, abs=2e-8) and t.exptime == 0.0 and "no EXPTIME" in t.source
