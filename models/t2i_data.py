"""The data side of text-to-image π-Flow: the base pipeline's pieces, prompt embeddings and their caches, latents.

    load_pretrained, load_pipeline       a diffusers model / pipeline of the base (safetensors, one-line errors)
    encode_prompts, check_cache          text embeddings with the base pipeline's own encode_prompt, and their cache
    make_cond                            the cond dict of cached prompts (+ the distilled guidance input)
    decode, encode_images                normalised latents <-> images with the base's VAE
    training_cache                       the training set: embeddings (and latents) built once, then read everywhere

Caches (prompt embeddings, data latents) are plain tensor files read with torch.load(weights_only=True):
    prompts [str], model str, max_text_len int, prompt_embeds (P, L, D_txt), + the row's cond_keys (FLUX.1 / SD3:
    pooled (P, D_pool); Qwen: mask (P, L)), for a CFG teacher negative_<key> (1, ...) of the empty prompt,
    data-dependent: latents (P, C, H/8, W/8) (normalised VAE latents, the VAE's mode).
Each function takes the base model's row (models.t2i.FAMILIES) as `fam`.
"""
import inspect
import os

import torch
import torch.distributed as dist

from runtime import common

VAE_SCALE = 8              # latent pixels per image pixel side
NEGATIVE_PROMPT = ""       # CFG teachers' negative: the empty prompt, as the published Qwen-Image training


def _load(what, base, thing, load):
    """load() with one line for a missing / offline / unreadable base (diffusers' own error log line, which
    would precede it, is held back while loading)."""
    from diffusers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)
    try:
        return load()
    except (OSError, ValueError, EnvironmentError) as e:
        raise common.UserError(f"{what}={base!r}: cannot load {thing} ({common.first_line(e)}); give a local diffusers "
                               "folder or a reachable hub id") from None
    finally:
        logging.set_verbosity(level)


def load_pretrained(cls_name, base, subfolder, dtype, **kw):
    """A diffusers model (safetensors only) with a one-line error for a missing / offline / unreadable base."""
    import diffusers
    return _load("--base", base, f"{cls_name} from {subfolder}", lambda: getattr(diffusers, cls_name).from_pretrained(
        base, subfolder=subfolder, dtype=dtype, use_safetensors=True, **kw))


def load_pipeline(fam, base, dtype, text=True, what="--base", **kw):
    """The base's diffusers pipeline (safetensors only); text=False leaves out the text encoders and tokenizers,
    kw passes through (transformer=None, a pre-loaded or quantised transformer, quantization_config, ...)."""
    import diffusers
    cls = getattr(diffusers, fam.pipeline)
    if not text:
        kw.update({k: None for k in inspect.signature(cls.__init__).parameters
                   if k.startswith(("text_encoder", "tokenizer"))})
    return _load(what, base, fam.pipeline, lambda: cls.from_pretrained(base, dtype=dtype, use_safetensors=True, **kw))


def read_prompts(path, flag="--prompts"):
    try:
        with open(path) as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise common.UserError(f"{flag}={path!r}: cannot read it ({e.strerror})") from None
    if not prompts:
        raise common.UserError(f"{flag}={path!r} holds no prompts; expected one per line")
    return prompts


@torch.no_grad()
def encode_prompts(fam, base, prompts, device, dtype, max_len, negative=False, batch=8, pipe=None):
    """Text embeddings with the base pipeline's own encode_prompt (`pipe`, else a pipeline of the text encoders
    alone, freed afterwards); negative=True adds negative_<key> of the empty prompt (CFG teachers)."""
    from tqdm import tqdm
    pipe = pipe or load_pipeline(fam, base, dtype, transformer=None, vae=None).to(device)
    parts = [{k: v.cpu() for k, v in fam.encode(pipe, prompts[i:i + batch], device, max_len).items()}
             for i in tqdm(range(0, len(prompts), batch), desc="encoding prompts", disable=len(prompts) <= batch)]
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if negative:
        out.update({f"negative_{k}": v.cpu() for k, v in fam.encode(pipe, [NEGATIVE_PROMPT], device, max_len).items()})
    return out


def check_cache(c, path, flag, fam, model, prompts=None, max_len=None, extra=()):
    """Refuse a cache of other prompts / another model, or one that lacks what this run needs."""
    need = ["prompts", "prompt_embeds", *fam.cond_keys, *extra]
    if not isinstance(c, dict) or any(k not in c for k in need) or c.get("model") != model:
        raise common.UserError(f"{flag}={path!r} is not a {model} cache holding {', '.join(need)}; rebuild it (delete "
                               "it, or pick another path)")
    if prompts is not None and (c.get("prompts") != prompts or c.get("max_text_len") != max_len):
        raise common.UserError(f"{flag}={path!r} holds embeddings of other prompts (or --max-text-len); delete it or "
                               "pick another path")
    return c


