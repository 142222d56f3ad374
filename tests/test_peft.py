"""PEFT adapters in and out (xcross.peft, xcross-peft), against PEFT itself on tiny random Gemma 3 and Llama bases:
a PEFT adapter read by xcross and an xcross adapter loaded by PEFT give the other side's hidden states."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.tiny import tiny_decoder  # noqa: E402
from xcross.cli.peft import main as peft_cli  # noqa: E402
from xcross.lora import DEFAULT_TARGETS, LoRAConfig, lora_layers  # noqa: E402
from xcross.methods import build_model, read_adapter, save_adapter, save_trained  # noqa: E402
from xcross.peft import HEAD_FILE, PEFT_CONFIG, PEFT_WEIGHTS, export_peft, read_peft_adapter  # noqa: E402
from xcross.settings import ModelConfig, RunConfig  # noqa: E402
from xcross.weights import load_decoder  # noqa: E402
from xcross.xcross import XCrossModel  # noqa: E402

VOCAB = 97
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)


def _gemma3():
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        max_position_embeddings=256, pad_token_id=0))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256))


def _randomise(params, seed, scale):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny random Gemma 3 and Llama model directories, saved by transformers (every weight random, norms too)."""
    out = {}
    for name, make in (("gemma3", _gemma3), ("llama", _llama)):
        torch.manual_seed(0)
        model = make()
        _randomise(model.parameters(), 0, 0.2)
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
    return out


