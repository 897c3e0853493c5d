"""GPU memory plan of π-ID distillation on one GPU (train_t2i.py --base-quant, --grad-checkpointing): every figure
computed here, none measured on a GPU.

    python -m tools.memory_plan                  # the table of docs/one-gpu.md (Markdown)
    python -m tools.memory_plan --json plan.json # also every figure as JSON
    python -m tools.memory_plan --model flux2 --lora-rank 64     # another LoRA rank (train_t2i.py --lora-rank)

For FLUX.1-dev, FLUX.2-dev, Qwen-Image and SD3.5-large this builds the released architecture on the meta device
(no weights, no memory: the diffusers class with the config values below, each checked against the released
config.json) and the student exactly as train_t2i.py does (t2i.T2IStudent with the default GM head, K = 8, and the
published LoRA targets, t2i.FAMILIES[m].lora, at r = 256), then counts:

  base weights    every parameter of the frozen transformer, at bf16 (2 B), int8 (bitsandbytes Linear8bitLt: 1 B
                  per linear weight + one fp32 scale per output row) and nf4 (Linear4bit: 0.5 B per linear weight +
                  one fp32 absmax per 64 weights); biases, norms, embeddings and the head (proj_out, norm_out: never
                  quantised, t2i.quantise_base) stay bf16
  trainables      LoRA + GM head + norm_out (t2i.T2IStudent.trainable): fp32 master (4 B), fp32 gradient (4 B), the
                  trainer's fp32 EMA (4 B), a bf16 autocast copy during the forward (2 B), and AdamW's two fp32
                  moments (8 B) or bitsandbytes AdamW8bit's two 8-bit moments (2 B + one fp32 absmax per 256)
  activations     what autograd keeps for the backward of one student forward of one 1024 x 1024 sample (π-ID runs
                  one student forward with gradients per segment, and frees it in that segment's backward): counted
                  by torch.autograd.graph.saved_tensors_hooks on the meta forward in bf16, each storage once, the
                  frozen weights left out. Attention is replaced by a stand-in that saves what a fused (flash /
                  memory-efficient) kernel saves: q, k, v, the output and a fp32 logsumexp. Frozen bf16 and nf4
                  linears keep nothing of their input (bitsandbytes 0.50 MatMul4Bit saves only the packed weight);
                  int8 ones keep their input (MatMul8bitLt saves A for the backward): counted for int8.
                  With gradient checkpointing (diffusers' enable_gradient_checkpointing: each transformer block
                  recomputed in the backward): what the forward keeps outside the blocks + every block's inputs
                  (counted by forward pre-hooks) + the largest single block's saved tensors (the one being
                  recomputed)
  text encoders   counted the same way (transformers classes on meta): used once, to build the prompt cache
                  (t2i_data.training_cache), then freed before the transformer loads; never during training
  reserve         RESERVE_GIB for the CUDA context, cuBLAS workspace, allocator fragmentation, a layer's transient
                  dequantised weight, the no-grad teacher forwards and the backward's transient gradients: an
                  assumption, not measured

A micro-batch of m samples fits a card of G GiB when base + trainables + m x activations + reserve <= G.
"""
import argparse
import contextlib
import dataclasses
import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import piflow
from models import t2i

GIB = 2 ** 30
RESERVE_GIB = 3.0             # assumed, not measured (see the docstring)
CARDS_GIB = (24, 48)
RANK, K, RES = 256, 8, 1024   # published LoRA rank and GM components (Table 9); image size

# The released transformer configs (transformer/config.json of each hub repo), as checked for this plan:
#   FLUX.1-dev: diffusers' FluxTransformer2DModel defaults are the released sizes (19 double + 38 single blocks,
#     24 heads x 128, T5 4096, CLIP pooled 768; axes 16/56/56) except guidance_embeds, true for -dev (BFL flux
#     repo, flux-dev params: guidance_embed=True)
#   FLUX.2-dev: Flux2Transformer2DModel defaults = BFL flux2 Flux2Params of FLUX.2-dev (in_channels 128, context
#     15360 = 3 x 5120 Mistral layers, hidden 6144 = 48 x 128, depth 8 + 48 single, mlp_ratio 3, axes 4 x 32,
#     theta 2000, guidance embedding)
#   Qwen-Image: QwenImageTransformer2DModel defaults (60 blocks, 24 x 128, joint 3584 = Qwen2.5-VL-7B width,
#     in 64, out 16, patch 2, axes 16/56/56)
#   SD3.5-large: NOT the SD3Transformer2DModel defaults (those are SD3-medium's 18 x 64 heads): 38 blocks,
#     38 heads x 64 (2432), caption projection 2432, pooled 2048, T5 4096, pos_embed_max_size 192, qk_norm rms_norm,
#     no dual-attention layers (stabilityai/stable-diffusion-3.5-large transformer/config.json)
CONFIGS = {
    "flux": dict(guidance_embeds=True),
    "flux2": dict(),
    "qwen": dict(),
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
                dual_attention_layers=()),
}
NAMES = {"flux": "FLUX.1-dev", "flux2": "FLUX.2-dev", "qwen": "Qwen-Image", "sd3": "SD3.5-large"}
# text tokens the transformer sees at training: the pipeline's max_sequence_length (Qwen: the cache pads to 512,
# the call keeps the longest prompt: 512 is the worst case); SD3: 256 T5 + 77 CLIP tokens side by side
TEXT_TOKENS = {"flux": 512, "flux2": 512, "qwen": 512, "sd3": 333}
TEXT_WIDTH = {"flux": 4096, "flux2": 15360, "qwen": 3584, "sd3": 4096}

