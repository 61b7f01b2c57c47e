"""``qmetrics monitor``: reference profiles of a model's output statistics, and drift checks.

    qmetrics monitor fit --reference M --dataset D --output profile.json [--context-length N]
                         [--batch-size B] [--max-tokens T] [--z Z] [--psi P] [--ks K] ...
    qmetrics monitor check --profile profile.json --candidate M2 [--quantize SPEC] --dataset D
                           [--output DIR] [--fail-if EXPR] [--z Z] [--psi P] [--ks K] ...

``check`` runs the candidate (an RTN copy of it with ``--quantize``) over the corpus, prints one
row per statistic and each alarm, writes ``DIR/monitor.jsonl`` (snapshot + alarms),
``DIR/snapshot.json`` and ``DIR/metrics.prom`` (with ``qmetrics[monitor]``), and exits 1 on an
alarm (or a broken ``--fail-if`` rule, over the names of
:data:`qmetrics.reports.monitor.GATE_NAMES`), 2 on bad input: a profile of another vocabulary
or tokenizer, a corpus without tokens, a candidate with non-finite outputs (NaN/+inf logits, or
a label of probability 0: counted, reported and left out of every statistic first).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qmetrics.cli.common import (
    DEFAULT_DATASET,
    EXIT_GATE,
    EXIT_OK,
    UsageError,
    add_fail_if_arg,
    add_loading_args,
    open_corpus,
    quiet_transformers,
)

_THRESHOLDS = (
    ("z", "|z| of a mean shift"),
    ("min_shift", "smallest shift in reference sds"),
    ("psi", "population stability index"),
    ("ks", "Kolmogorov–Smirnov D"),
)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default=None,
        help=f"'demo', a .txt/.jsonl/.parquet file or a HF dataset (default {DEFAULT_DATASET})",
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--context-length", type=int, default=256, help="tokens per request")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--logit-chunk", type=int, default=256)
    for name, text in _THRESHOLDS:
        p.add_argument(
            f"--{name.replace('_', '-')}", type=float, default=None, help=f"alarm threshold: {text}"
        )
    add_loading_args(p)


def add_monitor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``monitor fit`` / ``monitor check`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("monitor", help="output-statistics profiles and drift alarms")
    sub = p.add_subparsers(dest="monitor_command", required=True)
    fit = sub.add_parser("fit", help="fit a reference profile on calibration text")
    fit.add_argument("--reference", required=True, help="HF model id or local path")
    fit.add_argument("--output", type=Path, required=True, metavar="PROFILE.json")
    _add_common(fit)
    check = sub.add_parser("check", help="check a model (or traffic text) against a profile")
    check.add_argument("--profile", type=Path, required=True)
    check.add_argument("--candidate", required=True, metavar="M", help="model to check")
    check.add_argument("--quantize", metavar="SPEC", help="check an RTN copy of the candidate")
    check.add_argument("--output", type=Path, default=None, metavar="DIR")
    add_fail_if_arg(check, '"psi_entropy>0.1, z_nll>4"')
    _add_common(check)
    return p


def _thresholds(args: argparse.Namespace, base: Any) -> Any:
    from dataclasses import replace

    given = {n: getattr(args, n) for n, _ in _THRESHOLDS if getattr(args, n) is not None}
    return replace(base, **given)


def _check_run_args(args: argparse.Namespace) -> None:
    if args.context_length < 2:
        raise UsageError(f"--context-length must be ≥ 2, got {args.context_length}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {args.batch_size}")


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        context_length=args.context_length,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        logit_chunk=args.logit_chunk,
    )


def run_monitor(args: argparse.Namespace) -> int:
    """``monitor fit`` or ``monitor check``; the exit code (bad input raises, see
    :mod:`qmetrics.cli`)."""
    _check_run_args(args)
    if args.monitor_command == "fit":
        return _fit(args)
    return _check(args)


def _load(args: argparse.Namespace, text: str) -> Any:
    """The model ``text`` names, in the candidate syntax every command shares
    (:class:`qmetrics.evaluation.models.CandidateSpec`: checkpoint, ``PATH.gguf``,
    ``DIR::FILE.gguf``, ``NAME=`` prefix), with transformers' bars and advisories quiet."""
    from qmetrics.evaluation.models import CandidateSpec, load_model

    quiet_transformers()
    return load_model(
        CandidateSpec.parse(text),
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )


