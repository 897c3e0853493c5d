"""Tests of the one training loop and its checkpoint layer (trainer.py, common.py) on the toy attachment.

What is checked, and against what:
  * resume: a run interrupted at a checkpoint and resumed equals an uninterrupted run bit for bit (weights, EMA,
    AdamW moments), also after a simulated crash at every write boundary of every checkpoint;
  * the guard: NaN / exploding steps are skipped from step 0, the run stops (exit 3) after --max-skips, and no
    checkpoint or export ever holds non-finite or diverged weights; a good checkpoint is left byte-identical;
  * safety: pickle payloads are refused everywhere (a marker file is never created), a second run on a locked
    --out is refused, a resume with other settings is refused, bad flags fail before any work;
  * torchrun: 2 processes with default flags train, and equal 1 process up to float summation order (AdamW moments
    compared, since AdamW's update hides a constant gradient scale).
"""
import os
import subprocess
import sys

import pytest
import torch

from runtime import common
import piflow
import sample
from models import toy
import train_imagenet
from runtime import trainer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)                                         # the repository: scripts run from it
torch.set_num_threads(1)
TINY = ["--teacher", "toy", "--width", "32", "--depth", "1", "--K", "4", "--nfe", "2", "--batch-size", "8",
        "--micro-batch", "4", "--warmup", "1", "--ema-start", "0", "--log-every", "0", "--eval-every", "0",
        "--no-progress", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("flush_denormals")   # conftest.py


def ckpt(path):
    return torch.load(os.path.join(path, "ckpt.pt"), weights_only=True)


def assert_same_state(a, b):
    """Weights, EMA and AdamW state (moments and step counts) identical, bit for bit."""
    assert a["step"] == b["step"]
    for key in ("student", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert all(torch.equal(sa[i][m], sb[i][m]) for m in ("exp_avg", "exp_avg_sq", "step")), i


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------
# Resume and crash consistency
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["--data-dependent", "--policy", "dx", "--N", "4", "--decay-iters", "4"],
                                   ["--cosine", "--total-substeps", "16", "--gm-dropout", "0.2"],
                                   ["--policy", "shortcut"]])
def test_resume_continues_identically(tmp_path, extra):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_imagenet.main(TINY + extra + ["--steps", "4", "--out", full])
    train_imagenet.main(TINY + extra + ["--steps", "2", "--out", part])                 # "interrupted" at step 2
    train_imagenet.main(TINY + extra + ["--steps", "4", "--out", part, "--resume"])
    a, b = ckpt(full), ckpt(part)
    assert_same_state(a, b)
    moved = max((a["student"][k] - b["student"][k]).abs().max() for k in a["student"])
    assert moved == 0
    assert all(s["exp_avg"].abs().max() > 0 for s in a["opt"]["state"].values() if s["exp_avg"].dim() > 1)


class Crash(Exception):
    pass