# Text encoders of each pipeline (transformers classes; config.json of each text_encoder* folder):
#   CLIP ViT-L/14 text: 768 wide, 12 layers, 12 heads, MLP 3072, 49408 tokens, 77 positions, projection 768
#   OpenCLIP bigG text (SD3.5 text_encoder_2): 1280 wide, 32 layers, 20 heads, MLP 5120, projection 1280
#   T5 v1.1 XXL encoder: d_model 4096, 24 layers, 64 heads x 64, gated-GELU d_ff 10240, 32128 tokens
#   Qwen2.5-VL-7B-Instruct: text 3584 wide, 28 layers, 28 heads / 4 KV, MLP 18944, 152064 tokens (untied head);
#     vision 32 blocks of 1280, 16 heads, MLP 3420, out 3584, patch 14, merge 2, temporal patch 2
#   Mistral-Small-3.1-24B (FLUX.2): text 5120 wide, 40 layers, 32 heads / 8 KV x 128, MLP 32768, 131072 tokens
#     (untied head); Pixtral vision 1024 wide, 24 layers, 16 heads, MLP 4096, patch 14; projector with merge 2
def _clip_l():
    import transformers
    return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, projection_dim=768))


def _clip_g():
    import transformers
    return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, projection_dim=1280))


def _t5():
    import transformers
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu"))


def _qwen_vl():
    import transformers
    return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        tie_word_embeddings=False))


def _mistral3():
    import transformers
    return transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                         num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         tie_word_embeddings=False),
        vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, head_dim=64, patch_size=14, image_size=1540),
        spatial_merge_size=2, tie_word_embeddings=False))


ENCODERS = {"flux": {"CLIP-L": _clip_l, "T5-XXL": _t5}, "flux2": {"Mistral-Small-3.1-24B": _mistral3},
            "qwen": {"Qwen2.5-VL-7B": _qwen_vl}, "sd3": {"CLIP-L": _clip_l, "CLIP-bigG": _clip_g, "T5-XXL": _t5}}


#################################################################################
#                          Building on the meta device                          #
#################################################################################

def build(model, dtype=torch.bfloat16):
    """The student of train_t2i.py --model M on the released architecture, on the meta device: (student, base)."""
    import diffusers
    fam = t2i.FAMILIES[model]
    with torch.device("meta"):
        tr = getattr(diffusers, fam.transformer)(**CONFIGS[model]).to(dtype)
        s = t2i.T2IStudent(fam, tr, t2i.Head("gm", K), dtype, {}, teacher=False, init=False)
        s.add_lora(fam.lora(tr), RANK, 0.05)
    return s, tr


def quantisable(tr):
    """{name: nn.Linear} of what t2i.quantise_base quantises (every plain linear of the base but the head)."""
    return {n: m for n, m in tr.named_modules() if type(m) is nn.Linear and not t2i._is_head(n)
            and t2i.LORA not in n and ".lora_" not in n}


