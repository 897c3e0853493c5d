"""Text-to-image π-Flow students (FLUX.1-dev, Qwen-Image): the trainer.py attachment, adapters and sampling.

    python train_t2i.py --model flux --prompts prompts.txt --out runs/piflux           # Table 9, data-free (Alg. 3)
    python sample.py --model flux --adapter Lakonik/pi-FLUX.1:gmflux_k8_piid_4step --prompt "a cat"
    python sample.py --model qwen --adapter runs/piqwen/adapter --prompts prompts.txt --nfe 4

The student is the stock diffusers transformer (its own forward, never a copy) with
  * a GM head (§3.2, App. C.1): proj_out replaced by proj_out_means / proj_out_logweights / proj_out_logstds
    (piflow.add_gm_head), initialised from the teacher's proj_out on (c, ph, pw) tokens (piflow.init_gm_head,
    channel-first); or a DX head (§3.1): proj_out widened N times (piflow.widen_from_teacher);
  * peft LoRA (alpha = r) on the published target lists, and a trainable norm_out (recipe §6.2-6.4).
The teacher is the same module with the LoRA switched off and frozen copies of the original norm_out / proj_out, so
the 12-20 B trunk exists once (recipe §4.9). Adapters use the published layout: config.json (the head sizes) and
diffusion_pytorch_model.safetensors (fp16 EMA tensors, metadata policy_config and, for ours, piid_config: the
training schedule sample.py keeps). Everything that differs between base models is one row of FAMILIES.

Caches (prompt embeddings, data latents) are plain tensor files read with torch.load(weights_only=True):
    prompts [str], model str, max_text_len int, prompt_embeds (P, L, D_txt), + the family's cond_keys
    (FLUX: pooled (P, D_pool); Qwen: mask (P, L)), Qwen: negative_embeds (1, L, D_txt), negative_mask (1, L),
    data-dependent: latents (P, C, H/8, W/8) (normalised VAE latents, recipe §9).
"""
import contextlib
import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import common
import piflow

WEIGHTS, VAE_SCALE = "diffusion_pytorch_model.safetensors", 8


#################################################################################
#                      The base models: one row per family                      #
#################################################################################

def _flux_call(tr, tokens, sigma, cond, h, w):
    """FluxTransformer2DModel on packed tokens (integration.md §2.2): ids [0, row, col]; guidance is an input."""
    ids = torch.zeros(h, w, 3, device=tokens.device)
    ids[..., 1] = torch.arange(h, device=tokens.device)[:, None]
    ids[..., 2] = torch.arange(w, device=tokens.device)[None, :]
    txt = cond["prompt_embeds"]
    return tr(hidden_states=tokens, encoder_hidden_states=txt, pooled_projections=cond["pooled"], timestep=sigma,
              img_ids=ids.view(-1, 3), txt_ids=txt.new_zeros(txt.shape[1], 3), guidance=cond["guidance"],
              return_dict=False)[0]


def _qwen_call(tr, tokens, sigma, cond, h, w):
    """QwenImageTransformer2DModel on packed tokens; the zero padding past the longest prompt is dropped."""
    L = max(int(cond["mask"].sum(1).max()), 1)
    return tr(hidden_states=tokens, encoder_hidden_states=cond["prompt_embeds"][:, :L],
              encoder_hidden_states_mask=cond["mask"][:, :L], timestep=sigma,
              img_shapes=[[(1, h, w)]] * tokens.shape[0], return_dict=False)[0]


def _flux_lora(tr, policy):
    """Published FLUX targets (recipe §6.2): with a GM head the root proj_out is gone, so 'proj_out' hits the single
    blocks only; a DX head keeps it (widened), so they are named one by one (§6.4)."""
    t = ["proj_mlp", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
         "timestep_embedder.linear_1", "timestep_embedder.linear_2"]
    if policy == "gm":
        return t + ["proj_out"]
    return t + [f"single_transformer_blocks.{i}.proj_out" for i in range(len(tr.single_transformer_blocks))]


def _qwen_lora(tr, policy):
    """Published Qwen-Image targets (recipe §6.3): the last block's txt_mlp output is unused, so it is left out."""
    n = len(tr.transformer_blocks)
    return (["img_mlp.net.0.proj", "img_mlp.net.2", "timestep_embedder.linear_1", "timestep_embedder.linear_2"] +
            [f"transformer_blocks.{i}.txt_mlp.net.{j}" for i in range(n - 1) for j in ("0.proj", "2")])


def _flux_encode(pipe, prompts, device, max_len):
    e, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=device, max_sequence_length=max_len)
    return {"prompt_embeds": e, "pooled": pooled}


def _qwen_encode(pipe, prompts, device, max_len):
    """Qwen2.5-VL embeddings zero-padded to max_len with their mask (recipe §9)."""
    e, m = pipe.encode_prompt(prompts, device=device, max_sequence_length=max_len)
    m = torch.ones(e.shape[:2], dtype=torch.long, device=e.device) if m is None else m.long()
    return {"prompt_embeds": F.pad(e, (0, 0, 0, max_len - e.shape[1])), "mask": F.pad(m, (0, max_len - e.shape[1]))}


def _shift_scale(vae, z, inverse=False):
    """FLUX VAE normalisation: x = (z - shift_factor) * scaling_factor."""
    s, b = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    return z / s + b if inverse else (z - b) * s


