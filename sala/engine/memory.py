"""Memory plan of an inference request: weights + caches + workspace, checked BEFORE anything is allocated.

All sizes are bytes. For a SALA model serving `batch` sequences of up to `context` tokens:

- weights: parameters x dtype size;
- sparse KV: per sparse layer, K and V [batch, context, Hkv, D] in the model dtype
  (9B at 1M tokens: 8 layers x 2 x 2 heads x 128 x 2 bytes x 2^20 = 8 GiB);
- compressed keys: K1 (one per `kernel_stride` keys) and K2 (one per 4 x stride) per sparse layer;
- lightning states: [batch, H, Dk, Dv] fp32 per lightning layer (constant in the context);
- workspace: activations of one prefill chunk (hidden states, projections, an MLP slice, attention
  temporaries) and the logits; plus a fixed allowance for the allocator and kernels.

`check_fits` raises MemoryError with these numbers and the largest context that fits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.modeling_sala import MLP_SLICE_TOKENS  # the model's MLP runs in slices of this many tokens

GiB = 1 << 30
MiB = 1 << 20
# Allocator slack, CUDA graphs, kernel scratch: a fixed allowance on top of the counted workspace.
FIXED_OVERHEAD_BYTES = 512 * MiB


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parameter_counts(config: SalaConfig) -> dict[str, int]:
    """Parameters by kind: embeddings (+ lm_head), mlp, sparse_attention, lightning_attention, norms, total.

    Counted on the meta device, so exact for any config and free of memory.
    """
    from sala.modeling.modeling_sala import SalaForCausalLM

    with torch.device("meta"):
        model = SalaForCausalLM(config)
    sparse = set(config.sparse_layer_ids)
    out = {"embeddings": 0, "mlp": 0, "sparse_attention": 0, "lightning_attention": 0, "norms": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("model.embed_tokens") or name.startswith("lm_head"):
            out["embeddings"] += n
        elif ".mlp." in name:
            out["mlp"] += n
        elif ".self_attn." in name:
            layer = int(name.split(".")[2])
            out["sparse_attention" if layer in sparse else "lightning_attention"] += n
        else:
            out["norms"] += n
    out["total"] = sum(out.values())
    return out


def compressed_capacity(context: int, kernel: int, stride: int) -> int:
    """Slots for the compressed keys of `context` keys (full windows), at least 1."""
    return max(1, (context - kernel) // stride + 1 if context >= kernel else 1)


@dataclass
class MemoryPlan:
    """Bytes needed by one request shape; `total` is what must be free before loading anything."""

    context: int
    batch: int
    dtype: torch.dtype
    chunk_size: int
    weights: int
    sparse_kv: int
    compressed_keys: int
    lightning_states: int
    workspace: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def caches(self) -> int:
        return self.sparse_kv + self.compressed_keys + self.lightning_states

    @property
    def total(self) -> int:
        return self.weights + self.caches + self.workspace

    def as_dict(self) -> dict:
        return {"context": self.context, "batch": self.batch, "dtype": str(self.dtype).replace("torch.", ""),
                "chunk_size": self.chunk_size, "weights": self.weights, "sparse_kv": self.sparse_kv,
                "compressed_keys": self.compressed_keys, "lightning_states": self.lightning_states,
                "workspace": self.workspace, "total": self.total}

    def describe(self) -> str:
        """Multi-line human summary (GiB)."""
        rows = [("weights", self.weights), ("sparse KV cache", self.sparse_kv),
                ("compressed keys (K1, K2)", self.compressed_keys), ("lightning states", self.lightning_states),
                (f"workspace (prefill chunk {self.chunk_size:,} tokens, logits)", self.workspace),
                ("total", self.total)]
        head = (f"memory plan: context {self.context:,} tokens x batch {self.batch}, "
                f"{str(self.dtype).replace('torch.', '')}")
        return "\n".join([head] + [f"  {name:<52} {fmt_bytes(b):>12}" for name, b in rows])

    def summary(self) -> str:
        """One line: total (weights + KV + compressed keys + states + workspace)."""
        return (f"{fmt_bytes(self.total)} (weights {fmt_bytes(self.weights)} + sparse KV {fmt_bytes(self.sparse_kv)}"
                f" + compressed keys {fmt_bytes(self.compressed_keys)} + lightning states "
                f"{fmt_bytes(self.lightning_states)} + workspace {fmt_bytes(self.workspace)})")


def fmt_bytes(n: int | float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def prefill_graph_bytes(config: SalaConfig, chunk: int, lengths: int, dtype: torch.dtype) -> int:
    """Memory of the piecewise prefill graphs (`sala.engine.prefill_graph`) for up to `lengths` chunk lengths of
    at most `chunk` tokens: their shared pool (one chunk's workspace) plus each length's static buffers (hidden,
    q, k, v, gate, o)."""
    if lengths < 1 or chunk < 1:
        return 0
    es = dtype_bytes(dtype)
    sq = config.num_attention_heads * config.head_dim
    per_token = (2 * config.hidden_size + 3 * sq + 2 * config.num_key_value_heads * config.head_dim) * es
    return _workspace_bytes(config, chunk, 1, chunk, es) - FIXED_OVERHEAD_BYTES + lengths * chunk * per_token


def _workspace_bytes(config: SalaConfig, context: int, batch: int, chunk: int, es: int) -> int:
    """Activations of one prefill chunk (the peak over layer kinds) plus logits and a fixed allowance."""
    C = max(1, min(chunk, context))
    H, I = config.hidden_size, config.intermediate_size
    lh = config.lightning_nh * config.lightning_head_dim
    sq = config.num_attention_heads * config.head_dim
    hidden = 3 * C * H * es                                     # residual, normed input, branch output
    # q, k, v, z, o in the model dtype + fp32 RoPE / o_norm temporaries + the kernel's chunk states
    lightning = 5 * C * lh * es + 3 * C * lh * 4
    sp = config.sparse_config
    total_blocks = sp["topk"] + sp["window_size"] // sp["block_size"]
    # q, o, gate + block indices of the selection (int32 per kv head)
    sparse = 3 * C * sq * es + C * config.num_key_value_heads * total_blocks * 4 * 2
    M = min(C, MLP_SLICE_TOKENS)
    mlp = 4 * M * I * es                                        # gate, up, silu(gate), product
    logits = 3 * batch * config.vocab_size * 4
    return hidden + max(lightning, sparse, mlp) + logits + FIXED_OVERHEAD_BYTES


def plan_memory(config: SalaConfig, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                chunk_size: int = 16384, weight_params: int | None = None) -> MemoryPlan:
    """Memory needed to prefill and decode `batch` sequences of up to `context` tokens (prompt + new tokens)."""
    if context < 1 or batch < 1 or chunk_size < 1:
        raise ValueError(f"plan_memory: context ({context}), batch ({batch}) and chunk_size ({chunk_size}) "
                         "must be >= 1")
    es = dtype_bytes(dtype)
    n_params = parameter_counts(config)["total"] if weight_params is None else weight_params
    n_sparse, n_light = len(config.sparse_layer_ids), len(config.lightning_layer_ids)
    hkv, d = config.num_key_value_heads, config.head_dim
    sp = config.sparse_config
    kv = n_sparse * 2 * batch * context * hkv * d * es
    n1 = compressed_capacity(context, sp["kernel_size"], sp["kernel_stride"])
    n2 = compressed_capacity(context, 4 * sp["kernel_size"], 4 * sp["kernel_stride"])
    comp = n_sparse * batch * (n1 + n2) * hkv * d * es
    states = n_light * batch * config.lightning_nh * config.lightning_head_dim * config.lightning_head_dim * 4
    work = _workspace_bytes(config, context, batch, chunk_size, es)
    return MemoryPlan(context, batch, dtype, chunk_size, n_params * es, kv, comp, states, work)


def largest_context(config: SalaConfig, capacity: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                    chunk_size: int = 16384, weights_loaded: bool = False) -> int:
    """The largest context (tokens) whose plan fits in `capacity` bytes; 0 if none does."""
    n_params = parameter_counts(config)["total"]

    def need(ctx: int) -> int:
        p = plan_memory(config, ctx, batch, dtype, chunk_size, weight_params=n_params)
        return p.total - (p.weights if weights_loaded else 0)

    if need(1) > capacity:
        return 0
    lo, hi = 1, 2
    while need(hi) <= capacity and hi < 1 << 40:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if need(mid) <= capacity:
            lo = mid
        else:
            hi = mid
    return lo


def system_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """Memory the system can give this process without swapping (Linux MemAvailable, else physical pages that are
    free per sysconf); None when neither can be read."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def device_free_bytes(device: torch.device | str) -> int | None:
    """Free memory on a CUDA device (plus what this process's allocator caches); on CPU the system's available
    memory (`system_available_bytes`); None where it cannot be known."""
    device = torch.device(device)
    if device.type == "cpu":
        return system_available_bytes()
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    reserved_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + reserved_unused)


