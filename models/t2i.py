"""Text-to-image π-Flow students on stock diffusers transformers: the per-model table, the student, adapter files,
and the trainer attachment (train_t2i.py). The data side (pipelines, prompt caches, latents) is models/t2i_data.py.

    FAMILIES            one row per base model (FLUX.1, FLUX.2, Qwen-Image, SD3 / SD3.5): classes, latent layout,
                        forward call, LoRA targets, text encoding, VAE normalisation, guidance kind
    T2IStudent          student(x_t, sigma, cond) -> policy; teacher(x_t, sigma, cond) -> u (the base, LoRA off)
    KNOWN               the released adapters: hub location and training NFE
    read_adapter, student_from_adapter, write_adapter    the published adapter layout (config.json + safetensors)
    quantise_base, load_base                             the frozen base in 4-bit NF4 / int8 (--base-quant, QLoRA)
    Options, attach, T2IAttachment                       train_t2i.py's flags and the trainer attachment

The student is the stock diffusers transformer (its own forward, never a copy) with
  * a policy head on the input h (B, L, D) of its proj_out, read by a forward hook (the model's own output is not
    used, so the head works whatever follows proj_out, e.g. SD3's unpatchify): GM (§3.2; the heads of the published
    gmflux.py): proj_out_means / proj_out_logweights / proj_out_logstds (piflow.add_gm_head), initialised from the
    teacher's proj_out (piflow.init_gm_head); or DX (§3.1): proj_out widened N times (piflow.init_dx_head);
  * a peft LoRA named 'piflow' (alpha = r, as LakonLab configs/piflux/gmflux_k8_piid_4step_32gpus.py) and a
    trainable norm_out.
The teacher is the same module with every LoRA switched off and frozen copies of the original norm_out (and for DX
proj_out), so the 12-32 B trunk exists once (the published tie_teacher, LakonLab lakonlab/models/base_diffusion.py).
The latent x (B, C, H, W) is what the policy sees; each row's call packs it with the diffusers pipeline's own helpers
(FluxPipeline._pack_latents, ids, ...).
"""
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import piflow
from models import t2i_data
from runtime import common, metrics, trainer

WEIGHTS, LORA = "diffusion_pytorch_model.safetensors", "piflow"   # LORA: the student's adapter name


#################################################################################
#                   The base models: one row per model family                   #
#################################################################################

def _flux_call(tr, x, sigma, cond):
    """FluxTransformer2DModel: (c, ph, pw) tokens and ids [0, row, col] (FluxPipeline's helpers); sigma and the
    distilled guidance are inputs (the model scales both by 1000)."""
    from diffusers import FluxPipeline as P
    (B, C, H, W), txt = x.shape, cond["prompt_embeds"]
    return tr(hidden_states=P._pack_latents(x, B, C, H, W), encoder_hidden_states=txt,
              pooled_projections=cond["pooled"], timestep=sigma,
              img_ids=P._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype),
              txt_ids=txt.new_zeros(txt.shape[1], 3), guidance=cond["guidance"], return_dict=False)[0]


def _flux2_call(tr, x, sigma, cond):
    """Flux2Transformer2DModel: 2x2-patchified (c, ph, pw) tokens with (t, h, w, l) ids (Flux2Pipeline's helpers).
    Editing (as diffusers' Flux2Pipeline): reference tokens cond['ref_tokens'] (B, Lr, 4C) with their own ids
    cond['ref_ids'] are appended after the generated tokens; the student keeps the first H W / 4 outputs."""
    from diffusers import Flux2Pipeline as P
    z, txt = P._patchify_latents(x), cond["prompt_embeds"]
    tokens, ids = P._pack_latents(z), P._prepare_latent_ids(z).to(x.device)
    if "ref_tokens" in cond:
        tokens, ids = torch.cat([tokens, cond["ref_tokens"]], 1), torch.cat([ids, cond["ref_ids"]], 1)
    return tr(hidden_states=tokens, encoder_hidden_states=txt, timestep=sigma, guidance=cond["guidance"],
              img_ids=ids, txt_ids=P._prepare_text_ids(txt).to(x.device), return_dict=False)[0]


