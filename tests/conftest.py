"""Set-up shared by every test file, run before any of them imports model.

Triton decides between its interpreter and its compiler when a kernel is decorated, that is when
model.py is imported, from TRITON_INTERPRET as it is then. So it is set here: on the CPU the kernel
tests run model.py's Triton kernels under the interpreter. LLAMA_TEST_DEVICE=cuda runs them compiled
on a GPU instead.
"""

import os
import subprocess

import pytest

if os.environ.get("LLAMA_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs, where this machine lets the tests mount one (root); skipped elsewhere, where the
    simulated ENOSPC of tests/test_train_faults.py covers the same path."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
