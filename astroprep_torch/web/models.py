"""SQLAlchemy 2 models of the validation web application.

A *night* holds ingested *runs* (the output folder of ``astroprep night`` or ``astroprep run``);
each run is one *field* of that night with its *frames*, transient *candidates* (triplet
thumbnails, classifier score) and moving *objects* (tracklets) with their *detections*. People's
decisions are an append-only history of :class:`LabelEvent` rows; the ``label`` column of an object
or candidate is a cache of its latest event, written in the same transaction as the event (under a
row lock) so lists can filter and count by label without a query per row.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

from sqlalchemy import (JSON, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("viewer", "validator", "admin")
LABELS = ("undefined", "valid", "invalid")
NIGHT_STATUS = ("CREATED", "LOADED")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (CheckConstraint("role IN ('viewer', 'validator', 'admin')", name="ck_users_role"),)


class Night(Base):
    __tablename__ = "nights"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="CREATED")
    notes: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    fields: Mapped[list["Field"]] = relationship(back_populates="night", cascade="all, delete-orphan",
                                                 passive_deletes=True, order_by="Field.id")


class Run(Base):
    """One ingested output folder (its resolved path and a hash of its ingested files)."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    night_id: Mapped[int] = mapped_column(ForeignKey("nights.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    content_hash: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # "night" | "run"
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (UniqueConstraint("path", "content_hash", name="uq_runs_path_hash"),)


class Field(Base):
    __tablename__ = "fields"
    id: Mapped[int] = mapped_column(primary_key=True)
    night_id: Mapped[int] = mapped_column(ForeignKey("nights.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    night: Mapped[Night] = relationship(back_populates="fields")
    run: Mapped[Run] = relationship()


class Frame(Base):
    __tablename__ = "frames"
    id: Mapped[int] = mapped_column(primary_key=True)
    field_id: Mapped[int] = mapped_column(ForeignKey("fields.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(256))
    path: Mapped[str] = mapped_column(String(1024), default="")
    kind: Mapped[str] = mapped_column(String(16), default="science")  # science | bias | flat | dark
    mjd: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    exptime: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="ok")
    reason: Mapped[Optional[str]] = mapped_column(Text, nullable=True)


class Candidate(Base):
    __tablename__ = "candidates"
    id: Mapped[int] = mapped_column(primary_key=True)
    field_id: Mapped[int] = mapped_column(ForeignKey("fields.id", ondelete="CASCADE"))
    frame_id: Mapped[int] = mapped_column(ForeignKey("frames.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    ra: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    dec: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    flux: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    snr: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    score: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    thumb: Mapped[str] = mapped_column(String(1024), default="")  # path relative to the run folder
    stamp: Mapped[str] = mapped_column(String(1024), default="")  # .npy triplet, relative to the run folder
    label: Mapped[str] = mapped_column(String(16), default="undefined")
    __table_args__ = (Index("ix_candidates_field_label", "field_id", "label"),
                      Index("ix_candidates_field_score", "field_id", "score"),
                      Index("ix_candidates_field_snr", "field_id", "snr"))


class MovingObject(Base):
    """A tracklet (``trksub``) and its per-tracklet rate / PA / RMS."""

    __tablename__ = "objects"
    id: Mapped[int] = mapped_column(primary_key=True)
    field_id: Mapped[int] = mapped_column(ForeignKey("fields.id", ondelete="CASCADE"))
    designation: Mapped[str] = mapped_column(String(16))
    tracklet: Mapped[int] = mapped_column(Integer)
    rate: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    pa: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    rms: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    mag: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    score: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    n_detections: Mapped[int] = mapped_column(Integer, default=0)
    sequence_gif: Mapped[str] = mapped_column(String(1024), default="")
    sequence_pt: Mapped[str] = mapped_column(String(1024), default="")
    label: Mapped[str] = mapped_column(String(16), default="undefined")
    detections: Mapped[list["Detection"]] = relationship(order_by="Detection.exposure", cascade="all, delete-orphan",
                                                         passive_deletes=True)
    __table_args__ = (Index("ix_objects_field_label", "field_id", "label"),)


class Detection(Base):
    __tablename__ = "detections"
    id: Mapped[int] = mapped_column(primary_key=True)
    object_id: Mapped[int] = mapped_column(ForeignKey("objects.id", ondelete="CASCADE"), index=True)
    frame: Mapped[str] = mapped_column(String(256))
    exposure: Mapped[int] = mapped_column(Integer)
    mjd: Mapped[float] = mapped_column(Float)
    ra: Mapped[float] = mapped_column(Float)
    dec: Mapped[float] = mapped_column(Float)
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    mag: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    mag_err: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    snr: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    e: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    fwhm: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    theta: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    obs80: Mapped[str] = mapped_column(String(96), default="")
    cutout: Mapped[str] = mapped_column(String(1024), default="")  # FITS cutout, relative to the run folder
    thumb: Mapped[str] = mapped_column(String(1024), default="")  # PNG stamp(s), relative to the run folder


class LabelEvent(Base):
    """One decision: who labelled which object or candidate, when, how, and why (append-only)."""

    __tablename__ = "label_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    object_id: Mapped[Optional[int]] = mapped_column(ForeignKey("objects.id", ondelete="CASCADE"), nullable=True)
    candidate_id: Mapped[Optional[int]] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"), nullable=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    label: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str] = mapped_column(Text, default="")
    user: Mapped[User] = relationship(lazy="joined")
    __table_args__ = (
        CheckConstraint("(object_id IS NULL) <> (candidate_id IS NULL)", name="ck_label_events_target"),
        CheckConstraint("label IN ('undefined', 'valid', 'invalid')", name="ck_label_events_label"),
        Index("ix_label_events_object", "object_id", "id"),
        Index("ix_label_events_candidate", "candidate_id", "id"),
    )


class Setting(Base):
    """Key/value settings of the server (e.g. the signing secret, made once on first start)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
