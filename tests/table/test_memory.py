"""Host buffers for arenas and indexes: small ones plain, large ones huge-page mapped."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch

from dynembed.table._memory import _HUGE_FROM_BYTES, _glibc, host_empty


def test_small_and_large_buffers_are_writable_arrays_of_the_asked_shape():
    for rows in (10, _HUGE_FROM_BYTES // (8 * 8) + 1):
        a = host_empty((rows, 8), np.float64)
        assert a.shape == (rows, 8) and a.dtype == np.float64 and a.flags.c_contiguous
        a[:] = 1.5
        a[-1, -1] = 7.0
        t = torch.from_numpy(a)
        assert t[-1, -1].item() == 7.0 and float(t.sum()) == 1.5 * (a.size - 1) + 7.0


def test_large_buffer_is_a_private_mapping_that_outlives_its_creator():
    a = host_empty((_HUGE_FROM_BYTES // 4,), np.float32)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        owner = a
        while isinstance(owner, np.ndarray):
            owner = owner.base
        assert isinstance(owner, memoryview) and isinstance(owner.obj, mmap.mmap)
    t = torch.from_numpy(a)
    del a
    t.fill_(2.0)  # the tensor keeps the mapping alive
    assert float(t[::1 << 20].sum()) == 2.0 * t[::1 << 20].numel()


_FAULTS_SCRIPT = """
import resource, sys
import numpy as np
import dynembed
from dynembed.table import _memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

sizes = [48 << 20, 40 << 20, 56 << 20, 36 << 20] * 4  # all above glibc's 32 MiB limit
for nbytes in sizes[:4]:  # the first round may fault every page in
    np.ones(nbytes, np.uint8)
before = faults()
for nbytes in sizes:
    np.ones(nbytes, np.uint8)  # allocated, written, freed
print(_memory.malloc_tuned, faults() - before)
"""


def _run_faults(env: dict[str, str]) -> tuple[bool, int]:
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k != "DYNEMBED_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True,
                         text=True, timeout=120, env={**base, **env}, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not _glibc(), reason="mallopt thresholds exist only in glibc; this C library has none to set")
def test_import_keeps_freed_batch_buffers_instead_of_faulting_them_in_again():
    # 16 buffers of 36-56 MiB, 720 MiB in all: 360 faults if each is a mapping of its own
    # faulted in anew, even with 2 MiB pages (numpy asks for huge pages); 184,320 with 4 KiB.
    tuned, faults = _run_faults({})
    assert tuned and faults < 50  # reused: (almost) no page faulted in again
    # Left as glibc has it, every buffer over 32 MiB is its own mapping, faulted in anew.
    for opt_out in ("0", "off"):
        tuned, faults = _run_faults({"DYNEMBED_MALLOC_TUNING": opt_out})
        assert not tuned and faults > 200
