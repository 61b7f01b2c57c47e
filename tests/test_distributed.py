"""Distributed evaluation: ``torchrun --nproc_per_node 2 -m qmetrics compare`` (gloo, CPU)
equals a single-process run (counts exactly, statistics to float rounding); windows are
sharded disjointly with global window ids; figures merge by sum / max; per-rank checkpoints
refuse a resume with another number of processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from qmetrics.cli import main  # noqa: E402
from qmetrics.evaluation import compare as compare_module  # noqa: E402
from qmetrics.evaluation.compare import ModelFigures, QuantizationEvaluator  # noqa: E402
from qmetrics.evaluation.models import ModelEntry, rtn_candidate  # noqa: E402
from tests.tiny_models import synthetic_text, tiny_llama, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer()
    ref = ModelEntry("ref", tiny_llama(len(tok), layers=1, hidden=32), tok)
    return ref, rtn_candidate(ref, "int4-g32")


def test_windows_are_sharded_disjointly_with_global_ids(models, monkeypatch):
    ref, cand = models
    ev = QuantizationEvaluator(ref, [cand], context_length=16, batch_size=3, progress=False)
    every = ev.windows(200)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(compare_module, "rank_and_world", lambda r=rank: (r, 3))
        shards.append([w for batch in ev.batches(200) for w in batch])
        assert all(len(b) <= 3 for b in ev.batches(200))
    assert sorted((w for s in shards for w in s), key=lambda w: w.begin) == every
    assert shards[1] == every[1::3]

    seen: list[torch.Tensor] = []
    original = compare_module.QuantizationEvaluator._run_batch

    def spy(self, ids, windows, window_ids, *rest):
        seen.append(window_ids)
        return original(self, ids, windows, window_ids, *rest)

    monkeypatch.setattr(compare_module, "rank_and_world", lambda: (1, 3))
    monkeypatch.setattr(compare_module.QuantizationEvaluator, "_run_batch", spy)
    ids = torch.arange(200) % len(ref.tokenizer)
    # a world of 3 without a process group: no sync, the result holds rank 1's windows only
    res = ev.evaluate(ids).comparisons[cand.name]
    assert torch.cat(seen).tolist() == list(range(1, len(every), 3))  # global window ids
    assert res.sequences == len(every[1::3])


def test_figures_merge_by_sum_and_max():
    a = ModelFigures(2.0, 100, 50.0, 1.0, 20, "rss")
    b = ModelFigures(3.0, 300, 80.0, 0.5, 30, "rss")
    m = ModelFigures.combined([a, b])
    assert (m.forward_seconds, m.tokens, m.warmup_seconds, m.warmup_tokens) == (5.0, 400, 1.5, 50)
    assert m.peak_memory_mb == 80.0 and m.peak_memory_source == "rss"
    assert m.tokens_per_second == pytest.approx(350 / 3.5)  # the per-device rate
    assert ModelFigures.combined([ModelFigures(), ModelFigures()]).peak_memory_mb is None


def test_resume_with_another_process_count_is_refused(models, tmp_path):
    ref, cand = models
    rank_dir = tmp_path / "rank-0-of-2"
    rank_dir.mkdir()
    (rank_dir / "checkpoint.json").write_text("{}")
    ev = QuantizationEvaluator(ref, [cand], context_length=16, checkpoint_dir=tmp_path,
                               progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="run with 2 process"):
        ev.evaluate(torch.arange(64) % len(ref.tokenizer), resume=True)


def test_each_rank_resumes_its_own_windows(models, tmp_path, monkeypatch):
    ref, cand = models
    monkeypatch.setattr(compare_module, "rank_and_world", lambda: (1, 2))
    ids = torch.arange(400) % len(ref.tokenizer)
    kwargs = dict(context_length=16, batch_size=2, checkpoint_every=1, progress=False)
    full = QuantizationEvaluator(ref, [cand], **kwargs).evaluate(ids)

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    ev = QuantizationEvaluator(ref, [cand], checkpoint_dir=tmp_path, **kwargs)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(ids, on_batch=stop_after_two)
    assert [d.name for d in tmp_path.iterdir()] == ["rank-1-of-2"]
    seen: list[int] = []
    resumed = QuantizationEvaluator(ref, [cand], checkpoint_dir=tmp_path, **kwargs).evaluate(
        ids, resume=True, on_batch=lambda done, total: seen.append(done)
    )
    assert seen[0] == 3  # rank 1's first two batches came from its checkpoint
    assert resumed.comparisons[cand.name].to_dict() == full.comparisons[cand.name].to_dict()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, models) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-dist")
    ref, _ = models
    ref.model.save_pretrained(path)
    ref.tokenizer.save_pretrained(path)
    return path


def _close(a, b, path="") -> None:
    """Equal structures: ints and strings exactly, floats to float rounding."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.slow
def test_two_process_gloo_run_equals_one_process(model_dir, tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text(synthetic_text(1500))
    args = ["compare", "--reference", str(model_dir), "--quantize", "int4-g32", "--dataset",
            str(corpus), "--context-length", "32", "--batch-size", "2", "--max-tokens", "420",
            "--device", "cpu", "--no-progress", "--checkpoint-every", "1"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "one")]) == 0

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "qmetrics", *args, "--output", str(two)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reports: ") == 1  # rank 0 alone reports

    one = json.loads((tmp_path / "one" / "report.json").read_text())
    dist = json.loads((two / "report.json").read_text())
    assert dist["windows"] == one["windows"] == 14 and dist["tokens_total"] == 420
    counts = dist["comparisons"]["rtn-int4-g32"]["counts"]
    assert counts == one["comparisons"]["rtn-int4-g32"]["counts"]  # exactly
    assert counts["sequences"] == 14
    _close(dist["comparisons"], one["comparisons"])
    _close(dist["kl_quantiles"], one["kl_quantiles"])
    for name, model in one["models"].items():
        _close(dist["models"][name]["perplexity"], model["perplexity"])
        assert dist["models"][name]["figures"]["tokens"] == model["figures"]["tokens"]
    # each rank checkpointed its own 7 windows: 0, 2, … 12 in 4 batches of 2; 1, 3, … 11 in 3
    # and the 4-token window 13 alone
    for rank, batches in ((0, 4), (1, 4)):
        meta = json.loads(
            (two / "checkpoint" / f"rank-{rank}-of-2" / "checkpoint.json").read_text()
        )
        assert meta["batches_done"] == batches


@pytest.mark.slow
def test_two_process_reference_save_equals_one_process(model_dir, tmp_path):
    """``torchrun -m qmetrics reference save``: each rank writes its own shards, rank 0 the
    manifest; the store is byte-identical to a single-process save."""
    corpus = tmp_path / "text.txt"
    corpus.write_text(synthetic_text(1500))
    args = ["reference", "save", "--reference", str(model_dir), "--dataset", str(corpus),
            "--context-length", "32", "--batch-size", "2", "--max-tokens", "420",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "qmetrics", *args, "--output", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reference store: ") == 1  # rank 0 alone prints
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert sum(name.startswith("shard-") for name in one) >= 4  # both ranks wrote shards
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
