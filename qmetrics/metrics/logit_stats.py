"""Streaming accumulator of :func:`qmetrics.compare_logits` results over a whole evaluation run.

:class:`LogitStats` follows the torchmetrics pattern: ``update`` batch by batch, ``compute`` at
the end, ``merge`` / ``sync`` to combine accumulators (threads, shards, ranks), ``state_dict`` /
``load_state_dict`` to resume a long run. :meth:`LogitStats.compute` returns a
:class:`LogitStatsResult` holding (at least) the statistics of llama.cpp ``--kl-divergence``,
each with its standard error.

Row classes. Every row (token position) of every update is *seen* and falls in exactly one of:

- *ignored*: ``scored`` is False in the per-token metrics (its label equals ``ignore_index``);
- *non-finite*: not ignored, but ``finite`` is False, or some float metric in use is not finite
  (e.g. ``kl = +inf`` when the quant model gives probability 0 to a token the reference allows,
  or an infinite NLL);
- *scored*: everything else. Only scored rows enter any statistic (moments, match counts,
  percentiles), so ``seen = scored + ignored + non-finite``.

Metrics (per scored row; those after ``mse`` only when labels are given): ``kl, reverse_kl,
entropy_ref, entropy_quant, cosine, mse`` as in :mod:`qmetrics.metrics.token_metrics`, ``nll_ref``,
``nll_quant``, ``nll_diff = nll_quant − nll_ref``, ``delta_p = prob_quant − prob_ref`` and
``delta_p_sq = delta_p²`` (for the RMS).

State. Each metric keeps count n, mean and M2 = Σ(x − mean)² in float64, plus the co-moment
C = Σ(nll_ref − mean_ref)(nll_quant − mean_quant). A batch is reduced two-pass (mean, then
squared deviations) and folded in with Chan et al.'s parallel update
(:func:`qmetrics.metrics.estimate.chan_merge`); for parts a, b with
n = n_a + n_b and δ = mean_b − mean_a:

    mean = mean_a + δ·n_b/n,   M2 = M2_a + M2_b + δ²·n_a·n_b/n,
    C    = C_a + C_b + δ_ref·δ_quant·n_a·n_b/n.

All metrics share one count, since a row is scored for all of them or for none.

Percentiles (``percentiles=``). ``"exact"`` keeps the per-token ``kl`` and ``delta_p`` of the
scored rows (float32, on CPU, appended chunk-wise; 4 bytes per token each) for exact
percentiles, max and min (``numpy.percentile``, linear). ``"sketch"`` keeps instead one
:class:`~qmetrics.metrics.quantile_sketch.QuantileSketch` per metric: a fixed-size histogram
with bin ratio 1.008 (relative error < 0.8 % for |x| in [1e-10, 1e3] for kl, [1e-10, 1] for
Δp; absolute < 1e-10 below), exact max/min and the 1024 largest and smallest values kept
exactly, about 140 kB for both whatever the token count. ``"auto"`` (the default) is exact until
more than ``exact_limit`` tokens' values are held (default :data:`EXACT_LIMIT` = 10⁷ tokens,
80 MB), then folds the values into the sketch and goes on there. The count is known without a
device sync: settled scored tokens plus every row of the batches not yet settled. The result's
``percentile_method`` says which one produced the percentiles; merging an exact state with a
sketch one gives a sketch.

Device. ``update`` makes no host synchronisation: it only enqueues work on the metrics' device.
There each batch leaves device tensors: sums of the row counts, its (n, mean, M2, C) summary
(one float64 row, reduced two-pass over the scored rows by masks), its kl / delta_p with NaN
for unscored rows, and its per-sequence counts and sums. ``compute``, ``state_dict``,
``merge``, ``sync`` and ``__repr__`` first *settle* them: one wait for the device, then each
batch is folded into the CPU state above in update order with the same Chan merge, NaNs and
empty sequences dropped — the state is the one a per-batch fold would give. On CUDA the pending
chunks are moved to CPU with a non-blocking copy every ``_MAX_CHUNKS`` updates, so device memory
stays bounded. Out-of-range labels are counted on the device (with the first such value):
their tokens get NaN NLLs, and ``compute`` / ``state_dict`` raise a ``ValueError`` naming the
count and the first value.

Sequences. Tokens of one sequence are correlated (a hard passage raises every token's KL), so
the iid standard error s/√n is optimistic. A *sequence* is one index of the leading dim of an
update with ≥ 2 dims ([B, T, V] logits: B sequences), or the whole update for 1-D input; with
``sequence_ids`` (one int ≥ 0 per leading index) rows with the same id form one sequence across
updates, merges and resumes (the evaluator passes window indices, since it feeds a window
chunk by chunk). Per sequence b the state keeps its scored count n_b and the sums S_b of every
metric and of the top-1/top-k matches (float64), and ``compute`` adds the cluster-robust
(sandwich) standard error of every mean, with G sequences:

    se_seq(mean)² = G/(G − 1) · Σ_b (S_b − n_b·mean)² / n²

and the same delta-method propagation as the iid one. It is NaN with fewer than 2 sequences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from qmetrics.metrics.estimate import Distribution, Estimate, chan_merge
from qmetrics.metrics.functional import Backend, check_backend, compare_logits
from qmetrics.metrics.inference_mode import outside_inference_mode
from qmetrics.metrics.json_values import json_float
from qmetrics.metrics.quantile_sketch import QuantileSketch
from qmetrics.metrics.token_metrics import FLOAT_FIELDS, TokenMetrics
from qmetrics.metrics.validation import bad_labels_error, out_of_range_labels

#: Metrics with moments, in state order. The first 6 are always present; the rest need labels.
METRICS = (
    *FLOAT_FIELDS,
    "nll_ref",
    "nll_quant",
    "nll_diff",
    "delta_p",
    "delta_p_sq",
)
N_BASE = len(FLOAT_FIELDS)
_I_NLL_REF = METRICS.index("nll_ref")
_I_NLL_QUANT = METRICS.index("nll_quant")
#: Metrics reported with mean ± stderr (delta_p_sq is internal: it feeds the RMS Δp).
REPORTED = tuple(m for m in METRICS if m != "delta_p_sq")
#: Percentiles reported for kl and delta_p (numpy.percentile, linear interpolation); the
#: quartiles are those llama.cpp prints for Δp.
PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)
#: ``percentiles="auto"`` keeps exact per-token values up to this many tokens (8 bytes each).
EXACT_LIMIT = 10_000_000
PercentileMode = Literal["auto", "exact", "sketch"]
#: Sketch layouts (lo, hi): KL ≥ 0 up to 1e3 nats, Δp ∈ [−1, 1].
_SKETCH_RANGE = {"kl": (1e-10, 1e3), "delta_p": (1e-10, 1.0)}
STATE_VERSION = 3  # 3: percentile_method and the sketches; 2: no sketches; 1: no sequences
#: Columns of the per-sequence sums: every metric, then the top-1 and top-k match counts.
BLOCK_COLS = (*METRICS, "top1_match", "topk_match")

Reduction = Literal["sum", "chan", "cat"]


@dataclass(frozen=True)
class _StateSpec:
    name: str
    reduction: Reduction
    dtype: torch.dtype
    shape: tuple[int, ...]


#: Every state entry, declared once with its reduction (cf. torchmetrics' ``add_state``):
#: ``sum`` adds, ``chan`` merges the (n, mean, m2, comoment) group with Chan's update,
#: ``cat`` concatenates the per-token values in order.
STATE: tuple[_StateSpec, ...] = (
    _StateSpec("seen", "sum", torch.int64, ()),
    _StateSpec("ignored", "sum", torch.int64, ()),
    _StateSpec("nonfinite", "sum", torch.int64, ()),
    _StateSpec("top1_matches", "sum", torch.int64, ()),
    _StateSpec("topk_matches", "sum", torch.int64, ()),
    _StateSpec("n", "chan", torch.int64, ()),
    _StateSpec("mean", "chan", torch.float64, (len(METRICS),)),
    _StateSpec("m2", "chan", torch.float64, (len(METRICS),)),
    _StateSpec("comoment", "chan", torch.float64, ()),
    _StateSpec("kl_values", "cat", torch.float32, (-1,)),
    _StateSpec("delta_p_values", "cat", torch.float32, (-1,)),
    _StateSpec("seq_id", "cat", torch.int64, (-1,)),  # caller's sequence id, −1: unnamed
    _StateSpec("seq_n", "cat", torch.int64, (-1,)),  # scored rows per sequence
    _StateSpec("seq_sums", "cat", torch.float64, (-1,)),  # [sequences × BLOCK_COLS], flattened
)
_SETTINGS = ("version", "top_k", "ignore_index", "has_labels")
# Concatenate the value chunks once this many have piled up (bounds per-chunk overhead).
_MAX_CHUNKS = 256

#: The percentile sketches of a sketch-mode state (None in an exact one), by value name.
SKETCHES = ("kl", "delta_p")

# tensors for sum/chan entries, lists of 1-D tensors for cat entries, and "kl_sketch" /
# "delta_p_sketch": a QuantileSketch each in sketch mode, None in exact mode
State = dict[str, Any]


def _new_sketch(name: str, device: torch.device | str | None = None) -> QuantileSketch:
    lo, hi = _SKETCH_RANGE[name]
    return QuantileSketch(lo, hi, device=device)


def _empty_state(sketch: bool = False) -> State:
    state: State = {}
    for spec in STATE:
        if spec.reduction == "cat":
            state[spec.name] = []
        else:
            state[spec.name] = torch.zeros(spec.shape, dtype=spec.dtype)
    for name in SKETCHES:
        state[f"{name}_sketch"] = _new_sketch(name) if sketch else None
    return state


def _is_sketch(state: State) -> bool:
    return state["kl_sketch"] is not None


def _as_sketch(state: State) -> State:
    """``state`` with its per-token values folded into new sketches (itself if already one).
    No host reads: torch ops on the CPU state only."""
    if _is_sketch(state):
        return state
    out = dict(state)
    for name in SKETCHES:
        sketch = _new_sketch(name)
        for chunk in state[f"{name}_values"]:
            sketch.update(chunk)
        out[f"{name}_sketch"], out[f"{name}_values"] = sketch, []
    return out


def _combine(a: State, b: State) -> State:
    """The state of the union of the data behind ``a`` and ``b`` (``a``'s rows first); a
    sketch if either is one."""
    out: State = {}
    if _is_sketch(a) or _is_sketch(b):
        a, b = _as_sketch(a), _as_sketch(b)
        for name in SKETCHES:
            out[f"{name}_sketch"] = a[f"{name}_sketch"].clone().merge(b[f"{name}_sketch"])
    else:
        out.update({f"{name}_sketch": None for name in SKETCHES})
    for spec in STATE:
        if spec.reduction == "sum":
            out[spec.name] = a[spec.name] + b[spec.name]
        elif spec.reduction == "cat":
            out[spec.name] = [*a[spec.name], *b[spec.name]]
    merged = chan_merge(a["n"], a["mean"], a["m2"], b["n"], b["mean"], b["m2"])
    out["n"] = torch.tensor(merged.n, dtype=torch.int64)
    out["mean"], out["m2"] = merged.mean, merged.m2
    out["comoment"] = merged.comoment(a["comoment"], b["comoment"], _I_NLL_REF, _I_NLL_QUANT)
    return out


@dataclass(frozen=True)
class LogitStatsResult:
    """Statistics over the scored tokens (see :meth:`LogitStats.compute` for the formulas).

    ``means`` maps every metric in :data:`REPORTED` in use (label metrics only with labels) to
    its mean ± standard error. Label-dependent fields are None without labels.
    """

    top_k: int
    tokens_seen: int
    tokens_scored: int
    tokens_ignored: int
    tokens_nonfinite: int
    means: dict[str, Estimate]
    top1_agreement: Estimate
    topk_agreement: Estimate
    kl_distribution: Distribution
    delta_p_distribution: Distribution | None = None
    rms_delta_p: Estimate | None = None
    ppl_ref: Estimate | None = None
    ppl_quant: Estimate | None = None
    ln_ppl_ratio: Estimate | None = None
    ppl_ratio: Estimate | None = None
    ppl_diff: Estimate | None = None
    nll_correlation: float | None = None
    sequences: int = 0
    #: "exact" (numpy.percentile of every value) or "sketch" (a QuantileSketch estimate)
    percentile_method: Literal["exact", "sketch"] = "exact"
    #: metrics the inputs lacked (cosine, mse from a top-K reference store): not in ``means``
    absent: tuple[str, ...] = ()
    #: True when kl / reverse_kl (means and percentiles) are lower bounds (top-K reference)
    kl_lower_bound: bool = False

    @property
    def has_labels(self) -> bool:
        """Whether the label statistics (NLL, PPL, Δp) are present."""
        return self.ppl_ref is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable nested dict (``json.dumps(..., allow_nan=False)`` works).

        Floats that are NaN (undefined, e.g. a standard error from one token) become None;
        ±inf become the strings ``"inf"`` / ``"-inf"``. Label sections are None without labels.
        Layout: ``top_k``, ``counts`` {seen, scored, ignored, nonfinite, sequences}, ``means``
        {metric: {value, stderr, stderr_seq}}, ``agreement`` {top1, topk: {…}},
        ``kl_distribution`` / ``delta_p_distribution`` {max, min, percentiles {"99.9": ...}},
        ``rms_delta_p`` {…}, ``perplexity`` {ppl_ref, ppl_quant, ln_ppl_ratio, ppl_ratio,
        ppl_diff: {value, stderr, stderr_seq}, nll_correlation}, ``percentile_method`` ("exact"
        or "sketch": how the distributions' percentiles were computed).
        """

        def opt(x: Estimate | Distribution | None) -> dict[str, Any] | None:
            return None if x is None else x.to_dict()

        perplexity = None
        if self.has_labels:
            perplexity = {
                "ppl_ref": opt(self.ppl_ref),
                "ppl_quant": opt(self.ppl_quant),
                "ln_ppl_ratio": opt(self.ln_ppl_ratio),
                "ppl_ratio": opt(self.ppl_ratio),
                "ppl_diff": opt(self.ppl_diff),
                "nll_correlation": json_float(
                    math.nan if self.nll_correlation is None else self.nll_correlation
                ),
            }
        return {
            "top_k": self.top_k,
            "counts": {
                "seen": self.tokens_seen,
                "scored": self.tokens_scored,
                "ignored": self.tokens_ignored,
                "nonfinite": self.tokens_nonfinite,
                "sequences": self.sequences,
            },
            "means": {name: est.to_dict() for name, est in self.means.items()},
            "agreement": {
                "top1": self.top1_agreement.to_dict(),
                "topk": self.topk_agreement.to_dict(),
            },
            "kl_distribution": self.kl_distribution.to_dict(),
            "delta_p_distribution": opt(self.delta_p_distribution),
            "rms_delta_p": opt(self.rms_delta_p),
            "perplexity": perplexity,
            "percentile_method": self.percentile_method,
            "absent": list(self.absent),
            "kl_lower_bound": self.kl_lower_bound,
        }


class LogitStats:
    """Streaming accumulator of per-token logit-comparison metrics (torchmetrics style).

    ``update(ref, quant, labels)`` runs :func:`qmetrics.compare_logits` on one batch and folds
    the result in; ``compute()`` gives a :class:`LogitStatsResult`. Row classes, metrics and the
    merge formulas are in the module docstring. The state lives on CPU whatever the inputs'
    device; per batch only a few scalars and the scored rows' kl / delta_p values (float32)
    leave the device.

    Whether labels are used is fixed by the first update after construction or ``reset()``;
    mixing batches with and without labels raises ``ValueError``.

    ``percentiles``: ``"auto"`` (exact up to ``exact_limit`` tokens, then the fixed-size
    sketch), ``"exact"`` (always keep every value) or ``"sketch"`` (never keep them); see the
    module docstring, "Percentiles".
    """

    def __init__(
        self,
        top_k: int = 5,
        ignore_index: int = -100,
        backend: Backend = "auto",
        *,
        percentiles: PercentileMode = "auto",
        exact_limit: int = EXACT_LIMIT,
    ):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        if percentiles not in ("auto", "exact", "sketch"):
            raise ValueError(
                f"percentiles must be 'auto', 'exact' or 'sketch', got {percentiles!r}"
            )
        if isinstance(exact_limit, bool) or not isinstance(exact_limit, int) or exact_limit < 0:
            raise ValueError(f"exact_limit must be an int ≥ 0, got {exact_limit!r}")
        check_backend(backend)
        self.top_k = top_k
        self.ignore_index = ignore_index
        self.backend: Backend = backend
        self.percentiles: PercentileMode = percentiles
        self.exact_limit = exact_limit
        self._state: State = _empty_state(sketch=percentiles == "sketch")
        self._has_labels: bool | None = None
        self._pending: _Pending | None = None  # device-side batches not yet in _state
        self._bad: _BadLabels | None = None  # out-of-range labels settled so far
        self._local: tuple[State, bool | None, _BadLabels | None] | None = None  # while synced
        # metrics the inputs lack (None until the first batch; a top-K reference summary has no
        # cosine/mse) and whether its KL is a lower bound: fixed by the first batch, like labels
        self._absent: tuple[str, ...] | None = None
        self._kl_lower_bound = False

    # --- accumulation ------------------------------------------------------------------------

    @property
    def has_labels(self) -> bool | None:
        """True / False once the first batch fixed it, None before."""
        return self._has_labels

    @property
    def synced(self) -> bool:
        """Whether the state is the all-rank state from :meth:`sync` (until :meth:`unsync`)."""
        return self._local is not None

    @property
    def percentile_method(self) -> Literal["exact", "sketch"]:
        """How percentiles are computed now: "exact" while the per-token values are kept,
        "sketch" once they were folded into the fixed-size sketch."""
        sketch = _is_sketch(self._state) or (
            self._pending is not None and not self._pending.keep_values
        )
        return "sketch" if sketch else "exact"

    @property
    def tokens_seen(self) -> int:
        """Rows seen so far (scored + ignored + non-finite); no host synchronisation."""
        pending = self._pending.seen if self._pending is not None else 0
        return int(self._state["seen"]) + pending

    @outside_inference_mode
    def update(
        self,
        ref: torch.Tensor,
        quant: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        sequence_ids: torch.Tensor | None = None,
    ) -> None:
        """Compare one batch of logits [..., V] (and labels [...]) and fold the result in.
        ``sequence_ids``: see :meth:`update_metrics`.

        No host synchronisation (labels on the logits' device): out-of-range labels are only
        counted here, and raise in :meth:`compute` / :meth:`state_dict`."""
        self._check_not_synced("update")
        tm = compare_logits(
            ref,
            quant,
            labels,
            top_k=self.top_k,
            ignore_index=self.ignore_index,
            backend=self.backend,
        )
        self.update_metrics(tm, sequence_ids=sequence_ids)
        if labels is not None:
            assert self._pending is not None
            self._pending.count_bad_labels(labels, ref.shape[-1], self.ignore_index)

    @outside_inference_mode
    def update_metrics(self, tm: TokenMetrics, *, sequence_ids: torch.Tensor | None = None) -> None:
        """Fold in precomputed per-token metrics (e.g. from :func:`qmetrics.compare_logits`).

        ``sequence_ids``: one int ≥ 0 per index of the leading dim (or one for 1-D metrics);
        rows with equal ids count as one sequence for ``stderr_seq``, also across updates.
        Without it every leading index of every update is a sequence of its own.

        Raises ``ValueError`` if ``tm.top_k`` differs from this accumulator's, if labels are
        present here but were absent in earlier batches (or the reverse), or if
        ``sequence_ids`` has the wrong size or negative entries (negative entries of a tensor
        on a non-CPU device are found without a sync: the next :meth:`compute` raises).
        No host synchronisation for metrics on a CUDA device.
        """
        self._check_not_synced("update")
        if tm.top_k != self.top_k:
            raise ValueError(
                f"top_k mismatch: metrics have top_k={tm.top_k}, expected {self.top_k}"
            )
        self._check_labels(tm.has_labels, "this batch")
        absent = tuple(name for name in FLOAT_FIELDS if getattr(tm, name) is None)
        self._check_absent(absent, tm.kl_lower_bound, "this batch")
        if tm.kl.device.type == "mps":  # no float64 there
            tm = TokenMetrics(top_k=tm.top_k, **{k: v.cpu() for k, v in tm.to_dict().items()})
        sequences = tm.kl.shape[0] if tm.kl.dim() >= 2 else 1
        ids = _sequence_ids(sequence_ids, sequences, tm.kl.shape)
        if self._pending is not None and self._pending.device != tm.kl.device:
            self._settle()
        if self._pending is None:
            self._pending = _Pending(
                tm.kl.device,
                keep_values=self.percentile_method == "exact",
                sketch=self.percentiles != "exact" or _is_sketch(self._state),
            )
        self._pending.add(tm, sequences, ids)
        self._has_labels = tm.has_labels
        self._absent, self._kl_lower_bound = absent, tm.kl_lower_bound
        self._switch_if_due()

    def reset(self) -> None:
        """Drop all data (settings stay; labels on/off is decided afresh by the next batch)."""
        self._absent, self._kl_lower_bound = None, False
        self._state = _empty_state(sketch=self.percentiles == "sketch")
        self._has_labels = None
        self._pending = None
        self._bad = None
        self._local = None

    def merge(self, other: LogitStats) -> LogitStats:
        """Fold ``other``'s data into this accumulator, exactly as if its batches had been
        updated here (after this one's); ``other`` is unchanged. Returns ``self``.

        Raises ``ValueError`` if top_k, ignore_index or labels on/off differ. If either holds
        a sketch (or the union passes ``exact_limit`` in auto mode) the result is a sketch.
        """
        self._check_not_synced("merge")
        if not isinstance(other, LogitStats):
            raise ValueError(f"can only merge a LogitStats, got {type(other).__name__}")
        self._check_settings(other.top_k, other.ignore_index, "the other accumulator")
        if other._has_labels is not None:
            self._check_labels(other._has_labels, "the other accumulator")
            self._has_labels = other._has_labels
        if other._absent is not None:
            self._check_absent(other._absent, other._kl_lower_bound, "the other accumulator")
            self._absent, self._kl_lower_bound = other._absent, other._kl_lower_bound
        self._settle()
        other._settle()
        self._state = _combine(self._state, other._state)
        self._bad = _BadLabels.join(self._bad, other._bad)
        self._compact()
        self._switch_if_due()
        return self

    # --- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full state as a flat dict of CPU tensors, nothing else.

        It saves as is with ``safetensors.torch.save_file`` or ``torch.save`` (and loads with
        ``weights_only=True``). Settings are 0-d int64 tensors: ``version``, ``top_k``,
        ``ignore_index``, ``has_labels`` (−1 undecided, 0 no, 1 yes), ``percentile_method``
        (0 exact: ``kl_values`` / ``delta_p_values`` hold every scored token's value; 1 sketch:
        they are empty and ``kl_sketch.*`` / ``delta_p_sketch.*`` hold the sketches, a fixed
        size). The backend, ``percentiles`` and ``exact_limit`` are execution choices and are
        not saved. Raises ``ValueError`` when out-of-range labels were seen (a saved state never
        holds them).
        """
        self._settle()
        self._raise_bad_labels()
        return self._state_tensors()

    def _state_tensors(self, state: State | None = None) -> dict[str, torch.Tensor]:
        """:meth:`state_dict` without the bad-label check (the state must be settled), of
        ``state`` (default: this accumulator's)."""
        if state is None:
            self._compact(force=True)
            state = self._state
        labels = -1 if self._has_labels is None else int(self._has_labels)
        sd = {
            "version": torch.tensor(STATE_VERSION, dtype=torch.int64),
            "top_k": torch.tensor(self.top_k, dtype=torch.int64),
            "ignore_index": torch.tensor(self.ignore_index, dtype=torch.int64),
            "has_labels": torch.tensor(labels, dtype=torch.int64),
            # bit i: FLOAT_FIELDS[i] absent (−1: no batch yet); optional when loading
            "absent_fields": _absent_bits(self._absent),
            "kl_lower_bound": torch.tensor(int(self._kl_lower_bound), dtype=torch.int64),
            "percentile_method": torch.tensor(int(_is_sketch(state)), dtype=torch.int64),
        }
        for spec in STATE:
            value = state[spec.name]
            if spec.reduction == "cat":
                value = torch.cat(value) if value else torch.zeros(0, dtype=spec.dtype)
            sd[spec.name] = value.clone()
        for name in SKETCHES:
            if state[f"{name}_sketch"] is not None:
                for key, t in state[f"{name}_sketch"].state_dict().items():
                    sd[f"{name}_sketch.{key}"] = t
        return sd

    def load_state_dict(self, sd: Mapping[str, torch.Tensor | int | float]) -> None:
        """Replace the state with ``sd`` (from :meth:`state_dict`; settings may also be plain
        ints). Raises ``ValueError`` on missing keys, bad shapes or dtypes, or a top_k /
        ignore_index different from this accumulator's."""
        self._check_not_synced("load_state_dict")
        if "version" in sd and _as_int(sd["version"], "version") == 1:
            # version 1 had no per-sequence sums: stderr_seq is NaN for such a run
            empty = torch.zeros(0, dtype=torch.int64)
            sd = {**sd, "version": 2, "seq_id": empty, "seq_n": empty,
                  "seq_sums": torch.zeros(0, dtype=torch.float64)}  # fmt: skip
        if "version" in sd and _as_int(sd["version"], "version") == 2:
            sd = {**sd, "version": STATE_VERSION, "percentile_method": 0}  # exact values only
        missing = [k for k in (*_SETTINGS, *(s.name for s in STATE)) if k not in sd]
        if missing:
            raise ValueError(f"state dict lacks {missing}")
        settings = {k: _as_int(sd[k], k) for k in _SETTINGS}
        if settings["version"] != STATE_VERSION:
            raise ValueError(f"state dict version {settings['version']}, expected {STATE_VERSION}")
        self._check_settings(settings["top_k"], settings["ignore_index"], "the state dict")
        if settings["has_labels"] not in (-1, 0, 1):
            raise ValueError(f"has_labels must be -1, 0 or 1, got {settings['has_labels']}")
        state: State = {}
        for spec in STATE:
            value = sd[spec.name]
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value, dtype=spec.dtype)
            shape_ok = value.dim() == 1 if spec.reduction == "cat" else value.shape == spec.shape
            if not shape_ok or value.dtype != spec.dtype:
                raise ValueError(
                    f"state entry {spec.name!r}: got {value.dtype} {tuple(value.shape)}, "
                    f"expected {spec.dtype} {spec.shape}"
                )
            value = value.detach().to("cpu").clone()
            state[spec.name] = [value] if spec.reduction == "cat" else value
        state.update(_sketches_from(sd))
        n = int(state["n"])
        if _is_sketch(state):
            held = {name: len(state[f"{name}_values"][0]) for name in SKETCHES}
            counted = {name: state[f"{name}_sketch"].count for name in SKETCHES}
            expected = {"kl": n, "delta_p": n if settings["has_labels"] == 1 else 0}
            if any(held.values()) or counted != expected:
                raise ValueError(
                    f"state dict sketches hold {counted} values and {held} per-token values "
                    f"for n={n}, has_labels={settings['has_labels']} (expected {expected} and "
                    "no per-token values)"
                )
        if not _is_sketch(state) and len(state["kl_values"][0]) != n:
            raise ValueError(f"state dict holds {len(state['kl_values'][0])} kl values for n={n}")
        n_dp = len(state["delta_p_values"][0])
        if not _is_sketch(state) and n_dp != (n if settings["has_labels"] == 1 else 0):
            raise ValueError(
                f"state dict holds {n_dp} delta_p values for n={n}, "
                f"has_labels={settings['has_labels']}"
            )
        n_seq = len(state["seq_n"][0])
        if len(state["seq_id"][0]) != n_seq:
            raise ValueError(
                f"state dict holds {len(state['seq_id'][0])} ids for {n_seq} sequences"
            )
        if len(state["seq_sums"][0]) != n_seq * len(BLOCK_COLS):
            raise ValueError(
                f"state dict holds {len(state['seq_sums'][0])} per-sequence sums for {n_seq} "
                f"sequences × {len(BLOCK_COLS)} columns"
            )
        self._state = state
        self._has_labels = None if settings["has_labels"] < 0 else bool(settings["has_labels"])
        bits = _as_int(sd.get("absent_fields", -1), "absent_fields")
        self._absent = None if bits < 0 else tuple(
            name for i, name in enumerate(FLOAT_FIELDS) if bits >> i & 1
        )  # fmt: skip
        self._kl_lower_bound = bool(_as_int(sd.get("kl_lower_bound", 0), "kl_lower_bound"))
        self._pending = None
        self._bad = None
        self._switch_if_due()

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor | int | float],
        backend: Backend = "auto",
        *,
        percentiles: PercentileMode = "auto",
        exact_limit: int = EXACT_LIMIT,
    ) -> LogitStats:
        """A new accumulator with the settings and state saved in ``sd`` (a sketch state
        stays a sketch whatever ``percentiles``)."""
        for key in ("top_k", "ignore_index"):
            if key not in sd:
                raise ValueError(f"state dict lacks {key!r}")
        stats = cls(
            _as_int(sd["top_k"], "top_k"),
            _as_int(sd["ignore_index"], "ignore_index"),
            backend,
            percentiles=percentiles,
            exact_limit=exact_limit,
        )
        stats.load_state_dict(sd)
        return stats

    # --- distributed -------------------------------------------------------------------------

    def sync(self, process_group: Any = None) -> None:
        """Replace this rank's state with the union over all ranks of ``process_group``.

        A no-op unless ``torch.distributed`` is available and initialised with more than one
        rank. Collective: every rank must call it. All ranks gather every rank's state and
        fold them in rank order with the same merge as :meth:`merge`, so all end with the same
        state. The local state is kept; :meth:`unsync` restores it, and ``update`` / ``merge``
        / ``load_state_dict`` raise while synced (they would count other ranks' data twice at
        the next sync). With the NCCL backend the tensors travel through the current CUDA
        device. The per-token values are all-gathered: each rank briefly holds
        world_size × (longest rank's count) × 4 bytes for kl (and again for delta_p). If any
        rank holds a sketch (or, in auto mode, the ranks together hold more than
        ``exact_limit`` tokens' values) every rank sends sketches instead: world_size × their
        fixed size, and the synced state is a sketch.
        """
        if not _dist_ready():
            return
        import torch.distributed as dist

        world = dist.get_world_size(process_group)
        if world <= 1:
            return
        if self._local is not None:
            raise RuntimeError("sync() called twice; call unsync() first")
        device = torch.device("cpu")
        if dist.get_backend(process_group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())

        self._settle()
        # all ranks agree on exact values or sketches first (the gathered keys must match)
        mode = torch.tensor([int(_is_sketch(self._state)), self._kept_tokens()])
        modes = [p.cpu() for p in _all_gather(mode.to(device), world, process_group)]
        to_sketch = any(int(m[0]) for m in modes) or (
            self.percentiles == "auto" and sum(int(m[1]) for m in modes) > self.exact_limit
        )
        sd = self._state_tensors(_as_sketch(self._state) if to_sketch else None)
        # out-of-range labels travel beside the state (every rank's compute() then raises)
        sd["bad_labels"] = _BadLabels.as_tensor(self._bad)
        gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
        for key, value in sd.items():
            parts = _all_gather(value.to(device), world, process_group)
            for rank, part in enumerate(parts):
                gathered[rank][key] = part.cpu()
        local = (self._state, self._has_labels, self._bad)
        state = _empty_state()
        labels: bool | None = None
        bad: _BadLabels | None = None
        for rank, rank_sd in enumerate(gathered):
            top_k, ignore = (
                _as_int(rank_sd["top_k"], "top_k"),
                _as_int(rank_sd["ignore_index"], "ignore_index"),
            )
            if (top_k, ignore) != (self.top_k, self.ignore_index):
                raise ValueError(
                    f"rank {rank} has top_k={top_k}, ignore_index={ignore}; this rank has "
                    f"top_k={self.top_k}, ignore_index={self.ignore_index}"
                )
            rank_labels = _as_int(rank_sd["has_labels"], "has_labels")
            if rank_labels >= 0:
                if labels is not None and labels != bool(rank_labels):
                    raise ValueError(f"labels on/off differs between ranks (rank {rank})")
                labels = bool(rank_labels)
            rank_state = {
                s.name: [rank_sd[s.name]] if s.reduction == "cat" else rank_sd[s.name]
                for s in STATE
            }
            rank_state.update(_sketches_from(rank_sd))
            state = _combine(state, rank_state)
            bad = _BadLabels.join(bad, _BadLabels.from_tensor(rank_sd["bad_labels"]))
        self._state = state
        self._has_labels = labels
        self._bad = bad
        self._compact(force=True)
        self._local = local

    def unsync(self) -> None:
        """Restore the local (pre-:meth:`sync`) state; a no-op when not synced."""
        if self._local is not None:
            self._state, self._has_labels, self._bad = self._local
            self._local = None

    # --- results -----------------------------------------------------------------------------

    def compute(self) -> LogitStatsResult:
        """Statistics of the scored rows so far. With n scored rows, per metric x:

        - mean ± se: se = s/√n with s² = M2/(n − 1) (ddof = 1; NaN when n = 1);
        - top-1 / top-k agreement p = matches/n, se = √(p(1 − p)/(n − 1)) (the ddof = 1 stderr
          of the 0/1 indicator);
        - kl and delta_p: max, min and :data:`PERCENTILES` (numpy.percentile, linear);

        with labels, d = nll_quant − nll_ref per token and C the NLL co-moment:

        - PPL(ref) = exp(mean nll_ref), se = PPL·se(nll_ref); likewise PPL(quant);
        - ln(PPL_quant/PPL_ref) = mean(d), se = se(d) (this carries the NLLs' correlation);
        - PPL ratio = exp(mean d), se = ratio·se(d);
        - PPL diff = PPL_q − PPL_r, se² = PPL_q²·se_q² + PPL_r²·se_r² − 2·PPL_q·PPL_r·cov,
          cov = C/(n(n − 1)) the covariance of the two mean NLLs (delta method);
        - nll_correlation = C/√(M2_ref·M2_quant) (Pearson);
        - RMS Δp = √mean(Δp²), se = se(Δp²)/(2·RMS) (delta method).

        Raises ``ValueError`` when no row has been scored, or when out-of-range labels were
        given to :meth:`update` (naming their count and the first one).
        """
        self._settle()
        self._raise_bad_labels()
        st = self._state
        n = int(st["n"])
        seen, ignored, nonfinite = (int(st[k]) for k in ("seen", "ignored", "nonfinite"))
        if n == 0:
            raise ValueError(
                f"no valid tokens to compute statistics from: {seen} seen, {ignored} ignored "
                f"(label == ignore_index={self.ignore_index}), {nonfinite} non-finite"
            )
        self._compact(force=True)
        mean = st["mean"].tolist()
        m2 = st["m2"].tolist()
        var = [v / (n - 1) if n > 1 else math.nan for v in m2]
        se = [math.sqrt(v / n) if n > 1 else math.nan for v in var]
        seq_cov, sequences = _sequence_covariance(st, n, mean)
        ses = [math.sqrt(max(float(seq_cov[i, i]), 0.0)) for i in range(len(BLOCK_COLS))]
        used = METRICS if self._has_labels else METRICS[:N_BASE]
        means = {
            name: Estimate(mean[i], se[i], ses[i])
            for i, name in enumerate(used)
            if name in REPORTED and name not in (self._absent or ())
        }

        def agreement(matches: int, col: str) -> Estimate:
            p = matches / n
            return Estimate(
                p,
                math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else math.nan,
                ses[BLOCK_COLS.index(col)],
            )

        kwargs: dict[str, Any] = {}
        if self._has_labels:
            i_r, i_q = _I_NLL_REF, _I_NLL_QUANT
            i_d, i_sq = METRICS.index("nll_diff"), METRICS.index("delta_p_sq")
            ppl_r, ppl_q = _exp(mean[i_r]), _exp(mean[i_q])
            se_r, se_q = se[i_r], se[i_q]
            ratio = _exp(mean[i_d])
            cov = float(st["comoment"]) / (n * (n - 1)) if n > 1 else math.nan
            diff_var = (ppl_q * se_q) ** 2 + (ppl_r * se_r) ** 2 - 2.0 * ppl_q * ppl_r * cov
            rms = math.sqrt(mean[i_sq])
            denom = math.sqrt(m2[i_r] * m2[i_q])
            seq_diff_var = (
                (ppl_q * ses[i_q]) ** 2
                + (ppl_r * ses[i_r]) ** 2
                - 2.0 * ppl_q * ppl_r * float(seq_cov[i_r, i_q])
            )
            kwargs.update(
                delta_p_distribution=_distribution(st["delta_p_sketch"] or st["delta_p_values"][0]),
                rms_delta_p=Estimate(
                    rms,
                    se[i_sq] / (2.0 * rms) if rms > 0 else math.nan,
                    ses[i_sq] / (2.0 * rms) if rms > 0 else math.nan,
                ),
                ppl_ref=Estimate(ppl_r, ppl_r * se_r, ppl_r * ses[i_r]),
                ppl_quant=Estimate(ppl_q, ppl_q * se_q, ppl_q * ses[i_q]),
                ln_ppl_ratio=Estimate(mean[i_d], se[i_d], ses[i_d]),
                ppl_ratio=Estimate(ratio, ratio * se[i_d], ratio * ses[i_d]),
                ppl_diff=Estimate(
                    ppl_q - ppl_r,
                    math.sqrt(max(diff_var, 0.0)),
                    math.sqrt(max(seq_diff_var, 0.0)) if seq_diff_var == seq_diff_var else math.nan,
                ),
                nll_correlation=float(st["comoment"]) / denom if denom > 0 else math.nan,
            )
        return LogitStatsResult(
            top_k=self.top_k,
            tokens_seen=seen,
            tokens_scored=n,
            tokens_ignored=ignored,
            tokens_nonfinite=nonfinite,
            means=means,
            top1_agreement=agreement(int(st["top1_matches"]), "top1_match"),
            topk_agreement=agreement(int(st["topk_matches"]), "topk_match"),
            sequences=sequences,
            absent=self._absent or (),
            kl_lower_bound=self._kl_lower_bound,
            kl_distribution=_distribution(st["kl_sketch"] or st["kl_values"][0]),
            percentile_method="sketch" if _is_sketch(st) else "exact",
            **kwargs,
        )

    def kl_quantiles(self, levels: Sequence[float] | np.ndarray) -> list[float]:
        """Per-token KL of the scored tokens at quantile ``levels`` in [0, 1] (e.g. for a CDF
        plot): ``numpy.quantile`` (linear) of the kept values, or the sketch's estimate of it
        (see :attr:`percentile_method`). Raises ``ValueError`` when no token was scored."""
        self._settle()
        self._compact(force=True)
        st = self._state
        if _is_sketch(st):
            if st["kl_sketch"].count == 0:
                raise ValueError("no scored tokens: no KL quantiles")
            return st["kl_sketch"].quantiles(levels).tolist()
        values = st["kl_values"][0] if st["kl_values"] else torch.zeros(0)
        if values.numel() == 0:
            raise ValueError("no scored tokens: no KL quantiles")
        return np.quantile(values.double().numpy(), np.asarray(levels, dtype=np.float64)).tolist()

    def __repr__(self) -> str:
        self._settle()
        st = self._state
        return (
            f"LogitStats(top_k={self.top_k}, ignore_index={self.ignore_index}, "
            f"backend={self.backend!r}, percentiles={self.percentiles!r} "
            f"({self.percentile_method}), has_labels={self._has_labels}, seen={int(st['seen'])}, "
            f"scored={int(st['n'])}, ignored={int(st['ignored'])}, "
            f"nonfinite={int(st['nonfinite'])})"
        )

    # --- helpers -----------------------------------------------------------------------------

    def _settle(self) -> None:
        """Fold the device-side pending batches into the CPU state (waits for the device)."""
        if self._pending is None:
            return
        self._state, bad = self._pending.settle(self._state)  # on error the batches stay pending
        self._pending = None
        self._bad = _BadLabels.join(self._bad, bad)
        self._compact()
        self._switch_if_due()

    def _kept_tokens(self) -> int:
        """Per-token values held: the settled scored tokens' plus, for pending batches that
        keep values, all their rows (known from shapes: no host synchronisation)."""
        held = sum(chunk.numel() for chunk in self._state["kl_values"])
        if self._pending is not None and self._pending.keep_values:
            held += self._pending.seen
        return held

    def _switch_if_due(self) -> None:
        """Go over to the sketch when due (sketch mode, a sketch already in the state, or
        auto mode past ``exact_limit``): fold the settled values into it and let the pending
        batches drop theirs. No host synchronisation."""
        due = (
            self.percentiles == "sketch"
            or _is_sketch(self._state)
            or (self.percentiles == "auto" and self._kept_tokens() > self.exact_limit)
        )
        if not due:
            return
        self._state = _as_sketch(self._state)
        if self._pending is not None and self._pending.keep_values:
            self._pending.drop_values()

    def _raise_bad_labels(self) -> None:
        if self._bad is not None:
            err = bad_labels_error(self._bad.count, self._bad.first, self._bad.vocab,
                                   self.ignore_index)  # fmt: skip
            raise ValueError(
                f"{err} in the batches given to update(): their tokens got NaN NLL and "
                "probability; fix the labels and call reset() to start over"
            )

    def _check_not_synced(self, what: str) -> None:
        if self._local is not None:
            raise RuntimeError(f"{what}() on a synced LogitStats; call unsync() first")

    def _check_labels(self, has_labels: bool, where: str) -> None:
        if self._has_labels is not None and has_labels != self._has_labels:
            now = "with" if has_labels else "without"
            before = "with" if self._has_labels else "without"
            raise ValueError(
                f"labels on/off mismatch: {where} is {now} labels, but this accumulator has "
                f"data {before} labels (call reset() to start over)"
            )

    def _check_absent(self, absent: tuple[str, ...], lower_bound: bool, where: str) -> None:
        """Raise when ``where`` lacks other metrics (or bounds KL otherwise) than earlier data."""
        before = (self._absent, self._kl_lower_bound)
        if self._absent is not None and (absent, lower_bound) != before:
            raise ValueError(
                f"metrics mismatch: {where} lacks {list(absent) or 'nothing'} (KL lower bound: "
                f"{lower_bound}), earlier data lacks {list(self._absent) or 'nothing'} (KL lower "
                f"bound: {self._kl_lower_bound}); call reset() to start over"
            )

    def _check_settings(self, top_k: int, ignore_index: int, where: str) -> None:
        if top_k != self.top_k:
            raise ValueError(f"top_k mismatch: {where} has top_k={top_k}, this has {self.top_k}")
        if ignore_index != self.ignore_index:
            raise ValueError(
                f"ignore_index mismatch: {where} has {ignore_index}, this has {self.ignore_index}"
            )

    def _compact(self, force: bool = False) -> None:
        """Concatenate the value chunks (always when ``force``, else past ``_MAX_CHUNKS``);
        when ``force``, also sum the rows of each named sequence into one."""
        for spec in STATE:
            if spec.reduction != "cat":
                continue
            chunks = self._state[spec.name]
            if len(chunks) > _MAX_CHUNKS or (force and len(chunks) != 1):
                joined = torch.cat(chunks) if chunks else torch.zeros(0, dtype=spec.dtype)
                self._state[spec.name] = [joined]
        if force:
            self._state = _fold_sequences(self._state)


