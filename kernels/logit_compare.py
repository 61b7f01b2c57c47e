"""Fused logit comparison: one read of two [N, V] or [B, T, V] logit tensors -> per-row metrics.

The inputs are read in place through their batch and sequence strides (``x[:, :-1]``,
transposed B/T, ``x[..., 1:]``): never copied. For each row, with reference logits x, quantized
logits y, exp anchors c_x, c_y (the maxima of the first sub-tile) and a fixed shift μ0 =
Σ w (y − x) / Σ w over that sub-tile (the P-weighted mean difference, or c_y − c_x within 1e-4
of it), so that t is small where the probability mass is:

    w_i = exp(x_i − c_x)   v_i = exp(y_i − c_y)   t_i = y_i − x_i − μ0   (so v = w e^t e^κ)
    φ(t) = expm1(t) − t = t²/2 + t³/6 + … ≥ 0     ψ(t) = t expm1(t) − φ(t) = t²/2 + t³/3 + … ≥ 0
    s_x = Σ w   s_y = Σ v   h_x = Σ w (x − c_x)   h_y = Σ v (y − c_y)
    D = Σ w φ(t)   A = Σ w t   E = Σ w t expm1(t)   B = Σ v t   U = Σ w expm1(t) = A + D
    u = U/s_x   u_r = −U/(s_x + U)   κ = c_x − c_y + μ0   λ(u) = log1p(u) − u
    KL(P‖Q) = D/s_x + λ(u)              KL(Q‖P) = (E − D)/(s_x + U) + λ(u_r)
    H(P) = log s_x − h_x/s_x,   H(Q) = log s_y − h_y/s_y

D and E − D = Σ w ψ(t) are sums of non-negative terms, each to fp32 rounding (φ and
t expm1(t) come from one polynomial without their linear term), and λ(u) ≈ −u²/2 is formed in
float64, where the rounding of U (and A) enters only multiplied by u: no O(|t|) terms cancel
into the O(t²) result. The old form log1p(U/s_x) − A/s_x lost |E_P t|/KL of the fp32 digits
of U and A (issue 10). t is formed from the anchored exponents (_log2_frame), so a large
offset between ref and quant costs no digits. When |u| ≥ 1/2, a sum overflows (logits far
apart) or the w-sums miss some of Q (s_y e^−κ ≠ s_x + U: w underflowed where v did not), KL is
large and is taken from the log-sum-exps directly: KL(P‖Q) = −κ + log s_y − log s_x − A/s_x,
KL(Q‖P) = κ + log s_x − log s_y + B/s_y; the fast kernel then reads the row a second time for
B (elsewhere B = e^κ (A + E)), so its main loop does not carry B. Cosine and MSE come from
Σx², Σy², Σ(y−x)² (Σxy = (Σx² + Σy² − Σ(y−x)²)/2). The quant argmax j is in the reference
top-k iff x_j ≥ the k-th largest x (with multiplicity), kept in a small register buffer. KL and
reverse KL stay within 3e-6 relative of float64 for KL ≥ 1e-4 at V up to 256k with fp32 inputs
(tests/test_precision.py; under the interpreter ≤ 7e-7 at V = 50257, ≤ 1.6e-6 at V = 256000).
A label that is neither ignore_index nor in [0, V) is never read: its NLL and probability are
NaN. A row of V = 1 has KL = H = 0 exactly (P = Q = 1).

Three kernels:

* ``_fast_kernel`` — rows whose entries are all finite, which is every row of a real model. A
  tile is G sub-tiles [ROWS, VEC]: each thread holds one 16-byte row of each and keeps its own
  sums (one FMA chain per sum), so a tile costs in-thread work plus one cross-thread
  reduction. The anchors (c_x, c_y) are shared by the program and move (rescaling the sums)
  only when a tile's maximum exceeds them by more than 4 nats; that check and the top-k buffer
  update are one rare branch, which rereads only the sub-tiles whose maximum exceeds the k-th
  largest value so far and inserts their candidates with warp-wide integer reductions (the
  buffer holds order-preserving integer keys of the values). The argmax is recovered after
  the loop from the tile where each tile row's maximum first appeared. A row that does not
  start on a 16-byte boundary (V % 8 ≠ 0, ``x[..., 1:]``) peels a masked head of < VEC
  elements, so the body keeps 16-byte loads. NaN or ±inf make Σx² or Σy² non-finite: such
  rows are flagged and left to ``_general_kernel``. On sm_90 the hot path costs 35–36 SASS
  instructions per logit, plus ~1 (top_k = 1) to ~4 (top_k = 5) for the top-k branch on iid
  logits (``benchmarks/sass_report.py``; launched with ``maxnreg`` = 168: 3 blocks of 4 warps
  per SM).
* ``_merge_splits_kernel`` — when there are too few rows to fill the GPU, the fast kernel splits
  V across programs ("splits") and this kernel merges their partial states.
* ``_general_kernel`` — the masked path for flagged rows: NaN and +inf are counted, −inf entries
  handled exactly (sums split by which side is finite; one-sided −inf gives KL = inf). The
  other programs only read their flag.

Only per-row values are written: memory traffic is one read of each logit tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qmetrics.kernels.limits import MAX_TOP_K

# Order of the per-row outputs in the [NUM_OUTPUTS, N] fp32 result.
OUTPUTS = (
    "kl", "reverse_kl", "entropy_ref", "entropy_quant", "cosine", "mse",
    "top1_match", "topk_match", "finite", "nll_ref", "nll_quant", "prob_ref", "prob_quant",
)  # fmt: skip
NUM_OUTPUTS = len(OUTPUTS)
# Float fields of a partial (per split) state, in order; two int32 argmax indices go apart.
STATE = (
    "m_x", "s_xb", "s_xo", "h_x", "m_y", "s_yb", "s_yo", "h_y", "r_x", "r_y", "c_set",
    "d", "a", "b", "xy", "xx", "yy", "dd", "n_both", "n_bad", "n_fwd_inf", "n_rev_inf",
    "ax_val", "ay_val", "x_at_ay",
    "e",
)  # fmt: skip
NUM_STATE = len(STATE)

_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_NLOG2E = tl.constexpr(-1.4426950408889634)
# ln 2 × fp32(log2 e): the fast kernel's exponent 2**(x·fp32(log2 e) − c₂) is e**(x·_XSCALE − c)
# with c = c₂ ln 2 (1 + 3e-8 rather than 1: what its label NLLs scale x by)
_XSCALE = tl.constexpr(0.6931471805599453 * torch.tensor(1.4426950408889634).item())
# _phi2 blends its two branches instead of selecting under Triton < 3.7, whose ptxas spills the
# select's predicates to registers in the main loop (+2 SASS per logit; the blend costs 1).
_BLEND = tl.constexpr(tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7))
# The fast kernel moves its exp anchors when a tile's maximum exceeds them by more than this
# (nats): w = exp(x − c) ≤ e^4, and the entropy sums keep full fp32 precision.
_REANCHOR = tl.constexpr(4.0)
# bx/by value of a tile row whose maximum has not appeared yet (tile starts are ≥ −VEC).
_NO_TILE = tl.constexpr(-(1 << 30))


@triton.jit
def _expm1(t):
    """expm1 in fp32: degree-8 Taylor polynomial for |t| < 1/4 (error < 1e-11 relative),
    exp(t) − 1 elsewhere (where it loses no digits)."""
    p = 1.0 + t * (1.0 / 7.0) * (1.0 + t * (1.0 / 8.0))
    p = 1.0 + t * (1.0 / 6.0) * p
    p = 1.0 + t * (1.0 / 5.0) * p
    p = 1.0 + t * (1.0 / 4.0) * p
    p = 1.0 + t * (1.0 / 3.0) * p
    p = 1.0 + t * (1.0 / 2.0) * p
    p = t * p
    return tl.where(tl.abs(t) < 0.25, p, tl.exp(t) - 1.0)


@triton.jit
def _phi(t):
    """φ(t) = expm1(t) − t = t²/2 + t³/6 + … ≥ 0 (fp32 or fp64) without cancellation: Taylor
    polynomial to t⁹ for |t| < 1/4 (truncation < 4e-10 relative), exp(t) − 1 − t elsewhere."""
    p = 1.0 + t * (1.0 / 8.0) * (1.0 + t * (1.0 / 9.0))
    p = 1.0 + t * (1.0 / 7.0) * p
    p = 1.0 + t * (1.0 / 6.0) * p
    p = 1.0 + t * (1.0 / 5.0) * p
    p = 1.0 + t * (1.0 / 4.0) * p
    p = 1.0 + t * (1.0 / 3.0) * p
    p = (t * t) * 0.5 * p
    return tl.where(tl.abs(t) < 0.25, p, (tl.exp(t) - 1.0) - t)


@triton.jit
def _log1p_minus(u):
    """log(1 + u) − u in float64 (≈ −u²/2): its series to u⁹ for |u| < 1/64, else directly."""
    p = -1.0 / 8.0 + u * (1.0 / 9.0)
    p = 1.0 / 7.0 + u * p
    p = -1.0 / 6.0 + u * p
    p = 1.0 / 5.0 + u * p
    p = -1.0 / 4.0 + u * p
    p = 1.0 / 3.0 + u * p
    p = -0.5 + u * p
    return tl.where(tl.abs(u) < 1.0 / 64.0, u * u * p, tl.log(1.0 + u) - u)


@triton.jit
def _anchor(m_old, m_new):
    """Finite anchor for exp(· − anchor) and the factor exp(m_old − anchor) rescaling old sums."""
    anchor = tl.where(m_new == _NEG_INF, 0.0, m_new)
    return anchor, tl.exp(m_old - anchor)


@triton.jit
def _shifted_entropy_sum(h, s, m_old, anchor, alpha):
    """Σ w (x − anchor) of the old terms under the new anchor: α (h + s (m_old − anchor))."""
    return alpha * (h + s * tl.where(s > 0, m_old - anchor, 0.0))


@triton.jit
def _kth_largest_insert(top, lanes_k, vals, cand, lanes):
    """Insert the candidate values ``vals[cand]`` into ``top`` (the k largest so far, padded
    with +inf) and return it with its new minimum, the k-th largest value."""
    thr = tl.min(top, axis=0)
    cand = cand & (vals > thr)
    n_cand = tl.sum(cand.to(tl.int32), axis=0)
    while n_cand > 0:
        cv, ci = tl.max(tl.where(cand, vals, _NEG_INF), axis=0, return_indices=True)
        slot = tl.argmin(top, axis=0)
        top = tl.where(lanes_k == slot, cv, top)
        thr = tl.min(top, axis=0)
        cand = cand & (lanes != ci) & (vals > thr)
        n_cand = tl.sum(cand.to(tl.int32), axis=0)
    return top, thr


@triton.jit
def _small_regime(sxb, syb, d, a, e, kappa):
    """Whether KL comes from the small-term form (float64 inputs, nats): |U/s_x| < 1/2 with
    U = A + D, D, A and E finite, and the w-sums hold all of Q's mass: s_y e^−κ = s_x + U
    (= Σ w e^t) to 1e-4 — not so where w underflowed while v did not (logits ~90 nats apart),
    which the log-sum-exp form (with B = Σ v t) handles."""
    u = a + d
    ratio = u / sxb
    s_q = sxb + u
    agree = tl.abs(syb * tl.exp(-kappa) - s_q) <= 1e-4 * s_q
    return (ratio == ratio) & (tl.abs(ratio) < 0.5) & (tl.abs(e) < _POS_INF) & agree


@triton.jit
def _finalize(
    out_ptr, N, V, row, ref_row, quant_row, label_ptr, ignore_index,
    m_x, s_xb, s_xo, h_x, m_y, s_yb, s_yo, h_y, mu, d, a, b, e, xy, xx, yy, dd, n_both,
    n_bad, n_fwd_inf, n_rev_inf, ax_idx, ay_idx, x_at_ay, kth,
    HAS_LABELS: tl.constexpr, X_SCALE: tl.constexpr,
):  # fmt: skip
    """Turn one row's merged state into the outputs (float64 scalar math) and store them.
    ``m_x``, ``m_y``: the exp anchors (nats) of w = exp(x·X_SCALE − m_x), v = exp(y·X_SCALE − m_y).
    ``mu``: the shift of t = y − x − μ; ``d``, ``a``, ``e``, ``b``: Σ w φ(t), Σ w t,
    Σ w t expm1(t), Σ v t over the positions where both logits are finite (nats).
    A label outside [0, V) that is not ``ignore_index`` is never read: its NLL and probability
    are NaN."""
    f64 = tl.float64
    finite = (n_bad == 0) & (m_x > _NEG_INF) & (m_y > _NEG_INF)
    nan = float("nan")
    anc_x = tl.where(m_x == _NEG_INF, 0.0, m_x).to(f64)  # the anchors used for w and v
    anc_y = tl.where(m_y == _NEG_INF, 0.0, m_y).to(f64)
    sxb, sxo, syb, syo = s_xb.to(f64), s_xo.to(f64), s_yb.to(f64), s_yo.to(f64)
    sx, sy = sxb + sxo, syb + syo
    log_sx, log_sy = tl.log(sx), tl.log(sy)
    # v = w e^t e^κ: κ = m_x − m_y + μ (differences of fp32 numbers: exact in fp64)
    kappa = (anc_x - anc_y) + mu.to(f64)
    d64, a64, b64, e64 = d.to(f64), a.to(f64), b.to(f64), e.to(f64)
    # U = Σ w expm1(t) = A + D, u = U/s: KL(P‖Q) = D/s + (log1p(u) − u); with Σ w e^t = s + U
    # and u_r = −U/(s + U): KL(Q‖P) = (E − D)/(s + U) + (log1p(u_r) − u_r) (E − D = Σ w ψ(t),
    # ψ(t) = 1 − e^t + t e^t ≥ 0). D, E and E − D are sums of non-negative terms and A enters
    # only through u, so no O(|t|) terms cancel into an O(t²) result.
    u64 = a64 + d64
    ratio = u64 / sxb
    small = _small_regime(sxb, syb, d64, a64, e64, kappa)
    kl_small = d64 / sxb + _log1p_minus(ratio) + tl.log(1.0 + syo / syb)
    kl_lse = -kappa + log_sy - log_sx - a64 / sxb
    kl = tl.where(n_fwd_inf > 0, _POS_INF, tl.where(small, kl_small, kl_lse))
    s_q = sxb + tl.where(small, u64, 0.0)
    ratio_r = -u64 / s_q
    rkl_small = (e64 - d64) / s_q + _log1p_minus(ratio_r) + tl.log(1.0 + sxo / sxb)
    rkl_lse = kappa + log_sx - log_sy + b64 / syb
    rkl = tl.where(n_rev_inf > 0, _POS_INF, tl.where(small, rkl_small, rkl_lse))
    ent_x = log_sx - h_x.to(f64) / sx
    ent_y = log_sy - h_y.to(f64) / sy
    # one token: P = Q = 1, whatever the rounding of the anchors in the exponents
    one = V == 1
    kl = tl.where(one & (n_fwd_inf == 0), 0.0, kl)
    rkl = tl.where(one & (n_rev_inf == 0), 0.0, rkl)
    ent_x = tl.where(one, 0.0, ent_x)
    ent_y = tl.where(one, 0.0, ent_y)
    denom = tl.sqrt(xx.to(f64) * yy.to(f64))
    cosine = tl.where(denom > 0, xy.to(f64) / tl.where(denom > 0, denom, 1.0), 0.0)
    cosine = tl.minimum(tl.maximum(cosine, -1.0), 1.0)
    mse = tl.where(n_both > 0, dd.to(f64) / tl.maximum(n_both, 1.0).to(f64), nan)
    top1 = tl.where(finite & (ax_idx == ay_idx), 1.0, 0.0)
    topk = tl.where(finite & (x_at_ay >= kth), 1.0, 0.0)

    o = out_ptr + row
    tl.store(o + 0 * N, tl.where(finite, kl, nan).to(tl.float32))
    tl.store(o + 1 * N, tl.where(finite, rkl, nan).to(tl.float32))
    tl.store(o + 2 * N, tl.where(finite, ent_x, nan).to(tl.float32))
    tl.store(o + 3 * N, tl.where(finite, ent_y, nan).to(tl.float32))
    tl.store(o + 4 * N, tl.where(finite, cosine, nan).to(tl.float32))
    tl.store(o + 5 * N, tl.where(finite, mse, nan).to(tl.float32))
    tl.store(o + 6 * N, top1.to(tl.float32))
    tl.store(o + 7 * N, topk.to(tl.float32))
    tl.store(o + 8 * N, tl.where(finite, 1.0, 0.0).to(tl.float32))
    if HAS_LABELS:
        label = tl.load(label_ptr + row)
        scored = (label != ignore_index) & (label >= 0) & (label < V)
        safe = tl.where(scored, label, 0)
        x_t = tl.load(ref_row + safe).to(f64)
        y_t = tl.load(quant_row + safe).to(f64)
        nll_x = (anc_x - x_t * X_SCALE) + log_sx
        nll_y = (anc_y - y_t * X_SCALE) + log_sy
        keep = finite & scored
        tl.store(o + 9 * N, tl.where(keep, nll_x, nan).to(tl.float32))
        tl.store(o + 10 * N, tl.where(keep, nll_y, nan).to(tl.float32))
        tl.store(o + 11 * N, tl.where(keep, tl.exp(-nll_x), nan).to(tl.float32))
        tl.store(o + 12 * N, tl.where(keep, tl.exp(-nll_y), nan).to(tl.float32))


@triton.jit
def _exp2(z, PTX: tl.constexpr):
    """2**z. On NVIDIA GPUs one ex2.approx.ftz (denormal results flush to 0, which no sum here
    can see); the default lowering adds a range check and two rescales per element."""
    if PTX:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(z)


@triton.jit
def _phi2(t2, PTX: tl.constexpr):
    """For t = t2·ln 2: φ(t)/ln 2 and t·expm1(t)/ln²2 in fp32, each to fp32 rounding (no
    linear term to cancel), from φ(t) = expm1(t) − t and t·expm1(t) = t (t + φ(t)). For
    |t2| < 1/4, φ/ln 2 = t2² Σ_{n=2..6} (ln 2)^(n−1) t2^(n−2)/n! (truncation < 7e-8 relative);
    elsewhere (2**t2 − 1)/ln 2 − t2, where φ(t) ≥ 0.014 and the ~1e-7 error of 2**t2 costs
    < 1e-5 of a term, at random sign. A select becomes a predicated FMA whose predicate lives
    across the exponential's latency; Triton 3.6's ptxas then spills predicates to registers
    (+2 SASS per logit), so there (_BLEND) the two are blended with a 0/1 factor instead
    (+1), which within 1/4 adds ≲ 1e-14 absolute (the rounding of the unused branch)."""
    t2sq = t2 * t2
    p = t2 * 2.222259691071407e-4 + 1.9236258215256953e-3  # (ln 2)^(n−1)/n!, n = 6, 5
    p = p * t2 + 1.3876027166205394e-2
    p = p * t2 + 8.007550231970023e-2
    p = p * t2 + 0.34657359027997264
    big = (_exp2(t2, PTX) - 1.0) * 1.4426950408889634 - t2
    if _BLEND:
        on_poly = (t2sq < 0.0625).to(tl.float32)
        phi = big + on_poly * (t2sq * p - big)
    else:
        phi = tl.where(t2sq < 0.0625, t2sq * p, big)
    return phi, t2 * phi + t2sq


@triton.jit
def _row_sum(z):
    """Sum of a [ROWS, VEC] sub-tile per tile row: in-thread adds only."""
    return tl.sum(z, axis=1)


@triton.jit
def _fma2(acc, p, q):
    """acc + p[:, 0] q[:, 0] + p[:, 1] q[:, 1] for [ROWS, 2] p, q: two chained FMAs."""
    p0, p1 = tl.split(p)
    q0, q1 = tl.split(q)
    return acc + p0 * q0 + p1 * q1


@triton.jit
def _fma4(acc, p, q):
    """acc + Σ_j p[:, j] q[:, j] for [ROWS, 4] p, q: four chained FMAs."""
    p0, p1 = tl.split(tl.reshape(p, [p.shape[0], 2, 2]))
    q0, q1 = tl.split(tl.reshape(q, [q.shape[0], 2, 2]))
    return _fma2(_fma2(acc, p0, q0), p1, q1)


@triton.jit
def _fma_row(acc, p, q):
    """acc + Σ_j p[:, j] q[:, j] per tile row of [ROWS, VEC] p, q as one chain of in-thread
    FMAs (one instruction per logit; a tree sum of the products costs 1.5)."""
    if p.shape[1] == 8:
        p0, p1 = tl.split(tl.reshape(p, [p.shape[0], 4, 2]))
        q0, q1 = tl.split(tl.reshape(q, [q.shape[0], 4, 2]))
        return _fma4(_fma4(acc, p0, q0), p1, q1)
    elif p.shape[1] == 4:
        return _fma4(acc, p, q)
    else:
        return acc + _row_sum(p * q)


@triton.jit
def _bit_or(p, q):
    return p | q


@triton.jit
def _row_max(z):
    """Maximum of a [ROWS, VEC] sub-tile per tile row."""
    return tl.max(z, axis=1)


@triton.jit
def _key(v):
    """Order-preserving int32 image of fp32 ``v`` (an involution: it also maps back). Integer
    reductions across a warp are one instruction (redux.sync); float ones are five shuffles.
    −0 maps below +0; NaN never reaches it (it is never above the threshold)."""
    i = v.to(tl.int32, bitcast=True)
    return i ^ ((i >> 31) & 0x7FFFFFFF)


@triton.jit
def _unkey(k):
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _tile_max(xc):
    """Maximum of a [ROWS, VEC] sub-tile over all its lanes: in-thread float max, then integer
    keys across threads."""
    return _unkey(tl.max(_key(_row_max(xc)), axis=0))


@triton.jit
def _topk_insert_tile(top, lanes_t, x, valid, thr, slot, MASKED: tl.constexpr):
    """Insert the values of the [ROWS, VEC] sub-tile ``x`` (where ``valid``) that exceed
    ``thr`` into ``top`` (the keys of the k largest values so far with multiplicity, padded
    with the key of +inf; ``thr`` the k-th largest value, its key at index ``slot``), largest
    first. One count of the candidates, then one trip per distinct value: a cross-thread max,
    a count of its copies only while more than one candidate is left, and per copy (ties)
    one replacement of the minimum of ``top`` (one warp, integer reductions)."""
    cand = x > thr
    if MASKED:
        cand = cand & valid
    xc = tl.where(cand, x, _NEG_INF)
    n_left = tl.sum(_row_sum(cand.to(tl.int32)), axis=0)
    while n_left > 0:
        cv = _tile_max(xc)
        n_eq = 1
        if n_left > 1:
            n_eq = tl.sum(_row_sum((xc == cv).to(tl.int32)), axis=0)
        n_left -= n_eq
        k_cv = _key(cv)
        while (n_eq > 0) & (cv > thr):
            top = tl.where(lanes_t == slot, k_cv, top)
            k_min = tl.min(top, axis=0)
            slot = tl.min(tl.where(top == k_min, lanes_t, top.shape[0]), axis=0)
            thr = _unkey(k_min)
            n_eq -= 1
        n_left = tl.where(cv > thr, n_left, 0)  # the rest is below cv, so at or below thr
        xc = tl.where(xc < cv, xc, _NEG_INF)
    return top, thr, slot


@triton.jit
def _widen(v, PTX: tl.constexpr):
    """``v`` as fp32. bf16 on NVIDIA GPUs: a shift and a mask per pair of values (the default
    lowering spends three instructions per pair: a byte permute, then a shift of each)."""
    if PTX and v.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(
            "{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [v],
            dtype=tl.float32, is_pure=True, pack=2,
        )  # fmt: skip
    else:
        return v.to(tl.float32)


@triton.jit
def _load_sub(ref_row, quant_row, offs, v_lo, v_stop, MASKED: tl.constexpr, PTX: tl.constexpr):
    """One [ROWS, VEC] sub-tile of both rows as fp32 (lanes outside [v_lo, v_stop) read 0)
    and its mask."""
    if MASKED:
        valid = (offs >= v_lo) & (offs < v_stop)
        x = _widen(tl.load(ref_row + offs, mask=valid, other=0.0), PTX)
        y = _widen(tl.load(quant_row + offs, mask=valid, other=0.0), PTX)
    else:
        valid = offs >= 0
        x = _widen(tl.load(ref_row + offs), PTX)
        y = _widen(tl.load(quant_row + offs), PTX)
    return x, y, valid


@triton.jit
def _log2_frame(c_x, c_y, r_x, r_y):
    """The fast kernel's exponents and t in log2 units: z_x = x·log2 e + ncx (one rounding,
    ncx = −c_x·log2 e), likewise z_y, and t·log2 e = z_y − z_x + k2 = (y − x)·log2 e − (r_x − r_y)
    with k2 = (ncx − r_x) − (ncy − r_y): differences of nearby numbers (the anchors and their
    first values r_x, r_y + (r_x − r_y)), so t keeps one shift while the anchors move, and
    carries no rounding of y − x (which loses digits when ref and quant are far apart)."""
    ncx = c_x * _NLOG2E
    ncy = c_y * _NLOG2E
    return ncx, ncy, (ncx - r_x) - (ncy - r_y)


@triton.jit
def _sum_vt(ref_row, quant_row, lane, v_lo, v_stop, ncx, ncy, k2, SUB: tl.constexpr,
            PTX: tl.constexpr):  # fmt: skip
    """B = Σ v t (nats) over [v_lo, v_stop), rereading the row: only rows whose KL is taken
    from the log-sum-exps need it, so the main loop does not carry it."""
    acc = tl.zeros([lane.shape[0]], tl.float32)
    for start in range(v_lo, v_stop, SUB):
        x, y, valid = _load_sub(ref_row, quant_row, start + lane, v_lo, v_stop, True, PTX)
        zx = tl.fma(x, _LOG2E, ncx)
        zy = tl.fma(y, _LOG2E, ncy)
        v = tl.where(valid, _exp2(zy, PTX), 0.0)
        t2 = tl.where(valid, (zy - zx) + k2, 0.0)
        acc = _fma_row(acc, v, t2)
    return tl.sum(acc.to(tl.float64), axis=0) * _LN2


@triton.jit
def _fast_step(
    ref_row, quant_row, start, lane, v_lo, v_stop, lanes_t, top, thr, slot, r_x, r_y, c_x, c_y,
    m_x, m_y, s_x, s_y, h_x, h_y, dw, a, ew, xx, yy, dd, bx, by,
    MASKED: tl.constexpr, PTX: tl.constexpr, G: tl.constexpr, SUB: tl.constexpr,
):  # fmt: skip
    """Fold one tile — G sub-tiles [ROWS, VEC] of SUB = ROWS·VEC logits, a tile row's VEC
    lanes contiguous and held by one thread — into the per-row sums.

    The exponentials use the program-wide anchors (c_x, c_y), moved up (and the sums rescaled)
    only when a tile's maximum exceeds them by more than _REANCHOR, so no sum overflows and
    h = Σ w (x − c) never cancels badly; t = y − x − μ does not depend on them. That check
    and the top-k update share one cross-thread reduction per tile: a bit per sub-tile holding
    a value above the k-th largest so far (only those sub-tiles are reread for the top-k
    buffer), and one bit per anchor to move (only then are the tile maxima reduced across
    threads). z = x·log2 e − c·log2 e, h, a, b and dw = Σ w φ(t) are in log2 units (× log2 e),
    ew = Σ w t expm1(t) in their square. The second pass reloads the sub-tiles: the compiler
    reuses the first loads' registers."""
    tmx = tl.zeros_like(m_x) + _NEG_INF
    tmy = tmx
    hits = tl.zeros_like(bx)
    for g in tl.static_range(G):
        x, y, valid = _load_sub(ref_row, quant_row, start + g * SUB + lane, v_lo, v_stop,
                                MASKED, PTX)  # fmt: skip
        if MASKED:
            x = tl.where(valid, x, _NEG_INF)
            y = tl.where(valid, y, _NEG_INF)
        rmx = _row_max(x)
        hits |= tl.where(rmx > thr, 1 << g, 0)
        tmx = tl.maximum(tmx, rmx)
        tmy = tl.maximum(tmy, _row_max(y))
    bx = tl.where(tmx > m_x, start, bx)  # tile where each row's maximum first appears
    by = tl.where(tmy > m_y, start, by)
    m_x = tl.maximum(m_x, tmx)
    m_y = tl.maximum(m_y, tmy)
    hits |= tl.where(tmx > c_x + _REANCHOR, 1 << G, 0)
    hits |= tl.where(tmy > c_y + _REANCHOR, 2 << G, 0)
    rare = tl.reduce(hits, 0, _bit_or)
    if rare != 0:
        if (rare >> G) != 0:  # an anchor moves (a few times per row at most)
            big_x = tl.max(tmx, axis=0)
            big_y = tl.max(tmy, axis=0)
            if big_x > c_x + _REANCHOR:
                shift2 = big_x * _NLOG2E - c_x * _NLOG2E  # the log2 anchors' difference
                f = _exp2(shift2, PTX)
                h_x = f * (h_x + s_x * shift2)
                s_x *= f
                dw *= f
                a *= f
                ew *= f
                c_x = big_x
            if big_y > c_y + _REANCHOR:
                shift2 = big_y * _NLOG2E - c_y * _NLOG2E
                f = _exp2(shift2, PTX)
                h_y = f * (h_y + s_y * shift2)
                s_y *= f
                c_y = big_y
        for g in tl.static_range(G):
            if (rare >> g) & 1:  # a sub-tile whose maximum is at or below thr is skipped
                offs = start + g * SUB + lane
                x, _, valid = _load_sub(ref_row, quant_row, offs, v_lo, v_stop, MASKED, PTX)
                top, thr, slot = _topk_insert_tile(top, lanes_t, x, valid, thr, slot, MASKED)
    ncx, ncy, k2 = _log2_frame(c_x, c_y, r_x, r_y)
    for g in tl.static_range(G):
        x, y, valid = _load_sub(ref_row, quant_row, start + g * SUB + lane, v_lo, v_stop,
                                MASKED, PTX)  # fmt: skip
        d = y - x  # masked lanes: 0 − 0
        xx = _fma_row(xx, x, x)
        yy = _fma_row(yy, y, y)
        dd = _fma_row(dd, d, d)
        zx = tl.fma(x, _LOG2E, ncx)
        zy = tl.fma(y, _LOG2E, ncy)
        w = _exp2(zx, PTX)
        v = _exp2(zy, PTX)
        t2 = (zy - zx) + k2
        if MASKED:  # masked lanes: t2 = k2 + (ncy − ncx), which may overflow
            w = tl.where(valid, w, 0.0)
            v = tl.where(valid, v, 0.0)
            t2 = tl.where(valid, t2, 0.0)
        h_x = _fma_row(h_x, w, zx)
        h_y = _fma_row(h_y, v, zy)
        s_x += _row_sum(w)
        s_y += _row_sum(v)
        a = _fma_row(a, w, t2)
        phi, te = _phi2(t2, PTX)
        dw = _fma_row(dw, w, phi)
        ew = _fma_row(ew, w, te)
    return top, thr, slot, c_x, c_y, m_x, m_y, s_x, s_y, h_x, h_y, dw, a, ew, xx, yy, dd, bx, by


