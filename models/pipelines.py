"""A diffusers-native π-Flow pipeline, and `sample.py --model flux|flux2|qwen|sd3` on top of it.

    import torch, pipelines
    pipe = pipelines.piflow_pipeline("flux", "black-forest-labs/FLUX.1-dev", "gmflux_k8_piid_4step",
                                     torch_dtype=torch.bfloat16)
    pipe.enable_model_cpu_offload()
    image = pipe("a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]

The stock diffusers pipeline of the base (FluxPipeline, Flux2Pipeline, QwenImagePipeline, StableDiffusion3Pipeline:
its text encoders and encode_prompt, VAE, image processor, CPU offloading, LoRA loading, quantisation options) with
the adapter installed on its transformer: the policy head, and the LoRA as the named adapter 'piflow', so another
LoRA stacks with pipe.load_lora_weights(..., adapter_name="style"); pipe.set_adapters(["piflow", "style"], [1, .8]).
Calling it runs piflow.sample (NFE student calls, each followed by a policy rollout; paper §3, Fig. 2c) where the
stock pipeline runs its scheduler loop: noise from diffusers' randn_tensor, latents decoded and post-processed as
the stock pipeline does. FLUX.2 editing: pipe(prompt, image=[reference, ...]).

    python sample.py --model flux --prompt "a cat" --prompt "a dog"        # the released adapter, grid + PNGs
    python sample.py --model flux2 --prompt "make it night" --image street.png --cpu-offload
    python sample.py --model sd3 --base stabilityai/stable-diffusion-3.5-medium --adapter runs/pisd3/adapter --prompt x
"""
import os

import torch

from runtime import common
import piflow
from models import t2i, t2i_data


def check_guidance(model, given, trained, force, flag="guidance_scale"):
    """A distilled-guidance student works at the guidance it was trained with only (3.5 FLUX.1, 4.0 FLUX.2: other
    values give noise: LakonLab README, ComfyUI-piFlow issue #9); CFG rows have the guidance distilled in and take none."""
    fam, hint = t2i.FAMILIES[model], f" ({'force' if flag == 'guidance_scale' else '--force'} to try anyway)"
    if fam.guidance == "distilled" and given is not None and given != trained and not force:
        raise common.UserError(f"{flag}={given} is not accepted; this adapter was distilled at guidance {trained} and "
                               f"gives noise otherwise{hint}")
    if fam.guidance == "cfg" and given is not None and not force:
        raise common.UserError(f"{flag}={given} is not accepted; {model} students have CFG distilled in and take no "
                               f"guidance{hint}")


