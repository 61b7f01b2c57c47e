"""Paired, per-item comparison of two models' lm-eval runs, with significance.

Every (task, filter) of the two :class:`qmetrics.evaluation.tasks.runner.TaskRun` objects is paired
item by item on lm-eval's ``doc_id``; only items both models answered enter the paired statistics.
Per metric (lm-eval's score ± stderr comes from lm-eval itself):

- delta = score_cand − score_ref; *drop* = −delta when higher is better, else delta.
- 0/1 metrics (aggregation ``mean``, every per-item value 0 or 1): McNemar's exact test. With
  b = items right for the reference only and c = right for the candidate only, under H0 each
  discordant item is b or c with probability 1/2, so
  p = ``scipy.stats.binomtest(b, b + c, 0.5).pvalue`` = min(1, 2·Σ_{k ≤ min(b,c)} C(b+c, k)/2^(b+c))
  (p = 1 when b + c = 0).
- other metrics whose aggregation is a ratio of sums — ``mean`` (Σv/n), ``perplexity``
  exp(−Σll/n), ``weighted_perplexity`` exp(−Σll/Σw), ``bits_per_byte`` −Σll/(Σw·ln 2) —
  a paired sign-flip permutation test of the aggregated difference
  (``scipy.stats.permutation_test``, ``permutation_type="samples"``: each item's two values are
  swapped or not, weights stay with the item; exact when 2^n ≤ n_resamples).
- for all of these, a paired percentile-bootstrap interval of the delta (``scipy.stats.bootstrap``,
  ``paired=True``: items are resampled with both models' values and the weights together).
- other aggregations (F1, MCC, BLEU, ...): scores and delta only.

A drop is *significant* when p < alpha and the delta points the worse way. Won/lost/tied count
items whose per-item value (v, or ll for a weighted pair) is better/worse/equal for the
candidate; the *agreement* is the fraction of paired items where both models gave the same
answer (the chosen option of a multiple-choice item, the filtered text of a generated one, the
greedy flag of a ``loglikelihood`` item; undefined for rolling log-likelihood). Groups (e.g.
``mmlu``) get lm-eval's group scores and a test on the items of all their leaf tasks pooled.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from qmetrics.evaluation.tasks.runner import TaskRun

#: aggregation name → (transform of r = Σv/Σw, whether it increases with r)
RATIO_AGGREGATIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], bool]] = {
    "mean": (lambda r: r, True),
    "perplexity": (lambda r: np.exp(-r), False),
    "weighted_perplexity": (lambda r: np.exp(-r), False),
    "bits_per_byte": (lambda r: -r / math.log(2), False),
}
MAX_BATCH_ELEMENTS = 2_000_000  # resamples × items per vectorised scipy call


@dataclass
class PairedTest:
    """A paired test of one metric: method, p-value and the bootstrap interval of the delta."""

    method: str
    p_value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    confidence: float | None = None


@dataclass
class MetricComparison:
    """One metric of one task (or group): both scores ± lm-eval's stderr, the delta, the
    paired counts and test, and whether the candidate's drop is significant."""

    metric: str
    aggregation: str | None
    higher_is_better: bool
    reference: float | None
    reference_stderr: float | None
    candidate: float | None
    candidate_stderr: float | None
    delta: float | None
    drop: float | None
    n_paired: int
    won: int | None = None
    lost: int | None = None
    tied: int | None = None
    test: PairedTest | None = None
    significant_drop: bool = False