def base_bytes(tr, trainable):
    """Frozen base weights at bf16 / int8 / nf4 (bytes), and its parameter count."""
    lin = quantisable(tr)
    frozen = {n: p for n, p in tr.named_parameters() if id(p) not in {id(q) for q in trainable.values()}}
    weights = sum(m.weight.numel() for m in lin.values())
    rows = sum(m.out_features for m in lin.values())
    rest = sum(p.numel() for p in frozen.values()) - weights
    assert all(m.weight.numel() % 64 == 0 for m in lin.values())          # whole NF4 blocks
    return {"params": weights + rest, "quantised_params": weights,
            "bf16": 2 * (weights + rest), "int8": weights + 4 * rows + 2 * rest,
            "nf4": weights // 2 + 4 * (weights // 64) + 2 * rest}


def trainable_bytes(n):
    """Per-optimizer bytes of n trainable parameters (fp32 master, grad, EMA, bf16 autocast copy + moments)."""
    common = (4 + 4 + 4 + 2) * n
    return {"adamw": common + 8 * n, "adamw8bit": common + 2 * n + 2 * 4 * (-(-n // 256))}


#################################################################################
#                   Activations: saved tensors of one forward                   #
#################################################################################

class _FlashSDPA(torch.autograd.Function):
    """Stand-in for F.scaled_dot_product_attention that keeps what a fused GPU kernel keeps for its backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError


@contextlib.contextmanager
def flash_attention():
    real = F.scaled_dot_product_attention

    def sdpa(query=None, key=None, value=None, *args, **kw):
        q, k, v = (kw.pop(n) if t is None else t for n, t in (("q", query), ("k", key), ("v", value)))
        if kw.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
            k, v = (t.repeat_interleave(q.shape[-3] // t.shape[-3], -3) for t in (k, v))
        return _FlashSDPA.apply(q, k, v)
    F.scaled_dot_product_attention = torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = torch.nn.functional.scaled_dot_product_attention = real


class _Int8Input(nn.Module):
    """A frozen linear that, like bitsandbytes' MatMul8bitLt, keeps its input for the backward."""

    def __init__(self, lin, keep):
        super().__init__()
        self.lin, self.keep = lin, keep

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            self.keep(x)
        return self.lin(x)


def inputs(model, B=1, dtype=torch.bfloat16):
    fam, h = t2i.FAMILIES[model], RES // 8
    e = lambda *s, dt=dtype: torch.empty(*s, device="meta", dtype=dt)
    cond = {"prompt_embeds": e(B, TEXT_TOKENS[model], TEXT_WIDTH[model])}
    if model == "flux":
        cond["pooled"] = e(B, 768)
    if model == "sd3":
        cond["pooled"] = e(B, 2048)
    if fam.guidance == "distilled":
        cond["guidance"] = e(B, dt=torch.float32)
    return e(B, fam.channels, h, h, dt=torch.float32).requires_grad_(False), e(B, dt=torch.float32), cond


def _qwen_meta_call(tr, x, sigma, cond):
    """_qwen_call without the data-dependent prompt trimming (meta tensors hold no values): every text token valid."""
    from diffusers import QwenImagePipeline as P
    B, C, H, W = x.shape
    return tr(hidden_states=P._pack_latents(x, B, C, H, W), encoder_hidden_states=cond["prompt_embeds"],
              encoder_hidden_states_mask=None, timestep=sigma, img_shapes=[[(1, H // 2, W // 2)]] * B,
              return_dict=False)[0]


def activations(model, kind):
    """Bytes autograd keeps for one training forward of one 1024^2 sample: (without, with gradient checkpointing),
    and the breakdown {outside, block inputs, largest block}."""
    s, tr = build(model)
    if model == "qwen":
        s.fam = dataclasses.replace(s.fam, call=_qwen_meta_call)
    s.train()
    s.trainable(train=True)
    params = {p.untyped_storage()._cdata for p in tr.parameters()}
    seen, where, stack, block_in = {}, {}, ["outside"], {}

    def keep(t):
        st = t.untyped_storage()
        if st._cdata not in params and st._cdata not in seen:
            seen[st._cdata], where[st._cdata] = st.nbytes(), stack[-1]
            seen.setdefault(("ref", st._cdata), t)            # keep it alive: _cdata stays unique
        return t

    blocks = [b for blocks in tr.children() if isinstance(blocks, nn.ModuleList) for b in blocks]
    for i, b in enumerate(blocks):
        def pre(mod, args, kwargs, i=i):
            stack.append(i)
            for t in list(args) + list(kwargs.values()):
                for u in (t if isinstance(t, (tuple, list)) else (t,)):
                    if isinstance(u, torch.Tensor):
                        block_in.setdefault(u.untyped_storage()._cdata, u.untyped_storage().nbytes())
        b.register_forward_pre_hook(pre, with_kwargs=True)
        b.register_forward_hook(lambda *a: [stack.pop()] and None)
    if kind == "int8":
        for n, m in quantisable(tr).items():
            parent, _, child = n.rpartition(".")
            holder = tr.get_submodule(parent) if parent else tr
            setattr(holder, child, _Int8Input(m, keep))
    x, sigma, cond = inputs(model)
    real = piflow.gm_policy                    # checks sigma's values, which meta tensors do not hold: the raw head
    piflow.gm_policy = lambda means, logits, logstds, x_t, sigma: (means, logits, logstds)      # outputs instead
    try:
        with flash_attention(), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = s(x, sigma, cond)
    finally:
        piflow.gm_policy = real
    for t in out:                               # the policy's inputs (its float32 copies: < 10 MB)
        keep(t)
    sizes = {k: v for k, v in seen.items() if not isinstance(k, tuple)}
    per_block = {}
    for k, v in sizes.items():
        per_block[where[k]] = per_block.get(where[k], 0) + v
    outside = per_block.pop("outside", 0)
    ins = sum(v for k, v in block_in.items() if k not in params)
    largest = max(per_block.values())
    return {"no_ckpt": outside + sum(per_block.values()), "ckpt": outside + ins + largest,
            "outside": outside, "block_inputs": ins, "largest_block": largest, "blocks": len(blocks)}


def encoder_bytes(model):
    out = {}
    for name, make in ENCODERS[model].items():
        with torch.device("meta"):
            n = sum(p.numel() for p in make().parameters())
        out[name] = n
    return out


#################################################################################
#                                     Plan                                      #
#################################################################################

def plan(model):
    s, tr = build(model)
    trainable = s.trainable()
    lora = sum(p.numel() for k, p in trainable.items() if ".lora_" in k)
    head = sum(p.numel() for k, p in trainable.items() if ".lora_" not in k)
    base = base_bytes(tr, trainable)
    opt = trainable_bytes(lora + head)
    acts = {kind: activations(model, kind) for kind in ("nf4", "int8")}
    acts["bf16"] = acts["nf4"]                      # a frozen bf16 linear keeps no input either
    enc = encoder_bytes(model)
    rows = {}
    for prec in ("bf16", "int8", "nf4"):
        for optim in ("adamw", "adamw8bit"):
            for ck in ("ckpt", "no_ckpt"):
                fixed = base[prec] + opt[optim] + RESERVE_GIB * GIB
                per = acts[prec][ck]
                rows[(prec, optim, ck)] = {"fixed": fixed, "per_sample": per,
                                           **{f"fits_{g}": max(0, int((g * GIB - fixed) // per)) for g in CARDS_GIB}}
    return {"model": model, "name": NAMES[model], "base": base, "lora": lora, "head": head, "optim": opt,
            "acts": acts, "encoders": enc, "rows": rows}


def gib(b):
    return f"{b / GIB:.1f}"


def markdown(plans):
    out = [f"| model | base params | base bf16 / int8 / nf4 (GiB) | LoRA r={RANK} + head params | trainables + AdamW / "
           "AdamW8bit (GiB) | activations per 1024² sample, no ckpt / ckpt (GiB) | text encoders (params; bf16 GiB) |",
           "|---|---|---|---|---|---|---|"]
    for p in plans:
        b, a = p["base"], p["acts"]
        enc = ", ".join(f"{k} {v / 1e9:.2f} B" for k, v in p["encoders"].items())
        out.append(f"| {p['name']} | {b['params'] / 1e9:.2f} B | {gib(b['bf16'])} / {gib(b['int8'])} / {gib(b['nf4'])}"
                   f" | {p['lora'] / 1e6:.0f} M + {p['head'] / 1e6:.1f} M | {gib(p['optim']['adamw'])} / "
                   f"{gib(p['optim']['adamw8bit'])} | bf16, nf4: {gib(a['nf4']['no_ckpt'])} / {gib(a['nf4']['ckpt'])}; "
                   f"int8: {gib(a['int8']['no_ckpt'])} / {gib(a['int8']['ckpt'])} | {enc}; "
                   f"{gib(2 * sum(p['encoders'].values()))} |")
    out += ["", f"Largest micro-batch (--micro-batch) that fits, with gradient checkpointing (without it in brackets);"
            f" {RESERVE_GIB:g} GiB reserve; 0 = does not fit:", "",
            "| model | base | AdamW: 24 GiB | AdamW: 48 GiB | AdamW8bit: 24 GiB | AdamW8bit: 48 GiB | fixed (base + "
            "trainables + reserve, AdamW8bit) |", "|---|---|---|---|---|---|---|"]
    for p in plans:
        for prec in ("bf16", "int8", "nf4"):
            r = p["rows"]
            cell = lambda o, g: f"{r[(prec, o, 'ckpt')][f'fits_{g}']} ({r[(prec, o, 'no_ckpt')][f'fits_{g}']})"
            out.append(f"| {p['name']} | {prec} | {cell('adamw', 24)} | {cell('adamw', 48)} | "
                       f"{cell('adamw8bit', 24)} | {cell('adamw8bit', 48)} | {gib(r[(prec, 'adamw8bit', 'ckpt')]['fixed'])} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="GPU memory plan of one-GPU pi-ID training (computed on the meta device)")
    p.add_argument("--model", action="append", choices=list(t2i.FAMILIES), default=None,
                   help="model(s) to plan (default: all four)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--lora-rank", type=int, default=RANK, help="LoRA rank r (default: %(default)s, Table 9)")
    args = p.parse_args(argv)
    globals()["RANK"] = args.lora_rank
    plans = [plan(m) for m in args.model or list(t2i.FAMILIES)]
    print(markdown(plans))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(pl, rows={"/".join(k): v for k, v in pl["rows"].items()}) for pl in plans], f, indent=1)
    return plans


if __name__ == "__main__":
    sys.exit(main() and 0)
