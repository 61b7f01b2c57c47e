"""The reference store (``qmetrics reference save`` / ``compare --reference-store``): a full store
compares like the reference model itself, a top-K store gives the exact statistics exactly and KL
as a lower bound, a killed save resumes into an identical store, and every bad input (missing or
corrupt store, foreign shard, other tokenizer or windows) stops with one line and exit code 2
without touching the finished shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from qmetrics import compare_logits  # noqa: E402
from qmetrics.cli import main  # noqa: E402
from qmetrics.evaluation.compare import QuantizationEvaluator  # noqa: E402
from qmetrics.evaluation.models import ModelEntry, rtn_candidate  # noqa: E402
from qmetrics.evaluation.reference_store import (  # noqa: E402
    MANIFEST,
    ReferenceStore,
    StoreError,
    StoreMode,
    save_reference_store,
)
from qmetrics.metrics.logit_stats import LogitStats  # noqa: E402
from qmetrics.metrics.reference_compare import (  # noqa: E402
    compare_to_reference_topk,
    summarize_reference_topk,
)
from tests.tiny_models import (  # noqa: E402
    save_tiny_model,
    synthetic_text,
    tiny_llama,
    tiny_tokenizer,
    write_corpus,
)

TEXT = synthetic_text(1500)
WINDOWS = dict(context_length=48, batch_size=3, max_tokens=700)


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer()
    ref = ModelEntry("ref", tiny_llama(len(tok)), tok)
    cand = rtn_candidate(ref, "int4-g32")
    cand.tokenizer = tok
    return ref, cand


@pytest.fixture(scope="module")
def direct(models):
    ref, cand = models
    ev = QuantizationEvaluator(ref, [cand], logit_chunk_tokens=20, progress=False, **WINDOWS)
    return ev.evaluate([TEXT]).comparisons[cand.name]


def store_compare(store, cand, **kw):
    ev = QuantizationEvaluator(store, [cand], logit_chunk_tokens=16, batch_size=2,
                               progress=False, **kw)  # fmt: skip
    return ev.evaluate([TEXT]).comparisons[cand.name]


# --- the op: top-K summary and comparison ---------------------------------------------------


def test_topk_compare_exact_fields_and_kl_bound():
    torch.manual_seed(0)
    n, vocab = 200, 300
    x = torch.randn(n, vocab) * 3
    y = x + 0.2 * torch.randn(n, vocab)
    labels = torch.randint(0, vocab, (n,))
    labels[:7] = -100
    tm = compare_to_reference_topk(summarize_reference_topk(x, labels, 32), y, labels, top_k=5)
    full = compare_logits(x, y, labels, top_k=5)
    for name in ("entropy_ref", "entropy_quant", "nll_ref", "nll_quant", "prob_ref", "prob_quant"):
        a, b = getattr(tm, name), getattr(full, name)
        assert torch.equal(a.isnan(), b.isnan()), name
        torch.testing.assert_close(a[~b.isnan()], b[~b.isnan()].double(), rtol=2e-6, atol=2e-6)
    assert torch.equal(tm.top1_match, full.top1_match)
    assert torch.equal(tm.topk_match, full.topk_match)
    assert tm.cosine is None and tm.mse is None and tm.kl_lower_bound
    # a lower bound (data processing), up to the fp16 rounding of the stored log-probs
    assert bool((tm.kl <= full.kl * (1 + 1e-3) + 1e-6).all())
    assert bool((tm.reverse_kl <= full.reverse_kl * (1 + 1e-3) + 1e-6).all())
    assert float(tm.kl.mean()) > 0.5 * float(full.kl.mean())
    # K = V: the partition is the vocabulary itself, so the bound is the KL (to fp16 rounding)
    whole = compare_to_reference_topk(summarize_reference_topk(x, labels, vocab), y, labels)
    torch.testing.assert_close(whole.kl, full.kl.double(), rtol=2e-2, atol=1e-5)


def test_topk_match_counts_ties_like_compare_logits():
    """bf16 logits on a coarse grid: many exact ties inside the stored top-K."""
    torch.manual_seed(1)
    n, vocab, k = 400, 64, 3
    x = (torch.randn(n, vocab) * 2).round().bfloat16()
    y = (x.float() + 0.8 * torch.randn(n, vocab)).round().bfloat16()
    tm = compare_to_reference_topk(summarize_reference_topk(x, None, 16), y, top_k=k)
    full = compare_logits(x, y, top_k=k)
    assert torch.equal(tm.topk_match, full.topk_match)
    assert torch.equal(tm.top1_match, full.top1_match)
    # the cases that need the tie bits occur: the argmax's rank ≥ k, its tie group starts < k
    above = (x.float() > x.float().gather(1, y.float().argmax(1, keepdim=True))).sum(1)
    assert bool((full.topk_match & (above < k) & ~full.top1_match).any())


def test_logit_stats_reports_absent_fields_not_zero():
    torch.manual_seed(2)
    x, y = torch.randn(2, 30, 50), torch.randn(2, 30, 50)
    labels = torch.randint(0, 50, (2, 30))
    stats = LogitStats(top_k=4)
    stats.update_metrics(compare_to_reference_topk(summarize_reference_topk(x, labels, 8),
                                                   y, labels, top_k=4))  # fmt: skip
    result = stats.compute()
    assert "cosine" not in result.means and "mse" not in result.means
    assert result.kl_lower_bound and set(result.absent) == {"cosine", "mse"}
    d = result.to_dict()
    assert d["kl_lower_bound"] is True and "cosine" not in d["means"]
    resumed = LogitStats.from_state_dict(stats.state_dict())
    assert resumed.compute().absent == result.absent
    with pytest.raises(ValueError, match="metrics mismatch"):
        resumed.update(x, y, labels)  # full metrics into a top-K accumulator


# --- stores against the direct comparison ------------------------------------------------------


@pytest.mark.slow
def test_full_store_equals_direct_compare(models, direct, tmp_path):
    ref, cand = models
    store = save_reference_store(ref, [TEXT], tmp_path / "f32", mode="full:float32",
                                 progress=False, **WINDOWS)  # fmt: skip
    via = store_compare(store, cand)
    assert via.tokens_scored == direct.tokens_scored and via.tokens_seen == direct.tokens_seen
    for name, est in direct.means.items():
        assert via.means[name].value == pytest.approx(est.value, rel=1e-9, abs=1e-12), name
    assert via.top1_agreement.value == direct.top1_agreement.value
    assert via.ppl_ratio.value == pytest.approx(direct.ppl_ratio.value, rel=1e-12)
    # the default full store keeps bf16: exactly the reference logits rounded to bf16
    bf16 = save_reference_store(ref, [TEXT], tmp_path / "bf16", mode="full", progress=False,
                                **WINDOWS)  # fmt: skip
    rows = bf16.rows(list(range(len(bf16.windows()))))["logits"]
    assert rows.dtype == torch.bfloat16
    assert torch.equal(rows, store.rows(list(range(len(store.windows()))))["logits"].bfloat16())


@pytest.mark.slow
def test_topk_store_exact_statistics_and_kl_lower_bound(models, direct, tmp_path):
    ref, cand = models
    store = save_reference_store(ref, [TEXT], tmp_path / "top", mode="topk:64", progress=False,
                                 **WINDOWS)  # fmt: skip
    via = store_compare(store, cand)
    assert via.tokens_scored == direct.tokens_scored
    assert via.top1_agreement.value == direct.top1_agreement.value
    assert via.topk_agreement.value == direct.topk_agreement.value
    for name in ("nll_ref", "nll_quant", "nll_diff", "delta_p", "entropy_ref", "entropy_quant"):
        assert via.means[name].value == pytest.approx(direct.means[name].value, rel=1e-5,
                                                      abs=1e-9), name  # fmt: skip
    assert via.ppl_ratio.value == pytest.approx(direct.ppl_ratio.value, rel=1e-7)
    assert via.rms_delta_p.value == pytest.approx(direct.rms_delta_p.value, rel=1e-5)
    assert via.kl_lower_bound and not direct.kl_lower_bound
    assert 0 < via.means["kl"].value <= direct.means["kl"].value
    assert "cosine" not in via.means and "mse" not in via.means
    # bytes per token: 6·K + 20 + K/8 per scored token, plus headers and the token ids
    assert StoreMode.parse("topk:64").bytes_per_token(store.vocab_size) == 412
    assert 412 < store.size_bytes / store.scored_tokens < 480


# --- writing: atomic, resumable ---------------------------------------------------------------


class KilledError(Exception):
    pass


@pytest.mark.slow
def test_killed_save_resumes_into_an_identical_store(models, tmp_path):
    ref, _ = models
    fresh = tmp_path / "fresh"
    save_reference_store(ref, [TEXT], fresh, progress=False, **WINDOWS)

    def die_after_two(done, total):
        if done == 2:
            raise KilledError

    killed = tmp_path / "killed"
    with pytest.raises(KilledError):
        save_reference_store(ref, [TEXT], killed, progress=False, on_shard=die_after_two,
                             **WINDOWS)  # fmt: skip
    with pytest.raises(StoreError, match="incomplete"):
        ReferenceStore.open(killed)
    finished = {p.name: p.read_bytes() for p in killed.glob("shard-*")}
    assert len(finished) == 2
    (killed / ".shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # killed mid-write
    written = []
    save_reference_store(ref, [TEXT], killed, progress=False,
                         on_shard=lambda done, total: written.append(done), **WINDOWS)  # fmt: skip
    assert 1 not in written and 2 not in written  # finished shards were kept, not redone
    for name, data in finished.items():
        assert (killed / name).read_bytes() == data
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in fresh.iterdir())
    for p in fresh.iterdir():
        assert (killed / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.slow
def test_other_run_or_corrupt_manifest_is_never_overwritten(models, tmp_path):
    ref, _ = models
    out = tmp_path / "store"
    save_reference_store(ref, [TEXT], out, progress=False, **WINDOWS)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(StoreError, match="another run"):
        save_reference_store(ref, [TEXT], out, progress=False, **{**WINDOWS, "max_tokens": 500})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt", 2000)


@pytest.fixture(scope="module")
def cli_store(model_dir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "ref"
    code = main(["reference", "save", "--reference", str(model_dir), "--dataset", str(corpus),
                 "--context-length", "32", "--max-tokens", "400", "--batch-size", "4",
                 "--output", str(out), "--no-progress", "--device", "cpu"])  # fmt: skip
    assert code == 0
    return out


def compare_args(store, out, *extra):
    return ["compare", "--reference-store", str(store), "--output", str(out), "--no-progress",
            "--device", "cpu", *map(str, extra)]  # fmt: skip


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("qmetrics: error:") and "\n" not in err, err
    return err


@pytest.mark.slow
def test_cli_save_prints_size_and_compare_reads_the_store(cli_store, model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(compare_args(cli_store, out, "--quantize", "int4-g32")) == 0
    report = json.loads((out / "report.json").read_text())
    cmp = report["comparisons"]["rtn-int4-g32"]
    assert cmp["kl_lower_bound"] is True and "cosine" not in cmp["means"]
    assert report["settings"]["context_length"] == 32  # taken from the store
    assert "≥" in capsys.readouterr().out  # the KL column says it is a lower bound
    # the size line of `reference save`
    main(["reference", "save", "--reference", str(model_dir), "--dataset",
          report["settings"]["dataset"], "--context-length", "32", "--max-tokens", "400",
          "--batch-size", "4", "--output", str(cli_store), "--no-progress",
          "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "bytes/token" in printed and "V = 32,000" in printed and "V = 128,256" in printed


@pytest.mark.slow
def test_cli_wrong_tokenizer_or_windows_exit_2(cli_store, corpus, tmp_path, capsys):
    other = tmp_path / "other-tok"
    tok = tiny_tokenizer(300)
    tiny_llama(len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    assert main(compare_args(cli_store, tmp_path / "a", "--candidate", other)) == 2
    assert "tokenizer mismatch" in one_line_error(capsys)
    args = compare_args(cli_store, tmp_path / "b", "--quantize", "int8", "--context-length", 64)
    assert main(args) == 2
    assert "windowing mismatch" in one_line_error(capsys)
    args = compare_args(cli_store, tmp_path / "c", "--quantize", "int8", "--max-tokens", 300)
    assert main(args) == 2
    assert "windowing mismatch" in one_line_error(capsys)


@pytest.mark.slow
def test_cli_missing_corrupt_or_foreign_store_exit_2(cli_store, models, tmp_path, capsys):
    assert main(compare_args(tmp_path / "nowhere", tmp_path / "a", "--quantize", "int8")) == 2
    assert "no reference store" in one_line_error(capsys)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(cli_store, corrupt)
    (corrupt / MANIFEST).write_text('{"format": "qmetrics-reference-store", "run_')
    assert main(compare_args(corrupt, tmp_path / "b", "--quantize", "int8")) == 2
    assert "corrupt" in one_line_error(capsys)

    foreign = tmp_path / "foreign"
    shutil.copytree(cli_store, foreign)
    other = tmp_path / "other"
    ref, _ = models
    save_reference_store(ref, [TEXT], other, progress=False, **WINDOWS)
    before = {p.name: p.read_bytes() for p in foreign.iterdir()}
    shutil.copy(other / "shard-00001.safetensors", foreign / "shard-00001.safetensors")
    manifest = json.loads((foreign / MANIFEST).read_text())
    manifest["shards"][1]["bytes"] = (foreign / "shard-00001.safetensors").stat().st_size
    (foreign / MANIFEST).write_text(json.dumps(manifest))  # only the size check is fooled
    assert main(compare_args(foreign, tmp_path / "c", "--quantize", "int8")) == 2
    assert "another run" in one_line_error(capsys)
    after = {p.name: p.read_bytes() for p in foreign.iterdir()}
    assert after.keys() == before.keys()  # nothing added (no half-written file)
    assert all(after[k] == before[k] for k in before if k.startswith("shard-") and "1" not in k)


@pytest.mark.slow
def test_demo_model_topk64_kl_gap_is_the_stated_one(tmp_path):
    """README, "Reference store": on the bundled demo model top-64 keeps 81% of the probability
    mass on average and its KL bound is 18–21% below the full KL (measured on the whole held-out
    text); exact statistics stay exact."""
    from qmetrics.evaluation.corpus import demo_text_path
    from qmetrics.evaluation.models import load_pretrained

    ref = load_pretrained(str(demo_text_path().parent), device="cpu", dtype="float32")
    cand = rtn_candidate(ref, "int4-g32")
    kw = dict(context_length=128, batch_size=8, max_tokens=2048)
    direct = QuantizationEvaluator(ref, [cand], progress=False, **kw).evaluate("demo")
    store = save_reference_store(ref, "demo", tmp_path / "ref", progress=False, **kw)
    via = QuantizationEvaluator(store, [cand], ref.tokenizer, progress=False).evaluate("demo")
    a, b = direct.comparisons[cand.name], via.comparisons[cand.name]
    gap = 1 - b.means["kl"].value / a.means["kl"].value
    assert 0.12 < gap < 0.27, gap
    assert b.top1_agreement.value == a.top1_agreement.value
    assert b.ppl_ratio.value == pytest.approx(a.ppl_ratio.value, rel=1e-7)
    assert b.rms_delta_p.value == pytest.approx(a.rms_delta_p.value, rel=1e-5)