def _qwen_call(tr, x, sigma, cond):
    """QwenImageTransformer2DModel on (c, ph, pw) tokens; the zero padding past the longest prompt is dropped."""
    from diffusers import QwenImagePipeline as P
    (B, C, H, W), L = x.shape, max(int(cond["mask"].sum(1).max()), 1)
    return tr(hidden_states=P._pack_latents(x, B, C, H, W), encoder_hidden_states=cond["prompt_embeds"][:, :L],
              encoder_hidden_states_mask=cond["mask"][:, :L], timestep=sigma,
              img_shapes=[[(1, H // 2, W // 2)]] * B, return_dict=False)[0]


def _sd3_call(tr, x, sigma, cond):
    """SD3Transformer2DModel: unpacked latents (2x2 patches inside the model), timestep 1000 sigma (as
    StableDiffusion3Pipeline passes the scheduler's timesteps)."""
    return tr(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled"],
              timestep=sigma * 1000, return_dict=False)[0]


def _linears(tr, suffixes, skip=()):
    """LoRA targets: names of tr's nn.Linear modules ending in one of `suffixes` (never the root proj_out)."""
    return [n for n, m in tr.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes) and n not in skip]


TIME = (".timestep_embedder.linear_1", ".timestep_embedder.linear_2")
# Published FLUX targets (LakonLab configs/piflux/*): feed-forwards + the single blocks' fused proj_out; Qwen (configs/piqwen/*): the last
# block's txt_mlp output is unused, so it is left out. FLUX.2 / SD3 (ours): the same modules in their naming.
_flux_lora = lambda tr: _linears(tr, (".proj_mlp", ".proj_out", ".ff.net.0.proj", ".ff.net.2", ".ff_context.net.0.proj",
                                      ".ff_context.net.2") + TIME)
_flux2_lora = lambda tr: _linears(tr, (".ff.linear_in", ".ff.linear_out", ".ff_context.linear_in",
                                       ".ff_context.linear_out", ".attn.to_qkv_mlp_proj", ".attn.to_out") + TIME)
_qwen_lora = lambda tr: _linears(tr, (".img_mlp.net.0.proj", ".img_mlp.net.2", ".txt_mlp.net.0.proj",
                                      ".txt_mlp.net.2") + TIME,
                                 {f"transformer_blocks.{len(tr.transformer_blocks) - 1}.txt_mlp.net.{j}"
                                  for j in ("0.proj", "2")})
_sd3_lora = lambda tr: _linears(tr, (".ff.net.0.proj", ".ff.net.2", ".ff_context.net.0.proj", ".ff_context.net.2")
                                + TIME)


def _flux_encode(pipe, prompts, device, max_len):
    e, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=device, max_sequence_length=max_len)
    return {"prompt_embeds": e, "pooled": pooled}


def _flux2_encode(pipe, prompts, device, max_len):
    return {"prompt_embeds": pipe.encode_prompt(prompts, device=device, max_sequence_length=max_len)[0]}


def _qwen_encode(pipe, prompts, device, max_len):
    """Qwen2.5-VL embeddings zero-padded to max_len with their mask, as the published Qwen-Image training pads them."""
    e, m = pipe.encode_prompt(prompts, device=device, max_sequence_length=max_len)
    m = torch.ones(e.shape[:2], dtype=torch.long, device=e.device) if m is None else m.long()
    return {"prompt_embeds": F.pad(e, (0, 0, 0, max_len - e.shape[1])), "mask": F.pad(m, (0, max_len - e.shape[1]))}


def _sd3_encode(pipe, prompts, device, max_len):
    e, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False,
                                         max_sequence_length=max_len)
    return {"prompt_embeds": e, "pooled": pooled}


def _shift_scale(vae, z, inverse=False):
    """FLUX.1 / SD3 VAE normalisation: x = (z - shift_factor) * scaling_factor."""
    s, b = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    return z / s + b if inverse else (z - b) * s


def _mean_std(vae, z, inverse=False):
    """Qwen-Image VAE normalisation: x = (z - latents_mean) / latents_std per channel."""
    mean, std = (torch.tensor(getattr(vae.config, k), dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
                 for k in ("latents_mean", "latents_std"))
    return z * std + mean if inverse else (z - mean) / std


def _flux2_bn(vae, z, inverse=False):
    """FLUX.2 VAE normalisation: the VAE's batch-norm statistics on 2x2-patchified latents (Flux2Pipeline)."""
    from diffusers import Flux2Pipeline as P
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z)
    std = (vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).sqrt().to(z)
    z = P._patchify_latents(z)
    return P._unpatchify_latents(z * std + mean if inverse else (z - mean) / std)


@dataclass(frozen=True)
class Family:
    repo: str                  # default base: hub id or local diffusers folder
    pipeline: str              # diffusers pipeline: encode_prompt, VAE, image processor, offloading, LoRA loading
    transformer: str           # diffusers transformer class
    vae: str                   # diffusers VAE class
    gm_class: str              # adapter config _class_name of a GM / DX student (the published names)
    dx_class: str
    adapter: Optional[str]     # default adapter of sample.py (a KNOWN id), None: no released one
    guidance: str              # 'distilled': a model input of teacher and student; 'cfg': teacher CFG (negative)
    guidance_scale: Optional[float]  # distilled: the scale the released adapters need (LakonLab README)
    cond_keys: Tuple[str, ...]  # cache tensors besides prompt_embeds that the transformer takes
    channels: int              # latent channels C
    patch: int                 # p: p x p latent pixels per token
    channel_last: bool         # token layout (ph, pw, c) (SD3's unpatchify) or (c, ph, pw) (FLUX / Qwen packing)
    logweights: int            # logweights_channels of new students and of configs without it: p^2 (one GM weight
                               # per pixel; every published row, as PiFlux2Pipeline unpacks (B, h, w, K, 1, 2, 2))
    max_text_len: int          # text tokens of the base pipeline
    video_vae: bool            # the VAE takes (B, C, T, H, W)
    call: Callable             # call(tr, x (B, C, H, W), sigma (B,), cond) -> the transformer's output
    lora: Callable             # lora(tr) -> LoRA target names
    encode: Callable           # encode(pipe, prompts, device, max_len) -> {name: (n, ...) tensor}
    normalise: Callable        # normalise(vae, z, inverse=False): VAE latent <-> normalised latent


FAMILIES = {
    "flux": Family(repo="black-forest-labs/FLUX.1-dev", pipeline="FluxPipeline",
                   transformer="FluxTransformer2DModel", vae="AutoencoderKL", gm_class="GMFluxTransformer2DModel",
                   dx_class="DXFluxTransformer2DModel", adapter="gmflux_k8_piid_4step", guidance="distilled",
                   guidance_scale=3.5, cond_keys=("pooled",), channels=16, patch=2, channel_last=False, logweights=4,
                   max_text_len=512, video_vae=False, call=_flux_call, lora=_flux_lora, encode=_flux_encode,
                   normalise=_shift_scale),
    "flux2": Family(repo="black-forest-labs/FLUX.2-dev", pipeline="Flux2Pipeline",
                    transformer="Flux2Transformer2DModel", vae="AutoencoderKLFlux2",
                    gm_class="GMFlux2Transformer2DModel", dx_class="DXFlux2Transformer2DModel",
                    adapter="gmflux2_k8_piid_4step", guidance="distilled", guidance_scale=4.0, cond_keys=(),
                    channels=32, patch=2, channel_last=False, logweights=4, max_text_len=512, video_vae=False,
                    call=_flux2_call, lora=_flux2_lora, encode=_flux2_encode, normalise=_flux2_bn),
    "qwen": Family(repo="Qwen/Qwen-Image", pipeline="QwenImagePipeline", transformer="QwenImageTransformer2DModel",
                   vae="AutoencoderKLQwenImage", gm_class="GMQwenImageTransformer2DModel",
                   dx_class="DXQwenImageTransformer2DModel", adapter="gmqwen_k8_piid_4step", guidance="cfg",
                   guidance_scale=None, cond_keys=("mask",), channels=16, patch=2, channel_last=False, logweights=4,
                   max_text_len=512, video_vae=True, call=_qwen_call, lora=_qwen_lora, encode=_qwen_encode,
                   normalise=_mean_std),
    "sd3": Family(repo="stabilityai/stable-diffusion-3.5-large", pipeline="StableDiffusion3Pipeline",
                  transformer="SD3Transformer2DModel", vae="AutoencoderKL", gm_class="GMSD3Transformer2DModel",
                  dx_class="DXSD3Transformer2DModel", adapter=None, guidance="cfg", guidance_scale=None,
                  cond_keys=("pooled",), channels=16, patch=2, channel_last=True, logweights=4, max_text_len=256,
                  video_vae=False, call=_sd3_call, lora=_sd3_lora, encode=_sd3_encode, normalise=_shift_scale),
}
PUBLISHED = dict(shift=3.2, final_step_scale=0.5)   # schedule of every released adapter (Table 9)
# Released adapters (hub Lakonik/pi-FLUX.1, pi-Qwen-Image, pi-FLUX.2): id (= hub subfolder) -> (hub repo, model, training NFE)
KNOWN = {"gmflux_k8_piid_4step": ("Lakonik/pi-FLUX.1", "flux", 4),
         "gmflux_k8_datafree_piid_4step": ("Lakonik/pi-FLUX.1", "flux", 4),
         "gmflux_k8_piid_8step": ("Lakonik/pi-FLUX.1", "flux", 8),
         "dxflux_n10_piid_4step": ("Lakonik/pi-FLUX.1", "flux", 4),
         "gmqwen_k8_piid_4step": ("Lakonik/pi-Qwen-Image", "qwen", 4),
         "gmqwen_k8_datafree_piid_4step": ("Lakonik/pi-Qwen-Image", "qwen", 4),
         "dxqwen_n10_piid_4step": ("Lakonik/pi-Qwen-Image", "qwen", 4),
         "gmflux2_k8_piid_4step": ("Lakonik/pi-FLUX.2", "flux2", 4)}


#################################################################################
#                                   Student                                    #
#################################################################################

@dataclass(frozen=True)
class Head:
    """A student's policy head, as a released adapter's config.json describes it."""
    policy: str = "gm"                      # gm | dx
    K: int = 8                              # num_gaussians
    N: int = 10                             # DX grid points
    logstd_inner_dim: int = 1024
    logstd_layers: int = 2                  # gm_num_logstd_layers
    constant_logstd: Optional[float] = None
    logweights_channels: Optional[int] = None   # p^2: one weight per pixel; 1: one per token; None: the row's


class T2IStudent(nn.Module):
    """student(x_t (B, C, H, W), sigma (B,), cond) -> piflow.GMPolicy / DXPolicy; teacher(x_t, sigma, cond) -> u.

    cond: {'prompt_embeds' (B, L, D_txt)} + the row's cond_keys, + 'guidance' (B,) for a distilled-guidance row.
    teacher=False (inference) keeps no teacher copies; init=False skips the head initialisation (an adapter follows).
    """

    def __init__(self, fam, tr, head, dtype, dx_policy, teacher=True, init=True):
        super().__init__()
        head = dataclasses.replace(head, logweights_channels=head.logweights_channels or fam.logweights)
        self.fam, self.head, self.dtype = fam, head, dtype
        lin, C, S = tr.proj_out, fam.channels, fam.patch ** 2
        D, self.model_out = lin.in_features, lin.out_features                    # proj_out: D -> S C
        if self.model_out != S * C:
            raise common.UserError(f"the base transformer's proj_out has {self.model_out} outputs; a "
                                   f"{fam.transformer} teacher has {S * C}")
        if teacher:                                                             # frozen teacher output layers
            self.teacher_norm_out = copy.deepcopy(tr.norm_out).requires_grad_(False)
        W, b = (lin.weight.detach().float(), lin.bias.detach().float() if lin.bias is not None else
                torch.zeros(self.model_out)) if init else (None, None)
        if head.policy == "gm":                  # tr.proj_out stays: the teacher's, its input h feeds the head
            piflow.add_gm_head(tr, D, head.K, C, S, head.logweights_channels, tr.norm_out.linear.in_features,
                               head.logstd_inner_dim, head.logstd_layers, head.constant_logstd)
            if init:
                piflow.init_gm_head(tr, W, b, head.K, C, fam.channel_last)
            self.policy_config = {"type": "GMFlow"}
        else:
            if teacher:
                self.teacher_proj_out = copy.deepcopy(lin).requires_grad_(False)
            tr.proj_out = nn.Linear(D, head.N * S * C).to(lin.weight.device)
            if init:
                piflow.init_dx_head(tr.proj_out, W, b, head.N, C, fam.channel_last)
            self.policy_config = dict(dx_policy, type="DX")       # segment_size, shift (piflow_policies/dx.py)
        self.tr, self._teacher, self._temb, self._h, self._out = tr, False, None, None, None
        tr.norm_out.register_forward_pre_hook(self._grab_temb)
        tr.norm_out.register_forward_hook(lambda m, args, out: self.teacher_norm_out(*args) if self._teacher else None)
        tr.proj_out.register_forward_hook(self._grab_out)
        tr.requires_grad_(False)

    def _grab_temb(self, module, args):
        self._temb = args[1]                                   # norm_out(h, temb): the logstd MLP reads temb

    def _grab_out(self, module, args, out):
        """proj_out(h): keep h (GM head input) and the output (DX grid / teacher u tokens); return the model's
        own output shape (a DX proj_out is N times wider: its first copy) for whatever follows in the forward."""
        self._h = args[0]
        self._out = self.teacher_proj_out(args[0]) if self._teacher and self.head.policy == "dx" else out
        return self._out[..., :self.model_out]

    def heads(self):
        """The policy head modules (outside the base model's own weights)."""
        names = ("proj_out_means", "proj_out_logweights", "proj_out_logstds") if self.head.policy == "gm" else \
            ("proj_out",)
        return [getattr(self.tr, n) for n in names if hasattr(self.tr, n)]

    def add_lora(self, targets, rank, dropout):
        from peft import LoraConfig
        self.tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", lora_dropout=dropout,
                                       target_modules=targets), adapter_name=LORA)

    def trainable(self, train=None):
        """{published name: parameter} of LoRA, heads and norm_out (train=True/False also sets requires_grad)."""
        heads = ("norm_out.", "proj_out_means.", "proj_out_logweights.", "proj_out_logstds.") + \
            (("proj_out.",) if self.head.policy == "dx" else ())
        out = {}
        for n, p in self.tr.named_parameters():
            if n.startswith(heads) or f".{LORA}." in n:
                out[n.replace(f".{LORA}.", ".")] = p
        if train is not None:
            self.tr.requires_grad_(False)
            for p in out.values():
                p.requires_grad_(train)
        return out

    def unpack(self, tokens, H, W, copies):
        """(B, L, copies p^2 C') -> (B, copies, C', H, W); a token holds (copies, c, ph, pw) or (ph, pw, copies, c)."""
        p = self.fam.patch
        pattern = "(ph pw k c)" if self.fam.channel_last else "(k c ph pw)"
        return rearrange(tokens, f"b (h w) {pattern} -> b k c (h ph) (w pw)", h=H // p, k=copies, ph=p, pw=p)

    def trunk(self, x_t, sigma, cond, out=False):
        """The diffusers forward on x_t -> proj_out's input h (B, L, D) (out=True: its output), generated tokens."""
        (H, W), p = x_t.shape[-2:], self.fam.patch
        cond = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in cond.items()}
        y = self.fam.call(self.tr, x_t.to(self.dtype), sigma, cond)
        t = (self._out if out else self._h)[:, :(H // p) * (W // p)]
        # FSDP2 unshards a module for backward when the gradient reaches its output; the head reads proj_out's
        # input, so the model's own output joins the graph with weight 0 (same values, same gradients)
        return t + 0 * y.mean() if y.requires_grad else t

    def forward(self, x_t, sigma, cond):
        sigma = piflow.as_batch(sigma, x_t)
        (H, W), hd, p = x_t.shape[-2:], self.head, self.fam.patch
        if hd.policy == "dx":
            grid = self.unpack(self.trunk(x_t, sigma, cond, out=True), H, W, hd.N).float()     # (B, N, C, H, W)
            return piflow.DXPolicy(grid, x_t, sigma, self.policy_config["segment_size"], self.policy_config["shift"])
        h = self.trunk(x_t, sigma, cond)
        means = self.unpack(self.tr.proj_out_means(h), H, W, hd.K)                   # (B, K, C, H, W)
        logits = self.tr.proj_out_logweights(h)                                     # (B, L, K lw)
        if hd.logweights_channels == 1:                                            # one weight per token
            logits = rearrange(logits, "b (h w) k -> b k 1 h w", h=H // p).repeat_interleave(p, -2) \
                .repeat_interleave(p, -1)
        else:
            logits = self.unpack(logits, H, W, hd.K)                                # (B, K, 1, H, W)
        return piflow.gm_policy(means, logits, piflow.gm_logstds(self.tr, self._temb), x_t, sigma)

    @contextlib.contextmanager
    def teacher_mode(self):
        """Every LoRA off and the original norm_out / proj_out. peft's own switch (enable_adapters) also flips
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
            out = self.trunk(x_t, sigma, cond, out=True)
        return self.unpack(out, x_t.shape[-2], x_t.shape[-1], 1)[:, 0].float()


#################################################################################
#              Quantised frozen bases (QLoRA: Dettmers et al. 2023)             #
#################################################################################

QUANT = ("none", "nf4", "int8")
HEAD = ("proj_out", "norm_out")   # the base's output layers: the policy head reads / copies them, never quantised
_INT8_THRESHOLD = 6.0             # LLM.int8() outlier threshold (bitsandbytes' and diffusers' BitsAndBytesConfig default)


def _is_head(name):
    """proj_out, norm_out.* and the GM heads proj_out_means / _logweights / _logstds.* at the root."""
    return name.split(".")[0].startswith(HEAD)


def quantise_base(tr, kind, dtype):
    """QLoRA's frozen base (Dettmers et al. 2023): every nn.Linear of `tr` but the output head (HEAD) becomes a
    bitsandbytes layer computing in `dtype`: nf4 = Linear4bit (NormalFloat-4 in blocks of 64 with an fp32 absmax, no
    double quantisation: diffusers' BitsAndBytesConfig defaults), int8 = Linear8bitLt (LLM.int8(), outlier threshold
    6.0). bitsandbytes quantises a weight when it is moved to a device, so this runs where `tr` is: in place on the
    CPU, or on the GPU for the layers a BitsAndBytesConfig load left (load_base). Layers already quantised stay as
    they are; call it before the LoRA is added. Returns the names of the layers it quantised."""
    if kind not in QUANT[1:]:
        raise ValueError(f"kind={kind!r} is not accepted; expected {' | '.join(QUANT[1:])}")
    from peft.tuners.tuners_utils import BaseTunerLayer
    if any(isinstance(m, BaseTunerLayer) for m in tr.modules()):
        raise ValueError("quantise_base: the base already carries a LoRA; quantise it before add_lora")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise common.UserError(f"--base-quant {kind} needs bitsandbytes (pip install bitsandbytes)") from None
    done = []
    for name, m in list(tr.named_modules()):
        if type(m) is not nn.Linear or _is_head(name):
            continue
        w, bias = m.weight.detach().to(dtype), m.bias
        if kind == "nf4" and w.device.type == "cpu" and m.in_features % 64 and not _cpu_nf4_rows_ok():
            raise ValueError(f"quantise_base: {name} has in_features={m.in_features}, no multiple of 64; bitsandbytes "
                             f"{bnb.__version__} dequantises such 4-bit rows wrongly on the CPU (the released bases' "
                             "widths are all multiples of 64)")
        if kind == "nf4":
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias is not None, compute_dtype=dtype,
                                  compress_statistics=False, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=False, quant_type="nf4")
            # bitsandbytes' fused AVX512-BF16 CPU kernel (eval, no grad) computes in bf16 whatever `dtype` is; the
            # compute dtype asked for holds on every CPU
            q.support_avx512bf16_for_cpu = False
        else:
            q = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias is not None, has_fp16_weights=False,
                                    threshold=_INT8_THRESHOLD, device="meta")
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        if bias is not None:
            q.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(tr.get_submodule(parent) if parent else tr, child, q.to(w.device))      # .to quantises
        done.append(name)
    # the flags diffusers sets on a BitsAndBytesConfig load: peft then wraps these layers with its bitsandbytes LoRA
    # classes (peft/tuners/lora/bnb.py), on the CPU as on the GPU
    setattr(tr, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastNote) for f in log.filters):
        log.addFilter(_Int8CastNote())
    return done


@functools.lru_cache(maxsize=None)
def _cpu_nf4_rows_ok():
    """Whether bitsandbytes' CPU 4-bit dequantisation is right for rows of a length that is no multiple of the
    64-weight block (bitsandbytes 0.50.2: it is not). Probed once: a (2, 48) weight whose two blocks have different
    absmax, against its stored codes x absmax."""
    from bitsandbytes import functional as bf
    w = torch.linspace(-1, 1, 96).view(2, 48) * torch.tensor([[1.0], [4.0]])
    q, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    codes = torch.stack([q.view(-1) >> 4, q.view(-1) & 15], 1).view(-1).long()
    expect = state.code[codes] * state.absmax.repeat_interleave(64)[:96]
    return torch.allclose(bf.dequantize_4bit(q, state).view(-1), expect, rtol=1e-6, atol=0)


class _Int8CastNote(logging.Filter):
    """Drops bitsandbytes' per-call note that LLM.int8() quantises activations from fp16 (a warning on every forward
    of every layer for any compute dtype but fp16); other messages pass."""
    def filter(self, record):
        return "will be cast from" not in record.getMessage()


def bnb_config(kind, dtype):
    """diffusers' BitsAndBytesConfig of `kind`, the way users load pi-FLUX.2's 4-bit base; the head stays in dtype."""
    from diffusers import BitsAndBytesConfig
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  llm_int8_skip_modules=list(HEAD))
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=_INT8_THRESHOLD, llm_int8_skip_modules=list(HEAD))


def load_base(fam, base, kind, dtype, device):
    """The frozen base transformer of `fam` from `base`. kind 'none': in dtype. nf4 / int8 on CUDA: loaded onto the
    GPU through diffusers' BitsAndBytesConfig (skipping HEAD; its name match also skips every submodule named like
    a head layer, e.g. FLUX.1's single-block proj_out, which quantise_base then quantises); elsewhere (diffusers
    quantises on a GPU only): loaded in dtype, then quantise_base in place. Both give the same quantised layers."""
    if kind == "none":
        return t2i_data.load_pretrained(fam.transformer, base, "transformer", dtype)
    if torch.device(device).type == "cuda":
        tr = t2i_data.load_pretrained(fam.transformer, base, "transformer", dtype,
                                      quantization_config=bnb_config(kind, dtype))
    else:
        tr = t2i_data.load_pretrained(fam.transformer, base, "transformer", dtype)
    quantise_base(tr, kind, dtype)
    return tr.requires_grad_(False)


#################################################################################
#                     Files: base models, adapters, caches                      #
#################################################################################

def adapter_file(spec, filename, flag):
    """A file of an adapter: a local folder, a KNOWN id, or 'owner/repo:subfolder' (common.hub_file: the cache
    first; offline or missing gives one line naming the id)."""
    if os.path.isdir(spec):
        path = os.path.join(spec, filename)
        if not os.path.isfile(path):
            raise common.UserError(f"{flag}={spec!r}: no {filename} in that folder")
        return path
    repo, _, sub = (KNOWN[spec][0], ":", spec) if spec in KNOWN else spec.partition(":")
    if os.path.exists(spec) or repo.count("/") != 1:
        raise common.UserError(f"{flag}={spec!r} is not accepted; expected an adapter folder (config.json + {WEIGHTS}),"
                               f" a released id ({', '.join(KNOWN)}) or 'owner/repo:subfolder'")
    return common.hub_file(repo, f"{sub.strip('/')}/{filename}" if sub else filename, flag, spec)


def adapter_head(spec, model, flag):
    """The Head an adapter's config.json describes; refuses an unknown class or another model's adapter."""
    c = common.read_json(adapter_file(spec, "config.json", flag), f"{flag}={spec!r}")
    if not isinstance(c, dict):
        raise common.UserError(f"{flag}={spec!r}: config.json is not a JSON object")
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
                    logweights_channels=int(c.get("logweights_channels", fam.logweights)))
        ok = head.K >= 1 and head.logstd_layers >= 1 and head.logweights_channels in (1, S)
    else:                                  # DX: out_channels * patch_size^2 = N p^2 C (stock names: widened)
        head = Head("dx", N=int(c.get("out_channels") or 0) * int(c.get("patch_size") or 1) ** 2 // (S * fam.channels))
        ok = head.N >= 2
    if not ok:
        raise common.UserError(f"{flag}={spec!r}: config.json does not describe a pi-Flow {policy} head ({head})")
    return head


def _safetensors(spec, flag, tensors=True):
    """(metadata we read, {name: tensor} with a 'transformer.' prefix dropped, or None) of an adapter's weights."""
    from safetensors import safe_open
    path = adapter_file(spec, WEIGHTS, flag)
    try:
        with safe_open(path, "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()
                    if k in ("policy_config", "piid_config", "guidance")}
            sd = {k[len("transformer."):] if k.startswith("transformer.") else k: f.get_tensor(k) for k in f.keys()} \
                if tensors else None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
        raise common.UserError(f"{flag}={spec!r}: {WEIGHTS} is not a readable safetensors file "
                               f"({common.first_line(e)})") from None
    return meta, sd


def adapter_guidance(spec, model, flag):
    """The guidance scale a distilled-guidance adapter was trained with (ours: metadata; released: the row's)."""
    return _safetensors(spec, flag, tensors=False)[0].get("guidance", FAMILIES[model].guidance_scale)


def read_adapter(spec, model, flag):
    """(head, tensors by published name, safetensors metadata, LoRA rank)."""
    head = adapter_head(spec, model, flag)
    meta, sd = _safetensors(spec, flag)
    ranks = {v.shape[0] for k, v in sd.items() if ".lora_A." in k}
    if len(ranks) > 1:
        raise common.UserError(f"{flag}={spec!r}: LoRA ranks differ between modules ({sorted(ranks)}); expected "
                               "one rank")
    return head, sd, meta, ranks.pop() if ranks else 0


def student_from_adapter(model, tr, spec, flag, dtype, dropout=0.0, adapter=None, teacher=True):
    """Our student on base `tr` with an adapter (read_adapter(spec, ...) unless given) loaded strictly: the head from
    its config.json, LoRA targets and rank from its tensors, policy, schedule and trained guidance from its metadata
    (released adapters carry none: their KNOWN NFE, shift 3.2, final step 0.5, the row's guidance).
    Returns (student, head, rank, cfg); student.piid_config = cfg, student.guidance = the trained guidance."""
    fam, (head, sd, meta, rank) = FAMILIES[model], adapter or read_adapter(spec, model, flag)
    pc = meta.get("policy_config") or {}
    dx = {k: pc.get(k, v) for k, v in (("segment_size", 1 / 3.5), ("shift", PUBLISHED["shift"]))}
    student = T2IStudent(fam, tr, head, dtype, dx, teacher=teacher, init=False)
    if rank:
        try:
            student.add_lora(sorted(k.rsplit(".lora_A.", 1)[0] for k in sd if ".lora_A." in k), rank, dropout)
        except ValueError as e:
            raise common.UserError(f"{flag}={spec!r}: its LoRA does not fit the base model "
                                   f"({common.first_line(e)})") from None
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
        known = KNOWN.get(os.path.basename(os.path.normpath(spec.partition(":")[2] or spec)))
        if not known:
            print(f"{flag}={spec!r}: no training schedule stored and not a released id; assuming the released "
                  "schedule (NFE 4, shift 3.2, final step 0.5)")
        cfg = piflow.PiIDConfig(nfe=known[2] if known else 4, **PUBLISHED)
    student.piid_config, student.guidance = cfg, meta.get("guidance", fam.guidance_scale)
    return student, student.head, rank, cfg


def adapter_config(student):
    """config.json of the student class as the official exporter writes it (LakonLab tools/export_piflow_to_diffusers.py)."""
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


def write_adapter(folder, student, tensors, cfg, guidance=None):
    """The published layout; metadata policy_config, and ours: piid_config (the schedule), guidance (distilled)."""
    from safetensors.torch import save_file
    meta = {"policy_config": json.dumps(student.policy_config), "piid_config": json.dumps(dataclasses.asdict(cfg))}
    if guidance is not None and student.fam.guidance == "distilled":
        meta["guidance"] = json.dumps(float(guidance))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, WEIGHTS), metadata=meta)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(adapter_config(student), f, indent=2)