def _mean_std(vae, z, inverse=False):
    """Qwen-Image VAE normalisation: x = (z - latents_mean) / latents_std per channel."""
    mean, std = (torch.tensor(getattr(vae.config, k), dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
                 for k in ("latents_mean", "latents_std"))
    return z * std + mean if inverse else (z - mean) / std


@dataclass(frozen=True)
class Family:
    repo: str                  # default base: hub id or local diffusers folder
    transformer: str           # diffusers transformer class
    vae: str                   # diffusers VAE class
    pipeline: str              # diffusers pipeline whose encode_prompt makes the text embeddings
    gm_class: str              # adapter config _class_name of a GM / DX student (the published names)
    dx_class: str
    adapter: str               # published default adapter (sample.py)
    guidance: str              # 'distilled': the scale is a model input of teacher and student; 'cfg': teacher CFG
    cond_keys: Tuple[str, ...]  # cache tensors besides prompt_embeds that the transformer takes
    channels: int              # latent channels C
    patch: int                 # p: p x p latent pixels per token, packed (c, ph, pw)
    video_vae: bool            # the VAE takes (B, C, T, H, W)
    call: Callable             # call(tr, tokens (B, L, p^2 C), sigma (B,), cond, h, w) -> (B, L, *)
    lora: Callable             # lora(tr, policy) -> LoRA target names (integration.md §3.2)
    encode: Callable           # encode(pipe, prompts, device, max_len) -> {name: (n, ...) tensor}
    normalise: Callable        # normalise(vae, z, inverse=False): VAE latent <-> normalised latent


FAMILIES = {
    "flux": Family("black-forest-labs/FLUX.1-dev", "FluxTransformer2DModel", "AutoencoderKL", "FluxPipeline",
                   "GMFluxTransformer2DModel", "DXFluxTransformer2DModel", "Lakonik/pi-FLUX.1:gmflux_k8_piid_4step",
                   "distilled", ("pooled",), 16, 2, False, _flux_call, _flux_lora, _flux_encode, _shift_scale),
    "qwen": Family("Qwen/Qwen-Image", "QwenImageTransformer2DModel", "AutoencoderKLQwenImage", "QwenImagePipeline",
                   "GMQwenImageTransformer2DModel", "DXQwenImageTransformer2DModel",
                   "Lakonik/pi-Qwen-Image:gmqwen_k8_piid_4step", "cfg", ("mask",), 16, 2, True, _qwen_call,
                   _qwen_lora, _qwen_encode, _mean_std),
}
FLUX_GUIDANCE = 3.5        # the distilled guidance the pi-FLUX.1 adapters were trained with (recipe §4.8)
NEGATIVE_PROMPT = ""       # Qwen-Image CFG negative: the empty prompt (recipe §4.8)
PUBLISHED = dict(shift=3.2, final_step_scale=0.5)   # schedule of the published adapters (recipe §8); NFE: their name


#################################################################################
#                                   Student                                    #
#################################################################################

@dataclass(frozen=True)
class Head:
    """A student's policy head, as an adapter's config.json describes it (integration.md Addendum)."""
    policy: str = "gm"                      # gm | dx
    K: int = 8                              # num_gaussians
    N: int = 10                             # DX grid points
    logstd_inner_dim: int = 1024
    logstd_layers: int = 2                  # gm_num_logstd_layers
    constant_logstd: Optional[float] = None
    logweights_channels: int = 4            # p^2: one weight per pixel; 1: one per token


def _features(h):
    """The GM student's proj_out: a plain function (not a module, so peft's 'proj_out' target skips it)."""
    return h


class T2IStudent(nn.Module):
    """student(x_t (B, C, H, W), sigma (B,), cond) -> piflow.GMPolicy / DXPolicy; teacher(x_t, sigma, cond) -> u.

    cond: {'prompt_embeds' (B, L, D_txt)} + FLUX 'pooled' (B, D_pool), 'guidance' (B,) | Qwen 'mask' (B, L).
    """

    def __init__(self, fam, tr, head, dtype, dx_policy):
        super().__init__()
        self.fam, self.head, self.dtype = fam, head, dtype
        self.teacher_norm_out = copy.deepcopy(tr.norm_out).requires_grad_(False)     # frozen teacher output layers
        self.teacher_proj_out = copy.deepcopy(tr.proj_out).requires_grad_(False)
        W, b = tr.proj_out.weight.detach().float(), tr.proj_out.bias.detach().float()  # (S C, D), S = p^2
        C, S, D = fam.channels, fam.patch ** 2, W.shape[1]
        if W.shape[0] != S * C:
            raise common.UserError(f"the base transformer's proj_out has {W.shape[0]} outputs; a {fam.transformer} "
                                   f"teacher has {S * C}")
        del tr.proj_out
        if head.policy == "gm":
            piflow.add_gm_head(tr, D, head.K, C, S, head.logweights_channels, tr.norm_out.linear.in_features,
                               head.logstd_inner_dim, head.logstd_layers, head.constant_logstd)
            piflow.init_gm_head(tr, W, b, head.K, C, channel_last=False)
            tr.proj_out = _features
            self.policy_config = {"type": "GMFlow"}
        else:
            tr.proj_out = nn.Linear(D, head.N * S * C)
            with torch.no_grad():
                for p, v in zip((tr.proj_out.weight, tr.proj_out.bias),
                                piflow.widen_from_teacher(W, b, head.N, C, channel_last=False)):
                    p.copy_(v)
            self.policy_config = dict(dx_policy, type="DX")       # segment_size, shift (recipe §3)
        self.tr, self._temb, self._teacher = tr, None, False
        tr.norm_out.register_forward_pre_hook(self._grab_temb)
        tr.norm_out.register_forward_hook(lambda m, args, out: self.teacher_norm_out(*args) if self._teacher else None)
        if head.policy == "dx":
            tr.proj_out.register_forward_hook(lambda m, args, out: self.teacher_proj_out(*args) if self._teacher
                                              else None)
        tr.requires_grad_(False)

    def _grab_temb(self, module, args):
        self._temb = args[1]                                   # norm_out(h, temb): the logstd MLP reads temb

    def add_lora(self, targets, rank, dropout):
        from peft import LoraConfig
        self.tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", lora_dropout=dropout,
                                       target_modules=targets))

    def trainable(self, train=None):
        """{published name: parameter} of LoRA, heads and norm_out (train=True/False also sets requires_grad)."""
        heads = ("norm_out.", "proj_out_means.", "proj_out_logweights.", "proj_out_logstds.", "proj_out.")
        out = {}
        for n, p in self.tr.named_parameters():
            if n.startswith(heads) or ".lora_" in n:
                out[re.sub(r"\.(lora_[AB])\.default\.", r".\1.", n)] = p
        if train is not None:
            self.tr.requires_grad_(False)
            for p in out.values():
                p.requires_grad_(train)
        return out

    def pack(self, x):
        p = self.fam.patch
        return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=p, pw=p)

    def unpack(self, tokens, H, W, copies):
        """(B, L, copies * p^2 C') -> (B, copies, C', H, W): each token holds (copies, c, ph, pw)."""
        p = self.fam.patch
        return rearrange(tokens, "b (h w) (k c ph pw) -> b k c (h ph) (w pw)", h=H // p, k=copies, ph=p, pw=p)

    def trunk(self, x_t, sigma, cond):
        """The diffusers forward on packed x_t -> output tokens (B, L, *) (the features, for a GM head)."""
        H, W = x_t.shape[-2:]
        cond = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in cond.items()}
        return self.fam.call(self.tr, self.pack(x_t).to(self.dtype), sigma, cond, H // self.fam.patch,
                             W // self.fam.patch)

    def forward(self, x_t, sigma, cond):
        sigma = piflow.as_batch(sigma, x_t)
        H, W, hd = x_t.shape[-2], x_t.shape[-1], self.head
        out = self.trunk(x_t, sigma, cond)
        if hd.policy == "dx":
            grid = self.unpack(out, H, W, hd.N).float()                             # (B, N, C, H, W)
            return piflow.DXPolicy(grid, x_t, sigma, self.policy_config["segment_size"], self.policy_config["shift"])
        means = self.unpack(self.tr.proj_out_means(out), H, W, hd.K)                # (B, K, C, H, W)
        logits = self.tr.proj_out_logweights(out)                                   # (B, L, K lw)
        if hd.logweights_channels == 1:                                            # one weight per token
            logits = logits.repeat_interleave(self.fam.patch ** 2, dim=-1)
        logits = self.unpack(logits, H, W, hd.K)                                    # (B, K, 1, H, W)
        return piflow.gm_policy(means, logits, piflow.gm_logstds(self.tr, self._temb), x_t, sigma)

    @contextlib.contextmanager
    def teacher_mode(self):
        """LoRA off and the original norm_out / proj_out. peft's own switch (enable_adapters) also flips
        requires_grad, which FSDP2 caches at its first all-gather, so its flag is set directly."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        lora = [m for m in self.tr.modules() if isinstance(m, BaseTunerLayer)]
        for m in lora:
            m._disable_adapters = True
        self._teacher = True
        try:
            yield
        finally:
            self._teacher = False
            for m in lora:
                m._disable_adapters = False

    @torch.no_grad()
    def teacher(self, x_t, sigma, cond):
        """The base model's velocity u (B, C, H, W)."""
        sigma = piflow.as_batch(sigma, x_t)
        with self.teacher_mode():
            out = self.trunk(x_t, sigma, cond)
            if self.head.policy == "gm":
                out = self.teacher_proj_out(out)
        return self.unpack(out, x_t.shape[-2], x_t.shape[-1], 1)[:, 0].float()


#################################################################################
#                     Files: base models, adapters, caches                      #
#################################################################################

def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def load_pretrained(cls_name, base, subfolder, dtype, **kw):
    """A diffusers model (safetensors only) with a one-line error for a missing / offline / unreadable base."""
    import diffusers
    try:
        return getattr(diffusers, cls_name).from_pretrained(base, subfolder=subfolder, torch_dtype=dtype,
                                                            use_safetensors=True, **kw)
    except (OSError, ValueError, EnvironmentError) as e:
        raise common.UserError(f"--base={base!r}: cannot load {cls_name}{' from ' + subfolder if subfolder else ''} "
                               f"({_first_line(e)}); give a local diffusers folder or a reachable hub id") from None


def adapter_file(spec, filename, flag):
    """A file of an adapter: a local folder, or 'owner/repo:subfolder' on the hub (HF_HUB_OFFLINE respected)."""
    if os.path.isdir(spec):
        path = os.path.join(spec, filename)
        if not os.path.isfile(path):
            raise common.UserError(f"{flag}={spec!r}: no {filename} in that folder")
        return path
    repo, _, sub = spec.partition(":")
    if os.path.exists(spec) or repo.count("/") != 1:
        raise common.UserError(f"{flag}={spec!r} is not accepted; expected an adapter folder (config.json + {WEIGHTS})"
                               " or 'owner/repo:subfolder' (e.g. Lakonik/pi-FLUX.1:gmflux_k8_piid_4step)")
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo, filename, subfolder=sub or None)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, network: all one line
        raise common.UserError(f"{flag}={spec!r}: cannot fetch {filename} from the hub ({type(e).__name__}: "
                               f"{_first_line(e)})") from None


