"""CPU path of the per-token output statistics of one logit tensor: torch ops over row chunks,
same outputs as the Triton kernel (:mod:`qmetrics.kernels.output_stats`).

Per row x (logits over V entries), with m1 ≥ m2 the two largest entries (with multiplicity:
m2 = m1 on a tie), d_i = x_i − m1, e_i = exp(d_i), s = Σ e, h = Σ e·d:

    lse      = m1 + log s
    entropy  = −Σ p log p = log s − h/s
    max_prob = exp(m1 − lse) = 1/s
    margin   = p1 − p2 = (1 − exp(m2 − m1))/s = −expm1(m2 − m1)/s      (V = 1: m2 = −inf, 1)
    nll      = lse − x[label] = (m1 − x[label]) + log s

An entry of −inf is a masked token: probability 0, as in :func:`qmetrics.compare_logits` (its
term e·d of h is 0, not 0·(−inf) = NaN: the eager path clamps d to the lowest fp32 number, the
compiled one selects 0 in its fused loop); a label on one gets NLL +inf. A row holding a NaN
or +inf entry, or no finite entry, is non-finite: ``finite`` 0 and NaN everywhere else. Both
paths detect it from m1 alone (the maximum propagates NaN, is +inf with a +inf entry and −inf
without a finite one). A label equal to ``ignore_index``, or outside [0, V), gets a NaN NLL
and is never read.

Two implementations with the same outputs (as in :mod:`qmetrics.kernels.logit_compare_torch`):

- eager: torch ops over row chunks in reused fp32 buffers (~10 passes over a chunk in cache);
- compiled: :func:`plain_output_stats` under ``torch.compile`` with dynamic row counts
  (:mod:`qmetrics.kernels.torch_compile`): inductor fuses it into a max pass and one pass of
  exp and sums per row, ~1 ns per logit on one core (the exp bounds it), 4-8× faster. Used for
  calls of at least ``COMPILE_MIN_ELEMENTS`` logits, or as ``compile``/
  ``$QMETRICS_TORCH_COMPILE`` say. A call of a new row count does not recompile.

Layout: ``logits`` is [N, V] or [B, T, V] with last stride 1 and any leading strides
(``x[:, :-1]``, transposed B/T): never copied. Chunks of rows are views; only a chunk at a time
is converted to fp32 (inputs of another dtype) and worked on in reused fp32 buffers, so the
extra memory is O(chunk·V), never [N, V]. No host synchronisation: no ``nonzero``, ``item``
or data-dependent shapes.
"""

from __future__ import annotations

import torch
from qmetrics.kernels.row_views import as_3d
from qmetrics.kernels.torch_compile import (
    COMPILE_MIN_ELEMENTS,
    CompiledCPU,
    compiled_view,
    want_compile,
)

#: Rows of the [6, N] fp32 result, in order (``finite`` is 1.0 or 0.0).
OUTPUTS = ("entropy", "max_prob", "margin", "lse", "nll", "finite")
# The clamp of x − m1: exp of it is 0, and 0 times it is 0 (−inf entries are probability 0).
_LOWEST = torch.finfo(torch.float32).min
# About 1 MiB of fp32 per [chunk, V] buffer: three buffers stay in the last-level cache.
_CHUNK_ELEMENTS = 1 << 18


class _Buffers:
    """Reused fp32 work buffers [rows, V] for one chunk: ``x`` (input as fp32, when converted),
    ``d`` (x − m1, then e·d) and ``e`` (exp(d), then d with the maxima masked), ``tie``."""

    def __init__(self, rows: int, vocab: int, device: torch.device, convert: bool):
        f32 = torch.float32
        self.x = torch.empty(rows, vocab, dtype=f32, device=device) if convert else None
        self.d = torch.empty(rows, vocab, dtype=f32, device=device)
        self.e = torch.empty(rows, vocab, dtype=f32, device=device)
        self.tie = torch.empty(rows, vocab, dtype=torch.bool, device=device)


def _chunk_stats(x: torch.Tensor, buf: _Buffers) -> tuple[torch.Tensor, ...]:
    """(m1 anchor a, log s, entropy, max_prob, margin, finite) of the rows of fp32 ``x`` [r, V]."""
    r = x.shape[0]
    m1 = x.amax(dim=-1)  # NaN, +inf or −inf exactly for a non-finite row
    finite = torch.isfinite(m1)
    a = torch.where(finite, m1, 0.0)  # a finite anchor even for a bad row
    d = torch.sub(x, a[:, None], out=buf.d[:r]).clamp_min_(_LOWEST)
    e = torch.exp(d, out=buf.e[:r])
    s = e.sum(dim=-1)
    tie = torch.eq(d, 0.0, out=buf.tie[:r])  # the entries equal to m1
    ties = tie.sum(dim=-1)
    h = torch.mul(e, d, out=buf.e[:r]).sum(dim=-1)  # Σ e·d (e is not needed after this)
    d2 = buf.e[:r].copy_(d).masked_fill_(tie, -torch.inf).amax(dim=-1)  # m2 − m1 (no tie)
    d2 = torch.where(ties > 1, 0.0, d2)
    log_s = torch.log(s)
    nan = torch.full_like(s, torch.nan)
    entropy = torch.where(finite, log_s - h / s, nan)
    max_prob = torch.where(finite, 1.0 / s, nan)
    margin = torch.where(finite, -torch.expm1(d2) / s, nan)
    return a, log_s, entropy, max_prob, margin, finite


