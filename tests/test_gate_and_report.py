"""The --fail-if gate (qmetrics.reports.gate), the report writers (qmetrics.reports.compare) and
the shared formatting (qmetrics.reports.format)."""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import numpy as np
import pytest
import torch

from qmetrics import LogitStats
from qmetrics.evaluation.compare import EvaluationResult, ModelFigures
from qmetrics.reports.compare import (
    fmt_pct,
    fmt_small,
    markdown_sections,
    markdown_summary,
    render_terminal_table,
    render_text_table,
    write_reports,
)
from qmetrics.reports.format import fmt_p, table, text_table
from qmetrics.reports.gate import (
    METRICS,
    Clause,
    Rule,
    Threshold,
    check_gate,
    check_task_gate,
    metric_value,
    parse_gate,
    parse_task_gate,
)

REF = "tiny-ref"
CANDS = {"int8": 0.02, "rtn-int4": 0.6}  # name -> logit noise scale


def _stats(ref: torch.Tensor, quant: torch.Tensor, labels: torch.Tensor | None) -> LogitStats:
    st = LogitStats(top_k=5, backend="torch")
    st.update(ref, quant, labels)
    return st


def _quantiles(st: LogitStats) -> list[float]:
    kl = st.state_dict()["kl_values"].double().numpy()
    return np.quantile(kl, np.linspace(0.0, 1.0, 1001)).tolist()


def _build_report(with_labels: bool = True) -> dict[str, Any]:
    """A report shaped exactly as EvaluationResult.to_dict(), from random logits."""
    g = torch.Generator().manual_seed(0)
    n, vocab = 600, 64
    ref = torch.randn(n, vocab, generator=g) * 3
    labels = torch.multinomial(ref.softmax(-1), 1, generator=g).squeeze(-1)
    labels[:7] = -100  # a few ignored positions
    comparisons, quantiles, ppl, figures = {}, {}, {}, {}
    figures[REF] = ModelFigures(forward_seconds=2.0, tokens=n, peak_memory_mb=1536.0)
    for i, (name, scale) in enumerate(CANDS.items()):
        quant = ref + scale * torch.randn(n, vocab, generator=g)
        st = _stats(ref, quant, labels if with_labels else None)
        res = st.compute()
        comparisons[name] = res
        quantiles[name] = _quantiles(st)
        if with_labels:
            assert res.ppl_ref is not None and res.ppl_quant is not None
            ppl[REF], ppl[name] = res.ppl_ref, res.ppl_quant
        figures[name] = ModelFigures(forward_seconds=1.0 + i, tokens=n, peak_memory_mb=None)
    result = EvaluationResult(
        settings={"context_length": 128, "top_k": 5, "tokens": n, "reference": REF},
        reference=REF,
        tokens_total=n,
        windows=5,
        comparisons=comparisons,
        perplexity=ppl,
        figures=figures,
        origins={REF: {"source": "test"}},
        environment={"qmetrics": "0.1.0", "torch": torch.__version__, "device": "cpu"},
        kl_quantiles=quantiles,
    )
    return result.to_dict()


@pytest.fixture(scope="module")
def base_report() -> dict[str, Any]:
    return _build_report()


@pytest.fixture(scope="module")
def unlabeled_report() -> dict[str, Any]:
    return _build_report(with_labels=False)


