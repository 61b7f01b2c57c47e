"""Loading the models to compare: Hugging Face ids, local paths and GGUF files (named on the
command line by the one syntax of :class:`CandidateSpec`, loaded by :func:`load_model`),
already-loaded objects (:func:`as_entry`, the one wrapper of a module as a :class:`ModelEntry`),
and round-to-nearest candidates made from the reference on the fly; plus the device helpers
every evaluation uses (:func:`module_device`, :func:`to_device`, :func:`output_head`)."""

from __future__ import annotations

import copy
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qmetrics.evaluation.rtn_quantize import QuantSpec, quantize_model


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded."""


GGUF_SUFFIX = ".gguf"
GGUF_INSTALL = 'GGUF files need the gguf and accelerate packages: pip install "qmetrics[gguf]"'
_CONFIG_FILES = ("config.json", "adapter_config.json")
_ROW_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class CandidateSpec:
    """A model as ``--reference`` / ``--candidate`` / ``--quantize`` name it (:meth:`parse`):

    - ``PATH.gguf``: a local GGUF file (``source`` its folder, ``gguf_file`` its name,
      ``local_file`` True);
    - ``DIR_OR_REPO::FILE.gguf``: a GGUF file inside a local folder or a Hub repository;
    - ``DIR_OR_REPO``: any checkpoint transformers loads (GPTQ, AWQ, bitsandbytes,
      compressed-tensors, torchao, ...);
    - ``quantize``: a round-to-nearest copy of the reference (``--quantize SPEC``).

    An optional ``NAME=`` prefix sets ``name``, the row's name; without it a GGUF is named
    after its file's stem, a local folder after the folder, a Hub id as written and an RTN
    copy ``rtn-SPEC`` (:func:`load_model`)."""

    source: str | None = None
    gguf_file: str | None = None
    quantize: QuantSpec | None = None
    name: str | None = None
    local_file: bool = False

    @classmethod
    def parse(cls, text: str, *, quantize: bool = False) -> CandidateSpec:
        """Read ``[NAME=]PATH.gguf``, ``[NAME=]DIR_OR_REPO::FILE.gguf`` or
        ``[NAME=]DIR_OR_REPO`` (with ``quantize``: ``[NAME=]SPEC``, see
        :meth:`QuantSpec.parse`). Raises ``ValueError`` naming the bad part."""
        given = text
        text = text.strip()
        head, sep, rest = text.partition("=")
        name = None
        if sep and _ROW_NAME.fullmatch(head) and not Path(text).expanduser().exists():
            name, text = head, rest.strip()
        if not text:
            raise ValueError(f"no model in {given!r}: write [NAME=]MODEL")
        if quantize:
            return cls(quantize=QuantSpec.parse(text), name=name)
        if "::" in text:
            source, _, gguf_file = (part.strip() for part in text.partition("::"))
            if not source or not gguf_file.lower().endswith(GGUF_SUFFIX):
                raise ValueError(f"bad model {given!r}: write DIR_OR_REPO::FILE.gguf")
            return cls(source, gguf_file, name=name)
        if text.lower().endswith(GGUF_SUFFIX):
            path = Path(text).expanduser()
            return cls(str(path.parent), path.name, name=name, local_file=True)
        return cls(text, name=name)

    def __str__(self) -> str:
        """The spec as the command line writes it."""
        prefix = f"{self.name}=" if self.name else ""
        if self.quantize is not None:
            return f"{prefix}{self.quantize}"
        if self.local_file:
            return f"{prefix}{Path(self.source or '.') / (self.gguf_file or '')}"
        return f"{prefix}{self.source}" + (f"::{self.gguf_file}" if self.gguf_file else "")


def load_model(
    spec: CandidateSpec,
    reference: ModelEntry | None = None,
    *,
    device: str | None = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> ModelEntry:
    """The model ``spec`` names, under ``spec.name`` when it has one: a checkpoint or GGUF file
    through :func:`load_pretrained`, or an RTN copy of ``reference`` (:func:`rtn_candidate`)."""
    if spec.quantize is not None:
        if reference is None:
            raise ValueError(f"{spec}: a round-to-nearest candidate needs a reference model")
        entry = rtn_candidate(reference, spec.quantize)
    else:
        entry = load_pretrained(
            spec.source or ".",
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            gguf_file=spec.gguf_file,
            gguf_local=spec.local_file,
        )
    if spec.name:
        entry.name = spec.name
    return entry


def _require_gguf() -> None:
    """Raise :class:`ModelLoadError` naming the extra when ``gguf`` or ``accelerate`` (which
    transformers needs to load a GGUF file) is missing."""
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError(GGUF_INSTALL) from None


def _first_line(exc: BaseException, local: bool) -> str:
    """An exception's first line; for a local model without the Hub address transformers
    builds from a path ("Checkout 'https://huggingface.co/./m/tree/main' ...")."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if local:
        first = re.sub(r"\s*Checkout '?https://huggingface\.co/\S*'?.*$", "", first)
    return first


