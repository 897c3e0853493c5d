"""Tests for train_t2i.py on tiny random-weight FLUX / Qwen-Image transformers (CPU, no downloads)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)         # tiny models: more threads only add overhead

import diffusers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import piflow  # noqa: E402
import train_t2i as T  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_transformer(model, seed=0):
    torch.manual_seed(seed)
    if model == "flux":
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def tiny_vae(model):
    torch.manual_seed(1)
    if model == "flux":
        return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                                       latent_channels=16, norm_num_groups=4, layers_per_block=1,
                                       scaling_factor=0.3611, shift_factor=0.1159)
    return diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                            temperal_downsample=[False, False, False])


def make_cond(model, B, seed=0, L=7):
    g = torch.Generator().manual_seed(seed)
    cond = {"prompt_embeds": torch.randn(B, L, 32, generator=g)}
    if model == "flux":
        cond.update(pooled=torch.randn(B, 24, generator=g), guidance=torch.full((B,), 3.5))
    else:
        mask = torch.ones(B, L, dtype=torch.long)
        mask[0, L - 2:] = 0
        cond["mask"] = mask
    return cond


def embed_cache(model, P, path, seed=0):
    c = make_cond(model, P, seed)
    d = {"prompt_embeds": c["prompt_embeds"]}
    if model == "flux":
        d["pooled"] = c["pooled"]
    else:
        d["mask"] = c["mask"]
        n = make_cond(model, 1, seed + 1)
        d["negative"] = {"prompt_embeds": n["prompt_embeds"], "mask": torch.ones(1, 7, dtype=torch.long)}
    torch.save(d, path)
    return path


@pytest.fixture(scope="module")
def bases():
    return {m: tiny_transformer(m) for m in ("flux", "qwen")}


def fresh(bases, model):
    return copy.deepcopy(bases[model])


def perturb_trainables(student, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.trainable_named().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def reference_u(tr_ref, model, x, sigma, cond):
    """Independent teacher: the stock model, packing written out here (integration.md §2.2) with explicit loops."""
    B, C, H, W = x.shape
    h, w = H // 2, W // 2
    packed = torch.empty(B, h * w, 4 * C)
    for i in range(h):
        for j in range(w):
            for c in range(C):
                for ph in range(2):
                    for pw in range(2):
                        packed[:, i * w + j, c * 4 + ph * 2 + pw] = x[:, c, 2 * i + ph, 2 * j + pw]
    if model == "flux":
        ids = torch.tensor([[0.0, i, j] for i in range(h) for j in range(w)])
        out = tr_ref(hidden_states=packed, encoder_hidden_states=cond["prompt_embeds"],
                     pooled_projections=cond["pooled"], timestep=sigma, img_ids=ids,
                     txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3), guidance=cond["guidance"]).sample
    else:
        out = tr_ref(hidden_states=packed, encoder_hidden_states=cond["prompt_embeds"],
                     encoder_hidden_states_mask=cond["mask"], timestep=sigma, img_shapes=[[(1, h, w)]] * B).sample
    u = torch.empty(B, C, H, W)
    for i in range(h):
        for j in range(w):
            for c in range(C):
                for ph in range(2):
                    for pw in range(2):
                        u[:, c, 2 * i + ph, 2 * j + pw] = out[:, i * w + j, c * 4 + ph * 2 + pw]
    return u


@pytest.mark.parametrize("model", ["flux", "qwen"])
def test_head_init_and_teacher(bases, model):
    """GM mixture mean = teacher u + mean_k bias noise; DX grid = teacher; teacher ignores LoRA and norm_out."""
    tr = fresh(bases, model)
    ref = copy.deepcopy(tr).eval()
    s = T.T2IStudent(tr, model, "gm", K=4, lora_rank=4, lora_dropout=0.0, seed=3).eval()
    x, sigma, cond = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.9]), make_cond(model, 2)
    with torch.no_grad():
        u_ref = reference_u(ref, model, x, sigma, cond)
        u_t = s.teacher(x, sigma, cond)
        torch.testing.assert_close(u_t, u_ref, atol=1e-5, rtol=1e-5)
        means, logw, logstds = s.head_outputs(x, sigma, cond)
        mix = (logw.exp() * means).sum(1)
        b_t = s.teacher_proj_out.bias
        noise = (tr.proj_out_means.bias.view(4, 16, 4) - b_t.view(16, 4)).mean(0)     # (16, 2x2) mean over K
        assert torch.allclose(noise, noise[:, :1].expand(16, 4))                      # shared over sub-pixels
        expect = u_ref + noise.view(16, 1, 2, 1, 2).expand(16, 4, 2, 4, 2).reshape(16, 8, 8)
        torch.testing.assert_close(mix, expect, atol=1e-5, rtol=1e-5)
        assert 0.0 < (mix - u_ref).abs().max() < 4 * 0.05
        torch.testing.assert_close(logstds, torch.full_like(logstds, torch.tensor(0.05).log().item()))
        torch.testing.assert_close(logw, torch.full_like(logw, -torch.tensor(4.0).log().item()))
        pol = s(x, sigma, cond)                                      # the policy's velocity at its own source
        torch.testing.assert_close(pol.velocity(x, sigma), mix, atol=1e-4, rtol=1e-4)
        perturb_trainables(s, 5)                                     # LoRA, heads and norm_out move ...
        torch.testing.assert_close(s.teacher(x, sigma, cond), u_ref, atol=1e-5, rtol=1e-5)   # ... teacher doesn't
        assert (s(x, sigma, cond).velocity(x, sigma) - mix).abs().max() > 1e-3
    sd = T.T2IStudent(fresh(bases, model), model, "dx", N=5, lora_rank=4, lora_dropout=0.0).eval()
    with torch.no_grad():
        pol = sd(x, sigma, cond)
        assert isinstance(pol, piflow.DXPolicy) and pol.x0_grid.shape == (2, 5, 16, 8, 8)
        x0_ref = x - sigma.view(2, 1, 1, 1) * u_ref
        torch.testing.assert_close(pol.x0_grid, x0_ref[:, None].expand(2, 5, 16, 8, 8), atol=1e-5, rtol=1e-5)
        assert pol.segment_size == pytest.approx(1 / 3.5) and pol.shift == 3.2


def expected_lora(model, head, n_double, n_single):
    if model == "flux":
        names = [f"transformer_blocks.{i}.{m}" for i in range(n_double)
                 for m in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")]
        names += [f"single_transformer_blocks.{i}.{m}" for i in range(n_single) for m in ("proj_mlp", "proj_out")]
    else:
        names = [f"transformer_blocks.{i}.img_mlp.{m}" for i in range(n_double) for m in ("net.0.proj", "net.2")]
        names += [f"transformer_blocks.{i}.txt_mlp.{m}" for i in range(n_double - 1) for m in ("net.0.proj", "net.2")]
    return set(names + ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2"])


@pytest.mark.parametrize("model,head", [("flux", "gm"), ("flux", "dx"), ("qwen", "gm"), ("qwen", "dx")])
def test_lora_targets_and_trainables(bases, model, head):
    s = T.T2IStudent(fresh(bases, model), model, head, K=2, N=3, lora_rank=4)
    wrapped = {n for n, m in s.tr.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    exp = expected_lora(model, head, 1 if model == "flux" else 2, 1)
    assert wrapped == exp and len(wrapped) == 8             # FLUX 1+1 blocks: 4 ff + 2 single + 2 time; Qwen 2 blocks
    heads = ({"proj_out_means.weight", "proj_out_means.bias", "proj_out_logweights.weight", "proj_out_logweights.bias",
              "proj_out_logstds.1.weight", "proj_out_logstds.1.bias", "proj_out_logstds.3.weight",
              "proj_out_logstds.3.bias"} if head == "gm" else {"proj_out.weight", "proj_out.bias"})
    heads |= {"norm_out.linear.weight", "norm_out.linear.bias"}
    lora = {f"{n}.lora_{ab}.default.weight" for n in exp for ab in "AB"}
    assert set(s.trainable_named()) == heads | lora
    # LoRA semantics: alpha = r, so the wrapped layer computes x W^T + b + x A^T B^T
    name = sorted(exp)[0]
    m = s.tr.get_submodule(name)
    with torch.no_grad():
        m.lora_B["default"].weight.normal_()
        x = torch.randn(3, m.base_layer.in_features)
        W, b = m.base_layer.weight, m.base_layer.bias
        A, Bm = m.lora_A["default"].weight, m.lora_B["default"].weight
        m.eval()
        torch.testing.assert_close(m(x), x @ W.T + b + x @ A.T @ Bm.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model", ["flux", "qwen"])
def test_adapter_roundtrip_and_published_layout(bases, model, tmp_path):
    x, sigma, cond = torch.randn(2, 16, 8, 8), torch.tensor([0.4, 1.0]), make_cond(model, 2, 7)
    s = T.T2IStudent(fresh(bases, model), model, "gm", K=3, lora_rank=4, lora_dropout=0.0).eval()
    perturb_trainables(s, 11)
    with torch.no_grad():
        ref = s.head_outputs(x, sigma, cond)
    T.save_adapter(s, str(tmp_path / "ours"), dtype=None)
    with open(tmp_path / "ours" / "config.json") as f:
        c = json.load(f)
    assert c["_class_name"] == T.CLASS_NAMES[(model, "gm")] and c["num_gaussians"] == 3
    s2 = T.student_from_adapter(fresh(bases, model), model, str(tmp_path / "ours")).eval()
    assert s2.policy_config == {"type": "GMFlow"}
    with torch.no_grad():
        out = s2.head_outputs(x, sigma, cond)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))                   # bit-exact
    # a file written by hand in the published layout: 'transformer.' prefix, '.default' dropped, fp16, metadata
    pub = tmp_path / "pub"
    pub.mkdir()
    tensors = {}
    for n, p in s.tr.named_parameters():
        if p.requires_grad:
            tensors["transformer." + n.replace(".default.weight", ".weight")] = p.detach().half()
    assert any(k.endswith("lora_A.weight") for k in tensors) and "transformer.proj_out_means.weight" in tensors
    save_file(tensors, str(pub / "diffusion_pytorch_model.safetensors"), metadata={"policy_config": '{"type": "GMFlow"}'})
    with open(pub / "config.json", "w") as f:
        json.dump({"_class_name": T.CLASS_NAMES[(model, "gm")], "num_gaussians": 3}, f)
    s3 = T.student_from_adapter(fresh(bases, model), model, str(pub)).eval()
    with torch.no_grad():
        for (n, p) in s.trainable_named().items():
            p.copy_(p.half().float())
        ref16, out16 = s.head_outputs(x, sigma, cond), s3.head_outputs(x, sigma, cond)
    assert all(torch.equal(a, b) for a, b in zip(ref16, out16))
    # DX adapter: bit-exact reload, policy kwargs from the metadata
    d = T.T2IStudent(fresh(bases, model), model, "dx", N=3, lora_rank=4, lora_dropout=0.0).eval()
    perturb_trainables(d, 12)
    T.save_adapter(d, str(tmp_path / "dx"), dtype=None)
    d2 = T.student_from_adapter(fresh(bases, model), model, str(tmp_path / "dx")).eval()
    assert d2.head == "dx" and d2.N == 3 and d2.policy_config["type"] == "DX" and d2.policy_config["shift"] == 3.2
    with torch.no_grad():
        assert torch.equal(d(x, sigma, cond).x0_grid, d2(x, sigma, cond).x0_grid)


def test_piid_steps_reduce_loss(bases):
    """A few data-free pi-ID steps with trajectory mixing (ratio decaying) lower the loss on a fixed batch."""
    model = "flux"
    s = T.T2IStudent(fresh(bases, model), model, "gm", K=2, lora_rank=4, lora_dropout=0.0)
    cfg = piflow.PiIDConfig(nfe=2, shift=3.2, final_step_scale=0.5, total_substeps=16, num_intermediate=2,
                            window_substeps=3, gm_dropout=0.1, loss_scale=30.0, decay_iters=4)
    noise, cond = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)), make_cond(model, 2, 3)
    params = list(s.trainable_named().values())
    opt = torch.optim.Adam(params, lr=2e-3)

    def loss_at(step, backward=None):
        return float(piflow.piid_data_free(s, s.teacher, noise, cond, cfg, step,
                                           torch.Generator().manual_seed(1), backward=backward))
    with torch.no_grad():
        before = loss_at(2)
    for step in range(6):
        opt.zero_grad()
        loss_at(step, backward=lambda l: l.backward())
        opt.step()
    with torch.no_grad():
        after = loss_at(2)
    assert after < 0.7 * before, (before, after)


def _save_base(bases, model, root):
    fresh(bases, model).save_pretrained(os.path.join(root, "transformer"))
    return root


TRAIN_ARGS = ["--model", "flux", "--K", "2", "--lora_rank", "4", "--lora_dropout", "0", "--nfe", "2",
              "--resolution", "32", "--total_substeps", "16", "--batch_size", "2", "--micro_batch", "1", "--optimizer", "adamw",
              "--dtype", "fp32", "--num_intermediate", "1", "--decay_iters", "2", "--lr", "1e-3", "--warmup", "0",
              "--clip_start", "0", "--ema_start", "0", "--no_progress", "--log_every", "0", "--ckpt_every", "1"]


def _losses(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [float(v) for v in [l for l in f if l.startswith("losses")][-1].split()[1:]]


def test_train_resume_and_fsdp2_torchrun(bases, tmp_path):
    base = _save_base(bases, "flux", str(tmp_path / "base"))
    cache = embed_cache("flux", 4, str(tmp_path / "emb.pt"))
    common = TRAIN_ARGS + ["--base", base, "--embed_cache", cache]
    # single process: 1 step, atomic checkpoint, refuse to overwrite, resume to step 2
    T.main(common + ["--out", str(tmp_path / "b"), "--steps", "1"])
    assert os.path.isfile(tmp_path / "b" / "adapter" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(SystemExit, match="already holds ckpt.pt"):
        T.main(common + ["--out", str(tmp_path / "b"), "--steps", "2"])
    first = _losses(tmp_path / "b")
    T.main(common + ["--out", str(tmp_path / "b"), "--steps", "2", "--resume"])
    second = _losses(tmp_path / "b")
    assert len(first) == len(second) == 1 and all(v == v and v > 0 for v in first + second)
    # 2-process FSDP2 (gloo), 2 uninterrupted steps: same loss at step 1 and (after one sharded update) step 2
    env = dict(os.environ, PYTHONPATH=HERE, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "train_t2i.py")] + common + ["--out", str(tmp_path / "c"), "--steps", "2"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    dist_losses = _losses(tmp_path / "c")
    assert dist_losses[0] == pytest.approx(first[0], rel=1e-5)
    assert dist_losses[1] == pytest.approx(second[0], rel=1e-4)
    assert dist_losses[1] != dist_losses[0]


@pytest.mark.parametrize("model", ["flux", "qwen"])
def test_sampler_cli(bases, model, tmp_path):
    base = _save_base(bases, model, str(tmp_path / "base"))
    tiny_vae(model).save_pretrained(os.path.join(base, "vae"))
    s = T.T2IStudent(fresh(bases, model), model, "gm", K=2, lora_rank=4, lora_dropout=0.0).eval()
    perturb_trainables(s, 2)
    T.save_adapter(s, str(tmp_path / "ad"))
    with torch.no_grad():
        x0 = piflow.sample(s, torch.randn(1, 16, 6, 4), make_cond(model, 1), 4, 3.2, 0.5, 0.3, 16)
    assert torch.isfinite(x0).all()
    cache = embed_cache(model, 2, str(tmp_path / "emb.pt"))
    paths = T.sample_cli(["--model", model, "--adapter", str(tmp_path / "ad"), "--base", base, "--embed_cache",
                          cache, "--height", "48", "--width", "32", "--nfe", "2", "--total_substeps", "16",
                          "--batch", "2", "--out", str(tmp_path / "png")])
    from PIL import Image
    assert len(paths) == 2
    for p in paths:
        im = Image.open(p)
        assert im.size == (32, 48) and im.mode == "RGB"


def test_bad_input_fails_before_loading(bases, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("heavy loading reached")
    for name in ("load_transformer", "load_vae", "encode_prompts"):
        monkeypatch.setattr(T, name, boom)
    s = T.T2IStudent(fresh(bases, "flux"), "flux", "gm", K=2, lora_rank=4)
    T.save_adapter(s, str(tmp_path / "flux_ad"))
    ok = ["--adapter", str(tmp_path / "flux_ad"), "--prompt", "a cat"]
    with pytest.raises(SystemExit):
        T.sample_cli(["--model", "sd3"] + ok)
    assert "invalid choice: 'sd3'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is a flux adapter .* --model='qwen'"):
        T.sample_cli(["--model", "qwen"] + ok)
    with pytest.raises(SystemExit, match="--guidance=4.0.*3.5.*--force"):
        T.sample_cli(["--model", "flux", "--guidance", "4"] + ok)
    with pytest.raises(SystemExit, match="--height=1000 is not a positive multiple of 16"):
        T.sample_cli(["--model", "flux", "--height", "1000"] + ok)
    with pytest.raises(SystemExit, match="--resolution=1000"):
        T.parse_args(["--model", "flux", "--resolution", "1000", "--prompts", __file__, "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown adapter class"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
        T.sample_cli(["--model", "flux", "--adapter", str(tmp_path / "bad"), "--prompt", "x"])


def test_data_dependent_folder(bases, tmp_path, monkeypatch):
    """Image+caption folder -> VAE latents cached once -> data-dependent pi-ID (Alg. 2) runs."""
    from PIL import Image
    base = _save_base(bases, "flux", str(tmp_path / "base"))
    vae = tiny_vae("flux")
    vae.save_pretrained(os.path.join(base, "vae"))
    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 32, 32, 3), generator=g, dtype=torch.uint8)
    for i in range(2):
        Image.fromarray(pixels[i].numpy()).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"caption {i}")
    seen = []

    def fake_encode(model, base, prompts, device, dtype, max_len=512, batch=8):   # no text encoders offline
        seen.extend(prompts)
        return {k: v for k, v in make_cond("flux", len(prompts)).items() if k != "guidance"}
    monkeypatch.setattr(T, "encode_prompts", fake_encode)
    args = [a for a in TRAIN_ARGS] + ["--base", base, "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1"]
    T.main(args)
    assert seen == ["caption 0", "caption 1"]
    emb = torch.load(tmp_path / "run" / "embeds.pt")
    with torch.no_grad():
        z = vae.encode(pixels.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mode()
    torch.testing.assert_close(emb["latents"], (z - 0.1159) * 0.3611, atol=1e-4, rtol=1e-4)
    assert "data-dependent" in open(tmp_path / "run" / "log.txt").read()
    assert all(v == v and v > 0 for v in _losses(tmp_path / "run"))
