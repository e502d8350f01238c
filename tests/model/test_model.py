"""The SALA model against an independent float64 implementation of the spec, and its equivalences."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import sala  # noqa: F401  (registers the minicpm_sala model type)
from sala import SalaCache, SalaConfig, SalaForCausalLM
from tests.released import write_released_checkpoint
from tests.spec_reference import spec_logits


def tiny(**over) -> SalaConfig:
    return SalaConfig.from_preset("sala-tiny", **over)


def make_model(seed: int = 0, dtype=torch.float32, **over) -> SalaForCausalLM:
    torch.manual_seed(seed)
    m = SalaForCausalLM(tiny(**over)).eval().to(dtype)
    # Non-trivial norm weights, so norms that were skipped or misplaced would show.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------- config
def test_released_config_loads_unchanged(tmp_path):
    m = make_model()
    write_released_checkpoint(m, tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)          # no trust_remote_code, despite auto_map
    assert isinstance(cfg, SalaConfig)
    assert cfg.mixer_types == m.config.mixer_types
    assert cfg.sparse_config == m.config.sparse_config
    assert cfg.mup_denominator == 32                    # unknown released fields are kept


def test_9b_preset_has_released_parameter_count():
    cfg = SalaConfig.from_preset("minicpm-sala-9b")
    assert cfg.sparse_layer_ids == [0, 9, 16, 17, 22, 29, 30, 31]
    with torch.device("meta"):
        model = SalaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - 9.47) < 0.01, n
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (256, 4096)
    assert shapes["model.layers.1.self_attn.z_proj.weight"] == (4096, 4096)
    assert shapes["model.layers.1.self_attn.q_norm.weight"] == (128,)
    assert shapes["model.layers.1.self_attn.o_norm.weight"] == (4096,)
    assert shapes["model.layers.31.self_attn.o_gate.weight"] == (4096, 4096)
    assert shapes["lm_head.weight"] == (73448, 4096)


@pytest.mark.parametrize("over, match", [
    (dict(mixer_types=["minicpm4"] * 3), "mixer_types has 3 entries"),
    (dict(mixer_types=["minicpm4", "mamba", "lightning-attn", "minicpm4"]), "mixer_types\\[1\\] = 'mamba'"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(lightning_nkv=3), "multiple of lightning_nkv"),
    (dict(sparse_config={"block_size": 10}), "block_size"),
    (dict(sparse_config={"window_size": 40}), "window_size"),
    (dict(sparse_config={"topk": 0}), "topk"),
    (dict(sparse_config={"bogus": 1}), "unknown keys"),
    (dict(lightning_scale="sqrt(d)"), "lightning_scale"),
])
def test_config_validation_errors(over, match):
    with pytest.raises(ValueError, match=match):
        tiny(**over)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        SalaConfig.from_preset("nope")


# ----------------------------------------------------------------------------- against the spec
@pytest.mark.parametrize("T", [40, 150])   # 40: dense regime; 150: sparse from position 64 in sala-tiny
def test_logits_match_float64_spec(T):
    m = make_model(seed=T)
    ids = torch.randint(3, m.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        got = m(ids, use_cache=False).logits[0]
    want = spec_logits(m.config.to_dict(), m.state_dict(), ids[0].tolist())
    assert rel_err(got, want) < 1e-3
    if T > 64:   # the sparse regime really selects: fewer keys than dense for late positions
        assert m.config.sparse_config["topk"] + m.config.sparse_config["window_size"] // 16 < T // 16


def test_sparse_regime_differs_from_dense():
    """Selection must matter: the same weights with sparse attention disabled give different late logits."""
    m = make_model(seed=3)
    ids = torch.randint(3, 500, (1, 160), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sparse_logits = m(ids, use_cache=False).logits
        m.config.use_sparse_attention = False
        dense_logits = m(ids, use_cache=False).logits
    assert rel_err(sparse_logits[:, :64], dense_logits[:, :64]) < 1e-6     # dense-exact early positions
    assert rel_err(sparse_logits[:, 100:], dense_logits[:, 100:]) > 1e-4


# ----------------------------------------------------------------------------- feeding-independence
def _chunked(m, ids, chunk):
    cache = SalaCache(m.config)
    outs = []
    for s in range(0, ids.shape[1], chunk):
        outs.append(m(ids[:, s:s + chunk], past_key_values=cache, use_cache=True).logits)
    return torch.cat(outs, 1), cache


def test_one_shot_chunked_and_token_by_token_agree():
    m = make_model(seed=5, dtype=torch.float64)
    ids = torch.randint(3, 500, (1, 150), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
        for chunk in (1, 37, 150):
            got, cache = _chunked(m, ids, chunk)
            assert rel_err(got, full) < 1e-9, chunk
    assert cache.get_seq_length() == 150


def test_cache_passed_as_cache_keyword_and_read_under_either_name():
    """transformers >= 5.24 passes the cache as `cache=` and reads `outputs.cache`; older ones use past_key_values."""
    from sala.modeling import cache_keyword, output_cache

    m = make_model(seed=5, dtype=torch.float64)
    ids = torch.randint(3, 500, (1, 60), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
        cache = SalaCache(m.config)
        first = m(ids[:, :40], cache=cache, use_cache=True)
        assert output_cache(first) is cache
        rest = m(ids[:, 40:], cache=output_cache(first), use_cache=True).logits
        assert rel_err(torch.cat([first.logits, rest], 1), full) < 1e-9
        assert cache_keyword(m) == "past_key_values"   # SALA takes both; HF models name theirs
        with pytest.raises(ValueError, match="pass the cache once"):
            m(ids[:, :1], cache=SalaCache(m.config), past_key_values=SalaCache(m.config), use_cache=True)


def test_short_prompt_decoding_past_sparse_threshold():
    """A prompt in the dense regime whose decoding runs into the sparse regime (the official code's fragile case)."""
    m = make_model(seed=6, dtype=torch.float64)
    ids = torch.randint(3, 500, (1, 110), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
        cache = SalaCache(m.config)
        first = m(ids[:, :20], past_key_values=cache, use_cache=True).logits
        steps = [m(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(20, 110)]
    got = torch.cat([first] + steps, 1)
    assert rel_err(got, full) < 1e-9


def test_greedy_generation_matches_spec_token_for_token():
    m = make_model(seed=7)
    prompt = torch.randint(3, 500, (1, 70), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = m.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    seq = prompt[0].tolist()
    for _ in range(6):
        seq.append(int(spec_logits(m.config.to_dict(), m.state_dict(), seq)[-1].argmax()))
    assert out[0].tolist() == seq


def test_left_padded_batch_equals_single_rows():
    m = make_model(seed=8, dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    a = torch.randint(3, 500, (90,), generator=g)
    b = torch.randint(3, 500, (120,), generator=g)
    ids = torch.zeros(2, 120, dtype=torch.long)
    mask = torch.zeros(2, 120, dtype=torch.long)
    ids[0, 30:], mask[0, 30:] = a, 1
    ids[1], mask[1] = b, 1
    with torch.no_grad():
        batched = m(ids, attention_mask=mask, use_cache=False).logits
        ra = m(a[None], use_cache=False).logits
        rb = m(b[None], use_cache=False).logits
        assert rel_err(batched[0, 30:], ra[0]) < 1e-9
        assert rel_err(batched[1], rb[0]) < 1e-9
        gen = m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
        ga = m.generate(a[None], max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert gen[0, 30:].tolist() == ga[0].tolist()


def test_right_padding_is_refused():
    m = make_model()
    ids = torch.randint(3, 500, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, -2:] = 0
    with pytest.raises(ValueError, match="left padding only"):
        m(ids, attention_mask=mask)


def test_packed_documents_are_isolated():
    m = make_model(seed=9, dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    docs = [torch.randint(3, 500, (n,), generator=g) for n in (30, 100, 75)]
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0, 30, 130, 205], dtype=torch.int32)
    with torch.no_grad():
        got = m(packed, cu_seqlens=cu, use_cache=False).logits[0]
        for d, s in zip(docs, cu[:-1].tolist()):
            want = m(d[None], use_cache=False).logits[0]
            assert rel_err(got[s:s + len(d)], want) < 1e-9


def test_cache_reports_memory():
    m = make_model()
    _, cache = _chunked(m, torch.randint(3, 500, (1, 100)), 50)
    mem = cache.memory_bytes()
    cfg = m.config
    n_light = len(cfg.lightning_layer_ids)
    assert mem["lightning_state"] == n_light * cfg.lightning_nh * cfg.lightning_head_dim ** 2 * 4
    assert mem["sparse_kv"] >= len(cfg.sparse_layer_ids) * 2 * 100 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert mem["compressed_keys"] > 0
    assert mem["total"] == mem["lightning_state"] + mem["sparse_kv"] + mem["compressed_keys"]


# ----------------------------------------------------------------------------- checkpoints
def test_released_layout_loads_through_auto_class(tmp_path):
    m = make_model(seed=10)
    write_released_checkpoint(m, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert isinstance(loaded, SalaForCausalLM)
    ids = torch.randint(3, 500, (1, 80))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, m(ids).logits)


def test_save_pretrained_round_trip_keeps_layout(tmp_path):
    m = make_model(seed=11)
    m.save_pretrained(tmp_path / "out", max_shard_size="200KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(m.state_dict())
    back = SalaForCausalLM.from_pretrained(tmp_path / "out")
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_missing_shard_names_the_file(tmp_path):
    path = write_released_checkpoint(make_model(), tmp_path / "c")
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        AutoModelForCausalLM.from_pretrained(path)


def test_missing_key_and_wrong_shape_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    path = write_released_checkpoint(make_model(), tmp_path / "c")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key = "model.layers.1.self_attn.z_proj.weight"
    shard = path / index["weight_map"][key]
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard))
    del index["weight_map"][key]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.self_attn.z_proj.weight'"):
        SalaForCausalLM.from_pretrained(path)

    path2 = write_released_checkpoint(make_model(), tmp_path / "d")
    index = json.loads((path2 / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.k_proj.weight"
    shard = path2 / index["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key] = torch.zeros(5, 64)
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=r"k_proj.weight' has shape \[5, 64\], the config expects \[32, 64\]"):
        SalaForCausalLM.from_pretrained(path2)


def test_unknown_mixer_in_checkpoint_config(tmp_path):
    path = write_released_checkpoint(make_model(), tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["mixer_types"][2] = "mamba2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mixer_types\\[2\\] = 'mamba2' is unknown"):
        AutoModelForCausalLM.from_pretrained(path)


def test_hype_and_sparse_rope_switches_change_the_output():
    base = make_model(seed=12)
    ids = torch.randint(3, 500, (1, 50))
    with torch.no_grad():
        ref = base(ids).logits
        for over in (dict(hype_query_scale_base=500.0), dict(attn_use_rope=True)):
            other = make_model(seed=12, **over)
            assert rel_err(other(ids).logits, ref) > 1e-5


def test_forward_and_backward_under_bf16_autocast():
    """fp32 weights + autocast (the trainer's mixed precision): q/k leave the fp32 QK-norm, v the bf16 matmul."""
    m = make_model(seed=13).train()
    ids = torch.randint(3, 500, (1, 90))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids, labels=ids, use_cache=False)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert m.model.layers[1].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("gates", [True, False])
def test_fused_projections_give_the_same_logits_and_gradients(gates):
    """set_fused_projections: one real parameter per group of projections sharing an input (with and without the
    output gates); logits and every parameter gradient (split back into the released layout) as with the separate
    projections (fp32: summation order only)."""
    from sala.train.model_factory import set_fused_projections

    ids = torch.randint(3, 200, (2, 150))
    grads, logits = {}, {}
    for fused in (False, True):
        m = make_model(attn_use_output_gate=gates, use_output_gate=gates).train()
        assert set_fused_projections(m, fused) == 2 * m.config.num_hidden_layers   # attention and MLP per layer
        assert m.projections_fused == fused
        if fused:
            attn = m.model.layers[0].self_attn
            assert attn.q_proj is None and attn.qkv_proj.weight.requires_grad
            assert m.model.layers[0].mlp.gate_up_proj is not None and m.model.layers[0].mlp.gate_proj is None
        out = m(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        logits[fused] = out.logits.detach()
        grads[fused] = m.released_state_dict({n: p.grad.detach().clone() for n, p in m.named_parameters()
                                              if p.grad is not None})
    assert rel_err(logits[True], logits[False]) < 1e-6
    assert grads[True].keys() == grads[False].keys()
    assert any("o_gate" in n for n in grads[True]) == gates and any("z_proj" in n for n in grads[True]) == gates
    for n in grads[False]:
        assert rel_err(grads[True][n], grads[False][n]) < 1e-5, n


@pytest.mark.parametrize("interleave", [False, True])
def test_fused_model_saves_and_loads_the_released_layout(tmp_path, interleave):
    """fuse_projections makes real parameters; save_pretrained still writes q_proj/k_proj/v_proj/z_proj/o_gate and
    gate_proj/up_proj (the released layout), from_pretrained reads them back with the same logits; a released-layout
    state dict loads into a fused model (concatenated by the load hook); unfuse_projections restores the Linears."""
    from safetensors.torch import load_file

    m = make_model()
    ids = torch.randint(3, 200, (1, 40))
    with torch.no_grad():
        want = m(ids).logits
    released = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.fuse_projections(interleave_mlp=interleave) == 2 * m.config.num_hidden_layers
    assert "model.layers.0.self_attn.qkv_proj.weight" in m.state_dict()
    assert not any(k.endswith("q_proj.weight") for k in m.state_dict())
    with torch.no_grad():
        assert rel_err(m(ids).logits, want) < 1e-6
    m.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved.keys() == released.keys()
    for k, v in released.items():
        assert torch.equal(saved[k], v), k
    back = SalaForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)
    other = make_model(seed=5)
    other.fuse_projections(interleave_mlp=interleave)
    other.load_state_dict(released)
    with torch.no_grad():
        assert rel_err(other(ids).logits, want) < 1e-6
    assert m.unfuse_projections() == 2 * m.config.num_hidden_layers and not m.projections_fused
    assert m.state_dict().keys() == released.keys()
    for k, v in m.state_dict().items():
        assert torch.equal(v, released[k]), k


def test_chunked_loss_gives_the_same_loss_and_gradients_without_logits():
    """loss_chunk > 0: the LM head and cross-entropy over token chunks (sala.ops.linear_cross_entropy), document
    boundaries of a packed row still unlabelled; the same loss and gradients as the full-logits path, no logits."""
    ids = torch.randint(3, 200, (1, 150))
    cu = torch.tensor([0, 61, 150], dtype=torch.int32)
    res = {}
    for chunk in (0, 16):
        m = make_model().train()
        m.set_loss_chunk(chunk)
        out = m(input_ids=ids, labels=ids, cu_seqlens=cu, use_cache=False)
        assert (out.logits is None) == bool(chunk)
        out.loss.backward()
        res[chunk] = (out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(res[16][0], res[0][0], rtol=1e-6, atol=1e-6)
    assert res[16][1].keys() == res[0][1].keys()
    for n, g in res[0][1].items():
        assert rel_err(res[16][1][n], g) < 1e-5, n
