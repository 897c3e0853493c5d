"""Tests for sit.py (CPU; tiny random-weight models built here; nothing downloaded).

Ground truth comes from outside sit.py: a native SiT written here after REPA's models/sit.py (timm attention, fused
qkv), the stock diffusers DiTTransformer2DModel, piflow.sample + the VAE decode recomputed here, and the released
key list in testdata/ (derived from the published class structure). Every network has >= 2 attention heads and
random non-zero weights everywhere (adaLN, output and logstd layers too)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import common
import piflow
import sample
from models import sit
import train_imagenet
from roundoff import assert_quantised, grey

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)                                         # the repository: scripts run from it
C, S, NCLS = 4, 8, 10
# published-layout test config: NON-default values (3 heads of 8, 2 layers, latent 8, 10 classes, norm_eps 1e-5)
CONFIG = dict(num_attention_heads=3, attention_head_dim=8, in_channels=C, out_channels=C, num_layers=2,
              sample_size=S, patch_size=2, num_embeds_ada_norm=NCLS, norm_eps=1e-5)


def randomize(module, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, S, S, generator=g), torch.rand(B, generator=g) * 0.9 + 0.05,
            torch.randint(NCLS, (B,), generator=g))


def maxdiff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# Independent implementations: a native SiT (REPA's module structure and key names) and the stock diffusers DiT
# ----------------------------------------------------------------------------------------------------------

def mae_pos_embed(D, g):
    """MAE's numpy 2-D sin-cos table (1, g*g, D), as SiT/REPA checkpoints store it: first half columns, then rows."""
    gw, gh = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))

    def one(d, pos):
        out = np.einsum("m,d->md", pos.reshape(-1), 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0)))
        return np.concatenate([np.sin(out), np.cos(out)], 1)
    return torch.from_numpy(np.concatenate([one(D // 2, gw), one(D // 2, gh)], 1)).float()[None]


class RefBlock(nn.Module):
    def __init__(self, D, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = (nn.LayerNorm(D, elementwise_affine=False, eps=1e-6) for _ in range(2))
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):
        s1, g1, a1, s2, g2, a2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=2)
        B, L, D = x.shape
        h = self.norm1(x) * (1 + g1) + s1
        q, k, v = self.attn.qkv(h).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # timm
        w = (q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)).softmax(-1)
        x = x + a1 * self.attn.proj((w @ v).transpose(1, 2).reshape(B, L, D))
        h = self.norm2(x) * (1 + g2) + s2
        return x + a2 * self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate="tanh"))


class RefSiT(nn.Module):
    """SiT after REPA's models/sit.py: native names, fused qkv, fixed pos_embed, t fed as given (t = sigma)."""

    def __init__(self, D, heads, depth=2, out=C, p=2, size=S, ncls=NCLS):
        super().__init__()
        self.p, self.out = p, out
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C, D, p, stride=p)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(ncls + 1, D)
        self.blocks = nn.ModuleList(RefBlock(D, heads) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(D, p * p * out)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.register_buffer("pos_embed", mae_pos_embed(D, size // p))

    def forward(self, x, t, y):
        B, _, H, W = x.shape
        freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
        c = self.t_embedder.mlp(torch.cat([(t[:, None] * freqs).cos(), (t[:, None] * freqs).sin()], 1))
        c = c + self.y_embedder.embedding_table(y)
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.final_layer.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=2)
        h = self.final_layer.linear(self.final_layer.norm_final(h) * (1 + scale) + shift)
        h = h.reshape(B, H // self.p, W // self.p, self.p, self.p, self.out)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(B, self.out, H, W)


def stock_dit(config, dit_sd):
    """Stock diffusers DiTTransformer2DModel holding DiT-mod weights: the shared emb copied into every block, each
    block's time projection at frequency shift 0 (DiT/SiT)."""
    from diffusers import DiTTransformer2DModel
    m = DiTTransformer2DModel(**config).eval()
    sd = {k: v for k, v in dit_sd.items() if not k.startswith("emb.")}
    for i, blk in enumerate(m.transformer_blocks):
        sd.update({f"transformer_blocks.{i}.norm1.{k}": v for k, v in dit_sd.items() if k.startswith("emb.")})
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
    m.load_state_dict(sd, strict=True)
    return m


def dit_mod_weights(config, seed, K=None, inner=16):
    """Random weights in the published DiT-mod layout, made from a stock diffusers DiT: block 0's embedding becomes
    the shared emb.*, the other copies go; with K, proj_out_2 gives way to the GMDiT-V2 heads (gmdit_v2.py)."""
    from diffusers import DiTTransformer2DModel
    m = randomize(DiTTransformer2DModel(**config), seed)
    sd = {("emb." + k.split(".norm1.emb.")[1] if ".norm1.emb." in k else k): v.clone()
          for k, v in m.state_dict().items() if ".norm1.emb." not in k or k.startswith("transformer_blocks.0.")}
    if K:
        D, p2, g = m.inner_dim, config["patch_size"] ** 2, torch.Generator().manual_seed(seed + 1)
        del sd["proj_out_2.weight"], sd["proj_out_2.bias"]
        for name, shape in (("proj_out_means", (p2 * K * C, D)), ("proj_out_logweights", (p2 * K, D)),
                            ("proj_out_logstds.1", (inner, D)), ("proj_out_logstds.3", (1, inner))):
            sd[name + ".weight"] = torch.randn(shape, generator=g) * 0.2
            sd[name + ".bias"] = torch.randn(shape[0], generator=g) * 0.2
    return sd


def stock_gm(config, sd, x, t, y):
    """The GM heads computed outside sit.py: stock DiTs whose proj_out_2 is the means head (K C channels per
    sub-position) or the logweights head (K), the logstd MLP (published names) on block 0's embedding."""
    B, _, H, W = x.shape
    K = sd["proj_out_logweights.weight"].shape[0] // config["patch_size"] ** 2
    inner = sd["proj_out_logstds.3.weight"].shape[1]
    trunk = {k: v for k, v in sd.items() if not k.startswith(("proj_out_means", "proj_out_log"))}
    outs = []
    for head, ch in (("proj_out_means", K * C), ("proj_out_logweights", K)):
        m = stock_dit(dict(config, out_channels=ch), dict(trunk, **{"proj_out_2.weight": sd[head + ".weight"],
                                                                   "proj_out_2.bias": sd[head + ".bias"]}))
        with torch.no_grad():
            outs.append(m(x, timestep=t, class_labels=y).sample)
    D = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = nn.Sequential(nn.SiLU(), nn.Linear(D, inner), nn.SiLU(), nn.Linear(inner, 1))
    mlp.load_state_dict({k[len("proj_out_logstds."):]: v for k, v in sd.items() if k.startswith("proj_out_logstds.")})
    with torch.no_grad():
        logstds = mlp(m.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=torch.float32))
    return outs[0].reshape(B, K, C, H, W), outs[1].reshape(B, K, 1, H, W), logstds.reshape(B)


def released_config(config, **gm):
    """config.json as the published exporter writes it: the full diffusers DiT config, _class_name overridden."""
    from diffusers import DiTTransformer2DModel
    with torch.device("meta"):
        full = {k: v for k, v in DiTTransformer2DModel(**config).config.items() if not k.startswith("_")}
    return dict({"_class_name": "GMDiTTransformer2DModelV2", "_diffusers_version": "0.32.2"}, **full, **gm)


def write_folder(folder, config, sd):
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, sit.WEIGHTS))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def released_student(folder, K=3, inner=16, seed=0):
    """A released-style GMDiT-V2 folder with non-default config values; -> (folder, config, weights)."""
    sd = dit_mod_weights(CONFIG, seed, K=K, inner=inner)
    cfg = released_config(CONFIG, num_gaussians=K, logstd_inner_dim=inner, gm_num_logstd_layers=2,
                          constant_logstd=None)
    return write_folder(folder, cfg, sd), cfg, sd


