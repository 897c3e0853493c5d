"""ImageNet-256 with a real teacher: SiT-XL/2 / REPA, GM and DX students, SD-VAE (issue 5; paper §5.1, App. C.1).

    SiT                    compact SiT/DiT with SiT's native parameter names (REPA / SiT `.pt` files load directly)
    sit_to_dit, dit_to_sit key maps to and from the DiT-style layout of the published pi-Flow teacher
                           (`teachers/repa_imagenet.pth`) and released students (`Lakonik/pi-Flow-ImageNet`)
    load_network           any of those checkpoints -> (SiT | GMSiT | DXSiT, info)
    Teacher, GMSiT, DXSiT  teacher(x_t, sigma, y) -> u ; student(x_t, sigma, y) -> piflow.GMPolicy / DXPolicy
    build_imagenet         (teacher, student, data, ...) for train_imagenet.py ; add_train_args(parser)
    encode_folder, LatentFolder, load_vae, decode   SD-VAE latents (scale 0.18215)
    sample_cli             `python sample.py --model imagenet --ckpt gmrepa_k32_imagenet_piid_1step --nfe 1 ...`

Conventions (piflow): x_sigma = (1 - sigma) x0 + sigma eps, u = eps - x0, sigma = 1 is noise. REPA's SiT uses
the same (t = sigma, v = u; t_scale 1); GMFlow's FM DiT takes t = 1000 sigma (t_scale 1000); the original SiT
(willisma/SiT, learn-sigma) is reversed: t = 1 - sigma, v = -u, and its extra sigma channels are dropped.

    python sit.py encode --images /data/imagenet/train --out latents/   # SD-VAE latent folder (see encode_folder)
    python sit.py convert SiT-XL-2-256x256.pt repa_dit.safetensors      # native SiT/REPA -> published DiT layout
"""
import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import piflow

NULL_CLASS = 1000
VAE_ID = "stabilityai/sd-vae-ft-ema"
HF_REPO = "Lakonik/pi-Flow-ImageNet"

# Known checkpoints (recipe §9, integration §5.2). t_scale: network time = t_scale * sigma.
# cfg: Table 8 teacher guidance {nfe: scale} (other NFE: the value for the largest listed NFE), interval on sigma.
KNOWN = {
    "repa": dict(repo=HF_REPO, file="teachers/repa_imagenet.pth", t_scale=1.0, cfg={1: 3.2, 2: 2.8},
                 interval=(0.0, 0.7)),
    "flowdit": dict(repo=HF_REPO, file="teachers/flowdit_imagenet.pth", t_scale=1000.0, cfg={1: 2.7},
                    interval=(0.0, 0.6)),
    "gmrepa_k32_imagenet_piid_1step": dict(repo=HF_REPO, t_scale=1.0, nfe=1,
                                           file="gmrepa_k32_imagenet_piid_1step/diffusion_pytorch_model.safetensors"),
    "gmrepa_k32_imagenet_piid_2step": dict(repo=HF_REPO, t_scale=1.0, nfe=2,
                                           file="gmrepa_k32_imagenet_piid_2step/diffusion_pytorch_model.safetensors"),
    "gmdit_k32_imagenet_piid_1step": dict(repo=HF_REPO, t_scale=1000.0, nfe=1,
                                          file="gmdit_k32_imagenet_piid_1step/diffusion_pytorch_model.safetensors"),
}


def _fail(name, given, accepted, exc=ValueError):
    raise exc(f"{name}: got {given!r}; accepted: {accepted}")


#################################################################################
#                         SiT / DiT (native SiT names)                          #
#################################################################################

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim=256, max_period=10000):
    """DiT/SiT sinusoidal embedding [cos(t w), sin(t w)], w_i = max_period^(-i/half) (diffusers shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(D, gh, gw, device=None):
    """MAE/DiT fixed 2-D sin-cos position embedding (gh*gw, D); first half encodes the column, second the row."""
    def emb_1d(pos, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.double().reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.cat([emb_1d(cols, D // 2), emb_1d(rows, D // 2)], 1).float().to(device)


class TimestepEmbedder(nn.Module):
    def __init__(self, D, freq_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.freq_dim = freq_dim

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table; row num_classes is the null class when class_dropout_prob > 0 (labels are never dropped here:
    pi-ID and sampling feed the null class explicitly for CFG)."""

    def __init__(self, num_classes, D, class_dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(class_dropout_prob > 0), D)

    def forward(self, y):
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, D, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, L, d)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, D, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """adaLN-Zero block: shift/scale/gate for attention then MLP (DiT Fig. 3)."""

    def __init__(self, D, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, heads)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, int(D * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):
        s1, g1, a1, s2, g2, a2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + a1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, g1))
        return x + a2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, g2))


