"""Downstream tasks through lm-evaluation-harness on already-loaded models.

:func:`evaluate_tasks` wraps a loaded model in lm-eval's ``HFLM`` and runs lm-eval's
``simple_evaluate`` on it, with per-sample logging on and the settings of one :class:`TaskSettings`
(tasks, few-shot count, limit, batch size, seed, max length), so that every model of a comparison is
evaluated identically. Task names are resolved by lm-eval's ``TaskManager`` over its own tasks, the
offline tasks shipped in :mod:`qmetrics.evaluation.tasks` and any ``include_paths``. Nothing is
scored here: scores, stderrs and per-item metric values are lm-eval's.

BOS in rolling log-likelihood. For ``loglikelihood_rolling`` tasks lm-eval prepends its prefix
token (the BOS) to the first window *and* encodes the document with the tokenizer's defaults,
so a tokenizer that adds a BOS itself (Llama, Mistral, ...) gives ``<s> <s> text`` with the
second ``<s>`` scored as a token of the document (lm-eval's "double BOS" issues). Rolling tasks
therefore run through an ``HFLM`` made with ``add_bos_token=False``: the document is encoded
without special tokens and the single BOS is lm-eval's prefix token. Other tasks keep lm-eval's
defaults. With this, the rolling log-likelihood of a document of N tokens t_1..t_N is

    ll = Σ_i log p(t_i | <s>, t_1..t_{i-1})   (within lm-eval's windows, see below),

which is what :class:`qmetrics.evaluation.compare.QuantizationEvaluator` scores on ``[<s>] +
tokens``. lm-eval's windows of ``max_length`` = L tokens predict L tokens each: window k feeds ids
``[kL, (k+1)L)`` of ``[<s>] + tokens`` and scores ids ``kL+1 .. (k+1)L``, i.e. qmetrics'
``make_windows(context_length=L+1, stride=L)``. The two agree exactly when every document has N ≤ L
tokens, or N a multiple of L; otherwise lm-eval's last window of a document is fed L tokens of
context where qmetrics' is fed N mod L + 1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qmetrics.evaluation.models import ModelEntry
from qmetrics.evaluation.tasks import offline_task_dir

ROLLING = "loglikelihood_rolling"
INSTALL_HINT = "pip install 'qmetrics[tasks]'"


class TasksUnavailableError(RuntimeError):
    """lm-evaluation-harness (or accelerate, which its HF model needs) is not installed."""


def require_lm_eval() -> None:
    """Raise :class:`TasksUnavailableError` with the install command when lm-eval or
    accelerate cannot be imported."""
    missing = [m for m in ("lm_eval", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise TasksUnavailableError(
            f"downstream tasks need lm-evaluation-harness and accelerate ({', '.join(missing)} "
            f"not installed): {INSTALL_HINT}"
        )


@dataclass
class TaskSettings:
    """Settings of a task run, the same for every model.

    ``limit``: items per task (an int), or a fraction of each task when below 1.
    ``seed``: lm-eval's python, numpy, torch and few-shot seeds all at once.
    ``max_length``: tokens per model call (rolling windows, context truncation); None: lm-eval's
    default from the model config. ``bootstrap_iters``: lm-eval's bootstrap for the stderr of
    non-mean metrics (0 switches those stderrs off).
    """

    tasks: list[str]
    num_fewshot: int | None = None
    limit: int | float | None = None
    batch_size: int = 1
    seed: int = 1234
    max_length: int | None = None
    bootstrap_iters: int = 100_000
    include_paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("no tasks given")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be ≥ 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be > 0, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be ≥ 2, got {self.max_length}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TaskRun:
    """What lm-eval returned for one model: its ``results`` (aggregated ``"metric,filter"``
    scores and ``"metric_stderr,filter"``), per-sample logs, ``higher_is_better``, task
    ``output_types``, ``group_subtasks``, ``n_samples`` and the name of each task's
    aggregation function per metric (``"mean"``, ``"weighted_perplexity"``, ...); plus the
    wall time."""

    model: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    output_types: dict[str, str] = field(default_factory=dict)
    group_subtasks: dict[str, list[str]] = field(default_factory=dict)
    n_samples: dict[str, dict[str, int]] = field(default_factory=dict)
    aggregations: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: float = 0.0


def task_manager(settings: TaskSettings) -> Any:
    """lm-eval's ``TaskManager`` over the offline tasks, ``include_paths`` and lm-eval's own
    tasks. Indexing lm-eval's ~14,000 task files takes seconds (16 s on 2 CPU cores), so when
    every requested name is among the offline tasks and include paths (which take precedence
    anyway) they are indexed alone, and a name that no lm-eval task file even mentions
    (:func:`lm_eval_may_know`) fails at once with :func:`check_task_names`' error."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(offline_task_dir()), *settings.include_paths]
    local = TaskManager(include_path=paths, include_defaults=False)
    rest = [name for name in settings.tasks if name not in local.all_tasks]
    if not rest:
        return local
    check_task_names(local, [n for n in rest if not lm_eval_may_know(n)])
    return TaskManager(include_path=paths)


