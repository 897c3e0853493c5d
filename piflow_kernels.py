"""Fast policy engine: a whole π-Flow policy rollout in one Triton kernel launch.

The GM posterior (App. F, Eq. 22-27) and the DX interpolation (§3.1) are independent per pixel, and the
Euler grid of a rollout (Alg. 1 line 7) depends only on per-sample times. So for a fixed sigma grid one
program can take a block of pixels of one sample, keep their K*C means, K log-weights, x_src and x in
registers, run every substep there, and write x once: one launch per rollout instead of ~10 per substep.

This module takes plain tensors and never imports piflow: piflow._rollout builds the Euler grid
(piflow.euler_grid, so both paths step on bit-identical times) and calls

    gm_rollout(x, x_src, sigma_src, means_x, logweights, var_x, n, sigma, eps) -> x at the grid's end, or None
    dx_rollout(x, x0_grid, i0, w, n, sigma, eps)                                -> x at the grid's end, or None
    compiled_rollout(velocity, x, n, sigma)   torch.compile(mode="reduce-overhead") of the same Euler loop

None means "case not handled" (no triton, CPU tensors without TRITON_INTERPRET=1, float64, grad, or
PIFLOW_NO_FUSED=1 in the environment); the caller then runs the plain PyTorch loop. The GM kernel follows
piflow.gm_posterior_mean operation by operation (eps clamps, alpha = 1 - max(sigma, eps), denom =
max(var_x zeta + 1, eps), softmax over K with -inf for dropped components); temperature and dropout are
already folded into logweights / var_x. Tested on CPU with TRITON_INTERPRET=1 (test_kernels.py); bench.py times it.
"""
import os

import torch

try:  # triton is optional: without it every call returns None and piflow uses the PyTorch loop
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None

    class tl:  # stub so that the kernel definitions below still parse; they are never compiled
        constexpr = None


def _next_pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


#################################################################################
#                    Kernels (plain functions; jit-decorated lazily)            #
#################################################################################

