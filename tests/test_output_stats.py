"""``output_stats``: both backends against a float64 reference (odd V, bf16/fp16/fp32, strided
views, NaN/±inf entries, ties, labels), no host sync, no copies, and the kernel's sm_90
compile without spills."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from qmetrics.kernels.torch_compile import compiler_available

from qmetrics.metrics.output_stats import output_stats
from tests.conftest import HAS_TRITON
from tests.float64_reference import reference_output_stats as reference_stats
from tests.test_no_sync import no_host_reads, unguarded

BACKENDS = ["torch", "triton"]
ROOT = Path(__file__).resolve().parents[1]


TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def assert_matches(got, ref, dtype: torch.dtype, scale: float = 1.0) -> None:
    assert torch.equal(got.finite, ref["finite"])
    for name in ("entropy", "max_prob", "margin", "lse", "nll"):
        if name not in ref:
            continue
        value = getattr(got, name)
        assert value is not None and value.dtype == torch.float32, name
        want = ref[name]
        assert torch.equal(value.isnan(), want.isnan()), name
        tol = TOL[dtype] * (scale if name in ("lse", "nll") else 1.0)
        torch.testing.assert_close(value.double(), want, rtol=tol, atol=tol, equal_nan=True,
                                   msg=name)  # fmt: skip


def _inputs(shape, dtype, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(*shape, generator=g)).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 2, 301])
def test_matches_float64_reference(backend: str, dtype: torch.dtype, vocab: int) -> None:
    x = _inputs((3, 5, vocab), dtype)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, vocab, (3, 5), generator=g)
    labels[0, 0], labels[1, 1], labels[2, 2] = -100, vocab, -7  # ignored and out of range
    got = output_stats(x, labels, backend=backend)
    ref = reference_stats(x, labels)
    assert_matches(got, ref, dtype, scale=4.0)
    assert torch.isnan(got.nll[0, 0]) and torch.isnan(got.nll[1, 1]) and torch.isnan(got.nll[2, 2])
    if vocab == 1:
        assert torch.all(got.max_prob == 1) and torch.all(got.margin == 1)
        assert torch.all(got.entropy.abs() < 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_are_read_in_place(backend: str) -> None:
    x = _inputs((4, 7, 513), torch.float32, seed=2)
    views = {
        "drop_last_position": x[:, :-1],
        "transposed": x.transpose(0, 1),
        "misaligned": x[..., 1:],
        "every_other_row": x[:, ::2],
    }
    for name, view in views.items():
        got = output_stats(view, backend=backend)
        assert_matches(got, reference_stats(view, None), torch.float32, scale=4.0)
        assert got.entropy.shape == view.shape[:-1], name


def test_torch_backend_copies_no_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """No [N, V] copy of a strided fp32 view: ``contiguous``/``clone`` are never called and the
    largest tensor allocated is a chunk (here: V = 64, far fewer rows per chunk than N)."""
    import qmetrics.kernels.output_stats_torch as twin

    x = _inputs((2, 400, 64), torch.float32)[:, :-1]
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("copy"))
    monkeypatch.setattr(torch.Tensor, "clone", lambda *a, **k: pytest.fail("copy"))
    out = twin.output_stats_torch(x, None, chunk_rows=16)
    assert out.shape == (6, 2 * 399)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_entries_flag_the_token(backend: str) -> None:
    """NaN, +inf and a row without a finite entry flag the token; −inf entries are masked
    tokens of probability 0 (the row stays finite, a label on one has NLL +inf)."""
    x = _inputs((7, 50), torch.float32, seed=3)
    x[0, 3] = float("nan")
    x[1, 4] = float("inf")
    x[2, :] = float("-inf")
    x[3, 2] = float("-inf")
    x[3, 7] = float("nan")  # NaN beside −inf still flags the row
    x[4, 5] = x[4, 9] = float("-inf")
    x[5, :] = float("-inf")
    x[5, 11] = 1.5  # one finite entry: a certain token
    labels = torch.arange(7)
    labels[4] = 9  # the label is masked: NLL +inf
    got = output_stats(x, labels, backend=backend)
    assert got.finite.tolist() == [False, False, False, False, True, True, True]
    for name, value in got.to_dict().items():
        if name != "finite":
            assert torch.isnan(value[:4]).all(), name
    ref = reference_stats(x, labels)
    assert_matches(got, ref, torch.float32)
    assert got.nll[4] == float("inf") and torch.isfinite(got.entropy[4])
    assert got.max_prob[5] == 1.0 and got.margin[5] == 1.0 and got.entropy[5] == 0.0
    assert got.nll[5] == float("inf") and got.lse[5] == 1.5
    # the masked entries change nothing else: the row without them gives the same numbers
    kept = torch.cat([x[4, :5], x[4, 6:9], x[4, 10:]])
    alone = output_stats(kept[None], backend=backend)
    for name in ("entropy", "max_prob", "margin", "lse"):
        torch.testing.assert_close(getattr(got, name)[4:5], getattr(alone, name), msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_further_apart_than_fp32_reaches(backend: str) -> None:
    """Finite logits whose differences overflow fp32 (x − max = −inf for |x| ≈ 3e38): the
    row is finite, the far entries have probability 0 (e·d is 0, not 0·(−inf) = NaN); on
    the Triton kernel also across tiles (the anchor moving by more than fp32 reaches)."""
    x = torch.zeros(3, 40)
    x[0, 0], x[0, 1] = 3e38, -3e38
    x[1, 0], x[1, 39] = -3e38, 3e38  # the maximum arrives in the last tile
    x[2, 0], x[2, 39] = 3e38, -3e38
    got = output_stats(x, backend=backend)
    assert got.finite.all()
    for name, want in (("entropy", 0.0), ("max_prob", 1.0), ("margin", 1.0)):
        assert torch.equal(getattr(got, name), torch.full((3,), want)), name
    if backend == "triton" and HAS_TRITON:
        from qmetrics.kernels.output_stats import output_stats_triton

        raw = output_stats_triton(x, None, block_v=16)
        assert torch.equal(raw[:3], torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_for_the_top(backend: str) -> None:
    x = torch.zeros(3, 37)
    x[0, 5] = x[0, 30] = 4.0  # two-way tie for the top: margin 0
    x[1, 2] = 4.0  # a single top: margin = (e^4 − 1)/s
    # row 2: all equal: max_prob 1/V, margin 0, entropy log V
    got = output_stats(x, backend=backend)
    ref = reference_stats(x, None)
    assert got.margin[0] == 0.0 and got.margin[2] == 0.0
    assert_matches(got, ref, torch.float32)
    torch.testing.assert_close(got.entropy[2].double(), torch.tensor(37.0).log().double())


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_tiles_and_online_rescaling() -> None:
    """Several tiles per row (block_v 16 < V), the maximum moving from tile to tile, a tie
    split across tiles, very negative logits (the anchor far below 0)."""
    from qmetrics.kernels.output_stats import output_stats_triton

    x = _inputs((4, 101), torch.float32, seed=4)
    x[0] += torch.linspace(-20, 20, 101)  # the maximum moves in every tile
    x[1, 3] = x[1, 90] = 30.0  # a tie across tiles
    x[2] -= 500.0
    labels = torch.tensor([1, 3, 100, -100])
    raw = output_stats_triton(x, labels, block_v=16)
    ref = reference_stats(x, labels)
    for k, name in enumerate(("entropy", "max_prob", "margin", "lse", "nll")):
        torch.testing.assert_close(raw[k].double(), ref[name], rtol=1e-5, atol=1e-4,
                                   equal_nan=True, msg=name)  # fmt: skip
    assert raw[2, 1] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _inputs((2, 4, 50), torch.float32)
    labels = torch.randint(0, 50, (2, 4))
    with no_host_reads() as lifted:
        if backend == "triton":  # the interpreter copies storages to the host itself
            import qmetrics.kernels.output_stats as kernel

            monkeypatch.setattr(kernel, "output_stats_triton",
                                unguarded(kernel.output_stats_triton, lifted))  # fmt: skip
        out = output_stats(x, labels, backend=backend)
    assert out.entropy.shape == (2, 4)


needs_compiler = pytest.mark.skipif(
    not compiler_available(), reason="torch.compile needs a C++ compiler on the PATH"
)


def _hard_rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, 9, 301] logits with NaN/+inf/−inf entries, a −inf row and a tie for the top, and
    labels with ignored and out-of-range entries."""
    x = _inputs((3, 9, 301), torch.float32, seed=5)
    x[0, 1, 3], x[1, 2, 4], x[2, 3, 5] = float("nan"), float("inf"), float("-inf")
    x[0, 4, :] = float("-inf")
    x[1, 5, 7] = x[1, 5, 200] = 40.0
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 301, (3, 9), generator=g)
    labels[0, 0], labels[1, 1], labels[2, 2] = -100, 301, -7
    return x.to(dtype), labels


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_twin_matches_float64_reference(dtype: torch.dtype) -> None:
    """The ``torch.compile``d CPU path against float64 and the eager path (same ``finite``),
    on a strided view; a call with another row count reuses the compiled code."""
    import qmetrics.kernels.output_stats_torch as twin
    from torch._dynamo.utils import counters

    x, labels = _hard_rows(dtype)
    view, lab = x[:, :-1], labels[:, :-1]
    raw = twin.output_stats_torch(view, lab.reshape(-1), compile=True)
    eager = twin.output_stats_torch(view, lab.reshape(-1), compile=False)
    ref = reference_stats(view, lab)
    assert not twin._COMPILED.failed, "the compiled path fell back to eager"
    assert torch.equal(raw[5] > 0, ref["finite"].reshape(-1))
    assert torch.equal(raw[5], eager[5])
    for k, name in enumerate(("entropy", "max_prob", "margin", "lse", "nll")):
        tol = TOL[dtype] * (4.0 if name in ("lse", "nll") else 1.0)
        torch.testing.assert_close(raw[k].double(), ref[name].reshape(-1), rtol=tol, atol=tol,
                                   equal_nan=True, msg=name)  # fmt: skip
    graphs = counters["stats"]["unique_graphs"]
    shorter = twin.output_stats_torch(x[:2, :-3], labels[:2, :-3].reshape(-1), compile=True)
    assert counters["stats"]["unique_graphs"] == graphs, "a new row count recompiled"
    torch.testing.assert_close(shorter, raw.view(6, 3, 8)[:, :2, :6].reshape(6, -1),
                               equal_nan=True)  # fmt: skip


