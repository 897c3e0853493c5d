"""Distill your own teacher, shown on a 2-D checkerboard: the π-Flow recipe for any velocity network.

    python -m labs.toy2d lab                              # teacher + GM/DX students at 1/2/4 NFE -> assets/toy2d.png
    python -m labs.toy2d distill --teacher labs.toy2d:checkerboard_teacher --nfe 4 --out runs/distill   # any teacher

Any network u = G(x_t, sigma[, cond]) whose velocity comes out of one nn.Linear (width -> C_out), followed by any
reshape, unpatchify, permutation, scale or skip connection, becomes a π-Flow student with
`PolicyStudent(teacher, out="out")`: a copy of the teacher whose output layer gets a GM (or DX) head initialised
from it (§5.1; piflow.add_gm_head / init_gm_head / init_dx_head), fed through a forward hook; the teacher's own
forward places the head's outputs in x's layout. `distill()` trains it with the project's one loop (trainer.train)
on data-free π-ID (Alg. 3); `alignment()` measures it against the teacher's many-step ODE (RK4, 256 teacher calls)
from the same noise, next to the teacher's own Euler sampler at the same NFE.
"""
import argparse
import copy
import importlib
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import piflow
from models import toy
from runtime import common, trainer

ASSET = os.path.join(toy.ASSETS, "toy2d.png")


#################################################################################
#                 The 2-D checkerboard and its flow-matching teacher            #
#################################################################################

def checkerboard(n, generator=None):
    """n points uniform on the 8 dark squares of a 4 x 4 board on [-2, 2]^2 (the GMFlow toy data)."""
    i, r = torch.randint(4, (n,), generator=generator), torch.randint(2, (n,), generator=generator)
    cell = torch.stack([i, 2 * r + i % 2], 1)                             # column i, row j with i + j even
    return cell + torch.rand(n, 2, generator=generator) - 2.0


def hit_rate(x):
    """Fraction of points on a dark square ((i + j) even, cells of [-2, 2]^2)."""
    ij = torch.floor(x + 2.0).long()
    inside = ((ij >= 0) & (ij < 4)).all(1)
    return float((inside & ((ij.sum(1) % 2) == 0)).float().mean())


class MLP2D(nn.Module):
    """Flow-matching teacher u = G_theta(x_t, sigma) on points (B, dim): a residual SiLU MLP; `out` is its
    output layer (width -> dim), the layer a π-Flow student widens."""

    def __init__(self, dim=2, width=128, depth=3):
        super().__init__()
        self.emb = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(dim, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, dim)

    def forward(self, x_t, sigma):
        h = self.inp(x_t) + self.emb(toy.timestep_embedding(piflow.as_batch(sigma, x_t), 64))
        for layer in self.layers:
            h = h + layer(F.silu(h))
        return self.out(F.silu(h))


def train_teacher(steps=3000, batch=1024, lr=2e-3, seed=0):
    """Flow matching (Eq. 2): regress u = eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps, sigma ~ U(0, 1)."""
    torch.manual_seed(seed)
    net, g = MLP2D(), torch.Generator().manual_seed(seed)

    def batch_loss(net):
        x0, eps, sigma = checkerboard(batch, g), torch.randn(batch, 2, generator=g), torch.rand(batch, generator=g)
        return (net(piflow.diffuse(x0, eps, sigma), sigma) - (eps - x0)).pow(2).mean()
    return toy.fit(net, batch_loss, steps, lr).requires_grad_(False)


def checkerboard_teacher():
    """The factory `python -m labs.toy2d distill --teacher labs.toy2d:checkerboard_teacher` calls (trains in ~10 s)."""
    return train_teacher()


#################################################################################
#                Any teacher network -> a π-Flow student (§5.1)                 #
#################################################################################