@pytest.fixture
def report(base_report: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(base_report)


# --- parse_gate ---------------------------------------------------------------------------------


def test_parse_gate_basic_and_whitespace() -> None:
    got = parse_gate(" kl_mean > 0.05 ,top1<0.90,  PPL_RATIO>=1.05 ,kl_p999 <= 2e-1")
    assert got == [
        Rule((Threshold("kl_mean", ">", 0.05),)),
        Rule((Threshold("top1", "<", 0.90),)),
        Rule((Threshold("ppl_ratio", ">=", 1.05),)),
        Rule((Threshold("kl_p999", "<=", 0.2),)),
    ]
    assert str(got[0]) == "kl_mean > 0.05"
    with pytest.raises(AttributeError):
        got[0].clauses[0].value = 1.0  # type: ignore[misc]


def test_parse_gate_rules_and_clauses() -> None:
    """',' and ';' separate rules; '&' and 'and' join the clauses of one rule."""
    got = parse_gate("kl_mean>0.05 & top1<0.9; ppl_ratio>1.05, kl_max>3 AND top1<=0.5")
    assert got == [
        Rule((Clause("kl_mean", ">", 0.05), Clause("top1", "<", 0.9))),
        Rule((Clause("ppl_ratio", ">", 1.05),)),
        Rule((Clause("kl_max", ">", 3.0), Clause("top1", "<=", 0.5))),
    ]
    assert str(got[0]) == "kl_mean > 0.05 & top1 < 0.9"
    with pytest.raises(ValueError, match="clause 2 '': empty clause"):
        parse_gate("kl_mean>1 & ")


def test_every_metric_name_parses() -> None:
    for name in METRICS:
        assert parse_gate(f"{name}>1") == [Rule((Clause(name, ">", 1.0),))]
    for name in ("kl_p50", "kl_p90", "kl_p95", "kl_p99", "kl_p999", "nonfinite_frac", "ppl"):
        assert name in METRICS


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("kl_mean>0.05,", "clause 2 '': empty clause"),
        ("kl_mean>0.05,,top1<0.9", "clause 2 '': empty clause"),
        ("kl_men>0.05", "unknown metric 'kl_men' (did you mean 'kl_mean'?)"),
        ("top1<0.9, bogus>1", "clause 2 'bogus>1': unknown metric 'bogus'"),
        ("kl_mean 0.05", "missing operator"),
        ("kl_mean", "missing operator"),
        ("kl_mean=0.05", "unknown operator '='"),
        ("kl_mean==0.05", "unknown operator '=='"),
        ("kl_mean=>0.05", "unknown operator '=>'"),
        ("kl_mean!=0.05", "unknown operator '!='"),
        ("kl_mean>>0.05", "unknown operator '>>'"),
        ("kl_mean>", "missing value"),
        ("kl_mean>abc", "value 'abc' is not a number"),
        ("top1<90%", "value '90%' is not a number"),
        ("kl_mean>nan", "not a finite number"),
        ("0.05<kl_mean", "expected METRIC OP VALUE"),
    ],
)
def test_parse_gate_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_gate(text)
    message = str(info.value)
    assert fragment in message
    assert "known metrics: kl_mean, " in message and "nonfinite_frac" in message
    assert "\n" not in message  # the CLI prints the first line only
    if text.strip():
        assert "clause" in message


# --- check_gate ---------------------------------------------------------------------------------


def test_metric_values_map_into_the_report(report: dict[str, Any]) -> None:
    cmp = report["comparisons"]["rtn-int4"]
    expect = {
        "kl_mean": cmp["means"]["kl"]["value"],
        "kl_p99": cmp["kl_distribution"]["percentiles"]["99"],
        "kl_p999": cmp["kl_distribution"]["percentiles"]["99.9"],
        "kl_p50": cmp["kl_distribution"]["percentiles"]["50"],
        "kl_max": cmp["kl_distribution"]["max"],
        "reverse_kl_mean": cmp["means"]["reverse_kl"]["value"],
        "top1": cmp["agreement"]["top1"]["value"],
        "topk": cmp["agreement"]["topk"]["value"],
        "rms_dp": cmp["rms_delta_p"]["value"],
        "ppl_ratio": cmp["perplexity"]["ppl_ratio"]["value"],
        "ppl_delta_pct": 100 * (cmp["perplexity"]["ppl_ratio"]["value"] - 1),
        "ln_ppl_ratio": cmp["perplexity"]["ln_ppl_ratio"]["value"],
        "ppl": report["models"]["rtn-int4"]["perplexity"]["value"],
        "cosine_mean": cmp["means"]["cosine"]["value"],
        "mse_mean": cmp["means"]["mse"]["value"],
        "nonfinite": 0,
        "nonfinite_frac": 0.0,
    }
    for name, value in expect.items():
        assert metric_value(report, "rtn-int4", name) == pytest.approx(value), name
    cmp["counts"]["nonfinite"] = 10
    cmp["counts"]["scored"] = 90
    assert metric_value(report, "rtn-int4", "nonfinite_frac") == pytest.approx(0.1)


