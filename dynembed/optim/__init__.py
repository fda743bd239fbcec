"""Sparse optimizers: update rules applied to the touched rows of dynamic tables."""

from dynembed.optim.adagrad import Adagrad, RowWiseAdagrad
from dynembed.optim.adam import Adam, AdamW
from dynembed.optim.base import SparseOptimizer
from dynembed.optim.ftrl import FTRL
from dynembed.optim.sgd import SGD

__all__ = ["FTRL", "SGD", "Adagrad", "Adam", "AdamW", "RowWiseAdagrad", "SparseOptimizer"]