class PolicyStudent(nn.Module):
    """G_phi(x_t, sigma[, cond]) -> policy: a copy of `teacher` whose output layer (the nn.Linear at attribute
    path `out`, width -> C_out) gets a policy head initialised from it (§5.1), read through a forward hook as
    t2i.T2IStudent does, so the teacher's forward may post-process that layer's output in any affine, element-wise
    way (reshape, unpatchify, permute, scale, a skip connection that adds x).

    The head maps the layer's input h (one row per call of the layer on a token / sample) to K copies of its
    output (GM means, DX grid) and K logits per row. Each copy is placed in x's layout by the teacher's own map
    y -> u: u = s * y[idx] + b(x), with idx and s inferred once per input shape by probing the forward with
    replaced layer outputs, and b(x) = u - s * y[idx] of the actual forward (a skip connection). Where the map is
    not of that form, a ValueError says so: pass layout(y) -> u's layout (a function of the layer's output).
    GM: means = the teacher's layer repeated K times + N(0, bias_noise^2) bias noise, uniform weights, s = 0.05
    (so at step 0 the policy's velocity at (x_src, sigma_src) is the teacher's up to the mean bias noise); the
    log-std MLP reads a sinusoidal embedding of sigma; one GM weight per row, shared by the elements of x it
    produces (all channels of a pixel must come from one row). DX: N identical copies."""

    def __init__(self, teacher, policy="gm", K=8, N=10, cfg=piflow.PiIDConfig(), out="out", bias_noise=0.05,
                 layout=None):
        super().__init__()
        if policy not in ("gm", "dx"):
            raise ValueError(f"policy={policy!r} is not accepted; expected gm or dx")
        self.body = copy.deepcopy(teacher).train().requires_grad_(True)
        try:
            layer = self.body.get_submodule(out)
        except AttributeError:
            layer = None
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"out={out!r} is not an nn.Linear of the teacher; name its output layer")
        layer.requires_grad_(False)             # kept for the teacher's own post-processing; the head replaces it
        W, b = layer.weight.detach(), layer.bias.detach()                     # (C_out, width), (C_out,)
        self.policy, self.K, self.N, self.C, width = policy, K, N, layer.out_features, layer.in_features
        if policy == "gm":
            piflow.add_gm_head(self, width, K, self.C, emb_dim=64, logstd_inner_dim=64)
            piflow.init_gm_head(self, W, b, K, self.C, channel_last=False, bias_noise=bias_noise)
        else:
            self.proj_out = piflow.init_dx_head(nn.Linear(width, N * self.C), W, b, N, self.C, channel_last=False)
        grid = piflow.dx_grid(cfg)
        self.segment_size, self.shift = grid["segment_size"], grid["shift"]
        self.out_name, self.layout, self._maps = out, layout, {}
        self._seen, self._replace = [], None
        layer.register_forward_hook(self._grab)

    def _grab(self, module, args, y):
        self._seen.append((args[0], y))
        return None if self._replace is None else self._replace.reshape(y.shape).to(y.dtype)

    def _run(self, x_t, sigma, cond, replace=None):
        """The body's forward -> (u, h, y) of the one call of the output layer (y replaced by `replace`)."""
        self._seen, self._replace = [], replace
        try:
            u = piflow.call(self.body, x_t, sigma, cond)
        finally:
            self._replace = None
        if len(self._seen) != 1:
            raise ValueError(f"out={self.out_name!r} ran {len(self._seen)} times in one forward of the teacher; "
                             "name the layer that produces the velocity once")
        h, y = self._seen[0]
        self._seen = []
        if u.shape != x_t.shape:
            raise ValueError(f"the teacher returned {tuple(u.shape)} for x_t of shape {tuple(x_t.shape)}")
        return u, h, y

    @torch.no_grad()
    def infer_layout(self, x_t, sigma, cond=None):
        """(idx, s): u = s * y.flatten()[idx] + b(x) for this input shape, found by three probes of the forward
        (y = 0, y = 1, y = 1..n); a ValueError naming what fails otherwise."""
        _, _, y = self._run(x_t, sigma, cond)
        n = y.numel()
        if n >= 2 ** 24:
            raise ValueError(f"out={self.out_name!r}: {n} outputs are too many to map by probing; pass layout=")
        u0 = self._run(x_t, sigma, cond, torch.zeros(n, dtype=torch.float64))[0].double()
        s = self._run(x_t, sigma, cond, torch.ones(n, dtype=torch.float64))[0].double() - u0
        ramp = self._run(x_t, sigma, cond, torch.arange(1, n + 1, dtype=torch.float64))[0].double() - u0
        why = None
        if not bool((s.abs() > 1e-6).all()):
            why = "some elements of u do not depend on it"
        else:
            pos = ramp / s
            idx = pos.round()
            if not bool(((pos - idx).abs() < 1e-3).all() & (idx >= 1).all() & (idx <= n).all()):
                why = "an element of u mixes several of its outputs (not a reshape, permutation, scale or skip)"
        if why is None:
            idx = idx.long() - 1
            check = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            got = self._run(x_t, sigma, cond, check)[0].double() - u0
            if not torch.allclose(got, s * check[idx], rtol=1e-4, atol=1e-5 * float(s.abs().max())):
                why = "its map to u is not linear"
        if why is not None:
            raise ValueError(f"out={self.out_name!r}: cannot infer how the teacher's forward maps that layer's output "
                             f"to x's layout ({why}); pass layout=f with f(y) -> u's layout")
        return idx, s.to(x_t.dtype)

    def _place(self, copies_y, y, u, x_t, sigma, cond):
        """copies (B', R, M, C_out) of the layer output (M per row) -> (B, M, *x_t.shape[1:]) in x's layout, + b(x)."""
        R, M = copies_y.shape[0] * copies_y.shape[1], copies_y.shape[2]
        rows = copies_y.reshape(R, M, self.C)
        if self.layout is not None:                                       # the user's map of the layer output
            placed = torch.stack([self.layout(rows[:, m].reshape(y.shape)) for m in range(M)], 1)
            return placed + (u - self.layout(y))[:, None]
        key = (tuple(x_t.shape), tuple(y.shape))
        if key not in self._maps:
            self._maps[key] = self.infer_layout(x_t, sigma, cond)
        idx, s = self._maps[key]
        flat = rows.transpose(0, 1).reshape(M, -1)                        # (M, R C_out) in y's element order
        placed = (flat[:, idx] * s).movedim(0, 1)                         # (B, M, *x shape)
        return placed + (u - s * y.reshape(-1)[idx])[:, None]

    def forward(self, x_t, sigma, cond=None):
        sigma = piflow.as_batch(sigma, x_t)
        u, h, y = self._run(x_t, sigma, cond)
        h = h.reshape(-1, h.shape[-1])                                    # (R, width): one row per layer call
        if self.policy == "dx":
            grid_y = self.proj_out(h).view(1, -1, self.N, self.C)
            return piflow.DXPolicy(self._place(grid_y, y, u, x_t, sigma, cond), x_t, sigma, self.segment_size,
                                   self.shift)
        means = self._place(self.proj_out_means(h).view(1, -1, self.K, self.C), y, u, x_t, sigma, cond)
        logits = self.proj_out_logweights(h)                              # (R, K)
        row = self._row_of(x_t, sigma, cond, y)                           # (B, *spatial): the row of each pixel
        logits = logits[row].movedim(-1, 1).unsqueeze(2)                  # (B, K, 1, *spatial)
        emb = toy.timestep_embedding(sigma, 64)
        return piflow.gm_policy(means, logits, piflow.gm_logstds(self, emb), x_t, sigma)

    def _row_of(self, x_t, sigma, cond, y):
        """The row of y (layer call) that produces each pixel of x (all its channels, dim 1), (B, *x.shape[2:])."""
        if self.layout is not None:
            rows = self.layout(torch.arange(y.numel(), device=y.device).reshape(y.shape).double()).long() // self.C
        else:
            key = (tuple(x_t.shape), tuple(y.shape))
            if key not in self._maps:
                self._maps[key] = self.infer_layout(x_t, sigma, cond)
            rows = self._maps[key][0] // self.C
        if not bool((rows == rows[:, :1]).all()):
            raise ValueError(f"out={self.out_name!r}: the channels of one pixel of x come from different rows of "
                             "that layer; a GM weight per row cannot be shared by them (use policy='dx')")
        return rows[:, 0]


