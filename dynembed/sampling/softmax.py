"""Sampled softmax over a dynamic output table (the paper's sampled-logits op).

For a batch of activations ``inputs`` (B, dim) and, per example, one or more positive keys,
the logits are computed against the example's positives and ``num_sampled`` negatives
shared by the batch, drawn from the output table's live rows by a
:class:`~dynembed.sampling.samplers.CandidateSampler`. With the logQ correction each logit
has ``log(expected count)`` of its candidate subtracted, which makes the sampled softmax a
consistent estimate of the full softmax over every row when accidental hits are kept
(``remove_accidental_hits=False``). Masking them (a negative that is one of the example's
positives; the default, as TensorFlow's ``sampled_softmax_loss``) takes the positive's own
draws out of the normaliser, so the estimate tends to the softmax over the other rows:
its gradient is the full one times ``1 / (1 - p)`` for a positive of probability ``p``
(measured 1.16 to 1.89 for p of 0.14 to 0.47), which matters only once the model puts
much mass on the positives. The loss is the cross-entropy against the uniform distribution
over the example's positives.

Positives are looked up like any training lookup (inserted if admitted, counted); negatives
are only read (never inserted or counted). Backward updates the rows of both with the
table's sparse optimizer, once per distinct row.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from typing import NamedTuple

import numpy as np
import torch

from dynembed._caller import warn_at_caller
from dynembed.kernels.hash_index import unique_inverse
from dynembed.keys.convert import is_values_offsets, to_jagged
from dynembed.nn._autograd import _GatherRows, index_rows
from dynembed.nn._padding import drop_padding_from_bags
from dynembed.nn.embedding import DynamicEmbedding
from dynembed.sampling.samplers import CandidateSampler, InBatch, Uniform
from dynembed.table.index import EMPTY
from dynembed.table.stats import CallStats

log = logging.getLogger(__name__)

_WARNED_PARTLY_LOADED: weakref.WeakSet = weakref.WeakSet()
"""Output tables warned about drawing from a lazily opened checkpoint's rows in memory."""


def _warn_partly_loaded(table) -> None:
    """Warns once per table that its negatives come from the rows in memory only, while a
    lazily opened checkpoint holds the rest: after a lazy restore (the Runtime's), a model
    trained against the few rows looked up since, e.g. 800 of 4,000 in 50 steps."""
    if table in _WARNED_PARTLY_LOADED:
        return
    _WARNED_PARTLY_LOADED.add(table)
    warnings.warn(
        f"sampled softmax: the output table was restored lazily and has {table.size():,} "
        "rows in memory so far; negatives are drawn from those only (InBatch's correction "
        "counts only them), not from the checkpoint's rows not read yet. Load them first "
        "with de.checkpoint.load_step(table), or restore with background_rows",
        RuntimeWarning, stacklevel=4)
MASKED = -1e9
"""Logit of padding and masked candidates in :class:`SampledLogits` (finite, so that
``torch.nn.functional.cross_entropy(logits, targets)`` works; exp() of it is 0)."""


