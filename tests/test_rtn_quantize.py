"""Tests of the round-to-nearest weight quantizer, :mod:`qmetrics.evaluation.rtn_quantize`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qmetrics.evaluation.rtn_quantize import (
    REPORT_ATTR,
    QuantReport,
    QuantSpec,
    quantize_model,
    quantize_module,
    quantize_weight,
    rtn_quantize,
)

F64 = torch.float64


def t64(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# --- hand-computed examples (values chosen so every step is exact in binary) ---------------


def test_symmetric_int4_per_channel_by_hand() -> None:
    # Q = 7. Row 0: s = 7/7 = 1, w/s = [7, -3.5, 2.5, 0.4] -> round half even [7, -4, 2, 0].
    # Row 1: s = 14/7 = 2, w/s = [-7, 0.5, 1.5, 2.5] -> [-7, 0, 2, 2] -> times 2.
    w = t64([[7.0, -3.5, 2.5, 0.4], [-14.0, 1.0, 3.0, 5.0]])
    r = rtn_quantize(w, "int4")
    assert r.q.tolist() == [[7, -4, 2, 0], [-7, 0, 2, 2]]
    assert r.scale.tolist() == [[1.0], [2.0]]
    assert r.zero.tolist() == [[0], [0]]
    out = quantize_weight(w, "int4")
    assert out.dtype == F64
    torch.testing.assert_close(out, t64([[7, -4, 2, 0], [-14, 0, 4, 4]]), rtol=0, atol=0)


def test_symmetric_int3_grouped_by_hand() -> None:
    # Q = 3, groups of 2. Group [3, -1.5]: s = 1 -> [3, -2]. Group [0.75, 0.375]: s = 0.25
    # -> w/s = [3, 1.5] -> [3, 2] -> [0.75, 0.5].
    w = t64([[3.0, -1.5, 0.75, 0.375]])
    r = rtn_quantize(w, "int3-g2")
    assert r.scale.tolist() == [[1.0, 0.25]]
    assert r.q.tolist() == [[3, -2, 3, 2]]
    torch.testing.assert_close(quantize_weight(w, "int3-g2"), t64([[3, -2, 0.75, 0.5]]))


def test_asymmetric_int3_by_hand() -> None:
    # Q = 7. lo = -2, hi = 5, s = 7/7 = 1, z = round(2) = 2,
    # q = round(w) + 2 = [0, 1, 2 (round(0.5) = 0), 7]; w' = q - 2.
    w = t64([[-2.0, -1.0, 0.5, 5.0]])
    r = rtn_quantize(w, "int3-asym")
    assert r.scale.tolist() == [[1.0]]
    assert r.zero.tolist() == [[2]]
    assert r.q.tolist() == [[0, 1, 2, 7]]
    torch.testing.assert_close(quantize_weight(w, "int3-asym"), t64([[-2, -1, 0, 5]]))


def test_asymmetric_int2_half_even_zero_point_by_hand() -> None:
    # Q = 3. lo = -0.5, hi = 2.5, s = 1, z = round(0.5) = 0 (half to even),
    # q = clamp(round(w) + 0, 0, 3) = [0 (round(-0.5) = -0), 0, 1, 2 (round(2.5))].
    w = t64([[-0.5, 0.25, 1.0, 2.5]])
    r = rtn_quantize(w, "int2-asym")
    assert r.zero.tolist() == [[0]]
    assert r.q.tolist() == [[0, 0, 1, 2]]
    torch.testing.assert_close(quantize_weight(w, "int2-asym"), t64([[0, 0, 1, 2]]))


def test_asymmetric_range_includes_zero() -> None:
    # All positive: lo = min(1, 0) = 0, hi = 4, s = 4/3, z = 0,
    # q = round([0.75, 1.5, 2.25, 3]) = [1, 2, 2, 3].
    w = t64([[1.0, 2.0, 3.0, 4.0]])
    r = rtn_quantize(w, "int2-asym")
    assert r.zero.tolist() == [[0]]
    assert r.q.tolist() == [[1, 2, 2, 3]]
    torch.testing.assert_close(quantize_weight(w, "int2-asym"), t64([[4, 8, 8, 12]]) / 3)
    # All negative: lo = -4, hi = 0, z = 3.
    assert rtn_quantize(-w, "int2-asym").zero.tolist() == [[3]]


def test_ragged_last_group_by_hand() -> None:
    # in = 5, g = 2: groups [0:2], [2:4] and the ragged [4:5]. Symmetric int4 (Q = 7).
    w = t64([[7.0, 1.0, 0.5, -14.0, 0.25]])
    r = rtn_quantize(w, "int4-g2")
    assert r.group_size == 2
    assert r.scale.tolist() == [[1.0, 2.0, 0.25 / 7]]
    assert r.q.tolist() == [[7, 1, 0, -7, 7]]
    torch.testing.assert_close(quantize_weight(w, "int4-g2"), t64([[7, 1, 0, -14, 0.25]]))


@pytest.mark.parametrize("spec", ["int4-g16", "int3-g7-asym", "int8-g5"])
def test_ragged_groups_match_column_slices(spec: str) -> None:
    # Each group is quantized on its own: quantizing the slices separately gives the same result.
    g = QuantSpec.parse(spec).group_size
    assert g is not None
    w = torch.randn(6, 3 * g + 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = quantize_weight(w, spec)
    per_channel = str(QuantSpec(QuantSpec.parse(spec).bits, None, QuantSpec.parse(spec).symmetric))
    for start in range(0, w.shape[1], g):
        sl = slice(start, start + g)
        torch.testing.assert_close(out[:, sl], quantize_weight(w[:, sl], per_channel))
    assert rtn_quantize(w, spec).scale.shape == (6, 4)


def test_group_larger_than_input_is_per_channel() -> None:
    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(quantize_weight(w, "int4-g128"), quantize_weight(w, "int4"))
    assert rtn_quantize(w, "int4-g128").scale.shape == (4, 1)


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 6),
    n_in=st.integers(1, 40),
    group=st.one_of(st.none(), st.integers(1, 48)),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-6, 3),
)
def test_error_at_most_half_a_step(
    out: int,
    n_in: int,
    group: int | None,
    bits: int,
    symmetric: bool,
    dtype: torch.dtype,
    seed: int,
    log_scale: float,
) -> None:
    spec = QuantSpec(bits, group, symmetric)
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, n_in, generator=gen, dtype=F64) * 10.0**log_scale).to(dtype)
    r = rtn_quantize(w, spec)
    deq = quantize_weight(w, spec)
    assert deq.dtype == dtype and deq.shape == w.shape
    assert bool(torch.isfinite(deq).all())
    assert int(r.q.min()) >= spec.qmin and int(r.q.max()) <= spec.qmax
    s = r.scale[:, r.group_index()].to(F64)
    err = (w.to(F64) - deq.to(F64)).abs()
    rel = 1e-12 if dtype == F64 else 1e-6
    assert bool((err <= s / 2 * (1 + rel) + rel * w.to(F64).abs()).all())


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    group=st.one_of(st.none(), st.integers(1, 4096)),
    symmetric=st.booleans(),
)
def test_spec_str_parse_round_trip(bits: int, group: int | None, symmetric: bool) -> None:
    spec = QuantSpec(bits, group, symmetric)
    assert QuantSpec.parse(str(spec)) == spec
    assert str(QuantSpec.parse(str(spec))) == str(spec)


def test_more_bits_less_error() -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    for suffix in ("", "-g64", "-g64-asym"):
        errs = [float((quantize_weight(w, f"int{b}{suffix}") - w).pow(2).mean()) for b in (8, 4, 3)]
        assert errs[0] < errs[1] < errs[2], (suffix, errs)
    # Smaller groups fit tighter scales.
    assert float((quantize_weight(w, "int4-g32") - w).abs().mean()) < float(
        (quantize_weight(w, "int4") - w).abs().mean()
    )


def test_idempotent_symmetric() -> None:
    w = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))
    once = quantize_weight(w, "int4-g16")
    torch.testing.assert_close(quantize_weight(once, "int4-g16"), once)


# --- edge cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["int8", "int4-g2", "int2-asym", "int3-g3-asym"])
def test_all_zero_weights(spec: str) -> None:
    w = torch.zeros(3, 7)
    out = quantize_weight(w, spec)
    assert torch.equal(out, w)
    # A zero group next to a non-zero one.
    w2 = torch.zeros(2, 8)
    w2[1, :4] = torch.tensor([0.5, -1.0, 0.25, 2.0])
    out2 = quantize_weight(w2, spec)
    assert bool(torch.isfinite(out2).all())
    assert torch.equal(out2[0], w2[0]) and torch.equal(out2[1, 4:], w2[1, 4:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("spec", ["int8", "int4-g32-asym"])
def test_dtype_preserved(dtype: torch.dtype, spec: str) -> None:
    w = torch.randn(16, 80, generator=torch.Generator().manual_seed(4)).to(dtype)
    w_before = w.clone()
    out = quantize_weight(w, spec)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(w, w_before)  # input not modified
    if dtype != F64:  # float32 arithmetic, cast at the end (float64 stays in float64)
        ref = quantize_weight(w.float(), spec)
        torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)
    # Within half a step of the input, plus the final rounding to the dtype.
    r = rtn_quantize(w, spec)
    step = r.scale[:, r.group_index()].double()
    err = (out.double() - w.double()).abs()
    eps = torch.finfo(dtype).eps
    assert bool((err <= step / 2 * (1 + 1e-6) + eps * out.double().abs()).all())


def test_empty_weight() -> None:
    assert quantize_weight(torch.zeros(0, 5), "int4").shape == (0, 5)
    assert quantize_weight(torch.zeros(3, 0), "int4-g2").shape == (3, 0)


@pytest.mark.parametrize(
    ("w", "msg"),
    [
        (torch.zeros(4), "2-D"),
        (torch.zeros(2, 2, 2), "2-D"),
        (torch.zeros(2, 2, dtype=torch.int32), "floating-point"),
        (torch.tensor([[1.0, float("nan")]]), "NaN or inf"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or inf"),
    ],
)
def test_quantize_weight_rejects(w: torch.Tensor, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        quantize_weight(w, "int4")


# --- QuantSpec parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec", "canonical"),
    [
        ("int8", QuantSpec(8), "int8"),
        ("int4", QuantSpec(4), "int4"),
        ("int4-g128", QuantSpec(4, 128), "int4-g128"),
        ("int3-g64", QuantSpec(3, 64), "int3-g64"),
        ("int4-g128-asym", QuantSpec(4, 128, False), "int4-g128-asym"),
        ("int8-sym", QuantSpec(8), "int8"),
        ("int4-asym", QuantSpec(4, None, False), "int4-asym"),
        ("int2-sym-g8", QuantSpec(2, 8), "int2-g8"),
        ("  INT4-G32-ASYM ", QuantSpec(4, 32, False), "int4-g32-asym"),
    ],
)
def test_parse(text: str, spec: QuantSpec, canonical: str) -> None:
    assert QuantSpec.parse(text) == spec
    assert str(spec) == canonical
    assert QuantSpec.parse(canonical) == spec


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("int9", "9"),
        ("int1", "1"),
        ("int0", "0"),
        ("fp4", "'fp4'"),
        ("int", "'int'"),
        ("int4-g0", "'g0'"),
        ("int4-gx", "'gx'"),
        ("int4-g", "'g'"),
        ("int4-g-1", "'g'"),
        ("", "empty"),
        ("   ", "empty"),
        ("int4-fast", "'fast'"),
        ("int4-sym-asym", "twice"),
        ("int4-g8-g16", "twice"),
        ("int4-", "unknown part ''"),
    ],
)
def test_parse_errors(text: str, named: str) -> None:
    with pytest.raises(ValueError, match="accepted forms") as info:
        QuantSpec.parse(text)
    assert named in str(info.value)
    assert "int4-g128-asym" in str(info.value)


def test_parse_rejects_non_str() -> None:
    with pytest.raises(TypeError):
        QuantSpec.parse(4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 1},
        {"bits": 9},
        {"bits": True},
        {"bits": 4.0},
        {"bits": 4, "group_size": 0},
        {"bits": 4, "group_size": -8},
        {"bits": 4, "group_size": 2.0},
        {"bits": 4, "symmetric": 1},
    ],
)
def test_spec_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        QuantSpec(**kwargs)


def test_spec_ranges() -> None:
    assert (QuantSpec(8).qmin, QuantSpec(8).qmax) == (-127, 127)
    assert (QuantSpec(2).qmin, QuantSpec(2).qmax) == (-1, 1)
    assert (QuantSpec(4, symmetric=False).qmin, QuantSpec(4, symmetric=False).qmax) == (0, 15)
    with pytest.raises(AttributeError):
        QuantSpec(4).bits = 8  # type: ignore[misc]


# --- modules and models -----------------------------------------------------------------------


def test_quantize_module_in_place() -> None:
    torch.manual_seed(5)
    lin = nn.Linear(20, 6)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    param = lin.weight
    assert quantize_module(lin, "int4-g8") is lin
    assert lin.weight is param  # same Parameter, data replaced
    torch.testing.assert_close(lin.weight.detach(), quantize_weight(w0, "int4-g8"))
    assert torch.equal(lin.bias.detach(), b0)
    with pytest.raises(ValueError, match="nn.Linear"):
        quantize_module(nn.Conv1d(2, 2, 1), "int4")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_quantize_model_llama(tiny_llama: nn.Module) -> None:
    ref = tiny_llama
    before = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    linears = [n for n, m in ref.named_modules() if isinstance(m, nn.Linear)]
    assert "lm_head" in linears and len(linears) == 2 * 7 + 1

    q8 = quantize_model(ref, "int8")
    q3 = quantize_model(ref, QuantSpec(3, 32))
    # The reference is untouched.
    assert q8 is not ref
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not hasattr(ref, REPORT_ATTR)

    report = getattr(q8, REPORT_ATTR)
    assert isinstance(report, QuantReport)
    assert report.spec == QuantSpec(8)
    assert report.skipped == ("lm_head",)
    assert sorted(report.quantized) == sorted(n for n in linears if n != "lm_head")

    mods = dict(q8.named_modules())
    for name in linears:
        w_ref = before[f"{name}.weight"]
        w_q = mods[name].weight.detach()
        if name == "lm_head":
            assert torch.equal(w_q, w_ref)
        else:
            assert not torch.equal(w_q, w_ref), name
            torch.testing.assert_close(w_q, quantize_weight(w_ref, "int8"), rtol=0, atol=0)
    # Everything that is not a quantized Linear weight is identical.
    q8_state = q8.state_dict()
    for k, v in before.items():
        if k.removesuffix(".weight") not in report.quantized:
            assert torch.equal(q8_state[k], v), k

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(6))
    ref_logits = _logits(ref, ids)
    l8, l3 = _logits(q8, ids), _logits(q3, ids)
    assert bool(torch.isfinite(l8).all()) and bool(torch.isfinite(l3).all())
    err8 = float((l8 - ref_logits).pow(2).mean())
    err3 = float((l3 - ref_logits).pow(2).mean())
    assert 0 < err8 < err3


def test_quantize_model_include_exclude(tiny_llama: nn.Module) -> None:
    m = quantize_model(tiny_llama, "int4", include=r"\.mlp\.")
    report = getattr(m, REPORT_ATTR)
    assert len(report.quantized) == 6 and all(".mlp." in n for n in report.quantized)

    m = quantize_model(tiny_llama, "int4", include=["layers\\.0\\.", "lm_head"], exclude=None)
    report = getattr(m, REPORT_ATTR)
    assert "lm_head" in report.quantized and len(report.quantized) == 8

    m = quantize_model(tiny_llama, "int4", exclude=["lm_head", "q_proj", "k_proj"])
    assert len(getattr(m, REPORT_ATTR).quantized) == 10

    with pytest.raises(ValueError, match="no nn.Linear selected"):
        quantize_model(tiny_llama, "int4", include="nonexistent_module")
    with pytest.raises(ValueError, match="bad include regex"):
        quantize_model(tiny_llama, "int4", include="(")
    with pytest.raises(ValueError, match="accepted forms"):
        quantize_model(tiny_llama, "int5-gq")


def test_quantize_model_inplace_and_shared_weights() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
    w1 = model[1].weight.detach().clone()
    out = quantize_model(model, "int4", inplace=True, exclude=())
    assert out is model
    torch.testing.assert_close(model[1].weight.detach(), quantize_weight(w1, "int4"))
    assert getattr(model, REPORT_ATTR).quantized == ("1", "3")

    # A head tied to the embedding: quantized once, with a warning that the embedding changes.
    tied = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    tied[1].weight = tied[0].weight
    emb = tied[0].weight.detach().clone()
    with pytest.warns(UserWarning, match="shared"):
        q = quantize_model(tied, "int4", exclude=None)
    assert q[1].weight is q[0].weight
    torch.testing.assert_close(q[0].weight.detach(), quantize_weight(emb, "int4"))
    assert torch.equal(tied[0].weight.detach(), emb)
