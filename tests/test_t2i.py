"""Tests of t2i.py / train_t2i.py / pipelines.py (sample.py --model flux|flux2|qwen|sd3) on tiny random-weight
diffusers models and pipelines (CPU, offline: tiny text encoders with a character tokenizer built here).

Ground truth comes from the stock diffusers classes with the latent packing, ids, LoRA merge and head matmuls written
out here as loops, from the published file layout, and from piflow.sample + the VAE decode recomputed in the test.
"""
import copy
import inspect
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import piflow  # noqa: E402
from models import pipelines  # noqa: E402
import sample  # noqa: E402
from models import t2i, t2i_data  # noqa: E402
import train_t2i  # noqa: E402
from runtime import common, trainer  # noqa: E402
from roundoff import TOL, assert_float_close, assert_quantised  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)                                         # the repository: scripts run from it
F32 = torch.float32
MODELS = ("flux", "flux2", "qwen", "sd3")
TXT = {"flux": 32, "flux2": 24, "qwen": 32, "sd3": 32}          # text embedding width of each tiny base


pytestmark = pytest.mark.usefixtures("flush_denormals")   # conftest.py


# ----------------------------------------------------------------------------------------------------------
# Tiny bases: the real diffusers / transformers classes, >= 2 heads, random weights
# ----------------------------------------------------------------------------------------------------------

def tokenizer(max_len):
    """A character-level tokenizer (every printable character a token) with a chat template (FLUX.2)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{chr(i): i - 28 for i in range(32, 127)}, "\n": 99}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), "isolated")
    t = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                             bos_token="<s>", eos_token="</s>", model_max_length=max_len)
    t.chat_template = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{{ c['text'] }}"
                       "{% endfor %}\n{% endfor %}")
    return t


def clip_text(hidden, proj=None, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                      projection_dim=proj or hidden, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return (transformers.CLIPTextModelWithProjection if proj else transformers.CLIPTextModel)(cfg)


def t5(d, seed=0):
    torch.manual_seed(seed)
    return transformers.T5EncoderModel(transformers.T5Config(vocab_size=100, d_model=d, d_kv=8, d_ff=2 * d,
                                                             num_layers=1, num_heads=2,
                                                             relative_attention_num_buckets=8))


def tiny_transformer(model, seed=0, **sizes):
    """sizes: config values that replace the tiny ones (test_quant.py: 64-wide bases)."""
    torch.manual_seed(seed)
    if model == "flux":
        return diffusers.FluxTransformer2DModel(**dict(dict(
            patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6)), **sizes))
    if model == "flux2":
        return diffusers.Flux2Transformer2DModel(**dict(dict(
            in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4)), **sizes))
    if model == "qwen":
        return diffusers.QwenImageTransformer2DModel(**dict(dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6)), **sizes))
    return diffusers.SD3Transformer2DModel(**dict(dict(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24, out_channels=16,
        pos_embed_max_size=32), **sizes))


def tiny_vae(model):
    torch.manual_seed(1)
    if model == "qwen":
        return diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                temperal_downsample=[False, False, False])
    kw = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
    if model == "flux2":
        vae = diffusers.AutoencoderKLFlux2(latent_channels=32, **kw)
        with torch.no_grad():                                         # non-trivial batch-norm statistics
            vae.bn.running_mean.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
            vae.bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(3))
        return vae
    shift = dict(flux=(0.3611, 0.1159), sd3=(1.5305, 0.0609))[model]
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16,
                                   scaling_factor=shift[0], shift_factor=shift[1], **kw)


def tiny_pipeline(model):
    """The stock pipeline of a tiny base: transformer, VAE, scheduler, text encoders and tokenizers."""
    tr, vae, sched = tiny_transformer(model), tiny_vae(model), diffusers.FlowMatchEulerDiscreteScheduler()
    if model == "flux":
        return diffusers.FluxPipeline(sched, vae, clip_text(24), tokenizer(77), t5(32), tokenizer(512), tr)
    if model == "flux2":
        torch.manual_seed(2)
        te = transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
            text_config=dict(model_type="mistral", vocab_size=100, hidden_size=8, intermediate_size=16,
                             num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                             max_position_embeddings=1024),
            vision_config=dict(model_type="pixtral", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                               num_attention_heads=2, image_size=32, patch_size=8, head_dim=4),
            spatial_merge_size=1))
        return diffusers.Flux2Pipeline(sched, vae, te, tokenizer(512), tr)
    if model == "qwen":
        torch.manual_seed(2)
        te = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
            text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1,
                             rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                               patch_size=4, spatial_merge_size=1, temporal_patch_size=1)))
        return diffusers.QwenImagePipeline(sched, vae, te, tokenizer(1024), tr)
    return diffusers.StableDiffusion3Pipeline(tr, sched, vae, clip_text(8, 12, 3), tokenizer(77), clip_text(8, 12, 4),
                                              tokenizer(77), t5(32, 5), tokenizer(256))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{model: a diffusers pipeline folder} (safetensors, as save_pretrained writes them)."""
    root = tmp_path_factory.mktemp("bases")
    for m in MODELS:
        tiny_pipeline(m).save_pretrained(str(root / m))
    return {m: str(root / m) for m in MODELS}


def make_cache(model, P, seed=0, L=7):
    """A prompt cache in t2i's documented layout; Qwen prompts have different valid lengths (zero padding)."""
    g = torch.Generator().manual_seed(seed)
    c = {"prompts": [f"prompt {i}" for i in range(P)], "model": model, "max_text_len": L,
         "prompt_embeds": torch.randn(P, L, TXT[model], generator=g)}
    if model in ("flux", "sd3"):
        c["pooled"] = torch.randn(P, 24, generator=g)
    if model == "qwen":
        c["mask"] = torch.ones(P, L, dtype=torch.long)
        for i in range(P):
            c["mask"][i, L - 1 - i % 3:] = 0
        c["prompt_embeds"] *= c["mask"][..., None]
        c["negative_mask"] = (torch.arange(L) < 3).long()[None]
        c["negative_prompt_embeds"] = torch.randn(1, L, 32, generator=g) * c["negative_mask"][..., None]
    if model == "sd3":
        c["negative_prompt_embeds"], c["negative_pooled"] = torch.randn(1, L, 32, generator=g), torch.randn(1, 24,
                                                                                                            generator=g)
    return c


def save_cache(c, path):
    torch.save(c, str(path))
    return str(path)


def cond_of(model, c, idx, guidance=None):
    return t2i_data.make_cond(t2i.FAMILIES[model], c, torch.as_tensor(idx), "cpu", guidance or
                         t2i.FAMILIES[model].guidance_scale)