class SampledLogits(NamedTuple):
    """Logits over each example's positives and the shared negatives.

    Attributes:
        logits: (B, P + S) float32 on the inputs' device: the example's positives (padded to P, the most of any
            example; padding is :data:`MASKED`) then the S sampled candidates
            (:data:`MASKED` where masked as accidental hits); logQ-corrected when asked.
        targets: (B, P + S) float32 target distribution: 1/p_b over the example's p_b
            positives, 0 elsewhere.
        sampled_ids: (S,) int64 ids of the sampled candidates.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    sampled_ids: np.ndarray


def _labels(output: DynamicEmbedding, labels, batch: int):
    """(flat label ids, (B + 1,) bounds, strings, string ids) of the labels."""
    seed = output.table.config.hash_seed
    if is_values_offsets(labels, "labels"):
        keys, bounds = to_jagged(labels[0], labels[1], hash_seed=seed, arg="labels")
    elif (isinstance(labels, (torch.Tensor, np.ndarray)) and labels.ndim == 1) or (
            isinstance(labels, (list, tuple)) and labels
            and not isinstance(labels[0], (list, tuple))):
        # one positive per example: flat keys, one offset each
        keys, bounds = to_jagged(labels, np.arange(len(labels)), hash_seed=seed, arg="labels")
    else:
        keys, bounds = to_jagged(labels, hash_seed=seed, arg="labels")
    if bounds.shape[0] - 1 != batch:
        raise ValueError(f"labels has {bounds.shape[0] - 1} examples but inputs has {batch}; "
                         "give one (or more) positive keys per row of inputs")
    # the padding key is no label: it never gets a row (so it is never drawn either)
    keys, bounds, _ = drop_padding_from_bags(keys, bounds, None, output.table.padding_id)
    if (np.diff(bounds) == 0).any():
        empty = int(np.flatnonzero(np.diff(bounds) == 0)[0])
        padding = "" if output.table.padding_id is None else \
            " (the padding key is not one: leave padded positions out of inputs and labels)"
        raise ValueError(f"labels: example {empty} has no positive key{padding}; every "
                         "example needs at least one")
    ids = keys.ids
    example = np.repeat(np.arange(batch), np.diff(bounds))
    order = np.lexsort((ids, example))  # a key repeated in one example counts once
    by_pair, by_example = ids[order], example[order]
    first = np.ones(ids.shape[0], dtype=bool)
    first[1:] = (by_pair[1:] != by_pair[:-1]) | (by_example[1:] != by_example[:-1])
    if not first.all():
        ids = by_pair[first]
        bounds = np.concatenate([[0], np.cumsum(np.bincount(by_example[first],
                                                            minlength=batch))])
    return ids, bounds, keys.strings, keys.ids if keys.strings is not None else None


def _accidental_hits(pos_ids: np.ndarray, example: np.ndarray,
                     sampled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(examples, candidates): the pairs where sampled candidate s is one of example b's
    positives (few: found by sorting, without a (B, S) matrix)."""
    if pos_ids.shape[0] == 0 or sampled.shape[0] == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order = np.argsort(pos_ids, kind="stable")
    sorted_ids, sorted_example = pos_ids[order], example[order]
    lo = np.searchsorted(sorted_ids, sampled, side="left")
    reps = np.searchsorted(sorted_ids, sampled, side="right") - lo
    cand = np.repeat(np.arange(sampled.shape[0]), reps)
    at = np.repeat(lo, reps) + (np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps))
    return sorted_example[at], cand


class _Candidates(NamedTuple):
    device: torch.device  # the inputs' (the logits are computed on the CPU, by the rows)
    true_logits: torch.Tensor  # (B, P), -inf padding
    neg_logits: torch.Tensor  # (B, S), -inf at accidental hits
    positives: np.ndarray  # (B,) int64 positives per example
    sampled_ids: np.ndarray  # (S,)


