"""Sample-quality metrics with torchmetrics, computed in-process (no torchvision needed here).

    ImageMetrics(reference, ...)    FID and IS of generated uint8 images against a reference .npz in the ADM layout
                                    (arr_0: uint8 images (N, H, W, 3); and / or mu, sigma: Inception statistics)
    load_clip(spec), clip_score     CLIP score of images against their prompts (text-to-image students)

    python sample.py --model imagenet --ckpt gmrepa_k32_imagenet_piid_1step --num-samples 50000 \
        --eval VIRTUAL_imagenet256_labeled.npz                   # torchrun: every rank samples and measures a block

FID / IS use the Inception-v3 port of torch-fidelity (torchmetrics' FrechetInceptionDistance(feature=2048) and
InceptionScore). torch-fidelity imports torchvision, so it is an optional extra (pip install torch-fidelity where
torch has a matching torchvision, e.g. a CUDA machine); without it --eval stops with one line. Any nn.Module that
maps uint8 images (B, 3, H, W) to features can stand in (features=...), as the tests do. torchmetrics offers no
generative precision / recall. Under torch.distributed every rank adds its own images and torchmetrics sums the
states at compute(). A FID of n < 50k samples is a proxy, higher than FID-50k: report it with its n.
"""
import os

import numpy as np
import torch
import torch.nn as nn

from runtime import common

STATS_N = 50000        # sample count recorded with mu / sigma statistics (any n >= 2 gives the same FID)


def require_inception(what):
    """The real feature network is torch-fidelity's Inception-v3 (torchmetrics builds it from feature=2048)."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise common.UserError(f"{what}: FID / IS need torch-fidelity's Inception-v3, which is not installed (pip "
                               "install torch-fidelity; it needs a torchvision matching your torch, so it is not in "
                               "requirements.txt)") from None


class ImageMetrics:
    """FID (and IS) of generated images against `reference` (.npz). features=None: the Inception network (FID on
    its 2048-d pool features, IS on its logits); else an nn.Module used for both. The reference images are split
    over the ranks (rank r takes arr_0[r::world]); mu / sigma statistics (e.g. ADM's, of the 2048-d Inception
    features) are used instead when present and their size fits. sync=False: this rank alone (no collective)."""

    def __init__(self, reference, what="--eval", device="cpu", features=None, splits=10, sync=True):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
        if features is None:
            require_inception(what)
        if not os.path.isfile(reference):
            raise common.UserError(f"{what}={reference!r}: no such file; expected a reference .npz (arr_0 uint8 "
                                   "images (N, H, W, 3) and / or mu, sigma)")
        try:
            ref = np.load(reference)                                  # allow_pickle=False: arrays only
            ref = {k: ref[k] for k in ref.files if k in ("arr_0", "mu", "sigma")}
        except Exception as e:  # noqa: BLE001 - every failure is the user's file
            raise common.UserError(f"{what}={reference!r} is not a readable .npz ({type(e).__name__})") from None
        kw = dict(sync_on_compute=sync)
        self.fid = FrechetInceptionDistance(feature=2048 if features is None else features,
                                            reset_real_features=False, **kw).to(device)
        self.inception_score = InceptionScore(feature="logits_unbiased" if features is None else features,
                                              splits=splits, **kw).to(device)
        self.device, dim = device, self.fid.real_features_sum.shape[0]
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if sync and \
            torch.distributed.is_initialized() else (0, 1)
        if "mu" in ref and "sigma" in ref and ref["mu"].shape == (dim,):
            if rank == 0:                                             # sum = n mu, cov_sum = (n-1) sigma + n mu mu^T
                mu, sigma = (torch.as_tensor(ref[k], dtype=torch.float64, device=device) for k in ("mu", "sigma"))
                self.fid.real_features_sum += STATS_N * mu
                self.fid.real_features_cov_sum += (STATS_N - 1) * sigma + STATS_N * torch.outer(mu, mu)
                self.fid.real_features_num_samples += STATS_N
        elif "arr_0" in ref and ref["arr_0"].dtype == np.uint8 and ref["arr_0"].ndim == 4:
            images = ref["arr_0"][rank::world]
            for i in range(0, len(images), 100):
                self.fid.update(self._nchw(images[i:i + 100]), real=True)
        else:
            raise common.UserError(f"{what}={reference!r} holds neither arr_0 (uint8 images (N, H, W, 3)) nor mu / "
                                   f"sigma of {dim} features")

    def _nchw(self, images):
        return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).to(self.device)

    def update(self, images):
        """Generated images, uint8 (n, H, W, 3) (numpy or tensor)."""
        x = self._nchw(images)
        self.fid.update(x, real=False)
        self.inception_score.update(x)

    def compute(self):
        return {"fid": float(self.fid.compute()), "is": float(self.inception_score.compute()[0])}

    def reset(self):
        """Forget the generated images (the reference features stay)."""
        self.fid.reset()
        self.inception_score.reset()


class _CLIPFeatures(nn.Module):
    """CLIPModel whose get_*_features return the projected feature tensor: transformers >= 5 returns a ModelOutput
    (the features in pooler_output), torchmetrics 1.9's CLIPScore expects the tensor."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kw):
        out = self.model.get_image_features(*args, **kw)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args, **kw):
        out = self.model.get_text_features(*args, **kw)
        return getattr(out, "pooler_output", out)


def load_clip(spec, what="--eval-clip"):
    """(CLIP model, processor) for clip_score from a hub id or a folder (safetensors), one line if unavailable."""
    from transformers import CLIPModel, CLIPProcessor
    try:
        model = CLIPModel.from_pretrained(spec, use_safetensors=True).eval().requires_grad_(False)
        return _CLIPFeatures(model), CLIPProcessor.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise common.UserError(f"{what}={spec!r}: cannot load a CLIP model and processor "
                               f"({common.first_line(e)}); give a local "
                               "folder or a reachable hub id") from None


@torch.no_grad()
def clip_score(images, prompts, clip):
    """torchmetrics CLIPScore: max(100 * mean cos(image, prompt embedding), 0); images uint8 (n, 3, H, W)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    metric = CLIPScore(model_name_or_path=lambda: clip, sync_on_compute=False)
    metric.update(images, list(prompts))
    return float(metric.compute())
