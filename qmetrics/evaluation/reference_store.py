"""A reference store: the reference model's outputs on a corpus, saved once, so candidates can be
compared later without loading the reference model (:class:`ReferenceStore`, written by
:func:`save_reference_store`, read by :class:`qmetrics.evaluation.compare.QuantizationEvaluator`).

A store is a folder:

- ``manifest.json``: the model (name, origin, config hash, dtype), the tokenizer hash, the
  token ids' count and hash, the windowing (context length, stride, max tokens, separator),
  the store mode and vocabulary size, the qmetrics version, a ``run_id`` hashing all of these,
  and one entry per shard (file, window range, scored-token count, byte size, sha256);
- ``tokens.safetensors``: the corpus token ids (int32), to name the first differing token when
  a candidate tokenizes the corpus otherwise;
- ``shard-NNNNN.safetensors``: one per batch of windows (``batch_size`` windows at save time),
  rows = the scored tokens of those windows in order, metadata holding the ``run_id``.

Modes (:class:`StoreMode`):

- ``topk:K`` (default K = 64): per scored token the label's log-prob, the entropy and log-sum-exp
  (fp32), the argmax (int32), the top-K log-probs (fp16) with their ids (int32), the log of the
  mass outside the top-K (fp32) and K tie bits (fields and formulas:
  :mod:`qmetrics.kernels.topk_reference_compare_torch`): 6·K + 20 + ⌈K/8⌉ bytes per token
  (412 at K = 64);
- ``full[:DTYPE]``: every logit, bf16 by default (``full:float32`` / ``full:float16`` keep
  another precision): 2·V bytes per token in bf16, like llama.cpp's base-logits file.

Writes are atomic per shard (temp file, fsync, ``os.replace``; the manifest likewise after each
shard) and resumable: rerunning a killed save with the same arguments checks the finished shards
against the manifest's hashes, skips them, and ends with a store identical byte for byte to an
uninterrupted one (nothing in it depends on time or on where the save stopped). Reading checks
everything it uses and raises :class:`StoreError` (a ``ValueError``; the CLI exits 2) naming the
problem: a missing or incomplete store, a corrupt manifest, a missing or damaged shard, a shard
of another run, or a corpus, tokenizer, vocabulary or windowing other than the store's.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qmetrics.evaluation.corpus import (
    Window,
    batch_windows,
    iter_texts,
    make_windows,
    tokenize_checked,
)
from qmetrics.evaluation.distributed import all_gather_objects, rank_and_world
from qmetrics.evaluation.logit_source import LogitSource
from qmetrics.evaluation.models import ModelEntry, as_entry
from qmetrics.evaluation.progress import progress_bar
from qmetrics.kernels.topk_reference_compare_torch import SUMMARY_FIELDS, tie_bytes
from qmetrics.metrics.reference_compare import compare_to_reference_topk, summarize_reference_topk
from qmetrics.metrics.token_metrics import TokenMetrics

MANIFEST = "manifest.json"
TOKENS = "tokens.safetensors"
FORMAT = "qmetrics-reference-store"
FORMAT_VERSION = 1
DEFAULT_TOP_K = 64
IGNORE_INDEX = -100
_FULL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: Bytes per token of llama.cpp's base-logits file (fp16 logits): 2·V.
LLAMA_CPP_BYTES_PER_VOCAB = 2


class StoreError(ValueError):
    """The reference store is missing, damaged, of another run, or does not fit the run."""


@dataclass(frozen=True)
class StoreMode:
    """``topk:K`` (a per-token top-K summary) or ``full:DTYPE`` (every logit)."""

    kind: str  # "topk" or "full"
    top_k: int | None = None
    dtype: str | None = None

    @classmethod
    def parse(cls, spec: str) -> StoreMode:
        """``"topk"``, ``"topk:K"``, ``"full"`` (bf16) or ``"full:bfloat16|float16|float32"``."""
        kind, _, arg = str(spec).strip().partition(":")
        if kind == "topk":
            try:
                k = int(arg) if arg else DEFAULT_TOP_K
            except ValueError:
                raise StoreError(f"--store topk:K needs an integer K ≥ 1, got {spec!r}") from None
            if k < 1:
                raise StoreError(f"--store topk:K needs K ≥ 1, got {spec!r}")
            return cls("topk", top_k=k)
        if kind == "full":
            dtype = arg or "bfloat16"
            if dtype not in _FULL_DTYPES:
                raise StoreError(
                    f"--store full:DTYPE takes one of {', '.join(_FULL_DTYPES)}, got {spec!r}"
                )
            return cls("full", dtype=dtype)
        raise StoreError(f"--store must be topk[:K] or full[:DTYPE], got {spec!r}")

    def __str__(self) -> str:
        return f"topk:{self.top_k}" if self.kind == "topk" else f"full:{self.dtype}"

    def bytes_per_token(self, vocab: int) -> int:
        """Bytes of one scored token in a shard (tensor data, headers aside)."""
        if self.kind == "full":
            return vocab * _FULL_DTYPES[str(self.dtype)].itemsize
        k = int(self.top_k or 0)
        return 6 * k + 5 * 4 + tie_bytes(k)


# --- hashes ---------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str).encode()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token → id) and its BOS/EOS/UNK ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    specials = [getattr(tokenizer, f"{t}_token_id", None) for t in ("bos", "eos", "unk")]
    return _sha256(_json_bytes({"vocab": vocab, "specials": specials}))


def config_hash(model: torch.nn.Module) -> str:
    """sha256 of the model's config (``config.to_dict()``), or of its class name without one."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return _sha256(_json_bytes(config.to_dict()))
    return _sha256(type(model).__qualname__.encode())


