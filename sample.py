"""Sample a π-Flow student: NFE student calls, each followed by a dense policy rollout (paper §3, Fig. 2c).

    python sample.py --nfe 4                       # embedded toy student (assets/), offline, seconds on a CPU
    python sample.py --nfe 2 --temperature auto --seed 1 --out samples/toy.png
    python sample.py --model imagenet ...          # SiT/REPA students (sit.py)
    python sample.py --model flux|qwen ...         # text-to-image students (train_t2i.py)

The toy path writes one PNG: for each class a row of student samples, a gap, then the exact teacher ODE
samples from the same noise; it prints the sigma schedule, the settings and the toy metrics.
"""
import argparse
import os
import sys
import time

import torch

import piflow

DEFAULT_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy_gm_k8_nfe4.pt")


def parse_temperature(v):
    if v in ("none", "auto"):
        return None if v == "none" else "auto"
    try:
        T = float(v)
    except ValueError:
        T = -1.0
    if not T > 0:
        raise argparse.ArgumentTypeError(f"--temperature={v!r} is not accepted; expected 'none', 'auto' or a value > 0")
    return T


def load_student(path):
    """Rebuild a toy student from a checkpoint (slim export {ema, args} or a full training ckpt.pt)."""
    import train_imagenet
    if not os.path.isfile(path):
        raise SystemExit(f"--ckpt={path!r}: no such file; expected a checkpoint written by train_imagenet.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        a = ckpt["args"]
        student = train_imagenet.build_student(a)
        student.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["ema"].items()})
    except Exception as e:
        raise SystemExit(f"--ckpt={path!r} is not a readable piflow toy checkpoint ({type(e).__name__}: {e})")
    return student.eval(), a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description="Few-step pi-Flow sampling (default: the embedded toy student).")
    p.add_argument("--model", default="toy", choices=["toy", "imagenet", "flux", "qwen"],
                   help="toy = embedded toy ImageNet student; imagenet = SiT/REPA (sit.py); flux/qwen = train_t2i.py")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="student checkpoint (default: the shipped assets/ toy student)")
    p.add_argument("--nfe", type=int, default=4, help="student steps; any value >= 1 (elastic inference)")
    p.add_argument("--temperature", type=parse_temperature, default=None,
                   help="GM temperature on all but the last step: 'none' (default), 'auto' (0.1*(NFE-1)) or T > 0")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (sample i of class c is reproducible)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class in the grid")
    p.add_argument("--out", default="samples/toy_nfe{nfe}.png", help="output PNG ({nfe} is filled in)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args, rest = p.parse_known_args(argv)
    if args.model == "imagenet":                 # heavy imports only inside their branch
        import sit
        return sit.sample_cli(argv)
    if args.model in ("flux", "qwen"):
        import train_t2i
        return train_t2i.sample_cli(argv)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.nfe < 1:
        p.error(f"--nfe={args.nfe} is not accepted; expected an integer >= 1")
    if args.per_class < 1:
        p.error(f"--per-class={args.per_class} is not accepted; expected an integer >= 1")
    out = args.out.format(nfe=args.nfe)
    if not out.lower().endswith(".png"):
        p.error(f"--out={out!r} is not accepted; expected a .png path")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    import toy
    t0 = time.time()
    student, a = load_student(args.ckpt)
    _, sigmas = piflow.nfe_schedule(args.nfe, a["shift"], a["final_step_scale"])
    T = piflow.resolve_temperature(args.temperature, args.nfe)
    print(f"student: {args.ckpt} ({a['policy']}, K={a['K']}, N={a['N']}, trained at NFE {a['nfe']}, "
          f"shift {a['shift']}, final step scale {a['final_step_scale']})")
    print(f"settings: NFE {args.nfe}, temperature {T}, seed {args.seed}, {args.per_class} per class, "
          f"{toy.NUM_CLASSES} classes, teacher CFG {a.get('guidance', 1.0)}")
    print("sigma schedule: " + ", ".join(f"{s:.4f}" for s in sigmas.tolist()))

    data = toy.ToyData()
    teacher = piflow.guided_teacher(toy.ToyTeacher(data), a.get("guidance", 1.0),
                                    torch.tensor([toy.NUM_CLASSES]), tuple(a.get("guidance_interval", (0.0, 1.0))))
    g = torch.Generator().manual_seed(args.seed)
    cond = torch.arange(toy.NUM_CLASSES).repeat_interleave(args.per_class)          # (B,)
    noise = torch.randn((len(cond),) + toy.IMG, generator=g)
    x = piflow.sample(student, noise, cond, args.nfe, a["shift"], a["final_step_scale"], T,
                      a.get("total_substeps", 128))
    x_teacher = toy.teacher_ode(teacher, noise, cond)
    x_euler = toy.teacher_euler(teacher, noise, cond, args.nfe, a["shift"], a["final_step_scale"])
    m = {"align": toy.teacher_alignment(x, x_teacher), "mode_kl": toy.mode_kl(data, x, cond),
         "swd": toy.sliced_wasserstein(data, x, cond)}
    print(f"student  NFE {args.nfe}: teacher alignment MSE {m['align']:.5f} | mode KL {m['mode_kl']:.4f} | "
          f"sliced W2 {m['swd']:.4f}")
    print(f"teacher Euler NFE {args.nfe}: teacher alignment MSE {toy.teacher_alignment(x_euler, x_teacher):.5f} | "
          f"mode KL {toy.mode_kl(data, x_euler, cond):.4f} | sliced W2 {toy.sliced_wasserstein(data, x_euler, cond):.4f}")
    print(f"teacher exact ODE: mode KL {toy.mode_kl(data, x_teacher, cond):.4f} | "
          f"sliced W2 {toy.sliced_wasserstein(data, x_teacher, cond):.4f}")
    tiles_s, tiles_t = toy.to_uint8(x), toy.to_uint8(x_teacher)
    k = args.per_class
    rows = [tiles_s[c * k:(c + 1) * k] + [None] + tiles_t[c * k:(c + 1) * k] for c in range(toy.NUM_CLASSES)]
    toy.save_png(toy.image_grid(rows), out)
    print(f"wrote {out} (left: student, right: exact teacher ODE, same noise; one row per class) "
          f"in {time.time() - t0:.1f} s")
    return m


if __name__ == "__main__":
    main()
