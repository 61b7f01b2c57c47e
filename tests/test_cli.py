"""The ``qmetrics`` command line: end-to-end runs on a tiny local model, the regression gate,
resume after a kill, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from qmetrics.cli import main  # noqa: E402
from tests.tiny_models import save_tiny_model, tiny_llama, tiny_tokenizer, write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt", 3000)


def run(*args: str) -> int:
    return main([str(a) for a in args])


def base_args(model_dir, corpus, out):
    return ["compare", "--reference", model_dir, "--dataset", corpus, "--context-length", "32",
            "--batch-size", "4", "--max-tokens", "600", "--output", out, "--no-progress",
            "--device", "cpu"]  # fmt: skip


def test_compare_writes_reports_and_gate_passes(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = run(*base_args(model_dir, corpus, out), "--quantize", "int8", "--quantize", "int3-g32",
               "--fail-if", "kl_mean>1e-9 & top1<0.01, kl_mean>10")  # fmt: skip
    assert code == 0  # (A and B) or C with only A true: '&' is AND
    report = json.loads((out / "report.json").read_text())
    assert set(report["comparisons"]) == {"rtn-int8", "rtn-int3-g32"}
    kl8 = report["comparisons"]["rtn-int8"]["means"]["kl"]["value"]
    kl3 = report["comparisons"]["rtn-int3-g32"]["means"]["kl"]["value"]
    assert 0 < kl8 < kl3
    assert (out / "report.md").read_text().count("rtn-int8") >= 1
    assert (out / "kl_cdf.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "rtn-int3-g32" in printed


def test_gate_failure_exits_1_naming_each_threshold(model_dir, corpus, tmp_path, capsys):
    code = run(*base_args(model_dir, corpus, tmp_path / "run"), "--quantize", "int3-g32",
               "--fail-if", "kl_mean>1e-9,top1>=0; kl_mean>10 and top1>=0")  # fmt: skip
    assert code == 1
    printed = capsys.readouterr().out
    assert "FAIL rtn-int3-g32: kl_mean = " in printed and "FAIL rtn-int3-g32: top1 = " in printed
    assert "> 10" not in printed  # the third rule holds only in part


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reference", "/nonexistent/model", "--quantize", "int8"], "does not exist"),
        (["--dataset", "/nonexistent/corpus.txt"], "not found"),
        (["--fail-if", "kl_mean>>0.1"], "fail-if"),
        (["--fail-if", "nosuchmetric>1"], "unknown metric"),
        (["--quantize", "int9"], "int9"),
        (["--context-length", "1"], "context-length"),
    ],
)
def test_bad_input_is_one_line_exit_2(model_dir, corpus, tmp_path, capsys, extra, message):
    args = base_args(model_dir, corpus, tmp_path / "run") + ["--quantize", "int8"] + extra
    assert run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qmetrics: error:") and "\n" not in err
    assert message in err
    assert "Traceback" not in err


def test_empty_corpus_and_tokenizer_mismatch(model_dir, corpus, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    assert run(*base_args(model_dir, empty, tmp_path / "a"), "--quantize", "int8") == 2
    assert "empty" in capsys.readouterr().err

    other = tmp_path / "other-tok"
    tok = tiny_tokenizer(300)
    tiny_llama(len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    assert run(*base_args(model_dir, corpus, tmp_path / "b"), "--candidate", other) == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and "\n" not in err.strip()


def test_resume_after_kill_gives_the_same_report(model_dir, corpus, tmp_path):
    args = base_args(model_dir, corpus, tmp_path / "killed")
    args = [str(a) for a in args] + ["--quantize", "int4-g32", "--checkpoint-every", "1",
                                     "--max-tokens", "2000", "--batch-size", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "qmetrics.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    meta = tmp_path / "killed" / "checkpoint" / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if meta.exists() and json.loads(meta.read_text())["batches_done"] >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = json.loads(meta.read_text())["batches_done"]
    assert run(*args, "--resume") == 0
    resumed = json.loads((tmp_path / "killed" / "report.json").read_text())

    fresh_args = [a if a != str(tmp_path / "killed") else str(tmp_path / "fresh") for a in args]
    assert run(*fresh_args) == 0
    fresh = json.loads((tmp_path / "fresh" / "report.json").read_text())
    assert done_at_kill < resumed["windows"]
    assert resumed["comparisons"] == fresh["comparisons"]
    assert resumed["models"]["rtn-int4-g32"]["perplexity"] == \
        fresh["models"]["rtn-int4-g32"]["perplexity"]  # fmt: skip


def test_layers_command_bad_input_is_exit_2(model_dir, corpus, tmp_path, capsys):
    base = ["layers", "--reference", str(model_dir), "--dataset", str(corpus), "--output",
            str(tmp_path), "--no-progress", "--device", "cpu"]  # fmt: skip
    assert run(*base, "--quantize", "int9") == 2
    assert "int9" in capsys.readouterr().err
    assert run("layers", "--reference", "/nonexistent/model", "--quantize", "int8",
               "--dataset", str(corpus)) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


def test_one_loader_renames_clashing_candidates(monkeypatch):
    """compare, layers and tasks load through one function with one renaming rule."""
    import argparse

    from qmetrics.cli.common import load_model_pair, load_models
    from qmetrics.evaluation import models

    def fake_load(name, **kwargs):
        return models.ModelEntry(Path(name).name, None, None, {"kwargs": kwargs})

    monkeypatch.setattr(models, "load_pretrained", fake_load)
    monkeypatch.setattr(models, "rtn_candidate",
                        lambda ref, spec: models.ModelEntry(f"rtn-{spec}", None, None))  # fmt: skip
    args = argparse.Namespace(reference="/a/m", candidate="/b/m", device="cpu", dtype="auto",
                              trust_remote_code=False)  # fmt: skip
    ref, cands = load_models(args, ["/b/m", "/c/m", "/d/x"], ["int8", "int8"])
    assert ref.name == "m"
    assert [c.name for c in cands] == ["m-2", "m-3", "x", "rtn-int8", "rtn-int8-2"]
    assert cands[0].origin["kwargs"]["device"] == "cpu"
    assert [e.name for e in load_model_pair(args)] == ["m", "m-2"]
