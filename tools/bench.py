"""What the π-Flow policy costs next to the network (issue 6). All figures from one run on one device.

    (1) GM policy rollouts of 32 and 128 substeps (eager reference / torch.compile / fused Triton kernel),
        as a share of one student forward (SiT-XL/2, random weights, bf16 autocast on CUDA) at the same batch.
    (2) One data-dependent π-ID training step (Alg. 2, 1 NFE, 2 intermediate states): student forward, teacher
        queries, backward, and the rest (detached rollouts, posterior, loss): the non-network share of the step.
    (3) GM posterior throughput in GB/s of the (B, K, C, H, W) means tensor, against the memory bandwidth.

    python -m tools.bench           # full sizes (K=32, C=4, 32x32, batch 16 and 64, SiT-XL/2): meant for a GPU
    python -m tools.bench --small   # small shapes and a small network: CPU, well under a minute
Medians over --repeats timed calls after --warmup calls; CUDA events on GPU.
"""
import argparse
import statistics
import time

import torch

import piflow
import piflow_kernels
from models import sit
from runtime import common

# Peak DRAM bandwidth (GB/s) of common accelerators, by substring of the device name (vendor data sheets).
PEAK_GBPS = {"H200": 4800, "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350, "A100-SXM4-80GB": 2039,
             "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300, "A10G": 600, "RTX 4090": 1008}


#################################################################################
#                        Network: sit.DiT teacher, sit.GMDiT student            #
#################################################################################

def net_config(small, res, C):
    """SiT-XL/2 (16 heads x 72, 28 layers) or, with --small, a DiT of 3 heads x 64, 4 layers (random weights)."""
    size = dict(num_attention_heads=3, attention_head_dim=64, num_layers=4) if small else \
        dict(num_attention_heads=16, attention_head_dim=72, num_layers=28)
    return dict(size, in_channels=C, out_channels=C, sample_size=res, patch_size=2, num_embeds_ada_norm=1000), \
        ("small DiT (D=192, depth 4)" if small else "SiT-XL/2")


def make_net(small, res, C):
    cfg, name = net_config(small, res, C)
    return sit.DiT(**cfg), name + " (sit.DiT)"


def make_student_teacher(small, res, C, K, device):
    """pi-ID pair: a sit.GMDiT student initialised from a sit.DiT teacher (section 2 runs them under bf16 autocast
    on CUDA, as trainer.py does)."""
    cfg, name = net_config(small, res, C)
    net = sit.DiT(**cfg).to(device).eval().requires_grad_(False)
    student = sit.student_from_teacher(net, "gm", K, 0, piflow.PiIDConfig(nfe=1))
    return student.to(device).train(), sit.as_teacher(net), f"student sit.GMDiT ({name}, K={K}), teacher sit.DiT"


#################################################################################
#                                   Timing                                      #
#################################################################################

class Timer:
    def __init__(self, device, repeats, warmup):
        self.cuda, self.repeats, self.warmup = device.type == "cuda", repeats, warmup

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, repeats=None):
        """Median wall time of fn() in ms (CUDA events on GPU)."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats or self.repeats):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)


def safe(fn):
    """Run a measurement; report its error instead of aborting the whole benchmark."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a benchmark should print what failed and go on
        return f"failed: {type(e).__name__}: {common.first_line(e, 120)}"


def fmt(ms, ref=None):
    if isinstance(ms, str) or ms is None:
        return ms or "n/a"
    return f"{ms:8.3f} ms" + (f" ({100 * ms / ref:6.2f} %)" if ref else "")


def random_policy(B, K, C, res, device, g):
    x_src = torch.randn(B, C, res, res, device=device, generator=g)
    means = torch.randn(B, K, C, res, res, device=device, generator=g)
    logweights = torch.randn(B, K, 1, res, res, device=device, generator=g).log_softmax(1)
    return piflow.GMPolicy(means, logweights, torch.full((B, 1, 1, 1, 1), -1.0, device=device), x_src,
                           torch.ones(B, device=device))


def bandwidth(device, timer):
    """Measured device-memory copy bandwidth (GB/s, read + write) and the data-sheet peak if known."""
    n = (256 if device.type == "cuda" else 32) * 2 ** 20 // 4
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    ms = timer(lambda: b.copy_(a))
    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_GBPS.items() if k in name), None)
    return 2 * a.numel() * 4 / ms / 1e6, peak


#################################################################################
#                                   Sections                                    #
#################################################################################

