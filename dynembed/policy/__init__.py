"""Policies that decide what a row starts as (initializers); admission and eviction later."""

from dynembed.policy.initializers import (
    Constant,
    Initializer,
    Normal,
    TruncatedNormal,
    Uniform,
    Zeros,
)

__all__ = ["Initializer", "Zeros", "Constant", "Uniform", "Normal", "TruncatedNormal"]
