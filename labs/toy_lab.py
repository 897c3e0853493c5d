"""The toy lab: the paper's ablations on toy ImageNet (toy.py), every student initialised from the teacher network
as in the paper, all rows at one equal budget, several seeds per row, and a verdict per claim.

    python -m labs.toy_lab --quick  # smoke run: NFE 1 and 4, fewer rows and steps (numbers mean little)
    python -m labs.toy_lab          # the claims table: runs/lab/table.md, table.json (per-seed values), table.png

A claim "A is better than B" counts as reproduced only when every seed of A beats every seed of B (the seed
ranges do not overlap); the opposite is "contradicted"; overlapping ranges are "inconclusive at this budget".
Every row of a seed shares that seed's initialisation noise and batches, so rows are compared on equal terms,
and the table does not depend on --jobs. It is bit-identical from run to run on one machine only: another
CPU (or thread count) changes float summation order, and training amplifies that into seed-sized noise.
"""
import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import time

import torch

import piflow
from models import toy
from runtime import common, trainer

# One budget for every row: steps, batch, AdamW lr (cosine to 0), rollout substeps per unit time (4x fewer than
# published), and the evaluation batch (samples per class). Teacher-initialised students start at the teacher's
# Euler sampler, so a few hundred steps show each ablation's direction.
LAB = dict(steps=400, batch=32, lr=3e-5, substeps=32, per_class=40, seeds=3)
QUICK = dict(steps=60, batch=32, lr=3e-5, substeps=32, per_class=20, seeds=2)