class Distillation(trainer.Attachment):
    """The trainer attachment for any teacher: data-free π-ID (Alg. 3) needs only noise and, optionally, conditions
    (sample_cond(n, generator) -> cond, e.g. class labels)."""
    autocast = False

    def __init__(self, teacher, student, noise_shape, sample_cond=None):
        self.teacher, self.student, self.noise_shape = teacher, student, tuple(noise_shape)
        if sample_cond is not None:
            self.sample_cond = sample_cond


# Settings to start from for a small teacher of your own (the README explains each): 4 NFE, no shift (a shift
# of 3.2 is for megapixel latents), 128 substeps, 2 states per call, no micro-window for GM (3 substeps for DX),
# no GM dropout, AdamW 1e-3 with cosine decay and Karras EMA; sample without GM temperature unless you tune it.
START = dict(nfe=4, shift=1.0, total_substeps=128, num_intermediate=2, steps=1000, batch_size=256, lr=1e-3,
             warmup=50, ema_start=50, cosine=True)


def distill(teacher, out, policy="gm", K=8, N=10, noise_shape=(2,), teacher_out="out", sample_cond=None,
            name="teacher", layout=None, **settings):
    """Distill `teacher` into a π-Flow student with trainer.train; returns the EMA student (student.piid_config
    holds its schedule, so piflow.sample(student, noise) keeps it). settings: PiIDConfig / TrainConfig fields;
    layout: see PolicyStudent (only where the map of teacher_out's output to x cannot be inferred)."""
    s = dict(START, window_substeps=3 if policy == "dx" else 0, **settings)
    cfg, tc = common.from_settings(piflow.PiIDConfig, s), common.from_settings(trainer.TrainConfig, s)
    meta = trainer.settings_of(cfg, tc, teacher=name, policy=policy, K=K, N=N, teacher_out=teacher_out)
    rc = trainer.RunConfig(out=out, overwrite=True, log_every=0, ckpt_every=0, eval_every=0, progress=False)
    build = lambda device, dtype: Distillation(teacher, PolicyStudent(teacher, policy, K, N, cfg, teacher_out,
                                                                      layout=layout), noise_shape, sample_cond)
    att, ema = trainer.train(build, cfg, tc, meta, rc)
    trainer.load_into(att.trainable(), ema)
    return att.student.eval()


