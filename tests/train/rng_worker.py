"""A job whose steps draw from every global random generator (as dropout or sampled
negatives do), for the torchrun tests of tests/train/test_runtime_torchrun.py.

    torchrun --nproc-per-node=2 ... tests/train/rng_worker.py --ckpt DIR --out DIR --steps 6

Each rank seeds the generators with 100 + its rank (as a script does at its top, on every
start and restart), trains a small dense model in DDP on random inputs, and appends the
numbers each step drew to ``draws-r<rank>.jsonl`` in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import dynembed as de


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, default=3)
    args = parser.parse_args()
    seed = 100 + int(os.environ.get("RANK", "0"))
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with de.train.Runtime(args.ckpt, every_steps=args.every, timeout=60) as rt:
        model = nn.Linear(3, 1)
        net = rt.prepare(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rt.restore(opt)
        for step in rt.steps(args.steps):
            x = torch.rand(4, 3)
            net(nn.functional.dropout(x, 0.5)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            drawn = [*x.flatten().tolist(), float(np.random.rand()), random.random()]
            with open(out / f"draws-r{rt.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "world_size": rt.world_size,
                                    "drawn": drawn}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
