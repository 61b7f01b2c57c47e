"""Reference profiles of a model's output statistics and the drift alarms checked against them.

A :class:`MonitorProfile` holds, per statistic (entropy, max probability, top-2 margin, NLL),
the reference mean with its error clustered by request, the token standard deviation, and the
histogram on the statistic's fixed grid (:mod:`qmetrics.metrics.fixed_histogram`). A window of
traffic (:class:`WindowSummary`, from :class:`qmetrics.metrics.output_monitor.OutputMonitor`)
is checked against it with three tests per statistic, each an :class:`Alarm` when broken:

- ``mean_shift``: z = (μ_w − μ_r)/√(se_w² + se_r²), each se clustered by request:
  se² = C/(C − 1)·Σ_c (S_c − μ n_c)²/N² over the C requests (S_c the request's sum, n_c its
  tokens, N = Σ n_c). Alarm when |z| > ``z`` and |μ_w − μ_r| > ``min_shift``·sd_r (a shift
  too small to matter is not an alarm, however many tokens make it significant).
- ``paired_shift`` (instead of ``mean_shift`` when the window's requests are the profile's,
  matched by key: the same corpus): Δ = Σ n_c d_c / Σ n_c over the per-request differences of
  means d_c, se clustered over requests (:func:`paired_shifts`); alarm when |Δ/se| > ``z`` and
  |Δ| > ``min_paired_shift``·sd_r. The text's own variation cancels, so small model changes
  show.
- ``psi``: population stability index Σ_i (w_i − r_i)·ln(w_i/r_i) over the profile's bins
  (deciles of the reference, snapped to the grid; proportions floored at 1e-4). Alarm when
  PSI > ``psi`` (the usual reading: < 0.1 stable, 0.1–0.25 a moderate shift, > 0.25 a major
  one).
- ``ks``: two-sample Kolmogorov–Smirnov statistic D = max |F_w − F_r| over the grid's edges (a
  lower bound of D on the raw values, short of at most one grid bin's mass). Alarm when
  D > max(``ks``, c(α)·√((n + m)/(n·m))), c(α) = √(−ln(α/2)/2), with n, m the token counts
  divided by each side's design effect (the clustered over the iid variance of the mean), so
  correlated tokens do not count as independent evidence.

Non-finite tokens are never in any statistic; a window with any is an alarm of its own
(``nonfinite``). Everything here runs on the host, on numbers already read back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from qmetrics.metrics.fixed_histogram import Grid

#: The monitored statistics, in the order of the monitor's state.
STATISTICS = ("entropy", "max_prob", "margin", "nll")
#: The grid of each statistic: entropy in nats up to ln(450k), probabilities, NLL in nats.
GRIDS = {
    "entropy": Grid(0.0, 13.0, 1024),
    "max_prob": Grid(0.0, 1.0, 1024),
    "margin": Grid(0.0, 1.0, 1024),
    "nll": Grid(0.0, 32.0, 1024),
}
TESTS = ("mean_shift", "paired_shift", "psi", "ks", "nonfinite")
PROFILE_VERSION = 1
PSI_BINS = 10
_PSI_FLOOR = 1e-4


@dataclass(frozen=True)
class Thresholds:
    """When a test raises an alarm (module docstring): |z| > ``z`` and a shift above
    ``min_shift`` reference sds (``min_paired_shift`` for the paired test); PSI > ``psi``; KS
    D > max(``ks``, critical value at ``ks_alpha``); non-finite tokens > ``nonfinite`` (a
    fraction of the window)."""

    z: float = 4.0
    min_shift: float = 0.1
    psi: float = 0.1
    ks: float = 0.05
    ks_alpha: float = 1e-3
    nonfinite: float = 0.0
    min_paired_shift: float = 0.01

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Thresholds:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown thresholds {sorted(unknown)}")
        return cls(**{k: float(v) for k, v in d.items()})


@dataclass
class StatSummary:
    """One statistic over a set of tokens: ``count`` tokens (finite, and labelled for the NLL),
    ``mean``, ``se`` (clustered by request), ``sd`` (per token), ``clusters`` (requests),
    ``design_effect`` (se² over the iid sd²/count, ≥ 1) and ``hist`` (counts on the grid)."""

    count: int
    mean: float
    se: float
    sd: float
    clusters: int
    design_effect: float
    hist: list[int]

    @property
    def effective_count(self) -> float:
        return self.count / max(self.design_effect, 1.0)


@dataclass
class WindowSummary:
    """A window of observed tokens: ``first_token`` ≤ index < ``first_token + tokens`` in the
    monitor's stream, ``nonfinite`` of them non-finite, ``vocab_size`` of their logits, and the
    :class:`StatSummary` of each statistic that has values."""

    first_token: int
    tokens: int
    nonfinite: int
    vocab_size: int | None
    stats: dict[str, StatSummary]
    requests: dict[str, list[list[float]]] | None = None  # key → per statistic [sum, count]

    @property
    def nonfinite_fraction(self) -> float:
        """Non-finite tokens over the tokens scored: the non-finite ones and the finite ones
        counted in ``max_prob`` (tokens given with ``mask`` False are in neither)."""
        finite = self.stats["max_prob"].count if "max_prob" in self.stats else 0
        scored = self.nonfinite + finite
        return self.nonfinite / scored if scored else 0.0

    def window(self) -> dict[str, int]:
        """How an alarm names the window."""
        return {
            "first_token": self.first_token,
            "last_token": self.first_token + self.tokens - 1,
            "tokens": self.tokens,
        }


@dataclass(frozen=True)
class Alarm:
    """A broken test: ``statistic`` (or ``tokens`` for ``nonfinite``), ``test``, the ``value``
    measured, the ``threshold`` it passed, the ``window`` it was measured on, and ``detail``."""

    statistic: str
    test: str
    value: float
    threshold: float
    window: dict[str, int]
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``TEST_STATISTIC``, e.g. ``psi_entropy`` (``nonfinite_frac`` for non-finite tokens)."""
        return "nonfinite_frac" if self.test == "nonfinite" else f"{self.test}_{self.statistic}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Alarm:
        return cls(
            d["statistic"],
            d["test"],
            float(d["value"]),
            float(d["threshold"]),
            dict(d["window"]),
            dict(d.get("detail", {})),
        )

    def __str__(self) -> str:
        w = self.window
        return (
            f"{self.name} = {self.value:.4g} (threshold {self.threshold:.4g}) on tokens "
            f"{w['first_token']}–{w['last_token']}"
        )