def _fold_sequences(state: State) -> State:
    """``state`` with the rows of each named sequence (equal id ≥ 0, e.g. a window fed chunk
    by chunk) summed into one: unnamed rows first, in order, then the named ids ascending. So
    the per-sequence state grows with the sequences, not with the updates. Needs the sequence
    entries joined (one chunk each)."""
    if not state["seq_id"] or state["seq_id"][0].numel() == 0:
        return state
    ids = state["seq_id"][0]
    named = ids >= 0
    uniq, inverse = torch.unique(ids[named], return_inverse=True)
    if uniq.numel() == int(named.sum()):
        return state  # every named sequence has one row already
    cols = len(BLOCK_COLS)
    counts, sums = state["seq_n"][0], state["seq_sums"][0].reshape(-1, cols)
    folded_n = torch.zeros(len(uniq), dtype=torch.int64).index_add_(0, inverse, counts[named])
    folded_sums = torch.zeros(len(uniq), cols, dtype=torch.float64)
    folded_sums.index_add_(0, inverse, sums[named])
    out = dict(state)
    out["seq_id"] = [torch.cat([ids[~named], uniq])]
    out["seq_n"] = [torch.cat([counts[~named], folded_n])]
    out["seq_sums"] = [torch.cat([sums[~named], folded_sums]).reshape(-1)]
    return out


