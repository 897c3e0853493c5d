# Test-session setup shared by all test files. Triton fixes interpreter mode when it is first imported, and
# several modules import it indirectly (torch._dynamo, diffusers), so the CPU interpreter for the fused-kernel
# tests (test_kernels.py) must be switched on before any test module is collected.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

collect_ignore_glob = ["runs/*"]       # run folders, e.g. tools/mutate.py's copies of the tree (runs/mutation/*/tree)


@pytest.fixture(scope="module")
def flush_denormals():
    """Denormals make the CPU GM posterior very slow; the attachment test modules flush them (module by module:
    test_piflow.py's Hypothesis checks need IEEE floats)."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
