"""GGUF files as candidates and references, and the one candidate syntax (``PATH.gguf``,
``DIR_OR_REPO::FILE.gguf``, ``DIR_OR_REPO``, ``--quantize``, ``NAME=``) of ``compare``,
``layers`` and ``tasks``.

The GGUF files are written here with the ``gguf`` package the way llama.cpp's
``convert_hf_to_gguf.py`` writes a Llama: llama.cpp tensor names, Q and K rows permuted
(transformers un-permutes them on load), a byte-level BPE ("gpt2") tokenizer that transformers
rebuilds from the metadata, F32 and Q8_0 (``gguf.quants``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
gguf = pytest.importorskip("gguf")

from qmetrics.cli import main  # noqa: E402
from qmetrics.evaluation.models import CandidateSpec  # noqa: E402
from qmetrics.evaluation.rtn_quantize import QuantSpec  # noqa: E402
from tests.tiny_models import synthetic_text, tiny_llama, tiny_tokenizer  # noqa: E402

F32, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
_BLOCK_TENSORS = (
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
)


def permute_like_llama_cpp(weight: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """``LlamaModel.permute`` of convert_hf_to_gguf.py: within each head, rotary pairs go
    from halves (HF) to interleaved (llama.cpp)."""
    heads = n_head_kv if n_head_kv != n_head else n_head
    w = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, tokenizer, path: Path, qtype=F32, *, tokenizer_model: str = "gpt2",
               matrix_types: dict[str, object] | None = None) -> Path:  # fmt: skip
    """``model`` (a LlamaForCausalLM) and ``tokenizer`` (byte-level BPE) as a GGUF file: every
    matrix in ``qtype`` (``matrix_types`` overrides some by GGUF name: a type, raw bytes
    written as declared), norms in F32."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    special = {t["id"] for t in spec["added_tokens"] if t["special"]}
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                             for m in spec["model"]["merges"]])  # fmt: skip
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(True)

    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}  # fmt: skip
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight"
                      for hf, g in _BLOCK_TENSORS})  # fmt: skip
    state = model.state_dict()
    for hf_name, name in names.items():
        data = state[hf_name].detach().float().numpy()
        if ".attn_q." in name:
            data = permute_like_llama_cpp(data, c.num_attention_heads, c.num_attention_heads)
        elif ".attn_k." in name:
            data = permute_like_llama_cpp(data, c.num_attention_heads, c.num_key_value_heads)
        data = np.ascontiguousarray(data, dtype=np.float32)
        kind = (matrix_types or {}).get(name, qtype) if data.ndim == 2 else F32
        if kind == F32:
            writer.add_tensor(name, data)
        elif kind in gguf.quants._type_traits:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:  # a type nothing can dequantize: the right number of zero bytes
            block, size = gguf.GGML_QUANT_SIZES[kind]
            raw = np.zeros((data.shape[0], data.shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """An HF checkpoint with its F32 GGUF converted in place (beside its tokenizer files, as
    convert_hf_to_gguf.py does), a folder of GGUF files only, bad GGUF files, a corpus."""
    root = tmp_path_factory.mktemp("gguf")
    q8_1 = {"blk.0.ffn_down.weight": gguf.GGMLQuantizationType.Q8_1}
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), layers=2, hidden=64)
    hf, ggufs = root / "tiny", root / "tiny-GGUF"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    ggufs.mkdir()
    corpus = root / "text.txt"
    corpus.write_text(synthetic_text(1500))
    return {
        "hf": hf,
        "f32": write_gguf(model, tok, hf / "tiny.F32.gguf"),
        "q8": write_gguf(model, tok, ggufs / "tiny.Q8_0.gguf", Q8_0),
        "f32_copy": write_gguf(model, tok, ggufs / "tiny.F32.gguf"),
        "gguf_dir": ggufs,
        "bad_tokenizer": write_gguf(model, tok, root / "rwkv-tok.gguf", tokenizer_model="rwkv"),
        "bad_type": write_gguf(model, tok, root / "q8_1.gguf", Q8_0, matrix_types=q8_1),
        "corpus": corpus,
    }  # fmt: skip


def compare(files, out: Path, *extra: object, reference: object = None) -> int:
    return main(["compare", "--reference", str(reference or files["hf"]), "--dataset",
                 str(files["corpus"]), "--context-length", "32", "--batch-size", "4",
                 "--max-tokens", "256", "--output", str(out), "--no-progress", "--device", "cpu",
                 *map(str, extra)])  # fmt: skip


