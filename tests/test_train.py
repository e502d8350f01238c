"""Trainer: config parsing/validation, LR schedules, learning, exact resume, stages (CPU)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sala.train import StageConfig, Trainer, load_config, schedule, stage_lr
from sala.train.metrics import read_metrics

LLAMA_TINY = ("model.config={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
              "num_key_value_heads: 1}")


@pytest.fixture(scope="module")
def packed(tmp_path_factory, prepare_in):
    root = tmp_path_factory.mktemp("train")
    folder = root / "docs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        # repetitive text: easy to learn in a few steps
        n = int(rng.integers(10, 60))
        (folder / f"d{i}.txt").write_text(" ".join(["alpha beta gamma delta"] * n) + f" end {i}\n")
    report = prepare_in(root, "packed", ["docs"], val_fraction=0.15, seed=0)
    assert report.splits["val"]["tokens"] >= 4 * 65, report.splits      # room for eval windows of 64 tokens
    return root / "packed"


def _cfg(packed, out, *extra):
    return load_config(None, [f"data.path={packed}", f"out_dir={out}", "progress=false", "log_every=1",
                              "save_final=false", "eval_windows=2", *extra])


# ----------------------------------------------------------------------------- config
def test_overrides_and_types(tmp_path):
    cfg = load_config(None, ["data.path=x", "optim.lr=3e-4", "stages.0.steps=7", "model.kind=llama",
                             "optim.betas=[0.8, 0.9]", "model.config.hidden_size=48", "resume=false"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.stages[0].steps == 7 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.config == {"hidden_size": 48} and cfg.resume is False
    yml = tmp_path / "c.yaml"
    yml.write_text("data: {path: d}\nstages:\n  - {steps: 5, decay: exponential, lr_end: 1.0e-5}\n"
                   "  - {steps: 3, sparse: true}\n")
    cfg = load_config(str(yml), ["stages.1.seq_len=64"])
    assert [s.steps for s in cfg.stages] == [5, 3] and cfg.stages[1].seq_len == 64 and cfg.stages[1].sparse


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key.*'lrr'"),
    ("stages.0.steps=0", "steps must be >= 1"),
    ("stages.0.decay=exponential", "needs lr_end"),
    ("stages.0.decay=sideways", "decay must be one of"),
    ("stages.3.steps=1", "has 1 items"),
    ("stages.0.trainable=['(']", "not a valid regular expression"),
    ("model.kind=gpt", "model.kind must be one of"),
    ("stages.0.steps=abc", "expected an integer"),
    ("max_nonfinite_steps=-1", "max_nonfinite_steps must be >= 0"),
    ("model.compile_loss=true", "needs model.compile: true"),
    ("model.compile_loss=true model.compile=true model.loss_chunk=64", "choose one"),
    ("model.compile_blocks=true", "compile_blocks chooses how the model is compiled"),
])
def test_invalid_config_is_a_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["data.path=x", *override.split()])


# ----------------------------------------------------------------------------- schedule
def test_warmup_stable_exponential_decay_shape():
    stages = [StageConfig(steps=10, warmup_steps=4, lr=1.0),
              StageConfig(steps=6, decay="exponential", lr=1.0, lr_end=0.05)]
    lrs = schedule(stages, default_lr=9.0)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])           # linear warmup
    assert lrs[4:10] == [1.0] * 6                                      # stable
    decay = lrs[10:]
    assert decay[0] == pytest.approx(1.0) and decay[-1] == pytest.approx(0.05)
    ratios = [b / a for a, b in zip(decay[:-1], decay[1:])]
    assert ratios == pytest.approx([0.05 ** (1 / 5)] * 5)              # geometric = exponential decay


def test_wsd_within_one_stage_and_other_decays():
    st = StageConfig(steps=20, warmup_steps=2, decay="linear", decay_steps=5, lr=2.0, lr_end=0.0)
    lrs = [stage_lr(st, i, 1.0) for i in range(20)]
    assert lrs[2:15] == [2.0] * 13 and lrs[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[15:], lrs[16:]))
    cos = StageConfig(steps=11, decay="cosine", lr=1.0, lr_end=0.0)
    assert stage_lr(cos, 5, 1.0) == pytest.approx(0.5)                  # half-way point of a cosine
    assert stage_lr(StageConfig(steps=3), 1, 0.7) == 0.7                # default LR from optim.lr


# ----------------------------------------------------------------------------- training
def test_few_steps_lower_the_loss_sala_tiny(packed, tmp_path):
    cfg = _cfg(packed, tmp_path / "run", "model.kind=sala", "model.preset=sala-tiny", "stages.0.steps=8",
               "stages.0.seq_len=64", "stages.0.micro_batch=2", "optim.lr=1e-2", "resume=false")
    tr = Trainer(cfg, log=lambda s: None)
    summary = tr.fit()
    losses = [r["step_loss"] for r in tr.history if "step_loss" in r]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 1.0, losses
    assert summary["val_loss"] is not None and math.isfinite(summary["val_loss"])
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("kind", ["sala", "llama"])
def test_bf16_residual_precision_keeps_the_stream_bf16_and_learns(packed, tmp_path, kind):
    """precision bf16-residual: fp32 weights, bf16 autocast, and bf16 hidden states between the layers; its
    first-step loss matches plain bf16 autocast (fp32 stream) closely and training lowers it."""
    import torch

    extra = ["model.preset=sala-tiny"] if kind == "sala" else ["model.preset=null", LLAMA_TINY]
    losses = {}
    for precision in ("bf16", "bf16-residual"):
        cfg = _cfg(packed, tmp_path / precision, f"model.kind={kind}", *extra, "stages.0.steps=6",
                   "stages.0.seq_len=64", "stages.0.micro_batch=2", "optim.lr=1e-2", "resume=false",
                   f"precision={precision}")
        tr = Trainer(cfg, log=lambda s: None)
        seen = []
        layers = tr.model.model.layers
        handle = layers[len(layers) // 2].register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(args[0].dtype if args else kwargs["hidden_states"].dtype),
            with_kwargs=True)
        tr.fit()
        handle.remove()
        assert {p.dtype for p in tr.model.parameters()} == {torch.float32}
        assert set(seen) == ({torch.bfloat16} if precision == "bf16-residual" else {torch.float32}), seen
        losses[precision] = [r["step_loss"] for r in tr.history if "step_loss" in r]
    first, res = losses["bf16"], losses["bf16-residual"]
    assert abs(res[0] - first[0]) < 0.02 * first[0], (first, res)
    assert res[-1] < res[0] - 0.5, res


def test_exact_resume_matches_uninterrupted_run(packed, tmp_path):
    common = ["model.kind=llama", LLAMA_TINY, "stages.0.steps=3", "stages.0.seq_len=32", "stages.0.micro_batch=2",
              "stages.0.grad_accum=2", "stages.0.warmup_steps=2", "optim.lr=5e-3",
              "stages=[{steps: 3, seq_len: 32, micro_batch: 2, grad_accum: 2, warmup_steps: 2},"
              " {steps: 3, seq_len: 32, micro_batch: 2, decay: exponential, lr_end: 1.0e-4}]"]
    full = Trainer(_cfg(packed, tmp_path / "a", *common), log=lambda s: None)
    full.fit()
    ref = [(r["step"], r["step_loss"], r["lr"])
           for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "step_loss" in r]
    assert len(ref) == 6
    # interrupted after step 5: the newest checkpoint is the one written at the stage boundary (step 3)
    first = Trainer(_cfg(packed, tmp_path / "b", *common, "stop_after=5"), log=lambda s: None)
    assert first.fit()["stopped_early"]
    resumed = Trainer(_cfg(packed, tmp_path / "b", *common), log=lambda s: None)
    assert resumed.state["global_step"] == 3 and resumed.state["stage"] == 1
    resumed.fit()
    got = [(r["step"], r["step_loss"], r["lr"])
           for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "step_loss" in r]
    assert [g[0] for g in got] == [1, 2, 3, 4, 5, 6]
    for (s1, l1, lr1), (s2, l2, lr2) in zip(ref, got):
        assert s1 == s2 and lr1 == lr2
        assert l2 == pytest.approx(l1, rel=1e-6, abs=1e-6), (s1, l1, l2)


def test_trainable_groups_freeze_the_rest(packed, tmp_path):
    cfg = _cfg(packed, tmp_path / "run", "model.kind=llama", LLAMA_TINY, "stages.0.steps=2", "stages.0.seq_len=32",
               "stages.0.trainable=['self_attn']", "resume=false")
    tr = Trainer(cfg, log=lambda s: None)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.fit()
    for n, p in tr.model.named_parameters():
        changed = not bool((p.detach() == before[n]).all())
        assert changed == ("self_attn" in n), n
    bad = _cfg(packed, tmp_path / "run2", "model.kind=llama", LLAMA_TINY, "stages.0.trainable=['nothing_here']")
    with pytest.raises(ValueError, match="match no parameter"):
        Trainer(bad, log=lambda s: None).fit()


def test_missing_dataset_is_a_clear_error(tmp_path):
    cfg = load_config(None, [f"data.path={tmp_path}/none", f"out_dir={tmp_path}/o"])
    with pytest.raises(FileNotFoundError, match="sala data prepare"):
        Trainer(cfg, log=lambda s: None)


def test_fsdp2_two_cpu_ranks_match_one_process(packed, tmp_path):
    """torchrun with 2 gloo ranks (FSDP2) follows the single-process loss curve with the same global batch."""
    import os
    import subprocess
    import sys

    common = [f"data.path={packed}", "progress=false", "log_every=1", "save_final=false", "model.kind=llama",
              LLAMA_TINY, "stages.0.steps=3", "stages.0.seq_len=32", "optim.lr=5e-3", "resume=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "sala.cli", "train", "/dev/null", f"out_dir={tmp_path}/ddp", "stages.0.micro_batch=2", *common]
    # a config file is required: use an empty YAML
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    cmd[cmd.index("/dev/null")] = str(empty)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    single = Trainer(load_config(str(empty), [f"out_dir={tmp_path}/one", "stages.0.micro_batch=2",
                                              "stages.0.grad_accum=2", *common]), log=lambda s: None)
    single.fit()
    a = [r["step_loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "step_loss" in r]
    b = [r["step_loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "step_loss" in r]
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("fused, compile_loss, blocks", [(False, False, False), (True, False, False),
                                                          (False, True, False), (False, False, True),
                                                          (True, True, True)])
def test_compile_for_training_keeps_loss_and_gradients(fused, compile_loss, blocks):
    """The compiled pieces (norms, MLPs, attention prepare/finish, with compile_loss the LM head + loss; with blocks
    each layer's two regions around its attention op) give the eager model's loss and gradients on a packed batch,
    with separate or fused projections (compiled model only); the attention ops themselves stay eager (backend
    'eager' keeps this test fast on the CPU)."""
    import copy

    import torch

    from sala import SalaConfig, SalaForCausalLM
    from sala.train.compile import compile_for_training
    from sala.train.model_factory import set_fused_projections

    torch.manual_seed(0)
    cfg = SalaConfig.from_preset("sala-tiny")
    cfg.hype_query_scale_base = 64.0   # exercise HyPE in the compiled prepare
    eager = SalaForCausalLM(cfg).float()
    twin = copy.deepcopy(eager)
    set_fused_projections(twin, fused)
    compiled = compile_for_training(twin, backend="eager", compile_loss=compile_loss, blocks=blocks)
    assert compiled.loss_only == compile_loss and not eager.loss_only
    layer = compiled.model.layers[1]
    assert compiled.model.layers[0].input_layernorm._compiled_call_impl is not None
    if blocks:   # two regions per layer, the pieces not compiled on their own
        assert layer.use_blocks and "pre_attention" in vars(layer) and "post_attention" in vars(layer)
        assert "prepare" not in vars(layer.self_attn) and layer.mlp._compiled_call_impl is None
    else:
        assert not layer.use_blocks and layer.self_attn.prepare is not eager.model.layers[1].self_attn.prepare
        assert layer.mlp._compiled_call_impl is not None
        # each residual add with the norm after it, compiled per norm
        assert "add_and_norm" in vars(layer.post_attention_layernorm) and "add_and_norm" in vars(compiled.model.norm)
    import torch._dynamo.config as dynamo_config
    assert dynamo_config.recompile_limit >= 64
    ids = torch.randint(3, cfg.vocab_size, (1, 96))
    cu = torch.tensor([0, 40, 96], dtype=torch.int32)
    losses = []
    for m in (eager, compiled):
        out = m(input_ids=ids, labels=ids, cu_seqlens=cu, use_cache=False)
        assert (out.logits is None) == (m is compiled and compile_loss)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    grads = [m.released_state_dict({n: p.grad for n, p in m.named_parameters()}) for m in (eager, compiled)]
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], msg=name)


def test_fused_projections_norms_emit_the_autocast_dtype_with_the_same_values():
    """With fused projections, under autocast the decoder layers' norms emit bf16 (what their one GEMM each would
    cast to): the loss and every gradient equal the model whose norms emit fp32; outside autocast, and the final
    norm, stay fp32; unfused (several GEMMs, whose input gradients add up in fp32) they stay fp32."""
    import copy

    import torch

    from sala import SalaConfig, SalaForCausalLM
    from sala.train.model_factory import set_fused_projections

    torch.manual_seed(0)
    cfg = SalaConfig.from_preset("sala-tiny")
    new = SalaForCausalLM(cfg).float()
    assert new.model.layers[0].input_layernorm.output_mode == "promote"
    set_fused_projections(new, True)
    old = copy.deepcopy(new)
    old.set_norm_output_mode("promote")
    layer = new.model.layers[0]
    x = torch.randn(1, 8, cfg.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.input_layernorm(x).dtype == torch.bfloat16
        assert layer.post_attention_layernorm(x).dtype == torch.bfloat16
        assert new.model.norm(x).dtype == torch.float32
    assert layer.input_layernorm(x).dtype == torch.float32
    ids = torch.randint(3, cfg.vocab_size, (1, 64))
    cu = torch.tensor([0, 30, 64], dtype=torch.int32)
    losses = []
    for m in (old, new):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(input_ids=ids, labels=ids, cu_seqlens=cu, use_cache=False)
        out.loss.backward()
        losses.append(out.loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, a), (_, b) in zip(old.named_parameters(), new.named_parameters()):
        assert torch.equal(a.grad, b.grad), name
    set_fused_projections(new, False)
    assert layer.input_layernorm.output_mode == layer.post_attention_layernorm.output_mode == "promote"
    assert not new.projections_fused


def test_fused_mlp_layouts_give_the_separate_projections_values():
    """SalaMLP with fused projections, gate/up rows interleaved (the default) or concatenated, equals the separate
    gate and up GEMMs: output and every gradient."""
    import copy

    import torch

    from sala import SalaConfig
    from sala.modeling.modeling_sala import SalaMLP

    torch.manual_seed(0)
    plain = SalaMLP(SalaConfig.from_preset("sala-tiny")).double()
    x = torch.randn(2, 7, plain.gate_proj.in_features, dtype=torch.float64)
    outs = []
    for fused, interleave in ((False, True), (True, True), (True, False)):
        m = copy.deepcopy(plain)
        if fused:
            m.fuse_projections(interleave=interleave)
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
        if fused:   # the gate_up gradient split back into gate and up (the layout's rows)
            g = m.gate_up_proj.weight.grad
            gate, up = (g[0::2], g[1::2]) if interleave else g.chunk(2)
            grads = [gate, up, m.down_proj.weight.grad]
        else:
            grads = [m.gate_proj.weight.grad, m.up_proj.weight.grad, m.down_proj.weight.grad]
        outs.append((y.detach(), xi.grad, grads))
    for y, gx, gp in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, outs[0][1], rtol=1e-12, atol=1e-12)
        for a, b in zip(gp, outs[0][2]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_compiled_blocks_under_autocast_match_the_layers():
    """Under bf16 autocast, with fused projections (norms emitting bf16) and a bf16 residual stream, the layers run
    as compiled blocks give the plain layers' loss and gradients exactly (backend 'eager': the same ops)."""
    import copy

    import torch

    from sala import SalaConfig, SalaForCausalLM
    from sala.train.compile import compile_for_training
    from sala.train.model_factory import set_fused_projections
    from sala.train.trainer import bf16_residual_stream

    torch.manual_seed(0)
    plain = SalaForCausalLM(SalaConfig.from_preset("sala-tiny")).float()
    set_fused_projections(plain, True)
    blocks = copy.deepcopy(plain)
    compile_for_training(blocks, backend="eager", blocks=True)
    ids = torch.randint(3, plain.config.vocab_size, (1, 80))
    cu = torch.tensor([0, 33, 80], dtype=torch.int32)
    losses = []
    for m in (plain, blocks):
        bf16_residual_stream(m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids, cu_seqlens=cu, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, a), (name_b, b) in zip(plain.named_parameters(), blocks.named_parameters()):
        assert name == name_b and torch.equal(a.grad, b.grad), name