@dataclass
class ModelEntry:
    """A model under comparison, with the tokenizer that goes with it (None: the reference's)."""

    name: str
    model: torch.nn.Module
    tokenizer: Any | None = None
    origin: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter (the inputs go there)."""
        return module_device(self.model)


def module_device(module: torch.nn.Module, default: torch.device | None = None) -> torch.device:
    """Device of a module's first parameter; ``default`` (the CPU when None) for a module
    without parameters."""
    param = next(module.parameters(), None)
    if param is not None:
        return param.device
    return torch.device("cpu") if default is None else default


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (nested) tuples, lists and dicts moved to ``device``;
    anything else is returned as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's output head (``get_output_embeddings()``), or None when it has none."""
    fn = getattr(model, "get_output_embeddings", None)
    try:
        return fn() if fn is not None else None
    except (NotImplementedError, AttributeError):
        return None


def as_entry(
    model: ModelEntry | torch.nn.Module, name: str, tokenizer: Any | None = None
) -> ModelEntry:
    """``model`` as a :class:`ModelEntry`: an entry is returned as is (given ``tokenizer`` when
    it has none); a bare module is put in eval mode (not copied) and wrapped under ``name``
    with origin ``{"source": "object", "class": ...}``."""
    if isinstance(model, ModelEntry):
        if tokenizer is not None and model.tokenizer is None:
            model.tokenizer = tokenizer
        return model
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"{name} must be a ModelEntry or a torch.nn.Module, got {type(model).__name__}"
        )
    model.eval()
    return ModelEntry(name, model, tokenizer, {"source": "object", "class": type(model).__name__})


def resolve_device(device: str | None) -> str:
    """``"auto"``/None -> ``"cuda"`` when available, else ``"cpu"``."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_pretrained(
    name_or_path: str,
    *,
    device: str | None = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    revision: str | None = None,
    gguf_local: bool = False,
) -> ModelEntry:
    """Load a causal LM and its tokenizer with ``AutoModelForCausalLM.from_pretrained``.

    Whatever transformers can load works (GPTQ, AWQ, bitsandbytes and torchao checkpoints with
    their packages installed). ``gguf_file``: a GGUF file inside ``name_or_path`` (a local
    folder or a Hub repository; an absolute path, or ``gguf_local``, means a local file).
    transformers dequantizes its weights; the tokenizer is the one the file describes (not a
    ``tokenizer.json`` beside it), and the model is named after the file's stem.
    ``trust_remote_code`` stays off unless asked. Raises :class:`ModelLoadError` with one line.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelLoadError(
            "loading models needs transformers: pip install 'qmetrics[hf]'"
        ) from exc
    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or local.exists()
    gguf_path: Path | None = None
    if gguf_file:
        _require_gguf()
        if gguf_local or looks_local or Path(gguf_file).expanduser().is_absolute():
            gguf_path = local / Path(gguf_file).expanduser()
            if not gguf_path.is_file():
                hint = "" if looks_local else " (a file in a Hub repository: REPO::FILE.gguf)"
                raise ModelLoadError(f"GGUF file does not exist: {gguf_path}{hint}")
            gguf_path = gguf_path.resolve()
            local = gguf_path.parent
    elif looks_local and not local.exists():
        raise ModelLoadError(f"model path does not exist: {name_or_path}")
    elif local.is_dir() and not any((local / f).exists() for f in _CONFIG_FILES):
        ggufs = sorted(p.name for p in local.glob(f"*{GGUF_SUFFIX}"))
        hint = f"; it holds GGUF files: write {name_or_path}::{ggufs[0]}" if ggufs else ""
        raise ModelLoadError(f"no config.json in model folder {name_or_path}{hint}")
    label = str(name_or_path) + (f"::{gguf_file}" if gguf_file else "")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = str(gguf_path or gguf_file)
    if revision:
        kwargs["revision"] = revision
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    source = str(local) if gguf_path is not None else str(name_or_path)
    try:
        if gguf_path is not None:
            # only the file: transformers would mix in a tokenizer_config.json beside it
            with tempfile.TemporaryDirectory() as nothing_else:
                tokenizer = AutoTokenizer.from_pretrained(nothing_else, **kwargs)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors, ...
        what = "build the tokenizer of" if gguf_file else "load model"
        raise ModelLoadError(f"cannot {what} {label!r}: {_first_line(exc, looks_local)}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except Exception as exc:
        first = _first_line(exc, looks_local)
        raise ModelLoadError(f"cannot load model {label!r}: {first}") from exc
    model.to(resolve_device(device))
    model.eval()
    origin = {"source": "pretrained", "name_or_path": str(name_or_path)}
    if gguf_file:
        origin["gguf_file"] = str(gguf_path or gguf_file)
        name = Path(gguf_file).stem
    else:  # a local checkpoint is named by its folder (the full path stays in origin)
        name = local.resolve().name if local.exists() else str(name_or_path)
    return ModelEntry(name, model, tokenizer, origin)


def rtn_candidate(reference: ModelEntry, spec: str | QuantSpec) -> ModelEntry:
    """A copy of the reference with every Linear but ``lm_head`` round-to-nearest quantized."""
    spec = spec if isinstance(spec, QuantSpec) else QuantSpec.parse(spec)
    model = quantize_model(reference.model, spec)
    return ModelEntry(
        f"rtn-{spec}", model, None, {"source": "rtn", "spec": str(spec), "of": reference.name}
    )


def clone_entry(entry: ModelEntry, name: str) -> ModelEntry:
    """A deep copy of a model entry under another name (tests and self-comparisons)."""
    return ModelEntry(name, copy.deepcopy(entry.model), entry.tokenizer, dict(entry.origin))