def psi_bins(hist: np.ndarray, parts: int = PSI_BINS) -> list[int]:
    """Grid-bin boundaries [0, b_1, …, bins] of ≤ ``parts`` groups of about equal reference
    mass (quantiles of ``hist`` snapped to the grid; repeated cuts merged, and a last group
    without reference mass — the bins above the reference's highest — merged into the one
    before it: every group holds reference mass)."""
    cum = np.cumsum(hist)
    total = cum[-1]
    cuts = {0, len(hist)}
    for k in range(1, parts):
        cuts.add(int(np.searchsorted(cum, total * k / parts, side="left")) + 1)
    bounds = sorted(c for c in cuts if 0 <= c <= len(hist))
    if len(bounds) > 2 and cum[-1] == cum[bounds[-2] - 1]:
        del bounds[-2]
    return bounds


def population_stability(ref_hist: np.ndarray, win_hist: np.ndarray, bounds: list[int]) -> float:
    """PSI = Σ (w − r) ln(w/r) over the groups of grid bins ``bounds`` (proportions floored)."""
    r = np.add.reduceat(ref_hist.astype(np.float64), bounds[:-1])
    w = np.add.reduceat(win_hist.astype(np.float64), bounds[:-1])
    r = np.maximum(r / max(r.sum(), 1.0), _PSI_FLOOR)
    w = np.maximum(w / max(w.sum(), 1.0), _PSI_FLOOR)
    return float(np.sum((w - r) * np.log(w / r)))


def ks_statistic(ref_hist: np.ndarray, win_hist: np.ndarray) -> float:
    """max |F_w − F_r| over the grid's edges."""
    fr = np.cumsum(ref_hist) / max(ref_hist.sum(), 1)
    fw = np.cumsum(win_hist) / max(win_hist.sum(), 1)
    return float(np.max(np.abs(fw - fr)))


