"""π-ID training of a class-conditional π-Flow student (paper Alg. 2 data-dependent / Alg. 3 data-free).

    python train_imagenet.py --teacher toy --policy gm --K 8 --nfe 4 --steps 1500 --out runs/toy_gm
    torchrun --standalone --nproc_per_node=2 train_imagenet.py --teacher toy ...    # DDP (gloo on CPU, nccl on CUDA)
    python train_imagenet.py ... --resume                                           # continue runs/.../ckpt.pt

The teacher/student pair comes from build() (the single dispatch point on --teacher); everything else is
model-agnostic. The global batch is split into micro-batches of --micro-batch samples; micro-batch i of step s
draws all its randomness from its own generator seeded by (seed, s, i), and ranks take disjoint micro-batches,
so 1 or N processes (and a resumed run) compute the same gradients up to float summation order. Gradients are
averaged over ranks with one all-reduce after all backward passes (data-free training calls backward once per
NFE segment, as in the official code), then clipped; the EMA uses the Karras power schedule.
"""
import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import piflow


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="pi-ID training (paper Alg. 2 / Alg. 3).")
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", default="toy", choices=["toy", "sit"],
                   help="teacher model: 'toy' = exact GM toy ImageNet (toy.py); 'sit' = SiT-XL/2 / REPA / DiT "
                        "teacher on SD-VAE latents (sit.py; see the SiT flags below)")
    g.add_argument("--policy", default="gm", choices=["gm", "dx", "shortcut"],
                   help="student policy: GMFlow (gm), DX grid (dx), or the shortcut-regression baseline")
    g.add_argument("--K", type=int, default=8, help="Gaussians per pixel of the GM policy")
    g.add_argument("--N", type=int, default=10, help="grid points of the DX policy")
    g.add_argument("--width", type=int, default=192, help="toy student hidden width")
    g.add_argument("--depth", type=int, default=3, help="toy student residual blocks")
    g.add_argument("--guidance", type=float, default=1.0, help="teacher CFG scale (1 = no guidance)")
    g.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="sigma interval where CFG is applied (inclusive)")
    g = p.add_argument_group("pi-ID")
    g.add_argument("--nfe", type=int, default=4, help="student steps (NFE)")
    g.add_argument("--shift", type=float, default=1.0, help="time shift m (1 on ImageNet)")
    g.add_argument("--final-step-scale", type=float, default=1.0, help="raw size of the last step vs the others")
    g.add_argument("--num-intermediate", type=int, default=2, help="teacher queries per student call")
    g.add_argument("--total-substeps", type=int, default=128,
                   help="policy rollout substeps per unit raw time (128 as published; the toy lab uses 32)")
    g.add_argument("--window-substeps", type=int, default=0, help="micro-window size in substeps (Eq. 6)")
    g.add_argument("--gm-dropout", type=float, default=0.0, help="GM dropout on the rollout policy (paper: 0.05)")
    g.add_argument("--loss-scale", type=float, default=1.0, help="constant loss multiplier (3 on ImageNet)")
    g.add_argument("--decay-iters", type=int, default=0,
                   help="trajectory mixing: teacher ratio 1 -> 0 over this many steps (huge = behaviour cloning)")
    g.add_argument("--data-dependent", action="store_true",
                   help="Alg. 2: source states by diffusing data samples (default: data-free Alg. 3)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1500, help="total training steps")
    g.add_argument("--batch-size", type=int, default=64, help="global batch size (all ranks)")
    g.add_argument("--micro-batch", type=int, default=64, help="samples per micro-batch (divides --batch-size)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    g.add_argument("--warmup", type=int, default=50, help="linear LR warmup steps (from 0.001 lr)")
    g.add_argument("--cosine", action="store_true",
                   help="after warmup, cosine-decay the LR to 0 at --steps (default: constant LR, as published)")
    g.add_argument("--grad-clip", type=float, default=50.0, help="gradient-norm clip")
    g.add_argument("--clip-start", type=int, default=0, help="step from which gradients are clipped")
    g.add_argument("--ema-start", type=int, default=50, help="EMA start step (copy before)")
    g.add_argument("--ema-gamma", type=float, default=7.0, help="Karras EMA power")
    g.add_argument("--seed", type=int, default=0, help="base seed (init and data randomness)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for the student (CUDA only)")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (1 is fastest on a busy machine)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/toy", help="run folder (ckpt.pt, log.txt)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if <out>/ckpt.pt exists")
    g.add_argument("--export", default=None, help="also write the slim EMA checkpoint here at the end (for sample.py)")
    g.add_argument("--log-every", type=int, default=50, help="log loss and steps/s every N steps (0 = off)")
    g.add_argument("--eval-every", type=int, default=500, help="teacher-alignment metrics every N steps (0 = off)")
    g.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps (0 = only at the end)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    import sit  # SiT/REPA-specific flags (--teacher-ckpt, --num-gaussians, --latents, ...); torch-only import
    sit.add_train_args(p.add_argument_group("SiT / REPA teacher (--teacher sit)"))
    args = p.parse_args(argv)
    for name, ok, accepted in [
            ("--nfe", args.nfe >= 1, "an integer >= 1"), ("--steps", args.steps >= 1, "an integer >= 1"),
            ("--K", args.K >= 1, ">= 1"), ("--N", args.N >= 1, ">= 1"),
            ("--total-substeps", args.total_substeps >= 1, "an integer >= 1"),
            ("--micro-batch", args.micro_batch >= 1 and args.batch_size % args.micro_batch == 0,
             f"a divisor of --batch-size={args.batch_size}"),
            ("--gm-dropout", 0 <= args.gm_dropout < 1, "a probability in [0, 1)"),
            ("--final-step-scale", 0 < args.final_step_scale <= 1, "a value in (0, 1]"),
            ("--shift", args.shift > 0, "> 0"), ("--lr", args.lr > 0, "> 0")]:
        if not ok:
            p.error(f"{name}={getattr(args, name[2:].replace('-', '_'))!r} is not accepted; expected {accepted}")
    return args


MODEL_KEYS = ("teacher", "policy", "K", "N", "width", "depth", "nfe", "shift", "final_step_scale")


#################################################################################
#            The single dispatch point: teacher/student per --teacher           #
#################################################################################

class Setup:
    """What the loop needs: teacher(x_t, sigma, cond) -> u (unguided), student nn.Module -> policy,
    sample_data(B, g) -> (x0, cond), sample_cond(B, g) -> cond, noise_shape, null_cond, evaluate(ema) -> dict."""


def build(args, device):
    s = Setup()
    if args.teacher == "toy":
        import toy
        data = toy.ToyData()
        s.teacher = toy.ToyTeacher(data)
        s.student = build_student(args).to(device)
        s.noise_shape, s.null_cond = toy.IMG, torch.tensor([toy.NUM_CLASSES], device=device)
        s.sample_cond = lambda B, g: torch.randint(toy.NUM_CLASSES, (B,), generator=g, device=g.device)
        def sample_data(B, g):
            cond = s.sample_cond(B, g)
            return data.sample(cond.cpu(), torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=g, device=g.device)))).to(device), cond
        s.sample_data = sample_data
        evaluator = []
        def evaluate(ema):
            if not evaluator:
                evaluator.append(toy.Evaluator(data, guided(args, s.teacher, s.null_cond), device=device))
            return evaluator[0].student(ema, args.nfe, args.shift, args.final_step_scale,
                                        total_substeps=args.total_substeps)
        s.evaluate = evaluate
        return s
    if args.teacher == "sit":
        import sit
        return sit.build(args, device)
    raise ValueError(f"--teacher={args.teacher!r} is not accepted; expected 'toy' or 'sit'")


