"""Which ReduceConfig to launch: the GPU's tuning table, else a heuristic.

Tables are ``openmla/tables/reduce_<gpu slug>.csv`` (written by ``python -m openmla.tune
reduce``; ``OPENMLA_REDUCE_TABLE`` names another CSV to use instead), read once per process. A
lookup takes the exact ``(tokens, heads, d, splits)`` row, else the nearest row of the same ``d``
(heads nearest in log2 first, then the smallest ``|log2 tokens ratio| + |log2 splits ratio|``),
else :func:`heuristic_reduce_config` (no table for this GPU, no row for this ``d``). CPU tensors
and Triton's interpreter get :func:`interpreter_reduce_config`.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from openmla._interp import is_interpreting
from openmla.config import INLINE_MERGE_MAX, MAX_BLOCK_M, ReduceConfig

TABLE_DIR = Path(__file__).parent / "tables"
KEY_COLUMNS = ("tokens", "heads", "d", "splits")
CONFIG_COLUMNS = ("block_h", "block_d", "block_s", "num_warps", "num_stages")
# Columns the tuner writes: key, chosen config, its time, the untuned time, then provenance.
TABLE_COLUMNS = ("gpu", "sm_count", *KEY_COLUMNS, *CONFIG_COLUMNS, "us", "untuned_us",
                 "date", "torch", "triton", "commit", "command")
H100_SM_COUNT = 132  # the heuristic's SM count when there is no GPU to ask

Key = tuple[int, int, int, int]  # tokens, heads, d, splits


def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def table_path(gpu_name: str) -> Path:
    return TABLE_DIR / f"reduce_{gpu_slug(gpu_name)}.csv"


@functools.cache
def load_reduce_table(path: str | Path) -> dict[Key, ReduceConfig]:
    """The table at ``path`` as ``{(tokens, heads, d, splits): config}``; empty if there is no
    file. Malformed rows raise ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return {}
    table: dict[Key, ReduceConfig] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (*KEY_COLUMNS, *CONFIG_COLUMNS) if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"reduce table {path} lacks the columns {missing}")
        for row in reader:
            try:
                key = tuple(int(row[c]) for c in KEY_COLUMNS)
                table[key] = ReduceConfig(*(int(row[c]) for c in CONFIG_COLUMNS))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"reduce table {path}, line {reader.line_num}: {exc}") from None
    return table


def _log_gap(a: int, b: int) -> float:
    return abs(math.log2(max(a, 1)) - math.log2(max(b, 1)))


def lookup(table: dict[Key, ReduceConfig], tokens: int, heads: int, d: int, splits: int,
           ) -> ReduceConfig | None:
    """Exact row, else the nearest row of the same ``d``, else None."""
    exact = table.get((tokens, heads, d, splits))
    if exact is not None:
        return exact
    same_d = [k for k in table if k[2] == d]
    if not same_d:
        return None
    near_heads = min({k[1] for k in same_d}, key=lambda h: (_log_gap(h, heads), h))
    best = min((k for k in same_d if k[1] == near_heads),
               key=lambda k: (_log_gap(k[0], tokens) + _log_gap(k[3], splits), k))
    return table[best]


