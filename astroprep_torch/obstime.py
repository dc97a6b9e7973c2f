"""Observation times from FITS headers, as real observatories write them.

:func:`observation_time` returns the mid-exposure time in MJD UTC (what the linker and the MPC
reports need) and says which keywords it came from. The rules, in order:

1. ``DATE-AVG`` (ISO date with time) or ``MJD-AVG``: already mid-exposure.
2. The start: ``DATE-OBS`` with a time (``2018-05-02T21:13:45.1``); or ``DATE-OBS`` holding only the
   date (``2018-05-02`` or the old ``02/05/18``) plus the time of day in ``TIME-OBS``, ``UT``,
   ``UTC-OBS``, ``UTCSTART`` or ``UTSTART`` (``21:13:45.1``, or decimal hours); or ``MJD-OBS``;
   or ``JD``. Mid-exposure = start + ``EXPTIME`` (or ``EXPOSURE``) / 2; without an exposure time
   the start is used and the returned ``exptime`` is 0.
3. ``TIMESYS`` (default UTC, as the FITS standard says): TT, TAI, TDB, TCG, TCB, UT1 and GPS times
   are converted to UTC with ``astropy.time``; ``UT`` / ``UTC`` are taken as UTC.

A header without a usable time raises :class:`ObservationTimeError`, whose message names the
keywords looked for, so a night run can report the frame and skip it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

__all__ = ["ObsTime", "ObservationTimeError", "observation_time", "TIME_KEYWORDS"]

#: keywords looked for, in the order of the rules above
TIME_KEYWORDS = ("DATE-AVG", "MJD-AVG", "DATE-OBS", "TIME-OBS", "UT", "UTC-OBS", "UTCSTART", "UTSTART",
                 "MJD-OBS", "JD", "EXPTIME", "EXPOSURE", "TIMESYS")
_TIME_OF_DAY = ("TIME-OBS", "UT", "UTC-OBS", "UTCSTART", "UTSTART")
_SCALES = {"UTC": "utc", "UT": "utc", "Z": "utc", "TT": "tt", "TDT": "tt", "ET": "tt", "TAI": "tai", "IAT": "tai",
           "TDB": "tdb", "TCG": "tcg", "TCB": "tcb", "UT1": "ut1", "GPS": "gps"}


class ObservationTimeError(ValueError):
    """A frame's header has no usable observation time (the message names the keywords)."""


@dataclass(frozen=True)
class ObsTime:
    """``mjd``: mid-exposure MJD UTC; ``start_mjd``: exposure start (UTC; equal to ``mjd`` minus half
    the exposure when the header gave a start); ``exptime``: seconds (0 when unknown);
    ``source``: the keywords used (e.g. ``"DATE-OBS + EXPTIME/2 (TIMESYS=UTC)"``)."""

    mjd: float
    start_mjd: float
    exptime: float
    source: str


def _value(header, key):
    v = header.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    return v


def _exptime(header) -> Optional[float]:
    for key in ("EXPTIME", "EXPOSURE"):
        v = _value(header, key)
        if v is not None:
            try:
                t = float(v)
            except (TypeError, ValueError):
                raise ObservationTimeError(f"{key} = {v!r} is not a number of seconds")
            if not t >= 0:
                raise ObservationTimeError(f"{key} = {v!r}: an exposure time must be >= 0 s")
            return t
    return None


def _scale(header) -> str:
    sys_ = str(_value(header, "TIMESYS") or "UTC").strip().upper()
    if sys_ not in _SCALES:
        raise ObservationTimeError(f"TIMESYS = {sys_!r} is not a time scale astropy converts "
                                   f"(expected one of {', '.join(sorted(_SCALES))})")
    return _SCALES[sys_]


