"""π-Flow in one file: policy-based few-step generation via imitation distillation.

Paper: Chen et al., "pi-Flow: Policy-Based Few-Step Generation via Imitation Distillation", arXiv 2510.14974.
Read it top to bottom; every part depends only on the parts above it.

    1. Conventions: forward diffusion, u <-> x0, time shift, the few-step schedule   (§2, App. B.4)
    2. DX policy: a grid of x0 predictions, linearly interpolated                    (§3.1)
    3. GMFlow policy: closed-form GM denoising posterior and its velocity            (§3.2, App. F, Eq. 21-30)
       GM dropout (§5.1) and GM temperature (App. B.1, Eq. 4)
    4. Policy rollout: Euler integration of the policy ODE with 128 substeps / unit   (Alg. 1 line 7)
    5. π-ID: segment loss, micro-window (Eq. 6), trajectory mixing (Eq. 5),
       data-dependent (Alg. 2) and data-free (Alg. 3) training steps, teacher CFG
    6. Few-step sampler (elastic NFE, GM temperature, flow-map SDE knob h) and the teacher's own Euler
       sampler (Fig. 2)
    7. EMA of the student weights (Karras power schedule)
    8. Student output heads: a network's widened output -> policy, initialised from the teacher (§3, §5)

Conventions (as in the paper and the official code):
    x_sigma = (1 - sigma) * x0 + sigma * eps      sigma = 1 is pure noise, alpha = 1 - sigma
    u = eps - x0 = (x_sigma - x0) / sigma         the flow velocity; dx/dsigma = u
    tau = raw time in [0, 1]; sigma = warp(tau) = m tau / (1 + (m - 1) tau) with shift m

The paper writes t for the noise level; here it is `sigma` (a per-sample tensor of shape (B,)), and `tau`
is the raw pre-shift time in which segments and substeps are uniform. Tensors are laid out as in the released
checkpoints: x (B, C, H, W); GM means (B, K, C, H, W), logweights (B, K, 1, H, W) (log-softmax over K),
logstds (B, 1, 1, 1, 1). Any number of trailing spatial dims works, including none.

The student is any callable `student(x_t, sigma, cond) -> policy`; the teacher is any callable
`teacher(x_t, sigma, cond) -> u`. With cond=None (an unconditional model) both are called as f(x_t, sigma).
A policy is any object with the `Policy` members below (GMPolicy and DXPolicy are the paper's two).
Nothing here knows about SiT, FLUX or Qwen-Image.
"""
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.utils.checkpoint


def _fail(name, given, accepted):
    raise ValueError(f"{name}={given!r} is not accepted; expected {accepted}")


def check_fields(obj, rules):
    """The one settings check of the project: rules [(field, ok, accepted)]; the first failing rule raises
    ValueError("field=value is not accepted; expected ..."), which the command lines turn into `--field=...`."""
    for name, ok, accepted in rules:
        if not ok:
            _fail(name, getattr(obj, name), accepted)


class Policy(Protocol):
    """The policy contract (§3): a network-free velocity field valid for sigma_t <= sigma_src."""
    x_src: torch.Tensor          # (B, C, *sp) the state the student was called on
    sigma_src: torch.Tensor      # (B,) its noise level

    def velocity(self, x_t, sigma_t): ...   # pi(x_t, t) -> (B, C, *sp)

    def detach(self): ...                   # the stop-gradient policy pi_D (Alg. 1 line 4)


def call(fn, x_t, sigma, cond):
    """fn(x_t, sigma, cond), or fn(x_t, sigma) for an unconditional model (cond is None)."""
    return fn(x_t, sigma) if cond is None else fn(x_t, sigma, cond)


#################################################################################
#                     1. Conventions and time shifting (§2, B.4)                #
#################################################################################

def append_dims(v, x):
    """View a per-sample value v of shape (B,) (or a scalar) as (B, 1, 1, ...) to broadcast against x
    (k-diffusion's append_dims)."""
    v = torch.as_tensor(v, device=x.device)
    if v.dim() == 0:
        v = v.expand(x.shape[0])
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def as_batch(v, x, dtype=None):
    """A scalar, 0-d or (B,) value as a (B,) tensor on x's device."""
    v = torch.as_tensor(v, device=x.device, dtype=dtype or torch.promote_types(x.dtype, torch.float32))
    return v.expand(x.shape[0]) if v.dim() == 0 else v


def warp_time(tau, shift=1.0):
    """Time shift (App. B.4, Alg. 2 line 6): sigma = m tau / (1 + (m - 1) tau), kept in [0, 1] under round-off."""
    sigma = shift * tau / (1 + (shift - 1) * tau)
    return sigma.clamp(max=1) if isinstance(sigma, torch.Tensor) else min(sigma, 1.0)


def unwarp_time(sigma, shift=1.0):
    """Inverse time shift: tau = sigma / (m + (1 - m) sigma)."""
    return sigma / (shift + (1 - shift) * sigma)


def diffuse(x0, noise, sigma):
    """Forward diffusion (§2): x_sigma = (1 - sigma) x0 + sigma eps."""
    s = append_dims(sigma, x0)
    return (1 - s) * x0 + s * noise


def u_to_x0(x_t, sigma, u):
    """x0 = x_t - sigma u (u-to-x0 reparameterisation, §2 Eq. 2)."""
    return x_t - append_dims(sigma, x_t) * u


def x0_to_u(x_t, sigma, x0):
    """u = (x_t - x0) / sigma."""
    return (x_t - x0) / append_dims(sigma, x_t)


def nfe_schedule(nfe, shift=1.0, final_step_scale=1.0):
    """Few-step boundaries (Alg. 2 line 2, App. B.4): NFE-1 raw steps of size D, then one of size s*D.

    D = 1 / (NFE - 1 + s). Returns float64 (taus, sigmas), each of length nfe + 1, from 1 down to 0.
    Example: nfe=4, s=0.5 gives taus 1, 5/7, 3/7, 1/7, 0.
    """
    if not (isinstance(nfe, int) and nfe >= 1):
        _fail("nfe", nfe, "an integer >= 1")
    if not 0 < final_step_scale <= 1:
        _fail("final_step_scale", final_step_scale, "a value in (0, 1]")
    if not shift > 0:
        _fail("shift", shift, "a value > 0")
    delta = 1.0 / (nfe - 1 + final_step_scale)
    taus = torch.tensor([max(1.0 - i * delta, 0.0) for i in range(nfe)] + [0.0], dtype=torch.float64)
    return taus, warp_time(taus, shift)


