"""Tests of the quantised frozen base (t2i.quantise_base / load_base; train_t2i.py and sample.py --base-quant,
pipelines.piflow_pipeline(base_quant=)) and of gradient checkpointing, on test_t2i.py's tiny bases (the real
diffusers classes) quantised by bitsandbytes' own layers on the CPU (diffusers' BitsAndBytesConfig needs a GPU).

Ground truth: NF4 recomputed from its definition (QLoRA, Dettmers et al. 2023, §3: the 16 values are quantiles of
N(0, 1), scipy here; blocks of 64 weights scaled by their absmax), the stock model run on those rounded weights,
and the full-precision student. No test here needs CUDA.
"""
import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"        # before bitsandbytes: on AVX512-BF16 CPUs its import asks the hub for a kernel

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn

import bitsandbytes as bnb                             # a requirement: the CPU path of --base-quant
import test_t2i as T                                   # tiny bases, caches, the independent teacher, six steps
from test_t2i import F32, MODELS

import piflow  # noqa: E402
import sample  # noqa: E402
import train_t2i  # noqa: E402
from models import pipelines, t2i  # noqa: E402


pytestmark = pytest.mark.usefixtures("flush_denormals")   # conftest.py
HEAD_LAYERS = {"proj_out", "norm_out.linear"}              # the base's output layers: never quantised
# test_t2i's tiny bases made 64 wide (2 heads of 32, 64-wide text and pooled embeddings): every linear layer's
# rows are whole 64-weight NF4 blocks, as in every released base (bitsandbytes 0.50.2's CPU dequantisation is wrong
# for other row lengths: test_cpu_probe_of_the_bitsandbytes_row_flaw)
WIDE = {"flux": dict(attention_head_dim=32, axes_dims_rope=(8, 12, 12), joint_attention_dim=64,
                     pooled_projection_dim=64),
        "flux2": dict(attention_head_dim=32, axes_dims_rope=(8, 8, 8, 8), joint_attention_dim=64,
                      timestep_guidance_channels=64),
        "qwen": dict(attention_head_dim=32, axes_dims_rope=(8, 12, 12), joint_attention_dim=64),
        "sd3": dict(attention_head_dim=32, joint_attention_dim=64, caption_projection_dim=64,
                    pooled_projection_dim=64)}


def tiny(model, seed=0):
    return T.tiny_transformer(model, seed, **WIDE[model])


def wide_cache(model, P, seed=0):
    """test_t2i.make_cache's layout with 64-wide prompt and pooled embeddings (Qwen: zero past the mask)."""
    c, g = T.make_cache(model, P, seed), torch.Generator().manual_seed(seed + 100)
    for k in [k for k in c if k.endswith(("prompt_embeds", "pooled"))]:
        c[k] = torch.randn(*c[k].shape[:-1], 64, generator=g)
        mask = c.get(k.replace("prompt_embeds", "mask")) if k.endswith("prompt_embeds") else None
        if mask is not None:
            c[k] = c[k] * mask[..., None]
    return c


def nf4_code():
    """The NF4 values (QLoRA §3): 8 positive quantiles q(p) of N(0, 1) at p = linspace(d, 1/2, 9)[:-1], 7 negative
    ones -q(p) at p = linspace(d, 1/2, 8)[:-1], and 0, scaled to [-1, 1]; d = 1 - (1/32 + 1/30) / 2 makes the
    extreme quantiles finite (the paper's offset)."""
    d = 1 - (1 / 32 + 1 / 30) / 2
    v = np.concatenate([scipy.stats.norm.ppf(np.linspace(d, 0.5, 9)[:-1]), [0.0],
                        -scipy.stats.norm.ppf(np.linspace(d, 0.5, 8)[:-1])])
    return torch.tensor(np.sort(v / np.abs(v).max()), dtype=torch.float64)