def teacher_folder(tmp_path, seed=0):
    """A DiT-mod teacher folder (config.json + safetensors), 3 heads of 8."""
    path = str(tmp_path / "teacher")
    if not os.path.isdir(path):
        write_folder(path, released_config(CONFIG), dit_mod_weights(CONFIG, seed))
    return path


def run_cli(main, argv, capsys):
    """-> (exit code, stderr) of a main() that may exit."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# 1. The network against independent implementations
# ----------------------------------------------------------------------------------------------------------

def test_native_sit_checkpoints_match_reference_sit(tmp_path, capsys):
    """REPA train checkpoint (args = argparse.Namespace, projectors, pos_embed; 2 heads of 72 guessed from the
    hidden size) and an original learn-sigma SiT (reversed time, 3 heads of 16 given by --num-heads)."""
    import argparse
    x, sigma, y = inputs()
    repa = randomize(RefSiT(144, 2), 0)
    with torch.no_grad():
        u_ref = repa(x, sigma, y)
    sd = dict(repa.state_dict(), **{f"projectors.0.{i}.weight": torch.randn(5, 5) for i in (0, 2, 4)})
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(model="SiT-XL/2"), "steps": 7},
               tmp_path / "repa.pt")
    net, conv = sit.load_teacher(sit.Options(teacher_ckpt=str(tmp_path / "repa.pt")))
    assert conv == "u" and net.config.num_attention_heads == 2 and net.config.norm_eps == 1e-6
    assert "guessing 2 attention heads" in capsys.readouterr().out          # the hidden / 72 guess is said
    u = sit.as_teacher(net, conv)(x, sigma, y)
    d_repa = maxdiff(u, u_ref)
    orig = randomize(RefSiT(48, 3, out=2 * C), 1)                        # learn-sigma: 2C outputs, t = 0 is noise
    with torch.no_grad():
        u_sit = -orig(x, 1 - sigma, y)[:, :C]
    torch.save(orig.state_dict(), tmp_path / "SiT-XL-2-256x256.pt")
    net, conv = sit.load_teacher(sit.Options(teacher_ckpt=str(tmp_path / "SiT-XL-2-256x256.pt"), num_heads=3))
    assert conv == "sit" and net.out_channels == C
    d_sit = maxdiff(sit.as_teacher(net, conv)(x, sigma, y), u_sit)
    with capsys.disabled():
        print(f"native REPA .pt vs reference SiT: max |diff| {d_repa:.2e}; learn-sigma SiT: {d_sit:.2e}")
    assert d_repa < 1e-5 * u_ref.abs().max() and d_sit < 1e-5 * u_sit.abs().max()
    torch.save(dict(repa.state_dict(), pos_embed=repa.pos_embed.flip(1)), tmp_path / "bad.pt")
    with pytest.raises(common.UserError, match="pos_embed"):
        sit.load_teacher(sit.Options(teacher_ckpt=str(tmp_path / "bad.pt")))


def test_native_sit_teacher_in_the_training_attachment_bf16(tmp_path):
    """train_imagenet.py --teacher-ckpt an original learn-sigma SiT .pt at --dtype bf16: the attachment holds the
    frozen teacher in bf16 and the K = 4 GM student in float32; under autocast (as the trainer calls it) its teacher
    is the reference SiT's -v(x, 1 - sigma) to bf16 precision; the student's GM bias noise depends on --seed alone,
    not on the global RNG state (the trainer seeds that too, for the logstd MLP's random hidden layer)."""
    from runtime import trainer
    orig = randomize(RefSiT(48, 3, out=2 * C), 1)                        # learn-sigma: 2C outputs, t = 0 is noise
    torch.save(orig.state_dict(), tmp_path / "SiT-XL-2-256x256.pt")
    opts = sit.Options(teacher_ckpt=str(tmp_path / "SiT-XL-2-256x256.pt"), num_heads=3, K=4)
    atts = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        atts.append(sit.attach(opts, piflow.PiIDConfig(), trainer.TrainConfig(seed=7), {}, torch.device("cpu"),
                               torch.bfloat16))
    att = atts[0]
    assert {p.dtype for p in att.net.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in att.student.parameters()} == {torch.float32}
    assert isinstance(att.student, sit.GMDiT) and att.student.config.num_gaussians == 4
    assert torch.equal(att.student.proj_out_means.bias, atts[1].student.proj_out_means.bias)
    x, sigma, y = inputs()
    with torch.no_grad():
        u_ref = -orig(x, 1 - sigma, y)[:, :C]
        with torch.autocast("cpu", torch.bfloat16):
            u = att.teacher(x, sigma, y)
    print(f"bf16 SiT teacher vs float32 reference: max |diff| {maxdiff(u, u_ref):.2e} of max |u| "
          f"{u_ref.abs().max():.2f}")
    # bf16 rounds weights and activations (8 significant bits): 2.3 % of max |u| measured here; a wrong time or sign
    # is of the order of |u| itself
    assert maxdiff(u, u_ref) < 0.1 * u_ref.abs().max()


def test_teacher_and_gm_student_match_stock_diffusers(tmp_path):
    """DiT-mod weights in our modules and in stock diffusers DiTs (3 heads of 8, t = 1000 sigma)."""
    x, sigma, y = inputs()
    t = 1000 * sigma
    sd = dit_mod_weights(CONFIG, 3)
    net = sit.build(CONFIG, sd, "test")
    with torch.no_grad():
        ours, ref = net(x, t, y), stock_dit(CONFIG, sd)(x, timestep=t, class_labels=y).sample
    d_teacher = maxdiff(ours, ref)
    gm_sd = dit_mod_weights(CONFIG, 4, K=3)
    student = sit.build(dict(CONFIG, num_gaussians=3, logstd_inner_dim=16), gm_sd, "test")
    student.t_scale = 1000.0
    with torch.no_grad():
        pol = student(x, sigma, y)
    ref = piflow.gm_policy(*stock_gm(CONFIG, gm_sd, x, t, y), x, sigma)
    d = [maxdiff(a, b) for a, b in ((pol.means_x, ref.means_x), (pol.logweights, ref.logweights),
                                     (pol.var_x, ref.var_x))]
    print(f"vs stock diffusers DiT: teacher {d_teacher:.2e}; GM student means {d[0]:.2e}, logweights {d[1]:.2e}, "
          f"variance {d[2]:.2e}")
    assert d_teacher < 1e-5 and max(d) < 1e-5


def test_training_teacher_guidance_against_two_stock_runs(tmp_path):
    """The training teacher of --teacher sit with --guidance 3 --guidance-interval 0.3 0.6: u = u_null + w (u_cond -
    u_null) from two runs of the stock diffusers DiT, the unconditional one with the null label num_classes (the
    class embedding's extra row); w = 3 inside the interval, boundaries included, else 1 (the conditional u)."""
    from runtime import trainer
    folder = teacher_folder(tmp_path)
    tc = trainer.TrainConfig(guidance=3.0, guidance_interval=(0.3, 0.6))
    att = sit.attach(sit.Options(teacher_ckpt=folder), piflow.PiIDConfig(), tc, {}, torch.device("cpu"))
    assert att.num_classes == NCLS
    stock = stock_dit(CONFIG, dit_mod_weights(CONFIG, 0))
    sigma = torch.tensor([0.1, 0.3, 0.45, 0.6, 0.9])                  # below, both boundaries, inside, above
    x, y = torch.randn(5, C, S, S, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 3, 9, 1, 7])
    with torch.no_grad():
        u_cond = stock(x, timestep=sigma, class_labels=y).sample           # t_scale 1: t = sigma
        u_null = stock(x, timestep=sigma, class_labels=torch.full((5,), NCLS)).sample
        u_other = stock(x, timestep=sigma, class_labels=torch.zeros(5, dtype=torch.long)).sample
        u = att.teacher(x, sigma, y)
    w = torch.tensor([1.0, 3.0, 3.0, 3.0, 1.0])[:, None, None, None]
    torch.testing.assert_close(u, u_null + w * (u_cond - u_null), rtol=1e-5, atol=1e-5)
    wrong = u_other + w * (u_cond - u_other)                        # class 0 standing in for the null label
    assert maxdiff(u[1:4], wrong[1:4]) > 100 * 1e-5 and maxdiff(u_cond[1:4], u[1:4]) > 100 * 1e-5


