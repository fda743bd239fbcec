"""What the key log costs a training step in one process: the same steps with and without
``key_log=True``, in one run, on the same keys.

    python -m benchmarks.key_log [--steps 12] [--keys 200000] [--json PATH]

A table of dim 16 (SGD) bounded to 300k rows, without a store, trained on steps of
``--keys`` string keys drawn Zipf(1.1) from 3M distinct strings: many keys of a step are
new (each is encoded and logged) and as many rows are evicted for room (each key is
forgotten). Both tables see the same steps, interleaved (off, on, off, on, ...), so a slow
stretch of the host hits both. Reports the median ms per step after the first two, their
ratio, and the log's bytes per key it holds.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np

from benchmarks._common import small_result

VOCAB = 3_000_000
MAX_ROWS = 300_000


def _step(emb, keys: list[str]) -> float:
    start = time.perf_counter()
    emb(keys).sum().backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    import dynembed as de

    p = argparse.ArgumentParser(prog="python -m benchmarks.key_log", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="steps per table (>= 3)")
    p.add_argument("--keys", type=int, default=200_000, help="string keys per step")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.steps < 3 or args.keys < 1:
        p.error("--steps must be >= 3 and --keys >= 1")
    vocab = [f"user:{i}:{i * 7919 % 100003}" for i in range(VOCAB)]
    rng = np.random.default_rng(0)
    steps = [[vocab[i] for i in (rng.zipf(1.1, args.keys) % VOCAB).tolist()]
             for _ in range(args.steps)]
    tables = {on: de.DynamicEmbedding(dim=16, optimizer=de.optim.SGD(lr=0.1), key_log=on,
                                      max_rows=MAX_ROWS, seed=1) for on in (False, True)}
    times = {False: [], True: []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "discarded N evicted rows": by design here
        for keys in steps:
            for on, emb in tables.items():
                times[on].append(_step(emb, keys))
    off, on = (float(np.median(times[k][2:]) * 1e3) for k in (False, True))
    log = tables[True].table.key_log
    per_key = tables[True].stats().key_log_bytes / max(len(log), 1)
    metrics = {"key_log=False_ms_per_step": off, "key_log=True_ms_per_step": on,
               "key_log_bytes_per_key": per_key, "logged_keys": len(log)}
    print(f"key log off {off:8.1f} ms/step\nkey log on  {on:8.1f} ms/step   "
          f"({on / off:.2f}x)\nlog: {len(log):,} keys, {per_key:.1f} bytes each "
          "(the keys' own bytes included)")
    return small_result(metrics, {"on_vs_off": on / off},
                        {"steps": args.steps, "keys": args.keys, "vocab": VOCAB,
                         "max_rows": MAX_ROWS, "dim": 16}, args.json)


if __name__ == "__main__":
    sys.exit(main() and 0)
