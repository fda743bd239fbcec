"""The training runtime: one script that runs alone or under torchrun and survives restarts.

See :class:`Runtime`; ``dynembed train`` launches such a script with torchrun.
"""

from dynembed.train.data import epoch_of, global_batch, rank_part
from dynembed.train.progress import PROGRESS_ENV, ProgressFile, read_progress
from dynembed.train.runtime import Runtime

__all__ = [
    "PROGRESS_ENV",
    "ProgressFile",
    "Runtime",
    "epoch_of",
    "global_batch",
    "rank_part",
    "read_progress",
]
