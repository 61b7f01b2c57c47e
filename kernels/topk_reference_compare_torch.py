"""CPU/torch path of the reference-store ops: the compact top-K summary of reference logits
(:func:`reference_topk_summary_torch`) and the comparison of candidate logits with such a summary
(:func:`topk_reference_compare_torch`). There is no Triton twin yet: on CUDA the same torch code
runs (row chunks, float64 math, bounded temporaries).

Summary, per row with reference logits x over V entries, lse = log Σ exp(x), lp = x − lse, and S
the ids of the K largest logits (``torch.topk``, sorted):

- ``label_logprob`` = lp_t (fp32; NaN where the label is ``ignore_index``),
- ``entropy`` = −Σ exp(lp)·lp, ``lse`` (fp32), ``argmax`` = first index of max x (int32),
- ``topk_logprob`` = lp_S (fp16, descending), ``topk_ids`` = S (int32),
- ``rest_logprob`` = log Σ_{i∉S} exp(lp_i) (fp32; −inf when K = V): the mass outside S,
- ``tie_bits`` (uint8, K bits, little-endian within a byte): bit p ≥ 1 is set when x at sorted
  position p equals x at p − 1 (in the logits' own precision); bit 0 when the K-th largest
  logit equals the (K+1)-th, i.e. its tie group continues outside S.

Comparison with candidate logits y (Q = softmax(y), lq = y − log Σ exp(y)), per row:

- partition {S_1, …, S_K, rest}: P̂ = (exp(lp_S), exp(rest_logprob)) / Z (Z renormalises the
  fp16-rounded values), Q̂ = (Q_S, Σ_{i∉S} Q_i) (the rest summed directly, no 1 − Σ);
- ``kl`` = KL(P̂ ‖ Q̂) = Σ_j P̂_j (log P̂_j − log Q̂_j) and ``reverse_kl`` = KL(Q̂ ‖ P̂): by the
  data-processing inequality each is ≤ the full-vocabulary KL (up to the fp16 rounding of lp_S);
- ``entropy_ref`` = stored entropy, ``entropy_quant`` = −Σ Q log Q over all of V;
- ``top1_match`` = argmax(y) == stored argmax;
- ``topk_match`` (k ≤ K) = top1 or #{i : x_i > x_j} < k for j = argmax(y), as
  :mod:`qmetrics.kernels.logit_compare_torch` defines it. When j ∈ S at sorted position p,
  #{i : x_i > x_j} is the first position of p's tie group (from ``tie_bits``); when j ∉ S it is
  ≥ K ≥ k, except when S's last tie group continues outside S (bit 0) and starts before k —
  then j may tie with it and the count is unknown; such a row counts as no match (it needs
  ≥ K − k + 1 equal top logits).
- with labels: ``nll_ref`` = −label_logprob, ``nll_quant`` = −lq_t, ``prob_*`` = exp(−nll_*).

Rows whose candidate logits hold NaN/+inf or no finite entry, or whose stored entropy or lse is
not finite, are non-finite: ``finite`` False, float fields NaN, matches False.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

#: Rows per chunk: the float64 temporaries are a few [chunk, V] planes.
_CHUNK_ROWS = 16

SUMMARY_FIELDS = (
    "label_logprob",
    "entropy",
    "lse",
    "argmax",
    "topk_logprob",
    "topk_ids",
    "rest_logprob",
    "tie_bits",
)


def tie_bytes(top_k: int) -> int:
    """Bytes of ``tie_bits`` per row for a summary of ``top_k`` entries."""
    return (top_k + 7) // 8


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[N, K] bool → [N, ceil(K/8)] uint8, bit p of the row in byte p // 8, position p % 8."""
    n, k = bits.shape
    padded = torch.zeros(n, tie_bytes(k) * 8, dtype=torch.int32, device=bits.device)
    padded[:, :k] = bits.to(torch.int32)
    weights = 2 ** torch.arange(8, dtype=torch.int32, device=bits.device)
    return (padded.view(n, -1, 8) * weights).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: [N, ceil(K/8)] uint8 → [N, K] bool."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32)[..., None] >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :k].bool()


