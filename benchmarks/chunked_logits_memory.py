"""Peak memory of the evaluator's chunked-logit path against one full fp32 logit tensor.

    python -m benchmarks.chunked_logits_memory [--vocab 128256 --window 2048 --batch 4]

A tiny Llama with a large vocabulary runs one batch through :class:`QuantizationEvaluator`
(reference vs an int8 RTN copy, logits made 256 positions at a time) in a fresh subprocess;
the growth of its peak RSS (VmHWM) is compared with the size of one [batch, window, V] fp32
logit tensor (what a plain ``model(ids).logits`` pass would hold, before any log-softmax
copies).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from qmetrics.evaluation.bench import peak_extra_mib


def subprocess_json(child: str, *args: object) -> Any:
    """Run ``module:function(*args)`` in a fresh Python process (so that its peak RSS is its
    own) and return what it returns, passed back as JSON."""
    module, function = child.split(":")
    code = f"import json; from {module} import {function}; print(json.dumps({function}(*{args!r})))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def child(vocab: int, window: int, batch: int, chunk: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qmetrics.evaluation.compare import QuantizationEvaluator
    from qmetrics.evaluation.models import ModelEntry, rtn_candidate

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=window,
        tie_word_embeddings=False,
    )  # fmt: skip
    ref = ModelEntry("ref", LlamaForCausalLM(config).eval(), tokenizer=object())
    cand = rtn_candidate(ref, "int8")
    ids = torch.randint(0, vocab, (batch * window,))
    ev = QuantizationEvaluator(ref, [cand], context_length=window, batch_size=batch,
                               logit_chunk_tokens=chunk, progress=False)  # fmt: skip
    # warm up the code paths on a short corpus, then measure one full batch
    ev.evaluate(ids[: 2 * 64])
    results = []
    growth = peak_extra_mib(lambda: results.append(ev.evaluate(ids)), "cpu")
    return {
        "peak_growth_mb": growth,
        "tokens_scored": results[0].comparisons[cand.name].tokens_scored,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=256)
    args = parser.parse_args(argv)
    measured = subprocess_json(
        "benchmarks.chunked_logits_memory:child", args.vocab, args.window, args.batch, args.chunk
    )
    full_mb = args.batch * args.window * args.vocab * 4 / 2**20
    print(f"batch {args.batch} × window {args.window} × V {args.vocab}, chunk {args.chunk}")
    print(f"one full fp32 logit tensor:        {full_mb:10.1f} MiB")
    print(f"chunked evaluator peak RSS growth: {measured['peak_growth_mb']:10.1f} MiB "
          f"({100 * measured['peak_growth_mb'] / full_mb:.1f}% of it)")  # fmt: skip
    print(f"tokens scored: {measured['tokens_scored']}")


if __name__ == "__main__":
    main()
