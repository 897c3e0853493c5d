"""The private diffusers helpers models/t2i.py and models/pipelines.py call, against independent re-implementations.

A diffusers release may rename or change a private helper (`FluxPipeline._pack_latents`, ...) without notice. Each
test calls one helper on a fixed input and compares it with the layout written out here (einops, explicit
coordinates, Pillow); a missing or changed helper fails with one line naming it and the known-good versions
(.ci/constraints.txt).
"""
import inspect
import math

import diffusers
import numpy as np
import pytest
import torch
from einops import rearrange

HINT = "the versions in .ci/constraints.txt are known to work: pip install -r requirements.txt -c .ci/constraints.txt"


def helper(owner, name):
    f = getattr(owner, name, None)
    if f is None:
        pytest.fail(f"diffusers {diffusers.__version__}: {owner.__name__}.{name} is missing; models/ relies on it; "
                    f"{HINT}", pytrace=False)
    return f


def same(name, got, want):
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    if got.shape != want.shape or not torch.equal(got.to(want.dtype), want):
        pytest.fail(f"diffusers {diffusers.__version__}: {name} changed its output on a fixed input (shape "
                    f"{tuple(got.shape)}, expected {tuple(want.shape)}); models/ relies on the old layout; {HINT}",
                    pytrace=False)


X = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)   # (B, C, H, W): every value distinct


@pytest.mark.parametrize("pipeline", ["FluxPipeline", "QwenImagePipeline"])
def test_pack_latents_flux_qwen(pipeline):
    """(B, C, H, W) -> (B, (H/2)(W/2), 4C), token (row, col) holding channel c * 4 + ph * 2 + pw."""
    P = getattr(diffusers, pipeline)
    same(f"{pipeline}._pack_latents", helper(P, "_pack_latents")(X, 2, 3, 4, 6),
         rearrange(X, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2))


def test_flux_latent_image_ids():
    """(h w, 3) ids [0, row, col], row-major."""
    want = torch.tensor([[0.0, i, j] for i in range(2) for j in range(3)])
    same("FluxPipeline._prepare_latent_image_ids",
         helper(diffusers.FluxPipeline, "_prepare_latent_image_ids")(2, 2, 3, "cpu", torch.float32), want)


def test_flux2_patchify_unpatchify_pack():
    """_patchify_latents: (B, C, H, W) -> (B, 4C, H/2, W/2) with channel c * 4 + ph * 2 + pw; _unpatchify_latents
    its inverse; _pack_latents: (B, C', h, w) -> (B, h w, C')."""
    P = diffusers.Flux2Pipeline
    z = rearrange(X, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=2, pw=2)
    same("Flux2Pipeline._patchify_latents", helper(P, "_patchify_latents")(X), z)
    same("Flux2Pipeline._unpatchify_latents", helper(P, "_unpatchify_latents")(z), X)
    same("Flux2Pipeline._pack_latents", helper(P, "_pack_latents")(z), rearrange(z, "b c h w -> b (h w) c"))


def test_flux2_ids():
    """_prepare_latent_ids: (B, h w, 4) ids (t, row, col, l) = (0, i, j, 0); _prepare_text_ids: (B, L, 4) =
    (0, 0, 0, l)."""
    P = diffusers.Flux2Pipeline
    z = torch.zeros(2, 12, 2, 3)
    same("Flux2Pipeline._prepare_latent_ids", helper(P, "_prepare_latent_ids")(z),
         torch.tensor([[0, i, j, 0] for i in range(2) for j in range(3)])[None].expand(2, -1, -1))
    same("Flux2Pipeline._prepare_text_ids", helper(P, "_prepare_text_ids")(torch.zeros(2, 5, 8)),
         torch.tensor([[0, 0, 0, k] for k in range(5)])[None].expand(2, -1, -1))


def test_flux2_resize_to_target_area_and_image_latents_signature():
    """Flux2ImageProcessor._resize_to_target_area: scale s = sqrt(area / (w h)), size (int(w s), int(h s)), Lanczos;
    Flux2Pipeline.prepare_image_latents(images, batch_size, generator, device, dtype) (called positionally);
    DiffusionPipeline._execution_device is a property."""
    from PIL import Image
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 52, 3), dtype=np.uint8))
    s = math.sqrt(1000 / (52 * 40))
    got = helper(Flux2ImageProcessor, "_resize_to_target_area")(img, 1000)
    want = img.resize((int(52 * s), int(40 * s)), Image.Resampling.LANCZOS)
    same("Flux2ImageProcessor._resize_to_target_area", np.asarray(got), np.asarray(want))
    params = list(inspect.signature(helper(diffusers.Flux2Pipeline, "prepare_image_latents")).parameters)[1:6]
    if params != ["images", "batch_size", "generator", "device", "dtype"]:
        pytest.fail(f"diffusers {diffusers.__version__}: Flux2Pipeline.prepare_image_latents takes {params}; "
                    f"models/pipelines.py passes (images, batch_size, generator, device, dtype); {HINT}",
                    pytrace=False)
    if not isinstance(inspect.getattr_static(diffusers.DiffusionPipeline, "_execution_device", None), property):
        pytest.fail(f"diffusers {diffusers.__version__}: DiffusionPipeline._execution_device is not a property; "
                    f"{HINT}", pytrace=False)