def _sigma_src(sigma_src, x_src):
    """Validate the source noise level of a policy: sigma_src in (0, 1], shape (B,)."""
    sigma_src = as_batch(sigma_src, x_src)
    if sigma_src.shape != (x_src.shape[0],):
        _fail("sigma_src.shape", tuple(sigma_src.shape), f"a scalar or ({x_src.shape[0]},)")
    if not bool(((sigma_src > 0) & (sigma_src <= 1)).all()):                  # also rejects NaN
        _fail("sigma_src", sigma_src.tolist(), "values in (0, 1]")
    return sigma_src


#################################################################################
#                         2. DX policy (§3.1)                                   #
#################################################################################

class DXPolicy:
    """Dynamic-x0 policy (§3.1): pi(x_t, t) = (x_t - x0_hat(t)) / t, x0_hat linearly interpolated on a grid.

    One student call predicts N u-space outputs; each becomes an x0 grid point with the *source* noise level
    (x0_i = x_src - sigma_src u_i). Grid point i sits at raw time tau_dst + i/(N-1) * seg with
    tau_dst = max(tau_src - segment_size, 0): index 0 is the low-noise end, index N-1 the source. Keep
    segment_size and shift at their training values when sampling with another NFE, as the published DX policy
    does (LakonLab, lakonlab/models/diffusions/piflow_policies/dx.py).
    """

    def __init__(self, grid_u, x_src, sigma_src, segment_size, shift=1.0, eps=1e-4):
        dtype = torch.promote_types(grid_u.dtype, torch.float32)
        if grid_u.dim() != x_src.dim() + 1 or grid_u.shape[2:] != x_src.shape[1:]:
            _fail("grid_u.shape", tuple(grid_u.shape), f"(B, N, {', '.join(map(str, x_src.shape[1:]))})")
        if not segment_size > 0:
            _fail("segment_size", segment_size, "a raw-time length > 0")
        self.x_src = x_src.to(dtype)                                            # (B, C, H, W)
        self.sigma_src = _sigma_src(sigma_src, self.x_src)                      # (B,)
        self.shift, self.eps, self.segment_size = shift, eps, segment_size
        self.x0_grid = u_to_x0(self.x_src.unsqueeze(1), self.sigma_src, grid_u.to(dtype))  # (B, N, C, H, W)
        tau_src = unwarp_time(self.sigma_src, shift)
        self.tau_dst = (tau_src - segment_size).clamp(min=0)                    # (B,)
        self.seg = (tau_src - self.tau_dst).clamp(min=eps)                      # (B,)

    def grid_weights(self, sigma_t):
        """Interpolation rows and weight for noise levels sigma_t (B, ...): x0 = (1 - w) g[i0] + w g[i0 + 1]."""
        N = self.x0_grid.shape[1]
        tau = unwarp_time(sigma_t, self.shift)
        tau_dst, seg = (append_dims(v, tau) if tau.dim() > 1 else v for v in (self.tau_dst, self.seg))
        p = ((tau - tau_dst) / seg).clamp(0, 1) * (N - 1)                       # fractional grid index
        i0 = p.floor().clamp(0, max(N - 2, 0)).long()
        return i0, p - i0

    def x0(self, sigma_t):
        """x0_hat(t): linear interpolation over the grid in raw time."""
        B, N = self.x0_grid.shape[:2]
        if N == 1:
            return self.x0_grid[:, 0]
        i0, w = self.grid_weights(as_batch(sigma_t, self.x_src))               # (B,), (B,)
        w = append_dims(w, self.x_src)
        b = torch.arange(B, device=i0.device)
        return (1 - w) * self.x0_grid[b, i0] + w * self.x0_grid[b, i0 + 1]      # (B, C, H, W)

    def velocity(self, x_t, sigma_t):
        """Eq. 1 with the grid's x0_hat(t) for the posterior mean: pi(x_t, t) = (x_t - x0_hat(t)) / t (§3.1)."""
        sigma_t = as_batch(sigma_t, x_t)
        return (x_t - self.x0(sigma_t)) / append_dims(sigma_t.clamp(min=self.eps), x_t)

    def detach(self):
        new = object.__new__(DXPolicy)
        new.__dict__.update(self.__dict__)
        new.x0_grid = self.x0_grid.detach()
        return new


#################################################################################
#            3. GMFlow policy: closed-form GM posterior (§3.2, App. F)          #
#################################################################################

def gm_posterior_mean(x_t, sigma_t, x_src, sigma_src, means_x, logweights, var_x, eps=1e-6):
    """E[x0 | x_t] under the GM prior q(x0 | x_src) (App. F, Eq. 22-27; Eq. 29-30 as var_x -> 0).

    q(x0 | x_src) = sum_k A_k N(x0; mu_k, s_x^2 I) per pixel. Conditioning on a later state x_t multiplies each
    component by the likelihood ratio p(x_t | x0) / p(x_src | x0) = exp(-zeta/2 |x0|^2 + nu . x0) (up to
    constants), with natural parameters (the paper's zeta, nu divided by sigma_src^2 sigma_t^2):
        zeta = (alpha_t / sigma_t)^2 - (alpha_src / sigma_src)^2
        nu   = alpha_t x_t / sigma_t^2 - alpha_src x_src / sigma_src^2
    Each component stays Gaussian (Eq. 23-25): mu'_k = (mu_k + s_x^2 nu) / (1 + s_x^2 zeta), and its
    log-weight moves by a'_k - log A_k = (mu_k . nu - zeta/2 |mu_k|^2) / (1 + s_x^2 zeta) (Eq. 26-27, with the
    terms that do not depend on k dropped). Nothing divides by zeta, which -> 0 as t -> t_src, and
    var_x = 0 gives the discrete limit (Eq. 29-30) without special cases.
    Shapes: x_t, x_src (B, C, *sp); means_x (B, K, C, *sp); logweights (B, K, 1, *sp); var_x (B, 1, 1, *1).
    """
    dtype = torch.promote_types(means_x.dtype, torch.float32)
    x_t, x_src = x_t.to(dtype), x_src.to(dtype)
    s_t = append_dims(as_batch(sigma_t, x_t, dtype), x_t).clamp(min=eps)       # (B, 1, 1, 1)
    s_src = append_dims(as_batch(sigma_src, x_t, dtype), x_t).clamp(min=eps)
    r_t, r_src = (1 - s_t) / s_t, (1 - s_src) / s_src                               # alpha / sigma
    zeta = (r_t ** 2 - r_src ** 2).unsqueeze(1)                                     # (B, 1, 1, 1, 1)
    nu = (r_t * x_t / s_t - r_src * x_src / s_src).unsqueeze(1)                     # (B, 1, C, H, W)
    denom = (var_x * zeta + 1).clamp(min=eps)                                       # (B, 1, 1, 1, 1)
    mu_post = (var_x * nu + means_x) / denom                                        # (B, K, C, H, W)  Eq. 25
    logits = logweights + (means_x * (nu - 0.5 * zeta * means_x)).sum(2, keepdim=True) / denom  # Eq. 27
    A_post = torch.softmax(logits, dim=1)                                           # (B, K, 1, H, W)  Eq. 26
    return (A_post * mu_post).sum(1)                                                # (B, C, H, W)


