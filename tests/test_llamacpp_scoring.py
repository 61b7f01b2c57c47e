"""``--scoring llama.cpp``: which tokens go in and which are scored, checked against a hand-made
expectation of ``llama-perplexity --kl-divergence`` (chunks of n_ctx, BOS replacing each
chunk's first token, only the logits of positions n_ctx/2 … n_ctx − 2 scored), its perplexity
against a direct computation, and the running per-chunk line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qmetrics.evaluation.corpus import Window, make_windows

BOS = 1


def test_chunks_match_a_hand_computed_expectation():
    ids = torch.arange(100, 123)  # 23 tokens, n_ctx = 8: two chunks, the last 7 tokens dropped
    windows = make_windows(len(ids), 8, scoring="llama.cpp", bos_id=BOS)
    assert [(w.begin, w.end) for w in windows] == [(0, 8), (8, 16)]
    # what goes in: the chunk with its first token replaced by BOS
    assert windows[0].input_ids(ids).tolist() == [1, 101, 102, 103, 104, 105, 106, 107]
    assert windows[1].input_ids(ids).tolist() == [1, 109, 110, 111, 112, 113, 114, 115]
    assert ids[0] == 100 and ids[8] == 108  # the corpus is not modified
    # first = 8 // 2 = 4: logits of positions 4, 5, 6 predict tokens 5, 6, 7 of the chunk
    x = -100
    assert windows[0].labels(ids).tolist() == [x, x, x, x, 105, 106, 107, x]
    assert windows[1].labels(ids).tolist() == [x, x, x, x, 113, 114, 115, x]


def test_odd_context_and_no_bos():
    ids = torch.arange(50, 64)  # 14 tokens, n_ctx = 7: two chunks
    windows = make_windows(len(ids), 7, scoring="llama.cpp", bos_id=None)
    assert len(windows) == 2
    assert windows[1].input_ids(ids).tolist() == list(range(57, 64))  # no BOS: fed as is
    x = -100  # first = 3: positions 3, 4, 5 scored (n_ctx − 1 − first = 3 tokens)
    assert windows[1].labels(ids).tolist() == [x, x, x, 61, 62, 63, x]


@pytest.mark.parametrize("n_ctx", [3, 4, 64, 512, 513])
def test_scored_count_per_chunk_is_llamacpps(n_ctx):
    ids = torch.arange(3 * n_ctx + 1)
    windows = make_windows(len(ids), n_ctx, scoring="llama.cpp", bos_id=BOS)
    assert len(windows) == 3
    for w in windows:
        assert int((w.labels(ids) != -100).sum()) == n_ctx - 1 - n_ctx // 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_tokens=10, context_length=16), "at least one chunk"),
        (dict(n_tokens=100, context_length=16, stride=8), "stride"),
        (dict(n_tokens=100, context_length=2), "≥ 3"),
    ],
)
def test_bad_llamacpp_windows(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_windows(**kwargs, scoring="llama.cpp", bos_id=BOS)


def test_unknown_scoring_mode():
    with pytest.raises(ValueError, match="scoring must be one of"):
        make_windows(100, 16, scoring="vllm")


def test_default_windows_feed_the_corpus_unchanged():
    ids = torch.arange(40)
    for w in make_windows(len(ids), 16):
        assert w.first_token is None
        assert w.input_ids(ids).data_ptr() == ids[w.begin :].data_ptr()  # a view, no copy
    assert Window(0, 4, 1).input_ids(ids).tolist() == [0, 1, 2, 3]


# --- through the evaluator and the CLI ------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    pytest.importorskip("transformers")
    from qmetrics.evaluation.models import ModelEntry, rtn_candidate
    from tests.tiny_models import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    ref = ModelEntry("ref", tiny_llama(len(tok)), tok)
    return ref, rtn_candidate(ref, "int4-g32")


def test_evaluator_perplexity_is_llamacpps(models):
    from qmetrics.evaluation.compare import QuantizationEvaluator

    ref, cand = models
    n_ctx, n_chunks = 32, 5
    ids = torch.randint(3, len(ref.tokenizer), (n_chunks * n_ctx + 7,),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    ev = QuantizationEvaluator(ref, [cand], context_length=n_ctx, batch_size=2,
                               scoring="llama.cpp", progress=False)  # fmt: skip
    result = ev.evaluate(ids)
    res = result.comparisons[cand.name]
    assert result.windows == n_chunks
    assert res.tokens_scored == n_chunks * (n_ctx - 1 - n_ctx // 2)
    assert res.sequences == n_chunks
    assert result.settings["scoring"] == "llama.cpp"

    # llama.cpp by hand: BOS first, log-softmax at positions first … n_ctx − 2
    first, nll_ref, nll_cand = n_ctx // 2, [], []
    with torch.no_grad():
        for i in range(n_chunks):
            chunk = ids[i * n_ctx : (i + 1) * n_ctx].clone()
            chunk[0] = ref.tokenizer.bos_token_id
            targets = chunk[first + 1 :]
            for model, out in ((ref.model, nll_ref), (cand.model, nll_cand)):
                logp = model(chunk[None]).logits[0, first:-1].double().log_softmax(-1)
                out.extend((-logp.gather(-1, targets[:, None])[:, 0]).tolist())
    assert len(nll_ref) == res.tokens_scored
    ppl_ref, ppl_cand = (
        math.exp(sum(nll_ref) / len(nll_ref)),
        math.exp(sum(nll_cand) / len(nll_cand)),
    )
    assert res.ppl_ref.value == pytest.approx(ppl_ref, rel=1e-5)
    assert res.ppl_quant.value == pytest.approx(ppl_cand, rel=1e-5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, models):
    path = tmp_path_factory.mktemp("tiny-llama-lcpp")
    ref, _ = models
    ref.model.save_pretrained(path)
    ref.tokenizer.save_pretrained(path)
    return path


def test_cli_per_chunk_line_and_llamacpp_scoring(model_dir, tmp_path, capsys):
    from qmetrics.cli import main
    from qmetrics.reports.compare import CHUNK_HEADER
    from tests.tiny_models import synthetic_text

    corpus = tmp_path / "text.txt"
    corpus.write_text(synthetic_text(1500))
    out = tmp_path / "run"
    base = ["compare", "--reference", str(model_dir), "--quantize", "int4-g32", "--dataset",
            str(corpus), "--context-length", "32", "--batch-size", "1", "--max-tokens", "200",
            "--device", "cpu", "--scoring", "llama.cpp"]  # fmt: skip
    assert main([*base, "--per-chunk", "--output", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["scoring"] == "llama.cpp"
    assert report["windows"] == 200 // 32
    comp = report["comparisons"]["rtn-int4-g32"]
    assert comp["counts"]["scored"] == 6 * (32 - 1 - 16)
    assert printed.count(CHUNK_HEADER) == 1
    lines = printed[printed.index(CHUNK_HEADER) + 1 :][:6]
    assert [int(line.split()[0]) for line in lines] == [1, 2, 3, 4, 5, 6]
    # the last running line holds the final statistics, as llama.cpp prints them
    fields = lines[-1].replace("±", " ").replace("%", " ").split()
    ppl, ppl_err, ln_ratio, _, kl, kl_err, rms, _, top, _ = map(float, fields[1:])
    assert ppl == pytest.approx(report["models"]["rtn-int4-g32"]["perplexity"]["value"], abs=1e-4)
    assert ppl_err == pytest.approx(
        report["models"]["rtn-int4-g32"]["perplexity"]["stderr"], abs=1e-4
    )
    assert ln_ratio == pytest.approx(comp["perplexity"]["ln_ppl_ratio"]["value"], abs=1e-5)
    assert kl == pytest.approx(comp["means"]["kl"]["value"], abs=1e-5)
    assert kl_err == pytest.approx(comp["means"]["kl"]["stderr"], abs=1e-5)
    assert rms == pytest.approx(100 * comp["rms_delta_p"]["value"], abs=1e-3)
    assert top == pytest.approx(100 * comp["agreement"]["top1"]["value"], abs=1e-3)

    # --stride makes no sense with llama.cpp chunks: one line, exit 2, before loading models
    assert main([*base, "--stride", "8", "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--stride" in err and "\n" not in err