def pack(x):
    """(B, C, H, W) -> (B, h w, 4 C) with channel c*4 + ph*2 + pw (FluxPipeline._pack_latents), written as loops."""
    B, C, H, W = x.shape
    out = torch.empty(B, (H // 2) * (W // 2), 4 * C)
    for i in range(H // 2):
        for j in range(W // 2):
            for c in range(C):
                for ph in range(2):
                    for pw in range(2):
                        out[:, i * (W // 2) + j, c * 4 + ph * 2 + pw] = x[:, c, 2 * i + ph, 2 * j + pw]
    return out


def unpack(tokens, H, W, channel_last=False):
    """Inverse of pack; channel_last: channel (ph*2 + pw) * C + c (SD3's unpatchify)."""
    B, L, D = tokens.shape
    C = D // 4
    out = torch.empty(B, C, H, W)
    for i in range(H // 2):
        for j in range(W // 2):
            for c in range(C):
                for ph in range(2):
                    for pw in range(2):
                        r = (ph * 2 + pw) * C + c if channel_last else c * 4 + ph * 2 + pw
                        out[:, c, 2 * i + ph, 2 * j + pw] = tokens[:, i * (W // 2) + j, r]
    return out


def stock_call(ref, model, x, sigma, cond):
    """The stock transformer's output for latents x: tokens (B, L, *) (SD3: its own unpatchified (B, C, H, W))."""
    B, C, H, W = x.shape
    h, w = H // 2, W // 2
    if model == "sd3":
        return ref(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"],
                   pooled_projections=cond["pooled"], timestep=sigma * 1000).sample
    if model == "flux":
        ids = torch.tensor([[0.0, i, j] for i in range(h) for j in range(w)])
        return ref(hidden_states=pack(x), encoder_hidden_states=cond["prompt_embeds"],
                   pooled_projections=cond["pooled"], timestep=sigma, img_ids=ids,
                   txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3), guidance=cond["guidance"]).sample
    if model == "flux2":                                      # (t, h, w, l) ids; text (0, 0, 0, l)
        ids = torch.tensor([[0, i, j, 0] for i in range(h) for j in range(w)])[None].expand(B, -1, -1)
        tokens = pack(x)
        if "ref_tokens" in cond:
            tokens, ids = torch.cat([tokens, cond["ref_tokens"]], 1), torch.cat([ids, cond["ref_ids"]], 1)
        L = cond["prompt_embeds"].shape[1]
        txt_ids = torch.tensor([[0, 0, 0, li] for li in range(L)])[None].expand(B, -1, -1)
        return ref(hidden_states=tokens, encoder_hidden_states=cond["prompt_embeds"], timestep=sigma,
                   img_ids=ids, txt_ids=txt_ids, guidance=cond["guidance"]).sample[:, :h * w]
    return ref(hidden_states=pack(x), encoder_hidden_states=cond["prompt_embeds"],
               encoder_hidden_states_mask=cond["mask"], timestep=sigma, img_shapes=[[(1, h, w)]] * B).sample


def reference_u(ref, model, x, sigma, cond):
    """Independent teacher: the stock model, its tokens unpacked with explicit loops."""
    out = stock_call(ref, model, x, sigma, cond)
    return out if model == "sd3" else unpack(out, *x.shape[-2:])


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
    block, then one error line; loading progress bars and transformers' torchvision notes are not messages);
    returns the error line."""
    with pytest.raises(SystemExit) as e:
        fn()
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines()
             if ln.strip() and not ln.startswith("[transformers]") and "%|" not in ln]
    if lines and lines[0].startswith("usage:"):
        lines = lines[-1:] if all(ln.startswith(" ") for ln in lines[1:-1]) else lines
    assert e.value.code == code and len(lines) == 1, (e.value.code, lines)
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# 1. The student on the stock transformer: heads, teacher, LoRA targets
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_head_init_and_teacher(model):
    """GM means = the teacher's proj_out applied to the features, repeated K times in the row's token layout
    ((k, c, ph, pw) or SD3's (ph, pw, k, c)) + bias noise per (k, c); uniform weights, s = 0.05; the DX grid is the
    teacher K times; LoRA / head / norm_out perturbations move the student but never the teacher."""
    tr = tiny_transformer(model)
    ref = copy.deepcopy(tr).eval()
    feats = {}
    ref.proj_out.register_forward_pre_hook(lambda m, a: feats.update(h=a[0]))
    K, s, cl = 3, student(model, tr).eval(), model == "sd3"
    C = t2i.FAMILIES[model].channels
    x, sigma = torch.randn(2, C, 4, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.9])
    cond = cond_of(model, make_cache(model, 2), [0, 1])
    with torch.no_grad():
        u_ref = reference_u(ref, model, x, sigma, cond)
        torch.testing.assert_close(s.teacher(x, sigma, cond), u_ref, atol=1e-6, rtol=1e-5)
        pol = s(x, sigma, cond)
        W, b = ref.proj_out.weight, ref.proj_out.bias if ref.proj_out.bias is not None else torch.zeros(4 * C)
        bias = tr.proj_out_means.bias
        noise = (bias.view(4, K, C) - b.view(4, 1, C)).permute(1, 2, 0) if cl else (bias.view(K, 4 * C) - b).view(
            K, C, 4)                                                                  # (K, C, 4 sub-positions)
        torch.testing.assert_close(noise, noise[:, :, :1].expand(K, C, 4), atol=1e-6, rtol=0)   # shared by 2x2
        assert 0 < noise.abs().max() < 4 * 0.05
        means = torch.empty(2, K, C, 4, 6)
        for i in range(2):
            for j in range(3):
                for c in range(C):
                    for ph in range(2):
                        for pw in range(2):
                            r = (ph * 2 + pw) * C + c if cl else c * 4 + ph * 2 + pw
                            means[:, :, c, 2 * i + ph, 2 * j + pw] = (feats["h"][:, i * 3 + j] @ W[r] + b[r])[:, None] \
                                + noise[:, c, 0]
        torch.testing.assert_close(pol.means_x, x[:, None] - sigma.view(2, 1, 1, 1, 1) * means, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pol.logweights, torch.full((2, K, 1, 4, 6), -torch.tensor(K * 1.0).log().item()))
        torch.testing.assert_close(pol.var_x.flatten(), (0.05 * sigma) ** 2)
        perturb(s, 5)
        torch.testing.assert_close(s.teacher(x, sigma, cond), u_ref, atol=1e-6, rtol=1e-5)
        assert (s(x, sigma, cond).means_x - pol.means_x).abs().max() > 1e-3
        d = student(model, tiny_transformer(model), "dx", N=3).eval()
        pd = d(x, sigma, cond)
        x0 = x - sigma.view(2, 1, 1, 1) * u_ref
        torch.testing.assert_close(pd.x0_grid, x0[:, None].expand(2, 3, C, 4, 6), atol=1e-5, rtol=1e-5)
        assert pd.segment_size == pytest.approx(1 / 3.5) and pd.shift == 3.2
        perturb(d, 6)
        torch.testing.assert_close(d.teacher(x, sigma, cond), u_ref, atol=1e-6, rtol=1e-5)


LORA_TARGETS = {
    "flux": ["transformer_blocks.0." + m for m in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                   "ff_context.net.2")]
    + ["single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"],
    "flux2": ["transformer_blocks.0." + m for m in ("ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                                                    "ff_context.linear_out")]
    + ["single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"],
    "qwen": [f"transformer_blocks.{i}.img_mlp.{m}" for i in range(2) for m in ("net.0.proj", "net.2")]
    + [f"transformer_blocks.0.txt_mlp.{m}" for m in ("net.0.proj", "net.2")],     # the last block's: unused
    "sd3": ["transformer_blocks.0." + m for m in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                  "ff_context.net.2")]
    + ["transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff.net.2"]}    # block 1: context_pre_only


@pytest.mark.parametrize("model,policy", [("flux", "gm"), ("flux", "dx"), ("flux2", "gm"), ("qwen", "gm"),
                                          ("sd3", "dx")])
def test_lora_targets_and_published_names(model, policy):
    """The published LoRA targets (LakonLab configs; FLUX.2 / SD3: the same modules in their naming) with
    alpha = r, named 'piflow'; trainables under the published names."""
    s = student(model, tiny_transformer(model), policy, K=2, N=3, rank=4)
    wrapped = {n for n, m in s.tr.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    emb = "time_guidance_embed" if model == "flux2" else "time_text_embed"
    exp = set(LORA_TARGETS[model]) | {f"{emb}.timestep_embedder.linear_{i}" for i in (1, 2)}
    assert wrapped == exp
    heads = {"proj_out_means.weight", "proj_out_means.bias", "proj_out_logweights.weight", "proj_out_logweights.bias",
             "proj_out_logstds.1.weight", "proj_out_logstds.1.bias", "proj_out_logstds.3.weight",
             "proj_out_logstds.3.bias"} if policy == "gm" else {"proj_out.weight", "proj_out.bias"}
    norm = {"norm_out.linear.weight"} | ({"norm_out.linear.bias"} if model != "flux2" else set())
    names = heads | norm | {f"{n}.lora_{ab}.weight" for n in exp for ab in "AB"}
    assert set(s.trainable(train=True)) == names
    assert {n for n, p in s.tr.named_parameters() if p.requires_grad} == {
        n.replace(".lora_A.", ".lora_A.piflow.").replace(".lora_B.", ".lora_B.piflow.") for n in names}
    m = s.tr.get_submodule(sorted(exp)[0])
    with torch.no_grad():
        m.lora_B["piflow"].weight.normal_()
        x = torch.randn(3, m.base_layer.in_features)
        A, Bm = m.lora_A["piflow"].weight, m.lora_B["piflow"].weight
        torch.testing.assert_close(m(x), m.base_layer(x) + x @ A.T @ Bm.T, atol=1e-5, rtol=1e-5)


def piid_cfg(nfe=2):
    return piflow.PiIDConfig(nfe=nfe, shift=3.2, final_step_scale=0.5, total_substeps=16, num_intermediate=2,
                             window_substeps=3, gm_dropout=0.1, loss_scale=30.0, decay_iters=4)


def six_steps_lower_the_loss(s, teacher, ref_teacher, noise, cond, cfg):
    """π-ID with `teacher` (None: the student's) == π-ID with the independent `ref_teacher` (same states, same
    generator), before and after 6 Adam steps, which lower the loss on the fixed batch to < 0.7 x: (before, after)."""
    teacher = teacher or s.teacher
    def loss(step, teacher=teacher, backward=None):
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
    return before, after


def test_teacher_is_the_stock_model_and_piid_steps_reduce_loss():
    tr = tiny_transformer("flux")
    ref = copy.deepcopy(tr).eval()
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    six_steps_lower_the_loss(student("flux", tr, K=2, nfe=2), None, lambda x, sigma, c: reference_u(
        ref, "flux", x, sigma, c), noise, cond_of("flux", make_cache("flux", 2, seed=3), [0, 1]), piid_cfg())


TRAIN = ["--K", "2", "--lora-rank", "4", "--lora-dropout", "0.1", "--nfe", "2", "--resolution", "32",
         "--total-substeps", "16", "--num-intermediate", "1", "--batch-size", "2", "--micro-batch", "1", "--lr", "1e-3",
         "--warmup", "1", "--clip-start", "0", "--ema-start", "0", "--ema-gamma", "0.5", "--decay-iters", "2",
         "--dtype", "fp32", "--no-progress", "--log-every", "0", "--eval-every", "0", "--ckpt-every", "0",
         "--threads", "1"]


def train_args(model, base, cache, out, steps, *extra):
    return ["--model", model, "--base", base, "--embed-cache", cache, "--out", str(out), "--steps", str(steps)] + \
        TRAIN + list(extra)


def attachment(argv):
    rc, cfg, tc, opts, settings, _ = trainer.parse("train_t2i.py", argv, "model", train_t2i.MODELS,
                                                     train_t2i.DEFAULT_PRESET, "")
    return t2i.attach(opts, cfg, tc, settings, torch.device("cpu"), F32), cfg


@pytest.mark.parametrize("model,g", [("flux", 3.5), ("flux2", 4.0)])
def test_distilled_guidance_reaches_the_training_teacher(bases, tmp_path, model, g):
    """FLUX.1 / FLUX.2 through the training attachment: every condition drawn for training carries --guidance as
    the distilled-guidance input, and the teacher is the stock transformer called with it (one run, no CFG pair);
    guidance 1 would give another velocity."""
    c = make_cache(model, 4, seed=2)
    att, _ = attachment(train_args(model, bases[model], save_cache(c, tmp_path / "emb.pt"), tmp_path / "run", 2,
                                   "--guidance", str(g)))
    cond = att.sample_cond(3, torch.Generator().manual_seed(0))
    assert torch.equal(cond["guidance"], torch.full((3,), g))
    ref = tiny_transformer(model).eval()
    x, sigma = torch.randn(3, 32 if model == "flux2" else 16, 4, 4, generator=torch.Generator().manual_seed(0)), \
        torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        u = att.teacher(x, sigma, cond)
        torch.testing.assert_close(u, reference_u(ref, model, x, sigma, cond), atol=1e-5, rtol=1e-5)
        other = reference_u(ref, model, x, sigma, dict(cond, guidance=torch.ones(3)))
    assert (u - other).abs().max() > 1e-3


def test_sd3_cfg_teacher_piid_steps_and_adapter_roundtrip(bases, tmp_path):
    """SD3 through the training attachment: the teacher is the stock SD3Transformer2DModel on unpacked latents at
    timestep 1000 sigma with true CFG 3.5 against the cached negative (not the FLUX convention, timestep sigma);
    6 π-ID steps lower the loss; the adapter saves and reloads bit for bit."""
    c = make_cache("sd3", 4, seed=2)
    att, cfg = attachment(train_args("sd3", bases["sd3"], save_cache(c, tmp_path / "emb.pt"), tmp_path / "run", 2,
                                     "--guidance", "3.5", "--lora-dropout", "0"))
    ref = tiny_transformer("sd3").eval()
    x, sigma = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0.4, 0.9])
    neg = lambda n: {"prompt_embeds": c["negative_prompt_embeds"].expand(n, -1, -1),
                     "pooled": c["negative_pooled"].expand(n, -1)}

    def ref_teacher(x, sigma, cond):
        u_pos, u_neg = reference_u(ref, "sd3", x, sigma, cond), reference_u(ref, "sd3", x, sigma, neg(len(x)))
        return u_neg + 3.5 * (u_pos - u_neg)
    pos = cond_of("sd3", c, [1, 2])
    with torch.no_grad():
        u = att.teacher(x, sigma, pos)
        torch.testing.assert_close(u, ref_teacher(x, sigma, pos), atol=1e-5, rtol=1e-5)
        flux_convention = ref(hidden_states=x, encoder_hidden_states=pos["prompt_embeds"],
                              pooled_projections=pos["pooled"], timestep=sigma).sample
        assert (u - flux_convention).abs().max() > 0.1
    att.student.eval()
    six_steps_lower_the_loss(att.student, att.teacher, ref_teacher, torch.randn(2, 16, 4, 4, generator=torch.Generator()
                                                                                 .manual_seed(4)), pos, piid_cfg())
    with torch.no_grad():
        for p in att.student.trainable().values():
            p.copy_(p.half().float())
    (tmp_path / "ad").mkdir()
    t2i.write_adapter(str(tmp_path / "ad"), att.student, {k: v.half() for k, v in att.student.trainable().items()},
                      cfg)
    b, head, rank, cfg2 = t2i.student_from_adapter("sd3", tiny_transformer("sd3"), str(tmp_path / "ad"), "--adapter",
                                                   F32)
    assert (head.K, rank, cfg2) == (2, 4, cfg) and json.load(open(tmp_path / "ad" / "config.json"))["_class_name"] \
        == "GMSD3Transformer2DModel"
    assert all(torch.equal(p, att.student.trainable()[k]) for k, p in b.trainable().items())
    with torch.no_grad():
        pa, pb = att.student(x, sigma, pos), b.eval()(x, sigma, pos)
    assert torch.equal(pa.means_x, pb.means_x) and torch.equal(pa.logweights, pb.logweights) and \
        torch.equal(pa.var_x, pb.var_x)


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
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "train_t2i.py")] + train_args("flux", bases["flux"], cache, two, 2),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
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
    # the export is the EMA, in fp16, in the published layout with our schedule and trained guidance
    with safe_open(str(two / "adapter" / t2i.WEIGHTS), "pt") as f:
        meta, exported = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert set(exported) == set(b["ema"]) and all(torch.equal(exported[k], b["ema"][k].half()) for k in exported)
    assert json.loads(meta["piid_config"])["nfe"] == 2 and json.loads(meta["policy_config"]) == {"type": "GMFlow"}
    assert json.loads(meta["guidance"]) == 3.5


# ----------------------------------------------------------------------------------------------------------
# 2. Released adapter formats against an independent forward of the same weights
# ----------------------------------------------------------------------------------------------------------

def write_released_adapter(folder, model, policy="gm", K=2, N=3, inner=1024, layers=2, constant=None, seed=0, rank=4,
                           prefix="", lw=None):
    """An adapter as the official exporter writes it (no piid_config): config.json (the student class's config)
    and random tensors of the shapes the published class has for that config; LoRA on the row's targets.
    lw: logweights_channels (None: the row's default, 4; 'omit': 4 channels, the field left out of config.json)."""
    fam, tr = t2i.FAMILIES[model], tiny_transformer(model)
    cfg = json.loads(json.dumps({k: v for k, v in tr.config.items() if not k.startswith("_")}, default=list))
    S, C, D = 4, fam.channels, tr.proj_out.in_features
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: (torch.randn(*shape, generator=g) * 0.1).half()
    t = {"norm_out.linear.weight": r(2 * D, D)}
    if model != "flux2":
        t["norm_out.linear.bias"] = r(2 * D)
    if policy == "gm":
        omit, lw = lw == "omit", 4 if lw in (None, "omit") else lw
        cfg.update(_class_name=fam.gm_class, num_gaussians=K, logstd_inner_dim=inner, gm_num_logstd_layers=layers,
                   constant_logstd=constant, logweights_channels=lw)
        if omit:
            del cfg["logweights_channels"]
        t.update({"proj_out_means.weight": r(K * S * C, D), "proj_out_means.bias": r(K * S * C),
                  "proj_out_logweights.weight": r(K * lw, D), "proj_out_logweights.bias": r(K * lw)})
        if constant is None:
            dims = [D] + [inner] * (layers - 1) + [1]
            for i in range(layers):
                t[f"proj_out_logstds.{2 * i + 1}.weight"], t[f"proj_out_logstds.{2 * i + 1}.bias"] = \
                    r(dims[i + 1], dims[i]), r(dims[i + 1])
    else:                                        # DX: the stock class with widened out_channels (the published dxflux.py)
        cfg.update(_class_name=fam.transformer, patch_size=1, out_channels=N * S * C)
        t.update({"proj_out.weight": r(N * S * C, D), "proj_out.bias": r(N * S * C)})
    for name in fam.lora(tr) if rank else []:
        m = tr.get_submodule(name)
        t[f"{name}.lora_A.weight"], t[f"{name}.lora_B.weight"] = r(rank, m.in_features), r(m.out_features, rank)
    os.makedirs(folder, exist_ok=True)
    save_file({prefix + k: v for k, v in t.items()}, os.path.join(folder, t2i.WEIGHTS),
              metadata={"policy_config": json.dumps({"type": "GMFlow"} if policy == "gm" else
                                                    {"segment_size": 1 / 3.5, "shift": 3.2, "type": "DX"})})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return {k: v.float() for k, v in t.items()}, cfg


def merged(net, t):
    """`net` with the adapter's LoRA merged by hand (W + B A: alpha = r) and its norm_out / proj_out loaded."""
    with torch.no_grad():
        for n, m in net.named_modules():
            if f"{n}.lora_A.weight" in t:
                m.weight += t[f"{n}.lora_B.weight"] @ t[f"{n}.lora_A.weight"]
        for k in ("norm_out.linear.weight", "norm_out.linear.bias", "proj_out.weight", "proj_out.bias"):
            if k in t:
                net.get_parameter(k).copy_(t[k])
    return net.eval()


DIFFS = {}                                   # max |diff| per released format, printed for the report


@pytest.mark.parametrize("model,policy,lw", [("flux", "gm", None), ("qwen", "gm", None), ("flux2", "gm", None),
                                             ("flux2", "gm", "omit"), ("flux2", "gm", 1), ("flux", "dx", None),
                                             ("qwen", "dx", None)])
def test_released_adapter_formats_match_an_independent_forward(model, policy, lw, tmp_path, capsys):
    """An adapter in the published layout (logstd inner dim 32, FLUX with the 'transformer.' key prefix) loads from
    its folder alone and reproduces, to 1e-5, the policy of an independent forward of the same weights: the stock
    diffusers class (DX: built from the adapter's config.json) with the LoRA merged by hand, the GM heads as
    explicit matmuls on proj_out's input, the logstd MLP on norm_out's temb, the (k, c, ph, pw) unpacking as loops.
    logweights_channels is read as stated (FLUX.2 with 1: one logweight per token, repeated over the 2x2 patch);
    a FLUX.2 config without it has the published p^2 = 4."""
    folder = str(tmp_path / "a")
    t, config = write_released_adapter(folder, model, policy, inner=32, prefix="transformer." if model == "flux"
                                       else "", lw=lw)
    assert ("logweights_channels" in config) == (policy == "gm" and lw != "omit")
    s, head, rank, cfg = t2i.student_from_adapter(model, tiny_transformer(model), folder, "--adapter", F32)
    assert "assuming the released schedule" in capsys.readouterr().out and (cfg.nfe, cfg.shift) == (4, 3.2)
    assert rank == 4 and (head.logstd_inner_dim if policy == "gm" else head.N) == (32 if policy == "gm" else 3)
    C = t2i.FAMILIES[model].channels
    x, sigma = torch.randn(2, C, 4, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0.35, 0.8])
    cond = cond_of(model, make_cache(model, 2, seed=5), [0, 1])
    if policy == "dx":
        cls = getattr(diffusers, config["_class_name"])
        keys = set(inspect.signature(cls.__init__).parameters)
        net = cls(**{k: v for k, v in config.items() if k in keys})
        missing = net.load_state_dict({k: v for k, v in tiny_transformer(model).state_dict().items()
                                       if not k.startswith("proj_out.")}, strict=False).missing_keys
        assert sorted(missing) == ["proj_out.bias", "proj_out.weight"]
        with torch.no_grad():
            tokens = stock_call(merged(net, t), model, x, sigma, cond)                       # (B, L, N 4 C)
            grid = torch.stack([unpack(tokens[..., n * 4 * C:(n + 1) * 4 * C], 4, 6) for n in range(3)], 1)
            got = s.eval()(x, sigma, cond).x0_grid
        diff = (got - (x[:, None] - sigma.view(2, 1, 1, 1, 1) * grid)).abs().max().item()
    else:
        ref, seen = merged(tiny_transformer(model), t), {}
        ref.proj_out.register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
        ref.norm_out.register_forward_pre_hook(lambda m, a: seen.update(temb=a[1]))
        K, lw = 2, 1 if lw == 1 else 4
        assert head.logweights_channels == lw
        with torch.no_grad():
            stock_call(ref, model, x, sigma, cond)
            h = seen["h"][:, :6]
            mt = h @ t["proj_out_means.weight"].T + t["proj_out_means.bias"]                 # (B, L, K 4 C)
            lt = h @ t["proj_out_logweights.weight"].T + t["proj_out_logweights.bias"]       # (B, L, K lw)
            means = torch.stack([unpack(mt[..., k * 4 * C:(k + 1) * 4 * C], 4, 6) for k in range(K)], 1)
            logits = torch.stack([unpack(lt[..., k * 4:(k + 1) * 4] if lw == 4 else lt[..., k:k + 1].repeat(1, 1, 4),
                                         4, 6) for k in range(K)], 1)                     # (B, K, 1, H, W)
            a = seen["temb"]
            for i in (1, 3):
                a = torch.nn.functional.silu(a) @ t[f"proj_out_logstds.{i}.weight"].T + t[f"proj_out_logstds.{i}.bias"]
            pol = s.eval()(x, sigma, cond)
        s_ = sigma.view(2, 1, 1, 1, 1)
        diff = max((pol.means_x - (x[:, None] - s_ * means)).abs().max().item(),
                   (pol.logweights - logits.log_softmax(1)).abs().max().item(),
                   (pol.var_x.flatten() - (a.flatten() * 2).exp() * sigma ** 2).abs().max().item())
    DIFFS[f"{model}-{policy}-{lw}"] = diff
    print(f"max |diff| {model} {policy}: {diff:.2e}")
    assert diff <= 1e-5, diff


def test_our_flux2_adapter_unpacks_the_published_way(tmp_path):
    """Our exported FLUX.2 GM adapter (a new student's default head) states logweights_channels = 4 = p^2, and its
    head outputs unpacked as the published PiFlux2Pipeline does give our student's policy: tokens (B, h w, K C 4)
    and (B, h w, K 4) viewed as (B, h, w, K, C, 2, 2) and (B, h, w, K, 1, 2, 2), permuted to (B, K, C, h, 2, w, 2),
    i.e. (B, K, C, H, W) and (B, K, 1, H, W)."""
    ad = our_adapter("flux2", tmp_path / "ad")                                    # K = 2
    c = json.load(open(os.path.join(ad, "config.json")))
    assert (c["_class_name"], c["logweights_channels"], c["num_gaussians"]) == ("GMFlux2Transformer2DModel", 4, 2)
    s, head, _, _ = t2i.student_from_adapter("flux2", tiny_transformer("flux2"), ad, "--adapter", F32)
    assert head.logweights_channels == 4
    with safe_open(os.path.join(ad, t2i.WEIGHTS), "pt") as f:
        t = {k: f.get_tensor(k).float() for k in f.keys() if k.startswith("proj_out_")}
    assert t["proj_out_logweights.weight"].shape[0] == 2 * 4
    B, K, C, H, W = 2, 2, 32, 4, 6
    x, sigma = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1)), torch.tensor([0.35, 0.8])
    seen = {}
    s.tr.proj_out_means.register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
    with torch.no_grad():
        pol = s.eval()(x, sigma, cond_of("flux2", make_cache("flux2", 2, seed=5), [0, 1]))
        h = seen["h"]                                                              # (B, h w, D)
        mt = h @ t["proj_out_means.weight"].T + t["proj_out_means.bias"]
        lt = h @ t["proj_out_logweights.weight"].T + t["proj_out_logweights.bias"]
    means = mt.view(B, H // 2, W // 2, K, C, 2, 2).permute(0, 3, 4, 1, 5, 2, 6).reshape(B, K, C, H, W)
    logw = lt.view(B, H // 2, W // 2, K, 1, 2, 2).permute(0, 3, 4, 1, 5, 2, 6).reshape(B, K, 1, H, W)
    torch.testing.assert_close(pol.means_x, x[:, None] - sigma.view(B, 1, 1, 1, 1) * means, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pol.logweights, logw.log_softmax(1), atol=1e-5, rtol=1e-5)
    assert (logw[..., 0::2, :] - logw[..., 1::2, :]).abs().max() > 1e-3     # 4 weights per token, not 1 repeated


def test_constant_logstd_and_our_adapters_reload_bit_exactly(tmp_path):
    """A GM-Qwen adapter with constant_logstd has no logstd MLP and s = exp(c); our GM-FLUX and DX-Qwen exports
    (fp16) reload bit for bit with their schedule and DX policy kwargs from the metadata."""
    write_released_adapter(str(tmp_path / "b"), "qwen", constant=-2.0)
    q, head, _, _ = t2i.student_from_adapter("qwen", tiny_transformer("qwen"), str(tmp_path / "b"), "--adapter", F32)
    assert head.constant_logstd == -2.0 and not hasattr(q.tr, "proj_out_logstds")
    x, sigma = torch.randn(2, 16, 4, 4), torch.tensor([0.5, 0.8])
    with torch.no_grad():
        pol = q.eval()(x, sigma, cond_of("qwen", make_cache("qwen", 2), [0, 1]))
    torch.testing.assert_close(pol.var_x.flatten(), torch.tensor(-4.0).exp() * sigma ** 2)
    for model, policy in (("flux", "gm"), ("qwen", "dx")):
        a = student(model, tiny_transformer(model), policy, K=2, N=3).eval()
        perturb(a, 3)
        with torch.no_grad():
            for p in a.trainable().values():
                p.copy_(p.half().float())
        (tmp_path / policy).mkdir()
        t2i.write_adapter(str(tmp_path / policy), a, {k: v.half() for k, v in a.trainable().items()},
                          piflow.PiIDConfig(nfe=4, shift=3.2, final_step_scale=0.5), guidance=3.5)
        b, head, _, cfg = t2i.student_from_adapter(model, tiny_transformer(model), str(tmp_path / policy), "--adapter",
                                                   F32)
        assert (cfg.nfe, cfg.shift, cfg.final_step_scale) == (4, 3.2, 0.5) and b.policy_config == a.policy_config
        cond = cond_of(model, make_cache(model, 2), [0, 1])
        with torch.no_grad():
            pa, pb = a(x, sigma, cond), b.eval()(x, sigma, cond)
        if policy == "gm":
            assert torch.equal(pa.means_x, pb.means_x) and torch.equal(pa.logweights, pb.logweights)
            assert b.guidance == 3.5
            c = t2i.adapter_config(b)
            assert (c["logstd_inner_dim"], c["num_gaussians"], c["_class_name"]) == \
                (1024, 2, "GMFluxTransformer2DModel")
        else:
            assert torch.equal(pa.x0_grid, pb.x0_grid) and head.N == 3 and b.guidance is None
            c = json.load(open(tmp_path / policy / "config.json"))
            assert (c["_class_name"], c["patch_size"], c["out_channels"]) == ("DXQwenImageTransformer2DModel", 1, 192)
            assert b.policy_config == {"segment_size": pytest.approx(1 / 3.5), "shift": 3.2, "type": "DX"}


# ----------------------------------------------------------------------------------------------------------
# 3. The pipeline API and sample.py --model flux|flux2|qwen|sd3
# ----------------------------------------------------------------------------------------------------------

def our_adapter(model, folder, nfe=2, seed=2):
    """A trained-looking adapter of ours (perturbed student, fp16 export with piid_config and guidance)."""
    s = student(model, tiny_transformer(model), K=2, nfe=nfe)
    perturb(s, seed)
    os.makedirs(folder, exist_ok=True)
    t2i.write_adapter(str(folder), s, {k: v.half() for k, v in s.trainable().items()},
                      piflow.PiIDConfig(nfe=nfe, shift=3.2, final_step_scale=0.5), t2i.FAMILIES[model].guidance_scale)
    return str(folder)


@pytest.mark.parametrize("model", MODELS)
def test_pipeline_api_size_lora_stacking_and_offload(bases, model, tmp_path):
    """piflow_pipeline(model, base, adapter)(prompt) gives images of the requested size (any NFE); a second LoRA
    loaded with the stock load_lora_weights and stacked with set_adapters changes the image, and set_adapters back to
    'piflow' restores it exactly; enable_model_cpu_offload's accelerate hooks (CPU as the target device here)
    reproduce it to 1e-5 of the [0, 1] image, 1/400 of a grey level (the hooks' .to('cpu:0') copies the weights;
    the re-aligned copy changes MKL's rounding of SD3's CLIP text projection by 2.4e-7, measured)."""
    pipe = pipelines.piflow_pipeline(model, bases[model], our_adapter(model, tmp_path / "ad"))
    run = lambda **kw: pipe("a red cat", generator=torch.Generator().manual_seed(0), **dict(dict(height=32, width=48),
                                                                                          **kw)).images
    base = np.array(run()[0])
    assert base.shape == (32, 48, 3) and run(height=48, width=16, num_inference_steps=1)[0].size == (16, 48)
    name = LORA_TARGETS[model][0]
    lin, g = tiny_transformer(model).get_submodule(name), torch.Generator().manual_seed(5)
    pipe.load_lora_weights({f"transformer.{name}.lora_A.weight": torch.randn(2, lin.in_features, generator=g),
                            f"transformer.{name}.lora_B.weight": torch.randn(lin.out_features, 2, generator=g)},
                           adapter_name="style")
    pipe.set_adapters(["piflow", "style"], [1.0, 1.0])
    assert (np.array(run()[0]) != base).mean() > 0.5
    pipe.set_adapters("piflow")
    assert np.array_equal(np.array(run()[0]), base)
    pipe.delete_adapters("style")
    before = run(output_type="pt")
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(pipe.pipe.components[k], "_hf_hook") for k in ("transformer", "vae"))
    after = run(output_type="pt")
    assert after.shape == (1, 3, 32, 48) and (after - before).abs().max() <= 1e-5


def stock_cond(model, base, prompts):
    """Prompt conditions from the stock pipeline's encode_prompt, called here with its documented arguments."""
    P = getattr(diffusers, t2i.FAMILIES[model].pipeline).from_pretrained(base, transformer=None)
    with torch.no_grad():
        if model == "flux":
            e, pooled, _ = P.encode_prompt(prompts, prompt_2=None, max_sequence_length=512)
            return {"prompt_embeds": e, "pooled": pooled}
        if model == "flux2":
            return {"prompt_embeds": P.encode_prompt(prompts, max_sequence_length=512)[0]}
        if model == "qwen":                                        # unpadded, with its mask
            e, m = P.encode_prompt(prompts, max_sequence_length=512)
            return {"prompt_embeds": e, "mask": torch.ones(e.shape[:2], dtype=torch.long) if m is None else m}
        e, _, pooled, _ = P.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                          max_sequence_length=256)
        return {"prompt_embeds": e, "pooled": pooled}


def decode_written_out(model, vae, x):
    """Normalised latents -> uint8 (B, H, W, 3): decode_grey, rounded as the pipelines post-process."""
    return np.round(decode_grey(model, vae, x)).astype(np.uint8)


def decode_grey(model, vae, x):
    """Normalised latents -> float64 grey levels (B, H, W, 3) before rounding: each base's de-normalisation written
    out, the VAE decode, and the pipelines' post-processing (img / 2 + 0.5).clamp(0, 1) * 255."""
    from einops import rearrange
    with torch.no_grad():
        if model == "flux":
            img = vae.decode(x / 0.3611 + 0.1159).sample
        elif model == "sd3":
            img = vae.decode(x / 1.5305 + 0.0609).sample
        elif model == "qwen":
            mean, std = (torch.tensor(getattr(vae.config, k)).view(1, 16, 1, 1) for k in ("latents_mean",
                                                                                      "latents_std"))
            img = vae.decode((x * std + mean)[:, :, None]).sample[:, :, 0]
        else:
            z = rearrange(x, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=2, pw=2)
            z = z * (vae.bn.running_var + 1e-4).sqrt().view(1, -1, 1, 1) + vae.bn.running_mean.view(1, -1, 1, 1)
            img = vae.decode(rearrange(z, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=2, pw=2)).sample
    return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).double().numpy() * 255


def record_decoded(monkeypatch):
    """The pipelines' float images before quantisation: a list that t2i_data.decode's outputs are appended to, as
    grey levels (B, H, W, 3) ((img / 2 + 0.5).clamp(0, 1) * 255, the stock post-processing before rounding)."""
    seen, decode = [], t2i_data.decode

    def recording(fam, vae, x):
        img = decode(fam, vae, x)
        seen.append((img.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).double().numpy() * 255)
        return img
    monkeypatch.setattr(t2i_data, "decode", recording)
    return seen


@pytest.mark.parametrize("model", MODELS)
def test_sample_cli_pixels_recomputed(bases, model, tmp_path, monkeypatch):
    """sample.py --model M (an adapter fetched as owner/repo:subfolder, prompts through the text encoders, 'auto'
    temperature, --threads): image i is piflow.sample from noise seeded seed + i with prompt i (embedded by the
    stock encode_prompt), decoded as written out here: float images to roundoff.TOL, uint8 values their rounding;
    the single PNGs hold the same pixels; the written --embed-cache alone (no text encoders) gives the same images
    bit for bit (same code, same inputs)."""
    from PIL import Image
    import huggingface_hub
    ad = our_adapter(model, tmp_path / "hub" / "tiny")
    calls = []

    def fake_download(repo, filename, local_files_only=False, **kw):
        calls.append((repo, filename))
        return str(tmp_path / "hub" / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    seen = record_decoded(monkeypatch)
    prompts, out, cache = ["a cat", "two dogs on grass", "x"], tmp_path / "grid.png", tmp_path / "emb.pt"
    argv = ["--model", model, "--adapter", "someone/pi-adapters:tiny", "--base", bases[model], "--height", "32",
            "--width", "48", "--batch-size", "2", "--seed", "7", "--out", str(out), "--threads", "2",
            "--embed-cache", str(cache)]
    try:
        res = sample.main(argv + [a for p in prompts for a in ("--prompt", p)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert set(calls) >= {("someone/pi-adapters", f"tiny/{f}") for f in ("config.json", t2i.WEIGHTS)}
    assert res["nfe"] == 2 and "temperature 0.1" in res["title"]               # auto = 0.1 (NFE - 1)
    ref, _, _, _ = t2i.student_from_adapter(model, tiny_transformer(model), ad, "--adapter", F32)
    cond, fam, expect = stock_cond(model, bases[model], prompts), t2i.FAMILIES[model], []
    if fam.guidance == "distilled":
        cond["guidance"] = torch.full((3,), fam.guidance_scale)
    for idx in ([0, 1], [2]):
        noise = torch.cat([torch.randn(1, fam.channels, 4, 6, generator=torch.Generator().manual_seed(7 + i))
                           for i in idx])
        x = piflow.sample(ref.eval(), noise, {k: v[idx] for k, v in cond.items()}, temperature=0.1,
                          cfg=piflow.PiIDConfig(nfe=2, shift=3.2, final_step_scale=0.5))
        expect += list(decode_grey(model, tiny_vae(model).eval(), x))
    assert len(res["images"]) == 3 and res["row_labels"] == prompts and len({e.tobytes() for e in expect}) == 3
    gap = assert_float_close(np.concatenate(seen), np.stack(expect), what=model)   # measured <= 2e-4 grey levels
    for i in range(3):
        assert_quantised(res["images"][i], expect[i], what=f"{model} image {i}")
        assert np.array_equal(res["images"][i], np.array(Image.open(tmp_path / "grid" / f"{i:05d}.png")))
    assert Image.open(out).size[1] > 3 * 32
    again = sample.main(argv[:-2] + ["--embed-cache", str(cache), "--out", str(tmp_path / "again.png")])
    assert all(np.array_equal(a, b) for a, b in zip(again["images"], res["images"]))      # same code, same inputs
    print(f"{model}: sample.py vs recomputation: float gap {gap:.2e} grey levels")


def reads_references(tr):
    """A tiny FLUX.2 transformer whose image tokens attend strongly to the reference tokens (q/k RMS-norm scales x4,
    the double block's values x8): at random init a reference moves the velocity by 0.5 % only, its effect on the
    image (0.007 grey level on average) is then within 20x of float round-off; here it is ~24x larger."""
    with torch.no_grad():
        for name, m in tr.named_modules():
            if name.endswith(("norm_q", "norm_k", "norm_added_q", "norm_added_k")):
                m.weight.mul_(4)
        tr.transformer_blocks[0].attn.to_v.weight.mul_(8)
    return tr


def test_flux2_editing_reference_tokens(bases, tmp_path, monkeypatch):
    """FLUX.2 editing through sample.main --image: the reference is VAE-encoded (mode), 2x2-patchified,
    batch-norm normalised and appended after the generated tokens with ids (10, row, col, 0) (recomputed here);
    the student reads the generated tokens only, so the image is piflow.sample of the stock model sliced that way
    (float image to roundoff.TOL, uint8 its rounding); another reference changes it by grey levels (a base whose
    image tokens attend strongly to the references). A reference over 1024^2 px is resized to that area (then cropped to 16 px)."""
    from einops import rearrange
    from PIL import Image
    ad, base = our_adapter("flux2", tmp_path / "ad"), str(tmp_path / "base")
    pipe = tiny_pipeline("flux2")
    reads_references(pipe.transformer)
    pipe.save_pretrained(base)
    rng = np.random.RandomState(0)
    for name in ("r1", "r2"):
        Image.fromarray(rng.randint(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    argv = ["--model", "flux2", "--adapter", ad, "--base", base, "--prompt", "make it night", "--height",
            "32", "--width", "48", "--seed", "3", "--nfe", "1"]
    decoded = record_decoded(monkeypatch)
    res = [sample.main(argv + ["--image", str(tmp_path / f"{r}.png"), "--out", str(tmp_path / f"{r}.png.grid.png")])
           for r in ("r1", "r2")]
    effect = np.abs(decoded[0] - decoded[1])
    print(f"reference r1 vs r2: float images differ by mean {effect.mean():.3g}, max {effect.max():.3g} grey levels; "
          f"{(res[0]['images'][0] != res[1]['images'][0]).mean():.1%} of uint8 values differ")
    # measured: mean 1.6, max 18 grey levels, 72 % of the uint8 values (round-off: 2e-4 grey level)
    assert effect.mean() > 50 * TOL and (res[0]["images"][0] != res[1]["images"][0]).mean() > 0.5
    vae = tiny_vae("flux2").eval()
    with torch.no_grad():
        px = torch.from_numpy(np.array(Image.open(tmp_path / "r1.png")).astype(np.float32) / 255).permute(2, 0, 1)[
            None] * 2 - 1                                   # the image processor's [0, 1] -> [-1, 1]
        z = rearrange(vae.encode(px).latent_dist.mode(), "b c (h ph) (w pw) -> b (c ph pw) h w", ph=2, pw=2)
        z = (z - vae.bn.running_mean.view(1, -1, 1, 1)) / (vae.bn.running_var + 1e-4).sqrt().view(1, -1, 1, 1)
    tokens = rearrange(z, "b c h w -> b (h w) c")                                     # (1, 4 x 5, 128)
    ids = torch.tensor([[10, i, j, 0] for i in range(4) for j in range(5)])[None]
    cond = dict(stock_cond("flux2", base, ["make it night"]), guidance=torch.tensor([4.0]),
                ref_tokens=tokens, ref_ids=ids)
    stock = reads_references(tiny_transformer("flux2")).eval()
    s, _, _, _ = t2i.student_from_adapter("flux2", reads_references(tiny_transformer("flux2")), ad, "--adapter", F32)
    seen = {}
    s.tr.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    noise = torch.randn(1, 32, 4, 6, generator=torch.Generator().manual_seed(3))
    x = piflow.sample(s.eval(), noise, cond, 1)
    torch.testing.assert_close(seen["hidden_states"][:, 6:], tokens, atol=1e-6, rtol=1e-5)
    assert torch.equal(seen["img_ids"][:, 6:].long(), ids)
    ref = decode_grey("flux2", vae, x)
    gap = assert_float_close(decoded[0], ref, what="flux2 edit")
    assert_quantised(res[0]["images"][0], ref[0], what="flux2 edit")
    print(f"sample.py vs recomputation: float gap {gap:.2e} grey levels")
    with torch.no_grad():                                  # the teacher: the stock model, generated tokens only
        torch.testing.assert_close(s.teacher(noise, torch.tensor([0.7]), cond),
                                   reference_u(stock, "flux2", noise, torch.tensor([0.7]), cond), atol=1e-5, rtol=1e-5)
    pipe = pipelines.piflow_pipeline("flux2", base, ad)
    n = {}
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: n.update(L=kw["hidden_states"].shape[1]),
                                               with_kwargs=True)
    big = Image.fromarray(rng.randint(0, 256, (1024, 1040, 3), dtype=np.uint8))      # 1040 x 1024 > 1024^2 px
    out = pipe("x", image=big, height=32, width=48, num_inference_steps=1)
    assert out.images[0].size == (48, 32) and n["L"] == 6 + (1008 // 16) * (1024 // 16)   # 1031 x 1016 -> crop


# ----------------------------------------------------------------------------------------------------------
# 4. Training runs, evaluation, safety and one-line errors
# ----------------------------------------------------------------------------------------------------------

def test_qwen_training_cfg_negative_init_adapter_ema_export(bases, tmp_path):
    """Qwen: the teacher is CFG 4 with the cached empty-prompt negative (checked against the stock model); the
    student starts from --init-adapter; the exported adapter is the EMA in fp16, not the raw student."""
    t, _ = write_released_adapter(str(tmp_path / "init"), "qwen")
    c = make_cache("qwen", 4, seed=2)
    argv = train_args("qwen", bases["qwen"], save_cache(c, tmp_path / "emb.pt"), tmp_path / "run", 2, "--guidance",
                      "4", "--init-adapter", str(tmp_path / "init"))
    att, _ = attachment(argv)
    assert all(torch.equal(p.detach(), t[k]) for k, p in att.trainable().items()) and set(att.trainable()) == set(t)
    ref = tiny_transformer("qwen").eval()
    x, sigma = torch.randn(2, 16, 4, 4), torch.tensor([0.4, 0.9])
    pos = cond_of("qwen", c, [1, 2])
    neg = {"prompt_embeds": c["negative_prompt_embeds"].expand(2, -1, -1), "mask": c["negative_mask"].expand(2, -1)}
    with torch.no_grad():
        u_pos, u_neg = reference_u(ref, "qwen", x, sigma, pos), reference_u(ref, "qwen", x, sigma, neg)
        torch.testing.assert_close(att.teacher(x, sigma, pos), u_neg + 4 * (u_pos - u_neg), atol=1e-5, rtol=1e-5)
    train_t2i.main(argv)
    ck = ckpt(tmp_path / "run")
    with safe_open(str(tmp_path / "run" / "adapter" / t2i.WEIGHTS), "pt") as f:
        exported, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert set(exported) == set(t) and all(torch.equal(exported[k], ck["ema"][k].half()) for k in exported)
    assert any(not torch.equal(exported[k], ck["student"][k].half()) for k in exported) and "guidance" not in meta
    assert json.load(open(tmp_path / "run" / "adapter" / "config.json"))["_class_name"] == \
        "GMQwenImageTransformer2DModel"


def tiny_clip(folder):
    """A random CLIPModel + CLIPProcessor (the character tokenizer) saved as a folder."""
    torch.manual_seed(7)
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=3, pad_token_id=0,
                         bos_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=8))
    proc = transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer(77))
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return model.eval(), proc


def test_clip_score_metric_and_training_evaluation(bases, tmp_path):
    """metrics.clip_score == max(100 mean cos(image, text) embeddings of the CLIPModel itself, 0) (torchmetrics'
    CLIPScore); train_t2i.py --eval-clip logs it at every --eval-every, on the EMA student's images."""
    from runtime import metrics
    model, proc = tiny_clip(str(tmp_path / "clip"))
    clip = metrics.load_clip(str(tmp_path / "clip"))
    images = torch.randint(0, 256, (3, 3, 32, 48), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    prompts = ["a cat", "two dogs", "a red house"]
    with torch.no_grad():
        inp = proc(text=prompts, images=list(images), return_tensors="pt", padding=True)
        a = model.get_image_features(pixel_values=inp["pixel_values"]).pooler_output
        b = model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).pooler_output
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert metrics.clip_score(images, prompts, clip) == pytest.approx(max(100 * cos.mean().item(), 0.0), abs=1e-4)
    cache = save_cache(make_cache("flux", 4), tmp_path / "emb.pt")
    train_t2i.main(train_args("flux", bases["flux"], cache, tmp_path / "run", 2, "--eval-clip", str(tmp_path / "clip"),
                              "--eval-every", "1", "--eval-prompts", "2", "--log-every", "1"))
    logged = [ln for ln in (tmp_path / "run" / "log.txt").read_text().splitlines() if "eval EMA" in ln]
    assert len(logged) == 2 and all(" clip " in ln for ln in logged)


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
    ad = our_adapter("flux", tmp_path / "ad")
    bad_ad = tmp_path / "bad_ad"                                      # pickle bytes under the safetensors name
    shutil.copytree(ad, bad_ad)
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
        (lambda: smp("--embed-cache", str(evil), "--adapter", ad, "--base", bases["flux"]), "needs unpickling"),
        (lambda: smp("--adapter", str(evil), "--base", bases["flux"], "--embed-cache", cache),
         "expected an adapter folder"),
        (lambda: smp("--adapter", str(bad_ad), "--base", bases["flux"], "--embed-cache", cache), "not a readable"),
        (lambda: smp("--adapter", ad, "--base", str(bad_base), "--embed-cache", cache), "--base="),
        (lambda: train_t2i.main(train_args("flux", bases["flux"], str(evil), tmp_path / "r1", 1)), "needs unpickling"),
        (lambda: train_t2i.main(train_args("flux", str(bad_base), cache, tmp_path / "r3", 1)), "--base="),
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
    for name in ("load_pretrained", "load_pipeline", "encode_prompts"):
        monkeypatch.setattr(t2i_data, name, heavy)
    flux_ad, qwen_ad = tmp_path / "flux_ad", tmp_path / "qwen_ad"
    write_released_adapter(str(flux_ad), "flux")
    write_released_adapter(str(qwen_ad), "qwen")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    malformed = tmp_path / "malformed"
    shutil.copytree(flux_ad, malformed)
    (malformed / "config.json").write_text('{"_class_name": "GMFluxTransformer2DModel",')
    out = str(tmp_path / "o.png")
    smp = lambda *a: sample.main(["--prompt", "a cat", "--out", out] + list(a))
    trn = lambda *a: train_t2i.main(["--out", str(tmp_path / "run"), "--no-progress"] + list(a))
    cases = [(lambda: smp("--model", "flux", "--adapter", str(qwen_ad)), "is a qwen adapter"),
             (lambda: smp("--model", "flux", "--adapter", str(tmp_path / "unet")), "unknown adapter class"),
             (lambda: smp("--model", "flux", "--adapter", str(malformed)),
              f"{str(malformed / 'config.json')!r} is not valid JSON (Expecting property name"),
             (lambda: smp("--model", "flux", "--adapter", str(flux_ad), "--guidance", "4"), "--guidance=4.0"),
             (lambda: smp("--model", "flux2", "--adapter", str(flux_ad)), "is a flux adapter"),
             (lambda: smp("--model", "qwen", "--adapter", str(qwen_ad), "--height", "1000"), "--height=1000"),
             (lambda: smp("--model", "qwen", "--adapter", str(qwen_ad), "--guidance", "3"), "take no guidance"),
             (lambda: smp("--model", "qwen", "--adapter", str(qwen_ad), "--prompts", str(tmp_path / "no.txt")),
              "--prompts="),
             (lambda: smp("--model", "sd3"), "--adapter: --model sd3 has no released adapter"),
             (lambda: smp("--model", "flux2", "--adapter", str(flux_ad), "--image", str(tmp_path / "no.png")),
              "--image="),
             (lambda: trn("--model", "flux"), "give --prompts"),
             (lambda: trn("--model", "flux", "--resolution", "1000", "--prompts", out), "--resolution=1000"),
             (lambda: trn("--model", "qwen", "--prompts", __file__, "--init-adapter", str(flux_ad)),
              "is a flux adapter"),
             (lambda: trn("--model", "flux", "--prompts", __file__, "--init-adapter", str(flux_ad)), "--K 2"),
             (lambda: trn("--model", "flux", "--prompts", __file__, "--init-adapter", str(flux_ad), "--K", "2"),
              "--lora-rank=256 differs from --init-adapter's LoRA rank 4"),
             (lambda: trn("--model", "sd3", "--prompts", __file__, "--eval-clip", str(tmp_path / "noclip")),
              "--eval-clip="),
             (lambda: trn("--model", "qwen", "--prompts", str(tmp_path / "no.txt")), "--prompts=")]
    for fn, says in cases:
        assert says in one_line_error(capsys, fn)


def test_malformed_base_folder_is_one_line(bases, tmp_path, capsys):
    """A base folder whose model_index.json (or a component's config.json) is malformed JSON: one line naming --base,
    exit 2, no PNG."""
    ad = our_adapter("flux", tmp_path / "ad")
    for name in ("model_index.json", "transformer/config.json"):
        base = tmp_path / name.replace("/", "_")
        shutil.copytree(bases["flux"], base)
        (base / name).write_text('{"_class_name": ')
        out = tmp_path / "o.png"
        line = one_line_error(capsys, lambda: sample.main(["--model", "flux", "--adapter", ad, "--base", str(base),
                                                           "--prompt", "a", "--out", str(out)]))
        assert f"--base={str(base)!r}: cannot load" in line and not out.exists(), line
        print(line)


def test_non_finite_samples_are_refused(bases, tmp_path, monkeypatch, plant_nan):
    """Non-finite latents (here: a sampler planted to return one NaN) are refused by the pipeline with one line
    instead of being decoded into NaN images (sample.py then writes nothing); an inf temperature is refused as a
    setting."""
    pipe = pipelines.piflow_pipeline("flux", bases["flux"], our_adapter("flux", tmp_path / "ad"))
    real = plant_nan(5)
    with pytest.raises(common.UserError, match="the sampled latents: 1 of 256 values are NaN or inf; nothing written"):
        pipe("a cat", height=32, width=32)
    monkeypatch.setattr(piflow, "sample", real)
    with pytest.raises(ValueError, match="temperature=inf is not accepted"):
        pipe("a cat", height=32, width=32, temperature=float("inf"))


def test_hub_offline_and_help(bases, tmp_path, capsys, monkeypatch):
    """Unreachable hub ids (released adapter, base) give one line naming the id and what to do (HF_HUB_OFFLINE=1:
    the real hub code); sample.py --model M --help lists M's options with their defaults."""
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)     # whatever was imported before
    out = str(tmp_path / "o.png")
    for model, adapter in (("flux", "gmflux_k8_piid_4step"), ("flux2", "gmflux2_k8_piid_4step")):
        line = one_line_error(capsys, lambda: sample.main(["--model", model, "--prompt", "a cat", "--out", out]))
        assert f"--adapter={adapter!r} (not a local path; hub {t2i.KNOWN[adapter][0]}/{adapter}/config.json) is " \
               "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in line
    line = one_line_error(capsys, lambda: sample.main(["--model", "qwen", "--adapter", "Lakonik/pi-Qwen-Image:"
                                                       "gmqwen_k8_piid_4step", "--prompt", "a", "--out", out]))
    assert "hub Lakonik/pi-Qwen-Image/gmqwen_k8_piid_4step/config.json" in line
    ad = our_adapter("sd3", tmp_path / "ad")
    cache = save_cache(make_cache("sd3", 1), tmp_path / "emb.pt")
    line = one_line_error(capsys, lambda: sample.main(["--model", "sd3", "--adapter", ad, "--embed-cache", cache,
                                                       "--out", out]))
    assert "--base='stabilityai/stable-diffusion-3.5-large': cannot load StableDiffusion3Pipeline" in line
    for model in ("flux2", "sd3"):
        with pytest.raises(SystemExit):
            sample.main(["--model", model, "--help"])
        text = capsys.readouterr().out
        assert f"--model {model}" in text and "--adapter" in text and "--cpu-offload" in text
        assert ("--image IMAGE" in text) == (model == "flux2") and ("default: 4.0" in text) == (model == "flux2")


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

    def fake_encode(fam, base, prompts, device, dtype, max_len, negative=False):
        seen.extend(prompts)
        c = make_cache("flux", len(prompts))
        return {"prompt_embeds": c["prompt_embeds"], "pooled": c["pooled"]}
    monkeypatch.setattr(t2i_data, "encode_prompts", fake_encode)
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