class FinalLayer(nn.Module):
    def __init__(self, D, out_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, out_dim) if out_dim else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def features(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return modulate(self.norm_final(x), shift, scale)


class SiT(nn.Module):
    """SiT/DiT-XL/2 backbone (Peebles & Xie 2023; Ma et al. 2024) with SiT/REPA parameter names.

    forward(x (B, C, H, W), t (B,), y (B,)) -> (B, out_channels, H, W); t goes to the sinusoidal embedding as
    given. pos_embed is recomputed (fixed sin-cos) for the input size, so it is not a parameter.
    out_channels = in_channels * (2 if learn_sigma) unless given (DX students: N * C).
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, learn_sigma=False, class_dropout_prob=0.1, out_channels=None):
        super().__init__()
        if hidden_size % num_heads:
            _fail("num_heads", num_heads, f"a divisor of hidden_size={hidden_size}")
        self.input_size, self.p, self.in_channels, self.num_classes = input_size, patch_size, in_channels, num_classes
        self.out_channels = out_channels or in_channels * (2 if learn_sigma else 1)
        self.grad_checkpointing = False
        D = hidden_size
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, D, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(num_classes, D, class_dropout_prob)
        self.blocks = nn.ModuleList(SiTBlock(D, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(D, patch_size ** 2 * self.out_channels if self.head_is_linear else 0)
        self._pos = {}
        self.initialize_weights()

    head_is_linear = True

    def initialize_weights(self):
        """DiT init: xavier Linears, N(0, .02) tables/time MLP; adaLN and output zeroed (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for m in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(m.weight, std=0.02)
        for m in [b.adaLN_modulation[1] for b in self.blocks] + [self.final_layer.adaLN_modulation[1]]:
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)
        if self.final_layer.linear is not None:
            nn.init.zeros_(self.final_layer.linear.weight), nn.init.zeros_(self.final_layer.linear.bias)

    def pos_embed(self, gh, gw, device):
        key = (gh, gw, str(device))
        if key not in self._pos:
            self._pos[key] = sincos_pos_embed(self.t_embedder.mlp[0].out_features, gh, gw, device)
        return self._pos[key]

    def trunk(self, x, t, y):
        """-> final modulated tokens (B, L, D), conditioning c (B, D)."""
        B, _, H, W = x.shape
        if H % self.p or W % self.p:
            _fail("x.shape", tuple(x.shape), f"H and W divisible by patch_size={self.p}")
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2)                 # (B, L, D)
        h = h + self.pos_embed(H // self.p, W // self.p, x.device).to(h.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)                              # (B, D)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(blk, h, c, use_reentrant=False)
            else:
                h = blk(h, c)
        return self.final_layer.features(h, c), c

    def unpatchify(self, h, H, W, ch):
        """(B, L, p*p*ch) -> (B, ch, H, W); per token the layout is (p1, p2, ch) (DiT)."""
        B, p = h.shape[0], self.p
        h = h.reshape(B, H // p, W // p, p, p, ch)
        return torch.einsum("bhwpqc->bchpwq", h).reshape(B, ch, H, W)

    def forward(self, x, t, y):
        h, _ = self.trunk(x, t, y)
        return self.unpatchify(self.final_layer.linear(h), x.shape[2], x.shape[3], self.out_channels)


def SiT_XL_2(**kw):
    return SiT(patch_size=2, hidden_size=1152, depth=28, num_heads=16, **kw)


#################################################################################
#                   Teacher and students (pi-Flow conventions)                  #
#################################################################################

def _autocast(x, dtype):
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None and x.device.type == "cuda")


class Teacher(nn.Module):
    """teacher(x_t, sigma (B,), y) -> u (B, C, H, W) in pi-Flow convention.

    convention 'u' (REPA, GMFlow DiT): u = net(x_t, t_scale sigma, y)[:, :C].
    convention 'sit' (original SiT, t = 0 is noise): u = -net(x_t, 1 - sigma, y)[:, :C].
    """

    def __init__(self, net, t_scale=1.0, convention="u", autocast_dtype=None):
        super().__init__()
        if convention not in ("u", "sit"):
            _fail("convention", convention, "'u' (REPA / pi-Flow) or 'sit' (original SiT)")
        self.net, self.t_scale, self.convention, self.autocast_dtype = net, float(t_scale), convention, autocast_dtype

    def forward(self, x_t, sigma, y):
        sigma = piflow.as_batch(sigma, x_t)
        t = (1 - sigma) if self.convention == "sit" else sigma * self.t_scale
        with _autocast(x_t, self.autocast_dtype):
            v = self.net(x_t.to(self.net.x_embedder.proj.weight.dtype), t, y)[:, :x_t.shape[1]].float()
        return -v if self.convention == "sit" else v


class GMSiT(SiT):
    """GM student (GMDiT-V2 layout, recipe §6.1): SiT trunk + proj_out_means (p^2 K C), proj_out_logweights (p^2 K),
    proj_out_logstds = SiLU, Linear(D, 1024), SiLU, Linear(1024, 1) on the detached conditioning embedding.

    forward(x_t, sigma, y) -> piflow.GMPolicy; heads(x, t, y) -> (means (B,K,C,H,W), logweights (B,K,1,H,W)
    log-softmaxed over K, logstds (B,1,1,1,1)). Means layout per token: (p1, p2, k, c).
    """
    head_is_linear = False

    def __init__(self, num_gaussians=32, logstd_inner_dim=1024, t_scale=1.0, autocast_dtype=None, **kw):
        self.K = num_gaussians
        super().__init__(**kw)
        D, p2, C = self.t_embedder.mlp[0].out_features, self.p ** 2, self.out_channels
        self.proj_out_means = nn.Linear(D, p2 * self.K * C)
        self.proj_out_logweights = nn.Linear(D, p2 * self.K)
        self.proj_out_logstds = nn.Sequential(nn.SiLU(), nn.Linear(D, logstd_inner_dim), nn.SiLU(),
                                              nn.Linear(logstd_inner_dim, 1))
        self.t_scale, self.autocast_dtype = float(t_scale), autocast_dtype
        for m in (self.proj_out_means, self.proj_out_logweights, self.proj_out_logstds[3]):
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.proj_out_means.bias.copy_((torch.randn(self.K * C) * 0.1).repeat(p2))  # no-teacher init (§6.1)

    def heads(self, x, t, y):
        B, _, H, W = x.shape
        h, c = self.trunk(x, t, y)
        means = self.unpatchify(self.proj_out_means(h), H, W, self.K * self.out_channels)
        logweights = self.unpatchify(self.proj_out_logweights(h), H, W, self.K)
        logstds = self.proj_out_logstds(c.detach())
        return (means.reshape(B, self.K, self.out_channels, H, W),
                logweights.reshape(B, self.K, 1, H, W).float().log_softmax(1), logstds.reshape(B, 1, 1, 1, 1))

    def forward(self, x_t, sigma, y):
        sigma = piflow.as_batch(sigma, x_t)
        with _autocast(x_t, self.autocast_dtype):
            means, logweights, logstds = self.heads(x_t, sigma * self.t_scale, y)
        return piflow.GMPolicy(means.float(), logweights.float(), logstds.float(), x_t, sigma)


class DXSiT(SiT):
    """DX student (§3.1, recipe §6.4): SiT with N*C outputs (per token (p1, p2, n, c)), grid index 0 = low noise.

    forward(x_t, sigma, y) -> piflow.DXPolicy(segment_size = 1/NFE of the training schedule, shift).
    """

    def __init__(self, num_grid=10, segment_size=1.0, shift=1.0, t_scale=1.0, autocast_dtype=None, in_channels=4,
                 **kw):
        kw.pop("learn_sigma", None), kw.pop("out_channels", None)
        super().__init__(in_channels=in_channels, out_channels=num_grid * in_channels, **kw)
        self.N, self.segment_size, self.shift = num_grid, float(segment_size), float(shift)
        self.t_scale, self.autocast_dtype = float(t_scale), autocast_dtype

    def forward(self, x_t, sigma, y):
        sigma = piflow.as_batch(sigma, x_t)
        B, C, H, W = x_t.shape
        with _autocast(x_t, self.autocast_dtype):
            grid_u = super().forward(x_t, sigma * self.t_scale, y).float().reshape(B, self.N, C, H, W)
        return piflow.DXPolicy(grid_u, x_t, sigma, self.segment_size, self.shift)


@torch.no_grad()
def init_student_from_teacher(student, teacher_net, bias_noise=0.05, generator=None):
    """Copy the teacher trunk; expand its output layer into the student head (recipe §6.1).

    GM: means weight = teacher head replicated K times; bias replicated + N(0, bias_noise^2) per (k, c), shared over
    the p^2 sub-positions; logweights head zero; logstd last layer weight 0, bias log 0.05. DX: head tiled N times.
    """
    sd = {k: v for k, v in teacher_net.state_dict().items() if not k.startswith("final_layer.linear")}
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"teacher -> student: unexpected keys {unexpected[:5]}")
    C, p2 = student.in_channels, student.p ** 2
    Wt_D = teacher_net.final_layer.linear.in_features
    Wt = teacher_net.final_layer.linear.weight.reshape(p2, -1, Wt_D)
    bt = teacher_net.final_layer.linear.bias.reshape(p2, -1)
    Wt, bt = Wt[:, :C], bt[:, :C]                                                 # learn-sigma: first C channels
    if isinstance(student, GMSiT):
        K = student.K
        student.proj_out_means.weight.copy_(Wt[:, None].expand(p2, K, C, Wt_D).reshape(-1, Wt_D))
        noise = torch.randn(K, C, generator=generator) * bias_noise
        student.proj_out_means.bias.copy_((bt[:, None] + noise.to(bt)).reshape(-1))
        nn.init.zeros_(student.proj_out_logweights.weight), nn.init.zeros_(student.proj_out_logweights.bias)
        nn.init.zeros_(student.proj_out_logstds[3].weight)
        student.proj_out_logstds[3].bias.fill_(math.log(0.05))
    elif isinstance(student, DXSiT):
        N = student.N
        student.final_layer.linear.weight.copy_(Wt[:, None].expand(p2, N, C, Wt_D).reshape(-1, Wt_D))
        student.final_layer.linear.bias.copy_(bt[:, None].expand(p2, N, C).reshape(-1))
    else:
        _fail("student", type(student).__name__, "GMSiT or DXSiT")
    return student