@pytest.fixture(scope="module")
def three_way(files, tmp_path_factory) -> dict:
    """report.json of F32 GGUF (a path), Q8_0 GGUF (DIR::FILE) and --quantize int4 against the
    HF model, in one ``compare``."""
    out = tmp_path_factory.mktemp("three-way")
    q8 = f"{files['gguf_dir']}::tiny.Q8_0.gguf"
    code = compare(files, out, "--candidate", files["f32"], "--candidate", q8,
                   "--quantize", "int4")  # fmt: skip
    assert code == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_three_candidates_in_one_compare_named_by_file(files, three_way):
    """The F32 file reproduces its HF model (KL < 1e-6, 100% top-1); each row is named after
    its own file (or spec) and holds that file's numbers."""
    report = three_way
    rows = report["comparisons"]
    assert list(rows) == ["tiny.F32", "tiny.Q8_0", "rtn-int4"]
    f32, q8, int4 = (rows[n] for n in rows)
    assert f32["means"]["kl"]["value"] < 1e-6 and f32["kl_distribution"]["max"] < 1e-6
    assert f32["agreement"]["top1"]["value"] == 1.0
    # Q8_0 drifts, but far less than int4: the row labelled Q8_0 holds Q8_0's numbers
    assert 1e-9 < q8["means"]["kl"]["value"] < int4["means"]["kl"]["value"]
    origins = {name: m.get("origin", {}) for name, m in report["models"].items()}
    assert origins["tiny.F32"]["gguf_file"] == str(files["f32"].resolve())
    assert origins["tiny.Q8_0"]["gguf_file"] == str(files["q8"].resolve())


@pytest.mark.slow
def test_gguf_reference_and_name_prefix(files, three_way, tmp_path):
    """An F32 GGUF as the reference, no HF checkpoint: the Q8_0 drift equals the one measured
    against the HF model, and NAME= names the rows."""
    code = compare(files, tmp_path, "--candidate", f"q8={files['q8']}",
                   "--quantize", "i4=int4", reference=files["f32_copy"])  # fmt: skip
    assert code == 0
    by_gguf = json.loads((tmp_path / "report.json").read_text())
    assert list(by_gguf["comparisons"]) == ["q8", "i4"]
    assert by_gguf["reference"] == "tiny.F32"
    kl_gguf = by_gguf["comparisons"]["q8"]["means"]["kl"]["value"]
    kl_hf = three_way["comparisons"]["tiny.Q8_0"]["means"]["kl"]["value"]
    assert kl_gguf == pytest.approx(kl_hf, rel=1e-4)


@pytest.mark.slow
def test_deprecated_gguf_file_still_works(files, tmp_path, capsys):
    code = compare(files, tmp_path, "--candidate", files["gguf_dir"], "--gguf-file",
                   "tiny.Q8_0.gguf")  # fmt: skip
    assert code == 0
    assert "--gguf-file is deprecated" in capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["comparisons"]) == ["tiny.Q8_0"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m.Q4_K_M.gguf", CandidateSpec(".", "m.Q4_K_M.gguf", local_file=True)),
        ("/a/b/m.gguf", CandidateSpec("/a/b", "m.gguf", local_file=True)),
        ("org/repo::m.Q8_0.gguf", CandidateSpec("org/repo", "m.Q8_0.gguf")),
        ("q4km=./m::m.Q4_K_M.gguf", CandidateSpec("./m", "m.Q4_K_M.gguf", name="q4km")),
        ("org/model-GPTQ", CandidateSpec("org/model-GPTQ")),
        ("gptq=org/model-GPTQ", CandidateSpec("org/model-GPTQ", name="gptq")),
    ],
)
def test_candidate_syntax(text, expected):
    assert CandidateSpec.parse(text) == expected
    assert CandidateSpec.parse(str(expected)) == expected


