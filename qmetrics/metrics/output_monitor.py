"""``OutputMonitor``: per-request output statistics of a model in production, in rolling
windows of bounded memory, checked against a reference profile.

``observe(logits, labels)`` runs :func:`qmetrics.metrics.output_stats.output_stats_rows` (one
pass over V) and adds, per statistic of :data:`qmetrics.metrics.drift.STATISTICS`, token sums,
per-request sums (for the error clustered by request) and a fixed-bin histogram into the
current bucket, all on the logits' device, with no host synchronisation
(:func:`token_moments`). Eagerly that is the op plus a few dozen small ops; on the CPU with
``compile`` the whole step is one ``torch.compile``d function (:func:`_observe_plain`:
inductor's fused loops over the logits, ~1 ns per logit on one core, and one small fused
epilogue) followed by four in-place adds.

Requests: the rows of [B, T, V] logits (all leading dims but the last: [T, V] is one request).
With ``continues=True`` the rows' sums stay open across calls (a request seen chunk by chunk,
or token by token during generation) until :meth:`OutputMonitor.end_requests`.

Decode steps (``continues=True``, one position per request, no labels; with or without a
mask: what :meth:`OutputMonitor.attach` sees during ``generate()``) are gathered, up to
``decode_batch`` steps and :data:`DECODE_BUFFER_BYTES`, in one buffer and observed in one
pass when it is full, when its steps fill the current window bucket, before any other call, at
:meth:`OutputMonitor.end_requests` and before any read: a copy per step instead of a pass and
its per-call overhead (dispatch, the compiled function's guards, a few dozen small ops), with
the same sums, counts, histograms and window buckets as observing each step.

Rolling window by token count: ``window_tokens`` tokens are kept as ``buckets`` buckets of
⌈window_tokens/buckets⌉ tokens. A call's tokens go to the current bucket; once it is full,
the next call first clears the oldest bucket and makes it current, so the window spans the
last (buckets − 1)·size to buckets·size tokens (a call larger than a bucket overfills its
bucket: calls are never split). A request's cluster sums go to the bucket current when it
ends, the one holding its last tokens; a read (:meth:`OutputMonitor.summary`) counts requests
still open as clusters of their tokens so far, so every token of the window is in some
request's sums. Tokens given with ``mask`` False count in the window
but in no statistic. ``window_tokens=None``: one window of everything observed. Gathered
decode steps enter the window (and ``tokens_total``) when their batch is observed. Only
:meth:`snapshot`, :meth:`summary` and :meth:`check` read the device.

Threads: observing, closing requests and reads take one lock (a scrape from a Prometheus
server's thread while the serving thread observes); a read takes the window's tensors under
it and waits for the device outside it.
"""

from __future__ import annotations

import math
import threading
from typing import Any, NamedTuple

import numpy as np
import torch

from qmetrics.kernels.output_stats_torch import compile_signature, plain_output_stats
from qmetrics.kernels.torch_compile import CompiledCPU, compiled_view, want_compile
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
from qmetrics.metrics.fixed_histogram import FixedHistogram, bin_counts
from qmetrics.metrics.functional import Backend, check_backend, resolve_backend
from qmetrics.metrics.inference_mode import outside_inference_mode
from qmetrics.metrics.output_stats import check_logits, checked_labels, output_stats_rows
from qmetrics.metrics.validation import check_labels

# rows of output_stats_rows holding the monitored statistics (entropy, max_prob, margin, nll)
_STAT_ROWS = (0, 1, 2, 4)
# columns of a bucket's per-statistic moments (float64)
_MOMENTS = ("n", "sum", "sum_sq", "cl_n", "cl_sum", "clusters", "cl_sum_sq", "cl_sum_n", "cl_n_sq")
_M = {name: k for k, name in enumerate(_MOMENTS)}
_CLUSTER = slice(_M["cl_n"], len(_MOMENTS))  # the per-request columns, last in _MOMENTS
QUANTILES = (0.05, 0.5, 0.95)
#: The most memory (bytes, on the logits' device) the gathered decode steps of one monitor hold.
DECODE_BUFFER_BYTES = 16 << 20
#: The most storage (bytes) of ``generate()``'s ``input_ids`` tensors that gathered decode steps
#: keep referenced for their deferred finished-rows masks before evaluating them.
DEFERRED_IDS_BYTES = 16 << 20


