"""The command line answers bad arguments with one line naming them, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.serving.helpers import write_package


def _dynembed(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynembed", *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=cwd)


def _error_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    write_package(folder)
    return folder


def test_inspect_of_a_missing_path_or_a_model_package(tmp_path, store):
    line = _error_line(_dynembed("inspect", str(tmp_path / "absent")), 2)
    assert line == f"error: checkpoint {tmp_path / 'absent'}: no such directory"
    line = _error_line(_dynembed("inspect", str(store / "ctr-1.0")), 2)
    assert "is a model package; inspect its tables" in line  # once called "damaged"


def test_export_names_a_bad_factory_and_creates_no_directory(tmp_path):
    checkpoint = tmp_path / "typo" / "ckpt"
    line = _error_line(_dynembed("export", "--factory", "os:path", "--checkpoint",
                                 str(checkpoint), "--name", "m", "--out", str(tmp_path / "o")), 1)
    assert line == f"error: --checkpoint {checkpoint}: no such directory"
    assert not (tmp_path / "typo").exists()  # once created, with its parents
    checkpoint.mkdir(parents=True)
    for factory, message in (("nomod:f", "No module named 'nomod'"),
                             ("os:nofunc", "has no attribute 'nofunc'"),
                             ("os:path", "not a function that builds the model")):
        line = _error_line(_dynembed("export", "--factory", factory, "--checkpoint",
                                     str(checkpoint), "--name", "m", "--out",
                                     str(tmp_path / "o")), 1)
        assert line.startswith(f"error: --factory {factory}: ") and message in line


def test_serve_names_the_flag_and_a_missing_startup_model(store):
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--workers", "0"), 1)
    assert line.startswith("error: --workers: ")
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--job-queue-size",
                                 "0"), 1)
    assert line.startswith("error: --job-queue-size: job_queue_size must be an integer >= 1")
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--inference-address",
                                 "nonsense"), 1)
    assert line.startswith("error: --inference-address: ")
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--models",
                                 "ctr=../elsewhere"), 1)
    assert line == "error: --models ctr=../elsewhere: not a package inside --model-store"
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--models", "a=b"), 1)
    assert "is not a model package" in line  # before the server starts (once: exit 3)


def test_train_names_its_flags(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("")
    for flags, name in ((["--nproc-per-node", "0"], "--nproc-per-node"),
                        (["--max-restarts", "-1"], "--max-restarts"),
                        (["--nnodes", "3:2"], "--nnodes")):
        line = _error_line(_dynembed("train", *flags, str(script)), 1)
        assert line.startswith(f"error: {name}: "), line


def test_inspect_checks_plot_before_printing(tmp_path, store):
    de_table = tmp_path / "ck"
    _save_one(de_table / "step-0000000001")
    result = _dynembed("inspect", str(de_table), "--plot", str(tmp_path / "out.txt"))
    assert _error_line(result, 2) == f"error: --plot {tmp_path / 'out.txt'}: give a .png file"
    assert result.stdout == ""  # once: the whole summary, then the error


def test_export_names_bad_names_a_mismatched_model_and_finds_hand_saved_checkpoints(
        tmp_path):
    from tests.serving.helpers import make_model

    hand = tmp_path / "hand"
    coll, dense = make_model(0)
    import dynembed as de
    de.checkpoint.save(hand / "a", Model(coll, dense))
    de.checkpoint.save(hand / "b", Model(coll, dense), parent=hand / "a")
    factory = "tests.cli.test_errors:build"
    line = _error_line(_dynembed("export", "--factory", factory, "--checkpoint", str(hand),
                                 "--name", "a/b", "--out", str(tmp_path / "o")), 1)
    assert line.startswith("error: --name must be")
    result = _dynembed("export", "--factory", factory, "--checkpoint", str(hand), "--name",
                       "m", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert f"from {hand / 'b'}" in result.stdout  # the newest of the hand-saved ones
    line = _error_line(_dynembed("export", "--factory", "tests.cli.test_errors:build_other",
                                 "--checkpoint", str(hand), "--name", "m", "--out",
                                 str(tmp_path / "o2")), 1)
    assert "does not fit the model --factory" in line and "strict=False" not in line


class Model(torch.nn.Module):
    def __init__(self, embeddings, dense):
        super().__init__()
        self.embeddings, self.dense = embeddings, dense


def build():
    from tests.serving.helpers import make_model
    return Model(*make_model(0))


def build_other():
    import dynembed as de
    return Model(de.EmbeddingCollection(tables={"other": de.TableConfig(dim=2)},
                                        features={"x": "other"}), torch.nn.Linear(2, 1))


def _save_one(path):
    import dynembed as de
    table = de.DynamicTable(de.TableConfig(dim=2))
    table.find_or_insert(torch.arange(3))
    de.checkpoint.save(path, tables={"t": table})
