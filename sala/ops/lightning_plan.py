"""Launch plan of the Lightning Triton kernels: the frozen `LightningConfig`, the tile sizes it gives for a head
shape, and how sequences are cut into segments (one program walks one segment). Pure Python, no Triton.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from sala.ops.dispatch import interpreter_enabled


@dataclass(frozen=True)
class LightningConfig:
    """Launch settings of the lightning kernels. Pass one to `lightning_attention(..., config=)` /
    `lightning_decode_step(..., config=)`; None means `DEFAULT_CONFIG`.

    The defaults are the fastest forward of the sweep in `sala.bench.kernels_lightning` (T = 64K, 32 heads x 128,
    bf16, H200); head dims above 128 are capped at chunk 64, V tile 64 and 4 warps (register pressure).
    """

    chunk: int = 128              # tokens per chunk (C)
    block_v: int = 128            # V tile of the state (BV)
    num_warps: int = 8
    num_stages: int = 2
    chunks_per_segment: int = 0   # segment length in chunks; 0: chosen from the work size (`chunks_per_segment`)
    min_chunks_per_segment: int = 8
    programs_per_sm: int = 4      # target parallel programs per SM when choosing segments
    decode_block_v: int = 64      # V tile of the decode step
    decode_num_warps: int = 8
    # intra-chunk decay of the output kernel: False builds the [C, C] table gamma^(i-j) once per program (it stays
    # live in registers: C*C/threads of them); True applies it per chunk as gamma^(i-c) * gamma^(c-j) with c = C/2
    # (two [C] vectors) when every head has |log2 gamma| * C/2 <= FACTORED_MAX_EXP, else the table
    intra_factored: bool = True
    # launch a kernel already compiled for the same specialisation directly (`sala.ops.triton_launch`), skipping
    # Triton's per-call argument binding: the host cost of a decode step
    fast_launch: bool = True

    def __post_init__(self) -> None:
        for name in ("chunk", "block_v", "decode_block_v"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"LightningConfig.{name} must be a power of two >= 16, got {value!r}")
        for name in ("num_warps", "decode_num_warps", "num_stages", "min_chunks_per_segment", "programs_per_sm"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LightningConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.chunks_per_segment, int) or self.chunks_per_segment < 0:
            raise ValueError(f"LightningConfig.chunks_per_segment must be an int >= 0 (0: automatic), got "
                             f"{self.chunks_per_segment!r}")


DEFAULT_CONFIG = LightningConfig()


def large_dims(dk: int, dv: int) -> bool:
    return max(dk, dv) > 128


def block_v(config: LightningConfig, dv: int, dk: int = 0) -> int:
    """V tile of the state for head dims (dk, dv)."""
    return min(64 if large_dims(dk, dv) else config.block_v, dv)


def chunk_and_warps(config: LightningConfig, dk: int, dv: int) -> tuple[int, int]:
    """Chunk size and warps: the configured ones, capped for head dims > 128 (register pressure)."""
    if large_dims(dk, dv):
        return min(64, config.chunk), 4
    return config.chunk, config.num_warps


def fit_to_dtype(config: LightningConfig, dtype: torch.dtype) -> LightningConfig:
    """The configured tiles are sized for 2-byte inputs; fp32 tiles take twice the shared memory (chunk 128, V
    tile 128, 2 stages need 320 KiB at head dim 128, an H100 has 227), so fp32 runs chunks of at most 64, V tiles
    of at most 64 and one stage. The interpreter keeps the configured values (no shared memory there)."""
    if dtype != torch.float32 or interpreter_enabled():
        return config
    return dataclasses.replace(config, chunk=min(64, config.chunk), block_v=min(64, config.block_v), num_stages=1)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def chunks_per_segment(config: LightningConfig, seq_lens: list[int], heads: int, v_tiles: int, chunk: int,
                       device: torch.device) -> int:
    """Segment length in chunks: enough segments to fill the GPU, each long enough to amortise its state."""
    if config.chunks_per_segment > 0:
        return config.chunks_per_segment
    total_chunks = sum(-(-n // chunk) for n in seq_lens)
    target_programs = config.programs_per_sm * num_sms(device)
    # programs = segments * heads * v_tiles ~ target  ->  segments ~ target / (heads * v_tiles)
    want_segments = max(1, target_programs // max(1, heads * v_tiles))
    per_seg = -(-total_chunks // want_segments)
    return max(config.min_chunks_per_segment, per_seg)


@dataclass
class Segments:
    """Segment tables (int64 on the device, so token offsets times strides never overflow)."""

    start: Tensor        # [S] first token
    end: Tensor          # [S] one past the last token
    seq: Tensor          # [S] sequence index
    last: Tensor         # [S] 1 for the last segment of its sequence
    first: Tensor        # [S] 1 for the first segment of its sequence
    seq_ptr: Tensor      # [N+1] segments of sequence n are seq_ptr[n]:seq_ptr[n+1]
    not_last_ids: Tensor   # segments needing a state contribution in the forward direction
    not_first_ids: Tensor  # ... in the reverse direction
    num_segments: int
    num_seqs: int


@functools.lru_cache(maxsize=64)
def build_segments(bounds: tuple[tuple[int, int], ...], seg_tokens: int, device: torch.device) -> Segments:
    """Cut every sequence [a, b) of `bounds` into segments of at most seg_tokens tokens."""
    start, end, seq, last, first, ptr = [], [], [], [], [], [0]
    for n, (a, b) in enumerate(bounds):
        s = a
        count = 0
        while s < b:
            e = min(b, s + seg_tokens)
            start.append(s), end.append(e), seq.append(n)
            first.append(1 if s == a else 0)
            last.append(1 if e == b else 0)
            s = e
            count += 1
        ptr.append(ptr[-1] + count)
    not_last = [i for i, x in enumerate(last) if not x]
    not_first = [i for i, x in enumerate(first) if not x]

    def dev(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    return Segments(dev(start), dev(end), dev(seq), dev(last), dev(first), dev(ptr), dev(not_last),
                    dev(not_first), len(start), len(bounds))


def segments_for(config: LightningConfig, batch: int, length: int, cu_seqlens: Tensor | None, heads: int, dk: int,
                 dv: int, device: torch.device) -> Segments:
    """Segments for the pass whose state is [dk, dv] (its chunk size and V tiles decide the split)."""
    chunk, _ = chunk_and_warps(config, dk, dv)
    v_tiles = dv // block_v(config, dv, dk)
    if cu_seqlens is None:
        bounds = tuple((b * length, (b + 1) * length) for b in range(batch))
    else:
        offs = [int(x) for x in cu_seqlens.tolist()]
        bounds = tuple((offs[i], offs[i + 1]) for i in range(len(offs) - 1))
    per_seg = chunks_per_segment(config, [b - a for a, b in bounds], heads, v_tiles, chunk, device)
    return build_segments(bounds, per_seg * chunk, device)
