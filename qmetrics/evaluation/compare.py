"""Paired evaluation of a reference model and quantized candidates over a corpus, in one pass.

For every batch of token windows the reference and each candidate run on the same input ids; their
logits are produced chunk by chunk (:class:`qmetrics.evaluation.logit_source.LogitSource`) and fed,
with next-token labels, into one :class:`qmetrics.LogitStats` per candidate. Perplexity of every
model comes out of the same pass: PPL = exp(mean NLL) over the scored tokens, with windows as in
:func:`qmetrics.evaluation.corpus.make_windows`. Only one chunk of logits per model is alive at a
time. A run can checkpoint its accumulators and resume without recomputing finished windows.

Figures (:class:`ModelFigures`, per model). ``forward_seconds`` and ``tokens`` cover every batch
(forward passes and the output head, synchronised on CUDA). The first batch a process runs is a
warm-up (allocations, kernel selection: 2–3× slower than the rest), recorded apart in
``warmup_seconds`` / ``warmup_tokens``; ``tokens_per_second`` leaves it out — (tokens −
warmup_tokens) / (forward_seconds − warmup_seconds) — unless no other batch ran, when it is
tokens / forward_seconds. ``peak_memory_mb`` (``peak_memory_source`` says which):

- ``"cuda"``: the most ``torch.cuda.max_memory_allocated`` rose above the allocation before one
  of the model's forward passes (peak stats reset before each);
- ``"rss"`` (a model on the CPU): how far the process's peak resident set size (``VmHWM`` in
  ``/proc/self/status``, else ``getrusage``'s ``ru_maxrss``) had grown since the run started,
  read after each of the model's forward passes. The peak is process-wide and cannot be reset
  per model, so this bounds the model's working memory from above: it includes whatever an
  earlier model (in the same or an earlier batch) pushed the peak to.
- None: not measured (other devices).

Distributed (``torchrun``, a default process group initialised before :meth:`evaluate`, e.g.
by :func:`qmetrics.evaluation.distributed.init_from_env`): rank r runs the windows i with
i mod world = r, batched as usual, with the global window index as the sequence id, so the
sequence-clustered errors are those of a single-process run. At the end every rank's
accumulators are merged (:meth:`qmetrics.LogitStats.sync`) and every rank returns the same
result: counts equal a single-process run exactly, statistics to float rounding. Figures are
merged by :meth:`ModelFigures.combined`: seconds and tokens summed (``tokens_per_second`` is
then the per-device rate), peak memory the largest of any rank. Checkpoints are per rank
(``checkpoint_dir/rank-R-of-W``): a run resumes only with the same world size.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmetrics.evaluation.corpus import (
    SCORING_MODES,
    Window,
    batch_windows,
    iter_texts,
    make_windows,
    tokenize_checked,
)
from qmetrics.evaluation.distributed import all_gather_objects, rank_and_world
from qmetrics.evaluation.environment import versions
from qmetrics.evaluation.logit_source import LogitSource
from qmetrics.evaluation.models import ModelEntry, as_entry
from qmetrics.evaluation.process_memory import peak_rss_mb
from qmetrics.evaluation.progress import progress_bar
from qmetrics.evaluation.reference_store import ReferenceStore, StoredTopK
from qmetrics.metrics.estimate import Estimate
from qmetrics.metrics.logit_stats import LogitStats, LogitStatsResult

CHECKPOINT_META = "checkpoint.json"
DEFAULT_CONTEXT_LENGTH = 512


@dataclass
class ModelFigures:
    """Operational figures of one model over the run (meanings: module docstring)."""

    forward_seconds: float = 0.0
    tokens: int = 0
    peak_memory_mb: float | None = None
    warmup_seconds: float = 0.0
    warmup_tokens: int = 0
    peak_memory_source: str | None = None  # "cuda", "rss" or None: see the module docstring

    @property
    def tokens_per_second(self) -> float | None:
        """Tokens per second after the warm-up batch (over all batches when only warm-up ran)."""
        seconds = self.forward_seconds - self.warmup_seconds
        tokens = self.tokens - self.warmup_tokens
        if tokens > 0 and seconds > 0:
            return tokens / seconds
        return self.tokens / self.forward_seconds if self.forward_seconds > 0 else None

    @classmethod
    def combined(cls, parts: Sequence[ModelFigures]) -> ModelFigures:
        """The figures of several ranks as one: seconds and tokens (warm-up included) summed,
        the largest peak memory, the first known memory source."""
        peaks = [f.peak_memory_mb for f in parts if f.peak_memory_mb is not None]
        sources = [f.peak_memory_source for f in parts if f.peak_memory_source is not None]
        return cls(
            forward_seconds=sum(f.forward_seconds for f in parts),
            tokens=sum(f.tokens for f in parts),
            peak_memory_mb=max(peaks) if peaks else None,
            warmup_seconds=sum(f.warmup_seconds for f in parts),
            warmup_tokens=sum(f.warmup_tokens for f in parts),
            peak_memory_source=sources[0] if sources else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "forward_seconds": self.forward_seconds,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens_per_second,
            "warmup_seconds": self.warmup_seconds,
            "warmup_tokens": self.warmup_tokens,
            "peak_memory_mb": self.peak_memory_mb,
            "peak_memory_source": self.peak_memory_source,
        }


@dataclass
class EvaluationResult:
    """Everything one run measured: settings, per-model perplexity and figures, and the
    logit-comparison statistics of each candidate against the reference."""

    settings: dict[str, Any]
    reference: str
    tokens_total: int
    windows: int
    comparisons: dict[str, LogitStatsResult]
    perplexity: dict[str, Estimate]
    figures: dict[str, ModelFigures]
    origins: dict[str, dict[str, Any]] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    #: per candidate, the per-token KL at quantile levels 0, 0.001, ..., 1 (for CDF plots)
    kl_quantiles: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (see :meth:`LogitStatsResult.to_dict` for the statistics)."""
        return {
            "settings": self.settings,
            "reference": self.reference,
            "tokens_total": self.tokens_total,
            "windows": self.windows,
            "models": {
                name: {
                    "perplexity": self.perplexity[name].to_dict()
                    if name in self.perplexity
                    else None,
                    "figures": self.figures[name].to_dict(),
                    "origin": self.origins.get(name, {}),
                }
                for name in self.figures
            },
            "comparisons": {name: res.to_dict() for name, res in self.comparisons.items()},
            "environment": self.environment,
            "kl_quantiles": self.kl_quantiles,
        }


