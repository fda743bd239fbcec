"""Predict which movies a user likes, with dynamic embedding tables (MovieLens 100k).

    python -m examples.movielens                          # whole data set, 3 epochs
    python -m examples.movielens --max-rows 20000 --epochs 1
    python -m examples.movielens --resume                 # continue from the last checkpoint

The task: given a (user, movie) pair, predict whether the user rated the movie
4 or 5 stars ("liked it"). The model is the usual recommender recipe: one
embedding per categorical feature, concatenated, then a small MLP that outputs
one logit, trained with binary cross-entropy.

What dynembed changes is that there is no preprocessing of the categorical
features: no vocabulary, no string-to-index maps, no table sizes to choose.
Raw keys go straight in, int64 ids as tensors and strings as lists:

    user_id, movie_id          int64 ids               one row per id
    gender, occupation,        strings ("F", "writer",  one row per value
    zip_code, age_bucket        "85711", "25-34")
    genres, title              bags of strings          mean of the rows of
                               (["comedy", "drama"],    the words in the bag
                                ["toy", "story"])

A key is given a row the first time it is seen in training. At evaluation time
(``model.eval()``) unseen keys read as zeros and are not inserted, so a new
user or movie in the test set falls back on its other features.

Two optimizers share the work: the embedding tables update the rows a batch
touched inside ``loss.backward()`` with their own sparse optimizer (Adagrad
here), and a plain ``torch.optim.Adam`` updates the dense MLP.

Memory is bounded: each table keeps at most ``--rows-in-memory`` rows in RAM
over an embedded RocksDB directory (``--store-dir``, one per table). Rows that
leave memory (least recently used first) are written to RocksDB and read back
when their key returns, so the model trains exactly as with unbounded tables.

The job checkpoints itself (``--checkpoint-dir``) every ``--checkpoint-every`` steps and at
the end of each epoch: the tables (a full checkpoint, then deltas of the rows that changed),
the MLP, Adam's state and the data position. ``--resume`` restores the latest checkpoint,
lazily (rows are read from it as keys come back), and continues exactly where it stopped:
a run interrupted at any step and resumed ends with the same model as one that never
stopped. ``dynembed inspect runs/movielens/checkpoints`` shows what they hold.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

import dynembed as de
from examples._cli import int_at_least, positive_float
from examples.datasets import DatasetUnavailableError, load_movielens_100k

# ---------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------

# Which input feature reads which table. Every table is a dynamic table keyed
# by the raw values; "genres" and "title" share the "words" table, so that
# the genre "comedy" and the title word "comedy" are one row. Bag features are
# pooled with the mean of their rows.
FEATURES = {
    # feature       (table,        pooling)
    "user_id":      ("user",       None),
    "movie_id":     ("movie",      None),
    "gender":       ("gender",     None),
    "occupation":   ("occupation", None),
    "zip_code":     ("zip_code",   None),
    "age_bucket":   ("age",        None),
    "genres":       ("words",      "mean"),
    "title":        ("words",      "mean"),
}

AGE_BINS = [0, 18, 25, 35, 45, 50, 56, 200]
AGE_LABELS = ["under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]


def title_words(title: str) -> list[str]:
    """'Shawshank Redemption, The (1994)' -> ['shawshank', 'redemption', 'the']."""
    title = re.sub(r"\s*\(\d{4}\)\s*$", "", title)  # drop the release year
    return re.findall(r"[a-z0-9']+", title.lower())


def build_examples(ratings: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """One row per rating: the raw feature values, the label and the timestamp."""
    users = users.assign(
        age_bucket=pd.cut(users["age"], AGE_BINS, right=False, labels=AGE_LABELS).astype(str)
    )
    genre_cols = list(items.columns[items.columns.get_loc("unknown"):])
    genre_names = np.array([g.lower() for g in genre_cols], dtype=object)
    items = pd.DataFrame({
        "movie_id": items["movie_id"],
        # one-hot genre columns -> a bag of genre names, e.g. ["animation", "comedy"]
        "genres": [list(genre_names[row.astype(bool)]) for row in items[genre_cols].to_numpy()],
        "title": [title_words(t) for t in items["movie_title"]],
    })
    df = ratings.merge(users, on="user_id", how="left").merge(items, on="movie_id", how="left")
    df["label"] = (df["rating"] >= 4).astype(np.float32)
    return df[list(FEATURES) + ["label", "timestamp"]]


class Batches:
    """Feature columns as numpy arrays, sliced into the batches the model eats."""

    def __init__(self, df: pd.DataFrame):
        self.n = len(df)
        self.columns = {name: df[name].to_numpy() for name in FEATURES}
        self.labels = torch.tensor(df["label"].to_numpy(np.float32))

    def batch(self, idx: np.ndarray) -> tuple[dict, torch.Tensor]:
        features = {}
        for name, col in self.columns.items():
            col = col[idx]
            if col.dtype == np.int64:
                features[name] = torch.from_numpy(col)  # int64 keys as a tensor
            else:
                features[name] = col.tolist()  # strings, or bags as lists of strings
        return features, self.labels[idx]

    def __call__(self, batch_size: int, rng: np.random.Generator | None = None,
                 skip: int = 0):
        """Yield (features, labels) batches, shuffled when rng is given, after the first
        ``skip`` batches (a resumed epoch)."""
        order = rng.permutation(self.n) if rng is not None else np.arange(self.n)
        for start in range(skip * batch_size, self.n, batch_size):
            yield self.batch(order[start:start + batch_size])


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class LikeModel(nn.Module):
    """Dynamic embeddings for every feature, concatenated, into a small MLP."""

    def __init__(self, dim: int, emb_lr: float, hidden: int = 64, *,
                 store_dir: Path | None = None, rows_in_memory: int | None = None):
        super().__init__()
        tables = dict.fromkeys(table for table, _ in FEATURES.values())  # unique, in order
        self.embeddings = de.EmbeddingCollection(
            tables={
                name: de.TableConfig(
                    dim=dim, optimizer=de.optim.Adagrad(lr=emb_lr),
                    store=de.storage.RocksDBStore(store_dir / name) if store_dir else None,
                    max_rows=rows_in_memory,
                    key_log=True)  # dynembed inspect shows the strings behind the ids
                for name in tables
            },
            features={
                name: de.FeatureConfig(table=table, pooling=pooling)
                for name, (table, pooling) in FEATURES.items()
            },
        )
        self.mlp = nn.Sequential(
            nn.Linear(len(FEATURES) * dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: dict) -> torch.Tensor:
        x = self.embeddings(features, concat=True)  # (batch, features * dim)
        return self.mlp(x).squeeze(-1)  # one logit per example


# ---------------------------------------------------------------------------
# Metrics and baselines
# ---------------------------------------------------------------------------


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U), with ties counted as half."""
    ranks = pd.Series(scores).rank().to_numpy()
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def baselines(train: pd.DataFrame, test: pd.DataFrame) -> dict:
    """Two trivial predictors, fitted on the train split and scored on test.

    global rate: every pair gets the fraction of liked ratings in train.
    popularity:  every pair gets its movie's like rate in train, shrunk toward
                 the global rate by 10 pseudo-ratings (unseen movies: global).
    """
    y = test["label"].to_numpy()
    rate = train["label"].mean()
    per_movie = train.groupby("movie_id")["label"].agg(["sum", "count"])
    shrunk = (per_movie["sum"] + 10 * rate) / (per_movie["count"] + 10)
    popularity = test["movie_id"].map(shrunk).fillna(rate).to_numpy()
    constant = np.full(len(test), rate)
    return {
        "global": {"auc": roc_auc(y, constant), "logloss": log_loss(y, constant)},
        "popularity": {"auc": roc_auc(y, popularity), "logloss": log_loss(y, popularity)},
    }


