"""Tests of metrics.py and the in-process evaluation (sample.py --model imagenet --eval, train_imagenet.py
--eval-ref): a small random-weight feature network stands in for Inception-v3 (no download), passed to the same
torchmetrics classes; ground truth is the Fréchet distance and the Inception score written out with numpy / scipy."""
import functools
import os
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

from runtime import metrics
import sample
from models import sit
import test_sit
import train_imagenet

torch.set_num_threads(1)


class Features(nn.Module):
    """uint8 images (B, 3, H, W) -> 8 features: a fixed random conv, ReLU, global average."""
    num_features = 8

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return 10 * torch.relu(self.conv(x.float() / 255)).mean((2, 3))


def images(n, seed, shift=0):
    g = np.random.RandomState(seed)
    return np.clip(g.randint(0, 200, (n, 16, 16, 3)) + shift, 0, 255).astype(np.uint8)


def feats(net, x):
    with torch.no_grad():
        return net(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy()


def frechet(a, b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (unbiased covariances)."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


def inception_score(logits):
    """exp(E_x KL(p(y|x) || p(y))), one split."""
    p = torch.softmax(torch.as_tensor(logits), 1).numpy()
    return float(np.exp((p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()))


def test_fid_and_is_against_the_written_out_formulas(tmp_path):
    """FID of a set against itself ~ 0, against a brightness-shifted set = the Fréchet distance of the features
    (> 0); reference as arr_0 images or as mu / sigma statistics gives the same value; IS = its formula."""
    net, ref, gen = Features(), images(40, 0), images(30, 1)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    fr = feats(net, ref)
    np.savez(tmp_path / "stats.npz", mu=fr.mean(0), sigma=np.cov(fr, rowvar=False))
    m = metrics.ImageMetrics(str(tmp_path / "ref.npz"), features=net, splits=1, sync=False)
    m.update(ref)
    assert abs(m.compute()["fid"]) < 1e-4
    for shift, path in ((60, "ref.npz"), (60, "stats.npz")):
        m = metrics.ImageMetrics(str(tmp_path / path), features=net, splits=1, sync=False)
        m.update(np.clip(gen.astype(int) + shift, 0, 255).astype(np.uint8))
        got, expect = m.compute(), frechet(feats(net, np.clip(gen.astype(int) + shift, 0, 255).astype(np.uint8)), fr)
        assert expect > 0.1 and got["fid"] == pytest.approx(expect, rel=1e-4, abs=1e-6), (path, got, expect)
        assert got["is"] == pytest.approx(inception_score(feats(net, np.clip(gen.astype(int) + shift, 0, 255)
                                                                  .astype(np.uint8))), rel=1e-5)
    m.reset()                                                          # the reference stays
    m.update(gen)
    assert m.compute()["fid"] == pytest.approx(frechet(feats(net, gen), fr), rel=1e-4)


def _rank(rank, world, ref, gen, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m = metrics.ImageMetrics(ref, features=Features(), splits=1)
    m.update(np.load(gen)[rank::world])
    r = m.compute()
    if rank == 0:
        np.save(out, np.array([r["fid"], r["is"]]))
    dist.destroy_process_group()


def test_two_ranks_give_the_one_process_figures(tmp_path):
    """Under torch.distributed each rank adds half of the reference and of the samples; compute() sums the states:
    the same FID / IS as one process (IS: one split, so the samples' order does not matter)."""
    import torch.multiprocessing as mp
    np.savez(tmp_path / "ref.npz", arr_0=images(41, 0))
    np.save(tmp_path / "gen.npy", images(31, 1, shift=40))
    m = metrics.ImageMetrics(str(tmp_path / "ref.npz"), features=Features(), splits=1)
    m.update(np.load(tmp_path / "gen.npy"))
    one = m.compute()
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_rank, args=(2, str(tmp_path / "ref.npz"), str(tmp_path / "gen.npy"), port,
                                    str(tmp_path / "two.npy")), nprocs=2, start_method="fork")
    two = np.load(tmp_path / "two.npy")
    assert two[0] == pytest.approx(one["fid"], rel=1e-5) and two[1] == pytest.approx(one["is"], rel=1e-5)


def test_sample_eval_and_training_eval(tmp_path, monkeypatch, capsys):
    """sample.py --model imagenet --eval REF: FID / IS of the --num-samples images (recomputed here) against the
    reference; without torch-fidelity the real Inception path stops with one line; train_imagenet.py --eval-ref
    logs FID and IS at every --eval-every."""
    folder, _, _ = test_sit.released_student(tmp_path / "gmrepa_k32_imagenet_piid_1step")
    vae = test_sit.tiny_vae(str(tmp_path / "vae"))
    ref = images(12, 5)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    argv = ["--model", "imagenet", "--ckpt", folder, "--vae", str(tmp_path / "vae"), "--device", "cpu",
            "--total-substeps", "8", "--seed", "3", "--num-samples", "10", "--eval", str(tmp_path / "ref.npz"),
            "--out", str(tmp_path / "x.png")]
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)            # as on CI: not installed
    code, err = test_sit.run_cli(sample.main, argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "--eval" in err and "torch-fidelity" in err
    net = Features()
    monkeypatch.setattr(metrics, "ImageMetrics", functools.partial(metrics.ImageMetrics, features=net, splits=1))
    res = sample.main(argv)
    gen = test_sit.recompute(sit.load_student(folder), vae, range(10), np.arange(10) % test_sit.NCLS, 3, 1, 8)
    assert res["fid"] == pytest.approx(frechet(feats(net, gen), feats(net, ref)), rel=1e-4)
    assert res["is"] == pytest.approx(inception_score(feats(net, gen)), rel=1e-5)
    out = str(tmp_path / "run")
    train_imagenet.main(test_sit.train_args(test_sit.teacher_folder(tmp_path), out, "--steps", "2", "--eval-every",
                                            "1", "--eval-ref", str(tmp_path / "ref.npz"), "--eval-samples", "4",
                                            "--vae", str(tmp_path / "vae")))
    logged = [ln for ln in open(os.path.join(out, "log.txt")) if "eval EMA" in ln]
    assert len(logged) == 2 and all(" fid " in ln and " is " in ln and " align " in ln for ln in logged)
