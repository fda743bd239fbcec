"""Skip-gram Word2Vec with string keys and no dictionary (the paper's first experiment).

    python -m examples.word2vec                          # GCIDE text (downloaded once)
    python -m examples.word2vec --corpus multi30k --epochs 2

Words are keys of two dynamic tables: the input (center word) table and the output (context
word) table. No vocabulary is built: a word gets a row the first time it has been seen
``--min-count`` times (count-min admission; rarer words read the zero vector and are counted
as not admitted). Each step takes a batch of (center, context) pairs from a random window
around random positions of the text, and trains with a softmax over the context word and
``--num-sampled`` negatives drawn from the output table's live words with probability
proportional to count ** 0.75 (Word2Vec's unigram distribution, from the counts the table
keeps), with the logQ correction.

At the end the nearest neighbours (cosine, ``table.top_k`` over every live row, with the
real strings from the key log) of a few words are printed.

Data: GCIDE, the GNU Collaborative International Dictionary of English (about 5.4M tokens,
fetched with ``apt-get download dict-gcide`` and cached, never committed), or Multi30k's
English side from ``../shared/data/multi30k``.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dynembed as de
from examples._cli import int_at_least, positive_float
from examples.datasets import DatasetUnavailableError, load_gcide_tokens

MULTI30K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"
PROBES = {"gcide": ["king", "water", "red", "music", "horse", "ship", "january", "three"],
          "multi30k": ["man", "dog", "red", "water", "street", "shirt", "two", "playing"]}


def load_tokens(corpus: str, max_tokens: int | None) -> np.ndarray:
    """(n,) object array of lowercase word tokens."""
    if corpus == "gcide":
        tokens = load_gcide_tokens()
    else:
        path = MULTI30K / "train.en.gz"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; this corpus needs ../shared/data")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            tokens = "".join(c if c.isalpha() or c.isspace() else " "
                             for c in f.read().lower()).split()
    return np.array(tokens[:max_tokens] if max_tokens else tokens, dtype=object)


def skipgram_batch(tokens: np.ndarray, size: int, window: int,
                   rng: np.random.Generator) -> tuple[list, list]:
    """``size`` (center, context) pairs: random centers, contexts within a random window."""
    center = rng.integers(window, tokens.shape[0] - window, size)
    reach = rng.integers(1, window + 1, size)
    offset = reach * rng.choice(np.array([-1, 1]), size)
    return tokens[center].tolist(), tokens[center + offset].tolist()


def build(dim: int, lr: float, min_count: int, seed: int):
    admission = de.policy.FrequencyAdmission(threshold=min_count) if min_count > 1 else None
    words = de.DynamicEmbedding(dim=dim, optimizer=de.optim.Adagrad(lr=lr), seed=seed,
                                key_log=True, admission=admission)
    contexts = de.DynamicEmbedding(dim=dim, optimizer=de.optim.Adagrad(lr=lr), seed=seed + 1,
                                   initializer=de.init.Zeros(), admission=admission)
    return words, contexts


def neighbours(words: de.DynamicEmbedding, probes: list[str], k: int = 8) -> dict:
    """{word: its k nearest words by cosine}, for the probes that have rows."""
    present = [p for p in probes if words.table.contains([p]).item()]
    if not present:
        return {}
    vectors = words.table.find(present).values
    best = words.table.top_k(vectors, k + 1, metric="cosine")
    return {p: [w for w in found if w != p][:k] for p, found in zip(present, best.keys)}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m examples.word2vec",
                                description=__doc__.split("\n")[0])
    p.add_argument("--corpus", choices=["gcide", "multi30k"], default="gcide")
    p.add_argument("--max-tokens", type=int_at_least(1), default=None)
    p.add_argument("--epochs", type=positive_float, default=1.0,
                   help="pairs drawn = epochs x tokens x window")
    p.add_argument("--dim", type=int_at_least(1), default=100)
    p.add_argument("--window", type=int_at_least(1), default=5)
    p.add_argument("--batch-size", type=int_at_least(1), default=4096)
    p.add_argument("--num-sampled", type=int_at_least(1), default=256)
    p.add_argument("--min-count", type=int_at_least(1), default=5)
    p.add_argument("--lr", type=positive_float, default=0.2, help="Adagrad learning rate")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tokens = load_tokens(args.corpus, args.max_tokens)
    print(f"{args.corpus}: {tokens.shape[0]:,} tokens")
    if tokens.shape[0] <= 2 * args.window:  # no center word has a whole window around it
        raise SystemExit(f"error: {tokens.shape[0]:,} tokens are too few for --window "
                         f"{args.window}: skip-gram needs more than {2 * args.window} "
                         "(raise --max-tokens or lower --window)")
    words, contexts = build(args.dim, args.lr, args.min_count, args.seed)
    sampler = de.sampling.Unigram(power=0.75, refresh_every=200)
    steps = max(1, int(args.epochs * tokens.shape[0] * args.window / args.batch_size))
    losses = []
    for step in tqdm(range(steps), disable=args.no_progress, desc="skip-gram"):
        center, context = skipgram_batch(tokens, args.batch_size, args.window, rng)
        loss = de.sampled_softmax_loss(contexts, words(center), context,
                                       num_sampled=args.num_sampled, sampler=sampler,
                                       generator=rng)
        loss.backward()
        losses.append(loss.item())
        if args.no_progress and (step + 1) % max(1, steps // 5) == 0:
            print(f"step {step + 1:,}/{steps:,}: loss {np.mean(losses[-50:]):.4f}")
    stats = words.table.stats().totals
    print(f"\n{len(words.table):,} words have rows ({stats.not_admitted:,} lookups of words "
          f"not admitted yet); {len(contexts.table):,} context rows")
    found = neighbours(words, PROBES[args.corpus])
    for word, near in found.items():
        print(f"  {word:>10s}: {', '.join(near)}")
    return {"losses": losses, "neighbours": found, "words": words, "contexts": contexts}


if __name__ == "__main__":
    try:
        main()
    except (DatasetUnavailableError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