def ks_critical(n: float, m: float, alpha: float) -> float:
    """c(α)·√((n + m)/(n·m)), the asymptotic two-sample KS critical value."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / max(n * m, 1e-300))


@dataclass
class MonitorProfile:
    """The reference: per statistic a :class:`StatSummary` and its PSI groups, the thresholds,
    the vocabulary size and tokenizer fingerprint the profile belongs to, and free-form ``meta``
    (model, dataset, tokens, ...). JSON via :meth:`to_dict` / :meth:`from_dict`."""

    vocab_size: int
    stats: dict[str, StatSummary]
    psi_bounds: dict[str, list[int]]
    thresholds: Thresholds = field(default_factory=Thresholds)
    tokenizer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    requests: dict[str, list[list[float]]] | None = None

    @classmethod
    def from_window(
        cls,
        summary: WindowSummary,
        *,
        thresholds: Thresholds | None = None,
        tokenizer: str | None = None,
        **meta: Any,
    ) -> MonitorProfile:
        """The profile of a monitor's window (a live window, or a calibration run)."""
        if summary.vocab_size is None or not summary.stats:
            raise ValueError("empty window: no finite tokens to fit a profile from")
        stats = {k: s for k, s in summary.stats.items() if s.count >= 2}
        if not stats:
            raise ValueError(f"empty window: {summary.tokens} tokens, too few finite ones")
        bounds = {k: psi_bins(np.asarray(s.hist)) for k, s in stats.items()}
        meta = {"tokens": summary.tokens, "nonfinite": summary.nonfinite, **meta}
        return cls(
            summary.vocab_size,
            stats,
            bounds,
            thresholds or Thresholds(),
            tokenizer,
            meta,
            summary.requests,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION,
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer,
            "grids": {k: GRIDS[k].to_list() for k in self.stats},
            "thresholds": asdict(self.thresholds),
            "stats": {
                k: asdict(s) | {"psi_bounds": self.psi_bounds[k]} for k, s in self.stats.items()
            },
            "meta": self.meta,
            "requests": self.requests,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MonitorProfile:
        """The profile saved by :meth:`to_dict`; ``ValueError`` naming what does not fit."""
        if not isinstance(d, Mapping) or d.get("version") != PROFILE_VERSION:
            got = d.get("version") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(
                f"not a qmetrics monitor profile (version {got!r}, expected {PROFILE_VERSION})"
            )
        try:
            stats, bounds = {}, {}
            for name, s in d["stats"].items():
                if name not in GRIDS:
                    raise ValueError(f"unknown statistic {name!r}")
                if Grid.from_list(d["grids"][name]) != GRIDS[name]:
                    raise ValueError(
                        f"{name} grid {d['grids'][name]} differs from this "
                        f"version's {GRIDS[name].to_list()}"
                    )
                s = dict(s)
                bounds[name] = [int(b) for b in s.pop("psi_bounds")]
                stats[name] = StatSummary(**s)
                if len(stats[name].hist) != GRIDS[name].bins:
                    raise ValueError(f"{name} histogram has {len(stats[name].hist)} bins")
            return cls(
                int(d["vocab_size"]),
                stats,
                bounds,
                Thresholds.from_dict(d.get("thresholds", {})),
                d.get("tokenizer"),
                dict(d.get("meta", {})),
                d.get("requests"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed monitor profile: {type(exc).__name__}: {exc}") from exc


def check_window(
    profile: MonitorProfile, summary: WindowSummary, thresholds: Thresholds | None = None
) -> list[Alarm]:
    """The alarms of ``summary`` against ``profile`` (module docstring), in the order
    non-finite, then per statistic mean shift, PSI, KS. ``thresholds`` overrides the
    profile's. Raises ``ValueError`` for a window of another vocabulary or without finite
    tokens."""
    th = thresholds or profile.thresholds
    if summary.vocab_size is not None and summary.vocab_size != profile.vocab_size:
        raise ValueError(
            f"vocab mismatch: the profile is for V={profile.vocab_size}, the "
            f"monitored logits have V={summary.vocab_size}"
        )
    if summary.tokens == 0 or not any(s.count for s in summary.stats.values()):
        raise ValueError(
            f"empty window: {summary.tokens} tokens observed, "
            f"{summary.nonfinite} of them non-finite, none to check"
        )
    window = summary.window()
    alarms = []
    frac = summary.nonfinite_fraction
    if summary.nonfinite and frac > th.nonfinite:
        alarms.append(
            Alarm(
                "tokens", "nonfinite", frac, th.nonfinite, window, {"nonfinite": summary.nonfinite}
            )
        )
    paired = paired_shifts(profile, summary)
    for name, ref in profile.stats.items():
        win = summary.stats.get(name)
        if win is None or win.count < 2:
            continue
        alarms.extend(
            _stat_alarms(name, ref, win, profile.psi_bounds[name], th, window, paired.get(name))
        )
    return alarms


def paired_shifts(profile: MonitorProfile, summary: WindowSummary) -> dict[str, tuple[float, ...]]:
    """Per statistic (z, Δ, se, requests) of the paired mean shift when the window's requests
    are the profile's (the same corpus: at least 90 % of the window's request keys, and ≥ 2,
    are in the profile); ``{}`` otherwise. With d_c the difference of request c's means and
    n_c its tokens: Δ = Σ n_c d_c / Σ n_c, se² = C/(C − 1)·Σ n_c² (d_c − Δ)² / (Σ n_c)²."""
    if not profile.requests or not summary.requests:
        return {}
    common = [k for k in summary.requests if k in profile.requests]
    if len(common) < 2 or len(common) < 0.9 * len(summary.requests):
        return {}
    win = np.asarray([summary.requests[k] for k in common], dtype=np.float64)  # [C, S, 2]
    ref = np.asarray([profile.requests[k] for k in common], dtype=np.float64)
    out = {}
    for k, name in enumerate(STATISTICS):
        if name not in profile.stats:
            continue
        n_w, n_r = win[:, k, 1], ref[:, k, 1]
        use = (n_w > 0) & (n_r > 0)
        c = int(use.sum())
        if c < 2:
            continue
        d = win[use, k, 0] / n_w[use] - ref[use, k, 0] / n_r[use]
        n = n_r[use]
        delta = float(np.sum(n * d) / np.sum(n))
        se = math.sqrt(c / (c - 1) * np.sum((n * (d - delta)) ** 2)) / float(np.sum(n))
        z = _scaled(delta, se)
        out[name] = (z, delta, se, c)
    return out


def drift_values(profile: MonitorProfile, summary: WindowSummary) -> dict[str, float]:
    """Every test's value by alarm name (``z_entropy`` for the mean shift's z, ``psi_*``,
    ``ks_*``, ``nonfinite_frac``): what a gate or a dashboard reads."""
    out = {"nonfinite_frac": summary.nonfinite_fraction}
    for name, ref in profile.stats.items():
        win = summary.stats.get(name)
        if win is None or win.count < 2:
            continue
        z, shift = _mean_shift(ref, win)
        out[f"z_{name}"] = z
        out[f"shift_{name}"] = shift
        out[f"psi_{name}"] = population_stability(
            np.asarray(ref.hist), np.asarray(win.hist), profile.psi_bounds[name]
        )
        out[f"ks_{name}"] = ks_statistic(np.asarray(ref.hist), np.asarray(win.hist))
    for name, (z, delta, _se, _c) in paired_shifts(profile, summary).items():
        out[f"paired_z_{name}"] = z
        out[f"paired_shift_{name}"] = _scaled(delta, profile.stats[name].sd)
    return out


def _mean_shift(ref: StatSummary, win: StatSummary) -> tuple[float, float]:
    """(z, shift in reference sds) of the window's mean against the reference's."""
    delta = win.mean - ref.mean
    se = math.sqrt(ref.se**2 + win.se**2)
    z = _scaled(delta, se)
    return z, _scaled(delta, ref.sd)


def _scaled(delta: float, scale: float) -> float:
    """``delta / scale`` (a z from an se, a shift in sds), where a scale of 0 makes any nonzero
    ``delta`` infinite (a reference without spread: every change is beyond it)."""
    if scale > 0:
        return delta / scale
    return 0.0 if delta == 0 else math.copysign(math.inf, delta)


def _stat_alarms(
    name: str,
    ref: StatSummary,
    win: StatSummary,
    bounds: list[int],
    th: Thresholds,
    window: dict[str, int],
    paired: tuple[float, ...] | None,
) -> list[Alarm]:
    out = []
    means = {
        "reference_mean": ref.mean,
        "window_mean": win.mean,
        "window_se": win.se,
        "reference_se": ref.se,
    }
    if paired is not None:  # the same requests: the paired test replaces the unpaired one
        z, delta, se, c = paired
        shift = _scaled(delta, ref.sd)
        if abs(z) > th.z and abs(shift) > th.min_paired_shift:
            out.append(
                Alarm(
                    name,
                    "paired_shift",
                    z,
                    th.z,
                    window,
                    means | {"delta": delta, "delta_se": se, "shift_sd": shift, "requests": c},
                )
            )
    else:
        z, shift = _mean_shift(ref, win)
        if abs(z) > th.z and abs(shift) > th.min_shift:
            out.append(Alarm(name, "mean_shift", z, th.z, window, means | {"shift_sd": shift}))
    ref_hist, win_hist = np.asarray(ref.hist), np.asarray(win.hist)
    psi = population_stability(ref_hist, win_hist, bounds)
    if psi > th.psi:
        out.append(Alarm(name, "psi", psi, th.psi, window, {"bins": len(bounds) - 1}))
    d = ks_statistic(ref_hist, win_hist)
    crit = ks_critical(ref.effective_count, win.effective_count, th.ks_alpha)
    if d > max(th.ks, crit):
        out.append(
            Alarm(
                name,
                "ks",
                d,
                max(th.ks, crit),
                window,
                {
                    "critical": crit,
                    "n_eff_reference": ref.effective_count,
                    "n_eff_window": win.effective_count,
                },
            )
        )
    return out
