"""The command line answers bad arguments with one line naming them, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--models",
                                 "ctr=../elsewhere"), 1)
    assert line == "error: --models ctr=../elsewhere: not a package inside --model-store"
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--models", "a=b"), 1)
    assert "is not a model package" in line  # before the server starts (once: exit 3)