def test_time_limit_stops_saves_and_resumes(packed, tmp_path):
    """Past time_limit_s the run stops after the current step, saves a checkpoint and the final model, and a
    later run without the limit resumes from that step."""
    common = ["model.kind=llama", LLAMA_TINY, "stages.0.steps=4", "stages.0.seq_len=32", "stages.0.micro_batch=2"]
    tr = Trainer(_cfg(packed, tmp_path / "t", *common, "time_limit_s=0", "save_final=true"), log=lambda s: None)
    summary = tr.fit()
    assert summary["time_limit_reached"] and summary["global_step"] == 1 and summary["val_loss"] is not None
    assert (tmp_path / "t" / "final" / "config.json").is_file()
    resumed = Trainer(_cfg(packed, tmp_path / "t", *common), log=lambda s: None)
    assert resumed.state["global_step"] == 1
    assert resumed.fit()["global_step"] == 4


def test_stage_end_kept_and_a_branch_resumes_from_it(packed, tmp_path):
    """keep_stage_ends keeps each stage's last checkpoint out of pruning; resume_from starts another run there, and
    with the same stages that run's steps equal the original's (a branch with other data diverges from it)."""
    common = ["model.kind=llama", LLAMA_TINY, "optim.lr=5e-3", "keep_checkpoints=1",
              "stages=[{name: stable, steps: 3, seq_len: 32, micro_batch: 2, warmup_steps: 2},"
              " {name: decay, steps: 3, seq_len: 32, micro_batch: 2, decay: exponential, lr_end: 1.0e-4}]"]
    Trainer(_cfg(packed, tmp_path / "main", *common, "keep_stage_ends=true"), log=lambda s: None).fit()
    ends = tmp_path / "main" / "stage_ends"
    assert sorted(p.name for p in ends.iterdir()) == ["0_stable", "1_decay"]
    assert [p.name for p in (tmp_path / "main" / "checkpoints").iterdir() if p.is_dir()] == ["step_00000006"]
    ref = [(r["step"], r["step_loss"]) for r in read_metrics(tmp_path / "main" / "metrics.jsonl") if "step_loss" in r]

    branch = Trainer(_cfg(packed, tmp_path / "branch", *common, f"resume_from={ends / '0_stable'}"), log=lambda s: None)
    assert branch.state["global_step"] == 3 and branch.state["stage"] == 1
    branch.fit()
    got = [(r["step"], r["step_loss"]) for r in read_metrics(tmp_path / "branch" / "metrics.jsonl") if "step_loss" in r]
    assert [s for s, _ in got] == [4, 5, 6]
    for (s1, l1), (s2, l2) in zip(ref[3:], got):
        assert s1 == s2 and l2 == pytest.approx(l1, rel=1e-6, abs=1e-6)

    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        Trainer(_cfg(packed, tmp_path / "bad", *common, f"resume_from={tmp_path}"), log=lambda s: None)
    with pytest.raises(ValueError, match="beyond this config"):   # the checkpoint's stage does not exist here
        Trainer(_cfg(packed, tmp_path / "short", "model.kind=llama", LLAMA_TINY, "stages.0.steps=2",
                     f"resume_from={ends / '1_decay'}"), log=lambda s: None)


