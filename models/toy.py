"""Toy ImageNet: an exact class-conditional Gaussian-mixture image dataset, a small teacher *network* trained on
it, students initialised from that teacher as in the paper, metrics, and the trainer attachment.

    python sample.py --nfe 4             # the shipped 4-NFE student (assets/toy_gm_k8_nfe4.pt): seconds on a CPU
    python -m models.toy teacher             # retrain the shipped teacher network (assets/toy_teacher.pt)
    python -m labs.toy_lab --quick      # the claims table: smoke run, about 1 min on 2 cores
    python -m labs.toy_lab               # the claims table, 3 seeds per row (see the README for the wall time)

Data: x0 (1, 8, 8) images. Each of 10 classes is a mixture of 4 prototype images (smooth random patterns in
[-1, 1], fixed by a seed in code) with within-class weights 0.4/0.3/0.2/0.1 and per-pixel noise std 0.1.
So p(x0 | c) is a GM over the whole flattened image and its velocity E[eps - x0 | x_t] is exact (ToyTeacher):
the GM posterior of piflow.GMPolicy.from_x0 with sigma_src = 1. The exact GM is the ground truth of the metrics.

Teacher: ToyNet, a 0.9 M-parameter adaLN MLP regressed onto the exact velocity (the minimiser of the flow
matching loss, Eq. 2), with a null class for CFG. Students are the paper's (§5.1): the teacher
network with its output layer widened into a policy head and initialised from it, then fine-tuned by π-ID.
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import piflow
from models import shortcut
from runtime import common, trainer

NUM_CLASSES, PROTOS_PER_CLASS, IMG = 10, 4, (1, 8, 8)
CLASS_WEIGHTS = (0.4, 0.3, 0.2, 0.1)   # within-class prototype weights (non-uniform, so mode coverage matters)
NOISE_STD = 0.1                         # per-pixel std of each mixture component
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_CKPT = os.path.join(ASSETS, "toy_gm_k8_nfe4.pt")
TEACHER_CKPT = os.path.join(ASSETS, "toy_teacher.pt")


#################################################################################
#               Data: an exact Gaussian mixture over images, its exact ODE      #
#################################################################################

class ToyData:
    """p(x0 | c) = sum_j w_cj N(x0; m_j, NOISE_STD^2 I), J = NUM_CLASSES * PROTOS_PER_CLASS prototypes m_j."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        J, (C, H, W) = NUM_CLASSES * PROTOS_PER_CLASS, IMG
        coarse = torch.randn(J, C, 3, 3, generator=g, dtype=torch.float64)
        smooth = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=True)
        self.protos = torch.tanh(1.5 * smooth)                               # (J, C, H, W) in [-1, 1]
        self.proto_class = torch.arange(J) // PROTOS_PER_CLASS                # (J,)
        w = torch.tensor(CLASS_WEIGHTS, dtype=torch.float64).repeat(NUM_CLASSES)
        cond_w = torch.zeros(NUM_CLASSES + 1, J, dtype=torch.float64)
        cond_w[self.proto_class, torch.arange(J)] = w                         # rows 0..9: p(j | c)
        cond_w[NUM_CLASSES] = w / NUM_CLASSES                                 # row 10 (null class): p(j)
        self.weights = cond_w                                                 # (NUM_CLASSES + 1, J)
        self.var = NOISE_STD ** 2

    def sample(self, cond, generator=None):
        """Exact samples x0 ~ p(x0 | cond); cond (B,) LongTensor (NUM_CLASSES = unconditional)."""
        j = torch.multinomial(self.weights[cond.cpu()], 1, generator=generator).squeeze(1)     # (B,)
        eps = torch.randn((len(cond),) + IMG, generator=generator, dtype=torch.float64)
        return (self.protos[j] + NOISE_STD * eps).float().to(cond.device)

    def nearest_proto(self, x):
        """Index of the nearest prototype (L2) of each image x (B, C, H, W)."""
        return torch.cdist(x.flatten(1).double().cpu(), self.protos.flatten(1)).argmin(1)


