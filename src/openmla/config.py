"""Launch configurations: frozen dataclasses chosen from a small table, never by ``if`` chains
in the launchers.

The decode table is keyed by the number of tile rows a request needs (query tokens x heads,
rounded up to a power of two, at least 16 because ``tl.dot`` needs M >= 16). Rows beyond 64 are
covered by several row blocks of 64.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DecodeConfig:
    """One launch configuration of the split-KV decode kernel."""

    block_m: int  # tile rows: (query token, head) pairs of one request
    block_n: int  # KV tokens per inner step
    num_warps: int
    num_stages: int
    # row sums of the softmax in 64-bit fixed point: exact, so independent of the tile's layout
    # (batch-invariant mode)
    fixed_point_sum: bool = False
    # TileLang plans: the memory-bound kernel with the KV tokens as the MMA's M dimension
    # (kernels/decode_tilelang.py, ``kv_as_m``); block_m is then the wgmma N (16 or 32 rows)
    kv_as_m: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"DecodeConfig.{name} must be a power of two >= 16, got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"DecodeConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"DecodeConfig.num_stages must be >= 1, got {self.num_stages}")


# rows bucket -> config, from the H100 sweep of 2026-11-21 (benchmarks/results/): on W1 (16
# rows) BLOCK_N 32 / 4 warps / 3 stages streamed 2076 GB/s against 1591 for BLOCK_N 64 (whose
# 216 KB of stages leave one program per SM).
_DECODE_TABLE: dict[int, DecodeConfig] = {
    16: DecodeConfig(block_m=16, block_n=32, num_warps=4, num_stages=3),
    32: DecodeConfig(block_m=32, block_n=32, num_warps=4, num_stages=3),
    64: DecodeConfig(block_m=64, block_n=64, num_warps=8, num_stages=2),
}
MAX_BLOCK_M = 64


def rows_bucket(rows: int) -> int:
    """Smallest table bucket holding ``rows`` tile rows (capped at MAX_BLOCK_M)."""
    bucket = 16
    while bucket < rows and bucket < MAX_BLOCK_M:
        bucket *= 2
    return bucket


# FP8 caches (kv_format 1, 2) at <= 16 rows: the dequantising build needs 255 registers at 4
# warps (2 programs per SM); 8 warps over 64-token blocks measured W8 376 us against 446 us for
# the 16-row bf16 entry (H100, same run, 2026-11-21).
_FP8_DECODE_TABLE: dict[int, DecodeConfig] = {
    16: DecodeConfig(block_m=16, block_n=64, num_warps=8, num_stages=2),
}


def decode_config(rows: int, page_size: int, kv_format: int = 0) -> DecodeConfig:
    """The table's config for ``rows`` tile rows (and the KV format: fp8 caches have their own
    entries), with BLOCK_N shrunk (not below 16) to divide the page size when it can, so a
    block is addressed by one page id (page 16: BLOCK_N 16)."""
    bucket = rows_bucket(rows)
    cfg = (_FP8_DECODE_TABLE.get(bucket) if kv_format else None) or _DECODE_TABLE[bucket]
    block_n = cfg.block_n
    while page_size % block_n and block_n > 16:
        block_n //= 2
    if page_size % block_n:
        return cfg
    return replace(cfg, block_n=block_n)


@dataclass(frozen=True)
class ScheduleConfig:
    """How plan() cuts KV into pieces. See schedule.py."""

    waves: int  # target pieces per SM over the whole batch
    min_chunk: int  # fewest KV tokens worth a separate piece (merge traffic + launch tail)
    # batch-invariant mode: pieces of deterministic_chunk(num_heads) * this many tokens
    det_chunk_scale: int = 1


DEFAULT_SCHEDULE = ScheduleConfig(waves=2, min_chunk=256)

# Batch-invariant (deterministic) mode cuts every request at multiples of a chunk that depends
# on the head count only, so its pieces depend on its own length only. 1024 tokens at <= 32 heads
# is what the balanced schedule picks on W1; more heads get longer chunks (1024 * heads / 32), so
# partial rows per request stay bounded: at 128 heads, 1024-token chunks overflowed a 128 MiB
# workspace on W3 (131072 partial rows > 65408).
DETERMINISTIC_CHUNK = 1024


def deterministic_chunk(num_heads: int) -> int:
    return DETERMINISTIC_CHUNK * max(1, num_heads // 32)


def deterministic_config(num_heads: int, rows: int, page_size: int, kv_format: int = 0) -> DecodeConfig:
    """Batch-invariant mode's decode config, for a batch whose largest request has ``rows`` rows.

    A row's arithmetic must not depend on the tile: BLOCK_N (the online softmax's steps) comes
    from the entry for ``num_heads`` rows, the softmax's row sums are exact (fixed point), and the
    tile stays in the mma.sync range (<= 32 rows) where it starts there, since wgmma may round
    differently. Within those limits the tile grows with the batch's rows like the default mode's,
    so MTP requests read their KV once (W5: two 16-row programs ran at 0.74x of the default mode,
    H100)."""
    base = decode_config(num_heads, page_size, kv_format)
    cfg = base
    if base.block_m < 32 and kv_format == 0:  # (fp8 caches: the 32-row build is not tuned)
        cfg = decode_config(min(rows, 32), page_size, kv_format)
    return replace(cfg, block_n=base.block_n, fixed_point_sum=True)


# A split request with at most this many pieces is merged inside the decode kernel by its last
# piece; more pieces (one long request among short ones, W7) go to the merge kernel, which
# spreads one request's merge over many programs. H100, 2026-11-21: the separate merge cost
# 14.6 us of W1's 140 (its launch and ~4K programs dominate; the decode itself took 115.6).
INLINE_MERGE_MAX = 16


def env_num_splits() -> int | None:
    """``OPENMLA_NUM_SPLITS``: pin the split count of every request (A/B runs, tests)."""
    value = os.environ.get("OPENMLA_NUM_SPLITS")
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"OPENMLA_NUM_SPLITS must be an integer >= 1, got {value!r}") from None
    if n < 1:
        raise ValueError(f"OPENMLA_NUM_SPLITS must be >= 1, got {n}")
    return n


@dataclass(frozen=True)
class ReduceConfig:
    """One launch configuration of the LSE-reduce (merge) kernel: a program merges ``block_h``
    heads x ``block_d`` columns of one query token, ``block_s`` pieces per step."""

    block_h: int  # heads per program (amortises the reduce-map loads, fewer programs)
    block_d: int  # columns per program (clamped to D; below D the columns spread over programs)
    block_s: int  # pieces per step
    num_warps: int
    num_stages: int  # > 1: software-pipelined steps (the next pieces load while one is summed)
    # pieces added one by one in piece order: bits independent of the config (batch invariance)
    ordered: bool = False

    def __post_init__(self) -> None:
        for name, low in (("block_h", 1), ("block_d", 16), ("block_s", 1)):
            v = getattr(self, name)
            if v < low or v & (v - 1):
                raise ValueError(f"ReduceConfig.{name} must be a power of two >= {low}, got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"ReduceConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"ReduceConfig.num_stages must be >= 1, got {self.num_stages}")


def untuned_reduce_config(d: int) -> ReduceConfig:
    """The baseline the tuning is measured against: one program per (token, head), whole D."""
    return ReduceConfig(block_h=1, block_d=d, block_s=16, num_warps=4, num_stages=1)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def reduce_candidates(splits: int, heads: int, d: int) -> tuple[ReduceConfig, ...]:
    """What ``python -m openmla.tune reduce`` times at a point of ``splits`` pieces (a few dozen
    configs): every column width from 32 and head block up to 8, all pieces in one step (at
    most 32 a step) or, from 3 pieces on, half of them a step with the next half prefetched, and
    the warps that give each thread 16, 32 or 64 floats of the tile (at least 4).

    H100 sweep (2026-11-21, graph-timed, inputs past L2): the winners are one-step tiles of
    64 floats a thread on small programs (2 heads x 64 columns x 16 pieces, one warp) from 5
    pieces on, and 16 floats a thread (1 head x 256 columns x 2 pieces, one warp) for 2-4."""
    full = min(_next_pow2(splits), 32)
    steps = [(full, 1)] + ([(full // 2, 2)] if full >= 4 else [])
    found = []
    for block_d in (32, 64, 128, 256, 512):
        if block_d > d:
            continue
        for block_h in (1, 2, 4, 8):
            if block_h > _next_pow2(heads):
                continue
            for block_s, stages in steps:
                tile = block_s * block_h * block_d
                for per_thread in (16, 32, 64):
                    warps = tile // (32 * per_thread)
                    if warps in (1, 2, 4, 8) and tile >= 128 * warps:
                        found.append(ReduceConfig(block_h, block_d, block_s, warps, stages))
    return tuple(dict.fromkeys(found))


DECODE_BACKENDS = ("auto", "triton", "tilelang")


def env_decode_backend() -> str:
    """``OPENMLA_DECODE_BACKEND``: ``auto`` (default: TileLang on Hopper when installed and the
    plan suits it, else Triton), ``triton`` or ``tilelang`` (A/B runs; an error where TileLang
    cannot serve the plan)."""
    value = os.environ.get("OPENMLA_DECODE_BACKEND") or "auto"
    if value not in DECODE_BACKENDS:
        raise ValueError(f"OPENMLA_DECODE_BACKEND must be one of {DECODE_BACKENDS}, got {value!r}")
    return value
