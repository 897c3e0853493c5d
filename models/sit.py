"""ImageNet-256 attachment: SiT-XL/2 / REPA / FM-DiT teachers, GM and DX students, SD-VAE latents (§5.1).

    DiT, GMDiT, DXDiT       diffusers' DiT with ONE shared time + class embedding (the published DiT-mod / GMDiT-V2
                            layout): teacher -> u; students -> piflow.GMPolicy / DXPolicy (piflow's head helpers)
    load_teacher, load_student, save_student    checkpoints with their config; Options, attach: trainer.py
    add_sample_flags, sample_grid               sample.py --model imagenet (PNG grid, or an ADM npz under torchrun)
    encode_folder, LatentFolder, load_vae       SD-VAE latents:  python -m models.sit encode --images DIR --out latents/

The network time is t_scale * sigma: 1 for REPA and its students, 1000 for GMFlow's FM DiT (num_timesteps of LakonLab configs/piflow_imagenet/*); the original
SiT (learn-sigma) runs backwards, t = 1 - sigma, v = -u. Checkpoints: a known id (KNOWN), `owner/repo:subfolder`,
hf://owner/repo/path, a folder with config.json + safetensors (released students, our exports), a file beside its
config.json, a run's ckpt.pt, or a native SiT/REPA .pt (weights_only=True; others need --trust-checkpoint).
"""
import argparse
import dataclasses
import inspect
import json
import os
import re

import numpy as np
import torch
import torch.nn as nn
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings

import piflow
from models import shortcut
from runtime import common, metrics, trainer

VAE_ID, HUB, WEIGHTS = "stabilityai/sd-vae-ft-ema", "Lakonik/pi-Flow-ImageNet", "diffusion_pytorch_model.safetensors"
# Released ids (hub Lakonik/pi-Flow-ImageNet): hub path and the facts their files do not carry.
KNOWN = {"repa": dict(path="teachers/repa_imagenet.pth", t_scale=1.0, heads=16),         # SiT-XL/2: 16 x 72
         "flowdit": dict(path="teachers/flowdit_imagenet.pth", t_scale=1000.0, heads=16),
         "gmrepa_k32_imagenet_piid_1step": dict(path="gmrepa_k32_imagenet_piid_1step", t_scale=1.0, nfe=1),
         "gmrepa_k32_imagenet_piid_2step": dict(path="gmrepa_k32_imagenet_piid_2step", t_scale=1.0, nfe=2),
         "gmdit_k32_imagenet_piid_1step": dict(path="gmdit_k32_imagenet_piid_1step", t_scale=1000.0, nfe=1)}
DIT_KEYS = set(inspect.signature(DiTTransformer2DModel.__init__).parameters) - {"self"}
GM_KEYS = {"num_gaussians", "logstd_inner_dim", "gm_num_logstd_layers", "constant_logstd"}


#################################################################################
#              The network: diffusers DiT, published DiT-mod layout             #
#################################################################################

class _Given(nn.Module):
    """In place of a block's own time + class embedder: the block receives the shared embedding as `timestep`."""

    def forward(self, emb, class_labels=None, hidden_dtype=None):
        return emb


