"""Corpus loading, tokenization and scoring windows."""

from __future__ import annotations

import json

import pytest
import torch

from qmetrics.evaluation.corpus import (
    CorpusError,
    Window,
    batch_windows,
    check_same_tokens,
    iter_texts,
    make_windows,
    token_batches,
    tokenize_checked,
    tokenize_texts,
)
from tests.tiny_models import synthetic_text, tiny_tokenizer


@pytest.mark.parametrize(
    ("n", "length", "stride"),
    [(100, 10, None), (101, 16, 5), (7, 8, 3), (50, 2, 1), (64, 64, 64), (65, 64, None)],
)
def test_every_token_after_the_first_is_scored_once(n, length, stride):
    ids = torch.arange(n)
    windows = make_windows(n, length, stride)
    scored = []
    for w in windows:
        assert w.length <= length
        labels = w.labels(ids)
        # position i predicts token begin + i + 1: labels are the next tokens or ignored
        for i, lab in enumerate(labels.tolist()):
            if lab != -100:
                assert lab == w.begin + i + 1
                scored.append(lab)
    if stride is None or stride == length:
        # non-overlapping: the first token of every window has no prediction
        expected = [t for w in windows for t in range(w.begin + 1, w.end)]
    else:
        expected = list(range(1, n))
    assert sorted(scored) == expected
    assert len(set(scored)) == len(scored)


def test_strided_windows_follow_the_transformers_guide():
    # begin every `stride` tokens, end = begin + L, targets = tokens not scored before
    windows = make_windows(20, 8, 4)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [
        (0, 8, 0),
        (4, 12, 8),
        (8, 16, 12),
        (12, 20, 16),
    ]


@pytest.mark.parametrize(("length", "stride"), [(1, None), (8, 0), (8, 9)])
def test_bad_windows(length, stride):
    with pytest.raises(ValueError, match="context_length|stride"):
        make_windows(100, length, stride)


def test_tokenize_joins_documents_and_adds_one_bos():
    tok = tiny_tokenizer()
    ids = tokenize_texts(["the king", "", "  ", "of the land"], tok, separator="\n\n")
    assert ids[0].item() == tok.bos_token_id
    assert (ids == tok.bos_token_id).sum() == 1
    expected = tok("the king\n\nof the land", add_special_tokens=False)["input_ids"]
    assert ids[1:].tolist() == expected


def test_tokenize_max_tokens_and_empty_corpus():
    tok = tiny_tokenizer()
    text = synthetic_text(500)
    assert len(tokenize_texts([text], tok, max_tokens=37)) == 37
    with pytest.raises(CorpusError, match="empty"):
        tokenize_texts(["", "   "], tok)
    with pytest.raises(CorpusError, match="empty"):
        tokenize_texts([], tok)


def test_streamed_corpus_stops_reading_at_max_tokens():
    tok = tiny_tokenizer()
    read = []

    def docs():
        for i in range(1000):
            read.append(i)
            yield synthetic_text(50, seed=i)

    tokenize_texts(docs(), tok, max_tokens=100)
    assert len(read) < 10


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    assert list(iter_texts(str(tmp_path / "a.txt"))) == ["plain text file"]
    lines = [{"text": "first"}, {"text": "second", "id": 2}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert list(iter_texts(str(tmp_path / "b.jsonl"))) == ["first", "second"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CorpusError, match="no field 'text'"):
        list(iter_texts(str(tmp_path / "c.jsonl")))
    assert list(iter_texts(str(tmp_path / "c.jsonl"), text_field="body")) == ["x"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["one", None, "two"]}), tmp_path / "d.parquet")
    assert list(iter_texts(str(tmp_path / "d.parquet"), text_field="content")) == ["one", "two"]
    with pytest.raises(CorpusError, match="no column 'text'"):
        list(iter_texts(str(tmp_path / "d.parquet")))


def test_unreadable_corpus(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        list(iter_texts(str(tmp_path / "missing.txt")))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(CorpusError, match="cannot read"):
        list(iter_texts(str(tmp_path / "bad.txt")))


def test_tokenizer_mismatch_names_the_position():
    a = torch.tensor([1, 2, 3, 4, 5])
    check_same_tokens(a, a.clone(), "cand")
    with pytest.raises(CorpusError, match="first at token 3"):
        check_same_tokens(a, torch.tensor([1, 2, 3, 9, 5]), "cand")
    with pytest.raises(CorpusError, match="gives 4 tokens"):
        check_same_tokens(a, a[:4], "cand")


class _ShiftedTokenizer:
    """A tokenizer whose ids differ from ``inner``'s by ``shift`` (ids ≥ ``at``)."""

    def __init__(self, inner, shift: int, at: int = 0):
        self.inner, self.shift, self.at = inner, shift, at
        self.bos_token_id = inner.bos_token_id

    def __call__(self, text, add_special_tokens=False):
        ids = self.inner(text, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": [i + self.shift if i >= self.at else i for i in ids]}


def test_tokenize_checked_reads_once_and_checks_every_other_tokenizer():
    tok = tiny_tokenizer()
    docs = [synthetic_text(40, seed=i) for i in range(6)]
    pulled = []

    def stream():
        for d in docs:
            pulled.append(d)
            yield d

    expected = tokenize_texts(docs, tok, max_tokens=50)
    same = _ShiftedTokenizer(tok, 0)
    ids = tokenize_checked(stream(), tok, [("a", None), ("b", tok), ("c", same)], max_tokens=50)
    assert torch.equal(ids, expected)
    assert len(pulled) < len(docs)  # the stream is read once, only as far as max_tokens needs
    with pytest.raises(CorpusError, match="tokenizer mismatch: odd .* first at token"):
        tokenize_checked(docs, tok, [("c", same), ("odd", _ShiftedTokenizer(tok, 1, at=10))])


def _windows(*lengths: int) -> list[Window]:
    out, begin = [], 0
    for n in lengths:
        out.append(Window(begin, begin + n, begin))
        begin += n
    return out


def test_batch_windows_groups_equal_lengths_within_the_budget():
    ws = _windows(8, 8, 8, 8, 8, 5)
    assert [[w.begin for w in b] for b in batch_windows(ws, 2)] == [[0, 8], [16, 24], [32], [40]]
    assert [len(b) for b in batch_windows(ws, 3, max_tokens=30)] == [3]  # 24 tokens; 32 > 30
    assert [len(b) for b in batch_windows(ws, 3, max_tokens=1)] == [1]  # at least one window
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be an int ≥ 1"):
            batch_windows(ws, bad)


def test_token_batches_stack_the_windows():
    ids = torch.arange(40)
    batches = token_batches(ids, context_length=16, batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 16), (1, 8)]
    assert torch.equal(torch.cat([b.reshape(-1) for b in batches]), ids)
    assert [tuple(b.shape) for b in token_batches(ids, 16, 2, max_tokens=20)] == [(1, 16)]