def _check_gm_shapes(means, logweights, x_src):
    """means (B, K, C, *sp) and logweights (B, K, 1, *sp) must agree with each other and with x_src (B, C, *sp)."""
    if means.dim() != x_src.dim() + 1 or means.shape[0] != x_src.shape[0] or means.shape[2:] != x_src.shape[1:]:
        _fail("means.shape", tuple(means.shape), f"(B, K, {', '.join(map(str, x_src.shape[1:]))}) with B = {x_src.shape[0]}")
    if logweights.shape != means.shape[:2] + (1,) + means.shape[3:]:
        _fail("logweights.shape", tuple(logweights.shape), f"{tuple(means.shape[:2]) + (1,) + tuple(means.shape[3:])}"
              " (same B and K as means, one weight per pixel)")


class GMPolicy:
    """GMFlow policy (§3.2): the student predicts a per-pixel GM over u; its velocity is closed form (Eq. 28).

    Construct from the u-space head outputs (means, logweights, logstds) at the student's input (x_src,
    sigma_src); Eq. 21 converts them to the x0-space mixture q(x0 | x_src) = sum_k A_k N(mu_x_k, s_x^2 I)
    with mu_x_k = x_src - sigma_src mu_k and s_x = sigma_src s. The policy is valid for any sigma_t <= sigma_src.
    """

    def __init__(self, means, logweights, logstds, x_src, sigma_src, eps=1e-6):
        _check_gm_shapes(means, logweights, x_src)
        if logstds.shape != (means.shape[0],) + (1,) * (means.dim() - 1):
            _fail("logstds.shape", tuple(logstds.shape), f"{(means.shape[0],) + (1,) * (means.dim() - 1)} "
                  "(one log-std per sample, shared by all components, channels and pixels)")
        dtype = torch.promote_types(means.dtype, torch.float32)
        x_src = x_src.to(dtype)
        sigma_src = _sigma_src(sigma_src, x_src)
        s = append_dims(sigma_src, means)                                  # (B, 1, 1, 1, 1)
        means_x = x_src.unsqueeze(1) - s * means.to(dtype)                     # (B, K, C, H, W)  Eq. 21
        var_x = torch.exp(2 * logstds.to(dtype)) * s ** 2                      # (B, 1, 1, 1, 1)  s_x^2
        self._set(means_x, logweights.to(dtype), var_x, x_src, sigma_src, eps)

    @classmethod
    def from_x0(cls, means_x, logweights, var_x, x_src, sigma_src, eps=1e-6):
        """Build the policy from x0-space parameters directly (e.g. a known data GM with sigma_src = 1)."""
        _check_gm_shapes(means_x, logweights, x_src)
        self = object.__new__(cls)
        dtype = torch.promote_types(means_x.dtype, torch.float32)
        x_src = x_src.to(dtype)
        var_x = torch.as_tensor(var_x, dtype=dtype, device=means_x.device)
        if var_x.dim() == 0:
            var_x = var_x.expand(means_x.shape[0])
        var_x = var_x.reshape(-1, *([1] * (means_x.dim() - 1)))
        self._set(means_x.to(dtype), logweights.to(dtype), var_x, x_src, _sigma_src(sigma_src, x_src), eps)
        return self

    def _set(self, means_x, logweights, var_x, x_src, sigma_src, eps):
        self.means_x, self.logweights, self.var_x = means_x, logweights, var_x
        self.x_src, self.sigma_src, self.eps = x_src, sigma_src, eps
        self.checkpoint = True  # recompute the posterior in backward instead of storing (B, K, C, H, W) temps

    def _replace(self, **fields):
        new = object.__new__(GMPolicy)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(fields)
        return new

    def posterior_mean(self, x_t, sigma_t):
        """E[x0 | x_t] of the policy's denoising posterior (Eq. 22-27)."""
        args = (x_t, as_batch(sigma_t, x_t), self.x_src, self.sigma_src, self.means_x, self.logweights,
                self.var_x, self.eps)
        if self.checkpoint and torch.is_grad_enabled() and self.means_x.requires_grad:
            return torch.utils.checkpoint.checkpoint(gm_posterior_mean, *args, use_reentrant=False)
        return gm_posterior_mean(*args)

    def velocity(self, x_t, sigma_t):
        """Eq. 1 with the policy's GM posterior: pi(x_t, t) = (x_t - E_q[x0 | x_t]) / t (Eq. 28)."""
        sigma_t = as_batch(sigma_t, x_t)
        x0 = self.posterior_mean(x_t, sigma_t)
        return (x_t.to(x0.dtype) - x0) / append_dims(sigma_t.clamp(min=self.eps), x0)

    def detach(self):
        """The stop-gradient policy pi_D (Alg. 1 line 4)."""
        return self._replace(means_x=self.means_x.detach(), logweights=self.logweights.detach(),
                             var_x=self.var_x.detach(), x_src=self.x_src.detach())

    def dropout(self, p, generator=None):
        """GM dropout (§5.1): drop each component with probability p, one mask per sample shared by all pixels.

        The kept weights are renormalised; a sample whose components would all be dropped keeps all of them.
        """
        if not 0 <= p < 1:
            _fail("gm_dropout", p, "a probability in [0, 1)")
        if p == 0:
            return self
        B, K = self.logweights.shape[:2]
        shape = (B, K) + (1,) * (self.logweights.dim() - 2)
        drop = torch.rand(shape, generator=generator, device=self.logweights.device) < p  # (B, K, 1, 1, 1)
        drop &= ~drop.all(dim=1, keepdim=True)                                 # never drop every component
        logweights = torch.log_softmax(self.logweights.masked_fill(drop, float("-inf")), dim=1)
        return self._replace(logweights=logweights)

    def temperature(self, T):
        """GM temperature (App. B.1, Eq. 4): A_k -> A_k^(1/T) renormalised, s^2 -> s^2 T (means unchanged)."""
        if not T > 0:
            _fail("temperature", T, "a value > 0")
        if T == 1:
            return self
        return self._replace(logweights=torch.log_softmax(self.logweights / T, dim=1), var_x=self.var_x * T)


#################################################################################
#                  4. Policy rollout (Alg. 1 line 7, §4)                        #
#################################################################################

def rollout_substeps(tau_from, tau_to, total_substeps=128):
    """Substeps for a raw-time interval: max(1, round(total_substeps * (tau_from - tau_to))), per sample."""
    return torch.round(total_substeps * (tau_from - tau_to)).clamp(min=1).long()