class DiT(DiTTransformer2DModel):
    """SiT/DiT (Peebles & Xie 2023; Ma et al. 2024) in the published DiT-mod layout (LakonLab lakonlab/models/architecture/diffusers/dit.py): the stock
    diffusers DiT whose blocks all read ONE embedding `emb` = time (sin-cos frequency shift 0 as DiT/SiT) + class
    (row num_classes = null; never dropped: CFG passes it). forward(x, t = t_scale sigma, y) -> (B, out, H, W)."""

    def __init__(self, **config):
        super().__init__(**config)
        self.emb = CombinedTimestepLabelEmbeddings(self.config.num_embeds_ada_norm, self.inner_dim)
        self.emb.time_proj.downscale_freq_shift = 0
        self.emb.class_embedder.dropout_prob = 0.0
        for blk in self.transformer_blocks:
            blk.norm1.emb = _Given()
        self.t_scale = 1.0

    def trunk(self, x, t, y):
        """-> final adaLN-modulated tokens h (B, L, D) and the conditioning embedding c (B, D)."""
        h, c = self.pos_embed(x), self.emb(t, y, hidden_dtype=x.dtype)
        for blk in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                h = self._gradient_checkpointing_func(blk, h, None, None, None, c)
            else:
                h = blk(h, timestep=c)
        shift, scale = self.proj_out_1(nn.functional.silu(c)).chunk(2, dim=1)
        return self.norm_out(h) * (1 + scale[:, None]) + shift[:, None], c

    def unpatchify(self, h, H, W):
        """(B, L, p*p*ch) tokens laid out (p1, p2, ch) as in DiT -> (B, ch, H, W)."""
        p = self.patch_size
        h = h.reshape(h.shape[0], H // p, W // p, p, p, -1)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], -1, H, W)

    def forward(self, x, t, y):
        return self.unpatchify(self.proj_out_2(self.trunk(x, t, y)[0]), *x.shape[2:])


class GMDiT(DiT):
    """GM student (GMDiTTransformer2DModelV2, LakonLab .../gmflow/gmdit_v2.py): per token means (p1, p2, K, C) and logits (p1, p2, K)
    -> (B, K, C, H, W) / (B, K, 1, H, W); log s from the MLP on the detached embedding. forward -> GMPolicy."""

    def __init__(self, num_gaussians=32, logstd_inner_dim=1024, gm_num_logstd_layers=2, constant_logstd=None,
                 **config):
        super().__init__(**config)
        self.register_to_config(num_gaussians=num_gaussians, logstd_inner_dim=logstd_inner_dim,
                                gm_num_logstd_layers=gm_num_logstd_layers, constant_logstd=constant_logstd)
        del self.proj_out_2
        piflow.add_gm_head(self, self.inner_dim, num_gaussians, self.out_channels, S=self.patch_size ** 2,
                           logstd_inner_dim=logstd_inner_dim, logstd_layers=gm_num_logstd_layers,
                           constant_logstd=constant_logstd)

    def forward(self, x_t, sigma, y):
        (B, C, H, W), K = x_t.shape, self.config.num_gaussians
        sigma = piflow.as_batch(sigma, x_t)
        h, c = self.trunk(x_t, sigma * self.t_scale, y)
        means = self.unpatchify(self.proj_out_means(h), H, W).reshape(B, K, C, H, W)
        logits = self.unpatchify(self.proj_out_logweights(h), H, W).reshape(B, K, 1, H, W)
        return piflow.gm_policy(means, logits, piflow.gm_logstds(self, c), x_t, sigma)


class DXDiT(DiT):
    """DX student (§3.1; LakonLab .../dxflow/dxdit.py): the teacher class with out_channels = N C, per token (p1, p2, N, C); grid
    index 0 is the low-noise end. segment_size and shift are the training schedule's (with_schedule)."""

    def forward(self, x_t, sigma, y):
        B, C, H, W = x_t.shape
        sigma = piflow.as_batch(sigma, x_t)
        grid_u = super().forward(x_t, sigma * self.t_scale, y).reshape(B, -1, C, H, W)
        return piflow.DXPolicy(grid_u, x_t, sigma, self.segment_size, self.shift)


class ShortcutDiT(DiT):
    """Fig. 2b's shortcut-predicting baseline: the teacher's own network (initialised from it) whose output u is
    held constant over each step (shortcut.ShortcutPolicy), trained on the teacher ODE's jumps
    (shortcut.shortcut_loss)."""

    def forward(self, x_t, sigma, y):
        sigma = piflow.as_batch(sigma, x_t)
        return shortcut.ShortcutPolicy(super().forward(x_t, sigma * self.t_scale, y), x_t, sigma)


def as_teacher(net, convention="u"):
    """net -> teacher(x_t, sigma, y) = u. 'u' (REPA, FM DiT): u = net(x_t, t_scale sigma, y); 'sit' (original SiT,
    t = 0 is noise, v = x0 - eps): u = -net(x_t, 1 - sigma, y)."""
    def teacher(x_t, sigma, y):
        sigma, x = piflow.as_batch(sigma, x_t), x_t.to(net.proj_out_2.weight.dtype)
        return (-net(x, 1 - sigma, y) if convention == "sit" else net(x, sigma * net.t_scale, y)).float()
    return teacher


@torch.no_grad()
def student_from_teacher(teacher, policy, K, N, cfg, generator=None):
    """The teacher's trunk with its output layer widened into the policy head (§5.1): GM means = the teacher's
    u + bias noise 0.05 (piflow.init_gm_head); DX grid = N copies of the teacher head, no noise; shortcut (the Fig.
    2b baseline): the teacher itself."""
    config, C = {k: v for k, v in teacher.config.items() if k in DIT_KEYS}, teacher.out_channels
    if policy == "shortcut":
        student = ShortcutDiT(**config)
        student.load_state_dict(teacher.state_dict())
        return with_schedule(student, teacher.t_scale, cfg)
    W, b = teacher.proj_out_2.weight.float(), teacher.proj_out_2.bias.float()
    if policy == "gm":
        student = GMDiT(num_gaussians=K, **config)
        piflow.init_gm_head(student, W, b, K, C, channel_last=True, generator=generator)
    else:
        student = DXDiT(**dict(config, out_channels=N * C))
        piflow.init_dx_head(student.proj_out_2, W, b, N, C, channel_last=True)
    student.load_state_dict({k: v for k, v in teacher.state_dict().items() if "proj_out_2" not in k}, strict=False)
    return with_schedule(student, teacher.t_scale, cfg)


def with_schedule(student, t_scale, cfg):
    """Attach the time scale and the training schedule; the DX grid spans one training step, 1 / (NFE - 1 + s)."""
    student.t_scale, student.piid_config = float(t_scale), cfg
    grid = piflow.dx_grid(cfg)
    student.segment_size, student.shift = grid["segment_size"], grid["shift"]
    return student


#################################################################################
#                                   Loading                                     #
#################################################################################

def resolve(spec, what):
    """A checkpoint spec -> a local file or folder (hub folders: config.json + the safetensors, fetched)."""
    if os.path.exists(spec):
        return spec
    m = re.fullmatch(r"(?:hf|huggingface)://([\w.-]+/[\w.-]+)/(.+)", spec) or \
        re.fullmatch(r"([\w.-]+/[\w.-]+)(?::(.+))?", spec)
    if spec in KNOWN:
        repo, path = HUB, KNOWN[spec]["path"]
    elif m and not spec.startswith((".", "/")):
        repo, path = m.group(1), (m.group(2) or "").strip("/")
    else:
        raise common.UserError(f"{what}={spec!r}: no such file or folder; expected a local path, a known id "
                               f"({', '.join(KNOWN)}), owner/repo:subfolder or hf://owner/repo/path")
    if path.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return common.hub_file(repo, path, what, spec)
    prefix = path + "/" if path else ""
    common.hub_file(repo, prefix + WEIGHTS, what, spec)
    return os.path.dirname(common.hub_file(repo, prefix + "config.json", what, spec))


def read_weights(path, what, trust=False):
    """Tensors of a .safetensors file, or a .pt/.pth with weights_only=True (argparse.Namespace allowed: REPA
    stores its args); trust=True (--trust-checkpoint) unpickles fully."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - every failure here is the user's file
            raise common.UserError(f"{what}={path!r} is not a readable safetensors file ({type(e).__name__})") \
                from None
    if trust:
        print(f"{what}: unpickling {path} (trusted: --trust-checkpoint)")
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return common.load_tensors(path, what)
    except common.UserError as e:
        hint = "; pass --trust-checkpoint only if you trust its source" if "unpickling" in str(e) else ""
        raise common.UserError(f"{e}{hint}") from None


# native SiT / REPA module names (REPA's models/sit.py) -> DiT-mod names (diffusers DiT)
_NATIVE = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "emb.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "emb.timestep_embedder.linear_2", "final_layer.linear": "proj_out_2",
           "y_embedder.embedding_table": "emb.class_embedder.embedding_table",
           "final_layer.adaLN_modulation.1": "proj_out_1", "adaLN_modulation.1": "norm1.linear",
           "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}


def to_dit_layout(sd):
    """Native SiT/REPA keys -> DiT-mod keys (DiT-layout keys pass unchanged). The fused qkv splits along dim 0 into
    to_q / to_k / to_v; pos_embed (a fixed sin-cos table) and REPA's projectors go."""
    out = {}
    for k, v in sd.items():
        base, _, wb = k.rpartition(".")
        blk = re.fullmatch(r"blocks\.(\d+)\.(.+)", base)
        if k == "pos_embed" or k.startswith("projectors."):
            continue
        if blk and blk.group(2) == "attn.qkv":
            for name, part in zip("qkv", v.chunk(3)):
                out[f"transformer_blocks.{blk.group(1)}.attn1.to_{name}.{wb}"] = part
        elif blk:
            out[f"transformer_blocks.{blk.group(1)}.{_NATIVE.get(blk.group(2), blk.group(2))}.{wb}"] = v
        else:
            out[f"{_NATIVE.get(base, base)}.{wb}"] = v
    return out


def infer_config(sd, heads, what, **given):
    """DiT config from DiT-layout shapes, for files without config.json. The head count is not in the shapes:
    `heads`, else hidden / 72 (SiT's head dim: a guess, and said so)."""
    D, C, p = sd["pos_embed.proj.weight"].shape[:3]
    if not heads and D % 72 == 0:
        heads = D // 72
        print(f"{what}: no config.json: guessing {heads} attention heads of 72 channels (SiT); --num-heads sets it")
    if not heads or D % heads or sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] != 4 * D:
        raise common.UserError(f"{what}: no config.json, and hidden size {D} with --num-heads={heads} and an MLP "
                               "ratio 4 is not a SiT/DiT; pass --num-heads (a divisor of the hidden size)")
    out = sd["proj_out_2.weight"].shape[0] // p ** 2 if "proj_out_2.weight" in sd else C
    return dict(num_attention_heads=heads, attention_head_dim=D // heads, in_channels=C, out_channels=out,
                num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")),
                patch_size=p, num_embeds_ada_norm=sd["emb.class_embedder.embedding_table.weight"].shape[0] - 1,
                **given)


