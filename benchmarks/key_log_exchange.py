"""What the distributed key log costs a training step: the same lookups with and without
``key_log=True``, in one run, on 2 gloo ranks (spawned processes on this machine).

    python -m benchmarks.key_log_exchange [--keys 65536] [--steps 15] [--json PATH]

Each rank looks up ``--keys`` distinct string keys a step (its own: ``r<rank>s<step>k<i>``),
dim 16, SGD, forward + backward. Two workloads: *steady*, the same keys every step (rows
exist; nothing to send), and *new*, keys never seen before every step (every row is new,
every string travels to its owner or to every replica). For sharded and replicated tables,
key log off then on, in the same processes; median ms per step over the steps after the
first, the slower rank's, and the on/off ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks._common import small_result


def _rank(rank: int, args, folder: str) -> None:
    import dynembed as de
    from dynembed.distributed import shard_model

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=120))
    out = {}
    for placement in ("sharded", "replicated"):
        for workload in ("steady", "new"):
            for key_log in (False, True):
                emb = de.DynamicEmbedding(dim=16, optimizer=de.optim.SGD(lr=0.1), seed=1,
                                          key_log=key_log, placement=placement)
                shard_model(emb, timeout=120)
                times = []
                for step in range(args.steps):
                    s = step if workload == "new" else 0
                    keys = [f"r{rank}s{s}k{i}" for i in range(args.keys)]
                    dist.barrier()
                    start = time.perf_counter()
                    emb(keys).sum().backward()
                    times.append(time.perf_counter() - start)
                out[f"{placement}/{workload}/key_log={key_log}"] = \
                    float(np.median(times[1:]) * 1e3)
    Path(folder, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.key_log_exchange",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=65536, help="distinct string keys per rank")
    p.add_argument("--steps", type=int, default=15, help="steps per configuration (>= 2)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.keys < 1 or args.steps < 2:
        p.error("--keys must be >= 1 and --steps >= 2")
    with tempfile.TemporaryDirectory() as folder:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.start_processes(_rank, args=(args, folder), nprocs=2, join=True,
                           start_method="spawn")
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(2)]
    metrics = {name: max(r[name] for r in ranks) for name in ranks[0]}
    ratios = {}
    for name, ms in metrics.items():
        if name.endswith("key_log=True"):
            base = name.replace("key_log=True", "key_log=False")
            ratios[name.replace("/key_log=True", "") + "/on_vs_off"] = ms / metrics[base]
    for name, ms in metrics.items():
        print(f"{name:40s} {ms:8.1f} ms/step")
    for name, ratio in ratios.items():
        print(f"{name:40s} {ratio:8.2f}x")
    return small_result(metrics, ratios, {"keys": args.keys, "steps": args.steps, "ranks": 2,
                                          "dim": 16}, args.json)


if __name__ == "__main__":
    sys.exit(main() and 0)
