"""German -> English translation (Multi30k) whose target vocabulary is a dynamic table.

    python -m examples.seq2seq                         # 29k training pairs, 8 epochs
    python -m examples.seq2seq --max-pairs 5000 --epochs 3

A small GRU encoder-decoder. Source words, target input words and target output words are
keys of three dynamic tables (string keys, no vocabulary). The decoder's outputs are trained
with a sampled softmax over the output table (``--num-sampled`` negatives drawn from its
live words by unigram^0.75 of their counts, logQ-corrected); only touched rows are updated.
The dense GRUs use Adam. The tables queue their gradients (``update_mode="deferred"``) so
that ``de.clip_grad_norm_`` clips them with the GRUs' under one norm, as
``nn.utils.clip_grad_norm_`` clips a model built on ``nn.Embedding``.

Evaluation on the validation split uses the full softmax over every live output word: the
per-word cross-entropy (and perplexity) of the whole reference translations, against a
unigram model of the training targets (a reference word the model has no row for costs it
30 nats, more than add-one smoothing costs the unigram model: the comparison is
conservative), and the BLEU-4 of greedy translations, decoded with
``out.table.top_k`` (k=1) at each step.
"""

from __future__ import annotations

import argparse
import gzip
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import dynembed as de
from examples._cli import int_at_least, positive_float

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"
BOS, EOS = "<s>", "</s>"
_WORD = re.compile(r"[^\W\d_]+")


def read(split: str, lang: str, max_pairs: int | None,
         max_len: int | None) -> list[list[str]]:
    """Sentences as lowercase words, cut to ``max_len`` words (None: whole)."""
    path = DATA / f"{split}.{lang}.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; this example needs ../shared/data")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [_WORD.findall(line.lower())[:max_len] for line in f]
    return lines[:max_pairs] if max_pairs else lines


def embed(table: de.DynamicEmbedding, sentences: list[list[str]]) -> torch.Tensor:
    """(B, T, dim) rows of padded sentences (zeros after each sentence's end)."""
    lengths = [len(s) for s in sentences]
    width = max(lengths)
    flat = [w for s in sentences for w in s]
    rows = table(flat)
    out = rows.new_zeros((len(sentences), width, rows.shape[1]))
    batch = np.repeat(np.arange(len(sentences)), lengths)
    column = np.concatenate([np.arange(n) for n in lengths])
    return out.index_put((torch.from_numpy(batch), torch.from_numpy(column)), rows)


class Translator(nn.Module):
    def __init__(self, dim: int, hidden: int, lr: float, seed: int) -> None:
        super().__init__()

        def table(offset: int, **options) -> de.DynamicEmbedding:
            return de.DynamicEmbedding(dim=dim if offset < 2 else hidden,
                                       optimizer=de.optim.Adagrad(lr=lr), seed=seed + offset,
                                       key_log=offset == 2, update_mode="deferred",
                                       **options)

        self.source, self.target = table(0), table(1)
        self.out = table(2, initializer=de.init.Normal(std=0.05))
        self.encoder = nn.GRU(dim, hidden, batch_first=True)
        self.decoder = nn.GRU(dim, hidden, batch_first=True)

    def states(self, src: list[list[str]], tgt_in: list[list[str]]) -> torch.Tensor:
        """(B, T, hidden) decoder states for teacher-forced target inputs."""
        _, h = self.encoder(nn.utils.rnn.pack_padded_sequence(
            embed(self.source, src), [len(s) for s in src], batch_first=True,
            enforce_sorted=False))
        out, _ = self.decoder(embed(self.target, tgt_in), h)
        return out

    @torch.no_grad()
    def translate(self, src: list[list[str]], max_len: int = 30) -> list[list[str]]:
        """Greedy decoding: at each step the output word whose row scores highest (eval
        mode: no table changes)."""
        self.eval()
        _, h = self.encoder(nn.utils.rnn.pack_padded_sequence(
            embed(self.source, src), [len(s) for s in src], batch_first=True,
            enforce_sorted=False))
        words = [[BOS] for _ in src]
        done = np.zeros(len(src), bool)
        for _ in range(max_len):
            x = self.target([w[-1] for w in words]).unsqueeze(1)
            step, h = self.decoder(x, h)
            best = self.out.table.top_k(step[:, 0], 1).keys
            for i, choice in enumerate(best):
                if not done[i]:
                    words[i].append(choice[0])
                    done[i] = choice[0] == EOS
            if done.all():
                break
        self.train()
        return [[w for w in s[1:] if w != EOS] for s in words]


