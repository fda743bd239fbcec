"""Two-tower retrieval on a slice of Gowalla beats the popularity ranking of that slice.

Skips (with the reason) where ../shared/data is absent.
"""

import pytest

from examples import gowalla


def test_two_tower_on_a_gowalla_slice_beats_popularity():
    if not (gowalla.DEFAULT_DATA / "train.txt").exists():
        pytest.skip(f"real data not found at {gowalla.DEFAULT_DATA}; this test needs "
                    "../shared/data")
    result = gowalla.main(["--max-users", "2000", "--epochs", "6", "--no-progress",
                           "--seed", "0"])
    model, popularity = result["model"], result["popularity"]
    assert model["recall@20"] > 1.5 * popularity["recall@20"], result
    assert model["ndcg@20"] > 1.5 * popularity["ndcg@20"], result
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    assert result["users"] == 2000  # one row per user of the slice, none invented


def test_ranking_metrics_on_a_hand_computed_case():
    import numpy as np

    ranked = np.array([[5, 1, 9] + [100 + i for i in range(17)]])
    metrics = gowalla.ranking_metrics(ranked, [np.array([1, 9, 42])])
    assert metrics["recall@20"] == pytest.approx(2 / 3)
    ideal = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    assert metrics["ndcg@20"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(4)) / ideal)