def euler_grid(x, tau_from, tau_to, shift, total_substeps):
    """The rollout's Euler grid: substep counts n (B,) and sigma nodes (B, max n + 1), uniform in raw time.

    tau_i = tau_from - i (tau_from - tau_to) / n, the node i = n exactly tau_to, sigma_i = warp(tau_i); entries
    past a sample's n repeat tau_to (those substeps are masked out). Shared by the PyTorch loop and the kernel.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    tau_from, tau_to = as_batch(tau_from, x, dtype), as_batch(tau_to, x, dtype)
    n = rollout_substeps(tau_from, tau_to, total_substeps)                     # (B,)
    dtau = (tau_from - tau_to) / n
    i = torch.arange(1, int(n.max()) + 1, device=x.device, dtype=dtype)        # (S,)
    tau = torch.where(i[None] >= n[:, None], tau_to[:, None], tau_from[:, None] - i[None] * dtau[:, None])
    return n, torch.cat([warp_time(tau_from, shift)[:, None], warp_time(tau, shift)], 1)  # (B,), (B, S + 1)


def _fused_rollout(policy, x, n, sigma):
    """The whole rollout in one Triton launch (piflow_kernels), or None where the kernel does not apply."""
    try:
        import piflow_kernels
    except ImportError:
        return None
    if isinstance(policy, GMPolicy):
        return piflow_kernels.gm_rollout(x, policy.x_src, policy.sigma_src, policy.means_x, policy.logweights,
                                         policy.var_x, n, sigma, policy.eps)
    if isinstance(policy, DXPolicy):
        i0, w = policy.grid_weights(sigma)                                      # (B, S + 1) rows and weights
        return piflow_kernels.dx_rollout(x, policy.x0_grid, i0, w, n, sigma, policy.eps)
    return None


def _rollout(policy, x, tau_from, tau_to, shift, total_substeps, backend="auto"):
    """Euler integration of dx/dsigma = pi(x, sigma) on a per-sample grid uniform in raw time (unchecked)."""
    n, sigma = euler_grid(x, tau_from, tau_to, shift, total_substeps)
    if backend == "fused" or (backend == "auto" and x.is_cuda and not torch.is_grad_enabled()):
        out = _fused_rollout(policy, x, n, sigma)
        if out is not None:
            return out
        if backend == "fused":
            raise ValueError("backend='fused' cannot handle this rollout (needs triton, CUDA or TRITON_INTERPRET=1, "
                             "a GM or DX policy in float32 and no gradient); use backend='auto' or 'torch'")
    x = x.to(sigma.dtype)
    for i in range(sigma.shape[1] - 1):
        u = policy.velocity(x, sigma[:, i])
        step = x + u * append_dims(sigma[:, i + 1] - sigma[:, i], x)
        x = torch.where(append_dims(i < n, x), step, x)                        # finished samples stay put
    return x


def policy_rollout(policy, x, tau_from, tau_to, shift=1.0, total_substeps=128, backend="auto"):
    """Roll a policy out from raw time tau_from to tau_to (Alg. 1 line 7): x_dst = x + int pi(x_t, t) dt.

    Explicit Euler in sigma on a grid uniform in raw time, max(1, round(128 * dtau)) substeps per sample
    (step 1/128 as in §4). backend: 'auto' (fused kernel on CUDA without grad when piflow_kernels is
    available, else PyTorch), 'torch', or 'fused'.
    """
    if backend not in ("auto", "torch", "fused"):
        _fail("backend", backend, "'auto', 'torch' or 'fused'")
    if not (isinstance(total_substeps, int) and total_substeps >= 1):
        _fail("total_substeps", total_substeps, "an integer >= 1")
    tau_from, tau_to = as_batch(tau_from, x), as_batch(tau_to, x)
    if not bool(((tau_from <= 1) & (tau_to >= 0)).all()):                    # also rejects NaN
        _fail("tau_from/tau_to", (tau_from.tolist(), tau_to.tolist()), "raw times in [0, 1]")
    if bool((tau_to >= tau_from).any()):
        _fail("tau_to", tau_to.tolist(), f"values < tau_from={tau_from.tolist()} (t_dst < t_src)")
    return _rollout(policy, x, tau_from, tau_to, shift, total_substeps, backend)


#################################################################################
#           5. π-ID: policy-based imitation distillation (§4, App. B)          #
#################################################################################

@dataclass(frozen=True)
class PiIDConfig:
    nfe: int = 1                   # student steps per trajectory (NFE)
    shift: float = 1.0             # time shift m: 1.0 on ImageNet, 3.2 on FLUX / Qwen-Image
    final_step_scale: float = 1.0  # raw size of the last step relative to the others (0.5 on FLUX / Qwen)
    total_substeps: int = 128      # policy substeps per unit raw time (step 1/128)
    num_intermediate: int = 2      # intermediate states (teacher queries) per student call
    window_substeps: int = 0       # micro-window size in substeps (Eq. 6): 0 on ImageNet GM, 3 on T2I
    gm_dropout: float = 0.0        # GM dropout on the detached rollout policy: 0.05 ImageNet, 0.1 T2I
    loss_scale: float = 1.0        # constant loss rescale of the published configs (not in the paper): 3 / 30
    decay_iters: int = 0           # trajectory mixing (Eq. 5): teacher ratio 1 -> 0 over this many steps
    eps: float = 1e-4              # raw-time floor and window-secant clamp
    rollout_backend: str = "auto"  # 'auto' | 'torch' | 'fused' for the detached rollouts

    def __post_init__(self):
        check_fields(self, [
            ("nfe", isinstance(self.nfe, int) and self.nfe >= 1, "an integer >= 1"),
            ("shift", self.shift > 0 and math.isfinite(self.shift), "a finite value > 0"),
            ("final_step_scale", 0 < self.final_step_scale <= 1, "a value in (0, 1]"),
            ("total_substeps", isinstance(self.total_substeps, int) and self.total_substeps >= 1,
             "an integer >= 1"),
            ("num_intermediate", isinstance(self.num_intermediate, int) and self.num_intermediate >= 1,
             "an integer >= 1"),
            ("window_substeps", isinstance(self.window_substeps, int) and self.window_substeps >= 0,
             "an integer >= 0"),
            ("gm_dropout", 0 <= self.gm_dropout < 1, "a probability in [0, 1)"),
            ("loss_scale", self.loss_scale > 0 and math.isfinite(self.loss_scale), "a finite value > 0"),
            ("decay_iters", isinstance(self.decay_iters, int) and self.decay_iters >= 0, "an integer >= 0"),
            ("rollout_backend", self.rollout_backend in ("auto", "torch", "fused"), "auto|torch|fused")])


def _cat_cond(a, b):
    """Concatenate two conditions along the batch (tensors, dicts of them, or None); batch-1 `a` is expanded."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, dict):
        return {k: _cat_cond(a[k], b[k]) for k in b}
    if isinstance(a, torch.Tensor):
        if a.shape[0] == 1 and b.shape[0] != 1:
            a = a.expand(b.shape[0], *a.shape[1:])
        return torch.cat([a, b])
    return b


