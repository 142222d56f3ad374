"""LoRA layers, the X-Cross model and shared-prefix packing, each against an independent computation."""

import copy
import random

import pytest
import torch

from tests.tiny import TINY_GEMMA, tiny_decoder
from xcross.data import collate, collate_unpacked, pack
from xcross.lora import LoRAConfig, lora_layers
from xcross.methods import build_model, parameter_report, save_adapter
from xcross.training import coefficient_stats
from xcross.xcross import Integrator, XCrossConfig, XCrossModel

LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)


def _randomise_adapters(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model.decoder).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def _randomise_head(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _lora_model(seed, adapter_seed=None, n=1):
    model = XCrossModel(tiny_decoder(seed), n, LORA)
    if adapter_seed is not None:
        _randomise_adapters(model, adapter_seed)
    return model


def _random_batch(seed, B=2, C=3, prefix=(11, 5), vocab=TINY_GEMMA["vocab_size"]):
    rnd = random.Random(seed)
    packed = []
    for b in range(B):
        p = [rnd.randrange(1, vocab) for _ in range(prefix[b % len(prefix)])]
        cands = [[rnd.randrange(1, vocab) for _ in range(rnd.randint(1, 6))] for _ in range(C)]
        packed.append(pack(p, cands))
    return collate(packed, pad_id=0)


# -- LoRA ------------------------------------------------------------------------------------------------------------


def test_lora_with_zero_B_equals_base():
    base = tiny_decoder(0)
    model = XCrossModel(copy.deepcopy(base), 1, LORA)  # B starts at 0, A random
    ids = torch.randint(1, 100, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = base(ids).hidden_states
        got = model.streams(ids).hidden[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_merged_equals_unmerged():
    model = _lora_model(0, adapter_seed=1)
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = model.streams(ids).hidden
        for layer in lora_layers(model.decoder).values():
            layer.merge()
        merged = model.streams(ids).hidden
        for layer in lora_layers(model.decoder).values():
            layer.unmerge()
        again = model.streams(ids).hidden
    assert not torch.allclose(unmerged, tiny_decoder(0)(ids).hidden_states[None], atol=1e-3), "adapter must matter"
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=0)


def test_lora_matches_peft(tmp_path):
    """Our stacked LoRA (n = 1) against PEFT's LoRA on the transformers model holding the same weights."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from xcross.weights import load_decoder

    hf_cfg = transformers.Gemma3TextConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=512)
    torch.manual_seed(0)
    ref = transformers.Gemma3ForCausalLM(hf_cfg).eval()
    ref.save_pretrained(tmp_path)
    peft_model = peft.get_peft_model(ref, peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0,
                                                            target_modules=list(LORA.targets)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ours = XCrossModel(load_decoder(tmp_path), 1, LORA)
    theirs = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, layer in lora_layers(ours.decoder).items():
            layer.lora_A[0].copy_(theirs[f"base_model.model.{name}.lora_A.default.weight"])
            layer.lora_B[0].copy_(theirs[f"base_model.model.{name}.lora_B.default.weight"])
    ids = torch.randint(1, 100, (2, 19), generator=g)
    with torch.no_grad():
        want = peft_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        got = ours.streams(ids).hidden[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_save_load_gives_identical_scores(tmp_path):
    model = _lora_model(0, adapter_seed=1)
    _randomise_head(model, 2)
    model.set_trainable({"adapters", "head"})
    path = tmp_path / "toys.safetensors"
    save_adapter(model, path, {"domain": "toys"})
    loaded = build_model(tiny_decoder(0), "source", [path])
    batch = _random_batch(0)
    with torch.no_grad():
        assert torch.equal(model.score(batch), loaded.score(batch))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(lora=LoRAConfig(rank=2, alpha=8.0, dropout=0.0)), "rank 2 != expected rank 4"),
        (dict(lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"))), "targets"),
        (dict(hidden_size=24), "hidden_size"),
    ],
)
def test_mismatched_adapter_fails_with_message(tmp_path, change, message):
    good = _lora_model(0, adapter_seed=1)
    save_adapter(good, tmp_path / "good.safetensors")
    if "lora" in change:
        other = XCrossModel(tiny_decoder(0), 1, change["lora"])
    else:
        other = XCrossModel(tiny_decoder(0, **change), 1, LORA)
    save_adapter(other, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=message):
        build_model(tiny_decoder(0), "xcross", [tmp_path / "good.safetensors", tmp_path / "bad.safetensors"])


# -- X-Cross ---------------------------------------------------------------------------------------------------------


def test_integrator_matches_brute_force_formula():
    n, d, B, T = 3, 8, 2, 5
    cfg = XCrossConfig(beta=0.7, gamma=1.3)
    integ = Integrator(n, d, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        integ.weight.copy_(torch.randn(integ.weight.shape, generator=g))
        integ.bias.copy_(torch.randn(integ.bias.shape, generator=g))
    h = torch.randn(n, B, T, d, generator=g) * 5
    got, _ = integ(h)
    want = torch.empty_like(h)
    for b in range(B):
        for t in range(T):
            rho = [h[m, b, t] / torch.sqrt((h[m, b, t] ** 2).mean() + cfg.eps) for m in range(n)]
            z = integ.weight @ torch.cat(rho) + integ.bias
            pairs = [(m, mp) for m in range(n) for mp in range(n) if mp != m]
            z1 = {pair: z[i] for i, pair in enumerate(pairs)}
            z2 = {pair: z[len(pairs) + i] for i, pair in enumerate(pairs)}
            for m in range(n):
                acc = h[m, b, t].clone()
                for mp in range(n):
                    if mp != m:
                        acc += cfg.beta * z1[m, mp] * h[mp, b, t] + cfg.gamma * z2[m, mp] * (h[m, b, t] - h[mp, b, t])
                want[m, b, t] = acc
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_zero_initialised_xcross_reproduces_each_source():
    """Stream m of an untrained X-Cross equals the single-adapter model of adapter m, at every token."""
    n = 3
    singles = [_lora_model(0, adapter_seed=10 + m) for m in range(n)]
    xc = XCrossModel(tiny_decoder(0), n, LORA)
    with torch.no_grad():
        for name, layer in lora_layers(xc.decoder).items():
            for m in range(n):
                single = lora_layers(singles[m].decoder)[name]
                layer.lora_A[m].copy_(single.lora_A[0])
                layer.lora_B[m].copy_(single.lora_B[0])
    batch = _random_batch(1)
    with torch.no_grad():
        got = xc.streams(batch.input_ids, batch.attention_mask, batch.position_ids).hidden
        for m in range(n):
            want = singles[m].streams(batch.input_ids, batch.attention_mask, batch.position_ids).hidden[0]
            torch.testing.assert_close(got[m], want, atol=1e-5, rtol=0)
    assert not torch.allclose(got[0], got[1], atol=1e-3), "different adapters must give different streams"


def _randomise_integrators(integrators, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for integ in integrators:
            integ.weight.copy_(torch.randn(integ.weight.shape, generator=g) * std)
            integ.bias.copy_(torch.randn(integ.bias.shape, generator=g) * std)


def _randomise_model(model, seed):
    """Adapters, head and every integrator set to seeded random values, as after training."""
    _randomise_adapters(model, seed)
    _randomise_head(model, seed + 1)
    _randomise_integrators(model.integrators, seed + 2)


def test_one_stream_from_an_adapter_file_equals_the_lora_model(tmp_path):
    """A LoRA model is the n = 1 case of the stream machinery: read back from its file as one stream ("source"), it
    scores as the model that wrote it."""
    lora = _lora_model(0, adapter_seed=1)
    _randomise_head(lora, 2)
    save_adapter(lora, tmp_path / "a.safetensors")
    one = build_model(tiny_decoder(0), "source", [tmp_path / "a.safetensors"])
    batch = _random_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(one.score(batch), lora.score(batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["xcross", "ensemble"])
def test_mixing_methods_refuse_one_source_as_the_cli_does(tmp_path, method):
    """The library accepts and refuses what the CLIs do: one source has nothing to mix."""
    save_adapter(_lora_model(0, adapter_seed=1), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=f"method {method} takes 2 or more source adapter"):
        build_model(tiny_decoder(0), method, [tmp_path / "a.safetensors"])


def test_xcross_step_changes_only_integrators_w_and_head(tmp_path):
    paths = []
    for m in range(2):
        src = _lora_model(0, adapter_seed=20 + m)
        _randomise_head(src, 30 + m)
        paths.append(tmp_path / f"s{m}.safetensors")
        save_adapter(src, paths[-1])
    model = build_model(tiny_decoder(0), "xcross", paths)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2)
    batch = _random_batch(3)
    model.train()
    for _ in range(2):  # the integrators get a gradient only once the head's output layer is non-zero
        loss = torch.nn.functional.cross_entropy(model.score(batch), torch.tensor([0, 2]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    trainable = {n for n, _ in model.trainable_parameters()}
    assert {n.split(".")[0] for n in trainable} == {"integrators", "stream_weights", "head"}
    for key, value in model.state_dict().items():
        changed = not torch.equal(value, before[key])
        if key in trainable:
            assert changed, f"{key} did not train"
        else:
            assert not changed, f"frozen {key} changed"


def test_head_starts_as_average_of_source_heads(tmp_path):
    heads = []
    paths = []
    for m in range(3):
        src = _lora_model(0, adapter_seed=m)
        _randomise_head(src, 40 + m)
        heads.append({k: v.clone() for k, v in src.head.state_dict().items()})
        paths.append(tmp_path / f"s{m}.safetensors")
        save_adapter(src, paths[-1])
    model = build_model(tiny_decoder(0), "xcross", paths)
    for key, value in model.head.state_dict().items():
        torch.testing.assert_close(value, sum(h[key] for h in heads) / 3)


def test_fresh_head_scores_every_candidate_equally(tmp_path):
    paths = []
    for m in range(2):
        src = _lora_model(0, adapter_seed=m)
        _randomise_head(src, 60 + m)
        paths.append(tmp_path / f"s{m}.safetensors")
        save_adapter(src, paths[-1])
    batch = _random_batch(4)
    with torch.no_grad():
        averaged = build_model(tiny_decoder(0), "xcross", paths).score(batch)
        fresh = build_model(tiny_decoder(0), "xcross", paths, head_init="fresh").score(batch)
    assert torch.equal(fresh, torch.zeros_like(fresh)), "a fresh head starts at a uniform ranking (loss log C)"
    assert averaged.std() > 0.01, "the averaged source heads already rank the candidates"
    with pytest.raises(ValueError, match="head_init"):
        build_model(tiny_decoder(0), "xcross", paths, head_init="random")


def test_merge_adapter_is_the_mean_of_source_deltas(tmp_path):
    paths, deltas = [], []
    for m in range(2):
        src = _lora_model(0, adapter_seed=50 + m)
        deltas.append({n: l.delta_weight() for n, l in lora_layers(src.decoder).items()})
        paths.append(tmp_path / f"s{m}.safetensors")
        save_adapter(src, paths[-1])
    merged = build_model(tiny_decoder(0), "merge", paths)
    for name, layer in lora_layers(merged.decoder).items():
        torch.testing.assert_close(layer.delta_weight(), (deltas[0][name] + deltas[1][name]) / 2, atol=1e-6, rtol=0)


def test_parameter_report_counts():
    model = XCrossModel(tiny_decoder(0), 3, LORA)
    model.set_trainable({"integrators", "stream_weights", "head"})
    report = parameter_report(model)
    c = TINY_GEMMA
    d, L, n = c["hidden_size"], c["num_hidden_layers"], 3
    integrators = L * (2 * n * (n - 1) * (n * d + 1))
    head = d * d + d + d + 1
    assert report["trainable"] == integrators + n + head
    # one adapter of rank 4 on q, k, v, o, gate, up, down of every block, by hand
    q, kv, o = (d, 2 * 16), (d, 1 * 16), (2 * 16, d)
    mlp = [(d, c["intermediate_size"])] * 2 + [(c["intermediate_size"], d)]
    lora = L * sum(4 * (i + o_) for i, o_ in [q, kv, kv, o, *mlp])
    assert report["target_lora_equivalent"] == lora + head


# -- packing ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_packed_scores_equal_separate_sequences(seed):
    """Random prefix lengths (beyond the sliding window of 8) and candidate lengths; n = 2 streams with trained
    integrators, so the check covers mixing as well as masks and positions."""
    rnd = random.Random(seed)
    model = XCrossModel(tiny_decoder(seed), 2, LORA)
    _randomise_model(model, seed)
    examples = []
    for _ in range(3):
        prefix = [rnd.randrange(1, 100) for _ in range(rnd.randint(1, 20))]
        cands = [[rnd.randrange(1, 100) for _ in range(rnd.randint(1, 7))] for _ in range(5)]
        examples.append((prefix, cands))
    batch = collate([pack(p, c) for p, c in examples], pad_id=0)
    with torch.no_grad():
        packed = model.score(batch)
        for b, (prefix, cands) in enumerate(examples):
            separate = model.score(collate_unpacked(prefix, cands, pad_id=0)).reshape(-1)
            torch.testing.assert_close(packed[b], separate, atol=1e-5, rtol=0)


# -- torch.compile ---------------------------------------------------------------------------------------------------


def test_compiled_regions_match_eager():
    """`compile_regions` (train.py --compile) changes neither scores nor gradients, over batches of two shapes
    (packed lengths differ from batch to batch in training), and keeps the parameter names. The coefficients the
    training forward returns for the log (`model(batch).coefficients`, eager and compiled) equal a separate forward's."""
    eager = XCrossModel(tiny_decoder(0), 2, LORA)
    _randomise_model(eager, 1)
    compiled = copy.deepcopy(eager)
    compiled.compile_regions()
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    for model in (eager, compiled):
        model.set_trainable({"integrators", "stream_weights", "head"})
        model.train()
    for seed, prefix in ((7, (11, 5)), (8, (3, 17))):
        batch = _random_batch(seed, prefix=prefix)
        labels = torch.tensor([1, 0])
        grads, logged = [], []
        with torch.no_grad():
            separate = coefficient_stats(batch, eager(batch).coefficients)  # its own no-grad forward
        for model in (eager, compiled):
            scores, stats = model(batch)
            torch.nn.functional.cross_entropy(scores, labels).backward()
            grads.append((scores.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()}))
            logged.append(coefficient_stats(batch, stats))
            model.zero_grad(set_to_none=True)
        assert len(separate) == eager.decoder.config.num_hidden_layers
        for record in logged:
            assert len(record) == len(separate)
            for got, want in zip(record, separate):
                assert got.keys() == want.keys()
                for key in ("z1_mean", "z1_max", "z2_mean", "z2_max"):
                    assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
        torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5)
        for name, want in grads[0][1].items():
            # A weight's gradient is a sum over every token of every stream, and inductor sums in another order
            # (fused, vectorised) than eager: in fp32 that moved elements by up to 4.4e-6 of the tensor's largest
            # element (measured on an AVX-512 AMD EPYC; eager with 1 vs 2 threads moved them 5.5e-7). So the
            # tolerance scales with the tensor, at 1e-4 of its largest element; a wrong gradient is off by O(1) of it.
            scale = want.abs().max().item()
            torch.testing.assert_close(grads[1][1][name], want, atol=1e-4 * scale + 1e-6, rtol=1e-4, msg=name)


