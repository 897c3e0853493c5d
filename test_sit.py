"""Tests for sit.py (CPU, tiny random-weight models, nothing downloaded)."""
import argparse
import math
import os

import numpy as np
import pytest
import torch

import piflow
import sit

torch.set_num_threads(2)
D, HEADS, DEPTH, S, C, NCLS = 72, 1, 2, 8, 4, 10     # hidden = 1 head x 72 so infer_arch finds the heads


def tiny(cls=sit.SiT, seed=0, **kw):
    """Tiny model with every parameter random (adaLN and output layers too, unlike the DiT init)."""
    torch.manual_seed(seed)
    args = dict(input_size=S, patch_size=2, in_channels=C, hidden_size=D, depth=DEPTH, num_heads=HEADS,
                num_classes=NCLS)
    args.update(kw)
    net = cls(**args)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net.eval()


def inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, S, S, generator=g), torch.rand(B, generator=g) * 0.9 + 0.05,
            torch.randint(NCLS, (B,), generator=g))


def sincos_table(net):
    """pos_embed as the SiT/REPA checkpoints store it (1, L, D): MAE's numpy construction written out."""
    g = S // 2
    grid_w, grid_h = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))  # w first

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)
    pe = np.concatenate([one(D // 2, grid_w), one(D // 2, grid_h)], 1)
    return torch.from_numpy(pe).float()[None]


# ----------------------------------------------------------------------------------------------------------
# 1. The SiT module and the DiT-style key map against an independent implementation (diffusers DiT)
# ----------------------------------------------------------------------------------------------------------

def _stock_diffusers(dit_sd, out_channels):
    """DiT-style (shared emb) -> stock diffusers DiTTransformer2DModel with the two SiT details (integration §5.4)."""
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=D // HEADS, in_channels=C,
                                  out_channels=out_channels, num_layers=DEPTH, sample_size=S, patch_size=2,
                                  num_embeds_ada_norm=NCLS).eval()
    sd = {k: v for k, v in dit_sd.items() if not k.startswith("emb.")}
    for i in range(DEPTH):
        sd.update({f"transformer_blocks.{i}.norm1.{k}": v for k, v in dit_sd.items() if k.startswith("emb.")})
        blk = model.transformer_blocks[i]
        blk.norm1.emb.time_proj.downscale_freq_shift = 0    # original DiT/SiT frequencies
        blk.norm3.eps = 1e-6                                # SiT's LayerNorm eps
    model.load_state_dict(sd, strict=True)
    return model


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_sit_matches_diffusers_dit_both_directions(learn_sigma):
    net = tiny(learn_sigma=learn_sigma)
    x, t, y = inputs()
    ref = _stock_diffusers(sit.sit_to_dit(net.state_dict()), net.out_channels)
    with torch.no_grad():
        ours, theirs = net(x, t, y), ref(x, timestep=t, class_labels=y).sample
    assert ours.shape == (3, C * (2 if learn_sigma else 1), S, S)
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()
    # stock diffusers (per-block emb copies) -> native keys -> identical module
    back = tiny(learn_sigma=learn_sigma, seed=5)
    back.load_state_dict(sit.dit_to_sit(ref.state_dict()), strict=True)
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_key_maps_round_trip_exact_for_students():
    for net in (tiny(sit.GMSiT, num_gaussians=3), tiny(sit.DXSiT, num_grid=3)):
        sd = net.state_dict()
        dit = sit.sit_to_dit(sd)
        assert "proj_out_1.weight" in dit and "transformer_blocks.1.attn1.to_k.bias" in dit
        assert not any(k.startswith(("blocks.", "x_embedder", "final_layer")) for k in dit)
        back = sit.dit_to_sit(dit)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    gm = sit.sit_to_dit(tiny(sit.GMSiT, num_gaussians=3).state_dict())
    assert {"proj_out_means.weight", "proj_out_logweights.bias", "proj_out_logstds.1.weight",
            "proj_out_logstds.3.bias", "proj_out_1.bias"} <= gm.keys() and "proj_out_2.weight" not in gm


def test_pos_embed_equals_mae_table():
    assert torch.allclose(sit.sincos_pos_embed(D, S // 2, S // 2)[None], sincos_table(None), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# 2. Checkpoint formats -> identical pi-Flow velocities
# ----------------------------------------------------------------------------------------------------------

def test_checkpoint_formats_give_identical_velocities(tmp_path):
    from safetensors.torch import save_file
    net = tiny()
    x, sigma, y = inputs()
    with torch.no_grad():
        u_ref = net(x, sigma, y)                                          # REPA: t = sigma, v = u
    native = dict(net.state_dict(), pos_embed=sincos_table(net))
    native.update({f"projectors.0.{i}.weight": torch.randn(5, 5) for i in (0, 2, 4)})
    repa = tmp_path / "repa_train.pt"                                      # REPA train.py checkpoint
    torch.save({"model": {k: v * 0 for k, v in native.items()}, "ema": native, "opt": {},
                "args": argparse.Namespace(model="SiT-XL/2", encoder_depth=8), "steps": 7}, repa)
    with pytest.raises(Exception):
        torch.load(repa, weights_only=True)                               # why the allow-list is needed
    dit_st, dit_pth = tmp_path / "repa_dit.safetensors", tmp_path / "repa_dit.pth"
    save_file({k: v.contiguous() for k, v in sit.sit_to_dit(net.state_dict()).items()}, dit_st)
    torch.save({k: v.half() for k, v in sit.sit_to_dit(net.state_dict()).items()}, dit_pth)  # fp16 like the release
    net16 = tiny(seed=0)
    net16.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})
    with torch.no_grad():
        u_ref16 = net16(x, sigma, y)                                      # the same weights rounded to fp16
    for path, ref in ((repa, u_ref), (dit_st, u_ref), (dit_pth, u_ref16)):
        loaded, info = sit.load_network(str(path))
        assert info["kind"] == "teacher" and info["convention"] == "u"
        u = sit.Teacher(loaded, info["t_scale"], info["convention"])(x, sigma, y)
        assert torch.equal(u, ref), path.name

    # original SiT: learn-sigma (2C outputs), t = 0 is noise, v = x_data - eps
    net_ls = tiny(learn_sigma=True, seed=3)
    with torch.no_grad():
        u_sit = -net_ls(x, 1 - sigma, y)[:, :C]
    raw = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(dict(net_ls.state_dict(), pos_embed=sincos_table(net_ls)), raw)
    loaded, info = sit.load_network(str(raw))
    assert info["convention"] == "sit" and loaded.out_channels == C
    u = sit.Teacher(loaded, info["t_scale"], info["convention"])(x, sigma, y)
    assert (u - u_sit).abs().max() < 1e-5
    # a wrong stored pos_embed is caught
    torch.save(dict(net.state_dict(), pos_embed=sincos_table(net).flip(1)), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="pos_embed"):
        sit.load_network(str(tmp_path / "bad.pt"))


# ----------------------------------------------------------------------------------------------------------
# 3. Student head initialisation (recipe §6.1)
# ----------------------------------------------------------------------------------------------------------

def test_gm_student_equals_teacher_at_init_up_to_bias_noise(tmp_path):
    """At the source point (x_t = x_src, sigma = sigma_src) the GM velocity is the weighted mean of the component
    means (posterior = prior), weights are uniform (zero logweights head), and component k's mean is u_T + b_k
    (b_k the bias noise of (k, c), same at every pixel). So pi - u_T = mean_k b_k per channel, exactly, and
    |mean_k b_k| ~ N(0, 0.05^2 / K): below 4 * 0.05 / sqrt(K) except with probability ~6e-5 per channel."""
    K = 32
    teacher = tiny()
    student = tiny(sit.GMSiT, num_gaussians=K, seed=9)
    sit.init_student_from_teacher(student, teacher, generator=torch.Generator().manual_seed(0))
    x, sigma, y = inputs()
    with torch.no_grad():
        u_T = teacher(x, sigma, y)
        pol = student(x, sigma, y)
        v = pol.velocity(x, sigma)
        means, logw, logstds = student.heads(x, sigma, y)
    b_teacher = teacher.final_layer.linear.bias.reshape(4, C)             # (p^2, C)
    noise = student.proj_out_means.bias.detach().reshape(4, K, C) - b_teacher[:, None]
    assert torch.allclose(noise, noise[:1].expand_as(noise), atol=1e-6)   # shared across the p^2 positions
    expected = noise[0].mean(0)                                           # (C,)
    assert torch.allclose(v - u_T, expected[None, :, None, None].expand_as(v), atol=1e-5)
    assert expected.abs().max() < 4 * 0.05 / math.sqrt(K)
    assert 0.03 < noise[0].std().item() < 0.07                            # N(0, 0.05^2) with 128 draws
    assert torch.allclose(logw, torch.full_like(logw, -math.log(K)), atol=1e-6)
    assert torch.allclose(logstds, torch.full_like(logstds, math.log(0.05)))
    assert torch.allclose(means - u_T[:, None], noise[0][None, :, :, None, None].expand_as(means), atol=1e-5)
    # logstd MLP reads the detached conditioning: no gradient from logstds reaches the trunk
    student.zero_grad()
    student.heads(x, sigma, y)[2].sum().backward()
    assert student.t_embedder.mlp[0].weight.grad is None or student.t_embedder.mlp[0].weight.grad.abs().max() == 0
    # published-layout save -> load gives the same policy
    path = str(tmp_path / "student.safetensors")
    sit.save_student(student, path, nfe=1)
    loaded, info = sit.load_network(path)
    assert info["kind"] == "gm" and info["nfe"] == 1
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, y).means_x, pol.means_x)


