"""CPU path of the fused logit comparison: torch ops over row chunks, same outputs as the Triton
kernel (:mod:`qmetrics.kernels.logit_compare`).

Layout. ``ref``/``quant`` are [N, V] or [B, T, V] with last stride 1 and any leading strides
(``x[:, :-1]``, ``x[:, 1:]``, transposed B/T, ``x[..., 1:]``), possibly different for the two.
They are never copied: chunks of rows of one batch (or one position) index are views, and only
a chunk at a time is converted to fp32 (bounded working memory).

Math. Per row, with reference logits x, quant logits y, maxima m_x, m_y, c = m_y − m_x:

    w_i = exp(x_i − m_x),  v_i = exp(y_i − m_y) = w_i·e^{t_i},  t_i = (y_i − m_y) − (x_i − m_x)
    s_x = Σ w,  s_y = Σ v,  U = Σ w_i expm1(t_i),  φ(t) = expm1(t) − t = t²/2 + t³/6 + … ≥ 0
    D = Σ w_i φ(t_i),  D_r = Σ v_i φ(−t_i),  u = U/s_x,  u_r = −U/s_y  (Σ v expm1(−t) = −U)
    KL(P‖Q) = D/s_x + (log1p(u) − u)
    KL(Q‖P) = D_r/s_y + (log1p(u_r) − u_r)

This is the same quantity as log1p(U/s) − A/s with A = Σ w t (A = U − D), but it never
subtracts two O(|t|) numbers to get an O(t²) one: D and D_r are sums of non-negative terms,
and log1p(u) − u = −u²/2 + … is formed in float64 from u, whose own rounding error enters
only multiplied by u. So KL ≥ 1e-4 is accurate to ~1e-6 relative in fp32 (the old form lost
|E_P t|/KL ≈ 1/√KL digits to fp32 rounding of U and A), and KL ≈ 1e-6 stays well under 1%.
φ(±t) uses the Taylor polynomial to t⁷ for |t| < 1/3 (truncation < 6e-8 relative) and
expm1(t) − t, t − e/(1 + e) with e = expm1(t), elsewhere. The Triton kernel uses the same form.

Entropies: H(P) = log s_x − Σ w_i (x_i − m_x)/s_x. Cosine: Σxy/(‖x‖‖y‖); MSE = ‖x − y‖²/V.
Sums: fp32 terms; the eager path adds them in fp32 over segments of ~1024 entries, then in
float64; the compiled path adds them in a float64 accumulator (Σ w(x − m_x), Σ v(y − m_y) for
the entropies in fp32).
Top-k: the quant argmax j is in the reference top-k when #{i : x_i > x_j} < k.

Two implementations of the per-row sums, with the same outputs:

- eager: reused planar fp32 buffers and one batched matmul per chunk for all weighted sums;
- compiled: one plain function under ``torch.compile``, called once on the whole [B, T, V] view
  (inductor's fused C++ loops: a max pass and one sum pass, no [N, V] temporaries), ~4×
  faster. It is used for inputs of at least 128 rows and ``COMPILE_MIN_ELEMENTS`` logits, or
  as ``QMETRICS_TORCH_COMPILE`` says (``0`` never, ``1`` always), or as the ``compile``
  argument says. The first call per (shape, dtype, layout) compiles (10–30 s on 2 cores;
  inductor caches it on disk, later processes pay ~10 s). Without a C++ compiler, or if
  compiling fails, it warns once and stays eager.

Rows holding −inf entries, or whose logits are so far apart that w underflows where v does
not (t > 40), take a masked float64 path; rows with NaN/+inf get NaN outputs. A label that is
neither ``ignore_index`` nor in [0, V) is never read: its token gets NaN ``nll_*``/``prob_*``.
"""

from __future__ import annotations

import torch
from qmetrics.kernels.row_views import as_3d
from qmetrics.kernels.torch_compile import COMPILE_MIN_ELEMENTS, CompiledCPU, want_compile

