"""Tests of the fused rollout kernels (piflow_kernels.py) against piflow.py's PyTorch reference rollout.

The kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
If triton cannot be imported this module fails to import: a loud failure, never a skip. Shapes are tiny
because the interpreter executes every Triton op in numpy.

Triton fixes interpreter mode for its own library (tl.sum, tl.max, ...) when it is first imported. If another
test module of the same pytest run imported triton earlier (torch._dynamo, diffusers and sit.py all do), the
interpreted tests below run once more in a clean child process (this file, TRITON_INTERPRET=1) and each
test here asserts its own result from that run.
"""
import functools
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import triton  # noqa: F401  (no triton -> collection error -> the suite fails)
import triton.language as tl
from hypothesis import given, settings, strategies as st
from triton.runtime.interpreter import InterpretedFunction

import piflow
import piflow_kernels as pk

IN_PROCESS = isinstance(tl.sum, InterpretedFunction)   # False: triton was imported before the interpreter was on


@functools.lru_cache(maxsize=None)
def _child_results():
    """Run this file in a fresh interpreter-mode process; {test name: passed?} and the tail of its log."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
                            f"--junitxml={xml}"], env=env, capture_output=True, text=True, timeout=900,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
        results = {}
        if os.path.exists(xml):
            for case in ET.parse(xml).getroot().iter("testcase"):
                results[case.get("name")] = not any(c.tag in ("failure", "error", "skipped") for c in case)
    return results, (r.stdout + r.stderr)[-4000:]


def interpreted(test):
    """Run `test` here if triton is in interpreter mode, else assert its result from the clean child run."""
    if IN_PROCESS:
        return test

    def proxy():
        results, log = _child_results()
        assert results.get(test.__name__) is True, f"{test.__name__} failed in the TRITON_INTERPRET=1 child:\n{log}"
    proxy.__name__, proxy.__doc__ = test.__name__, test.__doc__
    return proxy


torch.set_num_threads(1)


def fused(policy, x, tau_from, tau_to, shift, total):
    """The kernel path alone: piflow's Euler grid, then piflow_kernels (None where the kernel declines)."""
    n, sigma = piflow.euler_grid(x, tau_from, tau_to, shift, total)
    return piflow._fused_rollout(policy, x, n, sigma)


def _check_close(out, ref, scale, tol=1e-5):
    assert out is not None, "fused path declined a case it must handle"
    assert out.shape == ref.shape and out.dtype == ref.dtype == torch.float32
    err = (out - ref).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x data scale {scale:.3g}"


@st.composite
def rollout_case(draw):
    """Batch, shape, per-sample times (t_src < 1, chained starts, tau_to = 0) and a seed."""
    B = draw(st.integers(1, 3))
    C = draw(st.integers(1, 5))
    spatial = draw(st.sampled_from([(), (1,), (3,), (2, 3), (4, 2), (2, 1, 3)]))
    shift = draw(st.sampled_from([1.0, 3.2, 0.5]))
    total = draw(st.integers(1, 24))
    tau_from = torch.tensor([draw(st.floats(0.05, 1.0)) for _ in range(B)])
    frac = torch.tensor([draw(st.sampled_from([1.0, draw(st.floats(0.02, 1.0))])) for _ in range(B)])
    tau_to = (tau_from * (1 - frac)).clamp(min=0)
    tau_to = torch.where(tau_to >= tau_from, tau_from * 0.5, tau_to)
    chained = draw(st.booleans())                   # rollout starting below the policy's source time
    seed = draw(st.integers(0, 2 ** 16))
    return B, C, spatial, shift, total, tau_from, tau_to, chained, seed


def _source(B, C, spatial, shift, tau_from, chained, seed):
    """Generator, sigma_src, x_src and the rollout start x (a later chained state when `chained`, else x_src)."""
    g = torch.Generator().manual_seed(seed)
    sigma_from = piflow.warp_time(tau_from, shift)
    if chained:
        sigma_src = sigma_from + (1 - sigma_from) * torch.rand(B, generator=g)
        x = torch.randn(B, C, *spatial, generator=g)
    else:
        sigma_src = sigma_from
        x = None
    x_src = torch.randn(B, C, *spatial, generator=g)
    return g, sigma_src.clamp(1e-3, 1.0), x_src, x_src if x is None else x


