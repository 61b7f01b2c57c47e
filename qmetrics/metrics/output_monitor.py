"""``OutputMonitor``: per-request output statistics of a model in production, in rolling
windows of bounded memory, checked against a reference profile.

``observe(logits, labels)`` runs :func:`qmetrics.metrics.output_stats.output_stats_rows` (one
pass over V) and adds, per statistic of :data:`qmetrics.metrics.drift.STATISTICS`, token sums,
per-request sums (for the error clustered by request) and a fixed-bin histogram into the
current bucket, all on the logits' device: no host synchronisation, a few dozen small ops.

Requests: the rows of [B, T, V] logits (all leading dims but the last: [T, V] is one request).
With ``continues=True`` the rows' sums stay open across calls (a request seen chunk by chunk,
or token by token during generation) until :meth:`OutputMonitor.end_requests`.

Rolling window by token count: ``window_tokens`` tokens are kept as ``buckets`` buckets of
⌈window_tokens/buckets⌉ tokens; when the current bucket is full the oldest is cleared and
reused, so the window spans the last (buckets − 1)·size to buckets·size tokens. A request's
cluster sums go to the bucket current when it ends. ``window_tokens=None``: one window of
everything observed. Only :meth:`snapshot`, :meth:`summary` and :meth:`check` read the device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from qmetrics.metrics.drift import (
    GRIDS,
    STATISTICS,
    Alarm,
    MonitorProfile,
    StatSummary,
    Thresholds,
    WindowSummary,
    check_window,
)
from qmetrics.metrics.fixed_histogram import FixedHistogram
from qmetrics.metrics.functional import Backend, check_backend
from qmetrics.metrics.output_stats import output_stats_rows

# rows of output_stats_rows holding the monitored statistics (entropy, max_prob, margin, nll)
_STAT_ROWS = (0, 1, 2, 4)
# columns of a bucket's per-statistic moments (float64)
_MOMENTS = ("n", "sum", "sum_sq", "cl_n", "cl_sum", "clusters", "cl_sum_sq", "cl_sum_n", "cl_n_sq")
_M = {name: k for k, name in enumerate(_MOMENTS)}
QUANTILES = (0.05, 0.5, 0.95)


class _Bucket:
    """One bucket of the rolling window: moments [S, 9], histogram, non-finite count (device),
    token count and first token index (host)."""

    def __init__(self, device: torch.device):
        self.moments = torch.zeros(
            len(STATISTICS), len(_MOMENTS), dtype=torch.float64, device=device
        )
        self.hist = FixedHistogram([GRIDS[s] for s in STATISTICS], device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.tokens = 0
        self.first_token = 0

    def reset(self, first_token: int) -> None:
        self.moments.zero_()
        self.hist.reset()
        self.nonfinite.zero_()
        self.tokens, self.first_token = 0, first_token


class OutputMonitor:
    """Rolling per-request output statistics (module docstring).

    ``window_tokens``: tokens per window (None: everything); ``buckets``: its granularity;
    ``backend``: of :func:`qmetrics.metrics.output_stats.output_stats`; ``ignore_index``: the
    label value that is not scored.
    """

    def __init__(
        self,
        window_tokens: int | None = None,
        *,
        buckets: int = 8,
        backend: Backend = "auto",
        ignore_index: int = -100,
        keep_requests: int = 0,
    ):
        check_backend(backend)
        if window_tokens is not None and (isinstance(window_tokens, bool) or window_tokens < 1):
            raise ValueError(f"window_tokens must be a positive int or None, got {window_tokens!r}")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
            raise ValueError(f"buckets must be a positive int, got {buckets!r}")
        self.window_tokens = window_tokens
        self.n_buckets = 1 if window_tokens is None else buckets
        self.bucket_tokens = None if window_tokens is None else math.ceil(window_tokens / buckets)
        self.backend = backend
        self.ignore_index = ignore_index
        self.vocab_size: int | None = None
        self.tokens_total = 0
        self._device: torch.device | None = None
        self._buckets: list[_Bucket] = []
        self._current = 0
        self._open: torch.Tensor | None = None  # [S, R, 2]: open requests' (sum, count)
        self._nonfinite_total: torch.Tensor | None = None
        self._generating = False
        self.keep_requests = keep_requests
        self._request_log: list[torch.Tensor] = []  # closed requests' [S, R, 2] sums, in order
        self._logged = 0

    # --- accumulation (no host synchronisation) --------------------------------------------------

    def _setup(self, device: torch.device, vocab: int) -> None:
        if self._device is None:
            self._device = device
            self._buckets = [_Bucket(device) for _ in range(self.n_buckets)]
            self._nonfinite_total = torch.zeros((), dtype=torch.int64, device=device)
        elif device != self._device:
            raise ValueError(
                f"device mismatch: the monitor is on {self._device}, logits on {device}"
            )
        if self.vocab_size is None:
            self.vocab_size = vocab
        elif vocab != self.vocab_size:
            raise ValueError(
                f"vocab mismatch: the monitor has seen V={self.vocab_size}, these "
                f"logits have V={vocab}"
            )

    @torch.no_grad()
    def observe(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        continues: bool = False,
    ) -> None:
        """Add the tokens of ``logits`` [..., V] (``labels`` shaped like the leading dims for
        the NLL; ``mask``: bool, False for tokens to skip, e.g. padding). ``continues``: the
        requests (rows) stay open across calls until :meth:`end_requests`. Sync-free."""
        raw = output_stats_rows(
            logits, labels, ignore_index=self.ignore_index, backend=self.backend
        )
        self._setup(raw.device, logits.shape[-1])
        lead = logits.shape[:-1]
        n_tok = lead.numel()
        per_request = lead[-1] if len(lead) >= 2 else n_tok
        values = raw[list(_STAT_ROWS)]  # [S, N]
        valid = torch.isfinite(values)
        bad = raw[5] == 0
        if mask is not None:
            if mask.shape != lead:
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} does not match the logits' "
                    f"leading shape {tuple(lead)}"
                )
            keep = mask.to(device=values.device, dtype=torch.bool).reshape(-1)
            valid &= keep
            bad &= keep
        nonfinite = bad.sum()
        bucket = self._buckets[self._current]
        bucket.nonfinite += nonfinite
        self._nonfinite_total += nonfinite
        bucket.hist.update(values, valid)
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        kept = torch.where(valid, values, zero).double()
        counts = valid.double()
        m = bucket.moments
        m[:, _M["n"]] += counts.sum(1)
        m[:, _M["sum"]] += kept.sum(1)
        m[:, _M["sum_sq"]] += (kept * kept).sum(1)
        sums = torch.stack(
            [
                kept.view(len(STATISTICS), -1, per_request).sum(-1),
                counts.view(len(STATISTICS), -1, per_request).sum(-1),
            ],
            dim=-1,
        )
        if continues:
            if self._open is not None and self._open.shape != sums.shape:
                raise ValueError(
                    f"{sums.shape[1]} continuing requests, but "
                    f"{self._open.shape[1]} are open: call end_requests() first"
                )
            self._open = sums if self._open is None else self._open + sums
        else:
            self._fold(sums)
        bucket.tokens += n_tok
        self.tokens_total += n_tok
        if self.bucket_tokens is not None and bucket.tokens >= self.bucket_tokens:
            self._current = (self._current + 1) % self.n_buckets
            self._buckets[self._current].reset(self.tokens_total)

    def _fold(self, sums: torch.Tensor) -> None:
        """Add finished requests' (sum, count) [S, R, 2] to the current bucket's cluster sums."""
        if self._logged < self.keep_requests:
            self._request_log.append(sums)
            self._logged += sums.shape[1]
        s, n = sums[..., 0], sums[..., 1]
        m = self._buckets[self._current].moments
        m[:, _M["cl_n"]] += n.sum(1)
        m[:, _M["cl_sum"]] += s.sum(1)
        m[:, _M["clusters"]] += (n > 0).double().sum(1)
        m[:, _M["cl_sum_sq"]] += (s * s).sum(1)
        m[:, _M["cl_sum_n"]] += (s * n).sum(1)
        m[:, _M["cl_n_sq"]] += (n * n).sum(1)

    def end_requests(self) -> None:
        """Close the requests opened by ``observe(..., continues=True)``."""
        if self._open is not None:
            self._fold(self._open)
            self._open = None

    def reset(self) -> None:
        """Forget everything observed (the vocabulary size too)."""
        self.__init__(
            self.window_tokens,
            buckets=self.n_buckets,
            backend=self.backend,
            ignore_index=self.ignore_index,
            keep_requests=self.keep_requests,
        )

    def request_sums(self) -> np.ndarray:
        """[C, S, 2] float64: (sum, count) of each statistic for the first ``keep_requests``
        closed requests, in the order they closed (for paired checks on a known corpus)."""
        if not self._request_log:
            return np.zeros((0, len(STATISTICS), 2))
        sums = torch.cat(self._request_log, dim=1).transpose(0, 1)
        return sums[: self.keep_requests].cpu().numpy()

    # --- reading (host synchronisation) --------------------------------------------------------

    def summary(self) -> WindowSummary:
        """The current window, read back: :class:`qmetrics.metrics.drift.WindowSummary`."""
        if not self._buckets:
            return WindowSummary(0, 0, 0, self.vocab_size, {})
        live = [b for b in self._buckets if b.tokens > 0] or self._buckets[:1]
        moments = torch.stack([b.moments for b in live]).sum(0).cpu().numpy()
        hist = torch.stack([b.hist.counts for b in live]).sum(0).cpu().numpy()
        nonfinite = int(torch.stack([b.nonfinite for b in live]).sum())
        first = min(b.first_token for b in live)
        tokens = sum(b.tokens for b in live)
        stats = {}
        for k, name in enumerate(STATISTICS):
            summary = _stat_summary(moments[k], hist[k])
            if summary is not None:
                stats[name] = summary
        return WindowSummary(first, tokens, nonfinite, self.vocab_size, stats)

    def snapshot(self) -> dict[str, Any]:
        """The monitor's state as a JSON-ready dict: totals, the window, and per statistic
        count, mean ± clustered se, sd, requests and the 5/50/95th percentiles (from the
        histogram: exact to one grid bin)."""
        s = self.summary()
        stats = {}
        for name, st in s.stats.items():
            edges = GRIDS[name].edges()
            cdf = np.cumsum(st.hist) / max(st.count, 1)
            pct = {
                f"p{round(q * 100):02d}": float(edges[int(np.searchsorted(cdf, q)) + 1])
                for q in QUANTILES
            }
            stats[name] = {
                "count": st.count,
                "mean": st.mean,
                "se": st.se,
                "sd": st.sd,
                "requests": st.clusters,
                **pct,
            }
        nonfinite_total = int(self._nonfinite_total) if self._nonfinite_total is not None else 0
        return {
            "tokens_total": self.tokens_total,
            "nonfinite_total": nonfinite_total,
            "vocab_size": self.vocab_size,
            "window": {**s.window(), "nonfinite": s.nonfinite},
            "stats": stats,
        }

    def check(self, profile: MonitorProfile, thresholds: Thresholds | None = None) -> list[Alarm]:
        """The alarms of the current window against ``profile``
        (:func:`qmetrics.metrics.drift.check_window`); ``[]`` when nothing drifted."""
        return check_window(profile, self.summary(), thresholds)

    def fit_profile(
        self, *, thresholds: Thresholds | None = None, tokenizer: str | None = None, **meta: Any
    ) -> MonitorProfile:
        """A reference profile from the current window (e.g. a day of approved traffic)."""
        return MonitorProfile.from_window(
            self.summary(), thresholds=thresholds, tokenizer=tokenizer, **meta
        )

    # --- Hugging Face hook ----------------------------------------------------------------------

    def attach(self, model: torch.nn.Module, *, score_labels: bool = True) -> MonitorHandle:
        """Observe every forward of a Hugging Face causal LM ``model``: during ``generate()``
        the last position's logits (one request per batch row, closed when ``generate``
        returns); in any other call (scoring) all positions, each row a request, with the next
        input token as label (``score_labels``) and padding (``attention_mask`` 0) skipped.
        Returns a handle whose ``remove()`` detaches it."""
        return MonitorHandle(self, model, score_labels)


class MonitorHandle:
    """The forward hook (and ``generate`` wrapper) of :meth:`OutputMonitor.attach`."""

    def __init__(self, monitor: OutputMonitor, model: torch.nn.Module, score_labels: bool):
        self.monitor, self.model, self.score_labels = monitor, model, score_labels
        self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._generate = model.__dict__.get("generate")
        original = model.generate if hasattr(model, "generate") else None
        if original is not None:

            def generate(*args: Any, **kwargs: Any) -> Any:
                monitor._generating = True
                try:
                    return original(*args, **kwargs)
                finally:
                    monitor._generating = False
                    monitor.end_requests()

            model.generate = generate

    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, tuple | list):
            logits = output[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            return
        mon = self.monitor
        if mon._generating:
            mon.observe(logits[:, -1:], continues=True)
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention = kwargs.get("attention_mask")
        if logits.shape[1] < 2 or not isinstance(input_ids, torch.Tensor):
            mon.observe(logits)
            return
        mask = None
        if isinstance(attention, torch.Tensor) and attention.shape == input_ids.shape:
            mask = attention[:, :-1].to(torch.bool) & attention[:, 1:].to(torch.bool)
        labels = input_ids[:, 1:] if self.score_labels else None
        mon.observe(logits[:, :-1], labels, mask=mask)

    def remove(self) -> None:
        """Detach: remove the hook and restore ``generate``."""
        self._hook.remove()
        if "generate" in self.model.__dict__:
            del self.model.generate
        if self._generate is not None:
            self.model.generate = self._generate


def _stat_summary(m: np.ndarray, hist: np.ndarray) -> StatSummary | None:
    """A statistic's :class:`StatSummary` from its moments (``_MOMENTS``) and histogram; None
    without values. The clustered se falls back to the iid one with fewer than 2 requests."""
    n = m[_M["n"]]
    if n < 1:
        return None
    mean = m[_M["sum"]] / n
    var = max(m[_M["sum_sq"]] / n - mean * mean, 0.0) * n / max(n - 1, 1)
    iid = var / n
    clusters, cl_n = m[_M["clusters"]], m[_M["cl_n"]]
    if clusters >= 2 and cl_n > 0:
        mu = m[_M["cl_sum"]] / cl_n
        ss = m[_M["cl_sum_sq"]] - 2 * mu * m[_M["cl_sum_n"]] + mu * mu * m[_M["cl_n_sq"]]
        se2 = clusters / (clusters - 1) * max(ss, 0.0) / (cl_n * cl_n)
    else:
        se2 = iid
    deff = se2 / iid if iid > 0 else 1.0
    return StatSummary(
        int(n),
        float(mean),
        math.sqrt(se2),
        math.sqrt(var),
        int(clusters),
        float(max(deff, 1.0)),
        [int(c) for c in hist],
    )