def test_resume_into_a_stage_shortened_to_the_checkpoint(packed, tmp_path):
    """A stage shortened (after a checkpoint) to end exactly where the checkpoint stands is over: the resumed run
    goes on with the next stage at once (no loop, no extra step), keeps that stage's end, and its later steps equal
    a run planned with the shorter stage from the start."""
    def common(stable_steps: int) -> list[str]:
        return ["model.kind=llama", LLAMA_TINY, "optim.lr=5e-3", "keep_stage_ends=true",
                f"stages=[{{name: stable, steps: {stable_steps}, seq_len: 32, micro_batch: 2, warmup_steps: 1}},"
                " {name: decay, steps: 2, seq_len: 32, micro_batch: 2, decay: exponential, lr_end: 1.0e-4}]"]

    first = Trainer(_cfg(packed, tmp_path / "run", *common(6), "stop_after=3"), log=lambda s: None)
    first.fit()
    first.save_checkpoint()   # a stop_after run does not checkpoint by itself
    logs: list[str] = []
    resumed = Trainer(_cfg(packed, tmp_path / "run", *common(3)), log=logs.append)
    assert resumed.state["stage"] == 0 and resumed.state["stage_step"] == 3
    assert resumed.fit()["global_step"] == 5
    assert any("ends at step 3, where the checkpoint stands" in line for line in logs)
    assert (tmp_path / "run" / "stage_ends" / "0_stable").is_dir()
    got = [(r["step"], r["stage_name"], r["step_loss"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
           if "step_loss" in r]
    Trainer(_cfg(packed, tmp_path / "ref", *common(3)), log=lambda s: None).fit()
    ref = [(r["step"], r["stage_name"], r["step_loss"]) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")
           if "step_loss" in r]
    assert [(s_, n) for s_, n, _ in got] == [(1, "stable"), (2, "stable"), (3, "stable"), (4, "decay"), (5, "decay")]
    for (_, _, a), (_, _, b) in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("option", ["model.fuse_projections=true", "model.loss_chunk=24"])
def test_throughput_options_train_the_same_model(packed, tmp_path, option):
    """model.fuse_projections (q/k/v/gate and gate/up as one GEMM each) and model.loss_chunk (the loss over token
    chunks, no full logits): the same losses step for step as without (fp32 on the CPU: only summation orders
    differ), and both are refused for a non-SALA model."""
    common = ["model.kind=sala", "model.preset=sala-tiny", "stages.0.steps=4", "stages.0.seq_len=64",
              "stages.0.micro_batch=2", "optim.lr=1e-2", "resume=false", "stages.0.sparse=true"]
    runs = {}
    for on in (False, True):
        tr = Trainer(_cfg(packed, tmp_path / str(on), *common, *([option] if on else [])), log=lambda s: None)
        if option.startswith("model.fuse"):
            assert tr.model.projections_fused == on
        else:
            assert tr.model.loss_chunk == (24 if on else 0)
        summary = tr.fit()
        runs[on] = [r["step_loss"] for r in tr.history if "step_loss" in r] + [summary["val_loss"]]
    assert len(runs[True]) == 5
    assert runs[True] == pytest.approx(runs[False], rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match=f"{option.split('=')[0]} is for SALA"):
        Trainer(_cfg(packed, tmp_path / "llama", "model.kind=llama", LLAMA_TINY, option), log=lambda s: None)


def _poison_losses(trainer, poisoned_calls):
    """Make the loss of the given forward calls (0-based) NaN; record the parameters around every optimizer step."""
    import torch

    calls, snapshots = [0], []
    forward, step = trainer._forward_loss, trainer._optimizer_step

    def forward_loss(batch):
        loss = forward(batch)
        calls[0] += 1
        return loss * float("nan") if calls[0] - 1 in poisoned_calls else loss

    def optimizer_step():
        before = [p.detach().clone() for p in trainer.model.parameters()]
        norm = step()
        after = [p.detach().clone() for p in trainer.model.parameters()]
        steps = {int(s["step"]) for s in trainer.optimizer.state.values() if "step" in s}
        snapshots.append((all(torch.equal(x, y) for x, y in zip(before, after)), steps))
        return norm

    trainer._forward_loss, trainer._optimizer_step = forward_loss, optimizer_step
    return snapshots


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_step_is_skipped_and_reported(packed, tmp_path, fused):
    """A step whose loss is NaN leaves weights and AdamW state as they were, is named in the metrics log and the
    summary, and training goes on with finite losses. fused: the fused AdamW the trainer uses on a GPU, which skips
    the update on the device (GradScaler's found_inf) instead of after a host check."""
    import torch

    t = Trainer(_cfg(packed, tmp_path / "r", "model.kind=llama", LLAMA_TINY, "stages.0.steps=4",
                     "stages.0.seq_len=32", "stages.0.micro_batch=2", "optim.lr=5e-3", "log_every=2"),
                log=lambda s: None)
    if fused:
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in t.optimizer.param_groups]
        t.optimizer = torch.optim.AdamW(groups, lr=5e-3, fused=True)
        assert t.optimizer._step_supports_amp_scaling
    snapshots = _poison_losses(t, {1})
    summary = t.fit()
    unchanged = [u for u, _ in snapshots]
    assert unchanged == [False, True, False, False]
    assert [sorted(s) for _, s in snapshots] == [[1], [1], [2], [3]]      # the skipped step is not counted
    recs = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "step_loss" in r]
    assert [r.get("skipped_steps") for r in recs] == [[2], None]
    assert math.isfinite(recs[-1]["step_loss"]) and summary["skipped_steps"] == 1
    # which gradients went non-finite: the NaN loss reaches every parameter; named in the log line and the metrics
    names = [n for n, _ in t.model.named_parameters()]
    assert recs[0]["nonfinite_params"] == {"2": names[:20]} and t.nonfinite_params[2] == names


