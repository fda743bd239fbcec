"""Two-tower retrieval on Gowalla check-ins with sampled softmax over item ids.

    python -m examples.gowalla                       # the whole LightGCN split, 20 epochs
    python -m examples.gowalla --max-users 3000 --epochs 3

Each user and each location (item) gets a row in a dynamic table, keyed by its raw id; no
vocabulary is built. A training example is one (user, item) check-in of the train split: the
user's row scores every item row by cosine similarity over a temperature, and the loss is a
softmax over the true item and ``--num-sampled`` items drawn uniformly from the live item
rows, with the logQ correction (``de.sampled_softmax_loss``); only the rows involved are
updated, by each table's sparse Adagrad.

Evaluation follows the LightGCN protocol on the test split: for every user, rank all items
except those seen in train and validation, exactly, with ``items.table.top_k``, and report
Recall@20 and NDCG@20; the popularity ranking (train check-ins) is the baseline printed
beside it. The data is ``../shared/data/gowalla`` (one line per user: ``user item item ...``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dynembed as de
from examples._cli import int_at_least, positive_float
from examples.datasets import DatasetUnavailableError

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gowalla"


def read_split(path: Path, max_users: int | None = None) -> dict[int, np.ndarray]:
    """{user: (n,) int64 items} of one split file."""
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            user = int(parts[0])
            if max_users is not None and user >= max_users:
                continue
            out[user] = np.array(parts[1:], dtype=np.int64)
    return out


def load(data_dir: Path, max_users: int | None):
    """(train, valid, test) dicts {user: items}.

    Raises:
        FileNotFoundError: the split files are missing.
        DatasetUnavailableError: the train split holds no check-ins (of users below
            ``max_users``): there would be nothing to train on.
    """
    splits = []
    for name in ("train", "valid", "test"):
        path = data_dir / f"{name}.txt"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; point --data-dir at the Gowalla "
                                    "split (../shared/data/gowalla)")
        splits.append(read_split(path, max_users))
    if not any(len(items) for items in splits[0].values()):
        below = "" if max_users is None else f" of users below --max-users {max_users}"
        raise DatasetUnavailableError(f"{data_dir / 'train.txt'} holds no check-ins{below}: "
                                      "nothing to train on")
    return splits


def pairs_of(split: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    users = np.concatenate([np.full(len(items), u, np.int64) for u, items in split.items()])
    items = np.concatenate(list(split.values()))
    return users, items


def ranking_metrics(ranked: np.ndarray, truth: list[np.ndarray], k: int = 20) -> dict:
    """Mean Recall@k and NDCG@k of (U, k) ranked item ids against each user's test items."""
    recall, ndcg = [], []
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for row, relevant in zip(ranked, truth):
        hits = np.isin(row[:k], relevant)
        recall.append(hits.sum() / len(relevant))
        ideal = discounts[:min(len(relevant), k)].sum()
        ndcg.append((hits * discounts).sum() / ideal)
    return {"recall@20": float(np.mean(recall)), "ndcg@20": float(np.mean(ndcg))}


def evaluate_two_tower(users: de.DynamicEmbedding, items: de.DynamicEmbedding,
                       test_users: np.ndarray, seen: list[np.ndarray], truth,
                       chunk: int = 1024) -> dict:
    """Recall@20 / NDCG@20 of the two-tower model, ranking with ``items.table.top_k``
    (each user's seen items excluded)."""
    users.eval()
    ranked = []
    for start in range(0, len(test_users), chunk):
        part = test_users[start:start + chunk]
        with torch.no_grad():
            queries = users(torch.from_numpy(part))
        best = items.table.top_k(queries, 20, metric="cosine",
                                 exclude=seen[start:start + len(part)])
        ranked.append(best.ids.numpy())
    users.train()
    return ranking_metrics(np.concatenate(ranked), truth)