def bleu4(hypotheses: list[list[str]], references: list[list[str]]) -> float:
    """Corpus BLEU-4 (one reference, brevity penalty), in [0, 100]."""
    matched, total = np.zeros(4), np.zeros(4)
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, 5):
            h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            r = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            matched[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0 or (matched == 0).any():
        return 0.0
    precision = np.exp(np.mean(np.log(matched / total)))
    penalty = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * penalty * precision


def cross_entropy(model: Translator, src, tgt, batch: int = 256) -> float:
    """Mean per-word cross-entropy (nats) of the references under the full softmax over
    every live output word (unknown reference words count against the model)."""
    model.eval()
    words = model.out.table.export()
    index = {int(i): n for n, i in enumerate(words.ids.tolist())}
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(src), batch):
            s, t = src[start:start + batch], tgt[start:start + batch]
            states = model.states(s, [[BOS] + x for x in t])
            logits = torch.log_softmax(states @ words.weights.T, dim=-1)
            for i, sentence in enumerate(t):
                ids = model.out.table.ids_of(sentence + [EOS]).ids.tolist()
                for j, key in enumerate(ids):
                    total -= logits[i, j, index[key]].item() if key in index else -30.0
                    count += 1
    model.train()
    return total / count


def unigram_cross_entropy(train_tgt, test_tgt) -> float:
    counts = Counter(w for s in train_tgt for w in s + [EOS])
    total = sum(counts.values())
    vocab = len(counts) + 1
    words = [w for s in test_tgt for w in s + [EOS]]
    return float(np.mean([-math.log((counts[w] + 1) / (total + vocab)) for w in words]))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m examples.seq2seq",
                                description=__doc__.split("\n")[0])
    p.add_argument("--max-pairs", type=int_at_least(1), default=None)
    p.add_argument("--max-len", type=int_at_least(1), default=20, help="words kept per sentence")
    p.add_argument("--epochs", type=int_at_least(0), default=8)
    p.add_argument("--dim", type=int_at_least(1), default=128)
    p.add_argument("--hidden", type=int_at_least(1), default=256)
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--num-sampled", type=int_at_least(1), default=512)
    p.add_argument("--lr", type=positive_float, default=0.1, help="Adagrad learning rate, tables")
    p.add_argument("--dense-lr", type=positive_float, default=2e-3, help="Adam learning rate, GRUs")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    src = read("train", "de", args.max_pairs, args.max_len)
    tgt = read("train", "en", args.max_pairs, args.max_len)
    keep = [i for i in range(len(src)) if src[i] and tgt[i]]
    src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
    val_src, val_tgt = read("val", "de", None, None), read("val", "en", None, None)
    print(f"Multi30k: {len(src):,} training pairs, {len(val_src):,} validation pairs")
    model = Translator(args.dim, args.hidden, args.lr, args.seed)
    dense = torch.optim.Adam([p for p in model.parameters() if p.numel()], lr=args.dense_lr)
    sampler = de.sampling.Unigram(power=0.75, refresh_every=100)
    history = []
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(src))
        losses = []
        for start in tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch}",
                          leave=False, disable=args.no_progress):
            pick = order[start:start + args.batch_size]
            s, t = [src[i] for i in pick], [tgt[i] for i in pick]
            states = model.states(s, [[BOS] + x for x in t])
            mask = np.zeros(states.shape[:2], bool)
            for i, x in enumerate(t):
                mask[i, :len(x) + 1] = True
            labels = [w for x in t for w in x + [EOS]]
            loss = de.sampled_softmax_loss(model.out, states[torch.from_numpy(mask)], labels,
                                           num_sampled=args.num_sampled, sampler=sampler,
                                           generator=rng)
            dense.zero_grad()
            loss.backward()  # queues the touched rows' gradients, and the GRUs'
            de.clip_grad_norm_(model, 1.0)  # one norm over both, as for nn.Embedding
            dense.step()
            de.sparse_step(model)  # sparse Adagrad on the touched rows
            losses.append(loss.item())
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses))})
        print(f"epoch {epoch}/{args.epochs}: sampled softmax loss {np.mean(losses):.4f}")
    ce = cross_entropy(model, val_src, val_tgt)
    unigram = unigram_cross_entropy(tgt, val_tgt)
    hyps = model.translate(val_src)
    bleu = bleu4(hyps, val_tgt)
    print(f"\nValidation: cross-entropy {ce:.3f} nats/word (perplexity {math.exp(ce):.1f}); "
          f"unigram model {unigram:.3f} (perplexity {math.exp(unigram):.1f}); "
          f"BLEU-4 of greedy translations {bleu:.1f}")
    for s, h, r in list(zip(val_src, hyps, val_tgt))[:3]:
        print(f"  {' '.join(s)}\n    -> {' '.join(h)}\n    (reference: {' '.join(r)})")
    return {"cross_entropy": ce, "unigram_cross_entropy": unigram, "bleu": bleu,
            "history": history, "target_words": len(model.out.table)}


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as exc:
        sys.exit(f"error: {exc}")