def test_dx_student_equals_teacher_at_init():
    teacher = tiny()
    student = sit.init_student_from_teacher(tiny(sit.DXSiT, num_grid=4, seed=2), teacher)
    x, sigma, y = inputs()
    with torch.no_grad():
        u_T, pol = teacher(x, sigma, y), student(x, sigma, y)
    assert isinstance(pol, piflow.DXPolicy)
    assert torch.allclose(pol.velocity(x, sigma), u_T, atol=1e-5)       # every grid point is the teacher's x0
    assert torch.allclose(pol.x0(sigma * 0.5), x - sigma[:, None, None, None] * u_T, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 4. Training hook, VAE helpers, sampler
# ----------------------------------------------------------------------------------------------------------

def trainer_parser():
    """The train_imagenet.py flags sit.build reads (a subset, same names and defaults) + sit.add_train_args."""
    p = argparse.ArgumentParser()
    p.add_argument("--nfe", type=int, default=4)
    p.add_argument("--policy", default="gm", choices=["gm", "dx", "shortcut"])  # add_train_args must skip it
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0))
    p.add_argument("--shift", type=float, default=1.0)
    p.add_argument("--final-step-scale", type=float, default=1.0)
    p.add_argument("--data-dependent", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return sit.add_train_args(p)


def test_build_for_trainer_teacher_cfg_and_one_piid_step(tmp_path):
    teacher = tiny()
    path = str(tmp_path / "teacher.pt")
    torch.save(dict(teacher.state_dict(), pos_embed=sincos_table(teacher)), path)   # pos_embed gives the size
    args = trainer_parser().parse_args(["--teacher-ckpt", path, "--nfe", "1", "--num-gaussians", "4",
                                        "--cfg-interval", "0", "0.5"])
    s = sit.build(args, "cpu")
    assert args.guidance == 3.2 and args.guidance_interval == [0.0, 0.5]    # Table 8 (1 NFE) filled in
    assert tuple(s.noise_shape) == (C, S, S) and s.null_cond.tolist() == [NCLS]
    guided = piflow.guided_teacher(s.teacher, args.guidance, s.null_cond, tuple(args.guidance_interval))
    x, _, y = inputs()
    sigma = torch.tensor([0.3, 0.5, 0.8])
    with torch.no_grad():
        u = guided(x, sigma, y)
        u_c, u_n = teacher(x, sigma, y), teacher(x, sigma, torch.full_like(y, NCLS))  # null row
    w = torch.tensor([3.2, 3.2, 1.0])[:, None, None, None]                # interval inclusive at 0.5
    expected = u_n + w * (u_c - u_n)
    assert (u - expected).abs().max() < 1e-4 * expected.abs().max()       # batch-of-6 vs batch-of-3 round-off
    assert not torch.allclose(u[:2], u_c[:2], rtol=1e-2)                   # guidance did act
    cfg = piflow.PiIDConfig(nfe=1, total_substeps=16, gm_dropout=0.05, loss_scale=3.0)
    g = torch.Generator().manual_seed(0)
    y = s.sample_cond(2, g)
    loss = piflow.piid_data_free(s.student, guided, torch.randn(2, C, S, S), y, cfg)
    loss.backward()
    assert torch.isfinite(loss) and s.student.proj_out_means.weight.grad.abs().max() > 0
    m = s.evaluate(s.student, n=2, teacher_steps=4)
    assert math.isfinite(m["latent_mse_vs_teacher"])
    with pytest.raises(ValueError, match="--latents"):
        sit.build(trainer_parser().parse_args(["--teacher-ckpt", path, "--data-dependent"]), "cpu")
    with pytest.raises(ValueError, match="--policy"):
        sit.build(trainer_parser().parse_args(["--teacher-ckpt", path, "--policy", "shortcut"]), "cpu")


def tiny_vae(path=None):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    if path:
        vae.save_pretrained(path)
    return vae


def test_encode_folder_layout_and_latent_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    imgs = {}
    for c, n in (("n0001", 2), ("n0000", 3)):
        os.makedirs(tmp_path / "img" / c)
        for i in range(n):
            a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "img" / c / f"{i}.png")
            imgs[(c, i)] = a
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / "n0001" / "9.png")
    vae = tiny_vae()
    meta = sit.encode_folder(str(tmp_path / "img"), str(tmp_path / "lat"), vae, resolution=16, shard_size=4,
                             sample=False, progress=False)
    assert meta["num_images"] == 6 and meta["shards"] == 2 and meta["classes"] == ["n0000", "n0001"]
    lat = np.concatenate([np.load(tmp_path / "lat" / f"latents_{s:05d}.npy") for s in range(2)])
    lab = np.concatenate([np.load(tmp_path / "lat" / f"labels_{s:05d}.npy") for s in range(2)])
    assert lat.shape == (6, 4, 8, 8) and lat.dtype == np.float16 and lab.tolist() == [0, 0, 0, 1, 1, 1]
    x = torch.from_numpy(imgs[("n0001", 1)]).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean * 0.18215
    assert np.abs(lat[4] - ref[0].numpy()).max() < 2e-3
    data = sit.LatentFolder(str(tmp_path / "lat"))
    x0, y = data.sample(5, torch.Generator().manual_seed(0))
    assert x0.shape == (5, 4, 8, 8) and len(data) == 6 and set(y.tolist()) <= {0, 1}
    with torch.no_grad():
        img = sit.decode(vae, torch.from_numpy(lat[:2]).float())
    assert img.shape == (2, 16, 16, 3) and img.dtype == torch.uint8


