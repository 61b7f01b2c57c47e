"""What ``qmetrics bench`` measures qmetrics against, on the same tensors.

- ``eager_*``: each op written the way a user writes it in plain torch — full fp32
  ``log_softmax`` copies of both logit tensors, ``F.kl_div``, ``F.mse_loss``,
  ``F.cosine_similarity``, ``argmax``, ``topk`` — producing the same per-token fields as
  :func:`qmetrics.compare_logits` (``eager_compare``), summing them into a running accumulator
  (``eager_stats_sums``), or a KL(P‖Q) distillation loss (``eager_distill_loss``,
  ``eager_linear_distill_loss``). ``torch.compile`` of these is the ``compile`` baseline.
- ``seed_compare``: the seed document's own code (sections "Logit Similarity" and "Token-Level
  Accuracy"), which returns only batch means; ``seed_stats_update`` its way of accumulating
  them (one ``.item()`` per metric per batch, appended to lists). The seed has no distillation
  loss, so ``distill`` has no ``seed`` baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "eager_compare",
    "eager_distill_loss",
    "eager_linear_distill_loss",
    "eager_stats_sums",
    "seed_compare",
    "seed_stats_update",
]


def eager_compare(
    ref: torch.Tensor,
    quant: torch.Tensor,
    labels: torch.Tensor | None = None,
    top_k: int = 5,
) -> dict[str, torch.Tensor]:
    """Per row: KL both ways, entropies, cosine, MSE, top-1/top-k agreement (and label NLLs
    and probabilities), from fp32 ``log_softmax`` copies of both inputs."""
    r = ref.float()
    q = quant.float()
    lr = F.log_softmax(r, dim=-1)
    lq = F.log_softmax(q, dim=-1)
    out = {
        "kl": F.kl_div(lq, lr, reduction="none", log_target=True).sum(-1),
        "reverse_kl": F.kl_div(lr, lq, reduction="none", log_target=True).sum(-1),
        "entropy_ref": -(lr.exp() * lr).sum(-1),
        "entropy_quant": -(lq.exp() * lq).sum(-1),
        "cosine": F.cosine_similarity(r, q, dim=-1),
        "mse": F.mse_loss(r, q, reduction="none").mean(-1),
    }
    pred_ref = r.argmax(-1)
    pred_quant = q.argmax(-1)
    out["top1_match"] = pred_ref == pred_quant
    out["topk_match"] = (r.topk(top_k, dim=-1).indices == pred_quant[..., None]).any(-1)
    if labels is not None:
        safe = labels.clamp_min(0)[..., None]
        out["nll_ref"] = -lr.gather(-1, safe).squeeze(-1)
        out["nll_quant"] = -lq.gather(-1, safe).squeeze(-1)
        out["prob_ref"] = out["nll_ref"].neg().exp()
        out["prob_quant"] = out["nll_quant"].neg().exp()
    return out


def eager_stats_sums(
    ref: torch.Tensor,
    quant: torch.Tensor,
    labels: torch.Tensor | None = None,
    top_k: int = 5,
) -> torch.Tensor:
    """One batch's contribution to a running accumulator, on the logits' device and without a
    host sync: ``[Σx, Σx²]`` (float64) of every field of :func:`eager_compare`, stacked
    ``[2, fields]``; the caller adds it to its state (``state += eager_stats_sums(...)``)."""
    fields = eager_compare(ref, quant, labels, top_k)
    values = torch.stack([v.double().reshape(-1) for v in fields.values()], dim=-1)
    return torch.stack([values.sum(0), values.square().sum(0)])


def seed_compare(
    ref: torch.Tensor,
    quant: torch.Tensor,
    labels: torch.Tensor | None = None,
    top_k: int = 5,
) -> dict[str, float]:
    """The seed document's own way, line for line on given logits (one example [1, N, V]):
    its "Logit Similarity" code (flatten, ``F.cosine_similarity(...).mean()``, two
    ``F.log_softmax``, ``F.kl_div(..., reduction="batchmean", log_target=True)``,
    ``F.mse_loss``) followed by its "Token-Level Accuracy" code (``argmax`` of both, ``topk`` of
    both, and its Python loop testing ``pred_quant[i, j] in topk_fp16[i, j]``). The logits are
    taken in fp32, as the seed's models returned them (transformers up to 4.44 upcast Llama
    logits), so its log-softmaxes run in fp32. ``labels`` is unused (the seed takes the NLL
    from the model's own loss). Returns its scalar summaries."""
    logits_fp16 = ref.reshape(1, -1, ref.shape[-1]).float()
    logits_quant = quant.reshape(1, -1, quant.shape[-1]).float()
    # --- section "Logit Similarity"
    logits_fp16_flat = logits_fp16.reshape(-1, logits_fp16.size(-1))
    logits_quant_flat = logits_quant.reshape(-1, logits_quant.size(-1))
    cos_sim = F.cosine_similarity(logits_fp16_flat, logits_quant_flat, dim=1).mean()
    log_probs_fp16 = F.log_softmax(logits_fp16_flat, dim=1)
    log_probs_quant = F.log_softmax(logits_quant_flat, dim=1)
    kl_div = F.kl_div(log_probs_quant, log_probs_fp16, reduction="batchmean", log_target=True)
    mse = F.mse_loss(logits_fp16_flat, logits_quant_flat)
    # --- section "Token-Level Accuracy"
    pred_fp16 = logits_fp16.argmax(dim=-1)
    pred_quant = logits_quant.argmax(dim=-1)
    exact_matches = (pred_fp16 == pred_quant).sum().item()
    topk_fp16 = logits_fp16.topk(top_k, dim=-1).indices
    topk_quant = logits_quant.topk(top_k, dim=-1).indices  # noqa: F841 (computed by the seed)
    top_k_matches = 0
    for i in range(pred_quant.size(0)):
        for j in range(pred_quant.size(1)):
            if pred_quant[i, j] in topk_fp16[i, j]:
                top_k_matches += 1
    total_tokens = pred_fp16.numel()
    return {
        "cosine_similarity": cos_sim.item(),
        "kl_divergence": kl_div.item(),
        "mse": mse.item(),
        "exact_match_rate": exact_matches / total_tokens,
        "top_k_match_rate": top_k_matches / total_tokens,
    }


def seed_stats_update(
    history: list[dict[str, float]],
    ref: torch.Tensor,
    quant: torch.Tensor,
    labels: torch.Tensor | None = None,
    top_k: int = 5,
) -> None:
    """The seed's accumulation: its per-batch means appended to a list (averaged at the end)."""
    history.append(seed_compare(ref, quant, labels, top_k))


def eager_distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(P‖Q) per token averaged over tokens, P = softmax(teacher/T), Q = softmax(student/T),
    the way training scripts write it: ``F.kl_div`` on fp32 ``log_softmax`` / ``softmax``
    copies, ``reduction="batchmean"``."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    p = F.softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="batchmean")


def eager_linear_distill_loss(
    h_student: torch.Tensor,
    w_student: torch.Tensor,
    h_teacher: torch.Tensor,
    w_teacher: torch.Tensor,
) -> torch.Tensor:
    """:func:`eager_distill_loss` from final hidden states [N, H] and heads [V, H]: both full
    [N, V] logit tensors are materialised first."""
    return eager_distill_loss(h_student @ w_student.T, h_teacher @ w_teacher.T)