def read(spec, what, trust=False, heads=0):
    """Any accepted checkpoint -> (config or None, DiT-layout state dict, facts). facts: known (a KNOWN id named by
    the spec or the file / folder), run (a training ckpt.pt's settings), native (SiT keys), pos_embed (native)."""
    path = resolve(spec, what)
    weights, name = os.path.join(path, WEIGHTS) if os.path.isdir(path) else path, os.path.basename(
        os.path.normpath(path))
    known = spec if spec in KNOWN else next((k for k, v in KNOWN.items() if os.path.basename(v["path"]) == name),
                                            None)
    cfg_path, config = os.path.join(os.path.dirname(weights), "config.json"), None
    if not os.path.isfile(weights):
        raise common.UserError(f"{what}={spec!r}: folder without {WEIGHTS}")
    if os.path.isfile(cfg_path):
        config = common.read_json(cfg_path, what)
        if not isinstance(config, dict):
            raise common.UserError(f"{what}: {cfg_path!r} is not a JSON object (a diffusers config)")
    obj, facts = read_weights(weights, what, trust), dict(known=known, run=None)
    if isinstance(obj, dict) and isinstance(obj.get("settings"), dict) and isinstance(obj.get("ema"), dict):
        facts["run"], obj = obj["settings"], obj["ema"]                  # our ckpt.pt: the EMA student
    obj = next((obj[k] for k in ("ema", "model", "state_dict") if isinstance(obj, dict) and  # REPA / SiT train
                isinstance(obj.get(k), dict)), obj)
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise common.UserError(f"{what}={spec!r} holds no state dict of tensors")
    sd = {re.sub(r"^(module\.|_orig_mod\.)", "", k): v for k, v in obj.items()}
    facts.update(native="x_embedder.proj.weight" in sd, pos_embed=sd.get("pos_embed"))
    sd = to_dit_layout(sd)
    if "pos_embed.proj.weight" not in sd:
        raise common.UserError(f"{what}={spec!r} is neither a SiT/REPA nor a DiT-layout checkpoint (first keys: "
                               f"{', '.join(list(sd)[:3])})")
    if config is None and facts["run"] is None:     # a bare file: shapes + known facts; native SiT eps 1e-6
        pe = facts["pos_embed"]                       # else the published DiT-mod's default 1e-5
        size = int(round(pe.shape[1] ** 0.5)) * sd["pos_embed.proj.weight"].shape[2] if pe is not None else 32
        config = infer_config(sd, heads or KNOWN.get(known, {}).get("heads", 0), what, sample_size=size,
                              norm_eps=1e-6 if facts["native"] else 1e-5)
    return config, sd, facts