def test_padding_to_a_length_multiple_changes_no_score():
    """CUDA batches are padded to a multiple of 128 tokens (fewer shapes to compile): extra padding is masked out
    (with the dense masks here; with FlexAttention's block masks in tests/test_flex.py)."""
    model = XCrossModel(tiny_decoder(0), 2, LORA)
    _randomise_model(model, 1)
    rnd = random.Random(0)
    packed = [pack([rnd.randrange(1, 100) for _ in range(n)], [[rnd.randrange(1, 100) for _ in range(3)]] * 4)
              for n in (13, 6)]
    tight, padded = collate(packed, pad_id=0), collate(packed, pad_id=0, multiple=16)
    assert tight.input_ids.shape[1] == 25 and padded.input_ids.shape[1] == 32
    with torch.no_grad():
        torch.testing.assert_close(model.score(padded), model.score(tight), atol=1e-5, rtol=0)


# -- methods built on the sources ------------------------------------------------------------------------------------


def _source_files(tmp_path, n=3):
    paths = []
    for i in range(n):
        src = _lora_model(0, adapter_seed=10 + i)
        _randomise_head(src, 20 + i)
        paths.append(tmp_path / f"s{i}.safetensors")
        save_adapter(src, paths[-1])
    return paths


def test_ensemble_at_init_equals_xcross_at_init(tmp_path):
    """The integrators-off baseline is X-Cross with z ≡ 0: the same scores as an untrained X-Cross, and it trains
    only the stream weights and the head."""
    paths = _source_files(tmp_path)
    xc, ensemble = (build_model(tiny_decoder(0), m, paths) for m in ("xcross", "ensemble"))
    batch = _random_batch(3)
    with torch.no_grad():
        torch.testing.assert_close(ensemble.score(batch), xc.score(batch), atol=1e-6, rtol=0)
    assert ensemble.integrators is None and ensemble.trainable == {"stream_weights", "head"}
    d = TINY_GEMMA["hidden_size"]
    assert parameter_report(ensemble)["trainable"] == 3 + d * d + d + d + 1  # w and the head, by hand


def test_building_a_model_leaves_the_callers_decoder_unchanged(tmp_path):
    decoder = tiny_decoder(0)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    build_model(decoder, "xcross", _source_files(tmp_path, 2))
    assert not lora_layers(decoder) and decoder.state_dict().keys() == before.keys()
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_merge_counts_one_source_rank_as_its_target_lora(tmp_path):
    """merge holds the n sources' adapters as one of rank n·r; the target LoRA it is compared with has rank r."""
    merged = build_model(tiny_decoder(0), "merge", _source_files(tmp_path, 3))
    target = build_model(tiny_decoder(0), "lora", lora=LORA)
    assert parameter_report(merged, LORA)["target_lora_equivalent"] == parameter_report(target)["trainable"]
