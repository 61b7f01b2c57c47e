"""``qmetrics bench``: a tiny sweep through the command line, the JSON document, the numbers'
internal consistency, peak memory that sees a real allocation, and one-line exit-2 errors for
bad input (checked before anything is allocated)."""

from __future__ import annotations

import json

import pytest
import torch

import qmetrics.evaluation.bench as bench
from qmetrics.cli import main
from qmetrics.evaluation.bench import (
    BenchResult,
    BenchSettings,
    CaseSpec,
    case_bytes_needed,
    peak_extra_mib,
    time_calls,
)

TINY = ["--device", "cpu", "--tokens", "8", "--vocab", "64", "--dtype", "fp32", "--repeat", "2"]
#: Providers of each case of a sweep with baselines eager and seed.
EXPECTED = {
    "compare": ["copy", "qmetrics", "eager", "seed"],
    "stats": ["copy", "qmetrics", "eager", "seed"],
    "distill": ["copy", "qmetrics", "eager"],
    "distill_linear": ["qmetrics", "eager"],
}


def test_tiny_sweep_prints_every_column_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = [*TINY, "--labels", "--top-k", "3", "--baselines", "eager,seed", "--json", out]
    assert main(["bench", *map(str, args)]) == 0
    printed = capsys.readouterr().out
    for header in ("provider", "ms median (p20–p80)", "GB/s", "% copy", "× eager", "× seed",
                   "peak extra", "1st call s"):  # fmt: skip
        assert header in printed, header
    assert "× compile" not in printed and "CPU run" not in printed  # shapes were given

    report = json.loads(out.read_text())
    assert report["schema"] == "qmetrics.bench/1" and report["complete"] is True
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["versions"]["torch"] == torch.__version__ and report["date"]
    assert report["settings"] == {
        "tokens": [8], "vocabs": [64], "dtypes": ["fp32"], "ops": ["compare", "stats", "distill"],
        "baselines": ["eager", "seed"], "device": "cpu", "top_k": 3, "labels": True, "repeat": 2,
    }  # fmt: skip
    assert [c["op"] for c in report["cases"]] == list(EXPECTED)
    for case in report["cases"]:
        rows = {r["provider"]: r for r in case["rows"]}
        assert list(rows) == EXPECTED[case["op"]], case["op"]
        assert (case["tokens"], case["vocab"], case["dtype"]) == (8, 64, "fp32")
        planes = {"compare": 2, "stats": 2, "distill": 3}.get(case["op"])
        assert case["bytes_moved"] == (None if planes is None else planes * 8 * 64 * 4)
        for name, row in rows.items():
            assert row["error"] is None, row
            assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert row["first_call_s"] > 0 and row["peak_extra_mib"] is not None
            if planes is None:
                assert row["gb_per_s"] is None and row["pct_copy"] is None
            else:
                gbs = case["bytes_moved"] / (row["median_ms"] * 1e-3) / 1e9
                assert row["gb_per_s"] == pytest.approx(gbs)
                pct = 100 * rows["copy"]["median_ms"] / row["median_ms"]
                assert row["pct_copy"] == pytest.approx(pct)
            if name == "copy":
                assert row["speedup"] == {}
                continue
            expected = {b: rows[b]["median_ms"] / row["median_ms"] for b in ("eager", "seed")
                        if b in rows}  # fmt: skip
            assert row["speedup"] == pytest.approx(expected)
        assert rows["eager"]["speedup"]["eager"] == pytest.approx(1.0)


