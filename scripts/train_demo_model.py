#!/usr/bin/env python3
"""Train the tiny demo causal LM shipped in ``qmetrics/demo_model/``.

The demo model lets qmetrics compare a reference model with quantized variants fully offline.
It is a ~3.4M-parameter ``LlamaForCausalLM`` with a byte-level BPE tokenizer, trained from
scratch on the King James Bible (public domain) as packaged by Debian (``bible-kjv`` 4.38).

Data
    ``bible -f Gen1:1-Rev22:21`` prints one verse per line as ``<Book><chapter>:<verse> <text>``
    (e.g. ``Ge1:1 In the beginning ...``). The reference prefix is stripped; each book becomes
    one document (verses joined by ``\\n``) and documents are joined by ``\\n\\n``. Instead of
    running ``bible``, a file holding that same output can be given with ``--text``.

Split (by book)
    Held out: Ruth, Ecclesiastes, Jonah, Micah, Philippians, James, 1 John (777 of 31,102
    verses, ~2.5%, covering narrative, wisdom, prophecy and epistles). Everything else trains
    the tokenizer and the model. The held-out books are written to ``heldout.txt`` in the
    same format, so ``qmetrics`` scores exactly the text layout the model was trained on.

Reproducibility
    Fixed seeds, deterministic data order (a seeded ``torch.Generator`` draws the windows),
    one CPU thread, ``torch.use_deterministic_algorithms(True)``. Re-running the command on
    the same torch/tokenizers versions reproduces the weights.

Command (the one used for the shipped model; ~20 min on one shared CPU core)::

    apt-get install -y bible-kjv
    python scripts/train_demo_model.py --out qmetrics/demo_model

Requires ``torch``, ``transformers`` and ``tokenizers`` (``pip install 'qmetrics[hf]'``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

HELDOUT_BOOKS = ("Ruth", "Eccl", "Jonah", "Mic", "Phi", "Jas", "1Jn")
HELDOUT_NAMES = ("Ruth", "Ecclesiastes", "Jonah", "Micah", "Philippians", "James", "1 John")
VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
BIBLE_CMD = ["bible", "-f", "Gen1:1-Rev22:21"]
BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def read_kjv(text_path: str | None) -> str:
    if text_path:
        return Path(text_path).read_text(encoding="utf-8")
    try:
        return subprocess.run(BIBLE_CMD, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        sys.exit("the `bible` command is missing: apt-get install -y bible-kjv (or pass --text)")


def split_books(raw: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], int]:
    """(train books, held-out books, verse count); each book is (abbreviation, text)."""
    books: dict[str, list[str]] = {}
    n = 0
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        m = VERSE_RE.match(line)
        if m is None:
            raise SystemExit(f"line {lineno} is not a `bible -f` verse line: {line!r}")
        books.setdefault(m.group(1), []).append(m.group(4).strip())
        n += 1
    missing = [b for b in HELDOUT_BOOKS if b not in books]
    if missing:
        raise SystemExit(f"held-out books missing from the text: {missing}")
    train = [(b, "\n".join(v)) for b, v in books.items() if b not in HELDOUT_BOOKS]
    held = [(b, "\n".join(v)) for b, v in books.items() if b in HELDOUT_BOOKS]
    return train, held, n


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Chunk by line so the trainer input is deterministic and memory-light.
    tok.train_from_iterator(text.split("\n"), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer, text: str) -> torch.Tensor:
    """[BOS] + tokens of ``text``: the layout
    ``qmetrics.evaluation.corpus.tokenize_texts`` produces."""
    # The backend call is the same encoding as ``tokenizer(text, add_special_tokens=False)``
    # without the "longer than model_max_length" warning.
    body = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    ids = [tokenizer.bos_token_id] + body
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def heldout_nll(model, ids: torch.Tensor, seq_len: int, batch: int = 16) -> float:
    """Mean next-token NLL over non-overlapping windows of ``seq_len`` tokens."""
    model.eval()
    n_win = (len(ids) - 1) // seq_len
    x = ids[: n_win * seq_len + 1]
    inputs = x[:-1].view(n_win, seq_len)
    targets = x[1:].view(n_win, seq_len)
    total, count = 0.0, 0
    for i in range(0, n_win, batch):
        logits = model(input_ids=inputs[i : i + batch]).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets[i : i + batch].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += targets[i : i + batch].numel()
    model.train()
    return total / count


def unigram_nll(train_ids: torch.Tensor, held_ids: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0  # add-one smoothing
    logp = counts.log() - counts.sum().log()
    return -logp[held_ids[1:]].mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--text", help="file holding `bible -f Gen1:1-Rev22:21` output (default: run it)"
    )
    ap.add_argument("--out", default="qmetrics/demo_model", help="output folder")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    args = ap.parse_args()

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()

    raw = read_kjv(args.text)
    raw_sha = hashlib.sha256(raw.encode("utf-8")).hexdigest()
    train_books, held_books, n_verses = split_books(raw)
    train_text = "\n\n".join(t for _, t in train_books)
    held_text = "\n\n".join(t for _, t in held_books)
    n_held = sum(t.count("\n") + 1 for _, t in held_books)
    print(
        f"verses: {n_verses} ({n_verses - n_held} train, {n_held} held out); "
        f"train chars {len(train_text):,}, held-out chars {len(held_text):,}; "
        f"sha256 {raw_sha[:16]}"
    )

    max_pos = 512
    tokenizer = train_tokenizer(train_text, args.vocab_size)
    train_ids = encode(tokenizer, train_text)
    held_ids = encode(tokenizer, held_text)
    vocab = len(tokenizer)
    print(
        f"tokenizer: vocab {vocab}; train tokens {len(train_ids):,}, "
        f"held-out tokens {len(held_ids):,}"
    )
    uni = unigram_nll(train_ids, held_ids, vocab)
    print(f"unigram baseline: held-out nll {uni:.4f}, ppl {math.exp(uni):.2f}")

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)

    gen = torch.Generator().manual_seed(args.seed)
    n_start = len(train_ids) - args.seq_len - 1
    offsets = torch.arange(args.seq_len + 1)
    model.train()
    t_train = time.time()
    ema = None
    for step in range(args.steps):
        starts = torch.randint(0, n_start + 1, (args.batch_size,), generator=gen)
        batch = train_ids[starts[:, None] + offsets]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            el = time.time() - t_train
            print(
                f"step {step + 1}/{args.steps} loss {loss.item():.4f} (ema {ema:.4f}) "
                f"lr {lr_at(step):.2e} {el:.0f}s",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            nll = heldout_nll(model, held_ids, max_pos)
            print(f"  eval: held-out nll {nll:.4f} ppl {math.exp(nll):.2f}", flush=True)
    train_seconds = time.time() - t_train

    # Final numbers: train loss over a fixed sample of 64 train windows (fp32 and saved dtype).
    model.eval()
    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randint(0, len(train_ids) - 257, (64,), generator=eval_gen)
    dtype = getattr(torch, args.dtype)
    model = model.to(dtype)
    model.config.dtype = args.dtype

    def train_nll_windows(m) -> float:
        with torch.no_grad():
            x = train_ids[idx[:, None] + torch.arange(257)]
            lg = m(input_ids=x[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(lg.reshape(-1, vocab), x[:, 1:].reshape(-1))
            return nll.item()

    final_train = train_nll_windows(model)
    final_held = heldout_nll(model, held_ids, 512)
    print(
        f"final ({args.dtype}): train nll {final_train:.4f}; held-out nll {final_held:.4f} "
        f"ppl {math.exp(final_held):.2f} (unigram ppl {math.exp(uni):.2f}); "
        f"training {train_seconds / 60:.1f} min"
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 writes its own class name ("TokenizersBackend"); name the class both
    # transformers 4.x and 5.x resolve, so the demo loads with either.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    (out / "heldout.txt").write_text(held_text + "\n", encoding="utf-8")

    cmd = "python scripts/train_demo_model.py " + " ".join(sys.argv[1:])
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "text")}
    readme = f"""# qmetrics demo model