@triton.jit
def _first_index_of_max(row_ptr, tile_of_max, m, big, lane, v_lo, v_stop, G: tl.constexpr,
                        SUB: tl.constexpr):  # fmt: skip
    """First position holding ``big`` (the maximum), given for each tile row the tile where its
    own maximum ``m`` first appeared: reread only the tile rows that hold ``big``."""
    hit = (m == big) & (tile_of_max > _NO_TILE)
    first = tl.zeros_like(tile_of_max) + 2147483647
    for g in tl.static_range(G):
        offs = tile_of_max[:, None] + g * SUB + lane
        mask = hit[:, None] & (offs >= v_lo) & (offs < v_stop)
        vals = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        first = tl.minimum(first, tl.min(tl.where(mask & (vals == big), offs, 2147483647), 1))
    return tl.min(first, axis=0)


@triton.jit
def _row_pointer(ptr, row64, T, stride_b, stride_t):
    """Start of row ``row64`` of a [B, T, V] tensor: ptr + b·stride_b + t·stride_t (int64)."""
    b = row64 // T
    return ptr + b * stride_b + (row64 - b * T) * stride_t


@triton.jit
def _fast_kernel(
    ref_ptr,  # [B, T, V] reference logits (fp32/fp16/bf16), unit stride along V
    ref_sb,  # elements between consecutive batch entries of ref
    ref_st,  # elements between consecutive positions (rows) of ref
    quant_ptr,  # [B, T, V] quantized-model logits, same dtype rules
    quant_sb,
    quant_st,
    label_ptr,  # [N = B·T] int64 labels, contiguous (unused unless HAS_LABELS)
    out_ptr,  # [NUM_OUTPUTS, N] fp32 per-row outputs (written when SPLITS == 1)
    state_ptr,  # [N, SPLITS, NUM_STATE] fp32 partial states (written when SPLITS > 1)
    index_ptr,  # [N, SPLITS, 2] int32 partial argmax indices (ref, quant)
    top_ptr,  # [N, SPLITS, KP] fp32 partial top-k buffers
    flag_ptr,  # [N] int32, set for rows left to _general_kernel (non-finite entries)
    N, T, V, v_per_split, ignore_index, top_k,
    SPLITS,  # programs per row along V
    base_mis,  # element offset of ref_ptr (and quant_ptr) modulo VEC (ALIGN > 0 only)
    HAS_LABELS: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,  # SPLITS > 1: store the partial state for the merge kernel
    NUM_STATE_: tl.constexpr,
    KP: tl.constexpr,  # power of two ≥ top_k
    G: tl.constexpr,  # sub-tiles per tile; a sub-tile is [ROWS, VEC]
    ROWS: tl.constexpr,  # tile rows (one per thread)
    VEC: tl.constexpr,  # contiguous elements per vector (16 bytes: one load)
    PTX: tl.constexpr,  # compiled for an NVIDIA GPU: exp2 through inline PTX
    ALIGN_X: tl.constexpr,  # > 0: peel a head so ref's body starts at this many bytes' boundary
    ALIGN_Y: tl.constexpr,  # the same for quant (ref and quant rows share their misalignment)
):  # fmt: skip
    """Rows whose entries are all finite, in one read: each tile row keeps its own online
    softmax state, so a tile costs in-thread work plus one cross-thread reduction.

    With ALIGN_X > 0 a row [0, V) is a head [0, h) of h < VEC elements up to the first
    VEC-element boundary (masked, split 0 only), then the aligned body [h, V) in full tiles
    of 16-byte loads and a masked tail; positions below are body offsets (absolute − h)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    row64 = row.to(tl.int64)
    ref_row = _row_pointer(ref_ptr, row64, T, ref_sb, ref_st)
    quant_row = _row_pointer(quant_ptr, row64, T, quant_sb, quant_st)
    if ALIGN_X > 0:
        b_ = row64 // T
        mis = (base_mis + b_ * ref_sb + (row64 - b_ * T) * ref_st) % VEC
        head = ((VEC - mis) % VEC).to(tl.int32)
        head = tl.minimum(head, V)
        ref_body = tl.multiple_of(ref_row + head, ALIGN_X)
        quant_body = tl.multiple_of(quant_row + head, ALIGN_Y)
    else:
        head = 0
        ref_body = ref_row
        quant_body = quant_row
    v_body = V - head
    v_start = split * v_per_split
    v_stop = tl.minimum(v_start + v_per_split, v_body)
    v_lo = v_start  # lowest body offset this program reads (−head with a head)
    if ALIGN_X > 0:
        v_lo = tl.where(split == 0, -head, v_start)
    SUB: tl.constexpr = ROWS * VEC
    BLOCK: tl.constexpr = G * SUB
    lane = tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    TK: tl.constexpr = KP if KP > 32 else 32
    lanes_t = tl.arange(0, TK)
    f32 = tl.float32

    # The exp anchors (c_x, c_y): the maxima of the first sub-tile. The shift μ of
    # t = y − x − μ: μ0 = Σ w (y − x) / Σ w over that sub-tile (w = exp(x − c_x)), so that t is
    # small where the probability mass is (φ(t) and t expm1(t) stay on their polynomial).
    first = v_lo + lane
    first_ok = first < v_stop
    x0 = tl.load(ref_body + first, mask=first_ok, other=_NEG_INF).to(f32)
    y0 = tl.load(quant_body + first, mask=first_ok, other=_NEG_INF).to(f32)
    c_x = tl.max(_row_max(x0), axis=0)
    c_y = tl.max(_row_max(y0), axis=0)
    c_x = tl.where(tl.abs(c_x) < _POS_INF, c_x, 0.0)
    c_y = tl.where(tl.abs(c_y) < _POS_INF, c_y, 0.0)
    both0 = first_ok & (tl.abs(x0) < _POS_INF) & (tl.abs(y0) < _POS_INF)
    x0 = tl.where(both0, x0, c_x)
    w0 = tl.where(both0, tl.exp(x0 - c_x), 0.0)
    sw0 = tl.sum(_row_sum(w0), axis=0)
    mu0 = tl.sum(_row_sum(w0 * (tl.where(both0, y0, c_x) - x0)), axis=0) / sw0
    # within 1e-4 of the maxima's difference (a shifted copy, V = 1), that difference is kept
    near = tl.abs(mu0 - (c_y - c_x)) < 1e-4
    use_mu = (sw0 > 0) & (tl.abs(mu0) < _POS_INF) & ~near
    # t·log2 e = (y − x)·log2 e − (r_x − r_y): r_x = −c_x·log2 e, r_y = r_x − μ·log2 e
    r_x = c_x * _NLOG2E
    r_y = r_x - tl.where(use_mu, mu0, c_y - c_x) * _LOG2E

    r0 = tl.zeros([ROWS], f32)
    m_x = r0 + _NEG_INF
    m_y = r0 + _NEG_INF
    s_x = r0
    s_y = r0
    h_x = r0
    h_y = r0
    dw = r0
    a = r0
    ew = r0
    xx = r0
    yy = r0
    dd = r0
    bx = tl.zeros([ROWS], tl.int32) + _NO_TILE
    by = tl.zeros([ROWS], tl.int32) + _NO_TILE
    # The top-k buffer holds order-preserving integer keys (_key) of the k largest values so
    # far, one per lane of a warp (≥ 32 slots, padded with the key of +inf): its minimum and
    # that minimum's slot are then one warp-wide integer reduction each (redux.sync).
    top = _key(tl.where(lanes_t < top_k, _NEG_INF, _POS_INF).to(f32))
    thr = _NEG_INF + tl.zeros([], f32)
    slot = tl.zeros([], tl.int32)

    if ALIGN_X > 0:  # noqa: SIM102 (a compile-time gate around a runtime branch)
        if v_lo < 0:  # the head: one masked sub-tile ending at the body's start
            (top, thr, slot, c_x, c_y, m_x, m_y, s_x, s_y, h_x, h_y, dw, a, ew, xx, yy, dd, bx,
             by) = _fast_step(
                ref_body, quant_body, -VEC, lane, v_lo, 0, lanes_t, top, thr, slot, r_x, r_y,
                c_x, c_y, m_x, m_y, s_x, s_y, h_x, h_y, dw, a, ew, xx, yy, dd, bx, by,
                True, PTX, 1, SUB,
            )  # fmt: skip
    n_full = tl.maximum(v_stop - v_start, 0) // BLOCK
    full_stop = v_start + n_full * BLOCK
    for start in range(v_start, full_stop, BLOCK):
        top, thr, slot, c_x, c_y, m_x, m_y, s_x, s_y, h_x, h_y, dw, a, ew, xx, yy, dd, bx, by = (
            _fast_step(
                ref_body, quant_body, start, lane, start, v_stop, lanes_t, top, thr, slot, r_x,
                r_y, c_x, c_y, m_x, m_y, s_x, s_y, h_x, h_y, dw, a, ew, xx, yy, dd, bx, by,
                False, PTX, G, SUB,
            )
        )  # fmt: skip
    if full_stop < v_stop:
        top, thr, slot, c_x, c_y, m_x, m_y, s_x, s_y, h_x, h_y, dw, a, ew, xx, yy, dd, bx, by = (
            _fast_step(
                ref_body, quant_body, full_stop, lane, full_stop, v_stop, lanes_t, top, thr, slot,
                r_x, r_y, c_x, c_y, m_x, m_y, s_x, s_y, h_x, h_y, dw, a, ew, xx, yy, dd, bx, by,
                True, PTX, G, SUB,
            )
        )  # fmt: skip

    # Sums anchored at c: S = Σ w, H = Σ w (x − c), D = Σ w φ(t), A = Σ w t,
    # E = Σ w t expm1(t) (nats); the per-thread partial sums are added in float64.
    f64 = tl.float64
    mx_all = tl.max(m_x, axis=0)
    my_all = tl.max(m_y, axis=0)
    sx_all = tl.sum(s_x.to(f64), axis=0)
    sy_all = tl.sum(s_y.to(f64), axis=0)
    hx_all = tl.sum(h_x.to(f64), axis=0) * _LN2
    hy_all = tl.sum(h_y.to(f64), axis=0) * _LN2
    d_all = tl.sum(dw.to(f64), axis=0) * _LN2
    a_all = tl.sum(a.to(f64), axis=0) * _LN2
    e_all = tl.sum(ew.to(f64), axis=0) * (_LN2 * _LN2)
    xx_all = tl.sum(xx.to(f64), axis=0)
    yy_all = tl.sum(yy.to(f64), axis=0)
    dd_all = tl.sum(dd.to(f64), axis=0)
    xy_all = 0.5 * (xx_all + yy_all - dd_all)
    # NaN or ±inf anywhere makes Σx² or Σy² non-finite: such rows go to the general kernel.
    ok = (tl.abs(xx_all + yy_all) < _POS_INF) & (mx_all > _NEG_INF) & (my_all > _NEG_INF)
    n_here = (tl.maximum(v_stop, v_lo) - v_lo).to(f32)
    # the anchors (nats) and the shift of t = y − x − μ, exactly as the exponents used them
    ncx, ncy, k2 = _log2_frame(c_x, c_y, r_x, r_y)
    anc_x = ncx.to(f64) * -_LN2
    anc_y = ncy.to(f64) * -_LN2
    mu = (r_x.to(f64) - r_y.to(f64)) * _LN2
    kappa = (anc_x - anc_y) + mu
    # B = Σ v t, for the log-sum-exp form only: from the w-sums (Σ v t = e^κ (A + E)) where
    # they hold Q, else from a second read of the row (rare: logits far apart)
    if ok & ~_small_regime(sx_all, sy_all, d_all, a_all, e_all, kappa):
        b_all = _sum_vt(ref_body, quant_body, lane, v_lo, v_stop, ncx, ncy, k2, SUB, PTX)
    else:
        b_all = tl.exp(kappa) * (a_all + e_all)
    ax_idx = _first_index_of_max(ref_body, bx, m_x, mx_all, lane, v_lo, v_stop, G, SUB)
    ay_idx = _first_index_of_max(quant_body, by, m_y, my_all, lane, v_lo, v_stop, G, SUB)
    x_at_ay = tl.load(ref_body + ay_idx, mask=ay_idx < v_stop, other=_NEG_INF).to(f32)
    ax_idx += head  # absolute positions
    ay_idx += head
    zero = tl.zeros([], f32)
    if not WRITE_PARTIAL:
        if ok:
            _finalize(
                out_ptr, N, V, row, ref_row, quant_row, label_ptr, ignore_index,
                anc_x, sx_all, zero, hx_all, anc_y, sy_all, zero, hy_all, mu,
                d_all, a_all, b_all, e_all, xy_all, xx_all, yy_all, dd_all, n_here,
                zero, zero, zero, ax_idx, ay_idx, x_at_ay, thr, HAS_LABELS, _XSCALE,
            )  # fmt: skip
        else:
            tl.store(flag_ptr + row, 1)
    else:
        sp = state_ptr + (row64 * SPLITS + split) * NUM_STATE_
        # (order: STATE)
        tl.store(sp + 0, -ncx)  # the anchor of the sums (× log2 e)
        tl.store(sp + 1, sx_all.to(f32))
        tl.store(sp + 2, zero)
        tl.store(sp + 3, hx_all.to(f32))
        tl.store(sp + 4, -ncy)
        tl.store(sp + 5, sy_all.to(f32))
        tl.store(sp + 6, zero)
        tl.store(sp + 7, hy_all.to(f32))
        tl.store(sp + 8, r_x)  # the shift of t: (r_x − r_y)/log2 e
        tl.store(sp + 9, r_y)
        tl.store(sp + 10, zero + 1.0)
        tl.store(sp + 11, d_all.to(f32))
        tl.store(sp + 12, a_all.to(f32))
        tl.store(sp + 13, b_all.to(f32))
        tl.store(sp + 14, xy_all.to(f32))
        tl.store(sp + 15, xx_all.to(f32))
        tl.store(sp + 16, yy_all.to(f32))
        tl.store(sp + 17, dd_all.to(f32))
        tl.store(sp + 18, n_here)
        tl.store(sp + 19, tl.where(ok, 0.0, 1.0))
        tl.store(sp + 20, zero)
        tl.store(sp + 21, zero)
        tl.store(sp + 22, mx_all)
        tl.store(sp + 23, my_all)
        tl.store(sp + 24, x_at_ay)
        tl.store(sp + 25, e_all.to(f32))
        ip = index_ptr + (row64 * SPLITS + split) * 2
        tl.store(ip, ax_idx)
        tl.store(ip + 1, ay_idx)
        tl.store(top_ptr + (row64 * SPLITS + split) * KP + lanes_t, _unkey(top), mask=lanes_t < KP)


@triton.jit
def _general_kernel(
    ref_ptr, ref_sb, ref_st, quant_ptr, quant_sb, quant_st,  # [B, T, V] as in _fast_kernel
    label_ptr,  # [N] int64 labels (unused unless HAS_LABELS)
    out_ptr,  # [NUM_OUTPUTS, N] fp32 per-row outputs
    flag_ptr,  # [N] int32: rows the fast kernel could not finish (non-finite entries)
    N, T, V, ignore_index, top_k,
    HAS_LABELS: tl.constexpr,
    KP: tl.constexpr,  # power of two ≥ top_k
    BLOCK_V: tl.constexpr,  # tile width along V
):  # fmt: skip
    """The masked path for rows holding −inf, +inf or NaN: every sum split by which side is
    finite. Only rows flagged by the fast kernel do any work."""
    row = tl.program_id(0)
    if tl.load(flag_ptr + row) != 0:
        row64 = row.to(tl.int64)
        ref_row = _row_pointer(ref_ptr, row64, T, ref_sb, ref_st)
        quant_row = _row_pointer(quant_ptr, row64, T, quant_sb, quant_st)
        _general_row(
            ref_row, quant_row, label_ptr, out_ptr, N, V, row, ignore_index, top_k,
            HAS_LABELS, KP, BLOCK_V,
        )  # fmt: skip


@triton.jit
def _general_row(
    ref_row, quant_row, label_ptr, out_ptr, N, V, row, ignore_index, top_k,
    HAS_LABELS: tl.constexpr, KP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    lanes = tl.arange(0, BLOCK_V)
    lanes_k = tl.arange(0, KP)
    f32 = tl.float32
    zero = tl.zeros([], f32)
    m_x = zero + _NEG_INF
    m_y = zero + _NEG_INF
    c_x = zero
    c_y = zero
    c_set = zero
    # Sums are kept per lane and reduced once after the loop: each tile then needs only the
    # max/argmax reductions. Lane vectors of the rescaled sums are rescaled like scalars.
    lane0 = tl.zeros([BLOCK_V], f32)
    s_xb = lane0  # Σ w over positions where both logits are finite
    s_xo = lane0  # Σ w where only x is finite
    s_yb = lane0
    s_yo = lane0
    h_x = lane0
    h_y = lane0
    dw = lane0  # Σ w φ(t)
    a = lane0
    ew = lane0  # Σ w t expm1(t)
    b = lane0
    xy = lane0
    xx = lane0
    yy = lane0
    dd = lane0
    n_both = lane0
    n_bad = lane0
    n_fwd_inf = lane0
    n_rev_inf = lane0
    ax_val = zero + _NEG_INF
    ay_val = zero + _NEG_INF
    x_at_ay = zero + _NEG_INF
    ax_idx = tl.zeros([], tl.int32)
    ay_idx = tl.zeros([], tl.int32)
    top = tl.where(lanes_k < top_k, _NEG_INF, _POS_INF).to(f32)

    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        mask = offs < V
        x = tl.load(ref_row + offs, mask=mask, other=_NEG_INF).to(f32)
        y = tl.load(quant_row + offs, mask=mask, other=_NEG_INF).to(f32)
        # NaN and +inf are counted and then treated as masked (-inf) so the sums stay finite.
        bad_x = (x != x) | (x == _POS_INF)
        bad_y = (y != y) | (y == _POS_INF)
        n_bad += (bad_x | bad_y).to(f32)
        x = tl.where(bad_x, _NEG_INF, x)
        y = tl.where(bad_y, _NEG_INF, y)
        fx = x > _NEG_INF
        fy = y > _NEG_INF
        both = fx & fy
        only_x = fx & ~fy
        only_y = fy & ~fx
        n_fwd_inf += only_x.to(f32)
        n_rev_inf += only_y.to(f32)

        tmx, tax = tl.max(x, axis=0, return_indices=True)
        tmy, tay = tl.max(y, axis=0, return_indices=True)
        # First-index argmax across tiles: a later tile wins only when strictly larger.
        x_here = tl.max(tl.where(lanes == tay, x, _NEG_INF), axis=0)
        take_x = tmx > ax_val
        take_y = tmy > ay_val
        ax_idx = tl.where(take_x, start + tax, ax_idx)
        ax_val = tl.where(take_x, tmx, ax_val)
        ay_idx = tl.where(take_y, start + tay, ay_idx)
        x_at_ay = tl.where(take_y, x_here, x_at_ay)
        ay_val = tl.where(take_y, tmy, ay_val)

        # The shift c = c_y − c_x is fixed once, by the first tile where both maxima are finite.
        set_now = (c_set == 0) & (tmx > _NEG_INF) & (tmy > _NEG_INF)
        c_x = tl.where(set_now, tmx, c_x)
        c_y = tl.where(set_now, tmy, c_y)
        c_set = tl.where(set_now, 1.0, c_set)

        # Online softmax: rescale the old sums to the new anchors.
        new_mx = tl.maximum(m_x, tmx)
        new_my = tl.maximum(m_y, tmy)
        anc_x, alpha_x = _anchor(m_x, new_mx)
        anc_y, alpha_y = _anchor(m_y, new_my)
        h_x = _shifted_entropy_sum(h_x, s_xb + s_xo, m_x, anc_x, alpha_x)
        h_y = _shifted_entropy_sum(h_y, s_yb + s_yo, m_y, anc_y, alpha_y)
        m_x = new_mx
        m_y = new_my

        zx = tl.where(fx, x - anc_x, 0.0)
        zy = tl.where(fy, y - anc_y, 0.0)
        w = tl.where(fx, tl.exp(zx), 0.0)
        v = tl.where(fy, tl.exp(zy), 0.0)
        xf = tl.where(both, x, 0.0)
        yf = tl.where(both, y, 0.0)
        t = tl.where(both, (yf - c_y) - (xf - c_x), 0.0)
        phi = _phi(t)
        s_xb = alpha_x * s_xb + tl.where(both, w, 0.0)
        s_xo = alpha_x * s_xo + tl.where(only_x, w, 0.0)
        s_yb = alpha_y * s_yb + tl.where(both, v, 0.0)
        s_yo = alpha_y * s_yo + tl.where(only_y, v, 0.0)
        h_x += w * zx
        h_y += v * zy
        # w·φ(t) may overflow (inf) for logits ~90 apart; finalize then uses the lse form.
        dw = alpha_x * dw + tl.where(w > 0, w * phi, 0.0)
        a = alpha_x * a + w * t
        ew = alpha_x * ew + tl.where(w > 0, w * (t * (t + phi)), 0.0)
        b = alpha_y * b + v * t

        df = yf - xf
        xy += xf * yf
        xx += xf * xf
        yy += yf * yf
        dd += df * df
        n_both += both.to(f32)

        top, _ = _kth_largest_insert(top, lanes_k, x, fx, lanes)

    kth = tl.min(top, axis=0)
    s_xb = tl.sum(s_xb, axis=0)
    s_xo = tl.sum(s_xo, axis=0)
    s_yb = tl.sum(s_yb, axis=0)
    s_yo = tl.sum(s_yo, axis=0)
    h_x = tl.sum(h_x, axis=0)
    h_y = tl.sum(h_y, axis=0)
    dw = tl.sum(dw, axis=0)
    a = tl.sum(a, axis=0)
    ew = tl.sum(ew, axis=0)
    b = tl.sum(b, axis=0)
    xy = tl.sum(xy, axis=0)
    xx = tl.sum(xx, axis=0)
    yy = tl.sum(yy, axis=0)
    dd = tl.sum(dd, axis=0)
    n_both = tl.sum(n_both, axis=0)
    n_bad = tl.sum(n_bad, axis=0)
    n_fwd_inf = tl.sum(n_fwd_inf, axis=0)
    n_rev_inf = tl.sum(n_rev_inf, axis=0)
    _finalize(
        out_ptr, N, V, row, ref_row, quant_row, label_ptr, ignore_index,
        m_x, s_xb, s_xo, h_x, m_y, s_yb, s_yo, h_y, c_y.to(tl.float64) - c_x.to(tl.float64),
        dw, a, b, ew, xy, xx, yy, dd, n_both, n_bad, n_fwd_inf, n_rev_inf, ax_idx, ay_idx,
        x_at_ay, kth, HAS_LABELS, 1.0,
    )  # fmt: skip


@triton.jit
def _merge_splits_kernel(
    ref_ptr, ref_sb, ref_st, quant_ptr, quant_sb, quant_st,  # as in _fast_kernel (labels)
    label_ptr,  # [N] int64 labels (unused unless HAS_LABELS)
    out_ptr,  # [NUM_OUTPUTS, N] fp32 per-row outputs
    state_ptr,  # [N, SPLITS, NUM_STATE] fp32 partial states
    index_ptr,  # [N, SPLITS, 2] int32 partial argmax indices
    top_ptr,  # [N, SPLITS, KP] fp32 partial top-k buffers
    flag_ptr,  # [N] int32, set for rows left to _general_kernel (non-finite entries)
    N, T, V, ignore_index, top_k,
    SPLITS,  # partial states per row
    HAS_LABELS: tl.constexpr,
    NUM_STATE_: tl.constexpr,
    KP: tl.constexpr,
    SPLITS_P2: tl.constexpr,  # power of two ≥ SPLITS
):  # fmt: skip
    """Merge the partial states of a row's splits, in float64 (re-expressing D, A, E and B
    under a common shift), and finalize the row."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    f64 = tl.float64
    zero = tl.zeros([], f64)
    m_x = zero + _NEG_INF
    m_y = zero + _NEG_INF
    s_xb = zero
    s_xo = zero
    s_yb = zero
    s_yo = zero
    h_x = zero
    h_y = zero
    mu = zero
    c_set = zero
    dw = zero
    a = zero
    ew = zero
    b = zero
    xy = zero
    xx = zero
    yy = zero
    dd = zero
    n_both = zero
    n_bad = zero
    n_fwd_inf = zero
    n_rev_inf = zero
    ax_val = zero + _NEG_INF
    ay_val = zero + _NEG_INF
    x_at_ay = zero + _NEG_INF
    ax_idx = tl.zeros([], tl.int32)
    ay_idx = tl.zeros([], tl.int32)
    for split in range(SPLITS):
        sp = state_ptr + (row64 * SPLITS + split) * NUM_STATE_
        # (order: STATE)
        b_m_x = tl.load(sp + 0).to(f64) * _LN2  # the split's anchors (nats)
        b_s_xb = tl.load(sp + 1).to(f64)
        b_s_xo = tl.load(sp + 2).to(f64)
        b_h_x = tl.load(sp + 3).to(f64)
        b_m_y = tl.load(sp + 4).to(f64) * _LN2
        b_s_yb = tl.load(sp + 5).to(f64)
        b_s_yo = tl.load(sp + 6).to(f64)
        b_h_y = tl.load(sp + 7).to(f64)
        b_mu = (tl.load(sp + 8).to(f64) - tl.load(sp + 9).to(f64)) * _LN2  # t = y − x − μ
        b_e = tl.load(sp + 25).to(f64)
        b_c_set = tl.load(sp + 10).to(f64)
        b_d = tl.load(sp + 11).to(f64)
        b_a = tl.load(sp + 12).to(f64)
        b_b = tl.load(sp + 13).to(f64)
        b_xy = tl.load(sp + 14).to(f64)
        b_xx = tl.load(sp + 15).to(f64)
        b_yy = tl.load(sp + 16).to(f64)
        b_dd = tl.load(sp + 17).to(f64)
        b_n_both = tl.load(sp + 18).to(f64)
        b_n_bad = tl.load(sp + 19).to(f64)
        b_n_fwd_inf = tl.load(sp + 20).to(f64)
        b_n_rev_inf = tl.load(sp + 21).to(f64)
        b_ax_val = tl.load(sp + 22).to(f64)
        b_ay_val = tl.load(sp + 23).to(f64)
        b_x_at_ay = tl.load(sp + 24).to(f64)
        ip = index_ptr + (row64 * SPLITS + split) * 2
        take_x = b_ax_val > ax_val
        take_y = b_ay_val > ay_val
        ax_idx = tl.where(take_x, tl.load(ip), ax_idx)
        ax_val = tl.where(take_x, b_ax_val, ax_val)
        ay_idx = tl.where(take_y, tl.load(ip + 1), ay_idx)
        x_at_ay = tl.where(take_y, b_x_at_ay, x_at_ay)
        ay_val = tl.where(take_y, b_ay_val, ay_val)

        # Re-express this split's sums with the common shift (the first one set): with
        # δ = μ_split − μ its t' gives t = t' + δ, so (U' = A' + D')
        #   D = e^δ D' + expm1(δ) A' + s φ(δ),   A = A' + s δ,   B = B' + s_y δ,
        #   E = e^δ (E' + δ U') + expm1(δ) (A' + δ s):
        # the rounding of A' and U' enters D and E only multiplied by δ.
        set_now = (c_set == 0) & (b_c_set != 0)
        mu = tl.where(set_now, b_mu, mu)
        c_set = tl.where(set_now, 1.0, c_set)
        delta = tl.where(b_c_set != 0, b_mu - mu, 0.0)
        exp_d = tl.exp(delta)
        em1_d = _expm1(delta)
        b_e = exp_d * (b_e + delta * (b_a + b_d)) + em1_d * (b_a + delta * b_s_xb)
        b_d = exp_d * b_d + em1_d * b_a + b_s_xb * _phi(delta)
        b_a = b_a + b_s_xb * delta
        b_b = b_b + b_s_yb * delta

        # Merge the online-softmax states (both rescaled to the larger anchor).
        new_mx = tl.maximum(m_x, b_m_x)
        new_my = tl.maximum(m_y, b_m_y)
        anc_x, alpha_x = _anchor(m_x, new_mx)
        anc_y, alpha_y = _anchor(m_y, new_my)
        _, beta_x = _anchor(b_m_x, new_mx)
        _, beta_y = _anchor(b_m_y, new_my)
        h_x = _shifted_entropy_sum(h_x, s_xb + s_xo, m_x, anc_x, alpha_x) + _shifted_entropy_sum(
            b_h_x, b_s_xb + b_s_xo, b_m_x, anc_x, beta_x
        )
        h_y = _shifted_entropy_sum(h_y, s_yb + s_yo, m_y, anc_y, alpha_y) + _shifted_entropy_sum(
            b_h_y, b_s_yb + b_s_yo, b_m_y, anc_y, beta_y
        )
        s_xb = alpha_x * s_xb + beta_x * b_s_xb
        s_xo = alpha_x * s_xo + beta_x * b_s_xo
        s_yb = alpha_y * s_yb + beta_y * b_s_yb
        s_yo = alpha_y * s_yo + beta_y * b_s_yo
        dw = alpha_x * dw + beta_x * b_d
        a = alpha_x * a + beta_x * b_a
        ew = alpha_x * ew + beta_x * b_e
        b = alpha_y * b + beta_y * b_b
        m_x = new_mx
        m_y = new_my

        xy += b_xy
        xx += b_xx
        yy += b_yy
        dd += b_dd
        n_both += b_n_both
        n_bad += b_n_bad
        n_fwd_inf += b_n_fwd_inf
        n_rev_inf += b_n_rev_inf

    # k-th largest reference logit over all splits' buffers (padding slots read as -inf).
    sl = tl.arange(0, SPLITS_P2)[:, None]
    kl_ = tl.arange(0, KP)[None, :]
    tops = tl.load(
        top_ptr + (row64 * SPLITS + sl) * KP + kl_,
        mask=(sl < SPLITS) & (kl_ < top_k),
        other=_NEG_INF,
    )
    tops = tl.reshape(tops, [SPLITS_P2 * KP])
    flat = tl.arange(0, SPLITS_P2 * KP)
    for _ in range(top_k - 1):
        _, mi = tl.max(tops, axis=0, return_indices=True)
        tops = tl.where(flat == mi, _NEG_INF, tops)
    kth = tl.max(tops, axis=0)

    if n_bad == 0:
        _finalize(
            out_ptr, N, V, row, _row_pointer(ref_ptr, row64, T, ref_sb, ref_st),
            _row_pointer(quant_ptr, row64, T, quant_sb, quant_st), label_ptr, ignore_index,
            m_x, s_xb, s_xo, h_x, m_y, s_yb, s_yo, h_y, mu, dw, a, b, ew, xy, xx, yy, dd,
            n_both, n_bad, n_fwd_inf, n_rev_inf, ax_idx, ay_idx, x_at_ay, kth, HAS_LABELS,
            _XSCALE,
        )  # fmt: skip
    else:
        tl.store(flag_ptr + row, 1)