def lab_rows(quick, steps=LAB["steps"]):
    """(group, label, fields, nfe list, {nfe: sampling-only variants {label: sample kwargs}}) of every trained row."""
    gm8, gm32 = dict(policy="gm", K=8), dict(policy="gm", K=32)
    dx = lambda n: dict(policy="dx", N=n)
    nfes = [1, 4] if quick else [1, 2, 4]
    bc = dict(decay_iters=10 ** 9)                           # teacher ratio stays ~1: behaviour cloning
    mix = dict(decay_iters=max(steps // 2, 1))              # App. B.2: ratio 1 -> 0 over the first half
    temp = {"GM K=8, GM temperature auto (sampling only)": dict(temperature="auto")}
    rows = [("1 policy", "GM K=8", gm8, nfes, {4: temp}), ("1 policy", "GM K=32", gm32, nfes, {}),
            ("1 policy", "DX N=10", dx(10), nfes, {}), ("1 policy", "DX N=20", dx(20), nfes, {}),
            ("1 policy", "DX N=40", dx(40), nfes, {}),
            ("2 dropout", "GM K=8, dropout 0.05", dict(gm8, gm_dropout=0.05), [1, 4], {}),
            ("3 on-policy", "GM K=8, behaviour cloning", dict(gm8, **bc), [1, 4], {}),
            ("3 on-policy", "DX N=10, behaviour cloning", dict(dx(10), **bc), [4], {}),
            ("3 on-policy", "GM K=8, trajectory mixing", dict(gm8, **mix), [1, 4], {}),
            ("4 window", "DX N=10, micro-window 3", dict(dx(10), window_substeps=3), [1, 4], {}),
            ("5 data", "GM K=8, data-dependent", dict(gm8, data_dependent=True), [4], {}),
            ("6 init", "GM K=8 from scratch (random init)", dict(gm8, init="scratch"), [1, 4], {}),
            ("8 baselines", "shortcut student (from the teacher)", dict(policy="shortcut"), nfes, {})]
    if quick:
        keep = ("GM K=8", "DX N=10", "GM K=8, behaviour cloning", "shortcut student (from the teacher)")
        rows = [r for r in rows if r[1] in keep]
    return rows


EULER = "teacher Euler (no training)"
TEMP = "GM K=8, GM temperature auto (sampling only)"
SCRATCH = "GM K=8 from scratch (random init)"
# (claim, paper reference, better row, worse row, NFEs); kind "better": A beats B; "same": A and B agree
CLAIMS = [("GM policy beats DX N=10", "Tables 1, 5", "GM K=8", "DX N=10", (1, 2, 4), "better"),
          ("GM policy beats DX N=20", "Table 1", "GM K=8", "DX N=20", (1, 2, 4), "better"),
          ("GM policy beats DX N=40", "Table 1", "GM K=8", "DX N=40", (1, 2, 4), "better"),
          ("GM is insensitive to K (8 vs 32)", "Table 1", "GM K=8", "GM K=32", (1, 2, 4), "same"),
          ("GM dropout 0.05 helps", "Table 1", "GM K=8, dropout 0.05", "GM K=8", (1, 4), "better"),
          ("on-policy pi-ID beats behaviour cloning (GM)", "§3.3", "GM K=8", "GM K=8, behaviour cloning", (1, 4),
           "better"),
          ("on-policy pi-ID beats behaviour cloning (DX)", "§3.3", "DX N=10", "DX N=10, behaviour cloning", (4,),
           "better"),
          ("micro-window helps DX", "App. B.3", "DX N=10, micro-window 3", "DX N=10", (1, 4), "better"),
          ("data-dependent and data-free agree", "Tables 3-4", "GM K=8, data-dependent", "GM K=8", (4,), "same"),
          ("teacher initialisation beats random initialisation", "§5.2", "GM K=8", SCRATCH, (1, 4), "better"),
          ("GM temperature improves teacher alignment", "Table 7", TEMP, "GM K=8", (4,), "better"),
          ("pi-Flow student beats the teacher's own Euler sampler", "Fig. 2a", "GM K=8", EULER, (1, 2, 4),
           "better"),
          ("pi-Flow student beats the shortcut student", "Fig. 2b", "GM K=8", "shortcut student (from the teacher)",
           (1, 2, 4), "better")]


def verdict(a, b, kind):
    """a, b: per-seed align values (lower is better). Ranges disjoint -> a real difference."""
    if kind == "same":
        return "agree (ranges overlap)" if max(a) >= min(b) and max(b) >= min(a) else \
            f"differ ({'first' if max(a) < min(b) else 'second'} is better on every seed)"
    if max(a) < min(b):
        return "REPRODUCES"
    if max(b) < min(a):
        return "CONTRADICTED"
    return "inconclusive at this budget"


def train_student(fields, out):
    """Train a toy student in this process (one lab row) with trainer.train; returns it with its EMA weights.
    fields: PiIDConfig / TrainConfig / toy.Options values."""
    cfg, tc, opts = (common.from_settings(cls, fields) for cls in (piflow.PiIDConfig, trainer.TrainConfig, toy.Options))
    settings = trainer.settings_of(cfg, tc, opts, teacher="toy")
    rc = trainer.RunConfig(out=out, overwrite=True, log_every=0, ckpt_every=0, eval_every=0, threads=1,
                           progress=False)
    att, ema = trainer.train(lambda device, dtype: toy.ToyAttachment(opts, cfg, tc, settings, device), cfg, tc,
                             settings, rc)
    trainer.load_into(att.trainable(), ema)
    return att.student.eval()


def _lab_job(job):
    """One (row, NFE, seed) in a worker process: train, then evaluate the EMA student (and its sampling variants).
    Returns ({label: metrics}, CPU seconds of this process)."""
    fields, out, ev, variants, label = job
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    t = time.process_time()
    student = train_student(fields, out)
    res = {label: ev.student(student)}
    for name, kw in variants.items():
        res[name] = ev.student(student, **kw)
    return res, time.process_time() - t


def lab_parser():
    lab = argparse.ArgumentParser(prog="toy_lab.py", description="Train the lab's students (several seeds per row, "
                                  "every one initialised from the toy teacher network) and write the claims table.")
    lab.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK['steps']} steps, NFE 1 and 4, "
                     f"{QUICK['seeds']} seeds, 4 rows, {10 * QUICK['per_class']} eval samples")
    lab.add_argument("--steps", type=int, default=None, help=f"training steps per student (default {LAB['steps']}; "
                     f"{QUICK['steps']} with --quick)")
    lab.add_argument("--seeds", type=int, default=None, help=f"seeds per row (default {LAB['seeds']}; "
                     f"{QUICK['seeds']} with --quick)")
    lab.add_argument("--per-class", type=int, default=None, help=f"evaluation samples per class (default "
                     f"{LAB['per_class']}; {QUICK['per_class']} with --quick)")
    lab.add_argument("--out", default=None, help="output folder (default runs/lab or runs/lab_quick)")
    lab.add_argument("--jobs", type=int, default=2,
                     help="students trained at once, one process and one CPU thread each (default 2 = 2 cores)")
    return lab


