"""π-ID distillation of FLUX.1-dev / Qwen-Image into few-step π-Flow students (paper §4, Alg. 2 / Alg. 3).

    python train_t2i.py --model flux --prompts prompts.txt --out runs/piflux          # data-free (default)
    python train_t2i.py --model qwen --data images/ --out runs/piqwen                 # data-dependent
    torchrun --standalone --nproc_per_node=8 train_t2i.py --model flux ...            # FSDP2, bf16
    python sample.py --model flux --adapter runs/piflux/adapter --prompt "a cat" --nfe 4

The student is the stock diffusers transformer (never a copied forward) with
  * GM head (K=8): `proj_out` replaced by `proj_out_means` (D -> K*64), `proj_out_logweights` (D -> K*4) and
    `proj_out_logstds` (MLP on the detached time embedding), initialised from the teacher's `proj_out`
    (recipe §2.1, §6.2); or DX head (N=10): `proj_out` widened to N*64, teacher rows tiled N times (§6.4);
  * peft LoRA (r=256, alpha=r) on the published target lists (integration.md §3.2) + trainable `norm_out`.
The teacher is the same module with the LoRA disabled and the original `norm_out` / `proj_out` (frozen
copies, a few M params): no second copy of the 12-20 B trunk. Adapters are saved in the published layout
(config.json + diffusion_pytorch_model.safetensors, `policy_config` metadata) and the published ones load.

Latents: VAE latents (B, 16, H/8, W/8), packed 2x2 into tokens of 64 channels in (c, ph, pw) order.
Micro-batch i of step s draws all its randomness from a generator seeded by (seed, s, i) and ranks take
disjoint micro-batches, so 1 or N processes compute the same loss and gradients up to summation order.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import piflow

MODELS = {"flux": "black-forest-labs/FLUX.1-dev", "qwen": "Qwen/Qwen-Image"}
CLASS_NAMES = {("flux", "gm"): "GMFluxTransformer2DModel", ("qwen", "gm"): "GMQwenImageTransformer2DModel",
               ("flux", "dx"): "DXFluxTransformer2DModel", ("qwen", "dx"): "DXQwenImageTransformer2DModel"}
BASE_CLASS_NAMES = {"FluxTransformer2DModel": "flux", "QwenImageTransformer2DModel": "qwen"}
DX_SEGMENT, DX_SHIFT = 1 / 3.5, 3.2           # published DX policy kwargs
FLUX_GUIDANCE = 3.5                          # the only distilled guidance the GM/DX-FLUX adapters work with
QWEN_CFG = 4.0


def lora_targets(model, head, tr):
    """Published LoRA target lists (integration.md §3.2), as module-name suffixes for peft."""
    if model == "flux":
        t = ["proj_mlp", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
             "timestep_embedder.linear_1", "timestep_embedder.linear_2"]
        if head == "gm":       # root proj_out is gone, so 'proj_out' hits only the single blocks
            return t + ["proj_out"]
        return t + [f"single_transformer_blocks.{i}.proj_out" for i in range(len(tr.single_transformer_blocks))]
    n = len(tr.transformer_blocks)              # the last block's txt_mlp output is unused: excluded
    return (["img_mlp.net.0.proj", "img_mlp.net.2", "timestep_embedder.linear_1", "timestep_embedder.linear_2"]
            + [f"transformer_blocks.{i}.txt_mlp.net.0.proj" for i in range(n - 1)]
            + [f"transformer_blocks.{i}.txt_mlp.net.2" for i in range(n - 1)])


#################################################################################
#                          Latent packing (c, ph, pw)                           #
#################################################################################

def pack(x):
    """(B, C, H, W) -> (B, H/2 * W/2, 4C) tokens, channel = c*4 + ph*2 + pw (diffusers' _pack_latents)."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H // 2 * W // 2, C * 4)


def unpack(tokens, H, W, K=None):
    """(B, L, [K,] 4C) tokens -> (B, [K,] C, H, W), inverse of pack()."""
    B = tokens.shape[0]
    k = 1 if K is None else K
    x = tokens.reshape(B, H // 2, W // 2, k, -1, 2, 2).permute(0, 3, 4, 1, 5, 2, 6)
    x = x.reshape(B, k, -1, H, W)
    return x[:, 0] if K is None else x


#################################################################################
#                                   Student                                    #
#################################################################################

class T2IStudent(nn.Module):
    """Stock diffusers FLUX / Qwen-Image transformer + GM or DX head + LoRA; also serves as its own teacher.

    student(x_t (B,16,H,W), sigma (B,), cond) -> piflow.GMPolicy / piflow.DXPolicy on the unpacked latent grid;
    teacher(x_t, sigma, cond) -> u (B,16,H,W) with LoRA disabled and the original norm_out / proj_out.
    cond: {'prompt_embeds' (B,L,Dt), 'pooled' (B,Dp) + 'guidance' (B,) for FLUX | 'mask' (B,L) for Qwen}.
    """

    def __init__(self, tr, model, head="gm", K=8, N=10, lora_rank=256, lora_dropout=0.05, bias_noise=0.05,
                 seed=0, lora=True):
        super().__init__()
        self.model, self.head, self.K, self.N = model, head, K, N
        self.tr = tr
        D = tr.config.num_attention_heads * tr.config.attention_head_dim
        W_t, b_t = tr.proj_out.weight.detach().clone(), tr.proj_out.bias.detach().clone()   # (64, D), (64,)
        if W_t.shape[0] != 64:
            raise ValueError(f"base transformer proj_out has {W_t.shape[0]} outputs; expected 64 (a teacher)")
        # frozen teacher copies of the output layers (the trunk itself is shared)
        self.teacher_norm_out = _clone_module(tr.norm_out).requires_grad_(False)
        self.teacher_proj_out = nn.Linear(D, 64).to(W_t.dtype).requires_grad_(False)
        self.teacher_proj_out.weight.data.copy_(W_t), self.teacher_proj_out.bias.data.copy_(b_t)
        g = torch.Generator().manual_seed(seed)
        if head == "gm":      # recipe §6.2: replicate K times, bias noise N(0, .05^2) per (k, c) shared over 2x2
            del tr.proj_out
            tr.proj_out = _identity
            tr.proj_out_means = nn.Linear(D, K * 64).to(W_t.dtype)
            tr.proj_out_logweights = nn.Linear(D, K * 4).to(W_t.dtype)
            tr.proj_out_logstds = nn.Sequential(nn.SiLU(), nn.Linear(D, 1024), nn.SiLU(), nn.Linear(1024, 1)).to(W_t.dtype)
            noise = (torch.randn(K, 16, 1, generator=g) * bias_noise).expand(K, 16, 4).reshape(K * 64)
            with torch.no_grad():
                tr.proj_out_means.weight.copy_(W_t.repeat(K, 1))
                tr.proj_out_means.bias.copy_(b_t.repeat(K) + noise.to(b_t.dtype))
                tr.proj_out_logweights.weight.zero_(), tr.proj_out_logweights.bias.zero_()
                tr.proj_out_logstds[3].weight.zero_(), tr.proj_out_logstds[3].bias.fill_(math.log(0.05))
        elif head == "dx":    # recipe §6.4 grid mode: teacher projection tiled N times, grid-major (n, c, ph, pw)
            tr.proj_out = nn.Linear(D, N * 64).to(W_t.dtype)
            with torch.no_grad():
                tr.proj_out.weight.copy_(W_t.repeat(N, 1)), tr.proj_out.bias.copy_(b_t.repeat(N))
        else:
            raise ValueError(f"--head={head!r} is not supported; accepted: gm, dx")
        self._temb, self._teacher_mode = None, False
        tr.norm_out.register_forward_pre_hook(self._grab_temb, with_kwargs=True)
        tr.norm_out.register_forward_hook(self._swap_norm_out, with_kwargs=True)
        if head == "dx":
            tr.proj_out.register_forward_hook(self._swap_proj_out)
        if lora:
            self.add_lora(lora_rank, lora_dropout)
        else:
            tr.requires_grad_(False)
        self.trainable_prefixes = ("norm_out.", "proj_out_means.", "proj_out_logweights.", "proj_out_logstds.") \
            if head == "gm" else ("norm_out.", "proj_out.")
        for name, p in tr.named_parameters():
            if name.startswith(self.trainable_prefixes):
                p.requires_grad_(True)

    def add_lora(self, rank, dropout=0.05, targets=None):
        from peft import LoraConfig
        cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", lora_dropout=dropout,
                         target_modules=targets or lora_targets(self.model, self.head, self.tr))
        self.tr.add_adapter(cfg)         # freezes every non-LoRA parameter

    # --- hooks: capture temb for the logstd MLP; swap in the teacher's output layers in teacher mode
    def _grab_temb(self, module, args, kwargs):
        self._temb = args[1] if len(args) > 1 else kwargs.get("emb", kwargs.get("conditioning_embedding"))

    def _swap_norm_out(self, module, args, kwargs, output):
        if self._teacher_mode:
            return self.teacher_norm_out(*args, **kwargs)

    def _swap_proj_out(self, module, args, output):
        if self._teacher_mode:
            return self.teacher_proj_out(args[0])

    def trainable_named(self):
        return {n: p for n, p in self.tr.named_parameters() if p.requires_grad}

    def trunk(self, x_t, sigma, cond):
        """Run the diffusers forward on packed x_t; returns its output tokens (B, L, *)."""
        B, _, H, W = x_t.shape
        if H % 2 or W % 2:
            raise ValueError(f"latent size {H}x{W} must be even (image size a multiple of 16)")
        dtype = next(p for p in self.tr.parameters()).dtype
        sigma = piflow.as_batch(sigma, x_t).to(dtype)
        hidden = pack(x_t).to(dtype)
        if self.model == "flux":
            h, w = H // 2, W // 2
            img_ids = torch.zeros(h, w, 3, device=x_t.device)
            img_ids[..., 1] = torch.arange(h, device=x_t.device)[:, None]
            img_ids[..., 2] = torch.arange(w, device=x_t.device)[None, :]
            txt = cond["prompt_embeds"]
            guidance = cond.get("guidance")
            if guidance is not None:
                guidance = piflow.as_batch(guidance, x_t).to(dtype)
            return self.tr(hidden_states=hidden, encoder_hidden_states=txt.to(dtype),
                           pooled_projections=cond["pooled"].to(dtype), timestep=sigma,
                           img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(txt.shape[1], 3, device=x_t.device),
                           guidance=guidance, return_dict=False)[0]
        mask = cond["mask"]
        L = max(int(mask.sum(1).max()), 1)         # truncate the zero padding to the longest valid text
        return self.tr(hidden_states=hidden, encoder_hidden_states=cond["prompt_embeds"][:, :L].to(dtype),
                       encoder_hidden_states_mask=mask[:, :L], timestep=sigma,
                       img_shapes=[[(1, H // 2, W // 2)]] * B, return_dict=False)[0]

    def head_outputs(self, x_t, sigma, cond):
        """GM head: means (B,K,16,H,W), logweights (B,K,1,H,W) (log-softmax over K), logstds (B,1,1,1,1)."""
        H, W = x_t.shape[-2:]
        feat = self.trunk(x_t, sigma, cond)                                   # (B, L, D)
        B, L, _ = feat.shape
        means = unpack(self.tr.proj_out_means(feat).view(B, L, self.K, 64), H, W, self.K)
        logits = self.tr.proj_out_logweights(feat).view(B, L, self.K, 4)
        logweights = unpack(logits.float().log_softmax(2), H, W, self.K)
        logstds = self.tr.proj_out_logstds(self._temb.detach()).view(B, 1, 1, 1, 1)
        return means.float(), logweights, logstds.float()

    def forward(self, x_t, sigma, cond):
        sigma = piflow.as_batch(sigma, x_t)
        if self.head == "gm":
            means, logweights, logstds = self.head_outputs(x_t, sigma, cond)
            return piflow.GMPolicy(means, logweights, logstds, x_t, sigma)
        H, W = x_t.shape[-2:]
        grid = unpack(self.trunk(x_t, sigma, cond).view(x_t.shape[0], -1, self.N, 64), H, W, self.N)
        return piflow.DXPolicy(grid.float(), x_t, sigma, segment_size=DX_SEGMENT, shift=DX_SHIFT)

    @contextlib.contextmanager
    def teacher_mode(self):
        has_lora = getattr(self.tr, "_hf_peft_config_loaded", False)
        if has_lora:
            self.tr.disable_adapters()
        self._teacher_mode = True
        try:
            yield
        finally:
            self._teacher_mode = False
            if has_lora:
                self.tr.enable_adapters()

    @torch.no_grad()
    def teacher(self, x_t, sigma, cond):
        """Base model velocity u (B,16,H,W): LoRA off, original norm_out / proj_out."""
        H, W = x_t.shape[-2:]
        with self.teacher_mode():
            out = self.trunk(x_t, sigma, cond)
            if self.head == "gm":
                out = self.teacher_proj_out(out)
        return unpack(out, H, W).float()


def _identity(x):
    return x


def _clone_module(m):
    import copy
    return copy.deepcopy(m)


#################################################################################
#                     Base models, text embeddings, VAE                         #
#################################################################################

def transformer_class(model):
    import diffusers
    return diffusers.FluxTransformer2DModel if model == "flux" else diffusers.QwenImageTransformer2DModel


def load_transformer(model, base, dtype):
    return transformer_class(model).from_pretrained(base, subfolder="transformer", torch_dtype=dtype)


def load_vae(model, base, dtype):
    import diffusers
    cls = diffusers.AutoencoderKL if model == "flux" else diffusers.AutoencoderKLQwenImage
    return cls.from_pretrained(base, subfolder="vae", torch_dtype=dtype)


def vae_encode(model, vae, images):
    """images (B,3,H,W) in [-1,1] -> normalised latents (B,16,H/8,W/8) (recipe §9)."""
    if model == "flux":
        z = vae.encode(images.to(vae.dtype)).latent_dist.mode()
        return ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()
    z = vae.encode(images[:, :, None].to(vae.dtype)).latent_dist.mode()[:, :, 0]
    mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device).view(1, -1, 1, 1)
    return ((z - mean) / std).float()


def vae_decode(model, vae, x):
    """normalised latents (B,16,h,w) -> images (B,3,8h,8w) in [-1,1]."""
    x = x.to(vae.dtype)
    if model == "flux":
        return vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample.float()
    mean = torch.tensor(vae.config.latents_mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return vae.decode((x * std + mean)[:, :, None]).sample[:, :, 0].float()


def encode_prompts(model, base, prompts, device, dtype, max_len=512, batch=8):
    """Text embeddings with the base pipeline's own encode_prompt (text encoders only, freed afterwards).

    FLUX: {'prompt_embeds' (P,512,4096), 'pooled' (P,768)}; Qwen: {'prompt_embeds' (P,max_len,3584) zero-padded,
    'mask' (P,max_len)}.
    """
    import diffusers
    from tqdm import tqdm
    if model == "flux":
        pipe = diffusers.FluxPipeline.from_pretrained(base, transformer=None, vae=None, torch_dtype=dtype).to(device)
    else:
        pipe = diffusers.QwenImagePipeline.from_pretrained(base, transformer=None, vae=None, torch_dtype=dtype).to(device)
    out = {}
    with torch.no_grad():
        for i in tqdm(range(0, len(prompts), batch), desc="encoding prompts"):
            chunk = prompts[i:i + batch]
            if model == "flux":
                e, pooled, _ = pipe.encode_prompt(chunk, prompt_2=None, device=device, max_sequence_length=max_len)
                part = {"prompt_embeds": e.cpu(), "pooled": pooled.cpu()}
            else:
                e, m = pipe.encode_prompt(chunk, device=device, max_sequence_length=max_len)
                if m is None:
                    m = torch.ones(e.shape[:2], dtype=torch.long, device=e.device)
                pad = max_len - e.shape[1]
                part = {"prompt_embeds": F.pad(e, (0, 0, 0, pad)).cpu(), "mask": F.pad(m, (0, pad)).cpu()}
            for k, v in part.items():
                out.setdefault(k, []).append(v)
    del pipe
    return {k: torch.cat(v) for k, v in out.items()}


def read_prompts(path):
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise SystemExit(f"--prompts={path!r} holds no prompts (expected one per line)")
    return prompts


def cached_embeddings(model, base, prompts, cache, device, dtype, max_len):
    """Prompt embeddings cached to `cache` (torch file keyed by model + prompt hash), computed once."""
    key = hashlib.sha1(("\n".join([model] + prompts)).encode()).hexdigest()
    if os.path.isfile(cache):
        d = torch.load(cache, map_location="cpu")
        if d.get("key") == key or d.get("key") is None:
            return d
        raise SystemExit(f"--embed_cache={cache!r} was computed for other prompts/model; delete it or pick another path")
    d = encode_prompts(model, base, prompts, device, dtype, max_len)
    d.update(key=key, prompts=prompts, model=model)
    if model == "qwen":                        # negative (empty) prompt for CFG, recipe §4.8
        d["negative"] = encode_prompts(model, base, [" "], device, dtype, max_len)
    save_atomic(d, cache)
    return d


def take_cond(emb, model, idx, device, guidance=FLUX_GUIDANCE):
    """The cond dict for prompt indices idx from an embedding cache."""
    cond = {"prompt_embeds": emb["prompt_embeds"][idx].to(device).float()}
    if model == "flux":
        cond["pooled"] = emb["pooled"][idx].to(device).float()
        cond["guidance"] = torch.full((len(idx),), float(guidance), device=device)
    else:
        cond["mask"] = emb["mask"][idx].to(device)
    return cond


def negative_cond(emb, device):
    neg = emb.get("negative")
    if neg is None:
        raise SystemExit("Qwen-Image CFG needs negative prompt embeddings ('negative' in the embedding cache)")
    return {"prompt_embeds": neg["prompt_embeds"][:1].to(device).float(), "mask": neg["mask"][:1].to(device)}


#################################################################################
#                   Adapter files (published on-disk layout)                    #
#################################################################################

def adapter_config(student):
    """config.json of the student class, as written by the official exporter (integration.md §6.3)."""
    c = {k: v for k, v in dict(student.tr.config).items() if not k.startswith("_")}
    c = json.loads(json.dumps(c, default=list))
    if student.head == "gm":
        c.pop("patch_size", None)
        c.update(num_gaussians=student.K, constant_logstd=None, logstd_inner_dim=1024, gm_num_logstd_layers=2,
                 logweights_channels=4, in_channels=64, out_channels=64)
    else:
        c.update(patch_size=1, out_channels=student.N * 64)
    c["_class_name"] = CLASS_NAMES[(student.model, student.head)]
    return c


def policy_config(student):
    if student.head == "gm":
        return {"type": "GMFlow"}
    return {"segment_size": DX_SEGMENT, "shift": DX_SHIFT, "type": "DX"}


def trainable_state(student, params=None):
    """Published tensor names: heads, norm_out.*, <module>.lora_{A,B}.weight (no '.default')."""
    params = params if params is not None else student.trainable_named()
    out = {}
    for name, p in params.items():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace(".default.weight", ".weight").replace(".default.bias", ".bias")] = t.detach()
    return out


def save_adapter(student, path, dtype=torch.float16, params=None, sd=None):
    """Write config.json + diffusion_pytorch_model.safetensors (+ policy_config metadata) atomically.

    dtype: tensor dtype on disk (fp16 as the official exporter; None keeps the parameters' dtype)."""
    from safetensors.torch import save_file
    sd = sd if sd is not None else trainable_state(student, params)
    os.makedirs(path, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype is not None else v).contiguous().cpu() for k, v in sd.items()}
    tmp = os.path.join(path, "diffusion_pytorch_model.safetensors.tmp")
    save_file(sd, tmp, metadata={"policy_config": json.dumps(policy_config(student))})
    os.replace(tmp, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json.tmp"), "w") as f:
        json.dump(adapter_config(student), f, indent=2)
    os.replace(os.path.join(path, "config.json.tmp"), os.path.join(path, "config.json"))


def resolve_adapter(spec, filename):
    """'repo:subfolder' (hub, HF_HUB_OFFLINE respected) or a local folder -> local path of `filename`."""
    if os.path.isdir(spec):
        p = os.path.join(spec, filename)
        if not os.path.isfile(p):
            raise SystemExit(f"--adapter={spec!r}: no {filename} in that folder")
        return p
    repo, _, sub = spec.partition(":")
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo, filename, subfolder=sub or None)
    except Exception as e:
        raise SystemExit(f"--adapter={spec!r}: cannot fetch {filename} ({type(e).__name__}: {e}); give "
                         f"'owner/repo:subfolder' (e.g. Lakonik/pi-FLUX.1:gmflux_k8_piid_4step) or a local folder")


def adapter_info(spec, model):
    """Read the adapter's config.json only (cheap) -> (head, K or N); clear error for a wrong model type."""
    with open(resolve_adapter(spec, "config.json")) as f:
        c = json.load(f)
    name = c.get("_class_name", "")
    kinds = {v: k for k, v in CLASS_NAMES.items()}
    if name in kinds:
        m, head = kinds[name]
    elif name in BASE_CLASS_NAMES:             # DX adapters may name the stock class with widened out_channels
        m, head = BASE_CLASS_NAMES[name], "dx"
    else:
        raise SystemExit(f"--adapter={spec!r}: unknown adapter class {name!r}; accepted: "
                         f"{sorted(kinds) + sorted(BASE_CLASS_NAMES)}")
    if m != model:
        raise SystemExit(f"--adapter={spec!r} is a {m} adapter ({name}) but --model={model!r}; use --model {m}")
    if head == "gm":
        return head, int(c.get("num_gaussians", 8))
    n = c.get("out_channels", 640)
    n = n // 64 if c.get("patch_size", 1) == 1 or model == "flux" else n // 16
    return head, n


def load_adapter_file(spec):
    from safetensors import safe_open
    path = resolve_adapter(spec, "diffusion_pytorch_model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        sd = {k[len("transformer."):] if k.startswith("transformer.") else k: f.get_tensor(k) for k in f.keys()}
    return sd, json.loads(meta.get("policy_config", "null"))


def student_from_adapter(tr, model, spec, lora_dropout=0.0):
    """Build our student on base transformer `tr` and load a published-layout adapter into it (strict)."""
    head, n = adapter_info(spec, model)
    sd, pcfg = load_adapter_file(spec)
    lora = {k: v for k, v in sd.items() if ".lora_A." in k or ".lora_B." in k}
    rest = {k: v for k, v in sd.items() if k not in lora}
    rank = next((v.shape[0] for k, v in lora.items() if ".lora_A." in k), None)
    student = T2IStudent(tr, model, head, K=n, N=n, lora=False)
    if lora:
        targets = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
        student.add_lora(rank, lora_dropout, targets=targets)
        from peft import set_peft_model_state_dict
        dtype = next(iter(tr.parameters())).dtype
        res = set_peft_model_state_dict(tr, {k: v.to(dtype) for k, v in lora.items()})
        bad = [k for k in getattr(res, "unexpected_keys", []) if "lora" in k]
        if bad:
            raise SystemExit(f"--adapter={spec!r}: LoRA tensors do not fit the base model: {bad[:3]}")
        tr.requires_grad_(False)
    own = dict(tr.named_parameters())
    missing = [k for k in own if k.startswith(student.trainable_prefixes) and k not in rest]
    unexpected = [k for k in rest if k not in own]
    if missing or unexpected:
        raise SystemExit(f"--adapter={spec!r} does not match a {model} {head} student: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, v in rest.items():
            if own[k].shape != v.shape:
                raise SystemExit(f"--adapter={spec!r}: {k} has shape {tuple(v.shape)}, the base model needs "
                                 f"{tuple(own[k].shape)}")
            own[k].copy_(v.to(own[k].dtype))
    student.policy_config = pcfg
    return student


#################################################################################
#                                  Training                                     #
#################################################################################

def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Named:
    """Duck-typed module for piflow.ema_update: a name -> tensor dict of (trainable) parameters."""

    def __init__(self, params):
        self.params = params

    def named_parameters(self):
        return iter(self.params.items())

    def named_buffers(self):
        return iter(())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="pi-ID distillation of FLUX.1-dev / Qwen-Image (paper Alg. 2 / 3).")
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, choices=sorted(MODELS), help="base model family")
    g.add_argument("--base", default=None, help="diffusers repo id or local folder (default: the official repo)")
    g.add_argument("--head", default="gm", choices=["gm", "dx"], help="policy head: GMFlow (gm) or DX grid (dx)")
    g.add_argument("--K", type=int, default=8, help="Gaussians per pixel (GM head)")
    g.add_argument("--N", type=int, default=10, help="grid points (DX head)")
    g.add_argument("--lora_rank", type=int, default=256, help="LoRA rank r (alpha = r)")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout")
    g.add_argument("--init_adapter", default=None, help="start from an adapter (repo:subfolder or folder)")
    g = p.add_argument_group("data")
    g.add_argument("--prompts", default=None, help="text file, one prompt per line (data-free pi-ID, default)")
    g.add_argument("--data", default=None, help="folder of images + same-name .txt captions (data-dependent pi-ID)")
    g.add_argument("--embed_cache", default=None, help="prompt-embedding cache file (default: OUT/embeds.pt)")
    g.add_argument("--max_text_len", type=int, default=512, help="text tokens (T5 / Qwen2.5-VL)")
    g.add_argument("--resolution", type=int, default=1024, help="image size (multiple of 16)")
    g = p.add_argument_group("pi-ID")
    g.add_argument("--nfe", type=int, default=4, help="student steps (4 or 8)")
    g.add_argument("--shift", type=float, default=3.2, help="time shift m")
    g.add_argument("--final_step_scale", type=float, default=0.5, help="raw size of the last step vs the others")
    g.add_argument("--num_intermediate", type=int, default=None, help="teacher queries per student call "
                   "(default 4 FLUX, 2 Qwen)")
    g.add_argument("--window_substeps", type=int, default=3, help="micro-window size in substeps (Eq. 6)")
    g.add_argument("--total_substeps", type=int, default=128, help="policy rollout substeps per unit raw time")
    g.add_argument("--gm_dropout", type=float, default=0.1, help="GM dropout on the rollout policy")
    g.add_argument("--loss_scale", type=float, default=30.0, help="constant loss multiplier")
    g.add_argument("--decay_iters", type=int, default=None, help="trajectory mixing iterations (default 2000 FLUX, "
                   "0 Qwen)")
    g.add_argument("--guidance", type=float, default=None, help="FLUX distilled guidance for teacher and student "
                   "(default 3.5) / Qwen teacher CFG scale (default 4.0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=3000, help="training steps")
    g.add_argument("--batch_size", type=int, default=256, help="global batch size (all ranks)")
    g.add_argument("--micro_batch", type=int, default=2, help="samples per micro-batch (divides --batch_size)")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    g.add_argument("--warmup", type=int, default=100, help="linear LR warm-up steps (from 0.001 lr)")
    g.add_argument("--optimizer", default="adamw8bit", choices=["adamw8bit", "adamw"],
                   help="AdamW8bit (bitsandbytes; falls back to AdamW if missing) or torch AdamW")
    g.add_argument("--grad_clip", type=float, default=50.0, help="gradient-norm clip")
    g.add_argument("--clip_start", type=int, default=100, help="step from which gradients are clipped")
    g.add_argument("--ema_gamma", type=float, default=7.0, help="EMA power-schedule gamma")
    g.add_argument("--ema_start", type=int, default=100, help="EMA start step")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype (FSDP2 mixed precision)")
    g.add_argument("--no_grad_ckpt", action="store_true", help="disable gradient checkpointing")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="output folder (ckpt.pt, adapter/, log.txt)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    g.add_argument("--overwrite", action="store_true", help="allow starting over in a folder holding ckpt.pt")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--ckpt_every", type=int, default=500, help="checkpoint every N steps")
    g.add_argument("--log_every", type=int, default=10, help="log every N steps")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave)")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    if args.num_intermediate is None:
        args.num_intermediate = 4 if args.model == "flux" else 2
    if args.decay_iters is None:
        args.decay_iters = 2000 if args.model == "flux" else 0
    if args.guidance is None:
        args.guidance = FLUX_GUIDANCE if args.model == "flux" else QWEN_CFG
    if args.resolution % 16:
        raise SystemExit(f"--resolution={args.resolution} is not a multiple of 16")
    if (args.prompts is None) == (args.data is None) and args.embed_cache is None:
        raise SystemExit("give exactly one of --prompts (data-free) or --data (data-dependent), or --embed_cache")
    if args.prompts is None and args.data is None and not os.path.isfile(args.embed_cache):
        raise SystemExit(f"--embed_cache={args.embed_cache!r} does not exist; give --prompts or --data to build it")
    for flag in ("prompts", "data"):
        v = getattr(args, flag)
        if v is not None and not os.path.exists(v):
            raise SystemExit(f"--{flag}={v!r} does not exist")
    if args.batch_size % args.micro_batch:
        raise SystemExit(f"--batch_size={args.batch_size} is not a multiple of --micro_batch={args.micro_batch}")
    return args


def load_data_folder(model, base, folder, resolution, device, dtype, max_len, cache):
    """Image+caption folder -> cached {'latents', embeddings...} (VAE and text encoders run once)."""
    if os.path.isfile(cache):
        return torch.load(cache, map_location="cpu")
    import numpy as np
    from PIL import Image
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
    if not files:
        raise SystemExit(f"--data={folder!r} holds no images")
    captions = []
    for f in files:
        txt = os.path.join(folder, os.path.splitext(f)[0] + ".txt")
        captions.append(open(txt).read().strip() if os.path.isfile(txt) else "")
    vae = load_vae(model, base, dtype).to(device)
    lat = []
    with torch.no_grad():
        for f in files:
            im = Image.open(os.path.join(folder, f)).convert("RGB")
            s = resolution / min(im.size)
            im = im.resize((max(resolution, round(im.width * s)), max(resolution, round(im.height * s))))
            l, t = (im.width - resolution) // 2, (im.height - resolution) // 2
            im = im.crop((l, t, l + resolution, t + resolution))
            x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
            lat.append(vae_encode(model, vae, x).cpu())
    del vae
    d = encode_prompts(model, base, captions, device, dtype, max_len)
    d["latents"] = torch.cat(lat)
    if model == "qwen":
        d["negative"] = encode_prompts(model, base, [" "], device, dtype, max_len)
    save_atomic(d, cache)
    return d


def main(argv=None):
    """Train; returns the student (with its EMA parameters in student.ema_params)."""
    args = parse_args(argv)
    dist_run = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.resume and not os.path.isfile(ckpt_path):
        raise SystemExit(f"--resume: no checkpoint at {ckpt_path!r}")
    if not args.resume and os.path.exists(ckpt_path) and not args.overwrite:
        raise SystemExit(f"--out={args.out!r} already holds ckpt.pt; pass --resume to continue or --overwrite")
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch.distributed as dist
    if dist_run:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    n_micro = args.batch_size // args.micro_batch
    if n_micro % world:
        raise SystemExit(f"--batch_size/--micro_batch = {n_micro} micro-batches must divide by world size {world}")
    is_main = rank == 0
    os.makedirs(args.out, exist_ok=True)
    base = args.base or MODELS[args.model]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # --- data: embeddings (and latents) computed once on rank 0, cached to disk
    cache = args.embed_cache or os.path.join(args.out, "embeds.pt")
    if is_main:
        if args.data:
            load_data_folder(args.model, base, args.data, args.resolution, device, dtype, args.max_text_len, cache)
        else:
            cached_embeddings(args.model, base, read_prompts(args.prompts) if args.prompts else [], cache,
                              device, dtype, args.max_text_len)
    if dist_run:
        dist.barrier()
    emb = torch.load(cache, map_location="cpu")
    P = emb["prompt_embeds"].shape[0]
    data_dependent = "latents" in emb
    # --- model (same init on every rank)
    torch.manual_seed(args.seed)
    tr = load_transformer(args.model, base, torch.float32)
    if args.init_adapter:
        student = student_from_adapter(tr, args.model, args.init_adapter, args.lora_dropout)
        for name, p in tr.named_parameters():
            if "lora_" in name or name.startswith(student.trainable_prefixes):
                p.requires_grad_(True)
    else:
        student = T2IStudent(tr, args.model, args.head, args.K, args.N, args.lora_rank, args.lora_dropout,
                             seed=args.seed)
    if not args.no_grad_ckpt:
        tr.enable_gradient_checkpointing()
    if not dist_run:      # frozen base in the compute dtype, fp32 trainables under autocast (FSDP2: mp_policy)
        for name, p in tr.named_parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and not dist_run)
    student.teacher_norm_out.to(dtype), student.teacher_proj_out.to(dtype)
    student.to(device)
    if dist_run:
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        heads = [tr.proj_out_means, tr.proj_out_logweights, tr.proj_out_logstds] if args.head == "gm" else []
        for blk in list(tr.transformer_blocks) + list(getattr(tr, "single_transformer_blocks", [])) + heads:
            fully_shard(blk, mesh=mesh, mp_policy=mp)   # GM heads run outside tr.forward: own units
        fully_shard(tr, mesh=mesh, mp_policy=mp)
    params = student.trainable_named()
    n_train = sum(p.numel() for p in params.values())
    if args.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
            opt_cls = bnb.optim.AdamW8bit
        except ImportError:
            if is_main:
                print("bitsandbytes not installed: using torch AdamW", flush=True)
            opt_cls = torch.optim.AdamW
    else:
        opt_cls = torch.optim.AdamW
    opt = opt_cls(list(params.values()), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ema = {k: p.detach().clone() for k, p in params.items()}
    start = 0
    if args.resume:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _load_trainable(params, ck["student"]), _load_trainable(ema, ck["ema"])
        opt.load_state_dict(torch.load(os.path.join(args.out, f"opt_rank{rank}.pt"), map_location="cpu"))
        start = ck["step"]
    cfg = piflow.PiIDConfig(nfe=args.nfe, shift=args.shift, final_step_scale=args.final_step_scale,
                            total_substeps=args.total_substeps, num_intermediate=args.num_intermediate, window_substeps=args.window_substeps,
                            gm_dropout=args.gm_dropout if args.head == "gm" else 0.0, loss_scale=args.loss_scale,
                            decay_iters=args.decay_iters)
    teacher = student.teacher
    if args.model == "qwen" and args.guidance != 1:
        teacher = piflow.guided_teacher(student.teacher, args.guidance, negative_cond(emb, device))
    log = open(os.path.join(args.out, "log.txt"), "a") if is_main else None

    def say(msg):
        if is_main:
            print(msg, flush=True)
            log.write(msg + "\n"), log.flush()
    say(f"pi-ID {'data-dependent' if data_dependent else 'data-free'} | {args.model} {args.head} | world {world} | "
        f"{P} prompts | trainable {n_train / 1e6:.2f} M | steps {start} -> {args.steps}")

    def checkpoint(step):
        sd, ema_sd = trainable_state(student, params), trainable_state(student, ema)   # collective under FSDP
        save_atomic(opt.state_dict(), os.path.join(args.out, f"opt_rank{rank}.pt"))
        if is_main:
            save_atomic({"student": sd, "ema": ema_sd, "step": step, "args": vars(args)}, ckpt_path)
            save_adapter(student, os.path.join(args.out, "adapter"), sd=ema_sd)

    latent = args.resolution // 8
    steps = range(start, args.steps)
    if is_main and not args.no_progress:
        from tqdm import tqdm
        steps = tqdm(steps, initial=start, total=args.steps, desc="pi-ID")
    t_log, losses, all_losses = time.time(), [], []
    student.train()
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, 0.001 + (1 - 0.001) * step / max(args.warmup, 1))
        opt.zero_grad(set_to_none=False)
        step_loss = torch.zeros((), device=device)
        n_local = n_micro // world
        backward = lambda l: (l / n_local).backward()
        for i in range(rank * n_local, (rank + 1) * n_local):
            g = torch.Generator(device=device).manual_seed((args.seed * 1_000_003 + step) * 65_537 + i)
            torch.manual_seed((args.seed * 1_000_003 + step) * 65_537 + i)       # LoRA dropout
            idx = torch.randint(P, (args.micro_batch,), generator=torch.Generator().manual_seed(
                (args.seed * 1_000_003 + step) * 65_537 + i))
            cond = take_cond(emb, args.model, idx, device, args.guidance)
            with autocast:
                if data_dependent:
                    x0 = emb["latents"][idx].to(device)
                    loss = piflow.piid_data_dependent(student, teacher, x0, cond, cfg, step, g)
                    backward(loss)
                else:
                    noise = torch.randn(args.micro_batch, 16, latent, latent, generator=g, device=device)
                    loss = piflow.piid_data_free(student, teacher, noise, cond, cfg, step, g, backward=backward)
            step_loss += loss.detach() / n_micro
        if dist_run:
            dist.all_reduce(step_loss)
        if step >= args.clip_start:
            gnorm = torch.nn.utils.clip_grad_norm_(list(params.values()), args.grad_clip)
            gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
            if not torch.isfinite(gnorm):
                opt.zero_grad(set_to_none=False)
                say(f"step {step}: non-finite grad norm, step skipped")
                continue
        opt.step()
        piflow.ema_update(_Named(ema), _Named(params), piflow.ema_beta(step, args.ema_gamma, args.ema_start))
        losses.append(float(step_loss)), all_losses.append(float(step_loss))
        done = step + 1
        if args.log_every and done % args.log_every == 0:
            dt = time.time() - t_log
            mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            say(f"step {done} | loss {sum(losses) / len(losses):.5f} | {len(losses) / dt:.2f} steps/s | "
                f"peak mem {mem:.1f} GiB")
            t_log, losses = time.time(), []
        if args.ckpt_every and done % args.ckpt_every == 0 and done < args.steps:
            checkpoint(done)
    checkpoint(args.steps)
    say(f"losses {' '.join(f'{l:.6f}' for l in all_losses)}")
    if log is not None:
        log.close()
    if dist_run:
        dist.barrier()
        dist.destroy_process_group()
    student.ema_params = ema
    return student


def _load_trainable(params, sd):
    """Copy full tensors (published names) into possibly sharded trainable params."""
    with torch.no_grad():
        for name, p in params.items():
            v = sd[name.replace(".default.weight", ".weight").replace(".default.bias", ".bias")]
            if hasattr(p, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor
                v = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)
            p.copy_(v.to(p.dtype))


#################################################################################
#                       Sampling (called by sample.py)                          #
#################################################################################

def sample_cli(argv=None):
    """Text-to-image sampling with a pi-Flow adapter; argv as sample.py received it (including --model)."""
    p = argparse.ArgumentParser(description="pi-Flow text-to-image sampling (FLUX.1-dev / Qwen-Image).")
    p.add_argument("--model", required=True, choices=sorted(MODELS), help="base model family")
    p.add_argument("--adapter", required=True, help="'owner/repo:subfolder' (e.g. Lakonik/pi-FLUX.1:gmflux_k8_piid_4step) "
                   "or a local adapter folder")
    p.add_argument("--base", default=None, help="diffusers repo id or local folder (default: the official repo)")
    p.add_argument("--prompt", action="append", default=None, help="prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--embed_cache", default=None, help="prompt-embedding cache file (skips the text encoders)")
    p.add_argument("--nfe", type=int, default=4, help="student steps")
    p.add_argument("--temperature", type=float, default=None,
                   help="GM temperature, never on the last step (default 0.1*(nfe-1): 0.3 at 4, 0.7 at 8)")
    p.add_argument("--guidance", type=float, default=None, help="FLUX distilled guidance (adapters need 3.5)")
    p.add_argument("--force", action="store_true", help="allow settings known to produce noise")
    p.add_argument("--shift", type=float, default=3.2, help="time shift m")
    p.add_argument("--final_step_scale", type=float, default=0.5, help="raw size of the last step")
    p.add_argument("--total_substeps", type=int, default=128, help="policy substeps per unit time")
    p.add_argument("--height", type=int, default=1024, help="image height (multiple of 16)")
    p.add_argument("--width", type=int, default=1024, help="image width (multiple of 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (image i uses seed + i)")
    p.add_argument("--batch", type=int, default=1, help="images per transformer call")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights dtype")
    p.add_argument("--cpu_offload", action="store_true", help="keep only the running piece on the GPU")
    p.add_argument("--out", default="samples", help="output folder for PNGs")
    args = p.parse_args(argv)
    # --- every check before any heavy loading
    for flag in ("height", "width"):
        v = getattr(args, flag)
        if v <= 0 or v % 16:
            raise SystemExit(f"--{flag}={v} is not a positive multiple of 16 (e.g. {max(16, round(v / 16) * 16)})")
    if args.nfe < 1:
        raise SystemExit(f"--nfe={args.nfe}: must be >= 1")
    if args.temperature is not None and args.temperature <= 0:
        raise SystemExit(f"--temperature={args.temperature}: must be > 0")
    if args.model == "flux":
        if args.guidance is None:
            args.guidance = FLUX_GUIDANCE
        if args.guidance != FLUX_GUIDANCE and not args.force:
            raise SystemExit(f"--guidance={args.guidance}: the pi-FLUX adapters were distilled at guidance "
                             f"{FLUX_GUIDANCE} and produce noise otherwise; pass --force to try anyway")
    elif args.guidance is not None and not args.force:
        raise SystemExit(f"--guidance={args.guidance}: Qwen-Image students take no guidance (CFG {QWEN_CFG} is "
                         f"distilled into them); pass --force to ignore")
    prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts and args.embed_cache is None:
        raise SystemExit("give --prompt and/or --prompts (or --embed_cache)")
    if args.embed_cache and not os.path.isfile(args.embed_cache) and not prompts:
        raise SystemExit(f"--embed_cache={args.embed_cache!r} does not exist")
    head, n = adapter_info(args.adapter, args.model)
    T = piflow.resolve_temperature("auto" if args.temperature is None else args.temperature, args.nfe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32
    base = args.base or MODELS[args.model]
    print(f"pi-Flow {args.model} {head} adapter {args.adapter} | NFE {args.nfe} | shift {args.shift} | final step "
          f"scale {args.final_step_scale} | temperature {T if head == 'gm' else 'n/a'} (not on the last step) | "
          + (f"guidance {args.guidance} | " if args.model == "flux" else "")
          + f"{args.height}x{args.width} | seed {args.seed} | {device} {args.dtype}"
          + (" | CPU offload" if args.cpu_offload else ""), flush=True)
    # --- text embeddings (text encoders freed before the transformer loads)
    if args.embed_cache and os.path.isfile(args.embed_cache):
        emb = torch.load(args.embed_cache, map_location="cpu")
    else:
        emb = encode_prompts(args.model, base, prompts, device, dtype, 512)
        if args.embed_cache:
            save_atomic(emb, args.embed_cache)
    P = emb["prompt_embeds"].shape[0]
    tr = load_transformer(args.model, base, dtype)
    student = student_from_adapter(tr, args.model, args.adapter).eval()
    vae = load_vae(args.model, base, dtype)
    if not args.cpu_offload:
        vae.to(device)
    os.makedirs(args.out, exist_ok=True)
    h, w = args.height // 8, args.width // 8
    imgs = []
    from tqdm import tqdm
    for i in tqdm(range(0, P, args.batch), desc="sampling"):
        idx = torch.arange(i, min(i + args.batch, P))
        noise = torch.cat([torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(args.seed + int(j)))
                           for j in idx]).to(device)
        cond = take_cond(emb, args.model, idx, device, args.guidance)
        student.to(device)
        x0 = piflow.sample(student, noise, cond, args.nfe, args.shift, args.final_step_scale,
                           T if head == "gm" else None, args.total_substeps)
        if args.cpu_offload:
            student.to("cpu"), vae.to(device)
        with torch.no_grad():
            img = vae_decode(args.model, vae, x0)
        if args.cpu_offload:
            vae.to("cpu")
        img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        for j, im in zip(idx.tolist(), img):
            path = os.path.join(args.out, f"{j:05d}.png")
            _write_png(im, path)
            imgs.append(path)
    print(f"wrote {len(imgs)} images to {args.out}", flush=True)
    return imgs


def _write_png(img, path):
    from PIL import Image
    tmp = path + ".tmp.png"
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    main(sys.argv[1:])
