"""π-ID distillation of a diffusers text-to-image model into a few-step π-Flow student (Alg. 2 / Alg. 3, Table 9).

    python train_t2i.py --model flux --prompts prompts.txt --out runs/piflux            # gmflux-k8-4nfe, data-free
    python train_t2i.py --model flux2 --prompts prompts.txt --out runs/piflux2          # gmflux2-k8-4nfe
    python train_t2i.py --model qwen --data images/ --data-dependent --out runs/piqwen   # Alg. 2 on an image folder
    python train_t2i.py --model sd3 --base stabilityai/stable-diffusion-3.5-medium --prompts prompts.txt
    torchrun --standalone --nproc_per_node=8 train_t2i.py --model flux --prompts prompts.txt --out runs/piflux
    python train_t2i.py --model flux --prompts prompts.txt --out runs/piflux --resume --steps 4000
    python train_t2i.py --model flux --prompts p.txt --eval-clip openai/clip-vit-large-patch14 --eval-every 500
    python train_t2i.py --model qwen --help                     # every flag, with the preset's defaults

A thin command line over trainer.py, and the trainer attachment of t2i.py's students: --model picks the base (a row
of t2i.FAMILIES), --preset a row of trainer.PRESETS (default gm<model>-k8-4nfe); flags derive from
piflow.PiIDConfig, trainer.TrainConfig and Options below. The EMA student is exported as an adapter to OUT/adapter
(or --export); sample.py / pipelines.piflow_pipeline read it.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from runtime import common
import piflow
from models import t2i
from runtime import trainer

MODELS = dict.fromkeys(t2i.FAMILIES, __name__)           # --model -> the attachment module (this file)
DEFAULT_PRESET = {m: f"gm{m}-k8-4nfe" for m in t2i.FAMILIES}
DESCRIPTION = "pi-ID distillation of a diffusers text-to-image model into a LoRA + policy-head adapter."


@dataclass(frozen=True)
class Options:
    model: str = "flux"                # base model: flux | flux2 | qwen | sd3 (set by --model)
    base: Optional[str] = None         # diffusers folder or hub id of the base; None = the row's official repo
    policy: str = "gm"                 # student policy head: gm (GMFlow) | dx (DX grid)
    K: int = 8                         # Gaussians per pixel (GM)
    N: int = 10                        # grid points (DX)
    lora_rank: int = 256               # LoRA rank r (alpha = r); an --init-adapter must have this rank
    lora_dropout: float = 0.05         # LoRA dropout
    init_adapter: Optional[str] = None  # start from this adapter (folder, released id or owner/repo:subfolder)
    prompts: Optional[str] = None      # text file, one prompt per line (data-free pi-ID)
    data: Optional[str] = None         # folder of images + same-name .txt captions (latents for --data-dependent)
    embed_cache: Optional[str] = None  # embeddings (+ latents) cache file; None = <prompts>.<model>.pt next to them
    max_text_len: Optional[int] = None  # text tokens; None = the base pipeline's (512; SD3: 256)
    resolution: int = 1024             # training image size (a multiple of 16)
    grad_checkpointing: bool = True    # gradient checkpointing of the transformer blocks (recipe §4.9)
    eval_clip: Optional[str] = None    # CLIP model (hub id or folder) for a CLIP score at every --eval-every
    eval_prompts: int = 8              # prompts (the first cached ones) of that CLIP score

    def __post_init__(self):
        for name, ok, accepted in [
                ("model", self.model in t2i.FAMILIES, " | ".join(t2i.FAMILIES)),
                ("policy", self.policy in ("gm", "dx"), "gm | dx"),
                ("K", self.K >= 1, "an integer >= 1"), ("N", self.N >= 2, "an integer >= 2"),
                ("lora_rank", self.lora_rank >= 0, "an integer >= 0 (0 = no LoRA)"),
                ("lora_dropout", 0 <= self.lora_dropout < 1, "a value in [0, 1)"),
                ("max_text_len", (self.max_text_len or 1) >= 1, "an integer >= 1"),
                ("resolution", self.resolution >= 16 and self.resolution % 16 == 0, "a positive multiple of 16"),
                ("eval_prompts", self.eval_prompts >= 1, "an integer >= 1")]:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; expected {accepted}")


FLAG_ALIASES = {"policy": ["--head"]}           # old underscore spellings: common.hyphenate accepts them all


def new_student(opts, cfg, tr, dtype):
    """A fresh student on base `tr`: the head initialised from the teacher's proj_out, then the LoRA (B = 0)."""
    fam = t2i.FAMILIES[opts.model]
    student = t2i.T2IStudent(fam, tr, t2i.Head(opts.policy, opts.K, opts.N), dtype, piflow.dx_grid(cfg))
    if opts.lora_rank:
        student.add_lora(fam.lora(tr), opts.lora_rank, opts.lora_dropout)
    return student