# About 3 MiB of fp32 per [chunk, V] plane (24 rows at V = 32k): large enough to amortise
# per-op overhead, small enough for the ~12 planes in use to stay in the last-level cache.
_CHUNK_ELEMENTS = 24 * 32768
_FLOAT_OUT = (
    "kl", "reverse_kl", "entropy_ref", "entropy_quant", "cosine", "mse", "lse_ref", "lse_quant",
)  # fmt: skip
# Largest t = (y − m_y) − (x − m_x) for which v = w·(1 + expm1(t)) is used: beyond it w may
# have underflowed (x − m_x < −87) while v = exp(y − m_y) > e^−47 has not.
_ADDCMUL_MAX_T = 40.0
# Segment length of the reductions (fp32 partial sums of this many terms, added in float64).
_SEGMENT = 1024
# Block width of the two-level argmax (a vectorised max over blocks, then one block per row).
_ARGMAX_BLOCK = 64
# |t| below which φ(±t) comes from its Taylor polynomial (t⁸/8! term < 6e-8 of φ).
_PHI_SERIES_MAX = 1.0 / 3.0
# Columns of the per-row statistics both implementations return (float64).
_STATS = ("s_x", "s_y", "wbx", "vby", "u", "d", "d_r", "sq_x", "sq_y", "sq_d", "dot", "t_max",
          "above")  # fmt: skip
_COL = {name: k for k, name in enumerate(_STATS)}