def test_quantize_syntax():
    assert CandidateSpec.parse("int4-g32", quantize=True) == CandidateSpec(
        quantize=QuantSpec.parse("int4-g32")
    )
    assert CandidateSpec.parse("q=int8", quantize=True).name == "q"
    with pytest.raises(ValueError, match="int9"):
        CandidateSpec.parse("q=int9", quantize=True)


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("qmetrics: error:") and "huggingface.co" not in err
    return err


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ("{root}/missing.Q4_K_M.gguf", "GGUF file does not exist"),
        ("{gguf_dir}::missing.gguf", "GGUF file does not exist"),
        ("{gguf_dir}", "it holds GGUF files: write"),
        ("{gguf_dir}::tiny.bin", "write DIR_OR_REPO::FILE.gguf"),
        ("{root}/rwkv-tok.gguf", "tokenizer"),
        ("{root}/q8_1.gguf", "Q8_1"),
    ],
)
def test_bad_gguf_input_is_one_line_exit_2(files, tmp_path, capsys, candidate, message):
    fields = {"root": files["corpus"].parent, "gguf_dir": files["gguf_dir"]}
    err = _one_line_error(capsys, compare(files, tmp_path, "--candidate",
                                          candidate.format(**fields)))  # fmt: skip
    assert message in err


def test_bad_quant_type_and_ambiguous_gguf_file_exit_2(files, tmp_path, capsys):
    assert "int9" in _one_line_error(capsys, compare(files, tmp_path, "--quantize", "q=int9"))
    code = compare(files, tmp_path, "--candidate", files["gguf_dir"], "--candidate", files["hf"],
                   "--gguf-file", "tiny.Q8_0.gguf")  # fmt: skip
    assert "exactly one --candidate" in _one_line_error(capsys, code)


def test_no_hub_address_for_a_local_path():
    """transformers builds a Hub address from a local path; the message drops it."""
    from qmetrics.evaluation.models import _first_line

    exc = OSError("/m does not appear to have a file named m.gguf. Checkout "
                  "'https://huggingface.co//m/tree/main' for available files.")  # fmt: skip
    assert _first_line(exc, local=True) == "/m does not appear to have a file named m.gguf."
    assert "huggingface.co" in _first_line(exc, local=False)


def test_missing_gguf_package_names_the_extra(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    err = _one_line_error(capsys, compare(files, tmp_path, "--candidate", files["q8"]))
    assert 'pip install "qmetrics[gguf]"' in err


def test_no_progress_silences_transformers_gguf_bar(files, capfd):
    """transformers' "Converting and de-quantizing GGUF tensors" bar is a plain tqdm: shown
    without --no-progress, gone with it."""
    import argparse

    from qmetrics.cli.common import load_models

    def load(no_progress: bool) -> str:
        args = argparse.Namespace(reference=str(files["q8"]), device="cpu", dtype="auto",
                                  trust_remote_code=False, no_progress=no_progress)  # fmt: skip
        capfd.readouterr()
        load_models(args)
        return capfd.readouterr().err

    shown = load(no_progress=False)
    if "GGUF" not in shown:
        pytest.skip("this transformers version shows no GGUF progress bar")
    assert load(no_progress=True) == ""


def test_layers_accepts_a_gguf_candidate(files, tmp_path):
    out = tmp_path / "layers"
    code = main(["layers", "--reference", str(files["hf"]), "--candidate",
                 f"{files['gguf_dir']}::tiny.Q8_0.gguf", "--dataset", str(files["corpus"]),
                 "--context-length", "16", "--batch-size", "2", "--max-tokens", "64",
                 "--device", "cpu", "--no-progress", "--output", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "layers.json").read_text())
    assert report["settings"]["candidate"] == "tiny.Q8_0"
    layers = report["errors"]["layers"]
    assert len(layers) == 2  # Q8_0: a small, non-zero error in every block
    assert all(0 < lay["propagated"]["rel_error"] < 0.05 for lay in layers)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-evaluation-harness not installed (pip install 'qmetrics[tasks]')",
)
def test_tasks_accepts_a_gguf_candidate(files, tmp_path):
    out = tmp_path / "tasks"
    code = main(["tasks", "--reference", str(files["hf"]), "--candidate", str(files["f32"]),
                 "--tasks", "qmetrics_mc", "--limit", "4", "--batch-size", "4", "--device",
                 "cpu", "--resamples", "99", "--output", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "tasks.json").read_text())
    assert report["candidate"] == "tiny.F32"
    assert report["models"]["tiny.F32"]["origin"]["gguf_file"] == str(files["f32"].resolve())
    (mc,) = report["comparisons"]  # the F32 file is the reference model: the same answers
    assert mc["agreement"] == 1.0 and len(mc["items"]) == 4
    assert all(i["reference"]["answer"] == i["candidate"]["answer"] for i in mc["items"])