def _sequence_ids(
    sequence_ids: torch.Tensor | None, sequences: int, shape: torch.Size
) -> torch.Tensor | None:
    """``sequence_ids`` as a 1-D int64 tensor (on its own device), checked: the size always,
    the sign at once on CPU (elsewhere later, on the device, without a sync)."""
    if sequence_ids is None:
        return None
    ids = torch.as_tensor(sequence_ids).reshape(-1)
    if ids.numel() != sequences:
        raise ValueError(
            f"sequence_ids has {ids.numel()} entries for {sequences} sequences "
            f"(metrics of shape {tuple(shape)})"
        )
    ids = ids.to(torch.int64)
    if ids.device.type == "cpu" and bool((ids < 0).any()):
        raise ValueError("sequence_ids must be ≥ 0")
    return ids


@dataclass(frozen=True)
class _BadLabels:
    """Out-of-range labels: how many, the first one seen, and the vocabulary size V."""

    count: int
    first: int
    vocab: int

    @staticmethod
    def join(a: _BadLabels | None, b: _BadLabels | None) -> _BadLabels | None:
        """Both together, ``a``'s first."""
        if a is None or b is None:
            return a if b is None else b
        return _BadLabels(a.count + b.count, a.first, a.vocab)

    @staticmethod
    def as_tensor(bad: _BadLabels | None) -> torch.Tensor:
        values = (0, 0, 0) if bad is None else (bad.count, bad.first, bad.vocab)
        return torch.tensor(values, dtype=torch.int64)

    @staticmethod
    def from_tensor(t: torch.Tensor) -> _BadLabels | None:
        count, first, vocab = (int(v) for v in t.tolist())
        return _BadLabels(count, first, vocab) if count > 0 else None


