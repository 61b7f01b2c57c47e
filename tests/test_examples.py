"""The scripts in ``examples/`` run (small settings), as users run them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_serve_monitor_fits_serves_scrapes_and_logs(tmp_path, capsys) -> None:
    """``examples/serve_monitor.py``: a profile from the demo model's generate() traffic, an
    RTN candidate served under a live monitor, a scrape, the JSON lines."""
    pytest.importorskip("transformers")
    pytest.importorskip("prometheus_client")
    example = _load("serve_monitor")
    code = example.main(["--requests", "16", "--new-tokens", "8", "--out", str(tmp_path)])
    assert code in (0, 1)
    out = capsys.readouterr().out
    assert "profile: " in out
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["meta"]["model"] == "demo_model" and profile["tokenizer"].startswith("sha256:")
    records = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    tokens = records[0]["tokens_total"]  # 16 rows of at most 8 tokens (rows may end early)
    assert records[0]["type"] == "snapshot" and 0 < tokens <= 128
    assert f"qmetrics_monitor_tokens_total {float(tokens)}" in out
    assert len(records) == 1 + records[0]["alarms"] and code == int(records[0]["alarms"] > 0)