def summary(vals):
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def run_lab(parser, args):
    """Train every (row, NFE, seed) (--jobs at a time, one CPU thread each); write table.md / .json / .png."""
    from tqdm import tqdm
    common.check(args, [("steps", args.steps is None or args.steps >= 1, "an integer >= 1"),
                        ("seeds", args.seeds is None or args.seeds >= 1, "an integer >= 1"),
                        ("per_class", args.per_class is None or args.per_class >= 1, "an integer >= 1"),
                        ("jobs", args.jobs >= 1, "an integer >= 1")], parser)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    budget = dict(QUICK if args.quick else LAB)
    budget.update({k: getattr(args, k) for k in ("steps", "seeds", "per_class") if getattr(args, k) is not None})
    out = args.out or ("runs/lab_quick" if args.quick else "runs/lab")
    with common.user_errors("toy_lab.py"):
        common.check_writable(out, "--out", is_dir=True)
        teacher = toy.load_teacher()
    os.makedirs(out, exist_ok=True)
    t0, load0 = time.time(), os.getloadavg()[0]
    data = toy.ToyData()
    ev = toy.Evaluator(data, teacher, per_class=budget["per_class"])
    seeds = list(range(budget["seeds"]))
    results = {}                                                       # (label, nfe) -> {seed: metrics}
    for nfe in ((1, 4) if args.quick else (1, 2, 4)):                  # the teacher's own Euler sampler
        m = ev.metrics(piflow.teacher_euler(teacher, ev.noise, ev.cond, piflow.nfe_schedule(nfe)[1]))
        results[(EULER, nfe)] = {s: m for s in seeds}
    group_of = {EULER: "8 baselines", TEMP: "7 temperature"}
    jobs = []
    for group, label, fields, nfes, variants in lab_rows(args.quick, budget["steps"]):
        group_of[label] = group
        for nfe in nfes:
            for seed in seeds:
                name = "".join(c for c in f"{label}_nfe{nfe}_s{seed}".replace(" ", "_") if c.isalnum() or c in "_.-")
                f = dict(fields, nfe=nfe, steps=budget["steps"], seed=seed, batch_size=budget["batch"],
                         micro_batch=budget["batch"], lr=budget["lr"], cosine=True, total_substeps=budget["substeps"])
                jobs.append(((label, nfe, seed), (f, os.path.join(out, name), ev, variants.get(nfe, {}), label)))
    jobs.sort(key=lambda j: -j[0][1])                                   # longest (most NFE) first
    cpu = {}
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_lab_job, job): key for key, job in jobs}
        bar = tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="lab students")
        for f in bar:
            (label, nfe, seed), (res, dt) = futures[f], f.result()
            cpu[(label, nfe, seed)] = dt
            for name, m in res.items():
                results.setdefault((name, nfe), {})[seed] = m
            bar.write(f"[{time.time() - t0:6.0f}s] {label:42s} NFE {nfe} seed {seed}: align {res[label]['align']:.4f}"
                      f"  mode KL {res[label]['mode_kl']:.4f}  ({dt:.0f} s CPU)")
    wall, load1 = time.time() - t0, os.getloadavg()[0]
    order = []                                                         # table order: lab_rows, then Euler
    for _, label, _, nfes, variants in lab_rows(args.quick, budget["steps"]):
        order += [(name, n) for n in nfes for name in [label, *variants.get(n, {})]]
    order += [(EULER, n) for n in ((1, 4) if args.quick else (1, 2, 4))]
    write_tables(out, results, order, group_of, cpu, budget, ev, teacher, args, wall, (load0, load1))


