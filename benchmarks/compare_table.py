"""``qmetrics bench --ops compare`` writing the repository's result files.

    python -m benchmarks.compare_table [--out DIR] [qmetrics bench flags ...]

Runs the installed command's core (defaults: CUDA N=4096, V ∈ {32000, 128256}, bf16 and fp32;
CPU N=192, V=32000, fp32) and, with ``--out``, writes DIR/compare_logits.json (the
``--json`` document) and DIR/compare_logits.md (the same table as Markdown).
"""

from __future__ import annotations

import sys

from benchmarks.harness import bench_to_folder


def main(argv: list[str] | None = None) -> int:
    return bench_to_folder("compare", "compare_logits", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
