"""What the flow-map SDE knob h does: teacher alignment against diversity, on the toy images and the 2-D lab.

    python -m labs.sde_h                               # toy + 2-D, h in {0, 0.5, 1, inf}, NFE 1 / 2 / 4 (one core)
    python -m labs.sde_h --cases toy --nfe 4           # the shipped toy student only, 4 NFE (seconds)
    python -m labs.sde_h --json runs/sde_h.json        # also write the rows as JSON

h (piflow.sample, LakonLab's FlowMapSDEScheduler) = 0 is the deterministic sampler; h > 0 rolls each step's
policy only to sigma_dst < sigma_to and re-noises, 'inf' denoises fully and re-noises. Every row samples the same
initial noise; the re-noising draws come from --seed. Metrics (`measure`):
    align    MSE to the teacher's ODE endpoint from the same initial noise (RK4, 256 teacher calls)
    div      diversity: mean pairwise L2 distance between samples of the same class (2-D: of all samples);
             reference rows give the exact data's and the teacher ODE's value
    redraw   mean L2 distance between two runs from the same initial noise with different re-noise seeds
             (0 for a deterministic sampler: how much of the sample h leaves to chance)
    + the case's own: toy mode KL and sliced W2 (against the exact GM), 2-D hit rate (points on the board).

A case is a function in CASES returning a Case (student, teacher, noise, cond, extra metrics, data samples):
another embedded student (e.g. digits) is one more entry. The 2-D teacher and students are trained once and
cached under runs/cache2d/ (lab2d_models; also used by labs.demo).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional

import torch

import piflow
from models import toy
from runtime import common

CACHE2D = os.path.join("runs", "cache2d")
H_VALUES = (0.0, 0.5, 1.0, "inf")


@dataclasses.dataclass
class Case:
    name: str
    students: dict                         # {nfe or None (one student for every NFE): student}
    teacher: Callable                      # teacher(x_t, sigma[, cond]) -> u
    noise: torch.Tensor                    # (B, ...) the initial noise of every row
    cond: Optional[torch.Tensor]           # (B,) class labels or None
    extra: Callable                        # extra(x) -> {metric: value}
    data: torch.Tensor                     # exact data samples with the same labels (the 'data' reference row)
    temperature: object = None


def mean_pairwise(x, cond=None):
    """Mean L2 distance over pairs of distinct samples, within each class of `cond` (averaged over classes)."""
    x = x.flatten(1).double()
    groups = [x] if cond is None else [x[cond == c] for c in cond.unique()]
    vals = []
    for g in groups:
        n = len(g)
        if n > 1:
            vals.append(float(torch.cdist(g, g).sum() / (n * (n - 1))))
    return sum(vals) / len(vals)


def measure(case, nfe, h, seed=0):
    """Metrics of the case's student at `nfe` and `h` (re-noise draws from `seed`; `redraw` against seed + 1)."""
    student = case.students.get(nfe, case.students.get(None))
    run = lambda s: piflow.sample(student, case.noise, case.cond, nfe, temperature=case.temperature, h=h,
                                  generator=torch.Generator().manual_seed(s))
    x = run(seed)
    redraw = float((x - run(seed + 1)).flatten(1).norm(dim=1).mean()) if h != 0 else 0.0
    return dict(align=toy.teacher_alignment(x, case.x_teacher), div=mean_pairwise(x, case.cond), redraw=redraw,
                **case.extra(x))


