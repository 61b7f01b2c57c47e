"""Reference profiles from a model and a corpus, and monitoring runs of a candidate (or a day's
traffic text) over a corpus: the model side of ``qmetrics monitor fit`` / ``check``.

The corpus is tokenized once (:func:`qmetrics.evaluation.corpus.tokenize_checked`), cut into
non-overlapping windows of ``context_length`` tokens (:func:`make_windows`), batched
(:func:`batch_windows`), and each window is one request to the
:class:`qmetrics.metrics.output_monitor.OutputMonitor`: its logits come chunk by chunk from
:class:`qmetrics.evaluation.logit_source.LogitSource` with the next tokens as labels, so the
NLL is monitored too. Profiles are JSON files (no pickle).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from qmetrics.evaluation.corpus import batch_windows, make_windows, tokenize_checked
from qmetrics.evaluation.logit_source import LogitSource
from qmetrics.evaluation.models import ModelEntry
from qmetrics.metrics.drift import MonitorProfile, Thresholds, WindowSummary
from qmetrics.metrics.output_monitor import OutputMonitor

#: Requests (windows) whose per-request sums a run keeps for paired checks on the same corpus.
KEEP_REQUESTS = 4096


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """``sha256:<16 hex>`` of the tokenizer's vocabulary (token → id, sorted), or None when it
    exposes none: two tokenizers with one fingerprint map text to the same ids."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    vocab = sorted(get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"sha256:{digest[:16]}"


def monitor_model(
    entry: ModelEntry,
    texts: Iterable[str],
    *,
    tokenizer: Any | None = None,
    monitor: OutputMonitor | None = None,
    context_length: int = 256,
    batch_size: int = 4,
    max_tokens: int | None = None,
    logit_chunk: int | None = 256,
) -> tuple[OutputMonitor, list[str]]:
    """Run ``entry``'s model over ``texts`` (tokenized with ``tokenizer``, default the entry's);
    returns the monitor that observed it (a new whole-run one keeping :data:`KEEP_REQUESTS`
    requests, unless given) and the key of each request (window) in order: a hash of its
    token ids, equal for the same window of the same corpus."""
    tokenizer = tokenizer if tokenizer is not None else entry.tokenizer
    if tokenizer is None:
        raise ValueError(f"{entry.name} has no tokenizer to tokenize the corpus with")
    monitor = monitor if monitor is not None else OutputMonitor(keep_requests=KEEP_REQUESTS)
    ids = tokenize_checked(texts, tokenizer, max_tokens=max_tokens)
    keys = []
    windows = make_windows(len(ids), context_length)
    source = LogitSource(entry.model, logit_chunk)
    for batch in batch_windows(windows, batch_size, max_tokens):
        input_ids = torch.stack([w.input_ids(ids) for w in batch])
        keys += [_request_key(row) for row in input_ids]
        labels = torch.stack([w.labels(ids, monitor.ignore_index) for w in batch])
        hidden = source.hidden(input_ids)
        labels = labels.to(hidden.device)
        for positions, logits in source.chunks(hidden):
            monitor.observe(logits, labels[:, positions], continues=True)
        monitor.end_requests()
    return monitor, keys


def _request_key(input_ids: torch.Tensor) -> str:
    return hashlib.sha1(input_ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def run_summary(monitor: OutputMonitor, keys: list[str]) -> WindowSummary:
    """The monitor's window with the kept requests' sums by key (for paired checks)."""
    summary = monitor.summary()
    sums = monitor.request_sums()
    summary.requests = {k: sums[i].tolist() for i, k in enumerate(keys[: len(sums)])}
    return summary


def fit_profile(
    entry: ModelEntry,
    texts: Iterable[str],
    *,
    thresholds: Thresholds | None = None,
    dataset: str | None = None,
    **run: Any,
) -> MonitorProfile:
    """The reference profile of ``entry`` on ``texts`` (``run``: :func:`monitor_model`'s
    options), stamped with its tokenizer's fingerprint, model name and dataset."""
    monitor, keys = monitor_model(entry, texts, **run)
    tokenizer = run.get("tokenizer") or entry.tokenizer
    return MonitorProfile.from_window(
        run_summary(monitor, keys),
        thresholds=thresholds,
        tokenizer=tokenizer_fingerprint(tokenizer),
        model=entry.name,
        dataset=dataset,
        context_length=run.get("context_length", 256),
    )


def check_tokenizer(profile: MonitorProfile, tokenizer: Any, name: str) -> None:
    """Raise ``ValueError`` when ``tokenizer`` is not the one the profile was fitted with."""
    theirs = tokenizer_fingerprint(tokenizer)
    if profile.tokenizer and theirs and theirs != profile.tokenizer:
        raise ValueError(
            f"tokenizer mismatch: {name}'s tokenizer ({theirs}) is not the "
            f"profile's ({profile.tokenizer})"
        )


def save_profile(profile: MonitorProfile, path: Path) -> Path:
    """Write the profile as JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=1) + "\n", encoding="utf-8")
    return path


def load_profile(path: Path) -> MonitorProfile:
    """Read a profile written by :func:`save_profile`; ``ValueError`` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"profile not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"profile {path} is not JSON: {exc}") from exc
    try:
        return MonitorProfile.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"profile {path}: {exc}") from exc