#################################################################################
#            Key maps: native SiT/REPA  <->  DiT-style (pi-Flow release)        #
#################################################################################

_BLOCK_MAP = [("adaLN_modulation.1", "norm1.linear"), ("attn.proj", "attn1.to_out.0"),
              ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2")]
_TOP_MAP = [("x_embedder.proj", "pos_embed.proj"), ("t_embedder.mlp.0", "emb.timestep_embedder.linear_1"),
            ("t_embedder.mlp.2", "emb.timestep_embedder.linear_2"),
            ("y_embedder.embedding_table", "emb.class_embedder.embedding_table"),
            ("final_layer.adaLN_modulation.1", "proj_out_1"), ("final_layer.linear", "proj_out_2")]
_HEADS = ("proj_out_means.", "proj_out_logweights.", "proj_out_logstds.")


def sit_to_dit(sd):
    """Native SiT keys -> DiT-style keys (GMDiT-V2 / DiTTransformer2DModelMod, shared `emb`). qkv is split."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m:
            i, name, wb = m.groups()
            pre = f"transformer_blocks.{i}."
            if name == "attn.qkv":
                for part, t in zip("qkv", v.chunk(3, dim=0)):
                    out[f"{pre}attn1.to_{part}.{wb}"] = t.clone()
                continue
            new = dict(_BLOCK_MAP).get(name)
        elif k.startswith(_HEADS):
            out[k] = v
            continue
        else:
            base, _, wb = k.rpartition(".")
            new = dict(_TOP_MAP).get(base)
            pre = ""
        if new is None:
            raise KeyError(f"sit_to_dit: no DiT name for key {k!r}")
        out[f"{pre}{new}.{wb}"] = v
    return out


def dit_to_sit(sd):
    """DiT-style keys -> native SiT keys. Accepts the shared `emb.*` layout and stock diffusers DiT
    (per-block `transformer_blocks.i.norm1.emb.*`, block 0's copy is used); drops the pos_embed buffer."""
    sd = dict(sd)
    if not any(k.startswith("emb.") for k in sd):
        for k in list(sd):
            m = re.match(r"transformer_blocks\.0\.norm1\.emb\.(.+)$", k)
            if m:
                sd["emb." + m.group(1)] = sd[k]
    sd = {k: v for k, v in sd.items() if not re.match(r"transformer_blocks\.\d+\.norm1\.emb\.", k)
          and k != "pos_embed.pos_embed"}
    inv_top, inv_blk, out = {b: a for a, b in _TOP_MAP}, {b: a for a, b in _BLOCK_MAP}, {}
    qkv = {}
    for k, v in sd.items():
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m:
            i, name, wb = m.groups()
            q = re.match(r"attn1\.to_([qkv])$", name)
            if q:
                qkv.setdefault((i, wb), {})[q.group(1)] = v
                continue
            new = inv_blk.get(name)
            key = f"blocks.{i}.{new}.{wb}"
        elif k.startswith(_HEADS):
            out[k] = v
            continue
        else:
            base, _, wb = k.rpartition(".")
            new = inv_top.get(base)
            key = f"{new}.{wb}"
        if new is None:
            raise KeyError(f"dit_to_sit: no SiT name for key {k!r}")
        out[key] = v
    for (i, wb), d in qkv.items():
        if set(d) != set("qkv"):
            raise KeyError(f"dit_to_sit: block {i} {wb}: found to_{sorted(d)}, need to_q, to_k and to_v")
        out[f"blocks.{i}.attn.qkv.{wb}"] = torch.cat([d["q"], d["k"], d["v"]])
    return out


#################################################################################
#                                 Loading                                       #
#################################################################################

def resolve_checkpoint(spec, name="--ckpt"):
    """Checkpoint spec -> local file. Accepted: an existing local path; a known id (KNOWN); hf://owner/repo/path.

    Hub files go through huggingface_hub.hf_hub_download (honours HF_HUB_OFFLINE and the local cache).
    """
    accepted = (f"an existing file, a known id ({', '.join(KNOWN)}), or hf://owner/repo/path/in/repo "
                "(also huggingface://...)")
    if not isinstance(spec, str) or not spec:
        _fail(name, spec, accepted)
    if os.path.isfile(spec):
        return spec
    if spec in KNOWN:
        repo, fname = KNOWN[spec]["repo"], KNOWN[spec]["file"]
    elif re.match(r"(hf|huggingface)://[^/]+/[^/]+/.+", spec):
        parts = spec.split("://", 1)[1].split("/")
        repo, fname = "/".join(parts[:2]), "/".join(parts[2:])
    elif os.sep in spec or spec.endswith((".pt", ".pth", ".safetensors", ".bin")):
        _fail(name, spec, "an existing file (no such file)", FileNotFoundError)
    else:
        _fail(name, spec, accepted)
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo_id=repo, filename=fname)


def read_checkpoint(path, trust=False):
    """-> (state dict of tensors, metadata dict). safetensors via safetensors; .pt/.pth via torch.load with
    weights_only=True, retried with argparse.Namespace allow-listed (REPA's {'model','ema','opt','args'} dicts).
    trust=True falls back to weights_only=False (arbitrary code execution: only for files you trust)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
        return sd, {k: json.loads(v) if k == "piflow" else v for k, v in meta.items()}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e1:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e2:
            if not trust:
                raise ValueError(f"checkpoint {path!r} cannot be read with weights_only=True ({e2}); if you trust "
                                 "the file, pass --trust-checkpoint (torch.load weights_only=False)") from e1
            print(f"warning: loading {path} with weights_only=False (trusted by --trust-checkpoint)")
            obj = torch.load(path, map_location="cpu", weights_only=False)
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("piflow"), dict):
        meta["piflow"] = obj["piflow"]
    if isinstance(obj, dict) and isinstance(obj.get("args"), dict):       # train_imagenet.py ckpt / export
        a = obj["args"]
        nfe = a.get("nfe") or 1
        meta["piflow"] = dict(policy=a.get("policy"), nfe=nfe, shift=a.get("shift", 1.0), segment_size=1.0 / nfe,
                              t_scale=a.get("t_scale") or KNOWN.get(a.get("teacher_ckpt"), {}).get("t_scale", 1.0),
                              num_heads=a.get("num_heads"))
    for key in ("ema", "student_ema", "model", "student", "state_dict"):   # prefer EMA weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and obj[key] and \
                all(isinstance(v, torch.Tensor) for v in obj[key].values()):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        _fail("checkpoint", path, "a state dict, or a dict with 'ema' / 'model' / 'student' / 'state_dict'")
    sd = {}
    for k, v in obj.items():
        for pre in ("module.", "_orig_mod.", "diffusion_ema.denoising.", "denoising.", "net."):
            k = k[len(pre):] if k.startswith(pre) else k
        sd[k] = v
    return sd, meta


def infer_arch(sd, num_heads=None):
    """Native state dict -> SiT constructor kwargs (+ 'kind': sit | gm | dx-or-sit, K / out channels)."""
    w = sd["x_embedder.proj.weight"]                                             # (D, C, p, p)
    D, C, p = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    if num_heads is None:
        if D % 72:
            _fail("num_heads", None, f"a value (hidden size {D} is not a multiple of the SiT head dim 72)")
        num_heads = D // 72
    kw = dict(patch_size=p, in_channels=C, hidden_size=D, depth=depth, num_heads=num_heads,
              mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D, num_classes=rows - 1, class_dropout_prob=0.1)
    if "pos_embed" in sd:
        kw["input_size"] = int(round(math.sqrt(sd["pos_embed"].shape[1]))) * p
    if "proj_out_means.weight" in sd:
        kw["num_gaussians"] = sd["proj_out_logweights.weight"].shape[0] // p ** 2
        kw["logstd_inner_dim"] = sd["proj_out_logstds.1.weight"].shape[0]
    else:
        kw["out_channels"] = sd["final_layer.linear.weight"].shape[0] // p ** 2
    return kw


def to_native(sd):
    """Any supported layout -> native SiT keys; checks and drops pos_embed, drops REPA projectors.*."""
    if "pos_embed.proj.weight" in sd:
        sd = dit_to_sit(sd)
    elif "x_embedder.proj.weight" not in sd:
        raise ValueError(f"unknown checkpoint layout (first keys {list(sd)[:4]}); accepted: native SiT/REPA "
                         "(x_embedder.*, blocks.N.*) or DiT-style (pos_embed.proj.*, transformer_blocks.N.*)")
    sd = {k: v.float() for k, v in sd.items() if not k.startswith("projectors.")}
    if "pos_embed" in sd:
        pe, D = sd["pos_embed"], sd["x_embedder.proj.weight"].shape[0]
        g = int(round(math.sqrt(pe.shape[1])))
        err = (pe.reshape(-1, D) - sincos_pos_embed(D, g, g)).abs().max().item()
        if err > 1e-4:
            raise ValueError(f"pos_embed of the checkpoint differs from the fixed sin-cos embedding by {err:.2e}")
    return sd


def load_network(spec, num_heads=None, trust=False, name="--ckpt"):
    """Checkpoint (see resolve_checkpoint) -> (net, info). net: SiT (teacher; learn-sigma channels dropped),
    GMSiT or DXSiT (students, from metadata written by save_student); info: dict(t_scale, convention, kind, ...)."""
    path = resolve_checkpoint(spec, name)
    sd, meta = read_checkpoint(path, trust)
    pf = dict(meta.get("piflow") or {})
    sd = to_native(sd)
    kw = infer_arch(sd, num_heads or pf.get("num_heads"))
    input_size = kw.pop("input_size", None)
    info = dict(path=path, t_scale=KNOWN.get(spec, {}).get("t_scale", 1.0), convention="u",
                nfe=KNOWN.get(spec, {}).get("nfe"), input_size=input_size or pf.get("input_size", 32))
    info.update({k: pf[k] for k in ("t_scale", "nfe", "segment_size", "shift", "convention") if k in pf})
    if "num_gaussians" in kw:
        net, info["kind"] = GMSiT(**kw, t_scale=info["t_scale"]), "gm"
    elif pf.get("policy") == "dx":
        out = kw.pop("out_channels")
        net = DXSiT(num_grid=out // kw["in_channels"], segment_size=pf.get("segment_size", 1.0),
                    shift=pf.get("shift", 1.0), t_scale=info["t_scale"], **kw)
        info["kind"] = "dx"
    else:
        out, C = kw.pop("out_channels"), kw["in_channels"]
        if out == 2 * C:   # learn-sigma: keep the first C channels of each sub-position
            p2 = kw["patch_size"] ** 2
            sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"].reshape(p2, 2 * C, -1)[:, :C].reshape(
                p2 * C, -1)
            sd["final_layer.linear.bias"] = sd["final_layer.linear.bias"].reshape(p2, 2 * C)[:, :C].reshape(-1)
            info["convention"] = "sit"   # original SiT (learn_sigma=True): reversed time, v = -u
        elif out != C:
            _fail("checkpoint output channels", out, f"{C} (REPA / pi-Flow) or {2 * C} (learn-sigma SiT)")
        net, info["kind"] = SiT(**kw), "teacher"
    sd.pop("pos_embed", None)
    net.load_state_dict(sd, strict=True)
    net.input_size = info["input_size"]
    return net, info


def student_state_dict(student, layout="dit"):
    """Student weights in the published DiT-style layout (layout='dit') or native SiT names ('sit')."""
    sd = {k: v.detach().float().cpu().contiguous() for k, v in student.state_dict().items()}
    return sit_to_dit(sd) if layout == "dit" else sd


def save_student(student, path, nfe=None, extra=None):
    """Atomic safetensors save in the released GMDiT-V2 layout + metadata 'piflow' (policy, t_scale, heads, ...)."""
    from safetensors.torch import save_file
    D = student.t_embedder.mlp[0].out_features
    meta = dict(policy="gm" if isinstance(student, GMSiT) else "dx", t_scale=student.t_scale,
                num_heads=student.blocks[0].attn.heads, input_size=student.input_size, nfe=nfe, hidden_size=D)
    if isinstance(student, DXSiT):
        meta.update(segment_size=student.segment_size, shift=student.shift)
    meta.update(extra or {})
    tmp = path + ".tmp"
    save_file(student_state_dict(student), tmp, metadata={"piflow": json.dumps(meta)})
    os.replace(tmp, path)


#################################################################################
#                     SD-VAE latents (integration §5.5)                         #
#################################################################################

def load_vae(spec=VAE_ID, device="cpu", dtype=torch.float32):
    """diffusers AutoencoderKL from a hub id (HF_HUB_OFFLINE / cache honoured) or a local save_pretrained folder."""
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(spec).to(device, dtype).eval().requires_grad_(False)


@torch.no_grad()
def decode(vae, z):
    """latents (B, 4, h, w) -> uint8 images (B, H, W, 3): vae.decode(z / scale) in [-1, 1] -> [0, 255]."""
    x = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def center_crop(img, res):
    """ADM center crop: halve with BOX while the short side >= 2 res, BICUBIC to short side res, crop."""
    from PIL import Image
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    s = res / min(img.size)
    img = img.resize(tuple(round(x * s) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img.convert("RGB"))
    y, x = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
    return arr[y:y + res, x:x + res]


IMG_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@torch.no_grad()
def encode_folder(images, out, vae=VAE_ID, resolution=256, batch_size=32, shard_size=10000, device="cpu",
                  seed=0, sample=True, progress=True):
    """Encode an ImageFolder (one sub-folder per class, sorted names -> labels 0..) into a latent folder:

        out/latents_00000.npy  float16 (n, 4, res/8, res/8)   one posterior sample * scaling_factor (official cache)
        out/labels_00000.npy   int64 (n,)
        out/meta.json          {num_images, classes, shards, shard_size, resolution, vae, scaling_factor, latent_shape}

    Shards are written atomically and skipped when present (resume). sample=False stores the posterior mean.
    vae: an AutoencoderKL instance or a spec for load_vae.
    """
    if not os.path.isdir(images):
        _fail("--images", images, "an existing folder with one sub-folder per class", FileNotFoundError)
    classes = sorted(d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d)))
    files = [(os.path.join(images, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(images, c))) if f.lower().endswith(IMG_EXT)]
    if not files:
        _fail("--images", images, f"class sub-folders containing images ({', '.join(IMG_EXT)})")
    vae = load_vae(vae, device) if isinstance(vae, str) else vae
    sf = float(vae.config.scaling_factor)
    os.makedirs(out, exist_ok=True)
    from PIL import Image
    from tqdm import tqdm
    shards = list(range(0, len(files), shard_size))
    latent_shape = None
    for s, start in enumerate(tqdm(shards, desc="encode shards", disable=not progress)):
        lat_path, lab_path = (os.path.join(out, f"{n}_{s:05d}.npy") for n in ("latents", "labels"))
        chunk = files[start:start + shard_size]
        if os.path.exists(lat_path) and os.path.exists(lab_path):
            latent_shape = list(np.load(lat_path, mmap_mode="r").shape[1:])
            continue
        g = torch.Generator(device).manual_seed(seed * 100003 + s)
        lats = []
        for b in range(0, len(chunk), batch_size):
            x = np.stack([center_crop(Image.open(f), resolution) for f, _ in chunk[b:b + batch_size]])
            x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device, vae.dtype)
            dist = vae.encode(x).latent_dist
            z = dist.sample(generator=g) if sample else dist.mean
            lats.append((z.float() * sf).cpu().half().numpy())
        lats = np.concatenate(lats)
        latent_shape = list(lats.shape[1:])
        for path, arr in ((lat_path, lats), (lab_path, np.array([l for _, l in chunk], dtype=np.int64))):
            with open(path + ".tmp", "wb") as f:
                np.save(f, arr)
            os.replace(path + ".tmp", path)
    meta = dict(num_images=len(files), classes=classes, shards=len(shards), shard_size=shard_size,
                resolution=resolution, vae=vae.config.get("_name_or_path", "") or "AutoencoderKL",
                scaling_factor=sf, latent_shape=latent_shape)
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))
    return meta


class LatentFolder:
    """Random access to an encode_folder output (memory-mapped). sample(B, generator) -> (x0 (B,4,h,w), y (B,))."""

    def __init__(self, folder):
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            _fail("--latents", folder, "a folder written by `python sit.py encode` (with meta.json)",
                  FileNotFoundError)
        with open(meta_path) as f:
            self.meta = json.load(f)
        n = self.meta["shards"]
        self.latents = [np.load(os.path.join(folder, f"latents_{s:05d}.npy"), mmap_mode="r") for s in range(n)]
        self.labels = np.concatenate([np.load(os.path.join(folder, f"labels_{s:05d}.npy")) for s in range(n)])
        self.offsets = np.cumsum([0] + [len(a) for a in self.latents])
        self.shape = tuple(self.meta["latent_shape"])

    def __len__(self):
        return int(self.offsets[-1])

    def sample(self, batch, generator=None):
        idx = torch.randint(len(self), (batch,), generator=generator).numpy()
        s = np.searchsorted(self.offsets, idx, side="right") - 1
        x0 = np.stack([self.latents[a][i - self.offsets[a]] for a, i in zip(s, idx)]).astype(np.float32)
        return torch.from_numpy(x0), torch.from_numpy(self.labels[idx])


#################################################################################
#                  Training hook for train_imagenet.py (--teacher sit)           #
#################################################################################

def add_train_args(parser):
    """SiT-specific flags (options the trainer already defines are left to it)."""
    have = set(parser._option_string_actions)

    def add(flag, **kw):
        if flag not in have:
            parser.add_argument(flag, **kw)
    add("--teacher-ckpt", default="repa", help="teacher checkpoint: known id (repa, flowdit), hf://owner/repo/path, "
        "or a local .pt/.pth/.safetensors (REPA / SiT / DiT-style)")
    add("--student-init", default=None, help="optional student checkpoint to start from (released id or local file) "
        "instead of the teacher-initialised head")
    add("--policy", default="gm", choices=["gm", "dx"], help="student policy: GMFlow (K Gaussians) or DX (N grid)")
    add("--num-gaussians", type=int, default=32, help="K for the GM policy (Table 8: 32)")
    add("--dx-grid", type=int, default=10, help="N grid points for the DX policy")
    add("--cfg-scale", type=float, default=None, help="teacher CFG scale (default: Table 8, REPA 3.2 at 1 NFE, "
        "2.8 otherwise; FM DiT 2.7)")
    add("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
        help="sigma interval where CFG applies (default: REPA [0, 0.7], FM DiT [0, 0.6])")
    add("--grad-checkpointing", action="store_true", help="checkpoint student blocks (less memory, ~30%% slower)")
    add("--latents", default=None, help="latent folder from `python sit.py encode` for data-dependent training "
        "(without it the trainer draws labels uniformly: data-free)")
    add("--num-heads", type=int, default=None, help="attention heads (default: hidden size / 72, as SiT)")
    add("--teacher-convention", default="auto", choices=["auto", "u", "sit"],
        help="teacher time convention: u (REPA, pi-Flow), sit (original SiT: t = 1 - sigma, v = -u); auto: sit "
        "for learn-sigma checkpoints")
    add("--t-scale", type=float, default=None, help="network time = t_scale * sigma (default: 1 for REPA, "
        "1000 for the FM DiT)")
    add("--amp", default="auto", choices=["auto", "none", "bf16"], help="bf16 autocast on CUDA (auto: on for CUDA)")
    add("--vae", default=VAE_ID, help="SD-VAE for preview grids (hub id or local folder)")
    add("--trust-checkpoint", action="store_true", help="allow torch.load(weights_only=False) for trusted files")
    return parser


def table8_cfg(teacher_spec, nfe):
    """Table 8 teacher guidance (scale, interval) for a known teacher id; REPA values otherwise."""
    k = KNOWN.get(teacher_spec, KNOWN["repa"])
    cfg = k.get("cfg", KNOWN["repa"]["cfg"])
    return cfg.get(nfe, cfg[max(cfg)]), k.get("interval", KNOWN["repa"]["interval"])


@dataclass
class ImageNetSetup:
    teacher: Callable            # guided: teacher(x_t, sigma, y) -> u
    teacher_u: nn.Module         # the unguided Teacher
    student: nn.Module           # student(x_t, sigma, y) -> piflow policy
    shape: tuple                 # latent (C, H, W)
    num_classes: int
    data: Optional[LatentFolder]  # None -> data-free
    piid_defaults: dict          # Table 8 ImageNet PiIDConfig fields
    info: dict = field(default_factory=dict)
    vae_spec: str = VAE_ID
    _vae: object = None

    def sample_batch(self, batch, generator=None, device="cpu"):
        """-> (x0 (B, C, H, W) or None when data-free, labels (B,)); labels uniform when data-free."""
        if self.data is not None:
            x0, y = self.data.sample(batch, generator)
            return x0.to(device), y.to(device)
        return None, torch.randint(self.num_classes, (batch,), generator=generator).to(device)

    def decode(self, z):
        """latents -> uint8 (B, H, W, 3); loads the VAE on first use."""
        if self._vae is None:
            self._vae = load_vae(self.vae_spec, z.device)
        return decode(self._vae, z)

    def save(self, path, nfe=None):
        save_student(self.student, path, nfe=nfe)


def build_imagenet(args, device):
    """Teacher (guided, frozen), student (initialised from the teacher, recipe §6.1), data for train_imagenet.py."""
    nfe = getattr(args, "nfe", 1)
    device = torch.device(device)
    amp = getattr(args, "amp", "auto")
    amp_dtype = torch.bfloat16 if (amp == "bf16" or (amp == "auto" and device.type == "cuda")) else None
    data = LatentFolder(args.latents) if getattr(args, "latents", None) else None  # fail fast, before loading
    if getattr(args, "data_dependent", False) and data is None:
        _fail("--latents", None, "a latent folder (`python sit.py encode`) for --data-dependent training")
    if args.policy not in ("gm", "dx"):
        _fail("--policy", args.policy, "gm or dx")
    net, info = load_network(args.teacher_ckpt, getattr(args, "num_heads", None),
                             getattr(args, "trust_checkpoint", False), name="--teacher-ckpt")
    if info["kind"] != "teacher":
        _fail("--teacher-ckpt", args.teacher_ckpt, "a teacher (SiT / REPA / DiT-style with a single output layer)")
    if getattr(args, "t_scale", None) is not None:
        info["t_scale"] = args.t_scale
    conv = getattr(args, "teacher_convention", "auto")
    info["convention"] = info["convention"] if conv == "auto" else conv
    print(f"teacher {info['path']}: convention {info['convention']}, t_scale {info['t_scale']}")
    scale, interval = table8_cfg(args.teacher_ckpt, nfe)
    scale = scale if getattr(args, "cfg_scale", None) is None else args.cfg_scale
    interval = tuple(interval if getattr(args, "cfg_interval", None) is None else args.cfg_interval)
    kw = dict(input_size=info["input_size"], patch_size=net.p, in_channels=net.in_channels,
              hidden_size=net.t_embedder.mlp[0].out_features, depth=len(net.blocks),
              num_heads=net.blocks[0].attn.heads, mlp_ratio=net.blocks[0].mlp.fc1.out_features /
              net.t_embedder.mlp[0].out_features, num_classes=net.num_classes,
              t_scale=info["t_scale"], autocast_dtype=amp_dtype)
    if args.policy == "gm":
        student = GMSiT(num_gaussians=args.num_gaussians, **kw)
    else:
        student = DXSiT(num_grid=args.dx_grid, segment_size=1.0 / nfe, shift=getattr(args, "shift", 1.0), **kw)
    g = torch.Generator().manual_seed(getattr(args, "seed", 0))
    init_student_from_teacher(student, net, generator=g)
    teacher_net = net.to(device, amp_dtype or torch.float32).eval().requires_grad_(False)
    teacher = Teacher(teacher_net, info["t_scale"], info["convention"], amp_dtype)
    null = torch.full((1,), net.num_classes, dtype=torch.long, device=device)   # null class: 1000 on ImageNet
    guided = piflow.guided_teacher(teacher, scale, null, interval)
    if getattr(args, "student_init", None):
        src, _ = load_network(args.student_init, kw["num_heads"], getattr(args, "trust_checkpoint", False),
                              name="--student-init")
        student.load_state_dict(src.state_dict())
    student.grad_checkpointing = bool(getattr(args, "grad_checkpointing", False))
    student = student.to(device).train()
    if data is not None and tuple(data.shape) != (net.in_channels, info["input_size"], info["input_size"]):
        _fail("--latents", args.latents, f"latents of shape {(net.in_channels, info['input_size'], info['input_size'])}"
              f" (folder has {data.shape})")
    piid = dict(shift=1.0, final_step_scale=1.0, total_substeps=128, num_intermediate=2, window_substeps=0,
                gm_dropout=0.05 if args.policy == "gm" else 0.0, loss_scale=3.0)
    info.update(cfg_scale=scale, cfg_interval=interval)
    return ImageNetSetup(guided, teacher, student, (net.in_channels, info["input_size"], info["input_size"]), net.num_classes,
                         data, piid, info, getattr(args, "vae", VAE_ID))


class _TrainSetup:
    """train_imagenet.Setup contract: teacher (unguided), student, sample_data, sample_cond, noise_shape,
    null_cond, evaluate(ema) -> dict."""


def build(args, device):
    """train_imagenet.py dispatch (`--teacher sit`). Fills args.guidance / args.guidance_interval with Table 8
    values (or --cfg-scale / --cfg-interval) when they are left at the trainer's defaults (1.0, (0, 1))."""
    if getattr(args, "policy", "gm") == "shortcut":
        _fail("--policy", "shortcut", "gm or dx with --teacher sit")
    if getattr(args, "guidance", 1.0) == 1.0:
        args.cfg_scale = getattr(args, "cfg_scale", None)
    else:
        args.cfg_scale = args.guidance
    if tuple(getattr(args, "guidance_interval", (0.0, 1.0))) != (0.0, 1.0):
        args.cfg_interval = tuple(args.guidance_interval)
    setup = build_imagenet(args, device)
    args.guidance, args.guidance_interval = setup.info["cfg_scale"], list(setup.info["cfg_interval"])
    s = _TrainSetup()
    s.teacher, s.student, s.noise_shape = setup.teacher_u, setup.student, setup.shape
    s.null_cond = torch.tensor([setup.num_classes], device=device)
    s.sample_cond = lambda B, g: torch.randint(setup.num_classes, (B,), generator=g, device=g.device)

    def sample_data(B, g):
        if setup.data is None:
            _fail("--latents", None, "a latent folder for data-dependent training")
        cpu = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=g, device=g.device)))
        x0, y = setup.data.sample(B, cpu)
        return x0.to(device), y.to(device)
    s.sample_data = sample_data
    cache = {}

    @torch.no_grad()
    def evaluate(ema, n=8, teacher_steps=32):
        """Teacher alignment on a fixed batch: latent MSE of the NFE-step EMA student vs the teacher's guided
        Euler ODE (teacher_steps, uniform in sigma) from the same noise (computed once)."""
        if not cache:
            g = torch.Generator().manual_seed(1234)
            noise = torch.randn((n,) + tuple(setup.shape), generator=g).to(device)
            y = torch.arange(n, device=device) * (setup.num_classes // n)
            x = noise
            for i in range(teacher_steps):
                s0, s1 = 1 - i / teacher_steps, 1 - (i + 1) / teacher_steps
                x = x + setup.teacher(x, piflow.as_batch(s0, x), y) * (s1 - s0)
            cache.update(noise=noise, y=y, x0=x)
        x = piflow.sample(ema, cache["noise"], cache["y"], args.nfe, args.shift, args.final_step_scale)
        return {"latent_mse_vs_teacher": float((x - cache["x0"]).pow(2).mean())}
    s.evaluate = evaluate
    return s


#################################################################################
#                    Sampling CLI (sample.py --model imagenet)                  #
#################################################################################

def _sample_parser():
    p = argparse.ArgumentParser(description="pi-Flow ImageNet-256 sampling (PNG grid, or ADM-layout npz)")
    p.add_argument("--model", default="imagenet", help="(sample.py dispatch; ignored here)")
    p.add_argument("--ckpt", default="gmrepa_k32_imagenet_piid_1step", help="student: released id "
                   f"({', '.join(k for k in KNOWN if k.startswith('gm'))}), hf://owner/repo/path, or a local file")
    p.add_argument("--nfe", type=int, default=None, help="sampling steps (default: the checkpoint's training NFE, "
                   "else 1); GM students accept any NFE >= 1")
    p.add_argument("--class-labels", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279],
                   help="ImageNet classes for the PNG grid")
    p.add_argument("--num-samples", type=int, default=0, help="with --npz: total samples (class-balanced labels "
                   "i %% 1000), split over torchrun ranks")
    p.add_argument("--npz", default=None, help="write uint8 (N, H, W, 3) arr_0 for the ADM evaluator")
    p.add_argument("--out", default="samples/imagenet_nfe{nfe}.png", help="PNG grid path ({nfe} is filled in)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward")
    p.add_argument("--seed", type=int, default=0, help="noise of sample i is randn from seed + i")
    p.add_argument("--temperature", default=None, help="GM temperature: none, 'auto' or a value > 0")
    p.add_argument("--total-substeps", type=int, default=128, help="policy Euler substeps per unit raw time")
    p.add_argument("--vae", default=VAE_ID, help="SD-VAE: hub id or local folder")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads if not hidden/72")
    p.add_argument("--t-scale", type=float, default=None, help="override network time scale (1 REPA, 1000 FM DiT)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow torch.load(weights_only=False)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def _write_npz_streaming(path, parts, shape):
    """Write arr_0 (uint8, shape) into an .npz from a list of arrays without concatenating them in memory."""
    import zipfile
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for a in parts:
                f.write(np.ascontiguousarray(a).tobytes())
    os.replace(tmp, path)


def sample_cli(argv=None):
    """Few-step sampling with a GM/DX student (piflow.sample) + SD-VAE decode. Under torchrun each rank samples a
    contiguous block of indices; rank 0 writes the npz. Sample i depends only on (seed, i), not on world size."""
    args = _sample_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    T = args.temperature
    if T is not None and T not in ("none", "auto"):
        try:
            T = float(T)
        except ValueError:
            _fail("--temperature", T, "none, auto or a number > 0")
    T = None if T == "none" else T
    if args.npz and args.num_samples < 1:
        _fail("--num-samples", args.num_samples, "an integer >= 1 with --npz")
    if args.nfe is not None and args.nfe < 1:
        _fail("--nfe", args.nfe, "an integer >= 1")
    if not args.npz and any(not 0 <= c < 1000 for c in args.class_labels):
        _fail("--class-labels", args.class_labels, "ImageNet classes in [0, 999]")
    dist = None
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        import torch.distributed as dist
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dist is not None:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    net, info = load_network(args.ckpt, args.num_heads, args.trust_checkpoint)   # clear error before heavy work
    if info["kind"] not in ("gm", "dx"):
        _fail("--ckpt", args.ckpt, "a GM or DX student (this is a teacher checkpoint)")
    if args.t_scale is not None:
        net.t_scale = args.t_scale
    nfe = args.nfe or info.get("nfe") or 1
    vae = load_vae(args.vae, device)
    net = net.to(device).eval()
    if device.type == "cuda":
        net.autocast_dtype = torch.bfloat16
    C, S = net.in_channels, info["input_size"]
    if args.npz:
        idx = np.arange(args.num_samples)
        labels = idx % 1000
        lo, hi = rank * len(idx) // world, (rank + 1) * len(idx) // world
    else:
        idx = np.arange(len(args.class_labels))
        labels, lo, hi = np.array(args.class_labels), 0, len(idx)
    from tqdm import tqdm
    out = []
    for b in tqdm(range(lo, hi, args.batch_size), desc=f"rank {rank} sampling", disable=rank != 0):
        e = min(b + args.batch_size, hi)
        noise = torch.stack([torch.randn(C, S, S, generator=torch.Generator().manual_seed(args.seed + int(i)))
                             for i in idx[b:e]]).to(device)
        y = torch.as_tensor(labels[b:e], device=device)
        z = piflow.sample(net, noise, y, nfe, temperature=T, total_substeps=args.total_substeps)
        out.append(decode(vae, z).numpy())
    imgs = np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
    if args.npz:
        part = f"{args.npz}.part{rank}.npy"
        np.save(part, imgs)
        if dist is not None:
            dist.barrier()
        if rank == 0:
            parts = [np.load(f"{args.npz}.part{r}.npy", mmap_mode="r") for r in range(world)]
            H, W = next(p.shape[1:3] for p in parts if len(p))
            _write_npz_streaming(args.npz, parts, (args.num_samples, H, W, 3))
            for r in range(world):
                os.remove(f"{args.npz}.part{r}.npy")
            print(f"wrote {args.npz}: arr_0 uint8 {(args.num_samples, H, W, 3)}")
        if dist is not None:
            dist.barrier()
    else:
        from PIL import Image
        n = len(imgs)
        cols = min(n, 8)
        rows = -(-n // cols)
        H, W = imgs.shape[1:3]
        grid = np.zeros((rows * H, cols * W, 3), np.uint8)
        for i, im in enumerate(imgs):
            grid[(i // cols) * H:(i // cols + 1) * H, (i % cols) * W:(i % cols + 1) * W] = im
        args.out = args.out.format(nfe=nfe)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp.png"
        Image.fromarray(grid).save(tmp)
        os.replace(tmp, args.out)
        print(f"wrote {args.out} ({rows}x{cols} grid, NFE {nfe})")
    if dist is not None:
        dist.destroy_process_group()
    return args.npz or args.out


def main(argv=None):
    p = argparse.ArgumentParser(description="SiT/REPA utilities for pi-Flow ImageNet")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode", help="image folder -> SD-VAE latent folder (see encode_folder)")
    e.add_argument("--images", required=True, help="ImageFolder root: one sub-folder per class")
    e.add_argument("--out", required=True, help="output latent folder (resumable)")
    e.add_argument("--vae", default=VAE_ID, help="SD-VAE hub id or local folder")
    e.add_argument("--resolution", type=int, default=256, help="center-crop size")
    e.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    e.add_argument("--shard-size", type=int, default=10000, help="images per shard")
    e.add_argument("--seed", type=int, default=0, help="posterior-sample seed")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    c = sub.add_parser("convert", help="SiT/REPA/DiT checkpoint -> DiT-style safetensors (published layout)")
    c.add_argument("src", help="checkpoint (id, hf://..., or local file)")
    c.add_argument("dst", help="output .safetensors")
    c.add_argument("--trust-checkpoint", action="store_true", help="allow torch.load(weights_only=False)")
    a = p.parse_args(argv)
    if a.cmd == "encode":
        encode_folder(a.images, a.out, a.vae, a.resolution, a.batch_size, a.shard_size, a.device, a.seed)
    else:
        if not a.dst.endswith(".safetensors"):
            _fail("dst", a.dst, "a path ending in .safetensors")
        net, info = load_network(a.src, trust=a.trust_checkpoint, name="src")
        from safetensors.torch import save_file
        save_file(student_state_dict(net), a.dst + ".tmp",
                  metadata={"piflow": json.dumps(dict(t_scale=info["t_scale"], convention=info["convention"],
                                                           input_size=info["input_size"]))})
        os.replace(a.dst + ".tmp", a.dst)
        print(f"wrote {a.dst} ({info['convention']} convention; learn-sigma channels dropped)")


if __name__ == "__main__":
    main(sys.argv[1:])
