"""CPU path of the fused logit comparison: torch ops over row chunks, same outputs as the Triton
kernel (:mod:`qmetrics.kernels.logit_compare`).

Per row, with reference logits x, quant logits y, maxima m_x, m_y and shift c = m_y − m_x:

    w_i = exp(x_i − m_x),  v_i = exp(y_i − m_y),  t_i = y_i − x_i − c,  s_x = Σ w,  s_y = Σ v
    U = Σ w_i expm1(t_i),  A = Σ w_i t_i,  B = Σ v_i t_i
    KL(P‖Q) = log1p(U/s_x) − A/s_x
    KL(Q‖P) = log1p(U_r/s_y) + B/s_y,  U_r = Σ v_i expm1(−t_i) = −exp(κ)·U,  κ = m_x − m_y + c

U, A and B are small when the models agree, so KL comes out accurately even at 1e-6 instead of
as the difference of two large log-sum-exps. Entropies: H(P) = log s_x − Σ w_i (x_i − m_x)/s_x.
Cosine uses Σxy = (‖x‖² + ‖y‖² − ‖x − y‖²)/2 (a direct dot where that would cancel);
MSE = ‖x − y‖²/V. Every weighted sum comes from one batched matmul over segments of ~1024
entries with fp32 partial sums, added in float64; argmax is a two-level (block, then within
block) search, since ``torch.max(dim)`` is slow on the CPU.

Extra memory is O(chunk·V): a handful of [chunk, V] fp32 planes reused across chunks. Rows
holding −inf entries, or whose logits are so far apart that expm1 overflows, take a masked
float64 path; rows with NaN/+inf get NaN outputs.
"""

from __future__ import annotations

import torch

# About 3 MiB of fp32 per [chunk, V] plane (24 rows at V = 32k): large enough to amortise
# per-op overhead, small enough for the ~10 planes in use to stay in the last-level cache.
_CHUNK_ELEMENTS = 24 * 32768
_FLOAT_OUT = (
    "kl", "reverse_kl", "entropy_ref", "entropy_quant", "cosine", "mse", "lse_ref", "lse_quant",
)  # fmt: skip
# Largest t = (y − m_y) − (x − m_x) for which v = w·(1 + expm1(t)) is used: beyond it w may
# have underflowed (x − m_x < −87) while v = exp(y − m_y) > e^−47 has not.
_ADDCMUL_MAX_T = 40.0
# Segment length of the batched-matmul reductions (fp32 partial sums of this many terms).
_SEGMENT = 1024
# Block width of the two-level argmax (a vectorised max over blocks, then one block per row).
_ARGMAX_BLOCK = 64


