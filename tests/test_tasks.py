"""Downstream tasks through lm-evaluation-harness on tiny Llama models and the offline tasks:
scores equal a direct lm-eval call, McNemar equals scipy's binomial test on the discordant
counts, an identical candidate gives delta 0 / agreement 1 / p = 1, lm-eval's rolling
log-likelihood equals qmetrics' perplexity under matching windows (one BOS), the gate, the
reports and the ``tasks`` command."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math

import pytest
from scipy import stats

from qmetrics.evaluation.models import ModelEntry, clone_entry
from qmetrics.evaluation.tasks import offline_task_dir
from qmetrics.evaluation.tasks.comparison import compare_runs, mcnemar_exact
from qmetrics.evaluation.tasks.runner import TaskSettings, TasksUnavailableError, require_lm_eval
from qmetrics.reports.gate import check_task_gate, parse_task_gate

HAS_LM_EVAL = all(importlib.util.find_spec(m) for m in ("lm_eval", "accelerate", "transformers"))
needs_lm_eval = pytest.mark.skipif(
    not HAS_LM_EVAL, reason="lm-evaluation-harness not installed (pip install 'qmetrics[tasks]')"
)
TASKS = ["qmetrics_mc", "qmetrics_rolling"]
SETTINGS = TaskSettings(tasks=TASKS, limit=16, batch_size=8, seed=1234)


@pytest.fixture(scope="module")
def tok():
    from tests.tiny_models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def reference(tok) -> ModelEntry:
    from tests.tiny_models import tiny_llama

    return ModelEntry("ref", tiny_llama(len(tok)), tok)


@pytest.fixture(scope="module")
def runs(reference, tok):
    """lm-eval runs of the reference, a different model and an identical copy."""
    from qmetrics.evaluation.tasks.runner import evaluate_tasks
    from tests.tiny_models import tiny_llama

    other = ModelEntry("other", tiny_llama(len(tok), seed=1), None)
    same = clone_entry(reference, "same")
    return {e.name: evaluate_tasks(e, SETTINGS, tok) for e in (reference, other, same)}


def _direct(model, tok, tasks, limit, **hflm):
    """lm-eval called directly, the way its documentation shows for a loaded model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, **hflm)
    manager = TaskManager(include_path=str(offline_task_dir()), include_defaults=False)
    return simple_evaluate(lm, tasks=tasks, limit=limit, task_manager=manager, random_seed=1234,
                           numpy_random_seed=1234, torch_random_seed=1234,
                           fewshot_random_seed=1234)  # fmt: skip


def _bos_tokenizer(tok):
    """The tiny tokenizer, but adding a BOS by default like Llama's."""
    from tokenizers.processors import TemplateProcessing

    out = copy.deepcopy(tok)
    out._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert out("a b")["input_ids"][0] == tok.bos_token_id
    return out


# --- without lm-eval ------------------------------------------------------------------------------


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    from qmetrics import task_runner
    from qmetrics.cli import UsageError
    from qmetrics.cli.tasks import add_tasks_parser, run_tasks

    real = importlib.util.find_spec
    monkeypatch.setattr(task_runner.importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))  # fmt: skip
    with pytest.raises(TasksUnavailableError, match=r"pip install 'qmetrics\[tasks\]'"):
        require_lm_eval()
    parser = argparse.ArgumentParser()
    add_tasks_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tasks", "--reference", "x", "--quantize", "int4", "--tasks", "a"])
    with pytest.raises(UsageError, match=r"qmetrics\[tasks\]"):
        run_tasks(args)


@pytest.mark.parametrize("b, c", [(0, 0), (3, 0), (2, 7), (10, 10), (1, 12)])
def test_mcnemar_exact_is_the_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_offline_tasks_are_shipped():
    names = {p.name for p in offline_task_dir().iterdir()}
    assert {"qmetrics_mc.yaml", "qmetrics_rolling.yaml", "local_json.py", "README.md"} <= names


def _report(*metrics: tuple[str, float, float | None], agreement: float = 0.9) -> dict:
    """A task report with one task and a row per (metric, drop, p)."""
    rows = [{"metric": name, "drop": drop, "delta": -drop, "won": 1, "lost": 3,
             "test": None if p is None else {"method": "mcnemar_exact", "p_value": p}}
            for name, drop, p in metrics]  # fmt: skip
    return {"comparisons": [{"task": "t", "filter": "none", "agreement": agreement,
                             "metrics": rows}]}  # fmt: skip


