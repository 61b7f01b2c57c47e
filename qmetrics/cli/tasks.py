"""``qmetrics tasks``: downstream tasks through lm-evaluation-harness, compared item by item.

    qmetrics tasks --reference M (--candidate M2 | --quantize SPEC) --tasks LIST
                   [--num-fewshot K] [--limit N] [--output DIR] [--fail-if EXPR] ...

Runs lm-eval on both models with the same settings (:mod:`qmetrics.evaluation.tasks.runner`),
compares them per item (:mod:`qmetrics.evaluation.tasks.comparison`), prints the table, writes
``tasks.json`` and ``tasks.md`` into ``--output`` and checks the gate (:mod:`qmetrics.reports.gate`,
each (task, metric) row a subject). Exit codes as ``qmetrics compare``: 0, 1 when the gate is
broken, 2 for bad input (including a missing lm-eval: the message says how to install it, and a
gate in the old grammar, where ',' meant AND), raised as :class:`qmetrics.cli.common.UsageError`
or ``ValueError`` for ``qmetrics.cli.main`` to print on one line.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from qmetrics.cli.common import (
    UsageError,
    add_fail_if_arg,
    add_model_pair_args,
    finish_run,
    load_model_pair,
    pair_spec,
)
from qmetrics.evaluation.tasks import OFFLINE_TASKS


def _limit(text: str) -> int | float:
    """``--limit``: an item count, or a fraction of each task when below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return int(value) if value >= 1 and value.is_integer() else value


def add_tasks_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``tasks`` command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "tasks", help="downstream tasks (lm-evaluation-harness), paired per item, with p-values"
    )
    add_model_pair_args(p, "quantized model to compare")
    p.add_argument("--tasks", required=True, metavar="LIST",
                   help="comma-separated lm-eval tasks/groups, e.g. hellaswag,arc_easy,mmlu; "
                   f"offline: {','.join(OFFLINE_TASKS)}")  # fmt: skip
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="few-shot examples (default: each task's own)")  # fmt: skip
    p.add_argument("--limit", type=_limit, default=None, metavar="N",
                   help="items per task (a fraction when < 1)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's 4 seeds and the resampling")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per model call, also the rolling-perplexity window "
                   "(default: from the model config)")  # fmt: skip
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="extra directory of lm-eval task YAMLs (repeatable)")  # fmt: skip
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of a drop")
    p.add_argument("--resamples", type=int, default=9999,
                   help="bootstrap / permutation resamples")  # fmt: skip
    p.add_argument("--output", type=Path, default=Path("qmetrics-tasks"), metavar="DIR")
    add_fail_if_arg(
        p,
        '"acc_drop>0.02&p<0.05, agreement<0.9" (names: [METRIC_]drop, delta, '
        "p, agreement, lost, won)",
    )
    return p


def run_tasks(args: argparse.Namespace) -> int:
    """Load both models, run and compare the tasks, write and print the reports, check the
    gate. Returns the exit code; bad input raises (see the module docstring)."""
    from qmetrics.evaluation.tasks.runner import (
        TaskSettings,
        TasksUnavailableError,
        require_lm_eval,
    )
    from qmetrics.reports.gate import check_task_gate, parse_task_gate

    rules = parse_task_gate(args.fail_if) if args.fail_if else []
    try:
        require_lm_eval()
    except TasksUnavailableError as exc:
        raise UsageError(str(exc)) from None
    if not 0.0 < args.alpha < 1.0:
        raise UsageError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.resamples < 1:
        raise UsageError(f"--resamples must be ≥ 1, got {args.resamples}")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    settings = TaskSettings(
        tasks=names,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        max_length=args.max_length,
        include_paths=[str(p) for p in args.include_path],
    )

    from qmetrics.evaluation.tasks.comparison import compare_runs
    from qmetrics.evaluation.tasks.runner import check_task_names, evaluate_tasks, task_manager
    from qmetrics.reports.tasks import build_tasks_report, render_task_table, write_task_reports

    candidate_spec = pair_spec(args)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = task_manager(settings)
    check_task_names(manager, names)  # before any model is loaded
    reference, candidate = load_model_pair(args, candidate_spec)
    ref_run = evaluate_tasks(reference, settings, manager=manager)
    cand_run = evaluate_tasks(candidate, settings, reference.tokenizer, manager=manager)
    comparisons = compare_runs(ref_run, cand_run, alpha=args.alpha, n_resamples=args.resamples,
                               seed=args.seed)  # fmt: skip
    report = build_tasks_report(
        settings, ref_run, cand_run, comparisons, alpha=args.alpha, n_resamples=args.resamples,
        origins={m.name: m.origin for m in (reference, candidate)},
    )  # fmt: skip
    paths = write_task_reports(report, args.output)
    return finish_run(render_task_table(report), paths, check_task_gate(rules, report))