@torch.no_grad()
def alignment(student, teacher, noise, cond=None, nfe=None, temperature=None):
    """{student, teacher_euler}: MSE to the teacher's ODE endpoint (RK4, 64 steps = 256 calls) from `noise`."""
    ref = piflow.teacher_rk4(teacher, noise, cond)
    x, schedule = piflow.sample(student, noise, cond, nfe, temperature=temperature, return_schedule=True)
    x_e = piflow.teacher_euler(teacher, noise, cond, schedule["sigmas"])
    return {"student": toy.teacher_alignment(x, ref), "teacher_euler": toy.teacher_alignment(x_e, ref)}


#################################################################################
#                 The 2-D lab figure: policies at work (Pillow only)            #
#################################################################################

@torch.no_grad()
def policy_path(student, x, nfe):
    """Every substep state of a π-Flow sample: (states (S + 1, B, C), indices of the NFE network calls)."""
    cfg = student.piid_config
    taus, _ = piflow.nfe_schedule(nfe, cfg.shift, cfg.final_step_scale)
    path, calls = [x], []
    for i in range(nfe):
        calls.append(len(path) - 1)
        policy = student(x, piflow.warp_time(float(taus[i]), cfg.shift), None)
        n = int(piflow.rollout_substeps(taus[i], taus[i + 1], cfg.total_substeps))
        for j in range(n):                                    # one substep at a time (same Euler grid)
            a, b = float(taus[i]) - j * float(taus[i] - taus[i + 1]) / n, float(taus[i]) - (j + 1) * float(
                taus[i] - taus[i + 1]) / n
            x = piflow.policy_rollout(policy, x, a, max(b, 0.0), cfg.shift, total_substeps=1)   # 1 step
            path.append(x)
    return torch.stack(path), calls