def heuristic_reduce_config(tokens: int, heads: int, d: int, splits: int,
                            sm_count: int = H100_SM_COUNT) -> ReduceConfig:
    """A config from the split count alone (no table for this GPU or this ``d``): all pieces in
    one step (at most 32), small programs. What the H100 sweep chose at the benchmark's points
    (``config.reduce_candidates``): up to 4 pieces, one head x 256 columns, 16 floats a thread;
    from 5 pieces, 64 columns and 64 floats a thread (4 heads at 8 pieces, 2 from 16; one warp,
    two at 32). ``tokens`` and ``sm_count`` are not used: small programs fill any GPU."""
    block_s = min(1 << max(splits - 1, 0).bit_length(), 32)
    if block_s <= 4:
        block_h, block_d, warps = 1, min(256, d), max(block_s // 2, 1)
    else:
        block_h, block_d = (4 if block_s == 8 else 2), min(64, d)
        warps = max(block_s * block_h * block_d // (32 * 64), 1)
    return ReduceConfig(block_h=block_h, block_d=block_d, block_s=block_s, num_warps=warps, num_stages=1)


def choose_reduce_config(table: dict[Key, ReduceConfig], tokens: int, heads: int, d: int, splits: int,
                         sm_count: int) -> ReduceConfig:
    """The table's row (exact, else nearest), else the heuristic."""
    found = lookup(table, tokens, heads, d, splits)
    return found or heuristic_reduce_config(tokens, heads, d, splits, sm_count)


def active_table_path(gpu_name: str) -> Path:
    """``OPENMLA_REDUCE_TABLE`` (a CSV to try instead, e.g. a fresh tuner run), else the package's
    table for this GPU."""
    return Path(os.environ.get("OPENMLA_REDUCE_TABLE") or table_path(gpu_name))


@functools.lru_cache(maxsize=4096)
def _cuda_config(device_index: int, tokens: int, heads: int, d: int, splits: int) -> ReduceConfig:
    props = torch.cuda.get_device_properties(device_index)
    table = load_reduce_table(active_table_path(props.name))
    return choose_reduce_config(table, tokens, heads, d, splits, props.multi_processor_count)


def interpreter_reduce_config(heads: int, d: int, splits: int) -> ReduceConfig:
    """Triton's interpreter pays per program, not per element: the fewest, largest programs."""
    block_s = min(1 << max(splits - 1, 1).bit_length(), 32)
    return ReduceConfig(block_h=min(1 << max(heads - 1, 0).bit_length(), 16), block_d=d, block_s=block_s,
                        num_warps=4, num_stages=1)


def reduce_config(tokens: int, heads: int, d: int, splits: int, device: torch.device) -> ReduceConfig:
    """The config for merging ``splits`` pieces of ``tokens x heads`` rows of ``d`` columns."""
    if device.type != "cuda" or is_interpreting():
        return interpreter_reduce_config(heads, d, splits)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_config(index, tokens, heads, d, splits)


# Deterministic plans and CUDA graphs look the decode's merge up at a fixed key, so its config
# never depends on the batch (batch invariance). The Triton decode's merge kernel sees few long
# requests of more than INLINE_MERGE_MAX pieces; the TileLang decode sends it every split request,
# mostly a few pieces each (W1 at 64 heads merged in 40.8 us at the Triton key, 6.2 us at its own).
DECODE_REDUCE_TOKENS = 4
DECODE_REDUCE_SPLITS = 2 * INLINE_MERGE_MAX
TILELANG_REDUCE_TOKENS = 64
TILELANG_REDUCE_SPLITS = 2


def decode_reduce_config(heads: int, d: int, device: torch.device, tilelang: bool = False) -> ReduceConfig:
    if tilelang:  # (not decode_merge_config's wide programs: a graph's requests may have many pieces)
        return reduce_config(TILELANG_REDUCE_TOKENS, heads, d, TILELANG_REDUCE_SPLITS, device)
    return reduce_config(DECODE_REDUCE_TOKENS, heads, d, DECODE_REDUCE_SPLITS, device)


# The decode's own merge of two pieces: its partials were written just before and sit in L2,
# where fewer, wider programs than the table's (tuned on partials past L2) win. H200, whole
# decode call, 64 tokens x 2 pieces: W1 at 64 heads 111.5 -> 106.0 us, 32 heads 105.3 -> 102.5,
# 16 heads 94.2 -> 93.8 (the table/heuristic's 1 head x 256 columns, 1 warp, against 2 heads x 512
# columns, 2 warps; 29 configs swept, this one best or within 0.3 us of it at all three).
DECODE_MERGE_TWO_PIECES = ReduceConfig(block_h=2, block_d=512, block_s=2, num_warps=2, num_stages=1)


def decode_merge_config(tokens: int, heads: int, d: int, splits: int, device: torch.device) -> ReduceConfig:
    """The config for the decode's merge kernel of ``splits`` pieces (at most) per request."""
    if splits <= 2 and device.type == "cuda" and not is_interpreting():
        return replace(DECODE_MERGE_TWO_PIECES, block_d=min(DECODE_MERGE_TWO_PIECES.block_d, d))
    return reduce_config(tokens, heads, d, splits, device)


def ordered_reduce_config(tokens: int, heads: int, d: int, splits: int, device: torch.device) -> ReduceConfig:
    """Batch-invariant plans' merge: the ``ordered`` form, whose bits no config changes, so it
    may follow the batch. Its pieces are unrolled and added one by one, so it wants narrower
    programs than the table's tree configs (H200, merge alone: 128 pieces of 1 token x 16 heads
    in 11.1 us at 32 columns x 32 pieces, 58 us at the tree's 2 heads x 64 columns; 2 pieces of
    64-128 tokens in 6.6-7.8 us at 512 columns, 2 warps)."""
    if device.type != "cuda" or is_interpreting():
        return replace(interpreter_reduce_config(heads, d, splits), ordered=True)
    block_s = min(1 << max(splits - 1, 0).bit_length(), 32)
    if block_s <= 4:
        return ReduceConfig(1, min(512, d), block_s, 2 if d >= 512 else 1, 1, ordered=True)
    return ReduceConfig(1, min(32, d), block_s, 1, 1, ordered=True)


def adaptive_num_splits(tokens: int, heads: int, sm_count: int, max_splits: int = 32) -> int:
    """Fewest KV splits whose decode programs fill the GPU: one program per token, split and 64
    heads (the decode's row block), at least 2 (one split needs no reduce), at most
    ``max_splits``."""
    programs_per_split = max(tokens, 1) * -(-heads // MAX_BLOCK_M)
    return max(2, min(max_splits, -(-sm_count // programs_per_split)))