def _hf(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def _ids(seed=1, T=15):
    return torch.randint(1, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def _hidden(model, ids):
    """transformers' (or PEFT's) final-normed hidden states."""
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def _peft_adapter(base_dir, out_dir, targets=DEFAULT_TARGETS, use_rslora=False, dropout=0.0, seed=3, **settings):
    """A PEFT LoRA (r = 4, alpha = 8) with random A and B, saved by PEFT to `out_dir`; returns the PEFT model."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets),
                             use_rslora=use_rslora, **settings)
    model = peft.get_peft_model(_hf(base_dir), config)
    _randomise([p for n, p in model.named_parameters() if "lora_" in n], seed, 0.3)
    model.save_pretrained(out_dir)
    return model.eval()


def _xcross_model(base_dir, lora=LORA, seed=5):
    model = XCrossModel(load_decoder(base_dir), 1, lora)
    params = [p for layer in lora_layers(model.decoder).values() for p in (layer.lora_A, layer.lora_B)]
    _randomise([*params, *model.head.parameters()], seed, 0.3)
    return model.eval()


def _streams(model, ids):
    with torch.no_grad():
        return model.streams(ids).hidden[0]


def _edit_config(peft_dir, **changes):
    path = peft_dir / PEFT_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# -- PEFT in ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, targets, use_rslora, dropout", [
    ("gemma3", DEFAULT_TARGETS, False, 0.0),
    ("gemma3", ("q_proj", "v_proj"), True, 0.1),
    ("llama", DEFAULT_TARGETS, True, 0.0),
    ("llama", ("k_proj", "o_proj", "gate_proj", "down_proj"), False, 0.05),
], ids=["gemma3-all", "gemma3-qv-rslora", "llama-all-rslora", "llama-subset"])
def test_peft_adapter_gives_peft_hidden_states(bases, tmp_path, family, targets, use_rslora, dropout):
    reference = _peft_adapter(bases[family], tmp_path / "peft", targets, use_rslora, dropout)
    ids = _ids()
    want = _hidden(reference, ids)
    with reference.disable_adapter():
        assert (_hidden(reference, ids) - want).abs().max() > 1e-2, "the adapter must change the hidden states"
    # The PEFT directory goes wherever an adapter file goes: a merge of one adapter is that adapter.
    model = build_model(bases[family], "merge", [tmp_path / "peft"], head_init="fresh")
    torch.testing.assert_close(_streams(model, ids), want, atol=1e-5, rtol=0)
    adapter, head, config = read_adapter(tmp_path / "peft")
    lora = LoRAConfig.from_dict(config["lora"])
    assert head == {} and set(lora.targets) == set(targets) and lora.dropout == dropout and lora.rank == 4
    assert lora.scaling == pytest.approx(8 / math.sqrt(4) if use_rslora else 8 / 4)
    assert config["peft"]["use_rslora"] is use_rslora and config["peft"]["lora_alpha"] == 8


def test_peft_adapter_as_zero_shot_source(bases, tmp_path):
    reference = _peft_adapter(bases["llama"], tmp_path / "peft")
    model = build_model(bases["llama"], "source", [tmp_path / "peft"])
    torch.testing.assert_close(_streams(model, _ids()), _hidden(reference, _ids()), atol=1e-5, rtol=0)


def test_adapter_for_another_hidden_size_is_refused(bases, tmp_path):
    _peft_adapter(bases["gemma3"], tmp_path / "peft")
    with pytest.raises(ValueError, match=r"q_proj\.lora_A has shape \(4, 32\) but the model needs \(4, 24\)"):
        build_model(tiny_decoder(0, hidden_size=24), "merge", [tmp_path / "peft"], head_init="fresh")


def test_adapter_for_another_base_name_is_refused(bases, tmp_path, capsys):
    _peft_adapter(bases["llama"], tmp_path / "peft")
    _edit_config(tmp_path / "peft", base_model_name_or_path="org/llama-b")
    named = shutil.copytree(bases["llama"], tmp_path / "base")
    raw = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**raw, "_name_or_path": "org/llama-a"}))
    with pytest.raises(ValueError, match="'org/llama-b'.*'org/llama-a'"):
        read_peft_adapter(tmp_path / "peft", named)
    code = peft_cli(["import", str(tmp_path / "peft"), str(tmp_path / "a.safetensors"), "--model-dir", str(named)])
    assert code == 2 and "org/llama-a" in capsys.readouterr().err and not (tmp_path / "a.safetensors").exists()
    _edit_config(tmp_path / "peft", base_model_name_or_path="org/llama-a")
    read_peft_adapter(tmp_path / "peft", named)  # the same name, and a base that records none, are accepted
    read_peft_adapter(tmp_path / "peft", bases["llama"])


@pytest.mark.parametrize("change, named", [
    (dict(use_dora=True), "use_dora"),
    (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
    (dict(alpha_pattern={"v_proj": 32}), "alpha_pattern"),
    (dict(bias="lora_only"), "bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(layers_to_transform=0), "layers_to_transform"),
    (dict(target_modules=["q_proj", "embed_tokens"]), r"target_modules \['embed_tokens'\]"),
    (dict(init_lora_weights="pissa_niter_4"), "init_lora_weights"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(peft_type="IA3"), "peft_type"),
])
def test_unsupported_settings_are_refused_by_name(bases, tmp_path, change, named):
    _peft_adapter(bases["llama"], tmp_path / "peft")
    _edit_config(tmp_path / "peft", **change)
    with pytest.raises(ValueError, match=named):
        read_adapter(tmp_path / "peft")


def test_real_dora_and_foreign_tensors_are_refused(bases, tmp_path):
    _peft_adapter(bases["llama"], tmp_path / "dora", use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True"):
        read_adapter(tmp_path / "dora")
    _peft_adapter(bases["llama"], tmp_path / "peft")
    _edit_config(tmp_path / "peft", target_modules=".*_proj")  # a regex: the weights say what is adapted
    weights = load_file(tmp_path / "peft" / PEFT_WEIGHTS)
    save_file({**weights, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, VOCAB)},
              tmp_path / "peft" / PEFT_WEIGHTS)
    with pytest.raises(ValueError, match="embed_tokens.lora_embedding_A"):
        read_adapter(tmp_path / "peft")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        read_adapter(tmp_path / "plain")


# -- PEFT out --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma3", "llama"])
@pytest.mark.parametrize("kind", ["adapter-file", "subset", "merged"])
def test_exported_adapter_gives_xcross_hidden_states_in_peft(bases, tmp_path, family, kind):
    if kind == "merged":
        files = []
        for seed in (5, 6):
            files.append(tmp_path / f"source{seed}.safetensors")
            save_adapter(_xcross_model(bases[family], seed=seed), files[-1])
        ours = build_model(bases[family], "merge", files, head_init="fresh")
        _randomise(ours.head.parameters(), 7, 0.3)
        export_peft(ours, tmp_path / "out", base_model_name_or_path="org/tiny")
    else:
        subset = LoRAConfig(rank=3, alpha=5.0, targets=("q_proj", "v_proj", "up_proj"))
        lora = LORA if kind == "adapter-file" else subset
        ours = _xcross_model(bases[family], lora)
        save_adapter(ours, tmp_path / "a.safetensors", {"domain": "toys"})
        export_peft(tmp_path / "a.safetensors", tmp_path / "out", base_model_name_or_path="org/tiny")
    theirs = peft.PeftModel.from_pretrained(_hf(bases[family]), tmp_path / "out").eval()
    assert theirs.peft_config["default"].base_model_name_or_path == "org/tiny"
    ids = _ids(2)
    got, want = _hidden(theirs, ids), _streams(ours, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # The head beside it, by its documented formula on PEFT's hidden state at the last token.
    head = load_file(tmp_path / "out" / HEAD_FILE)
    assert {k: tuple(v.shape) for k, v in head.items()} == {"dense.weight": (32, 32), "dense.bias": (32,),
                                                           "out.weight": (1, 32), "out.bias": (1,)}
    h = got[:, -1]
    score = torch.tanh(h @ head["dense.weight"].T + head["dense.bias"]) @ head["out.weight"].T + head["out.bias"]
    with torch.no_grad():
        torch.testing.assert_close(score[:, 0], ours.head(want[:, -1]), atol=1e-5, rtol=0)


def test_export_import_round_trip(bases, tmp_path):
    ours = _xcross_model(bases["gemma3"])
    save_adapter(ours, tmp_path / "a.safetensors", {"domain": "toys"})
    assert peft_cli(["export", str(tmp_path / "a.safetensors"), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([PEFT_CONFIG, PEFT_WEIGHTS, HEAD_FILE])
    original, original_head, _ = read_adapter(tmp_path / "a.safetensors")
    for head_flag, head_kept in (("keep", True), ("fresh", False)):
        out_file = tmp_path / f"{head_flag}.safetensors"
        assert peft_cli(["import", str(tmp_path / "out"), str(out_file), "--model-dir", str(bases["gemma3"]),
                         "--head", head_flag]) == 0
        adapter, head, config = read_adapter(out_file)
        assert adapter.keys() == original.keys() and all(torch.equal(adapter[k], original[k]) for k in adapter)
        assert config["lora"] == LORA.to_dict() and config["peft"]["path"] == str(tmp_path / "out")
        assert config["domain"] == "toys"  # the adapter's domain, whatever its head
        if head_kept:
            assert all(torch.equal(head[k], original_head[k]) for k in head)
        else:
            assert not head["head.out.weight"].any()
    # What is written stands in for the original wherever an adapter goes.
    model = build_model(bases["gemma3"], "source", [tmp_path / "keep.safetensors"])
    torch.testing.assert_close(_streams(model, _ids()), _streams(ours, _ids()), atol=0, rtol=0)


def test_export_refusals(bases, tmp_path):
    with pytest.raises(ValueError, match="one-stream"):
        export_peft(XCrossModel(load_decoder(bases["llama"]), 2, LORA), tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    save_adapter(_xcross_model(bases["llama"]), tmp_path / "a.safetensors")
    with pytest.raises(FileExistsError, match="not a PEFT adapter directory"):
        export_peft(tmp_path / "a.safetensors", tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_cli_exports_a_merge_run(bases, tmp_path):
    """A merge run's best.safetensors holds only its head: the command rebuilds the merged adapter from the run."""
    files = []
    for seed in (5, 6):
        files.append(tmp_path / f"source{seed}.safetensors")
        save_adapter(_xcross_model(bases["llama"], seed=seed), files[-1])
    config = RunConfig(target="tools", method="merge", model=ModelConfig(model_dir=str(bases["llama"]), lora=LORA,
                                                                         head_init="fresh"))
    ours = build_model(bases["llama"], "merge", files, head_init="fresh")
    _randomise(ours.head.parameters(), 7, 0.3)
    run = tmp_path / "runs" / "tools" / "merge"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    save_trained(ours, run / "best.safetensors", config.method, files, {"domain": config.target})
    assert peft_cli(["export", str(run), str(tmp_path / "out"), "--base-name", "org/tiny"]) == 0
    theirs = peft.PeftModel.from_pretrained(_hf(bases["llama"]), tmp_path / "out").eval()
    assert theirs.peft_config["default"].r == 8  # two rank-4 adapters side by side
    torch.testing.assert_close(_hidden(theirs, _ids()), _streams(ours, _ids()), atol=1e-5, rtol=0)
    torch.testing.assert_close(load_file(tmp_path / "out" / HEAD_FILE)["out.weight"], ours.head.out.weight.detach())


# -- the head of an imported adapter, trained on a domain -------------------------------------------------------------


def test_import_trains_the_head_over_the_frozen_adapter(tmp_path, capsys):
    from tests.pipeline_fixtures import make_model_dir, make_world, one_thread

    world = make_world(tmp_path / "world", domains=("toys",))
    base = make_model_dir(tmp_path / "base", world)
    ours = _xcross_model(base)
    export_peft(ours, tmp_path / "peft")
    (tmp_path / "peft" / HEAD_FILE).unlink()  # as PEFT writes it: no head
    with one_thread():
        code = peft_cli(["import", str(tmp_path / "peft"), str(tmp_path / "toys.safetensors"), "--model-dir",
                         str(base), "--train-head-on", "toys", "--data-dir", str(world), "--device", "cpu",
                         "--dtype", "float32", "--quiet", "--preset", "cpu", "--max-steps", "3", "--batch-size",
                         "4", "--max-eval-users", "8", "--num-candidates", "5", "--eval-batch-size", "8"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "head trained on toys" in out.out
    adapter, head, config = read_adapter(tmp_path / "toys.safetensors")
    assert config["domain"] == "toys" and config["peft"]["path"] == str(tmp_path / "peft")
    frozen = {k.rsplit(".", 1)[0]: v for k, v in load_file(tmp_path / "peft" / PEFT_WEIGHTS).items()}
    assert all(torch.equal(adapter[k], frozen[f"base_model.model.{k}"]) for k in adapter)  # the adapter untouched
    assert head["head.out.weight"].abs().sum() > 0  # a fresh head's out layer is zero: this one was trained


def test_import_help_says_how_to_get_a_head(capsys):
    with pytest.raises(SystemExit):
        peft_cli(["import", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "xcross-train cannot train a head over an imported adapter" in text and "--train-head-on DOMAIN" in text