def sampled_logits(output: DynamicEmbedding, inputs: torch.Tensor, labels, *,
                   num_sampled: int, sampler: CandidateSampler | None = None,
                   remove_accidental_hits: bool = True, logq_correction: bool = True,
                   normalize: bool = False, temperature: float = 1.0,
                   generator: np.random.Generator | int | None = None) -> SampledLogits:
    """Logits of each example against its positives and sampled negatives (for a loss of
    your own; :func:`sampled_softmax_loss` computes its loss without these dense tensors).

    Args:
        output: the output embedding (its table holds one row per output key).
        inputs: (B, dim) activations.
        labels: positives per example: a (B,) tensor/array, list or tuple of keys (one
            each), a list of B lists of keys, or (flat keys, offsets) with the offsets a
            tensor or array (two flat int lists are refused as ambiguous).
        num_sampled: negatives drawn for the batch (ignored by :class:`InBatch`).
        sampler: a :class:`CandidateSampler` (default :class:`Uniform`).
        remove_accidental_hits: mask a negative that is one of the example's positives.
        logq_correction: subtract log(expected count) of each candidate from its logit.
        normalize: score by cosine (inputs and rows L2-normalised) instead of dot product.
        temperature: logits are divided by it (before the correction).
        generator: the draws' randomness: a numpy Generator; or an int seed >= 0, with
            which the random numbers depend on (seed, the table's step), so every training
            step gets new negatives, two runs from the start draw alike, and an eval (which
            leaves the step as it is) draws the same ones each call; or None for fresh
            entropy. After a checkpoint restore the same numbers pick other negatives
            except with :class:`InBatch`: :class:`Uniform` picks memory slots, which rows
            take in another order, and the frequency samplers draw from a snapshot of the
            rows in memory taken at another step (after a lazy restore, of the few rows
            loaded so far).

    Returns:
        :class:`SampledLogits`.

    Raises:
        ValueError, TypeError: bad shapes or arguments (named).
    """
    c = _candidates(output, inputs, labels, num_sampled=num_sampled, sampler=sampler,
                    remove_accidental_hits=remove_accidental_hits,
                    logq_correction=logq_correction, normalize=normalize,
                    temperature=temperature, generator=generator)
    batch, width = c.true_logits.shape
    example = np.repeat(np.arange(batch), c.positives)
    column = np.arange(example.shape[0]) - np.repeat(np.cumsum(c.positives) - c.positives,
                                                     c.positives)
    targets = torch.zeros((batch, width + c.sampled_ids.shape[0]))
    targets[torch.from_numpy(example), torch.from_numpy(column)] = torch.from_numpy(
        1.0 / c.positives[example]).to(torch.float32)
    logits = torch.cat([c.true_logits, c.neg_logits], 1)
    logits = logits.masked_fill(torch.isinf(logits), MASKED)
    return SampledLogits(logits.to(c.device), targets.to(c.device), c.sampled_ids)


