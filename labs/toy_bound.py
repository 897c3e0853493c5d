"""The error bound of §3.3, measured: on-policy imitation (π-ID, DAgger-style) scales as O(n eps), behaviour
cloning as O(n^2 eps) (Ross et al., 2011), with the per-substep imitation error eps and the substeps n set exactly.
(The issue tracker calls this "Theorem 1"; the paper's Theorem 1 is GMFlow's expressiveness, §3.2.)

    python -m labs.toy_bound             # assets/toy_bound.png and the fitted slopes (about a minute on one core)

The learner is the simplest network-free policy: one velocity per substep, v_k (a table with no state input, so
it knows nothing about states it was not trained on: the situation the bound is about). Its imitation error is
set: every fitted v_k is off the teacher's velocity by delta = eps / h in a fixed unit direction d (one per
sample), so each substep of length h adds exactly eps to the state error.
    behaviour cloning   v_k = u(x*_k) + delta d at the teacher's own Euler states x*_k (off-policy, one pass)
    on-policy (π-ID)    v_k = u(x_k) + delta d at the policy's own rollout states x_k; repeated (roll out the
                        detached policy, query the teacher where it went: Alg. 1) until the table stops changing
Errors, averaged over samples, against the teacher's Euler states x*_k on the same grid (the bound compares with
the teacher's own performance): the trajectory cost J = sum_k |x_k - x*_k| (Ross et al.'s per-step cost summed
over the n steps: the quantity of the bound) and the endpoint error |x_n - x*_n| (what a sampler returns).

Two teachers, both built on the toy's exact velocity (toy.ToyTeacher):
  recovering  the bound's assumption: the teacher pulls a state back toward its path by a fraction rho of the
              deviation per substep, u(x, sigma_k) = u*(x*_k, sigma_k) + rho (x - x*_k) / h, n substeps of 1/n.
  toy flow    the exact toy flow on a π-Flow student's last segment at the paper's step h = 1/128: n = 128 / NFE
              substeps from sigma = n h to 0, starting on the teacher's path.
  (table only) the toy flow over the whole interval sigma 1 -> 0 in n substeps of 1/n: more substeps are finer
              steps, the per-substep recovery shrinks like 1/n, and the two regimes get the same slopes.
"""
import argparse
import math
import sys

import torch

from runtime import common
from models import toy

NS = (4, 8, 16, 32, 64, 128)                  # substeps per run
EPSS = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)       # per-substep imitation errors of the eps sweep (at n = 32)


def setup(batch=64, seed=0):
    """Fixed classes, noises x1 and error directions d (unit norm per sample), float64."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.arange(batch) % toy.NUM_CLASSES
    x1 = torch.randn((batch,) + toy.IMG, generator=g, dtype=torch.float64)
    d = torch.randn(x1.shape, generator=g, dtype=torch.float64)
    return cond, x1, d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def imitate(u, x_src, n, h, eps, d, max_passes=None):
    """Behaviour cloning and on-policy tables for teacher velocity u(x, k) on n substeps of length h (sigma
    decreasing). Returns {bc, on}: (J, endpoint error, passes)."""
    delta = eps / h
    path = lambda v: [x_src] + list(x_src - h * torch.stack(v).cumsum(0))   # x_{k+1} = x_k - h v_k
    teacher = [x_src]
    for k in range(n):                                                     # the teacher's own Euler states x*_k
        teacher.append(teacher[-1] - h * u(teacher[-1], k))
    bc = [u(teacher[k], k) + delta * d for k in range(n)]
    on, passes = bc, 0
    for passes in range(1, (max_passes or n + 1) + 1):                     # π-ID: fit where the policy goes
        xs = path(on)
        new = [u(xs[k], k) + delta * d for k in range(n)]
        change = max(float((a - b).abs().max()) for a, b in zip(on, new))
        on = new
        if change < 1e-12:
            break
    dist = lambda a, b: float((a - b).flatten(1).norm(dim=1).mean())
    out = {}
    for name, v in (("bc", bc), ("on", on)):
        xs = path(v)
        out[name] = (sum(dist(a, b) for a, b in zip(xs[1:], teacher[1:])), dist(xs[-1], teacher[-1]), passes)
    return out


def recovering_run(n, eps, rho=0.25, batch=64, seed=0):
    """The bound's setting: the toy flow over sigma 1 -> 0 in n substeps, made to recover at rate rho per step."""
    cond, x1, d = setup(batch, seed)
    exact, h = toy.ToyTeacher(toy.ToyData()), 1.0 / n
    star = [x1]
    for k in range(n):
        star.append(star[-1] - h * exact(star[-1], torch.full((batch,), 1 - k * h, dtype=torch.float64), cond))
    u_star = [(star[k] - star[k + 1]) / h for k in range(n)]
    return imitate(lambda x, k: u_star[k] + rho * (x - star[k]) / h, x1, n, h, eps, d)


