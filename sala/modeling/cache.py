"""SalaCache: the hybrid cache of a SALA model.

Per lightning layer: the recurrent state S [B, H, Dk, Dv] in fp32 (constant size, whatever the context).
Per sparse layer: the keys and values of every real token [B, capacity, Hkv, D], and the two compressed key
caches K1 (mean over `kernel_size` keys every `kernel_stride`) and K2 (4x both). Buffers grow by doubling, so
appending a token is O(1) amortised. Each sequence of the batch keeps its own length: left padding is never
stored, so block boundaries and compressed windows are those of the sequence itself. The "pending tails" of
the compressed caches (keys not yet covering a whole window) are the last keys of the K/V buffer.

Works with `model.generate` (the model creates one when `use_cache=True`) and with a plain forward loop
(`out = model(ids, past_key_values=cache, use_cache=True)`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sala.modeling.configuration_sala import LIGHTNING, SPARSE, SalaConfig


def _grow(buf: torch.Tensor | None, need: int, like: torch.Tensor, batch: int) -> torch.Tensor:
    """Return a buffer [batch, >= need, *like.shape[2:]] holding `buf`'s contents (capacity doubles)."""
    if buf is not None and buf.shape[1] >= need:
        return buf
    cap = max(need, 16 if buf is None else 2 * buf.shape[1])
    new = like.new_zeros((batch, cap, *like.shape[2:]))
    if buf is not None:
        new[:, : buf.shape[1]] = buf
    return new


@dataclass
class LightningLayerCache:
    """Recurrent state of one lightning layer: [B, H, Dk, Dv] fp32, None before the first token."""

    state: torch.Tensor | None = None

    def memory_bytes(self) -> int:
        return 0 if self.state is None else self.state.numel() * self.state.element_size()


@dataclass
class SparseLayerCache:
    """Keys, values and compressed keys of one sparse layer, per sequence of the batch."""

    kernel_size: int
    kernel_stride: int
    k: torch.Tensor | None = None      # [B, cap, Hkv, D]
    v: torch.Tensor | None = None
    k1: torch.Tensor | None = None     # [B, cap1, Hkv, D]
    k2: torch.Tensor | None = None     # [B, cap2, Hkv, D]
    lengths: list[int] = field(default_factory=list)   # real tokens stored per sequence
    n1: list[int] = field(default_factory=list)        # complete K1 windows per sequence
    n2: list[int] = field(default_factory=list)

    def append(self, b: int, k_new: torch.Tensor, v_new: torch.Tensor, batch: int) -> None:
        """Append keys/values [T, Hkv, D] of sequence `b`; extend its compressed keys."""
        from sala.ops.infllmv2 import compress_window_range

        if not self.lengths:
            self.lengths, self.n1, self.n2 = [0] * batch, [0] * batch, [0] * batch
        t = k_new.shape[0]
        start = self.lengths[b]
        end = start + t
        self.k = _grow(self.k, end, k_new[None], batch)
        self.v = _grow(self.v, end, v_new[None], batch)
        self.k[b, start:end] = k_new
        self.v[b, start:end] = v_new
        self.lengths[b] = end
        for level, (kernel, stride) in enumerate(((self.kernel_size, self.kernel_stride),
                                                  (4 * self.kernel_size, 4 * self.kernel_stride))):
            counts = self.n1 if level == 0 else self.n2
            n_old = counts[b]
            n_new = (end - kernel) // stride + 1 if end >= kernel else 0
            if n_new <= n_old:
                continue
            comp = compress_window_range(self.k[b:b + 1], n_old, n_new, kernel, stride)[0]   # [n_new - n_old, ...]
            if level == 0:
                self.k1 = _grow(self.k1, n_new, comp[None], batch)
                self.k1[b, n_old:n_new] = comp
            else:
                self.k2 = _grow(self.k2, n_new, comp[None], batch)
                self.k2[b, n_old:n_new] = comp
            counts[b] = n_new

    def sequence(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v, k1, k2) of sequence b, each [1, n, Hkv, D] (views, no copy)."""
        L, n1, n2 = self.lengths[b], self.n1[b], self.n2[b]
        k1 = self.k1[b:b + 1, :n1] if self.k1 is not None else self.k[b:b + 1, :0]
        k2 = self.k2[b:b + 1, :n2] if self.k2 is not None else self.k[b:b + 1, :0]
        return self.k[b:b + 1, :L], self.v[b:b + 1, :L], k1, k2

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k1, self.k2) if t is not None)


class SalaCache:
    """Hybrid cache for `SalaForCausalLM`: one entry per layer, by mixer type."""

    is_compileable = False

    def __init__(self, config: SalaConfig) -> None:
        sc = config.sparse_config
        self.layers: list[LightningLayerCache | SparseLayerCache] = [
            SparseLayerCache(sc["kernel_size"], sc["kernel_stride"]) if m == SPARSE else LightningLayerCache()
            for m in config.mixer_types
        ]
        self.seen_tokens = 0          # tokens fed per row, padding included (what generate() slices by)

    # --- the parts of the transformers Cache interface that generate() uses
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        return len(self.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select/reorder batch rows (beam search)."""
        idx_list = beam_idx.tolist()
        for layer in self.layers:
            if isinstance(layer, LightningLayerCache):
                if layer.state is not None:
                    layer.state = layer.state.index_select(0, beam_idx.to(layer.state.device))
            elif layer.lengths:
                for name in ("k", "v", "k1", "k2"):
                    t = getattr(layer, name)
                    if t is not None:
                        setattr(layer, name, t.index_select(0, beam_idx.to(t.device)))
                layer.lengths = [layer.lengths[i] for i in idx_list]
                layer.n1 = [layer.n1[i] for i in idx_list]
                layer.n2 = [layer.n2[i] for i in idx_list]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held, by kind: lightning states, sparse K/V, compressed keys."""
        out = {"lightning_state": 0, "sparse_kv": 0, "compressed_keys": 0}
        for layer in self.layers:
            if isinstance(layer, LightningLayerCache):
                out["lightning_state"] += layer.memory_bytes()
            else:
                for name, key in (("k", "sparse_kv"), ("v", "sparse_kv"), ("k1", "compressed_keys"),
                                  ("k2", "compressed_keys")):
                    t = getattr(layer, name)
                    if t is not None:
                        out[key] += t.numel() * t.element_size()
        out["total"] = sum(out.values())
        return out

    def __repr__(self) -> str:
        mem = self.memory_bytes()
        return (f"SalaCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens}, "
                f"memory={mem['total'] / 2**20:.2f} MiB)")


__all__ = ["SalaCache", "LightningLayerCache", "SparseLayerCache", "LIGHTNING", "SPARSE"]
