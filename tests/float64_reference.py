"""A float64 reference for :func:`qmetrics.compare_logits`, written for clarity, not speed.

It follows the spec in :mod:`qmetrics.metrics.token_metrics` line by line, in float64, with every
special case spelled out as a mask:

- a logit of ``-inf`` is a masked token: probability 0, log-probability ``-inf``, and its terms
  in the entropy and KL sums are 0 (``0 · log 0 = 0``);
- KL(P ‖ Q) is ``+inf`` exactly when some token has P_i > 0 and Q_i = 0, i.e. ``x_i`` finite and
  ``y_i = -inf`` (a finite logit always has a positive probability);
- cosine and MSE run over the positions where both logits are finite;
- a row with NaN or ``+inf`` in either tensor, or with no finite entry in either tensor, is
  non-finite: ``finite`` False, every float field NaN, both match flags False.
"""

from __future__ import annotations

import math

import torch

FLOAT_KEYS = ("kl", "reverse_kl", "entropy_ref", "entropy_quant", "cosine", "mse")
MATCH_KEYS = ("top1_match", "topk_match")
LABEL_KEYS = ("nll_ref", "nll_quant", "prob_ref", "prob_quant")


def _first_argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum of each row of ``x`` [N, V] (rows must hold no NaN)."""
    V = x.shape[-1]
    is_max = x == x.max(dim=-1, keepdim=True).values
    positions = torch.arange(V, dtype=torch.int64).expand_as(x)
    return torch.where(is_max, positions, V).min(dim=-1).values


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log softmax of rows with at least one finite entry and no NaN/+inf; -inf stays -inf."""
    m = x.max(dim=-1, keepdim=True).values  # finite: the row has a finite entry, no +inf
    shifted = x - m  # -inf where x is -inf, <= 0 elsewhere
    return shifted - torch.log(torch.exp(shifted).sum(dim=-1, keepdim=True))


