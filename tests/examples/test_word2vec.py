"""Skip-gram Word2Vec on Multi30k English: related words end up closer than random ones.

Skips (with the reason) where ../shared/data is absent.
"""

import numpy as np
import pytest
import torch

from examples import word2vec

RELATED = [("man", "woman"), ("boy", "girl"), ("red", "blue"), ("shirt", "jacket"),
           ("two", "three"), ("dog", "dogs"), ("street", "sidewalk"), ("black", "white")]


def test_skip_gram_learns_related_words_from_string_keys():
    if not (word2vec.MULTI30K / "train.en.gz").exists():
        pytest.skip(f"real data not found at {word2vec.MULTI30K}; needs ../shared/data")
    result = word2vec.main(["--corpus", "multi30k", "--max-tokens", "200000", "--epochs",
                            "1", "--no-progress", "--dim", "64"])
    losses = result["losses"]
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.3
    table = result["words"].table

    def cosine(a, b):
        va, vb = table.find([a, b]).values
        return torch.nn.functional.cosine_similarity(va, vb, dim=0).item()

    related = np.mean([cosine(a, b) for a, b in RELATED])
    rng = np.random.default_rng(0)
    ids = table.export().ids.numpy()
    words = [w for w in table.keys_of(rng.choice(ids, 200, replace=False)) if w]
    unrelated = np.mean([cosine(a, b) for a, b in zip(words[::2], words[1::2])])
    assert related > unrelated + 0.2, (related, unrelated)
    assert "woman" in result["neighbours"]["man"]
