"""Open-vocabulary outputs: candidate samplers and sampled softmax over dynamic tables."""

from dynembed.sampling.samplers import (
           CandidateSampler,
           InBatch,
           LogUniform,
           Uniform,
           Unigram,
)
from dynembed.sampling.softmax import (
           SampledLogits,
           sampled_logits,
           sampled_softmax_loss,
)

__all__ = ["CandidateSampler", "InBatch", "LogUniform", "SampledLogits", "Uniform", "Unigram",
           "sampled_logits", "sampled_softmax_loss"]