#################################################################################
#                 The trainer attachment (train_t2i.py --model M)               #
#################################################################################

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
    base_quant: str = "none"           # frozen base: none | nf4 | int8 (bitsandbytes, QLoRA-style; LoRA + head train in fp32)
    grad_checkpointing: bool = True    # gradient checkpointing of the transformer blocks (all published configs)
    eval_clip: Optional[str] = None    # CLIP model (hub id or folder) for a CLIP score at every --eval-every
    eval_prompts: int = 8              # prompts (the first cached ones) of that CLIP score

    def __post_init__(self):
        piflow.check_fields(self, [
                ("model", self.model in FAMILIES, " | ".join(FAMILIES)),
                ("policy", self.policy in ("gm", "dx"), "gm | dx"),
                ("base_quant", self.base_quant in QUANT, " | ".join(QUANT)),
                ("K", self.K >= 1, "an integer >= 1"), ("N", self.N >= 2, "an integer >= 2"),
                ("lora_rank", self.lora_rank >= 0, "an integer >= 0 (0 = no LoRA)"),
                ("lora_dropout", 0 <= self.lora_dropout < 1, "a value in [0, 1)"),
                ("max_text_len", (self.max_text_len or 1) >= 1, "an integer >= 1"),
                ("resolution", self.resolution >= 16 and self.resolution % 16 == 0, "a positive multiple of 16"),
                ("eval_prompts", self.eval_prompts >= 1, "an integer >= 1")])


