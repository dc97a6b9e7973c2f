"""Image quality assessment: an autoencoder trained on good frames scores frames and patches.

Paper section 2.2.1 and Fig. 1 (after Jia et al. 2024): a convolutional autoencoder learns what good
frames look like, self-supervised; a frame or patch it reconstructs badly deviates from good
quality. Three steps:

* *Pre-training* -- :class:`QualityModule` (a LightningModule) trains :class:`QualityAutoencoder`
  on good frames streamed by :class:`QualityDataModule` (FITS files or the simulator).
* *Deployment* -- :class:`QualityScorer` gives a per-patch reconstruction-error map, a per-frame
  score, the fraction of bad area and a full-resolution bool mask of bad patches (True = bad) that
  :class:`~astroprep_torch.background.Background2D` and the detection stage accept as ``mask``.
  A frame with more than ``reject_fraction`` (the paper: 70%) of its area bad is rejected.
* *Monitoring* ("mode-val") -- :func:`monitor` / :class:`QualityMonitor` periodically score a held-out
  set of good frames and warn when more than a set fraction is flagged: the model needs retraining.

What the network sees. The defects this stage is for (moonlight, clouds, shutter shadows, defocus,
satellite trails) are medium to large scale, so frames are summarised on a grid of
``bin_factor`` x ``bin_factor`` blocks (:func:`normalize_frame`), normalised per frame by the median
and by a noise estimate that gradients do not inflate (1.4826 x MAD of horizontal neighbour
differences / sqrt 2), and compressed with ``asinh``. Four channels: the block *sky* (robust to
stars), the *flux* above a smooth local background, the *stars* (brightest pixel above the sky)
and the *sharpness* (brightest pixel above the brightest half-block mean). The autoencoder sees sky
and flux and must reconstruct all four: it cannot reproduce skies outside the range of good frames
(veils, glows, shadows), and it predicts sharp peaks wherever good frames put flux, so a defocused
frame -- flux without peaks -- fails. Masked and non-finite pixels are replaced by the median.

The error map is the squared residual ``(AE(x) - x)**2`` averaged over channels and over each patch
of ``patch_size`` full-resolution pixels (``stride`` apart; edge patches cover what is left), plus
``peak_weight`` x the squared positive patch mean of the *signed* residual of the peak channels (light
spread by defocus lowers the per-block errors but not the peaks missing over a patch).
The frame ``score`` is the mean of the worst ``score_top`` fraction of its patches, so a defect
that covers a tenth of the frame still raises it.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import all_finite, check_image, check_mask
from .stretch import signed_asinh as _asinh  # asinh of the features: the stretch module's kernel
from ._robust import MAD_TO_STD, mad_std

log = logging.getLogger(__name__)

try:
    import lightning as L

    _LightningModule = L.LightningModule
    _LightningDataModule = L.LightningDataModule
    _Callback = L.Callback
except Exception:  # pragma: no cover
    _LightningModule = nn.Module  # type: ignore[assignment,misc]
    _LightningDataModule = object  # type: ignore[assignment,misc]
    _Callback = object  # type: ignore[assignment,misc]

__all__ = [
    "QualityAutoencoder", "QualityScorer", "QualityResult", "QualityModule", "QualityDataModule",
    "QualityMonitor", "MonitorReport", "monitor", "normalize_frame", "baseline_features",
    "PRETRAINED_PATH", "train_from_config", "StarStats", "star_stats",
]

#: Weights, architecture and threshold of the model shipped with the package.
PRETRAINED_PATH = Path(__file__).resolve().parent / "weights" / "quality_default.pt"


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
#: Version of the features :func:`normalize_frame` computes; checkpoints record it and
#: :meth:`QualityScorer.load` refuses those made for other features.
FEATURES_VERSION = 2

#: Channels of :func:`normalize_frame`: inputs of the autoencoder first, then held-out targets.
CHANNELS = ("sky", "flux", "stars", "sharpness")

# Side of the cells (on the binned grid) of the local background under the flux channel, and the
# quantile of the block skies taken in each cell (low, so that extended light does not raise it).
_BG_CELL = 16
_BG_QUANTILE = 0.2
# Strided samples used for the frame median and the noise (a few 1e5 values are plenty).
_MEDIAN_SAMPLE = 1 << 18
_NOISE_SAMPLE = 1 << 18


def _frame_median(x: Tensor, bad: Optional[Tensor]) -> Tensor:
    """Median ``(B,)`` of a strided sample of at most ~``_MEDIAN_SAMPLE`` good pixels per frame."""
    b = x.shape[0]
    flat = x.reshape(b, -1)
    step = max(1, flat.shape[1] // _MEDIAN_SAMPLE)
    sample = flat[:, ::step]
    if bad is not None:
        sample = sample.masked_fill(bad.reshape(b, -1)[:, ::step], float("nan"))
    return torch.nanmedian(sample, dim=1).values.nan_to_num(0.0)


def _frame_noise(x: Tensor) -> Tensor:
    """Pixel noise ``(B,)``: 1.4826 x MAD of horizontal neighbour differences / sqrt 2 on a
    subset of rows (gradients cancel out in the differences)."""
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    rstep = max(1, (h * max(w - 1, 1)) // _NOISE_SAMPLE)
    rows = x[..., ::rstep, :]
    d = (rows[..., 1:] - rows[..., :-1]).reshape(b, -1)
    if d.shape[1] == 0:
        return torch.ones(b, dtype=x.dtype, device=x.device)
    return (mad_std(d, 1) / math.sqrt(2.0)).clamp(min=torch.finfo(x.dtype).tiny)


def _local_background(sky: Tensor) -> Tensor:
    """A smooth background on the binned grid: the ``_BG_QUANTILE`` quantile of the block skies in
    ``_BG_CELL`` x ``_BG_CELL`` cells, interpolated bilinearly (cell centres) back to the grid."""
    b, _, h, w = sky.shape
    c = _BG_CELL
    ph, pw = (-h) % c, (-w) % c
    s = F.pad(sky, (0, pw, 0, ph), mode="replicate") if (ph or pw) else sky
    nh, nw = s.shape[-2] // c, s.shape[-1] // c
    cells = s.reshape(b, 1, nh, c, nw, c).permute(0, 1, 2, 4, 3, 5).reshape(b, 1, nh, nw, c * c)
    q = cells.kthvalue(max(1, int(round(_BG_QUANTILE * c * c))), dim=-1).values
    up = F.interpolate(q, size=(nh * c, nw * c), mode="bilinear", align_corners=False)
    return up[..., :h, :w]


def normalize_frame(image: Tensor, mask: Optional[Tensor] = None, bin_factor: int = 4) -> Tensor:
    """Bin, normalise and compress frames into the autoencoder's four channels.

    Args:
        image: ``(B, 1, H, W)`` frames in ADU.
        mask: optional bool ``(B, 1, H, W)``, True = bad (replaced by the frame median).
        bin_factor: binning factor ``k`` (even); the frame is padded by edge replication to a
            multiple of ``k``.

    Returns:
        ``(B, 4, ceil(H / k), ceil(W / k))`` (:data:`CHANNELS`). Each ``k x k`` block is split into
        four ``k/2 x k/2`` sub-blocks whose means ``a1..a4`` give the block's robust *sky*
        ``s_b`` (the mean of the middle two: one star in a sub-block is rejected), its mean
        ``mean_b`` and the largest sub-block mean ``a_max``; ``max_b`` is the block's brightest pixel.

        * 0 *sky*: ``asinh((s_b - m) / (3 sigma))`` -- the sky's structure (veils, shadows, glows).
        * 1 *flux*: ``asinh((mean_b - bg) / (2 sigma))`` -- light above a smooth local background
          ``bg`` (a low quantile of the block skies in 16 x 16-block cells): stars, and also the
          spread-out light of defocused stars.
        * 2 *stars*: ``asinh((max_b - s_b) / (5 sigma))`` -- point-like peaks.
        * 3 *sharpness*: ``asinh((max_b - a_max) / (5 sigma))`` -- how much the brightest pixel
          stands above the brightest sub-block mean: large for a focused star, ~0 for a donut.

        ``m`` is the frame median (of a strided sample of ~2.6e5 good pixels) and ``sigma`` the pixel
        noise (1.4826 x MAD of horizontal neighbour differences / sqrt 2 on ~2.6e5 differences,
        which gradients do not inflate). The autoencoder sees channels 0-1 and must predict 2-3 from
        them: good frames tie flux to sharp peaks, a defocused frame has the flux without the peaks.
    """
    return _normalize(image, mask, bin_factor)[0]


def _normalize(image: Tensor, mask: Optional[Tensor], bin_factor: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`normalize_frame`'s channels with the frame median ``m`` and noise ``sigma`` they were
    normalised by, each ``(B, 1, 1, 1)``."""
    image = check_image(image, "image", channels=1)
    mask = check_mask(mask, image)
    k = int(bin_factor)
    if k < 2 or k % 2:
        raise ValueError(f"normalize_frame: bin_factor must be an even integer >= 2, got {bin_factor}")
    x, m = _fill_bad_with_median(image, mask)[:2]
    sigma = _frame_noise(x).view(-1, 1, 1, 1)
    return _asinh(_block_features(x, k, m, sigma)), m, sigma