def check_context(config: SalaConfig, context: int) -> None:
    """Raise ValueError when `context` tokens (prompt + new tokens) exceed the model's max_position_embeddings."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and context > limit:
        raise ValueError(f"this request needs a context of {context:,} tokens (prompt + new tokens), beyond the "
                         f"model's limit of {limit:,} (max_position_embeddings): shorten the prompt or lower "
                         f"--max-new-tokens")


def check_fits(config: SalaConfig, plan: MemoryPlan, capacity: int | None, *, weights_loaded: bool = False,
               where: str = "the device") -> None:
    """Raise MemoryError (numbers + the largest context that fits) if `plan` needs more than `capacity` bytes.

    `weights_loaded`: the weights are already resident, so only caches and workspace must fit in `capacity`.
    `capacity` None (unknown) means no memory check.
    """
    if capacity is None:
        return
    need = plan.total - (plan.weights if weights_loaded else 0)
    if need <= capacity:
        return
    best = largest_context(config, capacity, plan.batch, plan.dtype, plan.chunk_size, weights_loaded)
    what = "caches + workspace" if weights_loaded else "this request"
    hint = (f"the largest context that fits at batch {plan.batch} is {best:,} tokens" if best > 0
            else f"even a 1-token context does not fit at batch {plan.batch}")
    raise MemoryError(
        f"not enough memory: {what} needs {fmt_bytes(need)} but {where} has {fmt_bytes(capacity)} free. "
        f"Plan for context {plan.context:,} x batch {plan.batch}: {plan.summary()}. {hint}; "
        f"reduce the context or batch, or a smaller --chunk-size (now {plan.chunk_size:,}) to shrink the workspace.")
