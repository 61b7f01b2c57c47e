"""Layer analysis on tiny Llama models: streamed per-layer error against a float64 reference
from stored activations, identical candidates, input-matched (local) error, name matching,
bounded activation memory, the sensitivity ablation, reports and the ``layers`` command."""

from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from qmetrics.evaluation.layers import (  # noqa: E402
    ablation_units,
    analyze_layers,
    match_modules,
    run_ablation,
    select_modules,
    token_batches,
)
from qmetrics.evaluation.rtn_quantize import quantize_model  # noqa: E402
from tests.conftest import HAS_TRITON, TEST_DEVICE  # noqa: E402
from tests.float64_reference import reference_layer_errors  # noqa: E402
from tests.tiny_models import synthetic_text, tiny_llama, tiny_tokenizer  # noqa: E402

LAYERS, HIDDEN = 3, 32
BLOCKS = [f"model.layers.{i}" for i in range(LAYERS)]


@pytest.fixture(scope="module")
def ref() -> nn.Module:
    tok = tiny_tokenizer()
    return tiny_llama(len(tok), layers=LAYERS, hidden=HIDDEN).to(TEST_DEVICE)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    tok = tiny_tokenizer()
    return torch.tensor(tok(synthetic_text(400))["input_ids"][:400])


def batches(ids: torch.Tensor, n: int) -> list[torch.Tensor]:
    return token_batches(ids, context_length=16, batch_size=2, max_tokens=32 * n)


