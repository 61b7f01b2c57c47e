"""Evaluation corpora: loading text, tokenizing it once (checked against every other model's
tokenizer: :func:`tokenize_checked`), cutting scoring windows (:func:`make_windows`) and grouping
them into batches (:func:`batch_windows`, :func:`token_batches`).

Sources: ``"demo"`` (the held-out text shipped with the demo model), local ``.txt`` /
``.jsonl`` / ``.parquet`` files (``text_field`` names the column), or a Hugging Face dataset
``NAME[:CONFIG[:SPLIT]]`` loaded with ``datasets.load_dataset`` (``allenai/c4`` is streamed).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

DEMO_SOURCE = "demo"
_STREAMED = ("allenai/c4", "c4")


class CorpusError(ValueError):
    """The corpus cannot be read, is empty, or does not tokenize consistently."""


def demo_text_path() -> Path:
    """Path of the held-out text shipped with the demo model."""
    return Path(str(resources.files("qmetrics") / "demo_model" / "heldout.txt"))


def iter_texts(source: str, *, text_field: str = "text", split: str | None = None) -> Iterator[str]:
    """Yield the documents of ``source`` (see the module docstring for what it may name)."""
    if source == DEMO_SOURCE:
        yield demo_text_path().read_text(encoding="utf-8")
        return
    path = Path(source)
    if path.suffix in (".txt", ".jsonl", ".parquet") or path.exists():
        yield from _iter_file(path, text_field)
        return
    yield from _iter_hub_dataset(source, text_field=text_field, split=split)


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if text_field not in record:
                        raise CorpusError(
                            f"{path}:{lineno}: no field {text_field!r} "
                            f"(fields: {', '.join(sorted(record))})"
                        )
                    yield str(record[text_field])
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise CorpusError(
                    f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)})"
                )
            yield from (str(t) for t in table.column(text_field).to_pylist() if t is not None)
        else:
            yield path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorpusError(f"cannot read corpus {path}: {exc}") from exc


def _iter_hub_dataset(source: str, *, text_field: str, split: str | None) -> Iterator[str]:
    name, _, rest = source.partition(":")
    config, _, split_in_name = rest.partition(":")
    split = split_in_name or split or ("validation" if name in _STREAMED else "test")
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError(
            f"corpus {source!r} is neither a file nor 'demo'; loading Hugging Face datasets "
            "needs the 'datasets' package: pip install 'qmetrics[hf]'"
        ) from exc
    if name == "c4":
        name, config = "allenai/c4", config or "en"
    try:
        data = datasets.load_dataset(name, config or None, split=split, streaming=name in _STREAMED)
    except Exception as exc:  # datasets raises many types for unreachable/unknown datasets
        raise CorpusError(f"cannot load dataset {source!r} (split {split!r}): {exc}") from exc
    for record in data:
        if text_field not in record:
            raise CorpusError(f"dataset {source!r} has no field {text_field!r}")
        yield str(record[text_field])


def tokenize_texts(
    texts: Iterable[str],
    tokenizer,
    *,
    separator: str = "\n\n",
    max_tokens: int | None = None,
    add_bos: bool = True,
) -> torch.Tensor:
    """Token ids of the documents joined by ``separator`` (one BOS first when the tokenizer
    has one and ``add_bos``), truncated to ``max_tokens``; empty documents are skipped.

    Documents are tokenized one at a time (``separator`` appended to each but the last read),
    so a streamed corpus stops being read once ``max_tokens`` is reached.
    """
    ids: list[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    n_special = 1 if add_bos and bos is not None else 0
    ids.extend([bos] * n_special)
    first = True
    for text in texts:
        if not text.strip():
            continue
        piece = text if first else separator + text
        first = False
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) == n_special:
        raise CorpusError("the corpus is empty: it holds no text to score")
    if len(ids) < 2:
        raise CorpusError(f"the corpus is too short: {len(ids)} token, need at least 2")
    return torch.tensor(ids, dtype=torch.long)


def check_same_tokens(reference: torch.Tensor, other: torch.Tensor, name: str) -> None:
    """Raise naming the first position where two tokenizations of the corpus differ."""
    n = min(len(reference), len(other))
    diff = (reference[:n] != other[:n]).nonzero()
    if len(diff):
        pos = int(diff[0])
        raise CorpusError(
            f"tokenizer mismatch: {name} tokenizes the corpus differently from the reference, "
            f"first at token {pos} (reference id {int(reference[pos])}, {name} id "
            f"{int(other[pos])})"
        )
    if len(reference) != len(other):
        raise CorpusError(
            f"tokenizer mismatch: {name} gives {len(other)} tokens, the reference "
            f"{len(reference)} (identical for the first {n})"
        )


def tokenize_checked(
    texts: Iterable[str],
    tokenizer: Any,
    others: Sequence[tuple[str, Any]] = (),
    *,
    separator: str = "\n\n",
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Token ids of ``texts`` under ``tokenizer`` (:func:`tokenize_texts`), checked to be
    identical under every other ``(name, tokenizer)`` in ``others`` (:func:`check_same_tokens`;
    a None tokenizer, or ``tokenizer`` itself, is skipped).

    The others read exactly the documents the reference read, so a streamed corpus is read
    once and only as far as ``max_tokens`` needs. Raises :class:`CorpusError` on a mismatch.
    """
    read: list[str] = []

    def recorded(source: Iterable[str]) -> Iterator[str]:
        for text in source:
            read.append(text)
            yield text

    ids = tokenize_texts(recorded(texts), tokenizer, separator=separator, max_tokens=max_tokens)
    for name, other in others:
        if other is None or other is tokenizer:
            continue
        theirs = tokenize_texts(read, other, separator=separator, max_tokens=max_tokens)
        check_same_tokens(ids, theirs, name)
    return ids


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` run through the model; targets at positions ``≥ score_from``
    (absolute token indices) are scored, each predicted from the tokens before it in the
    window. ``first_token`` (when not None) is fed at the window's first position instead of
    ``ids[begin]`` (llama.cpp puts BOS there); that token is never a target of its window."""

    begin: int
    end: int
    score_from: int
    first_token: int | None = None

    @property
    def length(self) -> int:
        return self.end - self.begin

    def input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The token ids fed to the model: ``ids[begin:end]``, the first one replaced by
        ``first_token`` when set (a copy then; ``ids`` is never modified)."""
        window = ids[self.begin : self.end]
        if self.first_token is None:
            return window
        window = window.clone()
        window[0] = self.first_token
        return window

    def labels(self, ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Next-token labels for the window's positions (the last position has none)."""
        labels = torch.full((self.length,), ignore_index, dtype=torch.long)
        targets = ids[self.begin + 1 : self.end]
        labels[: self.length - 1] = targets
        first_scored = max(self.score_from, self.begin + 1) - self.begin - 1
        labels[:first_scored] = ignore_index
        return labels


#: Scoring modes of :func:`make_windows`: which tokens are fed and which are scored.
SCORING_MODES = ("transformers", "llama.cpp")


def make_windows(
    n_tokens: int,
    context_length: int,
    stride: int | None = None,
    *,
    scoring: str = "transformers",
    bos_id: int | None = None,
) -> list[Window]:
    """Windows over ``n_tokens`` tokens.

    ``scoring="transformers"`` (the transformers perplexity guide): non-overlapping by default
    (``stride = context_length``), each window scoring all its tokens but the first. With
    ``stride < context_length`` windows start every ``stride`` tokens and score only the tokens
    not scored before, each with up to ``context_length − 1`` tokens of preceding context, so
    every token after the first is scored exactly once. ``bos_id`` is not used.

    ``scoring="llama.cpp"`` (``llama-perplexity``, also with ``--kl-divergence``): chunks
    ``[i·C, (i+1)·C)`` for i < ⌊n_tokens / C⌋ with C = ``context_length`` (a trailing partial
    chunk is dropped); ``bos_id`` (when not None) replaces each chunk's first token; with
    first = ⌊C/2⌋ only the targets at ``begin + first + 1 … end − 1`` are scored, i.e. the
    logits of positions first … C − 2: C − 1 − ⌊C/2⌋ tokens per chunk. ``stride`` must be
    None or C.
    """
    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring must be one of {', '.join(SCORING_MODES)}, got {scoring!r}")
    if scoring == "llama.cpp":
        return _llamacpp_chunks(n_tokens, context_length, stride, bos_id)
    if context_length < 2:
        raise ValueError(f"context_length must be ≥ 2, got {context_length}")
    stride = context_length if stride is None else stride
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}")
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        if end - begin < 2:
            break
        windows.append(Window(begin, end, score_from=prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _llamacpp_chunks(
    n_tokens: int, context_length: int, stride: int | None, bos_id: int | None
) -> list[Window]:
    """The chunks of ``scoring="llama.cpp"`` (see :func:`make_windows`)."""
    if context_length < 3:
        raise ValueError(
            f"llama.cpp scoring needs context_length ≥ 3 (it scores the last "
            f"C − 1 − ⌊C/2⌋ tokens of each chunk), got {context_length}"
        )
    if stride is not None and stride != context_length:
        raise ValueError(
            f"llama.cpp scoring uses non-overlapping chunks: stride must be unset, got {stride}"
        )
    n_chunks = n_tokens // context_length
    if n_chunks == 0:
        raise ValueError(
            f"llama.cpp scoring needs at least one chunk of context_length={context_length} "
            f"tokens, the corpus has {n_tokens}"
        )
    first = context_length // 2
    return [
        Window(begin, begin + context_length, score_from=begin + first + 1, first_token=bos_id)
        for begin in range(0, n_chunks * context_length, context_length)
    ]


def batch_windows(
    windows: Iterable[Window], batch_size: int, max_tokens: int | None = None
) -> list[list[Window]]:
    """``windows`` grouped in order into batches of at most ``batch_size`` consecutive windows
    of one length (a window of another length starts a new batch). With ``max_tokens`` the
    windows stop before their total length would exceed it (the first window is always kept).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
    batches: list[list[Window]] = []
    used = 0
    for w in windows:
        if max_tokens is not None and batches and used + w.length > max_tokens:
            break
        used += w.length
        if batches and len(batches[-1]) < batch_size and batches[-1][0].length == w.length:
            batches[-1].append(w)
        else:
            batches.append([w])
    return batches


def token_batches(
    ids: torch.Tensor, context_length: int, batch_size: int, max_tokens: int | None = None
) -> list[torch.Tensor]:
    """Input-id batches [B, T] of the non-overlapping windows of ``ids``
    (:func:`make_windows`, :func:`batch_windows`), using at most ``max_tokens`` tokens (at
    least one window)."""
    batches = batch_windows(make_windows(len(ids), context_length), batch_size, max_tokens)
    return [torch.stack([ids[w.begin : w.end] for w in batch]) for batch in batches]
