"""dynembed inspect: tables, rows, dims, bytes, optimizer, top keys, rows-over-time plot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed import cli


def test_inspect_prints_tables_top_keys_and_draws_the_history(tmp_path):
    words = de.DynamicTable(de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.1),
                                           key_log=True, seed=1))
    users = de.DynamicTable(de.TableConfig(dim=2, optimizer=de.optim.Adagrad(lr=0.1), seed=2))
    manager = de.checkpoint.CheckpointManager(tmp_path, max_chain=10, keep_last=10)
    for step in range(1, 4):
        keys = ["the"] * 50 + ["cat"] * 20 + [f"w{i}" for i in range(step * 30)]
        batch = words.ids_of(keys)
        unique, counts = np.unique(batch.ids, return_counts=True)
        words.lookup_slots(unique, counts, insert=True, strings=batch.strings,
                           string_ids=batch.ids)
        users.find_or_insert(np.arange(step * 100))
        manager.save(step, tables={"words": words, "users": users}, extra={"step": step})
    plot = tmp_path / "rows.png"
    result = subprocess.run(
        [sys.executable, "-m", "dynembed", "inspect", str(tmp_path), "--json", "--top", "2",
         "--plot", str(plot)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["extra"] == {"step": 3} and info["kind"] == "delta"
    assert info["tables"]["words"]["rows"] == len(words) == 92
    assert info["tables"]["users"]["rows"] == 300
    assert info["tables"]["users"]["dim"] == 2 and info["tables"]["users"]["state_width"] == 2
    assert "Adagrad" in info["tables"]["users"]["optimizer"]
    assert [(k["key"], k["count"]) for k in info["tables"]["words"]["top_keys"]] == \
        [("the", 150), ("cat", 60)]
    assert [h["rows"]["users"] for h in info["history"]] == [100, 200, 300]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = subprocess.run([sys.executable, "-m", "dynembed", "inspect",
                           str(tmp_path / "step-0000000002")], capture_output=True,
                          text=True, timeout=120, check=False)
    assert text.returncode == 0, text.stderr
    assert "table words: 62 rows, dim 4" in text.stdout
    assert "'the' (100)" in text.stdout


def test_inspect_of_a_damaged_checkpoint_fails_with_the_reason(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "MANIFEST.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "dynembed", "inspect", str(tmp_path / "c")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "manifest is damaged" in result.stderr


def test_inspect_of_a_directory_shows_the_newest_whole_checkpoint(tmp_path, capsys):
    """A damaged newest checkpoint failed the whole command, where a restore goes on with
    the one before it."""
    table = de.DynamicTable(de.TableConfig(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1))
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2):
        table.find_or_insert(np.arange(step * 10))
        manager.save(step, tables={"t": table})
    newest = manager.checkpoints()[-1]
    shard = de.checkpoint.manifest.read(newest)["tables"]["t"]["shards"][0]
    (newest / shard["aux"]).write_bytes(b"damaged")
    assert cli.main(["inspect", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["path"].endswith("step-0000000001")
    assert "skipping damaged checkpoint" in out.err and "step-0000000002" in out.err
    for point in manager.checkpoints():  # every one damaged: an error, not a summary
        aux = de.checkpoint.manifest.read(point)["tables"]["t"]["shards"][0]["aux"]
        (point / aux).write_bytes(b"damaged")
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert "every checkpoint in" in capsys.readouterr().err


def test_describe_checks_top(tmp_path):
    table = de.DynamicTable(de.TableConfig(dim=2, seed=1))
    de.checkpoint.save(tmp_path / "c", tables={"t": table})
    from dynembed.checkpoint.inspect import describe
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="top must be an int >= 0"):
            describe(tmp_path / "c", top=bad)


def test_inspect_json_with_tensors_in_extra_and_a_partial_checkpoint(tmp_path):
    """A tensor nested in extra (Runtime saves the user's dict under "user") ended --json
    with a traceback; a step-N.partial left by a crash was shown as the newest."""
    from dynembed.checkpoint.inspect import history
    table = de.DynamicTable(de.TableConfig(dim=2, seed=1))
    table.find_or_insert(np.arange(10))
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=10)
    extra = {"user": {"best": torch.tensor(0.25), "n": [torch.tensor(3)]}, "step": 1}
    manager.save(1, tables={"t": table}, extra=extra)
    partial = tmp_path / "step-0000000002.partial"
    shutil.copytree(tmp_path / "step-0000000001", partial)  # a manifest, never renamed
    assert [h["path"] for h in history(tmp_path)] == [str(tmp_path / "step-0000000001")]
    result = subprocess.run([sys.executable, "-m", "dynembed", "inspect", str(tmp_path),
                             "--json"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["path"] == str(tmp_path / "step-0000000001")
    assert info["extra"]["user"] == {"best": 0.25, "n": [3]}


def test_inspect_json_shows_a_bytes_key_that_is_not_utf8(tmp_path, capsys):
    """The key log keeps such keys as bytes, which JSON has no type for: --json failed."""
    from dynembed import cli

    table = de.DynamicTable(de.TableConfig(dim=2, seed=1, key_log=True))
    table.find_or_insert([b"\xff\xfe", b"ok"])
    de.checkpoint.save(tmp_path / "c", tables={"t": table})
    assert cli.main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    keys = {entry["key"] for entry in info["tables"]["t"]["top_keys"]}
    assert keys == {"b'\\xff\\xfe'", "ok"}


def test_inspect_of_a_lone_checkpoint_lists_it_alone(tmp_path):
    """`dynembed inspect runs/ck` listed the unrelated checkpoint `runs/ck2` beside it as
    its history; a CheckpointManager's step-N checkpoints still list their siblings."""
    a = de.DynamicTable(de.TableConfig(dim=2))
    a.find_or_insert(np.arange(5))
    de.checkpoint.save(tmp_path / "ck", tables={"a": a})
    b = de.DynamicTable(de.TableConfig(dim=3))
    b.find_or_insert(np.arange(48))
    de.checkpoint.save(tmp_path / "ck2", tables={"other": b})
    result = subprocess.run([sys.executable, "-m", "dynembed", "inspect",
                             str(tmp_path / "ck"), "--json"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert [h["rows"] for h in json.loads(result.stdout)["history"]] == [{"a": 5}]