def _gm_rollout_kernel(x_ptr, out_ptr, xsrc_ptr, mu_ptr, lw_ptr, var_ptr, ssrc_ptr, sig_ptr, n_ptr,
                       P, K, C, NSIG, eps,
                       sx_b, sx_c, sx_p, ss_b, ss_c, ss_p, sm_b, sm_k, sm_c, sm_p, sl_b, sl_k, sl_p,
                       KP: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr):
    """One program = BLOCK pixels of sample b; all substeps of the GM policy's Euler rollout (Eq. 22-28)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    p = pid * BLOCK + tl.arange(0, BLOCK)                                    # (BLOCK,) pixel index
    k = tl.arange(0, KP)
    c = tl.arange(0, CP)
    pm = p < P
    cm = (c[:, None] < C) & pm[None, :]                                      # (CP, BLOCK)
    km = (k[:, None] < K) & pm[None, :]                                      # (KP, BLOCK)
    kcm = (k[:, None, None] < K) & cm[None, :, :]                            # (KP, CP, BLOCK)
    b64 = b.to(tl.int64)
    # the policy, read once: means (KP, CP, BLOCK), logweights (KP, BLOCK), x_src (CP, BLOCK), s_x^2, sigma_src
    mu = tl.load(mu_ptr + b64 * sm_b + k[:, None, None] * sm_k + c[None, :, None] * sm_c + p[None, None, :] * sm_p,
                 mask=kcm, other=0.0).to(tl.float32)
    lw = tl.load(lw_ptr + b64 * sl_b + k[:, None] * sl_k + p[None, :] * sl_p, mask=km, other=0.0).to(tl.float32)
    lw = tl.where(k[:, None] < K, lw, float("-inf"))                         # padded components never win
    xs = tl.load(xsrc_ptr + b64 * ss_b + c[:, None] * ss_c + p[None, :] * ss_p, mask=cm, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b64 * sx_b + c[:, None] * sx_c + p[None, :] * sx_p, mask=cm, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + b).to(tl.float32)
    s_src = tl.maximum(tl.load(ssrc_ptr + b).to(tl.float32), eps)
    r_src = (1 - s_src) / s_src                                              # alpha_src / sigma_src
    nu_src = r_src * xs / s_src
    n = tl.load(n_ptr + b)
    sigma = tl.load(sig_ptr + b64 * NSIG)
    for i in range(n):
        sigma_next = tl.load(sig_ptr + b64 * NSIG + i + 1)
        s_t = tl.maximum(sigma, eps)
        r_t = (1 - s_t) / s_t
        zeta = r_t * r_t - r_src * r_src
        nu = r_t * x / s_t - nu_src                                          # (CP, BLOCK)
        denom = tl.maximum(var * zeta + 1, eps)
        logits = lw + tl.sum(mu * (nu[None, :, :] - 0.5 * zeta * mu), axis=1) / denom  # (KP, BLOCK) Eq. 27
        e = tl.exp(logits - tl.max(logits, axis=0)[None, :])
        A = e / tl.sum(e, axis=0)[None, :]                                   # Eq. 26
        mu_post = (var * nu[None, :, :] + mu) / denom                        # Eq. 25
        x0 = tl.sum(A[:, None, :] * mu_post, axis=0)                         # (CP, BLOCK) E[x0 | x_t]
        u = (x - x0) / s_t                                                   # Eq. 28 (sigma clamped at eps)
        x = x + u * (sigma_next - sigma)
        sigma = sigma_next
    tl.store(out_ptr + b64 * C * P + c[:, None] * P + p[None, :], x, mask=cm)


def _dx_rollout_kernel(x_ptr, out_ptr, g_ptr, i0_ptr, i1_ptr, w_ptr, sig_ptr, n_ptr,
                       P, C, NSIG, eps, sx_b, sx_c, sx_p, sg_b, sg_n, sg_c, sg_p,
                       CP: tl.constexpr, BLOCK: tl.constexpr):
    """One program = BLOCK pixels of sample b; all substeps of the DX policy's rollout (§3.1).

    The grid row pair (i0, i1) and weight w of every substep come from the host (they are per-sample)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    c = tl.arange(0, CP)
    cm = (c[:, None] < C) & (p[None, :] < P)
    b64 = b.to(tl.int64)
    x = tl.load(x_ptr + b64 * sx_b + c[:, None] * sx_c + p[None, :] * sx_p, mask=cm, other=0.0).to(tl.float32)
    g = g_ptr + b64 * sg_b + c[:, None] * sg_c + p[None, :] * sg_p
    n = tl.load(n_ptr + b)
    sigma = tl.load(sig_ptr + b64 * NSIG)
    for i in range(n):
        sigma_next = tl.load(sig_ptr + b64 * NSIG + i + 1)
        i0 = tl.load(i0_ptr + b64 * NSIG + i).to(tl.int64)
        i1 = tl.load(i1_ptr + b64 * NSIG + i).to(tl.int64)
        w = tl.load(w_ptr + b64 * NSIG + i)
        g0 = tl.load(g + i0 * sg_n, mask=cm, other=0.0).to(tl.float32)
        g1 = tl.load(g + i1 * sg_n, mask=cm, other=0.0).to(tl.float32)
        x0 = (1 - w) * g0 + w * g1
        u = (x - x0) / tl.maximum(sigma, eps)
        x = x + u * (sigma_next - sigma)
        sigma = sigma_next
    tl.store(out_ptr + b64 * C * P + c[:, None] * P + p[None, :], x, mask=cm)


_JIT = {}


def _kernel(fn):
    """triton.jit(fn), built on first use so that TRITON_INTERPRET set after import still takes effect."""
    key = (fn.__name__, interpreting())
    if key not in _JIT:
        _JIT[key] = triton.jit(fn)
    return _JIT[key]


