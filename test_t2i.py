"""Tests of t2i.py / train_t2i.py / sample.py --model flux|qwen on tiny random-weight diffusers models (CPU, offline).

Ground truth comes from the stock diffusers classes with the latent packing written out as loops here, from the
published file layout, and from piflow.sample + the VAE decode recomputed in the test.
"""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)

import diffusers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import piflow  # noqa: E402
import sample  # noqa: E402
import t2i  # noqa: E402
import train_t2i  # noqa: E402
import trainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
F32 = torch.float32


@pytest.fixture(autouse=True, scope="module")
def flush_denormals():
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def tiny_transformer(model, seed=0):
    torch.manual_seed(seed)
    if model == "flux":
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def tiny_vae(model):
    torch.manual_seed(1)
    if model == "flux":
        return diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=16,
            norm_num_groups=4, layers_per_block=1, scaling_factor=0.3611, shift_factor=0.1159)
    return diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                            temperal_downsample=[False, False, False])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{model: a diffusers folder with transformer/ and vae/} (safetensors, as save_pretrained writes them)."""
    root = tmp_path_factory.mktemp("bases")
    for m in ("flux", "qwen"):
        tiny_transformer(m).save_pretrained(str(root / m / "transformer"))
        tiny_vae(m).save_pretrained(str(root / m / "vae"))
    return {m: str(root / m) for m in ("flux", "qwen")}


def make_cache(model, P, seed=0, L=7):
    """A prompt cache in t2i's documented layout; Qwen prompts have different valid lengths (zero padding)."""
    g = torch.Generator().manual_seed(seed)
    c = {"prompts": [f"prompt {i}" for i in range(P)], "model": model, "max_text_len": L,
         "prompt_embeds": torch.randn(P, L, 32, generator=g)}
    if model == "flux":
        c["pooled"] = torch.randn(P, 24, generator=g)
    else:
        c["mask"] = torch.ones(P, L, dtype=torch.long)
        for i in range(P):
            c["mask"][i, L - 1 - i % 3:] = 0
        c["prompt_embeds"] *= c["mask"][..., None]
        c["negative_embeds"] = torch.randn(1, L, 32, generator=g)
        c["negative_mask"] = (torch.arange(L) < 3).long()[None]
        c["negative_embeds"] *= c["negative_mask"][..., None]
    return c


def save_cache(c, path):
    torch.save(c, str(path))
    return str(path)


def cond_of(model, c, idx, guidance=3.5):
    return t2i.make_cond(t2i.FAMILIES[model], c, torch.as_tensor(idx), "cpu", guidance)


def reference_u(ref, model, x, sigma, cond):
    """Independent teacher: the stock model on tokens packed with explicit loops, channel = c*4 + ph*2 + pw
    (integration.md §2.2), the whole padded text with its mask."""
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
        out = ref(hidden_states=packed, encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled"],
                  timestep=sigma, img_ids=ids, txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
                  guidance=cond["guidance"]).sample
    else:
        out = ref(hidden_states=packed, encoder_hidden_states=cond["prompt_embeds"],
                  encoder_hidden_states_mask=cond["mask"], timestep=sigma, img_shapes=[[(1, h, w)]] * B).sample
    u = torch.empty(B, C, H, W)
    for i in range(h):
        for j in range(w):
            for c in range(C):
                for ph in range(2):
                    for pw in range(2):
                        u[:, c, 2 * i + ph, 2 * j + pw] = out[:, i * w + j, c * 4 + ph * 2 + pw]
    return u


def student(model, tr, policy="gm", K=3, N=3, rank=4, dropout=0.0, nfe=4):
    opts = t2i.Options(model=model, policy=policy, K=K, N=N, lora_rank=rank, lora_dropout=dropout)
    return t2i.new_student(opts, piflow.PiIDConfig(nfe=nfe, shift=3.2, final_step_scale=0.5), tr, F32)


