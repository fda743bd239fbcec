"""PyTorch modules over dynamic tables."""

from dynembed.nn._base import (
    TableModule,
    dense_parameters,
    set_sparse_lr,
    sparse_step,
    sparse_zero_grad,
)
from dynembed.nn.bag import DynamicEmbeddingBag
from dynembed.nn.clipping import clip_grad_norm_
from dynembed.nn.collection import EmbeddingCollection, FeatureConfig
from dynembed.nn.embedding import DynamicEmbedding

__all__ = ["DynamicEmbedding", "DynamicEmbeddingBag", "EmbeddingCollection", "FeatureConfig",
           "TableModule", "clip_grad_norm_", "dense_parameters", "set_sparse_lr", "sparse_step", "sparse_zero_grad"]