def test_released_student_folder_loads_from_the_folder_alone(tmp_path, capsys):
    """A released GMDiT-V2 folder with non-default config values; its name gives t_scale 1000 (gmdit, FM DiT) and
    1 NFE. The policy equals an independent forward of the same weights with diffusers' classes."""
    folder, cfg, sd = released_student(tmp_path / "gmdit_k32_imagenet_piid_1step")
    student = sit.load_student(folder)
    c = student.config
    assert (c.num_attention_heads, c.attention_head_dim, c.norm_eps, c.sample_size, c.logstd_inner_dim) == \
        (3, 8, 1e-5, 8, 16) and student.t_scale == 1000.0
    assert student.piid_config == piflow.PiIDConfig(nfe=1, shift=1.0, final_step_scale=1.0)
    x, sigma, y = inputs()
    with torch.no_grad():
        pol = student(x, sigma, y)
    ref = piflow.gm_policy(*stock_gm(CONFIG, sd, x, 1000 * sigma, y), x, sigma)
    d = max(maxdiff(pol.means_x, ref.means_x), maxdiff(pol.logweights, ref.logweights),
            maxdiff(pol.var_x, ref.var_x))
    with capsys.disabled():
        print(f"released folder vs independent diffusers forward: max |diff| {d:.2e}")
    assert d <= 1e-5
    # constant_logstd: no logstd MLP, log s fixed
    const = sit.build(dict(cfg, constant_logstd=-2.0), {k: v for k, v in sd.items() if "logstds" not in k}, "t")
    with torch.no_grad():
        torch.testing.assert_close(const(x, sigma, y).var_x.reshape(-1), math.exp(-4.0) * sigma ** 2, rtol=1e-6,
                                   atol=0)                     # torch's exp vs libm's: a few float32 ulps
    # norm_eps is read (a large value makes it visible), not assumed
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(cfg, norm_eps=0.25), f)
    with torch.no_grad():
        pol = sit.load_student(folder)(x, sigma, y)
    ref = piflow.gm_policy(*stock_gm(dict(CONFIG, norm_eps=0.25), sd, x, 1000 * sigma, y), x, sigma)
    assert maxdiff(pol.means_x, ref.means_x) <= 1e-5 < maxdiff(pol.means_x, piflow.gm_policy(
        *stock_gm(CONFIG, sd, x, 1000 * sigma, y), x, sigma).means_x)
    # the same folder under another name carries no time scale: t = sigma, said so; --t-scale sets it
    os.rename(folder, tmp_path / "copy")
    assert sit.load_student(str(tmp_path / "copy")).t_scale == 1.0 and "no time scale" in capsys.readouterr().out
    assert sit.load_student(str(tmp_path / "copy"), t_scale=1000).t_scale == 1000.0