def guided_teacher(teacher, guidance, null_cond, interval=(0.0, 1.0)):
    """Teacher with classifier-free guidance on an interval (Kynkäänniemi et al. 2024; §5.1, Table 8), as the
    published flow does it (LakonLab, lakonlab/models/diffusions/gaussian_flow.py, forward_u).

    u = u_null + w (u_cond - u_null), where w = guidance if lo <= sigma <= hi (per sample, inclusive), else 1.
    """
    lo, hi = interval

    def guided(x_t, sigma, cond=None):
        if guidance == 1:
            return call(teacher, x_t, sigma, cond)
        sigma = as_batch(sigma, x_t)
        u = call(teacher, torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), _cat_cond(null_cond, cond))
        u_null, u_cond = u.chunk(2)
        w = torch.where((sigma >= lo) & (sigma <= hi), float(guidance), 1.0)    # (B,)
        return u_null + append_dims(w, u_cond).to(u_cond.dtype) * (u_cond - u_null)
    return guided


def teacher_ratio(step, decay_iters):
    """Scheduled trajectory mixing (App. B.2): teacher share of each segment, linear from 1 to 0."""
    return 1.0 - min(step, decay_iters) / decay_iters if decay_iters > 0 else 0.0


def sample_segment(batch, cfg, generator=None, device=None):
    """Pick the NFE segment [tau_src - seg, tau_src] of each sample (Alg. 2 lines 3-5).

    tau' ~ U(0, 1] selects the segment of the nfe_schedule grid that contains it, so segments are chosen with
    probability proportional to their raw length (the shortened final step is chosen less often).
    Returns tau_src (B,) and seg (B,).
    """
    taus, _ = nfe_schedule(cfg.nfe, 1.0, cfg.final_step_scale)                 # raw boundaries 1 > ... > 0
    taus = taus.to(device)
    tau_p = (1 - torch.rand(batch, generator=generator, device=device, dtype=torch.float64)).clamp(min=cfg.eps)
    i = (taus[1:-1, None] >= tau_p).sum(0)                                     # (B,) tau_{i+1} < tau' <= tau_i
    return taus[i].float(), (taus[i] - taus[i + 1]).float()


def average_velocity(policy, x_a, tau_a, tau_end, cfg):
    """Learner velocity over [tau_a, tau_end]: micro-window (Eq. 6) / mixing (Eq. 5) average, else local.

    The average is the sigma-space secant (x_a - x_end) / (sigma_a - sigma_end) of a gradient-carrying Euler
    rollout of the learner policy. Windows shorter than 2 substeps use the instantaneous pi(x_a, t_a) (Alg. 1).
    """
    sigma_a = warp_time(tau_a, cfg.shift)
    local = policy.velocity(x_a, sigma_a)
    use_avg = rollout_substeps(tau_a, tau_end, cfg.total_substeps) >= 2       # (B,)
    if not bool(use_avg.any()):
        return local
    tau_end = torch.where(use_avg, tau_end, tau_a - 1.0 / cfg.total_substeps).clamp(min=0)
    x_end = _rollout(policy, x_a, tau_a, tau_end, cfg.shift, cfg.total_substeps, backend="torch")
    d_sigma = (sigma_a - warp_time(tau_end, cfg.shift)).clamp(min=cfg.eps)
    avg = (x_a.to(x_end.dtype) - x_end) / append_dims(d_sigma, x_end)
    return torch.where(append_dims(use_avg, avg), avg, local)


def mixing_gaps(n, ratio, free, generator=None):
    """Where a segment's n states lie (Alg. 1 line 6; Eq. 5 trajectory mixing, App. B.2): raw-time gaps (n, B).

    State i is reached by a detached-policy rollout of length policy_gaps[i], then a teacher Euler step of length
    teacher_gaps[i] follows it. The policy gaps are the differences of sorted uniforms on [0, (1 - r) free]; the
    teacher gaps split r free at sorted uniform cuts (a Dirichlet(1, ..., 1) share each). With teacher ratio
    r = 0 this is Alg. 1's n ordered times in the free length (on-policy); r = 1 is behaviour cloning.
    """
    B, dev, dtype = free.shape[0], free.device, free.dtype
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=dev, dtype=dtype)
    times = rand(n, B).sort(0).values * (1 - ratio) * free                      # (n, B) ordered rollout lengths
    policy_gaps = torch.diff(times, dim=0, prepend=torch.zeros(1, B, device=dev))
    cuts = torch.cat([torch.zeros(1, B, device=dev), rand(n - 1, B).sort(0).values, torch.ones(1, B, device=dev)])
    return policy_gaps, torch.diff(cuts, dim=0) * ratio * free                 # (n, B), (n, B)


def piid_segment_loss(policy, teacher, cond, tau_src, seg, cfg, ratio=0.0, generator=None, return_x_dst=False):
    """π-ID on one NFE segment (Alg. 1 lines 4-8, with Eq. 5 mixing and the Eq. 6 micro-window).

    policy: the learner pi = G_phi(x_src, t_src) (carries x_src, sigma_src); tau_src, seg: (B,) raw times. The n
    states are visited in order by a chained rollout of the detached (dropped-out) policy pi_D (mixing_gaps), and at
    each the learner's (window-)average velocity is matched to the teacher's. Returns the per-sample loss (B,) =
    loss_scale * mean_n 1/2 mean_pixels |pi - G_theta|^2, and, if asked, x_dst: the detached policy's rollout to the
    segment end (for data-free training, Alg. 3 line 14).
    """
    x_src = policy.x_src
    tau_src, seg = as_batch(tau_src, x_src), as_batch(seg, x_src)
    window = torch.minimum(cfg.window_substeps * seg / rollout_substeps(seg, 0, cfg.total_substeps), seg)  # (B,)
    pi_D = policy.detach()                                                    # Alg. 1 line 4
    if cfg.gm_dropout > 0 and isinstance(pi_D, GMPolicy):
        pi_D = pi_D.dropout(cfg.gm_dropout, generator)                        # §5.1
    policy_gaps, teacher_gaps = mixing_gaps(cfg.num_intermediate, ratio, seg - window, generator)
    x, tau, losses = x_src, tau_src, []
    for gap_pi, gap_teacher in zip(policy_gaps, teacher_gaps):
        tau_a = (tau - gap_pi).clamp(min=0)                                   # line 6: the next time t
        tau_b = (tau_a - gap_teacher).clamp(min=0)
        with torch.no_grad():
            x_a = _rollout(pi_D, x, tau, tau_a, cfg.shift, cfg.total_substeps, cfg.rollout_backend)   # line 7
            sigma_a = warp_time(tau_a, cfg.shift)
            u_teacher = call(teacher, x_a, sigma_a, cond).to(x_a.dtype)      # G_theta(x_t, t)
        pred = average_velocity(policy, x_a, tau_a, (tau_b - window).clamp(min=0), cfg)   # pi(x_t, t), Eq. 5/6
        losses.append(0.5 * (pred - u_teacher).pow(2).flatten(1).mean(1))     # line 8, (B,)
        with torch.no_grad():                                                 # teacher Euler step (Eq. 5)
            x = x_a + u_teacher * append_dims(warp_time(tau_b, cfg.shift) - sigma_a, x_a)
        tau = tau_b
    loss = cfg.loss_scale * torch.stack(losses).mean(0)                       # (B,)
    x_dst = None
    if return_x_dst:
        with torch.no_grad():
            x_dst = _rollout(pi_D, x, tau, (tau_src - seg).clamp(min=0), cfg.shift, cfg.total_substeps,
                             cfg.rollout_backend)
    return loss, x_dst