class T2IAttachment:
    """trainer.py attachment: LoRA + head student on a diffusers base; the base (LoRA off) is the teacher, with
    CFG against the cached empty-prompt negative for a 'cfg' row."""
    sharded, autocast = True, True

    def __init__(self, opts, cfg, tc, student, cache, device, clip=None):
        self.opts, self.cfg, self.tc, self.student, self.cache, self.device = opts, cfg, tc, student, cache, device
        self.fam, self.clip, self._eval = student.fam, clip, None
        h = opts.resolution // t2i.VAE_SCALE
        self.noise_shape = (self.fam.channels, h, h)
        self.teacher = student.teacher
        if self.fam.guidance == "cfg" and tc.guidance != 1:
            neg = t2i.make_cond(self.fam, cache, torch.tensor([0]), device, prefix="negative_")
            self.teacher = piflow.guided_teacher(student.teacher, tc.guidance, neg, tuple(tc.guidance_interval))

    def trainable(self):
        return self.student.trainable()

    def _idx(self, n, g):
        return torch.randint(len(self.cache["prompts"]), (n,), generator=g, device=g.device).cpu()

    def sample_cond(self, n, g):
        return t2i.make_cond(self.fam, self.cache, self._idx(n, g), self.device, self.tc.guidance)

    def sample_data(self, n, g):
        idx = self._idx(n, g)
        return self.cache["latents"][idx].to(self.device).float(), t2i.make_cond(self.fam, self.cache, idx,
                                                                                self.device, self.tc.guidance)

    @torch.no_grad()
    def evaluate(self, student):
        """CLIP score (metrics.clip_score, torchmetrics) of the student's images of the first --eval-prompts cached
        prompts from fixed noise ('auto' temperature), decoded with the base's VAE (loaded at the first call)."""
        if self.clip is None:
            return {}
        from runtime import metrics
        if self._eval is None:
            vae = t2i.load_pretrained(self.fam.vae, self.opts.base or self.fam.repo, "vae", self.student.dtype)
            idx = torch.arange(min(self.opts.eval_prompts, len(self.cache["prompts"])))
            noise = torch.randn((len(idx),) + self.noise_shape, generator=torch.Generator().manual_seed(1234))
            self._eval = vae.to(self.device), idx, noise.to(self.device)
        vae, idx, noise = self._eval
        was_training = student.training
        student.eval()
        x = piflow.sample(student, noise, t2i.make_cond(self.fam, self.cache, idx, self.device, self.tc.guidance),
                          temperature="auto")
        student.train(was_training)
        images = ((t2i.decode(self.fam, vae, x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return {"clip": metrics.clip_score(images, [self.cache["prompts"][i] for i in idx.tolist()], self.clip)}

    def shard(self, mesh):
        """FSDP2: one unit per transformer block and per GM head layer (they run outside the diffusers forward),
        then the root; frozen weights stay in the compute dtype, trainables fp32, all-gathered in the compute dtype."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        tr, dtype = self.student.tr, self.student.dtype
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        heads = self.student.heads() if self.student.head.policy == "gm" else []
        for m in [b for blocks in tr.children() if isinstance(blocks, nn.ModuleList) for b in blocks] + heads:
            fully_shard(m, mesh=mesh, mp_policy=mp)
        # the root reshards after every forward too: after a no-grad one (teacher, the trainer's final validation)
        # it would otherwise keep its unsharded parameters registered, which the optimizer does not hold
        fully_shard(tr, mesh=mesh, mp_policy=mp, reshard_after_forward=True)

    def export(self, path, ema):
        """The published adapter layout from the EMA weights (fp16), written as a new version of `path`."""
        tensors = {k: v.half() for k, v in ema.items()}
        common.check_finite(tensors, f"--export={path!r} (fp16)")
        common.publish_dir(path, lambda folder: t2i.write_adapter(folder, self.student, tensors, self.cfg,
                                                                  self.tc.guidance))


def attach(opts, cfg, tc, settings, device, dtype):
    """train_t2i.py --model M: every user error first, then the cache, then the base model."""
    fam = t2i.FAMILIES[opts.model]
    base = opts.base or fam.repo
    adapter = t2i.read_adapter(opts.init_adapter, opts.model, "--init-adapter") if opts.init_adapter else None
    if adapter:
        size = lambda hd: (hd.policy, hd.K if hd.policy == "gm" else hd.N)
        if size(adapter[0]) != size(t2i.Head(opts.policy, opts.K, opts.N)):
            p, n = size(adapter[0])
            raise common.UserError(f"--init-adapter={opts.init_adapter!r} has a {p} head of size {n}; pass --policy "
                                   f"{p} --{'K' if p == 'gm' else 'N'} {n}")
        if adapter[3] != opts.lora_rank:
            raise common.UserError(f"--lora-rank={opts.lora_rank} differs from --init-adapter's LoRA rank "
                                   f"{adapter[3]}; pass --lora-rank {adapter[3]}")
    if fam.guidance == "distilled" and tc.guidance_interval != (0.0, 1.0):
        raise common.UserError(f"--guidance-interval applies to CFG; --model {opts.model} takes a distilled guidance")
    clip = None
    if opts.eval_clip:
        from runtime import metrics
        clip = metrics.load_clip(opts.eval_clip, "--eval-clip")
    cache = t2i.training_cache(opts, fam, base, tc, device, dtype)
    tr = t2i.load_pretrained(fam.transformer, base, "transformer", dtype)
    if adapter:
        student = t2i.student_from_adapter(opts.model, tr, opts.init_adapter, "--init-adapter", dtype,
                                           opts.lora_dropout, adapter)[0]
        if opts.policy == "dx":
            student.policy_config.update(piflow.dx_grid(cfg))
    else:
        student = new_student(opts, cfg, tr, dtype)
    for p in student.trainable(train=True).values():                      # fp32 masters (recipe §4.10)
        p.data = p.data.float()
    if opts.grad_checkpointing:
        tr.enable_gradient_checkpointing()
    return T2IAttachment(opts, cfg, tc, student.to(device), cache, device, clip)


def main(argv=None):
    """Train; returns (attachment, EMA tensors) of rank 0. The adapter goes to OUT/adapter unless --export is given."""
    return trainer.main("train_t2i.py", argv, "model", MODELS, DEFAULT_PRESET, DESCRIPTION, export="adapter")


if __name__ == "__main__":
    main()
