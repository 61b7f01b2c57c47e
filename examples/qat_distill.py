"""Recover accuracy lost to int4 quantization with distillation (quantization-aware training).

    python examples/qat_distill.py [--steps 150] [--spec int4] [--lr 1e-4]

1. The bundled demo model is the full-precision teacher; the student is a copy whose Linear
   layers (all but ``lm_head``) are fake-quantized to int4 (round-to-nearest, per row) with
   straight-through rounding: the forward uses q(W), the gradient reaches the latent fp32 W as
   if q were the identity.
2. ``QuantizationEvaluator`` measures the student against the teacher on evaluation text.
3. The student is fine-tuned with ``qmetrics.losses.linear_distill_loss`` (KL(P_teacher ‖
   Q_student) from the final hidden states and both output heads, never a full logit tensor).
4. The same evaluation again; the script prints KL and PPL ratio before and after.

The demo model's training text (the KJV Bible minus a few books) is not shipped, only its
held-out books (``heldout.txt``). The script therefore fine-tunes on the first books of that
file and evaluates on the last ones, which training never sees. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from qmetrics.evaluation.compare import QuantizationEvaluator
from qmetrics.evaluation.corpus import demo_text_path
from qmetrics.evaluation.models import ModelEntry
from qmetrics.evaluation.rtn_quantize import quantize_weight
from qmetrics.losses import linear_distill_loss


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses the RTN fake-quantized weight, with the
    straight-through estimator: W_used = W + stopgrad(q(W) − W)."""

    spec: str = "int4"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            delta = quantize_weight(self.weight, self.spec) - self.weight
        return nn.functional.linear(x, self.weight + delta, self.bias)


def fake_quantize(model: nn.Module, spec: str) -> nn.Module:
    """A copy of ``model`` with every Linear but ``lm_head`` turned into a FakeQuantLinear."""
    student = copy.deepcopy(model)
    for name, module in student.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            module.__class__ = FakeQuantLinear
            module.spec = spec
    return student


def split_books(text: str, train_fraction: float) -> tuple[str, str]:
    """Books are separated by blank lines: the first ones (about ``train_fraction`` of the
    characters) for training, the rest for evaluation."""
    books = [b for b in text.split("\n\n") if b.strip()]
    total, acc, cut = sum(map(len, books)), 0, 0
    while cut < len(books) - 1 and acc < train_fraction * total:
        acc += len(books[cut])
        cut += 1
    return "\n\n".join(books[:cut]), "\n\n".join(books[cut:])


def evaluate(teacher, student, tokenizer, text: str) -> tuple[float, float]:
    """Mean KL(P_teacher ‖ P_student) per token and the perplexity ratio student / teacher."""
    evaluator = QuantizationEvaluator(
        ModelEntry("teacher", teacher, tokenizer), [ModelEntry("student", student)],
        context_length=128, batch_size=8, progress=False,
    )  # fmt: skip
    student.eval()
    result = evaluator.evaluate([text]).comparisons["student"]
    return result.means["kl"].value, result.ppl_ratio.value


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="int4", help="RTN spec of the student")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8, help="windows per step")
    parser.add_argument("--context", type=int, default=64, help="tokens per window")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    path = demo_text_path().parent
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_text, eval_text = split_books(demo_text_path().read_text(encoding="utf-8"), 0.6)
    student = fake_quantize(teacher, args.spec)
    student.requires_grad_(True)

    kl_before, ppl_before = evaluate(teacher, student, tokenizer, eval_text)
    print(f"before: KL {kl_before:.5f} nats/token, PPL ratio {ppl_before:.4f}")

    ids = torch.tensor(tokenizer(train_text)["input_ids"])
    n_windows = len(ids) // args.context
    windows = ids[: n_windows * args.context].view(n_windows, args.context)
    optim = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, args.steps)
    student.train()
    start = time.perf_counter()
    for step in range(args.steps):
        batch = windows[torch.randint(0, n_windows, (args.batch,))]
        with torch.no_grad():
            h_t = teacher.model(batch).last_hidden_state
        h_s = student.model(batch).last_hidden_state
        loss = linear_distill_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  train KL {loss.item():.5f}")
    print(f"fine-tuned {args.steps} steps in {time.perf_counter() - start:.0f} s")

    kl_after, ppl_after = evaluate(teacher, student, tokenizer, eval_text)
    print(f"after:  KL {kl_after:.5f} nats/token, PPL ratio {ppl_after:.4f}")
    print(
        f"| {args.spec} student | KL (nats/token) | PPL ratio |\n|---|---:|---:|\n"
        f"| before | {kl_before:.4f} | {ppl_before:.4f} |\n"
        f"| after {args.steps} steps | {kl_after:.4f} | {ppl_after:.4f} |"
    )
    return {"kl_before": kl_before, "kl_after": kl_after,
            "ppl_before": ppl_before, "ppl_after": ppl_after}  # fmt: skip


if __name__ == "__main__":
    main()