def nf4_round(w, code):
    """w rounded to NF4 as the definition says: row-major blocks of 64 weights, each scaled by its absmax (fp32),
    every weight the nearest code value times that absmax. Returns (rounded, runner-up, tie): tie marks weights
    within 1e-6 (in absmax units) of the midpoint of two codes, where round-off decides which is nearest."""
    flat = w.detach().double().flatten()
    out, alt, tie = torch.empty_like(flat), torch.empty_like(flat), torch.zeros(flat.shape, dtype=torch.bool)
    for i in range(0, flat.numel(), 64):
        blk = flat[i:i + 64]
        a = blk.abs().max().float().double()
        dist, idx = (blk[:, None] / a - code[None]).abs().topk(2, dim=1, largest=False)
        out[i:i + 64], alt[i:i + 64] = (code[idx].float().double() * a).unbind(1)
        tie[i:i + 64] = dist[:, 1] - dist[:, 0] < 1e-6
    return out.float().view(w.shape), alt.float().view(w.shape), tie.view(w.shape)


def float_linears(tr):
    return {n for n, m in tr.named_modules() if type(m) is nn.Linear}


def nf4_reference(model, tr=None, seed=0):
    """(stock tiny model, a copy with every linear weight but the head's rounded to NF4 by nf4_round). With `tr`
    (the same base quantised by t2i.quantise_base): its dequantised weights must be those roundings, a tie taking
    either neighbour; the copy then takes tr's choice at ties (at most a few weights)."""
    from bitsandbytes import functional as bf
    fp = tiny(model, seed)
    ref, code = copy.deepcopy(fp).eval(), nf4_code()
    with torch.no_grad():
        for n in float_linears(ref) - HEAD_LAYERS:
            w = ref.get_submodule(n).weight
            r, alt, tie = nf4_round(w, code)
            if tr is not None:
                m = tr.get_submodule(n)
                m = getattr(m, "base_layer", m)
                d = bf.dequantize_4bit(m.weight.data, m.weight.quant_state)
                near = lambda v: (d - v).abs() <= 1e-6 * v.abs().max()
                assert (near(r) | (tie & near(alt))).all(), n
                r = torch.where(tie, d, r)
            w.copy_(r)
    return fp, ref


def quantised(model, kind="nf4", seed=0):
    tr = tiny(model, seed)
    names = float_linears(tr) - HEAD_LAYERS
    assert set(t2i.quantise_base(tr, kind, F32)) == names and len(names) >= 10
    return tr


def inputs(model, seed=0, B=2):
    C = t2i.FAMILIES[model].channels
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, 4, 6, generator=g), torch.tensor([0.35, 0.85][:B]),
            T.cond_of(model, wide_cache(model, B, seed=seed + 3), list(range(B))))


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------------------
# 1. The quantised base: which layers, the teacher, six π-ID steps
# ----------------------------------------------------------------------------------------------------------