class PiFlowPipeline:
    """pipe(prompt, ...) -> ImagePipelineOutput(images). Attributes and methods not defined here are the stock
    pipeline's (pipe.pipe): set_adapters, load_lora_weights, enable_model_cpu_offload, transformer, vae, ..."""

    def __init__(self, model, pipe, student):
        self.model, self.pipe, self.student, self.fam = model, pipe, student, t2i.FAMILIES[model]

    def __getattr__(self, name):
        if name == "pipe":                                    # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def to(self, *args, **kw):
        self.pipe.to(*args, **kw)
        return self

    def encode(self, prompts, max_sequence_length=None):
        """{prompt_embeds, + the row's cond keys} of `prompts` with the stock pipeline's encode_prompt."""
        return self.fam.encode(self.pipe, list(prompts), self.pipe._execution_device,
                               max_sequence_length or self.fam.max_text_len)

    def references(self, images, batch, device):
        """FLUX.2 editing conditions, as diffusers' Flux2Pipeline builds them: each reference over
        1024^2 px resized to that area and cropped to a multiple of 16 px, then prepare_image_latents: VAE mode,
        batch-norm normalised, packed into tokens with their own ids (T = 10, 20, ...). -> (cond, first's (H, W))."""
        pipe, conds = self.pipe, []
        for img in images:
            pipe.image_processor.check_image_input(img)
            if img.width * img.height > 1024 * 1024:
                img = pipe.image_processor._resize_to_target_area(img, 1024 * 1024)
            m = pipe.vae_scale_factor * 2
            conds.append(pipe.image_processor.preprocess(img, height=img.height // m * m, width=img.width // m * m,
                                                         resize_mode="crop"))
        tokens, ids = pipe.prepare_image_latents(conds, batch, None, device, pipe.vae.dtype)
        return {"ref_tokens": tokens, "ref_ids": ids}, tuple(conds[0].shape[-2:])

    @torch.no_grad()
    def __call__(self, prompt=None, height=None, width=None, num_inference_steps=None, generator=None, latents=None,
                 image=None, guidance_scale=None, temperature="auto", cond=None, output_type="pil",
                 max_sequence_length=None, force=False, h=0.0):
        """Images of `prompt` (str or list), or of precomputed conditions `cond` ({prompt_embeds, + the row's
        cond keys}: pipe.encode(prompts), or a cache's rows). num_inference_steps: the NFE (None = the adapter's;
        GM students take any >= 1); temperature: 'auto' (0.1 (NFE - 1)), None or a value, never on the last step
        (GM only); guidance_scale: distilled rows only, the trained value unless force=True; image: FLUX.2
        reference image(s) to edit (the size then defaults to the first one's); latents: initial noise
        (B, C, H/8, W/8); h: flow-map SDE sampling (piflow.sample: 0 = deterministic, > 0 or 'inf' re-noises each
        step from `generator`)."""
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor
        fam, pipe, student = self.fam, self.pipe, self.student
        check_guidance(self.model, guidance_scale, student.guidance, force)
        h = piflow.check_h(h)
        device = pipe._execution_device
        cond = dict(cond) if cond is not None else \
            self.encode([prompt] if isinstance(prompt, str) else prompt, max_sequence_length)
        cond, B = {k: v.to(device) for k, v in cond.items()}, len(cond["prompt_embeds"])
        if fam.guidance == "distilled":
            cond["guidance"] = torch.full((B,), float(guidance_scale or student.guidance), device=device)
        if image is not None:
            if self.model != "flux2":
                raise common.UserError(f"image= (reference images to edit) is for --model flux2, not {self.model}")
            refs, size = self.references(image if isinstance(image, (list, tuple)) else [image], B, device)
            cond.update(refs)
            height, width = height or size[0], width or size[1]
        height, width = height or 1024, width or 1024
        for name, v in (("height", height), ("width", width)):
            if v < 16 or v % 16:
                raise common.UserError(f"{name}={v} is not accepted; expected a positive multiple of 16")
        shape = (B, fam.channels, height // t2i_data.VAE_SCALE, width // t2i_data.VAE_SCALE)
        noise = latents if latents is not None else randn_tensor(shape, generator=generator, device=device,
                                                                 dtype=torch.float32)
        x = piflow.sample(student, noise.to(device, torch.float32), cond, num_inference_steps, temperature=temperature,
                          h=h, generator=generator)
        common.check_finite_output(x, "the sampled latents", f"temperature={temperature}")
        images = pipe.image_processor.postprocess(t2i_data.decode(fam, pipe.vae, x), output_type=output_type)
        pipe.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images)


def piflow_pipeline(model, base=None, adapter=None, torch_dtype=None, text_encoders=True, flags=("base", "adapter"),
                    base_quant="none", **kwargs):
    """The stock pipeline of `base` (default: the row's official repo) with `adapter` (an adapter folder, a released
    id of t2i.KNOWN or 'owner/repo:subfolder'; default: the row's released one) on its transformer. kwargs pass to
    from_pretrained (transformer=<a quantised transformer>, quantization_config=..., variant=...);
    text_encoders=False leaves the text encoders out (then call with cond=). base_quant 'nf4' / 'int8': the
    transformer is quantised as train_t2i.py --base-quant quantises it (t2i.load_base: bitsandbytes through
    diffusers' BitsAndBytesConfig on the current GPU; without CUDA, in place on the CPU). Errors name `flags`."""
    if model not in t2i.FAMILIES:
        raise common.UserError(f"model={model!r} is not accepted; expected one of {', '.join(t2i.FAMILIES)}")
    if base_quant not in t2i.QUANT:
        raise common.UserError(f"base_quant={base_quant!r} is not accepted; expected one of {', '.join(t2i.QUANT)}")
    if base_quant != "none" and "transformer" in kwargs:
        raise common.UserError("give base_quant or transformer=, not both")
    fam = t2i.FAMILIES[model]
    adapter = adapter or fam.adapter
    if adapter is None:
        raise common.UserError(f"{flags[1]}: {model} has no released adapter; give one (e.g. runs/{model}/adapter, "
                               "written by train_t2i.py)")
    read = t2i.read_adapter(adapter, model, flags[1])                         # before the base loads
    if base_quant != "none":
        kwargs["transformer"] = t2i.load_base(fam, base or fam.repo, base_quant, torch_dtype or torch.float32,
                                              "cuda" if torch.cuda.is_available() else "cpu")
    pipe = t2i_data.load_pipeline(fam, base or fam.repo, torch_dtype, text_encoders, flags[0], **kwargs)
    tr = pipe.transformer
    student = t2i.student_from_adapter(model, tr, adapter, flags[1], tr.dtype, adapter=read, teacher=False)[0]
    for m in student.heads():
        m.to(device=next(tr.parameters()).device, dtype=tr.dtype)
    return PiFlowPipeline(model, pipe, student.eval())


