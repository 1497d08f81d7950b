"""GPU tests: run on CUDA; on a CPU-only machine they are skipped, unless
``TRITON_INTERPRET=1`` is set, in which case the Triton kernel tests run through the
Triton interpreter on the CPU (small shapes, float32/float16: slow but exact checks)."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar into ``int(np.ndarray of shape (1,))``,
    which numpy >= 2.4 refuses; loops like ``range(start, end)`` over loaded values then
    fail. Re-set ``__index__`` to take the single element explicitly."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_cbserve_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._cbserve_fixed = True
    interpreter._patch_lang_tensor = patched


if INTERPRET and not HAS_CUDA:
    _fix_interpreter_index()


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def device() -> torch.device:
    if HAS_CUDA:
        return torch.device("cuda")
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1 for the kernel tests)")


@pytest.fixture
def kernel_device() -> torch.device:
    """Device for the Triton kernel tests: CUDA, or the CPU under the interpreter."""
    if HAS_CUDA:
        return torch.device("cuda")
    if INTERPRET:
        return torch.device("cpu")
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1 for the kernel tests)")


@pytest.fixture
def kernel_dtype(kernel_device) -> torch.dtype:
    # numpy (behind the interpreter) has no bfloat16.
    return torch.bfloat16 if kernel_device.type == "cuda" else torch.float16