def lm_eval_may_know(name: str) -> bool:
    """Whether ``name`` occurs in any of lm-eval's task config files (its YAMLs and the
    templates they include). lm-eval's index names every task, group and tag from a ``task:``,
    ``group:`` or ``tag:`` entry of such a file, so False means lm-eval does not know the name;
    True only means it may (the full index decides). A plain byte scan: ~0.6 s, not ~16 s."""
    import lm_eval.tasks

    needle = name.encode()
    root = Path(lm_eval.tasks.__file__).parent
    for path in root.rglob("*"):
        is_config = "yaml" in path.name or "yml" in path.name
        if is_config and path.is_file() and needle in path.read_bytes():
            return True
    return False


def check_task_names(manager: Any, names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first of ``names`` that ``manager`` does not know."""
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown task {unknown[0]!r}: not an lm-eval task, group or tag, nor a task in "
            f"{offline_task_dir()} or the include paths"
        )


def _load_tasks(manager: Any, names: Sequence[str]) -> tuple[list[Any], list[Any], dict]:
    """The requested tasks and groups as loaded lm-eval objects, split into (rolling, other),
    and the name of each leaf task's aggregation function per metric. A name whose leaf tasks
    are all rolling goes to the first list."""
    check_task_names(manager, names)
    rolling: list[Any] = []
    other: list[Any] = []
    aggregations: dict[str, dict[str, str]] = {}
    for name in names:
        loaded = manager.load([name])
        tasks = list(loaded["tasks"].values())
        for task in tasks:
            funcs = task.aggregation().items()
            aggregations[task.task_name] = {m: getattr(f, "__name__", str(f)) for m, f in funcs}
        only_rolling = all(t.get_config("output_type") == ROLLING for t in tasks)
        group = loaded["groups"].get(name)
        (rolling if only_rolling else other).extend([group] if group is not None else tasks)
    return rolling, other, aggregations


@contextlib.contextmanager
def quiet_progress(quiet: bool = True) -> Iterator[None]:
    """While active (and ``quiet``), every tqdm bar is created disabled — lm-eval's and
    datasets' included, which pass ``disable=False`` themselves. Restored on exit."""
    if not quiet:
        yield
        return
    from tqdm import std

    original = std.tqdm.__init__

    def disabled(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = disabled  # type: ignore[method-assign]
    try:
        yield
    finally:
        std.tqdm.__init__ = original  # type: ignore[method-assign]


def evaluate_tasks(
    entry: ModelEntry,
    settings: TaskSettings,
    tokenizer: Any | None = None,
    manager: Any | None = None,
    progress: bool | None = None,
) -> TaskRun:
    """Run the tasks of ``settings`` on an already-loaded model with lm-eval.

    ``entry.model`` must be a transformers ``PreTrainedModel``; its tokenizer is
    ``entry.tokenizer``, else ``tokenizer`` (e.g. the reference's for an RTN candidate). The
    model stays where it is (lm-eval uses its device). Rolling tasks run with
    ``add_bos_token=False`` (see the module docstring); every other lm-eval setting is its
    default. ``manager``: a :func:`task_manager` to reuse (building one indexes every task).
    ``progress``: lm-eval's progress bars; None shows them only when stderr is a terminal (in
    logs and CI they would flood it), see :func:`quiet_progress`.
    """
    require_lm_eval()
    tok = entry.tokenizer if entry.tokenizer is not None else tokenizer
    if tok is None:
        raise ValueError(f"{entry.name}: a tokenizer is needed (the entry has none)")
    manager = manager if manager is not None else task_manager(settings)
    rolling, other, aggregations = _load_tasks(manager, settings.tasks)
    run = TaskRun(entry.name, aggregations=aggregations)
    start = time.perf_counter()
    if progress is None:
        progress = sys.stderr.isatty()
    with quiet_progress(not progress):
        _run_groups(run, entry, tok, settings, manager, [(other, None), (rolling, False)])
    run.seconds = time.perf_counter() - start
    return run


def _run_groups(
    run: TaskRun,
    entry: ModelEntry,
    tok: Any,
    settings: TaskSettings,
    manager: Any,
    groups: Sequence[tuple[list[Any], bool | None]],
) -> None:
    """Run ``simple_evaluate`` once per (task objects, ``add_bos_token``) group into ``run``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    seed = settings.seed
    for objects, add_bos in groups:
        if not objects:
            continue
        lm = HFLM(
            pretrained=entry.model,
            tokenizer=tok,
            batch_size=settings.batch_size,
            max_length=settings.max_length,
            add_bos_token=add_bos,
        )
        out = simple_evaluate(
            lm,
            tasks=objects,
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            bootstrap_iters=settings.bootstrap_iters,
            log_samples=True,
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        run.results.update(out["results"])
        run.samples.update(out["samples"])
        run.higher_is_better.update(out["higher_is_better"])
        run.output_types.update({t: c["output_type"] for t, c in out["configs"].items()})
        run.group_subtasks.update(out.get("group_subtasks") or {})
        run.n_samples.update(out.get("n-samples") or {})