def build(config, sd, what):
    """The module a config describes (GMDiT with num_gaussians, DXDiT for our DX exports, else DiT), its weights
    loaded strictly (every tensor present, none left over)."""
    policy = config.get("piflow", {}).get("policy")
    cls = GMDiT if "num_gaussians" in config else {"dx": DXDiT, "shortcut": ShortcutDiT}.get(policy, DiT)
    if ignored := sorted(k for k in config if k not in DIT_KEYS | GM_KEYS | {"piflow"} and not k.startswith("_")):
        print(f"{what}: config.json keys not used: {', '.join(ignored)}")
    try:
        net = cls(**{k: v for k, v in config.items() if k in DIT_KEYS | (GM_KEYS if cls is GMDiT else set())})
        net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise common.UserError(f"{what}: the weights do not fit the config: {common.first_line(e, 300)}") from None
    common.check_finite(dict(net.named_parameters()), what)
    return net


def load_teacher(opts, what="--teacher-ckpt"):
    """-> (teacher DiT, convention). Learn-sigma outputs keep their first C channels per sub-position."""
    config, sd, facts = read(opts.teacher_ckpt, what, opts.trust_checkpoint, opts.num_heads)
    C, p2 = config["in_channels"], config["patch_size"] ** 2
    out = sd["proj_out_2.weight"].shape[0] // p2 if "proj_out_2.weight" in sd else 0
    if out == 2 * C:
        sd["proj_out_2.weight"] = sd["proj_out_2.weight"].reshape(p2, 2 * C, -1)[:, :C].reshape(p2 * C, -1)
        sd["proj_out_2.bias"] = sd["proj_out_2.bias"].reshape(p2, 2 * C)[:, :C].reshape(-1)
    elif out != C:
        raise common.UserError(f"{what}={opts.teacher_ckpt!r} is not a teacher (one output layer of {C} or {2 * C} "
                               "channels per sub-position)")
    net = build({k: v for k, v in dict(config, out_channels=C).items() if k not in GM_KEYS}, sd, what)
    if facts["pos_embed"] is not None and (facts["pos_embed"].reshape(net.pos_embed.pos_embed.shape).float()
                                           - net.pos_embed.pos_embed).abs().max() > 1e-4:
        raise common.UserError(f"{what}: its pos_embed is not the fixed 2-D sin-cos table of SiT/DiT")
    net.t_scale = opts.t_scale or config.get("piflow", {}).get("t_scale") or KNOWN.get(facts["known"], {}).get(
        "t_scale", 1.0)
    conv = opts.teacher_convention if opts.teacher_convention != "auto" else \
        "sit" if facts["native"] and out == 2 * C else "u"
    print(f"teacher {opts.teacher_ckpt}: {net.config.num_layers} layers, {net.config.num_attention_heads} heads, "
          f"t = {'1 - sigma (SiT)' if conv == 'sit' else f'{net.t_scale:g} * sigma'}")
    return net.eval().requires_grad_(False), conv


def load_student(spec, what="--ckpt", trust=False, t_scale=0.0):
    """A GM / DX student with its weights, t_scale, training schedule (.piid_config; released students:
    PiIDConfig(nfe=released NFE, shift 1, final step 1)) and .vae, from a released or exported folder or a run's
    ckpt.pt (EMA weights; the architecture from the run's teacher config and head settings)."""
    config, sd, facts = read(spec, what, trust)
    meta, run, known = (config or {}).get("piflow", {}), facts["run"], KNOWN.get(facts["known"], {})
    if run is not None:                                                   # ckpt.pt: rebuild from the run
        opts = common.from_settings(Options, run)
        if opts.teacher_ckpt in KNOWN:                                    # no download: its facts + our shapes
            config = infer_config(sd, opts.num_heads or KNOWN[opts.teacher_ckpt]["heads"], what, sample_size=32,
                                  norm_eps=1e-5)
            ts = KNOWN[opts.teacher_ckpt]["t_scale"]
        else:
            teacher = load_teacher(opts)[0]
            config, ts = dict(teacher.config), teacher.t_scale
        config = {k: v for k, v in config.items() if k in DIT_KEYS}
        config.update(dict(num_gaussians=opts.K) if opts.policy == "gm" else dict(piflow=dict(policy="shortcut"))
                      if opts.policy == "shortcut" else
                      dict(out_channels=opts.N * config["in_channels"], piflow=dict(policy="dx")))
        meta = dict(policy=opts.policy, piid_config=run, vae=opts.vae, t_scale=opts.t_scale or ts)
    if "num_gaussians" not in config and meta.get("policy") not in ("dx", "shortcut"):
        raise common.UserError(f"{what}={spec!r} is not a pi-Flow student (no GM heads, not a DX export)")
    net = build(config, sd, what)
    if meta.get("piid_config"):
        cfg = common.from_settings(piflow.PiIDConfig, meta["piid_config"])
    else:
        if "nfe" not in known:
            print(f"{what}: no training schedule stored; assuming 1 NFE, shift 1, final step 1")
        cfg = piflow.PiIDConfig(nfe=known.get("nfe", 1), shift=1.0, final_step_scale=1.0)
    ts = t_scale or meta.get("t_scale") or known.get("t_scale")
    if not ts:
        print(f"{what}: no time scale stored; assuming t = sigma (REPA); --t-scale 1000 for FM-DiT students")
    net.vae = meta.get("vae")
    return with_schedule(net, ts or 1.0, cfg).eval()