def _fill_bad_with_median(image: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(x, m, bad)``: ``image`` with masked and non-finite pixels set to the frame median ``m``
    ``(B, 1, 1, 1)``; ``bad`` their map (``None`` when there are none to replace)."""
    b = image.shape[0]
    if all_finite(image):  # one cheap pass decides; no frame-sized isfinite map
        bad = None if mask is None else mask.expand_as(image)
    else:
        bad = ~torch.isfinite(image)
        if mask is not None:
            bad |= mask
    med = _frame_median(image, bad)
    m = med.view(b, 1, 1, 1).to(image.dtype)
    x = image if bad is None else torch.where(bad, m, image)
    return x, m, bad


def _block_features(x: Tensor, k: int, m: Tensor, sigma: Tensor) -> Tensor:
    """The four channels of :func:`normalize_frame` before ``asinh``, from the clean frame ``x``, its
    median ``m`` and noise ``sigma``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % k, (-w) % k
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    bmax = _block_max(x, k)
    sub = _block_mean(x, k // 2)  # (B, 1, 2 hb, 2 wb): the four sub-block means of each block
    a1, a2, a3, a4 = sub[..., 0::2, 0::2], sub[..., 0::2, 1::2], sub[..., 1::2, 0::2], sub[..., 1::2, 1::2]
    total = a1 + a2 + a3 + a4
    amax = torch.maximum(torch.maximum(a1, a2), torch.maximum(a3, a4))
    amin = torch.minimum(torch.minimum(a1, a2), torch.minimum(a3, a4))
    sky_b = 0.5 * (total - amax - amin)
    bg = _local_background(sky_b)
    return torch.cat([(sky_b - m) / (3.0 * sigma), (0.25 * total - bg) / (2.0 * sigma),
                      (bmax - sky_b) / (5.0 * sigma), (bmax - amax) / (5.0 * sigma)], dim=1)


def _block_max(x: Tensor, k: int) -> Tensor:
    """``F.max_pool2d(x, k)`` for H, W multiples of ``k``, the same values: the maximum along rows of
    ``k`` columns, then over ``k`` rows (two reductions over contiguous memory; faster than the
    pooling kernel on CPU, which also makes indices: experiments/results/stretch_kernels.md)."""
    if x.requires_grad and torch.is_grad_enabled():
        return F.max_pool2d(x, k)
    b, c, h, w = x.shape
    cols = x.reshape(b, c, h, w // k, k).amax(-1)
    return cols.view(b, c, h // k, k, w // k).amax(3)


def _block_mean(x: Tensor, k: int) -> Tensor:
    """``F.avg_pool2d(x, k)`` for H, W multiples of ``k``, the same values to float rounding: the
    ``k`` strided column slices added, then the ``k`` strided row slices of that (elementwise adds
    over the frame; faster than the pooling kernel on CPU, where a sum over an inner axis of 2 is
    slower still: experiments/results/stretch_kernels.md). Returns a strided view of a
    ``(B, C, H, W / k)`` buffer."""
    if k == 1:
        return x * 1.0
    cols = torch.add(x[..., 0::k], x[..., 1::k])
    for j in range(2, k):
        cols.add_(x[..., j::k])
    out = cols[..., 0::k, :]
    for j in range(1, k):
        out.add_(cols[..., j::k, :])  # rows j::k and 0::k of ``cols`` do not overlap
    return out.mul_(1.0 / (k * k))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class QualityAutoencoder(nn.Module):
    """A small convolutional autoencoder over normalised frames (fully convolutional).

    Input: the first ``in_channels`` channels of :func:`normalize_frame` (sky, flux); output: all
    ``out_channels`` (sky, flux, stars, sharpness). The peak channels (stars, sharpness) are held
    out of the input, so the decoder must infer them from the flux the way good frames relate them:
    where a defocused frame shows flux without sharp peaks, the prediction fails (and the more the
    defocus spreads the light, the more peaks are missing). The sky output is bounded to
    ``+-sky_range`` (a scaled tanh), the range good frames occupy, so a veil, glow or shadow far
    outside it is reconstructed badly by construction.

    ``depth`` stride-2 stages halve the resolution ``depth`` times, doubling the width from
    ``width``; a 1x1 bottleneck of ``latent_channels`` limits what passes; the decoder mirrors the
    encoder with nearest upsampling and 3x3 convolutions. Input ``(B, C, h, w)``, any ``h, w``
    (padded internally to a multiple of ``2**depth`` and cropped back); output the same shape.
    """

    def __init__(self, in_channels: int = 2, width: int = 16, depth: int = 3, latent_channels: int = 8,
                 sky_range: float = 1.0, out_channels: int = 4):
        super().__init__()
        if depth < 1 or width < 1 or latent_channels < 1:
            raise ValueError(f"QualityAutoencoder: depth, width and latent_channels must be >= 1, got {depth}, {width}, {latent_channels}")
        self.config = dict(in_channels=in_channels, width=width, depth=depth, latent_channels=latent_channels,
                           sky_range=sky_range, out_channels=out_channels)
        self.in_channels = in_channels
        self.sky_range = float(sky_range)
        self.depth = depth
        enc: list[nn.Module] = []
        c = in_channels
        chans = []
        for i in range(depth):
            co = width * 2**i
            enc += [nn.Conv2d(c, co, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(co, co, 3, padding=1), nn.SiLU()]
            chans.append(co)
            c = co
        enc += [nn.Conv2d(c, latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, c, 1), nn.SiLU()]
        for i in reversed(range(depth)):
            co = width * 2 ** max(i - 1, 0)
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, co, 3, padding=1), nn.SiLU()]
            c = co
        dec += [nn.Conv2d(c, out_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        # channels_last (NHWC) convolutions are about twice as fast on CPU for these small widths.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C, h, w)``; the first ``in_channels`` channels are encoded, and the output has
        ``out_channels`` channels (the held-out ones must be inferred from the others)."""
        x = x[:, : self.in_channels].contiguous(memory_format=torch.channels_last)
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        y = self.decoder(self.encoder(x))
        if self.sky_range > 0:
            # The sky channel is bounded to what good frames show (+-sky_range in asinh units), so
            # veils, glows and shadows beyond it cannot be reconstructed and stand out.
            r = self.sky_range
            y = torch.cat([r * torch.tanh(y[:, :1] / r), y[:, 1:]], dim=1)
        return y[..., :h, :w]


# --------------------------------------------------------------------------------------------
# Scorer
# --------------------------------------------------------------------------------------------
class QualityResult(NamedTuple):
    """Output of :class:`QualityScorer`.

    Attributes:
        patch_error: ``(B, 1, nh, nw)`` mean squared reconstruction error per patch.
        score: ``(B,)`` frame score (mean error of the worst ``score_top`` fraction of patches).
        bad_fraction: ``(B,)`` fraction of the frame area covered by bad patches (0 without threshold).
        bad_mask: bool ``(B, 1, H, W)``, True inside bad patches.
        rejected: bool ``(B,)``, True when ``bad_fraction > reject_fraction``.
    """

    patch_error: Tensor
    score: Tensor
    bad_fraction: Tensor
    bad_mask: Tensor
    rejected: Tensor


class QualityScorer(nn.Module):
    """Score frames and patches by the reconstruction error of a :class:`QualityAutoencoder`.

    Args:
        model: the trained autoencoder (or any module mapping normalised frames to frames).
        patch_size: patch side in full-resolution pixels (a multiple of ``bin_factor``).
        stride: distance between patches in full-resolution pixels (<= ``patch_size``).
        threshold: patch error above which a patch is bad (``None``: nothing is flagged until
            :meth:`calibrate` sets it).
        reject_fraction: a frame with more than this fraction of its area bad is rejected.
        bin_factor: binning before the network (see :func:`normalize_frame`).
        score_top: fraction of worst patches averaged into the frame score.
        peak_weight: weight of the patch-level term ``max(mean(y - x), 0)**2`` of the peak channels
            (stars, sharpness; :data:`CHANNELS`): the *signed* residual averaged over the patch, where
            positive means peaks predicted from the flux but missing in the frame. A
            defocused frame spreads each star's light over many blocks, so the per-block errors shrink
            as the defocus grows, but the missing peaks summed over a patch do not: this term keeps
            defocus detectable at every amplitude. 0 switches it off.

    ``forward(image, mask=None) -> QualityResult`` for ``image`` ``(B, 1, H, W)``. The patch error
    is the mean over the patch's blocks and channels of ``(y - x)**2`` (``x`` the normalised frame,
    ``y = model(x)``) plus ``peak_weight`` times the squared positive part of the patch mean of
    ``y - x`` over the peak channels.
    """

    def __init__(self, model: Optional[nn.Module] = None, patch_size: int = 128, stride: int = 128,
                 threshold: Optional[float] = None, reject_fraction: float = 0.7, bin_factor: int = 4,
                 score_top: float = 0.1, peak_weight: float = 30.0):
        super().__init__()
        if patch_size % bin_factor or stride % bin_factor:
            raise ValueError(f"patch_size ({patch_size}) and stride ({stride}) must be multiples of bin_factor ({bin_factor})")
        if not 0 < stride <= patch_size:
            raise ValueError(f"stride must lie in (0, patch_size], got {stride} with patch_size {patch_size}")
        if not 0.0 < score_top <= 1.0:
            raise ValueError(f"score_top must lie in (0, 1], got {score_top}")
        self.model = model if model is not None else QualityAutoencoder()
        self.patch_size = int(patch_size)
        self.stride = int(stride)
        self.bin_factor = int(bin_factor)
        self.reject_fraction = float(reject_fraction)
        self.score_top = float(score_top)
        self.peak_weight = float(peak_weight)
        self.register_buffer("threshold", torch.tensor(float("inf") if threshold is None else float(threshold)))
        self.register_buffer("baseline", None)  # log patch errors typical of the instrument (see adapt)
        self.register_buffer("psf_reference", None)  # the night's star width and count (see adapt)
        self.register_buffer("sky_pattern", None)  # the night's log relative sky per patch (see adapt)
        self.register_buffer("sky_reference", None)  # [spread, k] of the sky check (see adapt)
        self.register_buffer("sky_flat", None)  # the night's sky channel per block (see adapt)
        self.scope = ""  # what the model was trained on (set by pretrained())

    # -- core -------------------------------------------------------------------------------
    def residual(self, image: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Signed reconstruction residual ``model(x) - x`` on the binned grid ``(B, C, h, w)``."""
        x = normalize_frame(image, mask, self.bin_factor)
        return self.model(x) - x

    def error_map(self, image: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Squared reconstruction error on the binned grid ``(B, 1, h, w)`` (mean over channels)."""
        return self.residual(image, mask).square().mean(dim=1, keepdim=True)

    def patch_errors(self, image: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Patch errors ``(B, 1, nh, nw)`` (see the class docstring)."""
        return self._errors_and_sky(image, mask)[0]

    def _errors_and_sky(self, image: Tensor, mask: Optional[Tensor], feats=None) -> tuple[Tensor, Tensor]:
        """The patch errors and the patches' log relative sky (:func:`_patch_log_sky`), ``(B, 1, nh, nw)``
        each, from one pass of the features (``feats``: those of :func:`_normalize`, if computed)."""
        x, m, sigma = _normalize(image, mask, self.bin_factor) if feats is None else feats
        k, s = self.patch_size // self.bin_factor, self.stride // self.bin_factor
        log_sky = _patch_log_sky(x, m, sigma, k, s)
        if self.sky_flat is not None and self.sky_flat.shape[-2:] == x.shape[-2:]:
            x = torch.cat([x[:, :1] - self.sky_flat.to(x.dtype), x[:, 1:]], dim=1)
        res = self.model(x) - x
        err = res.square().mean(dim=1, keepdim=True)
        if self.peak_weight > 0 and res.shape[1] > 2:
            # Channel 0 is the squared error, channel 1 the signed residual of the peak channels.
            err = torch.cat([err, res[:, 2:].mean(dim=1, keepdim=True)], dim=1)
        pooled = F.avg_pool2d(err, k, stride=s, ceil_mode=True, count_include_pad=False)
        if pooled.shape[1] > 1:
            # One-sided: only peaks *missing* (predicted above observed) count. Observed peaks above the
            # prediction happen in good parts of frames whose global noise is underestimated (e.g. a
            # frame partly in a shutter shadow) and must not flag those parts.
            pooled = pooled[:, :1] + self.peak_weight * pooled[:, 1:].clamp(min=0).square()
        pe = pooled if self.baseline is None else pooled / self._typical(pooled)
        if self.psf_reference is not None:
            pe = torch.maximum(pe, self._psf_error(image, mask).to(pe.dtype).view(-1, 1, 1, 1))
        if self.sky_reference is not None:
            pe = torch.maximum(pe, self._sky_error(log_sky).to(pe.dtype))
        return pe, log_sky

    def _sky_error(self, log_sky: Tensor) -> Tensor:
        """The sky check as patch errors ``(B, 1, nh, nw)``: ``threshold x exp(_PSF_SLOPE (z - k))``,
        ``z`` each patch's relative sky above the frame's clear sky (:func:`_sky_deviation`, the
        adapted night's pattern divided out) in the night's spreads, so that a patch ``k`` spreads
        brighter reaches the threshold; 0 for frames of another patch grid (no pattern to divide
        the vignetting out)."""
        pattern, ref = self.sky_pattern.to(log_sky.dtype), self.sky_reference.double()
        if pattern.shape[-2:] != log_sky.shape[-2:]:
            return torch.zeros_like(log_sky)
        z = (_sky_deviation(log_sky - pattern).double() / ref[0]).nan_to_num(0.0)
        return self.threshold.double() * torch.exp((_PSF_SLOPE * (z - ref[1])).clamp(max=30.0))

    def _psf_error(self, image: Tensor, mask: Optional[Tensor]) -> Tensor:
        """The PSF check as a patch error ``(B,)`` for every patch of a frame: ``threshold x
        exp(_PSF_SLOPE (z - k))``, ``z`` the frame's :func:`_psf_z` and ``k`` that of :meth:`adapt`, so a frame whose
        stars are ``k`` of the night's sigmas broader (or fewer) than the median reaches the threshold."""
        ref = self.psf_reference.double()
        z = _psf_z(star_stats(image, mask), ref)
        return self.threshold.double() * torch.exp((_PSF_SLOPE * (z - ref[4])).clamp(max=30.0))

    def _typical(self, pe: Tensor) -> Tensor:
        """The instrument's typical patch error (exp of the adapted baseline), per patch position when
        the baseline has this frame's patch grid, else its median."""
        base = self.baseline.to(pe.dtype)
        if base.shape[-2:] != pe.shape[-2:]:
            base = base.median()
        return base.exp()

    @torch.no_grad()
    def adapt(self, frames, k: float = 3.0, per_position: bool = True, mask=None, psf: bool = True,
              sky: bool = True, flat: bool = True) -> float:
        """Adapt the thresholds to an instrument from frames of one night (or a few good frames).

        No retraining: the patch errors of ``frames`` (a ``(B, 1, H, W)`` tensor or a list of them)
        give the instrument's typical error, per patch position (the median over frames, when there
        are at least 3 frames of one shape and ``per_position``: vignetting, fixed patterns and the
        field's own structure then cancel; the spread is measured on each frame against the median of
        the *other* frames, so that 3 frames do not understate it) or over all patches. Patch errors become ratios to that
        typical error and the threshold is ``exp(median + k * sigma)`` of their logarithms, sigma
        being 1.4826 x the median deviation of the lower half from the median (defects raise errors,
        so bad patches do not widen it). Robust as long as most patches at each position are good:
        the night's own frames, bad ones included, will do. Returns the threshold (a ratio).

        ``psf``: also check each frame's stars against the night's (:func:`star_stats`): their width
        (the median ``sqrt(flux / peak)`` of the brightest) and their number, each as a log against the
        night's median over a spread that defects do not widen (:func:`_robust_reference`).
        A frame ``z`` of these sigmas broader or sparser scores ``threshold x exp(2 (z - k))`` on
        every patch: the autoencoder's features, binned 4 x 4, cannot tell a defocused frame from a sharp one
        when the instrument's own PSF is broad and its field sparse; the night's own stars can.

        ``flat`` (per position only): subtract the night's median sky channel per block (channel 0 of
        :func:`normalize_frame`) from every frame's features before the autoencoder, a flat field for
        the features: the model learned frames without vignetting, and an edge's dimmed sky, which
        it cannot reconstruct, would dominate the errors of the edge's patches (a trail crossing them
        then scored like a good patch).

        ``sky`` (per position only): also check each patch's sky against the frame's clear sky
        (:func:`_night_sky_reference`). The autoencoder sees the sky in noise units relative to the
        frame's median: a faint glow (moonlight where it adds ~10% to a dark sky) or a trail's light
        over an edge patch sits within what it reconstructs, and where moonlight covers most of the
        frame the median itself is lit. The relative sky (``log(sky / frame median)`` per patch, the
        night's median pattern divided out: vignetting and flat cancel) above the frame's clear sky
        (a low quantile of its patches: added light only raises patches) shows them; a patch ``z`` of
        the night's spreads brighter scores ``threshold x exp(2 (z - k))`` (the spread from the median
        of each frame's deviations against the other frames' pattern, at least 0.02: a
        flag needs >= ~6% of the sky). One-sided: a darker patch (a shutter shadow) makes the rest of
        its frame stand out instead, which rejects that frame all the same.
        """
        frames = [frames] if isinstance(frames, Tensor) else list(frames)
        if not frames:
            raise ValueError("adapt: frames is empty")
        self.baseline = self.psf_reference = self.sky_pattern = self.sky_reference = self.sky_flat = None
        frames = [f if f.dim() == 4 else f.unsqueeze(0) for f in frames]
        feats = [_normalize(f, mask, self.bin_factor) for f in frames]
        same = len({tuple(x.shape[-2:]) for x, _, _ in feats}) == 1
        per_position = per_position and same and sum(x.shape[0] for x, _, _ in feats) >= 3
        if per_position and flat:
            self.sky_flat = torch.cat([x[:, :1] for x, _, _ in feats]).median(dim=0, keepdim=True).values
        pairs = [self._errors_and_sky(f, mask, ft) for f, ft in zip(frames, feats)]
        del feats
        errs = [e.double().clamp(min=1e-12).log() for e, _ in pairs]
        if per_position:
            logs = torch.cat(errs, 0)
            base = logs.median(dim=0, keepdim=True).values
            r = _leave_one_out_residuals(logs)
        else:
            logs = torch.cat([e.reshape(-1) for e in errs])
            base = logs.median().reshape(1, 1, 1, 1)
            r = logs - base
        r = r.reshape(-1)
        med = r.median()
        # the spread of the good patches from the lower half alone: defects only raise errors, so
        # bad frames in the night widen the upper half but not the lower one
        # at least _MIN_LOG_SPREAD: a few frames alike in seeing and sky understate how much the
        # next ones differ
        sigma = (MAD_TO_STD * (med - r[r <= med]).median()).clamp(min=_MIN_LOG_SPREAD)
        self.baseline = base.to(self.threshold.dtype)
        self.threshold.fill_(float(torch.exp(med + float(k) * sigma)))
        if psf:
            self.psf_reference = self._night_psf_reference(frames, float(k), mask)
        if sky and per_position:
            self.sky_pattern, self.sky_reference = _night_sky_reference(torch.cat([s for _, s in pairs]), float(k))
        return float(self.threshold)

    def _night_psf_reference(self, frames: list, k: float, mask) -> Tensor:
        """``[width median, width spread, count median, count spread, k]`` of the night's frames."""
        stats = [star_stats(f if f.dim() == 4 else f.unsqueeze(0), mask) for f in frames]
        w_med, w_sig = _robust_reference(torch.cat([s.log_width for s in stats]), _PSF_MIN_SPREAD[0])
        n_med, n_sig = _robust_reference(torch.cat([s.log_count for s in stats]), _PSF_MIN_SPREAD[1])
        if math.isfinite(n_med):  # counts scatter at least twice as Poisson's: few stars prove little
            n_sig = max(n_sig, 2.0 / math.sqrt(math.exp(n_med)))
        return torch.tensor([w_med, w_sig, n_med, n_sig, k], dtype=torch.float64, device=self.threshold.device)

    def forward(self, image: Tensor, mask: Optional[Tensor] = None) -> QualityResult:
        image = check_image(image, "image", channels=1)
        h, w = image.shape[-2:]
        pe = self.patch_errors(image, mask)
        b = pe.shape[0]
        flat = pe.reshape(b, -1)
        k = max(1, int(math.ceil(self.score_top * flat.shape[1])))
        score = flat.topk(k, dim=1).values.mean(dim=1)
        flags = (pe > self.threshold).to(image.dtype)
        # Full-resolution mask: a pixel is bad when any patch covering it is bad. Coverage is
        # computed on a grid of g x g cells (g = gcd(patch_size, stride)) and then expanded.
        g = math.gcd(self.patch_size, self.stride)
        kc, sc = self.patch_size // g, self.stride // g
        if kc == 1:
            cells = flags
        else:
            ones = torch.ones(1, 1, kc, kc, dtype=image.dtype, device=image.device)
            cells = F.conv_transpose2d(flags, ones, stride=sc)
        cells = cells > 0.5
        nh, nw = cells.shape[-2:]
        bad_mask = cells[:, :, :, None, :, None].expand(b, 1, nh, g, nw, g).reshape(b, 1, nh * g, nw * g)[..., :h, :w]
        # Bad area from the cells, each weighted by the pixels it covers inside the frame.
        wr = (h - g * torch.arange(nh, device=image.device, dtype=image.dtype)).clamp(0, g)
        wc = (w - g * torch.arange(nw, device=image.device, dtype=image.dtype)).clamp(0, g)
        bad_fraction = (cells.to(image.dtype) * wr[:, None] * wc[None, :]).sum(dim=(1, 2, 3)) / (h * w)
        return QualityResult(pe, score, bad_fraction, bad_mask, bad_fraction > self.reject_fraction)

    # -- calibration, persistence -----------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, good_frames, quantile: float = 0.99, mask=None) -> float:
        """Set ``threshold`` to the ``quantile`` of patch errors over good frames and return it.

        ``good_frames``: a tensor ``(B, 1, H, W)`` or an iterable of such tensors (e.g. a DataLoader
        of good frames).
        """
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must lie in (0, 1], got {quantile}")
        frames = [good_frames] if isinstance(good_frames, Tensor) else list(good_frames)
        if not frames:
            raise ValueError("calibrate: good_frames is empty")
        errs = torch.cat([self.patch_errors(f if f.dim() == 4 else f.unsqueeze(0), mask).reshape(-1) for f in frames])
        thr = torch.quantile(errs.double(), quantile).to(self.threshold.dtype)
        self.threshold.fill_(thr)
        return float(thr)

    def save(self, path, **extra) -> None:
        """Save weights, architecture, scorer settings and threshold (loadable with weights_only)."""
        cfg = getattr(self.model, "config", None)
        if cfg is None:
            raise TypeError("save: the model has no .config (only QualityAutoencoder models can be saved this way)")
        payload = {
            "state_dict": self.model.state_dict(),
            "model_config": dict(cfg),
            "scorer_config": dict(patch_size=self.patch_size, stride=self.stride, bin_factor=self.bin_factor,
                                  reject_fraction=self.reject_fraction, score_top=self.score_top,
                                  peak_weight=self.peak_weight),
            "features_version": FEATURES_VERSION,
            "threshold": float(self.threshold),
            **({"baseline": self.baseline.cpu()} if self.baseline is not None else {}),
            **({"psf_reference": self.psf_reference.cpu()} if self.psf_reference is not None else {}),
            **({"sky_pattern": self.sky_pattern.cpu(), "sky_reference": self.sky_reference.cpu()}
               if self.sky_reference is not None else {}),
            **({"sky_flat": self.sky_flat.cpu()} if self.sky_flat is not None else {}),
            **extra,
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path, map_location="cpu", **overrides) -> "QualityScorer":
        """Load a scorer saved by :meth:`save` (``torch.load(weights_only=True)``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"QualityScorer.load: no checkpoint at {path}")
        payload = torch.load(path, map_location=map_location, weights_only=True)
        for key in ("state_dict", "model_config", "scorer_config", "threshold"):
            if key not in payload:
                raise ValueError(f"QualityScorer.load: {path} is not a quality checkpoint (missing {key!r})")
        if payload.get("features_version", 1) != FEATURES_VERSION:
            raise ValueError(f"QualityScorer.load: {path} was trained on normalize_frame features version "
                             f"{payload.get('features_version', 1)}, this version computes {FEATURES_VERSION}: retrain it")
        model = QualityAutoencoder(**payload["model_config"])
        model.load_state_dict(payload["state_dict"])
        kw = dict(payload["scorer_config"], threshold=payload["threshold"])
        kw.update(overrides)
        scorer = cls(model, **kw).eval()
        if payload.get("baseline") is not None:
            scorer.baseline = payload["baseline"]
        if payload.get("psf_reference") is not None:
            scorer.psf_reference = payload["psf_reference"]
        if payload.get("sky_reference") is not None:
            scorer.sky_pattern, scorer.sky_reference = payload["sky_pattern"], payload["sky_reference"]
        if payload.get("sky_flat") is not None:
            scorer.sky_flat = payload["sky_flat"]
        return scorer

    @classmethod
    def pretrained(cls, **overrides) -> "QualityScorer":
        """The default scorer shipped with the package.

        Scope: trained on simulated GWAC-like frames only (11.7"/px, Gaussian PSF of 2-3.5 px FWHM,
        500-2,000 ADU skies, no vignetting; ``configs/quality/train.yaml``, ``astroprep train-quality``
        reproduces it), with a threshold calibrated on such frames. Its *ranking* of frames carries
        over to other telescopes, its threshold does not (it flagged ~65% of the patches of good frames
        of a real 1-m telescope): on another instrument call :meth:`adapt` with the night's frames (or a
        few good ones) -- seconds, no retraining; ``astroprep run`` does so by default
        (``quality_adapt: auto``) -- or retrain on your own good frames.
        """
        scorer = cls.load(PRETRAINED_PATH, **overrides)
        scorer.scope = "simulated GWAC-like frames"
        return scorer


def _leave_one_out_residuals(logs: Tensor) -> Tensor:
    """``logs[i] - median(logs[j != i])`` for each frame ``i`` of ``logs (N, 1, nh, nw)`` (N >= 3)."""
    n = logs.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool, device=logs.device)
    others = torch.stack([logs[keep[i]] for i in range(n)])  # (N, N-1, 1, nh, nw): N is a night's frames
    lo = others.kthvalue((n - 1 + 1) // 2, dim=1).values
    hi = others.kthvalue((n - 1) // 2 + 1, dim=1).values
    return logs - 0.5 * (lo + hi)


# Floor of the spread (log units) of the adapted patch-error ratios: a k = 3 flag then needs a patch
# error at least e^0.6 = 1.8x the instrument's typical one at that position, whatever few frames say.
_MIN_LOG_SPREAD = 0.2


# --------------------------------------------------------------------------------------------
# Sky check of adapted scorers: a patch's sky against the frame's clear sky, vignetting divided out
# --------------------------------------------------------------------------------------------
# Floor of the night's spread of the relative sky (log units): a k = 3 flag then needs a patch at least
# ~6% brighter or darker than the frame's clear sky, whatever a night of uniform skies says (a good
# night's own gradients move patches by a few per cent; the simulator marks > 10% as a defect).
_SKY_MIN_SPREAD = 0.02
# The frame's clear sky: this quantile of its patches' relative sky.
_SKY_CLEAR_QUANTILE = 0.1
# The spread is the median of the night's deviations over this (|z| of a half-normal at its median):
# the defect patches of a night (a minority; moonlit frames raise most of their patches) move it
# less than any upper quantile.
_HALF_NORMAL_MEDIAN = 0.6745


def _patch_log_sky(x: Tensor, m: Tensor, sigma: Tensor, k: int, s: int) -> Tensor:
    """``log`` of each patch's mean block sky over the frame median ``(B, 1, nh, nw)`` from the
    features ``x`` of :func:`_normalize` (the sky channel inverted: ``m + 3 sigma sinh(x_0)``;
    stars do not raise it); NaN where the frame median is not positive (no sky to compare)."""
    sky = 1.0 + (3.0 * sigma / m) * torch.sinh(x[:, :1])
    rel = F.avg_pool2d(sky, k, stride=s, ceil_mode=True, count_include_pad=False)
    out = rel.clamp(min=1e-6).log()
    return torch.where(m > 0, out, torch.full_like(out, float("nan")))


def _sky_deviation(d: Tensor) -> Tensor:
    """``d (B, 1, nh, nw)`` less each frame's clear sky, the ``_SKY_CLEAR_QUANTILE`` quantile of its
    patches: a frame's sky level is free (it changes through the night), its structure is not; and
    light that defects add (moonlight, scattered light, trails) only raises patches, so the clear
    sky lies low even when most of the frame is lit."""
    b = d.shape[0]
    return d - torch.quantile(d.reshape(b, -1), _SKY_CLEAR_QUANTILE, dim=1).view(b, 1, 1, 1)


def _night_sky_reference(log_sky: Tensor, k: float) -> tuple[Tensor, Tensor]:
    """``(pattern, [spread, k])`` of the sky check from the night's ``log_sky (N, 1, nh, nw)``
    (N >= 3): the median over frames per patch, and the spread of each frame's deviations from the
    median of the *other* frames (:func:`_sky_deviation`), from their median, at least
    ``_SKY_MIN_SPREAD``."""
    log_sky = log_sky.double()
    pattern = log_sky.median(dim=0, keepdim=True).values
    dev = _sky_deviation(_leave_one_out_residuals(log_sky))
    dev = dev[torch.isfinite(dev)]
    spread = float(dev.median()) / _HALF_NORMAL_MEDIAN if dev.numel() else 0.0
    ref = torch.tensor([max(spread, _SKY_MIN_SPREAD), k], dtype=torch.float64, device=log_sky.device)
    return pattern.float(), ref


# --------------------------------------------------------------------------------------------
# PSF check of adapted scorers: stars broader or fewer than on the night's typical frame
# --------------------------------------------------------------------------------------------
# Local maxima (3 x 3) this many noise sigmas above a mesh background count as stars; the width is
# measured in a (2 _PSF_BOX + 1)^2 box around the _PSF_STARS brightest (assumes a PSF FWHM below
# ~2 _PSF_BOX pixels; a broader PSF saturates the width, its missing peaks still lower the count).
_PSF_NSIGMA = 5.0
_PSF_MESH = 32
_PSF_BOX = 8
_PSF_STARS = 32
# Floors of the night's spread (log units): a 3-sigma flag then means a PSF at least e^0.6 = 1.8x
# the night's median width (seeing alone rarely varies that much in a night), or fewer than
# e^-0.75 = 0.47x its star count, whatever few frames say
# (the count's floor also grows as 2 / sqrt(1 + the night's median count): twice Poisson's scatter).
_PSF_MIN_SPREAD = (0.2, 0.25)
# The PSF check scores threshold x exp(_PSF_SLOPE (z - k)): steep, so that frames within the night's
# spread (z well below k) stay far below the autoencoder's own errors.
_PSF_SLOPE = 2.0


class StarStats(NamedTuple):
    """Per-frame star statistics ``(B,)`` behind the PSF check of :meth:`QualityScorer.adapt`.

    Attributes:
        log_width: median over the brightest stars of ``0.5 log(flux / peak)`` (the log of an
            equivalent width, in pixels); NaN without stars.
        log_count: ``log(1 + n)`` of the number ``n`` of stars.
    """

    log_width: Tensor
    log_count: Tensor


def _mesh_background(x: Tensor) -> Tensor:
    """Median of each ``_PSF_MESH``-pixel mesh (from every other pixel), bilinear between centres."""
    b, _, h, w = x.shape
    m = _PSF_MESH
    s = F.pad(x, (0, (-w) % m, 0, (-h) % m), mode="replicate")
    nh, nw = s.shape[-2] // m, s.shape[-1] // m
    cells = s[..., ::2, ::2].reshape(b, 1, nh, m // 2, nw, m // 2).permute(0, 1, 2, 4, 3, 5)
    med = cells.reshape(b, 1, nh, nw, -1).median(dim=-1).values
    return F.interpolate(med, size=(nh * m, nw * m), mode="bilinear", align_corners=False)[..., :h, :w]


def star_stats(image: Tensor, mask: Optional[Tensor] = None) -> StarStats:
    """:class:`StarStats` of ``(B, 1, H, W)`` frames: stars are local maxima ``_PSF_NSIGMA`` noise
    sigmas above a mesh background (masked and non-finite pixels set to the background); the
    width is measured on the ``_PSF_STARS`` brightest at least ``_PSF_BOX + 1`` pixels from the edge."""
    image = check_image(image, "image", channels=1)
    x, _, bad = _fill_bad_with_median(image.float(), check_mask(mask, image))
    d = x - _mesh_background(x)
    if bad is not None:
        d = d.masked_fill(bad, 0.0)
    sigma = _frame_noise(x).view(-1, 1, 1, 1)
    peaks = (_max3x3(d) == d) & (d > _PSF_NSIGMA * sigma)
    count = peaks.sum(dim=(1, 2, 3)).to(torch.float32)
    return StarStats(_log_widths(d, peaks), torch.log1p(count))


def _max3x3(d: Tensor) -> Tensor:
    """``F.max_pool2d(d, 3, 1, 1)``, the same values, as maxima of shifted views (rows, then
    columns): a fraction of the pooling kernel's time on CPU."""
    p = F.pad(d, (1, 1, 1, 1), value=-float("inf"))
    r = torch.maximum(torch.maximum(p[..., :, :-2], p[..., :, 1:-1]), p[..., :, 2:])
    return torch.maximum(torch.maximum(r[..., :-2, :], r[..., 1:-1, :]), r[..., 2:, :])


def _brightest(values: Tensor, keep: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest of ``values`` ``(B, N)`` where ``keep`` and their indices, each ``(B, k)``
    (``-inf`` past the kept ones): a top-k over the few kept values instead of the whole frame."""
    b = values.shape[0]
    rows, cols = keep.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=b)
    width = max(k, int(counts.max()) if rows.numel() else 0)
    pos = torch.arange(rows.numel(), device=values.device) - (counts.cumsum(0) - counts)[rows]
    dense = values.new_full((b, width), -float("inf"))
    dense[rows, pos] = values[rows, cols]
    where = torch.zeros((b, width), dtype=torch.long, device=values.device)
    where[rows, pos] = cols
    top, j = dense.topk(k, dim=1)
    return top, where.gather(1, j)


def _log_widths(d: Tensor, peaks: Tensor) -> Tensor:
    """Median ``0.5 log(box flux / peak)`` over the brightest ``peaks`` of background-free ``d``."""
    b, _, h, w = d.shape
    r = _PSF_BOX
    inner = torch.zeros_like(peaks)
    inner[..., r + 1:h - r - 1, r + 1:w - r - 1] = True
    top, idx = _brightest(d.reshape(b, -1), (peaks & inner).reshape(b, -1), _PSF_STARS)
    off = torch.arange(-r, r + 1, device=d.device)
    rows = (idx // w)[..., None, None] + off[:, None]
    cols = (idx % w)[..., None, None] + off[None, :]
    flat = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).reshape(b, -1)
    box = d.reshape(b, -1).gather(1, flat).reshape(b, -1, 2 * r + 1, 2 * r + 1)
    peak, flux = box[..., r, r], box.sum(dim=(-2, -1))
    ok = torch.isfinite(top) & (flux > peak)
    lw = 0.5 * torch.log(flux.clamp(min=1e-30) / peak.clamp(min=1e-30))
    return torch.where(ok, lw, torch.full_like(lw, float("nan"))).nanmedian(dim=1).values


def _robust_reference(values: Tensor, floor: float) -> tuple[float, float]:
    """Median of the finite ``values`` and a spread that defects do not widen: 1.4826 x the median
    deviation from the median of the lower and of the upper half, the smaller of the two (a defect
    moves a frame's stars one way, but which way depends on the defect), at least ``floor``;
    ``(NaN, floor)`` without finite values."""
    v = values[torch.isfinite(values)].double()
    if v.numel() == 0:
        return float("nan"), floor
    med = v.median()
    lower, upper = (med - v[v <= med]).median(), (v[v >= med] - med).median()
    return float(med), max(floor, float(MAD_TO_STD * torch.minimum(lower, upper)))


def _psf_z(stats: StarStats, ref: Tensor) -> Tensor:
    """How many of the night's sigmas a frame's stars are broader, or fewer, than the median (``(B,)``;
    the larger of the two, ignoring what is NaN, 0 if both are)."""
    zw = (stats.log_width.to(ref.dtype) - ref[0]) / ref[1]
    zn = (ref[2] - stats.log_count.to(ref.dtype)) / ref[3]
    z = torch.fmax(zw, zn)  # fmax ignores a NaN operand
    return z.nan_to_num(0.0)


# --------------------------------------------------------------------------------------------
# Classical baseline
# --------------------------------------------------------------------------------------------
def baseline_features(image: Tensor, mask: Optional[Tensor] = None, mesh: int = 64) -> Tensor:
    """Classical frame statistics ``(B, 3)``: background gradient, background spread, sharpness.

    From a mesh of ``mesh``-pixel medians: (0) the range of the mesh medians over the global noise,
    (1) their robust spread over the global noise, and (2) a sharpness proxy: the 99.9th percentile of
    the Laplacian over the noise, which drops for defocused frames. Used by the experiment as the
    baseline that the autoencoder must beat.
    """
    image = check_image(image, "image", channels=1)
    b = image.shape[0]
    x = image.nan_to_num(0.0)
    h, w = x.shape[-2:]
    hh, ww = (h // mesh) * mesh, (w // mesh) * mesh
    tiles = x[..., :hh, :ww].reshape(b, hh // mesh, mesh, ww // mesh, mesh).permute(0, 1, 3, 2, 4).reshape(b, -1, mesh * mesh)
    med = tiles.median(dim=-1).values
    d = (x[..., :, 1:] - x[..., :, :-1]).reshape(b, -1)[:, ::7]
    noise = mad_std(d, 1) / math.sqrt(2)
    grad = (med.amax(1) - med.amin(1)) / noise
    spread = mad_std(med, 1) / noise
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]).reshape(b, -1)[:, ::3]
    sharp = torch.quantile(lap.double(), 0.999, dim=1).to(x.dtype) / noise
    return torch.stack([grad, spread, sharp], dim=1)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
class QualityModule(_LightningModule):
    """Self-supervised training of a :class:`QualityAutoencoder` on normalised good frames.

    Batches are ``(B, 1, h, w)`` crops already normalised by :func:`normalize_frame` (as
    :class:`QualityDataModule` yields them). Loss: mean squared reconstruction error.
    """

    def __init__(self, width: int = 16, depth: int = 3, latent_channels: int = 8, lr: float = 2e-3,
                 weight_decay: float = 0.0, sky_range: float = 1.0):
        super().__init__()
        self.save_hyperparameters()
        self.model = QualityAutoencoder(2, width, depth, latent_channels, sky_range, len(CHANNELS))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch, stage: str) -> Tensor:
        x = batch["image"] if isinstance(batch, dict) else batch
        loss = F.mse_loss(self.model(x), x)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return opt


def _simulate_good_frame(shape, n_stars, seed: int, **sim_kwargs):
    """A simulated GWAC-like good frame with drawn star count (``n_stars``: int or ``(lo, hi)``),
    FWHM 2-3.5 px, sky 500-2000 ADU and a random gentle gradient."""
    from . import sim

    lo, hi = (int(n_stars), int(n_stars)) if isinstance(n_stars, (int, float)) else (int(n_stars[0]), int(n_stars[1]))
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand(5, generator=gen).tolist()
    return sim.simulate_frame(
        tuple(shape), n_stars=int(lo + u[0] * (hi - lo)), fwhm=2.0 + 1.5 * u[1], sky=500.0 + 1500.0 * u[2],
        sky_gradient=(0.2 * (u[3] - 0.5), 0.2 * (u[4] - 0.5)), seed=int(seed), **sim_kwargs,
    )


class _NormalisedCrops(torch.utils.data.Dataset):
    """Random crops of normalised good frames, from the simulator or from FITS files.

    The frames are normalised once (on first use) and kept in memory on the binned grid (a 4096^2
    frame binned by 4 takes 12 MB), then every epoch draws fresh random crops from them.
    """

    def __init__(self, source: str, paths: Sequence[str], frame_shape, crop: int, crops_per_frame: int,
                 n_frames: int, n_stars, bin_factor: int, seed: int, sim_kwargs: dict):
        self.source, self.paths = source, list(paths)
        self.frame_shape, self.crop, self.cpf = tuple(frame_shape), crop, crops_per_frame
        self.n_frames = len(self.paths) if source == "fits" else n_frames
        self.n_stars, self.bin_factor, self.seed = n_stars, bin_factor, seed
        self.sim_kwargs = sim_kwargs
        self._frames: Optional[list] = None

    def _frame(self, i: int) -> Tensor:
        if self.source == "fits":
            from .io import read_fits

            f = read_fits(self.paths[i])
            return normalize_frame(f.data, f.mask, self.bin_factor)[0]
        f = _simulate_good_frame(self.frame_shape, self.n_stars, self.seed + 7919 * i, **self.sim_kwargs)
        return normalize_frame(f.image, f.mask, self.bin_factor)[0]

    def frames(self) -> list:
        if self._frames is None:
            with torch.no_grad():
                self._frames = [self._frame(i) for i in range(self.n_frames)]
        return self._frames

    def __len__(self) -> int:
        return self.n_frames * self.cpf

    def __getitem__(self, index: int) -> dict:
        x = self.frames()[index // self.cpf]
        h, w = x.shape[-2:]
        c = min(self.crop, h, w)
        r = int(torch.randint(0, h - c + 1, (1,)))
        q = int(torch.randint(0, w - c + 1, (1,)))
        return {"image": x[:, r : r + c, q : q + c]}


class QualityDataModule(_LightningDataModule):
    """Streams normalised crops of good frames for :class:`QualityModule`.

    Args:
        source: ``"sim"`` (simulated GWAC-like good frames) or ``"fits"`` (``paths``: files, folders,
            globs or list files of good frames).
        frame_shape: simulated frame size ``(H, W)``.
        crop: crop side on the binned grid.
        crops_per_frame, n_frames, val_frames: how much data per epoch.
        n_stars: stars per simulated frame, an int or a ``(min, max)`` range.
    """

    def __init__(self, source: str = "sim", paths: Sequence[str] = (), frame_shape=(1024, 1024), crop: int = 64,
                 crops_per_frame: int = 16, n_frames: int = 64, val_frames: int = 4, n_stars=(600, 1800),
                 bin_factor: int = 4, batch_size: int = 16, num_workers: int = 0, seed: int = 0, **sim_kwargs):
        super().__init__()
        if source not in ("sim", "fits"):
            raise ValueError(f"source must be 'sim' or 'fits', got {source!r}")
        if source == "fits":
            from .data import resolve_inputs

            paths = [str(p) for p in resolve_inputs(paths)]
            if not paths:
                raise ValueError("QualityDataModule: source='fits' needs paths of good frames")
        n_stars = (int(n_stars), int(n_stars)) if isinstance(n_stars, (int, float)) else tuple(int(v) for v in n_stars)
        self.kw = dict(source=source, paths=list(paths), frame_shape=tuple(frame_shape), crop=crop,
                       crops_per_frame=crops_per_frame, n_stars=n_stars, bin_factor=bin_factor, sim_kwargs=dict(sim_kwargs))
        self.n_frames, self.val_frames, self.seed = n_frames, val_frames, seed
        self.batch_size, self.num_workers = batch_size, num_workers

        self._train: Optional[_NormalisedCrops] = None
        self._val: Optional[_NormalisedCrops] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self._train is None:
            self._train = _NormalisedCrops(n_frames=self.n_frames, seed=self.seed, **self.kw)
            self._val = _NormalisedCrops(n_frames=self.val_frames, seed=self.seed + 10_000_019, **self.kw)

    def train_dataloader(self):
        self.setup()
        return torch.utils.data.DataLoader(self._train, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self):
        self.setup()
        return torch.utils.data.DataLoader(self._val, batch_size=self.batch_size, num_workers=self.num_workers)


# --------------------------------------------------------------------------------------------
# Monitoring ("mode-val")
# --------------------------------------------------------------------------------------------
class MonitorReport(NamedTuple):
    """Outcome of :func:`monitor`: ``flagged_fraction`` of held-out good frames (or patches) flagged,
    and ``needs_retraining`` when it exceeds the tolerated fraction."""

    flagged_fraction: float
    needs_retraining: bool
    n_frames: int


def monitor(scorer: QualityScorer, good_frames, max_flagged: float = 0.05, level: str = "patch") -> MonitorReport:
    """Score held-out good frames; warn (log + ``warnings.warn``) when too many are flagged.

    ``level="patch"`` counts flagged patches, ``"frame"`` counts rejected frames. Returns a
    :class:`MonitorReport`; ``needs_retraining`` means the model no longer recognises good data
    (conditions drifted) and should be retrained with new good frames.
    """
    frames = [good_frames] if isinstance(good_frames, Tensor) else list(good_frames)
    flagged, total, n = 0.0, 0, 0
    with torch.no_grad():
        for f in frames:
            f = f if f.dim() == 4 else f.unsqueeze(0)
            r = scorer(f)
            n += f.shape[0]
            if level == "frame":
                flagged += float(r.rejected.sum())
                total += f.shape[0]
            else:
                flagged += float((r.patch_error > scorer.threshold).sum())
                total += r.patch_error.numel()
    frac = flagged / max(total, 1)
    needs = frac > max_flagged
    if needs:
        msg = (f"quality monitor: {frac:.1%} of held-out good {level}s flagged (> {max_flagged:.1%}); "
               "the quality model needs retraining on recent good frames")
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return MonitorReport(frac, needs, n)


class QualityMonitor(_Callback):
    """Lightning callback: every ``every_n_epochs`` validation epochs, run :func:`monitor` on
    ``good_frames`` with a scorer built from the module's current autoencoder, log
    ``monitor/flagged_fraction`` and keep the last :class:`MonitorReport` in ``self.report``."""

    def __init__(self, good_frames, threshold: Optional[float] = None, max_flagged: float = 0.05,
                 every_n_epochs: int = 1, **scorer_kwargs):
        super().__init__()
        self.good_frames = good_frames
        self.threshold, self.max_flagged, self.every = threshold, max_flagged, every_n_epochs
        self.scorer_kwargs = scorer_kwargs
        self.report: Optional[MonitorReport] = None

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch % self.every:
            return
        scorer = QualityScorer(pl_module.model, threshold=self.threshold, **self.scorer_kwargs)
        if self.threshold is None:
            scorer.calibrate(self.good_frames)
        self.report = monitor(scorer, self.good_frames, self.max_flagged)
        pl_module.log("monitor/flagged_fraction", self.report.flagged_fraction)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def train_from_config(cfg) -> dict:
    """``astroprep train-quality``: train, calibrate on fresh good frames, save a checkpoint."""
    import time

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.manual_seed(int(cfg.seed))
    module: QualityModule = instantiate(cfg.quality.module)
    datamodule = instantiate(cfg.quality.data)
    trainer = instantiate(cfg.trainer)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    t_train = time.perf_counter() - t0
    scorer = QualityScorer(module.model.eval(), **cfg.quality.scorer)
    shape = tuple(cfg.quality.calibration.frame_shape)
    n_stars = OmegaConf.to_object(cfg.quality.calibration.n_stars) if OmegaConf.is_config(cfg.quality.calibration.n_stars) \
        else cfg.quality.calibration.n_stars
    # Calibration frames: fresh good frames drawn like the training frames (seeds disjoint from them).
    with torch.no_grad():
        good = [_simulate_good_frame(shape, n_stars, 900_000 + i).image for i in range(int(cfg.quality.calibration.n_frames))]
    thr = scorer.calibrate(good, quantile=float(cfg.quality.calibration.quantile))
    out = Path(cfg.quality.output)
    scorer.save(out, trained_seconds=t_train)
    print(f"trained the quality autoencoder in {t_train:.0f} s; threshold {thr:.4g}; saved {out}")
    return {"checkpoint": str(out), "threshold": thr, "train_seconds": t_train}