def policy_cost(args, device, timer):
    print(f"\n(1) GM policy rollout vs one network forward: K={args.K}, C={args.C}, {args.res}x{args.res}, "
          f"fp32 policy; network {args.net_name}" + (", bf16 autocast" if device.type == "cuda" else ", fp32"))
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    print(f"    compile = torch.compile(mode='{mode}') of the reference loop: 'whole' = the unrolled rollout, "
          f"'step' = one substep replayed" + ("" if device.type == "cuda" else " (CPU: no CUDA graphs)"))
    g = torch.Generator(device).manual_seed(args.seed)
    for B in args.batches:
        x = torch.randn(B, args.C, args.res, args.res, device=device, generator=g)
        t = torch.rand(B, device=device, generator=g)
        y = torch.randint(0, 1000, (B,), device=device, generator=g)

        @torch.no_grad()
        def forward():
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                args.net(x, t, y)
        net_ms = timer(forward)
        print(f"  batch {B:3d}: network forward {fmt(net_ms)}")
        policy = random_policy(B, args.K, args.C, args.res, device, g)
        for steps in (32, 128):
            tau_to = 1.0 - steps / 128
            with torch.no_grad():
                eager = timer(lambda: piflow.policy_rollout(policy, policy.x_src, 1.0, tau_to, 1.0, 128,
                                                           backend="torch"))
            comp, compile_s = "off", None
            compile_kind = args.compile if args.compile != "auto" else (
                "whole" if device.type == "cuda" and steps <= 32 else "step")
            if compile_kind != "off":
                t0 = time.perf_counter()
                n, sigma = piflow.euler_grid(policy.x_src, 1.0, tau_to, 1.0, 128)
                compiled = lambda: piflow_kernels.compiled_rollout(policy.velocity, policy.x_src, n, sigma, mode=mode,
                                                                   whole=compile_kind == "whole")
                first = safe(compiled)
                compile_s = time.perf_counter() - t0
                comp = first if isinstance(first, str) else safe(lambda: timer(compiled))
            fused = "n/a (needs CUDA)"
            if device.type == "cuda":
                with torch.no_grad():
                    fused = safe(lambda: timer(lambda: piflow.policy_rollout(
                        policy, policy.x_src, 1.0, tau_to, 1.0, 128, backend="fused")))
            print(f"    {steps:3d} substeps: eager {fmt(eager, net_ms)} | compile-{compile_kind} {fmt(comp, net_ms)}"
                  + (f" [first call {compile_s:.1f} s]" if compile_s else "") + f" | fused {fmt(fused, net_ms)}")
        if device.type == "cuda":
            with torch.no_grad():
                ref = piflow.policy_rollout(policy, policy.x_src, 1.0, 0.0, 1.0, 128, backend="torch")
                out = safe(lambda: piflow.policy_rollout(policy, policy.x_src, 1.0, 0.0, 1.0, 128, backend="fused"))
            err = out if isinstance(out, str) else f"{(out - ref).abs().max().item():.2e}"
            print(f"    fused vs eager, 128 substeps: max abs diff {err} (data scale {ref.abs().max().item():.2f})")


def train_step_breakdown(args, device, timer):
    B = args.batches[0]
    student, teacher, label = make_student_teacher(args.small, args.res, args.C, args.K, device)
    print(f"\n(2) pi-ID training step (Alg. 2, NFE=1, 2 intermediate states, 128 substeps/unit, GM dropout 0.05), "
          f"batch {B}; {label}")

    g = torch.Generator(device).manual_seed(args.seed)
    x0 = torch.randn(B, args.C, args.res, args.res, device=device, generator=g)
    y = torch.randint(0, 1000, (B,), device=device, generator=g)
    acc = {}

    def clock():
        timer.sync()
        return time.perf_counter()

    def timed(name, fn):  # accumulate the wall time of every call of fn (synchronised) into acc[name]
        def wrapped(*a):
            t = clock()
            out = fn(*a)
            acc[name] = acc.get(name, 0.0) + 1e3 * (clock() - t)
            return out
        return wrapped

    for backend in (["torch", "fused"] if device.type == "cuda" else ["torch"]):
        cfg = piflow.PiIDConfig(nfe=1, num_intermediate=2, gm_dropout=0.05, loss_scale=3.0, rollout_backend=backend)
        rows = []

        def step():
            acc.clear()
            gen = torch.Generator(device).manual_seed(args.seed)
            t0 = clock()
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = piflow.piid_data_dependent(timed("student", student), timed("teacher", teacher), x0, y, cfg,
                                                  generator=gen)
            t1 = clock()
            loss.backward()
            t2 = clock()
            rows.append(dict(total=1e3 * (t2 - t0), backward=1e3 * (t2 - t1),
                             rest=1e3 * (t1 - t0) - acc["student"] - acc["teacher"], **acc))
        out = safe(lambda: [step() for _ in range(args.warmup + args.repeats)])
        if isinstance(out, str):
            print(f"  rollout backend {backend}: {out}")
            continue
        med = {k: statistics.median(r[k] for r in rows[args.warmup:]) for k in rows[0]}
        T = med["total"]
        print(f"  rollout backend {backend:5s}: step {fmt(T)} = student forward {fmt(med['student'], T)} "
              f"+ 2 teacher queries {fmt(med['teacher'], T)} + backward (network + policy) {fmt(med['backward'], T)}"
              f" + detached rollouts, posterior, loss {fmt(med['rest'], T)}")
        print(f"    non-network share of the step (rollouts + posterior + loss forward): {100 * med['rest'] / T:.1f} %")
    student.zero_grad(set_to_none=True)


