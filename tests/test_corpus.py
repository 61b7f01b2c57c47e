"""Corpus loading, tokenization and scoring windows."""

from __future__ import annotations

import json

import pytest
import torch

from qmetrics.evaluation.corpus import (
    CorpusError,
    check_same_tokens,
    iter_texts,
    make_windows,
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