def test_nf4_code_is_bitsandbytes_table():
    """Our NF4 values from the definition == the table bitsandbytes quantises with (to 2e-7: its own float32
    linspace), and nf4_round == bitsandbytes' round trip."""
    from bitsandbytes import functional as bf
    code = nf4_code()
    assert code.numel() == 16 and code[0] == -1 and code[-1] == 1 and (code == 0).sum() == 1
    torch.testing.assert_close(code.float(), bf.get_4bit_type("nf4", device="cpu").sort().values, atol=2e-7, rtol=0)
    w = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    q, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    torch.testing.assert_close(bf.dequantize_4bit(q, state), nf4_round(w, code)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("model", MODELS)
def test_nf4_teacher_is_the_stock_model_on_nf4_weights(model):
    """quantise_base turns every nn.Linear but proj_out / norm_out.linear into a 4-bit Linear4bit (packed uint8,
    half a byte per weight); the student's heads stay float; the teacher (the same module, LoRA off) equals the
    stock model run on NF4-rounded weights (nf4_round) to round-off (1e-5 of its scale), and differs from the
    full-precision stock model by the NF4 error (> 1 %)."""
    tr = quantised(model)
    fp, ref = nf4_reference(model, tr)
    for n in float_linears(fp) - HEAD_LAYERS:
        m, w = tr.get_submodule(n), fp.get_submodule(n).weight
        assert type(m) is bnb.nn.Linear4bit and m.weight.dtype == torch.uint8 and m.weight.numel() * 2 == w.numel()
    s = T.student(model, tr, K=2).eval()
    T.perturb(s, 4)                                            # LoRA on, trained-looking heads
    assert all(type(m) is nn.Linear for h in s.heads() + [tr.norm_out] for m in h.modules() if isinstance(m, nn.Linear))
    wrapped = {n for n, m in tr.named_modules() if hasattr(m, "lora_A")}
    assert wrapped and all(type(tr.get_submodule(n).base_layer) is bnb.nn.Linear4bit for n in wrapped)
    x, sigma, cond = inputs(model)
    with torch.no_grad():
        u, u_ref, u_fp = s.teacher(x, sigma, cond), T.reference_u(ref, model, x, sigma, cond), \
            T.reference_u(fp.eval(), model, x, sigma, cond)
    torch.testing.assert_close(u, u_ref, atol=1e-5 * float(u_ref.abs().max()), rtol=1e-5)
    assert rel(u, u_fp) > 0.01


def test_six_piid_steps_on_an_nf4_base_lower_the_loss():
    """Six π-ID steps (Alg. 3) of the LoRA + GM head on a 4-bit FLUX base lower the loss on a fixed batch to
    < 0.7 x; the loss equals the one computed with the independent teacher (stock model, NF4-rounded weights)."""
    tr = quantised("flux")
    ref = nf4_reference("flux", tr)[1]
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    s = T.student("flux", tr, K=2, nfe=2)
    before, after = T.six_steps_lower_the_loss(s, None, lambda x, sigma, c: T.reference_u(ref, "flux", x, sigma, c),
                                               noise, inputs("flux")[2],
                                               T.piid_cfg())
    print(f"nf4 FLUX base: pi-ID loss {before:.4f} -> {after:.4f} after 6 Adam steps ({after / before:.3f} x)")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in s.trainable().values())


def test_int8_base_layers_teacher_and_gradients():
    """int8: every non-head linear a Linear8bitLt (int8 weight, one fp32 scale per row); the teacher's deviation
    from the full-precision model is below NF4's / 4 (LLM.int8() keeps 8 bits) but not zero; one π-ID step reaches
    every LoRA tensor with a finite, non-zero gradient."""
    tr = quantised("flux", "int8")
    for n in float_linears(tiny("flux")) - HEAD_LAYERS:
        m = tr.get_submodule(n)
        assert type(m) is bnb.nn.Linear8bitLt and m.weight.dtype == torch.int8 and m.weight.SCB.numel() == \
            m.out_features
    s, s4, sf = (T.student("flux", b, K=2, nfe=2) for b in (tr, quantised("flux"), tiny("flux")))
    x, sigma, cond = inputs("flux")
    with torch.no_grad():
        u_fp = sf.teacher(x, sigma, cond)
        e8, e4 = rel(s.teacher(x, sigma, cond), u_fp), rel(s4.teacher(x, sigma, cond), u_fp)
    print(f"teacher deviation from full precision: int8 {e8:.4f}, nf4 {e4:.4f}")
    assert 0 < e8 < e4 / 4
    T.perturb(s, 1)
    s.trainable(train=True)
    piflow.piid_data_free(s, s.teacher, torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)), cond,
                          T.piid_cfg(), 0, torch.Generator().manual_seed(1), backward=lambda l: l.backward())
    g = {k: p.grad for k, p in s.trainable().items() if ".lora_" in k}
    assert g and all(v is not None and torch.isfinite(v).all() and v.abs().sum() > 0 for v in g.values())


