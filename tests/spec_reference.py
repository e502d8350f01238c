"""An independent, naive float64 implementation of SALA straight from shared/spec/SALA.md.

It shares no code with `sala` (no ops, no modules): tensors come from a plain state dict, every loop is
written out, and InfLLM-V2 selection is computed per query position from its definition. Slow (O(T^2) per
layer) and only for tiny models: it is the ground truth the model is tested against.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, H, D] NeoX rotate-half at positions pos [T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=F64) / d))
    ang = pos.to(F64)[:, None] * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _slopes(n: int) -> list[float]:
    def p2(m: int) -> list[float]:
        start = 2 ** (-8 / m)
        return [start ** (i + 1) for i in range(m)]
    if math.log2(n).is_integer():
        return p2(n)
    c = 2 ** math.floor(math.log2(n))
    return p2(c) + p2(2 * c)[0::2][: n - c]


def _lightning(cfg: dict, W: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    T = x.shape[0]
    H, Hk, D = cfg["lightning_nh"], cfg["lightning_nkv"], cfg["lightning_head_dim"]
    q = (x @ W[p + "q_proj.weight"].T).view(T, H, D)
    k = (x @ W[p + "k_proj.weight"].T).view(T, Hk, D)
    v = (x @ W[p + "v_proj.weight"].T).view(T, Hk, D)
    q = _rms(q, W[p + "q_norm.weight"], cfg["rms_norm_eps"])
    k = _rms(k, W[p + "k_norm.weight"], cfg["rms_norm_eps"])
    pos = torch.arange(T)
    q, k = _rope(q, pos, cfg["rope_theta"]), _rope(k, pos, cfg["rope_theta"])
    k = k.repeat_interleave(H // Hk, 1)
    v = v.repeat_interleave(H // Hk, 1)
    scale = D ** -0.5
    o = torch.zeros(T, H, D, dtype=F64)
    for h, s in enumerate(_slopes(H)):
        gamma = math.exp(-s)
        S = torch.zeros(D, D, dtype=F64)
        for t in range(T):
            S = gamma * S + torch.outer(k[t, h], v[t, h])
            o[t, h] = scale * q[t, h] @ S
    o = _rms(o.reshape(T, H * D), W[p + "o_norm.weight"], cfg["rms_norm_eps"])
    o = o * torch.sigmoid(x @ W[p + "z_proj.weight"].T)
    return o @ W[p + "o_proj.weight"].T


def _pool(k: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    n = (k.shape[0] - kernel) // stride + 1 if k.shape[0] >= kernel else 0
    return torch.stack([k[stride * j: stride * j + kernel].mean(0) for j in range(n)]) if n else k[:0]


def selected_keys(q_group: torch.Tensor, k: torch.Tensor, i: int, sc: dict, scale: float) -> list[int]:
    """Token indices that the query at position i attends to, for one KV head.

    q_group [G, D] (the group's query heads at position i), k [T, D] keys of that KV head.
    """
    bs, ks, st = sc["block_size"], sc["kernel_size"], sc["kernel_stride"]
    local = sc["window_size"] // bs
    total = sc["topk"] + local
    q_blk = i // bs
    if q_blk + 1 <= total:
        return list(range(i + 1))
    k1 = _pool(k[: i + 1], ks, st)            # only windows fully inside 0..i exist here
    k2 = _pool(k[: i + 1], 4 * ks, 4 * st)
    lse = torch.logsumexp(q_group @ k2.T * scale, dim=-1)           # [G]
    p = torch.exp(q_group @ k1.T * scale - lse[:, None]).sum(0)     # [n1]
    scores = []
    for b in range(q_blk + 1):
        js = [j for j in range(k1.shape[0]) if st * j <= bs * b + bs - 1 and st * j + ks - 1 >= bs * b]
        s = max((p[j].item() for j in js), default=-math.inf)
        if b < sc["init_blocks"] or q_blk - local <= b <= q_blk:
            s = math.inf
        scores.append(s)
    order = sorted(range(q_blk + 1), key=lambda b: -scores[b])[:total]
    keys = []
    for b in sorted(order):
        keys.extend(t for t in range(bs * b, min(bs * b + bs, i + 1)))
    return keys


def _sparse(cfg: dict, W: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    T = x.shape[0]
    Hq, Hk, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    G = Hq // Hk
    q = (x @ W[p + "q_proj.weight"].T).view(T, Hq, D)
    k = (x @ W[p + "k_proj.weight"].T).view(T, Hk, D)
    v = (x @ W[p + "v_proj.weight"].T).view(T, Hk, D)
    scale = D ** -0.5
    o = torch.zeros(T, Hq, D, dtype=F64)
    for i in range(T):
        for g in range(Hk):
            qg = q[i, g * G:(g + 1) * G]
            idx = torch.tensor(selected_keys(qg, k[:, g], i, cfg["sparse_config"], scale))
            att = torch.softmax(qg @ k[idx, g].T * scale, dim=-1)
            o[i, g * G:(g + 1) * G] = att @ v[idx, g]
    o = o.reshape(T, Hq * D) * torch.sigmoid(x @ W[p + "o_gate.weight"].T)
    return o @ W[p + "o_proj.weight"].T


def spec_logits(cfg: dict, state_dict: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] in float64 for one sequence of token ids."""
    W = {k: v.detach().to(F64).cpu() for k, v in state_dict.items()}
    L = cfg["num_hidden_layers"]
    eps = cfg["rms_norm_eps"]
    r = cfg["scale_depth"] / math.sqrt(L)
    h = W["model.embed_tokens.weight"][torch.tensor(ids)] * cfg["scale_emb"]
    for i, mixer in enumerate(cfg["mixer_types"]):
        p = f"model.layers.{i}."
        a = _rms(h, W[p + "input_layernorm.weight"], eps)
        fn = _sparse if mixer == "minicpm4" else _lightning
        h = h + fn(cfg, W, p + "self_attn.", a) * r
        m = _rms(h, W[p + "post_attention_layernorm.weight"], eps)
        gate, up = m @ W[p + "mlp.gate_proj.weight"].T, m @ W[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ W[p + "mlp.down_proj.weight"].T * r
    h = _rms(h, W["model.norm.weight"], eps)
    return (h / (cfg["hidden_size"] / cfg["dim_model_base"])) @ W["lm_head.weight"].T