def cluster_moments(sums: torch.Tensor) -> torch.Tensor:
    """[S, 6] float64 (``cl_n, cl_sum, clusters, cl_sum_sq, cl_sum_n, cl_n_sq``) of finished
    requests' (sum, count) ``sums`` [S, R, 2]: Σn, Σs, #{n > 0}, Σs², Σs·n, Σn²."""
    s, n = sums[..., 0], sums[..., 1]
    parts = [n, s, (n > 0).double(), s * s, s * n, n * n]
    return torch.stack([p.sum(1) for p in parts], dim=1)


def token_moments(
    raw: torch.Tensor,
    keep: torch.Tensor | None,
    per_request: int,
    lo: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bins: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one call adds to a bucket, from :func:`output_stats_rows`'s ``raw`` [6, N]:
    ``delta`` [S, 9] float64 (``_MOMENTS``; its per-request columns count each run of
    ``per_request`` tokens as a finished request), the histogram counts [S, bins], the number
    of non-finite tokens and the per-request (sum, count) [S, R, 2]. ``keep``: N bools
    (False: not counted) or None. A token is non-finite when its logits are (NaN/+inf, or no
    finite entry) or its label has probability 0 (NLL +inf): counted, in no statistic.
    Plain tensor ops: run eagerly, or compiled with :func:`plain_output_stats` on the CPU
    (:func:`_observe_plain`)."""
    values = torch.stack([raw[k] for k in _STAT_ROWS])  # [S, N]
    bad = (raw[5] == 0) | (raw[4] == torch.inf)
    valid = torch.isfinite(values) & ~bad
    if keep is not None:
        valid, bad = valid & keep, bad & keep
    hist = bin_counts(values, valid, lo, scale, offset, bins)
    kept = torch.where(valid, values, 0.0).double()
    counts = valid.double()
    stats = len(STATISTICS)
    sums = torch.stack(
        [
            kept.view(stats, -1, per_request).sum(-1),
            counts.view(stats, -1, per_request).sum(-1),
        ],
        dim=-1,
    )
    token = torch.stack([counts.sum(1), kept.sum(1), (kept * kept).sum(1)], dim=1)
    delta = torch.cat([token, cluster_moments(sums)], dim=1)
    return delta, hist, bad.sum(), sums


def _observe_plain(
    x3: torch.Tensor,
    labels: torch.Tensor | None,
    keep: torch.Tensor | None,
    lo: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bins: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_moments` of :func:`plain_output_stats` for requests ``x3`` [R, T, V]:
    the whole CPU observe step as one function for ``torch.compile``."""
    raw = plain_output_stats(x3, labels, ignore_index)
    return token_moments(raw, keep, x3.shape[1], lo, scale, offset, bins)


_COMPILED = CompiledCPU(_observe_plain, name="OutputMonitor", dynamic=None, max_signatures=8)


def _sample_positions(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    call: int,
    every: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """Call number ``call``'s share of a monitor sampling one position in ``every``: every
    ``every``-th position of each request from offset ``call % every`` (views, no copy), or,
    for one position per request (a decode step), the whole call on every ``every``-th call
    only. None: nothing of this call is observed."""
    length = logits.shape[-2] if logits.dim() >= 2 else 1
    offset = call % every
    if length == 1:
        return (logits, labels, mask) if offset == 0 else None
    if offset >= length:
        return None
    logits = logits[..., offset::every, :]
    labels = None if labels is None else labels[..., offset::every]
    mask = None if mask is None else mask[..., offset::every]
    return logits, labels, mask


def _request_length(lead: torch.Size) -> int:
    """Tokens per request of logits with leading shape ``lead``: the last leading dim (a row
    of [..., T, V]), or all of them for [T, V]/[V] (one request)."""
    return lead[-1] if len(lead) >= 2 else lead.numel()


def _request_view(logits: torch.Tensor) -> torch.Tensor | None:
    """``logits`` [..., T, V] as a [R, T, V] view (one request per row of T tokens; [T, V]
    is one request), or None when no such view exists (the eager path handles it)."""
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        return None
    if logits.dim() == 1:  # one token
        return logits.view(1, 1, -1)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() == 3:
        return logits
    try:
        return logits.view(-1, *logits.shape[-2:])
    except RuntimeError:
        return None


class UnfinishedRows(NamedTuple):
    """The mask of a ``generate()`` step, evaluated when the gathered steps are observed
    (:func:`unfinished_rows` of the last of ``input_ids`` [B, L] and ``stop``): a step costs no
    operation for its mask, short of the steps whose kept ``input_ids`` pass
    :data:`DEFERRED_IDS_BYTES` (kept by reference: ``generate`` makes a new tensor each step),
    which evaluate the masks pending so far."""

    input_ids: torch.Tensor
    stop: torch.Tensor

    def evaluate(self) -> torch.Tensor:
        return unfinished_rows(self.input_ids[:, -1:], self.stop)


Mask = torch.Tensor | UnfinishedRows | None


class _DecodeBuffer:
    """Decode steps of R continuing requests, gathered for one observe pass: ``logits``
    [K, R, V] (the steps' dtype; step k of request r in ``logits[k, r]``), ``steps``, how many
    of the K are filled, and ``targets``: each step's slot viewed in the shape the steps come
    in, so that gathering a step is one copy (a contiguous one). The steps' masks, all of one
    kind: none; bool masks of the steps' leading shape, copied into ``keep`` [K, R] (one more
    copy per step); or :class:`UnfinishedRows` masks of one ``stop``, their ``input_ids`` kept
    in ``deferred`` and evaluated together into ``keep`` — when the steps are observed, or
    sooner once the kept tensors hold more than :data:`DEFERRED_IDS_BYTES`."""

    def __init__(self, requests: int, steps: int, like: torch.Tensor, mask: Mask):
        vocab = like.shape[-1]
        self.logits = torch.empty(steps, requests, vocab, dtype=like.dtype, device=like.device)
        self.shape = like.shape
        self.targets = [self.logits[k].view(like.shape) for k in range(steps)]
        deferred = isinstance(mask, UnfinishedRows)
        self.keep = None
        self.keep_targets: list[torch.Tensor] = []
        if mask is not None:
            self.keep = torch.empty(steps, requests, dtype=torch.bool, device=like.device)
            if not deferred:
                self.keep_targets = [self.keep[k].view(like.shape[:-1]) for k in range(steps)]
        self.stop = mask.stop if deferred else None
        self.deferred: list[torch.Tensor] = []  # input_ids of steps resolved ... steps - 1
        self.deferred_bytes = 0  # the storage those tensors hold
        self.resolved = 0  # steps whose deferred mask is in keep
        self.steps = 0
        self.limit = steps  # observe the buffer when this many steps are in

    @property
    def requests(self) -> int:
        return self.logits.shape[1]

    def takes(self, step: torch.Tensor, mask: Mask) -> bool:
        """Whether ``step`` has the shape, dtype and device of the steps in this buffer, and
        a mask of their kind."""
        buffer = self.logits
        same = step.shape == self.shape and step.dtype == buffer.dtype
        if not (same and step.device == buffer.device):
            return False
        if mask is None:
            return self.keep is None
        if isinstance(mask, UnfinishedRows):
            return mask.stop is self.stop
        bool_mask = mask.dtype == torch.bool and mask.shape == step.shape[:-1]
        return self.keep is not None and self.stop is None and bool_mask

    def fits(self, steps: int, like: torch.Tensor, mask: Mask) -> bool:
        """Whether this buffer holds ``steps`` steps shaped like ``like`` (and ``mask``)."""
        return len(self.targets) == steps and self.takes(like, mask)

    def add(self, step: torch.Tensor, mask: Mask) -> bool:
        """Copy ``step`` (and keep its ``mask``) into the next slot; True when ``limit``
        steps are then in."""
        self.targets[self.steps].copy_(step.detach() if step.requires_grad else step)
        if isinstance(mask, UnfinishedRows):
            self.deferred.append(mask.input_ids)
            self.deferred_bytes += mask.input_ids.untyped_storage().nbytes()
        elif mask is not None:
            self.keep_targets[self.steps].copy_(mask)
        self.steps += 1
        if self.deferred_bytes > DEFERRED_IDS_BYTES:
            self._resolve(self.steps)
        return self.steps >= self.limit

    def _resolve(self, steps: int) -> None:
        """Evaluate the deferred masks of steps ``resolved`` ... ``steps`` − 1 into ``keep``
        and let their ``input_ids`` go."""
        if self.deferred:
            fed = torch.cat([ids[:, -1:] for ids in self.deferred], dim=1)  # [R, n]
            self.keep[self.resolved : steps].copy_(unfinished_rows(fed, self.stop).t())
            self.deferred.clear()
            self.deferred_bytes = 0
        self.resolved = steps

    def gathered(self, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first ``steps`` steps as requests [R, steps, V] (a view), and their mask as
        R·steps bools in the same order (None without masks); evaluates the deferred masks
        and starts the buffer over."""
        keep = None
        if self.stop is not None:
            self._resolve(steps)
            self.resolved = 0
        if self.keep is not None:
            keep = self.keep[:steps].transpose(0, 1).reshape(-1)
        return self.logits[:steps].transpose(0, 1), keep


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


class _Capture(NamedTuple):
    """A window's state at one moment (:meth:`OutputMonitor._capture`): device tensors taken
    under the monitor's lock, read back by :meth:`summary` without it."""

    first_token: int
    tokens: int
    moments: torch.Tensor | None  # [S, 9] float64, _MOMENTS
    hist: torch.Tensor | None  # [S, bins]
    nonfinite: torch.Tensor | None  # () int64
    tokens_total: int
    vocab_size: int | None
    nonfinite_total: torch.Tensor | None  # () int64

    def summary(self) -> WindowSummary:
        """The :class:`WindowSummary` (reads the device)."""
        if self.moments is None:
            return WindowSummary(0, 0, 0, self.vocab_size, {})
        moments, hist = self.moments.cpu().numpy(), self.hist.cpu().numpy()
        stats = {}
        for k, name in enumerate(STATISTICS):
            summary = _stat_summary(moments[k], hist[k])
            if summary is not None:
                stats[name] = summary
        window = self.first_token, self.tokens, int(self.nonfinite)
        return WindowSummary(*window, self.vocab_size, stats)


class OutputMonitor:
    """Rolling per-request output statistics (module docstring).

    ``window_tokens``: tokens per window (None: everything); ``buckets``: its granularity;
    ``backend``: of :func:`qmetrics.metrics.output_stats.output_stats`; ``ignore_index``: the
    label value that is not scored; ``keep_requests``: how many finished requests' sums to keep
    for :meth:`request_sums`. ``compile`` (CPU, torch backend): run each observe step as one
    ``torch.compile``d function (True; the first call per input signature compiles, 5-30 s),
    never (False), or — None — as ``$QMETRICS_TORCH_COMPILE`` says, else never (a compile
    never starts by itself in the middle of traffic). A server should pass True and make one
    warm-up call per shape pattern before taking traffic. ``sample_every`` = k > 1
    observes one position in k of every request (every k-th position from an offset that
    rotates from call to call; a decode step's one position: every k-th call), cutting the
    cost k-fold; token counts and windows then count the observed tokens. Means and
    distributions stay unbiased over positions; their errors grow by up to √k.
    ``decode_batch``: how many decode steps are gathered into one observe pass (module
    docstring; 1: each step is observed by its own call).
    """

    def __init__(
        self,
        window_tokens: int | None = None,
        *,
        buckets: int = 8,
        backend: Backend = "auto",
        ignore_index: int = -100,
        keep_requests: int = 0,
        compile: bool | None = None,
        sample_every: int = 1,
        decode_batch: int = 64,
    ):
        check_backend(backend)
        if isinstance(decode_batch, bool) or not isinstance(decode_batch, int) or decode_batch < 1:
            raise ValueError(f"decode_batch must be a positive int, got {decode_batch!r}")
        if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
            raise ValueError(f"sample_every must be a positive int, got {sample_every!r}")
        if window_tokens is not None and (isinstance(window_tokens, bool) or window_tokens < 1):
            raise ValueError(f"window_tokens must be a positive int or None, got {window_tokens!r}")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
            raise ValueError(f"buckets must be a positive int, got {buckets!r}")
        self.window_tokens = window_tokens
        self.n_buckets = 1 if window_tokens is None else buckets
        self.bucket_tokens = None if window_tokens is None else math.ceil(window_tokens / buckets)
        self.backend = backend
        self.ignore_index = ignore_index
        self.keep_requests = keep_requests
        self.compile = compile
        self.sample_every = sample_every
        self.decode_batch = decode_batch
        self._generating = False  # set by attach's generate() wrapper while it runs
        # observe, end_requests, reset and reads take it: a scrape (Prometheus) from another
        # thread never sees, or breaks, a half-done step
        self._lock = threading.RLock()
        self._init_state()

    def _init_state(self) -> None:
        """The observed state, empty (the settings, lock and ``_generating`` stay)."""
        self.vocab_size: int | None = None
        self.tokens_total = 0
        self._device: torch.device | None = None
        self._stream: Any = None  # CUDA: the stream of the last call that touched the state
        self._buckets: list[_Bucket] = []
        self._current = 0
        self._open: torch.Tensor | None = None  # [S, R, 2]: open requests' (sum, count)
        self._nonfinite_total: torch.Tensor | None = None
        self._decode: _DecodeBuffer | None = None
        self._calls = 0
        self._request_log: list[torch.Tensor] = []  # closed requests' [S, R, 2] sums, in order
        self._logged = 0

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (``copy.deepcopy`` of a model the monitor is attached to) leave
        the lock and the CUDA stream out; :meth:`__setstate__` makes a new lock."""
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"]
        state["_stream"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _join_stream(self, device: torch.device | None) -> None:
        """CUDA: order this call's work on the current stream after the last call's, made by
        any thread on any stream (no host wait); the state then belongs to this stream."""
        if device is None or device.type != "cuda":
            return
        current = torch.cuda.current_stream(device)
        if self._stream is not None and self._stream != current:
            current.wait_stream(self._stream)
        self._stream = current

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

    def observe(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        mask: Mask = None,
        continues: bool = False,
    ) -> None:
        """Add the tokens of ``logits`` [..., V] (``labels`` shaped like the leading dims for
        the NLL; ``mask``: bool, False for tokens to skip, e.g. padding; from :meth:`attach`
        during ``generate()``, a mask evaluated when the gathered steps are observed).
        ``continues``: the requests (rows) stay open across calls until :meth:`end_requests`;
        a decode step (one position per request, no labels) is gathered with the following
        ones and observed with them in one pass (module docstring). Sync-free; thread-safe
        with reads (a scrape from another thread) and other observes."""
        with self._lock:
            if isinstance(logits, torch.Tensor):
                self._join_stream(logits.device)
            buf = self._decode
            if (
                continues
                and labels is None
                and buf is not None
                and self.sample_every == 1
                and isinstance(logits, torch.Tensor)
                and buf.takes(logits, mask)
                and self._open_requests() in (None, buf.requests)
            ):
                # the next step of the gathered requests, shaped as the first one (checked
                # then): one copy; the fewer operations, the less a decode step pays for cold
                # caches
                self._calls += 1
                if buf.add(logits, mask):
                    self._observe_gathered()
                return
            self._observe(logits, labels, mask, continues)

    @outside_inference_mode
    @torch.no_grad()
    def _observe(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        mask: Mask,
        continues: bool,
    ) -> None:
        """:meth:`observe` of anything but the next gathered decode step."""
        deferred = mask if isinstance(mask, UnfinishedRows) else None
        if deferred is not None:
            mask = None
        check_logits(logits)
        lead = logits.shape[:-1]
        if labels is not None:
            check_labels(labels, lead)
        if mask is not None and mask.shape != lead:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match the logits' "
                f"leading shape {tuple(lead)}"
            )
        self._setup(logits.device, logits.shape[-1])
        call, self._calls = self._calls, self._calls + 1
        if self.sample_every > 1:
            sampled = _sample_positions(logits, labels, mask, call, self.sample_every)
            if sampled is None:
                return
            logits, labels, mask = sampled
            lead = logits.shape[:-1]
        n_tok = lead.numel()
        one_each = _request_length(lead) == 1
        if mask is not None:
            mask = mask.to(device=logits.device, dtype=torch.bool)
        decode_step = continues and one_each and labels is None
        step_mask = deferred if deferred is not None else mask
        if decode_step and self._gather_decode_step(logits, n_tok, step_mask):
            return
        self._observe_gathered()
        if deferred is not None:
            mask = deferred.evaluate()
            if mask.shape != lead:
                raise ValueError(
                    f"an UnfinishedRows mask is one position per row ({tuple(mask.shape)}), "
                    f"the logits' leading shape is {tuple(lead)}"
                )
        keep = None
        if mask is not None:
            keep = mask.reshape(-1)
        self._add(logits, labels, keep, continues, n_tok)

    def _add(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        keep: torch.Tensor | None,
        continues: bool,
        n_tok: int,
    ) -> None:
        """Add checked ``logits`` [..., T, V] (requests of T tokens; ``keep``: N bools or None)
        to the current bucket as ``n_tok`` tokens."""
        per_request = _request_length(logits.shape[:-1])
        bucket = self._bucket_with_room()
        layout = (*bucket.hist.layout, bucket.hist.bins)
        compiled = want_compile(self.compile, logits.device, large=False)
        step = self._compiled_step(logits, labels, keep, layout) if compiled else None
        if step is None:
            raw = output_stats_rows(
                logits,
                labels,
                ignore_index=self.ignore_index,
                backend=self.backend,
                compile=compiled,
            )
            step = token_moments(raw, keep, per_request, *layout)
        delta, hist, nonfinite, sums = step
        bucket.hist.counts += hist
        bucket.nonfinite += nonfinite
        self._nonfinite_total += nonfinite
        if continues:
            self._check_open(sums.shape[1])
            bucket.moments[:, : _CLUSTER.start] += delta[:, : _CLUSTER.start]
            self._open = sums if self._open is None else self._open + sums
        else:
            bucket.moments += delta
            self._log_requests(sums)
        bucket.tokens += n_tok
        self.tokens_total += n_tok
        if self._decode is not None:
            self._set_flush_limit(self._decode)

    def _room(self) -> int | None:
        """Tokens the next call can add before its bucket is full (None: no rolling window)."""
        if self.bucket_tokens is None:
            return None
        used = self._buckets[self._current].tokens if self._buckets else 0
        return self.bucket_tokens - used if used < self.bucket_tokens else self.bucket_tokens

    def _bucket_with_room(self) -> _Bucket:
        """The current bucket, after moving on (clearing the oldest) if it is full."""
        bucket = self._buckets[self._current]
        if self.bucket_tokens is not None and bucket.tokens >= self.bucket_tokens:
            self._current = (self._current + 1) % self.n_buckets
            bucket = self._buckets[self._current]
            bucket.reset(self.tokens_total)
        return bucket

    def _open_requests(self) -> int | None:
        """How many continuing requests are open (gathered steps, or sums), None if none."""
        gathered = self._decode
        if gathered is not None and gathered.steps > 0:
            return gathered.requests
        return None if self._open is None else self._open.shape[1]

    def _check_open(self, requests: int) -> None:
        """Raise unless ``requests`` continuing requests match the open ones (if any)."""
        open_ = self._open_requests()
        if open_ is not None and open_ != requests:
            raise ValueError(
                f"{requests} continuing requests, but {open_} are open: call end_requests() first"
            )

    def _gather_decode_step(self, logits: torch.Tensor, requests: int, mask: Mask) -> bool:
        """Copy a decode step (one position of each of ``requests`` continuing requests, and
        its mask or None) into the decode buffer, observing the buffer when it is
        full. False when steps are not gathered (``decode_batch`` 1, or one step is over
        :data:`DECODE_BUFFER_BYTES`)."""
        step_bytes = requests * logits.shape[-1] * logits.element_size()
        steps = min(self.decode_batch, DECODE_BUFFER_BYTES // max(step_bytes, 1))
        if steps < 2:
            return False
        self._check_open(requests)
        buf = self._decode
        if buf is None or not buf.fits(steps, logits, mask):
            self._observe_gathered()
            buf = self._decode = _DecodeBuffer(requests, steps, logits, mask)
            self._set_flush_limit(buf)
        if buf.add(logits, mask):
            self._observe_gathered()
        return True

    @outside_inference_mode
    @torch.no_grad()
    def _observe_gathered(self) -> None:
        """Observe the gathered decode steps (one pass over the [R, steps, V] view) and empty
        the buffer. The view's strides do not depend on ``steps``: the compiled CPU step does
        not compile again for another count of steps (once more for one step)."""
        buf = self._decode
        if buf is None or buf.steps == 0:
            return
        steps, buf.steps = buf.steps, 0
        logits, keep = buf.gathered(steps)
        self._add(logits, None, keep, True, buf.requests * steps)

    def _set_flush_limit(self, buf: _DecodeBuffer) -> None:
        """Observe ``buf`` at the latest when its steps fill the current bucket: a bucket then
        moves on after the same step as when each step is observed by its own call."""
        room = self._room()
        full = len(buf.targets)
        buf.limit = full if room is None else max(1, min(full, -(-room // buf.requests)))

    def _compiled_step(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        keep: torch.Tensor | None,
        layout: tuple,
    ) -> tuple[torch.Tensor, ...] | None:
        """:func:`_observe_plain` compiled, for the torch backend on the CPU when a [R, T, V]
        view exists; else None (the eager step runs)."""
        if resolve_backend(self.backend, logits.device) != "torch":
            return None
        x3 = _request_view(logits.detach())
        if x3 is None:
            return None
        labels = checked_labels(labels, logits)
        signature = (*compile_signature(x3, labels), keep is None)
        return _COMPILED(
            signature,
            compiled_view(x3),
            None if labels is None else compiled_view(labels),
            None if keep is None else compiled_view(keep),
            *layout,
            self.ignore_index,
        )

    def _log_requests(self, sums: torch.Tensor) -> None:
        """Keep finished requests' sums [S, R, 2] while fewer than ``keep_requests`` are."""
        if self._logged < self.keep_requests:
            self._request_log.append(sums)
            self._logged += sums.shape[1]

    def _fold(self, sums: torch.Tensor) -> None:
        """Add finished requests' (sum, count) [S, R, 2] to the current bucket's cluster sums."""
        self._log_requests(sums)
        self._buckets[self._current].moments[:, _CLUSTER] += cluster_moments(sums)

    def end_requests(self) -> None:
        """Close the requests opened by ``observe(..., continues=True)``."""
        with self._lock:
            self._join_stream(self._device)
            self._observe_gathered()
            if self._open is not None:
                self._fold(self._open)
                self._open = None

    def reset(self) -> None:
        """Forget everything observed (the vocabulary size too). A ``generate()`` running in
        :meth:`attach` goes on: its next steps are observed as the start of its requests."""
        with self._lock:
            self._join_stream(self._device)
            self._init_state()

    def request_sums(self) -> np.ndarray:
        """[C, S, 2] float64: (sum, count) of each statistic for the first ``keep_requests``
        closed requests, in the order they closed (for paired checks on a known corpus)."""
        with self._lock:
            if not self._request_log:
                return np.zeros((0, len(STATISTICS), 2))
            self._join_stream(self._device)
            sums = torch.cat(self._request_log, dim=1).transpose(0, 1)[: self.keep_requests]
        return sums.cpu().numpy()

    # --- reading (host synchronisation) --------------------------------------------------------

    def _capture(self) -> _Capture:
        """The window's state as new device tensors, under the lock (gathered decode steps
        observed first; open requests counted as clusters of their tokens so far, and left
        open): later observes do not change it, and reading it back waits outside the lock."""
        with self._lock:
            self._join_stream(self._device)
            self._observe_gathered()
            totals = self.tokens_total, self.vocab_size
            if not self._buckets:
                return _Capture(0, 0, None, None, None, *totals, None)
            live = [b for b in self._buckets if b.tokens > 0] or self._buckets[:1]
            moments = torch.stack([b.moments for b in live]).sum(0)
            if self._open is not None:  # requests still open: clusters of their tokens so far
                moments[:, _CLUSTER] += cluster_moments(self._open)
            return _Capture(
                min(b.first_token for b in live),
                sum(b.tokens for b in live),
                moments,
                torch.stack([b.hist.counts for b in live]).sum(0),
                torch.stack([b.nonfinite for b in live]).sum(),
                *totals,
                self._nonfinite_total.clone(),
            )

    def summary(self) -> WindowSummary:
        """The current window, read back: :class:`qmetrics.metrics.drift.WindowSummary`
        (gathered decode steps are observed first; open requests count as clusters of their
        tokens so far, and stay open)."""
        return self._capture().summary()

    def snapshot(self) -> dict[str, Any]:
        """The monitor's state as a JSON-ready dict: totals, the window, and per statistic
        count, mean ± clustered se, sd, requests and the 5/50/95th percentiles (from the
        histogram: exact to one grid bin). Totals and window are read at one moment."""
        return self.read()[1]

    def read(self) -> tuple[WindowSummary, dict[str, Any]]:
        """:meth:`summary` and :meth:`snapshot` of one moment (one capture, one flush)."""
        capture = self._capture()
        s = capture.summary()
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
        nonfinite_total = capture.nonfinite_total
        return s, {
            "tokens_total": capture.tokens_total,
            "sample_every": self.sample_every,
            "nonfinite_total": 0 if nonfinite_total is None else int(nonfinite_total),
            "vocab_size": capture.vocab_size,
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
        returns), skipping rows that have finished — whose input token is an end-of-sequence
        or padding id of the call's generation config: ``generate`` runs them on until the
        whole batch is done; in any other call (scoring) all positions, each row a request,
        with the next input token as label (``score_labels``) and padding (``attention_mask``
        0) skipped. Returns a handle whose ``remove()`` detaches it."""
        return MonitorHandle(self, model, score_labels)


class MonitorHandle:
    """The forward hook (and ``generate`` wrapper) of :meth:`OutputMonitor.attach`."""

    def __init__(self, monitor: OutputMonitor, model: torch.nn.Module, score_labels: bool):
        self.monitor, self.model, self.score_labels = monitor, model, score_labels
        self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._generate = model.__dict__.get("generate")
        self._stop_ids: list[int] = []  # the running generate()'s end-of-sequence and pad ids
        self._stop: torch.Tensor | None = None  # the same on the inputs' device
        original = model.generate if hasattr(model, "generate") else None
        if original is not None:

            def generate(*args: Any, **kwargs: Any) -> Any:
                self._stop_ids, self._stop = _stop_token_ids(model, kwargs), None
                monitor._generating = True
                try:
                    return original(*args, **kwargs)
                finally:
                    monitor._generating = False
                    monitor.end_requests()

            model.generate = generate

    def _finished_rows_mask(self, input_ids: object, rows: int) -> UnfinishedRows | None:
        """During ``generate()``: the mask of the rows still running (False for rows whose
        last input token is an end-of-sequence or pad id: finished, ``generate`` feeds them
        pad tokens until the batch is done), evaluated when the steps are observed; None
        when that cannot be told."""
        if not self._stop_ids or not isinstance(input_ids, torch.Tensor):
            return None
        if input_ids.dim() != 2 or input_ids.shape[0] != rows:
            return None
        if self._stop is None or self._stop.device != input_ids.device:
            self._stop = torch.tensor(self._stop_ids, device=input_ids.device)
        return UnfinishedRows(input_ids, self._stop)

    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, tuple | list):
            logits = output[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            return
        mon = self.monitor
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if mon._generating:
            # a decode step's logits are [B, 1, V] already: no slice (one op less per step)
            step = logits if logits.shape[1] == 1 else logits[:, -1:]
            keep = self._finished_rows_mask(input_ids, logits.shape[0])
            mon.observe(step, continues=True, mask=keep)
            return
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


def unfinished_rows(fed: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """Bools shaped like ``fed``, the tokens ``generate()`` fed its rows ([B, k]: the last of
    a forward's ``input_ids``, or those of k steps): whether the row was still running, i.e.
    the token is none of the ``stop`` ids (end-of-sequence, pad)."""
    # a broadcast compare, not torch.isin: isin's sorting path (10+ ids) syncs on CUDA
    return (fed[..., None] != stop).all(-1)


def _stop_token_ids(model: torch.nn.Module, kwargs: dict) -> list[int]:
    """The end-of-sequence and pad token ids a ``generate(**kwargs)`` call of ``model`` uses
    (its arguments, else its ``generation_config``, else the model's)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    ids: list[int] = []
    for name in ("eos_token_id", "pad_token_id"):
        value = kwargs.get(name, getattr(config, name, None))
        if isinstance(value, torch.Tensor):
            value = value.flatten().tolist()
        if isinstance(value, int):
            value = [value]
        ids.extend(int(v) for v in value or () if v is not None)
    return sorted(set(ids))


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
