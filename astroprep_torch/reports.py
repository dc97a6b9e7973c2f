"""Minor Planet Center reports: the 80-column format (obs80) and ADES PSV, written and read.

Observations travel as an astropy ``Table`` with one row per observation (the edge of the library:
formatting strings is I/O, not a stage). Columns (those in brackets are optional):

=============  =====================================================================
``permID``     permanent number as text (``"433"``), or ``""``
``provID``     unpacked provisional designation (``"2018 AB12"``), or ``""``
``trkSub``     observer's temporary designation (at most 7 characters in obs80), or ``""``
``mjd``        mid-exposure time, MJD UTC
``ra``,``dec`` degrees (ICRS / J2000)
[``mag``]      magnitude (NaN = none), [``band``] one letter (default from the metadata)
[``rmsRA``],[``rmsDec``]  arcsec (RA already multiplied by cos Dec), [``logSNR``] log10 of S/N,
[``seeing``]   arcsec, [``exp``] seconds, [``disc``] ``"*"`` or ``""``, [``note1``] one letter
=============  =====================================================================

Report metadata (station code, observers, telescope, catalogue, ...) is a plain mapping, as in
``configs/report/default.yaml``: ``station``, ``observatory_name``, ``submitter``, ``contact``
(CON lines), ``observers``, ``measurers``, ``telescope`` {``name``, ``design``, ``aperture``,
``detector``}, ``catalog`` (ADES ``astCat``, e.g. ``Gaia3``), ``net`` (obs80 NET line; default from
``catalog``), ``ack``, ``ac2`` (e-mail), ``comment`` (lines), ``funding``, ``band``, ``mode``.

Formats follow the MPC's definitions: obs80 columns 1-5 packed number, 6-12 packed provisional or
temporary designation, 13 discovery asterisk, 14 note 1, 15 note 2 (``C`` = CCD), 16-32 date
``YYYY MM DD.ddddd``, 33-44 RA ``HH MM SS.ss``, 45-56 Dec ``sDD MM SS.s``, 66-70 magnitude, 71 band,
72 blank on submission, 78-80 station; header lines ``COD``, ``CON``, ``OBS``, ``MEA``, ``TEL``,
``NET``, ``ACK``, ``AC2`` (and ``COM``). ADES PSV version 2022: an obsContext block of ``#`` /
``!`` lines, then a header row and one ``|``-separated row per observation, written directly from
the observations (not converted from obs80).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

__all__ = [
    "pack_number", "unpack_number", "pack_provisional", "unpack_provisional", "pack_designation",
    "unpack_designation", "format_obs80", "obs80_header", "write_obs80", "read_obs80", "parse_obs80",
    "write_ades_psv", "format_ades_psv", "read_ades_psv", "OBS80_HEADER_KEYS", "ADES_COLUMNS",
]

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CENTURY = {"I": 18, "J": 19, "K": 20, "L": 21}
_SURVEYS = {"P-L": "PLS", "T-1": "T1S", "T-2": "T2S", "T-3": "T3S"}
#: header keywords of an obs80 submission, in the order they are written
OBS80_HEADER_KEYS = ("COD", "CON", "OBS", "MEA", "TEL", "NET", "ACK", "AC2", "COM", "NUM", "BND")
#: ADES optical columns written, in the ADES PSV order
ADES_COLUMNS = ("permID", "provID", "trkSub", "mode", "stn", "obsTime", "ra", "dec", "rmsRA", "rmsDec",
                "astCat", "mag", "band", "photCat", "logSNR", "seeing", "exp", "disc", "notes", "remarks")
#: ADES astCat code -> obs80 NET name
_NET_NAMES = {"Gaia3": "Gaia-DR3", "Gaia3E": "Gaia-EDR3", "Gaia2": "Gaia-DR2", "Gaia1": "Gaia-DR1",
              "UCAC4": "UCAC-4", "UCAC5": "UCAC-5", "USNOB1": "USNO-B1.0", "2MASS": "2MASS",
              "PS1_DR2": "PS1_DR2", "ATLAS2": "ATLAS-2", "URAT1": "URAT-1", "NOMAD": "NOMAD"}


# --------------------------------------------------------------------------------------------
# packed designations
# --------------------------------------------------------------------------------------------
def pack_number(number: int) -> str:
    """Permanent number -> 5 packed characters: ``433`` -> ``00433``, ``100000`` -> ``A0000``,
    ``620000`` -> ``~0000`` (base 62 beyond)."""
    n = int(number)
    if n < 1:
        raise ValueError(f"a permanent number must be >= 1, got {number!r}")
    if n < 100000:
        return f"{n:05d}"
    if n < 620000:
        return _B62[n // 10000] + f"{n % 10000:04d}"
    m = n - 620000
    if m >= 62 ** 4:
        raise ValueError(f"permanent number {n} is beyond the packed range (< {620000 + 62 ** 4})")
    return "~" + "".join(_B62[(m // 62 ** k) % 62] for k in (3, 2, 1, 0))


def unpack_number(packed: str) -> int:
    """Inverse of :func:`pack_number`."""
    s = packed.strip()
    if re.fullmatch(r"\d{1,5}", s):
        return int(s)
    if re.fullmatch(r"[A-Za-z]\d{4}", s):
        return _B62.index(s[0]) * 10000 + int(s[1:])
    if re.fullmatch(r"~[0-9A-Za-z]{4}", s):
        return 620000 + sum(_B62.index(c) * 62 ** (3 - i) for i, c in enumerate(s[1:]))
    raise ValueError(f"{packed!r} is not a packed permanent number (00433, A0000, ~0000)")


def pack_provisional(desig: str) -> str:
    """Provisional designation -> 7 packed characters: ``1995 XA`` -> ``J95X00A``,
    ``2018 AB12`` -> ``K18A12B``, ``1998 SQ108`` -> ``J98SA8Q``, ``2040 P-L`` -> ``PLS2040``."""
    s = " ".join(desig.split())
    m = re.fullmatch(r"(\d{4}) (P-L|T-[123])", s)
    if m:
        return _SURVEYS[m.group(2)] + m.group(1)
    m = re.fullmatch(r"(\d{2})(\d{2}) ([A-HJ-Y])([A-HJ-Z])(\d*)", s)
    if not m:
        raise ValueError(f"{desig!r} is not a minor-planet provisional designation (e.g. '1995 XA', '2018 AB12')")
    century, yy, half, second, cyc = m.groups()
    inv = {v: k for k, v in _CENTURY.items()}
    if int(century) not in inv:
        raise ValueError(f"{desig!r}: year outside 1800-2199")
    cycle = int(cyc) if cyc else 0
    if cycle >= 620:
        raise ValueError(f"{desig!r}: cycle count {cycle} needs the extended packed scheme")
    return f"{inv[int(century)]}{yy}{half}{_B62[cycle // 10]}{cycle % 10}{second}"


def unpack_provisional(packed: str) -> str:
    """Inverse of :func:`pack_provisional`."""
    s = packed.strip()
    for name, code in _SURVEYS.items():
        if s.startswith(code) and re.fullmatch(r"\d{4}", s[3:]):
            return f"{s[3:]} {name}"
    m = re.fullmatch(r"([IJKL])(\d{2})([A-HJ-Y])([0-9A-Za-z])(\d)([A-HJ-Z])", s)
    if not m:
        raise ValueError(f"{packed!r} is not a packed provisional designation (e.g. J95X00A)")
    c, yy, half, c1, c2, second = m.groups()
    cycle = _B62.index(c1) * 10 + int(c2)
    return f"{_CENTURY[c]}{yy} {half}{second}{cycle if cycle else ''}"


def pack_designation(desig) -> str:
    """A number (int or digits) -> packed number; a provisional designation -> packed provisional."""
    if isinstance(desig, (int, np.integer)) or str(desig).strip().isdigit():
        return pack_number(int(desig))
    return pack_provisional(str(desig))


def unpack_designation(packed: str) -> str:
    """A packed number (5 characters) or provisional designation (7) -> its unpacked text."""
    s = packed.strip()
    return str(unpack_number(s)) if len(s) <= 5 else unpack_provisional(s)


# --------------------------------------------------------------------------------------------
# obs80 writing
# --------------------------------------------------------------------------------------------
def _col(obs, name, default, n):
    if name in getattr(obs, "colnames", obs.keys() if isinstance(obs, Mapping) else ()):
        return np.asarray(obs[name])
    return np.full(n, default, dtype=object)


def _sexagesimal(value, unit_per_deg: float, decimals: int, width_int: int, signed: bool):
    """Vectorised (sign, a, b, c) of a sexagesimal string with ``decimals`` digits on the seconds,
    rounded once on the total so that 59.995 s carries into the minutes."""
    v = np.asarray(value, dtype=np.float64) * unit_per_deg
    if signed:
        sign = np.where(v < 0, "-", "+")
        v = np.abs(v)
    else:
        sign = np.full(v.shape, "", dtype=object)
        v = np.mod(v, 24.0)
    scale = 10 ** decimals
    ticks = np.round(v * 3600 * scale).astype(np.int64)
    if not signed:
        ticks = np.mod(ticks, 24 * 3600 * scale)
    a, rest = np.divmod(ticks, 3600 * scale)
    b, c = np.divmod(rest, 60 * scale)
    w = 3 + decimals if decimals else 2
    return [f"{s}{int(x):0{width_int}d} {int(y):02d} {int(z) / scale:0{w}.{decimals}f}"
            for s, x, y, z in zip(sign, a, b, c)]


def _obs80_dates(mjd, decimals: int = 5) -> list:
    from astropy.time import Time

    mjd = np.asarray(mjd, dtype=np.float64)
    scale = 10 ** decimals
    ticks = np.round(mjd * scale).astype(np.int64)
    day, frac = np.divmod(ticks, scale)
    ymd = Time(day.astype(np.float64), format="mjd", scale="utc").to_value("ymdhms")
    return [f"{y:04d} {m:02d} {d:02d}.{f:0{decimals}d}" for y, m, d, f in
            zip(ymd["year"], ymd["month"], ymd["day"], frac)]


def _designation_fields(obs, n):
    perm = _col(obs, "permID", "", n)
    prov = _col(obs, "provID", "", n)
    trk = _col(obs, "trkSub", "", n)
    out = []
    for p, v, t in zip(perm, prov, trk):
        p, v, t = str(p or "").strip(), str(v or "").strip(), str(t or "").strip()
        if t and (len(t) > 7 or not t.isalnum()):
            raise ValueError(f"trkSub {t!r}: obs80 temporary designations are 1-7 letters or digits")
        num = pack_number(int(p)) if p else "     "
        des = pack_provisional(v) if v else (t.rjust(7) if t else "       ")
        if not (p or v or t):
            raise ValueError("an observation needs permID, provID or trkSub (obs80 columns 1-12 never blank)")
        out.append(num + des)
    return out


def format_obs80(obs, meta: Optional[Mapping] = None, *, date_decimals: int = 5, ra_decimals: int = 2,
                 dec_decimals: int = 1) -> list:
    """One 80-character line per observation (see the module docstring for ``obs`` and ``meta``).

    RA, Dec and the date are rounded once (carries propagate: 59.995 s -> next minute); the
    magnitude is written with one decimal (``%4.1f`` in columns 66-69), column 72 is blank.
    """
    meta = dict(meta or {})
    n = len(obs["mjd"])
    if not n:
        return []
    ra = np.asarray(obs["ra"], dtype=np.float64)
    dec = np.asarray(obs["dec"], dtype=np.float64)
    bad = ~np.isfinite(ra) | ~np.isfinite(dec) | ~np.isfinite(np.asarray(obs["mjd"], dtype=np.float64))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} observation(s) have a NaN time, RA or Dec (rows {np.flatnonzero(bad)[:5].tolist()})")
    stn = str(meta.get("station", "")).strip()
    if len(stn) != 3:
        raise ValueError(f"station (the MPC observatory code) must be 3 characters, got {stn!r}")
    des = _designation_fields(obs, n)
    disc = _col(obs, "disc", "", n)
    note1 = _col(obs, "note1", "", n)
    note2 = str(meta.get("note2", "C"))[:1]
    dates = _obs80_dates(obs["mjd"], date_decimals)
    ras = _sexagesimal(ra, 1 / 15.0, ra_decimals, 2, False)
    decs = _sexagesimal(dec, 1.0, dec_decimals, 2, True)
    mag = np.asarray(_col(obs, "mag", np.nan, n), dtype=np.float64)
    band = _col(obs, "band", meta.get("band", "R"), n)
    lines = []
    for i in range(n):
        m = f"{mag[i]:4.1f} {str(band[i] or '')[:1]:1}" if np.isfinite(mag[i]) else "      "
        line = (f"{des[i]:12}{str(disc[i] or '')[:1]:1}{str(note1[i] or '')[:1]:1}{note2:1}"
                f"{dates[i]:17}{ras[i]:12}{decs[i]:12}{'':9}{m:6}{'':6}{stn}")
        if len(line) != 80:
            raise AssertionError(f"obs80 line of {len(line)} columns: {line!r}")
        lines.append(line)
    return lines


def _as_list(v) -> list:
    """A name or a sequence of names (list, tuple, OmegaConf ListConfig) -> list of strings."""
    if v is None or isinstance(v, str):
        return [v] if v else []
    return [str(x) for x in v if x]


def _net_name(meta: Mapping) -> str:
    if meta.get("net"):
        return str(meta["net"])
    cat = str(meta.get("catalog", "Gaia3"))
    return _NET_NAMES.get(cat, cat)


def obs80_header(meta: Mapping) -> list:
    """The header block (COD, CON, OBS, MEA, TEL, NET, ACK, AC2, COM lines) from ``meta``."""
    def names(v):
        return ", ".join(_as_list(v))

    tel = meta.get("telescope") or {}
    tel_line = tel.get("name") if isinstance(tel, Mapping) else str(tel)
    if not tel_line and isinstance(tel, Mapping) and tel.get("aperture"):
        tel_line = f"{tel['aperture']}-m {tel.get('design', 'reflector')} + {tel.get('detector', 'CCD')}"
    out = [("COD", str(meta.get("station", "")))]
    contact = meta.get("contact") or meta.get("submitter")
    for c in _as_list(contact):
        out.append(("CON", c))
    out += [("OBS", names(meta.get("observers"))), ("MEA", names(meta.get("measurers") or meta.get("observers"))),
            ("TEL", str(tel_line or "")), ("NET", _net_name(meta)), ("ACK", str(meta.get("ack", "") or "")),
            ("AC2", str(meta.get("ac2", "") or ""))]
    for c in _as_list(meta.get("comment")):
        out.append(("COM", c))
    lines = [f"{k} {v}".rstrip() for k, v in out if v]
    bad = [ln for ln in lines if len(ln) > 80]
    if bad:
        raise ValueError(f"obs80 header lines must be at most 80 characters: {bad[0]!r}")
    return lines


def write_obs80(path, obs, meta: Mapping, *, header: bool = True, **kwargs) -> Path:
    """Write ``obs`` as an MPC 80-column report (header block, then one line per observation)."""
    lines = (obs80_header(meta) if header else []) + format_obs80(obs, meta, **kwargs)
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


# --------------------------------------------------------------------------------------------
# obs80 reading
# --------------------------------------------------------------------------------------------
_PACKED_NUMBER = re.compile(r"\d{5}|[A-Za-z]\d{4}|~[0-9A-Za-z]{4}")
_PACKED_PROV = re.compile(r"[IJKL]\d{2}[A-HJ-Y][0-9A-Za-z]\d[A-HJ-Z]|(PL|T1|T2|T3)S\d{4}")


def _angle(text: str, scale: float) -> float:
    """'HH MM SS.ss' / 'HH MM.mm' / 'sDD MM SS.s' -> value * scale (sign kept)."""
    t = text.strip()
    if not t:
        return float("nan")
    sign = -1.0 if t.startswith("-") else 1.0
    parts = [float(p) for p in t.lstrip("+-").split()]
    if not parts or len(parts) > 3:
        raise ValueError(f"cannot read the angle {text!r}")
    v = sum(p / 60 ** k for k, p in enumerate(parts))
    return sign * v * scale


def _date_mjd(text: str) -> float:
    import erfa

    y, m, d = text.split()
    day = float(d)
    _, djm = erfa.cal2jd(int(y), int(m), int(math.floor(day)))
    return float(djm) + (day - math.floor(day))


def _ids(line: str) -> dict:
    """permID / provID / trkSub from columns 1-12 (minor planets, comets, satellites)."""
    num, des = line[0:5], line[5:12]
    n, d = num.strip(), des.strip()
    out = {"permID": "", "provID": "", "trkSub": ""}
    comet = re.fullmatch(r"[ \d]{4}[PCDXAI]", num) is not None
    if comet:  # periodic-comet number + orbit type in column 5 (0073P -> 73P)
        out["permID"] = (num[:4].strip().lstrip("0") + num[4]) if num[:4].strip() else ""
    elif n:
        out["permID"] = str(unpack_number(n)) if _PACKED_NUMBER.fullmatch(n) else n
    if d and _PACKED_PROV.fullmatch(d):
        out["provID"] = unpack_provisional(d)
    elif d and (comet or n):
        out["provID"] = d  # a comet's or satellite's packed provisional designation, kept packed
    elif d:
        out["trkSub"] = d
    return out


def parse_obs80(line: str) -> dict:
    """One obs80 observation line -> a dict of the table columns (raises ValueError when the line
    is not an optical observation: radar, the second line of a two-line record, a short line)."""
    line = line.rstrip("\n\r")
    if len(line) < 56:
        raise ValueError(f"obs80 line of {len(line)} characters (expected 80): {line!r}")
    line = line.ljust(80)
    note2 = line[14]
    if note2 in "RrsvX" and note2 != " ":
        raise ValueError(f"note 2 {note2!r}: not an optical position line")
    row = _ids(line)
    mag = line[65:70].strip()
    row.update(disc=line[12].strip(), note1=line[13].strip(), note2=note2.strip(), mjd=_date_mjd(line[15:32]),
               ra=_angle(line[32:44], 15.0), dec=_angle(line[44:56], 1.0),
               mag=float(mag) if mag else float("nan"), band=line[70].strip(), stn=line[77:80].strip(), obs80=line)
    return row


def read_obs80(path):
    """Read an MPC 80-column file -> astropy Table (columns as in the module docstring, plus
    ``disc``, ``note1``, ``note2``, ``stn``, ``obs80``: the line). ``meta["header"]`` lists the
    header lines as (keyword, value); ``meta["skipped"]`` the lines that are not optical positions
    (radar, second lines of satellite / roving records) or could not be read, with the reason."""
    from astropy.table import Table

    rows, header, skipped = [], [], []
    for i, raw in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        key = raw[:3]
        if key in OBS80_HEADER_KEYS and (len(raw) == 3 or raw[3] == " "):
            header.append((key, raw[4:].rstrip()))
            continue
        try:
            rows.append(parse_obs80(raw))
        except ValueError as exc:
            skipped.append((i, str(exc)))
    names = ["permID", "provID", "trkSub", "disc", "note1", "note2", "mjd", "ra", "dec", "mag", "band", "stn", "obs80"]
    t = Table(rows=[[r[k] for k in names] for r in rows] or None, names=names,
              dtype=[str] * 6 + [float] * 3 + [float, str, str, str])
    t.meta.update(header=header, skipped=skipped, source=str(path))
    return t


# --------------------------------------------------------------------------------------------
# ADES PSV
# --------------------------------------------------------------------------------------------
def _context_lines(meta: Mapping) -> list:
    def block(name, items):
        items = [(k, v) for k, v in items if v not in (None, "", [])]
        return [f"# {name}"] + [f"! {k} {v}" for k, v in items] if items else []

    def people(v):
        return [("name", x) for x in _as_list(v)]

    stn = str(meta.get("station", "")).strip()
    if len(stn) != 3:
        raise ValueError(f"station (the MPC observatory code) must be 3 characters, got {stn!r}")
    tel = dict(meta.get("telescope") or {})
    lines = ["# version=2022"]
    lines += block("observatory", [("mpcCode", stn), ("name", meta.get("observatory_name"))])
    lines += block("submitter", people(meta.get("submitter") or _as_list(meta.get("measurers"))[:1])
                   + [("institution", meta.get("institution"))])
    lines += block("observers", people(meta.get("observers")))
    lines += block("measurers", people(meta.get("measurers") or meta.get("observers")))
    lines += block("telescope", [(k, tel.get(k)) for k in ("name", "design", "aperture", "detector", "fRatio",
                                                           "filter", "arraySize", "pixelScale")])
    if meta.get("funding"):
        lines += ["# fundingSource " + str(meta["funding"])]
    if meta.get("comment"):
        lines += block("comment", [("line", c) for c in _as_list(meta["comment"])])
    return lines


def _iso_times(mjd) -> list:
    from astropy.time import Time

    t = Time(np.asarray(mjd, dtype=np.float64), format="mjd", scale="utc")
    t.precision = 3
    return [s + "Z" for s in np.atleast_1d(t.isot)]


def _fmt(v, fmt: str) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v or "")
    return format(f, fmt) if math.isfinite(f) else ""


def write_ades_psv(path, obs, meta: Mapping, **kwargs) -> Path:
    """Write ``obs`` as ADES PSV (version 2022) with the obsContext from ``meta`` (see :func:`format_ades_psv`)."""
    path = Path(path)
    path.write_text("\n".join(format_ades_psv(obs, meta, **kwargs)) + "\n", encoding="utf-8")
    return path


def format_ades_psv(obs, meta: Mapping, *, ra_decimals: int = 6, dec_decimals: int = 6) -> list:
    """The lines of an ADES PSV (version 2022) report of ``obs`` with the obsContext from ``meta``.

    Columns (ADES order): permID, provID, trkSub, mode, stn, obsTime (ISO UTC, ms, ``Z``), ra, dec
    (degrees), rmsRA, rmsDec (arcsec), astCat, mag, band, photCat, logSNR, seeing (arcsec), exp (s),
    disc, notes, remarks; the columns that are empty for every observation are left out.
    """
    n = len(obs["mjd"])
    ra = np.asarray(obs["ra"], dtype=np.float64)
    dec = np.asarray(obs["dec"], dtype=np.float64)
    if n and not (np.isfinite(ra).all() and np.isfinite(dec).all() and np.isfinite(np.asarray(obs["mjd"], float)).all()):
        raise ValueError("observations with a NaN time, RA or Dec cannot be reported")
    cat = str(meta.get("catalog", "Gaia3"))
    cols = {
        "permID": [str(v or "") for v in _col(obs, "permID", "", n)],
        "provID": [str(v or "") for v in _col(obs, "provID", "", n)],
        "trkSub": [str(v or "") for v in _col(obs, "trkSub", "", n)],
        "mode": [str(meta.get("mode", "CCD"))] * n,
        "stn": [str(meta.get("station", ""))] * n,
        "obsTime": _iso_times(obs["mjd"]) if n else [],
        "ra": [f"{v:.{ra_decimals}f}" for v in np.mod(ra, 360.0)],
        "dec": [f"{v:+.{dec_decimals}f}" for v in dec],
        "rmsRA": [_fmt(v, ".3f") for v in _col(obs, "rmsRA", np.nan, n)],
        "rmsDec": [_fmt(v, ".3f") for v in _col(obs, "rmsDec", np.nan, n)],
        "astCat": [cat] * n,
        "mag": [_fmt(v, ".2f") for v in _col(obs, "mag", np.nan, n)],
        "logSNR": [_fmt(v, ".2f") for v in _col(obs, "logSNR", np.nan, n)],
        "seeing": [_fmt(v, ".2f") for v in _col(obs, "seeing", np.nan, n)],
        "exp": [_fmt(v, ".1f") for v in _col(obs, "exp", np.nan, n)],
        "disc": [str(v or "") for v in _col(obs, "disc", "", n)],
        "notes": [str(v or "") for v in _col(obs, "note1", "", n)],
        "remarks": [str(v or "") for v in _col(obs, "remarks", "", n)],
    }
    has_mag = [bool(m) for m in cols["mag"]]
    cols["band"] = [str(b or meta.get("band", "R")) if h else "" for b, h in zip(_col(obs, "band", meta.get("band", "R"), n), has_mag)]
    cols["photCat"] = [str(meta.get("photometric_catalog", cat)) if h else "" for h in has_mag]
    keep = [c for c in ADES_COLUMNS if c in ("mode", "stn", "obsTime", "ra", "dec", "astCat") or any(cols[c])]
    if not any(cols["permID"]) and not any(cols["provID"]) and not any(cols["trkSub"]):
        keep = ["trkSub"] + keep
    width = {c: max([len(c)] + [len(v) for v in cols[c]]) for c in keep}
    lines = _context_lines(meta)
    lines.append("|".join(c.ljust(width[c]) for c in keep).rstrip())
    for i in range(n):
        lines.append("|".join(cols[c][i].ljust(width[c]) for c in keep).rstrip())
    return lines


def read_ades_psv(path):
    """Read an ADES PSV file -> astropy Table of its observations (the file's columns, with ``ra``,
    ``dec``, ``mag``, ``rmsRA``, ``rmsDec``, ``logSNR``, ``seeing``, ``exp`` as floats and an
    ``mjd`` column from ``obsTime``). ``meta["context"]`` holds the obsContext as
    {block: [(key, value), ...]}, ``meta["version"]`` the version. Only the first header row's
    observation type is read (one obsBlock of optical observations, as our writer produces)."""
    from astropy.table import Table
    from astropy.time import Time

    context, version, names, rows, block = {}, None, None, [], None
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        s = raw.strip()
        if not s:
            continue
        if s.startswith("#"):
            body = s[1:].strip()
            if body.startswith("version="):
                version = body.split("=", 1)[1].strip()
            else:
                block, _, rest = body.partition(" ")
                context.setdefault(block, [])
                if rest:
                    context[block].append(("", rest.strip()))
            continue
        if s.startswith("!"):
            key, _, value = s[1:].strip().partition(" ")
            context.setdefault(block or "", []).append((key, value.strip()))
            continue
        fields = [f.strip() for f in s.split("|")]
        if names is None:
            names = fields
        elif fields != names:
            rows.append(fields + [""] * (len(names) - len(fields)))
    if names is None:
        raise ValueError(f"{path}: no ADES PSV header row (a line of '|'-separated field names)")
    t = Table(rows=rows or None, names=names, dtype=[str] * len(names))
    for c in ("ra", "dec", "mag", "rmsRA", "rmsDec", "logSNR", "seeing", "exp", "rmsMag"):
        if c in t.colnames:
            t[c] = np.array([float(v) if v else np.nan for v in t[c]], dtype=np.float64)
    if "obsTime" in t.colnames:
        t["mjd"] = Time([v.rstrip("Z") for v in t["obsTime"]], format="isot", scale="utc").mjd if len(t) else np.zeros(0)
    t.meta.update(context=context, version=version, source=str(path))
    return t