class ToyTeacher:
    """Exact flow-matching velocity u(x_t, sigma | c) = E[eps - x0 | x_t, c] of the toy GM (Eq. 1).

    Built on piflow.GMPolicy.from_x0 with sigma_src = 1 (so x_src drops out of the posterior): the flattened
    image is a single D-channel pixel, means (B, J, D), logweights (B, J, 1), shared variance NOISE_STD^2.
    It is the regression target of the teacher network and the ground truth of the metrics.
    """

    def __init__(self, data):
        self.data = data

    def __call__(self, x_t, sigma, cond):
        B, dtype = x_t.shape[0], torch.promote_types(x_t.dtype, torch.float32)
        x = x_t.flatten(1).to(dtype)                                          # (B, D)
        means = self.data.protos.flatten(1).to(x.device, dtype).expand(B, -1, -1)   # (B, J, D)
        logw = self.data.weights.to(x.device, dtype)[cond].log().unsqueeze(2)       # (B, J, 1), -inf off-class
        pi = piflow.GMPolicy.from_x0(means, logw, self.data.var, x, 1.0, eps=1e-8)
        return pi.velocity(x, sigma).view_as(x_t).to(x_t.dtype)


class TeacherPolicy:
    """The teacher as a policy object, so piflow.policy_rollout integrates its ODE (fine Euler)."""

    def __init__(self, teacher, cond, x_src, sigma_src):
        self.teacher, self.cond, self.x_src, self.sigma_src = teacher, cond, x_src, sigma_src

    def velocity(self, x_t, sigma_t):
        return self.teacher(x_t, piflow.as_batch(sigma_t, x_t), self.cond)

    def detach(self):
        return self


def teacher_ode(teacher, noise, cond, rtol=1e-7, atol=1e-8, sigma_end=1e-5):
    """Exact ODE endpoint dx/dsigma = u(x, sigma), sigma 1 -> 0, by scipy DOP853 in float64 (the exact teacher)."""
    from scipy.integrate import solve_ivp
    shape, cond = noise.shape, cond.cpu()

    def rhs(s, y):
        x = torch.from_numpy(y).view(shape)
        return teacher(x, torch.full((shape[0],), s, dtype=torch.float64), cond).flatten().numpy()
    sol = solve_ivp(rhs, (1.0, sigma_end), noise.double().cpu().flatten().numpy(), method="DOP853",
                    rtol=rtol, atol=atol)
    x = torch.from_numpy(sol.y[:, -1]).view(shape)
    x0 = x - sigma_end * teacher(x, torch.full((shape[0],), sigma_end, dtype=torch.float64), cond)
    return x0.float().to(noise.device)


#################################################################################
#          The teacher network, and students built from it (§5.1)            #
#################################################################################