def interpreting():
    """True when triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


#################################################################################
#                     Host side: checks, flat views, launches                   #
#################################################################################

def _flat(t, lead):
    """View t (lead dims, *spatial) as (lead dims, P) without copying when possible."""
    return t.reshape(*t.shape[:lead], -1)


def _supported(x, *tensors):
    """The kernels run float32 policies on CUDA (or the CPU interpreter), without gradients."""
    if triton is None or os.environ.get("PIFLOW_NO_FUSED", "0") == "1":
        return False
    if not (x.is_cuda or interpreting()):
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False  # float64 rollouts stay on the (float64) reference path
    if any(t.dtype != torch.float32 or t.device != x.device for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (x,) + tensors))


def _launch_shape(P, per_pixel):
    block = max(1, min(_next_pow2(P), 128, max(1, 2048 // per_pixel)))
    return block, triton.cdiv(P, block)


def gm_rollout(x, x_src, sigma_src, means_x, logweights, var_x, n, sigma, eps):
    """GM policy rollout (Eq. 22-28) over the Euler grid (n (B,), sigma (B, S + 1)); float32 x, or None.

    x, x_src (B, C, *sp); means_x (B, K, C, *sp); logweights (B, K, 1, *sp); var_x (B, 1, ...); sigma_src (B,).
    """
    if not _supported(x, x_src, sigma_src, means_x, logweights, var_x):
        return None
    B, K, C = means_x.shape[:3]
    if x.shape != x_src.shape or x.shape[:2] != (B, C) or var_x.numel() != B or logweights.shape[2] != 1:
        return None
    mu, lw = _flat(means_x, 3), _flat(logweights[:, :, 0], 2)                 # (B, K, C, P), (B, K, P)
    xs, xf = _flat(x_src, 2), _flat(x, 2)                                      # (B, C, P)
    P = xf.shape[2]
    n, sigma = n.to(torch.int32).contiguous(), sigma.contiguous()
    var, s_src = var_x.reshape(B).contiguous(), sigma_src.reshape(B).contiguous()
    out = torch.empty(B, C, P, device=x.device, dtype=torch.float32)
    KP, CP = _next_pow2(K), _next_pow2(C)
    block, nprog = _launch_shape(P, KP * CP)
    _kernel(_gm_rollout_kernel)[(nprog, B)](
        xf, out, xs, mu, lw, var, s_src, sigma, n, P, K, C, sigma.shape[1], float(eps),
        *xf.stride(), *xs.stride(), *mu.stride(), *lw.stride(), KP=KP, CP=CP, BLOCK=block)
    return out.reshape(x.shape)


def dx_rollout(x, x0_grid, i0, w, n, sigma, eps):
    """DX policy rollout (§3.1) over the Euler grid; i0, w (B, S + 1) are the grid rows and weights of each
    node (DXPolicy.grid_weights). float32 x, or None."""
    if not _supported(x, x0_grid):
        return None
    B, N, C = x0_grid.shape[:3]
    if x.shape[:2] != (B, C) or x.shape[2:] != x0_grid.shape[3:]:
        return None
    g, xf = _flat(x0_grid, 3), _flat(x, 2)
    P = xf.shape[2]
    i1 = (i0 + 1).clamp(max=N - 1)                                            # N = 1: both rows are row 0
    i0, i1, w = (t.to(dtype).contiguous() for t, dtype in ((i0, torch.int32), (i1, torch.int32), (w, torch.float32)))
    n, sigma = n.to(torch.int32).contiguous(), sigma.contiguous()
    out = torch.empty(B, C, P, device=x.device, dtype=torch.float32)
    CP = _next_pow2(C)
    block, nprog = _launch_shape(P, CP * 4)
    _kernel(_dx_rollout_kernel)[(nprog, B)](
        xf, out, g, i0, i1, w, sigma, n, P, C, sigma.shape[1], float(eps),
        *xf.stride(), *g.stride(), CP=CP, BLOCK=block)
    return out.reshape(x.shape)


#################################################################################
#            Middle option: torch.compile of the reference Euler loop           #
#################################################################################

def _euler_steps(velocity, x, sigma, n, steps):
    """The reference Euler loop over a precomputed sigma grid (B, steps + 1)."""
    for i in range(steps):
        x = _euler_step(velocity, x, sigma[:, i], sigma[:, i + 1], i < n)
    return x


def _euler_step(velocity, x, sigma, sigma_next, active):
    """One masked Euler substep x <- x + pi(x, sigma) (sigma_next - sigma)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return torch.where(active.view(shape), x + velocity(x, sigma) * (sigma_next - sigma).view(shape), x)


_COMPILED = {}


def compiled_rollout(velocity, x, n, sigma, mode="reduce-overhead", whole=True, compile=True):
    """torch.compile(mode=...) of the reference rollout over the grid (n, sigma); no grad. velocity(x, sigma).

    whole=True compiles the whole unrolled rollout (one graph per max substep count: one CUDA-graph replay per
    rollout with mode="reduce-overhead", but compiling 128 substeps takes minutes); whole=False compiles one
    substep and replays it per substep (compiles in seconds). compile=False runs the same loop eagerly.
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    steps = sigma.shape[1] - 1
    nodes = sigma.t().contiguous()                                            # (steps + 1, B): same graph for any count
    fn = _euler_steps if whole else _euler_step
    if compile:
        key = (fn.__name__, mode)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(fn, mode=mode, dynamic=False)
        fn = _COMPILED[key]
    with torch.no_grad():
        if whole:
            return fn(velocity, x, sigma, n, steps)
        for i in range(steps):
            if compile and mode == "reduce-overhead" and x.is_cuda:
                torch.compiler.cudagraph_mark_step_begin()
            x = fn(velocity, x, nodes[i], nodes[i + 1], i < n)
            if compile and mode == "reduce-overhead" and x.is_cuda:
                x = x.clone()  # the graph's output buffer is reused by the next replay
        return x
