"""``qmetrics bench --ops distill`` writing the repository's result files.

    python -m benchmarks.distill_table [--out DIR] [qmetrics bench flags ...]

Forward + backward of :func:`qmetrics.losses.distill_loss` (from logits) and
:func:`qmetrics.losses.linear_distill_loss` (from hidden states and heads, hidden size 256)
against the eager loss (``F.kl_div`` on fp32 log-softmax copies; for the linear case after
materialising both logit tensors) and its ``torch.compile``. With ``--out``, writes
DIR/distill_loss.json and DIR/distill_loss.md.
"""

from __future__ import annotations

import sys

from benchmarks.harness import bench_to_folder
from qmetrics.evaluation.bench import (
    BASELINES,
    CaseSpec,
    make_providers,
    parse_dtype,
    peak_extra_mib,
)

#: Old provider names of this script → (case op, provider of ``qmetrics bench``).
PROVIDERS = {
    "eager": ("distill", "eager"),
    "eager_compile": ("distill", "compile"),
    "qmetrics": ("distill", "qmetrics"),
    "eager_linear": ("distill_linear", "eager"),
    "qmetrics_linear": ("distill_linear", "qmetrics"),
}


def cpu_peak_extra_mb(provider: str, n: int, vocab: int, dtype: str = "float32") -> float:
    """Peak RSS growth (MiB) of one forward + backward of ``provider`` (a key of
    :data:`PROVIDERS`) at N tokens and vocabulary V, after a warm-up call."""
    op, name = PROVIDERS[provider]
    spec = CaseSpec(op, n, vocab, parse_dtype(dtype))
    call = make_providers(spec, "cpu", BASELINES).calls[name]
    call()
    return peak_extra_mib(call, "cpu")


def main(argv: list[str] | None = None) -> int:
    return bench_to_folder("distill", "distill_loss", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