def ids_hash(ids: torch.Tensor) -> str:
    """sha256 of the token ids as little-endian int64."""
    return _sha256(ids.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# --- atomic writes --------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_atomically(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it over ``final`` and fsync the folder."""
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_json_atomically(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    _replace_atomically(tmp, path)


def _save_tensors_atomically(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _replace_atomically(tmp, path)


# --- windows --------------------------------------------------------------------------------------


def scored_count(window: Window) -> int:
    """Scored tokens of a window: targets at positions ≥ max(score_from, begin + 1)."""
    return max(0, window.end - max(window.score_from, window.begin + 1))


def _qmetrics_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qmetrics")
    except PackageNotFoundError:
        return None


# --- writing --------------------------------------------------------------------------------------


def save_reference_store(
    reference: ModelEntry | torch.nn.Module,
    corpus: str | Iterable[str] | torch.Tensor,
    output: str | os.PathLike,
    *,
    mode: str | StoreMode = "topk:64",
    tokenizer: Any | None = None,
    context_length: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    max_tokens: int | None = None,
    separator: str = "\n\n",
    scoring: str = "transformers",
    logit_chunk_tokens: int | None = 256,
    dataset: str | None = None,
    progress: bool = True,
    on_shard: Any | None = None,
) -> ReferenceStore:
    """Run ``reference`` once over ``corpus`` and write a store into ``output`` (module
    docstring); resumes a killed save of the same run. Windows and batches are those of
    :class:`qmetrics.evaluation.compare.QuantizationEvaluator` with the same settings; one shard
    per batch. ``on_shard(done, total)`` is called after each shard is written. Raises
    :class:`StoreError` when ``output`` holds a store of another run or a corrupt manifest
    (never overwriting it)."""
    entry = as_entry(reference, "reference", tokenizer)
    if entry.tokenizer is None and not isinstance(corpus, torch.Tensor):
        raise ValueError("a tokenizer is needed: pass tokenizer= or a ModelEntry with one")
    store_mode = mode if isinstance(mode, StoreMode) else StoreMode.parse(mode)
    if isinstance(corpus, torch.Tensor):
        ids = corpus.long().reshape(-1)
    else:
        texts = iter_texts(corpus) if isinstance(corpus, str) else corpus
        ids = tokenize_checked(texts, entry.tokenizer, separator=separator, max_tokens=max_tokens)
    stride_value = stride or context_length
    bos = getattr(entry.tokenizer, "bos_token_id", None)
    windows = make_windows(len(ids), context_length, stride, scoring=scoring, bos_id=bos)
    batches = batch_windows(windows, batch_size)
    param = next(entry.model.parameters(), None)
    if store_mode.kind == "full" and param is not None:
        itemsize = _FULL_DTYPES[str(store_mode.dtype)].itemsize
        if param.dtype.is_floating_point and param.dtype.itemsize > itemsize:
            warnings.warn(
                f"--store {store_mode} rounds the {param.dtype} reference's logits: on the "
                "bundled fp32 demo model that alone adds 3e-5 nats to the mean KL (4× an int8 "
                "candidate's); use --store full:float32 to keep them exact",
                stacklevel=2,
            )
    model_info = {
        "name": entry.name,
        "origin": entry.origin,
        "config_hash": config_hash(entry.model),
        "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
        "device_type": param.device.type if param is not None else "cpu",
    }
    windowing = {
        "context_length": context_length,
        "stride": stride_value,
        "max_tokens": max_tokens,
        "separator": separator,
        "scoring": scoring,
        "bos_id": bos,
        "windows": len(windows),
        "scored_tokens": sum(scored_count(w) for w in windows),
    }
    tok_hash = tokenizer_hash(entry.tokenizer) if entry.tokenizer is not None else None
    tokens = {"file": TOKENS, "count": len(ids), "sha256": ids_hash(ids)}
    store_info: dict[str, Any] = {
        "mode": store_mode.kind,
        "top_k": store_mode.top_k,
        "dtype": store_mode.dtype,
        "shard_windows": batch_size,
    }
    run_id = _sha256(
        _json_bytes([FORMAT_VERSION, model_info, tok_hash, tokens, windowing, store_info])
    )[:20]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    old = _read_existing_manifest(out, run_id)
    for stale in out.glob(".*.tmp"):  # a killed save's half-written file: never read, replaced
        stale.unlink()
    first = 0
    shards = []
    for i, batch in enumerate(batches):
        count = sum(scored_count(w) for w in batch)
        shards.append({"file": f"shard-{i:05d}.safetensors", "windows": [first, first + len(batch)],
                       "tokens": count, "bytes": None, "sha256": None})  # fmt: skip
        first += len(batch)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "complete": False,
        "qmetrics_version": _qmetrics_version(),
        "model": model_info,
        "tokenizer_sha256": tok_hash,
        "tokens": tokens,
        "windowing": windowing,
        "store": {**store_info, "vocab_size": None},
        "dataset": dataset,
        "shards": shards,
    }
    if old is not None:
        manifest["store"]["vocab_size"] = old["store"].get("vocab_size")
        for entry_new, entry_old in zip(shards, old.get("shards", []), strict=False):
            if entry_old.get("file") == entry_new["file"] and entry_old.get("sha256"):
                entry_new.update(bytes=entry_old.get("bytes"), sha256=entry_old["sha256"])
    rank, world = rank_and_world()
    tokens_path = out / TOKENS
    manifest_path = out / MANIFEST
    if rank == 0:
        if not tokens_path.exists() or _stored_ids_hash(tokens_path) != tokens["sha256"]:
            if int(ids.max()) >= 2**31 or int(ids.min()) < 0:
                raise ValueError("token ids must lie in [0, 2^31) to be stored")
            _save_tensors_atomically(tokens_path, {"ids": ids.to(torch.int32)}, {"run_id": run_id})
        _write_json_atomically(manifest_path, manifest)
    all_gather_objects(None)  # under torchrun: the other ranks wait for the manifest

    # Under torchrun rank r writes shards r, r + N, ...: each is renamed into place only when
    # complete, so a shard file of this run found at its final path is a finished one (the
    # manifest, written by rank 0 alone, records the shards at the end).
    mine = [i for i in range(len(batches)) if i % world == rank]
    source = LogitSource(entry.model, logit_chunk_tokens)
    bar = progress_bar(progress and rank == 0, total=len(mine), initial=0)
    try:
        for i in mine:
            batch, shard = batches[i], shards[i]
            path = out / shard["file"]
            if _finished_shard(path, shard, run_id, sharded=world > 1):
                if bar is not None:
                    bar.update(1)
                continue  # finished by an earlier (killed) save of this run
            tensors, vocab = _shard_tensors(source, ids, batch, store_mode)
            if manifest["store"]["vocab_size"] not in (None, vocab):
                raise StoreError(f"vocab size changed within the run: {vocab}")
            manifest["store"]["vocab_size"] = vocab
            # one metadata key: safetensors writes several in no fixed order (and a store must
            # come out byte-identical); the shard is named by its file and manifest hash
            meta = {"run_id": run_id}
            _save_tensors_atomically(path, tensors, meta)
            shard.update(bytes=path.stat().st_size, sha256=_file_sha256(path))
            if world == 1:
                _write_json_atomically(manifest_path, manifest)
            if bar is not None:
                bar.update(1)
            if on_shard is not None:
                on_shard(i + 1, len(batches))
    finally:
        if bar is not None:
            bar.close()
    done = {i: (shards[i]["bytes"], shards[i]["sha256"]) for i in mine}
    parts = all_gather_objects((done, manifest["store"]["vocab_size"]))
    if rank == 0:
        for part, vocab in parts:
            for i, (size, digest) in part.items():
                shards[i].update(bytes=size, sha256=digest)
            if vocab is not None:
                manifest["store"]["vocab_size"] = vocab
        manifest["complete"] = True
        _write_json_atomically(manifest_path, manifest)
    all_gather_objects(None)  # every rank returns the complete store
    return ReferenceStore.open(out)


def _finished_shard(path: Path, shard: dict[str, Any], run_id: str, sharded: bool) -> bool:
    """Whether ``path`` holds this run's finished shard: its hash is the manifest's, or (under
    torchrun, where the manifest records shards only at the end) it is a shard file of this
    run at its final path, which only a completed atomic write puts there. Fills in the
    shard's size and hash."""
    if not path.exists():
        return False
    if shard["sha256"] and _file_sha256(path) == shard["sha256"]:
        return True
    if not sharded:
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("run_id") != run_id:
                return False
    except Exception:  # noqa: BLE001 - an unreadable file is not a finished shard
        return False
    shard.update(bytes=path.stat().st_size, sha256=_file_sha256(path))
    return True


def _read_existing_manifest(out: Path, run_id: str) -> dict[str, Any] | None:
    """The manifest of an earlier save of this run in ``out`` (to resume), or None; raises
    when ``out`` holds a corrupt manifest or another run's store."""
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(
            f"{path} is corrupt ({exc}); not overwriting it: remove the folder or choose another "
            "--output"
        ) from exc
    if not isinstance(old, dict) or old.get("run_id") != run_id:
        raise StoreError(
            f"{out} holds a reference store of another run (other model, corpus or settings); "
            "choose another --output or remove it"
        )
    return old


def _stored_ids_hash(path: Path) -> str | None:
    from safetensors.torch import load_file

    try:
        return ids_hash(load_file(str(path))["ids"])
    except Exception:  # a damaged tokens file is rewritten
        return None


@torch.no_grad()
def _shard_tensors(
    source: LogitSource, ids: torch.Tensor, batch: list[Window], mode: StoreMode
) -> tuple[dict[str, torch.Tensor], int]:
    """The stored rows of one batch of windows (scored tokens in window, then position order)
    and the vocabulary size."""
    input_ids = torch.stack([w.input_ids(ids) for w in batch])
    labels = torch.stack([w.labels(ids, IGNORE_INDEX) for w in batch])
    mask = labels != IGNORE_INDEX
    rank = (mask.reshape(-1).cumsum(0) - 1).reshape(mask.shape)
    n_rows = int(mask.sum())
    hidden = source.hidden(input_ids)
    out: dict[str, torch.Tensor] | None = None
    vocab = 0
    for sl, logits in source.chunks(hidden):
        vocab = logits.shape[-1]
        m = mask[:, sl]
        rows = rank[:, sl][m]
        if mode.kind == "full":
            part = {"logits": logits.cpu()[m].to(_FULL_DTYPES[str(mode.dtype)])}
        else:
            top_k = min(int(mode.top_k or 0), vocab)
            summary = summarize_reference_topk(
                logits, labels[:, sl].to(logits.device), top_k, ignore_index=IGNORE_INDEX
            )
            flat = m.reshape(-1)
            part = {k: v.cpu()[flat] for k, v in summary.items()}
        if out is None:
            out = {k: v.new_zeros((n_rows, *v.shape[1:])) for k, v in part.items()}
        for k, v in part.items():
            out[k][rows] = v
    assert out is not None
    return out, vocab


# --- reading --------------------------------------------------------------------------------------


class StoredTopK:
    """The stored top-K summary for one [B, chunk] block of positions (rows flattened B-major)
    of a store whose reference had ``vocab`` logits per token."""

    def __init__(self, fields: dict[str, torch.Tensor], vocab: int):
        self.fields = fields
        self.vocab = vocab

    @property
    def device(self) -> torch.device:
        return self.fields["topk_ids"].device

    def to(self, device: torch.device) -> StoredTopK:
        return StoredTopK({k: v.to(device) for k, v in self.fields.items()}, self.vocab)

    def compare(self, logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> TokenMetrics:
        """Per-token metrics of candidate ``logits`` [B, chunk, V] against this block
        (:func:`qmetrics.metrics.reference_compare.compare_to_reference_topk`)."""
        if logits.shape[-1] != self.vocab:
            raise StoreError(
                f"vocab size mismatch: a candidate has V={logits.shape[-1]}, the reference "
                f"store V={self.vocab}"
            )
        fields = {k: v.to(logits.device) for k, v in self.fields.items()}
        return compare_to_reference_topk(
            fields, logits, labels, top_k=top_k, ignore_index=IGNORE_INDEX
        )


class ReferenceStore:
    """A complete, validated store folder (module docstring); open with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.mode = StoreMode(
            manifest["store"]["mode"],
            manifest["store"].get("top_k"),
            manifest["store"].get("dtype"),
        )
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self._windows: list[Window] | None = None
        self._offsets: list[int] | None = None

    # --- opening and checks -------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike) -> ReferenceStore:
        """Open the store in ``path``: the manifest must parse and describe a complete store
        whose shard files all exist with their recorded sizes. Raises :class:`StoreError`."""
        root = Path(path)
        manifest_path = root / MANIFEST
        if not root.is_dir():
            raise StoreError(f"no reference store at {root}: the folder does not exist")
        if not manifest_path.is_file():
            raise StoreError(f"no reference store at {root}: {MANIFEST} is missing")
        try:
            manifest = json.loads(manifest_path.read_text())
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise ValueError("not a qmetrics reference-store manifest")
            for key in ("run_id", "model", "tokens", "windowing", "store", "shards"):
                if key not in manifest:
                    raise ValueError(f"no {key!r} entry")
            if manifest.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format version {manifest.get('format_version')}")
            StoreMode(manifest["store"]["mode"])
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"corrupt reference store manifest {manifest_path}: {exc}") from exc
        if not manifest.get("complete"):
            done = sum(1 for s in manifest["shards"] if s.get("sha256"))
            raise StoreError(
                f"reference store {root} is incomplete ({done} of {len(manifest['shards'])} "
                "shards): rerun `qmetrics reference save` with the same arguments to finish it"
            )
        for shard in manifest["shards"]:
            file = root / shard["file"]
            if not file.is_file():
                raise StoreError(f"reference store {root}: shard {shard['file']} is missing")
            if file.stat().st_size != shard["bytes"]:
                raise StoreError(
                    f"reference store {root}: shard {shard['file']} has {file.stat().st_size} "
                    f"bytes, the manifest says {shard['bytes']} (damaged or of another run)"
                )
        return cls(root, manifest)

    @property
    def run_id(self) -> str:
        return str(self.manifest["run_id"])

    @property
    def model_name(self) -> str:
        return str(self.manifest["model"]["name"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["store"]["vocab_size"])

    @property
    def windowing(self) -> dict[str, Any]:
        return dict(self.manifest["windowing"])

    @property
    def dataset(self) -> str | None:
        return self.manifest.get("dataset")

    @property
    def scored_tokens(self) -> int:
        return int(self.manifest["windowing"]["scored_tokens"])

    @property
    def size_bytes(self) -> int:
        """Bytes of every file of the store (shards, tokens, manifest)."""
        files = [self.path / MANIFEST, self.path / TOKENS]
        files += [self.path / s["file"] for s in self.manifest["shards"]]
        return sum(f.stat().st_size for f in files if f.exists())

    def describe(self) -> dict[str, Any]:
        """What a report says about the store: path, run id, mode, model, size."""
        return {
            "path": str(self.path),
            "run_id": self.run_id,
            "mode": str(self.mode),
            "model": self.model_name,
            "bytes_per_token": self.size_bytes / max(1, self.scored_tokens),
        }

    def entry(self, candidates: Iterable[Any], tokenizer: Any | None = None) -> ModelEntry:
        """The reference's stand-in for an evaluation (a :class:`ModelEntry` without a model,
        named like the stored model): its tokenizer is ``tokenizer`` or the first candidate's,
        and every tokenizer given must be the store's. Raises :class:`StoreError` / ValueError.
        """
        candidates = list(candidates)
        if not candidates:
            raise ValueError("a reference store needs at least one candidate to compare")
        named = [("tokenizer=", tokenizer)] + [
            (getattr(c, "name", f"candidate-{i}"), getattr(c, "tokenizer", None))
            for i, c in enumerate(candidates)
        ]
        for name, tok in named:
            self.check_tokenizer(tok, name)
        tok = next((t for _, t in named if t is not None), None)
        if tok is None:
            raise ValueError("a tokenizer is needed: pass tokenizer= or a candidate with one")
        origin = {"source": "reference-store", **self.describe(),
                  "stored_model": self.manifest["model"]}  # fmt: skip
        return ModelEntry(self.model_name, None, tok, origin)  # type: ignore[arg-type]

    def check_top_k(self, top_k: int) -> None:
        """Raise :class:`StoreError` when top-k agreement for ``top_k`` needs more than the
        K ids a top-K store kept."""
        if self.mode.kind == "topk" and top_k > int(self.mode.top_k or 0):
            raise StoreError(
                f"--top-k {top_k} needs the reference's top {top_k}, the store keeps "
                f"{self.mode.top_k} (topk:{self.mode.top_k})"
            )

    def resolve_windowing(
        self,
        context_length: int | None,
        stride: int | None,
        max_tokens: int | None,
        separator: str,
        scoring: str = "transformers",
    ) -> tuple[int, int | None, int | None]:
        """(context length, stride, max tokens): the store's where None, checked against the
        store's (:meth:`check_windowing`) otherwise."""
        w = self.manifest["windowing"]
        context_length = int(w["context_length"]) if context_length is None else context_length
        if stride is None and scoring != "llama.cpp":
            stride = int(w["stride"])
        max_tokens = w.get("max_tokens") if max_tokens is None else max_tokens
        self.check_windowing(context_length, stride, max_tokens, separator, scoring)
        return context_length, stride, max_tokens

    def check_windowing(
        self,
        context_length: int,
        stride: int | None,
        max_tokens: int | None,
        separator: str,
        scoring: str = "transformers",
    ) -> None:
        """Raise :class:`StoreError` unless the run's windowing is the store's."""
        w = self.manifest["windowing"]
        ours = {"context_length": context_length, "stride": stride or context_length,
                "max_tokens": max_tokens, "separator": separator,
                "scoring": scoring}  # fmt: skip
        diff = [f"{k} {ours[k]!r} (store: {w.get(k)!r})" for k in ours if ours[k] != w.get(k)]
        if diff:
            raise StoreError(
                f"windowing mismatch with reference store {self.path}: {', '.join(diff)}"
            )

    def check_tokenizer(self, tokenizer: Any, name: str) -> None:
        """Raise :class:`StoreError` when ``tokenizer`` is not the store's (vocabulary hash)."""
        stored = self.manifest.get("tokenizer_sha256")
        if tokenizer is None or stored is None:
            return
        if tokenizer_hash(tokenizer) != stored:
            raise StoreError(
                f"tokenizer mismatch: {name}'s tokenizer differs from the one the reference "
                f"store {self.path} was made with (vocabulary or special tokens)"
            )

    def token_ids(self) -> torch.Tensor:
        """The stored corpus token ids (int64), checked against the manifest's hash."""
        from safetensors.torch import load_file

        try:
            ids = load_file(str(self.path / TOKENS))["ids"].long()
        except Exception as exc:
            raise StoreError(f"reference store {self.path}: cannot read {TOKENS}: {exc}") from exc
        if ids_hash(ids) != self.manifest["tokens"]["sha256"]:
            raise StoreError(f"reference store {self.path}: {TOKENS} does not match the manifest")
        return ids

    def check_ids(self, ids: torch.Tensor, name: str = "the candidate") -> None:
        """Raise :class:`StoreError` naming the first differing token when ``ids`` are not
        the stored corpus."""
        if ids_hash(ids) == self.manifest["tokens"]["sha256"]:
            return
        stored = self.token_ids()
        n = min(len(stored), len(ids))
        diff = (stored[:n] != ids[:n].long()).nonzero()
        if len(diff):
            pos = int(diff[0])
            raise StoreError(
                f"token ids differ from the reference store's: {name} gives id {int(ids[pos])} "
                f"at token {pos}, the store {int(stored[pos])} (other corpus or tokenizer)"
            )
        raise StoreError(
            f"token ids differ from the reference store's: {len(ids)} tokens, the store has "
            f"{len(stored)} (other corpus, --max-tokens or separator)"
        )

    def check_vocab(self, vocab: int, name: str) -> None:
        if vocab != self.vocab_size:
            raise StoreError(
                f"vocab size mismatch: {name} has V={vocab}, the reference store "
                f"V={self.vocab_size}"
            )

    # --- rows ---------------------------------------------------------------------------------

    def windows(self) -> list[Window]:
        """The store's windows (recomputed from its windowing and token count)."""
        if self._windows is None:
            w = self.manifest["windowing"]
            scoring = w.get("scoring", "transformers")
            self._windows = make_windows(
                int(self.manifest["tokens"]["count"]),
                int(w["context_length"]),
                None if scoring == "llama.cpp" else int(w["stride"]),
                scoring=scoring,
                bos_id=w.get("bos_id"),
            )
            offsets = [0]
            for win in self._windows:
                offsets.append(offsets[-1] + scored_count(win))
            self._offsets = offsets
        return self._windows

    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        """Shard ``index``'s tensors, checked: run id, sha256, fields and row count."""
        if index in self._cache:
            return self._cache[index]
        from safetensors import safe_open
        from safetensors.torch import load_file

        shard = self.manifest["shards"][index]
        path = self.path / shard["file"]
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
        except Exception as exc:
            raise StoreError(
                f"reference store {self.path}: cannot read {shard['file']}: {exc}"
            ) from exc
        if meta.get("run_id") != self.run_id:
            raise StoreError(
                f"reference store {self.path}: {shard['file']} belongs to another run "
                f"(run id {meta.get('run_id')}, the manifest's {self.run_id})"
            )
        if _file_sha256(path) != shard["sha256"]:
            raise StoreError(
                f"reference store {self.path}: {shard['file']} does not match the manifest's "
                "sha256 (damaged or of another run)"
            )
        tensors = load_file(str(path))
        need = ("logits",) if self.mode.kind == "full" else SUMMARY_FIELDS
        if any(k not in tensors or len(tensors[k]) != shard["tokens"] for k in need):
            raise StoreError(f"reference store {self.path}: {shard['file']} has the wrong fields")
        self._cache[index] = tensors
        return tensors

    def rows(self, window_indices: list[int]) -> dict[str, torch.Tensor]:
        """The stored rows of the windows ``window_indices`` (global indices, ascending): their
        scored tokens, window after window."""
        self.windows()
        assert self._offsets is not None
        shards = self.manifest["shards"]
        starts = [s["windows"][0] for s in shards]
        lowest = min(window_indices)
        for index in [i for i in self._cache if shards[i]["windows"][1] <= lowest]:
            del self._cache[index]  # windows arrive in order: earlier shards are done
        parts: list[dict[str, torch.Tensor]] = []
        for w in window_indices:
            index = bisect.bisect_right(starts, w) - 1
            if not 0 <= index < len(shards) or w >= shards[index]["windows"][1]:
                raise StoreError(f"reference store {self.path} has no window {w}")
            tensors = self._shard(index)
            base = self._offsets[shards[index]["windows"][0]]
            lo, hi = self._offsets[w] - base, self._offsets[w + 1] - base
            parts.append({k: v[lo:hi] for k, v in tensors.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def chunks(
        self, window_indices: list[int], labels: torch.Tensor, chunk_tokens: int | None
    ) -> Iterator[tuple[slice, torch.Tensor | StoredTopK]]:
        """For a batch of the windows ``window_indices`` (global, ascending) with next-token
        ``labels``
        [B, T] (``IGNORE_INDEX`` where not scored), the stored reference over position chunks
        of ``chunk_tokens``, aligned with :meth:`LogitSource.chunks`: bf16 (or the stored
        dtype) logits [B, chunk, V] in ``full`` mode, a :class:`StoredTopK` otherwise. Rows
        not scored are zeros (their labels are ignored)."""
        batch, length = labels.shape
        rows = self.rows(list(window_indices))
        mask = labels != IGNORE_INDEX
        n_rows = next(iter(rows.values())).shape[0]
        if int(mask.sum()) != n_rows:
            raise StoreError(
                f"windowing mismatch with reference store {self.path}: the batch scores "
                f"{int(mask.sum())} tokens, the store holds {n_rows} for its windows"
            )
        rank = (mask.reshape(-1).cumsum(0) - 1).reshape(mask.shape)
        step = chunk_tokens or length
        for start in range(0, length, step):
            sl = slice(start, min(length, start + step))
            m = mask[:, sl]
            picked = rank[:, sl][m]
            width = sl.stop - sl.start
            if self.mode.kind == "full":
                logits = rows["logits"]
                grid = logits.new_zeros((batch, width, logits.shape[1]))
                grid[m] = logits[picked]
                yield sl, grid
                continue
            flat = m.reshape(-1)
            fields = {}
            for k, v in rows.items():
                grid = v.new_zeros((batch * width, *v.shape[1:]))
                grid[flat] = v[picked]
                fields[k] = grid
            yield sl, StoredTopK(fields, self.vocab_size)
