"""The merge's ``ordered`` form (batch-invariant plans) beside the default tree form, on the
decode's merge shapes: microseconds per config, and whether every ordered config gave the same
bits (it must: its bits do not depend on the config).

    python benchmarks/bench_ordered_merge.py

Shapes (pieces, tokens, heads; D 512): W7's long request (128, 1, 16), W1's split requests
(2, 64, 16), W5's (2, 128, 16). Times are ``do_bench`` medians of ``merge_states`` alone
(partials L2-resident, as the decode leaves them).
"""

from __future__ import annotations

import json

import torch
import triton.testing

from openmla import merge_states
from openmla.config import ReduceConfig
from openmla.tuning import ordered_reduce_config, reduce_config

SHAPES = {"W7": (128, 1, 16), "W1": (2, 64, 16), "W5": (2, 128, 16)}
ORDERED = [(1, 32, 8, 1, 1), (1, 64, 8, 1, 1), (1, 64, 16, 1, 1), (1, 32, 16, 1, 1), (1, 64, 4, 1, 3),
           (1, 32, 32, 1, 1), (1, 64, 32, 1, 1), (1, 128, 8, 1, 1), (1, 256, 2, 1, 1), (1, 128, 16, 1, 1),
           (2, 64, 16, 2, 1), (1, 512, 2, 2, 1)]


def main() -> None:
    dev = torch.device("cuda")
    for name, (splits, tokens, heads) in SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        parts = torch.randn(splits, tokens, heads, 512, device=dev, generator=gen)
        lse = 4 * torch.randn(splits, tokens, heads, device=dev, generator=gen)
        tree = reduce_config(tokens, heads, 512, splits, dev)
        configs = {"tree (table/heuristic)": tree, "ordered, the tree's tiling": ReduceConfig(
            tree.block_h, tree.block_d, tree.block_s, tree.num_warps, tree.num_stages, True),
            "ordered (ordered_reduce_config)": ordered_reduce_config(tokens, heads, 512, splits, dev)}
        configs.update({f"ordered {c}": ReduceConfig(*c, True) for c in ORDERED})
        row, first = {}, None
        for label, cfg in configs.items():
            o, l = merge_states(parts, lse, config=cfg)
            if cfg.ordered:
                first = first or (o, l)
                row[f"{label} same bits"] = bool(torch.equal(o, first[0]) and torch.equal(l, first[1]))
            row[label] = round(1e3 * triton.testing.do_bench(lambda c=cfg, p=parts, s=lse: merge_states(p, s, config=c),
                                                             return_mode="median"), 2)
        print(name, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
