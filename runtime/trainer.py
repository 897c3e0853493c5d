"""The one π-ID training loop (paper Alg. 2 data-dependent / Alg. 3 data-free) and its checkpoints.

    train(build, cfg, tc, settings, rc)    build(device, dtype) -> Attachment; cfg piflow.PiIDConfig, tc TrainConfig,
                                           rc RunConfig (out folder, resume, export, cadences); -> (att, EMA tensors)
    Attachment                             what a model gives the loop (models/toy.py, sit.py, t2i.py subclass it)
    PRESETS                                named rows of the paper's Tables 8 and 9
    parse, main                            the command lines of train_imagenet.py / train_t2i.py (flags from the
                                           dataclasses)

Micro-batch i of step s draws all its randomness from its own generator seeded by (seed, s, i) and ranks take
disjoint micro-batches, so 1 or N processes (and a resumed run) compute the same gradients up to float summation
order. The guard runs from step 0: a step whose loss or gradient norm is non-finite, or whose loss exceeds
max_loss_ratio x the median of recent good losses, is not applied; max_skips bad steps in a row stop the run
(exit != 0). A checkpoint of the weights after step s is written only once step s + 1's loss, computed with
them, has passed the guard, so a diverged or NaN state is never written over a good one.

Checkpoint: one file OUT/ckpt.pt written atomically (temporary file, fsync, os.replace): trainable weights, EMA,
optimizer (gathered to full tensors under FSDP2, so any world size can resume), step, run settings. It holds
plain tensors and is read with torch.load(weights_only=True). OUT/.lock keeps a second run out of OUT.
"""
import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from runtime import common
import piflow


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500                  # total training steps
    batch_size: int = 64               # global batch size (all ranks)
    micro_batch: int = 0               # samples per micro-batch; 0 = batch_size / world size (one per rank)
    lr: float = 1e-3                   # AdamW learning rate, betas (0.9, 0.95), no weight decay
    warmup: int = 50                   # linear LR warm-up steps from 0.001 lr (0: the full rate from step 0)
    cosine: bool = False               # cosine-decay the LR to 0 after warm-up (published runs: constant)
    grad_clip: float = 50.0            # gradient-norm clip
    clip_start: int = 0                # step from which gradients are clipped (the non-finite guard runs always)
    ema_start: int = 50                # EMA start step (the EMA copies the weights before it)
    ema_gamma: float = 7.0             # Karras EMA power
    seed: int = 0                      # seed of the initialisation and of every micro-batch's randomness
    guidance: float = 1.0              # teacher guidance scale (CFG; FLUX: distilled guidance input)
    guidance_interval: Tuple[float, float] = (0.0, 1.0)  # sigma interval where CFG applies (inclusive)
    data_dependent: bool = False       # Alg. 2: source states from diffused data (default: data-free Alg. 3)
    optimizer: str = "adamw"           # adamw | adamw8bit (bitsandbytes)
    dtype: str = "auto"                # compute dtype: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    max_skips: int = 20                # stop (exit != 0) after this many bad steps in a row
    max_loss_ratio: float = 1000.0     # a loss above this x the median of recent good losses is a bad step

    def __post_init__(self):
        piflow.check_fields(self, [
            ("steps", self.steps >= 1, "an integer >= 1"), ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("micro_batch", self.micro_batch >= 0 and (self.micro_batch == 0 or self.batch_size % self.micro_batch
                                                       == 0), f"0 or a divisor of batch_size={self.batch_size}"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "a finite value > 0"),
            ("warmup", self.warmup >= 0, "an integer >= 0"), ("grad_clip", self.grad_clip > 0, "> 0"),
            ("ema_gamma", self.ema_gamma > 0, "> 0"), ("guidance", math.isfinite(self.guidance), "a finite value"),
            ("optimizer", self.optimizer in ("adamw", "adamw8bit"), "adamw or adamw8bit"),
            ("dtype", self.dtype in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"),
            ("max_skips", self.max_skips >= 1, "an integer >= 1"),
            ("max_loss_ratio", self.max_loss_ratio > 1, "a value > 1")])


# Named presets: one row of the paper's tables (or the shipped toy recipe) each. A preset sets defaults;
# explicit flags still win. Keys are TrainConfig / PiIDConfig / attachment option fields.
# Settings shared by every row of Table 8 (ImageNet 256, GM students of SiT-XL/2 size, data-dependent) and of
# Table 9 (text-to-image: LoRA r=256 + head, 4 NFE, shift 3.2, final step 0.5, micro-window 3); each row below
# adds what differs.
TABLE8 = dict(teacher="sit", policy="gm", K=32, guidance_interval=(0.0, 0.7), gm_dropout=0.05, loss_scale=3.0,
              lr=5e-5, warmup=400, clip_start=400, ema_start=400, batch_size=4096, steps=140000, data_dependent=True)
TABLE9 = dict(nfe=4, shift=3.2, final_step_scale=0.5, window_substeps=3, loss_scale=30.0, lr=1e-4, warmup=100,
              clip_start=100, ema_start=100, batch_size=256, micro_batch=2)
PRESETS = {
    # toy teacher (toy.py): the default run, and the embedded toy student's recipe (assets/README.md)
    "toy": dict(teacher="toy", policy="gm", K=8, nfe=4, lr=3e-5),
    "toy-gm-k8-4nfe": dict(teacher="toy", policy="gm", K=8, nfe=4, steps=2000, batch_size=64, lr=3e-5, cosine=True),
    # the shipped digits student (docs/digits.md): Table 8's recipe on the digits DiT teacher (pixels, no VAE), sized
    # for a CPU; --policy dx / --nfe / --data-dependent --latents give the other students of the digits table
    "digits-gm-k8-4nfe": dict(TABLE8, teacher_ckpt="assets/digits_teacher", vae="none", K=8, nfe=4, guidance=1.5,
                              lr=1e-4, warmup=50, clip_start=50, ema_start=50, batch_size=32, steps=800,
                              data_dependent=False),
    # Table 8
    "gmrepa-k32-1nfe": dict(TABLE8, teacher_ckpt="repa", nfe=1, guidance=3.2),
    "gmrepa-k32-2nfe": dict(TABLE8, teacher_ckpt="repa", nfe=2, guidance=2.8, steps=24000),
    "gmdit-k32-1nfe": dict(TABLE8, teacher_ckpt="flowdit", nfe=1, guidance=2.7, guidance_interval=(0.0, 0.6)),
    # Table 9
    "gmflux-k8-4nfe": dict(TABLE9, model="flux", policy="gm", K=8, num_intermediate=4, gm_dropout=0.1,
                           decay_iters=2000, guidance=3.5, steps=3000),
    "gmflux-k8-8nfe": dict(TABLE9, model="flux", policy="gm", K=8, nfe=8, num_intermediate=4, gm_dropout=0.1,
                           decay_iters=2000, guidance=3.5, steps=3000),
    "dxflux-n10-4nfe": dict(TABLE9, model="flux", policy="dx", N=10, num_intermediate=4, decay_iters=2000,
                            guidance=3.5, steps=3000),
    "gmqwen-k8-4nfe": dict(TABLE9, model="qwen", policy="gm", K=8, num_intermediate=2, gm_dropout=0.1, guidance=4.0,
                           steps=9000),
    "dxqwen-n10-4nfe": dict(TABLE9, model="qwen", policy="dx", N=10, num_intermediate=2, guidance=4.0, steps=9000),
    # pi-FLUX.2 (released gmflux2_k8_piid_4step): NFE 4, shift 3.2, final step 0.5, embedded guidance 4.0 are
    # published; the other values are FLUX.1's (gmflux-k8-4nfe)
    "gmflux2-k8-4nfe": dict(TABLE9, model="flux2", policy="gm", K=8, num_intermediate=4, gm_dropout=0.1,
                            decay_iters=2000, guidance=4.0, steps=3000),
    # SD3 / SD3.5 (not in the paper): Qwen-Image's recipe with SD3.5's CFG 3.5
    "gmsd3-k8-4nfe": dict(TABLE9, model="sd3", policy="gm", K=8, num_intermediate=2, gm_dropout=0.1, guidance=3.5,
                          steps=9000),
}

# Settings that may change when a run is resumed; every other setting is the run's identity.
RUN_KEYS = ("steps", "out", "resume", "overwrite", "export", "log_every", "ckpt_every", "eval_every",
            "progress", "threads", "max_skips", "max_loss_ratio", "preset")


@dataclass(frozen=True)
class RunConfig:
    out: str = "runs/toy"              # run folder: ckpt.pt, log.txt
    resume: bool = False               # continue OUT/ckpt.pt (same settings, larger --steps)
    overwrite: bool = False            # start afresh in an OUT that holds a checkpoint (replaced only by a good new one)
    export: Optional[str] = None       # also write the EMA student here at every checkpoint (sample.py reads it; train_t2i.py: OUT/adapter)
    log_every: int = 50                # log the loss every N steps
    ckpt_every: int = 500              # checkpoint every N steps; 0 = at the end only
    eval_every: int = 500              # evaluate the EMA student every N steps; 0 = off
    threads: int = 0                   # torch CPU threads per process; 0 = torch's default
    progress: bool = True              # a tqdm progress bar on rank 0

    def __post_init__(self):
        piflow.check_fields(self, [(k, getattr(self, k) >= 0, "an integer >= 0")
                                   for k in ("log_every", "ckpt_every", "eval_every", "threads")])


#################################################################################
#                 The attachment: what a model gives the trainer                #
#################################################################################

class Attachment:
    """The one contract between a model and the loop (toy, SiT, text-to-image and any own teacher subclass it).

    A subclass sets
        student       nn.Module, student(x_t, sigma, cond) -> policy (piflow.GMPolicy / DXPolicy)
        teacher       teacher(x_t, sigma, cond) -> u, guidance already applied
        noise_shape   (C, H, W) of one sample
        num_classes   labels of a class-conditional model are drawn from [0, num_classes); None: unconditional
    and may override trainable / sample_cond / sample_data, or give loss(step, g, n, backward) (a non-π-ID baseline),
    evaluate(student) -> {name: float}, export(path, ema) and shard(mesh) (FSDP2, with sharded = True).
    """
    sharded = False                    # True: FSDP2 over ranks via shard(mesh); False: replicated, grads all-reduced
    autocast = True                    # run the losses under autocast in the compute dtype (bf16 on CUDA)
    num_classes = None
    loss = evaluate = export = shard = None

    def trainable(self):
        """{name: parameter} that the optimizer trains: every student parameter (LoRA students: LoRA + heads)."""
        return dict(self.student.named_parameters())

    def sample_cond(self, n, g):
        """Conditions of n samples from generator g: uniform class labels, or None (unconditional)."""
        if self.num_classes is None:
            return None
        return torch.randint(self.num_classes, (n,), generator=g, device=g.device)

    def sample_data(self, n, g):
        """(x0, cond) of n training samples (data-dependent π-ID, Alg. 2)."""
        raise common.UserError("--data-dependent: this model has no training data; train data-free (Alg. 3)")


#################################################################################
#                                   The loop                                    #
#################################################################################

def lr_at(step, tc):
    """Linear warm-up from 0.001 lr over tc.warmup steps (published configs; 0: none), then constant or cosine
    decay to 0 at tc.steps."""
    lr = tc.lr * min(1.0, 0.001 + (1 - 0.001) * step / tc.warmup) if tc.warmup else tc.lr
    if tc.cosine and step >= tc.warmup:
        lr = 0.5 * tc.lr * (1 + math.cos(math.pi * (step - tc.warmup) / max(tc.steps - tc.warmup, 1)))
    return lr


class Diverged(Exception):
    """The guard stopped the run: too many bad steps in a row, or final weights that fail it."""


def micro_seed(seed, step, i):
    return (seed * 1_000_003 + step) * 65_537 + i


def micro_loss(att, cfg, tc, step, g, n, backward):
    """One micro-batch of n samples: π-ID (Alg. 2 or Alg. 3), or the attachment's own baseline loss."""
    if att.loss is not None:
        return att.loss(step, g, n, backward)
    if tc.data_dependent:
        x0, cond = att.sample_data(n, g)
        loss = piflow.piid_data_dependent(att.student, att.teacher, x0, cond, cfg, step, g)
        backward(loss)
        return loss.detach()
    cond = att.sample_cond(n, g)
    noise = torch.randn((n,) + tuple(att.noise_shape), generator=g, device=g.device)
    return piflow.piid_data_free(att.student, att.teacher, noise, cond, cfg, step, g, backward=backward)


class Run:
    """Process group, lock and log of one training run (rank 0 holds the lock and writes the log)."""

    def __init__(self, rc):
        self.ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        if self.ddp:
            dist.init_process_group("nccl" if cuda else "gloo")
            if cuda:
                torch.cuda.set_device(self.device)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.ddp else (0, 1)
        self.rc, self.ckpt = rc, os.path.join(rc.out, "ckpt.pt")
        self.lock, self.log = None, None

    def agree(self, ok):
        """All ranks learn whether every rank succeeded (a lock refused on rank 0 stops all of them)."""
        if not self.ddp:
            return ok
        t = torch.tensor([int(ok)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def take_lock(self):
        err = None
        if self.rank == 0:
            try:
                common.check_writable(self.rc.out, "--out", is_dir=True)
                self.lock = common.RunLock(self.rc.out)
            except common.UserError as e:
                err = e
        if not self.agree(err is None):
            raise err or common.UserError("rank 0 could not take the --out lock")

    def say(self, msg, bar=None):
        if self.rank:
            return
        (bar.write if bar is not None else print)(msg)
        sys.stdout.flush()
        if self.log is None:
            self.log = open(os.path.join(self.rc.out, "log.txt"), "a")
        self.log.write(msg + "\n")
        self.log.flush()

    def close(self):
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()
        if self.ddp:
            dist.barrier()
            dist.destroy_process_group()


def read_checkpoint(path, settings, steps):
    """Load ckpt.pt (weights_only) and refuse a resume whose settings differ or whose --steps is not larger."""
    ck = common.load_tensors(path, "--resume: checkpoint")
    if not isinstance(ck, dict) or not {"step", "settings", "student", "ema", "opt"} <= set(ck):
        raise common.UserError(f"--resume: {path!r} is not a piflow training checkpoint")
    old = ck["settings"]
    diff = [k for k in sorted(set(old) | set(settings)) if k not in RUN_KEYS and old.get(k) != settings.get(k)]
    if diff:
        k = diff[0]
        raise common.UserError(f"--resume: {common.flag(k)}={settings.get(k)!r} differs from the checkpoint's "
                               f"{old.get(k)!r} ({len(diff)} setting(s) differ: {', '.join(diff)}); resume with the "
                               "checkpoint's settings or start a new --out")
    if steps <= ck["step"]:
        raise common.UserError(f"--steps={steps} is not accepted; expected a value > {ck['step']}, the "
                               "checkpoint's step")
    return ck


def full_tensors(named):
    """{name: full CPU tensor} (gathers FSDP2 DTensor shards; collective)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone() for k, v in named.items()}


@torch.no_grad()
def load_into(named, full):
    """Copy full tensors into (possibly sharded) parameters / EMA tensors."""
    for k, p in named.items():
        v = full[k].to(p.device, p.dtype) if not hasattr(p, "full_tensor") else full[k]
        if hasattr(p, "full_tensor"):
            from torch.distributed.tensor import distribute_tensor
            v = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)
        p.copy_(v)


@torch.no_grad()
def swap(params, values):
    """Exchange parameter values with `values` in place (EMA in for evaluation, and back)."""
    for k, p in params.items():
        tmp = p.detach().clone()
        p.copy_(values[k])
        values[k].copy_(tmp)


def make_optimizer(params, tc, say):
    cls = torch.optim.AdamW
    if tc.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
            cls = bnb.optim.AdamW8bit
        except ImportError:
            say("--optimizer adamw8bit: bitsandbytes is not installed; using torch AdamW")
    return cls(list(params.values()), lr=tc.lr, betas=(0.9, 0.95), weight_decay=0.0)


def train(build, cfg, tc, settings, rc):
    """Run π-ID; returns (attachment, {name: EMA tensor}).

    build(device, dtype) -> Attachment. cfg: piflow.PiIDConfig, tc: TrainConfig, rc: RunConfig. settings: every
    setting of the run (stored in the checkpoint, checked on resume; settings_of(cfg, tc, ...)).
    """
    if rc.threads:
        torch.set_num_threads(rc.threads)
    torch.set_flush_denormal(True)                            # denormals make the CPU GM posterior very slow
    run = Run(rc)
    try:
        t = Training(run, build, cfg, tc, settings)
        t.loop()
        return t.att, t.ema
    finally:
        run.close()


class Training:
    """One run's state: set-up (__init__), the step loss and its guard, one optimizer step, checkpoints, the loop."""

    def __init__(self, run, build, cfg, tc, settings):
        rc, world = run.rc, run.world
        # --- every user error before heavy work: resume / overwrite, the batch split, the lock, the checkpoint
        has_ckpt = os.path.exists(run.ckpt)
        if rc.resume and not has_ckpt:
            raise common.UserError(f"--resume: no checkpoint at {run.ckpt!r}; train without --resume first")
        if not rc.resume and has_ckpt and not rc.overwrite:
            raise common.UserError(f"--out={rc.out!r} already holds ckpt.pt; pass --resume to continue or "
                                   "--overwrite to start afresh")
        micro = tc.micro_batch or tc.batch_size // world
        n_micro = tc.batch_size // micro if micro else 0
        if not micro or tc.batch_size % micro or n_micro % world:
            raise common.UserError(f"--batch-size={tc.batch_size} / --micro-batch={tc.micro_batch} do not split "
                                   f"over {world} process(es); expected a number of micro-batches divisible by {world}")
        if rc.export:
            common.check_writable(rc.export, "--export")
        run.take_lock()
        ck = read_checkpoint(run.ckpt, settings, tc.steps) if rc.resume else None
        # --- model (identical initialisation on every rank), optimizer, EMA
        torch.manual_seed(tc.seed)
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(tc.dtype) or \
            (torch.bfloat16 if run.device.type == "cuda" else torch.float32)
        self.att = att = build(run.device, dtype)
        att.student.piid_config = cfg                        # the sampler keeps the training schedule
        flag = "--micro-batch" if tc.micro_batch else "--batch-size"          # noise + a few states per sample
        common.check_memory(4 * micro * math.prod(att.noise_shape) * torch.finfo(dtype).bits // 8, flag,
                            tc.micro_batch or tc.batch_size, f"the states of one micro-batch of {micro}")
        self.sharded = world > 1 and att.sharded
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh
            att.shard(init_device_mesh(run.device.type, (world,)))
        self.params = att.trainable()
        self.opt = make_optimizer(self.params, tc, run.say)
        self.ema = {k: p.detach().clone().float() for k, p in self.params.items()}
        self.start, self.recent = 0, []
        if ck is not None:
            load_into(self.params, ck["student"])
            load_into(self.ema, ck["ema"])
            load_optimizer(self.opt, att.student, ck["opt"])
            self.start, self.recent = ck["step"], list(ck.get("recent_losses", []))
        self.autocast = torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32 and
                                       not self.sharded and att.autocast)
        self.run, self.cfg, self.tc, self.settings = run, cfg, tc, settings
        self.micro, self.n_micro, self.n_local = micro, n_micro, n_micro // world
        run.say(f"pi-ID {'data-dependent' if tc.data_dependent else 'data-free'} | preset {settings.get('preset')} | "
                f"world {world} | {n_micro} micro-batches of {micro} | trainable "
                f"{sum(p.numel() for p in self.params.values()) / 1e6:.2f} M | steps {self.start} -> {tc.steps}")

    def step_loss(self, step, backward):
        """Loss of `step` over this rank's micro-batches (summed over ranks), gradients via backward()."""
        run, total = self.run, torch.zeros((), device=self.run.device)
        for i in range(run.rank * self.n_local, (run.rank + 1) * self.n_local):
            seed = micro_seed(self.tc.seed, step, i)
            torch.manual_seed(seed)                           # module-internal randomness (LoRA dropout)
            g = torch.Generator(device=run.device).manual_seed(seed)
            with self.autocast:
                total += micro_loss(self.att, self.cfg, self.tc, step, g, self.micro, backward).float() / self.n_micro
        if run.world > 1:
            dist.all_reduce(total)
        return total

    def is_bad(self, loss, gnorm):
        """The guard: why this step must not be applied, or None."""
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            return f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
        if self.recent and loss > self.tc.max_loss_ratio * statistics.median(self.recent):
            return f"loss {loss:.3g} > {self.tc.max_loss_ratio:g} x the median of recent losses"
        return None

    def gradients(self, step):
        """Loss and gradients of `step` (averaged over ranks), clipped from tc.clip_start: (loss, pre-clip norm)."""
        self.opt.zero_grad(set_to_none=False)
        loss = float(self.step_loss(step, lambda l: (l / self.n_local).backward()))
        if self.run.world > 1 and not self.sharded:           # replicated: average gradients over ranks
            for p in self.params.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(self.run.world)
        clip = self.tc.grad_clip if step >= self.tc.clip_start else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip)
        return loss, float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)

    def save(self, step):
        """One consistent unit: weights, EMA, optimizer, step and settings in one atomically replaced file."""
        run, att = self.run, self.att
        state = {"step": step, "settings": self.settings, "student": full_tensors(self.params),
                 "ema": full_tensors(self.ema), "opt": optimizer_state(self.opt, att.student),
                 "recent_losses": list(self.recent)}
        if run.rank == 0:
            try:
                common.check_finite(state["student"], "checkpoint")
                common.check_finite(state["ema"], "checkpoint EMA")
                if run.rc.export and att.export is not None:      # derived files first: ckpt.pt is the commit
                    att.export(run.rc.export, state["ema"])
            except common.NonFinite as e:
                raise Diverged(f"{e}; nothing written, {run.ckpt!r} keeps the last good step") from None
            common.save_torch(state, run.ckpt)
        if run.world > 1:
            dist.barrier()

    def evaluate(self, done, bar):
        """Metrics of the EMA weights (swapped in and back)."""
        swap(self.params, self.ema)
        m = self.att.evaluate(self.att.student) if self.run.rank == 0 or self.sharded else {}
        swap(self.params, self.ema)
        self.run.say(f"step {done} | eval EMA: " + " ".join(f"{k} {v:.4f}" for k, v in m.items()), bar)

    def loop(self):
        """Steps start .. tc.steps. A bad step is not applied; a checkpoint due after step s is written once step
        s + 1's loss with those weights has passed the guard; the final weights get one more validating loss."""
        run, rc, tc = self.run, self.run.rc, self.tc
        steps = bar = None
        steps = range(self.start, tc.steps)
        if run.rank == 0 and rc.progress:
            from tqdm import tqdm
            steps = bar = tqdm(steps, initial=self.start, total=tc.steps, desc="pi-ID", dynamic_ncols=True)
        pending, skips, t_log, window = False, 0, time.time(), []
        self.att.student.train()
        for step in steps:
            for group in self.opt.param_groups:
                group["lr"] = lr_at(step, tc)
            loss, gnorm = self.gradients(step)
            bad, done = self.is_bad(loss, gnorm), step + 1
            if bad:                                           # not applied; the weights stay as they were
                skips += 1
                run.say(f"step {step}: {bad}; step skipped ({skips} in a row)", bar)
                if skips >= tc.max_skips:
                    raise Diverged(f"stopped after {skips} bad steps in a row (last: {bad}); the last good "
                                   f"checkpoint {run.ckpt!r} is untouched. Lower --lr or check the teacher.")
            else:
                skips = 0
                if pending:                                   # this step's loss validates the weights: save them
                    self.save(step)
                    pending = False
                self.opt.step()
                piflow.ema_update(self.ema, self.params, piflow.ema_beta(step, tc.ema_gamma, tc.ema_start))
                self.recent = (self.recent + [loss])[-100:]
                window.append(loss)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4g}")
            if rc.log_every and done % rc.log_every == 0 and window:
                run.say(f"step {done} | loss {sum(window) / len(window):.5f} | {len(window) / (time.time() - t_log):.2f}"
                        f" steps/s | lr {lr_at(step, tc):.3g}", bar)
                t_log, window = time.time(), []
            if rc.eval_every and done % rc.eval_every == 0 and self.att.evaluate is not None:
                self.evaluate(done, bar)
            if rc.ckpt_every and done % rc.ckpt_every == 0 and done < tc.steps:
                pending = True                                # written at the next good step (validated)
        with torch.no_grad():                                 # the final weights: one more loss on the next step's
            bad = self.is_bad(float(self.step_loss(tc.steps, lambda l: None)), 0.0)      # first micro-batches
        if bad:
            raise Diverged(f"the final weights fail the guard ({bad}); {run.ckpt!r} keeps the last good step")
        self.save(tc.steps)
        run.say(f"saved {run.ckpt} (step {tc.steps})" + (f"; exported {rc.export}" if rc.export else ""), bar)
        if bar is not None:
            bar.close()