def test_state_dict_layout_equals_the_released_key_list():
    """Full-size GM student (meta device) vs the released gmrepa_k32 tensor list; the native SiT-XL/2 key map
    (REPA keys) gives the same trunk."""
    with open(os.path.join(HERE, "testdata", "gmrepa_k32_keys.json")) as f:
        released = json.load(f)["tensors"]
    full = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, num_layers=28, sample_size=32,
                patch_size=2, num_embeds_ada_norm=1000)
    with torch.device("meta"):
        ours = sit.GMDiT(num_gaussians=32, **full).state_dict()
        native = sit.to_dit_layout(RefSiT(1152, 16, depth=28, size=32, ncls=1000).state_dict())
    assert {k: list(v.shape) for k, v in ours.items()} == released
    trunk = {k: v for k, v in released.items() if not k.startswith(("proj_out_means", "proj_out_log"))}
    assert {k: list(v.shape) for k, v in native.items()} == dict(trunk, **{"proj_out_2.weight": [16, 1152],
                                                                           "proj_out_2.bias": [16]})


def test_logstd_head_reads_the_detached_embedding():
    """With random (non-zero) logstd-MLP weights a gradient of log s reaches the MLP but not the embedding."""
    student = sit.build(dict(CONFIG, num_gaussians=3, logstd_inner_dim=16), dit_mod_weights(CONFIG, 5, K=3), "t")
    x, sigma, y = inputs()
    pol = student(x, sigma, y)
    pol.var_x.sum().backward()
    assert student.proj_out_logstds[1].weight.grad.abs().max() > 0
    for p in list(student.emb.parameters()) + list(student.transformer_blocks.parameters()):
        assert p.grad is None or p.grad.abs().max() == 0


# ----------------------------------------------------------------------------------------------------------
# 2. Student heads initialised from the teacher (§5.1); the DX grid span
# ----------------------------------------------------------------------------------------------------------