def test_passing_thresholds_give_no_violations(report: dict[str, Any]) -> None:
    assert check_gate([], report) == []
    gate = parse_gate("kl_mean>10,top1<0.01,ppl_ratio>100,nonfinite>0,kl_max>=1e6,rms_dp>0.99")
    assert check_gate(gate, report) == []


@pytest.mark.parametrize(
    ("op", "value", "broken"),
    [
        (">", 0.0712, False),
        (">=", 0.0712, True),
        ("<", 0.0712, False),
        ("<=", 0.0712, True),
        (">", 0.05, True),
        (">=", 0.08, False),
        ("<", 0.08, True),
        ("<=", 0.05, False),
    ],
)
def test_each_operator(report: dict[str, Any], op: str, value: float, broken: bool) -> None:
    report["comparisons"]["rtn-int4"]["means"]["kl"]["value"] = 0.0712
    report["comparisons"]["int8"]["means"]["kl"]["value"] = 0.5  # breaks > / >=
    msgs = [m for m in check_gate(parse_gate(f"kl_mean{op}{value}"), report) if "rtn" in m]
    assert msgs == ([f"rtn-int4: kl_mean = 0.0712 {op} {value:g}"] if broken else [])


def test_violations_named_per_candidate(report: dict[str, Any]) -> None:
    report["comparisons"]["rtn-int4"]["means"]["kl"]["value"] = 0.0712
    report["comparisons"]["rtn-int4"]["agreement"]["top1"]["value"] = 0.85
    report["comparisons"]["int8"]["means"]["kl"]["value"] = 0.001
    report["comparisons"]["int8"]["agreement"]["top1"]["value"] = 0.99
    report["comparisons"]["int8"]["perplexity"]["ppl_ratio"]["value"] = 1.06
    report["comparisons"]["rtn-int4"]["perplexity"]["ppl_ratio"]["value"] = 1.2
    got = check_gate(parse_gate("kl_mean>0.05,top1<0.90,ppl_ratio>1.05"), report)
    assert got == [
        "int8: ppl_ratio = 1.06 > 1.05",
        "rtn-int4: kl_mean = 0.0712 > 0.05",
        "rtn-int4: top1 = 0.85 < 0.9",
        "rtn-int4: ppl_ratio = 1.2 > 1.05",
    ]


def test_close_value_shown_with_enough_digits(report: dict[str, Any]) -> None:
    report["comparisons"]["int8"]["perplexity"]["ppl_ratio"]["value"] = 1.05004
    report["comparisons"]["rtn-int4"]["perplexity"]["ppl_ratio"]["value"] = 1.05
    got = check_gate(parse_gate("ppl_ratio>1.05"), report)
    assert got == ["int8: ppl_ratio = 1.05004 > 1.05"]


def test_infinite_value_breaks_gate(report: dict[str, Any]) -> None:
    report["comparisons"]["int8"]["perplexity"]["ppl_ratio"]["value"] = "inf"
    report["comparisons"]["rtn-int4"]["perplexity"]["ppl_ratio"]["value"] = 1.01
    assert check_gate(parse_gate("ppl_delta_pct>5"), report) == ["int8: ppl_delta_pct = inf > 5"]


