"""The examples' tests: examples/ importable, and MovieLens 100k when it can be had."""

import sys
from pathlib import Path

import pytest

# examples/ is not an installed package: make the repository root importable also when
# pytest is started as a bare `pytest` rather than `python -m pytest`.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(scope="module")
def movielens_available():
    """Skips unless MovieLens 100k is cached or can be downloaded once."""
    from examples.datasets import DatasetUnavailableError, load_movielens_100k
    try:
        load_movielens_100k()
    except DatasetUnavailableError as exc:
        pytest.skip(f"MovieLens 100k is not cached and could not be downloaded: {exc}")