@interpreted
@settings(deadline=None, max_examples=60)
@given(case=rollout_case(), K=st.integers(1, 6), var_kind=st.sampled_from(["zero", "small", "big"]),
       mods=st.sampled_from(["none", "temperature", "one_left", "dropout", "noncontig"]))
def test_gm_fused_matches_reference(case, K, var_kind, mods):
    B, C, spatial, shift, total, tau_from, tau_to, chained, seed = case
    g, sigma_src, x_src, x = _source(B, C, spatial, shift, tau_from, chained, seed)
    if mods == "noncontig":                         # means laid out (K, B, C, ...) and x_src spatially flipped
        means_x = torch.randn(K, B, C, *spatial, generator=g).transpose(0, 1)
        x_src = torch.randn(B, *spatial, C, generator=g).movedim(-1, 1)
        x = x_src if not chained else torch.randn(2 * B, C, *spatial, generator=g)[::2]
    else:
        means_x = torch.randn(B, K, C, *spatial, generator=g)
    logweights = torch.randn(B, K, 1, *spatial, generator=g).log_softmax(1)
    var_x = {"zero": torch.zeros(B), "small": 1e-3 * torch.rand(B, generator=g),
             "big": 2 * torch.rand(B, generator=g)}[var_kind]
    if mods == "one_left":                          # dropout mask with all but one component dropped
        keep = torch.randint(0, K, (B,), generator=g)
        drop = torch.arange(K)[None] != keep[:, None]
        logweights = logweights.masked_fill(drop.reshape(B, K, *[1] * (1 + len(spatial))), float("-inf"))
        logweights = logweights.log_softmax(1)
    policy = piflow.GMPolicy.from_x0(means_x, logweights, var_x, x_src, sigma_src)
    if mods == "temperature":
        policy = policy.temperature(0.3)
    if mods == "dropout":
        policy = policy.dropout(0.6, generator=g)
    with torch.no_grad():
        ref = piflow.policy_rollout(policy, x, tau_from, tau_to, shift, total, backend="torch")
        out = fused(policy, x, tau_from, tau_to, shift, total)
    assert torch.isfinite(ref).all()
    scale = max(1.0, ref.abs().max().item(), means_x.abs().max().item())
    _check_close(out, ref, scale)


@interpreted
@settings(deadline=None, max_examples=40)
@given(case=rollout_case(), N=st.integers(1, 5), seg=st.sampled_from([1.0, 0.3, 1 / 3.5]),
       noncontig=st.booleans())
def test_dx_fused_matches_reference(case, N, seg, noncontig):
    B, C, spatial, shift, total, tau_from, tau_to, chained, seed = case
    g, sigma_src, x_src, x = _source(B, C, spatial, shift, tau_from, chained, seed)
    grid_u = torch.randn(N, B, C, *spatial, generator=g).transpose(0, 1)
    if not noncontig:
        grid_u = grid_u.contiguous()
    policy = piflow.DXPolicy(grid_u, x_src, sigma_src, seg, shift=shift)
    if noncontig:                                   # x0_grid itself strided: (B, N, C, *sp) view of (N, B, ...)
        policy.x0_grid = policy.x0_grid.transpose(0, 1).contiguous().transpose(0, 1)
    with torch.no_grad():
        ref = piflow.policy_rollout(policy, x, tau_from, tau_to, shift, total, backend="torch")
        out = fused(policy, x, tau_from, tau_to, shift, total)
    scale = max(1.0, ref.abs().max().item(), policy.x0_grid.abs().max().item())
    _check_close(out, ref, scale)


@interpreted
def test_gm_rollout_to_zero_recovers_component_mean():
    """Math ground truth: with s -> 0 and one component left, the flow of a point mass ends exactly on it."""
    torch.manual_seed(0)
    B, K, C, H, W = 2, 4, 3, 5, 3
    means_x = torch.randn(B, K, C, H, W)
    logweights = torch.full((B, K, 1, H, W), float("-inf"))
    logweights[:, 2] = 0.0
    policy = piflow.GMPolicy.from_x0(means_x, logweights, 0.0, torch.randn(B, C, H, W), 1.0)
    with torch.no_grad():
        out = fused(policy, torch.randn(B, C, H, W), 1.0, 0.0, 1.0, 16)
    torch.testing.assert_close(out, means_x[:, 2], atol=1e-5, rtol=0)


