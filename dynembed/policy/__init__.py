"""Policies: what a row starts as (initializers), which keys earn a row (admission), which
rows leave memory first (eviction)."""

from dynembed.policy.admission import (
    AdmissionPolicy,
    AdmitAll,
    BloomAdmission,
    FrequencyAdmission,
    ProbabilisticAdmission,
)
from dynembed.policy.eviction import LFU, LRU, TTL, EvictionPolicy, ScoreFunction
from dynembed.policy.initializers import (
    Constant,
    Initializer,
    Normal,
    TruncatedNormal,
    Uniform,
    Zeros,
)

__all__ = [
    "LFU",
    "LRU",
    "TTL",
    "AdmissionPolicy",
    "AdmitAll",
    "BloomAdmission",
    "Constant",
    "EvictionPolicy",
    "FrequencyAdmission",
    "Initializer",
    "Normal",
    "ProbabilisticAdmission",
    "ScoreFunction",
    "TruncatedNormal",
    "Uniform",
    "Zeros",
]