def write_tables(out, results, order, group_of, cpu, budget, ev, teacher, args, wall, loads):
    cpu_total = sum(cpu.values())
    ref = ev.metrics(ev.x_teacher)
    exact = ev.metrics(toy.teacher_ode(toy.ToyTeacher(ev.data), ev.noise, ev.cond))
    head = (f"Toy lab ({'quick, ' if args.quick else ''}{budget['steps']} steps per student, batch {budget['batch']}, "
            f"lr {budget['lr']:g} cosine, {budget['substeps']} rollout substeps per unit time, seeds "
            f"0-{budget['seeds'] - 1}; every student starts from the teacher network unless marked; {args.jobs} jobs x "
            f"1 CPU thread; wall time {wall / 60:.1f} min (load average {loads[0]:.1f} at start, {loads[1]:.1f} at "
            f"end); CPU time {cpu_total / 60:.1f} min = {cpu_total / 120:.1f} min on 2 idle cores). align = MSE to the "
            f"teacher network's ODE endpoint (RK4, 256 calls) from the same noise, mean +- sd over seeds [min, max]; "
            f"mode KL = KL(true weights || nearest-prototype histogram); SWD = sliced W2 to exact data. "
            f"Eval: {len(ev.cond)} samples, same noise for all rows.")
    lines = [head, "", "| group | student | NFE | align | mode KL | SWD |", "|---|---|---|---|---|---|"]
    table = []
    for label, nfe in order:
        per = results[(label, nfe)]
        vals = {k: [per[s][k] for s in sorted(per)] for k in ("align", "mode_kl", "swd")}
        (m, sd), (mk, _), (ms, _) = summary(vals["align"]), summary(vals["mode_kl"]), summary(vals["swd"])
        rng = f" [{min(vals['align']):.4f}, {max(vals['align']):.4f}]" if len(per) > 1 and label != EULER else ""
        pm = f" ± {sd:.4f}" if label != EULER else ""
        lines.append(f"| {group_of[label]} | {label} | {nfe} | {m:.4f}{pm}{rng} | {mk:.4f} | {ms:.4f} |")
        table.append(dict(group=group_of[label], student=label, nfe=nfe, align=m, align_sd=sd, mode_kl=mk, swd=ms,
                          seeds={str(s): per[s] for s in sorted(per)},
                          cpu_s={str(s): round(cpu[(label, nfe, s)], 1) for s in sorted(per)
                                 if (label, nfe, s) in cpu}))
    lines.append(f"| ref | teacher network ODE | - | 0 | {ref['mode_kl']:.4f} | {ref['swd']:.4f} |")
    lines.append(f"| ref | exact GM ODE (vs the teacher network's) | - | {exact['align']:.4f} | {exact['mode_kl']:.4f} "
                 f"| {exact['swd']:.4f} |")
    lines += ["", "| claim | paper | NFE | A (better?) | B | verdict |", "|---|---|---|---|---|---|"]
    claims = []
    for claim, ref_, a, b, nfes, kind in CLAIMS:
        for nfe in nfes:
            if (a, nfe) not in results or (b, nfe) not in results:
                continue
            va, vb = (list(results[(r, nfe)][s]["align"] for s in sorted(results[(r, nfe)])) for r in (a, b))
            v = verdict(va, vb, kind)
            lines.append(f"| {claim} | {ref_} | {nfe} | {a}: {summary(va)[0]:.4f} | {b}: {summary(vb)[0]:.4f} | {v} |")
            claims.append(dict(claim=claim, paper=ref_, nfe=nfe, a=a, b=b, a_align=va, b_align=vb, verdict=v))
    text = "\n".join(lines) + "\n"
    print(text)
    meta = dict(budget=budget, jobs=args.jobs, wall_s=round(wall, 1), cpu_s=round(cpu_total, 1),
                idle_2core_estimate_s=round(cpu_total / 2, 1), load_start=loads[0], load_end=loads[1])
    common.save_text(os.path.join(out, "table.md"), text)
    common.save_text(os.path.join(out, "table.json"), json.dumps(dict(rows=table, claims=claims, run=meta), indent=1))
    common.save_atomic(os.path.join(out, "table.png"), lambda tmp: bar_plot(table).save(tmp, format="PNG"))
    print(f"wrote {out}/table.md, table.json, table.png ({wall:.0f} s wall, {cpu_total:.0f} s CPU)")


def bar_plot(table, bar_h=12, width=420):
    """Horizontal log-scale bars of teacher alignment per row: bar = seed mean, whisker = seed [min, max]."""
    from PIL import Image, ImageDraw
    vals = [[max(v["align"], 1e-5) for v in r["seeds"].values()] for r in table]
    lo = math.log10(min(min(v) for v in vals)) - 0.2
    hi = math.log10(max(max(v) for v in vals)) + 0.1
    x_of = lambda v: label_w + int(width * (math.log10(max(v, 1e-5)) - lo) / (hi - lo))
    label_w, H = 360, (bar_h + 4) * len(table) + 60
    img = Image.new("RGB", (label_w + width + 90, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((4, 4), "toy lab: teacher-alignment MSE to the teacher's ODE (log scale; lower is better)", fill=0)
    d.text((4, 18), "bar = mean over seeds, whisker = [min, max] over seeds; grey = no training", fill=(80, 80, 80))
    for i, (r, v) in enumerate(zip(table, vals)):
        y = 36 + i * (bar_h + 4)
        d.text((4, y), f"{r['student'][:46]}  NFE {r['nfe']}", fill=0)
        color = (150, 150, 150) if "no training" in r["student"] or "sampling only" in r["student"] else (60, 90, 160)
        d.rectangle([label_w, y, max(x_of(r["align"]), label_w + 1), y + bar_h - 2], fill=color)
        d.line([x_of(min(v)), y + bar_h // 2 - 1, x_of(max(v)), y + bar_h // 2 - 1], fill=(200, 30, 30), width=2)
        d.text((x_of(max(v)) + 4, y), f"{r['align']:.4f}", fill=0)
    for e in range(math.ceil(lo), math.floor(hi) + 1):                        # decade ticks on the axis
        d.line([x_of(10 ** e), H - 20, x_of(10 ** e), H - 16], fill=0)
        d.text((x_of(10 ** e) - 10, H - 14), f"1e{e}", fill=0)
    return img


def main(argv=None):
    p = lab_parser()
    run_lab(p, p.parse_args(argv))


if __name__ == "__main__":
    main()
