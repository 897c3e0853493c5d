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


@pytest.fixture
def plant_nan(monkeypatch):
    """plant_nan(i): piflow.sample returns its samples with value i (flat index) set to NaN, as a diverged or
    corrupt student would; returns the real sampler. The writers must refuse such samples in one line."""
    import piflow
    real = piflow.sample

    def plant(i):
        def one_nan(*a, **k):
            x = real(*a, **k)
            x.view(-1)[i] = float("nan")
            return x
        monkeypatch.setattr(piflow, "sample", one_nan)
        return real
    return plant
