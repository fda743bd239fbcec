"""The examples' command lines: bad numbers are refused up front, naming the flag, and edge
values (``--stop-after 0``, a cache path that is a file, a slice with no data) end with a
message instead of a traceback from deep inside.

Only the MovieLens runs need data (the cached MovieLens 100k, else one download); they skip
when it is neither cached nor downloadable.
"""

import numpy as np
import pytest

from examples import elastic_ctr, gowalla, movielens, seq2seq, word2vec
from examples.datasets import (
    DatasetUnavailableError,
    load_gcide_tokens,
    load_movielens_100k,
)

# Each of these once passed parsing and failed later: a ZeroDivisionError or
# `range() arg 3 must not be zero` (batch sizes), an IndexError after no epoch (movielens
# --epochs 0), an error about `every_steps` or `max_rows` (names the user never typed), or
# a silent "use everything" (seq2seq --max-pairs 0, word2vec --max-tokens 0).
REFUSED = [
    (movielens, "--epochs", "0"),
    (movielens, "--batch-size", "0"),
    (movielens, "--batch-size", "-1"),
    (movielens, "--max-rows", "0"),
    (movielens, "--checkpoint-every", "0"),
    (movielens, "--rows-in-memory", "0"),
    (movielens, "--stop-after", "-1"),
    (movielens, "--emb-lr", "nan"),
    (elastic_ctr, "--steps", "-1"),
    (elastic_ctr, "--batch-size", "0"),
    (elastic_ctr, "--checkpoint-every", "0"),
    (elastic_ctr, "--rows-in-memory", "0"),
    (gowalla, "--batch-size", "0"),
    (gowalla, "--max-users", "0"),
    (seq2seq, "--max-pairs", "0"),
    (seq2seq, "--max-len", "0"),
    (seq2seq, "--batch-size", "0"),
    (word2vec, "--max-tokens", "0"),
    (word2vec, "--window", "0"),
    (word2vec, "--batch-size", "0"),
    (word2vec, "--epochs", "0"),
]


@pytest.mark.parametrize("example, flag, value", REFUSED,
                         ids=[f"{m.__name__.split('.')[-1]} {f} {v}" for m, f, v in REFUSED])
def test_a_bad_number_is_refused_naming_its_flag(example, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args([flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be" in err and repr(value) in err, err


def test_edge_values_that_make_sense_are_accepted():
    assert elastic_ctr.parse_args(["--steps", "0"]).steps == 0  # evaluates the restored model
    assert movielens.parse_args(["--stop-after", "0"]).stop_after == 0
    assert gowalla.parse_args(["--epochs", "0"]).epochs == 0  # the untrained baseline
    assert word2vec.parse_args(["--epochs", "0.5"]).epochs == 0.5


def test_stop_after_is_never_overshot(movielens_available, tmp_path, capsys):
    def run(*more):
        return movielens.main(["--max-rows", "2000", "--epochs", "1", "--no-progress",
                               "--in-memory", "--checkpoint-every", "1",
                               "--checkpoint-dir", str(tmp_path / "ckpt"), *more])

    # --stop-after 0 trains nothing (it once trained one step) and says there is no
    # checkpoint to resume from (it once said "the latest checkpoint is None: continue")
    nothing = run("--stop-after", "0")
    assert nothing == {"stopped_at": 0, "latest_checkpoint": None}
    assert "no checkpoint yet" in capsys.readouterr().out

    assert run("--stop-after", "3")["stopped_at"] == 3
    # a resumed run already past --stop-after stops at once (it once trained step 4)
    again = run("--resume", "--stop-after", "2")
    assert again["stopped_at"] == 3
    assert again["latest_checkpoint"].name == "step-0000000003"


def test_a_cache_path_that_is_a_file_is_named(tmp_path):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file, not a directory")
    # these once ended in a bare NotADirectoryError traceback
    with pytest.raises(DatasetUnavailableError, match="cannot write the data cache .*cache"):
        load_movielens_100k(not_a_dir)
    with pytest.raises(DatasetUnavailableError, match="cannot write the data cache .*cache"):
        load_gcide_tokens(not_a_dir)


def test_gowalla_without_check_ins_says_so(tmp_path):
    for name in ("train", "valid", "test"):
        (tmp_path / f"{name}.txt").write_text("5 1 2 3\n")
    # users below --max-users 3: none (this once failed in np.concatenate)
    with pytest.raises(DatasetUnavailableError, match="no check-ins of users below"):
        gowalla.main(["--data-dir", str(tmp_path), "--max-users", "3", "--no-progress"])


def test_word2vec_refuses_a_text_shorter_than_a_window(monkeypatch):
    monkeypatch.setattr(word2vec, "load_tokens",
                        lambda corpus, max_tokens: np.array(["a", "b", "c"], dtype=object))
    # this once failed in numpy with `low >= high`
    with pytest.raises(SystemExit, match="3 tokens are too few for --window 5"):
        word2vec.main(["--corpus", "multi30k", "--no-progress"])
