"""Kernel-throughput benchmark: qmetrics' fused ops against what a user would otherwise run,
on the same tensors, in one process (the core of ``qmetrics bench``).

A *case* is one op at one shape and dtype: ``compare`` (:func:`qmetrics.compare_logits`),
``stats`` (:meth:`qmetrics.LogitStats.update`), ``distill`` (forward + backward of
:func:`qmetrics.losses.distill_loss`) or ``distill_linear`` (forward + backward of
:func:`qmetrics.losses.linear_distill_loss`, hidden size :data:`HIDDEN`), on N tokens of
vocabulary V. Its *providers*:

- ``copy``: ``dst.copy_(src)`` moving the case's minimal traffic B (B/2 bytes read, B/2
  written): the device's ceiling;
- ``qmetrics``: the fused op;
- the baselines of :mod:`qmetrics.evaluation.bench_baselines`: ``eager`` (plain torch as a user
  writes it), ``seed`` (the seed document's code; compare and stats only) and ``compile``
  (``torch.compile`` of the eager code).

Measurement (:func:`measure`): each provider is called once — its *first call*, which pays for
compiling, Triton JIT and one-time allocations, reported in seconds — and once more for its
peak extra memory; then ``repeat`` rounds in which every provider runs once, the order rotated
each round, so that load from other processes hits them alike. Per provider:

- median and 20th/80th percentile of the call time (ms; numpy linear interpolation);
- GB/s = B / median, and % of copy = copy median / median (B: compare and stats read both logit
  tensors, 2·N·V·b bytes for b bytes per logit; distill reads both and writes the student
  gradient, 3·N·V·b; distill_linear is bound by its matmuls and gets neither);
- speed-up over each baseline = baseline median / median;
- peak extra memory (MiB), the smaller of the first two calls: on CUDA the allocator's
  peak above what was allocated before the call; on the CPU the growth of the process's peak
  RSS (VmHWM reset just before the call, after ``malloc_trim`` returns freed heap pages to the
  OS, so that reused memory counts). RSS counts pages, not tensors: glibc may place a new
  temporary elsewhere than one it just freed, so the CPU figure can exceed the live tensors'
  peak and varies between calls (for the eager baseline at N=256, V=32000 by up to 2×).

Timing: on the CPU ``time.perf_counter``; on CUDA events around each call with the L2 cache
flushed before it (a 256 MiB buffer zeroed, as ``triton.testing.do_bench`` does).

Bad input — unknown op, baseline or dtype, non-positive sizes, or a case that would not fit the
device's free memory (estimated by :func:`case_bytes_needed` before anything is allocated) —
raises ``ValueError`` with one line naming it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from qmetrics.evaluation.bench_baselines import (
    eager_compare,
    eager_distill_loss,
    eager_linear_distill_loss,
    eager_stats_sums,
    seed_compare,
    seed_stats_update,
)
from qmetrics.evaluation.environment import device_name, versions
from qmetrics.evaluation.process_memory import peak_rss_mb, reset_peak_rss
from qmetrics.evaluation.progress import progress_bar
from qmetrics.metrics.functional import compare_logits
from qmetrics.metrics.logit_stats import LogitStats
from qmetrics.metrics.losses import distill_loss, linear_distill_loss

__all__ = [
    "BASELINES",
    "CPU_DEFAULTS",
    "CUDA_DEFAULTS",
    "DTYPES",
    "OPS",
    "BenchCase",
    "BenchResult",
    "BenchRow",
    "BenchSettings",
    "CaseSpec",
    "Timing",
    "case_bytes_needed",
    "check_fits",
    "make_logit_inputs",
    "make_providers",
    "measure",
    "parse_dtype",
    "peak_extra_mib",
    "run_bench",
    "time_calls",
]

SCHEMA = "qmetrics.bench/1"
#: ``--ops`` names and the cases each runs.
OPS: dict[str, tuple[str, ...]] = {
    "compare": ("compare",),
    "stats": ("stats",),
    "distill": ("distill", "distill_linear"),
}
BASELINES = ("eager", "seed", "compile")
#: Short dtype names (the long torch names are accepted too).
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                  "float": "fp32"}  # fmt: skip
#: Hidden size of the student and teacher of ``distill_linear``.
HIDDEN = 256
#: Defaults: on CUDA the issue's sweep with every baseline; on the CPU 160 tokens of a 32k
#: vocabulary: 5.1M logits, above the 4M from which qmetrics' CPU compare takes its
#: torch.compile'd pass (what real evaluation chunks get), without the compile baseline (its
#: compiling alone takes longer than the rest) and with 10 rounds, so that a default run (4 cases
#: × up to 4 providers × 12 calls) stays near a minute on 2 quiet cores.
CUDA_DEFAULTS = {"tokens": (4096,), "vocabs": (32000, 128256), "dtypes": ("bf16", "fp32"),
                 "baselines": ("eager", "seed", "compile"), "repeat": 20}  # fmt: skip
CPU_DEFAULTS = {"tokens": (160,), "vocabs": (32000,), "dtypes": ("fp32",),
                "baselines": ("eager", "seed"), "repeat": 10}  # fmt: skip
_L2_FLUSH_BYTES = 256 << 20
#: fp32 [N, V] planes the eager baselines hold at their peak (log-softmax copies, products,
#: gradients): the memory check's allowance, on the high side.
_EAGER_PLANES = 8


def parse_dtype(name: str) -> str:
    """The short name (bf16, fp16, fp32) of a dtype given short or long; ValueError if unknown."""
    key = name.strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return key


@dataclass(frozen=True)
class BenchSettings:
    """What to measure: every op of ``ops`` at every (tokens, vocab, dtype), against
    ``baselines``, on ``device``, with ``repeat`` timed rounds."""

    tokens: tuple[int, ...]
    vocabs: tuple[int, ...]
    dtypes: tuple[str, ...]
    ops: tuple[str, ...] = tuple(OPS)
    baselines: tuple[str, ...] = BASELINES
    device: str = "cpu"
    top_k: int = 5
    labels: bool = False
    repeat: int = 20

    def check(self) -> None:
        """Raise ValueError (one line) on an unknown op, baseline or dtype, or bad sizes."""
        for op in self.ops:
            if op not in OPS:
                raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
        for b in self.baselines:
            if b not in BASELINES:
                raise ValueError(f"unknown baseline {b!r}; choose from {', '.join(BASELINES)}")
        for d in self.dtypes:
            if parse_dtype(d) != d:
                raise ValueError(f"dtype {d!r} is not a short name ({', '.join(DTYPES)})")
        if not (self.ops and self.tokens and self.vocabs and self.dtypes):
            raise ValueError("nothing to measure: give at least one op, token count, vocab, dtype")
        if min(self.tokens) < 1:
            raise ValueError(f"--tokens must be >= 1, got {min(self.tokens)}")
        if min(self.vocabs) < 2:
            raise ValueError(f"--vocab must be >= 2, got {min(self.vocabs)}")
        if not 1 <= self.top_k <= min(self.vocabs):
            raise ValueError(f"--top-k must be in [1, V={min(self.vocabs)}], got {self.top_k}")
        if self.repeat < 2:
            raise ValueError(
                f"--repeat must be >= 2 (percentiles need two runs), got {self.repeat}"
            )
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")

    def cases(self) -> list[CaseSpec]:
        """Every case, shape by shape (dtype, vocab, tokens) and within a shape op by op, so
        that a sweep cut short has measured every op at its first shapes."""
        return [
            CaseSpec(case, n, v, d)
            for d in self.dtypes
            for v in self.vocabs
            for n in self.tokens
            for op in self.ops
            for case in OPS[op]
        ]


@dataclass(frozen=True)
class CaseSpec:
    """One op (``compare``, ``stats``, ``distill``, ``distill_linear``) at N tokens, V, dtype."""

    op: str
    tokens: int
    vocab: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def bytes_moved(self) -> int | None:
        """Minimal traffic B of the op in bytes (None for ``distill_linear``)."""
        plane = self.tokens * self.vocab * self.torch_dtype.itemsize
        return {"compare": 2 * plane, "stats": 2 * plane, "distill": 3 * plane}.get(self.op)

    def label(self) -> str:
        return f"{self.op} N={self.tokens} V={self.vocab} {self.dtype}"


# --- memory check, before anything is allocated -----------------------------------------------


def case_bytes_needed(spec: CaseSpec, baselines: Sequence[str], device: str) -> int:
    """Bytes a case needs at its peak, estimated on the high side: its inputs (and, for the
    losses, the gradients), the copy buffers (B bytes), and the temporaries of its largest
    provider — ``_EAGER_PLANES`` fp32 [N, V] planes when an eager-style baseline runs (for
    ``distill_linear`` also both logit tensors), one plane for qmetrics alone (its chunks) —
    plus the 256 MiB L2-flush buffer on CUDA."""
    n, v, b = spec.tokens, spec.vocab, spec.torch_dtype.itemsize
    plane_in, plane_fp32 = n * v * b, n * v * 4
    temporaries = _EAGER_PLANES * plane_fp32 if baselines else plane_fp32
    if spec.op in ("compare", "stats"):
        need = 2 * plane_in + 8 * n
    elif spec.op == "distill":
        need = 3 * plane_in
    else:  # distill_linear: heads, their gradient, hidden states; eager materialises logits
        need = 3 * v * HIDDEN * b + 3 * n * HIDDEN * b
        if baselines:
            temporaries += 2 * plane_in
    need += spec.bytes_moved() or 0
    if torch.device(device).type == "cuda":
        need += _L2_FLUSH_BYTES
    return need + temporaries


def available_bytes(device: str) -> int | None:
    """Free memory of the device in bytes: CUDA ``mem_get_info``; CPU the kernel's
    MemAvailable (psutil when installed, else /proc/meminfo); None when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(settings: BenchSettings) -> None:
    """Raise ValueError (one line) if some case would not fit the device's free memory."""
    free = available_bytes(settings.device)
    if free is None:
        return
    for spec in settings.cases():
        need = case_bytes_needed(spec, settings.baselines, settings.device)
        if need > free:
            raise ValueError(
                f"{spec.label()} needs about {need / 2**30:.1f} GiB (inputs, copy buffers and "
                f"the baselines' fp32 temporaries) but {settings.device} has "
                f"{free / 2**30:.1f} GiB free; use fewer --tokens or a smaller --vocab"
            )