def timestep_embedding(sigma, dim, dtype=torch.float32):
    """Sinusoidal embedding of 1000 * sigma (DiT-style), computed in `dtype` (float64 for a float64 ODE)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device, dtype=dtype) / half)
    a = 1000 * sigma.to(dtype)[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], 1)


class Block(nn.Module):
    """Residual MLP block with adaLN-zero conditioning."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight), nn.init.zeros_(self.ada[1].bias)   # block starts as identity

    def forward(self, h, emb):
        shift, scale, gate = self.ada(emb).chunk(3, 1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class ToyNet(nn.Module):
    """G(x_t, sigma, c): a class-conditional adaLN MLP on the flattened image (+ a null class for CFG).

    As the teacher G_theta it outputs the velocity u through `proj_out` (width -> D). A student G_phi is the same
    network whose `proj_out` is widened into a policy head (ToyStudent)."""

    def __init__(self, width=192, depth=3, img=IMG, num_classes=NUM_CLASSES):
        super().__init__()
        self.img, D = tuple(img), math.prod(img)
        self.t_emb = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.c_emb = nn.Embedding(num_classes + 1, width)
        self.inp = nn.Linear(D, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        nn.init.zeros_(self.ada[1].weight), nn.init.zeros_(self.ada[1].bias)
        self.proj_out = nn.Linear(width, D)

    def features(self, x_t, sigma, cond):
        """The last hidden state h (B, width) and the conditioning embedding emb (B, width)."""
        dtype = self.inp.weight.dtype
        emb = self.t_emb(timestep_embedding(piflow.as_batch(sigma, x_t), 64, dtype)) + self.c_emb(cond)
        h = self.inp(x_t.flatten(1).to(dtype))
        for blk in self.blocks:
            h = blk(h, emb)
        shift, scale = self.ada(emb).chunk(2, 1)
        return self.norm(h) * (1 + scale) + shift, emb

    def forward(self, x_t, sigma, cond):
        return self.proj_out(self.features(x_t, sigma, cond)[0]).view_as(x_t).to(x_t.dtype)


# The shipped teacher's recipe (python -m models.toy teacher): regression onto the exact velocity at x_t from forward
# diffusion of exact data, sigma ~ U(0, 1] with 20 % of draws cubed (more weight near the data), 1 in 11 labels
# the null class (its data: a random class). CPU: 137 s on one thread.
TEACHER_RECIPE = dict(width=192, depth=3, steps=4000, batch=256, lr=2e-3, seed=0)


def fit(net, batch_loss, steps, lr, log=None):
    """The teachers' training loop (toy and 2-D): AdamW, betas (0.9, 0.95), cosine LR to 0; batch_loss(net) -> loss."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
        loss = batch_loss(net)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step + 1) % 500 == 0:
            log(f"teacher step {step + 1}/{steps}: loss {loss.item():.5f}")
    return net.eval()


def train_teacher(width=192, depth=3, steps=4000, batch=256, lr=2e-3, seed=0, log=print):
    """Fit ToyNet to the exact velocity (the minimiser of the flow matching loss, Eq. 2) by AdamW with cosine LR."""
    data = ToyData()
    exact = ToyTeacher(data)
    torch.manual_seed(seed)
    net = ToyNet(width, depth)
    g = torch.Generator().manual_seed(seed)

    def batch_loss(net):
        cond = torch.randint(NUM_CLASSES + 1, (batch,), generator=g)
        label = torch.where(cond == NUM_CLASSES, torch.randint(NUM_CLASSES, (batch,), generator=g), cond)
        x0 = data.sample(label, g)                                       # null class: data of a random class
        sigma = torch.rand(batch, generator=g)
        sigma = torch.where(torch.rand(batch, generator=g) < 0.2, sigma ** 3, sigma).clamp(min=1e-3)
        x_t = piflow.diffuse(x0, torch.randn(x0.shape, generator=g), sigma)
        return (net(x_t, sigma, cond) - exact(x_t, sigma, cond)).pow(2).mean()
    return fit(net, batch_loss, steps, lr, log)


def load_teacher(path=TEACHER_CKPT):
    """The teacher network from {'net': fp16 state dict, 'recipe': {...}} (weights_only), frozen, in float32."""
    ck = common.load_tensors(path, "teacher")
    try:
        net = ToyNet(ck["recipe"]["width"], ck["recipe"]["depth"])
        net.load_state_dict({k: v.float() for k, v in ck["net"].items()})
        common.check_finite(ck["net"], f"teacher={path!r}")
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise common.UserError(f"teacher={path!r} is not a toy teacher network ({common.first_line(e)})") from None
    return net.eval().requires_grad_(False)


@dataclass(frozen=True)
class Options:
    policy: str = "gm"        # student policy: gm (GMFlow), dx (DX grid) or shortcut (the regression baseline)
    K: int = 8                # Gaussians per pixel of the GM policy
    N: int = 10               # grid points of the DX policy
    width: int = 192          # student hidden width (the teacher's, 192, to start from the teacher)
    depth: int = 3            # student residual blocks (the teacher's, 3, to start from the teacher)
    init: str = "auto"        # teacher (copy the teacher, paper), scratch (random) or auto (teacher if width/depth fit)

    def __post_init__(self):
        piflow.check_fields(self, [("policy", self.policy in ("gm", "dx", "shortcut"), "gm, dx or shortcut"),
                                   ("K", self.K >= 1, ">= 1"), ("N", self.N >= 1, ">= 1"),
                                   ("width", self.width >= 2, ">= 2"), ("depth", self.depth >= 0, ">= 0"),
                                   ("init", self.init in ("auto", "teacher", "scratch"), "auto, teacher or scratch")])


class ToyStudent(ToyNet):
    """G_phi(x_t, sigma, c) -> policy: the teacher network with its output layer widened into a policy head.

    With `teacher` (a ToyNet of the same width/depth) every weight starts as the teacher's and the head from its
    output layer (§5.1; piflow section 8): GM means = proj_out repeated K times + N(0, 0.05^2) bias noise, uniform weights,
    s = 0.05, so at step 0 the policy's velocity at (x_src, sigma_src) is the teacher's up to the bias noise;
    DX: N identical copies (the policy velocity at x_src is exactly the teacher's); shortcut: proj_out itself.
    Without a teacher: random body, zero head weights (GM bias noise 0.1), as the published code without one.
    GM head: a K-GM per pixel (C = 1 channel: the one-channel toy's pixel-wise factorisation, §C.1), means
    (B, K, 1, 8, 8), logweights (B, K, 1, 8, 8); logstds from the detached embedding (piflow.add_gm_head).
    """

    def __init__(self, opts=Options(), cfg=piflow.PiIDConfig(), teacher=None, img=IMG):
        super().__init__(opts.width, opts.depth, img)
        self.opts, (_, H, W), D = opts, self.img, math.prod(self.img)
        if teacher is not None:
            self.load_state_dict(teacher.state_dict())
        else:
            nn.init.zeros_(self.proj_out.weight), nn.init.zeros_(self.proj_out.bias)
        Wt, bt = self.proj_out.weight.detach().clone(), self.proj_out.bias.detach().clone()   # (D, width), (D,)
        if opts.policy == "gm":
            del self.proj_out
            piflow.add_gm_head(self, opts.width, opts.K, C=D, logweight_channels=H * W, logstd_inner_dim=opts.width)
            piflow.init_gm_head(self, Wt, bt, opts.K, D, channel_last=False,
                                bias_noise=0.05 if teacher is not None else 0.1)
        elif opts.policy == "dx":
            self.proj_out = piflow.init_dx_head(nn.Linear(opts.width, opts.N * D), Wt, bt, opts.N, D, False)
        grid = piflow.dx_grid(cfg)                                            # DX grid span: one training step
        self.segment_size, self.shift = grid["segment_size"], grid["shift"]

    def forward(self, x_t, sigma, cond):
        B, (C, H, W) = x_t.shape[0], self.img
        sigma = piflow.as_batch(sigma, x_t)
        h, emb = self.features(x_t, sigma, cond)                                      # (B, width) each
        if self.opts.policy == "gm":
            K = self.opts.K
            return piflow.gm_policy(self.proj_out_means(h).view(B, K, C, H, W),       # (B, K, C, H, W)
                                    self.proj_out_logweights(h).view(B, K, 1, H, W),
                                    piflow.gm_logstds(self, emb), x_t, sigma)
        if self.opts.policy == "dx":
            grid_u = self.proj_out(h).view(B, self.opts.N, C, H, W)
            return piflow.DXPolicy(grid_u, x_t, sigma, self.segment_size, self.shift)
        return shortcut.ShortcutPolicy(self.proj_out(h).view(B, C, H, W).float(), x_t, sigma)



#################################################################################
#                                   Metrics                                     #
#################################################################################

def teacher_alignment(x, x_teacher):
    """Teacher alignment: MSE (per pixel) between samples and the teacher's ODE endpoints from the same noise."""
    return float((x.float() - x_teacher.float()).pow(2).mean())


def mode_kl(data, x, cond):
    """Mode coverage: KL(p_true || q) between the true mixture weights over prototypes (pooled over the labels
    in `cond`) and the histogram q of the samples' nearest prototypes (add-0.5 smoothed). 0 = perfect coverage."""
    J = data.protos.shape[0]
    p = data.weights[cond.cpu()].mean(0)                                   # (J,)
    counts = torch.bincount(data.nearest_proto(x), minlength=J).double()
    q = (counts + 0.5) / (counts.sum() + 0.5 * J)
    m = p > 0
    return float((p[m] * (p[m] / q[m]).log()).sum())


def sliced_wasserstein(data, x, cond, generator_seed=0, num_proj=128):
    """Distribution distance: sliced Wasserstein-2 distance between samples x and exact data samples drawn with
    the same labels (128 fixed random unit projections; pooled over the batch). Finite-sample floor: the exact
    ODE samples score about the same as a second independent data draw."""
    g = torch.Generator().manual_seed(generator_seed)
    ref = data.sample(cond.cpu(), g).double().flatten(1)
    x = x.double().cpu().flatten(1)
    proj = torch.randn(x.shape[1], num_proj, generator=g, dtype=torch.float64)
    proj = proj / proj.norm(dim=0, keepdim=True)
    a, b = (x @ proj).sort(0).values, (ref @ proj).sort(0).values
    return float((a - b).pow(2).mean().sqrt())


class Evaluator:
    """Fixed evaluation batch (class-balanced labels, fixed noise) with the teacher's cached ODE endpoints
    (piflow.teacher_rk4; the exact GM ODE for the exact teacher). Mode KL and SWD compare with the exact data."""

    def __init__(self, data, teacher, per_class=40, seed=1234, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.data, self.teacher = data, teacher
        self.cond = torch.arange(NUM_CLASSES).repeat_interleave(per_class).to(device)
        self.noise = torch.randn((len(self.cond),) + IMG, generator=g).to(device)
        ode = teacher_ode if isinstance(teacher, ToyTeacher) else piflow.teacher_rk4
        self.x_teacher = ode(teacher, self.noise, self.cond)

    def metrics(self, x):
        return {"align": teacher_alignment(x, self.x_teacher), "mode_kl": mode_kl(self.data, x, self.cond),
                "swd": sliced_wasserstein(self.data, x, self.cond)}

    @torch.no_grad()
    def student(self, student, nfe=None, temperature=None, total_substeps=None):
        """Metrics of a student's samples (its training schedule: student.piid_config)."""
        return self.metrics(piflow.sample(student, self.noise, self.cond, nfe, temperature=temperature,
                                          total_substeps=total_substeps))


#################################################################################
#                     The toy attachment (trainer.py) and sampling              #
#################################################################################

class ToyAttachment(trainer.Attachment):
    """The trainer attachment: the teacher network (CFG through the null class) and a student built from it."""
    autocast, noise_shape, num_classes = False, IMG, NUM_CLASSES

    def __init__(self, opts, cfg, tc, settings, device):
        self.data, self.opts, self.cfg, self.settings, self.device = ToyData(), opts, cfg, settings, device
        net = load_teacher()
        fits = (opts.width, opts.depth) == (net.proj_out.in_features, len(net.blocks))
        if opts.init == "teacher" and not fits:
            raise common.UserError(f"--init=teacher needs the teacher's --width {net.proj_out.in_features} --depth "
                                   f"{len(net.blocks)} (given {opts.width}, {opts.depth}); or pass --init scratch")
        self.init_from_teacher = opts.init == "teacher" or (opts.init == "auto" and fits)
        self.student = ToyStudent(opts, cfg, net if self.init_from_teacher else None).to(device)
        self.teacher_net = net.to(device)
        null = torch.tensor([NUM_CLASSES], device=device)
        self.teacher = piflow.guided_teacher(self.teacher_net, tc.guidance, null, tuple(tc.guidance_interval))
        if opts.policy == "shortcut":
            self.loss = self.shortcut_loss
        self._evaluator = None

    def sample_data(self, n, g):
        cond = self.sample_cond(n, g)
        cpu = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=g, device=g.device)))
        return self.data.sample(cond.cpu(), cpu).to(self.device), cond

    def shortcut_loss(self, step, g, n, backward):
        """Baseline (Fig. 2b): regress each NFE-step jump of the teacher ODE (fine Euler) directly."""
        cfg, cond = self.cfg, self.sample_cond(n, g)
        taus, sigmas = piflow.nfe_schedule(cfg.nfe, cfg.shift, cfg.final_step_scale)
        jump = lambda x, i: piflow.policy_rollout(TeacherPolicy(self.teacher, cond, x, float(sigmas[i])), x,
                                                  float(taus[i]), float(taus[i + 1]), cfg.shift, cfg.total_substeps)
        return shortcut.shortcut_loss(self.student, torch.randn((n,) + IMG, generator=g, device=g.device), cond, cfg,
                                    jump, backward)

    def evaluate(self, student):
        if self._evaluator is None:
            self._evaluator = Evaluator(self.data, self.teacher, device=self.device)
        return self._evaluator.student(student)

    def export(self, path, ema):
        """The slim sampling checkpoint: fp16 EMA weights + the run's settings (what sample.py reads)."""
        tensors = {k: v.half() for k, v in ema.items()}
        common.check_finite(tensors, f"--export={path!r} (fp16)")
        common.save_torch({"ema": tensors, "settings": self.settings}, path)


def attach(opts, cfg, tc, settings, device, dtype=None):
    """train_imagenet.py --teacher toy."""
    return ToyAttachment(opts, cfg, tc, settings, device)


def load_student(path):
    """A toy student from a training checkpoint (ckpt.pt) or an export: (student with its EMA weights, settings).
    Read with weights_only=True; non-finite weights are refused."""
    ck = common.load_tensors(path, "--ckpt")
    if not (isinstance(ck, dict) and isinstance(ck.get("ema"), dict) and isinstance(ck.get("settings"), dict)):
        raise common.UserError(f"--ckpt={path!r} is not a piflow toy checkpoint (no 'ema' and 'settings')")
    st = ck["settings"]
    try:
        common.check_finite(ck["ema"], f"--ckpt={path!r}")
        opts, cfg = common.from_settings(Options, st), common.from_settings(piflow.PiIDConfig, st)
        student = ToyStudent(opts, cfg)
        student.load_state_dict({k: v.float() for k, v in ck["ema"].items()})
    except (KeyError, ValueError, RuntimeError) as e:
        raise common.UserError(f"--ckpt={path!r} cannot be used: {common.first_line(e)}") from None
    student.piid_config = cfg
    return student.eval(), st


def to_uint8(x, scale=4):
    """(B, C, H, W) in [-1, 1] -> list of (H*scale, W*scale[, 3]) uint8 arrays."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    return [t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy() for t in x]


def add_sample_flags(p, model="toy"):
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="student checkpoint: an export or a run's ckpt.pt "
                   "(default: the shipped toy student)")
    p.add_argument("--class-labels", type=int, nargs="+", default=list(range(NUM_CLASSES)), help="grid rows: class "
                   f"ids in [0, {NUM_CLASSES}) (default: all)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class in the grid (default: %(default)s)")
    p.add_argument("--reference", choices=("ode", "euler"), default="ode", help="right half of the grid, from the "
                   "same noise: the teacher's ODE (RK4, 256 calls) or its own Euler sampler at the student's NFE "
                   "(default: %(default)s)")


def sample_grid(args):
    """`sample.py --model toy`: per class (--class-labels), student samples | the teacher's ODE (or, with
    --reference euler, its Euler sampler at the student's NFE) from the same noise; metrics."""
    if args.per_class < 1:
        raise common.UserError(f"--per-class={args.per_class} is not accepted; expected an integer >= 1")
    labels = getattr(args, "class_labels", list(range(NUM_CLASSES)))
    if not all(0 <= c < NUM_CLASSES for c in labels):
        raise common.UserError(f"--class-labels={labels} is not accepted; expected ids in [0, {NUM_CLASSES})")
    n = len(labels) * args.per_class                          # noise, student, teacher ODE, teacher Euler: float32
    common.check_memory(4 * n * math.prod(IMG) * 4, "--per-class", args.per_class, f"the {n} samples")
    student, st = load_student(args.ckpt)
    cfg = student.piid_config
    print(f"student: {args.ckpt} ({st['policy']}, K={st['K']}, N={st['N']}, trained at NFE {cfg.nfe}, shift "
          f"{cfg.shift}, final step scale {cfg.final_step_scale}, {cfg.total_substeps} substeps)")
    data = ToyData()
    teacher = piflow.guided_teacher(load_teacher(), st.get("guidance", 1.0), torch.tensor([NUM_CLASSES]),
                                    tuple(st.get("guidance_interval", (0.0, 1.0))))
    g = torch.Generator().manual_seed(args.seed)
    cond = torch.tensor(labels).repeat_interleave(args.per_class)                    # (B,)
    noise = torch.randn((len(cond),) + IMG, generator=g)
    x, schedule = piflow.sample(student, noise, cond, args.nfe, temperature=args.temperature, return_schedule=True,
                                h=args.h, generator=g, progress=common.PROGRESS_DELAY)
    nfe = schedule["nfe"]
    common.check_finite_output(x, "the student's samples", f"--ckpt={args.ckpt!r}, --temperature={args.temperature}")
    print("sigma schedule: " + ", ".join(f"{s:.4f}" for s in schedule["sigmas"].tolist()))
    x_teacher = piflow.teacher_rk4(teacher, noise, cond)
    x_euler = piflow.teacher_euler(teacher, noise, cond, schedule["sigmas"], progress=common.PROGRESS_DELAY)
    metrics = {}
    for name, xs in (("student", x), ("teacher Euler", x_euler), ("teacher ODE", x_teacher)):
        m = {"align": teacher_alignment(xs, x_teacher), "mode_kl": mode_kl(data, xs, cond),
             "swd": sliced_wasserstein(data, xs, cond)}
        print(f"{name:14s} NFE {nfe if name != 'teacher ODE' else '256'}: teacher alignment MSE "
              f"{m['align']:.5f} | mode KL {m['mode_kl']:.4f} | sliced W2 {m['swd']:.4f}")
        metrics[name] = m
    euler = getattr(args, "reference", "ode") == "euler"
    k, tiles_s, tiles_t = args.per_class, to_uint8(x), to_uint8(x_euler if euler else x_teacher)
    rows = [tiles_s[r * k:(r + 1) * k] + [None] + tiles_t[r * k:(r + 1) * k] for r in range(len(labels))]
    right = f"teacher Euler, {nfe} steps" if euler else "teacher ODE (RK4, 256 calls)"
    cols = [f"LEFT: pi-Flow student, NFE {nfe}" + (f", h {args.h}" if args.h else "")] + [None] * k + \
        [f"RIGHT: {right}, same noise"]
    title = (f"toy ImageNet, seed {args.seed}: teacher-alignment MSE student {metrics['student']['align']:.4f} vs "
             f"teacher Euler {nfe} steps {metrics['teacher Euler']['align']:.4f}")
    return dict(rows=rows, row_labels=[f"class {c}" for c in labels], col_labels=cols, title=title,
                nfe=nfe, metrics=metrics["student"], all_metrics=metrics)


def main(argv=None):
    p = argparse.ArgumentParser(description="Toy ImageNet for pi-Flow (CPU): train the teacher network (the lab is "
                                "toy_lab.py).")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher", help="train the teacher network on the exact velocity (the shipped recipe)")
    t.add_argument("--out", default=TEACHER_CKPT, help="output file (default: %(default)s)")
    t.add_argument("--steps", type=int, default=TEACHER_RECIPE["steps"], help="training steps (default: %(default)s)")
    args = p.parse_args(argv)
    if args.cmd == "teacher":
        common.check(args, [("steps", args.steps >= 1, "an integer >= 1")], p)
        with common.user_errors("toy.py teacher"):
            common.check_writable(args.out, "--out")
            torch.set_num_threads(1)
            torch.set_flush_denormal(True)
            recipe = dict(TEACHER_RECIPE, steps=args.steps)
            net = train_teacher(**recipe)
            sd = {k: v.half() for k, v in net.state_dict().items()}
            try:
                common.check_finite(sd, "teacher (fp16)")
            except common.NonFinite as e:
                raise common.UserError(f"{e}; nothing written to --out={args.out!r}") from None
            common.save_torch({"net": sd, "recipe": recipe}, args.out)
            print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
