"""Checkpoints: consistent, incremental, bucketed cuts of tables and dense state that open
lazily. See :func:`save`, :func:`load`, :class:`CheckpointManager` and :func:`compact`."""

from dynembed.checkpoint.api import load, save
from dynembed.checkpoint.compact import compact
from dynembed.checkpoint.inspect import describe, history, plot_history
from dynembed.checkpoint.lazy import load_step
from dynembed.checkpoint.manager import CheckpointManager

__all__ = ["CheckpointManager", "compact", "describe", "history", "load", "load_step",
           "plot_history", "save"]
