"""Without CUDA, test the Triton kernels under Triton's interpreter on CPU tensors.

Triton fixes interpreter-or-compiler for its own jit functions (tl.cdiv, ...) when triton is
first imported, and fxsketch imports triton with the package, so TRITON_INTERPRET must be set
here, before any test module imports fxsketch. A caller's own setting wins.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids oversubscription on shared CI cores (restored after).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