@torch.no_grad()
def predict(model: LikeModel, data: Batches, batch_size: int = 1024):
    """Like probabilities for every example, and per table how many keys it had never seen."""
    before = defaults_served(model)
    model.eval()  # unseen keys read as zeros (the tables' default value) and are not inserted
    probs = torch.cat([torch.sigmoid(model(features)) for features, _ in data(batch_size)])
    model.train()
    unseen = {name: n - before[name] for name, n in defaults_served(model).items()}
    return probs.numpy(), unseen


def defaults_served(model: LikeModel) -> dict[str, int]:
    """Per table, how many lookups so far found no row and got the default vector."""
    tables = model.embeddings.tables  # table name -> de.DynamicTable
    return {name: table.stats().totals.defaults_served for name, table in tables.items()}


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def split(df: pd.DataFrame, how: str, test_fraction: float, seed: int):
    """80/20 split: random (seeded), or by time (the latest ratings are the test)."""
    if how == "time":
        df = df.sort_values("timestamp", kind="stable")
    else:
        df = df.sample(frac=1.0, random_state=seed)
    n_test = round(len(df) * test_fraction)
    return df.iloc[: len(df) - n_test], df.iloc[len(df) - n_test:]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m examples.movielens",
        description="Train a 'liked it' (rating >= 4) model on MovieLens 100k with dynembed tables.",
    )
    p.add_argument("--epochs", type=int_at_least(1), default=3, help="passes over the train split")
    p.add_argument("--batch-size", type=int_at_least(1), default=256, help="ratings per training step")
    p.add_argument("--dim", type=int_at_least(1), default=16, help="embedding dimension of every table")
    p.add_argument("--emb-lr", type=positive_float, default=0.05, help="Adagrad learning rate, embeddings")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate, MLP")
    # 3 ratings at least: the 80/20 split must leave a test rating and a train rating
    p.add_argument("--max-rows", type=int_at_least(3), default=None,
                   help="use a random subset of this many ratings (at least 3)")
    p.add_argument("--split", choices=["random", "time"], default="random",
                   help="random 80/20 (default), or time: test on the newest 20%% of ratings, "
                        "mostly by users never seen in training")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seeds the subset, split, shuffling and init")
    p.add_argument("--store-dir", default="runs/movielens/tables",
                   help="RocksDB directories of the tables (emptied at the start of a run)")
    p.add_argument("--rows-in-memory", type=int_at_least(1), default=1000,
                   help="rows each table keeps in RAM; the rest live in RocksDB")
    p.add_argument("--in-memory", action="store_true",
                   help="no storage tier: unbounded tables in RAM only")
    p.add_argument("--checkpoint-dir", default="runs/movielens/checkpoints",
                   help="where checkpoints go (emptied at the start of a run without --resume)")
    p.add_argument("--checkpoint-every", type=int_at_least(1), default=100,
                   help="training steps between checkpoints (also one at each epoch's end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--stop-after", type=int_at_least(0), default=None, metavar="STEPS",
                   help="stop after this many training steps (an interrupted job; --resume it)")
    p.add_argument("--cache-dir", default=None, help="data cache (default: $DYNEMBED_CACHE or ~/.cache/dynembed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars, only per-epoch lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # MLP init, and the tables' initializer seeds
    rng = np.random.default_rng(args.seed)

    # Data: raw features per rating, optionally subsampled, split 80/20.
    ratings, users, items = load_movielens_100k(args.cache_dir)
    if args.max_rows is not None and args.max_rows < len(ratings):
        ratings = ratings.sample(n=args.max_rows, random_state=args.seed)
    df = build_examples(ratings, users, items)
    train_df, test_df = split(df, args.split, 0.2, args.seed)
    train, test = Batches(train_df), Batches(test_df)
    print(f"MovieLens 100k: {len(train_df):,} train / {len(test_df):,} test ratings "
          f"({args.split} split), {train_df['label'].mean():.1%} liked in train")

    store_dir = None if args.in_memory else Path(args.store_dir)
    checkpoints = Path(args.checkpoint_dir)
    if not args.resume:  # a fresh run starts from empty tables and no checkpoints
        for folder in (store_dir, checkpoints):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    if store_dir is not None:
        store_dir.mkdir(parents=True, exist_ok=True)
    model = LikeModel(dim=args.dim, emb_lr=args.emb_lr, store_dir=store_dir,
                      rows_in_memory=None if args.in_memory else args.rows_in_memory)
    # Adam sees only the dense MLP; the tables update themselves in backward().
    dense_opt = torch.optim.Adam(model.mlp.parameters(), lr=args.lr)
    loss_fn = nn.BCEWithLogitsLoss()

    # Checkpoints: the first one full, then deltas; the latest 3 are kept.
    manager = de.checkpoint.CheckpointManager(checkpoints, every_steps=args.checkpoint_every,
                                              keep_last=3)
    # The data position: the epoch, the batches done in it, and the shuffling RNG's state
    # at the epoch's start (the epoch's order is drawn again from it on resume).
    position = {"step": 0, "epoch": 1, "batch": 0, "rng": rng.bit_generator.state,
                "history": [], "loss_sum": 0.0, "seen": 0}
    if args.resume:
        # with no checkpoint, the stores can only hold the rows of a run that stopped
        # before its first one: emptied, as a restore would
        restored = manager.restore(model, dense_opt, lazy=True, used_stores="clear")
        if restored is None:
            print(f"no checkpoint in {checkpoints}: starting from scratch")
        else:
            position.update(restored)
            print(f"resumed from {manager.latest()} at step {position['step']:,} "
                  f"(epoch {position['epoch']}, batch {position['batch']})")

    def save(force: bool = False) -> None:
        extra = {**position, "history": position["history"]}
        if force:
            manager.save(position["step"], model, dense_opt, extra=extra)
        else:
            manager.maybe_save(position["step"], model, dense_opt, extra=extra)

    y_test = test_df["label"].to_numpy()
    history = position["history"]
    def stop_due() -> bool:
        return args.stop_after is not None and position["step"] >= args.stop_after

    # Checked before the first step too: `--stop-after 0`, or a resumed run already at or
    # past it, trains nothing more (it once trained one step past it).
    stopped, unseen = stop_due(), None
    for epoch in range(position["epoch"], args.epochs + 1):
        if stopped:
            break
        if epoch != position["epoch"]:  # a new epoch: its order is drawn now
            position.update(epoch=epoch, batch=0, rng=rng.bit_generator.state, loss_sum=0.0,
                            seen=0)
        rng.bit_generator.state = position["rng"]
        bar = tqdm(train(args.batch_size, rng, skip=position["batch"]),
                   total=-(-train.n // args.batch_size), initial=position["batch"],
                   desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for features, labels in bar:
            loss = loss_fn(model(features), labels)
            dense_opt.zero_grad()
            loss.backward()  # also applies the Adagrad step to the touched embedding rows
            dense_opt.step()
            position["loss_sum"] += loss.item() * len(labels)
            position["seen"] += len(labels)
            position["step"] += 1
            position["batch"] += 1
            bar.set_postfix(loss=f"{position['loss_sum'] / position['seen']:.4f}",
                            refresh=False)
            save()
            if stop_due():
                stopped = True
                break
        if stopped:
            break
        total, seen = position["loss_sum"], position["seen"]
        probs, unseen = predict(model, test)
        history.append({"epoch": epoch, "train_loss": total / seen,
                        "test_auc": roc_auc(y_test, probs), "test_logloss": log_loss(y_test, probs)})
        print(f"epoch {epoch}/{args.epochs}: train loss {total / seen:.4f}, "
              f"test AUC {history[-1]['test_auc']:.4f}, test log loss {history[-1]['test_logloss']:.4f}")
        position.update(epoch=epoch + 1, batch=0, rng=rng.bit_generator.state, loss_sum=0.0,
                        seen=0)
        if manager.latest_step() != position["step"]:  # unless maybe_save saved it
            save(force=True)  # the end of an epoch is always a checkpoint
    if stopped:
        latest = manager.latest()
        print(f"stopped after step {position['step']:,} as asked (--stop-after); " + (
            f"the latest checkpoint is {latest}: continue with --resume" if latest else
            f"no checkpoint yet (every {args.checkpoint_every} steps and at each epoch's "
            "end), so --resume would start from scratch"))
        for table in model.embeddings.tables.values():
            table.close()
        return {"stopped_at": position["step"], "latest_checkpoint": manager.latest()}

    if unseen is None:  # resumed after the last epoch: nothing left to train
        _, unseen = predict(model, test)
    # Result against the trivial baselines, then what the tables hold.
    base = baselines(train_df, test_df)
    final = history[-1]
    print(f"\nResult on the {len(test_df):,} test ratings (label: rating >= 4):")
    print(f"  {'':22s}{'AUC':>8s}{'log loss':>10s}")
    print(f"  {'dynembed model':22s}{final['test_auc']:8.4f}{final['test_logloss']:10.4f}")
    print(f"  {'movie popularity':22s}{base['popularity']['auc']:8.4f}{base['popularity']['logloss']:10.4f}")
    print(f"  {'global like rate':22s}{base['global']['auc']:8.4f}{base['global']['logloss']:10.4f}")

    # Rows are the distinct keys met in training; "unseen" counts the test
    # lookups (key occurrences) that found no row and read the default zeros.
    tables = model.embeddings.tables
    for table in tables.values():
        table.flush()  # the store alone now holds every row
    table_rows = {name: (t.tier.store.size() if t.tier else t.size())
                  for name, t in tables.items()}
    print("\nTables" + ("" if store_dir is None else f" (RocksDB under {store_dir}/, "
                        f"at most {args.rows_in_memory:,} rows each in memory)") + ":")
    print(f"  {'table':12s}{'rows':>8s}{'in memory':>11s}{'hit rate':>10s}{'evicted':>9s}"
          f"{'read back':>11s}{'unseen in test':>16s}")
    for name, rows in table_rows.items():
        totals = tables[name].stats().totals
        hit_rate = totals.hits / max(1, totals.keys)
        print(f"  {name:12s}{rows:8,d}{tables[name].size():11,d}{hit_rate:10.1%}"
              f"{totals.evicted:9,d}{totals.loaded:11,d}{unseen[name]:16,d}")
    for table in tables.values():
        table.close()

    latest = manager.latest()
    plot = de.checkpoint.plot_history(checkpoints, checkpoints / "rows.png")
    print(f"\nCheckpoints in {checkpoints}/ (latest {latest.name}, "
          f"{de.checkpoint.describe(latest, top=0)['kind']}); rows per table over them: {plot}")
    print(f"  dynembed inspect {checkpoints}    # what they hold")

    return {
        "test_auc": final["test_auc"],
        "test_logloss": final["test_logloss"],
        "baseline": base,
        "history": history,
        "table_rows": table_rows,
        "unseen_in_test": unseen,
        "n_train": len(train_df),
        "n_test": len(test_df),
        "latest_checkpoint": latest,
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows the one-time download
    try:
        main()
    except DatasetUnavailableError as exc:
        sys.exit(f"error: {exc}")