@dataclass
class TaskComparison:
    """One (task, filter) or group: item counts, answer agreement, per-metric comparisons and
    the per-item pairs ``{doc_id, reference: {...}, candidate: {...}}``."""

    task: str
    filter: str
    output_type: str | None
    is_group: bool
    n_reference: int
    n_candidate: int
    n_paired: int
    agreement: float | None
    metrics: list[MetricComparison] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- statistics ---------------------------------------------------------------------------------


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (see the module docstring)."""
    n = b + c
    return 1.0 if n == 0 else float(stats.binomtest(b, n, 0.5).pvalue)


def _aggregate(name: str) -> Callable[[np.ndarray, np.ndarray, int], np.ndarray]:
    transform, _ = RATIO_AGGREGATIONS[name]

    def aggregate(v: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
        w = np.broadcast_to(w, v.shape)
        return transform(np.sum(v, axis=axis) / np.sum(w, axis=axis))

    return aggregate


def paired_resampling_test(
    ref: np.ndarray,
    cand: np.ndarray,
    weights: np.ndarray,
    aggregation: str,
    *,
    binary: bool,
    confidence: float,
    n_resamples: int,
    seed: int,
) -> PairedTest:
    """McNemar (``binary``) or sign-flip permutation p-value, and the paired percentile
    bootstrap interval, of agg(cand) − agg(ref) (see the module docstring)."""
    aggregate = _aggregate(aggregation)

    def delta(r: np.ndarray, c: np.ndarray, w: np.ndarray, axis: int = -1) -> np.ndarray:
        return aggregate(c, w, axis) - aggregate(r, w, axis)

    batch = max(1, MAX_BATCH_ELEMENTS // len(ref))
    rng = np.random.default_rng(seed)
    ci_low = ci_high = None
    if len(ref) >= 2:  # a bootstrap needs two items
        ci = stats.bootstrap(
            (ref, cand, weights), delta, paired=True, vectorized=True, method="percentile",
            confidence_level=confidence, n_resamples=n_resamples, batch=batch, rng=rng,
        ).confidence_interval  # fmt: skip
        ci_low, ci_high = float(ci.low), float(ci.high)
    if binary:
        b = int(np.sum((ref == 1) & (cand == 0)))
        c = int(np.sum((ref == 0) & (cand == 1)))
        method, p = "mcnemar_exact", mcnemar_exact(b, c)
    else:
        perm = stats.permutation_test(
            (ref, cand), lambda r, c, axis: delta(r, c, weights, axis),
            permutation_type="samples", vectorized=True, n_resamples=n_resamples,
            batch=batch, rng=rng,
        )  # fmt: skip
        method, p = "paired_permutation", float(perm.pvalue)
    return PairedTest(method, p, ci_low, ci_high, confidence)


# --- reading lm-eval's output -------------------------------------------------------------------


def _score(results: Mapping[str, Any], metric: str, filt: str) -> tuple[float | None, float | None]:
    """lm-eval's ``"metric,filter"`` and ``"metric_stderr,filter"`` (``"N/A"`` → None)."""

    def num(x: Any) -> float | None:
        return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None

    return num(results.get(f"{metric},{filt}")), num(results.get(f"{metric}_stderr,{filt}"))