def posterior_throughput(args, device, timer, bw):
    B = args.posterior_batch
    K, C, R = args.K, args.C, args.res
    g = torch.Generator(device).manual_seed(args.seed)
    policy = random_policy(B, K, C, R, device, g)
    x_t = torch.randn(B, C, R, R, device=device, generator=g)
    sigma = torch.full((B,), 0.5, device=device)
    nbytes = B * K * C * R * R * 4
    measured, peak = bw
    print(f"\n(3) GM posterior E[x0|x_t] throughput, means tensor (B,K,C,H,W)=({B},{K},{C},{R},{R}) fp32 = "
          f"{nbytes / 1e6:.1f} MB; measured copy bandwidth {measured:.0f} GB/s"
          + (f", data-sheet peak {peak} GB/s" if peak else ", peak unknown for this device"))
    args_ = (x_t, sigma, policy.x_src, policy.sigma_src, policy.means_x, policy.logweights, policy.var_x)
    rows = []
    with torch.no_grad():
        rows.append(("eager", safe(lambda: timer(lambda: piflow.gm_posterior_mean(*args_)))))
        if args.compile != "off":
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            post = torch.compile(piflow.gm_posterior_mean, mode=mode, dynamic=False)
            rows.append((f"compile ({mode})", safe(lambda: timer(lambda: post(*args_)))))
        if device.type == "cuda":  # one substep of the fused rollout = one posterior + one Euler update
            tau = float(piflow.unwarp_time(0.5))
            rows.append(("fused (1-substep rollout)", safe(lambda: timer(lambda: piflow.policy_rollout(
                policy, x_t, tau, 0.0, 1.0, 1, backend="fused")))))
    for name, ms in rows:
        if isinstance(ms, str):
            print(f"  {name:26s} {ms}")
            continue
        gbps = nbytes / ms / 1e6
        print(f"  {name:26s} {fmt(ms)}  {gbps:8.1f} GB/s  = {100 * gbps / (peak or measured):5.1f} % of "
              + ("peak" if peak else "measured copy bandwidth"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="small shapes and a small network (CPU, < 1 minute)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 16 64; small: 2 4)")
    p.add_argument("--K", type=int, default=None, help="GM components (default 32; small: 8)")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--res", type=int, default=None, help="latent resolution (default 32; small: 16)")
    p.add_argument("--posterior-batch", type=int, default=None, help="batch of section (3) (default 64; small: 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 20; small: 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; small: 2)")
    p.add_argument("--compile", default="auto", choices=["auto", "whole", "step", "off"],
                   help="torch.compile variant of the reference rollout: whole unrolled rollout, one substep, "
                        "or off (auto: whole for 32 substeps on CUDA, else step; compiling 128 unrolled substeps "
                        "takes minutes)")
    p.add_argument("--skip-train", action="store_true", help="skip section (2)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args()
    for name, full, small in [("batches", [16, 64], [2, 4]), ("K", 32, 8), ("res", 32, 16),
                              ("posterior_batch", 64, 4), ("repeats", 20, 5), ("warmup", 5, 2)]:
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else full)
    for name in ("K", "C", "res", "posterior_batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not accepted; expected an integer >= 1")
    if args.res % 2 or min(args.batches) < 1:
        p.error(f"--res={args.res} must be even (patch size 2) and --batches={args.batches} all >= 1")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        p.error(f"--device={args.device!r} is not accepted; expected a torch device such as cpu, cuda, cuda:1")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device={args.device} is not accepted here: CUDA is not available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({args.threads} threads)"
    print(f"device: {dev_name} | torch {torch.__version__} | triton "
          f"{piflow_kernels.triton.__version__ if piflow_kernels.triton else 'not installed'}"
          + ("" if device.type == "cuda" else " | fused kernel not timed: Triton needs CUDA"))
    print(f"medians of {args.repeats} calls after {args.warmup} warm-up calls"
          + (" (CUDA events)" if device.type == "cuda" else " (perf_counter)"))
    timer = Timer(device, args.repeats, args.warmup)
    args.net, args.net_name = make_net(args.small, args.res, args.C)
    args.net = args.net.to(device).eval()
    print(f"network: {args.net_name}, {sum(p.numel() for p in args.net.parameters()) / 1e6:.1f} M params")
    bw = bandwidth(device, timer)
    policy_cost(args, device, timer)
    if not args.skip_train:
        train_step_breakdown(args, device, timer)
    posterior_throughput(args, device, timer, bw)


if __name__ == "__main__":
    main()
