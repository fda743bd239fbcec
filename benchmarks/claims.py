"""The DynamicEmbedding paper's claims, measured on real data, with plots for docs/claims.md.

    python -m benchmarks.claims                  # about 5 minutes on 2 cores
    python -m benchmarks.claims --quick          # under a minute
    python -m benchmarks.claims --json bench-results/claims.json --plots docs/img

Skip-gram Word2Vec on Multi30k's English side (../shared/data/multi30k), the paper's first
experiment, three ways:

a. **Loss parity with a fixed vocabulary.** The same skip-gram model trained two ways on
   the same (center, context) batches: dynembed (string keys, tables grown as words arrive,
   ``de.sampled_softmax_loss`` with uniform negatives over its live rows) and a
   fixed-vocabulary torch model (a vocabulary built in a first pass, ``nn.Embedding``
   input and output tables, the same sampled softmax written in torch with uniform
   negatives over the vocabulary and the same logQ correction), under SGD, Adagrad and SGD
   with momentum (the same learning rates; torch's optimizers on the fixed tables,
   dynembed's sparse ones on the dynamic tables). Reported: the loss curves (moving means)
   and the ratio of the final losses (dynembed / fixed), which parity puts near 1.
b. **Quality against table size.** dynembed with count-min admission thresholds 1, 2, 5, 10
   and 20 (a word gets a row once seen that often): rows held, and a quality score, the mean
   cosine of related word pairs (man/woman, red/blue, ...) minus that of random word pairs.
c. **Memory: replicated against sharded.** The trained input table's rows split over N
   simulated ranks by key bucket (the checkpoint's bucket -> rank map): bytes per rank and
   in total, against N data-parallel replicas each holding the whole table; then the
   arithmetic for a 1B-row, dim-64 Adagrad table on 8 to 512 workers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k"
RELATED = [("man", "woman"), ("boy", "girl"), ("red", "blue"), ("shirt", "jacket"),
           ("two", "three"), ("dog", "dogs"), ("street", "sidewalk"), ("black", "white"),
           ("sitting", "standing"), ("water", "ocean")]
OPTIMIZERS = ("sgd", "adagrad", "momentum")
LR = {"sgd": 5.0, "adagrad": 0.2, "momentum": 0.5}  # the loss is a mean over 1,024 pairs


def tokens_of(max_tokens: int | None) -> np.ndarray:
    path = DATA / "train.en.gz"
    if not path.exists():
        raise SystemExit(f"{path} not found: this benchmark needs ../shared/data")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = "".join(c if c.isalpha() or c.isspace() else " " for c in f.read().lower())
    words = text.split()
    return np.array(words[:max_tokens] if max_tokens else words, dtype=object)


def batches(tokens: np.ndarray, steps: int, size: int, window: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        center = rng.integers(window, tokens.shape[0] - window, size)
        offset = rng.integers(1, window + 1, size) * rng.choice(np.array([-1, 1]), size)
        yield tokens[center].tolist(), tokens[center + offset].tolist()


def dynembed_run(de, tokens, cfg, optimizer: str, threshold: int = 1) -> dict:
    """Skip-gram with dynamic tables; returns losses and the input table."""
    torch.manual_seed(cfg["seed"])
    make = {"sgd": lambda: de.optim.SGD(lr=LR["sgd"]),
            "adagrad": lambda: de.optim.Adagrad(lr=LR["adagrad"]),
            "momentum": lambda: de.optim.SGD(lr=LR["momentum"], momentum=0.9)}[optimizer]
    admission = de.policy.FrequencyAdmission(threshold=threshold) if threshold > 1 else None
    words = de.DynamicEmbedding(dim=cfg["dim"], optimizer=make(), seed=1, key_log=True,
                                admission=admission, initializer=de.init.Uniform(
                                    low=-0.5 / cfg["dim"], high=0.5 / cfg["dim"]))
    out = de.DynamicEmbedding(dim=cfg["dim"], optimizer=make(), seed=2,
                              initializer=de.init.Zeros(), admission=admission)
    rng = np.random.default_rng(cfg["seed"] + 1)
    losses = []
    for center, context in batches(tokens, cfg["steps"], cfg["batch"], cfg["window"],
                                   cfg["seed"]):
        loss = de.sampled_softmax_loss(out, words(center), context,
                                       num_sampled=cfg["num_sampled"],
                                       sampler=de.sampling.Uniform(), generator=rng)
        loss.backward()
        losses.append(loss.item())
    return {"losses": losses, "table": words.table}


def fixed_run(tokens, cfg, optimizer: str) -> list[float]:
    """The same skip-gram with a vocabulary built first and torch tables and optimizers."""
    torch.manual_seed(cfg["seed"])
    vocab = {w: i for i, w in enumerate(np.unique(tokens))}
    v, d = len(vocab), cfg["dim"]
    sparse = optimizer != "momentum"  # torch's momentum SGD takes dense gradients only
    emb_in = torch.nn.Embedding(v, d, sparse=sparse)
    emb_out = torch.nn.Embedding(v, d, sparse=sparse)
    with torch.no_grad():
        emb_in.weight.uniform_(-0.5 / d, 0.5 / d)
        emb_out.weight.zero_()
    params = [emb_in.weight, emb_out.weight]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=LR["sgd"]),
           "adagrad": lambda: torch.optim.Adagrad(params, lr=LR["adagrad"]),
           "momentum": lambda: torch.optim.SGD(params, lr=LR["momentum"],
                                               momentum=0.9)}[optimizer]()
    rng = np.random.default_rng(cfg["seed"] + 1)
    lookup = np.vectorize(vocab.__getitem__, otypes=[np.int64])
    log_q = float(np.log(cfg["num_sampled"] / v))
    losses = []
    for center, context in batches(tokens, cfg["steps"], cfg["batch"], cfg["window"],
                                   cfg["seed"]):
        c = torch.from_numpy(lookup(np.array(center, dtype=object)))
        t = torch.from_numpy(lookup(np.array(context, dtype=object)))
        neg = torch.from_numpy(rng.integers(0, v, cfg["num_sampled"]))
        x = emb_in(c)
        true = (x * emb_out(t)).sum(1) - log_q
        negl = x @ emb_out(neg).T - log_q
        negl = negl.masked_fill(neg.unsqueeze(0) == t.unsqueeze(1), float("-inf"))
        loss = (torch.logaddexp(true, torch.logsumexp(negl, 1)) - true).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def quality(table) -> float:
    """Mean cosine of related pairs minus that of random pairs (higher is better)."""
    def cos(a, b):
        va, vb = table.find([a, b]).values
        return torch.nn.functional.cosine_similarity(va, vb, dim=0).item()

    present = [(a, b) for a, b in RELATED if table.contains([a, b]).all()]
    related = np.mean([cos(a, b) for a, b in present]) if present else 0.0
    rng = np.random.default_rng(0)
    ids = table.export().ids.numpy()
    words = [w for w in table.keys_of(rng.choice(ids, min(400, ids.shape[0]), replace=False))
             if w]
    unrelated = np.mean([cos(a, b) for a, b in zip(words[::2], words[1::2])])
    return float(related - unrelated)


def memory(de, table) -> dict:
    """Bytes per simulated rank when the table is sharded by bucket, vs replicated."""
    from dynembed.keys.buckets import NUM_BUCKETS, buckets_of, rank_of_bucket

    ids = table.export().ids.numpy()
    per_row = table.arena.bytes_per_row() + 16 * 2  # arena row + index share (2 buckets)
    owner_of = buckets_of(ids, NUM_BUCKETS)
    out = {}
    for n in (1, 2, 4, 8, 16):
        rows = np.bincount(rank_of_bucket(owner_of, n, NUM_BUCKETS), minlength=n)
        out[n] = {"replicated_total": n * ids.shape[0] * per_row,
                  "sharded_total": int(rows.sum() * per_row),
                  "sharded_max_rank": int(rows.max() * per_row),
                  "rows_per_rank_max_over_mean": float(rows.max() / rows.mean())}
    big = 10**9 * (4 * (64 + 64) + 24 + 32)  # 1B rows, dim 64, Adagrad, index
    out["arithmetic_1B_rows_dim64_adagrad"] = {
        n: {"replicated_per_worker_GiB": big / 2**30, "sharded_per_worker_GiB": big / n / 2**30}
        for n in (8, 64, 512)}
    return out


def moving(values, width=25):
    v = np.asarray(values)
    return np.convolve(v, np.ones(width) / width, mode="valid")


def plot(results: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for ax, name in zip(axes, OPTIMIZERS):
        ax.plot(moving(results["parity"][name]["dynembed"]), label="dynembed (dynamic)")
        ax.plot(moving(results["parity"][name]["fixed"]), label="torch (fixed vocabulary)",
                linestyle="--")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("sampled softmax loss (moving mean)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(folder / "claims-loss-parity.png", dpi=90)
    written.append("claims-loss-parity.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sweep = results["size_sweep"]
    ax.plot([s["rows"] for s in sweep], [s["quality"] for s in sweep], marker="o")
    for s in sweep:
        ax.annotate(f"min count {s['threshold']}", (s["rows"], s["quality"]),
                    fontsize=8, textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("rows in the input table")
    ax.set_ylabel("related - random cosine")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "claims-quality-vs-size.png", dpi=90)
    written.append("claims-quality-vs-size.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    mem = results["memory"]
    ns = [n for n in mem if isinstance(n, int)]
    ax.plot(ns, [mem[n]["replicated_total"] / 2**20 for n in ns], marker="o",
            label="replicated (data parallel)")
    ax.plot(ns, [mem[n]["sharded_total"] / 2**20 for n in ns], marker="o",
            label="sharded by bucket (dynembed)")
    ax.set_xlabel("workers")
    ax.set_ylabel("table memory, all workers (MiB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "claims-memory.png", dpi=90)
    written.append("claims-memory.png")
    plt.close(fig)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.claims",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--plots", metavar="DIR", help="write the PNG plots here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import dynembed as de

    cfg = {"dim": 64, "batch": 1024, "window": 5, "num_sampled": 256, "seed": args.seed,
           "steps": 150 if args.quick else 800,
           "max_tokens": 100_000 if args.quick else None}
    tokens = tokens_of(cfg["max_tokens"])
    t0 = time.perf_counter()
    results = {"config": cfg, "tokens": int(tokens.shape[0]), "parity": {}, "size_sweep": []}
    for name in OPTIMIZERS:
        dyn = dynembed_run(de, tokens, cfg, name)["losses"]
        fixed = fixed_run(tokens, cfg, name)
        tail = max(1, len(dyn) // 10)
        ratio = float(np.mean(dyn[-tail:]) / np.mean(fixed[-tail:]))
        results["parity"][name] = {"dynembed": dyn, "fixed": fixed, "final_ratio": ratio}
        print(f"a) {name:9s} final loss dynembed {np.mean(dyn[-tail:]):.4f}  fixed "
              f"{np.mean(fixed[-tail:]):.4f}  ratio {ratio:.3f}", file=sys.stderr)
    for threshold in (1, 2, 5, 10, 20):
        run = dynembed_run(de, tokens, cfg, "adagrad", threshold=threshold)
        q = quality(run["table"])
        results["size_sweep"].append({"threshold": threshold, "rows": len(run["table"]),
                                      "quality": q})
        print(f"b) min count {threshold:2d}: {len(run['table']):6,d} rows, quality {q:.3f}",
              file=sys.stderr)
        if threshold == 1:
            results["memory"] = memory(de, run["table"])
    for n, m in results["memory"].items():
        if isinstance(n, int):
            print(f"c) {n:2d} workers: replicated {m['replicated_total'] / 2**20:7.1f} MiB, "
                  f"sharded {m['sharded_total'] / 2**20:6.1f} MiB (largest rank "
                  f"{m['sharded_max_rank'] / 2**20:.2f} MiB)", file=sys.stderr)
    results["seconds"] = time.perf_counter() - t0
    if args.plots:
        results["plots"] = plot(results, Path(args.plots))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