def piid_data_dependent(student, teacher, x0, cond=None, cfg=PiIDConfig(), step=0, generator=None):
    """Data-dependent on-policy π-ID with time shifting (Alg. 2): x_src by forward diffusion of real data."""
    B = x0.shape[0]
    tau_src, seg = sample_segment(B, cfg, generator, x0.device)
    sigma_src = warp_time(tau_src, cfg.shift)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_src = diffuse(x0, noise, sigma_src)                                     # Alg. 2 line 7
    policy = call(student, x_src, sigma_src, cond)                            # Alg. 2 line 8
    loss, _ = piid_segment_loss(policy, teacher, cond, tau_src, seg, cfg,
                                teacher_ratio(step, cfg.decay_iters), generator)
    return loss.mean()


def piid_data_free(student, teacher, noise, cond=None, cfg=PiIDConfig(), step=0, generator=None, backward=None):
    """Data-free on-policy π-ID with time shifting (Alg. 3): states come from the student's own rollout.

    Walks all NFE segments from pure noise; each segment's loss is weighted by its raw length tau_src - tau_dst
    (Alg. 3 line 13). If `backward` is given it is called on each segment's loss and the returned total is
    detached. One backward per segment gives the same gradient as one over the sum: the next segment starts
    from x_dst of the detached policy pi_D (Alg. 3 line 14), so no graph crosses segments.
    """
    taus, _ = nfe_schedule(cfg.nfe, cfg.shift, cfg.final_step_scale)
    ratio = teacher_ratio(step, cfg.decay_iters)
    x, total = noise, 0.0
    for i in range(cfg.nfe):
        tau_src = as_batch(float(taus[i]), noise)
        seg = as_batch(float(taus[i] - taus[i + 1]), noise)
        policy = call(student, x, warp_time(tau_src, cfg.shift), cond)
        loss, x = piid_segment_loss(policy, teacher, cond, tau_src, seg, cfg, ratio, generator, return_x_dst=True)
        loss = loss.mean() * float(taus[i] - taus[i + 1])
        if backward is not None:
            backward(loss)
            loss = loss.detach()
        total = total + loss
    return total


#################################################################################
#                        6. Few-step sampler (§3, B.1)                          #
#################################################################################

def auto_temperature(nfe):
    """The released pipelines' 'auto' GM temperature: clip(0.1 (NFE - 1), 0, 1) (0.3 at 4 NFE, 0.7 at 8)."""
    return min(max(0.1 * (nfe - 1), 0.0), 1.0)


def resolve_temperature(temperature, nfe):
    """The GM temperature a sampler uses: None (off), a value > 0, or 'auto' (auto_temperature(nfe)).

    'auto' at 1 NFE is off: temperature is never applied on the last step, which is then the only one.
    """
    if temperature == "auto":
        T = auto_temperature(nfe)
        return T if T > 0 else None
    if temperature is not None and not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        _fail("temperature", temperature, "None, 'auto' or a finite value > 0")
    return temperature


def schedule_settings(student=None, cfg=None, **given):
    """The training schedule a sampler must keep (shift, final_step_scale, total_substeps, nfe).

    Taken from `cfg`, else from the student's `piid_config` (the trainers set it), else the given values or the
    PiIDConfig defaults. A given shift or final_step_scale that contradicts a known training config raises:
    the policies were trained on that schedule. nfe and total_substeps may differ (elastic inference, finer
    rollouts).
    """
    cfg = cfg or getattr(student, "piid_config", None)
    if cfg is not None:
        for name in ("shift", "final_step_scale"):
            if given.get(name) is not None and given[name] != getattr(cfg, name):
                _fail(name, given[name], f"the training value {getattr(cfg, name)!r} of the student's PiIDConfig")
    base = cfg or PiIDConfig()
    return {k: given.get(k) if given.get(k) is not None else getattr(base, k)
            for k in ("nfe", "shift", "final_step_scale", "total_substeps")}


def check_h(h):
    """The flow-map SDE knob h: a finite real number >= 0 (returned as a float), or the string 'inf'."""
    if isinstance(h, str) and h == "inf":
        return "inf"
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not (math.isfinite(h) and h >= 0):
        _fail("h", h, "a finite value >= 0 or 'inf'")
    return float(h)


def sde_schedule(sigmas, h, eps=1e-6):
    """Flow-map SDE steps on the few-step boundaries `sigmas` (nfe + 1, float64, 1 -> 0): per step (m, sigma_dst).

    The published FlowMapSDEScheduler (LakonLab, lakonlab/models/diffusions/schedulers/flow_map_sde.py) keeps the
    paper's step boundaries (Alg. 2 line 2, App. B.4) and rolls the policy of step i out from sigma_src only to
        sigma_dst = sigma_to m / (alpha_to + sigma_to m),   m = (sigma_to alpha_src / (sigma_src alpha_to))^(h^2)
    (alpha = 1 - sigma; m = 1 for h = 0, m = 0 for h = 'inf'; denominators clamped at eps). m is the factor by
    which the log-SNR gap of the step shrinks the noise: m = 0 wherever alpha_src = 0, i.e. on the first step from
    pure noise for every h > 0. h = 0 gives sigma_dst = sigma_to exactly (the deterministic sampler).
    Returns float64 (m, sigma_dst), nfe each.
    """
    s_src, s_to = sigmas[:-1], sigmas[1:]
    if h == 0:
        return torch.ones_like(s_to), s_to.clone()
    a_src, a_to = 1 - s_src, 1 - s_to
    m = torch.zeros_like(s_to) if h == "inf" else (s_to * a_src / (s_src * a_to).clamp(min=eps)) ** (h * h)
    return m, s_to * m / (a_to + s_to * m).clamp(min=eps)