def build_student(args):
    """The student network for a stored args dict/namespace (used by sample.py to rebuild from a checkpoint)."""
    a = args if isinstance(args, dict) else vars(args)
    if a["teacher"] == "toy":
        import toy
        return toy.ToyStudent(a["policy"], a["K"], a["N"], a["width"], a["depth"], a["nfe"], a["shift"],
                              a["final_step_scale"])
    raise ValueError(f"teacher={a['teacher']!r} is not accepted; expected 'toy'")


def guided(args, teacher, null_cond):
    return piflow.guided_teacher(teacher, args.guidance, null_cond, tuple(args.guidance_interval))


#################################################################################
#                                  Training                                     #
#################################################################################

def shortcut_loss(student, teacher, noise, cond, cfg, backward):
    """Baseline (Fig. 2b): regress each NFE-step jump of the teacher ODE (fine Euler, 128 substeps/unit) directly."""
    import toy
    taus, sigmas = piflow.nfe_schedule(cfg.nfe, cfg.shift, cfg.final_step_scale)
    x, total = noise, 0.0
    for i in range(cfg.nfe):
        s_src, s_dst = float(sigmas[i]), float(sigmas[i + 1])
        with torch.no_grad():
            pi_T = toy.TeacherPolicy(teacher, cond, x, s_src)
            x_dst = piflow.policy_rollout(pi_T, x, float(taus[i]), float(taus[i + 1]), cfg.shift, cfg.total_substeps)
        u = student(x, piflow.as_batch(s_src, x), cond).u
        target = (x_dst - x) / (s_dst - s_src)
        loss = 0.5 * (u - target).pow(2).mean() * float(taus[i] - taus[i + 1])
        backward(loss)
        total, x = total + loss.detach(), x_dst
    return total


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv=None):
    """Train; returns the EMA student (rank 0's copy)."""
    args = parse_args(argv)
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    # --- check inputs before any heavy work
    if args.resume and not os.path.isfile(ckpt_path):
        raise SystemExit(f"--resume: no checkpoint at {ckpt_path!r}; train without --resume first")
    if not args.resume and os.path.exists(ckpt_path) and not args.overwrite:
        raise SystemExit(f"--out={args.out!r} already holds ckpt.pt; pass --resume to continue or --overwrite")
    ckpt = None
    if args.resume:
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            old = ckpt["args"]
        except Exception as e:
            raise SystemExit(f"--resume: {ckpt_path!r} is not a readable piflow checkpoint ({type(e).__name__}: {e})")
        bad = [k for k in MODEL_KEYS if old.get(k) != getattr(args, k)]
        if bad:
            raise SystemExit(f"--resume: {', '.join(f'--{k}={getattr(args, k)!r} (checkpoint has {old.get(k)!r})' for k in bad)}")
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)                        # denormals slow the GM posterior on CPU a lot
    torch.manual_seed(args.seed)                          # identical init on every rank
    n_micro = args.batch_size // args.micro_batch
    if n_micro % world:
        raise SystemExit(f"--batch-size/--micro-batch = {n_micro} micro-batches must divide by world size {world}")

    s = build(args, device)
    student = s.student
    ema = copy.deepcopy(student).requires_grad_(False)
    teacher = guided(args, s.teacher, s.null_cond)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    cfg = piflow.PiIDConfig(nfe=args.nfe, shift=args.shift, final_step_scale=args.final_step_scale,
                            num_intermediate=args.num_intermediate, total_substeps=args.total_substeps,
                            window_substeps=args.window_substeps,
                            gm_dropout=args.gm_dropout, loss_scale=args.loss_scale, decay_iters=args.decay_iters)
    start = 0
    if ckpt is not None:
        student.load_state_dict(ckpt["student"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
    torch.manual_seed(args.seed * world + rank)           # per-rank seed for anything outside the micro-batches
    is_main = rank == 0
    log = None
    if is_main:
        os.makedirs(args.out, exist_ok=True)
        log = open(os.path.join(args.out, "log.txt"), "a")
    def say(msg):
        if is_main:
            print(msg, flush=True)
            log.write(msg + "\n"), log.flush()
    say(f"pi-ID {'data-dependent' if args.data_dependent else 'data-free'} | teacher {args.teacher} | policy "
        f"{args.policy} | world {world} | {sum(p.numel() for p in student.parameters()) / 1e6:.2f} M params | "
        f"steps {start} -> {args.steps}")

    def checkpoint(step):
        if is_main:
            save_atomic({"student": student.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "step": step, "args": vars(args)}, ckpt_path)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    steps = range(start, args.steps)
    if is_main and not args.no_progress:
        from tqdm import tqdm
        steps = tqdm(steps, initial=start, total=args.steps, desc="pi-ID")
    t_log, loss_log = time.time(), []
    for step in steps:
        lr = args.lr * min(1.0, 0.001 + (1 - 0.001) * step / max(args.warmup, 1))   # linear warmup from 0.001 lr
        if args.cosine and step >= args.warmup:
            lr = 0.5 * args.lr * (1 + math.cos(math.pi * (step - args.warmup) / max(args.steps - args.warmup, 1)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=False)
        step_loss = torch.zeros((), device=device)
        backward = lambda l: (l / n_micro).backward()
        for i in range(rank, n_micro, world):            # this rank's micro-batches
            g = torch.Generator(device=device).manual_seed((args.seed * 1_000_003 + step) * 65_537 + i)
            with autocast:
                if args.policy == "shortcut":
                    cond = s.sample_cond(args.micro_batch, g)
                    noise = torch.randn((args.micro_batch,) + tuple(s.noise_shape), generator=g, device=device)
                    loss = shortcut_loss(student, teacher, noise, cond, cfg, backward)
                elif args.data_dependent:
                    x0, cond = s.sample_data(args.micro_batch, g)
                    loss = piflow.piid_data_dependent(student, teacher, x0, cond, cfg, step, g)
                    backward(loss)
                else:
                    cond = s.sample_cond(args.micro_batch, g)
                    noise = torch.randn((args.micro_batch,) + tuple(s.noise_shape), generator=g, device=device)
                    loss = piflow.piid_data_free(student, teacher, noise, cond, cfg, step, g, backward=backward)
            step_loss += loss.detach() / n_micro
        if world > 1:                                     # sum of per-micro-batch grads / n_micro = global mean
            for p in student.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            dist.all_reduce(step_loss)
        if step >= args.clip_start:
            gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
            if not torch.isfinite(gnorm):                 # skip a bad step (recipe §4.10)
                opt.zero_grad(set_to_none=False)
                say(f"step {step}: non-finite grad norm, step skipped")
                continue
        opt.step()
        piflow.ema_update(ema, student, piflow.ema_beta(step, args.ema_gamma, args.ema_start))
        loss_log.append(float(step_loss))
        done = step + 1
        if args.log_every and done % args.log_every == 0:
            dt = time.time() - t_log
            say(f"step {done} | loss {sum(loss_log) / len(loss_log):.5f} | {len(loss_log) / dt:.2f} steps/s")
            t_log, loss_log = time.time(), []
        if is_main and args.eval_every and done % args.eval_every == 0:
            m = s.evaluate(ema)
            say(f"step {done} | eval EMA NFE {args.nfe}: " + " ".join(f"{k} {v:.4f}" for k, v in m.items()))
        if args.ckpt_every and done % args.ckpt_every == 0 and done < args.steps:
            checkpoint(done)
    checkpoint(args.steps)
    if is_main and args.export:
        os.makedirs(os.path.dirname(os.path.abspath(args.export)), exist_ok=True)
        save_atomic({"ema": {k: v.half() if v.is_floating_point() else v for k, v in ema.state_dict().items()},
                     "step": args.steps, "args": vars(args)}, args.export)
        say(f"exported EMA student to {args.export}")
    if log is not None:
        log.close()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return ema


if __name__ == "__main__":
    main(sys.argv[1:])