def flow_run(n, eps, batch=64, seed=0, steps_per_unit=128):
    """The toy flow on its last n substeps of length 1/128 (sigma = n/128 -> 0), from the teacher's path."""
    cond, x1, d = setup(batch, seed)
    exact, h = toy.ToyTeacher(toy.ToyData()), 1.0 / steps_per_unit
    u = lambda x, j: exact(x, torch.full((batch,), j * h, dtype=torch.float64), cond)   # at sigma = j h
    x = x1
    for j in range(steps_per_unit, n, -1):                                 # the teacher's fine Euler path to n h
        x = x - h * u(x, j)
    return imitate(lambda x_, k: u(x_, n - k), x, n, h, eps, d)


def interval_run(n, eps, batch=64, seed=0):
    """The toy flow over the whole interval sigma 1 -> 0 in n substeps of 1/n (more substeps = finer steps)."""
    cond, x1, d = setup(batch, seed)
    exact, h = toy.ToyTeacher(toy.ToyData()), 1.0 / n
    u = lambda x, k: exact(x, torch.full((batch,), 1 - k * h, dtype=torch.float64), cond)
    return imitate(u, x1, n, h, eps, d)


def slope(xs, ys):
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def measure(ns=NS, epss=EPSS, eps=1e-3, n_eps=32, batch=64, seed=0):
    """Both teachers: errors against n (at eps) and against eps (at n_eps), and the fitted slopes."""
    res = {}
    for name, run in (("recovering", recovering_run), ("toy flow", flow_run), ("toy flow, h = 1/n", interval_run)):
        by_n = [run(n, eps, batch=batch, seed=seed) for n in ns]
        by_e = [run(n_eps, e, batch=batch, seed=seed) for e in epss]
        fit = {f"{q}_{r}_{ax}": slope(xs, [v[r][i] for v in vals]) for q, i in (("J", 0), ("end", 1))
               for r in ("bc", "on") for ax, xs, vals in (("n", ns, by_n), ("eps", epss, by_e))}
        res[name] = dict(by_n=by_n, by_eps=by_e, slopes=fit)
    return res


