"""``dynembed inspect --json`` prints JSON that strict parsers read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import dynembed as de
from dynembed import cli


def _strict(text: str):
    """``json.loads`` refusing NaN and Infinity, as jq and JavaScript do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_inspect_json_spells_out_non_finite_numbers_of_extra(tmp_path, capsys):
    """Once: a best loss that starts at inf (or a NaN) in ``extra`` was printed as the bare
    Infinity / NaN, which is not JSON (jq and JSON.parse refuse the whole output)."""
    table = de.DynamicTable(de.TableConfig(dim=2, seed=1))
    table.find_or_insert(torch.arange(3))
    extra = {"best_loss": float("inf"), "last_loss": float("nan"),
             "floor": float("-inf"), "curve": torch.tensor([1.0, float("nan")]),
             "nested": {"loss": float("inf")}, "step": 7}
    de.checkpoint.save(tmp_path / "c", tables={"t": table}, extra=extra)
    assert cli.main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    info = _strict(capsys.readouterr().out)
    assert info["extra"] == {"best_loss": "inf", "last_loss": "nan", "floor": "-inf",
                             "curve": [1.0, "nan"], "nested": {"loss": "inf"}, "step": 7}
    assert info["tables"]["t"]["rows"] == 3
    assert cli.main(["inspect", str(tmp_path / "c")]) == 0  # the text summary shows them too
    assert "'best_loss': 'inf'" in capsys.readouterr().out


def test_a_reader_that_leaves_early_is_no_error(tmp_path):
    """`dynembed inspect ... | head`: once "error: [Errno 32] Broken pipe" and exit 1."""
    table = de.DynamicTable(de.TableConfig(dim=2, seed=1))
    table.find_or_insert(torch.arange(3))
    de.checkpoint.save(tmp_path / "c", tables={"t": table})
    reader, writer = os.pipe()
    os.close(reader)  # gone before the command writes a byte
    try:
        done = subprocess.run([sys.executable, "-m", "dynembed", "inspect", str(tmp_path / "c")],
                              stdout=writer, stderr=subprocess.PIPE,
                              text=True, timeout=120, check=False)
    finally:
        os.close(writer)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_summary_shows_top_keys_quoted_and_long_ones_cut(tmp_path, capsys):
    """Keys were printed raw: a 20,000-character query key flooded the terminal, "" was
    invisible, and keys holding ", " made the list ambiguous."""
    emb = de.DynamicEmbedding(dim=2, key_log=True, seed=1)
    long_key = "q:" + "x" * 20_000
    emb(["", long_key, "a, b", long_key, ""])
    emb([b"\xff" * 100])  # bytes that are not UTF-8, logged as bytes
    de.checkpoint.save(tmp_path / "c", emb)
    assert cli.main(["inspect", str(tmp_path / "c")]) == 0
    top = next(line for line in capsys.readouterr().out.splitlines() if "top keys" in line)
    assert "'' (2)" in top and "'a, b' (1)" in top
    assert "... (20,004 chars) (2)" in top  # of its repr, quotes included
    assert " b'\\xff\\xff" in top and "... (403 chars) (1)" in top
    assert len(top) < 400