def _fit(args: argparse.Namespace) -> int:
    from qmetrics.evaluation.monitor_profile import fit_profile, save_profile
    from qmetrics.metrics.drift import Thresholds

    dataset = args.dataset or DEFAULT_DATASET
    texts = open_corpus(dataset, args.text_field)
    entry = _load(args, args.reference)
    profile = fit_profile(
        entry,
        texts,
        thresholds=_thresholds(args, Thresholds()),
        dataset=dataset,
        **_run_options(args),
    )
    path = save_profile(profile, args.output)
    s = profile.stats
    parts = ", ".join(f"{k} {v.mean:.4f} ± {v.se:.4f}" for k, v in s.items())
    print(f"profile of {entry.name} on {dataset}: {profile.meta['tokens']} tokens; {parts}")
    print(f"wrote {path}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from qmetrics.evaluation.models import rtn_candidate
    from qmetrics.evaluation.monitor_profile import (
        check_tokenizer,
        load_profile,
        monitor_model,
        run_summary,
    )
    from qmetrics.evaluation.rtn_quantize import QuantSpec
    from qmetrics.metrics.drift import check_window, drift_values
    from qmetrics.reports.format import print_table
    from qmetrics.reports.monitor import (
        check_monitor_gate,
        monitor_records,
        parse_monitor_gate,
        prometheus_text,
        render_check_table,
        write_jsonl,
        write_snapshot,
    )

    rules = parse_monitor_gate(args.fail_if) if args.fail_if else []
    spec = QuantSpec.parse(args.quantize) if args.quantize else None
    profile = load_profile(args.profile)
    thresholds = _thresholds(args, profile.thresholds)
    dataset = args.dataset or DEFAULT_DATASET
    texts = open_corpus(dataset, args.text_field)
    entry = _load(args, args.candidate)
    check_tokenizer(profile, entry.tokenizer, entry.name)
    config_vocab = getattr(getattr(entry.model, "config", None), "vocab_size", None)
    if config_vocab is not None and config_vocab != profile.vocab_size:
        raise UsageError(
            f"vocab mismatch: the profile is for V={profile.vocab_size}, "
            f"{entry.name} has V={config_vocab}"
        )
    tokenizer = entry.tokenizer
    if spec is not None:  # an RTN copy has no tokenizer of its own: the loaded model's
        entry = rtn_candidate(entry, spec)
    monitor, keys = monitor_model(entry, texts, tokenizer=tokenizer, **_run_options(args))
    summary = run_summary(monitor, keys)
    alarms = check_window(profile, summary, thresholds)
    values = drift_values(profile, summary)
    snapshot = monitor.snapshot()
    snapshot["subject"] = entry.name
    print_table(render_check_table(summary, values, alarms))
    for alarm in alarms:
        print(f"ALARM {entry.name}: {alarm}")
    if args.output is not None:
        out = Path(args.output)
        paths = [write_jsonl(monitor_records(snapshot, alarms, values), out / "monitor.jsonl")]
        paths.append(write_snapshot(snapshot, out / "snapshot.json"))
        try:
            (out / "metrics.prom").write_text(prometheus_text(summary, snapshot, values, alarms))
            paths.append(out / "metrics.prom")
        except ImportError:
            print("metrics.prom skipped: pip install 'qmetrics[monitor]' for prometheus_client")
        print(f"reports: {', '.join(str(p) for p in paths)}")
    violations = check_monitor_gate(rules, entry.name, values) if rules else []
    for v in violations:
        print(f"FAIL {v}")
    if summary.nonfinite:
        raise UsageError(
            f"non-finite outputs: {entry.name} produced {summary.nonfinite} of "
            f"{summary.tokens} tokens with NaN/+inf logits, none finite, or a label of "
            "probability 0 (left out of every statistic)"
        )
    return EXIT_GATE if alarms or violations else EXIT_OK