def test_missing_metrics_are_violations(unlabeled_report: dict[str, Any]) -> None:
    unlabeled = unlabeled_report
    assert unlabeled["comparisons"]["int8"]["perplexity"] is None
    got = check_gate(parse_gate("ppl_ratio>1.05,rms_dp>0.5,ppl>100,kl_mean>100"), unlabeled)
    for cand in CANDS:
        assert f"{cand}: ppl_ratio not available (gate: ppl_ratio > 1.05)" in got
        assert f"{cand}: rms_dp not available (gate: rms_dp > 0.5)" in got
        assert f"{cand}: ppl not available (gate: ppl > 100)" in got
    assert len(got) == 3 * len(CANDS)  # kl_mean is there and passes


def test_nan_stderr_style_none_is_not_available(report: dict[str, Any]) -> None:
    report["comparisons"]["int8"]["means"]["kl"]["value"] = None  # NaN in to_dict()
    assert check_gate(parse_gate("kl_mean>1"), report) == [
        "int8: kl_mean not available (gate: kl_mean > 1)"
    ]


def test_no_candidates_is_a_violation(report: dict[str, Any]) -> None:
    report["comparisons"] = {}
    got = check_gate(parse_gate("kl_mean>1"), report)
    assert len(got) == 1 and "no candidate" in got[0]


def test_rule_breaks_only_when_all_its_clauses_hold(report: dict[str, Any]) -> None:
    report["comparisons"]["rtn-int4"]["means"]["kl"]["value"] = 0.0712
    report["comparisons"]["rtn-int4"]["agreement"]["top1"]["value"] = 0.85
    report["comparisons"]["int8"]["means"]["kl"]["value"] = 0.0712
    report["comparisons"]["int8"]["agreement"]["top1"]["value"] = 0.95
    got = check_gate(parse_gate("kl_mean>0.05 & top1<0.9"), report)
    assert got == ["rtn-int4: kl_mean = 0.0712 > 0.05 and top1 = 0.85 < 0.9"]


def _compare_report(a: bool, b: bool, c: bool) -> dict[str, Any]:
    """One candidate for which A = kl_mean>0.05, B = top1<0.9, C = ppl_ratio>1.05 hold as
    given."""
    cmp = {"means": {"kl": {"value": 0.1 if a else 0.01}},
           "agreement": {"top1": {"value": 0.8 if b else 0.95}},
           "perplexity": {"ppl_ratio": {"value": 1.1 if c else 1.01}}}  # fmt: skip
    return {"comparisons": {"cand": cmp}}


def _tasks_report(a: bool, b: bool, c: bool) -> dict[str, Any]:
    """One task row for which A = acc_drop>0.02, B = p<0.05, C = agreement<0.9 hold as
    given."""
    row = {"metric": "acc", "drop": 0.05 if a else 0.0,
           "test": {"method": "mcnemar_exact", "p_value": 0.01 if b else 0.5}}  # fmt: skip
    return {"comparisons": [{"task": "t", "filter": "none", "agreement": 0.8 if c else 0.95,
                             "metrics": [row]}]}  # fmt: skip


@pytest.mark.parametrize("a", [False, True])
@pytest.mark.parametrize("b", [False, True])
@pytest.mark.parametrize("c", [False, True])
@pytest.mark.parametrize("joiner, separator", [("&", ","), (" and ", ";"), ("&", ";")])
def test_same_gate_same_decision_in_compare_and_tasks(a, b, c, joiner, separator) -> None:
    """``A&B, C`` means (A and B) or C in both commands."""
    compare_gate = parse_gate(f"kl_mean>0.05{joiner}top1<0.9{separator} ppl_ratio>1.05")
    tasks_gate = parse_task_gate(f"acc_drop>0.02{joiner}p<0.05{separator} agreement<0.9")
    expected = (a and b) or c
    assert bool(check_gate(compare_gate, _compare_report(a, b, c))) == expected
    assert bool(check_task_gate(tasks_gate, _tasks_report(a, b, c))) == expected