@interpreted
def test_piflow_backends_route_to_kernel():
    """policy_rollout(backend='fused') runs the kernel (interpreted here); 'torch' and CPU 'auto' do not."""
    torch.manual_seed(1)
    B, K, C = 2, 3, 4
    policy = piflow.GMPolicy(torch.randn(B, K, C, 4, 4), torch.randn(B, K, 1, 4, 4).log_softmax(1),
                             torch.full((B, 1, 1, 1, 1), -1.0), torch.randn(B, C, 4, 4), torch.tensor([1.0, 0.6]))
    x, tf = policy.x_src, piflow.unwarp_time(policy.sigma_src, 3.2)
    with torch.no_grad():
        via = piflow.policy_rollout(policy, x, tf, 0.0, 3.2, 20, backend="fused")
        ref = piflow.policy_rollout(policy, x, tf, 0.0, 3.2, 20, backend="torch")
        auto = piflow.policy_rollout(policy, x, tf, 0.0, 3.2, 20, backend="auto")
        direct = fused(policy, x, tf, 0.0, 3.2, 20)
    assert torch.equal(via, direct)                 # 'fused' really went through the kernel
    assert torch.equal(auto, ref)                   # CPU 'auto' keeps the reference path
    _check_close(via, ref, max(1.0, ref.abs().max().item()))


@interpreted
def test_declines_what_it_cannot_do(monkeypatch):
    torch.manual_seed(2)
    B, K, C = 2, 2, 3
    means = torch.randn(B, K, C, 3, dtype=torch.float64)
    policy = piflow.GMPolicy.from_x0(means, torch.zeros(B, K, 1, 3, dtype=torch.float64).log_softmax(1),
                                     0.1, torch.randn(B, C, 3, dtype=torch.float64), 1.0)
    assert fused(policy, policy.x_src, 1.0, 0.0, 1.0, 8) is None   # float64 stays exact
    with pytest.raises(ValueError, match="fused"), torch.no_grad():
        piflow.policy_rollout(policy, policy.x_src, 1.0, 0.0, 1.0, 8, backend="fused")

    class Other:                                    # duck-typed policy the kernel does not know
        x_src, sigma_src = torch.zeros(B, C, 3), torch.ones(B)

        def velocity(self, x_t, sigma_t):
            return x_t

    assert fused(Other(), torch.zeros(B, C, 3), 1.0, 0.0, 1.0, 8) is None
    means = torch.randn(B, K, C, 3, requires_grad=True)
    policy = piflow.GMPolicy.from_x0(means, torch.zeros(B, K, 1, 3), 0.1, torch.randn(B, C, 3), 1.0)
    assert fused(policy, policy.x_src.detach(), 1.0, 0.0, 1.0, 8) is None  # grad wanted
    policy = policy.detach()
    with torch.no_grad():
        assert fused(policy, policy.x_src, 1.0, 0.0, 1.0, 8) is not None
        monkeypatch.setenv("PIFLOW_NO_FUSED", "1")                                  # user switch
        assert fused(policy, policy.x_src, 1.0, 0.0, 1.0, 8) is None
        monkeypatch.setenv("PIFLOW_NO_FUSED", "0")
        monkeypatch.setenv("TRITON_INTERPRET", "0")                                 # CPU tensors, no interpreter
        assert fused(policy, policy.x_src, 1.0, 0.0, 1.0, 8) is None