def _candidates(output, inputs, labels, *, num_sampled, sampler, remove_accidental_hits,
                logq_correction, normalize, temperature, generator) -> _Candidates:
    if not isinstance(output, DynamicEmbedding):
        raise TypeError(f"output must be a DynamicEmbedding, got {type(output).__name__}")
    # numpy integers too (a size from an array's shape or a config read with numpy)
    if isinstance(num_sampled, (bool, np.bool_)) \
            or not isinstance(num_sampled, (int, np.integer)) or num_sampled < 0:
        raise ValueError(f"num_sampled must be an int >= 0, got {num_sampled!r}")
    num_sampled = int(num_sampled)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if sampler is not None and not isinstance(sampler, CandidateSampler):
        raise TypeError(f"sampler must be a de.sampling sampler such as "
                        f"de.sampling.Uniform(), got {type(sampler).__name__}")
    if generator is not None and not isinstance(generator, (int, np.integer,
                                                             np.random.Generator)) \
            or isinstance(generator, (bool, np.bool_)):
        raise TypeError(f"generator must be None, an int seed or a numpy Generator, got "
                        f"{type(generator).__name__}")
    if isinstance(generator, (int, np.integer)):
        if generator < 0:
            raise ValueError(f"generator: an int seed must be >= 0, got {generator}")
        generator = int(generator)
    for name, flag in (("remove_accidental_hits", remove_accidental_hits),
                       ("logq_correction", logq_correction), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a (batch, dim) float tensor, got "
                        f"{type(inputs).__name__}")
    table = output.table
    if table.router is not None:
        raise ValueError("sampled softmax: the output table is part of a distributed job "
                         "(sharded or replicated across ranks), which sampled softmax does not "
                         "support yet; keep the output table out of the model given to "
                         "de.distributed.shard_model / Runtime.prepare")
    if inputs.dim() != 2 or inputs.shape[1] != table.dim:
        raise ValueError(f"inputs must have shape (batch, {table.dim}), got "
                         f"{tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be a float tensor, got {inputs.dtype}")
    if inputs.is_meta:  # torch: "Cannot copy out of meta tensor; no data!"
        raise ValueError("inputs are on the meta device, which holds no values; give real "
                         "tensors (build the model on a real device, or call .to('cpu'))")
    # rows are float32 in host memory: inputs of a float64 or bfloat16 model, or of one on a
    # GPU, are scored in float32 on the CPU, and their gradient flows back through the copy
    device = inputs.device
    inputs = inputs.to("cpu", torch.float32)
    sampler = sampler or Uniform()
    if isinstance(generator, np.random.Generator):
        rng = generator
    else:  # a fixed seed alone would draw the same negatives at every step
        rng = np.random.default_rng(None if generator is None else (generator, table.step))
    batch = inputs.shape[0]
    pos_ids, bounds, strings, string_ids = _labels(output, labels, batch)
    example = np.repeat(np.arange(batch), np.diff(bounds))
    training = output.training and not table.read_only

    # Candidates: the distinct positives (a training lookup, first: it may evict rows) and
    # then the negatives, drawn from the rows alive after it (read only).
    unique_pos, pos_inverse, pos_counts = unique_inverse(pos_ids)
    if training:
        pos_slots = table.lookup_slots(unique_pos, pos_counts, insert=True, strings=strings,
                                       string_ids=string_ids)
    else:
        pos_slots = table.index.find(unique_pos)
    if table.base is not None:
        _warn_partly_loaded(table)
    drawn = sampler.sample(table, num_sampled, rng, unique_pos)
    # In-batch negatives in eval are the positives with a row anywhere: rows in the store
    # or a lazily opened checkpoint are read below, and only then is it known which exist.
    # Otherwise negatives are rows in memory (rows gone since a snapshot are skipped).
    in_batch_read = not training and isinstance(sampler, InBatch)
    sampled = drawn if in_batch_read else drawn[table.index.find(drawn) != EMPTY]
    if num_sampled and sampled.shape[0] == 0 and not isinstance(sampler, InBatch):
        log.warning("sampled softmax: %s; the loss covers the positives only",
                    "the output table has no row in memory to draw negatives from"
                    if table.size() == 0 else
                    f"all {drawn.shape[0]} negatives drawn had left memory")
    cand_ids, cand_inverse, _ = unique_inverse(np.concatenate([unique_pos, sampled]))
    neg_inverse = cand_inverse[unique_pos.shape[0]:]
    cand_slots = table.index.find(cand_ids)
    cand_slots[cand_inverse[:unique_pos.shape[0]]] = pos_slots  # EMPTY if not admitted
    cand_counts = None  # the candidates' training counts, where read beyond memory
    if training and table.trainable and output._anchor.requires_grad \
            and torch.is_grad_enabled():
        rows = _GatherRows.apply(output._anchor, table, cand_ids, cand_slots, None)
    elif training:
        rows = table.gather(cand_slots)
    else:  # evaluation: rows in the store or a lazily opened checkpoint are read too
        # counted as a read of the labels, as an eval lookup of them counts (a label whose
        # row is in the store: a miss, loaded); the negatives are the loss's own business
        label_counts = np.zeros(cand_ids.shape[0], dtype=np.int64)
        label_counts[cand_inverse[:unique_pos.shape[0]]] = pos_counts
        call = CallStats(keys=pos_ids.shape[0])
        rows, missing = table._find_gather(cand_ids, call, label_counts)
        call.hits = call.keys - call.misses
        call.defaults_served = int(label_counts[missing].sum())
        table.last_call = call
        table.counters.add_call(call)
        if in_batch_read:  # a label without a row is no negative, as in training
            has_row = ~missing[neg_inverse]
            sampled, neg_inverse = sampled[has_row], neg_inverse[has_row]
            if logq_correction:  # counts of rows in the store too (training brings them in)
                cand_counts = table.training_counts(cand_ids)
    if normalize:
        rows = torch.nn.functional.normalize(rows, dim=1)
        inputs = torch.nn.functional.normalize(inputs, dim=1)
    inputs = inputs / temperature
    pos_rows = index_rows(rows, cand_inverse[:unique_pos.shape[0]][pos_inverse])
    neg_rows = index_rows(rows, neg_inverse)

    # Positive logits, padded to the most positives of any example.
    width = int(np.diff(bounds).max()) if batch else 0
    column = np.arange(pos_ids.shape[0]) - bounds[example]
    true_logits = torch.full((batch, width), float("-inf"))
    flat = (inputs[torch.from_numpy(example)] * pos_rows).sum(1)
    draws = sampler.draws(num_sampled, unique_pos)

    def log_q(ids, at_candidates):
        counts = None if cand_counts is None else cand_counts[at_candidates]
        return torch.from_numpy(
            sampler.log_expected_count(table, ids, draws, counts).astype(np.float32))

    if logq_correction:
        flat = flat - log_q(pos_ids, cand_inverse[:unique_pos.shape[0]][pos_inverse])
    true_logits = true_logits.index_put((torch.from_numpy(example), torch.from_numpy(column)),
                                        flat)
    neg_logits = inputs @ neg_rows.T  # (B, S): changed in place below, no copies
    if logq_correction and sampled.shape[0]:
        neg_logits.sub_(log_q(sampled, neg_inverse))
    if remove_accidental_hits and sampled.shape[0]:
        rows_hit, cols_hit = _accidental_hits(pos_ids, example, sampled)
        if rows_hit.shape[0]:
            neg_logits.index_put_((torch.from_numpy(rows_hit), torch.from_numpy(cols_hit)),
                                  torch.tensor(float("-inf")))
    return _Candidates(device, true_logits, neg_logits, np.diff(bounds), sampled)