def plain_output_stats(
    x: torch.Tensor, labels: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """The [6, N] result of :func:`output_stats_torch` for ``x`` [B, T, V] (any strides, any
    float dtype) and ``labels`` (N int64, or None), written as plain tensor ops for
    ``torch.compile``: inductor reads the view as it is, in fp32, in two fused loops per row
    (max; exp, Σe, Σe·d, tie count, masked max) with no [N, V] temporary. Uncompiled it would
    materialise several [N, V] tensors: it is only run compiled."""
    vocab = x.shape[-1]
    xf = x.float()
    m1 = xf.amax(dim=-1, keepdim=True)
    d = xf - m1
    # exp(d) written twice: one [N, V] tensor read by two reductions would be stored (with
    # dynamic row counts inductor does not fuse them); two expressions are fused, CSE'd to one
    # exp per logit, and nothing of size [N, V] is written.
    s = torch.exp(d).sum(dim=-1)
    h = torch.where(d > -torch.inf, torch.exp(d) * d, 0.0).sum(dim=-1)  # −inf entries: 0
    tie = d == 0.0
    ties = tie.float().sum(dim=-1)
    d2 = torch.where(tie, -torch.inf, d).amax(dim=-1)  # m2 − m1 without the maxima
    d2 = torch.where(ties > 1.0, 0.0, d2)
    m1 = m1.squeeze(-1)
    finite = torch.isfinite(m1)
    log_s = torch.log(s)
    nan = torch.full_like(s, torch.nan)
    entropy = torch.where(finite, log_s - h / s, nan)
    max_prob = torch.where(finite, 1.0 / s, nan)
    margin = torch.where(finite, -torch.expm1(d2) / s, nan)
    lse = torch.where(finite, m1 + log_s, nan)
    if labels is None:
        nll = nan
    else:
        labels = labels.view(x.shape[:-1])
        readable = (labels != ignore_index) & (labels >= 0) & (labels < vocab)
        safe = torch.where(readable, labels, 0)
        x_label = torch.gather(x, -1, safe[..., None]).squeeze(-1).float()
        nll = torch.where(readable & finite, (m1 - x_label) + log_s, nan)
    out = torch.stack([entropy, max_prob, margin, lse, nll, finite.float()])
    return out.view(len(OUTPUTS), -1)


# Dynamic leading dims: a call with another row count reuses the compiled code; a new
# (dtype, V, strides pattern, labels or not) compiles once more, up to 8 of them.
_COMPILED = CompiledCPU(plain_output_stats, name="output_stats", dynamic=None, max_signatures=8)


def compile_signature(x3: torch.Tensor, labels: torch.Tensor | None) -> tuple:
    """What makes the compiled function compile again: dtype, V, which leading dims are 1 or
    contiguous, and whether labels are given."""
    b, t, vocab = x3.shape
    layout = (b == 1, t == 1, x3.stride(1) == vocab, x3.stride(0) == t * x3.stride(1))
    return (x3.dtype, vocab, layout, labels is None)


def output_stats_torch(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    compile: bool | None = None,
) -> torch.Tensor:
    """[6, N] fp32 statistics (rows :data:`OUTPUTS`, formulas in the module docstring) of the
    N = B·T rows of ``logits`` [N, V] or [B, T, V], in row chunks (views, never copied).
    ``labels``: N int64 entries on the logits' device, or None (``nll`` row NaN).
    ``compile``: use the compiled function (None: the module docstring says when)."""
    x3 = as_3d(logits, "logits")
    nb, nt, vocab = x3.shape
    n = nb * nt
    dev = x3.device
    if labels is not None and labels.numel() != n:
        raise ValueError(f"labels has {labels.numel()} entries for {n} rows of logits")
    if want_compile(compile, dev, n * vocab >= COMPILE_MIN_ELEMENTS):
        signature = compile_signature(x3, labels)
        out = _COMPILED(
            signature,
            compiled_view(x3),
            None if labels is None else compiled_view(labels.reshape(n)),
            ignore_index,
        )
        if out is not None:
            return out
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    chunk_rows = max(1, min(chunk_rows, nt))
    out = torch.empty(len(OUTPUTS), nb, nt, dtype=torch.float32, device=dev)
    anchor = torch.empty(nb, nt, dtype=torch.float32, device=dev)
    log_sum = torch.empty(nb, nt, dtype=torch.float32, device=dev)
    buf = _Buffers(chunk_rows, vocab, dev, convert=x3.dtype != torch.float32)
    for b in range(nb):
        for start in range(0, nt, chunk_rows):
            stop = min(nt, start + chunk_rows)
            x = x3[b, start:stop]
            if buf.x is not None:
                x = buf.x[: stop - start].copy_(x)
            a, log_s, entropy, max_prob, margin, finite = _chunk_stats(x, buf)
            anchor[b, start:stop], log_sum[b, start:stop] = a, log_s
            out[0, b, start:stop], out[1, b, start:stop], out[2, b, start:stop] = (
                entropy,
                max_prob,
                margin,
            )
            out[5, b, start:stop] = finite
    out = out.view(len(OUTPUTS), n)
    anchor, log_sum = anchor.view(n), log_sum.view(n)
    finite = out[5] > 0
    out[3] = torch.where(finite, anchor + log_sum, torch.nan)
    if labels is None:
        out[4] = torch.nan
        return out
    labels = labels.reshape(n)
    readable = (labels != ignore_index) & (labels >= 0) & (labels < vocab)
    safe = torch.where(readable, labels, 0)
    rows = torch.arange(n, device=dev)
    x_label = x3[rows // nt, rows % nt, safe].float()
    out[4] = torch.where(readable & finite, (anchor - x_label) + log_sum, torch.nan)
    return out
