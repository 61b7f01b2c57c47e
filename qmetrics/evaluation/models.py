"""Loading the models to compare: Hugging Face ids or local paths, already-loaded objects
(:func:`as_entry`, the one wrapper of a module as a :class:`ModelEntry`), and round-to-nearest
candidates made from the reference on the fly; plus the device helpers every evaluation uses
(:func:`module_device`, :func:`to_device`, :func:`output_head`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qmetrics.evaluation.rtn_quantize import QuantSpec, quantize_model


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded."""


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
) -> ModelEntry:
    """Load a causal LM and its tokenizer with ``AutoModelForCausalLM.from_pretrained``.

    Whatever transformers can load works (GPTQ, AWQ, bitsandbytes and torchao checkpoints with
    their packages installed, ``gguf_file=``). ``trust_remote_code`` stays off unless asked.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelLoadError(
            "loading models needs transformers: pip install 'qmetrics[hf]'"
        ) from exc
    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.exists():
        raise ModelLoadError(f"model path does not exist: {name_or_path}")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if revision:
        kwargs["revision"] = revision
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=torch_dtype, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {first}") from exc
    model.to(resolve_device(device))
    model.eval()
    origin = {"source": "pretrained", "name_or_path": str(name_or_path)}
    if gguf_file:
        origin["gguf_file"] = gguf_file
    # a local checkpoint is named by its folder (the full path stays in origin)
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
