"""Admission policies: whether an unseen key has earned a row yet.

A policy is a frozen config; a table calls :meth:`AdmissionPolicy.create` once to get the
:class:`Admitter` that holds its state (sketch counters, Bloom bits). A training lookup asks
``decide`` (pure) for the keys that have neither a row nor a stored row, then ``record``s
their sighting once the lookup goes ahead. Keys not admitted get the default vector and no
gradient; the table counts both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dynembed._args import check_in, check_int, plain_fields
from dynembed.kernels import sketch as k

_SEED_MIX = 0x9E3779B97F4A7C15


def _seeds(seed: int, n: int) -> np.ndarray:
    """n distinct uint64 hash seeds derived from one policy seed."""
    return (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_SEED_MIX)) ^ np.uint64(seed)


def _power_of_two(value: int) -> int:
    return 1 << max(0, (int(value) - 1).bit_length())


class Admitter:
    """The state of one table's admission policy."""

    def decide(self, ids: np.ndarray, counts: np.ndarray, step: int) -> np.ndarray:
        """(n,) bool: which of these distinct unseen ids get a row at this lookup.

        Args:
            ids: (n,) int64 distinct ids with no row in memory or store.
            counts: (n,) int64 occurrences in this lookup.
            step: the table step of this lookup.
        """
        raise NotImplementedError

    def record(self, ids: np.ndarray, counts: np.ndarray, step: int) -> None:
        """Remembers that these ids were looked up (called after :meth:`decide`)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The admitter's state as plain tensors."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict`."""

    def merge_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Adds the keys another shard's admitter saw (its :meth:`state_dict`): a table
        restored on fewer ranks owns the keys of several old shards."""


@dataclass(frozen=True, kw_only=True)
class AdmissionPolicy:
    """Base of the admission policies."""

    def create(self, seed: int) -> Admitter:
        """A fresh admitter; ``seed`` (the table's) fixes its hash functions."""
        raise NotImplementedError


# ---------------------------------------------------------------------- admit all
class _AdmitAll(Admitter):
    def decide(self, ids, counts, step):
        return np.ones(ids.shape[0], dtype=bool)


@dataclass(frozen=True, kw_only=True)
class AdmitAll(AdmissionPolicy):
    """Every key gets a row at its first lookup (the default)."""

    def create(self, seed: int) -> Admitter:
        return _AdmitAll()


# ---------------------------------------------------------------------- count-min sketch
class _SketchAdmitter(Admitter):
    def __init__(self, policy: FrequencyAdmission, seed: int) -> None:
        self.policy = policy
        self.seeds = _seeds(seed, policy.depth)
        self.sketch = np.zeros((policy.depth, _power_of_two(policy.width)), dtype=np.int32)
        self.decayed_at = 0
        self.scale = _DECAY_SCALE if policy.decay_every else 1
        """Counter units per lookup (see _DECAY_SCALE)."""

    def _decay_until(self, step: int) -> None:
        """Applies the decays due by ``step`` (idempotent: only the periods not yet applied,
        so a decision after many hit-only steps sees the decayed counts)."""
        every = self.policy.decay_every
        if every and step - self.decayed_at >= every:
            periods = (step - self.decayed_at) // every
            factor = self.policy.decay ** periods
            np.multiply(self.sketch, factor, out=self.sketch, casting="unsafe")
            self.decayed_at += periods * every

    def decide(self, ids, counts, step):
        self._decay_until(step)
        return k.cms_estimate(self.sketch, ids, counts * self.scale, self.seeds) \
            >= self.policy.threshold * self.scale

    def record(self, ids, counts, step):
        self._decay_until(step)
        k.cms_add(self.sketch, ids, counts * self.scale, self.seeds)

    def state_dict(self):
        return {"sketch": torch.from_numpy(self.sketch.copy()),
                "decayed_at": torch.tensor(self.decayed_at),
                "scale": torch.tensor(self.scale)}

    def _counters(self, state) -> np.ndarray:
        """A saved sketch in this admitter's counter units (states saved before the scale
        existed, or by a policy with or without decay, count in other units)."""
        sketch = state["sketch"].numpy()
        saved = int(state["scale"]) if "scale" in state else 1
        if saved == self.scale:
            return sketch
        return np.minimum(sketch.astype(np.int64) * self.scale // saved,
                          _COUNTER_MAX).astype(np.int32)

    def load_state_dict(self, state):
        sketch = state["sketch"].numpy()
        if sketch.shape != self.sketch.shape:
            raise ValueError(f"admission sketch has shape {sketch.shape}, this policy's has "
                             f"{self.sketch.shape}; use the same width and depth")
        self.sketch[...] = self._counters(state)
        self.decayed_at = int(state["decayed_at"])

    def merge_state_dict(self, state):
        # The counter-wise max, not the sum: a shard may hold a copy of counts it inherited
        # when a job grew (each rank got the whole sketch), and summing those copies when
        # the job shrank again doubled them at every round trip. Since a key is counted by
        # one shard only, the max still never under-counts any key (and collides less).
        np.maximum(self.sketch, self._counters(state), out=self.sketch)


@dataclass(frozen=True, kw_only=True)
class FrequencyAdmission(AdmissionPolicy):
    """A key gets a row once it has been looked up ``threshold`` times (this lookup counts).

    Counts live in a count-min sketch of ``depth`` rows of ``width`` int32 counters (fixed
    memory: 4 * depth * width bytes, 16 MiB by default), which never under-counts; with
    ``decay`` every counter is multiplied by it each ``decay_every`` steps, so old popularity
    fades (decaying counts are kept in 1/65536ths of a lookup, so that a decay takes off
    the fraction it names from small counts too, and stop at 32,767 lookups).
    """

    threshold: int = 2
    """Lookups a key needs before it gets a row."""
    width: int = 1 << 20
    """Counters per sketch row (rounded up to a power of two)."""
    depth: int = 4
    """Sketch rows (independent hash functions)."""
    decay: float = 0.5
    """Factor applied to every counter each ``decay_every`` steps."""
    decay_every: int | None = None
    """Steps between decays; None never decays."""

    def __post_init__(self) -> None:
        plain_fields(self)
        check_int("threshold", self.threshold)
        if self.threshold > _COUNTER_MAX:  # counters saturate there: never admitted
            raise ValueError(f"threshold must be at most {_COUNTER_MAX} (the sketch's int32 "
                             f"counters stop there), got {self.threshold!r}")
        if self.decay_every is not None and self.threshold > _COUNTER_MAX // _DECAY_SCALE:
            raise ValueError(f"threshold must be at most {_COUNTER_MAX // _DECAY_SCALE} with "
                             f"decay_every (decaying counts are kept in 1/{_DECAY_SCALE} of a "
                             f"lookup and stop there), got {self.threshold!r}; lower it, or "
                             "drop decay_every")
        check_int("width", self.width)
        check_int("depth", self.depth)
        if self.depth * _power_of_two(self.width) > _MAX_COUNTERS:
            raise ValueError(f"width x depth must be at most {_MAX_COUNTERS:,} counters "
                             f"({_MAX_COUNTERS * 4 >> 30} GiB), got width={self.width!r} "
                             f"(rounded up to the power of two {_power_of_two(self.width):,}) "
                             f"and depth={self.depth!r}; a sketch of 4 x 2**20 (16 MiB) "
                             "suits hundreds of millions of keys")
        check_in("decay", self.decay, 0.0, 1.0, high_open=True)
        if self.decay_every is not None:
            check_int("decay_every", self.decay_every)

    def create(self, seed: int) -> Admitter:
        return _SketchAdmitter(self, seed)


# ---------------------------------------------------------------------- probabilistic
_COUNTER_MAX = 2**31 - 1
"""Where the sketch's int32 counters saturate."""
_MAX_COUNTERS = 1 << 30
"""Most counters a sketch may have (4 GiB)."""
_BELOW_2_64 = 2.0**64 - 2048  # the largest float64 below 2**64 (it casts to uint64)
_DECAY_SCALE = 1 << 16
"""Counter units per lookup in a sketch whose counts decay. Decayed counters are truncated
to integers, and with one unit per lookup every decay took a whole lookup off each count
below 1 / (1 - decay): with decay=0.99 a count of 5 went to 4, not 4.95, and a key looked
up at every step under decay_every=1 never counted past 1, so it was never admitted at any
threshold above 1. In 1/65536ths of a lookup the truncation costs at most that much per
decay. Counts then saturate at 32,767 lookups (ample for a threshold)."""


class _CoinAdmitter(Admitter):
    def __init__(self, probability: float, seed: int) -> None:
        self.probability = probability
        self.seed = np.uint64(seed ^ _SEED_MIX)

    def decide(self, ids, counts, step):
        # a key looked up n times in the call passes with 1 - (1 - p)**n, as n calls would
        chance = -np.expm1(counts * np.log1p(-self.probability)) if self.probability < 1 \
            else np.ones(ids.shape[0])
        thresholds = np.minimum(chance * 2.0**64, _BELOW_2_64).astype(np.uint64)
        thresholds[chance >= 1.0] = np.iinfo(np.uint64).max
        return k.coin_flips(ids, step, self.seed, thresholds)


@dataclass(frozen=True, kw_only=True)
class ProbabilisticAdmission(AdmissionPolicy):
    """Each lookup of an unseen key admits it with ``probability``: a key seen n times, in
    one call or over several, gets a row with probability 1 - (1 - p)**n. The draw depends
    on (seed, key, step, the key's count in the call) only."""

    probability: float
    """Chance of admission per lookup, in (0, 1]."""

    def __post_init__(self) -> None:
        plain_fields(self)
        check_in("probability", self.probability, 0.0, 1.0, low_open=True)

    def create(self, seed: int) -> Admitter:
        return _CoinAdmitter(float(self.probability), seed)


# ---------------------------------------------------------------------- Bloom filter
_MAX_BLOOM_BITS = 1 << 35
"""Most bits a Bloom filter may have (4 GiB, the count-min sketch's cap)."""
_MAX_BLOOM_PROBES = 80
"""Most hash probes per key. Each is a random memory access at every lookup (about 16 ns
once the filter is out of cache, measured on a 2-core machine: 80 probes take some 80 ms
per 65,536-key call, 1,000 probes a second). A rate p needs about log2(1/p) probes, up to
twice that where the size is rounded up to a power of two, so 80 admits any rate of at
least _LOWEST_SAFE_RATE."""
_LOWEST_SAFE_RATE = 1e-12
"""The false_positive_rate down to which any expected_keys stays within _MAX_BLOOM_PROBES."""


def _bloom_bits(expected_keys: int, false_positive_rate: float) -> int:
    """Bits of the optimal filter for these sizes, rounded up to a power of two."""
    optimal = -expected_keys * math.log(false_positive_rate) / math.log(2) ** 2
    return _power_of_two(max(64, math.ceil(optimal)))


def _bloom_probes(bits: int, expected_keys: int) -> int:
    """Hash probes per key that give the fewest false positives for this filter."""
    return max(1, round(bits / expected_keys * math.log(2)))


class _BloomAdmitter(Admitter):
    def __init__(self, policy: BloomAdmission, seed: int) -> None:
        bits = _bloom_bits(policy.expected_keys, policy.false_positive_rate)
        probes = _bloom_probes(bits, policy.expected_keys)
        self.bits = np.zeros(bits // 64, dtype=np.uint64)
        self.seeds = _seeds(seed, probes)

    def decide(self, ids, counts, step):
        return k.bloom_test_and_set(self.bits, ids, self.seeds, False)

    def record(self, ids, counts, step):
        k.bloom_test_and_set(self.bits, ids, self.seeds, True)

    def state_dict(self):
        return {"bits": torch.from_numpy(self.bits.view(np.int64).copy())}

    def load_state_dict(self, state):
        bits = state["bits"].numpy().view(np.uint64)
        if bits.shape != self.bits.shape:
            raise ValueError(f"admission Bloom filter has {bits.shape[0] * 64} bits, this "
                             f"policy's has {self.bits.shape[0] * 64}; use the same sizes")
        self.bits[...] = bits

    def merge_state_dict(self, state):
        self.bits |= state["bits"].numpy().view(np.uint64)


@dataclass(frozen=True, kw_only=True)
class BloomAdmission(AdmissionPolicy):
    """A key gets a row at its second lookup call: the first one only enters it in a Bloom
    filter ("seen before"). Sized for ``expected_keys`` at ``false_positive_rate`` (a false
    positive admits a key at its first lookup): about ``-expected_keys * ln(rate) / ln(2)**2``
    bits rounded up to a power of two, at most 2**35 bits (4 GiB). Each key is probed about
    ``log2(1 / rate)`` times (up to twice that, with the rounding), at most 80 times: any
    ``false_positive_rate`` of at least 1e-12 stays within that.

    Raises:
        ValueError: an argument is out of range, the filter would pass 4 GiB, or it would
            probe each key more than 80 times (only a ``false_positive_rate`` below 1e-12
            can).
    """

    expected_keys: int = 10_000_000
    """Distinct keys the filter is sized for."""
    false_positive_rate: float = 0.01
    """Chance that an unseen key passes as seen once ``expected_keys`` are in."""

    def __post_init__(self) -> None:
        plain_fields(self)
        check_int("expected_keys", self.expected_keys)
        check_in("false_positive_rate", self.false_positive_rate, 0.0, 1.0, low_open=True,
                 high_open=True)
        # checked here, not at create(): a huge filter failed in numpy's allocation at the
        # table's creation, naming neither argument
        bits = _bloom_bits(self.expected_keys, self.false_positive_rate)
        if bits > _MAX_BLOOM_BITS:
            raise ValueError(f"expected_keys={self.expected_keys!r} at "
                             f"false_positive_rate={self.false_positive_rate!r} needs a Bloom "
                             f"filter of {bits:,} bits (rounded up to a power of two); it may "
                             f"have at most {_MAX_BLOOM_BITS:,} bits "
                             f"({_MAX_BLOOM_BITS >> 33} GiB). Lower expected_keys or raise "
                             "false_positive_rate: 10**9 keys at 0.01 take 2 GiB")
        # a tiny rate fits the size cap where few keys are expected, but each lookup then
        # paid for ~1,000 probes per key
        probes = _bloom_probes(bits, self.expected_keys)
        if probes > _MAX_BLOOM_PROBES:
            raise ValueError(f"false_positive_rate={self.false_positive_rate!r} with "
                             f"expected_keys={self.expected_keys!r} gives {probes} hash "
                             f"probes per key (a filter of {bits:,} bits); a Bloom filter may "
                             f"make at most {_MAX_BLOOM_PROBES} hash probes per key, as each "
                             "is a memory access at every lookup. Raise false_positive_rate: "
                             f"any rate of at least {_LOWEST_SAFE_RATE:g} fits, and lower rates "
                             "are rarely worth their lookups")

    def create(self, seed: int) -> Admitter:
        return _BloomAdmitter(self, seed)
