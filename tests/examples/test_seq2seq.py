"""Translation with a dynamic target vocabulary beats a unigram model of the targets.

Skips (with the reason) where ../shared/data is absent.
"""

import pytest

from examples import seq2seq


def test_seq2seq_with_sampled_softmax_learns_to_translate():
    if not (seq2seq.DATA / "train.de.gz").exists():
        pytest.skip(f"real data not found at {seq2seq.DATA}; needs ../shared/data")
    result = seq2seq.main(["--max-pairs", "3000", "--epochs", "4", "--no-progress",
                           "--hidden", "128", "--dim", "64"])
    assert result["cross_entropy"] < result["unigram_cross_entropy"] - 0.4, result
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    assert result["target_words"] > 1000  # one output row per English word met


def test_bleu_on_hand_computed_cases():
    same = [["a", "man", "rides", "a", "red", "bike"]]
    assert seq2seq.bleu4(same, same) == pytest.approx(100.0)
    assert seq2seq.bleu4([["completely", "different", "words", "here"]], same) == 0.0