def stored_activations(model: nn.Module, names, data) -> dict[str, list[torch.Tensor]]:
    """Every output of every named module over all batches (what the streaming avoids)."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: out[n].append((o[0] if isinstance(o, tuple) else o).detach())
        )
        for n in names
    ]
    with torch.no_grad():
        for x in data:
            model(input_ids=x.to(TEST_DEVICE), use_cache=False)
    for h in handles:
        h.remove()
    return out


NO_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.mark.parametrize(("backend", "modules"), [
    ("torch", ["blocks", "attention", "mlp"]),
    pytest.param("triton", ["blocks"], marks=NO_TRITON),  # the interpreter is slow: fewer rows
])  # fmt: skip
def test_streamed_errors_equal_float64_over_all_batches(ref, ids, backend, modules):
    cand = quantize_model(ref, "int4-g16")
    data = batches(ids, 3)
    assert len(data) == 3
    res = analyze_layers(ref, cand, data, modules=modules, input_matched=False, backend=backend)
    expected = [n for b in BLOCKS for n in (b, f"{b}.self_attn", f"{b}.mlp")]
    assert res.modules == (expected if len(modules) == 3 else BLOCKS)
    assert res.tokens == 3 * 2 * 16 and res.local is None and res.unmatched == []
    ref_acts = stored_activations(ref, res.modules, data)
    cand_acts = stored_activations(cand, res.modules, data)
    for name in res.modules:
        got = res.propagated[name]
        exp = reference_layer_errors(list(zip(ref_acts[name], cand_acts[name], strict=True)))
        assert got.tokens == exp["tokens"] == 96
        for key in ("mse", "rel_error", "snr_db", "max_abs_error"):
            assert getattr(got, key) == pytest.approx(exp[key], rel=1e-4), (name, key)
        assert got.cosine.value == pytest.approx(exp["cosine"], abs=1e-6)
        last = reference_layer_errors([(ref_acts[name][-1], cand_acts[name][-1])])
        assert got.mse != pytest.approx(last["mse"], rel=1e-6)  # not just the last batch


def test_identical_candidate_has_zero_error_and_infinite_snr(ref, ids):
    for cand in (ref, copy.deepcopy(ref)):  # the very same model object, and a copy
        res = analyze_layers(ref, cand, batches(ids, 2), modules=["blocks", "linear"])
        assert res.local is not None and res.missing_calls == {}
        for part in (res.propagated, res.local):
            for name, err in part.items():
                assert err.tokens == 64, name
                assert err.mse == 0 and err.rel_error == 0 and err.max_abs_error == 0, name
                assert err.snr_db == math.inf and err.cosine.value == 1.0, name
        layer = res.to_dict()["layers"][0]
        assert layer["propagated"]["snr_db"] == "inf" == layer["local"]["snr_db"]
        json.dumps(res.to_dict(), allow_nan=False)


def test_input_matched_separates_local_from_propagated_error(ref, ids):
    cand = quantize_model(ref, "int3-g16", include=r"layers\.1\.")  # only block 1 quantized
    res = analyze_layers(ref, cand, batches(ids, 2), modules="blocks")
    assert res.local is not None
    b0, b1, b2 = BLOCKS
    assert res.local[b0].mse == 0 and res.propagated[b0].mse == 0
    assert res.local[b1].mse > 0 and res.local[b1].mse == pytest.approx(res.propagated[b1].mse)
    assert res.local[b2].mse == 0  # block 2 itself is exact ...
    assert res.propagated[b2].mse > 0  # ... but carries block 1's error


def test_modules_matched_by_name_across_wrappers(ref, ids):
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.base = inner

        def forward(self, **kwargs):
            return self.base(**kwargs)

    names = ["model.layers.0.mlp", "model.layers.1.mlp", "model.extra"]
    matched, unmatched = match_modules(Wrapper(ref), names)
    assert matched == {n: f"base.{n}" for n in names[:2]} and unmatched == ["model.extra"]
    res = analyze_layers(ref, Wrapper(quantize_model(ref, "int4")), batches(ids, 1), modules="mlp")
    assert res.names["model.layers.2.mlp"] == "base.model.layers.2.mlp"
    assert all(e.mse > 0 for e in res.propagated.values())
    with pytest.raises(ValueError, match="no module selected"):
        select_modules(ref, "nothing_here")
    assert len(select_modules(ref, "linear")) == 7 * LAYERS  # lm_head is left out


def test_memory_bounded_by_one_batch_per_layer(ref, ids):
    cand = quantize_model(ref, "int4")
    one_batch = 2 * 16 * HIDDEN * 4  # [B, T, H] fp32
    peaks = [analyze_layers(ref, cand, batches(ids, n), modules="blocks").peak_activation_bytes
             for n in (1, 4)]  # fmt: skip
    assert peaks == [LAYERS * one_batch] * 2  # the same for 1 and 4 batches


def test_ablation_ranks_the_coarsely_quantized_layer_first(ref, ids):
    cand = quantize_model(ref, "int8", include=r"layers\.[02]\.")
    quantize_model(cand, "int2", include=r"layers\.1\.", inplace=True)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    units = ablation_units(select_modules(ref, "blocks"))
    res = run_ablation(ref, batches(ids, 2), units, candidate=cand)
    assert [u.name for u in res.units][0] == "model.layers.1"
    assert res.units[0].kl.value > 10 * res.units[1].kl.value
    assert res.joint.kl.value > 0 and math.isfinite(res.additivity)
    assert res.tokens == 64 and res.to_dict()["units"][0]["rank"] == 1
    # built-in RTN by module type; the reference is restored afterwards
    types = ablation_units(select_modules(ref, "linear"), by="type")
    assert "model.layers.*.mlp.down_proj" in types and len(types) == 7
    rtn = run_ablation(ref, batches(ids, 1), types, spec="int3")
    assert len(rtn.units) == 7 and rtn.units[0].kl.value >= rtn.units[-1].kl.value
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())
    assert all(type(m).__name__ == "LlamaDecoderLayer" for m in ref.model.layers)


def test_layers_command_writes_reports(ref, tmp_path, capsys):
    from qmetrics.cli import UsageError
    from qmetrics.cli.layers import add_layers_parser, run_layers

    tok = tiny_tokenizer()
    model_dir = tmp_path / "tiny"
    ref.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = tmp_path / "text.txt"
    corpus.write_text(synthetic_text(600))
    parser = argparse.ArgumentParser()
    add_layers_parser(parser.add_subparsers(dest="command"))
    argv = ["layers", "--reference", str(model_dir), "--quantize", "int3-g16", "--dataset",
            str(corpus), "--context-length", "16", "--batch-size", "2", "--max-tokens", "64",
            "--ablate", "--ablate-tokens", "32", "--device", "cpu", "--no-progress",
            "--output", str(tmp_path / "out")]  # fmt: skip
    assert run_layers(parser.parse_args(argv)) == 0
    report = json.loads((tmp_path / "out" / "layers.json").read_text())
    assert [lay["name"] for lay in report["errors"]["layers"]] == BLOCKS
    assert len(report["ablation"]["units"]) == LAYERS
    assert (tmp_path / "out" / "layers.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "layer error" in printed and "sensitivity" in printed
    with pytest.raises(UsageError, match="--context-length"):
        run_layers(parser.parse_args([*argv[:7], "--context-length", "1"]))


def test_old_path_and_split_modules_hold_the_same_objects():
    import importlib

    import qmetrics
    from qmetrics.evaluation import ablation, corpus, layers, module_selection

    old = importlib.import_module("qmetrics.layer_analysis")  # the flat 0.1 path

    for name in ("run_ablation", "ablation_units", "AblationResult", "UnitResult", "JOINT"):
        assert getattr(old, name) is getattr(ablation, name)
    assert old.token_batches is corpus.token_batches
    assert old.select_modules is module_selection.select_modules
    assert old.match_modules is module_selection.match_modules
    assert qmetrics.AblationResult is ablation.AblationResult
    assert qmetrics.LayerAnalysis is layers.LayerAnalysis


def test_as_entry_and_module_device():
    from qmetrics.evaluation.models import ModelEntry, as_entry, module_device

    with pytest.raises(ValueError, match="reference must be a ModelEntry or a torch.nn.Module"):
        as_entry("gpt2", "reference")
    relu = nn.ReLU().train()
    entry = as_entry(relu, "act", tokenizer="tok")
    assert (entry.name, entry.model, entry.tokenizer) == ("act", relu, "tok")
    assert entry.origin == {"source": "object", "class": "ReLU"} and not relu.training
    given = ModelEntry("m", relu)
    assert as_entry(given, "ignored", tokenizer="tok") is given and given.tokenizer == "tok"
    meta = torch.device("meta")
    assert module_device(relu) == torch.device("cpu")
    assert module_device(relu, meta) == meta
    assert module_device(nn.Linear(2, 2, device=meta)) == meta