@torch.no_grad()
def euler_path(teacher, x, steps):
    path = [x]
    for i in range(steps):
        s = 1 - i / steps
        x = x - teacher(x, piflow.as_batch(s, x)) / steps
        path.append(x)
    return torch.stack(path), list(range(steps))


def draw_panel(d, ox, oy, P, pts, title, sub, paths=(), ref_paths=(), font=None, small=None, lim=3.0):
    """One square scatter panel at (ox, oy): dark squares, sample dots, trajectories, title and metric line."""
    to_px = lambda p: (ox + (float(p[0]) + lim) / (2 * lim) * P, oy + (lim - float(p[1])) / (2 * lim) * P)
    for i in range(4):
        for j in range(4):
            if (i + j) % 2 == 0:
                a, b = to_px((i - 2, j - 1)), to_px((i - 1, j - 2))
                d.rectangle([a[0], a[1], b[0], b[1]], fill=(228, 228, 238))
    d.rectangle([ox, oy, ox + P, oy + P], outline=(0, 0, 0))
    for v in (-2, 0, 2):                                       # axis ticks with values
        x, y = to_px((v, v))
        d.line([x, oy + P, x, oy + P + 3], fill=0), d.text((x - 4, oy + P + 3), str(v), fill=0, font=small)
        d.line([ox - 3, y, ox, y], fill=0), d.text((ox - 14, y - 6), str(v), fill=0, font=small)
    for p in pts:
        x, y = to_px(p)
        if ox <= x < ox + P and oy <= y < oy + P:
            d.point((x, y), fill=(20, 40, 120))
    colors = [(220, 40, 40), (20, 150, 60), (230, 140, 0), (150, 40, 200), (0, 150, 200)]
    for path in ref_paths:
        d.line([to_px(p) for p in path], fill=(140, 140, 140), width=1)
    for (path, calls), c in zip(paths, colors):
        d.line([to_px(p) for p in path], fill=c, width=2)
        for k in calls:
            x, y = to_px(path[k])
            d.ellipse([x - 3, y - 3, x + 3, y + 3], outline=(0, 0, 0), fill=c)
        x, y = to_px(path[-1])
        d.rectangle([x - 2, y - 2, x + 2, y + 2], fill=(0, 0, 0))
    d.text((ox, oy - 30), title, fill=0, font=font)
    d.text((ox, oy - 14), sub, fill=(60, 60, 60), font=small)


