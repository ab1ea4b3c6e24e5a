"""Set-up shared by every test file, run before any of them imports model.

Triton decides between its interpreter and its compiler when a kernel is decorated, that is when
model.py is imported, from TRITON_INTERPRET as it is then. So it is set here: on the CPU the kernel
tests run model.py's Triton kernels under the interpreter. LLAMA_TEST_DEVICE=cuda runs them compiled
on a GPU instead.
"""

import os

if os.environ.get("LLAMA_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