def adapter_head(spec, model, flag):
    """The Head an adapter's config.json describes; refuses an unknown class or another model's adapter."""
    with open(adapter_file(spec, "config.json", flag)) as f:
        try:
            c = json.load(f)
        except json.JSONDecodeError:
            raise common.UserError(f"{flag}={spec!r}: config.json is not JSON") from None
    name = c.get("_class_name")
    kinds = {f.gm_class: (m, "gm") for m, f in FAMILIES.items()}
    kinds.update({k: (m, "dx") for m, f in FAMILIES.items() for k in (f.dx_class, f.transformer)})
    if name not in kinds:
        raise common.UserError(f"{flag}={spec!r}: unknown adapter class {name!r}; accepted: {', '.join(sorted(kinds))}")
    m, policy = kinds[name]
    if m != model:
        raise common.UserError(f"{flag}={spec!r} is a {m} adapter ({name}) but --model={model!r}; use --model {m}")
    fam = FAMILIES[m]
    S = fam.patch ** 2
    if policy == "gm":
        head = Head("gm", K=int(c.get("num_gaussians", 0)), logstd_inner_dim=int(c.get("logstd_inner_dim", 1024)),
                    logstd_layers=int(c.get("gm_num_logstd_layers", 2)), constant_logstd=c.get("constant_logstd"),
                    logweights_channels=int(c.get("logweights_channels", S)))
        ok = head.K >= 1 and head.logstd_layers >= 1 and head.logweights_channels in (1, S)
    else:                                  # DX: out_channels * patch_size^2 = N p^2 C (stock names: widened)
        head = Head("dx", N=int(c.get("out_channels") or 0) * int(c.get("patch_size") or 1) ** 2 // (S * fam.channels))
        ok = head.N >= 2
    if not ok:
        raise common.UserError(f"{flag}={spec!r}: config.json does not describe a pi-Flow {policy} head ({head})")
    return head


def read_adapter(spec, model, flag):
    """(head, tensors by published name (a 'transformer.' prefix dropped), safetensors metadata, LoRA rank)."""
    from safetensors import safe_open
    head, path = adapter_head(spec, model, flag), adapter_file(spec, WEIGHTS, flag)
    try:
        with safe_open(path, "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k in ("policy_config", "piid_config")}
            sd = {k[len("transformer."):] if k.startswith("transformer.") else k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
        raise common.UserError(f"{flag}={spec!r}: {WEIGHTS} is not a readable safetensors file "
                               f"({_first_line(e)})") from None
    ranks = {v.shape[0] for k, v in sd.items() if ".lora_A." in k}
    if len(ranks) > 1:
        raise common.UserError(f"{flag}={spec!r}: LoRA ranks differ between modules ({sorted(ranks)}); expected "
                               "one rank")
    return head, sd, meta, ranks.pop() if ranks else 0


def student_from_adapter(model, tr, spec, flag, dtype, dropout=0.0, adapter=None):
    """Our student on base `tr` with an adapter (read_adapter(spec, ...) unless given) loaded strictly: the head from
    its config.json, LoRA targets and rank from its tensors, policy and schedule from its metadata (the published
    ones have no piid_config: shift 3.2, final step 0.5, NFE from the name). Returns (student, head, rank, cfg)."""
    fam, (head, sd, meta, rank) = FAMILIES[model], adapter or read_adapter(spec, model, flag)
    pc = meta.get("policy_config") or {}
    dx = {k: pc.get(k, v) for k, v in (("segment_size", 1 / 3.5), ("shift", PUBLISHED["shift"]))}
    student = T2IStudent(fam, tr, head, dtype, dx)
    if rank:
        try:
            student.add_lora(sorted(k.rsplit(".lora_A.", 1)[0] for k in sd if ".lora_A." in k), rank, dropout)
        except ValueError as e:
            raise common.UserError(f"{flag}={spec!r}: its LoRA does not fit the base model "
                                   f"({_first_line(e)})") from None
    own = student.trainable()
    bad = sorted(set(own) ^ set(sd)) or [k for k in sd if sd[k].shape != own[k].shape]
    if bad:
        k = bad[0]
        what = "missing" if k not in sd else "unexpected" if k not in own else \
            f"shape {tuple(sd[k].shape)} != the base model's {tuple(own[k].shape)}"
        raise common.UserError(f"{flag}={spec!r} does not fit this {fam.transformer} with a {head.policy} head: {k} "
                               f"{what} ({len(bad)} tensor(s) differ)")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k].to(p.dtype))
    if meta.get("piid_config"):
        cfg = piflow.PiIDConfig(**meta["piid_config"])
    else:
        nfe = re.search(r"(\d+)step", spec)
        cfg = piflow.PiIDConfig(nfe=int(nfe.group(1)) if nfe else 4, **PUBLISHED)
    student.piid_config = cfg                                      # piflow.sample keeps this schedule
    return student, head, rank, cfg


def adapter_config(student):
    """config.json of the student class as the official exporter writes it (integration.md §6.1-6.3)."""
    fam, hd = student.fam, student.head
    c = json.loads(json.dumps({k: v for k, v in student.tr.config.items() if not k.startswith("_")}, default=list))
    S = fam.patch ** 2 * fam.channels
    if hd.policy == "gm":
        c.pop("patch_size", None)
        c.update(_class_name=fam.gm_class, num_gaussians=hd.K, constant_logstd=hd.constant_logstd,
                 logstd_inner_dim=hd.logstd_inner_dim, gm_num_logstd_layers=hd.logstd_layers,
                 logweights_channels=hd.logweights_channels, in_channels=S, out_channels=S)
    else:
        c.update(_class_name=fam.dx_class, patch_size=1, out_channels=hd.N * S)
    return c


def write_adapter(folder, student, tensors, cfg):
    from safetensors.torch import save_file
    meta = {"policy_config": json.dumps(student.policy_config), "piid_config": json.dumps(dataclasses.asdict(cfg))}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, WEIGHTS), metadata=meta)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(adapter_config(student), f, indent=2)


