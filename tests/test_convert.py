"""`sala convert`: weight transfer exactness, stage 1, layer selection, end to end on tiny Llama / Qwen3."""
from __future__ import annotations

import json

import pytest
import torch

import sala  # noqa: F401  (registers SALA with the Auto classes)
from sala.cli import main as cli_main
from sala.convert.data import TokenSource
from sala.convert.families import read_teacher_spec, sala_config_for
from sala.convert.selection import choose_softmax_layers, parse_layer_list
from sala.convert.stage1 import build_students, relative_mse, run_stage1, run_student
from sala.convert.teacher import Teacher
from sala.convert.transfer import expand_kv, lightning_layer_init, transfer_state_dict
from sala.modeling.configuration_sala import LIGHTNING, SPARSE
from sala.modeling.modeling_sala import SalaForCausalLM

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _teacher(kind: str, path, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    torch.manual_seed(0)
    cfg = cls[0](**{**SMALL, **extra})
    model = cls[1](cfg)
    with torch.no_grad():   # random (non-trivial) norm weights and biases, so copies are really checked
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _teacher("llama", path)
    return path


def test_expand_kv_matches_repeat_kv():
    Hkv, H, D, hidden = 2, 6, 4, 5
    w = torch.randn(Hkv * D, hidden)
    big = expand_kv(w, Hkv, H, D)
    for h in range(H):   # query head h reads KV head h // G, as in transformers' repeat_kv
        assert torch.equal(big[h * D:(h + 1) * D], w[(h // (H // Hkv)) * D:(h // (H // Hkv) + 1) * D])
    with pytest.raises(ValueError, match="num_key_value_heads x head_dim"):
        expand_kv(torch.randn(7, hidden), Hkv, H, D)


def test_weight_transfer_copies_and_expands(llama_dir):
    spec = read_teacher_spec(llama_dir)
    teacher = Teacher(llama_dir)
    tsd = teacher.state_dict()
    config = sala_config_for(spec, [0, 3])
    model = SalaForCausalLM(config)
    sd = transfer_state_dict(tsd, spec, config, model.state_dict())
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.2.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight",
              "model.layers.3.post_attention_layernorm.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert torch.equal(sd[k], tsd[k]), k
    p = "model.layers.1.self_attn."
    assert config.mixer_types == [SPARSE, LIGHTNING, LIGHTNING, SPARSE]
    assert torch.equal(sd[p + "q_proj.weight"], tsd[p + "q_proj.weight"])
    assert torch.equal(sd[p + "o_proj.weight"], tsd[p + "o_proj.weight"])
    assert sd[p + "k_proj.weight"].shape == (4 * 8, 32)
    assert torch.equal(sd[p + "v_proj.weight"], expand_kv(tsd[p + "v_proj.weight"], 2, 4, 8))
    assert torch.equal(sd[p + "q_norm.weight"], torch.ones(8))          # Llama has no QK-norm
    p0 = "model.layers.0.self_attn."
    assert torch.equal(sd[p0 + "o_gate.weight"], torch.zeros_like(sd[p0 + "o_gate.weight"]))
    assert torch.equal(sd[p0 + "o_proj.weight"], 2 * tsd[p0 + "o_proj.weight"])


def test_qwen3_qk_norm_copied_into_lightning(tmp_path):
    _teacher("qwen3", tmp_path, head_dim=8)
    spec = read_teacher_spec(tmp_path)
    tsd = Teacher(tmp_path).state_dict()
    config = sala_config_for(spec, [0, 3])
    fresh = SalaForCausalLM(config).model.layers[2].self_attn.state_dict()
    sub = lightning_layer_init(tsd, spec, 2, fresh)
    assert torch.equal(sub["q_norm.weight"], tsd["model.layers.2.self_attn.q_norm.weight"])
    assert torch.equal(sub["k_norm.weight"], tsd["model.layers.2.self_attn.k_norm.weight"])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_all_softmax_conversion_reproduces_teacher_logits(tmp_path, kind):
    """All layers kept softmax, RoPE kept, dense regime: the converted network is the teacher."""
    teacher_model = _teacher(kind, tmp_path).eval()
    spec = read_teacher_spec(tmp_path)
    config = sala_config_for(spec, list(range(spec.num_layers)), keep_sparse_rope=True)
    model = SalaForCausalLM(config)
    model.load_state_dict(transfer_state_dict(Teacher(tmp_path).state_dict(), spec, config, model.state_dict()))
    ids = torch.randint(0, SMALL["vocab_size"], (2, 40))
    with torch.no_grad():
        want = teacher_model(input_ids=ids).logits
        got = model.eval()(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    # without RoPE in the sparse layers the function changes (the ablation flag matters)
    config.attn_use_rope = False
    with torch.no_grad():
        nope = model(input_ids=ids, use_cache=False).logits
    assert (nope - want).abs().max() > 1e-3


def test_stage1_alignment_loss_decreases(llama_dir):
    teacher = Teacher(llama_dir)
    spec, tsd = teacher.spec, teacher.state_dict()
    students = build_students(sala_config_for(spec, []), [1, 2],
                              lambda i, f: lightning_layer_init(tsd, spec, i, f), torch.device("cpu"))
    source = TokenSource(None, spec.vocab_size, seed=1)
    probe = source.train_batch(2, 32)

    def loss_now() -> float:
        with torch.no_grad(), teacher.capture([1, 2]) as cap:
            teacher.logits(probe)
            return sum(relative_mse(run_student(students[str(i)], cap[i][0]), cap[i][1]).item() for i in (1, 2))

    before = loss_now()
    hist = run_stage1(teacher, students, source, tokens=12 * 2 * 32, seq_len=32, batch=2, lr=1e-2,
                      show_progress=False, log_every=4)
    after = loss_now()
    assert after < 0.7 * before, (before, after)
    assert hist[-1]["loss"] < hist[0]["loss"]
    # only lightning (student) parameters trained: the teacher is untouched
    assert all(torch.equal(v, tsd[k]) for k, v in teacher.state_dict().items())


def test_layer_selection_rules():
    scores = {1: 0.5, 2: 3.0, 3: 1.0, 4: 2.0, 5: 0.1, 6: 0.0}
    assert choose_softmax_layers(scores, 8, 0.25) == [0, 7]
    assert choose_softmax_layers(scores, 8, 0.5) == [0, 2, 4, 7]
    assert choose_softmax_layers(scores, 8, 0.5, keep_ends=False) == [1, 2, 3, 4]
    assert parse_layer_list("auto", 8) is None
    assert parse_layer_list("none", 8) == []
    assert parse_layer_list("7, 0,3", 8) == [0, 3, 7]
    with pytest.raises(ValueError, match="out of range"):
        parse_layer_list("0,8", 8)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_convert_cli_end_to_end(tmp_path, kind, capsys):
    from transformers import AutoModelForCausalLM

    teacher_dir, out = tmp_path / "teacher", tmp_path / "sala"
    _teacher(kind, teacher_dir, **({"head_dim": 8} if kind == "qwen3" else {}))
    args = ["convert", "--teacher", str(teacher_dir), "--out", str(out), "--data", "random", "--seq-len", "32",
            "--batch-size", "2", "--stage1-tokens", "128", "--stage2-tokens", "64", "--no-progress",
            "--dtype", "float32"]
    assert cli_main(args) == 0
    scores = json.loads((out / "layer_scores.json").read_text())
    assert scores["softmax_layers"] == [0, 3] and set(map(int, scores["layers"])) == {1, 2}
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "SalaForCausalLM"
    assert model.config.mixer_types == [SPARSE, LIGHTNING, LIGHTNING, SPARSE]
    assert model.config.attn_use_rope is False
    gen = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)
    # a rerun finds the finished conversion and does nothing
    capsys.readouterr()
    assert cli_main(args) == 0
    assert "already holds a finished conversion" in capsys.readouterr().out


def test_convert_resumes_finished_stages(tmp_path, llama_dir, capsys):
    out = tmp_path / "sala"
    base = ["convert", "--teacher", str(llama_dir), "--out", str(out), "--data", "random", "--seq-len", "32",
            "--batch-size", "2", "--stage1-tokens", "64", "--stage2-tokens", "0", "--no-progress",
            "--softmax-layers", "none"]
    assert cli_main(base) == 0
    (out / "convert_report.json").unlink()            # pretend the final step was interrupted
    capsys.readouterr()
    assert cli_main(base) == 0
    assert "stage 1: done earlier" in capsys.readouterr().out
    (out / "convert_report.json").unlink()
    assert cli_main(base[:-2] + ["--softmax-layers", "none", "--stage1-lr", "5e-4"]) == 2
    assert "finished with other options (lr: 0.001 -> 0.0005)" in capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mixer_types"] == [LIGHTNING] * 4


def test_unsupported_architecture_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported.*llama, qwen2, qwen3, minicpm"):
        read_teacher_spec(tmp_path)
    assert cli_main(["convert", "--teacher", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "gpt2" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "model_type": "llama", "hidden_act": "silu",
                                                      "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ValueError, match="yarn"):
        read_teacher_spec(tmp_path)


def test_stages_run_under_bf16_autocast(llama_dir, monkeypatch):
    """GPU runs use bf16 autocast; CPU autocast reproduces its dtype promotions (fp32 norm weights)."""
    import sala.convert.distill as distill
    import sala.convert.stage1 as stage1

    cpu_bf16 = lambda device: torch.autocast("cpu", dtype=torch.bfloat16)   # noqa: E731
    monkeypatch.setattr(distill, "autocast", cpu_bf16)
    monkeypatch.setattr(stage1, "autocast", cpu_bf16)
    teacher = Teacher(llama_dir)
    spec, tsd = teacher.spec, teacher.state_dict()
    students = build_students(sala_config_for(spec, []), [1], lambda i, f: lightning_layer_init(tsd, spec, i, f),
                              torch.device("cpu"))
    source = TokenSource(None, spec.vocab_size)
    hist = run_stage1(teacher, students, source, tokens=64, seq_len=32, batch=2, lr=1e-3, show_progress=False)
    assert torch.isfinite(torch.tensor(hist[-1]["loss"]))
    config = sala_config_for(spec, [0, 3])
    model = SalaForCausalLM(config)
    model.load_state_dict(transfer_state_dict(tsd, spec, config, model.state_dict()))
    hist = distill.run_distill(teacher, model, source, tokens=64, seq_len=32, batch=2, lr=1e-4, show_progress=False)
    hist += distill.run_finetune(model, source, tokens=64, seq_len=32, batch=2, lr=1e-4, device=torch.device("cpu"),
                                 show_progress=False)
    assert all(torch.isfinite(torch.tensor(h.get("kl", h.get("loss")))) for h in hist)


def test_minicpm_teacher_runs_through_exact_emulation(tmp_path):
    """A MiniCPM checkpoint (no transformers class) runs as a dense SALA emulation with its muP factors."""
    import math

    llama = _teacher("llama", tmp_path).eval()
    cfg = json.loads((tmp_path / "config.json").read_text())
    L = cfg["num_hidden_layers"]
    cfg.update(model_type="minicpm", architectures=["MiniCPMForCausalLM"], scale_emb=1.0,
               scale_depth=math.sqrt(L), dim_model_base=cfg["hidden_size"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    teacher = Teacher(tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 24))
    with torch.no_grad():
        want = llama(input_ids=ids).logits
        got = teacher.logits(ids)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    with teacher.capture([1]) as cap:
        teacher.logits(ids)
    assert cap[1][0].shape == cap[1][1].shape == (1, 24, SMALL["hidden_size"])


def test_convert_hands_over_to_the_trainer(tmp_path, llama_dir, capsys):
    """`sala convert --continue-config` continues training the converted model with the trainer's stages (here a
    dense stage, then one with sparse attention on) and writes the result beside it, never into it."""
    import numpy as np

    from sala.data.packed import PackedWriter
    from sala.train.metrics import read_metrics

    w = PackedWriter(tmp_path / "data", vocab_size=96, bos_id=1, eos_id=2)
    rng = np.random.default_rng(0)
    for i in range(60):
        w.add("val" if i % 10 == 0 else "train", [1, *rng.integers(3, 96, int(rng.integers(20, 90))), 2])
    w.close()
    (tmp_path / "train.yaml").write_text(
        "stages:\n"
        "  - {name: dense, steps: 2, seq_len: 64, micro_batch: 2, warmup_steps: 1, sparse: false}\n"
        "  - {name: long, steps: 2, seq_len: 128, micro_batch: 1, decay: exponential, lr_end: 1.0e-5, sparse: true}\n"
        "optim: {lr: 1.0e-3}\nprogress: false\nlog_every: 1\neval_windows: 1\n")
    out = tmp_path / "sala"
    args = ["convert", "--teacher", str(llama_dir), "--out", str(out), "--data", "random", "--seq-len", "32",
            "--batch-size", "2", "--stage1-tokens", "64", "--stage2-tokens", "64", "--no-progress",
            "--dtype", "float32",
            "--sparse-config", '{"dense_len": 64, "block_size": 16, "kernel_size": 8, "kernel_stride": 4, "topk": 2, '
                               '"window_size": 32}',
            "--continue-config", str(tmp_path / "train.yaml"), "--continue-set", f"data.path={tmp_path / 'data'}"]
    before = (out / "model.safetensors").read_bytes() if (out / "model.safetensors").exists() else None
    assert cli_main(args) == 0
    assert before is None
    converted = (out / "model.safetensors").read_bytes()
    cont = tmp_path / "sala-continued"
    steps = [r for r in read_metrics(cont / "metrics.jsonl") if "step_loss" in r]
    assert [r["stage_name"] for r in steps] == ["dense", "dense", "long", "long"]
    final = SalaForCausalLM.from_pretrained(str(cont / "final"))
    assert final.config.use_sparse_attention is True
    conv = SalaForCausalLM.from_pretrained(str(out))
    changed = [n for (n, a), (_, b) in zip(conv.state_dict().items(), final.state_dict().items())
               if not torch.equal(a, b.to(a.dtype))]
    assert changed, "continual training changed no weight"
    assert (out / "model.safetensors").read_bytes() == converted   # the converted checkpoint is left as it was


def test_token_source_doc_start_share(tmp_path):
    """`doc_start_share` puts that share of the rows at document starts (whole short documents); the other rows
    keep their random offsets; values outside [0, 1] are refused."""
    import numpy as np

    from sala.data.packed import PackedWriter

    w = PackedWriter(tmp_path / "data", vocab_size=96, bos_id=1, eos_id=2)
    rng = np.random.default_rng(0)
    for _ in range(200):
        w.add("train", [1, *rng.integers(3, 96, int(rng.integers(10, 40))), 2])
    w.close()
    src = TokenSource(tmp_path / "data", 96, seed=3)
    aligned = src.train_batch(8, 32, doc_start_share=1.0)
    assert (aligned[:, 0] == 1).all()                      # every row begins with a document's BOS
    mixed = TokenSource(tmp_path / "data", 96, seed=3).train_batch(64, 32, doc_start_share=0.25)
    assert (mixed[:16, 0] == 1).all() and (mixed[16:, 0] != 1).any()
    with pytest.raises(ValueError, match="doc_start_share"):
        src.train_batch(2, 32, doc_start_share=1.5)