def save_student(path, student, state=None, **meta):
    """Export in the released format (common.publish_dir): config.json (the diffusers config, the published class
    name, our 'piflow' facts: policy, t_scale, PiIDConfig, ...) + float32 safetensors (metadata policy_config)."""
    from safetensors.torch import save_file
    state = {k: v.detach().float().cpu().contiguous() for k, v in (state or student.state_dict()).items()}
    common.check_finite(state, f"export {path}")
    cfg = student.piid_config
    kind = "gm" if isinstance(student, GMDiT) else "shortcut" if isinstance(student, ShortcutDiT) else "dx"
    config = {k: v for k, v in student.config.items() if not k.startswith("_")}
    config.update(_class_name=dict(gm="GMDiTTransformer2DModelV2", dx="DXDiTTransformer2DModel",
                                   shortcut="DiTTransformer2DModel")[kind], piflow=dict(
        policy=kind, t_scale=student.t_scale, piid_config=dataclasses.asdict(cfg), **meta))
    policy = dict(gm={"type": "GMFlow"}, shortcut={"type": "Shortcut"},
                  dx={"type": "DX", "segment_size": student.segment_size, "shift": cfg.shift})[kind]

    def write(folder):
        save_file(state, os.path.join(folder, WEIGHTS), metadata={"policy_config": json.dumps(policy)})
        common.save_text(os.path.join(folder, "config.json"), json.dumps(config, indent=1))
    common.publish_dir(path, write)


#################################################################################
#                  SD-VAE latents (as the official latent cache)                #
#################################################################################

def load_vae(spec=VAE_ID, device="cpu"):
    """diffusers AutoencoderKL from a folder or the hub (`owner/repo[:subfolder]`, one-line errors); 'none': no
    VAE, the model works on pixels in [-1, 1] (the digits, models/digits.py)."""
    if spec == "none":
        return None
    from diffusers import AutoencoderKL
    try:
        return AutoencoderKL.from_pretrained(resolve(spec, "--vae")).to(device).eval().requires_grad_(False)
    except (OSError, ValueError) as e:
        raise common.UserError(f"--vae={spec!r} is not an AutoencoderKL folder ({common.first_line(e)})") from None


def decode(vae, z):
    """Model space -> images in [-1, 1] (B, 3, H, W): the SD-VAE decoder, or (vae None) the pixels themselves,
    grey (one channel) replicated to RGB."""
    if vae is None:
        x = z.float()
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.float()


def center_crop(img, res):
    """ADM center crop: halve with BOX while the short side >= 2 res, BICUBIC to short side res, crop."""
    from PIL import Image
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    s = res / min(img.size)
    arr = np.asarray(img.resize(tuple(round(x * s) for x in img.size), resample=Image.BICUBIC).convert("RGB"))
    y, x = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
    return arr[y:y + res, x:x + res]


def save_npy(path, arr):
    with open(path, "wb") as f:                                           # (np.save(name) appends .npy)
        np.save(f, arr)


@torch.no_grad()
def encode_folder(images, out, vae=VAE_ID, resolution=256, batch_size=32, shard_size=10000, device="cpu", seed=0,
                  sample=True, progress=True):
    """ImageFolder (one sub-folder per class, sorted names -> labels 0..) -> latent folder: latents_00000.npy float16
    (n, 4, res/8, res/8) = one posterior sample x scaling_factor (as the official cache), labels_00000.npy int64,
    meta.json. Shards are written atomically and skipped when present (resume); sample=False: posterior mean."""
    from PIL import Image
    from tqdm import tqdm
    classes = sorted(d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d))) \
        if os.path.isdir(images) else []
    files = [(os.path.join(images, c, f), i) for i, c in enumerate(classes) for f in
             sorted(os.listdir(os.path.join(images, c))) if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))]
    if not files:
        raise common.UserError(f"--images={images!r} is not a folder of class sub-folders with images")
    vae = load_vae(vae, device) if isinstance(vae, str) else vae
    shards, shape = list(range(0, len(files), shard_size)), None
    for s, start in enumerate(tqdm(shards, desc="encode shards", disable=not progress)):
        lat_path, lab_path = (os.path.join(out, f"{n}_{s:05d}.npy") for n in ("latents", "labels"))
        chunk = files[start:start + shard_size]
        if not (os.path.exists(lat_path) and os.path.exists(lab_path)):
            g, lats = torch.Generator(device).manual_seed(seed * 100003 + s), []
            for b in range(0, len(chunk), batch_size):
                x = np.stack([center_crop(Image.open(f), resolution) for f, _ in chunk[b:b + batch_size]])
                d = vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2).to(device, vae.dtype) / 127.5 - 1).latent_dist
                lats.append(((d.sample(generator=g) if sample else d.mean).float() * vae.config.scaling_factor)
                            .cpu().half().numpy())
            common.check_finite_output(np.concatenate(lats), f"latents of shard {s}", "--vae")
            for path, arr in ((lat_path, np.concatenate(lats)), (lab_path, np.array([c for _, c in chunk]))):
                common.save_atomic(path, lambda tmp, arr=arr: save_npy(tmp, arr))
        shape = list(np.load(lat_path, mmap_mode="r").shape[1:])
    meta = dict(num_images=len(files), classes=classes, shards=len(shards), shard_size=shard_size,
                resolution=resolution, scaling_factor=float(vae.config.scaling_factor), latent_shape=shape)
    common.save_text(os.path.join(out, "meta.json"), json.dumps(meta, indent=1))
    return meta