def test_cpu_probe_of_the_bitsandbytes_row_flaw():
    """t2i's probe tells whether bitsandbytes' CPU 4-bit dequantisation is right for rows that are no multiple of
    64 weights (checked here on test_t2i's 32-wide FLUX layer context_embedder against nf4_round); where it is
    not (bitsandbytes 0.50.2), quantise_base refuses such a base instead of computing with wrong weights."""
    from bitsandbytes import functional as bf
    w = T.tiny_transformer("flux").context_embedder.weight.detach()
    assert w.shape[1] % 64
    q, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    right = bool((bf.dequantize_4bit(q, state) - nf4_round(w, nf4_code())[0]).abs().max() < 1e-6)
    assert t2i._cpu_nf4_rows_ok() == right
    if not right:
        with pytest.raises(ValueError, match="has in_features=32, no multiple of 64"):
            t2i.quantise_base(T.tiny_transformer("flux"), "nf4", F32)


def test_quantise_base_refuses_bad_input():
    with pytest.raises(ValueError, match="kind='fp8' is not accepted"):
        t2i.quantise_base(tiny("flux"), "fp8", F32)
    with pytest.raises(ValueError, match="before add_lora"):
        t2i.quantise_base(T.student("flux", tiny("flux")).tr, "nf4", F32)
    with pytest.raises(ValueError, match="base_quant='q4' is not accepted"):
        t2i.Options(base_quant="q4")


# ----------------------------------------------------------------------------------------------------------
# 2. Adapters move between quantised and full-precision bases; the policy stays close
# ----------------------------------------------------------------------------------------------------------

def test_adapter_roundtrip_between_nf4_and_full_precision_bases(tmp_path):
    """An adapter trained on an nf4 base is written in the published layout and loads strictly on the
    full-precision base (same LoRA keys and head shapes, the same fp16 values), and the reverse."""
    s = T.student("flux", quantised("flux"), K=2, nfe=2)
    T.perturb(s, 2)
    cfg = piflow.PiIDConfig(nfe=2, shift=3.2, final_step_scale=0.5)
    (tmp_path / "q").mkdir()
    tensors = {k: v.half() for k, v in s.trainable().items()}
    t2i.write_adapter(str(tmp_path / "q"), s, tensors, cfg, 3.5)
    fp, head, rank, cfg2 = t2i.student_from_adapter("flux", tiny("flux"), str(tmp_path / "q"), "--adapter", F32)
    own = fp.trainable()
    assert (head.K, rank, cfg2) == (2, 4, cfg) and set(own) == set(tensors)
    assert any(".lora_A." in k for k in own) and all(own[k].shape == v.shape and torch.equal(own[k], v.float())
                                                    for k, v in tensors.items())
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in fp.tr.modules())
    (tmp_path / "fp").mkdir()
    t2i.write_adapter(str(tmp_path / "fp"), fp, {k: v.half() for k, v in own.items()}, cfg, 3.5)
    back = t2i.student_from_adapter("flux", quantised("flux"), str(tmp_path / "fp"), "--adapter", F32)[0]
    assert set(back.trainable()) == set(tensors) and all(torch.equal(back.trainable()[k], v.float())
                                                         for k, v in tensors.items())


# Measured with this test's metric on the four 64-wide tiny bases, seeds 0-2 of the base, perturb and inputs:
# student / teacher deviation ratio 0.97 - 1.48 (FLUX, FLUX.2, Qwen 0.97 - 1.05; SD3 1.01 - 1.48, its perturbed
# norm_out modulation scales the trunk's error); teacher deviation 1.2 - 10.2 %, student 1.2 - 9.9 %
RATIO_BOUNDS = (0.8, 1.6)