def read_prompts(path, flag="--prompts"):
    try:
        with open(path) as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise common.UserError(f"{flag}={path!r}: cannot read it ({e.strerror})") from None
    if not prompts:
        raise common.UserError(f"{flag}={path!r} holds no prompts; expected one per line")
    return prompts


def encode_prompts(fam, base, prompts, device, dtype, max_len, negative=False, batch=8):
    """Text embeddings with the base pipeline's own encode_prompt (text encoders only; freed afterwards)."""
    import diffusers
    from tqdm import tqdm
    try:
        pipe = getattr(diffusers, fam.pipeline).from_pretrained(base, transformer=None, vae=None, torch_dtype=dtype,
                                                                use_safetensors=True).to(device)
    except (OSError, ValueError, EnvironmentError) as e:
        raise common.UserError(f"--base={base!r}: cannot load the text encoders ({_first_line(e)})") from None
    parts = []
    with torch.no_grad():
        for i in tqdm(range(0, len(prompts), batch), desc="encoding prompts"):
            parts.append({k: v.cpu() for k, v in fam.encode(pipe, prompts[i:i + batch], device, max_len).items()})
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if negative:
            neg = fam.encode(pipe, [NEGATIVE_PROMPT], device, max_len)
            out.update(negative_embeds=neg["prompt_embeds"].cpu(), negative_mask=neg["mask"].cpu())
    del pipe
    return out