def _kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) ‖ softmax(y)) per row, with the -inf conventions above."""
    log_p, log_q = _log_softmax(x), _log_softmax(y)
    p = torch.exp(log_p)
    both = torch.isfinite(x) & torch.isfinite(y)
    terms = torch.where(both, p * (log_p - log_q), torch.zeros_like(p))
    kl = terms.sum(dim=-1)
    p_pos_q_zero = (torch.isfinite(x) & (y == -math.inf)).any(dim=-1)
    return torch.where(p_pos_q_zero, torch.full_like(kl, math.inf), kl)


def _entropy(x: torch.Tensor) -> torch.Tensor:
    log_p = _log_softmax(x)
    p = torch.exp(log_p)
    terms = torch.where(torch.isfinite(x), p * log_p, torch.zeros_like(p))
    return -terms.sum(dim=-1)


def _masked_cosine_mse(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    both = torch.isfinite(x) & torch.isfinite(y)
    xz = torch.where(both, x, torch.zeros_like(x))
    yz = torch.where(both, y, torch.zeros_like(y))
    dot = (xz * yz).sum(dim=-1)
    norm2 = (xz * xz).sum(dim=-1) * (yz * yz).sum(dim=-1)
    cosine = torch.where(norm2 > 0, dot / torch.sqrt(norm2), torch.zeros_like(dot))
    # mean over the positions where both are finite (0/0 = NaN if there is none)
    mse = ((xz - yz) ** 2).sum(dim=-1) / both.sum(dim=-1).to(torch.float64)
    return cosine, mse


def reference_compare(
    ref: torch.Tensor,
    quant: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    top_k: int = 5,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """Float64 per-token metrics of ``ref`` vs ``quant`` [..., V], shaped like the leading dims.

    Float fields are float64, ``top1_match``/``topk_match``/``finite``/``scored`` are bool. The
    label fields (``nll_ref``, ``nll_quant``, ``prob_ref``, ``prob_quant``) are present only when
    ``labels`` is given. No input validation: pass valid inputs.
    """
    assert ref.shape == quant.shape and ref.dim() >= 1
    lead, V = ref.shape[:-1], ref.shape[-1]
    x_all = ref.detach().to(device="cpu", dtype=torch.float64).reshape(-1, V)
    y_all = quant.detach().to(device="cpu", dtype=torch.float64).reshape(-1, V)
    N = x_all.shape[0]

    def row_ok(t: torch.Tensor) -> torch.Tensor:
        no_nan_or_posinf = ~(torch.isnan(t) | (t == math.inf)).any(dim=-1)
        return no_nan_or_posinf & torch.isfinite(t).any(dim=-1)

    finite = row_ok(x_all) & row_ok(y_all)

    nan = torch.full((N,), math.nan, dtype=torch.float64)
    out = {k: nan.clone() for k in FLOAT_KEYS}
    out["top1_match"] = torch.zeros(N, dtype=torch.bool)
    out["topk_match"] = torch.zeros(N, dtype=torch.bool)
    out["finite"] = finite
    if labels is None:
        out["scored"] = torch.ones(N, dtype=torch.bool)
    else:
        lab = labels.detach().to(device="cpu", dtype=torch.int64).reshape(-1)
        assert lab.shape == (N,)
        out["scored"] = lab != ignore_index
        for k in LABEL_KEYS:
            out[k] = nan.clone()

    if bool(finite.any()):
        x, y = x_all[finite], y_all[finite]
        out["kl"][finite] = _kl(x, y)
        out["reverse_kl"][finite] = _kl(y, x)
        out["entropy_ref"][finite] = _entropy(x)
        out["entropy_quant"][finite] = _entropy(y)
        cosine, mse = _masked_cosine_mse(x, y)
        out["cosine"][finite] = cosine
        out["mse"][finite] = mse

        i_ref, j_quant = _first_argmax(x), _first_argmax(y)
        out["top1_match"][finite] = i_ref == j_quant
        x_j = x.gather(-1, j_quant[:, None])  # reference logit at the quant argmax
        n_strictly_above = (x > x_j).sum(dim=-1)
        out["topk_match"][finite] = n_strictly_above < top_k

        if labels is not None:
            rows = torch.nonzero(finite & out["scored"]).reshape(-1)
            if rows.numel():
                t = lab[rows][:, None]
                log_p = _log_softmax(x_all[rows]).gather(-1, t).reshape(-1)
                log_q = _log_softmax(y_all[rows]).gather(-1, t).reshape(-1)
                out["nll_ref"][rows] = -log_p
                out["nll_quant"][rows] = -log_q
                out["prob_ref"][rows] = torch.exp(log_p)
                out["prob_quant"][rows] = torch.exp(log_q)

    return {k: v.reshape(lead) for k, v in out.items()}


def kl_float64(ref: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    """Just KL(P ‖ Q) per row in float64 (for building inputs; rows must be finite)."""
    V = ref.shape[-1]
    x = ref.to(torch.float64).reshape(-1, V)
    y = quant.to(torch.float64).reshape(-1, V)
    return _kl(x, y).reshape(ref.shape[:-1])


def make_pair_with_kl(
    target_kl: float,
    rows: int,
    vocab: int,
    *,
    scale: float = 1.0,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``ref`` = scale·N(0,1) and ``quant`` = ref + eps·noise, ``eps`` chosen per row so that
    KL(P ‖ Q) of the rounded ``dtype`` pair is close to ``target_kl`` (within a few percent).

    ``scale`` sets how peaked P is (large scale: peaked, small: flat). For small eps,
    KL ≈ eps²/2 · Var_P(noise), which gives the first guess; a few secant steps on log KL vs
    log eps, measured in float64 on the rounded values, refine it.
    """
    ref = (scale * torch.randn(rows, vocab, generator=generator, dtype=torch.float64)).to(dtype)
    noise = torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    x = ref.to(torch.float64)
    p = torch.softmax(x, dim=-1)
    var = (p * noise**2).sum(-1) - (p * noise).sum(-1) ** 2
    eps = torch.sqrt(2 * target_kl / var)

    def quant_for(e: torch.Tensor) -> torch.Tensor:
        return (x + e[:, None] * noise).to(dtype)

    for _ in range(4):
        kl = kl_float64(ref, quant_for(eps))
        # KL ∝ eps² locally: rescale eps by sqrt(target / kl)
        eps = eps * torch.sqrt(target_kl / kl.clamp_min(1e-30))
    return ref, quant_for(eps)


# --- hidden states ------------------------------------------------------------------------------

HIDDEN_SUM_KEYS = ("ref_sq", "cand_sq", "dot", "diff_sq", "max_abs_diff", "nonfinite")


