"""MovieLens 'liked it' training that runs alone or on torchrun, elastic and fault tolerant.

    python -m examples.elastic_ctr                                # one process
    dynembed train --nproc-per-node 2 -m examples.elastic_ctr     # two ranks, restarts
    dynembed train --nnodes 1:4 --rdzv-endpoint head:29400 -m examples.elastic_ctr  # nodes

The same script either way. The model is the one of ``examples.movielens`` (a dynamic
table per categorical feature, bags of words for titles and genres, an MLP), written for
:class:`dynembed.train.Runtime`:

- rows of the big tables (users, movies, zip codes, words) are sharded across the ranks by
  key bucket; the small ones (gender, occupation, age) are replicated on every rank;
- each rank keeps at most ``--rows-in-memory`` rows per table in RAM over its own RocksDB
  directory (or over one Redis server shared by every rank and node: ``--redis-url``);
- the job checkpoints to ``--checkpoint-dir`` (a directory every node shares) every
  ``--checkpoint-every`` steps and when torchrun stops it (SIGTERM), and resumes from the
  latest checkpoint after a failure or with another number of ranks: each rank takes its
  key buckets from the checkpoint lazily, so there is no resharding step;
- global batches are the same whatever the world size (each rank takes its part), so the
  data position is just the step.

At the end rank 0 prints the test AUC and log loss (every rank scores its part). The
trained model is served with ``dynembed export --factory examples.elastic_ctr:serving_model``
and ``dynembed serve`` (see ``serving_model``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import dynembed as de
from examples._cli import int_at_least, positive_float
from examples.datasets import DatasetUnavailableError, load_movielens_100k
from examples.movielens import (
    FEATURES,
    Batches,
    build_examples,
    log_loss,
    roc_auc,
    split,
)

SMALL_TABLES = {"gender", "occupation", "age"}  # a few rows each: replicate them


class ElasticLikeModel(nn.Module):
    """A dynamic table per feature (some replicated), concatenated, into an MLP."""

    def __init__(self, dim: int, emb_lr: float, *, seed: int, rows_in_memory: int | None,
                 store_for) -> None:
        super().__init__()
        tables = dict.fromkeys(table for table, _ in FEATURES.values())
        self.embeddings = de.EmbeddingCollection(
            tables={name: de.TableConfig(
                dim=dim, optimizer=de.optim.Adagrad(lr=emb_lr), seed=seed,
                placement="replicated" if name in SMALL_TABLES else "sharded",
                store=store_for(name), max_rows=rows_in_memory, key_log=True)
                for name in tables},
            features={name: de.FeatureConfig(table=table, pooling=pooling)
                      for name, (table, pooling) in FEATURES.items()})
        self.mlp = nn.Sequential(nn.Linear(len(FEATURES) * dim, 64), nn.ReLU(),
                                 nn.Linear(64, 1))

    def forward(self, features: dict) -> torch.Tensor:
        return self.mlp(self.embeddings(features, concat=True)).squeeze(-1)

    def serving_parts(self) -> dict:
        """What ``dynembed export`` packages: the tables, the dense part (embeddings ->
        one logit per example) and the request features' types."""
        return {"embeddings": self.embeddings, "dense": nn.Sequential(self.mlp, nn.Flatten(0)),
                "feature_types": {"user_id": "int64", "movie_id": "int64"},
                "output": "sigmoid"}