A tiny causal language model ({n_params / 1e6:.2f}M parameters, `LlamaForCausalLM`, stored in
{args.dtype}) with a byte-level BPE tokenizer (vocabulary {vocab}), trained from scratch on the
King James Bible. It exists so that qmetrics can demonstrate reference-vs-quantized comparisons
offline; it is not a useful language model.

Load it with `AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`
(no network, no `trust_remote_code`); `qmetrics.evaluation.corpus.demo_text_path()` gives
`heldout.txt`.

## Source

- Text: Debian package `bible-kjv` 4.38, printed with `bible -f Gen1:1-Rev22:21`
  (31,102 verses; sha256 of the output `{raw_sha}`). Verse references are stripped; one verse
  per line, books separated by a blank line.
- Held out (never seen by the tokenizer or the model): {", ".join(HELDOUT_NAMES)}
  ({n_held} verses, ~{100 * n_held / n_verses:.1f}%) — the file `heldout.txt`
  ({len(held_ids):,} tokens). All other books were used for training ({len(train_ids):,} tokens).

## Training

Command (from the repository root; needs `apt-get install -y bible-kjv`):

```
{cmd}
```

- Architecture: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate
  {args.intermediate}, max positions {max_pos}, RoPE, untied `lm_head`.
- Optimizer: AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak lr
  {args.lr}, {args.warmup} warm-up steps then cosine decay to {args.min_lr_ratio}×peak,
  gradient clipping 1.0, {args.steps} steps of {args.batch_size} random windows of
  {args.seq_len} tokens (~{args.steps * args.batch_size * args.seq_len / len(train_ids):.1f}
  epochs), seed {args.seed}, 1 CPU thread, float32 training.
- Training time: {train_seconds / 60:.1f} min on one CPU core
  ({platform.machine()}, torch {torch.__version__}).
- All settings: `{json.dumps(settings)}`

## Results (weights as saved, {args.dtype})

| | NLL (nats/token) | perplexity |
|---|---|---|
| train (64 windows of 256 tokens) | {final_train:.4f} | {math.exp(final_train):.2f} |
| held-out (`heldout.txt`, windows of 512) | {final_held:.4f} | {math.exp(final_held):.2f} |
| unigram baseline on held-out (add-one) | {uni:.4f} | {math.exp(uni):.2f} |

## License

The King James Version text is in the public domain (the Debian package ships it as such).
The model weights and tokenizer in this folder are released under the same license as
qmetrics, Apache-2.0.
"""
    (out / "README.md").write_text(readme, encoding="utf-8")
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    wall = (time.time() - t_start) / 60
    print(f"saved to {out} ({total / 1e6:.2f} MB); total wall time {wall:.1f} min")


if __name__ == "__main__":
    main()