def _iso_date(text: str) -> str:
    """'2018-05-02' / '2018-05-02T..' / '02/05/18' (DD/MM/YY, 19YY) -> 'YYYY-MM-DD[T...]'."""
    s = text.strip()
    m = re.fullmatch(r"(\d{2})/(\d{2})/(\d{2})", s)
    if m:
        return f"19{m.group(3)}-{m.group(2)}-{m.group(1)}"
    return s


def _time_of_day(value) -> str:
    """'21:13:45.1' / '21 13 45.1' / 21.229 (hours) -> 'HH:MM:SS.sss'."""
    if isinstance(value, (int, float)):
        h = float(value)
        if not 0 <= h < 24:
            raise ValueError(f"{value!r} hours")
        sec = h * 3600
        return f"{int(sec // 3600):02d}:{int(sec % 3600 // 60):02d}:{sec % 60:06.3f}"
    parts = re.split(r"[:\s]+", str(value).strip())
    if len(parts) != 3:
        raise ValueError(f"{value!r} is not HH:MM:SS")
    return f"{int(parts[0]):02d}:{int(parts[1]):02d}:{float(parts[2]):06.3f}"


def _time(value, fmt: str, scale: str):
    """An astropy Time; GPS time (not an astropy scale) is TAI - 19 s."""
    from astropy.time import Time, TimeDelta

    if scale == "gps":
        return Time(value, format=fmt, scale="tai") + TimeDelta(19.0, format="sec")
    return Time(value, format=fmt, scale=scale)


def _start(header, scale: str):
    """(astropy Time of the start, keywords) or (None, None)."""
    date = _value(header, "DATE-OBS")
    if date is not None:
        iso = _iso_date(str(date))
        if "T" in iso:
            return _time(iso, "isot", scale), "DATE-OBS"
        for key in _TIME_OF_DAY:
            tod = _value(header, key)
            if tod is not None:
                return _time(f"{iso}T{_time_of_day(tod)}", "isot", scale), f"DATE-OBS + {key}"
    mjd = _value(header, "MJD-OBS")
    if mjd is not None:
        return _time(float(mjd), "mjd", scale), "MJD-OBS"
    jd = _value(header, "JD")
    if jd is not None:
        return _time(float(jd), "jd", scale), "JD"
    return None, None


def observation_time(header, *, name: str = "frame") -> ObsTime:
    """Mid-exposure time (MJD UTC) of a frame from its FITS ``header`` (see the module docstring).

    ``name`` (the file) is put into error messages.
    """
    from astropy.time import TimeDelta

    try:
        scale = _scale(header)
        exptime = _exptime(header)
        avg = _value(header, "DATE-AVG")
        if avg is not None and "T" in str(avg):
            mid, src = _time(_iso_date(str(avg)), "isot", scale), "DATE-AVG"
        elif _value(header, "MJD-AVG") is not None:
            mid, src = _time(float(header["MJD-AVG"]), "mjd", scale), "MJD-AVG"
        else:
            mid = None
        if mid is not None:
            half = TimeDelta((exptime or 0.0) / 2, format="sec")
            return ObsTime(float(mid.utc.mjd), float((mid - half).utc.mjd), float(exptime or 0.0),
                           f"{src} (TIMESYS={scale.upper()})")
        start, src = _start(header, scale)
    except ObservationTimeError as exc:
        raise ObservationTimeError(f"{name}: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise ObservationTimeError(f"{name}: cannot read the observation time ({exc})") from None
    if start is None:
        raise ObservationTimeError(
            f"{name}: no observation time in the header: looked for DATE-AVG / MJD-AVG (mid-exposure), "
            f"DATE-OBS with a time, DATE-OBS (date) with {' / '.join(_TIME_OF_DAY)}, MJD-OBS or JD")
    mid = start + TimeDelta((exptime or 0.0) / 2, format="sec")
    how = f"{src} + EXPTIME/2" if exptime is not None else f"{src} (no EXPTIME: the start is used)"
    return ObsTime(float(mid.utc.mjd), float(start.utc.mjd), float(exptime or 0.0), f"{how} (TIMESYS={scale.upper()})")