class LatentFolder:
    """Random access to an encode_folder output (memory-mapped). sample(B, generator) -> (x0 (B, C, h, w), y (B,))."""

    def __init__(self, folder):
        if not os.path.isfile(os.path.join(folder, "meta.json")):
            raise common.UserError(f"--latents={folder!r} is not a latent folder (no meta.json); write one with "
                                   "`python -m models.sit encode`")
        path = os.path.join(folder, "meta.json")
        self.meta = common.read_json(path, "--latents")
        try:
            n = int(self.meta["shards"])
            self.shape = tuple(int(v) for v in self.meta["latent_shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise common.UserError(f"--latents: {path!r} lacks a valid {common.first_line(e)} entry; rewrite it with "
                                   "`python -m models.sit encode`") from None
        try:
            self.latents = [np.load(os.path.join(folder, f"latents_{s:05d}.npy"), mmap_mode="r") for s in range(n)]
            self.labels = np.concatenate([np.load(os.path.join(folder, f"labels_{s:05d}.npy")) for s in range(n)])
        except (OSError, ValueError) as e:
            raise common.UserError(f"--latents={folder!r}: a shard named in meta.json cannot be read "
                                   f"({type(e).__name__}: {common.first_line(e, 120)})") from None
        self.offsets = np.cumsum([0] + [len(a) for a in self.latents])

    def sample(self, batch, generator=None):
        idx = torch.randint(int(self.offsets[-1]), (batch,), generator=generator).numpy()
        s = np.searchsorted(self.offsets, idx, side="right") - 1
        x0 = np.stack([self.latents[a][i - self.offsets[a]] for a, i in zip(s, idx)]).astype(np.float32)
        return torch.from_numpy(x0), torch.from_numpy(self.labels[idx])


#################################################################################
#                 The trainer.py attachment (train_imagenet.py)                 #
#################################################################################

@dataclasses.dataclass(frozen=True)
class Options:
    teacher_ckpt: str = "repa"          # teacher: repa, flowdit, owner/repo:sub, hf://..., a folder or SiT/DiT file
    policy: str = "gm"                  # gm (K Gaussians per pixel), dx (N-point x0 grid), shortcut (Fig. 2b baseline)
    K: int = 32                         # Gaussians of the GM policy
    N: int = 10                         # grid points of the DX policy
    latents: str = ""                   # latent folder from `python -m models.sit encode` (data-dependent training needs it)
    student_init: str = ""              # start from this student (id, folder, ckpt.pt), not the teacher's heads
    num_heads: int = 0                  # heads of a teacher file without config.json; 0 = hidden size / 72 (SiT)
    t_scale: float = 0.0                # network time = t_scale * sigma; 0 = the checkpoint's (1 REPA, 1000 FM DiT)
    teacher_convention: str = "auto"    # auto | u (REPA, FM DiT: v = u) | sit (original SiT: t = 1 - sigma, v = -u)
    grad_checkpointing: bool = False    # recompute the student's blocks in the backward pass (less memory)
    vae: str = VAE_ID                   # SD-VAE of the latents, recorded in the export (none: the model works on pixels)
    trust_checkpoint: bool = False      # unpickle .pt files fully (only files you trust; default: weights only)
    eval_ref: str = ""                  # reference .npz (ADM: arr_0 images / mu, sigma): FID + IS at --eval-every
    eval_samples: int = 1000            # samples of that FID (a proxy at this n, not FID-50k)

    def __post_init__(self):
        piflow.check_fields(self, [("policy", self.policy in ("gm", "dx", "shortcut"), "gm, dx or shortcut"), ("K", self.K >= 1, ">= 1"),
                                   ("N", self.N >= 1, ">= 1"), ("num_heads", self.num_heads >= 0, ">= 0"),
                                   ("t_scale", self.t_scale >= 0, ">= 0"), ("teacher_convention",
                                   self.teacher_convention in ("auto", "u", "sit"), "auto, u or sit")])


FLAG_ALIASES = {"K": ["--num-gaussians"], "N": ["--dx-grid"]}
SHORTCUT_RK4_STEPS = 2          # the shortcut baseline's teacher jumps: RK4 steps per NFE step (8 teacher calls)


class SiTAttachment(trainer.Attachment):
    """The trainer attachment: the frozen SiT/DiT teacher with interval CFG (null class = num_classes) and a GM or
    DX student initialised from it; data from a latent folder (Alg. 2) or labels alone (Alg. 3)."""

    def __init__(self, opts, cfg, tc, settings, device, dtype):
        if tc.data_dependent and not opts.latents:
            raise common.UserError("--data-dependent needs --latents: a folder written by `python -m models.sit encode`")
        self.data = LatentFolder(opts.latents) if opts.latents else None  # fail fast, before any model
        self.opts, self.settings, self.device, self.dtype = opts, settings, device, dtype
        net, conv = load_teacher(opts)
        C, S = net.config.in_channels, net.config.sample_size
        self.noise_shape, self.num_classes = (C, S, S), net.config.num_embeds_ada_norm
        if self.data is not None and self.data.shape != self.noise_shape:
            raise common.UserError(f"--latents={opts.latents!r} holds latents of shape {self.data.shape}; the "
                                   f"teacher takes {self.noise_shape}")
        student = student_from_teacher(net, opts.policy, opts.K, opts.N, cfg, torch.Generator().manual_seed(tc.seed))
        if opts.student_init:
            init = load_student(opts.student_init, "--student-init", opts.trust_checkpoint).state_dict()
            if {k: v.shape for k, v in init.items()} != {k: v.shape for k, v in student.state_dict().items()}:
                raise common.UserError(f"--student-init={opts.student_init!r}: another architecture than the student "
                                       f"of --teacher-ckpt={opts.teacher_ckpt!r} with these head settings")
            student.load_state_dict(init)
        if opts.grad_checkpointing:
            student.enable_gradient_checkpointing()
        self.student = student.to(device).train()
        self.net = nn.Module.to(net, device, dtype)                       # (ModelMixin.to warns on any dtype)
        null = torch.tensor([self.num_classes], device=device)
        self.teacher = piflow.guided_teacher(as_teacher(self.net, conv), tc.guidance, null, tuple(tc.guidance_interval))
        self._ref, self.fid, self.cfg = None, None, cfg
        if opts.policy == "shortcut":
            self.loss = self.shortcut_loss
        if opts.eval_ref:                                                 # rank 0 evaluates: no collective
            self.fid = metrics.ImageMetrics(opts.eval_ref, "--eval-ref", device, sync=False), load_vae(opts.vae,
                                                                                                      device)

    def shortcut_loss(self, step, g, n, backward):
        """Fig. 2b's baseline, data-free: regress each NFE step's jump of the guided teacher's ODE (RK4,
        SHORTCUT_RK4_STEPS per NFE step) along the teacher's own trajectory from noise (shortcut.shortcut_loss)."""
        cfg, y = self.cfg, self.sample_cond(n, g)
        sigmas = piflow.nfe_schedule(cfg.nfe, cfg.shift, cfg.final_step_scale)[1]
        jump = lambda x, i: piflow.teacher_rk4(self.teacher, x, y, SHORTCUT_RK4_STEPS, float(sigmas[i]),
                                               float(sigmas[i + 1]))
        noise = torch.randn((n,) + self.noise_shape, generator=g, device=g.device)
        return shortcut.shortcut_loss(self.student, noise, y, cfg, jump, backward)

    def sample_data(self, n, g):
        cpu = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=g, device=g.device)))
        x0, y = self.data.sample(n, cpu)
        return x0.to(self.device), y.to(self.device)

    @torch.no_grad()
    def evaluate(self, student, n=8, teacher_steps=32):
        """Teacher alignment: latent MSE between the student's samples and the guided teacher's 32-step Euler ODE
        from the same noise (n fixed samples and labels; the teacher's endpoints are computed once)."""
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            if self._ref is None:
                noise = torch.randn((n,) + self.noise_shape, generator=torch.Generator().manual_seed(1234))
                y = torch.arange(n, device=self.device) * (self.num_classes // n)
                noise = noise.to(self.device)
                sigmas = piflow.nfe_schedule(teacher_steps)[1]
                self._ref = noise, y, piflow.teacher_euler(self.teacher, noise, y, sigmas)
            noise, y, x_teacher = self._ref
            x = piflow.sample(student, noise, y)
        out = {"align": float((x.float() - x_teacher.float()).pow(2).mean())}
        if self.fid:                        # + FID / IS of --eval-samples images (labels i mod classes), seed 0
            (m, vae), n = self.fid, self.opts.eval_samples
            m.reset()
            m.update(generate(student, vae, np.arange(n), np.arange(n) % self.num_classes, argparse.Namespace(
                batch_size=32, seed=0, temperature=None, total_substeps=None, h=0.0), None, self.device))
            out.update(m.compute())
        return out

    def export(self, path, ema):
        """The released student format: a folder with config.json + diffusion_pytorch_model.safetensors."""
        save_student(path, self.student, ema, vae=self.opts.vae, teacher=self.opts.teacher_ckpt,
                     guidance=self.settings.get("guidance"), guidance_interval=self.settings.get("guidance_interval"))


def attach(opts, cfg, tc, settings, device, dtype=torch.float32):
    """train_imagenet.py --teacher sit."""
    return SiTAttachment(opts, cfg, tc, settings, device, dtype)


#################################################################################
#                   Sampling (sample.py --model imagenet)                       #
#################################################################################

def add_sample_flags(p, model="imagenet"):
    for flag, kw, text in [
            ("--ckpt", dict(default="gmrepa_k32_imagenet_piid_1step"), "student: released id, owner/repo:subfolder, "
             "hf://..., exported folder, a file beside its config.json, or a run's ckpt.pt"),
            ("--class-labels", dict(type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279]),
             "grid rows: ImageNet class ids"),
            ("--per-class", dict(type=int, default=4), "grid columns: samples per class"),
            ("--npz", dict(default=None), "instead of a grid: --num-samples images (labels i mod 1000) as an ADM npz, "
             "uint8 arr_0 (N, H, W, 3); under torchrun each rank samples a block"),
            ("--num-samples", dict(type=int, default=50000), "images in the --npz"),
            ("--eval", dict(default=None), "reference .npz (ADM: arr_0 images / mu, sigma): FID + IS of the "
             "--num-samples images (metrics.py), in-process; under torchrun every rank measures its block"),
            ("--batch-size", dict(type=int, default=32), "samples per student call"),
            ("--total-substeps", dict(type=int, default=None), "rollout substeps per unit time; None = the student's"),
            ("--vae", dict(default=None), f"SD-VAE, hub id or folder, or 'none' (pixel models); None = the student's, else {VAE_ID}"),
            ("--t-scale", dict(type=float, default=0.0), "network time = t_scale * sigma; 0 = the student's, else 1"),
            ("--device", dict(default=None), "torch device; None = cuda if available (torchrun: cuda:LOCAL_RANK)"),
            ("--trust-checkpoint", dict(action="store_true"), "unpickle a .pt student fully (trusted files only)")]:
        p.add_argument(flag, **kw, help=text + ("" if flag == "--trust-checkpoint" else " (default: %(default)s)"))


