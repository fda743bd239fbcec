"""Every file of a checkpoint is validated on load: damage raises an error naming the file."""

from __future__ import annotations

import pytest
import torch

import dynembed as de

from .helpers import batches, make_table, train


@pytest.fixture
def checkpoint(tmp_path):
    table = make_table()
    train(table, batches(5, 2000))
    model = torch.nn.Linear(3, 1)
    de.checkpoint.save(tmp_path / "c", model, tables={"t": table}, extra={"step": 5})
    return tmp_path / "c"


def files(path):
    return {"rows": next(path.glob("tables/t/*.rows")), "aux": next(path.glob("tables/t/*.aux.pt")),
            "dense": path / "dense.pt", "manifest": path / "MANIFEST.json"}


@pytest.mark.parametrize("which", ["rows", "aux", "dense", "manifest"])
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_files_raise_checkpoint_corrupt_error_naming_the_file(checkpoint, which,
                                                                      damage):
    target = files(checkpoint)[which]
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x04
    target.write_bytes(bytes(data))
    table = make_table()
    table.insert_or_assign([1, 2, 3], torch.ones(3, 8))
    before = table.export()
    with pytest.raises(de.CheckpointCorruptError, match=target.name):
        de.checkpoint.load(checkpoint, torch.nn.Linear(3, 1), tables={"t": table})
    after = table.export()
    if which == "rows" and damage == "flip":  # found while loading: emptied, not half-loaded
        assert after.ids.shape[0] == 0
    else:  # sizes and the small files are checked before the table changes
        assert torch.equal(before.ids, after.ids) and torch.equal(before.weights,
                                                                   after.weights)


def test_a_missing_file_is_named(checkpoint):
    files(checkpoint)["aux"].unlink()
    with pytest.raises(de.CheckpointCorruptError, match=r"aux\.pt: missing"):
        de.checkpoint.load(checkpoint, tables={"t": make_table()}, strict=False)