def test_students_start_as_the_teacher(tmp_path):
    """GM: at the source point the velocity is the mean of the component means = u_T + mean_k b_k (b_k the bias
    noise of (k, c), shared by the p^2 sub-positions), |mean_k b_k| < 4 * 0.05 / sqrt(K); DX: every grid point is
    the teacher's x0, and the grid spans one training step, 1 / (NFE - 1 + s) (4 NFE, s = 0.5: 1/3.5)."""
    net, conv = sit.load_teacher(sit.Options(teacher_ckpt=teacher_folder(tmp_path)))
    teacher = sit.as_teacher(net, conv)
    x, sigma, y = inputs()
    u_T = teacher(x, sigma, y)
    K, cfg = 32, piflow.PiIDConfig(nfe=4, final_step_scale=0.5)
    gm = sit.student_from_teacher(net, "gm", K, 0, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = gm(x, sigma, y).velocity(x, sigma)
    noise = gm.proj_out_means.bias.reshape(4, K, C) - net.proj_out_2.bias.reshape(4, 1, C)
    assert maxdiff(noise, noise[:1].expand_as(noise)) < 1e-7 and 0.03 < noise.std() < 0.07   # float32 rounding
    assert maxdiff(v - u_T, noise[0].mean(0)[None, :, None, None].expand_as(v)) < 1e-5
    assert noise[0].mean(0).abs().max() < 4 * 0.05 / math.sqrt(K)
    dx = sit.student_from_teacher(net, "dx", 0, 3, cfg)
    assert dx.segment_size == 1 / 3.5
    with torch.no_grad():
        pol = dx(x, sigma, y)
    assert maxdiff(pol.velocity(x, sigma), u_T) < 1e-5
    tau_src = piflow.unwarp_time(sigma)
    assert torch.allclose(pol.tau_dst, (tau_src - 1 / 3.5).clamp(min=0))


def test_students_start_as_the_teacher_at_time_scale_1000_and_shift_3(tmp_path):
    """An FM-DiT-like teacher (network time 1000 sigma, --t-scale 1000) and a shifted schedule (shift 3, 2 NFE):
    the teacher wrapper is the stock diffusers DiT at t = 1000 sigma; the DX student (N = 3), a K = 5 GM student and
    the shortcut baseline each start at that velocity; the DX grid starts one step, 1/2, below the source in the
    shifted raw time tau = sigma / (3 - 2 sigma) (written out); the GM bias noise depends on the generator alone."""
    net, conv = sit.load_teacher(sit.Options(teacher_ckpt=teacher_folder(tmp_path), t_scale=1000.0))
    x, _, y = inputs()
    sigma = torch.tensor([0.3, 0.8, 0.95])
    with torch.no_grad():
        ref = stock_dit(CONFIG, dit_mod_weights(CONFIG, 0))(x, timestep=1000 * sigma, class_labels=y).sample
    assert maxdiff(sit.as_teacher(net, conv)(x, sigma, y), ref) < 1e-5
    cfg = piflow.PiIDConfig(nfe=2, shift=3.0)
    dx = sit.student_from_teacher(net, "dx", 0, 3, cfg)
    with torch.no_grad():
        pol = dx(x, sigma, y)
    assert maxdiff(pol.velocity(x, sigma), ref) < 1e-5
    torch.testing.assert_close(pol.tau_dst, (sigma / (3 - 2 * sigma) - 0.5).clamp(min=0))   # 0, 0.071, 0.364
    gm = []
    for global_seed in (1, 2):                          # another global RNG state: the same student
        torch.manual_seed(global_seed)
        gm.append(sit.student_from_teacher(net, "gm", 5, 0, cfg, torch.Generator().manual_seed(0)))
    assert gm[0].config.num_gaussians == 5 and gm[0].t_scale == 1000.0
    assert torch.equal(gm[0].proj_out_means.bias, gm[1].proj_out_means.bias)   # (the logstd MLP's hidden layer: global)
    noise = gm[0].proj_out_means.bias.reshape(4, 5, C) - net.proj_out_2.bias.reshape(4, 1, C)
    with torch.no_grad():
        v = gm[0](x, sigma, y).velocity(x, sigma)
    assert maxdiff(v - ref, noise[0].mean(0)[None, :, None, None].expand_as(v)) < 1e-5
    shortcut = sit.student_from_teacher(net, "shortcut", 0, 0, cfg)
    assert isinstance(shortcut, sit.ShortcutDiT) and shortcut.t_scale == 1000.0
    with torch.no_grad():
        assert maxdiff(shortcut(x, sigma, y).velocity(x, sigma), ref) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# 3. Sampling: sample.py --model imagenet, grid and npz, recomputed independently
# ----------------------------------------------------------------------------------------------------------

def tiny_vae(path):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    vae.save_pretrained(path)
    return vae


def recompute(student, vae, indices, labels, seed, nfe, substeps):
    """The images sample.py must give, as float grey levels (n, H, W, 3) before rounding: noise of sample i =
    randn(seed * 2^32 + i), piflow.sample, VAE decode, (clamp(x, -1, 1) + 1) 127.5 (roundoff.grey)."""
    noise = torch.stack([torch.randn(C, S, S, generator=torch.Generator().manual_seed(seed * 2 ** 32 + i))
                         for i in indices])
    with torch.no_grad():
        z = piflow.sample(student, noise, torch.as_tensor(labels), nfe, total_substeps=substeps)
        x = vae.decode(z / vae.config.scaling_factor).sample
    return grey(x.permute(0, 2, 3, 1))


def test_sample_grid_and_npz_recomputed(tmp_path):
    """sample.py --model imagenet: the grid images, the --npz (1 process) and the --npz of 2 torchrun ranks are each
    the rounding of the recomputed float images (roundoff.assert_quantised: other batch splits and processes are other
    float paths); the PNG is save_grid of the returned images, pixel for pixel."""
    from PIL import Image
    folder, _, _ = released_student(tmp_path / "gmrepa_k32_imagenet_piid_2step")
    vae = tiny_vae(str(tmp_path / "vae"))
    student = sit.load_student(folder)
    assert student.piid_config.nfe == 2
    base = ["--model", "imagenet", "--ckpt", folder, "--vae", str(tmp_path / "vae"), "--device", "cpu",
            "--total-substeps", "8", "--seed", "3", "--batch-size", "3"]
    png = str(tmp_path / "grid.png")
    res = sample.main(base + ["--class-labels", "7", "2", "--per-class", "2", "--out", png])
    ref = recompute(student, vae, range(4), [7, 7, 2, 2], 3, 2, 8)
    assert res["nfe"] == 2
    assert_quantised(np.stack(res["images"]), ref, what="grid")
    expect, imgs = str(tmp_path / "expect.png"), res["images"]
    common.save_grid([list(imgs[:2]), list(imgs[2:])], expect, ["class 7", "class 2"], None, res["title"])
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(expect)))
    npz = str(tmp_path / "s.npz")
    sample.main(base + ["--nfe", "1", "--num-samples", "5", "--npz", npz])
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    ref = recompute(student, vae, range(5), np.arange(5) % NCLS, 3, 1, 8)
    assert_quantised(arr, ref, what="npz")
    assert not [f for f in os.listdir(tmp_path) if ".part" in f]
    npz2 = str(tmp_path / "ddp.npz")                                    # 2 ranks, contiguous blocks, same file
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "sample.py")] + base + ["--nfe", "1", "--num-samples", "5", "--npz", npz2],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_quantised(np.load(npz2)["arr_0"], ref, what="torchrun npz")
    assert not [f for f in os.listdir(tmp_path) if ".part" in f]