def check_cache(c, path, flag, fam, model, prompts=None, max_len=None, extra=()):
    """Refuse a cache of other prompts / another model, or one that lacks what this run needs."""
    need = ["prompts", "prompt_embeds", *fam.cond_keys, *extra]
    if not isinstance(c, dict) or any(k not in c for k in need) or c.get("model") != model:
        raise common.UserError(f"{flag}={path!r} is not a {model} cache holding {', '.join(need)}; rebuild it (delete "
                               "it, or pick another path)")
    if prompts is not None and (c.get("prompts") != prompts or c.get("max_text_len") != max_len):
        raise common.UserError(f"{flag}={path!r} holds embeddings of other prompts (or --max-text-len); delete it or "
                               "pick another path")
    return c


def make_cond(fam, cache, idx, device, guidance=None):
    """The cond dict for cached prompts idx (CPU LongTensor)."""
    cond = {k: cache[k][idx].to(device) for k in ("prompt_embeds",) + fam.cond_keys}
    cond = {k: v.float() if v.is_floating_point() else v for k, v in cond.items()}
    if fam.guidance == "distilled":
        cond["guidance"] = torch.full((len(idx),), float(guidance), device=device)
    return cond


def decode(fam, vae, x):
    """Normalised latents (B, C, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]."""
    z = fam.normalise(vae, x.float(), inverse=True).to(vae.dtype)
    if fam.video_vae:
        return vae.decode(z[:, :, None]).sample[:, :, 0].float()
    return vae.decode(z).sample.float()


def encode_images(fam, vae, x):
    """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/8, W/8) (the VAE's mode, recipe §9)."""
    x = x.to(vae.dtype)
    z = vae.encode(x[:, :, None] if fam.video_vae else x).latent_dist.mode()
    return fam.normalise(vae, (z[:, :, 0] if fam.video_vae else z).float())


#################################################################################
#                     The trainer.py attachment (train_t2i.py)                  #
#################################################################################

@dataclass(frozen=True)
class Options:
    model: str = "flux"                # base model family: flux | qwen (set by --model)
    base: Optional[str] = None         # diffusers folder or hub id of the base; None = the official repo
    policy: str = "gm"                 # student policy head: gm (GMFlow) | dx (DX grid)
    K: int = 8                         # Gaussians per pixel (GM)
    N: int = 10                        # grid points (DX)
    lora_rank: int = 256               # LoRA rank r (alpha = r); an --init-adapter must have this rank
    lora_dropout: float = 0.05         # LoRA dropout
    init_adapter: Optional[str] = None  # start from this adapter (folder or owner/repo:subfolder)
    prompts: Optional[str] = None      # text file, one prompt per line (data-free pi-ID)
    data: Optional[str] = None         # folder of images + same-name .txt captions (latents for --data-dependent)
    embed_cache: Optional[str] = None  # embeddings (+ latents) cache file; None = <prompts>.<model>.pt next to them
    max_text_len: int = 512            # text tokens (T5 / Qwen2.5-VL)
    resolution: int = 1024             # training image size (a multiple of 16)
    grad_checkpointing: bool = True    # gradient checkpointing of the transformer blocks (recipe §4.9)

    def __post_init__(self):
        for name, ok, accepted in [
                ("model", self.model in FAMILIES, " | ".join(FAMILIES)),
                ("policy", self.policy in ("gm", "dx"), "gm | dx"),
                ("K", self.K >= 1, "an integer >= 1"), ("N", self.N >= 2, "an integer >= 2"),
                ("lora_rank", self.lora_rank >= 0, "an integer >= 0 (0 = no LoRA)"),
                ("lora_dropout", 0 <= self.lora_dropout < 1, "a value in [0, 1)"),
                ("max_text_len", self.max_text_len >= 1, "an integer >= 1"),
                ("resolution", self.resolution >= 16 and self.resolution % 16 == 0, "a positive multiple of 16")]:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; expected {accepted}")