def reference_hidden_sums(ref: torch.Tensor, cand: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 per-row sums of activations ``ref``/``cand`` [..., H] flattened to [N, H], over
    the positions where both are finite: Σx², Σy², Σxy, Σ(x−y)², max|x−y| (0 when there is
    none), and the count of positions where either is NaN or ±inf."""
    H = ref.shape[-1]
    x = ref.detach().to(device="cpu", dtype=torch.float64).reshape(-1, H)
    y = cand.detach().to(device="cpu", dtype=torch.float64).reshape(-1, H)
    ok = torch.isfinite(x) & torch.isfinite(y)
    zero = torch.zeros((), dtype=torch.float64)
    x, y = torch.where(ok, x, zero), torch.where(ok, y, zero)
    return {
        "ref_sq": (x * x).sum(-1),
        "cand_sq": (y * y).sum(-1),
        "dot": (x * y).sum(-1),
        "diff_sq": ((x - y) ** 2).sum(-1),
        "max_abs_diff": (x - y).abs().max(dim=-1).values,
        "nonfinite": (~ok).sum(-1),
    }


def reference_layer_errors(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Float64 layer statistics of all (reference, candidate) activation batches [..., H]
    together, as defined in :mod:`qmetrics.metrics.layer_stats`: rows holding a non-finite value are
    counted and left out; over the other rows, with Δ = x − y,
    MSE = ΣΔ²/#elements, rel = √(ΣΔ²/Σx²), SNR = 10·log10(Σx²/ΣΔ²), cosine = mean per-row
    x·y/(‖x‖‖y‖) (0 when one row is all zero, 1 when both
    are), max |Δ|."""
    H = pairs[0][0].shape[-1]
    x = torch.cat([r.detach().double().reshape(-1, H) for r, _ in pairs])
    y = torch.cat([c.detach().double().reshape(-1, H) for _, c in pairs])
    finite = torch.isfinite(x) & torch.isfinite(y)
    good = finite.all(dim=-1)
    nonfinite_values = int((~finite).sum())
    x, y = x[good], y[good]
    d = x - y
    ref_sq, diff_sq = float((x * x).sum()), float((d * d).sum())
    nx, ny = (x * x).sum(-1).sqrt(), (y * y).sum(-1).sqrt()
    cos = (x * y).sum(-1) / (nx * ny)
    cos[(nx == 0) != (ny == 0)] = 0.0  # one row all zero: orthogonal by convention
    cos[(nx == 0) & (ny == 0)] = 1.0  # both all zero: identical
    snr = math.inf if diff_sq == 0 else 10 * math.log10(ref_sq / diff_sq)
    return {
        "tokens": int(good.sum()),
        "nonfinite_rows": int((~good).sum()),
        "nonfinite_values": nonfinite_values,
        "mse": diff_sq / d.numel(),
        "rel_error": math.sqrt(diff_sq / ref_sq),
        "snr_db": snr,
        "cosine": float(cos.mean()),
        "max_abs_error": float(d.abs().max()),
    }


def reference_output_stats(
    logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int = -100
) -> dict[str, torch.Tensor]:
    """float64 entropy, max_prob, margin, lse, nll, finite of ``logits`` [..., V] (direct
    softmax, the conventions of the module docstring: −inf entries are probability 0, a label
    on one has NLL +inf; a row with NaN/+inf, or no finite entry, is non-finite and NaN)."""
    x = logits.double()
    bad = torch.isnan(x) | (x == math.inf)
    finite = ~bad.any(-1) & torch.isfinite(x).any(-1)
    x = torch.where(finite[..., None], x, torch.zeros((), dtype=x.dtype))
    lse = torch.logsumexp(x, -1)
    logp = x - lse[..., None]
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    sorted_p = p.sort(-1, descending=True).values
    p1 = sorted_p[..., 0]
    p2 = sorted_p[..., 1] if x.shape[-1] > 1 else torch.zeros_like(p1)
    nan = torch.full_like(lse, torch.nan)
    out = {
        "entropy": torch.where(finite, entropy, nan),
        "max_prob": torch.where(finite, p1, nan),
        "margin": torch.where(finite, p1 - p2, nan),
        "lse": torch.where(finite, lse, nan),
        "finite": finite,
    }
    if labels is not None:
        ok = (labels != ignore_index) & (labels >= 0) & (labels < x.shape[-1])
        picked = x.gather(-1, torch.where(ok, labels, 0)[..., None]).squeeze(-1)
        out["nll"] = torch.where(ok & finite, lse - picked, nan)
    return out