@pytest.mark.parametrize(
    "text", ["acc_drop>0.02,p<0.05", "drop>0.1, agreement<0.5", "acc_drop>0.02,p<0.05; drop>1"]
)
def test_old_tasks_grammar_is_refused_as_ambiguous(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_task_gate(text)
    message = str(info.value)
    assert "ambiguous" in message and "'&'" in message and "';'" in message
    assert "\n" not in message
    parse_gate("kl_mean>1,top1<0.5")  # in compare a comma always meant OR


def test_tasks_gate_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown metric 'acc_dorp' .did you mean 'acc_drop'"):
        parse_task_gate("acc_dorp>1")
    with pytest.raises(ValueError, match="names several metrics"):
        parse_task_gate("acc_drop>1 & word_perplexity_drop>1")
    assert parse_task_gate("acc_drop>0.02;p<0.05") == [
        Rule((Clause("acc_drop", ">", 0.02),)),
        Rule((Clause("p", "<", 0.05),)),
    ]


# --- reports ------------------------------------------------------------------------------------


def test_write_reports(report: dict[str, Any], tmp_path) -> None:
    out = tmp_path / "nested" / "out"
    paths = write_reports(report, out)
    assert set(paths) == {"json", "markdown", "plot"}
    assert all(p.parent == out and p.exists() for p in paths.values())

    assert json.loads(paths["json"].read_text()) == report

    png = paths["plot"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    md = paths["markdown"].read_text(encoding="utf-8")
    assert md == markdown_summary(report, plot="kl_cdf.png")
    assert "![CDF of per-token KL](kl_cdf.png)" in md
    for name in [REF, *CANDS]:
        assert f"| {name} |" in md
    for name in CANDS:
        cmp = report["comparisons"][name]
        assert fmt_small(cmp["means"]["kl"]["value"]) in md
        assert fmt_small(cmp["kl_distribution"]["percentiles"]["99"]) in md
        assert fmt_small(cmp["kl_distribution"]["max"]) in md
        assert fmt_pct(cmp["agreement"]["top1"]["value"]) in md
        assert fmt_pct(cmp["agreement"]["topk"]["value"]) in md
        assert fmt_pct(cmp["rms_delta_p"]["value"]) in md
        ratio = cmp["perplexity"]["ppl_ratio"]["value"]
        assert fmt_pct(100 * (ratio - 1), signed=True, scale=1) in md
        assert f"{report['models'][name]['perplexity']['value']:,.3f}" in md
    for heading in ("## Models", "## Drift from the reference", "## Per-token KL percentiles",
                    "How to read this", "## Settings", "## Environment"):  # fmt: skip
        assert heading in md
    assert "top-5" in md and "1.50 GiB" in md and "| context_length | 128 |" in md
    assert not [line for line in md.splitlines() if line.startswith("|") and "nan" in line]


def test_markdown_sections_compose(report: dict[str, Any]) -> None:
    sections = markdown_sections(report)
    assert sections[0].startswith("# qmetrics report")
    assert all(s.strip() for s in sections)
    extended = "\n\n".join([*sections, "## Tasks\n\nnone"]) + "\n"
    assert extended.startswith(markdown_summary(report).rstrip("\n"))


def test_write_reports_json_is_strict(report: dict[str, Any], tmp_path) -> None:
    report["models"][REF]["figures"]["tokens_per_second"] = float("nan")
    report["models"]["int8"]["figures"]["peak_memory_mb"] = float("inf")
    report["kl_quantiles"]["int8"] = np.asarray(report["kl_quantiles"]["int8"])[:5].tolist()
    paths = write_reports(report, tmp_path)
    back = json.loads(paths["json"].read_text())
    assert back["models"][REF]["figures"]["tokens_per_second"] is None
    assert back["models"]["int8"]["figures"]["peak_memory_mb"] == "inf"


def test_plot_skipped_without_matplotlib(report: dict[str, Any], tmp_path, monkeypatch) -> None:
    (tmp_path / "kl_cdf.png").write_bytes(b"stale")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    paths = write_reports(report, tmp_path)
    assert "plot" not in paths and not (tmp_path / "kl_cdf.png").exists()
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "Plot skipped: matplotlib is not installed" in md


def test_plot_skipped_without_quantiles(report: dict[str, Any], tmp_path) -> None:
    del report["kl_quantiles"]
    paths = write_reports(report, tmp_path)
    assert "plot" not in paths
    assert "Plot skipped" in paths["markdown"].read_text(encoding="utf-8")


def test_reports_without_labels_or_candidates(
    base_report: dict[str, Any], unlabeled_report: dict[str, Any], tmp_path
) -> None:
    unlabeled = {**unlabeled_report, "kl_quantiles": {}}  # (plotting is tested elsewhere)
    md = write_reports(unlabeled, tmp_path / "a")["markdown"].read_text(encoding="utf-8")
    assert "n/a" in md and "int8" in md and "-0.00" not in md
    bare = copy.deepcopy(base_report)
    bare["comparisons"], bare["kl_quantiles"] = {}, {}
    md = write_reports(bare, tmp_path / "b")["markdown"].read_text(encoding="utf-8")
    assert "No candidates were compared." in md


# --- terminal table -----------------------------------------------------------------------------


def test_render_terminal_table(report: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_terminal_table(report))
    text = console.export_text()
    for header in ("PPL", "ΔPPL", "mean KL ± err", "KL p99", "top-1", "top-5", "RMS Δp",
                   "tokens/s", "memory"):  # fmt: skip
        assert header in text
    assert f"{REF} (ref)" in text and "1.50 GiB" in text and "300" in text  # 600 tok / 2 s
    for name in CANDS:
        cmp = report["comparisons"][name]
        row = next(line for line in text.splitlines() if f" {name} " in line)
        assert fmt_small(cmp["means"]["kl"]["value"]) in row
        assert fmt_pct(cmp["agreement"]["top1"]["value"]) in row
        ratio = cmp["perplexity"]["ppl_ratio"]["value"]
        assert fmt_pct(100 * (ratio - 1), signed=True, scale=1) in row
        assert "n/a" in row  # no peak memory on CPU


def test_render_terminal_table_without_rich(report: dict[str, Any], monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "rich.table", None)
    got = render_terminal_table(report)
    assert isinstance(got, str) and got == render_text_table(report)
    lines = got.splitlines()
    assert lines[0].startswith("qmetrics: candidates vs tiny-ref")
    assert lines[1].startswith("Model") and len(lines) == 1 + 2 + 1 + len(CANDS)
    assert all(name in got for name in CANDS)


# --- shared formatting ---------------------------------------------------------------------------


def test_text_table_aligns_and_rich_falls_back(monkeypatch) -> None:
    text = text_table("T", ["#", "name", "x"], [["1", "ab", "3.5"], ["10", "c", "12.25"]], {1})
    assert text.splitlines() == ["T", " #  name      x", "--  ----  -----",
                                 " 1  ab      3.5", "10  c     12.25"]  # fmt: skip
    monkeypatch.setitem(sys.modules, "rich.table", None)
    assert table("T", ["#", "name", "x"], [["1", "ab", "3.5"], ["10", "c", "12.25"]],
                 left={1}) == text  # fmt: skip


@pytest.mark.parametrize(
    ("p", "text"),
    [(None, "n/a"), (float("nan"), "n/a"), (0.0, "0"), (3.2e-6, "3.2e-06"), (9.99e-5, "1.0e-04"),
     (1e-4, "0.0001"), (0.03125, "0.0312"), (1.0, "1")],
)  # fmt: skip
def test_fmt_p_shows_small_p_values(p, text) -> None:
    assert fmt_p(p) == text