#################################################################################
#                          Sampling (sample.py --model)                         #
#################################################################################

def add_sample_flags(g, model):
    fam = t2i.FAMILIES[model]
    g.add_argument("--adapter", default=fam.adapter, help=f"adapter folder (e.g. runs/pi{model}/adapter), released id "
                   f"({', '.join(k for k, v in t2i.KNOWN.items() if v[1] == model) or 'none'}) or "
                   "'owner/repo:subfolder' (default: %(default)s)")
    g.add_argument("--base", default=fam.repo, help="diffusers folder or hub id of the base (default: %(default)s)")
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    g.add_argument("--prompts", default=None, help="text file, one prompt per line")
    if model == "flux2":
        g.add_argument("--image", action="append", default=None, help="reference image to edit (repeatable)")
    g.add_argument("--embed-cache", "--embed_cache", default=None, help="prompt-embedding cache: read if it exists "
                   "(then --prompt / --prompts are optional), else written (skips the text encoders next time)")
    g.add_argument("--guidance", type=float, default=fam.guidance_scale,
                   help=f"{model}: " + (f"distilled guidance, the adapters need {fam.guidance_scale}" if
                                        fam.guidance == "distilled" else "CFG is distilled in: no guidance") +
                   " (default: %(default)s)")
    g.add_argument("--force", action="store_true", help="allow a --guidance the adapter was not trained with")
    g.add_argument("--height", type=int, default=1024, help="image height, a multiple of 16 (default: %(default)s)")
    g.add_argument("--width", type=int, default=1024, help="image width, a multiple of 16 (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=1, help="images per transformer call (default: %(default)s)")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="weights dtype; auto = bf16 on CUDA, fp32 on CPU (default: %(default)s)")
    g.add_argument("--base-quant", choices=t2i.QUANT, default="none", help="frozen base weights: none | nf4 | int8 "
                   "(bitsandbytes; the adapter's head stays in --dtype), as train_t2i.py --base-quant "
                   "(default: %(default)s)")
    g.add_argument("--cpu-offload", action="store_true", help="diffusers' enable_model_cpu_offload: one model at a "
                   "time on the accelerator")
    g.add_argument("--images-dir", default=None, help="folder for the single PNGs 00000.png, ... (default: --out "
                   "without .png)")
    g.set_defaults(temperature="auto")


def sample_grid(args):
    """`sample.py --model flux|flux2|qwen|sd3`: image i from noise seeded seed + i and prompt i (one row each),
    through piflow_pipeline; every user error before the base loads."""
    import numpy as np
    from PIL import Image
    fam = t2i.FAMILIES[args.model]
    for name in ("height", "width"):
        v = getattr(args, name)
        if v < 16 or v % 16:
            raise common.UserError(f"--{name}={v} is not accepted; expected a positive multiple of 16 "
                                   f"(e.g. {max(16, round(v / 16) * 16)})")
    if args.batch_size < 1:
        raise common.UserError(f"--batch-size={args.batch_size} is not accepted; expected an integer >= 1")
    if args.adapter is None:
        raise common.UserError(f"--adapter: --model {args.model} has no released adapter; give one (e.g. "
                               f"runs/{args.model}/adapter, written by train_t2i.py)")
    prompts = list(args.prompt or []) + (t2i_data.read_prompts(args.prompts) if args.prompts else [])
    if not prompts and not (args.embed_cache and os.path.isfile(args.embed_cache)):
        raise common.UserError("give --prompt (repeatable), --prompts (a text file) or an existing --embed-cache")
    refs = []
    for path in getattr(args, "image", None) or []:
        try:
            refs.append(Image.open(path).convert("RGB"))
        except OSError as e:
            raise common.UserError(f"--image={path!r}: not a readable image ({type(e).__name__})") from None
    images_dir = args.images_dir or os.path.splitext(args.out)[0]                   # {nfe} filled in below
    common.check_writable(images_dir.format(nfe=args.nfe or 0), "--images-dir", is_dir=True)
    if args.embed_cache and not os.path.isfile(args.embed_cache):
        common.check_writable(args.embed_cache, "--embed-cache")
    head = t2i.adapter_head(args.adapter, args.model, "--adapter")
    check_guidance(args.model, args.guidance, t2i.adapter_guidance(args.adapter, args.model, "--adapter"),
                   args.force, "--guidance")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype) or \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cache = None
    if args.embed_cache and os.path.isfile(args.embed_cache):
        cache = t2i_data.check_cache(common.load_tensors(args.embed_cache, "--embed-cache"), args.embed_cache,
                                "--embed-cache", fam, args.model, prompts or None,
                                fam.max_text_len if prompts else None)
    pipe = piflow_pipeline(args.model, args.base, args.adapter, dtype, cache is None, ("--base", "--adapter"),
                           args.base_quant)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if cache is None:
        cache = dict(t2i_data.encode_prompts(fam, None, prompts, pipe._execution_device, dtype, fam.max_text_len,
                                        pipe=pipe.pipe), prompts=prompts, model=args.model,
                     max_text_len=fam.max_text_len)
        if args.embed_cache:
            common.save_torch(cache, args.embed_cache)
    prompts, cfg = cache["prompts"], pipe.student.piid_config
    nfe = piflow.schedule_settings(pipe.student, nfe=args.nfe)["nfe"]               # the sampler's own resolution
    T = piflow.resolve_temperature(args.temperature, nfe) if head.policy == "gm" else None
    print(f"pi-Flow {args.model} {head.policy} adapter {args.adapter} | NFE {nfe} (trained {cfg.nfe}) | shift "
          f"{cfg.shift} | final step scale {cfg.final_step_scale} | temperature {T} | "
          + (f"guidance {args.guidance} | " if fam.guidance == "distilled" else "")
          + (f"{len(refs)} reference image(s) | " if refs else "")
          + f"{args.height}x{args.width} | seed {args.seed} + i | h {args.h} | {device} {dtype}"
          + (f" | base {args.base_quant}" if args.base_quant != "none" else ""), flush=True)
    images = []
    for i in range(0, len(prompts), args.batch_size):
        idx = torch.arange(i, min(i + args.batch_size, len(prompts)))
        out = pipe(cond={k: cache[k][idx] for k in ("prompt_embeds",) + fam.cond_keys}, height=args.height,
                   width=args.width, num_inference_steps=nfe, temperature=T, guidance_scale=args.guidance,
                   force=args.force, image=refs or None, h=args.h,
                   generator=[torch.Generator().manual_seed(args.seed + j) for j in idx.tolist()])
        images += [np.array(im) for im in out.images]
    images_dir = images_dir.format(nfe=nfe)
    os.makedirs(images_dir, exist_ok=True)
    paths = [os.path.join(images_dir, f"{i:05d}.png") for i in range(len(images))]
    for im, path in zip(images, paths):
        common.save_atomic(path, lambda tmp: Image.fromarray(im).save(tmp, format="PNG"))
    print(f"wrote {len(paths)} images to {images_dir}")
    label = lambda s: s if len(s) <= 40 else s[:37] + "..."
    return dict(rows=[[im] for im in images], row_labels=[label(p) for p in prompts], nfe=nfe, images=images,
                paths=paths, title=f"pi-Flow {args.model} {head.policy}, NFE {nfe}, temperature {T}, seed {args.seed}"
                + (f", h {args.h}" if args.h else ""))