@torch.no_grad()
def generate(student, vae, indices, labels, args, nfe, device):
    """uint8 images (n, H, W, 3) of samples `indices` (n,) with `labels` (n,): piflow.sample, SD-VAE decode.
    Sample i's noise (and its --h re-noising) is randn from the generator seeded seed * 2^32 + i: it depends only
    on (seed, i)."""
    from tqdm import tqdm
    c, out = student.config, []
    for b in tqdm(range(0, len(indices), args.batch_size), desc="batches", delay=common.PROGRESS_DELAY,
                  disable=int(os.environ.get("RANK", 0)) != 0):
        gens = [torch.Generator().manual_seed(args.seed * 2 ** 32 + int(i)) for i in indices[b:b + args.batch_size]]
        noise = torch.stack([torch.randn(c.in_channels, c.sample_size, c.sample_size, generator=g) for g in gens])
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            z = piflow.sample(student, noise.to(device), torch.as_tensor(labels[b:b + args.batch_size], device=device),
                              nfe, temperature=args.temperature, total_substeps=args.total_substeps, h=args.h,
                              generator=gens)
        x = decode(vae, z)                                                           # (B, 3, H, W) in [-1, 1]
        common.check_finite_output(x, "the decoded samples", f"--ckpt, --temperature={args.temperature}")
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def write_npz(path, parts, n):
    """ADM evaluator layout: arr_0 uint8 (n, H, W, 3), streamed from the parts into the .npz (atomically)."""
    import zipfile
    H, W = next(p.shape[1:3] for p in parts if len(p))

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf, zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, H, W, 3)})
            for a in parts:
                f.write(np.ascontiguousarray(a).tobytes())
    common.save_atomic(path, write)