def _randn(x, generator):
    """eps ~ N(0, I) shaped and typed like x from `generator`: None (torch's global RNG), a torch.Generator, or a
    list of one generator per sample (sample i then depends on its own generator only, as diffusers' randn_tensor)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype)
                            for g in generator]).to(x.device)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def sample(student, noise, cond=None, nfe=None, shift=None, final_step_scale=None, temperature=None,
           total_substeps=None, backend="auto", progress=False, cfg=None, return_schedule=False, h=0.0,
           generator=None):
    """π-Flow sampling: NFE student calls, each followed by a dense policy rollout (§3, Fig. 2c).

    Schedule settings default to the training config (`cfg` or student.piid_config, see schedule_settings): this
    is the one place where the NFE default is resolved. Any nfe >= 1 works for a GM student (elastic inference).
    temperature: None (off), a value > 0, or 'auto'; it is applied to GM policies on every step but the last
    (App. B.1). return_schedule=True returns (x, schedule): the settings used, with the float64 `taus` / `sigmas`
    (nfe + 1 each), the resolved `temperature`, `h` and the SDE steps `m` / `sigmas_dst` / `taus_dst` (nfe each),
    e.g. for teacher_euler on the same steps.

    h: flow-map SDE sampling (LakonLab's FlowMapSDEScheduler, see sde_schedule). h = 0 (default) is the
    deterministic sampler. For h > 0 (or 'inf') step i rolls the policy from sigma_src to sigma_dst <= sigma_to
    (substeps uniform in raw time over [tau_src, tau_dst]) and re-noises to sigma_to:
        x_to = (alpha_to + sigma_to m) x_dst + sigma_to sqrt(1 - m^2) eps,   eps ~ N(0, I) from `generator`
    (None: torch's global RNG; a torch.Generator; or a list of one per sample). If x_dst = alpha_dst x0 +
    sigma_dst eps0, then x_to = alpha_to x0 + sigma_to (m eps0 + sqrt(1 - m^2) eps): the forward marginal at
    sigma_to, with the step's noise kept in proportion m. The last step (sigma_to = 0) adds nothing.
    """
    h = check_h(h)
    if isinstance(generator, (list, tuple)) and len(generator) != noise.shape[0]:
        _fail("generator", f"a list of {len(generator)}", f"one generator, None or a list of {noise.shape[0]} "
              "(one per sample)")
    c = schedule_settings(student, cfg, nfe=nfe, shift=shift, final_step_scale=final_step_scale,
                          total_substeps=total_substeps)
    nfe, shift = c["nfe"], c["shift"]
    taus, sigmas = nfe_schedule(nfe, shift, c["final_step_scale"])
    m, sigmas_dst = sde_schedule(sigmas, h)
    taus_dst = taus[1:].clone() if h == 0 else unwarp_time(sigmas_dst, shift)
    T = resolve_temperature(temperature, nfe)
    steps = range(nfe)
    if progress:                                                          # a number: the bar's delay in seconds
        from tqdm import tqdm
        steps = tqdm(steps, desc="pi-Flow sampling", delay=0 if progress is True else float(progress))
    x = noise
    for i in steps:
        tau_src, tau_dst = as_batch(float(taus[i]), x), as_batch(float(taus_dst[i]), x)
        policy = call(student, x, warp_time(tau_src, shift), cond)
        if T is not None and i < nfe - 1 and isinstance(policy, GMPolicy):
            policy = policy.temperature(T)
        x = _rollout(policy, x, tau_src, tau_dst, shift, c["total_substeps"], backend)
        if h != 0 and i < nfe - 1:                                             # re-noise x_dst to sigma_to
            s_to, m_i = float(sigmas[i + 1]), float(m[i])
            x = (1 - s_to + s_to * m_i) * x + s_to * math.sqrt(max(1 - m_i * m_i, 0.0)) * _randn(x, generator)
    schedule = dict(c, taus=taus, sigmas=sigmas, temperature=T, h=h, m=m, sigmas_dst=sigmas_dst, taus_dst=taus_dst)
    return (x, schedule) if return_schedule else x


@torch.no_grad()
def teacher_euler(teacher, noise, cond, sigmas, progress=False):
    """The teacher's own few-step sampler (Fig. 2a): Euler steps of dx/dsigma = G_theta(x, sigma) through the
    noise levels `sigmas` (1 -> 0), e.g. nfe_schedule(...)[1] or sample(..., return_schedule=True)'s. progress: as
    in sample()."""
    x, steps = noise, range(len(sigmas) - 1)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="teacher Euler", delay=0 if progress is True else float(progress))
    for i in steps:
        s = as_batch(float(sigmas[i]), x)
        x = x + call(teacher, x, s, cond) * float(sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def teacher_rk4(teacher, noise, cond=None, steps=64, sigma_src=1.0, sigma_dst=0.0):
    """The teacher's ODE endpoint (the reference of teacher alignment, §5.3 and Fig. 4): classical RK4, `steps`
    steps uniform in sigma from sigma_src (1: noise) to sigma_dst, 4 teacher calls each. On the toy teacher 64
    steps from 1 to 0 agree with DOP853 (rtol 1e-7) to 1e-8 MSE."""
    x, span = noise, sigma_src - sigma_dst
    f = lambda x, s: call(teacher, x, as_batch(s, x), cond).to(x.dtype)
    for i in range(steps):
        a, h = sigma_src - i * span / steps, -span / steps
        k1 = f(x, a)
        k2 = f(x + h / 2 * k1, a + h / 2)
        k3 = f(x + h / 2 * k2, a + h / 2)
        k4 = f(x + h * k3, max(a + h, sigma_dst))
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


#################################################################################
#                      7. EMA (Karras et al. 2024 power schedule)               #
#################################################################################

def ema_beta(step, gamma=7.0, start=0):
    """EMA decay at `step`: 0 (copy) before `start`, then (1 - 1/(step + 1 - start))^(gamma + 1)."""
    if step < start:
        return 0.0
    return min((1 - 1 / max(step + 1 - start, 1)) ** (gamma + 1), 1.0)


@torch.no_grad()
def ema_update(ema, model, beta):
    """ema <- beta ema + (1 - beta) theta. ema / model: nn.Modules (buffers are copied) or name -> tensor dicts
    (e.g. only the trainable parameters of a LoRA student, as the published EMA keeps them)."""
    params = model if isinstance(model, dict) else dict(model.named_parameters())
    for name, p_ema in (ema.items() if isinstance(ema, dict) else ema.named_parameters()):
        p_ema.lerp_(params[name].to(p_ema.dtype), 1 - beta)
    if not isinstance(ema, dict):
        buffers = dict(model.named_buffers())
        for name, b_ema in ema.named_buffers():
            b_ema.copy_(buffers[name])


#################################################################################
#      8. Student output heads, initialised from the teacher (§3, §5.1, §5.2)   #
#################################################################################
# A π-Flow student is the teacher network whose output layer is expanded into a policy head (§3: "modifies the
# output layer"; §5.1: "initialized with the teacher weights"; §5.2: "the expanded output layer"). The paper gives
# no head initialisation; ours follows the published students (LakonLab, lakonlab/models/architecture/gmflow/
# gmdit_v2.py, gmflux.py, gmqwen.py and dxflow/dxdit.py, dxflux.py): the teacher's output layer repeated per
# component / grid point. The published GM students name the layers proj_out_means / proj_out_logweights /
# proj_out_logstds on the network itself; these helpers create, initialise and read them for any backbone (toy
# MLP, SiT/DiT, FLUX, Qwen-Image).
# Token layouts: a "channel-last" token holds (S sub-positions, C channels), e.g. DiT's (p1, p2, c); a
# "channel-first" token holds (C, S), e.g. the (c, ph, pw) packing of FLUX / Qwen-Image. Widening inserts the
# K copies just outside C: (S, K, C) or (K, C, S), which is the model's own unpatchify of K*C channels.

def logstd_mlp(in_dim, inner_dim=1024, num_layers=2):
    """GM log-std head (the s of §3.2): [SiLU, Linear(in, inner)] x (num_layers - 1), then SiLU, Linear(., 1), as
    the published students' proj_out_logstds (gmdit_v2.py, gmflux.py).

    It reads the detached conditioning embedding, so s is one scalar per sample. The last layer starts at
    weight 0, bias log 0.05 (s_u = 0.05, as the published students)."""
    layers, d = [], in_dim
    for _ in range(num_layers - 1):
        layers += [nn.SiLU(), nn.Linear(d, inner_dim)]
        d = inner_dim
    mlp = nn.Sequential(*layers, nn.SiLU(), nn.Linear(d, 1))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.constant_(mlp[-1].bias, math.log(0.05))
    return mlp


def add_gm_head(net, dim, K, C, S=1, logweight_channels=None, emb_dim=None, logstd_inner_dim=1024,
                logstd_layers=2, constant_logstd=None):
    """Give `net` the published GM output layers: proj_out_means (dim -> K S C), proj_out_logweights
    (dim -> K logweight_channels; S per token, or 1 shared by the token as in pi-FLUX.2) and proj_out_logstds
    (logstd_mlp on the emb_dim conditioning), or a fixed `constant_logstd`. Call init_gm_head next."""
    net.proj_out_means = nn.Linear(dim, K * S * C)
    net.proj_out_logweights = nn.Linear(dim, K * (S if logweight_channels is None else logweight_channels))
    if constant_logstd is None:
        net.proj_out_logstds = logstd_mlp(emb_dim or dim, logstd_inner_dim, logstd_layers)
    net.constant_logstd = constant_logstd


def gm_logstds(net, emb):
    """log s per sample (B,): the logstd MLP on the *detached* embedding (B, D), or the constant."""
    if getattr(net, "constant_logstd", None) is not None:
        return emb.new_full((emb.shape[0],), float(net.constant_logstd))
    return net.proj_out_logstds(emb.detach()).reshape(-1)


def gm_policy(means, logits, logstds, x_t, sigma):
    """GMPolicy from raw head outputs: means (B, K, C, *sp) in u space, logits (B, K, 1, *sp) (log-softmax over
    K in float32 here), logstds (B,). Network outputs may be bf16; the policy runs in float32, as the published
    pipelines cast it (LakonLab, lakonlab/pipelines/pipeline_piqwen.py)."""
    logstds = logstds.float().reshape(-1, *([1] * (means.dim() - 1)))                # (B, 1, 1, 1, 1)
    return GMPolicy(means.float(), logits.float().log_softmax(1), logstds, x_t, sigma)


@torch.no_grad()
def widen_from_teacher(weight, bias, copies, C, channel_last, noise_std=0.0, generator=None):
    """The teacher's output layer (weight (S C, D), bias (S C)) repeated `copies` times in the token layout
    (S, copies, C) if channel_last else (copies, C, S), plus bias noise N(0, noise_std^2) per (copy, channel)
    shared by the S sub-positions. GM means: copies = K, noise 0.05; DX grid: copies = N, no noise (as the
    published students initialise them from the teacher: gmdit_v2.py, gmflux.py, dxdit.py)."""
    D = weight.shape[1]
    shape = (-1, 1, C) if channel_last else (1, C, -1)                        # where the copies go: dim 1 / 0
    W, b = weight.reshape(*shape, D), bias.reshape(shape)
    noise = torch.randn(copies, C, generator=generator, dtype=torch.float32) * noise_std   # (copies, C)
    if channel_last:
        W, b = W.expand(-1, copies, C, D), b + noise[None].to(b)              # (S, copies, C[, D])
    else:
        W, b = W.expand(copies, C, -1, D), b + noise[:, :, None].to(b)        # (copies, C, S[, D])
    return W.reshape(-1, D).clone(), b.reshape(-1).clone()


@torch.no_grad()
def init_gm_head(net, weight, bias, K, C, channel_last, bias_noise=0.05, generator=None):
    """Initialise net's GM head from the teacher's output layer (§5.1; the published GMDiT-V2 / GM-FLUX init,
    LakonLab lakonlab/models/architecture/gmflow/gmdit_v2.py and gmflux.py): every mean starts as
    the teacher's u prediction (+ bias noise to break the symmetry), weights uniform, s = 0.05. So at step 0
    the policy's velocity at (x_src, sigma_src) equals the teacher's, up to the bias noise."""
    W, b = widen_from_teacher(weight, bias, K, C, channel_last, bias_noise, generator)
    net.proj_out_means.weight.copy_(W)
    net.proj_out_means.bias.copy_(b)
    nn.init.zeros_(net.proj_out_logweights.weight)
    nn.init.zeros_(net.proj_out_logweights.bias)
    if getattr(net, "constant_logstd", None) is None:
        nn.init.zeros_(net.proj_out_logstds[-1].weight)
        nn.init.constant_(net.proj_out_logstds[-1].bias, math.log(0.05))


@torch.no_grad()
def init_dx_head(linear, weight, bias, N, C, channel_last):
    """Initialise a DX head (an nn.Linear dim -> N S C) from the teacher's output layer: N identical copies, so
    at step 0 every grid point is the teacher's x0 (the published DX init, dxflow/dxdit.py). Returns `linear`."""
    W, b = widen_from_teacher(weight, bias, N, C, channel_last)
    linear.weight.copy_(W)
    linear.bias.copy_(b)
    return linear


def dx_grid(cfg):
    """DXPolicy's segment_size and shift for a student trained with `cfg`: the grid spans one full training step
    in raw time, 1 / (NFE - 1 + s) as in nfe_schedule (1/3.5 at 4 NFE, s = 0.5), under the training shift."""
    return {"segment_size": 1.0 / (cfg.nfe - 1 + cfg.final_step_scale), "shift": cfg.shift}