def lab2d(out_png=ASSET, run_dir="runs/toy2d", steps=500, n_points=2000, log=print):
    """Teacher (flow matching, ~10 s) and GM / DX students at 1, 2, 4 NFE; one labelled PNG and a table."""
    from PIL import Image, ImageDraw, ImageFont
    teacher = train_teacher()
    noise = torch.randn(n_points, 2, generator=torch.Generator().manual_seed(1234))
    ref = piflow.teacher_rk4(teacher, noise)
    rows, table = [], ["| sampler | NFE | align (MSE to teacher ODE) | hit rate |", "|---|---|---|---|"]
    starts = torch.tensor([[-1.6, 1.3], [1.5, 1.5], [1.3, -1.6], [-1.4, -1.0], [0.3, 0.5]])   # the drawn paths
    ref_paths = list(euler_path(teacher, starts, 256)[0].transpose(0, 1))

    def panel(name, nfe, x, path, calls):
        common.check_finite_output(x, f"{name} samples at NFE {nfe}")
        m = (toy.teacher_alignment(x, ref), hit_rate(x))
        table.append(f"| {name} | {nfe} | {m[0]:.4f} | {m[1]:.3f} |")
        log(table[-1])
        return (f"{name}, NFE {nfe}", f"align {m[0]:.4f} | hit {m[1]:.3f}", x,
                [(p, calls) for p in path.transpose(0, 1)])
    rows.append([panel("teacher Euler", n, piflow.teacher_euler(teacher, noise, None, piflow.nfe_schedule(n)[1]),
                       *euler_path(teacher, starts, n))
                 for n in (1, 2, 4, 8)])
    rows[0].append(("teacher ODE (RK4, 256 calls)", f"align 0 | hit {hit_rate(ref):.3f}", ref, []))
    data = checkerboard(n_points, torch.Generator().manual_seed(1))
    rows[0].append(("data (exact samples)", f"hit {hit_rate(data):.3f}", data, []))
    for policy, label in (("gm", "pi-Flow GM K=8"), ("dx", "pi-Flow DX N=10")):
        rows.append([])
        for nfe in (1, 2, 4):
            student = distill(teacher, os.path.join(run_dir, f"{policy}_nfe{nfe}"), policy, nfe=nfe, steps=steps)
            x = piflow.sample(student, noise, None, nfe)
            rows[-1].append(panel(label, nfe, x, *policy_path(student, starts, nfe)))
            if policy == "gm" and nfe == 4:                              # GM temperature (App. B.1), sampling only
                xt = piflow.sample(student, noise, None, nfe, temperature="auto")
                rows[-1].append(panel(label + ", temperature 0.3", nfe, xt, *policy_path(student, starts, nfe)))
    P, gap, top = 210, 46, 40
    W, H = 6 * (P + gap) + gap, len(rows) * (P + gap + 20) + top + 60
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d, font, small = ImageDraw.Draw(img), ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    d.text((gap, 8), "2-D checkerboard: teacher Euler vs pi-Flow students from the SAME noise (2000 points); "
           "students start from the teacher network", fill=0, font=ImageFont.load_default(size=15))
    for r, row in enumerate(rows):
        for c, (title, sub, pts, paths) in enumerate(row):
            draw_panel(d, gap + c * (P + gap), top + 32 + r * (P + gap + 20), P, pts, title, sub, paths,
                       ref_paths if paths else (), font, small)
    notes = ["How to read it. Dots: 2000 samples, the same noises in every panel.",
             "Colored lines: 5 trajectories through every Euler step (teacher) or every",
             "policy substep (student: 128 per unit time, no network call).",
             "Circles: network evaluations (NFE); black squares: endpoints.",
             "Grey lines: the teacher's ODE path from the same 5 noises.",
             "Shaded squares: the data's support. align = MSE to the teacher's ODE",
             "endpoint from the same noise (RK4, 256 calls); hit = fraction of points",
             "on a shaded square. Students: copies of the teacher with the output layer",
             f"widened into a GM (K=8) or DX (N=10) head, {steps} pi-ID steps each.",
             "The temperature panel shows the GM policy sampled with temperature 0.3",
             "(the 'auto' value at 4 NFE), the same weights."]
    for i, s in enumerate(notes):
        d.text((gap + 4 * (P + gap), top + 40 + (P + gap + 20) * 2 + 15 * i), s, fill=(40, 40, 40), font=small)
    common.save_atomic(out_png, lambda tmp: img.save(tmp, format="PNG"))
    return table


def import_function(spec, flag, returns):
    """'module:function' -> the function, with one-line errors naming `flag`."""
    mod, _, fn = spec.partition(":")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError, ValueError) as e:
        raise common.UserError(f"{flag}={spec!r} cannot be imported ({type(e).__name__}: {e}); expected "
                               f"module:function {returns}") from None
    if not callable(f):
        raise common.UserError(f"{flag}={spec!r} is a {type(f).__name__}, not a function; expected module:function "
                               f"{returns}")
    return f