def make_cond(fam, cache, idx, device, guidance=None, prefix=""):
    """The cond dict of cached prompts idx (CPU LongTensor); prefix='negative_': the cached negative."""
    cond = {k: cache[prefix + k][idx].to(device) for k in ("prompt_embeds",) + fam.cond_keys}
    cond = {k: v.float() if v.is_floating_point() else v for k, v in cond.items()}
    if fam.guidance == "distilled":
        cond["guidance"] = torch.full((len(idx),), float(guidance), device=device)
    return cond


def decode(fam, vae, x):
    """Normalised latents (B, C, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] (as the base pipeline decodes)."""
    z = fam.normalise(vae, x.float(), inverse=True).to(vae.dtype)
    if fam.video_vae:
        return vae.decode(z[:, :, None]).sample[:, :, 0].float()
    return vae.decode(z).sample.float()


def encode_images(fam, vae, x):
    """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/8, W/8) (the VAE's mode)."""
    x = x.to(vae.dtype)
    z = vae.encode(x[:, :, None] if fam.video_vae else x).latent_dist.mode()
    return fam.normalise(vae, (z[:, :, 0] if fam.video_vae else z).float())


#################################################################################
#                  The training set: prompt embeddings and latents               #
#################################################################################

def training_cache(opts, fam, base, tc, device, dtype):
    """Embeddings (and for --data the latents) of the training set: built once on rank 0, then read everywhere."""
    path = opts.embed_cache or (opts.prompts and f"{opts.prompts}.{opts.model}.pt") or \
        (opts.data and f"{opts.data.rstrip(os.sep)}.{opts.model}-{opts.resolution}px.pt")
    max_len = opts.max_text_len or fam.max_text_len
    if not path:
        raise common.UserError("give --prompts (a text file, one prompt per line), --data (images + captions) or "
                               "--embed-cache (a cache made earlier)")
    if opts.prompts and opts.data:
        raise common.UserError("give --prompts or --data, not both")
    for flag, v in (("--prompts", opts.prompts), ("--data", opts.data)):
        if v and not os.path.exists(v):
            raise common.UserError(f"{flag}={v!r}: no such file or folder")
    files = None
    if opts.data:
        files = sorted(f for f in os.listdir(opts.data) if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
        if not files:
            raise common.UserError(f"--data={opts.data!r} holds no .png / .jpg / .webp images")
    caption = lambda f: os.path.join(opts.data, os.path.splitext(f)[0] + ".txt")
    prompts = read_prompts(opts.prompts) if opts.prompts else [open(caption(f)).read().strip() if os.path.isfile(
        caption(f)) else "" for f in files] if files else None
    if not os.path.isfile(path):
        if prompts is None:
            raise common.UserError(f"--embed-cache={path!r}: no such file; give --prompts or --data to build it")
        common.check_writable(path, "--embed-cache")
        if not dist.is_initialized() or dist.get_rank() == 0:
            c = encode_prompts(fam, base, prompts, device, dtype, max_len, fam.guidance == "cfg")
            if files:
                c["latents"] = data_latents(fam, base, opts.data, files, opts.resolution, device, dtype)
            c.update(prompts=prompts, model=opts.model, max_text_len=max_len)
            common.save_torch(c, path)
        if dist.is_initialized():
            dist.barrier()
    c = common.load_tensors(path, "--embed-cache")
    if tc.data_dependent and isinstance(c, dict) and "latents" not in c:
        raise common.UserError(f"--data-dependent needs image latents: give --data (images + captions); "
                               f"--embed-cache={path!r} holds prompts only")
    negative = tuple(f"negative_{k}" for k in ("prompt_embeds",) + fam.cond_keys)
    extra = (("latents",) if tc.data_dependent else ()) + (negative if fam.guidance == "cfg" and tc.guidance != 1
                                                           else ())
    c = check_cache(c, path, "--embed-cache", fam, opts.model, prompts, max_len, extra)
    h = opts.resolution // VAE_SCALE
    if tc.data_dependent and tuple(c["latents"].shape[1:]) != (fam.channels, h, h):
        raise common.UserError(f"--embed-cache={path!r} holds latents of shape {tuple(c['latents'].shape[1:])}; "
                               f"--resolution={opts.resolution} needs {(fam.channels, h, h)}")
    return c


@torch.no_grad()
def data_latents(fam, base, folder, files, resolution, device, dtype):
    """Image folder -> normalised VAE latents (P, C, res/8, res/8): resized and centre-cropped (Pillow)."""
    import numpy as np
    from PIL import Image, ImageOps
    vae = load_pretrained(fam.vae, base, "vae", dtype).to(device)
    out = []
    for f in files:
        im = ImageOps.fit(Image.open(os.path.join(folder, f)).convert("RGB"), (resolution, resolution),
                          Image.BICUBIC)
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
        out.append(encode_images(fam, vae, x).cpu())
    return torch.cat(out)
