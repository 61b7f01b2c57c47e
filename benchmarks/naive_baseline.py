"""The baseline we measure against: per-token metrics written the way the seed document
does it (full fp32 ``log_softmax`` copies of both tensors, ``F.kl_div``, ``F.mse_loss``,
``F.cosine_similarity``, ``argmax``, ``topk``), producing the same fields as
:func:`qmetrics.compare_logits`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_compare(
    ref: torch.Tensor,
    quant: torch.Tensor,
    labels: torch.Tensor | None = None,
    top_k: int = 5,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """Per-row KL both ways, entropies, cosine, MSE, top-1/top-k agreement (and label NLLs)."""
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