def sampled_softmax_loss(output: DynamicEmbedding, inputs: torch.Tensor, labels, *,
                         num_sampled: int, sampler: CandidateSampler | None = None,
                         remove_accidental_hits: bool = True, logq_correction: bool = True,
                         normalize: bool = False, temperature: float = 1.0,
                         generator: np.random.Generator | int | None = None,
                         reduction: str = "mean") -> torch.Tensor:
    """Sampled softmax cross-entropy of each example against its positives.

    Arguments as :func:`sampled_logits`; ``reduction``: ``"mean"``, ``"sum"`` or
    ``"none"`` (a (B,) loss per example).

    Returns:
        The float32 loss on the inputs' device (a scalar, or (B,) with
        ``reduction="none"``); ``backward()`` updates the output rows of the positives and
        the negatives (and whatever produced ``inputs``).

    Example:
        >>> words = de.DynamicEmbedding(dim=64, optimizer=de.optim.Adagrad(lr=0.1))
        >>> out = de.DynamicEmbedding(dim=64, optimizer=de.optim.Adagrad(lr=0.1))
        >>> loss = de.sampled_softmax_loss(out, words(centers), contexts, num_sampled=64,
        ...                                sampler=de.sampling.Unigram(power=0.75))
        >>> loss.backward()
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if num_sampled == 0 and not isinstance(sampler, InBatch):
        warnings.warn("sampled_softmax_loss with num_sampled=0 and no InBatch sampler has no "
                      "negatives: an example's positives are compared with each other only, "
                      "so one with a single positive has loss 0 and trains nothing; give "
                      "num_sampled > 0 or sampler=de.sampling.InBatch()",
                      RuntimeWarning, stacklevel=2)
    c = _candidates(output, inputs, labels, num_sampled=num_sampled, sampler=sampler,
                    remove_accidental_hits=remove_accidental_hits,
                    logq_correction=logq_correction, normalize=normalize,
                    temperature=temperature, generator=generator)
    if isinstance(sampler, InBatch) and not torch.isfinite(c.neg_logits).any():
        # every in-batch candidate was an example's own positive (masked as a hit)
        warn_at_caller("sampled_softmax_loss with InBatch found no negatives in this batch "
                       "(one example, or every example has the same positives): the loss "
                       "compares an example's positives with each other only and trains "
                       "nothing for one with a single positive; use larger batches, or "
                       "num_sampled > 0 with a sampler that draws from the table",
                       RuntimeWarning)
    # -log p(positive) averaged over an example's positives, with the partition function
    # of [positives, negatives] taken in two parts (no (B, P + S) tensor is built)
    log_z = torch.logaddexp(torch.logsumexp(c.true_logits, 1),
                            torch.logsumexp(c.neg_logits, 1)
                            if c.neg_logits.shape[1] else
                            torch.full((c.true_logits.shape[0],), float("-inf")))
    positives = torch.from_numpy(c.positives).to(c.true_logits.dtype)
    true_sum = torch.where(torch.isinf(c.true_logits), torch.zeros_like(c.true_logits),
                           c.true_logits).sum(1)
    per_example = log_z - true_sum / positives
    if reduction != "none":
        per_example = per_example.sum() if reduction == "sum" else per_example.mean()
    return per_example.to(c.device)