def plot(res, ns, epss, path):
    """Three labelled log-log panels (Pillow): J and endpoint error vs n for each teacher, and vs eps."""
    from PIL import Image, ImageDraw, ImageFont
    P, gap, top = 300, 70, 60
    img = Image.new("RGB", (3 * (P + gap) + gap, P + top + 150), (255, 255, 255))
    d, font, small = ImageDraw.Draw(img), ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    d.text((gap, 8), "Sec. 3.3 bound, measured: behaviour cloning (red) vs on-policy pi-ID (blue); solid = trajectory "
           "cost J = sum_k |x_k - x*_k|, dashed = endpoint error", fill=0, font=ImageFont.load_default(size=14))
    d.text((gap, 26), "the bound: J <= O(n^2 eps) for behaviour cloning, O(n eps) on-policy (Ross et al. 2011); "
           "numbers in the legends are fitted log-log slopes", fill=(60, 60, 60), font=small)
    panels = [("recovering teacher (rho = 0.25/substep)", "recovering", "n", ns, "by_n"),
              ("toy flow, last segment, step 1/128", "toy flow", "n", ns, "by_n"),
              ("both, n = 32: vs eps", None, "eps", epss, "by_eps")]
    colors = {"bc": (200, 30, 30), "on": (30, 60, 200)}
    for p, (title, teacher, ax, xs, key) in enumerate(panels):
        ox, oy = gap + p * (P + gap), top + 20
        series = [(teacher, r, q) for r in ("bc", "on") for q in (0, 1)] if teacher else \
            [("recovering", "bc", 0), ("recovering", "on", 0), ("toy flow", "on", 0)]   # BC: open loop, same for both
        ys = [v for t, r, q in series for v in (row[r][q] for row in res[t][key])]
        lo_y, hi_y = math.log10(min(ys)) - 0.1, math.log10(max(ys)) + 0.1
        lo_x, hi_x = math.log10(xs[0]), math.log10(xs[-1])
        px = lambda x, y: (ox + (math.log10(x) - lo_x) / (hi_x - lo_x) * P,
                           oy + P - (math.log10(y) - lo_y) / (hi_y - lo_y) * P)
        d.rectangle([ox, oy, ox + P, oy + P], outline=0)
        d.text((ox, oy - 16), title, fill=0, font=font)
        for x in xs:
            d.line([px(x, 10 ** lo_y)[0], oy + P, px(x, 10 ** lo_y)[0], oy + P + 4], fill=0)
            d.text((px(x, 10 ** lo_y)[0] - 8, oy + P + 5), f"{x:g}", fill=0, font=small)
        d.text((ox + P // 2 - 40, oy + P + 20), "substeps n" if ax == "n" else "per-substep error eps", fill=0,
               font=small)
        for e in range(math.ceil(lo_y), math.floor(hi_y) + 1):
            y = px(xs[0], 10 ** e)[1]
            d.line([ox - 4, y, ox, y], fill=0), d.text((ox - 34, y - 6), f"1e{e}", fill=0, font=small)
        for i, (t, r, q) in enumerate(series):
            pts = [px(x, row[r][q]) for x, row in zip(xs, res[t][key])]
            color = colors[r] if t == "recovering" or teacher else tuple(c // 2 + 100 for c in colors[r])
            for a, b in zip(pts, pts[1:]):
                if q == 0:
                    d.line([a, b], fill=color, width=2)
                else:                                            # dashed
                    at = lambda f: (a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f)
                    for s in range(0, 10, 2):
                        d.line([at(s / 10), at((s + 1) / 10)], fill=color, width=2)
            for a in pts:
                d.ellipse([a[0] - 2, a[1] - 2, a[0] + 2, a[1] + 2], fill=color)
            s = res[t]["slopes"][f"{'J' if q == 0 else 'end'}_{r}_{ax}"]
            name = {"bc": "behaviour cloning", "on": "on-policy"}[r]
            which = "" if teacher else " (either teacher)" if r == "bc" else f" ({t})"
            label = f"{'J' if q == 0 else 'endpoint'} {name}{which}: slope {s:.2f}"
            d.text((ox, oy + P + 36 + 14 * i), label, fill=color, font=small)
    common.save_atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure the Sec. 3.3 imitation error bound (O(n eps) vs O(n^2 eps)).")
    p.add_argument("--out", default="assets/toy_bound.png", help="figure path (default: %(default)s)")
    args = p.parse_args(argv)
    with common.user_errors("toy_bound.py"):
        common.check_writable(args.out, "--out")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    res = measure()
    print("| teacher | quantity | behaviour cloning slope in n | on-policy slope in n | slopes in eps (BC, on) |")
    print("|---|---|---|---|---|")
    for t, r in res.items():
        s = r["slopes"]
        for q, name in (("J", "trajectory cost J"), ("end", "endpoint error")):
            print(f"| {t} | {name} | {s[q + '_bc_n']:.2f} | {s[q + '_on_n']:.2f} | {s[q + '_bc_eps']:.2f}, "
                  f"{s[q + '_on_eps']:.2f} |")
    print("| bound (Ross et al.) | J | 2 (O(n^2 eps)) | 1 (O(n eps)) | 1, 1 |")
    plot(res, NS, EPSS, args.out)
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