def evaluate_popularity(train_items: np.ndarray, seen: list[np.ndarray], truth) -> dict:
    """Recall@20 / NDCG@20 of ranking items by their train check-ins."""
    values, counts = np.unique(train_items, return_counts=True)
    order = values[np.argsort(-counts, kind="stable")]
    extra = max(len(s) for s in seen)
    ranked = [order[:20 + extra][~np.isin(order[:20 + extra], s)][:20] for s in seen]
    return ranking_metrics(np.stack(ranked), truth)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m examples.gowalla", description=__doc__.split(
        "\n")[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                   help="folder with train.txt, valid.txt, test.txt")
    p.add_argument("--max-users", type=int_at_least(1), default=None, help="only users below this id")
    p.add_argument("--epochs", type=int_at_least(0), default=20)
    p.add_argument("--dim", type=int_at_least(1), default=64)
    p.add_argument("--batch-size", type=int_at_least(1), default=2048)
    p.add_argument("--num-sampled", type=int_at_least(1), default=2048,
                   help="negatives per batch, uniform over the item rows")
    p.add_argument("--temperature", type=positive_float, default=0.1)
    p.add_argument("--lr", type=positive_float, default=0.1, help="Adagrad learning rate")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build(dim: int, lr: float, seed: int) -> tuple[de.DynamicEmbedding, de.DynamicEmbedding]:
    init = de.init.Normal(std=0.1)
    users = de.DynamicEmbedding(dim=dim, optimizer=de.optim.Adagrad(lr=lr), seed=seed,
                                initializer=init)
    items = de.DynamicEmbedding(dim=dim, optimizer=de.optim.Adagrad(lr=lr), seed=seed + 1,
                                initializer=init)
    return users, items


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train, valid, test = load(args.data_dir, args.max_users)
    train_users, train_items = pairs_of(train)
    test_users = np.array(sorted(u for u in test if len(test[u])), dtype=np.int64)
    seen = [np.concatenate([train.get(u, np.empty(0, np.int64)),
                            valid.get(u, np.empty(0, np.int64))]) for u in test_users]
    truth = [test[u] for u in test_users]
    print(f"Gowalla: {len(train)} users, {len(np.unique(train_items)):,} items, "
          f"{len(train_items):,} train check-ins, {len(test_users):,} test users")

    users, items = build(args.dim, args.lr, args.seed)
    sampler = de.sampling.Uniform()
    history = []
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(train_users))
        total, steps = 0.0, 0
        bar = tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch}",
                   leave=False, disable=args.no_progress)
        for start in bar:
            pick = order[start:start + args.batch_size]
            u = users(torch.from_numpy(train_users[pick]))
            loss = de.sampled_softmax_loss(
                items, u, train_items[pick], num_sampled=args.num_sampled, sampler=sampler,
                normalize=True, temperature=args.temperature, generator=rng)
            loss.backward()  # Adagrad steps on the touched user and item rows
            total, steps = total + loss.item(), steps + 1
        history.append({"epoch": epoch, "train_loss": total / steps})
        print(f"epoch {epoch}/{args.epochs}: train loss {total / steps:.4f}")

    model = evaluate_two_tower(users, items, test_users, seen, truth)
    popularity = evaluate_popularity(train_items, seen, truth)
    print(f"\nTest split, {len(test_users):,} users (train and validation items excluded):")
    print(f"  {'':24s}{'Recall@20':>10s}{'NDCG@20':>10s}")
    print(f"  {'two-tower (dynembed)':24s}{model['recall@20']:10.4f}{model['ndcg@20']:10.4f}")
    print(f"  {'popularity':24s}{popularity['recall@20']:10.4f}"
          f"{popularity['ndcg@20']:10.4f}")
    return {"model": model, "popularity": popularity, "history": history,
            "users": len(users.table), "items": len(items.table)}


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, DatasetUnavailableError) as exc:
        sys.exit(f"error: {exc}")
