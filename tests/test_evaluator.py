"""Paired evaluation over a corpus: perplexity against transformers' own loss, statistics
against LogitStats fed the full logits, chunking, resume, tokenizer checks."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from qmetrics import LogitStats  # noqa: E402
from qmetrics.evaluation import compare as compare_module  # noqa: E402
from qmetrics.evaluation.compare import ModelFigures, QuantizationEvaluator  # noqa: E402
from qmetrics.evaluation.corpus import CorpusError  # noqa: E402
from qmetrics.evaluation.models import ModelEntry, rtn_candidate  # noqa: E402
from tests.tiny_models import synthetic_text, tiny_llama, tiny_tokenizer  # noqa: E402

TEXT = synthetic_text(1500)


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer()
    ref = ModelEntry("ref", tiny_llama(len(tok)), tok)
    return ref, rtn_candidate(ref, "int4-g32")


def hf_perplexity(model, ids, windows) -> float:
    """exp(mean NLL) from the model's own ``labels=`` loss, window by window."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            inp = ids[w.begin : w.end][None]
            labels = inp.clone()
            labels[0, : w.score_from - w.begin] = -100
            n = int((labels[0, 1:] != -100).sum())
            total += model(inp, labels=labels).loss.item() * n
            count += n
    return math.exp(total / count)


@pytest.mark.parametrize("stride", [None, 24])
def test_perplexity_equals_transformers_loss(models, stride):
    ref, cand = models
    ev = QuantizationEvaluator(
        ref,
        [cand],
        context_length=64,
        stride=stride,
        batch_size=3,
        max_tokens=900,
        logit_chunk_tokens=20,
        progress=False,
    )
    result = ev.evaluate([TEXT])
    ids = ev.tokenize([TEXT])
    windows = [w for batch in ev.batches(len(ids)) for w in batch]
    for entry in (ref, cand):
        expected = hf_perplexity(entry.model, ids, windows)
        assert result.perplexity[entry.name].value == pytest.approx(expected, rel=1e-4)
    n_scored = sum(int((w.labels(ids) != -100).sum()) for w in windows)
    assert result.comparisons[cand.name].tokens_scored == n_scored
    if stride is not None:
        assert n_scored == len(ids) - 1  # every token after the first, exactly once


def test_statistics_equal_logitstats_on_full_logits(models):
    ref, cand = models
    ev = QuantizationEvaluator(
        ref,
        [cand],
        context_length=48,
        batch_size=2,
        max_tokens=500,
        logit_chunk_tokens=7,
        progress=False,
    )
    result = ev.evaluate([TEXT]).comparisons[cand.name]
    ids = ev.tokenize([TEXT])
    direct = LogitStats(top_k=5)
    with torch.no_grad():
        for batch in ev.batches(len(ids)):
            inp = torch.stack([ids[w.begin : w.end] for w in batch])
            labels = torch.stack([w.labels(ids) for w in batch])
            direct.update(ref.model(inp).logits, cand.model(inp).logits, labels)
    expected = direct.compute()
    assert result.tokens_scored == expected.tokens_scored
    for name in ("kl", "reverse_kl", "nll_ref", "nll_quant", "cosine"):
        assert result.means[name].value == pytest.approx(expected.means[name].value, rel=1e-4)
        assert result.means[name].stderr == pytest.approx(expected.means[name].stderr, rel=1e-3)
    assert result.top1_agreement.value == expected.top1_agreement.value
    assert result.topk_agreement.value == expected.topk_agreement.value
    for p, v in expected.kl_distribution.percentiles.items():
        assert result.kl_distribution.percentiles[p] == pytest.approx(v, rel=1e-3, abs=1e-9)


def test_identical_candidate_has_zero_drift(models):
    ref, _ = models
    twin = ModelEntry("twin", ref.model, None)
    res = QuantizationEvaluator(
        ref, [twin], context_length=32, max_tokens=200, progress=False
    ).evaluate([TEXT])
    comp = res.comparisons["twin"]
    assert comp.means["kl"].value == pytest.approx(0.0, abs=1e-7)
    assert comp.top1_agreement.value == 1.0
    assert res.perplexity["twin"].value == pytest.approx(res.perplexity["ref"].value, rel=1e-6)


def test_reference_only_gives_its_perplexity(models):
    ref, _ = models
    ev = QuantizationEvaluator(ref, [], context_length=32, max_tokens=200, progress=False)
    res = ev.evaluate([TEXT])
    assert res.comparisons == {}
    ids = ev.tokenize([TEXT])
    windows = [w for b in ev.batches(len(ids)) for w in b]
    assert res.perplexity["ref"].value == pytest.approx(
        hf_perplexity(ref.model, ids, windows), rel=1e-4
    )