def sample_grid(args):
    """sample.py --model imagenet: one grid row per --class-labels entry, or the --npz and / or --eval FID (labels
    i mod num_classes; under torchrun rank r samples the r-th contiguous block, rank 0 writes the file). Any batch or
    world size gives the same images (see generate)."""
    common.check(args, [("per_class", args.per_class >= 1, ">= 1"), ("num_samples", args.num_samples >= 1, ">= 1"),
                        ("batch_size", args.batch_size >= 1, ">= 1"), ("total_substeps",
                        (args.total_substeps or 1) >= 1, ">= 1"), ("t_scale", args.t_scale >= 0, ">= 0"),
                        ("npz", (args.npz or ".npz").endswith(".npz"), "a path ending in .npz")])
    if args.npz:
        common.check_writable(args.npz, "--npz")
    world, rank, dist = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    try:
        metric = metrics.ImageMetrics(args.eval, "--eval", device) if args.eval else None
        student = load_student(args.ckpt, "--ckpt", args.trust_checkpoint, args.t_scale).to(device)
        ncls, nfe = student.config.num_embeds_ada_norm, piflow.schedule_settings(student, nfe=args.nfe)["nfe"]
        if not (args.npz or args.eval) and not all(0 <= c < ncls for c in args.class_labels):
            raise common.UserError(f"--class-labels={args.class_labels} is not accepted; expected ids in [0, {ncls})")
        vae = load_vae(args.vae or student.vae or VAE_ID, device)
        if not (args.npz or args.eval):                                   # the grid: rank 0 alone
            labels, k = np.repeat(args.class_labels, args.per_class), args.per_class
            imgs = generate(student, vae, np.arange(len(labels) if rank == 0 else 0), labels, args, nfe, device)
            rows = [list(imgs[i * k:(i + 1) * k]) for i in range(len(args.class_labels))] if rank == 0 else None
            return dict(rows=rows, row_labels=[f"class {c}" for c in args.class_labels], images=imgs, nfe=nfe,
                        title=f"{args.ckpt}: NFE {nfe}, seed {args.seed}")
        n, parts = args.num_samples, [f"{args.npz}.part{r}.npy" for r in range(world)]
        idx = np.arange(rank * n // world, (rank + 1) * n // world)
        images = generate(student, vae, idx, idx % ncls, args, nfe, device)
        result = dict(nfe=nfe)
        if metric:
            metric.update(images)
            result.update(metric.compute())                               # states summed over the ranks
        if metric and rank == 0:
            print(f"{args.ckpt}: NFE {nfe}, {n} samples: FID {result['fid']:.3f}, IS {result['is']:.2f} (--eval)")
        if args.npz:
            save_npy(parts[rank], images)
        if dist:
            dist.barrier()
        if rank == 0 and args.npz:
            write_npz(args.npz, [np.load(f, mmap_mode="r") for f in parts], n)
            for f in parts:
                os.remove(f)
            print(f"wrote {args.npz}: {n} samples, NFE {nfe}")
        return result
    finally:
        if dist:
            dist.barrier()
            dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description="ImageNet latents for pi-Flow: `encode` an ImageFolder with the SD-VAE")
    e = p.add_subparsers(dest="cmd", required=True).add_parser("encode", help="image folder -> SD-VAE latent folder")
    e.add_argument("--images", required=True, help="ImageFolder root: one sub-folder per class")
    e.add_argument("--out", required=True, help="output latent folder (resumable: finished shards are kept)")
    e.add_argument("--vae", default=VAE_ID, help="SD-VAE: hub id or folder (default: %(default)s)")
    e.add_argument("--resolution", type=int, default=256, help="center-crop size (default: %(default)s)")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    a = p.parse_args(argv)
    with common.user_errors("sit.py"):
        common.check_writable(a.out, "--out", is_dir=True)
        encode_folder(a.images, a.out, a.vae, a.resolution, device=a.device)


if __name__ == "__main__":
    main()