def test_sample_cli_png_and_npz(tmp_path):
    from PIL import Image
    tiny_vae(str(tmp_path / "vae"))
    student = sit.init_student_from_teacher(tiny(sit.GMSiT, num_gaussians=4), tiny())
    ckpt = str(tmp_path / "gm.safetensors")
    sit.save_student(student, ckpt, nfe=2)
    common = ["--ckpt", ckpt, "--vae", str(tmp_path / "vae"), "--device", "cpu", "--total-substeps", "4"]
    png = str(tmp_path / "grid.png")
    import sample                                                         # the sample.py entry point
    sample.main(["--model", "imagenet", "--threads", "2"] + common + ["--class-labels", "1", "2", "3", "--out", png])
    assert np.asarray(Image.open(png)).shape == (16, 48, 3)
    arrs = []
    for bs in ("2", "5"):
        npz = str(tmp_path / f"s{bs}.npz")
        sit.sample_cli(common + ["--nfe", "1", "--num-samples", "5", "--npz", npz, "--batch-size", bs])
        arr = np.load(npz)["arr_0"]
        assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
        arrs.append(arr)
        assert not [f for f in os.listdir(tmp_path) if ".part" in f]
    assert np.array_equal(*arrs) and not np.array_equal(arrs[0][0], arrs[0][1])  # per-index seeds
    # under torchrun the two ranks' parts are merged into the same npz as the single-process run
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    npz = str(tmp_path / "ddp.npz")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(here, "sample.py"), "--model", "imagenet"] + common +
                       ["--nfe", "1", "--num-samples", "5", "--npz", npz, "--batch-size", "2"],
                       cwd=here, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(np.load(npz)["arr_0"], arrs[0])
    assert not [f for f in os.listdir(tmp_path) if ".part" in f]


