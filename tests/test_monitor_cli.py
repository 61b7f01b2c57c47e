"""``qmetrics monitor fit`` / ``check`` on the bundled demo model: the acceptance of issue 13.

The held-out text is split verse by verse (even lines / odd lines: the same books in both
halves). A profile fitted on one half raises no alarm on the other; ``rtn-int3`` checked on the
profile's own half (paired by request) and a model with one poisoned layer (layer 1's MLP
output negated) on the other half raise alarms naming entropy among others; bad input exits 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qmetrics.cli import main
from qmetrics.evaluation.corpus import demo_text_path

pytest.importorskip("transformers")
DEMO = str(Path(__file__).resolve().parents[1] / "qmetrics" / "demo_model")
RUN = ["--context-length", "128", "--batch-size", "8", "--max-tokens", "4096", "--device", "cpu",
       "--dtype", "float32"]  # fmt: skip


@pytest.fixture(scope="module")
def halves(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(half A, half B, profile fitted on A)."""
    root = tmp_path_factory.mktemp("monitor")
    lines = [line for line in demo_text_path().read_text().splitlines() if line.strip()]
    a, b = root / "a.txt", root / "b.txt"
    a.write_text("\n".join(lines[0::2]) + "\n")
    b.write_text("\n".join(lines[1::2]) + "\n")
    profile = root / "profile.json"
    assert main(["monitor", "fit", "--reference", DEMO, "--dataset", str(a), "--output",
                 str(profile), *RUN]) == 0  # fmt: skip
    return a, b, profile


def _check(profile: Path, dataset: Path, *extra: str) -> int:
    return main(["monitor", "check", "--profile", str(profile), "--dataset", str(dataset), *RUN,
                 *extra])  # fmt: skip


@pytest.mark.slow
def test_other_half_raises_no_alarm(halves, tmp_path, capsys) -> None:
    a, b, profile = halves
    assert _check(profile, b, "--candidate", DEMO, "--output", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "ALARM" not in out
    records = [json.loads(x) for x in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert records[0]["type"] == "snapshot" and records[0]["alarms"] == 0


@pytest.mark.slow
def test_rtn_int3_raises_alarms(halves, capsys) -> None:
    a, b, profile = halves
    assert _check(profile, a, "--candidate", DEMO, "--quantize", "int3") == 1
    out = capsys.readouterr().out
    assert "ALARM rtn-int3: paired_shift_entropy" in out
    assert "paired_shift_max_prob" in out


@pytest.mark.slow
def test_poisoned_layer_raises_alarms(halves, tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b, profile = halves
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.neg_()
    poisoned = tmp_path / "poisoned"
    model.save_pretrained(poisoned)
    AutoTokenizer.from_pretrained(DEMO).save_pretrained(poisoned)
    assert _check(profile, b, "--candidate", str(poisoned)) == 1
    out = capsys.readouterr().out
    for name in ("mean_shift_entropy", "ks_entropy", "mean_shift_max_prob"):
        assert f"ALARM poisoned: {name}" in out, out


@pytest.mark.slow
def test_bad_input_exits_2(halves, tmp_path, capsys) -> None:
    a, b, profile = halves
    other = tmp_path / "other.json"
    data = json.loads(profile.read_text())
    other.write_text(json.dumps(data | {"vocab_size": 32000}))
    assert _check(other, b, "--candidate", DEMO) == 2
    assert "vocab mismatch" in capsys.readouterr().err
    other.write_text(json.dumps(data | {"tokenizer": "sha256:0000000000000000"}))
    assert _check(other, b, "--candidate", DEMO) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert _check(profile, empty, "--candidate", DEMO) == 2
    assert "empty" in capsys.readouterr().err
    assert _check(tmp_path / "missing.json", b, "--candidate", DEMO) == 2
    assert "profile not found" in capsys.readouterr().err
    # a candidate whose logits are NaN: counted, reported, exit 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    ids = tokenizer(b.read_text())["input_ids"]
    late = next(t for t in ids[400:512] if t not in ids[:400])  # first seen in the last window
    with torch.no_grad():
        model.model.embed_tokens.weight[late].fill_(float("nan"))
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    tokenizer.save_pretrained(broken)
    code = _check(profile, b, "--candidate", str(broken), "--max-tokens", "512", "--output",
                  str(tmp_path / "out"))  # fmt: skip
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1, captured.err
    assert "non-finite outputs: broken produced" in err[0] and "of 512 tokens" in err[0]
    assert "ALARM broken: nonfinite_frac" in captured.out  # reported before the error
    snapshot = json.loads((tmp_path / "out" / "snapshot.json").read_text())
    assert 0 < snapshot["nonfinite_total"] < 512  # the window holding that token
    # an all-NaN candidate: nothing left to check
    with torch.no_grad():
        model.lm_head.weight[7].fill_(float("nan"))
    model.save_pretrained(broken)
    assert _check(profile, b, "--candidate", str(broken), "--max-tokens", "256") == 2
    assert "empty window: 256 tokens observed, 256 of them non-finite" in capsys.readouterr().err