@pytest.mark.parametrize("model", MODELS)
def test_nf4_student_policy_stays_within_the_teachers_nf4_error(model):
    """For the same adapter, the nf4-base student's policy is the full-precision student's on the NF4-rounded
    trunk (the stock weights rounded by nf4_round: the same policy to round-off, so the head and the LoRA add no
    quantisation of their own); and its velocity at the source state (x_t, sigma: the first step it takes) differs
    from the full-precision-base student's by 0.8 - 1.6 x the relative deviation of the nf4 teacher from the
    full-precision teacher. The bound comes from measurements (RATIO_BOUNDS), not a guess."""
    fp, q = tiny(model), quantised(model)
    ref = nf4_reference(model, q)[1]
    s_fp, s_q, s_ref = (T.student(model, b, K=2) for b in (fp, q, ref))
    T.perturb(s_fp, 10)
    with torch.no_grad():
        for s in (s_q, s_ref):
            for k, p in s.trainable().items():
                p.copy_(s_fp.trainable()[k])
    x, sigma, cond = inputs(model)
    with torch.no_grad():
        e_teacher = rel(s_q.teacher(x, sigma, cond), s_fp.teacher(x, sigma, cond))
        pq, pr = s_q.eval()(x, sigma, cond), s_ref.eval()(x, sigma, cond)
        e_student = rel(pq.velocity(x, sigma), s_fp.eval()(x, sigma, cond).velocity(x, sigma))
    for a, b in ((pq.means_x, pr.means_x), (pq.logweights, pr.logweights), (pq.var_x, pr.var_x)):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5)
    print(f"{model}: nf4 vs full precision, teacher {e_teacher:.4f}, student policy {e_student:.4f} "
          f"({e_student / e_teacher:.3f} x)")
    assert e_teacher > 0.005 and RATIO_BOUNDS[0] * e_teacher <= e_student <= RATIO_BOUNDS[1] * e_teacher


# ----------------------------------------------------------------------------------------------------------
# 3. Gradient checkpointing: the same gradients
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["none", "nf4"])
def test_grad_checkpointing_gives_the_same_gradients(kind):
    """diffusers' enable_gradient_checkpointing (train_t2i.py --grad-checkpointing) recomputes every block in the
    backward (each block runs twice per student forward: counted) and gives the same gradients of every trainable
    tensor (LoRA with dropout 0.1: the recomputation replays the dropout masks). Tolerance from round-off: the same
    float operations in the same order, so at most a few ulps of each tensor's largest entry (16 eps_fp32 max|g|)."""
    grads, calls = [], []
    for ckpt in (False, True):
        tr = quantised("flux") if kind == "nf4" else tiny("flux")
        if ckpt:
            tr.enable_gradient_checkpointing()
        n = [0]
        tr.transformer_blocks[0].register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))   # (a recompute
        # stops once it has what the backward needs: a forward hook would not fire)
        s = T.student("flux", tr, K=2, nfe=2, dropout=0.1)
        T.perturb(s, 3)
        s.trainable(train=True)
        s.train()
        torch.manual_seed(7)                                           # LoRA dropout masks
        piflow.piid_data_free(s, s.teacher, torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)),
                              inputs("flux")[2], T.piid_cfg(), 0,
                              torch.Generator().manual_seed(1), backward=lambda l: l.backward())
        grads.append({k: p.grad.clone() for k, p in s.trainable().items()})
        calls.append(n[0])
    assert calls[1] == calls[0] + 2                               # NFE 2: two student forwards, each recomputed
    eps = torch.finfo(torch.float32).eps
    for k, g in grads[0].items():
        assert g.abs().max() > 0, k
        torch.testing.assert_close(grads[1][k], g, atol=16 * eps * float(g.abs().max()), rtol=0, msg=k)


# ----------------------------------------------------------------------------------------------------------
# 4. The commands: train_t2i.py --base-quant, sample.py --base-quant, piflow_pipeline(base_quant=)
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    """test_t2i.tiny_pipeline('flux') with the 64-wide transformer and 64-wide text encoders."""
    import diffusers
    root = tmp_path_factory.mktemp("qbase")
    diffusers.FluxPipeline(diffusers.FlowMatchEulerDiscreteScheduler(), T.tiny_vae("flux"), T.clip_text(64),
                           T.tokenizer(77), T.t5(64), T.tokenizer(512), tiny("flux")).save_pretrained(str(root / "flux"))
    return str(root / "flux")