@settings(deadline=None, max_examples=20)
@given(case=rollout_case(), K=st.integers(1, 4))
def test_euler_grid_and_eager_compiled_loop_are_the_reference(case, K):
    """The grid's end points are exact, and the compile-ready loop over it (run eagerly) is the reference
    rollout bit for bit."""
    B, C, spatial, shift, total, tau_from, tau_to, chained, seed = case
    g, sigma_src, x_src, x = _source(B, C, spatial, shift, tau_from, chained, seed)
    policy = piflow.GMPolicy.from_x0(torch.randn(B, K, C, *spatial, generator=g),
                                     torch.randn(B, K, 1, *spatial, generator=g).log_softmax(1),
                                     0.5 * torch.rand(B, generator=g), x_src, sigma_src)
    n, sigma = piflow.euler_grid(x, tau_from, tau_to, shift, total)
    assert torch.equal(n, piflow.rollout_substeps(tau_from, tau_to, total))
    assert torch.equal(sigma[:, 0], piflow.warp_time(tau_from, shift))
    assert torch.equal(sigma[torch.arange(B), n], piflow.warp_time(tau_to, shift))
    with torch.no_grad():
        ref = piflow.policy_rollout(policy, x, tau_from, tau_to, shift, total, backend="torch")
        eager = pk.compiled_rollout(policy.velocity, x, n, sigma, compile=False)
        eager_step = pk.compiled_rollout(policy.velocity, x, n, sigma, whole=False, compile=False)
    assert torch.equal(eager, ref)
    assert torch.equal(eager_step, ref)


_AOT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import piflow_kernels as pk
for K, C, capability in [(32, 4, 90), (5, 3, 80), (8, 16, 90)]:
    KP, CP = pk._next_pow2(K), pk._next_pow2(C)
    for fn, const in [(pk._gm_rollout_kernel, dict(KP=KP, CP=CP, BLOCK=pk._launch_shape(1024, KP * CP)[0])),
                      (pk._dx_rollout_kernel, dict(CP=CP, BLOCK=pk._launch_shape(1024, CP * 4)[0]))]:
        kernel = triton.jit(fn)
        ints = ("n_ptr", "i0_ptr", "i1_ptr")
        sig = {a: "constexpr" if a in const else "*i32" if a in ints else "*fp32" if a.endswith("_ptr")
               else "fp32" if a == "eps" else "i32" for a in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, sig, constexprs=const), target=GPUTarget("cuda", capability, 32))
        assert len(compiled.asm["cubin"]) > 0, (fn.__name__, K, C)
        assert ".local" not in compiled.asm["ptx"], ("register spills", fn.__name__, K, C)
print("compiled", flush=True)
"""


def test_kernels_compile_for_gpu(tmp_path):
    """The interpreter is lenient: also lower both kernels to real cubins (sm_80 / sm_90) without a GPU.

    Runs in a subprocess because triton's own library functions were built in interpreter mode here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


@interpreted
def test_sampler_and_data_free_pi_id_with_fused_rollouts():
    """End to end through piflow: sampling with GM temperature, and data-free π-ID (GM dropout) with
    rollout_backend='fused' give the reference results."""
    torch.manual_seed(3)
    B, K, C, H, W = 2, 3, 2, 3, 2
    head = torch.randn(K, C, H, W), torch.randn(K, 1, H, W)

    def student(x_t, sigma):  # a fixed, x-dependent GM head standing in for a network
        means = head[0] + 0.5 * x_t.unsqueeze(1)
        return piflow.GMPolicy(means, head[1].expand(B, -1, -1, -1, -1).log_softmax(1),
                               torch.full((B, 1, 1, 1, 1), -1.5), x_t, sigma)

    noise = torch.randn(B, C, H, W)
    out = {b: piflow.sample(student, noise, None, nfe=3, shift=3.2, final_step_scale=0.5, temperature="auto",
                            total_substeps=16, backend=b) for b in ("torch", "fused")}
    _check_close(out["fused"], out["torch"], max(1.0, out["torch"].abs().max().item()))

    def teacher(x_t, sigma):
        return x_t * 0.3 - 0.1
    losses = {}
    for b in ("torch", "fused"):
        cfg = piflow.PiIDConfig(nfe=2, total_substeps=16, gm_dropout=0.5, rollout_backend=b)
        losses[b] = piflow.piid_data_free(student, teacher, noise, None, cfg,
                                          generator=torch.Generator().manual_seed(4))
    assert abs(losses["fused"].item() - losses["torch"].item()) <= 1e-5 * max(1.0, losses["torch"].item())