@torch.no_grad()
def sde_path(student, x, nfe, h=0.0, generator=None):
    """Every substep state of a π-Flow sample at `h`, for drawing: (states (S + 1, B, C), indices of the NFE
    network calls). The steps of piflow.sample one Euler substep at a time (its schedule and sigma_dst, the same
    nodes up to round-off, the same re-noise draws from a CPU `generator`): the re-noising shows as a jump."""
    cfg = student.piid_config
    taus, sigmas = piflow.nfe_schedule(nfe, cfg.shift, cfg.final_step_scale)
    h = piflow.check_h(h)
    m, sigmas_dst = piflow.sde_schedule(sigmas, h)
    taus_dst = taus[1:] if h == 0 else piflow.unwarp_time(sigmas_dst, cfg.shift)
    path, calls = [x], []
    for i in range(nfe):
        calls.append(len(path) - 1)
        policy = student(x, piflow.as_batch(piflow.warp_time(float(taus[i]), cfg.shift), x), None)
        a, b = float(taus[i]), float(taus_dst[i])
        n = int(piflow.rollout_substeps(torch.tensor(a), torch.tensor(b), cfg.total_substeps))
        for j in range(n):
            x = piflow.policy_rollout(policy, x, a - j * (a - b) / n, max(a - (j + 1) * (a - b) / n, b), cfg.shift,
                                      total_substeps=1)
            path.append(x)
        if h != 0 and i < nfe - 1:
            s, mi = float(sigmas[i + 1]), float(m[i])
            x = (1 - s + s * mi) * x + s * math.sqrt(max(1 - mi * mi, 0.0)) * torch.randn(
                x.shape, generator=generator, dtype=x.dtype)
            path.append(x)
    return torch.stack(path), calls


#################################################################################
#                                    Cases                                      #
#################################################################################

def toy_case(ckpt=toy.DEFAULT_CKPT, per_class=40, **_):
    """The shipped toy student (sample.py's default) and its guided teacher network; 40 samples per class."""
    student, st = toy.load_student(ckpt)
    data = toy.ToyData()
    teacher = piflow.guided_teacher(toy.load_teacher(), st.get("guidance", 1.0), torch.tensor([toy.NUM_CLASSES]),
                                    tuple(st.get("guidance_interval", (0.0, 1.0))))
    cond = torch.arange(toy.NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn((len(cond),) + toy.IMG, generator=torch.Generator().manual_seed(1234))
    extra = lambda x: {"mode_kl": toy.mode_kl(data, x, cond), "swd": toy.sliced_wasserstein(data, x, cond)}
    data_x = data.sample(cond, torch.Generator().manual_seed(1))
    return Case("toy", {None: student}, teacher, noise, cond, extra, data_x)


def lab2d_models(nfes=(4,), steps=200, cache=CACHE2D, log=print):
    """The 2-D lab's flow-matching teacher (labs.toy2d.train_teacher) and GM K=8 students distilled from it at each
    NFE in `nfes` (`steps` data-free π-ID steps), trained once and cached as plain tensors under `cache`.
    Returns (teacher, {nfe: student})."""
    from labs import toy2d
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, "teacher.pt")
    teacher = toy2d.MLP2D()
    if os.path.isfile(path):
        teacher.load_state_dict(common.load_tensors(path, "cache")["net"])
    else:
        log("2-D lab: training the teacher (flow matching, once; cached in " + cache + ")")
        teacher = toy2d.train_teacher()
        common.save_torch({"net": teacher.state_dict()}, path)
    teacher = teacher.eval().requires_grad_(False)
    students = {}
    for nfe in nfes:
        path = os.path.join(cache, f"gm_k8_nfe{nfe}_steps{steps}.pt")
        if os.path.isfile(path):
            ck = common.load_tensors(path, "cache")
            cfg = common.from_settings(piflow.PiIDConfig, ck["settings"])
            student = toy2d.PolicyStudent(teacher, "gm", 8, cfg=cfg)
            student.load_state_dict(ck["student"])
            student.piid_config = cfg
        else:
            log(f"2-D lab: distilling a GM K=8 student at {nfe} NFE ({steps} steps, once; cached in {cache})")
            student = toy2d.distill(teacher, os.path.join(cache, f"run_nfe{nfe}"), "gm", nfe=nfe, steps=steps)
            common.save_torch({"student": student.state_dict(),
                               "settings": dataclasses.asdict(student.piid_config)}, path)
        students[nfe] = student.eval().requires_grad_(False)
    return teacher, students


