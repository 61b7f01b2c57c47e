"""The embedded offline demo: bundled model vs its int8 / int4 / int3 RTN versions."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("transformers")

from qmetrics.cli import main  # noqa: E402
from qmetrics.evaluation.corpus import demo_text_path  # noqa: E402


def test_demo_model_is_small_and_shipped():
    folder = demo_text_path().parent
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total <= 10 * 2**20
    for name in ("config.json", "model.safetensors", "tokenizer.json", "heldout.txt"):
        assert (folder / name).is_file()


def test_demo_runs_offline_and_orders_the_candidates(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(["demo", "--output", str(tmp_path), "--no-progress"]) == 0
    assert time.perf_counter() - start < 60
    report = json.loads((tmp_path / "report.json").read_text())
    kl = {name: c["means"]["kl"]["value"] for name, c in report["comparisons"].items()}
    ratio = {name: c["perplexity"]["ppl_ratio"]["value"]
             for name, c in report["comparisons"].items()}  # fmt: skip
    assert kl["rtn-int8"] < kl["rtn-int4-g32"] < kl["rtn-int3-g32"]
    assert ratio["rtn-int8"] < ratio["rtn-int4-g32"] < ratio["rtn-int3-g32"]
    assert kl["rtn-int8"] < 1e-3