def test_non_finite_samples_write_nothing(tmp_path, capsys, plant_nan):
    """A sampler planted to return one NaN: sample.py --model imagenet stops with one line, and neither the grid nor
    the --npz is written (was: NaN cast to uint8 and written)."""
    folder, _, _ = released_student(tmp_path / "s")
    tiny_vae(str(tmp_path / "vae"))
    plant_nan(0)
    base = ["--model", "imagenet", "--ckpt", folder, "--vae", str(tmp_path / "vae"), "--device", "cpu", "--out",
            str(tmp_path / "g.png"), "--class-labels", "1", "--per-class", "2"]
    for extra in ([], ["--npz", str(tmp_path / "s.npz"), "--num-samples", "2"]):
        code, err = run_cli(sample.main, base + extra, capsys)
        assert code == 2 and err.count("\n") == 1 and "the decoded samples:" in err and "NaN or inf" in err, err
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".png", ".npz", ".npy"))]


# ----------------------------------------------------------------------------------------------------------
# 4. Training through train_imagenet.py: torchrun == 1 process (weights and Adam moments), resume, DX, data
# ----------------------------------------------------------------------------------------------------------

def train_args(teacher, out, *extra):
    return ["--teacher", "sit", "--teacher-ckpt", teacher, "--no-data-dependent", "--nfe", "1", "--K", "3",
            "--batch-size", "4", "--micro-batch", "2", "--warmup", "1", "--ema-start", "0", "--grad-clip", "1e9",
            "--total-substeps", "8", "--log-every", "0", "--eval-every", "0", "--no-progress", "--threads", "1",
            "--lr", "1e-3", "--out", out, *extra]


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def adam_moments(ck):
    return [(s["exp_avg"], s["exp_avg_sq"]) for _, s in sorted(ck["opt"]["state"].items())]


def test_torchrun_matches_one_process_and_resume_is_exact(tmp_path):
    """2 gloo ranks vs 1 process, same global batch: weights and BOTH Adam moments agree to float summation noise
    (AdamW's update hides a constant gradient scale; its moments do not). Resume == uninterrupted, bit for bit."""
    teacher = teacher_folder(tmp_path)
    one, two, part = (str(tmp_path / n) for n in ("one", "two", "part"))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train_imagenet.py")] + train_args(teacher, two, "--steps", "2"),
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    train_imagenet.main(train_args(teacher, one, "--steps", "2", "--export", str(tmp_path / "gm_export")))
    train_imagenet.main(train_args(teacher, part, "--steps", "1"))
    train_imagenet.main(train_args(teacher, part, "--steps", "2", "--resume"))
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 0, err[-3000:]
    a, b, r = ckpt(one), ckpt(two), ckpt(part)
    for key in ("student", "ema"):
        assert all(torch.equal(a[key][k], r[key][k]) for k in a[key])
    assert all(torch.equal(x, y) for m, n in zip(adam_moments(a), adam_moments(r)) for x, y in zip(m, n))
    rel = lambda x, y: maxdiff(x, y) / y.abs().max().clamp(min=1e-30).item()
    d_w = max(maxdiff(a["student"][k], b["student"][k]) for k in a["student"])
    d_m = max(max(rel(x, y) for x, y in zip(m, n)) for m, n in zip(adam_moments(b), adam_moments(a)))
    print(f"torchrun vs 1 process: weights max |diff| {d_w:.2e}, Adam moments max relative diff {d_m:.2e}")
    assert d_m < 1e-5                                                  # (a doubled gradient: 1 for exp_avg)
    assert d_w < 1e-6
    assert max(v.abs().max().item() for m in adam_moments(a) for v in m) > 0
    exported = sit.load_student(str(tmp_path / "gm_export"))             # the GM export: the EMA weights, K, NFE
    assert isinstance(exported, sit.GMDiT) and exported.config.num_gaussians == 3 and exported.piid_config.nfe == 1
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in a["ema"].items())


