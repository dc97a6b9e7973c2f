"""MPC reports (obs80 and ADES PSV) of a night's VALID objects, from the stored detection rows.

:func:`render_reports` is the one place that formats them; it can later delegate to
``astroprep_torch.reports`` (the project's report writer) without touching the web code.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Detection, Field, MovingObject, Run


def valid_detections(db: Session, night_id: int) -> tuple[list[dict], str, str, dict]:
    """Detection rows of the night's objects labelled valid (time order per object) and the
    observatory code (from the runs' night.json, else columns 78-80 of the obs80 lines) and the
    astrometric catalog (night.json's ``astCat`` / ``observatory.astCat``, else ``UNK``) and the
    ADES context blocks found in night.json's ``observatory`` (submitter, observers, measurers, telescope)."""
    rows = db.execute(
        select(MovingObject.designation, Detection.mjd, Detection.ra, Detection.dec, Detection.mag,
               Detection.mag_err, Detection.snr, Detection.obs80)
        .join(Detection, Detection.object_id == MovingObject.id).join(Field, Field.id == MovingObject.field_id)
        .where(Field.night_id == night_id, MovingObject.label == "valid")
        .order_by(MovingObject.designation, Detection.mjd)).all()
    dets = [dict(r._mapping) for r in rows]
    metas = [m or {} for m in db.scalars(select(Run.meta).where(Run.night_id == night_id))]
    code = next((c for c in ((m.get("observatory") or {}).get("code") for m in metas) if c), None)
    cat = next((c for c in (m.get("astCat") or (m.get("observatory") or {}).get("astCat") for m in metas) if c), "UNK")
    if code is None:
        found = Counter(d["obs80"][77:80].strip() for d in dets if len(d["obs80"]) >= 80)
        code = found.most_common(1)[0][0] if found else "500"
    obs = next((m.get("observatory") for m in metas if isinstance(m.get("observatory"), dict)), {}) or {}
    context = {k: obs[k] for k in ("submitter", "observers", "measurers", "telescope") if obs.get(k)}
    return dets, code, cat, context


def _context_lines(context: dict) -> list[str]:
    """ADES PSV header blocks: ``submitter`` / ``observers`` / ``measurers`` (a name or a list of
    names) and ``telescope`` (a dict such as {"design", "aperture", "detector"})."""
    out = []
    for block in ("submitter", "observers", "measurers"):
        names = context.get(block)
        if names:
            out.append(f"# {block}")
            out += [f"! name {n}" for n in ([names] if isinstance(names, str) else names)]
    tel = context.get("telescope")
    if isinstance(tel, dict) and tel:
        out.append("# telescope")
        out += [f"! {k} {v}" for k, v in tel.items()]
    return out


def render_reports(dets: list[dict], code: str, ast_cat: str = "UNK", context: dict | None = None) -> tuple[str, str]:
    """(obs80 text with a header block, ADES PSV version=2022 text) of detection rows.

    The photometric band is column 71 of each obs80 line (``G`` when blank)."""
    from astropy.time import Time

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    obs = [f"COD {code}", f"COM astroprep web report {stamp}, {len({d['designation'] for d in dets})} objects"]
    obs += [d["obs80"] for d in dets if d["obs80"]]
    ctx = _context_lines(context or {})
    ades = ["# version=2022", "# observatory", f"! mpcCode {code}", *ctx, "# comment",
            f"! line astroprep web report {stamp}"]
    if not ctx:
        ades.append("! line add the submitter, observers, measurers and telescope blocks before sending it to the MPC")
    ades.append("trkSub |mode|stn |obsTime                 |ra         |dec        |astCat|mag  |rmsMag|band|logSNR")
    times = Time([d["mjd"] for d in dets], format="mjd", scale="utc").isot if dets else []
    for d, t in zip(dets, times):
        mag = f"{d['mag']:5.2f}" if d["mag"] is not None else "     "
        rms = f"{d['mag_err']:6.3f}" if d["mag_err"] is not None else "      "
        snr = f"{math.log10(d['snr']):6.2f}" if d["snr"] and d["snr"] > 0 else "      "
        band = (d["obs80"][70:71].strip() if len(d["obs80"]) >= 71 else "") or "G"
        ades.append(f"{d['designation']:<7}| CCD|{code:<4}|{t[:23]}Z|{d['ra']:11.7f}|{d['dec']:+11.7f}|{ast_cat:>6}|"
                    f"{mag}|{rms}|{band:>4}|{snr}")
    return "\n".join(obs) + "\n", "\n".join(ades) + "\n"


def night_reports(db: Session, night_id: int) -> tuple[str, str]:
    return render_reports(*valid_detections(db, night_id))