def test_cpu_defaults_are_announced_in_one_line(monkeypatch, capsys):
    seen = {}

    def fake_run(settings, progress=False, on_case=None):
        seen["settings"] = settings
        return BenchResult(settings, {"type": "cpu", "name": "x", "threads": 1}, {}, "now")

    monkeypatch.setattr(bench, "run_bench", fake_run)
    assert main(["bench", "--device", "cpu"]) == 0
    s = seen["settings"]
    assert (s.tokens, s.vocabs, s.dtypes) == ((160,), (32000,), ("fp32",))
    assert s.baselines == ("eager", "seed")
    assert (s.ops, s.repeat, s.top_k) == (("compare", "stats", "distill"), 10, 5)
    notes = [line for line in capsys.readouterr().out.splitlines() if "CPU run" in line]
    assert len(notes) == 1 and "N=160, V=32000, fp32" in notes[0], notes


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ops", "compare,softmax"], "unknown op 'softmax'"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--baselines", "eager,numpy"], "unknown baseline 'numpy'"),
        (["--tokens", "many"], "--tokens takes comma-separated integers"),
        (["--tokens", "0"], "--tokens must be >= 1"),
        (["--repeat", "1"], "--repeat must be >= 2"),
        (["--top-k", "100", "--vocab", "64"], "--top-k must be in [1, V=64]"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--tokens", "1000000", "--vocab", "1000000"], "needs about"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, monkeypatch, capsys):
    def no_allocation(*a, **k):
        raise AssertionError("inputs were built before the input was checked")

    monkeypatch.setattr(bench, "make_providers", no_allocation)
    argv = ["bench", "--device", "cpu", "--tokens", "8", "--vocab", "64", "--repeat", "2"]
    assert main([*argv, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qmetrics: error: "), err
    assert message in err[0], err


def test_a_shape_beyond_free_memory_is_refused_before_allocating(monkeypatch, capsys):
    monkeypatch.setattr(bench, "available_bytes", lambda device: 1 << 20)  # 1 MiB free
    monkeypatch.setattr(bench, "make_providers", lambda *a, **k: pytest.fail("allocated"))
    assert main(["bench", *TINY, "--vocab", "4096", "--ops", "stats"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "stats N=8 V=4096 fp32 needs about" in err and "cpu has 0.0 GiB free" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cuda_without_a_device_is_bad_input(capsys):
    assert main(["bench", "--device", "cuda", "--tokens", "8", "--vocab", "64"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_memory_estimate_covers_inputs_copy_and_eager_temporaries():
    spec = CaseSpec("compare", 256, 32000, "bf16")
    plane = 256 * 32000
    need = case_bytes_needed(spec, ("eager",), "cpu")
    assert need >= 2 * plane * 2 + 2 * plane * 2 + 8 * plane * 4  # inputs, copy, fp32 planes
    assert case_bytes_needed(spec, (), "cpu") < need  # qmetrics alone holds chunks only


def test_peak_extra_memory_sees_a_real_allocation():
    mib = peak_extra_mib(lambda: torch.ones(1024, 32768), "cpu")  # 128 MiB
    assert 120 < mib < 200, mib
    assert peak_extra_mib(lambda: None, "cpu") < 8


def test_timing_is_interleaved_and_summarised():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    timed = time_calls(calls, "cpu", repeat=4)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]  # rotated every round
    for t in timed.values():
        assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms


def test_settings_check_accepts_long_dtype_names_only_through_parse_dtype():
    assert bench.parse_dtype("bfloat16") == "bf16" and bench.parse_dtype("torch.float32") == "fp32"
    with pytest.raises(ValueError, match="short name"):
        BenchSettings(tokens=(8,), vocabs=(64,), dtypes=("bfloat16",)).check()


@pytest.mark.slow
def test_compile_baseline_reports_its_compile_time_apart(tmp_path):
    out = tmp_path / "b.json"
    args = [*TINY, "--ops", "compare", "--baselines", "eager,compile", "--json", out]
    assert main(["bench", *map(str, args)]) == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["cases"][0]["rows"]}
    assert rows["compile"]["error"] is None
    # the first call compiles: far longer than a timed call
    assert rows["compile"]["first_call_s"] > 10 * rows["compile"]["median_ms"] / 1e3
    assert set(rows["qmetrics"]["speedup"]) == {"eager", "compile"}