class _Pending:
    """Batches folded in on their device since the last settle, with no host synchronisation
    (module docstring, "Device"). Per update it enqueues a few small reductions; nothing is
    read back until :meth:`settle`."""

    def __init__(self, device: torch.device, keep_values: bool = True, sketch: bool = False):
        self.device = device
        self.keep_values = keep_values  # keep per-token kl / delta_p (exact percentiles)
        # device-side sketches of the same values (sketch mode, or auto mode before its switch)
        self.sketches: dict[str, QuantileSketch] | None = (
            {name: _new_sketch(name, device) for name in SKETCHES} if sketch else None
        )
        self.seen = 0  # rows, known from shapes
        # ignored, non-finite, top-1 matches, top-k matches (scored rows)
        self.counts = torch.zeros(4, dtype=torch.int64, device=device)
        self.bad_count = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_first = torch.zeros((), dtype=torch.int64, device=device)
        self.vocab = 0
        # per batch: [n, mean (len(METRICS)), m2 (len(METRICS)), comoment], float64
        self.moments: list[torch.Tensor] = []
        self.kl: list[torch.Tensor] = []  # float32, NaN where not scored
        self.delta_p: list[torch.Tensor] = []
        self.seq_n: list[torch.Tensor] = []  # [sequences] scored rows, int64
        self.seq_sums: list[torch.Tensor] = []  # [sequences, BLOCK_COLS] float64
        self.seq_id: list[torch.Tensor | int] = []  # ids, or the sequence count when unnamed

    def add(self, tm: TokenMetrics, sequences: int, ids: torch.Tensor | None) -> None:
        """Enqueue one batch's reductions (two-pass moments over the scored rows, by masks)."""
        tm = tm.flatten()
        # an absent metric (None: cosine/mse of a top-K reference) is a column of zeros,
        # never reported (LogitStats._absent)
        cols = [
            (torch.zeros_like(tm.kl) if getattr(tm, name) is None else getattr(tm, name)).double()
            for name in FLOAT_FIELDS
        ]
        delta_p = None
        if tm.has_labels:
            assert tm.nll_ref is not None and tm.nll_quant is not None
            assert tm.prob_ref is not None and tm.prob_quant is not None
            nll_r, nll_q = tm.nll_ref.double(), tm.nll_quant.double()
            delta_p = tm.prob_quant.double() - tm.prob_ref.double()
            cols += [nll_r, nll_q, nll_q - nll_r, delta_p, delta_p.square()]
        x = torch.stack(cols, dim=1)  # [N, M used]
        rows, used = x.shape
        scored = tm.scored.bool()
        valid = scored & tm.finite.bool() & torch.isfinite(x).all(dim=1)
        top1 = tm.top1_match.bool() & valid
        topk = tm.topk_match.bool() & valid
        self.seen += rows
        self.counts += torch.stack(
            [(~scored).sum(), (scored & ~valid).sum(), top1.sum(), topk.sum()]
        )
        n = valid.sum().double()
        xv = torch.where(valid[:, None], x, 0.0)
        mean = xv.sum(dim=0) / n.clamp_min(1.0)
        dev = torch.where(valid[:, None], x - mean, 0.0)
        row = x.new_zeros(2 + 2 * len(METRICS))
        row[0] = n
        row[1 : 1 + used] = mean
        row[1 + len(METRICS) : 1 + len(METRICS) + used] = dev.square().sum(dim=0)
        if tm.has_labels:
            row[-1] = (dev[:, _I_NLL_REF] * dev[:, _I_NLL_QUANT]).sum()
        self.moments.append(row[None])
        nan = torch.tensor(math.nan, dtype=torch.float32, device=x.device)
        if self.keep_values:
            self.kl.append(torch.where(valid, tm.kl.float(), nan))
            if delta_p is not None:
                self.delta_p.append(torch.where(valid, delta_p.float(), nan))
        if self.sketches is not None:  # of the float32 values, as the exact percentiles
            self.sketches["kl"].update(tm.kl.float(), valid)
            if delta_p is not None:
                self.sketches["delta_p"].update(delta_p.float(), valid)
        # per-sequence counts and sums (empty sequences are dropped at settle)
        seq = torch.arange(rows, device=x.device) // max(1, rows // sequences)
        block = x.new_zeros(rows, len(BLOCK_COLS))
        block[:, :used] = xv
        block[:, len(METRICS)] = top1.double()
        block[:, len(METRICS) + 1] = topk.double()
        sums = x.new_zeros(sequences, len(BLOCK_COLS)).index_add_(0, seq, block)
        counts = torch.zeros(sequences, dtype=torch.int64, device=x.device)
        self.seq_n.append(counts.index_add_(0, seq, valid.long()))
        self.seq_sums.append(sums)
        self.seq_id.append(sequences if ids is None else ids)
        if len(self.moments) > _MAX_CHUNKS:
            self._compact()

    def drop_values(self) -> None:
        """Stop keeping per-token values; the sketches (present) hold every pending batch."""
        assert self.sketches is not None, "drop_values() needs the pending sketches"
        self.keep_values = False
        self.kl, self.delta_p = [], []

    def count_bad_labels(self, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
        """Add the labels outside [0, V) and ≠ ignore_index to the device-side count, and keep
        the first one seen (first in row order of the earliest batch that had any)."""
        flat = labels.reshape(-1).to(device=self.device, dtype=torch.int64)
        bad = out_of_range_labels(flat, vocab, ignore_index)
        count = bad.sum()
        first = flat.gather(0, bad.to(torch.int32).argmax().reshape(1)).squeeze(0)
        self.bad_first = torch.where((self.bad_count == 0) & (count > 0), first, self.bad_first)
        self.bad_count = self.bad_count + count
        self.vocab = vocab

    def _compact(self) -> None:
        """Join the chunk lists; on CUDA start their non-blocking copy to (pinned) CPU memory,
        which bounds device memory (settle waits for the device before reading them)."""
        offload = self.device.type == "cuda"
        for name in ("moments", "kl", "delta_p", "seq_n", "seq_sums"):
            chunks = getattr(self, name)
            on_host = [c for c in chunks if c.device.type == "cpu"]
            on_device = [c for c in chunks if c.device.type != "cpu"]
            if len(on_device) > 1 or (offload and on_device):
                joined = torch.cat(on_device)
                if offload:
                    joined = joined.to("cpu", non_blocking=True)
                setattr(self, name, [*on_host, joined])
            if len(on_host) > 1 and not on_device:
                setattr(self, name, [torch.cat(on_host)])

    def settle(self, state: State) -> tuple[State, _BadLabels | None]:
        """``state`` with every pending batch folded in, in order, and the bad labels seen."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # non-blocking copies land before they are read

        def joined(chunks: list[torch.Tensor], dtype: torch.dtype, width: int = 0) -> torch.Tensor:
            if not chunks:
                return torch.zeros((0, width) if width else (0,), dtype=dtype)
            return torch.cat([c.cpu() for c in chunks])

        out = dict(state)
        counts = self.counts.cpu()
        out["seen"] = state["seen"] + self.seen
        for i, key in enumerate(("ignored", "nonfinite", "top1_matches", "topk_matches")):
            out[key] = state[key] + counts[i]
        m = len(METRICS)
        n, mean, m2, comoment = state["n"], state["mean"], state["m2"], state["comoment"]
        for row in joined(self.moments, torch.float64, 2 + 2 * m):
            nb = int(row[0])
            merged = chan_merge(n, mean, m2, nb, row[1 : 1 + m], row[1 + m : 1 + 2 * m])
            comoment = merged.comoment(comoment, row[-1], _I_NLL_REF, _I_NLL_QUANT)
            n, mean, m2 = torch.tensor(merged.n, dtype=torch.int64), merged.mean, merged.m2
        out["n"], out["mean"], out["m2"], out["comoment"] = n, mean, m2, comoment
        if self.keep_values and not _is_sketch(state):
            for key, chunks in (("kl_values", self.kl), ("delta_p_values", self.delta_p)):
                values = joined(chunks, torch.float32)
                out[key] = [*state[key], values[~values.isnan()]]
        else:  # into the state's sketches: the pending ones, or the kept values folded in
            out = _as_sketch(out)
            for name, chunks in (("kl", self.kl), ("delta_p", self.delta_p)):
                sketch = out[f"{name}_sketch"] = out[f"{name}_sketch"].clone()
                if self.sketches is not None:
                    sketch.merge(self.sketches[name])
                else:
                    sketch.update(joined(chunks, torch.float32))  # NaNs are skipped
        seq_n = joined(self.seq_n, torch.int64)
        ids = torch.cat([
            torch.full((i,), -1, dtype=torch.int64) if isinstance(i, int) else i.cpu()
            for i in self.seq_id
        ]) if self.seq_id else torch.zeros(0, dtype=torch.int64)  # fmt: skip
        if bool((ids[~_unnamed_mask(self.seq_id)] < 0).any()):
            raise ValueError("sequence_ids must be ≥ 0 (a tensor on the device, checked now)")
        keep = seq_n > 0
        out["seq_id"] = [*state["seq_id"], ids[keep]]
        out["seq_n"] = [*state["seq_n"], seq_n[keep]]
        sums = joined(self.seq_sums, torch.float64, len(BLOCK_COLS))
        out["seq_sums"] = [*state["seq_sums"], sums[keep].reshape(-1)]
        bad = None
        count = int(self.bad_count)
        if count:
            bad = _BadLabels(count, int(self.bad_first), self.vocab)
        return out, bad


def _unnamed_mask(seq_id: list[torch.Tensor | int]) -> torch.Tensor:
    """True for the sequences of updates without ``sequence_ids``."""
    parts = [
        torch.full((i,), True) if isinstance(i, int) else torch.zeros(i.numel(), dtype=torch.bool)
        for i in seq_id
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _sequence_covariance(st: State, n: int, mean: list[float]) -> tuple[np.ndarray, int]:
    """Cluster-robust covariance of the means of every :data:`BLOCK_COLS` column, clustered
    by sequence: G/(G − 1) · Σ_b r_b r_bᵀ / n² with r_b = S_b − n_b·mean. NaN with fewer than
    2 sequences, or when the sequences do not cover the n scored rows (a version-1 state)."""
    cols = len(BLOCK_COLS)
    counts = st["seq_n"][0].numpy() if st["seq_n"] else np.zeros(0, dtype=np.int64)
    sums = st["seq_sums"][0].numpy().reshape(-1, cols) if st["seq_sums"] else np.zeros((0, cols))
    ids = st["seq_id"][0].numpy() if st["seq_id"] else np.zeros(0, dtype=np.int64)
    named = ids >= 0  # rows with one id are one sequence; unnamed ones stand alone
    if named.any():
        uniq, inverse = np.unique(ids[named], return_inverse=True)
        named_counts = np.zeros(len(uniq), dtype=np.int64)
        named_sums = np.zeros((len(uniq), cols))
        np.add.at(named_counts, inverse, counts[named])
        np.add.at(named_sums, inverse, sums[named])
        counts = np.concatenate([counts[~named], named_counts])
        sums = np.concatenate([sums[~named], named_sums])
    g = len(counts)
    if g < 2 or int(counts.sum()) != n:
        return np.full((cols, cols), math.nan), g
    full_mean = np.concatenate(
        [np.asarray(mean, dtype=np.float64),
         [float(st["top1_matches"]) / n, float(st["topk_matches"]) / n]]
    )  # fmt: skip
    resid = sums - counts[:, None] * full_mean[None, :]
    return g / (g - 1) * (resid.T @ resid) / float(n) ** 2, g


def _sketches_from(sd: Mapping[str, Any]) -> dict[str, QuantileSketch | None]:
    """The ``kl_sketch`` / ``delta_p_sketch`` state entries of a state dict: the saved
    sketches when ``percentile_method`` is 1, else None. Raises ``ValueError`` on a bad value."""
    method = _as_int(sd.get("percentile_method", 0), "percentile_method")
    if method not in (0, 1):
        raise ValueError(f"percentile_method must be 0 (exact) or 1 (sketch), got {method}")
    out: dict[str, QuantileSketch | None] = {}
    for name in SKETCHES:
        prefix = f"{name}_sketch."
        if method == 0:
            out[f"{name}_sketch"] = None
            continue
        sketch = QuantileSketch.from_state_dict(
            {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        )
        if sketch.layout()[:2] != _SKETCH_RANGE[name]:
            raise ValueError(f"state dict {name} sketch covers {sketch.layout()[:2]}, "
                             f"expected {_SKETCH_RANGE[name]}")  # fmt: skip
        out[f"{name}_sketch"] = sketch
    return out


def _distribution(values: torch.Tensor | QuantileSketch) -> Distribution:
    """Max, min and :data:`PERCENTILES` of float32 values (computed in float64), or their
    sketch's estimates (max and min exact)."""
    if isinstance(values, torch.Tensor):
        return Distribution.of(values, PERCENTILES)
    estimates = values.quantiles([p / 100.0 for p in PERCENTILES])
    return Distribution(
        max=values.max,
        min=values.min,
        percentiles={float(p): float(v) for p, v in zip(PERCENTILES, estimates, strict=True)},
    )


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _absent_bits(absent: tuple[str, ...] | None) -> torch.Tensor:
    """Bit i set: ``FLOAT_FIELDS[i]`` absent; −1 when not decided yet (no batch)."""
    bits = -1 if absent is None else sum(1 << FLOAT_FIELDS.index(name) for name in absent)
    return torch.tensor(bits, dtype=torch.int64)


def _as_int(value: torch.Tensor | int | float, name: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point:
            raise ValueError(f"state entry {name!r} must be one integer, got {value!r}")
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"state entry {name!r} must be an integer, got {value!r}")
    return int(value)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_gather(t: torch.Tensor, world: int, group: Any) -> list[torch.Tensor]:
    """Every rank's ``t``; 1-D tensors may differ in length across ranks (padded, trimmed)."""
    import torch.distributed as dist

    if t.dim() != 1:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return parts
    size = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return [p[:length] for p, length in zip(parts, lengths, strict=True)]