# Register cap (ptxas .maxnreg) of the fast kernel on CUDA. Uncapped, Triton 3.6 gives it 255
# registers (2 blocks of 4 warps per SM); 168 keeps 3 blocks/SM with no spill in the hot loop
# on Triton 3.6 and 3.9 (benchmarks/sass_report.py; benchmarks/results/2026-12-03-sass/).
DEFAULT_MAXNREG = 168
# Register file and limits per SM of sm_80/sm_90 (the occupancy estimate of the split heuristic).
_SM_REGISTERS = 65536
_SM_MAX_WARPS = 64
_SM_MAX_BLOCKS = 32
# (device index, launch shape) -> registers per thread of the compiled fast kernel
_COMPILED_REGS: dict[tuple, int] = {}


def blocks_per_sm(regs: int, num_warps: int, shared_bytes: int = 0,
                  smem_per_sm: int = 228 * 1024) -> int:  # fmt: skip
    """Resident blocks of ``num_warps`` warps per SM: registers are allocated per warp in units
    of 256 (``regs`` rounded up to a multiple of 8 per thread) from 64K per SM, with at most
    64 warps and 32 blocks per SM and ``smem_per_sm`` bytes of shared memory."""
    per_warp = -(-regs * 32 // 256) * 256
    fit = min(_SM_REGISTERS // (per_warp * num_warps), _SM_MAX_WARPS // num_warps, _SM_MAX_BLOCKS)
    if shared_bytes:
        fit = min(fit, smem_per_sm // shared_bytes)
    return max(1, fit)


def _num_programs_wanted(device: torch.device, regs: int, num_warps: int) -> int:
    """Programs that fill the device once: resident blocks per SM (from the fast kernel's
    registers per thread) × SMs on CUDA, one per row elsewhere."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return blocks_per_sm(regs, num_warps) * sms
    return 1


def _as_rows3(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` as a [B, T, V] view (a 2-D [N, V] input becomes [1, N, V]); never a copy."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"{name} must be [N, V] or [B, T, V], got shape {tuple(t.shape)}")
    if t.stride(2) != 1:
        raise ValueError(f"{name}: logit rows must be contiguous along the vocabulary "
                         f"dimension (stride {t.stride(2)})")  # fmt: skip
    return t


def logit_compare_triton(
    ref: torch.Tensor,
    quant: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    top_k: int,
    ignore_index: int,
    block_v: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
    maxnreg: int | None = DEFAULT_MAXNREG,
    align: bool = True,
) -> dict[str, torch.Tensor]:
    """Launch the fused kernels on ``ref``/``quant`` [N, V] or [B, T, V] with unit stride along
    V; the leading strides are arbitrary (sliced, transposed, misaligned views are read in
    place, never copied) and may differ between the two.

    Returns 1-D tensors of length N = B·T: fp32 metrics and bool flags, keyed like
    :class:`qmetrics.TokenMetrics`. ``labels``: None or N int64 class indices; one that is
    neither ``ignore_index`` nor in [0, V) gets NaN ``nll_*``/``prob_*`` and is never read.
    ``block_v`` (tile width), ``splits`` (programs per row), ``num_warps`` and ``maxnreg``
    (register cap on CUDA; None: uncapped) override the defaults; tests use the first two to
    exercise the multi-tile and split-merge paths on small inputs, benchmarks all four to
    tune. ``align=False`` turns off the peeled head that aligns misaligned rows (A/B tests).
    """
    ref = _as_rows3(ref, "ref")
    quant = _as_rows3(quant, "quant")
    if quant.shape != ref.shape:
        raise ValueError(f"ref and quant shapes differ: {tuple(ref.shape)} vs "
                         f"{tuple(quant.shape)}")  # fmt: skip
    if top_k > MAX_TOP_K:
        raise ValueError(f"top_k must be at most {MAX_TOP_K}, got {top_k}")
    batch, seq, vocab = ref.shape
    n = batch * seq
    dev = ref.device
    on_gpu = dev.type == "cuda"
    if labels is not None:
        if labels.numel() != n:
            raise ValueError(f"labels must have {n} entries (one per row), got {labels.numel()}")
        if labels.device != dev:
            raise ValueError(f"labels are on {labels.device}, logits on {dev}")
        labels = labels.reshape(-1).to(torch.int64).contiguous()  # small: a copy is cheap
    if num_warps is None:
        num_warps = 4
    # The fast kernel's tile is G sub-tiles [ROWS, VEC]: VEC elements make one 16-byte load of
    # the wider input dtype; on a GPU each of the 32·num_warps threads holds one row of each
    # sub-tile (G = 4 by default; benchmarks/sass_report.py has its registers and SASS).
    vec = 16 // max(ref.element_size(), quant.element_size())
    if block_v is None:
        block_v = 4 * 32 * num_warps * vec if on_gpu else 8192
    block_v = max(block_v, vec)
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if on_gpu:
        tile_rows = min(32 * num_warps, block_v // vec)
        sub_tiles = block_v // (tile_rows * vec)
    else:  # interpreter: few, wide tiles
        sub_tiles = min(4, block_v // vec)
        tile_rows = block_v // (sub_tiles * vec)
    # Rows whose start is not on a VEC-element boundary (V % VEC ≠ 0, x[..., 1:]) peel a head
    # of < VEC elements, so the body keeps 16-byte loads; this needs ref and quant rows to
    # share their misalignment, else the kernel runs without alignment hints (scalar loads).
    mis = [(t.data_ptr() // t.element_size()) % vec for t in (ref, quant)]
    same = mis[0] == mis[1] and all(ref.stride(d) % vec == quant.stride(d) % vec for d in (0, 1))
    aligned = align and same
    align_x = vec * ref.element_size() if aligned else 0
    align_y = vec * quant.element_size() if aligned else 0
    # Splits along V when there are too few rows to fill the device once (resident blocks
    # per SM from the compiled kernel's registers; before the first compile, from the cap).
    maxnreg = maxnreg if on_gpu else None
    kp = max(2, triton.next_power_of_2(top_k))
    shape_key = (dev.index, ref.dtype, quant.dtype, num_warps, maxnreg, sub_tiles, tile_rows,
                 labels is not None, kp, align_x, align_y)  # fmt: skip
    regs = _COMPILED_REGS.get(shape_key, maxnreg or 255)
    n_tiles = triton.cdiv(vocab, block_v)
    if splits is None:
        splits = min(n_tiles, max(1, triton.cdiv(_num_programs_wanted(dev, regs, num_warps),
                                                 max(n, 1))))  # fmt: skip
    splits = max(1, min(splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    v_per_split = tiles_per_split * block_v

    out = torch.empty(NUM_OUTPUTS, n, dtype=torch.float32, device=dev)
    flag = torch.zeros(n, dtype=torch.int32, device=dev)
    has_labels = labels is not None
    label_arg = labels if has_labels else out
    if n == 0:
        return _outputs(out, labels, ignore_index, n, dev)
    if splits > 1:
        state = torch.empty(n, splits, NUM_STATE, dtype=torch.float32, device=dev)
        index = torch.empty(n, splits, 2, dtype=torch.int32, device=dev)
        top = torch.empty(n, splits, kp, dtype=torch.float32, device=dev)
    else:
        state = index = top = out
    # FP fusion (FMA) is pinned on: Triton ≥ 3.7 turns it off by default (+10 SASS per logit).
    opts = {"maxnreg": maxnreg, "enable_fp_fusion": True} if on_gpu else {}
    ptrs = (ref, ref.stride(0), ref.stride(1), quant, quant.stride(0), quant.stride(1))
    compiled = _fast_kernel[(n, splits)](
        *ptrs, label_arg, out, state, index, top, flag,
        n, seq, vocab, v_per_split, ignore_index, top_k, splits, mis[0],
        HAS_LABELS=has_labels, WRITE_PARTIAL=splits > 1, NUM_STATE_=NUM_STATE, KP=kp,
        G=sub_tiles, ROWS=tile_rows, VEC=vec, PTX=on_gpu and torch.version.hip is None,
        ALIGN_X=align_x, ALIGN_Y=align_y, num_warps=num_warps, **opts,
    )  # fmt: skip
    if on_gpu and getattr(compiled, "n_regs", None):
        _COMPILED_REGS[shape_key] = compiled.n_regs
    if splits > 1:
        _merge_splits_kernel[(n,)](
            *ptrs, label_arg, out, state, index, top,
            flag, n, seq, vocab, ignore_index, top_k, splits,
            HAS_LABELS=has_labels, NUM_STATE_=NUM_STATE, KP=kp,
            SPLITS_P2=triton.next_power_of_2(splits),
            num_warps=4,
        )  # fmt: skip
    # Rows with −inf, +inf or NaN entries (flagged above) take the masked path; the other
    # programs only read their flag. On the CPU (interpreter) the launch is skipped when unused.
    # Its per-lane sums need ~16 registers per lane: 1024-wide tiles keep the spill small.
    if on_gpu or bool(flag.any()):
        _general_kernel[(n,)](
            *ptrs, label_arg, out, flag, n, seq, vocab, ignore_index, top_k,
            HAS_LABELS=has_labels, KP=kp, BLOCK_V=min(block_v, 1024) if on_gpu else block_v,
            num_warps=num_warps,
        )  # fmt: skip
    return _outputs(out, labels, ignore_index, n, dev)


def _outputs(out: torch.Tensor, labels: torch.Tensor | None, ignore_index: int, n: int,
             dev: torch.device) -> dict[str, torch.Tensor]:  # fmt: skip
    """The [NUM_OUTPUTS, N] result as named 1-D tensors (match flags and ``scored`` as bool)."""
    result = {name: out[i] for i, name in enumerate(OUTPUTS[:6])}
    for i, name in enumerate(OUTPUTS[6:9], start=6):
        result[name] = out[i] > 0.5
    if labels is not None:
        for i, name in enumerate(OUTPUTS[9:], start=9):
            result[name] = out[i]
        result["scored"] = labels != ignore_index
    else:
        result["scored"] = torch.ones(n, dtype=torch.bool, device=dev)
    return result