def _row_chunks(t: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """``t`` [N, V] or [B, T, V] in chunks of at most ``_CHUNK_ROWS`` rows (2-D views, no
    copies), each with its slice of the rows in row-major order."""
    row0 = 0
    for block in [t] if t.dim() == 2 else t.unbind(0):
        for start in range(0, block.shape[0], _CHUNK_ROWS):
            chunk = block[start : start + _CHUNK_ROWS]
            yield slice(row0, row0 + chunk.shape[0]), chunk
            row0 += chunk.shape[0]


@torch.no_grad()
def reference_topk_summary_torch(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    top_k: int,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """The top-K summary (module docstring) of reference ``logits`` [N, V] (or [B, T, V],
    flattened in row-major order) with ``labels`` [N] (int64, or None: label_logprob NaN)."""
    vocab = logits.shape[-1]
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, V={vocab}], got {top_k}")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in SUMMARY_FIELDS}
    for rows, chunk in _row_chunks(logits):
        lab = None if labels is None else labels[rows]
        for name, value in _summarize_chunk(chunk, lab, top_k, ignore_index).items():
            parts[name].append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def _summarize_chunk(
    chunk: torch.Tensor, labels: torch.Tensor | None, top_k: int, ignore_index: int
) -> dict[str, torch.Tensor]:
    x = chunk.double()
    vocab = x.shape[1]
    lse = torch.logsumexp(x, dim=1)
    lp = x - lse[:, None]
    p = lp.exp()
    entropy = -(p * torch.where(torch.isfinite(lp), lp, 0.0)).sum(1)
    values, ids = torch.topk(x, min(top_k + 1, vocab), dim=1, sorted=True)
    top_vals, top_ids = values[:, :top_k], ids[:, :top_k]
    ties = torch.zeros(x.shape[0], top_k, dtype=torch.bool, device=x.device)
    ties[:, 1:] = top_vals[:, 1:] == top_vals[:, :-1]
    if vocab > top_k:
        ties[:, 0] = values[:, top_k] == values[:, top_k - 1]
    rest = torch.logsumexp(x.scatter(1, top_ids, -math.inf), dim=1) - lse
    if labels is None:
        label_lp = torch.full_like(lse, math.nan)
    else:
        keep = labels != ignore_index
        picked = lp.gather(1, torch.where(keep, labels, 0)[:, None]).squeeze(1)
        label_lp = torch.where(keep, picked, math.nan)
    return {
        "label_logprob": label_lp.float(),
        "entropy": entropy.float(),
        "lse": lse.float(),
        "argmax": chunk.argmax(dim=1).to(torch.int32),
        "topk_logprob": (top_vals - lse[:, None]).to(torch.float16),
        "topk_ids": top_ids.to(torch.int32),
        "rest_logprob": rest.float(),
        "tie_bits": _pack_bits(ties),
    }


@torch.no_grad()
def topk_reference_compare_torch(
    reference: dict[str, torch.Tensor],
    quant: torch.Tensor,
    labels: torch.Tensor | None,
    top_k: int,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """Per-token metrics (module docstring) of candidate logits ``quant`` [N, V] (or [B, T, V],
    row-major) against a stored summary ``reference`` ({field: [N, ...]}); ``labels`` [N]
    int64 or None; ``top_k`` = k of ``topk_match``, at most the summary's K. Returns float64
    kl, reverse_kl, entropy_ref, entropy_quant, (nll_*, prob_* with labels) and bool
    top1_match, topk_match, finite, scored, all [N]."""
    stored_k = reference["topk_ids"].shape[1]
    if not 1 <= top_k <= stored_k:
        raise ValueError(f"top_k must be in [1, K={stored_k}] of the summary, got {top_k}")
    names = ("kl", "reverse_kl", "entropy_quant", "nll_quant", "top1_match", "topk_match", "fq")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for rows, chunk in _row_chunks(quant):
        ref = {k: v[rows] for k, v in reference.items()}
        lab = None if labels is None else labels[rows]
        for name, value in _compare_chunk(ref, chunk, lab, top_k, ignore_index).items():
            parts[name].append(value)
    out = {name: torch.cat(values) for name, values in parts.items()}
    finite = out.pop("fq") & torch.isfinite(reference["entropy"]) & torch.isfinite(reference["lse"])
    nan = torch.tensor(math.nan, dtype=torch.float64, device=quant.device)
    result = {
        "kl": out["kl"],
        "reverse_kl": out["reverse_kl"],
        "entropy_ref": reference["entropy"].double(),
        "entropy_quant": out["entropy_quant"],
        "top1_match": out["top1_match"] & finite,
        "topk_match": out["topk_match"] & finite,
        "finite": finite,
    }
    for name in ("kl", "reverse_kl", "entropy_ref", "entropy_quant"):
        result[name] = torch.where(finite, result[name], nan)
    if labels is None:
        result["scored"] = torch.ones_like(finite)
        return result
    scored = labels != ignore_index
    nll_ref = -reference["label_logprob"].double()
    nll_quant = out["nll_quant"]
    keep = scored & finite
    result["scored"] = scored
    result["nll_ref"] = torch.where(keep, nll_ref, nan)
    result["nll_quant"] = torch.where(keep, nll_quant, nan)
    result["prob_ref"] = torch.exp(-result["nll_ref"])
    result["prob_quant"] = torch.exp(-result["nll_quant"])
    return result


def _partition_kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Σ_j exp(lp_j)·(lp_j − lq_j) over the last dim, 0·log 0 = 0, +inf where lq = −inf < lp."""
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), 0.0)
    return terms.sum(-1)


def _compare_chunk(
    ref: dict[str, torch.Tensor],
    chunk: torch.Tensor,
    labels: torch.Tensor | None,
    top_k: int,
    ignore_index: int,
) -> dict[str, torch.Tensor]:
    y = chunk.double()
    n, vocab = y.shape
    finite_q = ~(torch.isnan(y) | (y == math.inf)).any(1) & torch.isfinite(y).any(1)
    y = torch.where(finite_q[:, None], y, 0.0)  # non-finite rows: harmless values, NaN later
    lse_q = torch.logsumexp(y, dim=1)
    lq = y - lse_q[:, None]
    q = lq.exp()
    entropy_q = -(q * torch.where(torch.isfinite(lq), lq, 0.0)).sum(1)
    ids = ref["topk_ids"].long()
    # the partition {S_1..S_K, rest}: candidate side exact, the rest summed directly
    in_s = torch.zeros(n, vocab, dtype=torch.bool, device=y.device).scatter_(1, ids, True)
    lq_rest = torch.logsumexp(torch.where(in_s, -math.inf, lq), dim=1)
    lq_part = torch.cat([lq.gather(1, ids), lq_rest[:, None]], dim=1)
    lp_part = torch.cat([ref["topk_logprob"].double(), ref["rest_logprob"].double()[:, None]], 1)
    lp_part = lp_part - torch.logsumexp(lp_part, dim=1, keepdim=True)  # renormalise (fp16)
    kl = _partition_kl(lp_part, lq_part)
    reverse_kl = _partition_kl(lq_part, lp_part)
    # top-1 / top-k of the candidate's argmax j against the stored order
    j = chunk.argmax(dim=1)
    top1 = j == ref["argmax"].long()
    stored_k = ids.shape[1]
    ties = _unpack_bits(ref["tie_bits"], stored_k)
    positions = torch.arange(stored_k, device=y.device).expand(n, stored_k)
    starts = torch.where(ties & (positions > 0), 0, positions).cummax(dim=1).values
    hit = ids == j[:, None]
    found = hit.any(1)
    pos = hit.to(torch.int8).argmax(1)
    above = torch.where(found, starts.gather(1, pos[:, None]).squeeze(1), stored_k)
    topk = top1 | (above < top_k)
    out = {
        "kl": kl,
        "reverse_kl": reverse_kl,
        "entropy_quant": entropy_q,
        "top1_match": top1,
        "topk_match": topk,
        "fq": finite_q,
    }
    if labels is None:
        out["nll_quant"] = torch.full_like(lse_q, math.nan)
    else:
        keep = labels != ignore_index
        picked = lq.gather(1, torch.where(keep, labels, 0)[:, None]).squeeze(1)
        out["nll_quant"] = torch.where(keep, -picked, math.nan)
    return out