def _metrics_of(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (metric, filter) pairs lm-eval reports in one task's or group's results."""
    pairs = []
    for key in results:
        metric, sep, filt = key.partition(",")
        if sep and not metric.endswith("_stderr"):
            pairs.append((metric, filt))
    return pairs


def _answer(sample: Mapping[str, Any], output_type: str | None) -> Any:
    """The model's answer to one item (see the module docstring); None for rolling tasks."""
    resps = sample.get("filtered_resps")
    if output_type == "multiple_choice":
        return int(np.argmax([float(r[0]) for r in resps]))
    if output_type == "loglikelihood":
        return bool(resps[0][1]) if isinstance(resps[0], (list, tuple)) else bool(resps[1])
    if output_type == "generate_until":
        return resps[0] if isinstance(resps, (list, tuple)) and len(resps) == 1 else resps
    return None


def _value(x: Any) -> tuple[float, float] | None:
    """A per-item metric value as (v, w): a number → (v, 1), an lm-eval ``(ll, weight)`` pair →
    (ll, weight); None for anything else (e.g. F1's (gold, prediction) pairs)."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x), 1.0
    if isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(y, (int, float)) for y in x):
        return float(x[0]), float(x[1])
    return None


def _by_doc(samples: Iterable[Mapping[str, Any]], filt: str) -> dict[int, Mapping[str, Any]]:
    return {int(s["doc_id"]): s for s in samples if s.get("filter", "none") == filt}


def _leaves(run: TaskRun, name: str) -> list[str]:
    """The leaf tasks under a group (recursively), or [name] for a task."""
    children = run.group_subtasks.get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaves(run, child)]


# --- the comparison -----------------------------------------------------------------------------


def _compare_metric(
    metric: str,
    filt: str,
    task_names: list[str],
    pairs: dict[str, list[tuple[int, Mapping[str, Any], Mapping[str, Any]]]],
    results_name: str,
    *,
    ref: TaskRun,
    cand: TaskRun,
    alpha: float,
    n_resamples: int,
    seed: int,
) -> MetricComparison:
    hib = bool(ref.higher_is_better.get(task_names[0], {}).get(metric, True))
    aggs = {ref.aggregations.get(t, {}).get(metric) for t in task_names}
    aggregation = aggs.pop() if len(aggs) == 1 else None
    r_score, r_err = _score(ref.results.get(results_name, {}), metric, filt)
    c_score, c_err = _score(cand.results.get(results_name, {}), metric, filt)
    delta = None if r_score is None or c_score is None else c_score - r_score
    drop = None if delta is None else (-delta if hib else delta) + 0.0  # no -0.0
    rows = [
        (rv, cv)
        for t in task_names
        for _, rs, cs in pairs.get(t, [])
        if (rv := _value(rs.get(metric))) is not None and (cv := _value(cs.get(metric))) is not None
    ]
    out = MetricComparison(metric, aggregation, hib, r_score, r_err, c_score, c_err, delta, drop,
                           n_paired=len(rows))  # fmt: skip
    if not rows or aggregation not in RATIO_AGGREGATIONS:
        return out
    r = np.array([rv[0] for rv, _ in rows])
    c = np.array([cv[0] for _, cv in rows])
    w = np.array([rv[1] for rv, _ in rows])
    increasing = RATIO_AGGREGATIONS[aggregation][1]
    better = np.sign(c - r) * (1 if increasing == hib else -1)  # weights are shared and > 0
    out.won, out.lost = int(np.sum(better > 0)), int(np.sum(better < 0))
    out.tied = len(rows) - out.won - out.lost
    binary = aggregation == "mean" and bool(np.all(np.isin(np.concatenate([r, c]), (0.0, 1.0))))
    out.test = paired_resampling_test(r, c, w, aggregation, binary=binary,
                                      confidence=1.0 - alpha, n_resamples=n_resamples,
                                      seed=seed)  # fmt: skip
    out.significant_drop = bool(
        drop is not None and drop > 0 and out.test.p_value is not None and out.test.p_value < alpha
    )
    return out


def _pairs(
    ref: TaskRun, cand: TaskRun, task: str, filt: str
) -> tuple[int, int, list[tuple[int, Mapping[str, Any], Mapping[str, Any]]]]:
    r = _by_doc(ref.samples.get(task, []), filt)
    c = _by_doc(cand.samples.get(task, []), filt)
    return len(r), len(c), [(d, r[d], c[d]) for d in sorted(r.keys() & c.keys())]


def _item_record(doc_id: int, rs: Mapping[str, Any], cs: Mapping[str, Any], output_type: str | None
                 ) -> dict[str, Any]:  # fmt: skip
    def side(s: Mapping[str, Any]) -> dict[str, Any]:
        values = {m: s.get(m) for m in s.get("metrics", [])}
        return {**values, "answer": _answer(s, output_type)}

    return {"doc_id": doc_id, "reference": side(rs), "candidate": side(cs)}


def compare_runs(
    reference: TaskRun,
    candidate: TaskRun,
    *,
    alpha: float = 0.05,
    n_resamples: int = 9999,
    seed: int = 0,
) -> list[TaskComparison]:
    """Compare two runs of the same tasks and settings (see the module docstring): one
    :class:`TaskComparison` per (leaf task, filter) in lm-eval's order, then one per group."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    compare = functools.partial(_compare_metric, ref=reference, cand=candidate, alpha=alpha,
                                n_resamples=n_resamples, seed=seed)  # fmt: skip
    groups = set(reference.group_subtasks)
    out: list[TaskComparison] = []
    for name, results in reference.results.items():
        if name in groups:
            continue
        output_type = reference.output_types.get(name)
        for filt in dict.fromkeys(f for _, f in _metrics_of(results)):
            n_ref, n_cand, pairs = _pairs(reference, candidate, name, filt)
            answers = [(_answer(rs, output_type), _answer(cs, output_type)) for _, rs, cs in pairs]
            agreement = (
                sum(a == b for a, b in answers) / len(answers)
                if answers and output_type in ("multiple_choice", "loglikelihood", "generate_until")
                else None
            )
            cmp = TaskComparison(name, filt, output_type, False, n_ref, n_cand, len(pairs),
                                 agreement)  # fmt: skip
            cmp.metrics = [
                compare(m, filt, [name], {name: pairs}, name)
                for m, f in _metrics_of(results)
                if f == filt
            ]
            cmp.items = [_item_record(d, rs, cs, output_type) for d, rs, cs in pairs]
            out.append(cmp)
    for group in reference.group_subtasks:
        results = reference.results.get(group, {})
        leaves = _leaves(reference, group)
        for filt in dict.fromkeys(f for _, f in _metrics_of(results)):
            per_task = {t: _pairs(reference, candidate, t, filt) for t in leaves}
            pairs = {t: p for t, (_, _, p) in per_task.items()}
            leaf_rows = [c for c in out if c.task in leaves and c.filter == filt]
            agreeing = [c for c in leaf_rows if c.agreement is not None]
            n_agree = sum(c.agreement * c.n_paired for c in agreeing)
            n_with = sum(c.n_paired for c in agreeing)
            cmp = TaskComparison(
                group, filt, None, True,
                sum(n for n, _, _ in per_task.values()),
                sum(n for _, n, _ in per_task.values()),
                sum(len(p) for p in pairs.values()),
                n_agree / n_with if n_with else None,
            )  # fmt: skip
            cmp.metrics = [
                compare(m, filt, leaves, pairs, group) for m, f in _metrics_of(results) if f == filt
            ]
            out.append(cmp)
    return out