def test_dx_student_trains_exports_reloads_and_samples(tmp_path):
    teacher = teacher_folder(tmp_path)
    out, export = str(tmp_path / "dx"), str(tmp_path / "dx_export")
    att, ema = train_imagenet.main(train_args(teacher, out, "--policy", "dx", "--N", "3", "--nfe", "2",
                                              "--final-step-scale", "0.5", "--steps", "2", "--export", export,
                                              "--eval-every", "2"))
    with open(os.path.join(out, "log.txt")) as f:
        assert "eval EMA: align" in f.read()                             # evaluate(): teacher alignment
    student = sit.load_student(export)
    assert isinstance(student, sit.DXDiT) and student.segment_size == 1 / 1.5 and student.piid_config.nfe == 2
    assert all(torch.equal(student.state_dict()[k], v) for k, v in ema.items())
    from_ckpt = sit.load_student(os.path.join(out, "ckpt.pt"))           # a run's ckpt.pt: the same EMA student
    assert all(torch.equal(from_ckpt.state_dict()[k], v) for k, v in student.state_dict().items())
    from runtime import trainer                                                       # --student-init starts from it
    opts = sit.Options(teacher_ckpt=teacher, policy="dx", N=3, student_init=export)
    cfg = piflow.PiIDConfig(nfe=2, final_step_scale=0.5)
    init = sit.attach(opts, cfg, trainer.TrainConfig(), {}, torch.device("cpu")).student
    assert all(torch.equal(init.state_dict()[k], v) for k, v in student.state_dict().items())
    with pytest.raises(common.UserError, match="another architecture"):
        sit.attach(sit.Options(teacher_ckpt=teacher, policy="dx", N=4, student_init=export), cfg,
                   trainer.TrainConfig(), {}, torch.device("cpu"))
    tiny_vae(str(tmp_path / "vae"))
    res = sample.main(["--model", "imagenet", "--ckpt", export, "--vae", str(tmp_path / "vae"), "--device", "cpu",
                       "--class-labels", "1", "--per-class", "2", "--out", str(tmp_path / "dx.png")])
    assert res["nfe"] == 2 and len(res["rows"][0]) == 2 and os.path.isfile(tmp_path / "dx.png")


def test_data_dependent_training_on_a_latent_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, n in (("n02", 2), ("n01", 3)):
        os.makedirs(tmp_path / "img" / c)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    vae = tiny_vae(str(tmp_path / "vae"))
    meta = sit.encode_folder(str(tmp_path / "img"), str(tmp_path / "lat"), vae, resolution=16, shard_size=4,
                             sample=False, progress=False)
    assert meta["num_images"] == 5 and meta["shards"] == 2 and meta["classes"] == ["n01", "n02"]
    x = torch.from_numpy(np.array(Image.open(tmp_path / "img" / "n02" / "1.png"))).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        ref = vae.encode(x.float()).latent_dist.mean * vae.config.scaling_factor
    assert np.abs(np.load(tmp_path / "lat" / "latents_00001.npy")[0] - ref[0].numpy()).max() < 2e-3
    runs = [str(tmp_path / "run"), str(tmp_path / "run_gc")]
    for out, extra in zip(runs, ([], ["--grad-checkpointing"])):
        att, _ = train_imagenet.main(train_args(teacher_folder(tmp_path), out, "--data-dependent", "--latents",
                                                str(tmp_path / "lat"), "--steps", "2", *extra))
    lat = np.concatenate([np.load(tmp_path / "lat" / f"latents_0000{s}.npy") for s in (0, 1)]).astype(np.float32)
    x0, y = att.sample_data(6, torch.Generator().manual_seed(0))        # Alg. 2 draws (x0, label) pairs of the folder
    for xi, yi in zip(x0, y):
        j = [i for i in range(5) if np.array_equal(lat[i], xi.numpy())]
        assert len(j) == 1 and yi.item() == (0 if j[0] < 3 else 1)
    a, b = ckpt(runs[0]), ckpt(runs[1])
    assert a["step"] == 2 and a["settings"]["data_dependent"]
    # recomputation: the same steps, to round-off (autograd accumulates in another graph order): weights and both
    # Adam moments as in the torchrun test
    assert max(maxdiff(a["student"][k], b["student"][k]) for k in a["student"]) < 1e-6
    assert all(maxdiff(x, y) <= 1e-5 * y.abs().max().item() for m, n in zip(adam_moments(a), adam_moments(b))
               for x, y in zip(m, n))


# ----------------------------------------------------------------------------------------------------------
# 5. Hub specs, offline, unsafe pickles: one line each, before heavy work
# ----------------------------------------------------------------------------------------------------------

def fake_hub(monkeypatch, root, calls):
    """hf_hub_download served from `root`/<repo>/<filename>, as if cached; records every call."""
    import huggingface_hub
    from huggingface_hub import errors

    def download(repo_id, filename, local_files_only=False, **kw):
        calls.append((repo_id, filename, local_files_only))
        path = os.path.join(root, repo_id, filename)
        if not os.path.exists(path):
            raise errors.LocalEntryNotFoundError(f"{filename} not in cache")
        return path
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


