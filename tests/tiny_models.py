"""Tiny models, tokenizers and text for tests: built from configs, nothing downloaded."""

from __future__ import annotations

import functools
import random

import torch

_WORD_LIST = (
    "the of and to in is was for on as with by at from his her that which this it an are "
    "were be had have not but they their one all would there been has when who more also "
    "king land river city house light water stone night day word people time year great"
)
WORDS = tuple(_WORD_LIST.split())


def synthetic_text(n_words: int = 4000, seed: int = 0) -> str:
    """Deterministic pseudo-English: sentences of common words, paragraphs split by blank lines."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_words // 8):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        sentences.append(" ".join(words).capitalize() + ".")
    paragraphs = [" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5)]
    return "\n\n".join(paragraphs)


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on :func:`synthetic_text`, as a transformers
    ``PreTrainedTokenizerFast`` with ``<s>`` as BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([synthetic_text(6000, seed=1)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A randomly initialised ``LlamaForCausalLM`` small enough for CPU tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(path, layers: int = 2, hidden: int = 64):
    """Save :func:`tiny_llama` and :func:`tiny_tokenizer` to ``path`` as a checkpoint folder
    that ``from_pretrained`` (and the CLI) load; returns ``path``."""
    tok = tiny_tokenizer()
    tiny_llama(len(tok), layers=layers, hidden=hidden).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_corpus(path, n_words: int):
    """Write :func:`synthetic_text` of ``n_words`` words to ``path``; returns ``path``."""
    path.write_text(synthetic_text(n_words))
    return path
