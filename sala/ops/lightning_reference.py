"""Plain-PyTorch references of Lightning attention (ground truth for the Triton kernels).

Per head h with decay gamma_h = exp(log_decay[h]) (0 < gamma < 1), scale s:
    S_t = gamma * S_{t-1} + k_t^T v_t        (S: [Dk, Dv], S_{-1} = initial state or 0)
    o_t = s * q_t S_t
which unrolls to o_t = s * sum_{u<=t} gamma^(t-u) (q_t . k_u) v_u + s * gamma^(t+1) q_t S_{-1}.

Both forms compute in fp32 (fp64 when the inputs are fp64, for gradcheck) and return `o` in q's dtype
and the final state in the compute dtype. Decay powers are always formed as exp(log_gamma * n) with
n >= 0 (never gamma^-n), so no power overflows for any chunk size.

Tensors: q, k [B, T, H, Dk]; v [B, T, H, Dv]; log_decay [H]; states [N, H, Dk, Dv]. With `cu_seqlens`
([N+1] offsets into T, B == 1) every packed sequence runs separately from its own initial state.
Inputs are assumed validated by `sala.ops.lightning`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _sequence_bounds(batch: int, length: int, cu_seqlens: Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    offsets = [int(x) for x in cu_seqlens.tolist()]
    return [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]


def _chunked_one(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float, state: Tensor,
                 chunk_size: int) -> tuple[Tensor, Tensor]:
    """One sequence, chunked. q, k [T, H, Dk]; v [T, H, Dv]; state [H, Dk, Dv]; all in compute dtype."""
    length = q.shape[0]
    outputs = []
    log_g = log_decay.to(q.dtype)[:, None, None]  # [H, 1, 1]
    pos = torch.arange(chunk_size, device=q.device, dtype=q.dtype)
    gap = pos[:, None] - pos[None, :]  # i - j
    causal = gap >= 0
    # decay[h, i, j] = gamma_h^(i-j) for i >= j, else 0 (exponent clamped to >= 0 before exp)
    intra_decay = torch.where(causal, torch.exp(log_g * gap.clamp(min=0)), torch.zeros((), dtype=q.dtype,
                                                                                        device=q.device))
    for start in range(0, length, chunk_size):
        n = min(chunk_size, length - start)
        qc = q[start:start + n].transpose(0, 1)  # [H, n, Dk]
        kc = k[start:start + n].transpose(0, 1)
        vc = v[start:start + n].transpose(0, 1)  # [H, n, Dv]
        p = pos[:n]
        q_decay = torch.exp(log_g[:, :, 0] * (p + 1))[:, :, None]  # gamma^(i+1): [H, n, 1]
        k_decay = torch.exp(log_g[:, :, 0] * (n - 1 - p))[:, :, None]  # gamma^(n-1-j)
        scores = torch.matmul(qc, kc.transpose(1, 2)) * intra_decay[:, :n, :n]
        out = torch.matmul(scores, vc) + torch.matmul(qc, state) * q_decay
        outputs.append(out.transpose(0, 1) * scale)
        state = state * torch.exp(log_g * n) + torch.matmul((kc * k_decay).transpose(1, 2), vc)
    if outputs:
        o = torch.cat(outputs, dim=0)
    else:
        o = q.new_zeros(0, q.shape[1], v.shape[2])
    return o, state


def _recurrent_one(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float,
                   state: Tensor) -> tuple[Tensor, Tensor]:
    """One sequence, token by token. Shapes as in `_chunked_one`."""
    gamma = torch.exp(log_decay.to(q.dtype))[:, None, None]
    outputs = []
    for t in range(q.shape[0]):
        state = gamma * state + k[t][:, :, None] * v[t][:, None, :]
        outputs.append(scale * torch.einsum("hk,hkv->hv", q[t], state))
    if outputs:
        o = torch.stack(outputs, dim=0)
    else:
        o = q.new_zeros(0, q.shape[1], v.shape[2])
    return o, state


def _run(form, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None,
         initial_state: Tensor | None, output_final_state: bool, cu_seqlens: Tensor | None,
         **kwargs) -> tuple[Tensor, Tensor | None]:
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else float(scale)
    ct = _compute_dtype(q)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    outs, finals = [], []
    for n, (b, start, end) in enumerate(_sequence_bounds(batch, length, cu_seqlens)):
        if initial_state is not None:
            state = initial_state[n].to(ct)
        else:
            state = torch.zeros(heads, dk, dv, dtype=ct, device=q.device)
        o, state = form(qc[b, start:end], kc[b, start:end], vc[b, start:end], log_decay, scale, state, **kwargs)
        outs.append(o)
        finals.append(state)
    if cu_seqlens is None:
        o = torch.stack(outs, dim=0)
    else:
        o = torch.cat(outs, dim=0)[None]
    final = torch.stack(finals, dim=0) if output_final_state else None
    return o.to(q.dtype), final


def lightning_attention_chunked(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None = None,
                                initial_state: Tensor | None = None, output_final_state: bool = False,
                                cu_seqlens: Tensor | None = None, chunk_size: int = 64
                                ) -> tuple[Tensor, Tensor | None]:
    """Chunked reference: intra-chunk masked decay matrix + inter-chunk state, `chunk_size` tokens a chunk.

    Returns (o [B, T, H, Dv] in q.dtype, final state [N, H, Dk, Dv] or None). Differentiable (autograd).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _run(_chunked_one, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens,
                chunk_size=chunk_size)


def lightning_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None = None,
                                  initial_state: Tensor | None = None, output_final_state: bool = False,
                                  cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Token-by-token reference (S_t = gamma S_{t-1} + k_t^T v_t; o_t = scale q_t S_t). Same contract."""
    return _run(_recurrent_one, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def lightning_decode_step_reference(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                                    scale: float | None = None) -> Tensor:
    """One token per sequence: state [B, H, Dk, Dv] <- gamma*state + k^T v (in place); o = scale*q state.

    q, k [B, H, Dk]; v [B, H, Dv]. Returns o [B, H, Dv] in q.dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    ct = state.dtype
    gamma = torch.exp(log_decay.to(ct))[None, :, None, None]
    new_state = gamma * state + k.to(ct)[..., :, None] * v.to(ct)[..., None, :]
    state.copy_(new_state)
    o = scale * torch.einsum("bhk,bhkv->bhv", q.to(ct), new_state)
    return o.to(q.dtype)