def test_hub_ids_and_specs(tmp_path, monkeypatch, capsys):
    hub, calls = tmp_path / "hub" / sit.HUB, []
    for name, seed in (("gmdit_k32_imagenet_piid_1step", 0), ("gmrepa_k32_imagenet_piid_2step", 1)):
        released_student(hub / name, seed=seed)
    fake_hub(monkeypatch, str(tmp_path / "hub"), calls)
    a = sit.load_student("gmdit_k32_imagenet_piid_1step")
    b = sit.load_student(f"{sit.HUB}:gmrepa_k32_imagenet_piid_2step")
    c = sit.load_student(f"hf://{sit.HUB}/gmrepa_k32_imagenet_piid_2step")
    assert (a.t_scale, a.piid_config.nfe, b.t_scale, b.piid_config.nfe) == (1000.0, 1, 1.0, 2)
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in b.state_dict().items())
    assert ("Lakonik/pi-Flow-ImageNet", "gmrepa_k32_imagenet_piid_2step/config.json", True) in calls
    # the known teacher ids: bare DiT-layout .pth files, 16 heads, t_scale from the id
    D = 32
    cfg16 = dict(CONFIG, num_attention_heads=16, attention_head_dim=2, sample_size=32)
    os.makedirs(hub / "teachers")
    torch.save(dit_mod_weights(cfg16, 2), hub / "teachers" / "flowdit_imagenet.pth")
    net, conv = sit.load_teacher(sit.Options(teacher_ckpt="flowdit"))
    assert (net.t_scale, net.config.num_attention_heads, net.config.norm_eps, net.inner_dim) == (1000.0, 16, 1e-5, D)
    # not cached + HF_HUB_OFFLINE, or no route to the hub: one line naming the id, no download attempted
    calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(common.UserError, match=r"--ckpt='gmrepa_k32_imagenet_piid_1step'.*HF_HUB_OFFLINE") as e:
        sit.load_student("gmrepa_k32_imagenet_piid_1step")
    assert "\n" not in str(e.value) and all(local for *_, local in calls)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import socket
    from huggingface_hub import constants                 # read at import: test_t2i.py may have set it before
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_dns(*a, **k):
        raise OSError("Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    code, err = run_cli(sample.main, ["--model", "imagenet", "--ckpt", "owner/repo:sub", "--out",
                                      str(tmp_path / "x.png")], capsys)
    assert code == 2 and err.count("\n") == 1 and "owner/repo" in err and "cannot be reached" in err
    assert all(local for *_, local in calls)


class Payload:
    """Unpickling this creates the marker file: a stand-in for code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_payload_is_refused_on_every_loading_path(tmp_path, capsys):
    marker, bad = str(tmp_path / "MARKER"), str(tmp_path / "payload.pt")
    torch.save({"ema": dit_mod_weights(CONFIG, 0), "x": Payload(marker)}, bad)
    teacher = teacher_folder(tmp_path)
    runs = [(train_imagenet.main, train_args(bad, str(tmp_path / "a"), "--steps", "1")),
            (train_imagenet.main, train_args(teacher, str(tmp_path / "b"), "--steps", "1", "--student-init", bad)),
            (sample.main, ["--model", "imagenet", "--ckpt", bad, "--out", str(tmp_path / "c.png")])]
    for main, argv in runs:
        code, err = run_cli(main, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "refused" in err and "--trust-checkpoint" in err, err
        assert not os.path.exists(marker)


def test_user_errors_are_one_line(tmp_path, capsys):
    teacher = teacher_folder(tmp_path)
    cases = [(train_imagenet.main, train_args(teacher, str(tmp_path / "a"), "--steps", "1", "--data-dependent"),
              "--latents"),
             (train_imagenet.main, train_args(str(tmp_path / "nope"), str(tmp_path / "b"), "--steps", "1"),
              "no such file"),
             (sample.main, ["--model", "imagenet", "--ckpt", teacher, "--out", str(tmp_path / "c.png")],
              "not a pi-Flow student"),
             (sample.main, ["--model", "imagenet", "--ckpt", teacher, "--npz", str(tmp_path / "no" / "x.npy"),
                            "--out", str(tmp_path / "c.png")], "--npz")]
    # malformed JSON in a loaded folder: one line naming the file (was a 28-line JSONDecodeError traceback)
    bad, _, _ = released_student(tmp_path / "bad_config")
    with open(os.path.join(bad, "config.json"), "w") as f:
        f.write('{"num_layers": 2,,}')
    lat = tmp_path / "lat"
    os.makedirs(lat)
    (lat / "meta.json").write_text('{"shards": 1, "latent_shape": [4, 8')
    lat2 = tmp_path / "lat2"
    os.makedirs(lat2)
    (lat2 / "meta.json").write_text('{"shards": 1}')
    cases += [(sample.main, ["--model", "imagenet", "--ckpt", bad, "--out", str(tmp_path / "d.png")],
               f"{os.path.join(bad, 'config.json')!r} is not valid JSON (Expecting property name"),
              (train_imagenet.main, train_args(teacher, str(tmp_path / "e"), "--steps", "1", "--data-dependent",
                                               "--latents", str(lat)), "meta.json' is not valid JSON"),
              (train_imagenet.main, train_args(teacher, str(tmp_path / "f"), "--steps", "1", "--data-dependent",
                                               "--latents", str(lat2)), "lacks a valid 'latent_shape' entry")]
    for main, argv, what in cases:
        code, err = run_cli(main, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and what in err, err