def _phi_pair(
    t: torch.Tensor, e: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """φ(t) = expm1(t) − t and φ(−t) = expm1(−t) + t, given e = expm1(t), each accurate to a
    few ulp: t²·(E ± O) with the even/odd Taylor parts E = 1/2 + t²/24 + t⁴/720 and
    O = t/6 + t³/120 + t⁵/5040 for |t| < 1/3, the direct forms (expm1(−t) = −e/(1 + e)) else."""
    t2 = t * t
    even = (t2 * (1.0 / 720) + 1.0 / 24) * t2 + 0.5
    odd = ((t2 * (1.0 / 5040) + 1.0 / 120) * t2 + 1.0 / 6) * t
    small = t.abs() < _PHI_SERIES_MAX
    plus_series, minus_series = t2 * (even + odd), t2 * (even - odd)
    plus_direct, minus_direct = e - t, t - e / (e + 1.0)
    if out is None:
        return torch.where(small, plus_series, plus_direct), torch.where(
            small, minus_series, minus_direct
        )
    torch.where(small, plus_series, plus_direct, out=out[0])
    torch.where(small, minus_series, minus_direct, out=out[1])
    return out


def _plain_stats(
    x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row statistics of ``x``, ``y`` [..., V] written as plain tensor ops for
    ``torch.compile`` (inductor fuses them into a max pass and one sum pass over the rows, with
    no [..., V] temporaries, reading the strided views as they are): the [..., 13]
    float64 columns ``_STATS`` (``above`` left 0: see :func:`_count_above`), the maxima m_x,
    m_y and the first argmaxes.

    Each term is formed in fp32 and summed in a float64 accumulator, except Σ w·(x − m_x) and
    Σ v·(y − m_y) (entropies only), summed in fp32."""
    x, y = x.float(), y.float()
    mx, ax = x.max(dim=-1)
    my, ay = y.max(dim=-1)
    bx, by = x - mx[..., None], y - my[..., None]
    t = by - bx
    w = torch.exp(bx)
    e = torch.expm1(t)
    v = w + w * e
    phi_p, phi_m = _phi_pair(t, e)
    d = y - x

    def f64(term: torch.Tensor) -> torch.Tensor:  # a float64 accumulator
        return term.sum(dim=-1, dtype=torch.float64)

    def f32(term: torch.Tensor) -> torch.Tensor:  # for the entropies' Σ w·(x − m_x) only
        return term.sum(dim=-1).double()

    stats = torch.stack(
        [
            f64(w),
            f64(v),
            f32(w * bx),
            f32(v * by),
            f64(w * e),
            f64(w * phi_p),
            f64(v * phi_m),
            f64(x * x),
            f64(y * y),
            f64(d * d),
            f64(x * y),
            t.amax(dim=-1).double(),
            torch.zeros_like(mx, dtype=torch.float64),
        ],  # fmt: skip
        dim=-1,
    )
    return stats, mx, my, ax, ay


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
    """Reusable fp32 work buffers for one chunk of rows of the eager path, stored planar: one
    [rows, width] plane per quantity, each row zero padded from V to ``width = nseg·seg``.

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
        # 1, x − m_x, y − m_y, expm1(t), φ(t), φ(−t): the right operand
        self.values = torch.zeros(6, rows, width, dtype=torch.float32, device=device)
        self.values[0].fill_(1.0)
        self.t = torch.empty(rows, vocab, dtype=torch.float32, device=device)
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
        """[r, 2, 6] float64: Σ_i w_i·value_i and Σ_i v_i·value_i for each value plane."""
        lhs = self.weights[:, :r].reshape(2, r * self.nseg, self.seg).transpose(0, 1)
        rhs = self.values[:, :r].reshape(6, r * self.nseg, self.seg).transpose(0, 1)
        partial = torch.bmm(lhs, rhs.transpose(1, 2))  # [r·nseg, 2, 6]
        return partial.view(r, self.nseg, 2, 6).sum(1, dtype=torch.float64)

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


def _count_above(x: torch.Tensor, ax: torch.Tensor, ay: torch.Tensor) -> torch.Tensor:
    """#{i : x_i > x_j} at the quant argmax j = ``ay``, per row of ``x`` [r, V] (float64); only
    rows whose argmaxes differ are read (the others have 0)."""
    above = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    miss = (ax != ay).nonzero().squeeze(-1)
    if miss.numel():
        xm = x.index_select(0, miss)
        xj = xm.gather(1, ay.index_select(0, miss)[:, None])
        above[miss] = (xm > xj).sum(dim=-1).double()
    return above


def _eager_stats(
    x: torch.Tensor, y: torch.Tensor, buf: _Buffers
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The outputs of :func:`_plain_stats` for fp32 ``x``, ``y`` [r, V], from the reused
    buffers and one batched matmul (the eager path)."""
    r, vocab = x.shape
    w, v = buf.plane(buf.weights, 0, r), buf.plane(buf.weights, 1, r)
    bx, by, e, phi_p, phi_m = (buf.plane(buf.values, k, r) for k in range(1, 6))
    t, d = buf.t[:r], buf.diff[:r]

    sq_x, sq_y = buf.sum_squares(x), buf.sum_squares(y)
    mx, ax = _first_argmax(x)
    my, ay = _first_argmax(y)
    torch.sub(x, mx[:, None], out=bx)
    torch.exp(bx, out=w)
    torch.sub(y, my[:, None], out=by)
    torch.sub(y, x, out=d)
    # t = d − c with c = m_y − m_x, formed from the nearby numbers y − m_y and x − m_x
    torch.sub(by, bx, out=t)
    torch.expm1(t, out=e)
    # v = exp(y − m_y) = w·(1 + expm1(t)): one multiply-add instead of an exp (rows with
    # t > _ADDCMUL_MAX_T, where w may have underflowed, are redone in float64)
    torch.addcmul(w, w, e, out=v)
    _phi_pair(t, e, out=(phi_p, phi_m))
    sums = buf.weighted_sums(r)
    sq_d = buf.sum_squares(d)
    # Σxy by polarisation, accurate while x·y is not small next to ‖x‖‖y‖; a direct dot else.
    dot = (sq_x + sq_y - sq_d) / 2
    weak = (dot < 0.5 * (sq_x * sq_y).sqrt()).nonzero().squeeze(-1)
    if weak.numel():
        dot[weak] = (x[weak].double() * y[weak].double()).sum(dim=-1)
    above = _count_above(x, ax, ay)
    stats = torch.stack(
        [
            sums[:, 0, 0],
            sums[:, 1, 0],
            sums[:, 0, 1],
            sums[:, 1, 2],
            sums[:, 0, 3],
            sums[:, 0, 4],
            sums[:, 1, 5],
            sq_x,
            sq_y,
            sq_d,
            dot,
            t.amax(dim=-1).double(),
            above,
        ],  # fmt: skip
        dim=-1,
    )
    return stats, mx, my, ax, ay


def _finish(
    stats: torch.Tensor,
    mx: torch.Tensor,
    my: torch.Tensor,
    ax: torch.Tensor,
    ay: torch.Tensor,
    top_k: int,
    vocab: int,
) -> dict[str, torch.Tensor]:
    """Metrics of finite rows from their statistics [n, 13] (the module docstring's formulas)."""
    col = {name: stats[:, k] for name, k in _COL.items()}
    s_x, s_y = col["s_x"], col["s_y"]
    u, u_r = col["u"] / s_x, -col["u"] / s_y
    denom = (col["sq_x"] * col["sq_y"]).sqrt()
    cosine = torch.where(denom > 0, col["dot"] / denom.clamp_min(1e-300), torch.zeros_like(denom))
    top1 = ax == ay
    return {
        "kl": col["d"] / s_x + (torch.log1p(u) - u),
        "reverse_kl": col["d_r"] / s_y + (torch.log1p(u_r) - u_r),
        "entropy_ref": torch.log(s_x) - col["wbx"] / s_x,
        "entropy_quant": torch.log(s_y) - col["vby"] / s_y,
        "cosine": cosine.clamp(-1.0, 1.0),
        "mse": col["sq_d"] / vocab,
        "top1_match": top1,
        "topk_match": top1 | (col["above"] < top_k),
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


# torch.compile keeps at most a few versions of one function and then runs it uncompiled
# (far slower than the eager path), so past 6 input signatures (dtypes, strides, shape) new
# ones take the eager path instead.
_COMPILED = CompiledCPU(_plain_stats, name="compare_logits", dynamic=False, max_signatures=6)


def _row_stride(t: torch.Tensor) -> int | None:
    """The one row stride of a [B, T, V] view whose B·T rows are equally spaced, else None."""
    b, s, _ = t.shape
    if s == 1:
        return t.stride(0)
    if b == 1 or t.stride(0) == s * t.stride(1):
        return t.stride(1)
    return None


def _layout(ref: torch.Tensor, quant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Views [outer, inner, V] of both inputs whose inner rows are read in chunks: one dim of
    all B·T rows when both collapse to one row stride, else B outer and T inner, or T outer and
    B inner (``swapped``) when the B stride is the smaller one (rows closer in memory)."""
    b, s, vocab = ref.shape
    sr, sq = _row_stride(ref), _row_stride(quant)
    if sr is not None and sq is not None:
        flat = [t.as_strided((1, b * s, vocab), (0, st, 1)) for t, st in ((ref, sr), (quant, sq))]
        return flat[0], flat[1], False
    if abs(ref.stride(0)) < abs(ref.stride(1)) and b > 1:
        return ref.transpose(0, 1), quant.transpose(0, 1), True
    return ref, quant, False


def logit_compare_torch(
    ref: torch.Tensor,
    quant: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    top_k: int,
    ignore_index: int,
    chunk_rows: int | None = None,
    compile: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row metrics of ``ref``/``quant`` [N, V] or [B, T, V] (last stride 1, other strides
    arbitrary, never copied) in row chunks.

    Returns fp32 float fields and bool flags of B·T entries (see
    :mod:`qmetrics.metrics.token_metrics`), plus the label fields when ``labels`` (B·T int64
    entries) is given. ``compile``: use the ``torch.compile``d chunk function (None: see the
    module docstring). Makes no host sync on the CPU beyond ``nonzero`` (no ``item``/``bool``).
    """
    ref3, quant3 = as_3d(ref, "ref"), as_3d(quant, "quant")
    if ref3.shape != quant3.shape:
        raise ValueError(f"ref {tuple(ref.shape)} and quant {tuple(quant.shape)} differ in shape")
    nb, nt, vocab = ref3.shape
    n = nb * nt
    dev = ref3.device
    if labels is not None and labels.numel() != n:
        raise ValueError(f"labels has {labels.numel()} entries for {n} rows of logits")
    x3, y3, swapped = _layout(ref3, quant3)
    outer, inner = x3.shape[:2]
    large = n >= 128 and n * vocab >= COMPILE_MIN_ELEMENTS
    use_compile = want_compile(compile, dev, large) and n > 0
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    chunk_rows = max(1, min(chunk_rows, inner))
    stats = torch.empty(outer, inner, len(_STATS), dtype=torch.float64, device=dev)
    maxima = torch.empty(2, outer, inner, dtype=torch.float32, device=dev)
    argmax = torch.empty(2, outer, inner, dtype=torch.int64, device=dev)
    compiled = None
    if use_compile:  # one call over all rows (a Python loop would cost more than it saves)
        signature = (x3.dtype, y3.dtype, x3.stride(), y3.stride(), x3.shape)
        compiled = _COMPILED(signature, x3, y3)
    if compiled is not None:
        stats, mx, my, ax, ay = compiled
        maxima, argmax = torch.stack([mx, my]), torch.stack([ax, ay])
        miss = (ax != ay).reshape(-1).nonzero().squeeze(-1)
        for part in miss.split(max(1, _CHUNK_ELEMENTS // max(vocab, 1))):
            po, pi = part // inner, part % inner
            x = x3[po, pi]  # copies of these rows only
            stats[po, pi, _COL["above"]] = _count_above(x, ax[po, pi], ay[po, pi])
    else:
        stats = torch.empty(outer, inner, len(_STATS), dtype=torch.float64, device=dev)
        maxima = torch.empty(2, outer, inner, dtype=torch.float32, device=dev)
        argmax = torch.empty(2, outer, inner, dtype=torch.int64, device=dev)
        buf = _Buffers(chunk_rows, vocab, dev)
        for o in range(outer):
            for start in range(0, inner, chunk_rows):
                stop = min(inner, start + chunk_rows)
                x = buf.as_f32("ref", x3[o, start:stop])
                y = buf.as_f32("quant", y3[o, start:stop])
                st, mx, my, ax, ay = _eager_stats(x, y, buf)
                stats[o, start:stop] = st
                maxima[0, o, start:stop], maxima[1, o, start:stop] = mx, my
                argmax[0, o, start:stop], argmax[1, o, start:stop] = ax, ay
    if swapped:  # back to [B, T] order
        stats = stats.transpose(0, 1)
        maxima, argmax = maxima.transpose(1, 2), argmax.transpose(1, 2)
    stats = stats.reshape(n, len(_STATS))
    maxima, argmax = maxima.reshape(2, n), argmax.reshape(2, n)
    out = _finish(stats, maxima[0], maxima[1], argmax[0], argmax[1], top_k, vocab)
    out["finite"] = torch.ones(n, dtype=torch.bool, device=dev)

    # Rows the fast sums cannot serve: non-finite entries (Σx² not finite), a non-finite KL, or
    # t > _ADDCMUL_MAX_T. Their finiteness is read from the rows themselves, in chunks.
    plain = torch.isfinite(stats[:, _COL["sq_x"]]) & torch.isfinite(stats[:, _COL["sq_y"]])
    suspect = ~plain | ~torch.isfinite(out["kl"]) | ~torch.isfinite(out["reverse_kl"])
    suspect |= stats[:, _COL["t_max"]] > _ADDCMUL_MAX_T
    idx = suspect.nonzero().squeeze(-1)
    redo_rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for part in idx.split(redo_rows):
        rb, rt = part // nt, part % nt
        x, y = ref3[rb, rt], quant3[rb, rt]  # copies of these rows only
        no_nan = ~(x.isnan().any(-1) | y.isnan().any(-1))
        hi_x, hi_y = x.amax(-1), y.amax(-1)
        finite = no_nan & (hi_x < torch.inf) & (hi_y < torch.inf)
        finite &= (hi_x > -torch.inf) & (hi_y > -torch.inf)
        masked = _masked_rows(x, y, top_k)
        for name, value in masked.items():
            fill = torch.zeros((), dtype=value.dtype) if value.dtype == torch.bool else torch.nan
            out[name][part] = torch.where(finite, value, fill).to(out[name].dtype)
        out["finite"][part] = finite

    result = {name: out[name].float() for name in _FLOAT_OUT[:6]}
    for name in ("top1_match", "topk_match", "finite"):
        result[name] = out[name]
    if labels is None:
        result["scored"] = torch.ones(n, dtype=torch.bool, device=dev)
        return result

    labels = labels.reshape(n)
    scored = labels != ignore_index
    # an out-of-range label is never read: its NLL and probability are NaN
    readable = scored & (labels >= 0) & (labels < vocab)
    safe = torch.where(readable, labels, 0)
    rows = torch.arange(n, device=dev)
    x_t = ref3[rows // nt, rows % nt, safe].double()
    y_t = quant3[rows // nt, rows % nt, safe].double()
    nll_ref = torch.where(readable, out["lse_ref"] - x_t, torch.nan)
    nll_quant = torch.where(readable, out["lse_quant"] - y_t, torch.nan)
    result.update(
        scored=scored,
        nll_ref=nll_ref.float(),
        nll_quant=nll_quant.float(),
        prob_ref=torch.exp(-nll_ref).float(),
        prob_quant=torch.exp(-nll_quant).float(),
    )
    return result
