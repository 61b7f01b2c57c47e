"""``qmetrics demo`` (and ``qmetrics compare`` without ``--reference``): the offline demo, the
bundled model against its int8 / int4 / int3 round-to-nearest copies on its held-out text.

:func:`demo_args` fills in the compare settings of the demo; ``qmetrics.cli.main`` then runs
them through ``qmetrics.cli.compare.run_compare``.
"""

from __future__ import annotations

import argparse
from typing import Any

from qmetrics.cli.common import add_run_args
from qmetrics.evaluation.corpus import DEMO_SOURCE

DEMO_QUANTIZE = ("int8", "int4-g32", "int3-g32")
DEMO_CONTEXT = 128


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("demo", help="offline demo: the bundled model vs its RTN versions")
    add_run_args(p)
    return p


def demo_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the demo's models, corpus and windows filled in (the run flags —
    ``--output``, ``--fail-if``, ... — are kept)."""
    from qmetrics.evaluation.corpus import demo_text_path

    args.reference = str(demo_text_path().parent)
    args.candidate = []
    args.quantize = list(DEMO_QUANTIZE)
    args.dataset = DEMO_SOURCE
    args.text_field = "text"
    args.context_length = DEMO_CONTEXT
    args.stride = None
    args.batch_size = 8
    args.max_tokens = None
    args.device = "cpu"
    args.dtype = "float32"
    args.trust_remote_code = False
    args.gguf_file = None
    return args