def lab2d_case(nfes=(1, 2, 4), n_points=2000, steps=200, **_):
    """The 2-D checkerboard: the lab's teacher and one GM student per NFE; 2000 points from the lab's noise."""
    from labs import toy2d
    teacher, students = lab2d_models(tuple(nfes), steps)
    noise = torch.randn(n_points, 2, generator=torch.Generator().manual_seed(1234))
    data = toy2d.checkerboard(n_points, torch.Generator().manual_seed(1))
    return Case("2-D", students, teacher, noise, None, lambda x: {"hit": toy2d.hit_rate(x)}, data)


CASES = {"toy": toy_case, "2d": lab2d_case}


#################################################################################
#                                   The table                                   #
#################################################################################

def table(cases=("toy", "2d"), nfes=(1, 2, 4), hs=H_VALUES, seed=0, log=print, **kw):
    """Rows {case, sampler, nfe, h, metrics...}: per case the data and teacher-ODE references, then per NFE the
    teacher's Euler sampler and the student at every h."""
    rows = []
    for name in cases:
        t0 = time.time()
        case = CASES[name](nfes=nfes, **kw)
        case.x_teacher = piflow.teacher_rk4(case.teacher, case.noise, case.cond)
        for label, x in (("data (exact samples)", case.data), ("teacher ODE (RK4, 256 calls)", case.x_teacher)):
            rows.append(dict(case=case.name, sampler=label, nfe=None, h=None, align=toy.teacher_alignment(
                x, case.x_teacher) if label.startswith("teacher") else None, div=mean_pairwise(x, case.cond),
                redraw=0.0, **case.extra(x)))
            log(fmt(rows[-1]))
        for nfe in nfes:
            sigmas = piflow.nfe_schedule(nfe)[1]
            x = piflow.teacher_euler(case.teacher, case.noise, case.cond, sigmas)
            rows.append(dict(case=case.name, sampler="teacher Euler", nfe=nfe, h=None, align=toy.teacher_alignment(
                x, case.x_teacher), div=mean_pairwise(x, case.cond), redraw=0.0, **case.extra(x)))
            log(fmt(rows[-1]))
            for h in hs:
                rows.append(dict(case=case.name, sampler="pi-Flow GM student", nfe=nfe, h=h,
                                 **measure(case, nfe, h, seed)))
                log(fmt(rows[-1]))
        log(f"({case.name}: {time.time() - t0:.0f} s wall, {time.process_time():.0f} s CPU so far)")
    return rows


COLUMNS = ("case", "sampler", "nfe", "h", "align", "div", "redraw", "mode_kl", "swd", "hit")


def fmt(row):
    cell = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) and v != 0 else str(v))
    return "| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |"


def main(argv=None):
    p = argparse.ArgumentParser(description="Flow-map SDE sampling: alignment vs diversity for h (toy + 2-D lab).")
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["toy", "2d"], help="which students "
                   "(default: %(default)s)")
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4], help="NFEs (default: %(default)s)")
    p.add_argument("--h", type=common.parse_h, nargs="+", default=list(H_VALUES), help="h values "
                   "(default: 0 0.5 1 inf)")
    p.add_argument("--seed", type=int, default=0, help="re-noise seed (default: %(default)s)")
    p.add_argument("--steps2d", type=int, default=200, help="π-ID steps of each 2-D student (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    args = p.parse_args(argv)
    common.check(args, [("nfe", min(args.nfe) >= 1, "integers >= 1"), ("steps2d", args.steps2d >= 1, ">= 1"),
                        ("threads", args.threads >= 1, "an integer >= 1")], p)
    with common.user_errors("sde_h.py"):
        if args.json:
            common.check_writable(args.json, "--json")
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
        print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
        rows = table(args.cases, tuple(args.nfe), tuple(args.h), args.seed, steps=args.steps2d)
        if args.json:
            common.save_text(args.json, json.dumps(rows, indent=1))
            print(f"wrote {args.json}")
        return rows


if __name__ == "__main__":
    main(sys.argv[1:])