FLAG_ALIASES = {"policy": ["--head"]}           # old underscore spellings: common.hyphenate accepts them all


def new_student(opts, cfg, tr, dtype):
    """A fresh student on base `tr`: the head initialised from the teacher's proj_out, then the LoRA (B = 0)."""
    fam = FAMILIES[opts.model]
    student = T2IStudent(fam, tr, Head(opts.policy, opts.K, opts.N), dtype, piflow.dx_grid(cfg))
    if opts.lora_rank:
        student.add_lora(fam.lora(tr), opts.lora_rank, opts.lora_dropout)
    return student


class T2IAttachment(trainer.Attachment):
    """The trainer attachment: LoRA + head student on a diffusers base; the base (LoRA off) is the teacher, with
    CFG against the cached empty-prompt negative for a 'cfg' row."""
    sharded, autocast = True, True

    def __init__(self, opts, cfg, tc, student, cache, device, clip=None):
        self.opts, self.cfg, self.tc, self.student, self.cache, self.device = opts, cfg, tc, student, cache, device
        self.fam, self.clip, self._eval = student.fam, clip, None
        h = opts.resolution // t2i_data.VAE_SCALE
        self.noise_shape = (self.fam.channels, h, h)
        self.teacher = student.teacher
        if self.fam.guidance == "cfg" and tc.guidance != 1:
            neg = t2i_data.make_cond(self.fam, cache, torch.tensor([0]), device, prefix="negative_")
            self.teacher = piflow.guided_teacher(student.teacher, tc.guidance, neg, tuple(tc.guidance_interval))

    def trainable(self):
        return self.student.trainable()                               # LoRA + heads + norm_out

    def _idx(self, n, g):
        return torch.randint(len(self.cache["prompts"]), (n,), generator=g, device=g.device).cpu()

    def sample_cond(self, n, g):
        return t2i_data.make_cond(self.fam, self.cache, self._idx(n, g), self.device, self.tc.guidance)

    def sample_data(self, n, g):
        idx = self._idx(n, g)
        return self.cache["latents"][idx].to(self.device).float(), t2i_data.make_cond(self.fam, self.cache, idx,
                                                                                self.device, self.tc.guidance)

    @torch.no_grad()
    def evaluate(self, student):
        """CLIP score (metrics.clip_score, torchmetrics) of the student's images of the first --eval-prompts cached
        prompts from fixed noise ('auto' temperature), decoded with the base's VAE (loaded at the first call)."""
        if self.clip is None:
            return {}
        if self._eval is None:
            vae = t2i_data.load_pretrained(self.fam.vae, self.opts.base or self.fam.repo, "vae", self.student.dtype)
            idx = torch.arange(min(self.opts.eval_prompts, len(self.cache["prompts"])))
            noise = torch.randn((len(idx),) + self.noise_shape, generator=torch.Generator().manual_seed(1234))
            self._eval = vae.to(self.device), idx, noise.to(self.device)
        vae, idx, noise = self._eval
        was_training = student.training
        student.eval()
        x = piflow.sample(student, noise, t2i_data.make_cond(self.fam, self.cache, idx, self.device, self.tc.guidance),
                          temperature="auto")
        student.train(was_training)
        images = ((t2i_data.decode(self.fam, vae, x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
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
        common.publish_dir(path, lambda folder: write_adapter(folder, self.student, tensors, self.cfg,
                                                                  self.tc.guidance))


def attach(opts, cfg, tc, settings, device, dtype):
    """train_py --model M: every user error first, then the cache, then the base model."""
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
    if opts.base_quant != "none" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise common.UserError(f"--base-quant={opts.base_quant!r} trains on one process; a quantised base is not "
                               "sharded over ranks (use --base-quant none with torchrun)")
    clip = None
    if opts.eval_clip:
        clip = metrics.load_clip(opts.eval_clip, "--eval-clip")
    cache = t2i_data.training_cache(opts, fam, base, tc, device, dtype)
    tr = load_base(fam, base, opts.base_quant, dtype, device)
    if adapter:
        student = student_from_adapter(opts.model, tr, opts.init_adapter, "--init-adapter", dtype,
                                           opts.lora_dropout, adapter)[0]
        if opts.policy == "dx":
            student.policy_config.update(piflow.dx_grid(cfg))
    else:
        student = new_student(opts, cfg, tr, dtype)
    for p in student.trainable(train=True).values():                      # fp32 masters (the published flex_freeze)
        p.data = p.data.float()
    if opts.grad_checkpointing:
        tr.enable_gradient_checkpointing()
    return T2IAttachment(opts, cfg, tc, student.to(device), cache, device, clip)