def test_resume_gives_identical_statistics(models, tmp_path):
    ref, cand = models
    kwargs = dict(
        context_length=32, batch_size=2, max_tokens=600, checkpoint_every=2, progress=False
    )
    full = QuantizationEvaluator(ref, [cand], **kwargs).evaluate([TEXT])

    class StopRunError(Exception):
        pass

    def stop_after_five(done, total):
        if done == 5:
            raise StopRunError

    ev = QuantizationEvaluator(ref, [cand], checkpoint_dir=tmp_path, **kwargs)
    with pytest.raises(StopRunError):
        ev.evaluate([TEXT], on_batch=stop_after_five)
    seen = []
    resumed = QuantizationEvaluator(ref, [cand], checkpoint_dir=tmp_path, **kwargs).evaluate(
        [TEXT], resume=True, on_batch=lambda done, total: seen.append(done)
    )
    assert seen[0] == 5  # batches 1-4 were checkpointed and not recomputed
    # each process's first batch (2 windows × 32 tokens) is a warm-up, kept out of tokens/s
    assert resumed.figures["ref"].warmup_tokens == 2 * 64
    assert resumed.comparisons[cand.name].to_dict() == full.comparisons[cand.name].to_dict()
    assert resumed.perplexity == full.perplexity

    other = QuantizationEvaluator(
        ref, [cand], checkpoint_dir=tmp_path, **{**kwargs, "context_length": 16}
    )
    with pytest.raises(ValueError, match="other settings"):
        other.evaluate([TEXT], resume=True)


def test_candidate_tokenizer_mismatch_is_an_error(models):
    ref, cand = models
    other_tok = tiny_tokenizer(300)
    odd = ModelEntry("odd", cand.model, other_tok)
    with pytest.raises(CorpusError, match="tokenizer mismatch: odd"):
        QuantizationEvaluator(ref, [odd], context_length=32, progress=False).evaluate([TEXT])


def test_figures_leave_out_the_warmup_batch(models):
    ref, cand = models
    ev = QuantizationEvaluator(
        ref, [cand], context_length=32, batch_size=2, max_tokens=200, progress=False
    )
    res = ev.evaluate([TEXT])
    batches = ev.batches(len(ev.tokenize([TEXT])))
    assert len(batches) > 1
    sizes = [sum(w.length for w in b) for b in batches]
    for fig in res.figures.values():
        assert (fig.tokens, fig.warmup_tokens) == (sum(sizes), sizes[0])
        assert 0 < fig.warmup_seconds < fig.forward_seconds
        steady = (fig.tokens - fig.warmup_tokens) / (fig.forward_seconds - fig.warmup_seconds)
        assert fig.tokens_per_second == pytest.approx(steady)
        assert fig.peak_memory_source == "rss" and fig.peak_memory_mb >= 0.0
    figures = res.to_dict()["models"]["ref"]["figures"]
    assert figures["warmup_tokens"] == sizes[0] and figures["peak_memory_source"] == "rss"


def test_model_figures_rate_falls_back_to_all_batches():
    only_warmup = ModelFigures(forward_seconds=2.0, tokens=100, warmup_seconds=2.0,
                               warmup_tokens=100)  # fmt: skip
    assert only_warmup.tokens_per_second == 50.0
    steady = ModelFigures(forward_seconds=3.0, tokens=300, warmup_seconds=2.0, warmup_tokens=100)
    assert steady.tokens_per_second == 200.0  # 200 tokens in the 1 s after the warm-up
    assert ModelFigures().tokens_per_second is None


def test_cpu_peak_memory_is_the_rss_growth_since_the_run_started(models, monkeypatch):
    ref, cand = models
    assert compare_module.peak_rss_mb() > 0.0
    readings = iter([100.0, 130.0, 120.0, 150.0, 140.0])  # run start, then after each forward

    monkeypatch.setattr(compare_module, "peak_rss_mb", lambda: next(readings))
    ev = QuantizationEvaluator(
        ref, [cand], context_length=32, batch_size=1, max_tokens=64, progress=False
    )
    figures = ev.evaluate(torch.arange(64) % 300).figures
    # two batches: ref reads 130 then 150, the candidate 120 then 140 (largest growth kept)
    assert figures["ref"].peak_memory_mb == 50.0
    assert figures[cand.name].peak_memory_mb == 40.0