def test_task_gate():
    rules = parse_task_gate("acc_drop>0.02 & p<0.05; agreement<0.5")
    assert [str(c) for c in rules[0]] == ["acc_drop > 0.02", "p < 0.05"]
    assert check_task_gate(rules, _report(("acc", 0.03, 0.01))) == [
        "t acc: acc_drop = 0.03 > 0.02 and p = 0.01 < 0.05"
    ]
    assert check_task_gate(rules, _report(("acc", 0.03, 0.2))) == []  # not significant
    assert check_task_gate(rules, _report(("acc", 0.01, 0.01))) == []  # too small
    other_metric = _report(("acc", 0.0, 1.0), ("acc_norm", 0.5, 0.001))
    assert check_task_gate(rules, other_metric) == []
    assert check_task_gate(parse_task_gate("drop>0.1"), other_metric) == [
        "t acc_norm: drop = 0.5 > 0.1"
    ]
    assert check_task_gate(rules, _report(("acc", 0.0, 1.0), agreement=0.4)) == [
        "t acc: agreement = 0.4 < 0.5"
    ]
    assert "p not available" in check_task_gate(rules, _report(("acc", 0.03, None)))[0]
    assert check_task_gate(parse_task_gate("acc_norm_drop>0"), _report(("acc", 0.1, 0.5))) == [
        "no task results for metric 'acc_norm' (gate: acc_norm_drop > 0)"
    ]
    for bad in ("", "acc_drop>", "acc_fall>1", "acc_drop>x", "acc_drop>1&&p<1",
                "acc_drop>1&word_perplexity_drop>1", "acc_drop=1", "acc_drop>inf",
                "acc_drop>1,p<1"):  # fmt: skip
        with pytest.raises(ValueError, match="--fail-if"):
            parse_task_gate(bad)