# ----------------------------------------------------------------------------------------------------------
# 5. Bad input -> clear errors before heavy work
# ----------------------------------------------------------------------------------------------------------

class Opaque:
    """An arbitrary pickled object: torch.load(weights_only=True) refuses it."""


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"--ckpt.*known id"):
        sit.resolve_checkpoint("not_a_model")
    with pytest.raises(FileNotFoundError, match="--teacher-ckpt"):
        sit.resolve_checkpoint(str(tmp_path / "missing.pt"), name="--teacher-ckpt")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        sit.load_network(str(tmp_path / "odd.pt"))
    torch.save({"ema": tiny().state_dict(), "cfg": Opaque()}, tmp_path / "pickled.pt")  # not allow-listed
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        sit.load_network(str(tmp_path / "pickled.pt"))
    net, _ = sit.load_network(str(tmp_path / "pickled.pt"), trust=True)
    assert isinstance(net, sit.SiT)
    with pytest.raises(ValueError, match="--nfe"):
        sit.sample_cli(["--ckpt", "nonexistent", "--nfe", "0"])
    with pytest.raises(ValueError, match="--num-samples"):
        sit.sample_cli(["--npz", str(tmp_path / "x.npz")])
    with pytest.raises(ValueError, match="num_heads"):
        sit.SiT(hidden_size=100, num_heads=3)
    with pytest.raises(FileNotFoundError, match="--latents"):
        sit.LatentFolder(str(tmp_path))
    assert not os.path.exists(tmp_path / "x.npz")