#################################################################################
#                     Optimizer state: one file for any world size              #
#################################################################################

def optimizer_state(opt, model):
    """The full optimizer state keyed by parameter name (torch.distributed.checkpoint's full state dict): gathered
    from the FSDP2 shards when sharded, so a checkpoint resumes under any world size. Other optimizer classes
    (bitsandbytes) keep their own state_dict."""
    if not isinstance(opt, torch.optim.AdamW):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer(opt, model, state):
    """Inverse of optimizer_state, before the first backward (the parameters have no gradients yet)."""
    if not isinstance(opt, torch.optim.AdamW):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


#################################################################################
#                       Settings of a run, and the CLI glue                     #
#################################################################################

def settings_of(*configs, **extra):
    """One flat dict of every setting (dataclasses and extra values); tuples become lists (JSON-like)."""
    out = {}
    for c in configs:
        out.update(dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(c))
    out.update(extra)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def parse(prog, argv, select, modules, default_preset, description, export=None):
    """The training command line of a script: `select` (--teacher / --model) picks the attachment module,
    --preset a row of PRESETS whose values become the defaults (shown by --help), and the flags derive from
    piflow.PiIDConfig, TrainConfig and the module's Options. Returns (args, cfg, tc, opts, settings, module)."""
    import importlib
    argv = common.hyphenate(sys.argv[1:] if argv is None else argv)
    presets = sorted(k for k, v in PRESETS.items() if v.get(select) in modules)
    pre = argparse.ArgumentParser(prog=prog, add_help=False)
    pre.add_argument("--preset", choices=presets, default=None)
    pre.add_argument(common.flag(select), choices=sorted(modules), default=None)
    known = pre.parse_known_args(argv)[0]
    choice = getattr(known, select) or PRESETS.get(known.preset, {}).get(select) or next(iter(modules))
    preset_name = known.preset or default_preset.get(choice)
    preset = dict(PRESETS.get(preset_name) or {})
    if preset.get(select, choice) != choice:
        pre.error(f"--preset={preset_name!r} is for {common.flag(select)} {preset[select]}, not {choice}")
    module = importlib.import_module(modules[choice])
    shown = f"{common.flag(select)} {choice}" + (f", --preset {preset_name}." if preset_name else ".")
    p = argparse.ArgumentParser(prog=prog, description=f"{description} Defaults shown are those of {shown}")
    p.add_argument(common.flag(select), choices=sorted(modules), default=choice, help="the model to distill; "
                   "--help lists its own options (default: %(default)s)")
    p.add_argument("--preset", choices=presets, default=preset_name, help="a row of the paper's tables "
                   "(trainer.PRESETS); explicit flags override it (default: %(default)s)")
    common.add_flags(p.add_argument_group("pi-ID (piflow.PiIDConfig)"), piflow.PiIDConfig, preset)
    common.add_flags(p.add_argument_group("training (trainer.TrainConfig)"), TrainConfig, preset)
    common.add_flags(p.add_argument_group(f"{common.flag(select)} {choice} ({module.__name__}.Options)"),
                     module.Options, {k: v for k, v in preset.items() if k != select},
                     skip=(select,), aliases=getattr(module, "FLAG_ALIASES", None))
    common.add_flags(p.add_argument_group("run (trainer.RunConfig)"), RunConfig, {"out": f"runs/{choice}"})
    args = p.parse_args(argv)
    if args.export is None and export:                                  # e.g. the adapter of train_t2i.py
        args.export = os.path.join(args.out, export)
    setattr(args, select, choice)
    cfg, tc, opts, rc = (common.build(cls, args, p) for cls in (piflow.PiIDConfig, TrainConfig, module.Options,
                                                                 RunConfig))
    settings = settings_of(cfg, tc, opts, **{select: choice, "preset": args.preset})
    return rc, cfg, tc, opts, settings, module


def main(prog, argv, select, modules, default_preset, description, export=None):
    """A training script's main: parse, then train() under the one-line user-error policy. A run stopped by the
    guard exits 3 with one line. Returns (attachment, EMA tensors) of rank 0."""
    rc, cfg, tc, opts, settings, module = parse(prog, argv, select, modules, default_preset, description, export)
    build = lambda device, dtype: module.attach(opts, cfg, tc, settings, device, dtype)
    with common.user_errors(prog, sized_by="--batch-size / --micro-batch"):
        try:
            return train(build, cfg, tc, settings, rc)
        except Diverged as e:
            print(f"{prog}: stopped: {e}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None
