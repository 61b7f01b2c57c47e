"""Per-token comparison metrics of two logit tensors: the output of :func:`qmetrics.compare_logits`.

Notation for one row (token position): reference logits ``x`` and quantized logits ``y`` over a
vocabulary of size V, ``P = softmax(x)``, ``Q = softmax(y)``. Entries equal to ``-inf`` are
allowed (masked tokens, probability 0). A row holding NaN or ``+inf`` in either tensor, or with
no finite entry in either tensor, is *non-finite*: ``finite`` is False there and every float
field is NaN (and both match flags are False).

Fields (each shaped like the leading dims of the inputs):

- ``kl`` = KL(P ‖ Q) = Σ_i P_i (log P_i − log Q_i); ``+inf`` when Q_i = 0 < P_i somewhere.
- ``reverse_kl`` = KL(Q ‖ P).
- ``entropy_ref`` = H(P) = −Σ_i P_i log P_i, ``entropy_quant`` = H(Q), in nats.
- ``cosine`` = Σ x_i y_i / sqrt(Σ x_i² · Σ y_i²) of the raw logits (0 when a norm is 0).
- ``mse`` = mean of (x_i − y_i)².
  ``cosine`` and ``mse`` run over the positions where both logits are finite. Both are None
  (absent, never 0) when computed from a top-K reference summary, which lacks the raw logits
  (:mod:`qmetrics.metrics.reference_compare`).
- ``top1_match`` = argmax(x) == argmax(y) (first index on ties, as ``torch.argmax``).
- ``topk_match`` = the quant argmax j is among the reference top-k, counting ties in its favour:
  #{i : x_i > x_j} < k.
- with labels ``t`` (rows whose label equals ``ignore_index`` get NaN here and
  ``scored`` False):
  ``nll_ref`` = −log P_t, ``nll_quant`` = −log Q_t, ``prob_ref`` = P_t, ``prob_quant`` = Q_t.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

FLOAT_FIELDS = ("kl", "reverse_kl", "entropy_ref", "entropy_quant", "cosine", "mse")
MATCH_FIELDS = ("top1_match", "topk_match")
LABEL_FIELDS = ("nll_ref", "nll_quant", "prob_ref", "prob_quant")


@dataclass(frozen=True)
class TokenMetrics:
    """Per-token metrics; see the module docstring for the exact formulas."""

    kl: torch.Tensor
    reverse_kl: torch.Tensor
    entropy_ref: torch.Tensor
    entropy_quant: torch.Tensor
    cosine: torch.Tensor | None
    mse: torch.Tensor | None
    top1_match: torch.Tensor
    topk_match: torch.Tensor
    finite: torch.Tensor
    scored: torch.Tensor
    top_k: int
    nll_ref: torch.Tensor | None = None
    nll_quant: torch.Tensor | None = None
    prob_ref: torch.Tensor | None = None
    prob_quant: torch.Tensor | None = None
    #: True when ``kl``/``reverse_kl`` are lower bounds (a top-K reference summary)
    kl_lower_bound: bool = False

    @property
    def has_labels(self) -> bool:
        """Whether label-based fields (nll, prob) are present."""
        return self.nll_ref is not None

    @property
    def shape(self) -> torch.Size:
        """The leading shape of the compared logits."""
        return self.kl.shape

    def to_dict(self) -> dict[str, torch.Tensor]:
        """All tensor fields present, by name."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value
        return out

    def flatten(self) -> TokenMetrics:
        """The same metrics with the leading dims flattened to one."""
        return TokenMetrics(
            top_k=self.top_k,
            kl_lower_bound=self.kl_lower_bound,
            **(
                {"cosine": None, "mse": None}  # absent fields stay absent
                | {name: t.reshape(-1) for name, t in self.to_dict().items()}
            ),
        )