@dataclass(frozen=True)
class ChunkProgress:
    """The running totals handed to ``evaluate(on_chunk=...)`` after each batch: the
    statistics (:meth:`qmetrics.LogitStats.compute`) of every compared pair so far, keyed by
    candidate name (the reference's name when it is compared with itself)."""

    windows_done: int  # windows (chunks) this process has finished, resumed ones included
    windows_total: int  # windows this process runs
    results: dict[str, LogitStatsResult]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class QuantizationEvaluator:
    """Compare ``candidates`` with ``reference`` on a corpus (see the module docstring).

    ``reference`` and each candidate are :class:`qmetrics.evaluation.models.ModelEntry` objects (or
    bare ``nn.Module``s, named ``candidate-i``); a candidate without its own tokenizer uses the
    reference's. Models may live on different devices. ``reference`` may instead be a
    :class:`qmetrics.evaluation.reference_store.ReferenceStore`: the reference model is not
    run, its stored outputs are read (windowing left None is the store's; KL from a top-K store
    is a lower bound, cosine/MSE absent). ``scoring`` chooses the windows
    (:data:`qmetrics.evaluation.corpus.SCORING_MODES`, :func:`make_windows`): ``"llama.cpp"``
    feeds and scores the tokens ``llama-perplexity --kl-divergence`` does.
    """

    def __init__(
        self,
        reference: ModelEntry | torch.nn.Module | ReferenceStore,
        candidates: Sequence[ModelEntry | torch.nn.Module] = (),
        tokenizer: Any | None = None,
        *,
        context_length: int | None = None,
        stride: int | None = None,
        batch_size: int = 1,
        max_tokens: int | None = None,
        top_k: int = 5,
        logit_chunk_tokens: int | None = 256,
        separator: str = "\n\n",
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 8,
        progress: bool = True,
        scoring: str = "transformers",
    ):
        # a ReferenceStore stands in for the reference model: its windowing fills what is left
        # None and must match the rest, its tokenizer the candidates' (reference_store.py)
        self.store = reference if isinstance(reference, ReferenceStore) else None
        if self.store is not None:
            reference = self.store.entry(candidates, tokenizer)
            self.store.check_top_k(top_k)
            context_length, stride, max_tokens = self.store.resolve_windowing(
                context_length, stride, max_tokens, separator, scoring
            )
        context_length = DEFAULT_CONTEXT_LENGTH if context_length is None else context_length
        self.reference = as_entry(reference, "reference", tokenizer)
        self.candidates = [as_entry(c, f"candidate-{i}") for i, c in enumerate(candidates)]
        names = [self.reference.name] + [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if self.reference.tokenizer is None:
            raise ValueError("a tokenizer is needed: pass tokenizer= or a ModelEntry with one")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if scoring not in SCORING_MODES:
            raise ValueError(f"scoring must be one of {', '.join(SCORING_MODES)}, got {scoring!r}")
        self.scoring = scoring
        self.context_length = context_length
        self.stride = stride
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.top_k = top_k
        self.logit_chunk_tokens = logit_chunk_tokens
        self.separator = separator
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self._rss_start = 0.0  # the process's peak RSS (MiB) when evaluate() started
        self._checkpoint_rank = (0, 1)  # (rank, world size) of the running evaluate()

    # --- corpus -------------------------------------------------------------------------------

    def tokenize(self, corpus: str | Iterable[str] | torch.Tensor) -> torch.Tensor:
        """Token ids of the corpus (a source name, texts, or ids), checked to be identical under
        every candidate's own tokenizer."""
        if isinstance(corpus, torch.Tensor):
            ids = corpus.long().reshape(-1)
        else:
            ids = tokenize_checked(
                iter_texts(corpus) if isinstance(corpus, str) else corpus,
                self.reference.tokenizer,
                [(c.name, c.tokenizer) for c in self.candidates],
                separator=self.separator,
                max_tokens=self.max_tokens,
            )
        if self.store is not None:  # the corpus the store was made from, token for token
            self.store.check_ids(ids, self.candidates[0].name)
        return ids

    def windows(self, n_tokens: int) -> list[Window]:
        """Every scoring window of the corpus, in order
        (:func:`qmetrics.evaluation.corpus.make_windows` with this evaluator's context length,
        stride and scoring; llama.cpp scoring puts the reference tokenizer's BOS first)."""
        bos = getattr(self.reference.tokenizer, "bos_token_id", None)
        return make_windows(n_tokens, self.context_length, self.stride, scoring=self.scoring,
                            bos_id=bos)  # fmt: skip

    def batches(self, n_tokens: int) -> list[list[Window]]:
        """This process's windows grouped into batches of equal-length windows, in corpus order
        (:func:`qmetrics.evaluation.corpus.batch_windows`): every window, or under
        ``torch.distributed`` rank r's share, the windows i with i mod world = r."""
        rank, world = rank_and_world()
        return batch_windows(self.windows(n_tokens)[rank::world], self.batch_size)

    def settings(self, n_tokens: int) -> dict[str, Any]:
        """The settings that determine the results (a resumed run must match them)."""
        store = {} if self.store is None else {"reference_store": self.store.describe()}
        return store | {
            "context_length": self.context_length,
            "stride": self.stride or self.context_length,
            "batch_size": self.batch_size,
            "max_tokens": self.max_tokens,
            "top_k": self.top_k,
            "separator": self.separator,
            "scoring": self.scoring,
            "tokens": n_tokens,
            "reference": self.reference.name,
            "candidates": [c.name for c in self.candidates],
        }

    # --- the run ------------------------------------------------------------------------------

    def evaluate(
        self,
        corpus: str | Iterable[str] | torch.Tensor,
        *,
        resume: bool = False,
        on_batch: Callable[[int, int], None] | None = None,
        on_chunk: Callable[[ChunkProgress], None] | None = None,
    ) -> EvaluationResult:
        """Run every model over the corpus once and return the statistics.

        With ``resume`` and a checkpoint in ``checkpoint_dir`` from a run with the same settings
        and corpus, finished batches are skipped and the saved accumulators continue.
        ``on_batch(done, total)`` is called after each batch. ``on_chunk`` (rank 0 only) gets
        the running statistics after each batch (:class:`ChunkProgress`; one
        :meth:`qmetrics.LogitStats.compute` per pair, a host sync: leave it None for speed);
        under ``torch.distributed`` they cover rank 0's windows only.
        """
        ids = self.tokenize(corpus)
        rank, world = rank_and_world()
        all_windows = self.windows(len(ids))
        batches = self.batches(len(ids))
        # global window indices: a window's chunks (and a window on any rank) are one sequence
        index = {w.begin: i for i, w in enumerate(all_windows)}
        window_ids = [torch.tensor([index[w.begin] for w in batch]) for batch in batches]
        settings = self.settings(len(ids))
        run_id = settings if world == 1 else {**settings, "rank": rank, "world_size": world}
        fingerprint = _fingerprint(run_id, ids)
        self._checkpoint_rank = (rank, world)
        # Without candidates the reference is compared with itself, which yields its perplexity.
        pairs = self.candidates or [self.reference]
        stats = [LogitStats(top_k=self.top_k) for _ in pairs]
        figures = {m.name: ModelFigures() for m in [self.reference, *self.candidates]}
        start_batch = 0
        if resume:
            start_batch = self._load_checkpoint(fingerprint, stats, figures)

        sources = [LogitSource(m.model, self.logit_chunk_tokens) for m in pairs]
        ref_source = None  # a store is read batch by batch in _run_batch
        if self.store is None:
            ref_source = LogitSource(self.reference.model, self.logit_chunk_tokens)
        bar = progress_bar(self.progress and rank == 0, total=len(batches), initial=start_batch)
        windows_done = sum(len(batch) for batch in batches[:start_batch])
        self._rss_start = peak_rss_mb()
        try:
            for b in range(start_batch, len(batches)):
                before = {name: (f.forward_seconds, f.tokens) for name, f in figures.items()}
                self._run_batch(ids, batches[b], window_ids[b], ref_source, sources, pairs,
                                stats, figures)  # fmt: skip
                windows_done += len(batches[b])
                if b == start_batch:  # this process's first batch: the warm-up
                    for name, (seconds, tokens) in before.items():
                        fig = figures[name]
                        fig.warmup_seconds += fig.forward_seconds - seconds
                        fig.warmup_tokens += fig.tokens - tokens
                done = b + 1
                if self.checkpoint_dir and (
                    done % self.checkpoint_every == 0 or done == len(batches)
                ):
                    self._save_checkpoint(fingerprint, done, stats, figures)
                if bar is not None:
                    ref_fig = figures[self.reference.name]
                    bar.update(1)
                    if ref_fig.tokens_per_second:
                        bar.set_postfix(tok_s=f"{ref_fig.tokens_per_second:,.0f}")
                if on_batch is not None:
                    on_batch(done, len(batches))
                if on_chunk is not None and rank == 0:
                    on_chunk(_chunk_progress(pairs, stats, windows_done, batches))
        finally:
            if bar is not None:
                bar.close()

        if world > 1:  # every rank's accumulators and figures, merged in rank order
            for st in stats:
                st.sync()
            gathered = all_gather_objects(figures)
            figures = {name: ModelFigures.combined([g[name] for g in gathered]) for name in figures}
        results = {m.name: s.compute() for m, s in zip(pairs, stats, strict=True)}
        levels = np.linspace(0.0, 1.0, 1001)
        kl_quantiles = {
            cand.name: st.kl_quantiles(levels)
            for cand, st in zip(self.candidates, stats, strict=False)
        }
        perplexity = {self.reference.name: next(iter(results.values())).ppl_ref}
        comparisons = {}
        for cand in self.candidates:
            comparisons[cand.name] = results[cand.name]
            perplexity[cand.name] = results[cand.name].ppl_quant
        return EvaluationResult(
            settings=settings,
            reference=self.reference.name,
            tokens_total=len(ids),
            windows=len(all_windows),
            comparisons=comparisons,
            perplexity=perplexity,
            figures=figures,
            origins={m.name: m.origin for m in [self.reference, *self.candidates]},
            environment=_environment(),
            kl_quantiles=kl_quantiles,
        )

    def _run_batch(
        self, ids, windows, window_ids, ref_source, sources, pairs, stats, figures
    ) -> None:
        input_ids = torch.stack([w.input_ids(ids) for w in windows])
        labels = torch.stack([w.labels(ids) for w in windows])
        n_tokens = input_ids.numel()

        ref_hidden = None
        if self.store is None:
            ref_hidden = self._timed(ref_source, figures[self.reference.name], ref_source.hidden,
                                     input_ids, n_tokens)  # fmt: skip
        hiddens = [
            ref_hidden if m is self.reference
            else self._timed(src, figures[m.name], src.hidden, input_ids, n_tokens)
            for m, src in zip(pairs, sources, strict=True)
        ]  # fmt: skip
        # Chunk-major: one [B, chunk, V] block per model is alive at a time.
        if self.store is None:
            ref_chunks = ref_source.chunks(ref_hidden)
        else:  # the stored reference, chunked like the candidates' logits
            ref_chunks = self.store.chunks(window_ids.tolist(), labels, self.logit_chunk_tokens)
        cand_chunks = [src.chunks(h) for src, h in zip(sources, hiddens, strict=True)]
        while True:
            t0 = time.perf_counter()
            step = next(ref_chunks, None)
            if step is None:
                break
            sl, ref_logits = step
            _synchronize(ref_logits.device)
            if self.store is None:
                figures[self.reference.name].forward_seconds += time.perf_counter() - t0
            for m, chunks, st in zip(pairs, cand_chunks, stats, strict=True):
                t0 = time.perf_counter()
                _, logits = next(chunks)
                _synchronize(logits.device)
                if m is not self.reference:
                    figures[m.name].forward_seconds += time.perf_counter() - t0
                chunk_labels = labels[:, sl]  # on the host: checking it is no device sync
                if not bool((chunk_labels != -100).any()):
                    continue
                dev = logits.device
                if isinstance(ref_logits, StoredTopK):  # top-K store: KL is a lower bound
                    tm = ref_logits.compare(logits, chunk_labels.to(dev), self.top_k)
                    st.update_metrics(tm, sequence_ids=window_ids)
                    continue
                st.update(ref_logits.to(dev), logits, chunk_labels.to(dev),
                          sequence_ids=window_ids)  # fmt: skip

    def _timed(self, source: LogitSource, fig: ModelFigures, fn, input_ids, n_tokens):
        dev = source.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        out = fn(input_ids)
        _synchronize(dev)
        fig.forward_seconds += time.perf_counter() - t0
        fig.tokens += n_tokens
        if dev.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(dev) - before) / 2**20
            fig.peak_memory_source = "cuda"
        elif dev.type == "cpu":
            peak = peak_rss_mb() - self._rss_start
            fig.peak_memory_source = "rss"
        else:
            return out
        fig.peak_memory_mb = max(fig.peak_memory_mb or 0.0, peak)
        return out

    # --- checkpoints --------------------------------------------------------------------------

    def _save_checkpoint(self, fingerprint: str, done: int, stats, figures) -> None:
        """Write the accumulators, then atomically point the metadata at them: a kill at any
        moment leaves either the previous checkpoint or this one, never a mix."""
        from safetensors.torch import save_file

        checkpoint_dir = self._rank_checkpoint_dir()
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{i}.{k}": v.contiguous()
            for i, st in enumerate(stats)
            for k, v in st.state_dict().items()
        }
        name = f"state-{done:07d}.safetensors"
        save_file(tensors, str(checkpoint_dir / name))
        meta = {
            "fingerprint": fingerprint,
            "batches_done": done,
            "tensors": name,
            "figures": {model: fig.to_dict() for model, fig in figures.items()},
        }
        tmp = checkpoint_dir / (CHECKPOINT_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, checkpoint_dir / CHECKPOINT_META)
        for old in checkpoint_dir.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink()

    def _load_checkpoint(self, fingerprint: str, stats, figures) -> int:
        """Restore the accumulators and figures; returns the number of finished batches."""
        from safetensors.torch import load_file

        if self.checkpoint_dir is None:
            raise ValueError("resume needs a checkpoint directory")
        checkpoint_dir = self._rank_checkpoint_dir()
        meta_path = checkpoint_dir / CHECKPOINT_META
        if not meta_path.exists():
            self._check_no_other_world()
            return 0  # nothing to resume: start from the beginning
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != fingerprint:
            raise ValueError(
                f"cannot resume from {checkpoint_dir}: it was written by a run with other "
                "settings or another corpus"
            )
        tensors = load_file(str(checkpoint_dir / meta["tensors"]))
        for i, st in enumerate(stats):
            prefix = f"{i}."
            st.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
        for name, fig in meta["figures"].items():
            if name in figures:
                figures[name].forward_seconds = fig["forward_seconds"]
                figures[name].tokens = fig["tokens"]
                figures[name].peak_memory_mb = fig["peak_memory_mb"]
                # absent from checkpoints written before the warm-up was kept apart
                figures[name].warmup_seconds = fig.get("warmup_seconds", 0.0)
                figures[name].warmup_tokens = fig.get("warmup_tokens", 0)
                figures[name].peak_memory_source = fig.get("peak_memory_source")
        return int(meta["batches_done"])

    def _rank_checkpoint_dir(self) -> Path:
        """Where this process checkpoints: ``checkpoint_dir``, or ``checkpoint_dir/rank-R-of-W``
        for rank R of a W-process run (each rank saves and resumes its own windows)."""
        assert self.checkpoint_dir is not None
        rank, world = self._checkpoint_rank
        if world == 1:
            return self.checkpoint_dir
        return self.checkpoint_dir / f"rank-{rank}-of-{world}"

    def _check_no_other_world(self) -> None:
        """Raise when ``checkpoint_dir`` holds a checkpoint of a run with another number of
        processes (resuming would silently start over)."""
        assert self.checkpoint_dir is not None
        _, world = self._checkpoint_rank
        found = {
            int(d.name.rpartition("-of-")[2])
            for d in self.checkpoint_dir.glob("rank-*-of-*")
            if (d / CHECKPOINT_META).exists() and d.name.rpartition("-of-")[2].isdigit()
        }
        if (self.checkpoint_dir / CHECKPOINT_META).exists():
            found.add(1)
        found.discard(world)
        if found:
            raise ValueError(
                f"cannot resume from {self.checkpoint_dir}: it holds a checkpoint of a run with "
                f"{min(found)} process(es), this run has {world}; resume with the same number"
            )


def _chunk_progress(
    pairs: Sequence[ModelEntry], stats: Sequence[LogitStats], done: int, batches: list
) -> ChunkProgress:
    """The running statistics of every pair (pairs with no scored token yet are left out)."""
    results = {}
    for m, st in zip(pairs, stats, strict=True):
        try:
            results[m.name] = st.compute()
        except ValueError:  # nothing scored yet (bad labels raise again at the end)
            continue
    return ChunkProgress(done, sum(len(b) for b in batches), results)


def _fingerprint(settings: dict[str, Any], ids: torch.Tensor) -> str:
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()


def _environment() -> dict[str, Any]:
    """Package versions (:func:`environment.versions`) and the device the run used."""
    env: dict[str, Any] = dict(versions())
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return env
