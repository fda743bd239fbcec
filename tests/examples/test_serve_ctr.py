"""The main job's serving step on MovieLens 100k: a package exported early in training
follows the job's checkpoints, and its HTTP answers are the newest checkpoint's model."""

from __future__ import annotations

import pytest

from examples import elastic_ctr, serve_ctr


def test_the_served_model_follows_to_the_newest_checkpoint_and_answers_as_it(
        movielens_available, tmp_path):
    ckpt = tmp_path / "ckpt"
    elastic_ctr.main(["--steps", "90", "--max-rows", "20000", "--checkpoint-every", "30",
                      "--checkpoint-dir", str(ckpt), "--store-dir", str(tmp_path / "tables"),
                      "--rows-in-memory", "500"])
    result = serve_ctr.main(["--checkpoint-dir", str(ckpt), "--max-rows", "20000",
                             "--model-store", str(tmp_path / "store"), "--examples", "600",
                             "--request-size", "50"])
    assert result["exported"] == "step-0000000030" and result["served"] == "step-0000000090"
    # the newest checkpoint's tables *and* dense layers: the export's dense layers under
    # the newest tables answered up to ~0.1 apart
    assert result["max_abs_diff"] < 1e-5
    assert result["auc_served"] == pytest.approx(result["auc_in_process"], abs=1e-4)
    assert result["auc_served"] > 0.6 and result["examples"] == 600


def test_no_checkpoint_says_to_train_first(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint in .*train first"):
        serve_ctr.main(["--checkpoint-dir", str(tmp_path)])