# --- inputs and providers ---------------------------------------------------------------------


def make_logit_inputs(
    n: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference logits N(0, 3²), a "quantized" copy perturbed by N(0, 0.1²) (KL ~ 1e-2), and
    next-token labels; built in place, so no temporary raises the peak above the inputs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ref = torch.empty(n, vocab, device=device, dtype=dtype).normal_(0.0, 3.0, generator=gen)
    quant = torch.empty_like(ref).normal_(0.0, 0.1, generator=gen).add_(ref)
    labels = torch.randint(0, vocab, (n,), device=device, generator=gen)
    return ref, quant, labels


def _hidden_inputs(n: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Student hidden [N, H] and head [V, H] (both requiring grad), teacher hidden and head."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w_t = torch.empty(vocab, HIDDEN, device=device, dtype=dtype).normal_(0, 0.1, generator=gen)
    w_s = torch.empty_like(w_t).normal_(0, 0.01, generator=gen).add_(w_t)
    h_t = torch.empty(n, HIDDEN, device=device, dtype=dtype).normal_(0, 1, generator=gen)
    h_s = torch.empty_like(h_t).normal_(0, 0.1, generator=gen).add_(h_t)
    return h_s.requires_grad_(), w_s.requires_grad_(), h_t, w_t


def _train_step(loss_fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]):
    """forward + backward of ``loss_fn(*inputs)``; the gradients are dropped after each step
    (``zero_grad(set_to_none=True)``), so every step allocates them anew as training does."""
    trainable = [t for t in inputs if t.requires_grad]

    def step() -> torch.Tensor:
        loss = loss_fn(*inputs)
        loss.backward()
        for t in trainable:
            t.grad = None
        return loss.detach()

    return step


_COMPILED: dict[Callable, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)``, one wrapper per function (it recompiles per
    shape and dtype; :func:`run_bench` raises dynamo's recompile limit for the sweep)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


@dataclass
class CaseProviders:
    """A case's callables (no arguments; each runs the provider once), in table order, and
    the case's minimal traffic in bytes."""

    calls: dict[str, Callable[[], object]]
    bytes_moved: int | None


def make_providers(
    spec: CaseSpec,
    device: str,
    baselines: Sequence[str] = BASELINES,
    top_k: int = 5,
    labels: bool = False,
) -> CaseProviders:
    """Build a case's inputs on ``device`` and its providers: ``copy`` (when the case has a
    minimal traffic), ``qmetrics`` and each requested baseline that exists for the op."""
    dtype = spec.torch_dtype
    n, v = spec.tokens, spec.vocab
    calls: dict[str, Callable[[], object]] = {}
    moved = spec.bytes_moved()
    if moved is not None:
        src = torch.empty(moved // 2 // dtype.itemsize, device=device, dtype=dtype).normal_()
        dst = torch.empty_like(src)
        calls["copy"] = lambda: dst.copy_(src)
    seed: Callable[[], object] | None = None  # the seed document has no distillation loss
    if spec.op in ("compare", "stats"):
        ref, quant, lab = make_logit_inputs(n, v, dtype, device)
        args = (ref, quant, lab if labels else None, top_k)
        if spec.op == "compare":
            calls["qmetrics"] = lambda: compare_logits(*args[:3], top_k=top_k)
            eager_fn: Callable = eager_compare
            seed = lambda: seed_compare(*args)  # noqa: E731

            def provider(fn: Callable) -> Callable[[], object]:
                return lambda: fn(*args)
        else:
            stats = LogitStats(top_k=top_k)
            history: list[dict[str, float]] = []
            calls["qmetrics"] = lambda: stats.update(*args[:3])
            eager_fn = eager_stats_sums
            seed = lambda: seed_stats_update(history, *args)  # noqa: E731

            def provider(fn: Callable) -> Callable[[], object]:
                state: list[torch.Tensor] = []

                def update() -> None:  # state += this batch's sums, on the device
                    sums = fn(*args)
                    if state:
                        state[0].add_(sums)
                    else:
                        state.append(sums)

                return update
    elif spec.op in ("distill", "distill_linear"):
        if spec.op == "distill":
            gen = torch.Generator(device=device).manual_seed(0)
            teacher = torch.empty(n, v, device=device, dtype=dtype).normal_(0, 3, generator=gen)
            student = torch.empty_like(teacher).normal_(0, 0.3, generator=gen).add_(teacher)
            inputs: Sequence[torch.Tensor] = (student.requires_grad_(), teacher)
            calls["qmetrics"] = _train_step(distill_loss, inputs)
            eager_fn = eager_distill_loss
        else:
            inputs = _hidden_inputs(n, v, dtype, device)
            calls["qmetrics"] = _train_step(linear_distill_loss, inputs)
            eager_fn = eager_linear_distill_loss

        def provider(fn: Callable) -> Callable[[], object]:
            return _train_step(fn, inputs)
    else:
        raise ValueError(f"unknown case op {spec.op!r}")
    if "eager" in baselines:
        calls["eager"] = provider(eager_fn)
    if "seed" in baselines and seed is not None:
        calls["seed"] = seed
    if "compile" in baselines:
        calls["compile"] = provider(_compiled(eager_fn))
    return CaseProviders(calls, moved)


# --- timing and memory ------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Median and 20th/80th percentiles of a provider's call times, in ms."""

    median_ms: float
    p20_ms: float
    p80_ms: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Timing:
        p20, p50, p80 = np.percentile(np.asarray(samples_ms, dtype=np.float64), [20, 50, 80])
        return cls(float(p50), float(p20), float(p80))


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _timed_peak(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """Seconds of one ``fn()`` (device work included) and its peak memory above what was
    held just before it in MiB (see :func:`peak_extra_mib`)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _trim_heap()
        base_mib = reset_peak_rss()
    t0 = time.perf_counter()
    fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    if cuda:
        return seconds, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return seconds, peak_rss_mb() - base_mib


def peak_extra_mib(fn: Callable[[], object], device: str) -> float:
    """Peak memory of one ``fn()`` above what was held just before it, in MiB: the CUDA
    allocator's ``max_memory_allocated``, or on the CPU the peak-RSS growth (Linux resets the
    mark; elsewhere it is only an upper bound)."""
    return _timed_peak(fn, device)[1]


def _interleaved_ms(
    calls: dict[str, Callable[[], object]],
    device: str,
    repeat: int,
    on_round: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """``repeat`` rounds, each calling every provider once (order rotated by one per round):
    each provider's call times in ms. A provider that raises is dropped from later rounds."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    cuda = torch.device(device).type == "cuda"
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if cuda else None
    for r in range(repeat):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        events = []
        for name in order:
            if name not in calls:
                continue
            try:
                if flush is not None:
                    flush.zero_()
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    calls[name]()
                    end.record()
                    events.append((name, start, end))
                else:
                    t0 = time.perf_counter()
                    calls[name]()
                    samples[name].append((time.perf_counter() - t0) * 1e3)
            except Exception:  # measured as failed by the caller (it worked in warm-up)
                calls = {k: f for k, f in calls.items() if k != name}
        if cuda:
            torch.cuda.synchronize(device)
            for name, start, end in events:
                samples[name].append(start.elapsed_time(end))
        on_round()
    return samples


def time_calls(
    calls: dict[str, Callable[[], object]], device: str, repeat: int = 20
) -> dict[str, Timing]:
    """Interleaved timing of already warmed-up callables (see :func:`measure` for the whole
    protocol): median and p20–p80 per name."""
    samples = _interleaved_ms(calls, device, repeat)
    return {name: Timing.of(ts) for name, ts in samples.items() if len(ts) >= 2}


# --- results ----------------------------------------------------------------------------------


@dataclass
class BenchRow:
    """One provider of one case. Times in ms, memory in MiB, ``speedup`` keyed by baseline
    (baseline median / this median); ``error`` holds why a provider could not run."""

    provider: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gb_per_s: float | None = None
    pct_copy: float | None = None
    speedup: dict[str, float] = field(default_factory=dict)
    peak_extra_mib: float | None = None
    first_call_s: float | None = None
    error: str | None = None


@dataclass
class BenchCase:
    """The rows of one case, copy first, then qmetrics and the baselines."""

    spec: CaseSpec
    bytes_moved: int | None
    rows: list[BenchRow]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.spec), "bytes_moved": self.bytes_moved,
                "rows": [asdict(r) for r in self.rows]}  # fmt: skip


@dataclass
class BenchResult:
    """A whole sweep: settings, where it ran (device, versions, start date) and its cases;
    ``complete`` is False while cases are still being measured."""

    settings: BenchSettings
    device: dict[str, Any]
    versions: dict[str, str | None]
    date: str
    cases: list[BenchCase] = field(default_factory=list)
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of ``qmetrics bench --json`` (schema :data:`SCHEMA`)."""
        return {
            "schema": SCHEMA,
            "complete": self.complete,
            "date": self.date,
            "device": self.device,
            "versions": self.versions,
            "settings": asdict(self.settings),
            "cases": [c.to_dict() for c in self.cases],
        }


def measure(
    spec: CaseSpec,
    settings: BenchSettings,
    on_round: Callable[[], None] = lambda: None,
) -> BenchCase:
    """Measure one case: build its providers, call each twice (the first call timed; the
    peak extra memory the smaller of the two, as the first may hold compile-time memory), then
    time ``settings.repeat`` interleaved rounds; ``on_round`` is called after each round and
    warm-up step. A provider that raises is a row with its error."""
    device = settings.device
    gc.collect()  # the previous case's cycles, if any, before this case's memory is measured
    providers = make_providers(spec, device, settings.baselines, settings.top_k, settings.labels)
    rows = {name: BenchRow(name) for name in providers.calls}
    live: dict[str, Callable[[], object]] = {}
    for name, fn in providers.calls.items():
        try:
            rows[name].first_call_s, first_mib = _timed_peak(fn, device)
            rows[name].peak_extra_mib = min(first_mib, peak_extra_mib(fn, device))
            live[name] = fn
        except Exception as exc:  # a provider that cannot run here is reported, not fatal
            rows[name].error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"[:200]
    on_round()
    on_round()
    samples = _interleaved_ms(live, device, settings.repeat, on_round)
    for name, ts in samples.items():
        if len(ts) < settings.repeat:
            rows[name].error = rows[name].error or "failed during the timed rounds"
            continue
        t = Timing.of(ts)
        rows[name].median_ms, rows[name].p20_ms, rows[name].p80_ms = t.median_ms, t.p20_ms, t.p80_ms
    copy = rows.get("copy")
    for row in rows.values():
        if row.median_ms is None:
            continue
        if providers.bytes_moved is not None:
            row.gb_per_s = providers.bytes_moved / (row.median_ms * 1e-3) / 1e9
            if copy is not None and copy.median_ms is not None:
                row.pct_copy = 100.0 * copy.median_ms / row.median_ms
        if row.provider != "copy":
            for b in BASELINES:
                base = rows.get(b)
                if base is not None and base.median_ms is not None:
                    row.speedup[b] = base.median_ms / row.median_ms
    del providers, live
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return BenchCase(spec, spec.bytes_moved(), list(rows.values()))


@contextlib.contextmanager
def _recompile_limit(n: int) -> Iterator[None]:
    """Let dynamo compile each baseline for ``n`` shapes (its default stops at 8 and then runs
    the function eagerly, which would pass for the compiled baseline)."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    old = getattr(dynamo_config, name)
    setattr(dynamo_config, name, max(old, n))
    try:
        yield
    finally:
        setattr(dynamo_config, name, old)


def run_bench(
    settings: BenchSettings,
    progress: bool = False,
    on_case: Callable[[BenchResult], None] = lambda result: None,
) -> BenchResult:
    """Check the settings and that every case fits in memory (before allocating anything),
    then measure every case in turn, calling ``on_case`` with the result so far as each case
    finishes (so that a run cut short can keep what it measured); a tqdm bar over the rounds
    when ``progress``."""
    settings.check()
    check_fits(settings)
    specs = settings.cases()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result = BenchResult(settings, device_name(settings.device), versions(), stamp)
    bar = progress_bar(progress, total=len(specs) * (settings.repeat + 2), initial=0)
    if bar is not None:
        bar.unit, bar.desc = "round", "qmetrics bench"
    on_round = bar.update if bar is not None else (lambda: None)
    try:
        with (
            _recompile_limit(len(specs) + 8)
            if "compile" in settings.baselines
            else contextlib.nullcontext()
        ):
            for spec in specs:
                if bar is not None:
                    bar.set_postfix_str(spec.label())
                result.cases.append(measure(spec, settings, on_round=on_round))
                result.complete = len(result.cases) == len(specs)
                on_case(result)
    finally:
        if bar is not None:
            bar.close()
    return result