def test_old_style_tasks_gate_is_exit_2_and_one_line(tmp_path, capsys):
    """A gate of the old tasks grammar (',' = AND) is refused before anything is loaded."""
    from qmetrics.cli import main

    code = main(["tasks", "--reference", str(tmp_path / "no-model"), "--quantize", "int4",
                 "--tasks", "qmetrics_mc", "--fail-if", "acc_drop>0.02,p<0.05"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("qmetrics: error: --fail-if 'acc_drop>0.02,p<0.05' is ambiguous")
    assert "use '&' to require all clauses, ';' to fail on any" in err


def _full_report(p_value: float) -> dict:
    row = {"metric": "acc", "reference": 0.5, "candidate": 0.4, "delta": -0.1, "drop": 0.1,
           "won": 1, "lost": 9, "n_paired": 50, "significant_drop": True,
           "test": {"method": "mcnemar_exact", "p_value": p_value, "ci_low": -0.2,
                    "ci_high": -0.05}}  # fmt: skip
    return {"settings": {"tasks": ["t"], "num_fewshot": None, "limit": None, "seed": 1234,
                         "alpha": 0.05, "max_length": None},
            "reference": "ref", "candidate": "cand",
            "comparisons": [{"task": "t", "filter": "none", "agreement": 0.8,
                             "metrics": [row]}]}  # fmt: skip


def test_tasks_markdown_shows_p_and_settings_agree():
    from qmetrics.reports.tasks import markdown_report

    md = markdown_report(_full_report(3.2e-6))
    assert "<1e-4" not in md and "3.2e-06 (McNemar)" in md and "(p = 3.2e-06)" in md
    assert "few-shot task default, limit none, seed 1234" in md
    assert "| num_fewshot | task default |" in md and "| limit | none |" in md
    assert "| max_length | from the model config |" in md and "n/a" not in md


def test_quiet_progress_disables_every_tqdm_bar(capsys):
    from tqdm import tqdm

    from qmetrics.evaluation.tasks.runner import quiet_progress

    with quiet_progress():
        bar = tqdm(range(3), disable=False, desc="lm-eval style")
        assert bar.disable
        list(bar)
    assert "lm-eval style" not in capsys.readouterr().err
    with quiet_progress(False):
        assert not tqdm(range(3), disable=False).disable
    assert not tqdm(range(3), disable=False).disable  # restored


# --- with lm-eval ---------------------------------------------------------------------------------


@needs_lm_eval
def test_unknown_task_names_the_task(monkeypatch):
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    from qmetrics.evaluation.tasks.runner import check_task_names, lm_eval_may_know, task_manager

    manager = TaskManager(include_path=str(offline_task_dir()), include_defaults=False)
    check_task_names(manager, ["qmetrics_mc"])
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        check_task_names(manager, ["qmetrics_mc", "nope"])
    # an unknown name fails without indexing lm-eval's own tasks (seconds)
    assert lm_eval_may_know("hellaswag") and not lm_eval_may_know("qmetrics_no_such_task")
    built = []

    class Recording(TaskManager):
        def __init__(self, *args, include_defaults=True, **kwargs):
            built.append(include_defaults)
            super().__init__(*args, include_defaults=include_defaults, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Recording)
    with pytest.raises(ValueError, match="unknown task 'qmetrics_no_such_task'"):
        task_manager(TaskSettings(tasks=["qmetrics_mc", "qmetrics_no_such_task"]))
    assert built == [False]
    assert task_manager(TaskSettings(tasks=["qmetrics_mc"])).all_tasks and built == [False] * 2


@needs_lm_eval
def test_scores_equal_direct_lm_eval(runs, reference, tok):
    direct = _direct(reference.model, tok, ["qmetrics_mc"], limit=16)
    rolling = _direct(reference.model, tok, ["qmetrics_rolling"], limit=16, add_bos_token=False)
    ours = runs["ref"]
    for task, out in (("qmetrics_mc", direct), ("qmetrics_rolling", rolling)):
        for key, value in out["results"][task].items():
            if "," in key:
                assert ours.results[task][key] == value, (task, key)
        mine = {s["doc_id"]: s for s in ours.samples[task]}
        for s in out["samples"][task]:
            assert mine[s["doc_id"]]["filtered_resps"] == s["filtered_resps"]
    assert ours.output_types == {"qmetrics_mc": "multiple_choice",
                                 "qmetrics_rolling": "loglikelihood_rolling"}  # fmt: skip
    assert ours.n_samples["qmetrics_mc"]["effective"] == 16


@needs_lm_eval
def test_mcnemar_p_equals_binomtest_on_discordant_counts(runs):
    cmp = {c.task: c for c in compare_runs(runs["ref"], runs["other"])}
    mc = cmp["qmetrics_mc"]
    for m in mc.metrics:
        ref = [it["reference"][m.metric] for it in mc.items]
        cand = [it["candidate"][m.metric] for it in mc.items]
        b = sum(r == 1 and c == 0 for r, c in zip(ref, cand, strict=True))
        c = sum(r == 0 and c == 1 for r, c in zip(ref, cand, strict=True))
        assert m.test is not None and m.test.method == "mcnemar_exact"
        expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
        assert m.test.p_value == expected
        assert (m.won, m.lost, m.tied) == (c, b, len(ref) - b - c)
        assert m.delta == pytest.approx((c - b) / len(ref), abs=1e-12)
        assert m.test.ci_low <= m.delta <= m.test.ci_high
    assert sum(m.won + m.lost for m in mc.metrics) > 0  # the two models do disagree
    answers = [(it["reference"]["answer"], it["candidate"]["answer"]) for it in mc.items]
    assert mc.agreement == sum(a == b for a, b in answers) / len(answers) < 1.0
    rolling = cmp["qmetrics_rolling"]
    assert rolling.agreement is None
    assert all(m.test.method == "paired_permutation" for m in rolling.metrics)


@needs_lm_eval
def test_identical_candidate(runs):
    for cmp in compare_runs(runs["ref"], runs["same"]):
        assert cmp.n_paired == cmp.n_reference == cmp.n_candidate > 0
        if cmp.output_type == "multiple_choice":
            assert cmp.agreement == 1.0
        for m in cmp.metrics:
            assert m.delta == 0.0 and m.drop == 0.0
            assert m.test.p_value == 1.0
            assert (m.won, m.lost) == (0, 0)
            assert (m.test.ci_low, m.test.ci_high) == (0.0, 0.0)
            assert not m.significant_drop


@needs_lm_eval
@pytest.mark.parametrize("max_length, docs", [(128, 3), (43, 1)])  # one window; 86 = 2·43 tokens
def test_rolling_loglikelihood_equals_qmetrics_perplexity(reference, tok, max_length, docs):
    """With a tokenizer that adds a BOS itself, the runner still scores ``<s> text`` once;
    lm-eval's window L equals qmetrics' context_length L+1, stride L (see the README)."""
    from qmetrics.evaluation.compare import QuantizationEvaluator
    from qmetrics.evaluation.tasks.runner import evaluate_tasks

    bos_tok = _bos_tokenizer(tok)
    settings = TaskSettings(tasks=["qmetrics_rolling"], limit=docs, batch_size=4,
                            max_length=max_length)  # fmt: skip
    run = evaluate_tasks(ModelEntry("ref", reference.model, bos_tok), settings)
    texts = json.loads((offline_task_dir() / "qmetrics_rolling.json").read_text())["test"]
    for sample in run.samples["qmetrics_rolling"]:
        text = texts[sample["doc_id"]]["text"]
        evaluator = QuantizationEvaluator(ModelEntry("ref", reference.model, bos_tok),
                                          context_length=max_length + 1, stride=max_length,
                                          progress=False)  # fmt: skip
        result = evaluator.evaluate([text])
        n_tokens = result.tokens_total - 1  # the BOS is context, not scored
        ll_qmetrics = -n_tokens * math.log(result.perplexity["ref"].value)
        assert sample["filtered_resps"][0] == pytest.approx(ll_qmetrics, rel=1e-5)
    # lm-eval's default encoding of the same text doubles the BOS (and scores it)
    doubled = _direct(reference.model, bos_tok, ["qmetrics_rolling"], limit=1,
                      max_length=max_length)  # fmt: skip
    first = run.samples["qmetrics_rolling"][0]["filtered_resps"]
    assert doubled["samples"]["qmetrics_rolling"][0]["filtered_resps"] != pytest.approx(first)


@needs_lm_eval
def test_tasks_command(tmp_path, reference, tok, capsys):
    from qmetrics.cli.common import UsageError
    from qmetrics.cli.tasks import add_tasks_parser, run_tasks

    model_dir = tmp_path / "tiny"
    reference.model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    parser = argparse.ArgumentParser()
    add_tasks_parser(parser.add_subparsers(dest="command"))

    def args(*extra: str) -> argparse.Namespace:
        return parser.parse_args(["tasks", "--reference", str(model_dir), "--quantize", "int4-g32",
                                  "--tasks", "qmetrics_mc,qmetrics_rolling", "--limit", "6",
                                  "--batch-size", "8", "--device", "cpu", "--resamples", "999",
                                  "--output", str(tmp_path / "out"), *extra])  # fmt: skip

    with pytest.raises(UsageError, match="--alpha"):
        run_tasks(args("--alpha", "2"))
    # every row breaks the first rule, none the second (its first clause never holds)
    assert run_tasks(args("--fail-if", "drop>-1000000000; acc_drop>1e9 & p<=1")) == 1
    out = capsys.readouterr().out
    assert "FAIL qmetrics_mc acc: drop" in out and "tasks.json" in out
    assert "acc_drop" not in out
    report = json.loads((tmp_path / "out" / "tasks.json").read_text())
    assert report["candidate"] == "rtn-int4-g32" and report["settings"]["limit"] == 6
    mc = next(c for c in report["comparisons"] if c["task"] == "qmetrics_mc")
    assert len(mc["items"]) == 6 and {"reference", "candidate", "doc_id"} <= set(mc["items"][0])
    md = (tmp_path / "out" / "tasks.md").read_text()
    assert "## Downstream tasks (lm-evaluation-harness)" in md and "| qmetrics_rolling |" in md


@needs_lm_eval
def test_group_pools_its_tasks(tmp_path, reference, tok):
    """A group (like mmlu) gets lm-eval's group score and a test on its tasks' items pooled."""
    from qmetrics.evaluation.tasks.runner import evaluate_tasks
    from tests.tiny_models import tiny_llama

    (tmp_path / "group.yaml").write_text(
        "group: qmetrics_group\ntask:\n  - qmetrics_mc\naggregate_metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n"
    )
    settings = TaskSettings(tasks=["qmetrics_group"], limit=16, batch_size=8,
                            include_paths=[str(tmp_path)])  # fmt: skip
    other = ModelEntry("other", tiny_llama(len(tok), seed=1), None)
    ref_run, cand_run = (evaluate_tasks(e, settings, tok) for e in (reference, other))
    assert ref_run.group_subtasks == {"qmetrics_group": ["qmetrics_mc"]}
    rows = {c.task: c for c in compare_runs(ref_run, cand_run)}
    group, leaf = rows["qmetrics_group"], rows["qmetrics_mc"]
    assert group.is_group and (group.n_paired, group.agreement) == (leaf.n_paired, leaf.agreement)
    (g,) = group.metrics
    (a,) = [m for m in leaf.metrics if m.metric == "acc"]
    assert g.reference == ref_run.results["qmetrics_group"]["acc,none"] == a.reference
    assert (g.won, g.lost, g.test.p_value, g.delta) == (a.won, a.lost, a.test.p_value, a.delta)