def load_factory(spec):
    """'module:function' -> the teacher the function returns (an nn.Module). Whatever goes wrong in the user's
    factory is one UserError naming --teacher."""
    factory = import_function(spec, "--teacher", "returning the teacher network")
    try:
        teacher = factory()
    except Exception as e:  # noqa: BLE001 - the user's code: any failure is reported in one line
        raise common.UserError(f"--teacher={spec!r} failed: {type(e).__name__}: {common.first_line(e)}") from None
    if not isinstance(teacher, nn.Module):
        raise common.UserError(f"--teacher={spec!r} returned a {type(teacher).__name__}; expected an nn.Module")
    return teacher.eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser(description="Distill your own teacher into a pi-Flow student (2-D lab and recipe).")
    sub = p.add_subparsers(dest="cmd", required=True)
    lab = sub.add_parser("lab", help="2-D checkerboard: teacher, GM and DX students at 1/2/4 NFE, the figure")
    lab.add_argument("--out", default=ASSET, help="figure path (default: %(default)s)")
    lab.add_argument("--steps", type=int, default=500, help="training steps per student (default: %(default)s)")
    dis = sub.add_parser("distill", help="distill any unconditional velocity network u = f(x_t (B, C), sigma)")
    dis.add_argument("--teacher", required=True, help="module:function that returns the teacher network")
    dis.add_argument("--teacher-out", default="out", help="attribute path of its output nn.Linear (default: out)")
    dis.add_argument("--layout", default=None, help="module:function mapping that layer's output to x's layout; "
                     "only where it cannot be inferred (default: inferred from the teacher's forward)")
    dis.add_argument("--policy", choices=("gm", "dx"), default="gm", help="policy head (default: gm)")
    dis.add_argument("--K", type=int, default=8, help="GM components (default: 8)")
    dis.add_argument("--N", type=int, default=10, help="DX grid points (default: 10)")
    dis.add_argument("--nfe", type=int, default=START["nfe"], help="student steps (default: %(default)s)")
    dis.add_argument("--steps", type=int, default=START["steps"], help="training steps (default: %(default)s)")
    dis.add_argument("--lr", type=float, default=START["lr"], help="AdamW learning rate (default: %(default)s)")
    dis.add_argument("--out", default="runs/distill", help="run folder; ckpt.pt holds the student "
                     "(default: %(default)s)")
    args = p.parse_args(argv)
    common.check(args, [("steps", args.steps >= 1, "an integer >= 1")] +
                 ([("nfe", args.nfe >= 1, "an integer >= 1"), ("lr", args.lr > 0, "a value > 0")]
                  if args.cmd == "distill" else []), p)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    with common.user_errors(f"toy2d.py {args.cmd}"):
        if args.cmd == "lab":
            common.check_writable(args.out, "--out")
            print("\n".join(lab2d(args.out, steps=args.steps)))
            print(f"wrote {args.out}")
            return
        common.check_writable(args.out, "--out", is_dir=True)
        teacher = load_factory(args.teacher)
        layout = import_function(args.layout, "--layout", "mapping the layer's output to x's layout") \
            if args.layout else None
        try:
            dim = teacher.get_submodule(args.teacher_out).out_features
        except AttributeError:
            raise common.UserError(f"--teacher-out={args.teacher_out!r} is not a layer of the teacher") from None
        probe = torch.randn(2, dim, generator=torch.Generator().manual_seed(0))   # the layout, before training
        try:
            PolicyStudent(teacher, args.policy, 2, 2, out=args.teacher_out, layout=layout)(probe, torch.ones(2))
        except Exception as e:  # noqa: BLE001 - the user's network: its failure is reported in one line
            raise common.UserError(f"--teacher={args.teacher!r} --teacher-out={args.teacher_out!r}: "
                                   f"{type(e).__name__}: {common.first_line(e)}") from None
        student = distill(teacher, args.out, args.policy, args.K, args.N, (dim,), args.teacher_out,
                          name=args.teacher, layout=layout, nfe=args.nfe, steps=args.steps, lr=args.lr)
        noise = torch.randn(2000, dim, generator=torch.Generator().manual_seed(1234))
        a = alignment(student, teacher, noise)
        print(f"{args.nfe}-NFE alignment (MSE to the teacher's RK4 ODE endpoint, 2000 noises): student "
              f"{a['student']:.5f} | teacher Euler: {a['teacher_euler']:.5f}; student weights: {args.out}/ckpt.pt")
        return a


if __name__ == "__main__":
    main(sys.argv[1:])
