"""The training loop: stages back to back, grad accumulation, bf16 autocast, packed documents,
FSDP2 under torchrun, atomic checkpoints with exact resume, tqdm progress and JSONL metrics.

    from sala.train import Trainer, load_config
    Trainer(load_config("configs/train/sala_tiny_cpu.yaml", ["stages.0.steps=20"])).fit()
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sala.data.batching import collate_windows, num_loss_tokens
from sala.data.packed import PackedDataset, Window, read_meta
from sala.train import checkpoint as ckpt
from sala.train.compile import compile_for_training
from sala.train.config import StageConfig, TrainConfig, run_differences
from sala.train.distributed import DistEnv, all_reduce_sum, barrier, setup, shard_model
from sala.train.flops import peak_tflops, train_step_flops
from sala.train.metrics import MetricsLog
from sala.train.model_factory import apply_throughput_options, build_model, is_sala, set_sparse_attention
from sala.train.schedule import stage_lr
from sala.utils.errors import ResumeMismatchError, check_writable_dir

logger = logging.getLogger(__name__)


def set_trainable(model: torch.nn.Module, patterns: list[str] | None) -> int:
    """requires_grad = name matches any regex of `patterns` (all parameters when None); returns the
    number of trainable parameters. Raises ValueError when nothing matches."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(patterns is None or any(re.search(pat, name) for pat in patterns))
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        names = [name for name, _ in model.named_parameters()][:6]
        raise ValueError(f"trainable patterns {patterns} match no parameter (names look like {names} ...)")
    return n


def _doc_lengths(w: Window) -> list[int]:
    bounds = list(w.doc_starts) + [len(w.tokens)]
    return [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def bf16_residual_stream(model: torch.nn.Module):
    """Precision "bf16-residual": cast the input embedding's output to bf16, so the residual stream between the
    layers is bf16 under autocast while weights stay as they are. Returns the hook handle (`.remove()` undoes it)."""
    return model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.to(torch.bfloat16))