def test_trainer_clipping_equals_clip_grad_norm(packed, tmp_path):
    """The trainer's clipping (clip_grad_norm_'s arithmetic, keeping each parameter's norm) scales the gradients
    as torch.nn.utils.clip_grad_norm_ does and returns the same total norm."""
    import torch

    t = Trainer(_cfg(packed, tmp_path / "c", "model.kind=llama", LLAMA_TINY, "optim.grad_clip=0.5"),
                log=lambda s: None)
    torch.manual_seed(1)
    params = [p for p in t.model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    seen = []

    class Capture:   # stands in for the optimizer: records the gradients it would apply
        param_groups = t.optimizer.param_groups

        def step(self):
            seen.extend(p.grad.clone() for p in params)

        def zero_grad(self, set_to_none=True):
            for p in params:
                p.grad = None

    t.optimizer, t.scaler = Capture(), None
    norm, (names, finite) = t._optimizer_step()
    ref = [g.clone() for g in grads]
    ref_params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(ref_params, ref):
        p.grad = g
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
    torch.testing.assert_close(norm, ref_norm)
    for a, p in zip(seen, ref_params):
        torch.testing.assert_close(a, p.grad)
    assert names == [n for n, _ in t.model.named_parameters()] and bool(finite.all())


def test_nonfinite_steps_in_a_row_stop_the_run(packed, tmp_path):
    t = Trainer(_cfg(packed, tmp_path / "r", "model.kind=llama", LLAMA_TINY, "stages.0.steps=6",
                     "stages.0.seq_len=32", "stages.0.micro_batch=2", "max_nonfinite_steps=2", "log_every=3"),
                log=lambda s: None)
    _poison_losses(t, {1, 2, 3, 4, 5})
    with pytest.raises(FloatingPointError, match=r"3 steps in a row \(2\.\.4\).*weights are those after step 1"):
        t.fit()


@pytest.mark.parametrize("option", ["fuse_projections", "loss_chunk", "compile_loss", "compile_blocks"])
def test_sala_only_options_are_refused_for_another_model(option):
    """The SALA-only throughput options name themselves when the model is not a SALA model."""
    import torch

    from sala.train.config import ModelConfig
    from sala.train.model_factory import apply_throughput_options

    spec = ModelConfig(kind="llama", **{option: 64 if option == "loss_chunk" else True})
    with pytest.raises(ValueError, match=f"model.{option} is for SALA models"):
        apply_throughput_options(torch.nn.Linear(2, 2), spec)
