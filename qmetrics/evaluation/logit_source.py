"""Logits of a causal LM, produced chunk by chunk from its final hidden states.

A forward pass of the decoder gives hidden states [B, T, H]; the output head is then applied
to ``chunk_tokens`` positions at a time, so peak memory holds one [B, chunk, V] logit block
instead of [B, T, V]. Models whose head is not a plain projection (Gemma's final soft-capping,
Cohere's logit scale) are handled; anything else falls back to the full forward pass, which a
one-off check on a short prefix decides.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from qmetrics.evaluation.models import module_device


class LogitSource:
    """Runs one model on token windows and yields logits over position chunks."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int | None = 256):
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.decoder = _call_or_none(model, "get_decoder")
        self.head = _call_or_none(model, "get_output_embeddings")
        config = getattr(model, "config", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)
        self.split = chunk_tokens is not None and self.decoder is not None and self.head is not None
        self._checked = False

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def _check_split(self, input_ids: torch.Tensor) -> None:
        """Compare split and full logits on a short prefix once; fall back if they differ."""
        self._checked = True
        prefix = input_ids[:1, : min(16, input_ids.shape[1])]
        full = _logits_of(self.model(input_ids=prefix)).float()
        hidden = self.decoder(input_ids=prefix)[0]
        split = self._head(hidden).float()
        tol = 1e-3 * (1.0 + full.abs().max().item())
        if split.shape != full.shape or (split - full).abs().max().item() > tol:
            warnings.warn(
                f"{type(self.model).__name__}: logits from hidden states and the output head do "
                "not match the model's own forward; using full forward passes instead",
                stacklevel=3,
            )
            self.split = False

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What the chunks are made from: final hidden states, or full logits when not split."""
        input_ids = input_ids.to(self.device)
        if self.split and not self._checked:
            self._check_split(input_ids)
        if self.split:
            return self.decoder(input_ids=input_ids)[0]
        return _logits_of(self.model(input_ids=input_ids))

    @torch.no_grad()
    def chunks(self, hidden: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """(positions, logits [B, chunk, V]) over the window, ``chunk_tokens`` at a time."""
        length = hidden.shape[1]
        step = self.chunk_tokens or length
        for start in range(0, length, step):
            sl = slice(start, min(length, start + step))
            yield sl, (self._head(hidden[:, sl]) if self.split else hidden[:, sl])


def _call_or_none(model: torch.nn.Module, method: str):
    fn = getattr(model, method, None)
    if fn is None:
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


def _logits_of(output) -> torch.Tensor:
    """Logits from a model output (an object with ``.logits``, a tuple, or a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple | list):
        logits = output[0]
    if logits is None:
        raise TypeError(f"cannot find logits in model output of type {type(output).__name__}")
    return logits