class Trainer:
    """Trains `config.model` on `config.data` through `config.stages`.

    `model` may be passed in (e.g. a converted model) instead of being built from the config.
    `fit()` returns a summary dict (final step, last losses, held-out loss, tokens, seconds); SIGTERM or SIGINT
    during `fit()` saves a checkpoint after the current step and returns (summary "interrupted_by").
    Resuming checks that the checkpoint's run had the same defining options (`run_differences`);
    `overwrite=True` starts again instead, and the older checkpoints go once the new run saved its first.
    """

    def __init__(self, config: TrainConfig, model: torch.nn.Module | None = None,
                 log: Callable[[str], None] | None = None, overwrite: bool = False):
        self.cfg = config
        self.env: DistEnv = setup(config.device)
        self._log = log or logger.info
        self.out_dir = Path(config.out_dir)
        if self.env.is_main:   # before any work: a run that cannot save is refused now, not at its first checkpoint
            check_writable_dir(self.out_dir, "training output folder (out_dir)")
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.meta = read_meta(config.data.path or config.stages[0].data)
        if model is None:
            model = build_model(config.model, vocab_size=self.meta["vocab_size"], bos_id=self.meta.get("bos_id"),
                                eos_id=self.meta.get("eos_id"), pad_id=self.meta.get("eos_id"))
        apply_throughput_options(model, config.model)
        torch.manual_seed(config.seed + self.env.rank)
        np.random.seed((config.seed + self.env.rank) % 2**32)
        self.sala = is_sala(model)
        self.layout = "flat" if self.sala else "rows"
        self.num_params = sum(p.numel() for p in model.parameters())
        self._flops_model = model  # parameter counts are taken before sharding
        self._linear_flops_cache: dict = {}
        if config.precision == "bf16-pure":
            model.to(torch.bfloat16)
        if config.precision == "bf16-residual":
            bf16_residual_stream(model)
        model.to(self.env.device)
        if config.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if hasattr(model.config, "use_cache"):
                model.config.use_cache = False
        if self.env.distributed:
            shard_model(model, self.env)
        self.model = model
        # (name, parameter) of the model as trained (after sharding), read by every optimizer step
        self._named_params = list(model.named_parameters())
        self.forward_model = (compile_for_training(model, compile_loss=config.model.compile_loss,
                                                   blocks=config.model.compile_blocks)
                              if config.model.compile else model)
        decay, no_decay = [], []
        for name, p in self._named_params:
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
        o = config.optim
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.env.device.type == "cuda" and not self.env.distributed
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=fused or None)
        # A step whose loss or gradients are not finite is skipped, not applied: on one device a GradScaler held at
        # scale 1 finds the inf/NaN and the optimizer skips the update on the device (no host sync per step; the
        # values of finite steps are unchanged); under FSDP2 the all-reduced gradient norm decides on every rank.
        self.scaler = None
        if not self.env.distributed:
            self.scaler = torch.amp.GradScaler(self.env.device.type, init_scale=1.0, growth_interval=2**30)
            self.scaler.scale(torch.ones((), device=self.env.device))   # allocates its scale on the device
        # per step: step, stage, data position, finite?, and (one process) (names, finite?) of the gradients
        self._pending_finite: list[tuple[int, int, int, torch.Tensor, tuple | None]] = []
        self.nonfinite_params: dict[int, list[str]] = {}   # skipped step -> parameters with a non-finite gradient
        self._nonfinite_run = 0
        use_bf16 = (config.precision in ("bf16", "bf16-residual")
                    or (config.precision == "auto" and self.env.device.type == "cuda"))
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.peak = config.peak_tflops or peak_tflops(self.env.device)
        self.state = {"global_step": 0, "stage": 0, "stage_step": 0, "data_pos": 0, "tokens": 0, "skipped_steps": 0}
        self.ckpt_root = self.out_dir / "checkpoints"
        resume_step = None
        self._stale_checkpoints: list[Path] = []
        path = None
        if config.resume and not overwrite:
            path = ckpt.latest_checkpoint(self.ckpt_root, warn=self.info)
            if path is not None:
                diffs = run_differences(ckpt.read_trainer_state(path).get("config") or {}, config.to_dict())
                if diffs:
                    raise ResumeMismatchError(
                        f"{self.out_dir} holds a run with other options than this config, so it cannot be resumed "
                        f"({'; '.join(diffs)}); use another out_dir, restore those options, or pass --overwrite "
                        f"to start again (its checkpoints are replaced once the new run saves its first)")
        elif overwrite:
            self._stale_checkpoints = ckpt.list_checkpoints(self.ckpt_root)
        if path is None and config.resume_from:   # a branch: another run's checkpoint, this run's stages and data
            path = Path(config.resume_from)
            if not (path / "trainer.json").is_file():
                raise FileNotFoundError(f"resume_from={config.resume_from}: not a checkpoint folder (no trainer.json)")
        if path is not None:
            self.state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.env)["state"]
            self._stale_checkpoints = []
            self.state.setdefault("skipped_steps", 0)   # checkpoints written before the count existed
            stage, step, steps = self.state["stage"], self.state["stage_step"], [st.steps for st in config.stages]
            if stage > len(steps) or (stage < len(steps) and step > steps[stage]):
                raise ValueError(f"checkpoint {path} is at stage {stage}, step {step} of it, beyond this config's "
                                 f"{len(steps)} stages ({steps} steps)")
            resume_step = self.state["global_step"]
            self.info(f"resumed from {path} at step {resume_step}")
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", enabled=self.env.is_main, resume_step=resume_step)
        self.history: list[dict] = []
        self._signal: int | None = None   # SIGTERM / SIGINT received during fit()

    # ------------------------------------------------------------------ helpers
    def info(self, msg: str) -> None:
        if self.env.is_main:
            self._log(msg)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def _dataset(self, stage_index: int, split: str, shuffle: bool = True) -> PackedDataset:
        st = self.cfg.stages[stage_index]
        path = st.data or self.cfg.data.path
        meta = read_meta(path)
        if meta["vocab_size"] > self.model.get_input_embeddings().weight.shape[0]:
            raise ValueError(f"dataset {path} has vocabulary {meta['vocab_size']}, larger than the model's embedding")
        return PackedDataset(path, split, st.seq_len, align_docs=self.cfg.data.align_docs, shuffle=shuffle,
                             seed=self.cfg.data.seed * 1000 + stage_index)

    def _to_device(self, batch: dict) -> dict:
        # cu_seqlens stays on the host: the model reads the document bounds there (no device sync per step)
        return {k: v if k == "cu_seqlens" else v.to(self.env.device, non_blocking=True) for k, v in batch.items()}

    def _forward_loss(self, batch: dict) -> torch.Tensor:
        with self._autocast():
            if self.sala:
                out = self.forward_model(input_ids=batch["input_ids"], labels=batch["labels"],
                                         cu_seqlens=batch["cu_seqlens"], use_cache=False)
            else:
                out = self.forward_model(input_ids=batch["input_ids"], labels=batch["labels"],
                                         position_ids=batch["position_ids"], use_cache=False)
        return out.loss

    def _step_flops(self, windows: list[Window], sparse_active: bool) -> float:
        lengths = [n for w in windows for n in _doc_lengths(w)]
        return train_step_flops(self._flops_model, lengths, sparse_active)

    def _sparse_active(self) -> bool:
        return bool(self.sala and getattr(self.model.config, "use_sparse_attention", False))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, stage_index: int | None = None) -> float | None:
        """Token-weighted mean loss over the first `eval_windows` windows of the held-out split."""
        si = self.state["stage"] if stage_index is None else stage_index
        si = min(si, len(self.cfg.stages) - 1)
        try:
            ds = self._dataset(si, self.cfg.data.val_split, shuffle=False)
        except ValueError as e:
            self.info(f"held-out evaluation skipped: {e}")
            return None
        st = self.cfg.stages[si]
        n = min(self.cfg.eval_windows, len(ds))
        mine = list(range(self.env.rank, n, self.env.world))
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        tok = 0
        for i in range(0, len(mine), st.micro_batch):
            batch = collate_windows([ds.window(j) for j in mine[i:i + st.micro_batch]], self.layout)
            nt = num_loss_tokens(batch)
            loss_sum += self._forward_loss(self._to_device(batch)).double() * nt
            tok += nt
        self.model.train(was_training)
        s, t = all_reduce_sum([float(loss_sum), float(tok)], self.env)
        return s / max(t, 1.0)

    # ------------------------------------------------------------------ training
    def _evaluate_and_log(self, stage_index: int) -> float | None:
        """Held-out loss of stage `stage_index`'s data, written to the metrics log and the history."""
        val = self.evaluate(stage_index)
        if val is not None:
            step = self.state["global_step"]
            rec = {"step": step, "stage": stage_index, "val_loss": val, "val_ppl": math.exp(min(val, 50)),
                   "tokens": self.state["tokens"]}
            self.metrics.write(rec)
            self.history.append(rec)
            self.info(f"step {step}: held-out loss {val:.4f}")
        return val

    def save_checkpoint(self) -> Path:
        """Checkpoint now (model, optimizer, schedule position, data position, RNG) under `out_dir/checkpoints`;
        `resume: true` continues from the newest one exactly. Returns its folder."""
        self._flush_nonfinite()
        saved = ckpt.save_checkpoint(self.ckpt_root, self.state["global_step"], self.model, self.optimizer,
                                     {"state": self.state, "config": self.cfg.to_dict()}, self.env,
                                     keep=self.cfg.keep_checkpoints, stale=self._stale_checkpoints)
        self._stale_checkpoints = []
        return saved

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While training, SIGTERM and SIGINT ask for a checkpoint after the current step (a second one stops at
        once); the previous handlers come back afterwards. Only the main thread can install handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def handler(signum, frame):
            if self._signal is not None:   # asked twice: stop now
                for s, h in previous.items():
                    signal.signal(s, h)
                raise KeyboardInterrupt
            self._signal = signum
            self.info(f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                      f"(send it again to stop at once, without saving)")

        for s in (signal.SIGTERM, signal.SIGINT):
            previous[s] = signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _keep_stage_end(self, src: Path, stage_index: int, name: str) -> None:
        """Copy checkpoint `src`, written at the end of stage `stage_index`, to out_dir/stage_ends/<i>_<name>, which
        pruning never touches (`resume_from` starts a branch there)."""
        if self.env.is_main:
            ckpt.copy_checkpoint(src, self.out_dir / "stage_ends" / f"{stage_index}_{name}")
        barrier(self.env)

    def _optimizer_step(self) -> tuple[torch.Tensor, tuple | None]:
        """Clip (optim.grad_clip > 0), then update unless the gradients hold an inf or NaN; zero the gradients.
        Returns the gradient norm before clipping (a device scalar; all-reduced under FSDP2) and, in one process,
        (names, finite) of the parameters with a gradient (finite: [n] bool on the device, from their norms)."""
        named = [(n, p) for n, p in self._named_params if p.grad is not None]
        params = [p for _, p in named]
        if not params:   # no micro-batch had a token to predict: nothing to apply
            return torch.zeros((), device=self.env.device), None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)   # at scale 1: only the inf/NaN check, on the device
        clip = self.cfg.optim.grad_clip
        finite = None
        if self.env.distributed:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
        else:   # clip_grad_norm_'s arithmetic, keeping the per-parameter norms (which gradient went non-finite)
            grads = [p.grad for p in params]
            norms = torch.stack([n.to(torch.float32) for n in torch._foreach_norm(grads)])
            grad_norm = torch.linalg.vector_norm(norms)
            if clip > 0:
                torch._foreach_mul_(grads, (clip / (grad_norm + 1e-6)).clamp(max=1.0))
            finite = ([n for n, _ in named], torch.isfinite(norms))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)       # skipped on the device when a gradient is not finite
            self.scaler.update(1.0)
        elif bool(torch.isfinite(grad_norm)):      # FSDP2: one sync; every rank sees the same norm
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite

    def _flush_nonfinite(self) -> list[int]:
        """Read the finiteness of the steps taken since the last call (one host sync), count and report the skipped
        ones, and stop the run once more than `max_nonfinite_steps` in a row were skipped. Returns their steps."""
        if not self._pending_finite:
            return []
        flags = torch.stack([f for _, _, _, f, _ in self._pending_finite]).tolist()
        pending, self._pending_finite = self._pending_finite, []
        skipped = []
        for (step, stage, pos, _, per_param), ok in zip(pending, flags):
            if ok:
                self._nonfinite_run = 0
                continue
            skipped.append(step)
            self._nonfinite_run += 1
            self.state["skipped_steps"] += 1
            where = ""
            if per_param is not None:
                bad = [n for n, f in zip(per_param[0], per_param[1].tolist()) if not f]
                self.nonfinite_params[step] = bad
                where = (f"; non-finite gradients in {len(bad)} parameters: {', '.join(bad[:8])}"
                         + (", ..." if len(bad) > 8 else "")) if bad else "; every gradient finite (the loss was not)"
            self.info(f"step {step} (stage {stage}, data position {pos}): loss or gradients not "
                      f"finite; update skipped ({self._nonfinite_run} in a row){where}")
            if self._nonfinite_run > self.cfg.max_nonfinite_steps:
                first = step - self._nonfinite_run + 1
                raise FloatingPointError(
                    f"training stopped: {self._nonfinite_run} steps in a row ({first}..{step}) had a non-finite loss "
                    f"or gradient, more than max_nonfinite_steps={self.cfg.max_nonfinite_steps}. Their updates were "
                    f"skipped, so the weights are those after step {first - 1}. Lower the learning rate or check the "
                    f"data at those positions, then resume from a checkpoint under {self.ckpt_root}")
        return skipped

    def fit(self) -> dict:
        """Run the remaining stages; returns a summary."""
        with self._stop_on_signals():
            return self._fit()

    def _fit(self) -> dict:
        cfg, env = self.cfg, self.env
        t_start = time.time()
        total = cfg.total_steps()
        bar = None
        if cfg.progress and env.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.state["global_step"], desc="train", dynamic_ncols=True)
        last_eval = None
        stopped = timed_out = interrupted = False
        self.model.train()
        while self.state["stage"] < len(cfg.stages) and not (stopped or timed_out):
            si = self.state["stage"]
            st: StageConfig = cfg.stages[si]
            if self.state["stage_step"] >= st.steps:   # resumed where a stage, shortened since, already ends
                self.info(f"stage {si} '{st.name}' ends at step {st.steps}, where the checkpoint stands: next stage")
                self.state.update(stage=si + 1, stage_step=0, data_pos=0)
                if cfg.keep_stage_ends:
                    self._keep_stage_end(self.save_checkpoint(), si, st.name)
                continue
            if st.sparse is not None:
                set_sparse_attention(self.model, st.sparse)
            n_trainable = set_trainable(self.model, st.trainable)
            ds = self._dataset(si, cfg.data.train_split)
            self.info(f"stage {si} '{st.name}': {st.steps} steps, seq_len {st.seq_len}, "
                      f"{st.micro_batch}x{st.grad_accum}x{env.world} windows/step, "
                      f"{n_trainable:,}/{self.num_params:,} parameters trainable, sparse={self._sparse_active()}")
            per_step = st.grad_accum * env.world * st.micro_batch
            win_loss = torch.zeros((), dtype=torch.float64, device=env.device)
            win_tokens, win_flops, win_ntok, win_t0 = 0, 0.0, 0.0, time.time()
            while self.state["stage"] == si and self.state["stage_step"] < st.steps:
                step = self.state["stage_step"]
                lr = stage_lr(st, step, cfg.optim.lr)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                base = self.state["data_pos"]
                micro, flops = [], 0.0
                for a in range(st.grad_accum):
                    first = base + (a * env.world + env.rank) * st.micro_batch
                    windows = [ds.sample(first + j) for j in range(st.micro_batch)]
                    flops += self._step_flops(windows, self._sparse_active())
                    micro.append(collate_windows(windows, self.layout))
                n_local = sum(num_loss_tokens(b) for b in micro)
                # the stop request rides on this step's reduction, so every rank stops after the same step
                n_global, flops, stop_asked = all_reduce_sum([float(n_local), flops, float(self._signal is not None)],
                                                             env)
                step_loss = torch.zeros((), dtype=torch.float64, device=env.device)
                for b in micro:
                    nt = num_loss_tokens(b)
                    if nt == 0 and not env.distributed:   # nothing to predict: its mean loss would be 0/0 = NaN
                        continue                             # (FSDP2 ranks must all run: the step is skipped)
                    loss = self._forward_loss(self._to_device(b))
                    (loss * (nt * env.world / max(n_global, 1.0))).backward()
                    step_loss += loss.detach().double() * nt
                grad_norm, finite = self._optimizer_step()
                self._pending_finite.append((self.state["global_step"] + 1, si, base, torch.isfinite(grad_norm),
                                             finite))
                self.state["stage_step"] += 1
                self.state["global_step"] += 1
                self.state["data_pos"] += per_step
                self.state["tokens"] += per_step * st.seq_len
                win_loss += step_loss
                win_tokens += per_step * st.seq_len
                win_flops += flops
                win_ntok += n_global
                gstep = self.state["global_step"]
                final_of_stage = self.state["stage_step"] == st.steps
                if gstep % cfg.log_every == 0 or final_of_stage:
                    skipped = self._flush_nonfinite()
                    sums = all_reduce_sum([float(win_loss), float(step_loss)], env)
                    dt = max(time.time() - win_t0, 1e-9)
                    rec = {"step": gstep, "stage": si, "stage_name": st.name, "stage_step": self.state["stage_step"],
                           "loss": sums[0] / max(1.0, win_ntok), "step_loss": sums[1] / max(1.0, n_global),
                           "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                           "tokens": self.state["tokens"], "tokens_per_s": win_tokens / dt,
                           "tflops": win_flops / dt / 1e12, "seq_len": st.seq_len,
                           "mfu": (win_flops / dt / 1e12 / (self.peak * env.world)) if self.peak else None,
                           "time_s": time.time() - t_start}
                    if skipped:
                        rec["skipped_steps"] = skipped
                        found = {str(x): self.nonfinite_params[x][:20] for x in skipped if x in self.nonfinite_params}
                        if found:   # which parameters' gradients were not finite (at most 20 names per step)
                            rec["nonfinite_params"] = found
                    if env.device.type == "cuda":
                        rec["max_mem_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                    self.metrics.write(rec)
                    self.history.append(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['step_loss']:.3f}", lr=f"{lr:.2e}",
                                        tok_s=f"{rec['tokens_per_s']:.3g}",
                                        mfu="-" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%")
                    win_loss.zero_()
                    win_tokens, win_flops, win_ntok, win_t0 = 0, 0.0, 0.0, time.time()
                if bar is not None:
                    bar.update(1)
                if final_of_stage:
                    self.state.update(stage=si + 1, stage_step=0, data_pos=0)
                # evaluation and checkpoint time is left out of the speed window (its tokens are kept)
                if cfg.eval_every and gstep % cfg.eval_every == 0 or final_of_stage:
                    paused = time.time()
                    last_eval = self._evaluate_and_log(si)
                    win_t0 += time.time() - paused
                saved_now = None
                if (cfg.save_every and gstep % cfg.save_every == 0) or final_of_stage:
                    paused = time.time()
                    saved_now = saved = self.save_checkpoint()
                    if final_of_stage and cfg.keep_stage_ends:
                        self._keep_stage_end(saved, si, st.name)
                    win_t0 += time.time() - paused
                if cfg.stop_after is not None and gstep >= cfg.stop_after:
                    stopped = True
                if stop_asked > 0 or (not env.distributed and self._signal is not None):
                    stopped = interrupted = True
                    where = saved_now or self.save_checkpoint()
                    self.info(f"stopped at step {gstep} on request: checkpoint {where}; run the same command "
                              f"again to resume")
                if cfg.time_limit_s is not None and time.time() - t_start > cfg.time_limit_s and not timed_out:
                    timed_out = True
                    self.info(f"time limit of {cfg.time_limit_s:.0f}s reached at step {gstep}: stopping early")
                    if not final_of_stage:
                        self.save_checkpoint()
                if stopped or timed_out or final_of_stage:
                    break
        if bar is not None:
            bar.close()
        self._flush_nonfinite()
        if timed_out:
            last_eval = self._evaluate_and_log(min(self.state["stage"], len(cfg.stages) - 1))
        summary = {"global_step": self.state["global_step"], "tokens": self.state["tokens"],
                   "seconds": time.time() - t_start, "val_loss": last_eval, "params": self.num_params,
                   "stopped_early": stopped, "time_limit_reached": timed_out,
                   "skipped_steps": self.state["skipped_steps"]}
        if interrupted:
            summary["interrupted_by"] = signal.Signals(self._signal).name if self._signal else "signal"
        if not stopped and cfg.save_final:
            self.save_model(self.out_dir / "final")
            summary["final_model"] = str(self.out_dir / "final")
        return summary

    def save_model(self, folder: str | Path) -> None:
        """Save the model (HF `save_pretrained`, safetensors) and the dataset's tokenizer into `folder`."""
        folder = Path(folder)
        if self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = None
        if self.env.is_main:
            tmp = folder.with_name(".tmp-" + folder.name)
            if tmp.exists():
                shutil.rmtree(tmp)
            self.model.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
            tok_dir = Path(self.cfg.data.path or self.cfg.stages[0].data) / "tokenizer"
            if tok_dir.is_dir():
                for f in tok_dir.iterdir():
                    shutil.copy2(f, tmp / f.name)
            ckpt.replace_dir(tmp, folder)
            self.info(f"saved model to {folder}")
        if self.env.distributed:
            torch.distributed.barrier()