def _first_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max and first index of it, via block maxima (torch.max(dim) is slow on CPU)."""
    rows, vocab = x.shape
    nblk = vocab // _ARGMAX_BLOCK
    if nblk < 2:
        vals, idx = x.max(dim=-1)
        return vals, idx
    body = x[:, : nblk * _ARGMAX_BLOCK].unflatten(-1, (nblk, _ARGMAX_BLOCK))
    block_max = body.amax(dim=-1)  # [rows, nblk]
    best_blk = block_max.argmax(dim=-1)  # first block holding the body max
    blk_vals = body[torch.arange(rows, device=x.device), best_blk]  # [rows, B]
    vals, within = blk_vals.max(dim=-1)
    idx = best_blk * _ARGMAX_BLOCK + within
    if nblk * _ARGMAX_BLOCK < vocab:
        tail_vals, tail_idx = x[:, nblk * _ARGMAX_BLOCK :].max(dim=-1)
        take_tail = tail_vals > vals
        vals = torch.where(take_tail, tail_vals, vals)
        idx = torch.where(take_tail, tail_idx + nblk * _ARGMAX_BLOCK, idx)
    return vals, idx


class _Buffers:
    """Reusable fp32 work buffers for one chunk of rows, stored planar: one [rows, width] plane
    per quantity, each row zero padded from V to ``width = nseg·seg``.

    Viewed as [rows·nseg] blocks of ``seg`` entries, one batched matmul yields every weighted
    sum with fp32 partial sums of only ``seg`` terms, which are then added in float64.
    """

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.vocab = vocab
        self.seg = _segment_length(vocab)
        self.nseg = -(-vocab // self.seg)
        width = self.nseg * self.seg
        # w = exp(x − m_x), v = exp(y − m_y): the left operand of the batched matmul
        self.weights = torch.zeros(2, rows, width, dtype=torch.float32, device=device)
        # 1, x − m_x, y − m_y, t = y − x − c, expm1(t): the right operand
        self.values = torch.zeros(5, rows, width, dtype=torch.float32, device=device)
        self.values[0].fill_(1.0)
        self.diff = torch.empty(rows, vocab, dtype=torch.float32, device=device)  # y − x
        self.ref: torch.Tensor | None = None
        self.quant: torch.Tensor | None = None

    def as_f32(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` in fp32, converted into a reused buffer when it is not fp32 already."""
        if t.dtype == torch.float32:
            return t
        buf = getattr(self, name)
        if buf is None or buf.shape[0] < t.shape[0]:
            buf = torch.empty(t.shape, dtype=torch.float32, device=t.device)
            setattr(self, name, buf)
        return buf[: t.shape[0]].copy_(t)

    def plane(self, buffer: torch.Tensor, k: int, r: int) -> torch.Tensor:
        """The [r, V] view of quantity ``k`` of ``buffer`` (padding excluded)."""
        return buffer[k, :r, : self.vocab]

    def weighted_sums(self, r: int) -> torch.Tensor:
        """[r, 2, 5] float64: Σ_i w_i·value_i and Σ_i v_i·value_i for each value plane."""
        lhs = self.weights[:, :r].reshape(2, r * self.nseg, self.seg).transpose(0, 1)
        rhs = self.values[:, :r].reshape(5, r * self.nseg, self.seg).transpose(0, 1)
        partial = torch.bmm(lhs, rhs.transpose(1, 2))  # [r·nseg, 2, 5]
        return partial.view(r, self.nseg, 2, 5).sum(1, dtype=torch.float64)

    def sum_squares(self, t: torch.Tensor) -> torch.Tensor:
        """Σ t² per row of a [r, V] tensor: fp32 partial norms per segment, added in float64."""
        body = (self.vocab // self.seg) * self.seg
        parts = [t[:, :body].unflatten(-1, (-1, self.seg))] if body else []
        if body < self.vocab:
            parts.append(t[:, body:, None])
        return sum(torch.linalg.vector_norm(p, dim=-1).double().square().sum(-1) for p in parts)


def _segment_length(vocab: int) -> int:
    """A divisor of V in [_SEGMENT/2, 2·_SEGMENT] when there is one (no padding), else
    _SEGMENT; V itself when V ≤ _SEGMENT."""
    if vocab <= _SEGMENT:
        return vocab
    for seg in (*range(_SEGMENT, 2 * _SEGMENT + 1), *range(_SEGMENT - 1, _SEGMENT // 2 - 1, -1)):
        if vocab % seg == 0:
            return seg
    return _SEGMENT


def _fast_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    sq_x: torch.Tensor,
    sq_y: torch.Tensor,
    top_k: int,
    buf: _Buffers,
) -> dict[str, torch.Tensor]:
    """Metrics for rows whose entries are all finite (fp32 x, y of shape [r, V] and their
    precomputed float64 sums of squares)."""
    r, vocab = x.shape
    w, v = buf.plane(buf.weights, 0, r), buf.plane(buf.weights, 1, r)
    bx, by, t, e = (buf.plane(buf.values, k, r) for k in range(1, 5))
    d = buf.diff[:r]

    mx, ax = _first_argmax(x)
    my, ay = _first_argmax(y)
    torch.sub(x, mx[:, None], out=bx)
    torch.exp(bx, out=w)
    torch.sub(y, my[:, None], out=by)
    torch.sub(y, x, out=d)
    # t = d − c with c = m_y − m_x, formed from the nearby numbers y − m_y and x − m_x
    torch.sub(by, bx, out=t)
    torch.expm1(t, out=e)
    # v = exp(y − m_y) = w·(1 + expm1(t)): one multiply-add instead of an exp. Where t is large
    # w may have underflowed while v has not, so those rows take the exp.
    torch.addcmul(w, w, e, out=v)
    wide = (t.amax(dim=-1) > _ADDCMUL_MAX_T).nonzero().squeeze(-1)
    if wide.numel():
        v[wide] = torch.exp(by[wide])
    sums = buf.weighted_sums(r)
    s_x, s_y = sums[:, 0, 0], sums[:, 1, 0]
    wx, vy = sums[:, 0, 1], sums[:, 1, 2]
    wt, vt, we = sums[:, 0, 3], sums[:, 1, 3], sums[:, 0, 4]
    # U_r = Σ v expm1(−t) = −exp(κ)·U exactly, with κ = m_x − m_y + c = 0 here
    u_rev = -we
    sq_d = buf.sum_squares(d)
    denom = (sq_x * sq_y).sqrt()
    # Polarisation is accurate while x·y is not small next to ‖x‖‖y‖; other rows get a direct dot.
    dot = (sq_x + sq_y - sq_d) / 2
    weak = (dot < 0.5 * denom).nonzero().squeeze(-1)
    if weak.numel():
        dot[weak] = (x[weak].double() * y[weak].double()).sum(dim=-1)
    cosine = torch.where(denom > 0, dot / denom.clamp_min(1e-300), torch.zeros_like(dot))

    top1 = ax == ay
    topk = top1.clone()
    miss = (~top1).nonzero().squeeze(-1)
    if miss.numel():
        xm = x.index_select(0, miss)
        xj = xm.gather(1, ay.index_select(0, miss)[:, None])
        topk[miss] = (xm > xj).sum(dim=-1) < top_k
    return {
        "kl": torch.log1p(we / s_x) - wt / s_x,
        "reverse_kl": torch.log1p(u_rev / s_y) + vt / s_y,
        "entropy_ref": torch.log(s_x) - wx / s_x,
        "entropy_quant": torch.log(s_y) - vy / s_y,
        "cosine": cosine.clamp(-1.0, 1.0),
        "mse": sq_d / vocab,
        "top1_match": top1,
        "topk_match": topk,
        "lse_ref": mx.double() + torch.log(s_x),
        "lse_quant": my.double() + torch.log(s_y),
    }


def _masked_rows(x: torch.Tensor, y: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Metrics for rows with −inf entries (and no NaN/+inf), in float64 with explicit masks."""
    x, y = x.double(), y.double()
    fx, fy = torch.isfinite(x), torch.isfinite(y)
    both = fx & fy
    lse_x = torch.logsumexp(x, dim=-1)
    lse_y = torch.logsumexp(y, dim=-1)
    lp = x - lse_x[:, None]
    lq = y - lse_y[:, None]
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros((), dtype=x.dtype)
    diff = torch.where(both, lp - lq, zero)
    kl = (p * diff).sum(-1)
    rkl = -(q * diff).sum(-1)
    kl = torch.where((fx & ~fy).any(-1), torch.inf, kl)
    rkl = torch.where((fy & ~fx).any(-1), torch.inf, rkl)
    ent_x = -(p * torch.where(fx, lp, zero)).sum(-1)
    ent_y = -(q * torch.where(fy, lq, zero)).sum(-1)
    xs, ys = torch.where(both, x, zero), torch.where(both, y, zero)
    dot, sq_x, sq_y = (xs * ys).sum(-1), (xs * xs).sum(-1), (ys * ys).sum(-1)
    denom = (sq_x * sq_y).sqrt()
    cosine = torch.where(denom > 0, dot / denom.clamp_min(1e-300), zero)
    n_both = both.sum(-1)
    mse = ((xs - ys) ** 2).sum(-1) / n_both.clamp_min(1)
    mse = torch.where(n_both > 0, mse, torch.nan)
    ax, ay = x.argmax(-1), y.argmax(-1)
    xj = x.gather(1, ay[:, None])
    topk = (x > xj).sum(-1) < top_k
    return {
        "kl": kl,
        "reverse_kl": rkl,
        "entropy_ref": ent_x,
        "entropy_quant": ent_y,
        "cosine": cosine.clamp(-1.0, 1.0),
        "mse": mse,
        "top1_match": ax == ay,
        "topk_match": topk,
        "lse_ref": lse_x,
        "lse_quant": lse_y,
    }


def _chunk_metrics(
    x: torch.Tensor, y: torch.Tensor, top_k: int, buf: _Buffers
) -> dict[str, torch.Tensor]:
    """Metrics of one chunk: the fp32 fast path for rows of finite entries, the float64 masked
    path for rows with −inf entries or where the fast path overflowed (logits ~90 apart), and
    NaN / False for rows holding NaN or +inf."""
    r = x.shape[0]
    # Σx² is finite exactly when every entry is: cheap classification of the common case.
    sq_x = buf.sum_squares(x)
    sq_y = buf.sum_squares(y)
    plain = torch.isfinite(sq_x) & torch.isfinite(sq_y)
    if bool(plain.all()):
        values = _fast_rows(x, y, sq_x, sq_y, top_k, buf)
        values["finite"] = torch.ones(r, dtype=torch.bool, device=x.device)
        redo = ~torch.isfinite(values["kl"]) | ~torch.isfinite(values["reverse_kl"])
        if not bool(redo.any()):
            return values
        values = {k: v.clone() for k, v in values.items()}
    else:
        values = {k: torch.full((r,), torch.nan, dtype=torch.float64, device=x.device)
                  for k in _FLOAT_OUT}  # fmt: skip
        for k in ("top1_match", "topk_match"):
            values[k] = torch.zeros(r, dtype=torch.bool, device=x.device)
        idx = plain.nonzero().squeeze(-1)
        if idx.numel():
            fast = _fast_rows(x[idx], y[idx], sq_x[idx], sq_y[idx], top_k, buf)
            for k, v in fast.items():
                values[k][idx] = v
        # NaN or +inf anywhere, or no finite entry, makes a row non-finite.
        no_nan = ~(x.isnan().any(-1) | y.isnan().any(-1))
        hi_x, hi_y = x.amax(-1), y.amax(-1)
        finite = no_nan & (hi_x < torch.inf) & (hi_y < torch.inf)
        values["finite"] = finite & (hi_x > -torch.inf) & (hi_y > -torch.inf)
        redo = values["finite"] & (~plain | ~torch.isfinite(values["kl"])
                                   | ~torch.isfinite(values["reverse_kl"]))  # fmt: skip
    idx = redo.nonzero().squeeze(-1)
    if idx.numel():
        for k, v in _masked_rows(x[idx], y[idx], top_k).items():
            values[k][idx] = v.to(values[k].dtype)
    return values


def logit_compare_torch(
    ref: torch.Tensor,
    quant: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    top_k: int,
    ignore_index: int,
    chunk_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row metrics of ``ref``/``quant`` [N, V] (last dim contiguous) in row chunks.

    Returns fp32 float fields and bool flags (see :mod:`qmetrics.metrics.token_metrics`), plus the
    label fields when ``labels`` [N] (int64) is given.
    """
    n, vocab = ref.shape
    dev = ref.device
    out = {
        name: torch.full((n,), torch.nan, dtype=torch.float64, device=dev)
        for name in (
            "kl",
            "reverse_kl",
            "entropy_ref",
            "entropy_quant",
            "cosine",
            "mse",
            "lse_ref",
            "lse_quant",
        )
    }
    for name in ("top1_match", "topk_match", "finite"):
        out[name] = torch.zeros(n, dtype=torch.bool, device=dev)
    if chunk_rows is None:
        chunk_rows = max(1, min(n, _CHUNK_ELEMENTS // vocab))
    buf = _Buffers(min(chunk_rows, n), vocab, dev)

    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        x = buf.as_f32("ref", ref[start:stop])
        y = buf.as_f32("quant", quant[start:stop])
        for name, value in _chunk_metrics(x, y, top_k, buf).items():
            out[name][start:stop] = value

    result = {
        name: out[name].float()
        for name in ("kl", "reverse_kl", "entropy_ref", "entropy_quant", "cosine", "mse")
    }
    result["top1_match"] = out["top1_match"]
    result["topk_match"] = out["topk_match"]
    result["finite"] = out["finite"]
    if labels is None:
        result["scored"] = torch.ones(n, dtype=torch.bool, device=dev)
        return result

    scored = labels != ignore_index
    safe = torch.where(scored, labels, 0)[:, None]
    x_t = ref.gather(1, safe).squeeze(1).double()
    y_t = quant.gather(1, safe).squeeze(1).double()
    nll_ref = torch.where(scored, out["lse_ref"] - x_t, torch.nan)
    nll_quant = torch.where(scored, out["lse_quant"] - y_t, torch.nan)
    result.update(
        scored=scored,
        nll_ref=nll_ref.float(),
        nll_quant=nll_quant.float(),
        prob_ref=torch.exp(-nll_ref).float(),
        prob_quant=torch.exp(-nll_quant).float(),
    )
    return result