def perturb(s, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in s.trainable().values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def one_line_error(capsys, fn, code=2):
    """fn() exits with `code` and prints exactly one non-empty line on stderr (argparse's own errors: its usage
    block, then one error line); returns the error line."""
    with pytest.raises(SystemExit) as e:
        fn()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    if lines and lines[0].startswith("usage:"):
        lines = lines[-1:] if all(ln.startswith(" ") for ln in lines[1:-1]) else lines
    assert e.value.code == code and len(lines) == 1, (e.value.code, lines)
    return lines[0]


@pytest.mark.parametrize("model", ["flux", "qwen"])
def test_head_init_and_teacher(model):
    """GM means = the teacher's proj_out applied to the features, repeated K times in (k, c, ph, pw) order + bias
    noise per (k, c); uniform weights, s = 0.05; the DX grid is the teacher K times; LoRA / head / norm_out
    perturbations move the student but never the teacher."""
    tr = tiny_transformer(model)
    ref = copy.deepcopy(tr).eval()
    feats = {}
    ref.proj_out.register_forward_pre_hook(lambda m, a: feats.update(h=a[0]))
    K, s = 3, student(model, tr).eval()
    x, sigma = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.9])
    cond = cond_of(model, make_cache(model, 2), [0, 1])
    with torch.no_grad():
        u_ref = reference_u(ref, model, x, sigma, cond)
        torch.testing.assert_close(s.teacher(x, sigma, cond), u_ref, atol=1e-6, rtol=1e-5)
        pol = s(x, sigma, cond)
        W, b = ref.proj_out.weight, ref.proj_out.bias                                  # (64, D), (64,)
        noise = (tr.proj_out_means.bias.view(K, 64) - b).view(K, 16, 4)
        torch.testing.assert_close(noise, noise[:, :, :1].expand(K, 16, 4), atol=1e-7, rtol=0)   # shared by 2x2
        assert 0 < noise.abs().max() < 4 * 0.05
        means = torch.empty(2, K, 16, 4, 6)
        for i in range(2):
            for j in range(3):
                for k in range(K):
                    for c in range(16):
                        for ph in range(2):
                            for pw in range(2):
                                r = c * 4 + ph * 2 + pw
                                means[:, k, c, 2 * i + ph, 2 * j + pw] = feats["h"][:, i * 3 + j] @ W[r] + b[r] + \
                                    noise[k, c, 0]
        torch.testing.assert_close(pol.means_x, x[:, None] - sigma.view(2, 1, 1, 1, 1) * means, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pol.logweights, torch.full((2, K, 1, 4, 6), -torch.tensor(K * 1.0).log().item()))
        torch.testing.assert_close(pol.var_x.flatten(), (0.05 * sigma) ** 2)
        perturb(s, 5)
        torch.testing.assert_close(s.teacher(x, sigma, cond), u_ref, atol=1e-6, rtol=1e-5)
        assert (s(x, sigma, cond).means_x - pol.means_x).abs().max() > 1e-3
        d = student(model, tiny_transformer(model), "dx", N=3).eval()
        pd = d(x, sigma, cond)
        x0 = x - sigma.view(2, 1, 1, 1) * u_ref
        torch.testing.assert_close(pd.x0_grid, x0[:, None].expand(2, 3, 16, 4, 6), atol=1e-5, rtol=1e-5)
        assert pd.segment_size == pytest.approx(1 / 3.5) and pd.shift == 3.2
        perturb(d, 6)
        torch.testing.assert_close(d.teacher(x, sigma, cond), u_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model,policy", [("flux", "gm"), ("flux", "dx"), ("qwen", "gm")])
def test_lora_targets_and_published_names(model, policy):
    """The published LoRA targets (integration.md §3.2) with alpha = r; trainables under the published names."""
    s = student(model, tiny_transformer(model), policy, K=2, N=3, rank=4)
    wrapped = {n for n, m in s.tr.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    if model == "flux":
        exp = {f"transformer_blocks.0.{m}" for m in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                    "ff_context.net.2")}
        exp |= {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"}
    else:                                                     # 2 blocks; the last block's txt_mlp is left out
        exp = {f"transformer_blocks.{i}.img_mlp.{m}" for i in range(2) for m in ("net.0.proj", "net.2")}
        exp |= {f"transformer_blocks.0.txt_mlp.{m}" for m in ("net.0.proj", "net.2")}
    exp |= {"time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2"}
    assert wrapped == exp
    heads = {"proj_out_means.weight", "proj_out_means.bias", "proj_out_logweights.weight", "proj_out_logweights.bias",
             "proj_out_logstds.1.weight", "proj_out_logstds.1.bias", "proj_out_logstds.3.weight",
             "proj_out_logstds.3.bias"} if policy == "gm" else {"proj_out.weight", "proj_out.bias"}
    names = heads | {"norm_out.linear.weight", "norm_out.linear.bias"} | {f"{n}.lora_{ab}.weight" for n in exp
                                                                          for ab in "AB"}
    assert set(s.trainable(train=True)) == names
    assert {n for n, p in s.tr.named_parameters() if p.requires_grad} == {
        n.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.") for n in names}
    m = s.tr.get_submodule(sorted(exp)[0])
    with torch.no_grad():
        m.lora_B["default"].weight.normal_()
        x = torch.randn(3, m.base_layer.in_features)
        A, Bm = m.lora_A["default"].weight, m.lora_B["default"].weight
        torch.testing.assert_close(m(x), m.base_layer(x) + x @ A.T @ Bm.T, atol=1e-5, rtol=1e-5)


def test_teacher_is_the_stock_model_and_piid_steps_reduce_loss():
    """π-ID with the attachment's teacher == π-ID with the independent stock-model teacher (same states, same
    generator), at the start and after training; 6 Adam steps then lower the loss on a fixed batch."""
    tr = tiny_transformer("flux")
    ref = copy.deepcopy(tr).eval()
    s = student("flux", tr, K=2, nfe=2)
    cfg = piflow.PiIDConfig(nfe=2, shift=3.2, final_step_scale=0.5, total_substeps=16, num_intermediate=2,
                            window_substeps=3, gm_dropout=0.1, loss_scale=30.0, decay_iters=4)
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = cond_of("flux", make_cache("flux", 2, seed=3), [0, 1])
    ref_teacher = lambda x, sigma, c: reference_u(ref, "flux", x, sigma, c)

    def loss(step, teacher=s.teacher, backward=None):
        return float(piflow.piid_data_free(s, teacher, noise, cond, cfg, step, torch.Generator().manual_seed(1),
                                           backward=backward))
    with torch.no_grad():
        before = loss(2)
        assert before == pytest.approx(loss(2, ref_teacher), rel=1e-5, abs=0)
    opt = torch.optim.Adam(list(s.trainable(train=True).values()), lr=2e-3)
    for step in range(6):
        opt.zero_grad()
        loss(step, backward=lambda l: l.backward())
        opt.step()
    with torch.no_grad():
        after = loss(2)
        assert after == pytest.approx(loss(2, ref_teacher), rel=1e-5, abs=0)
    assert after < 0.7 * before, (before, after)


TRAIN = ["--K", "2", "--lora-rank", "4", "--lora-dropout", "0.1", "--nfe", "2", "--resolution", "32",
         "--total-substeps", "16", "--num-intermediate", "1", "--batch-size", "2", "--micro-batch", "1", "--lr", "1e-3",
         "--warmup", "1", "--clip-start", "0", "--ema-start", "0", "--ema-gamma", "0.5", "--decay-iters", "2",
         "--dtype", "fp32", "--no-progress", "--log-every", "0", "--eval-every", "0", "--ckpt-every", "0",
         "--threads", "1"]


def train_args(model, base, cache, out, steps, *extra):
    return ["--model", model, "--base", base, "--embed-cache", cache, "--out", str(out), "--steps", str(steps)] + \
        TRAIN + list(extra)


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def adam_moments(ck):
    """[(exp_avg, exp_avg_sq)] in optimizer order, whatever the keys (ids or FQNs) of the saved state."""
    order = ck["opt"]["param_groups"][0]["params"]
    return [(ck["opt"]["state"][k]["exp_avg"], ck["opt"]["state"][k]["exp_avg_sq"]) for k in order]


def test_fsdp2_torchrun_then_single_process_resume_equals_one_run(bases, tmp_path):
    """3 steps in one process == 2 steps under 2-process FSDP2 torchrun + 1 resumed step in one process: student,
    EMA and Adam moments agree up to float summation order (a resume without the optimizer state or the EMA,
    or FSDP2 gradients that differ, are off by orders of magnitude more)."""
    cache = save_cache(make_cache("flux", 4), tmp_path / "emb.pt")
    one, two = tmp_path / "one", tmp_path / "two"
    train_t2i.main(train_args("flux", bases["flux"], cache, one, 3))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "train_t2i.py")] + train_args("flux", bases["flux"], cache, two, 2),
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    mid = ckpt(two)
    assert "world 2" in (two / "log.txt").read_text() and mid["step"] == 2
    train_t2i.main(train_args("flux", bases["flux"], cache, two, 3, "--resume"))
    a, b = ckpt(one), ckpt(two)
    assert a["step"] == b["step"] == 3
    step = max((mid["student"][k] - b["student"][k]).abs().max().item() for k in b["student"])   # one step's move
    assert step > 1e-4
    diff = lambda x, y: (x - y).abs().max().item()
    for key in ("student", "ema"):
        assert set(a[key]) == set(b[key])
        worst = max(diff(a[key][k], b[key][k]) for k in a[key])
        assert worst < 1e-3 * step, (key, worst, step)
    ma, mb = adam_moments(a), adam_moments(b)
    assert len(ma) == len(mb) == len(a["student"])
    for (m1, v1), (m2, v2) in zip(ma, mb):
        assert diff(m1, m2) <= 1e-4 * m1.abs().max().item() and diff(v1, v2) <= 1e-4 * v1.abs().max().item()
    # the export is the EMA, in fp16, in the published layout with our schedule
    with safe_open(str(two / "adapter" / t2i.WEIGHTS), "pt") as f:
        meta, exported = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert set(exported) == set(b["ema"]) and all(torch.equal(exported[k], b["ema"][k].half()) for k in exported)
    assert json.loads(meta["piid_config"])["nfe"] == 2 and json.loads(meta["policy_config"]) == {"type": "GMFlow"}


@pytest.mark.parametrize("model", ["flux", "qwen"])
def test_sample_cli_pixels_recomputed(bases, model, tmp_path, monkeypatch):
    """sample.py --model flux|qwen (an adapter fetched as owner/repo:subfolder, 'auto' temperature, --threads):
    image i == piflow.sample from noise seeded seed + i with prompt i, decoded with the VAE's own
    de-normalisation written out here, pixel for pixel, in the grid's PNGs too."""
    from PIL import Image
    import huggingface_hub
    s = student(model, tiny_transformer(model), K=2, nfe=2)
    perturb(s, 2)
    ad = tmp_path / "adapter"
    ad.mkdir()
    t2i.write_adapter(str(ad), s, {k: v.half() for k, v in s.trainable().items()},
                      piflow.PiIDConfig(nfe=2, shift=3.2, final_step_scale=0.5))
    calls = []

    def fake_download(repo, filename, subfolder=None, **kw):
        calls.append((repo, filename, subfolder))
        return str(ad / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    c = make_cache(model, 3, seed=4)
    cache = save_cache(c, tmp_path / "emb.pt")
    out = tmp_path / "grid.png"
    argv = ["--model", model, "--adapter", "someone/pi-adapters:tiny", "--base", bases[model], "--embed-cache", cache,
            "--height", "32", "--width", "48", "--batch-size", "2", "--seed", "7", "--out", str(out), "--threads", "2"]
    try:
        res = sample.main(argv + (["--temperature", "auto"] if model == "flux" else []))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert set(calls) == {("someone/pi-adapters", f, "tiny") for f in ("config.json", t2i.WEIGHTS)}
    assert res["nfe"] == 2 and "temperature 0.1" in res["title"]               # auto = 0.1 (NFE - 1)
    ref, _, _, _ = t2i.student_from_adapter(model, tiny_transformer(model), str(ad), "--adapter", F32)
    vae = tiny_vae(model).eval()
    expect = []
    with torch.no_grad():
        for idx in ([0, 1], [2]):
            noise = torch.cat([torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(7 + i)) for i in idx])
            x = piflow.sample(ref, noise, cond_of(model, c, idx), temperature=0.1,
                              cfg=piflow.PiIDConfig(nfe=2, shift=3.2, final_step_scale=0.5))
            if model == "flux":
                img = vae.decode(x / 0.3611 + 0.1159).sample
            else:
                mean, std = (torch.tensor(getattr(vae.config, k)).view(1, 16, 1, 1) for k in ("latents_mean",
                                                                                          "latents_std"))
                img = vae.decode((x * std + mean)[:, :, None]).sample[:, :, 0]
            expect += list(((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    assert len(res["images"]) == 3 and res["row_labels"] == c["prompts"]
    for i in range(3):
        assert (res["images"][i] == expect[i]).all(), i
        assert (torch.from_numpy(expect[i]).numpy() == Image.open(tmp_path / "grid" / f"{i:05d}.png")).all()
    assert len({e.tobytes() for e in expect}) == 3
    assert Image.open(out).size[1] > 3 * 32


def write_gm_adapter(folder, model, K=2, inner=1024, layers=2, constant=None, seed=0, rank=4, prefix=""):
    """A GM adapter written the way the official exporter does (no piid_config): config.json with the head sizes
    and random tensors of the shapes the published class has for that config."""
    tr = tiny_transformer(model)
    cfg = {k: v for k, v in tr.config.items() if not k.startswith("_")}
    cfg = json.loads(json.dumps(cfg, default=list))
    cfg.update(_class_name=t2i.FAMILIES[model].gm_class, num_gaussians=K, logstd_inner_dim=inner,
               gm_num_logstd_layers=layers, constant_logstd=constant, logweights_channels=4)
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: (torch.randn(*shape, generator=g) * 0.1).half()
    D = 32
    t = {"proj_out_means.weight": r(K * 64, D), "proj_out_means.bias": r(K * 64), "norm_out.linear.weight": r(2 * D, D),
         "proj_out_logweights.weight": r(K * 4, D), "proj_out_logweights.bias": r(K * 4),
         "norm_out.linear.bias": r(2 * D)}
    if constant is None:
        dims = [D] + [inner] * (layers - 1) + [1]
        for i in range(layers):
            t[f"proj_out_logstds.{2 * i + 1}.weight"], t[f"proj_out_logstds.{2 * i + 1}.bias"] = \
                r(dims[i + 1], dims[i]), r(dims[i + 1])
    for name in t2i.FAMILIES[model].lora(tr, "gm") if rank else []:
        for n, m in tr.named_modules():
            if isinstance(m, torch.nn.Linear) and n.endswith("." + name):          # not the root proj_out
                t[f"{n}.lora_A.weight"], t[f"{n}.lora_B.weight"] = r(rank, m.in_features), r(m.out_features, rank)
    os.makedirs(folder, exist_ok=True)
    save_file({prefix + k: v for k, v in t.items()}, os.path.join(folder, t2i.WEIGHTS),
              metadata={"policy_config": '{"type": "GMFlow"}'})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return t


def test_published_and_nondefault_adapter_configs(tmp_path):
    """An adapter whose config.json asks for logstd_inner_dim 32 / 3 logstd layers (and one with a constant
    logstd) loads; its logstds equal the MLP written out on the stock model's temb; our adapter_config writes
    the real sizes; a 'transformer.'-prefixed published file without piid_config gets the published schedule."""
    t = write_gm_adapter(str(tmp_path / "a"), "flux", inner=32, layers=3, prefix="transformer.", rank=0)
    s, head, rank, cfg = t2i.student_from_adapter("flux", tiny_transformer("flux"), str(tmp_path / "a"), "--adapter",
                                                  F32)
    assert (head.logstd_inner_dim, head.logstd_layers, rank) == (32, 3, 0)
    assert (cfg.nfe, cfg.shift, cfg.final_step_scale) == (4, 3.2, 0.5)
    c = t2i.adapter_config(s)
    assert (c["logstd_inner_dim"], c["gm_num_logstd_layers"], c["num_gaussians"], c["_class_name"]) == \
        (32, 3, 2, "GMFluxTransformer2DModel") and "patch_size" not in c
    ref = tiny_transformer("flux")
    x, sigma = torch.randn(2, 16, 4, 4), torch.tensor([0.5, 0.8])
    cond = cond_of("flux", make_cache("flux", 2), [0, 1])
    with torch.no_grad():
        pol = s.eval()(x, sigma, cond)
        temb = ref.time_text_embed(sigma * 1000, cond["guidance"] * 1000, cond["pooled"])   # FLUX's forward
        h = temb
        for i in (1, 3, 5):
            h = torch.nn.functional.silu(h) @ t[f"proj_out_logstds.{i}.weight"].float().T + \
                t[f"proj_out_logstds.{i}.bias"].float()
        torch.testing.assert_close(pol.var_x.flatten(), (h.flatten() * 2).exp() * sigma ** 2, atol=1e-6, rtol=1e-5)
    write_gm_adapter(str(tmp_path / "b"), "qwen", constant=-2.0)
    q, head, _, _ = t2i.student_from_adapter("qwen", tiny_transformer("qwen"), str(tmp_path / "b"), "--adapter", F32)
    assert head.constant_logstd == -2.0 and not hasattr(q.tr, "proj_out_logstds")
    with torch.no_grad():
        pol = q.eval()(x, sigma, cond_of("qwen", make_cache("qwen", 2), [0, 1]))
    torch.testing.assert_close(pol.var_x.flatten(), torch.tensor(-4.0).exp() * sigma ** 2)
    # our own GM-FLUX and DX-Qwen adapters: exported at fp16, reloaded bit for bit, DX policy kwargs from metadata
    for model, policy in (("flux", "gm"), ("qwen", "dx")):
        a = student(model, tiny_transformer(model), policy, K=2, N=3).eval()
        perturb(a, 3)
        with torch.no_grad():
            for p in a.trainable().values():
                p.copy_(p.half().float())
        (tmp_path / policy).mkdir()
        t2i.write_adapter(str(tmp_path / policy), a, {k: v.half() for k, v in a.trainable().items()},
                          piflow.PiIDConfig(nfe=4, shift=3.2, final_step_scale=0.5))
        b, head, _, cfg = t2i.student_from_adapter(model, tiny_transformer(model), str(tmp_path / policy), "--adapter",
                                                   F32)
        assert (cfg.nfe, cfg.shift, cfg.final_step_scale) == (4, 3.2, 0.5) and b.policy_config == a.policy_config
        cond = cond_of(model, make_cache(model, 2), [0, 1])
        with torch.no_grad():
            pa, pb = a(x, sigma, cond), b.eval()(x, sigma, cond)
        if policy == "gm":
            assert torch.equal(pa.means_x, pb.means_x) and torch.equal(pa.logweights, pb.logweights)
        else:
            assert torch.equal(pa.x0_grid, pb.x0_grid) and head.N == 3
            c = json.load(open(tmp_path / policy / "config.json"))
            assert (c["_class_name"], c["patch_size"], c["out_channels"]) == ("DXQwenImageTransformer2DModel", 1, 192)
            assert b.policy_config == {"segment_size": pytest.approx(1 / 3.5), "shift": 3.2, "type": "DX"}


def test_qwen_training_cfg_negative_init_adapter_ema_export(bases, tmp_path):
    """Qwen: the teacher is CFG 4 with the cached empty-prompt negative (checked against the stock model); the
    student starts from --init-adapter; the exported adapter is the EMA in fp16, not the raw student."""
    t = write_gm_adapter(str(tmp_path / "init"), "qwen")
    c = make_cache("qwen", 4, seed=2)
    cache = save_cache(c, tmp_path / "emb.pt")
    argv = train_args("qwen", bases["qwen"], cache, tmp_path / "run", 2, "--guidance", "4", "--init-adapter",
                      str(tmp_path / "init"))
    args, cfg, tc, opts, settings, _ = trainer.parse("train_t2i.py", argv, "model", train_t2i.MODELS,
                                                     train_t2i.DEFAULT_PRESET, "")
    att = t2i.attach(opts, cfg, tc, settings, torch.device("cpu"), F32)
    assert all(torch.equal(p.detach(), t[k].float()) for k, p in att.trainable().items()) and \
        set(att.trainable()) == set(t)
    ref = tiny_transformer("qwen").eval()
    x, sigma = torch.randn(2, 16, 4, 4), torch.tensor([0.4, 0.9])
    pos = cond_of("qwen", c, [1, 2])
    neg = {"prompt_embeds": c["negative_embeds"].expand(2, -1, -1), "mask": c["negative_mask"].expand(2, -1)}
    with torch.no_grad():
        u_pos, u_neg = reference_u(ref, "qwen", x, sigma, pos), reference_u(ref, "qwen", x, sigma, neg)
        torch.testing.assert_close(att.teacher(x, sigma, pos), u_neg + 4 * (u_pos - u_neg), atol=1e-5, rtol=1e-5)
    att, ema = train_t2i.main(argv)
    ck = ckpt(tmp_path / "run")
    with safe_open(str(tmp_path / "run" / "adapter" / t2i.WEIGHTS), "pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
    assert set(exported) == set(t) and all(torch.equal(exported[k], ck["ema"][k].half()) for k in exported)
    assert any(not torch.equal(exported[k], ck["student"][k].half()) for k in exported)
    assert json.load(open(tmp_path / "run" / "adapter" / "config.json"))["_class_name"] == \
        "GMQwenImageTransformer2DModel"


def test_exploding_lr_never_writes_nonfinite_and_keeps_the_good_checkpoint(bases, tmp_path, capsys):
    """--lr 1e6 from step 0 (--overwrite over a good run): exit 3 after --max-skips bad steps; ckpt.pt and the
    adapter are byte for byte the good run's; nothing written holds a non-finite value."""
    cache = save_cache(make_cache("flux", 4), tmp_path / "emb.pt")
    out = tmp_path / "run"
    train_t2i.main(train_args("flux", bases["flux"], cache, out, 1))
    files = lambda: {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
                     and p.name not in ("log.txt", ".lock")}
    good, link = files(), os.readlink(out / "adapter")
    argv = train_args("flux", bases["flux"], cache, out, 6, "--lr", "1e6", "--warmup", "0", "--max-skips", "2",
                      "--ckpt-every", "1", "--overwrite")
    assert "stopped after 2 bad steps in a row" in one_line_error(capsys, lambda: train_t2i.main(argv), code=3)
    assert files() == good and os.readlink(out / "adapter") == link
    for name in good:
        if name.endswith(".pt"):
            ck = torch.load(out / name, weights_only=True)
            tensors = list(ck["student"].values()) + list(ck["ema"].values())
        elif name.endswith(".safetensors"):
            with safe_open(str(out / name), "pt") as f:
                tensors = [f.get_tensor(k) for k in f.keys()]
        else:
            continue
        assert tensors and all(torch.isfinite(v.float()).all() for v in tensors)


class Payload:
    """Unpickling this creates the marker file: the proof that a loader ran pickle code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payloads_are_never_unpickled(bases, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"prompt_embeds": Payload(str(marker))}, str(evil))
    cache = save_cache(make_cache("flux", 2), tmp_path / "emb.pt")
    s = student("flux", tiny_transformer("flux"), K=2)
    (tmp_path / "ad").mkdir()
    t2i.write_adapter(str(tmp_path / "ad"), s, {k: v.half() for k, v in s.trainable().items()}, piflow.PiIDConfig())
    bad_ad = tmp_path / "bad_ad"                                      # pickle bytes under the safetensors name
    shutil.copytree(tmp_path / "ad", bad_ad)
    shutil.copy(evil, bad_ad / t2i.WEIGHTS)
    bad_base = tmp_path / "bad_base"                                  # a base whose weights are a pickle .bin
    shutil.copytree(bases["flux"], bad_base)
    os.remove(bad_base / "transformer" / "diffusion_pytorch_model.safetensors")
    shutil.copy(evil, bad_base / "transformer" / "diffusion_pytorch_model.bin")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(evil, run / "ckpt.pt")
    smp = lambda *a: sample.main(["--model", "flux", "--height", "16", "--width", "16", "--out",
                                  str(tmp_path / "o.png")] + list(a))
    cases = [
        (lambda: smp("--embed-cache", str(evil), "--adapter", str(tmp_path / "ad"), "--base", bases["flux"]),
         "needs unpickling"),
        (lambda: smp("--adapter", str(evil), "--base", bases["flux"], "--embed-cache", cache),
         "expected an adapter folder"),
        (lambda: smp("--adapter", str(bad_ad), "--base", bases["flux"], "--embed-cache", cache), "not a readable"),
        (lambda: smp("--adapter", str(tmp_path / "ad"), "--base", str(bad_base), "--embed-cache", cache), "--base="),
        (lambda: train_t2i.main(train_args("flux", bases["flux"], str(evil), tmp_path / "r1", 1)), "needs unpickling"),
        (lambda: train_t2i.main(train_args("flux", bases["flux"], cache, run, 2, "--resume")), "needs unpickling"),
        (lambda: train_t2i.main(train_args("flux", bases["flux"], cache, tmp_path / "r2", 1, "--init-adapter",
                                           str(evil))), "expected an adapter folder")]
    for fn, says in cases:
        assert says in one_line_error(capsys, fn)
        assert not marker.exists()


def test_bad_input_one_line_before_loading(bases, tmp_path, capsys, monkeypatch):
    """User errors give one line and exit 2 before any model or text encoder is loaded."""
    def heavy(*a, **k):
        raise AssertionError("heavy loading reached")
    monkeypatch.setattr(t2i, "load_pretrained", heavy)
    monkeypatch.setattr(t2i, "encode_prompts", heavy)
    flux_ad, qwen_ad = tmp_path / "flux_ad", tmp_path / "qwen_ad"
    write_gm_adapter(str(flux_ad), "flux")
    write_gm_adapter(str(qwen_ad), "qwen")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    out = str(tmp_path / "o.png")
    smp = lambda *a: sample.main(["--prompt", "a cat", "--out", out] + list(a))
    trn = lambda *a: train_t2i.main(["--out", str(tmp_path / "run"), "--no-progress"] + list(a))
    cases = [(lambda: smp("--model", "flux", "--adapter", str(qwen_ad)), "is a qwen adapter"),
             (lambda: smp("--model", "flux", "--adapter", str(tmp_path / "unet")), "unknown adapter class"),
             (lambda: smp("--model", "flux", "--adapter", str(flux_ad), "--guidance", "4"), "--guidance=4.0"),
             (lambda: smp("--model", "qwen", "--adapter", str(qwen_ad), "--height", "1000"), "--height=1000"),
             (lambda: smp("--model", "qwen", "--adapter", str(qwen_ad), "--prompts", str(tmp_path / "no.txt")),
              "--prompts="),
             (lambda: trn("--model", "flux"), "give --prompts"),
             (lambda: trn("--model", "flux", "--resolution", "1000", "--prompts", out), "--resolution=1000"),
             (lambda: trn("--model", "qwen", "--prompts", __file__, "--init-adapter", str(flux_ad)),
              "is a flux adapter"),
             (lambda: trn("--model", "flux", "--prompts", __file__, "--init-adapter", str(flux_ad)), "--K 2"),
             (lambda: trn("--model", "flux", "--prompts", __file__, "--init-adapter", str(flux_ad), "--K", "2"),
              "--lora-rank=256 differs from --init-adapter's LoRA rank 4"),
             (lambda: trn("--model", "qwen", "--prompts", str(tmp_path / "no.txt")), "--prompts=")]
    for fn, says in cases:
        assert says in one_line_error(capsys, fn)


def test_hub_offline_one_line(bases, tmp_path, capsys, monkeypatch):
    """An unreachable hub adapter or base gives one line naming the flag (HF_HUB_OFFLINE=1: the real hub code)."""
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)     # whatever was imported before
    out = str(tmp_path / "o.png")
    line = one_line_error(capsys, lambda: sample.main(["--model", "flux", "--prompt", "a cat", "--out", out]))
    assert "--adapter='Lakonik/pi-FLUX.1:gmflux_k8_piid_4step': cannot fetch config.json" in line
    write_gm_adapter(str(tmp_path / "ad"), "flux")
    cache = save_cache(make_cache("flux", 1), tmp_path / "emb.pt")
    line = one_line_error(capsys, lambda: sample.main(["--model", "flux", "--adapter", str(tmp_path / "ad"),
                                                       "--embed-cache", cache, "--out", out]))
    assert "--base='black-forest-labs/FLUX.1-dev': cannot load FluxTransformer2DModel" in line


def test_data_folder_latents_and_data_dependent_step(bases, tmp_path, monkeypatch):
    """--data images + captions -> the cache holds (z - shift) * scale of the VAE mode and the captions in file
    order; a data-dependent π-ID run (Alg. 2) trains on them."""
    from PIL import Image
    data = tmp_path / "data"
    data.mkdir()
    px = torch.randint(0, 256, (2, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for i in range(2):
        Image.fromarray(px[i].numpy()).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"caption {i}")
    seen = []

    def fake_encode(fam, base, prompts, device, dtype, max_len, negative=False):        # no text encoders offline
        seen.extend(prompts)
        c = make_cache("flux", len(prompts))
        return {"prompt_embeds": c["prompt_embeds"], "pooled": c["pooled"]}
    monkeypatch.setattr(t2i, "encode_prompts", fake_encode)
    out = tmp_path / "run"
    argv = ["--model", "flux", "--base", bases["flux"], "--data", str(data), "--data-dependent", "--out", str(out),
            "--steps", "1"] + TRAIN + ["--policy", "dx", "--N", "3", "--decay-iters", "0"]
    train_t2i.main(argv)
    assert seen == ["caption 0", "caption 1"]
    c = torch.load(f"{data}.flux-32px.pt", weights_only=True)
    with torch.no_grad():
        z = tiny_vae("flux").encode(px.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mode()
    torch.testing.assert_close(c["latents"], (z - 0.1159) * 0.3611, atol=1e-5, rtol=1e-5)
    assert c["prompts"] == seen and "data-dependent" in (out / "log.txt").read_text()
    assert json.load(open(out / "adapter" / "config.json"))["out_channels"] == 3 * 64          # a DX-FLUX adapter