_NO_LOGIT_COPY = """
import resource, sys, torch
from qmetrics.kernels.output_stats_torch import output_stats_torch
output_stats_torch(torch.randn(2, 9, 8192)[:, :-1], None, compile=True)  # compiles
x = torch.randn(2, 2049, 8192)  # 128 MiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
output_stats_torch(x[:, :-1], None, compile=True)  # another row count: no recompile
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grown // 1024)
"""


@needs_compiler
@pytest.mark.slow
def test_compiled_twin_writes_no_logit_sized_tensor() -> None:
    """Inductor's loops read the view in place: peak memory does not grow by an [N, V] fp32
    intermediate (128 MiB here; exp(d) read by two reductions would be one)."""
    out = subprocess.run([sys.executable, "-c", _NO_LOGIT_COPY], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, check=True)  # fmt: skip
    grown_mib = int(out.stdout.split()[-1])
    assert grown_mib < 32, f"peak RSS grew by {grown_mib} MiB"


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        output_stats(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty input"):
        output_stats(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="labels shape"):
        output_stats(torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        output_stats(torch.zeros(2, 3), backend="cuda")


def _ptxas_available() -> bool:
    if not HAS_TRITON:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="triton with its bundled ptxas is needed")
@pytest.mark.slow
def test_kernel_compiles_for_sm90_without_spills() -> None:
    """Compiled ahead of time for sm_90 with ``benchmarks/sass_report.py``'s machinery (bf16 and
    fp32, with labels, aligned specialization): no local-memory spill anywhere."""
    script = textwrap.dedent(
        """
        import re, subprocess, sys, tempfile
        from pathlib import Path
        import triton
        import qmetrics.kernels.output_stats as k
        from benchmarks.sass_report import Variant, compile_variant
        bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        for dtype in ("bf16", "fp32"):
            types = {"x_ptr": "*" + dtype, "x_sb": "i64", "x_st": "i64", "label_ptr": "*i64",
                     "out_ptr": "*fp32", "N": "i32", "T": "i32", "V": "i32",
                     "ignore_index": "i32"}
            v = Variant("output_stats " + dtype, k._output_stats_kernel, types,
                        {"HAS_LABELS": True, "BLOCK_V": 4096}, 8)
            compiled = compile_variant(v)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"]); f.flush()
                usage = subprocess.run([bin_dir / "cuobjdump", "--dump-resource-usage", f.name],
                                       capture_output=True, text=True, check=True).stdout
                sass = subprocess.run([bin_dir / "cuobjdump", "--dump-sass", f.name],
                                      capture_output=True, text=True, check=True).stdout
            m = re.search(r"REG:(\\d+) STACK:(\\d+) SHARED:(\\d+) LOCAL:(\\d+)", usage)
            spills = len(re.findall(r"\\b(LDL|STL)\\b", sass))
            print(dtype, "regs", m.group(1), "stack", m.group(2), "local", m.group(4),
                  "LDL/STL", spills)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert len(lines) == 2, out
    for cells in lines:
        assert cells[4] == "0" and cells[6] == "0" and cells[8] == "0", out