# ------------------------------------------------------------------------------------------------
# train_imagenet.py with the SiT teacher: 2-process torchrun == 1 process; resume == uninterrupted
# ------------------------------------------------------------------------------------------------

def _sit_train_args(tmp_path, *extra):
    teacher = tiny()
    path = str(tmp_path / "teacher.pt")
    if not os.path.exists(path):
        torch.save(dict(teacher.state_dict(), pos_embed=sincos_table(teacher)), path)
    return ["--teacher", "sit", "--teacher-ckpt", path, "--nfe", "1", "--num-gaussians", "4", "--batch-size", "4",
            "--micro-batch", "2", "--warmup", "1", "--ema-start", "0", "--log-every", "0", "--eval-every", "0",
            "--no-progress", "--threads", "1", "--lr", "1e-3", *extra]


def _ckpt(path):
    return torch.load(os.path.join(path, "ckpt.pt"), weights_only=False)


def test_trainer_sit_torchrun_matches_single_process(tmp_path):
    """Same global batch on 1 process and on 2 gloo ranks (gradients all-reduced): the same parameters."""
    import subprocess
    import sys
    import train_imagenet
    here = os.path.dirname(os.path.abspath(__file__))
    one, two, s1 = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "s1")
    train_imagenet.main(_sit_train_args(tmp_path, "--steps", "2", "--out", one))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(here, "train_imagenet.py")] + _sit_train_args(tmp_path, "--steps", "2", "--out", two),
                       cwd=here, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    train_imagenet.main(_sit_train_args(tmp_path, "--steps", "1", "--out", s1))
    p1, p2, p_s1 = _ckpt(one)["student"], _ckpt(two)["student"], _ckpt(s1)["student"]
    step2 = max((p1[k] - p_s1[k]).abs().max().item() for k in p1)         # how far the second step moved
    diff = max((p1[k] - p2[k]).abs().max().item() for k in p1)
    assert step2 > 1e-5                                                    # the run really trained
    assert diff < 1e-4 and diff < 0.05 * step2, (diff, step2)             # float32 summation-order noise only


def test_trainer_sit_resume_continues_identically(tmp_path):
    import train_imagenet
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_imagenet.main(_sit_train_args(tmp_path, "--steps", "3", "--out", full))
    train_imagenet.main(_sit_train_args(tmp_path, "--steps", "1", "--out", part))
    train_imagenet.main(_sit_train_args(tmp_path, "--steps", "3", "--out", part, "--resume"))
    ck_f, ck_p = _ckpt(full), _ckpt(part)
    assert ck_p["step"] == 3
    for key in ("student", "ema"):
        assert all(torch.equal(ck_f[key][k], ck_p[key][k]) for k in ck_f[key])