FLAG_ALIASES = {"policy": ["--head"]}           # old underscore spellings: common.hyphenate accepts them all


def training_cache(opts, fam, base, tc, device, dtype):
    """Embeddings (and for --data the latents) of the training set: built once on rank 0, then read everywhere."""
    path = opts.embed_cache or (opts.prompts and f"{opts.prompts}.{opts.model}.pt") or \
        (opts.data and f"{opts.data.rstrip(os.sep)}.{opts.model}-{opts.resolution}px.pt")
    if not path:
        raise common.UserError("give --prompts (a text file, one prompt per line), --data (images + captions) or "
                               "--embed-cache (a cache made earlier)")
    if opts.prompts and opts.data:
        raise common.UserError("give --prompts or --data, not both")
    for flag, v in (("--prompts", opts.prompts), ("--data", opts.data)):
        if v and not os.path.exists(v):
            raise common.UserError(f"{flag}={v!r}: no such file or folder")
    files = None
    if opts.data:
        files = sorted(f for f in os.listdir(opts.data) if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
        if not files:
            raise common.UserError(f"--data={opts.data!r} holds no .png / .jpg / .webp images")
    caption = lambda f: os.path.join(opts.data, os.path.splitext(f)[0] + ".txt")
    prompts = read_prompts(opts.prompts) if opts.prompts else [open(caption(f)).read().strip() if os.path.isfile(
        caption(f)) else "" for f in files] if files else None
    if not os.path.isfile(path):
        if prompts is None:
            raise common.UserError(f"--embed-cache={path!r}: no such file; give --prompts or --data to build it")
        common.check_writable(path, "--embed-cache")
        if not dist.is_initialized() or dist.get_rank() == 0:
            c = encode_prompts(fam, base, prompts, device, dtype, opts.max_text_len, fam.guidance == "cfg")
            if files:
                c["latents"] = data_latents(fam, base, opts.data, files, opts.resolution, device, dtype)
            c.update(prompts=prompts, model=opts.model, max_text_len=opts.max_text_len)
            common.save_torch(c, path)
        if dist.is_initialized():
            dist.barrier()
    c = common.load_tensors(path, "--embed-cache")
    if tc.data_dependent and isinstance(c, dict) and "latents" not in c:
        raise common.UserError(f"--data-dependent needs image latents: give --data (images + captions); "
                               f"--embed-cache={path!r} holds prompts only")
    extra = (("latents",) if tc.data_dependent else ()) + \
        (("negative_embeds", "negative_mask") if fam.guidance == "cfg" and tc.guidance != 1 else ())
    c = check_cache(c, path, "--embed-cache", fam, opts.model, prompts, opts.max_text_len, extra)
    h = opts.resolution // VAE_SCALE
    if tc.data_dependent and tuple(c["latents"].shape[1:]) != (fam.channels, h, h):
        raise common.UserError(f"--embed-cache={path!r} holds latents of shape {tuple(c['latents'].shape[1:])}; "
                               f"--resolution={opts.resolution} needs {(fam.channels, h, h)}")
    return c


@torch.no_grad()
def data_latents(fam, base, folder, files, resolution, device, dtype):
    """Image folder -> normalised VAE latents (P, C, res/8, res/8): resized and centre-cropped (Pillow)."""
    import numpy as np
    from PIL import Image, ImageOps
    vae = load_pretrained(fam.vae, base, "vae", dtype).to(device)
    out = []
    for f in files:
        im = ImageOps.fit(Image.open(os.path.join(folder, f)).convert("RGB"), (resolution, resolution),
                          Image.BICUBIC)
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
        out.append(encode_images(fam, vae, x).cpu())
    return torch.cat(out)


def dx_policy(cfg):
    """DX policy kwargs: the grid spans one training step in raw time (recipe §3: 1/3.5 at 4 NFE, s = 0.5)."""
    return {"segment_size": 1 / (cfg.nfe - 1 + cfg.final_step_scale), "shift": cfg.shift}


def new_student(opts, cfg, tr, dtype):
    """A fresh student on base `tr`: the head initialised from the teacher's proj_out, then the LoRA (B = 0)."""
    fam = FAMILIES[opts.model]
    student = T2IStudent(fam, tr, Head(opts.policy, opts.K, opts.N), dtype, dx_policy(cfg))
    if opts.lora_rank:
        student.add_lora(fam.lora(tr, opts.policy), opts.lora_rank, opts.lora_dropout)
    return student


class T2IAttachment:
    """trainer.py attachment: LoRA + head student on a diffusers base; the base (LoRA off) is the teacher."""
    sharded, autocast = True, True

    def __init__(self, opts, cfg, tc, student, cache, device):
        self.opts, self.cfg, self.tc, self.student, self.cache, self.device = opts, cfg, tc, student, cache, device
        self.fam = student.fam
        h = opts.resolution // VAE_SCALE
        self.noise_shape = (self.fam.channels, h, h)
        self.teacher = student.teacher
        if self.fam.guidance == "cfg" and tc.guidance != 1:         # Qwen: CFG with the empty-prompt negative
            neg = {"prompt_embeds": cache["negative_embeds"][:1].to(device).float(),
                   "mask": cache["negative_mask"][:1].to(device)}
            self.teacher = piflow.guided_teacher(student.teacher, tc.guidance, neg, tuple(tc.guidance_interval))

    def trainable(self):
        return self.student.trainable()

    def _idx(self, n, g):
        return torch.randint(len(self.cache["prompts"]), (n,), generator=g, device=g.device).cpu()

    def sample_cond(self, n, g):
        return make_cond(self.fam, self.cache, self._idx(n, g), self.device, self.tc.guidance)

    def sample_data(self, n, g):
        idx = self._idx(n, g)
        return self.cache["latents"][idx].to(self.device).float(), make_cond(self.fam, self.cache, idx, self.device,
                                                                            self.tc.guidance)

    def shard(self, mesh):
        """FSDP2: one unit per transformer block and per GM head layer (they run outside the diffusers forward),
        then the root; frozen weights stay in the compute dtype, trainables fp32, all-gathered in the compute dtype."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        tr, dtype = self.student.tr, self.student.dtype
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        heads = [getattr(tr, n) for n in ("proj_out_means", "proj_out_logweights", "proj_out_logstds")
                 if hasattr(tr, n)]
        for m in [b for blocks in tr.children() if isinstance(blocks, nn.ModuleList) for b in blocks] + heads:
            fully_shard(m, mesh=mesh, mp_policy=mp)
        # the root reshards after every forward too: after a no-grad one (teacher, the trainer's final validation)
        # it would otherwise keep its unsharded parameters registered, which the optimizer does not hold
        fully_shard(tr, mesh=mesh, mp_policy=mp, reshard_after_forward=True)

    def export(self, path, ema):
        """The published adapter layout from the EMA weights (fp16), written as a new version of `path`."""
        tensors = {k: v.half() for k, v in ema.items()}
        common.check_finite(tensors, f"--export={path!r} (fp16)")
        common.publish_dir(path, lambda folder: write_adapter(folder, self.student, tensors, self.cfg))


def attach(opts, cfg, tc, settings, device, dtype):
    """train_t2i.py --model flux|qwen: every user error first, then the cache, then the base model."""
    fam = FAMILIES[opts.model]
    base = opts.base or fam.repo
    adapter = read_adapter(opts.init_adapter, opts.model, "--init-adapter") if opts.init_adapter else None
    if adapter:
        size = lambda hd: (hd.policy, hd.K if hd.policy == "gm" else hd.N)
        if size(adapter[0]) != size(Head(opts.policy, opts.K, opts.N)):
            p, n = size(adapter[0])
            raise common.UserError(f"--init-adapter={opts.init_adapter!r} has a {p} head of size {n}; pass --policy "
                                   f"{p} --{'K' if p == 'gm' else 'N'} {n}")
        if adapter[3] != opts.lora_rank:
            raise common.UserError(f"--lora-rank={opts.lora_rank} differs from --init-adapter's LoRA rank "
                                   f"{adapter[3]}; pass --lora-rank {adapter[3]}")
    if fam.guidance == "distilled" and tc.guidance_interval != (0.0, 1.0):
        raise common.UserError(f"--guidance-interval applies to CFG; --model {opts.model} takes a distilled guidance")
    cache = training_cache(opts, fam, base, tc, device, dtype)
    tr = load_pretrained(fam.transformer, base, "transformer", dtype)
    if adapter:
        student = student_from_adapter(opts.model, tr, opts.init_adapter, "--init-adapter", dtype, opts.lora_dropout,
                                       adapter)[0]
        if opts.policy == "dx":
            student.policy_config.update(dx_policy(cfg))
    else:
        student = new_student(opts, cfg, tr, dtype)
    for p in student.trainable(train=True).values():                      # fp32 masters (recipe §4.10)
        p.data = p.data.float()
    if opts.grad_checkpointing:
        tr.enable_gradient_checkpointing()
    return T2IAttachment(opts, cfg, tc, student.to(device), cache, device)


#################################################################################
#                          Sampling (sample.py --model)                         #
#################################################################################

def add_sample_flags(g, model):
    fam = FAMILIES[model]
    g.add_argument("--adapter", default=fam.adapter, help="adapter folder (e.g. runs/piflux/adapter) or "
                   "'owner/repo:subfolder' (default: %(default)s)")
    g.add_argument("--base", default=fam.repo, help="diffusers folder or hub id of the base (default: %(default)s)")
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    g.add_argument("--prompts", default=None, help="text file, one prompt per line")
    g.add_argument("--embed-cache", "--embed_cache", default=None, help="prompt-embedding cache: read if it exists "
                   "(then --prompt / --prompts are optional), else written (skips the text encoders next time)")
    g.add_argument("--guidance", type=float, default=FLUX_GUIDANCE if fam.guidance == "distilled" else None,
                   help="FLUX distilled guidance: the adapters need 3.5; Qwen-Image students take none (default: "
                   "%(default)s)")
    g.add_argument("--force", action="store_true", help="allow a --guidance the adapter was not trained with")
    g.add_argument("--height", type=int, default=1024, help="image height, a multiple of 16 (default: %(default)s)")
    g.add_argument("--width", type=int, default=1024, help="image width, a multiple of 16 (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=1, help="images per transformer call (default: %(default)s)")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="weights dtype; auto = bf16 on CUDA, fp32 on CPU (default: %(default)s)")
    g.add_argument("--cpu-offload", action="store_true", help="keep the transformer on the CPU while the VAE decodes")
    g.add_argument("--images-dir", default=None, help="folder for the single PNGs 00000.png, ... (default: --out "
                   "without .png)")
    g.set_defaults(temperature="auto")


def sample_grid(args):
    """`sample.py --model flux|qwen`: image i from noise seeded seed + i and prompt i; one row per image."""
    fam = FAMILIES[args.model]
    for name in ("height", "width"):
        v = getattr(args, name)
        if v < 16 or v % 16:
            raise common.UserError(f"--{name}={v} is not accepted; expected a positive multiple of 16 "
                                   f"(e.g. {max(16, round(v / 16) * 16)})")
    if args.batch_size < 1:
        raise common.UserError(f"--batch-size={args.batch_size} is not accepted; expected an integer >= 1")
    if fam.guidance == "distilled" and args.guidance != FLUX_GUIDANCE and not args.force:
        raise common.UserError(f"--guidance={args.guidance} is not accepted; the pi-FLUX adapters were distilled at "
                               f"{FLUX_GUIDANCE} and give noise otherwise (--force to try anyway)")
    if fam.guidance == "cfg" and args.guidance is not None and not args.force:
        raise common.UserError(f"--guidance={args.guidance} is not accepted; --model {args.model} students have CFG "
                               "distilled in and take no guidance")
    prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts and not (args.embed_cache and os.path.isfile(args.embed_cache)):
        raise common.UserError("give --prompt (repeatable), --prompts (a text file) or an existing --embed-cache")
    images_dir = args.images_dir or os.path.splitext(args.out)[0]                   # {nfe} filled in below
    common.check_writable(images_dir.format(nfe=args.nfe or 0), "--images-dir", is_dir=True)
    if args.embed_cache and not os.path.isfile(args.embed_cache):
        common.check_writable(args.embed_cache, "--embed-cache")
    head = adapter_head(args.adapter, args.model, "--adapter")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype) or \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # --- text embeddings first (the text encoders are freed before the transformer loads)
    if args.embed_cache and os.path.isfile(args.embed_cache):
        cache = check_cache(common.load_tensors(args.embed_cache, "--embed-cache"), args.embed_cache, "--embed-cache",
                            fam, args.model, prompts or None, 512 if prompts else None)
    else:
        cache = dict(encode_prompts(fam, args.base, prompts, device, dtype, 512), prompts=prompts, model=args.model,
                     max_text_len=512)
        if args.embed_cache:
            common.save_torch(cache, args.embed_cache)
    prompts = cache["prompts"]
    tr = load_pretrained(fam.transformer, args.base, "transformer", dtype)
    student, head, _, cfg = student_from_adapter(args.model, tr, args.adapter, "--adapter", dtype)
    student = student.to(device, dtype).eval()
    nfe = args.nfe or cfg.nfe
    T = piflow.resolve_temperature(args.temperature, nfe) if head.policy == "gm" else None
    print(f"pi-Flow {args.model} {head.policy} adapter {args.adapter} | NFE {nfe} (trained {cfg.nfe}) | shift "
          f"{cfg.shift} | final step scale {cfg.final_step_scale} | temperature {T} | "
          + (f"guidance {args.guidance} | " if fam.guidance == "distilled" else "")
          + f"{args.height}x{args.width} | seed {args.seed} + i | {device} {dtype}", flush=True)
    h, w = args.height // VAE_SCALE, args.width // VAE_SCALE
    latents = []
    for i in range(0, len(prompts), args.batch_size):
        idx = torch.arange(i, min(i + args.batch_size, len(prompts)))
        noise = torch.cat([torch.randn(1, fam.channels, h, w, generator=torch.Generator().manual_seed(args.seed + j))
                           for j in idx.tolist()]).to(device)
        latents.append(piflow.sample(student, noise, make_cond(fam, cache, idx, device, args.guidance), nfe,
                                     temperature=T).cpu())
    if args.cpu_offload:
        student.to("cpu")
    vae = load_pretrained(fam.vae, args.base, "vae", dtype).to(device)
    with torch.no_grad():
        images = [im for x in latents for im in ((decode(fam, vae, x.to(device)).clamp(-1, 1) + 1) * 127.5).round()
                  .to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()]
    from PIL import Image
    images_dir = images_dir.format(nfe=nfe)
    os.makedirs(images_dir, exist_ok=True)
    paths = [os.path.join(images_dir, f"{i:05d}.png") for i in range(len(images))]
    for im, path in zip(images, paths):
        common.save_atomic(path, lambda tmp: Image.fromarray(im).save(tmp, format="PNG"))
    print(f"wrote {len(paths)} images to {images_dir}")
    label = lambda s: s if len(s) <= 40 else s[:37] + "..."
    return dict(rows=[[im] for im in images], row_labels=[label(p) for p in prompts], nfe=nfe, images=images,
                paths=paths, title=f"pi-Flow {args.model} {head.policy}, NFE {nfe}, temperature {T}, seed {args.seed}")