def test_train_and_sample_with_base_quant(flux_base, tmp_path, capsys):
    """train_t2i.py --base-quant nf4 --grad-checkpointing trains on a 4-bit base (its teacher: the stock model on
    NF4 weights) and exports an adapter; piflow_pipeline(base_quant='nf4') gives the images of the stock pipeline
    whose transformer holds the NF4-rounded weights (to 1e-5 of [0, 1]); sample.py --base-quant nf4 gives those
    images pixel for pixel; the same adapter samples on the full-precision base; --help shows the flags."""
    cache = T.save_cache(wide_cache("flux", 4, seed=2), tmp_path / "emb.pt")
    argv = T.train_args("flux", flux_base, cache, tmp_path / "run", 2, "--base-quant", "nf4", "--grad-checkpointing")
    att, _ = T.attachment(argv)
    tr = att.student.tr
    assert tr.is_gradient_checkpointing and type(tr.transformer_blocks[0].ff.net[2].base_layer) is bnb.nn.Linear4bit
    ref = nf4_reference("flux", tr)[1]
    x, sigma, cond = inputs("flux")
    with torch.no_grad():
        torch.testing.assert_close(att.teacher(x, sigma, cond), T.reference_u(ref, "flux", x, sigma, cond),
                                   atol=1e-5, rtol=1e-5)
    train_t2i.main(argv)
    ad = str(tmp_path / "run" / "adapter")
    run = lambda pipe, **kw: pipe("a red cat", height=32, width=48, generator=torch.Generator().manual_seed(0),
                                  **kw).images
    pq = pipelines.piflow_pipeline("flux", flux_base, ad, base_quant="nf4")
    assert isinstance(pq.transformer.transformer_blocks[0].ff.net[2].base_layer, bnb.nn.Linear4bit)
    images = run(pq, output_type="np")
    stock = pipelines.piflow_pipeline("flux", flux_base, ad, transformer=ref)
    assert np.abs(images - run(stock, output_type="np")).max() <= 1e-5
    full = run(pipelines.piflow_pipeline("flux", flux_base, ad), output_type="np")
    assert full.shape == images.shape and np.abs(full - images).max() > 1e-3
    res = sample.main(["--model", "flux", "--adapter", ad, "--base", flux_base, "--base-quant", "nf4", "--height",
                       "32", "--width", "48", "--seed", "0", "--prompt", "a red cat", "--out",
                       str(tmp_path / "grid.png")])
    assert np.array_equal(res["images"][0], np.array(run(pq)[0]))
    assert "--base-quant" in sample.parser_for("flux")[0].format_help()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_t2i.main(["--model", "flux", "--help"])
    assert "--base-quant BASE_QUANT" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# 5. tools/memory_plan.py's byte model == what bitsandbytes' layers hold
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_memory_plan_counts_the_bytes_the_quantised_layers_hold(kind):
    """The memory plan's base-weight bytes (tools.memory_plan.base_bytes) == the bytes a bf16 base holds after
    quantise_base, counted storage by storage (nf4: packed codes + fp32 absmax per 64 weights, plus a 16-value
    fp32 code table per layer that the plan leaves out: 64 B; int8: int8 weights + one fp32 scale per row); the
    plan's quantised layers are quantise_base's."""
    from tools import memory_plan
    tr = tiny("qwen").to(torch.bfloat16)
    plan = memory_plan.base_bytes(tr, {})
    assert set(memory_plan.quantisable(tr)) == set(t2i.quantise_base(tr, kind, torch.bfloat16))
    seen, held = set(), 0
    for t in [p for p in tr.parameters()] + [p.SCB for p in tr.parameters() if getattr(p, "SCB", None) is not None] + \
            [q for p in tr.parameters() if getattr(p, "quant_state", None) is not None
             for q in (p.quant_state.absmax, p.quant_state.code)]:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            held += t.untyped_storage().nbytes()
    layers = len(memory_plan.quantisable(tiny("qwen")))
    assert held == plan[kind] + (64 * layers if kind == "nf4" else 0) and plan["bf16"] > plan["int8"] > plan["nf4"]