def serving_model(dim: int = 16) -> ElasticLikeModel:
    """The model with the default settings and no store, for ``dynembed export``::

        dynembed export --factory examples.elastic_ctr:serving_model \\
            --checkpoint runs/elastic_ctr/checkpoints --name ctr --out store/ctr-1.0
    """
    return ElasticLikeModel(dim, 0.05, seed=0, rows_in_memory=None, store_for=lambda _: None)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m examples.elastic_ctr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int_at_least(0), default=1000, help="global training steps")
    p.add_argument("--batch-size", type=int_at_least(1), default=256, help="global batch (all ranks)")
    p.add_argument("--dim", type=int_at_least(1), default=16)
    p.add_argument("--emb-lr", type=positive_float, default=0.05, help="Adagrad, embeddings")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam, MLP")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--max-rows", type=int_at_least(3), default=None,
                   help="a subset of this many ratings (at least 3: a train and a test part)")
    p.add_argument("--checkpoint-dir", default="runs/elastic_ctr/checkpoints")
    p.add_argument("--checkpoint-every", type=int_at_least(1), default=200)
    p.add_argument("--fresh", action="store_true",
                   help="start from scratch: ignore (remove) earlier checkpoints")
    p.add_argument("--store-dir", default="runs/elastic_ctr/tables",
                   help="RocksDB directories (one per rank and table)")
    p.add_argument("--redis-url", default=None,
                   help="keep evicted rows in this Redis server instead (shared by ranks)")
    p.add_argument("--rows-in-memory", type=int_at_least(1), default=1000,
                   help="rows per table and rank in RAM; the rest live in the store")
    p.add_argument("--cache-dir", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    ratings, users, items = load_movielens_100k(args.cache_dir)
    if args.max_rows is not None and args.max_rows < len(ratings):
        ratings = ratings.sample(n=args.max_rows, random_state=args.seed)
    train_df, test_df = split(build_examples(ratings, users, items), "random", 0.2, args.seed)
    train, test = Batches(train_df), Batches(test_df)

    # used_stores="clear": a rank's rows come from the checkpoint it restores (lazily), or
    # on a fresh start from nothing, never from what an earlier run left in its store
    with de.train.Runtime(args.checkpoint_dir, every_steps=args.checkpoint_every,
                          used_stores="clear") as rt:
        if args.fresh and rt.rank == 0:
            for old in Path(args.checkpoint_dir).glob("step-*"):
                shutil.rmtree(old)
        rt.barrier()

        def store_for(table: str):
            if args.redis_url:
                return de.storage.RedisStore(args.redis_url, namespace=f"elastic_ctr:{table}")
            # each rank its own directory: RocksDB allows one process per database
            return de.storage.RocksDBStore(Path(args.store_dir) / f"rank-{rt.rank}" / table)

        model = ElasticLikeModel(args.dim, args.emb_lr, seed=args.seed,
                                 rows_in_memory=args.rows_in_memory, store_for=store_for)
        net = rt.prepare(model)
        opt = torch.optim.Adam(model.mlp.parameters(), lr=args.lr)
        rt.restore(opt)
        if rt.rank == 0:
            print(f"rank 0 of {rt.world_size}: {len(train_df):,} train ratings, starting at "
                  f"step {rt.step} of {args.steps} (restart {rt.env.restart_count})")
        loss_fn = nn.BCEWithLogitsLoss()
        for step in rt.steps(args.steps):
            idx = rt.batch_indices(step, args.batch_size, train.n, seed=args.seed)
            features, labels = train.batch(idx)
            loss = loss_fn(net(features), labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rt.log(loss=loss.item())
        if rt.preempted:
            return None
        return evaluate(rt, net, test)


@torch.no_grad()
def evaluate(rt: de.train.Runtime, net: nn.Module, test: Batches,
             batch_size: int = 1024) -> dict | None:
    """Every rank scores its part of each test batch; rank 0 reports AUC and log loss."""
    net.eval()
    probs, labels = [], []
    for start in range(0, test.n, batch_size):
        idx = de.train.rank_part(np.arange(start, min(start + batch_size, test.n)),
                                 rt.rank, rt.world_size)
        features, y = test.batch(idx)
        probs.append(torch.sigmoid(net(features)).numpy())
        labels.append(y.numpy())
    mine = (np.concatenate(probs), np.concatenate(labels))
    parts = [mine]
    if rt.distributed:
        parts = [None] * rt.world_size
        dist.all_gather_object(parts, mine)
    if rt.rank != 0:
        return None
    p = np.concatenate([a for a, _ in parts])
    y = np.concatenate([b for _, b in parts])
    result = {"auc": roc_auc(y, p), "logloss": log_loss(y, p), "steps": rt.step,
              "world_size": rt.world_size}
    print(f"test AUC {result['auc']:.4f}  log loss {result['logloss']:.4f}  after "
          f"{rt.step} steps on {rt.world_size} rank(s)")
    return result


if __name__ == "__main__":
    try:
        main()
    except DatasetUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