def crashing_saves(monkeypatch, at):
    """Make the at-th write event of common.save_atomic crash: events per save are (mid-write: a truncated temp
    file), (written, before os.replace), (after os.replace). Returns the event counter."""
    real, count = common.save_atomic, [0]

    def tick():
        count[0] += 1
        if count[0] == at:
            raise Crash(at)

    def save_atomic(path, write):
        def w(tmp):
            write(tmp)
            if count[0] + 1 == at:                                            # a crash half-way through the write
                with open(tmp, "r+b") as f:
                    f.truncate(os.path.getsize(tmp) // 2)
            tick()
            tick()
        real(path, w)
        tick()
    monkeypatch.setattr(common, "save_atomic", save_atomic)
    return count


def test_crash_at_every_write_boundary_resumes_old_or_new_step(tmp_path, monkeypatch):
    """Kill the run at each write boundary of each checkpoint (and its export): what is on disk is a complete
    step-s checkpoint equal to the uninterrupted run's step s, and continuing from it reproduces the final state."""
    args = TINY + ["--steps", "2", "--ckpt-every", "1"]
    ref_dir = str(tmp_path / "ref")
    snapshots, real = {}, common.save_torch

    def keep(obj, path):                                                       # record every reference checkpoint
        real(obj, path)
        if path.endswith("ckpt.pt"):
            snapshots[obj["step"]] = torch.load(path, weights_only=True)
    monkeypatch.setattr(common, "save_torch", keep)
    train_imagenet.main(args + ["--out", ref_dir, "--export", str(tmp_path / "ref.pt")])
    monkeypatch.setattr(common, "save_torch", real)
    assert sorted(snapshots) == [1, 2]
    events = crashing_saves(monkeypatch, at=10 ** 9)
    train_imagenet.main(args + ["--out", str(tmp_path / "count"), "--export", str(tmp_path / "count.pt")])
    n_events = events[0]
    assert n_events == 2 * 6                                # (2 checkpoints + 2 exports) x 3 events
    for at in range(1, n_events + 1):
        out, exp = str(tmp_path / f"c{at}"), str(tmp_path / f"c{at}.pt")
        crashing_saves(monkeypatch, at)
        with pytest.raises(Crash):
            train_imagenet.main(args + ["--out", out, "--export", exp])
        monkeypatch.setattr(common, "save_atomic", _REAL_SAVE_ATOMIC)
        if os.path.exists(os.path.join(out, "ckpt.pt")):
            on_disk = ckpt(out)
            assert_same_state(on_disk, snapshots[on_disk["step"]])              # the old step or the new one
            if on_disk["step"] < 2:
                train_imagenet.main(args + ["--out", out, "--export", exp, "--resume"])
        else:
            train_imagenet.main(args + ["--out", out, "--export", exp, "--overwrite"])
        assert_same_state(ckpt(out), snapshots[2])
        assert all(torch.equal(v, torch.load(exp, weights_only=True)["ema"][k])
                   for k, v in torch.load(str(tmp_path / "ref.pt"), weights_only=True)["ema"].items())


_REAL_SAVE_ATOMIC = common.save_atomic


# ------------------------------------------------------------------------------------------------
# The guard: skipped steps, stop, never a bad checkpoint
# ------------------------------------------------------------------------------------------------

def test_lr_1e6_from_step_0_stops_and_never_writes_bad_weights(tmp_path, capsys):
    out, exp = tmp_path / "run", tmp_path / "exp.pt"
    train_imagenet.main(TINY + ["--steps", "2", "--out", str(out), "--export", str(exp)])   # a good checkpoint
    good, good_exp = (out / "ckpt.pt").read_bytes(), exp.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_imagenet.main(TINY + ["--steps", "40", "--lr", "1e6", "--ckpt-every", "1", "--max-skips", "5",
                                    "--out", str(out), "--export", str(exp), "--overwrite"])
    assert e.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped after 5 bad steps" in err[0], err
    assert (out / "ckpt.pt").read_bytes() == good and exp.read_bytes() == good_exp   # untouched, byte for byte
    log = (out / "log.txt").read_text()
    assert "step skipped (5 in a row)" in log


class FlakyToy(toy.ToyAttachment):
    """The toy attachment whose teacher returns NaN (or 1e4 x its velocity) at chosen training steps."""

    def __init__(self, bad, *a):
        super().__init__(*a)
        self.bad, self.step, clean = bad, 0, self.teacher
        scale = {"nan": float("nan"), "big": 1e4}
        self.teacher = lambda x_t, sigma, cond: clean(x_t, sigma, cond) * scale.get(self.bad.get(self.step), 1.0)

    def loss(self, step, g, n, backward):
        self.step = step
        noise = torch.randn((n,) + toy.IMG, generator=g)
        return piflow.piid_data_free(self.student, self.teacher, noise, self.sample_cond(n, g), self.cfg, step, g,
                                     backward=backward)


def train_flaky(out, bad, steps, ckpt_every):
    cfg = piflow.PiIDConfig(nfe=2)
    tc = trainer.TrainConfig(steps=steps, batch_size=4, micro_batch=4, warmup=1, ema_start=0, max_skips=3)
    opts = toy.Options(K=4, width=32, depth=1)
    settings = trainer.settings_of(cfg, tc, opts, teacher="toy")
    run = trainer.RunConfig(out=str(out), log_every=0, ckpt_every=ckpt_every, eval_every=0, threads=1,
                            progress=False)
    return trainer.train(lambda device, dtype: FlakyToy(bad, opts, cfg, tc, settings, device), cfg, tc, settings, run)


def test_bad_steps_are_skipped_without_touching_weights_ema_or_optimizer(tmp_path):
    """NaN at steps 2-3 and an exploding loss (1e4 x teacher) at step 5 are not applied: the state saved at step 4
    (validated by step 4's good loss) equals a clean run's state after its 2 steps, bit for bit."""
    train_flaky(tmp_path / "a", {2: "nan", 3: "nan", 5: "big"}, steps=8, ckpt_every=4)
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "step 2: non-finite loss" in log and "step 3: non-finite loss" in log
    assert "step 5: loss" in log and "x the median of recent losses" in log
    snapshots, real = {}, common.save_torch
    try:
        common.save_torch = lambda obj, path: (real(obj, path), snapshots.setdefault(obj["step"], torch.load(
            path, weights_only=True)))
        train_flaky(tmp_path / "b", {2: "nan", 3: "nan", 5: "big"}, steps=8, ckpt_every=4)
    finally:
        common.save_torch = real
    train_flaky(tmp_path / "clean", {}, steps=2, ckpt_every=0)
    clean = ckpt(tmp_path / "clean")
    at4 = dict(snapshots[4], step=2)
    assert_same_state(at4, clean)
    final = ckpt(tmp_path / "b")
    assert final["step"] == 8 and all(torch.isfinite(v).all() for v in final["student"].values())


def test_guard_counts_only_consecutive_bad_steps():
    tc = trainer.TrainConfig()
    assert tc.max_skips == 20 and tc.max_loss_ratio == 1000.0
    with pytest.raises(ValueError, match="max_skips"):
        trainer.TrainConfig(max_skips=0)


# ------------------------------------------------------------------------------------------------
# Safety: pickles, locks, identity, bad flags
# ------------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this creates a marker file: proof that code ran on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_checkpoint(path, marker, like=None):
    obj = dict(like or {}, payload=Payload(str(marker)))
    torch.save(obj, path)


def test_pickle_payload_is_refused_everywhere(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    train_imagenet.main(TINY + ["--steps", "1", "--out", str(run), "--export", str(tmp_path / "exp.pt")])
    good = ckpt(run)
    evil_checkpoint(run / "ckpt.pt", marker, good)                     # a valid checkpoint with a payload inside
    evil_checkpoint(tmp_path / "exp.pt", marker, torch.load(tmp_path / "exp.pt", weights_only=True))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_imagenet.main(TINY + ["--steps", "3", "--out", str(run), "--resume"])
    assert e.value.code == 2 and "unpickling" in one_line_error(capsys)
    with pytest.raises(SystemExit):
        sample.main(["--model", "toy", "--ckpt", str(tmp_path / "exp.pt"), "--out", str(tmp_path / "s.png")])
    assert "unpickling" in one_line_error(capsys)
    with pytest.raises(SystemExit):
        sample.main(["--model", "toy", "--ckpt", str(run / "ckpt.pt"), "--out", str(tmp_path / "s.png")])
    assert "unpickling" in one_line_error(capsys)
    assert not marker.exists() and not (tmp_path / "s.png").exists()


def test_second_run_on_a_locked_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "from runtime import common; import sys, time; lock = common.RunLock(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as e:
            train_imagenet.main(TINY + ["--steps", "1", "--out", str(out)])
        assert e.value.code == 2 and "in use by another run" in one_line_error(capsys)
        assert not (out / "ckpt.pt").exists() and not (out / "log.txt").exists()
    finally:
        holder.kill()
        holder.wait()
    train_imagenet.main(TINY + ["--steps", "1", "--out", str(out)])       # the lock died with its process
    assert ckpt(out)["step"] == 1


def test_resume_refuses_other_settings_and_a_smaller_step(tmp_path, capsys):
    out = str(tmp_path / "run")
    train_imagenet.main(TINY + ["--steps", "2", "--out", out])
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    for flags, name in ((["--seed", "1"], "--seed=1"), (["--batch-size", "16"], "--batch-size=16"),
                        (["--lr", "0.01"], "--lr=0.01"), (["--K", "8"], "--K=8"), (["--nfe", "3"], "--nfe=3")):
        with pytest.raises(SystemExit) as e:
            train_imagenet.main(TINY + flags + ["--steps", "4", "--out", out, "--resume"])
        err = one_line_error(capsys)
        assert e.value.code == 2 and name in err and "differs from the checkpoint" in err, err
    for steps in ("2", "1"):
        with pytest.raises(SystemExit):
            train_imagenet.main(TINY + ["--steps", steps, "--out", out, "--resume"])
        assert f"--steps={steps}" in one_line_error(capsys)
    with pytest.raises(SystemExit):
        train_imagenet.main(TINY + ["--steps", "3", "--out", out])                  # neither --resume nor --overwrite
    assert "already holds ckpt.pt" in one_line_error(capsys)
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


def test_resume_reads_only_a_complete_checkpoint_of_the_same_run(tmp_path, capsys):
    """--resume refuses an unreadable ckpt.pt and a torch file that is not a training checkpoint (one line naming
    it), and a checkpoint whose settings lack one the run has (or hold one it lacks: a setting added or removed
    counts as different); it accepts an older checkpoint without the guard's recent losses."""
    out = tmp_path / "run"
    train_imagenet.main(TINY + ["--steps", "2", "--out", str(out)])
    good = ckpt(out)
    resume = lambda: train_imagenet.main(TINY + ["--steps", "3", "--out", str(out), "--resume"])
    cases = [(b"not a checkpoint", "--resume: checkpoint="), ({"student": {}, "opt": {}}, "is not a piflow training "
                                                                                           "checkpoint"),
             (dict(good, settings={k: v for k, v in good["settings"].items() if k != "ema_gamma"}),
              "--ema-gamma=7.0 differs from the checkpoint's None"),
             (dict(good, settings=dict(good["settings"], extra_setting=1)), "--extra-setting=None differs")]
    for content, says in cases:
        if isinstance(content, bytes):
            (out / "ckpt.pt").write_bytes(content)
        else:
            torch.save(content, str(out / "ckpt.pt"))
        with pytest.raises(SystemExit) as e:
            resume()
        err = one_line_error(capsys)
        assert e.value.code == 2 and says in err, err
    torch.save({k: v for k, v in good.items() if k != "recent_losses"}, str(out / "ckpt.pt"))
    resume()
    assert ckpt(out)["step"] == 3


@pytest.mark.parametrize("flags, name", [(["--batch-size", "0"], "--batch-size=0"), (["--steps", "0"], "--steps=0"),
                                         (["--micro-batch", "3"], "--micro-batch=3"), (["--nfe", "0"], "--nfe=0"),
                                         (["--gm-dropout", "1.5"], "--gm-dropout=1.5"), (["--lr", "nan"], "--lr=nan"),
                                         (["--policy", "vae"], "--policy='vae'"), (["--shift", "-1"], "--shift=-1")])
def test_bad_flags_fail_in_one_line_before_any_work(tmp_path, capsys, flags, name):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_imagenet.main(TINY + ["--out", str(out)] + flags)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and name in err, err
    assert not out.exists()


def test_equal_tensors_save_to_equal_bytes(tmp_path):
    """Checkpoints and assets reproduce byte for byte: the file's name (and save_atomic's random temporary name)
    does not enter the bytes; a changed tensor does."""
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 3}
    paths = [tmp_path / "a.pt", tmp_path / "a.pt", tmp_path / "sub" / "other_name.pt"]
    data = []
    for p in paths:
        common.save_torch(obj, str(p))
        data.append(p.read_bytes())
    assert data[0] == data[1] == data[2]
    common.save_torch({"w": obj["w"] + 1, "step": 3}, str(tmp_path / "b.pt"))
    assert (tmp_path / "b.pt").read_bytes() != data[0]


def test_unwritable_outputs_fail_before_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        train_imagenet.main(TINY + ["--steps", "1", "--out", str(blocker / "run")])
    assert "--out=" in one_line_error(capsys)
    with pytest.raises(SystemExit):
        train_imagenet.main(TINY + ["--steps", "1", "--out", str(tmp_path / "r"), "--export", str(blocker / "e.pt")])
    assert "--export=" in one_line_error(capsys) and not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        sample.main(["--model", "toy", "--out", str(blocker / "grid.png")])
    assert "--out=" in one_line_error(capsys)


# ------------------------------------------------------------------------------------------------
# torchrun
# ------------------------------------------------------------------------------------------------

def torchrun(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train_imagenet.py")] + args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_torchrun_default_flags_and_equivalence_to_one_process(tmp_path):
    """The README's torchrun line with default flags; 2 ranks == 1 process up to summation order, moments included."""
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    r = torchrun(["--teacher", "toy", "--steps", "4", "--out", two, "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    train_imagenet.main(["--teacher", "toy", "--steps", "4", "--out", one, "--no-progress", "--micro-batch", "32",
                         "--threads", "1"])
    a, b = ckpt(two), ckpt(one)
    assert a["settings"]["micro_batch"] == 0 and b["settings"]["micro_batch"] == 32   # auto = 64 / 2 ranks
    for key in ("student", "ema"):
        diff = max((a[key][k] - b[key][k]).abs().max().item() for k in a[key])
        assert diff < 1e-6, (key, diff)
    for i, s in a["opt"]["state"].items():
        for m in ("exp_avg", "exp_avg_sq"):
            ref = b["opt"]["state"][i][m]
            # float summation order only: 1 % of the tensor's scale (the logstd head's tiny, cancelling gradients
            # differ by ~1e-3 relative); a gradient scaled by 2 would be off by 100 % (exp_avg) / 300 % (exp_avg_sq)
            assert (s[m] - ref).abs().max() <= 1e-2 * ref.abs().max() + 1e-12, (i, m)


# ------------------------------------------------------------------------------------------------
# Public API contracts the attachments rely on
# ------------------------------------------------------------------------------------------------

def test_policy_inputs_are_checked():
    B, K, C = 2, 3, 4
    means, logw, x = torch.randn(B, K, C, 5), torch.zeros(B, K, 1, 5), torch.randn(B, C, 5)
    for bad in (torch.zeros(B), torch.zeros(B, 1), torch.zeros(1, 1, 1, 1), torch.zeros(B, 1, 1, 5)):
        with pytest.raises(ValueError, match="logstds.shape"):
            piflow.GMPolicy(means, logw, bad, x, 1.0)
    for sigma in (float("nan"), torch.tensor([0.5, float("nan")])):
        with pytest.raises(ValueError, match="sigma_src"):
            piflow.GMPolicy(means, logw, torch.zeros(B, 1, 1, 1), x, sigma)
        with pytest.raises(ValueError, match="sigma_src"):
            piflow.DXPolicy(torch.randn(B, 2, C, 5), x, sigma, 0.5)
    with pytest.raises(ValueError, match="tau_from"):
        piflow.policy_rollout(piflow.GMPolicy(means, logw, torch.zeros(B, 1, 1, 1), x, 1.0), x, float("nan"), 0.0)


def test_sample_keeps_the_training_schedule():
    """A student carrying its PiIDConfig is sampled on that schedule (shift 3.2, final step 0.5) without repeating
    it; a contradicting shift is refused; an unconditional student needs no cond."""
    seen = []

    class Student:
        piid_config = piflow.PiIDConfig(nfe=3, shift=3.2, final_step_scale=0.5, total_substeps=8)

        def __call__(self, x_t, sigma):                                      # unconditional: no cond argument
            seen.append(float(sigma[0]))
            return piflow.GMPolicy.from_x0(torch.zeros(1, 1, 2), torch.zeros(1, 1, 1), 0.0, x_t, sigma)
    piflow.sample(Student(), torch.randn(1, 2))
    taus = [1, 1 - 1 / 2.5, 1 - 2 / 2.5]
    assert seen == pytest.approx([3.2 * t / (1 + 2.2 * t) for t in taus], abs=1e-7)
    with pytest.raises(ValueError, match="shift"):
        piflow.sample(Student(), torch.randn(1, 2), shift=1.0)
    seen.clear()
    piflow.sample(Student(), torch.randn(1, 2), nfe=1)                     # elastic NFE keeps shift/scale
    assert seen == [1.0]


def test_every_command_shows_its_models_own_options(capsys):
    """`sample.py --model M --help` and the training scripts' --help list that model's options with defaults."""
    import train_t2i
    own = {"digits": "--ode-steps", "toy": "--per-class", "imagenet": "--class-labels", "flux": "--adapter", "flux2": "--image IMAGE",
           "qwen": "--adapter", "sd3": "--adapter"}
    assert set(own) == set(sample.MODELS)
    for model, flag in own.items():
        with pytest.raises(SystemExit) as e:
            sample.main(["--model", model, "--help"])
        text = capsys.readouterr().out
        assert e.value.code == 0 and f"--model {model}" in text and flag in text and "(default:" in text, model
    for main, select, choice, flag in ((train_imagenet.main, "--teacher", "toy", "--width"),
                                       (train_imagenet.main, "--teacher", "sit", "--teacher-ckpt"),
                                       (train_t2i.main, "--model", "flux", "--lora-rank"),
                                       (train_t2i.main, "--model", "sd3", "--lora-rank")):
        with pytest.raises(SystemExit):
            main([select, choice, "--help"])
        text = capsys.readouterr().out
        assert f"{select} {choice}" in text and flag in text and "--max-skips" in text and "--gm-dropout" in text


# ------------------------------------------------------------------------------------------------
# The loop's own behaviour, against hand-written ground truth: a model whose gradient is known exactly
# ------------------------------------------------------------------------------------------------

A = torch.tensor([[1.0, -2.0, 2.0, 4.0]])              # d loss / d w: |A| = 5 exactly


class KnownGradient(trainer.Attachment):
    """student w (1 x 4, starts at 0); loss = 1000 + <w, A> (positive, so the guard's median test never fires):
    the gradient is A at every step, whatever w is."""

    def __init__(self, nan_at=(), evals=None):
        self.student = torch.nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            self.student.weight.zero_()
        self.teacher, self.noise_shape, self.nan_at, self.evals = None, (1, 1, 1), set(nan_at), evals
        if evals is not None:                                        # evaluate(student): record the weights it sees
            self.evaluate = lambda student: evals.append(student.weight.detach().clone()) or {"w0": 1.0}

    def loss(self, step, g, n, backward):
        loss = 1000 + (self.student.weight * A).sum() + (float("nan") if step in self.nan_at else 0.0)
        backward(loss)
        return loss.detach()


def run_known(tmp_path, monkeypatch, att=None, rc=None, **tc):
    """train() on KnownGradient; records, at every optimizer step, (lr, grad, w before the step) read from the
    optimizer the trainer built. -> (records, final checkpoint)."""
    made, records = [], []
    real = trainer.make_optimizer

    def make(params, tc_, say):
        opt = real(params, tc_, say)
        opt.register_step_pre_hook(lambda o, args, kw: records.append((
            o.param_groups[0]["lr"], o.param_groups[0]["params"][0].grad.clone(),
            o.param_groups[0]["params"][0].detach().clone())))
        made.append(opt)
        return opt
    monkeypatch.setattr(trainer, "make_optimizer", make)
    rc = rc or trainer.RunConfig(out=str(tmp_path / "known"), log_every=0, ckpt_every=0, eval_every=0,
                                 progress=False)
    trainer.train(lambda device, dtype: att or KnownGradient(), piflow.PiIDConfig(),
                  trainer.TrainConfig(**dict(dict(batch_size=1), **tc)), {}, rc)
    assert len(made) == 1
    return records, ckpt(rc.out)


def test_gradient_clipping_starts_at_clip_start(tmp_path, monkeypatch):
    """Before clip_start the optimizer gets the raw gradient A (norm 5 > grad_clip); from clip_start on, A scaled to
    norm grad_clip (torch's clip_grad_norm_: factor grad_clip / (|g| + 1e-6)). AdamW's moments (which a constant
    gradient scale does not hide) equal the hand recursion over those gradients."""
    recs, ck = run_known(tmp_path, monkeypatch, steps=4, clip_start=2, grad_clip=0.5, warmup=0, lr=1e-3,
                         batch_size=4, micro_batch=2)          # 2 micro-batches: their mean gradient, A
    want = [A, A, A * 0.5 / (5 + 1e-6), A * 0.5 / (5 + 1e-6)]
    for s, ((_, grad, _), g) in enumerate(zip(recs, want)):
        torch.testing.assert_close(grad, g, rtol=1e-6, atol=0, msg=f"step {s}")
    assert float(recs[2][1].norm()) <= 0.5
    m = v = torch.zeros(1, 4, dtype=torch.float64)
    for g in want:                                      # AdamW, betas (0.9, 0.95)
        m, v = 0.9 * m + 0.1 * g.double(), 0.95 * v + 0.05 * g.double() ** 2
    state = ck["opt"]["state"]["weight"]
    torch.testing.assert_close(state["exp_avg"].double(), m, rtol=1e-6, atol=0)
    torch.testing.assert_close(state["exp_avg_sq"].double(), v, rtol=1e-6, atol=0)


def test_learning_rate_warmup_and_cosine_by_hand(tmp_path, monkeypatch):
    """lr 1e-2, warm-up 4 steps from 0.001 lr, cosine to 0 at step 10: the optimizer's lr at each step equals the
    values written out here, and the weights move by exactly that lr (AdamW with a constant gradient: the update
    is lr * g / (|g| + eps) = lr * sign(g), from the first step on, bias correction included)."""
    recs, ck = run_known(tmp_path, monkeypatch, steps=10, warmup=4, cosine=True, lr=1e-2, grad_clip=100.0)
    # warm-up: lr (0.001 + 0.999 s / 4); then 0.5 lr (1 + cos(pi (s - 4) / 6))
    want = {0: 1e-5, 1: 2.5075e-3, 2: 5.005e-3, 3: 7.5025e-3, 4: 1e-2, 5: 9.330127019e-3, 7: 5e-3,
            8: 2.5e-3, 9: 6.698729811e-4}
    lrs = [lr for lr, _, _ in recs]
    assert len(lrs) == 10
    for s, lr in want.items():
        assert lr == pytest.approx(lrs[s], rel=1e-9), (s, lrs[s], lr)
    ws = [w for _, _, w in recs] + [ck["student"]["weight"]]
    for s in range(10):
        torch.testing.assert_close(ws[s + 1] - ws[s], -lrs[s] * torch.sign(A), rtol=2e-3, atol=0, msg=f"step {s}")
    # no warm-up: the full rate from step 0; warm-up 1: 0.001 lr at step 0, then the full rate (constant)
    for warmup, want in ((0, [1e-2, 1e-2, 1e-2]), (1, [1e-5, 1e-2, 1e-2])):
        recs, _ = run_known(tmp_path / f"w{warmup}", monkeypatch, steps=3, warmup=warmup, lr=1e-2, grad_clip=100.0)
        assert [lr for lr, _, _ in recs] == pytest.approx(want, rel=1e-12), warmup


def test_ema_decay_as_applied(tmp_path, monkeypatch):
    """EMA power gamma = 1 from ema_start = 1: beta = 0 (a copy) at steps 0 and 1, then (1 - 1 / (s + 1 - 1))^2:
    1/4, 4/9, 9/16 at steps 2, 3, 4, applied to the weights after each step's update."""
    recs, ck = run_known(tmp_path, monkeypatch, steps=5, warmup=0, lr=1e-2, ema_start=1, ema_gamma=1.0)
    after = [w for _, _, w in recs[1:]] + [ck["student"]["weight"]]          # weights after steps 0 .. 4
    ema = None
    for w, beta in zip(after, [0.0, 0.0, 1 / 4, 4 / 9, 9 / 16]):
        ema = w.double() if ema is None else beta * ema + (1 - beta) * w.double()
    torch.testing.assert_close(ck["ema"]["weight"].double(), ema, rtol=1e-6, atol=0)
    assert float((ck["ema"]["weight"] - ck["student"]["weight"]).abs().min()) > 1e-3      # it is not a copy


# ------------------------------------------------------------------------------------------------
# Bad input: one line and a non-zero exit, never a traceback or a non-finite file
# ------------------------------------------------------------------------------------------------

def test_batch_beyond_memory_is_refused_before_training(tmp_path, capsys):
    """--batch-size 1e9: the states of one micro-batch alone exceed the machine's memory: one line naming the flag,
    before any step (was an allocator traceback after 23 s)."""
    with pytest.raises(SystemExit) as e:
        train_imagenet.main(TINY + ["--batch-size", "1000000000", "--micro-batch", "0", "--out",
                                  str(tmp_path / "run")])
    err = one_line_error(capsys)
    assert e.value.code == 2 and "--batch-size=1000000000" in err and "GiB" in err, err
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_failed_allocation_names_the_size_flag(tmp_path, capsys, monkeypatch):
    """An allocation that fails anyway (here: the CPU allocator's error raised by the first micro-batch) is one line
    naming --batch-size / --micro-batch, exit 2; another RuntimeError stays a traceback (a bug)."""
    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes.")
    monkeypatch.setattr(trainer, "micro_loss", oom)
    with pytest.raises(SystemExit) as e:
        train_imagenet.main(TINY + ["--steps", "2", "--out", str(tmp_path / "run")])
    err = one_line_error(capsys)
    assert e.value.code == 2 and "out of memory" in err and "--batch-size / --micro-batch" in err, err
    monkeypatch.setattr(trainer, "micro_loss", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        train_imagenet.main(TINY + ["--steps", "2", "--out", str(tmp_path / "run2")])


def test_non_finite_ema_is_never_written(tmp_path, capsys, monkeypatch):
    """An EMA that became non-finite (here: planted after step 0) stops the run at its first checkpoint with one
    line and exit 3; neither ckpt.pt nor the export is written."""
    real = piflow.ema_update

    def poisoned(ema, params, beta):
        real(ema, params, beta)
        next(iter(ema.values())).view(-1)[0] = float("inf")
    monkeypatch.setattr(piflow, "ema_update", poisoned)
    out, exp = tmp_path / "run", tmp_path / "student.pt"
    with pytest.raises(SystemExit) as e:
        train_imagenet.main(TINY + ["--steps", "2", "--out", str(out), "--export", str(exp)])
    err = one_line_error(capsys)
    assert e.value.code == 3 and "non-finite" in err and "nothing written" in err, err
    assert not (out / "ckpt.pt").exists() and not exp.exists()


def test_guard_reasons():
    """Training.is_bad: a non-finite loss or gradient norm names which; a loss above max_loss_ratio x the median of the
    recent good losses is bad, one equal to it is not."""
    t = trainer.Training.__new__(trainer.Training)
    t.tc, t.recent = trainer.TrainConfig(max_loss_ratio=10.0), [1.0, 2.0, 3.0]
    assert t.is_bad(1.0, float("nan")) == "non-finite gradient norm"
    assert t.is_bad(float("inf"), 1.0) == "non-finite loss" and t.is_bad(float("nan"), float("nan")) == "non-finite loss"
    assert t.is_bad(20.0, 1.0) is None and "> 10 x the median" in t.is_bad(20.5, 1.0)
    t.recent = []
    assert t.is_bad(1e30, 1.0) is None


def test_loop_cadence_progress_and_resume(tmp_path, monkeypatch, capsys):
    """log / eval / checkpoint cadence of the loop on KnownGradient, 5 steps, every 2: the log has steps 2 and 4 with
    the mean loss; evaluate sees the EMA weights (swapped in, then back) after steps 2 and 4; the checkpoints due
    after steps 2 and 4 are written when steps 3 and 5 pass the guard, holding the weights after steps 2 and 4, then
    the final one; the progress bar counts
    to 5/5, also when resumed from step 3 (it starts at 3); the guard keeps the last 100 losses."""
    import tqdm
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)      # no monitor thread (forked mutation workers hang)
    saved, real = [], common.save_torch
    monkeypatch.setattr(common, "save_torch", lambda obj, path: saved.append(obj) or real(obj, path))
    evals, out = [], tmp_path / "cad"
    rc = trainer.RunConfig(out=str(out), log_every=2, ckpt_every=2, eval_every=2, progress=True)
    recs, ck = run_known(tmp_path, monkeypatch, att=KnownGradient(evals=evals), rc=rc, steps=5, warmup=0, lr=1e-2,
                         ema_start=0, ema_gamma=1.0)
    log = (out / "log.txt").read_text()
    assert "step 2 | loss " in log and "step 4 | loss " in log and "step 3 |" not in log and "step 5 |" not in log
    assert log.count("eval EMA: w0 1.0000") == 2 and "step 2 | eval EMA" in log and "step 4 | eval EMA" in log
    assert [s["step"] for s in saved] == [2, 4, 5] and torch.equal(saved[0]["student"]["weight"], recs[2][2])
    assert torch.equal(saved[1]["student"]["weight"], recs[4][2])
    assert len(evals) == 2 and not torch.equal(evals[0], recs[2][2])  # the EMA, not the raw weights
    torch.testing.assert_close(evals[0], saved[0]["ema"]["weight"])
    err = capsys.readouterr().err
    assert "pi-ID: 100%" in err and "5/5" in err and "loss=999.6]" in err       # the postfix: the last loss
    resumed = trainer.RunConfig(out=str(out), resume=True, log_every=0, ckpt_every=0, eval_every=0, progress=True)
    run_known(tmp_path, monkeypatch, rc=resumed, steps=7, warmup=0, lr=1e-2, ema_start=0, ema_gamma=1.0)
    err = capsys.readouterr().err
    assert "7/7" in err and "0/7" not in err and ckpt(out)["step"] == 7
    assert int(ckpt(out)["opt"]["state"]["weight"]["step"]) == 7        # steps 5 and 6 only, after the 5 of run 1
    recs, ck = run_known(tmp_path / "long", monkeypatch, steps=102, warmup=0, lr=1e-4)
    assert len(ck["recent_losses"]) == 100


def test_bad_steps_count_in_a_row_and_final_weights_are_validated(tmp_path, monkeypatch, capsys):
    """max_skips 2: one NaN step is skipped and training goes on; two in a row stop the run; a NaN loss of the final
    weights (the validating loss at step = steps) stops it before the final checkpoint is written."""
    recs, ck = run_known(tmp_path / "one", monkeypatch, att=KnownGradient(nan_at={1}), steps=4, warmup=0,
                         max_skips=2)
    assert ck["step"] == 4 and len(recs) == 3                        # step 1 not applied
    with pytest.raises(trainer.Diverged, match="2 bad steps in a row"):
        run_known(tmp_path / "two", monkeypatch, att=KnownGradient(nan_at={1, 2}), steps=4, warmup=0, max_skips=2)
    with pytest.raises(trainer.Diverged, match="the final weights fail the guard"):
        run_known(tmp_path / "final", monkeypatch, att=KnownGradient(nan_at={4}), steps=4, warmup=0)
    assert not (tmp_path / "final" / "known" / "ckpt.pt").exists()


# ------------------------------------------------------------------------------------------------
# runtime/common.py helpers, by hand
# ------------------------------------------------------------------------------------------------

def test_common_flag_helpers():
    """--temperature parsing, old underscore spellings, one-line messages, settings -> dataclass, flag names."""
    import argparse
    assert common.parse_temperature("none") is None and common.parse_temperature("auto") == "auto"
    assert common.parse_temperature("0.5") == 0.5 and common.parse_temperature("3") == 3.0
    for bad in ("0", "-1", "inf", "nan", "abc", "NONE", "Auto"):
        with pytest.raises(argparse.ArgumentTypeError, match="a finite value > 0"):
            common.parse_temperature(bad)
    assert common.hyphenate(["--batch_size=8", "--a_b", "x_y", "--", "-k_v", "--x_y=a_b=c"]) == \
        ["--batch-size=8", "--a-b", "x_y", "--", "-k_v", "--x-y=a_b=c"]
    assert common.first_line(ValueError("")) == "ValueError" and common.first_line(ValueError(" a\nb")) == "a"
    assert common.first_line(ValueError("x" * 300)) == "x" * 200
    tc = common.from_settings(trainer.TrainConfig, {"guidance_interval": [0.1, 0.5], "steps": 3, "junk": 1})
    assert tc.guidance_interval == (0.1, 0.5) and isinstance(tc.guidance_interval, tuple) and tc.steps == 3
    assert common._flag_message(ValueError("lr=1e-3 is not accepted; x=y"), {"lr"}) == \
        "--lr=1e-3 is not accepted; x=y"
    assert common._flag_message(ValueError("other=1 is not accepted"), {"lr"}) == "other=1 is not accepted"
    with pytest.raises(common.UserError) as e:
        common.check_finite_output(torch.tensor([1.0, float("nan")]), "x")
    assert str(e.value) == "x: 1 of 2 values are NaN or inf; nothing written"
    common.check_finite_output(torch.arange(3), "integers")                      # nothing to check


def test_save_atomic_temporary_file_and_mode(tmp_path, monkeypatch):
    """save_atomic writes a temporary file beside the target (PATH.<random>.tmp, same folder: os.replace is atomic
    only within one file system), with the mode a plain open() would give (0o666 & ~umask), and removes it when the
    write fails (the write's own error propagates)."""
    seen, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: seen.append(a) or replace(a, b))
    old = os.umask(0o022)
    try:
        common.save_text(str(tmp_path / "a.txt"), "hello")
    finally:
        os.umask(old)
    tmp = seen[0]
    assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith("a.txt.") and tmp.endswith(".tmp")
    assert (tmp_path / "a.txt").read_text() == "hello" and (os.stat(tmp_path / "a.txt").st_mode & 0o777) == 0o644

    def failing(path):
        open(path, "w").write("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        common.save_atomic(str(tmp_path / "b.txt"), failing)
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_read_json_names_the_file(tmp_path):
    """common.read_json: the parsed object; malformed JSON, a missing file or bytes that are not UTF-8 give one
    UserError naming the file and what is wrong."""
    good, bad, binary = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "bin.json"
    good.write_text('{"a": [1, 2]}')
    bad.write_text('{"a": 1,\n "b": }')
    binary.write_bytes(b"\xff\xfe\x00")
    assert common.read_json(str(good), "--x") == {"a": [1, 2]}
    with pytest.raises(common.UserError) as e:
        common.read_json(str(bad), "--x")
    assert str(e.value) == f"--x: {str(bad)!r} is not valid JSON (Expecting value at line 2, column 7)"
    for path, says in ((tmp_path / "missing.json", "FileNotFoundError"), (binary, "UnicodeDecodeError")):
        with pytest.raises(common.UserError, match=f"--x: .* cannot be read \\({says}"):
            common.read_json(str(path), "--x")


def test_check_writable_and_memory(tmp_path):
    """check_writable refuses a path under a regular file and, for a file output, a folder (a symlink to a folder is
    a publish_dir export and passes); check_memory refuses only more bytes than the machine has."""
    blocker, script = tmp_path / "file", tmp_path / "script"
    blocker.write_text("x")
    script.write_text("x")
    os.chmod(script, 0o755)                                # accessible (w + x), but not a folder
    for path, is_dir in ((blocker / "x.png", False), (blocker / "d", True), (blocker, True), (script / "x", False)):
        with pytest.raises(common.UserError, match="is not a writable folder"):
            common.check_writable(str(path), "--out", is_dir=is_dir)
    with pytest.raises(common.UserError, match="is a folder; expected a file path"):
        common.check_writable(str(tmp_path), "--out")
    os.symlink(str(tmp_path), str(tmp_path / "link"))
    common.check_writable(str(tmp_path / "link"), "--export")
    common.check_writable(str(tmp_path / "new" / "deeper"), "--out", is_dir=True)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    common.check_memory(total, "--x", 1, "it")
    with pytest.raises(common.UserError, match=r"--x=2 is not accepted: it alone need .* GiB; lower --x"):
        common.check_memory(total + 1, "--x", 2, "it")
