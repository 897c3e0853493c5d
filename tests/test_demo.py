"""The browser demo (labs/demo.py) in a real headless Chromium, the pages behind it, sample.py --h (toy, imagenet,
flux) and the h lab (labs/sde_h.py).

The browser test needs the optional extras (not in requirements.txt; .ci/run installs them):
    pip install gradio==6.31.0 selenium==4.51.0 && apt-get install -y chromium chromium-driver
Without them it is skipped with that line (it fails instead under PIFLOW_REQUIRE_BROWSER=1, as in CI); everything
else here runs without gradio.
"""
import argparse
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import piflow
import sample
from labs import demo, sde_h, toy2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = "pip install gradio==6.31.0 selenium==4.51.0; apt-get install -y chromium chromium-driver"
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1100")


def pixels(path_or_bytes):
    import io
    f = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return np.asarray(Image.open(f).convert("RGB")).astype(np.int16)


def assert_same_picture(a, b):
    """The same code on the same inputs in two processes (same torch thread count): equal pixels. A changed
    reduction order could at most flip the rounding of a value lying within round-off of a .5 grey-level
    boundary: allow a difference of 1 on at most 0.1 % of the pixels, nothing larger."""
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.abs(a - b)
    assert d.max() <= 1 and (d > 0).mean() <= 1e-3, (d.max(), (d > 0).mean())


def tiny_lab2d(cache, monkeypatch):
    """Fill a 2-D cache through sde_h.lab2d_models with an untrained teacher and student (fixed seeds; the drawing
    code does not care whether they are trained)."""
    torch.manual_seed(0)
    teacher = toy2d.MLP2D().eval().requires_grad_(False)

    def distill(teacher, out, policy, nfe, steps):
        torch.manual_seed(1)
        s = toy2d.PolicyStudent(teacher, policy, 8, cfg=piflow.PiIDConfig(nfe=nfe))
        s.piid_config = piflow.PiIDConfig(nfe=nfe)
        return s
    monkeypatch.setattr(toy2d, "train_teacher", lambda: teacher)
    monkeypatch.setattr(toy2d, "distill", distill)
    return sde_h.lab2d_models((4,), 200, cache, log=lambda *a: None)


# ----------------------------------------------------------------------------------------------------------
# Without a browser
# ----------------------------------------------------------------------------------------------------------

def test_sample_py_h_flag(tmp_path, capsys):
    """sample.py --h: the same seed reproduces the grid; h = 1 changes it (re-noising from --seed); another seed
    changes it again; a bad value is one line naming --h."""
    def run(name, *a):
        out = str(tmp_path / f"{name}.png")
        sample.main(["--model", "toy", "--nfe", "3", "--per-class", "2", "--class-labels", "1", "4", *a, "--out", out])
        return pixels(out)
    h0, h1, h1b, h1s = run("a"), run("b", "--h", "1"), run("c", "--h", "1"), run("d", "--h", "1", "--seed", "1")
    assert np.array_equal(h1, h1b) and not np.array_equal(h0, h1) and not np.array_equal(h1, h1s)
    capsys.readouterr()
    for bad in ("-1", "nan", "x"):
        with pytest.raises(SystemExit):
            sample.main(["--model", "toy", "--h", bad, "--out", str(tmp_path / "bad.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"sample.py: error: argument --h: '{bad}' is not accepted; expected a finite value >= 0 " \
                          "or 'inf'", err


def test_imagenet_h_per_sample_generators(tmp_path):
    """sample.py --model imagenet --h 1 (tiny released-style GM student, tiny VAE): sample i re-noises from its own
    generator, the one seeded seed * 2^32 + i that drew its noise, so the images do not depend on the batch size:
    a batch of 3 equals the samples recomputed here one at a time with that generator continued."""
    import test_sit as S
    from models import sit
    folder = S.released_student(tmp_path / "gmrepa_k32_imagenet_piid_2step")[0]
    vae = S.tiny_vae(str(tmp_path / "vae"))
    student = sit.load_student(folder)
    base = ["--model", "imagenet", "--ckpt", folder, "--vae", str(tmp_path / "vae"), "--device", "cpu",
            "--total-substeps", "8", "--seed", "3", "--nfe", "3", "--h", "1", "--class-labels", "7", "2",
            "--per-class", "2"]
    got = np.stack(sample.main(base + ["--batch-size", "3", "--out", str(tmp_path / "grid.png")])["images"])
    want = []
    for i, label in enumerate([7, 7, 2, 2]):
        g = torch.Generator().manual_seed(3 * 2 ** 32 + i)
        noise = torch.randn(1, S.C, S.S, S.S, generator=g)
        with torch.no_grad():
            z = piflow.sample(student, noise, torch.tensor([label]), 3, total_substeps=8, h=1.0, generator=g)
            x = vae.decode(z / vae.config.scaling_factor).sample
        want.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()[0])
    assert_same_picture(got.astype(np.int16), np.stack(want).astype(np.int16))


def test_sde_h_lab_rows():
    """labs.sde_h on the shipped toy student (4 samples per class): the reference rows, then per NFE the teacher's
    Euler sampler and one row per h. At 1 NFE the only step ends at sigma = 0, where nothing is re-noised: every h
    gives the same samples; at 2 NFE h = 1 re-noises (redraw > 0, the same initial noise gives other samples)."""
    rows = sde_h.table(("toy",), (1, 2), (0.0, 1.0), per_class=4, log=lambda *a: None)
    assert [(r["sampler"], r["nfe"], r["h"]) for r in rows] == [
        ("data (exact samples)", None, None), ("teacher ODE (RK4, 256 calls)", None, None),
        ("teacher Euler", 1, None), ("pi-Flow GM student", 1, 0.0), ("pi-Flow GM student", 1, 1.0),
        ("teacher Euler", 2, None), ("pi-Flow GM student", 2, 0.0), ("pi-Flow GM student", 2, 1.0)]
    assert rows[3] == dict(rows[4], h=0.0) and rows[6]["redraw"] == 0 and rows[7]["redraw"] > 0.5
    assert rows[1]["align"] == 0 and all(r["div"] > 0 and r["mode_kl"] >= 0 for r in rows)


@pytest.mark.parametrize("model, k", [("toy", 3), ("digits", 1)])
def test_embedded_page_is_sample_py(model, k, tmp_path):
    """The demo's embedded page writes exactly sample.py's grid for its settings (same command line), and shows
    that command; a bad h or temperature becomes one line on the page."""
    page = demo.EmbeddedPage(model, str(tmp_path), threads=torch.get_num_threads())
    path, text = page.generate("3", 5, 2, "auto", "0.5", k)
    want = tmp_path / "want.png"
    argv = ["--model", model, "--nfe", "2", "--seed", "5", "--temperature", "auto", "--h", "0.5", "--per-class",
            str(k), "--class-labels", "3", *demo.EMBEDDED[model]["extra"]]
    sample.main(argv + ["--threads", str(torch.get_num_threads()), "--out", str(want)])
    assert np.array_equal(pixels(path), pixels(str(want)))
    assert text.startswith("python sample.py " + " ".join(argv))
    for h, temp, field in (("-2", "none", "--h"), ("0", "hot", "--temperature")):
        with pytest.raises(demo.DemoError, match=f"argument {field}"):
            page.generate("all", 0, 2, temp, h, 1)


def test_sde_path_is_the_sampler_and_figure2d(tmp_path, monkeypatch):
    """The 2-D tab's trajectories (sde_h.sde_path, one substep at a time) end where piflow.sample ends with the
    same re-noise draws, at h = 0, 1 and inf; the figure draws; the cache reloads the same student."""
    teacher, students = tiny_lab2d(str(tmp_path / "c"), monkeypatch)
    student = students[4]
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for h, nfe in ((0.0, 3), (1.0, 3), ("inf", 3), (1.0, 1)):
        path, calls = sde_h.sde_path(student, x, nfe, h, torch.Generator().manual_seed(4))
        want = piflow.sample(student, x, None, nfe, h=h, generator=torch.Generator().manual_seed(4))
        assert len(calls) == nfe and torch.allclose(path[-1], want, rtol=0, atol=1e-5), (h, nfe)
    monkeypatch.undo()
    teacher2, students2 = sde_h.lab2d_models((4,), 200, str(tmp_path / "c"))             # from the cache now
    assert all(torch.equal(a, b) for a, b in zip(students2[4].state_dict().values(), student.state_dict().values()))
    img = demo.figure2d(teacher2, students2[4], 2, 1.0, 0)
    assert img.size == (790, 430) and len(np.unique(np.asarray(img))) > 3


def test_demo_one_line_errors(monkeypatch, capsys):
    """Without gradio the demo stops in one line saying how to install it; so does a busy port."""
    monkeypatch.setitem(sys.modules, "gradio", None)                  # import gradio -> ImportError
    with pytest.raises(SystemExit) as e:
        demo.main(["--port", str(free_port())])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["demo.py: error: gradio is not installed: pip install gradio (an optional "
                                         "extra, not in requirements.txt)"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit):
            demo.main(["--port", str(port)])
    assert capsys.readouterr().err.strip().splitlines() == [f"demo.py: error: --port={port} is not free on "
                                                            "127.0.0.1; pass another --port"]


def test_t2i_h_through_pipeline_sample_py_and_demo_page(tmp_path):
    """FLUX.1 (tiny random-weight base, our adapter, 3 NFE): sample.py --h 1 gives the image of piflow.sample with
    h = 1 and the re-noise drawn from the noise's own generator (seed + i), decoded as written out in test_t2i;
    h = 0 gives another image; the demo's T2I page (the pipeline API, loaded once) gives sample.py's image."""
    import test_t2i as T
    from models import t2i
    base, ad = str(tmp_path / "flux"), T.our_adapter("flux", tmp_path / "ad")
    T.tiny_pipeline("flux").save_pretrained(base)
    argv = ["--model", "flux", "--adapter", ad, "--base", base, "--prompt", "a cat", "--height", "32", "--width",
            "48", "--seed", "7", "--nfe", "3"]
    res = {h: sample.main(argv + ["--h", h, "--out", str(tmp_path / f"h{h}.png")])["images"][0] for h in ("0", "1")}
    assert np.abs(res["0"].astype(int) - res["1"]).mean() > 1
    ref = t2i.student_from_adapter("flux", T.tiny_transformer("flux"), ad, "--adapter", T.F32)[0].eval()
    cond = dict(T.stock_cond("flux", base, ["a cat"]), guidance=torch.tensor([t2i.FAMILIES["flux"].guidance_scale]))
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(1, t2i.FAMILIES["flux"].channels, 4, 6, generator=g)
    x = piflow.sample(ref, noise, cond, 3, temperature=0.2, h=1.0, generator=g,           # auto = 0.1 (3 - 1)
                      cfg=piflow.PiIDConfig(nfe=2, shift=3.2, final_step_scale=0.5))
    want = T.decode_written_out("flux", T.tiny_vae("flux").eval(), x)[0]
    assert_same_picture(res["1"].astype(np.int16), want.astype(np.int16))
    page = demo.T2IPage(argparse.Namespace(model="flux", base=base, adapter=ad, dtype="fp32", cpu_offload=False,
                                           height=32, width=48))
    img, text = page.generate("a cat", 3, 7, t2i.FAMILIES["flux"].guidance_scale, "1")
    assert_same_picture(np.asarray(img).astype(np.int16), res["1"].astype(np.int16))
    with pytest.raises(demo.DemoError, match="guidance"):
        page.generate("a cat", 3, 7, 2.0, "0")


# ----------------------------------------------------------------------------------------------------------
# In a real browser
# ----------------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_or_skip():
    missing = [m for m in ("gradio", "selenium") if importlib.util.find_spec(m) is None] + \
        [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    if missing:
        (pytest.fail if os.environ.get("PIFLOW_REQUIRE_BROWSER") == "1" else pytest.skip)(
            f"{', '.join(missing)} missing: {INSTALL}")


@pytest.fixture
def server(tmp_path, monkeypatch):
    """labs.demo on a free 127.0.0.1 port (subprocess, this process's torch thread count, a 2-D cache of untrained
    models); stopped afterwards. -> (url, PNG folder, 2-D models)."""
    browser_or_skip()
    models = tiny_lab2d(str(tmp_path / "cache2d"), monkeypatch)
    port, out = free_port(), tmp_path / "png"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    log = open(tmp_path / "demo.log", "w")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "labs.demo", "--port", str(port), "--out", str(out), "--threads",
                             str(torch.get_num_threads()), "--cache2d", str(tmp_path / "cache2d")], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() - t0 < 120, open(tmp_path / "demo.log").read()
                time.sleep(0.3)
        print(f"demo up in {time.time() - t0:.1f} s")
        yield url, out, models
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def chrome(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for f in CHROME_FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}")
    opts.binary_location = shutil.which("chromium")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def test_browser_demo_equals_sample_py(server, tmp_path):
    """Headless Chromium drives the page: NFE 2, seed 3, h 1 on the embedded tab, generate; the image the page
    shows (fetched from its <img src>) is sample.py's grid for those settings; the 2-D tab at NFE 3 shows
    figure2d of the same models. Screenshot: runs/demo_screenshot.png."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    url, out, (teacher, students) = server
    d = chrome(tmp_path)
    try:
        d.get(url)
        wait = WebDriverWait(d, 120)

        def type_into(selector, value, enter=False):
            e = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, selector))
            e.click()
            e.send_keys(Keys.CONTROL, "a")
            e.send_keys(str(value))
            e.send_keys(Keys.ENTER if enter else Keys.TAB)

        def result(img_id, log_id, text):
            """Wait for the page's answer (its log box filled in), check it, fetch the image it shows."""
            log = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{log_id} textarea").get_attribute("value"))
            assert log.startswith(text), log
            src = d.find_element(By.CSS_SELECTOR, f"#{img_id} img").get_attribute("src")
            return pixels(urllib.request.urlopen(src, timeout=30).read())

        type_into("#nfe input[type=number]", 2)
        type_into("#seed input", 3)
        type_into("#h input", "1", enter=True)
        d.find_element(By.CSS_SELECTOR, "#generate").click()
        shown = result("grid", "log", "python sample.py --model toy --nfe 2 --seed 3 --temperature none --h 1")
        os.makedirs(os.path.join(ROOT, "runs"), exist_ok=True)
        d.save_screenshot(os.path.join(ROOT, "runs", "demo_screenshot.png"))
        want = tmp_path / "want.png"
        sample.main(["--model", "toy", "--nfe", "2", "--seed", "3", "--h", "1", "--reference", "euler", "--threads",
                     str(torch.get_num_threads()), "--out", str(want)])
        assert_same_picture(shown, pixels(str(want)))

        next(b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "2-D" in b.text).click()
        type_into("#nfe2d input[type=number]", 3)
        d.find_element(By.CSS_SELECTOR, "#draw2d").click()
        shown2 = result("fig2d", "log2d", "NFE 3, h 0.0, seed 0")
        assert_same_picture(shown2, np.asarray(demo.figure2d(teacher, students[4], 3, 0.0, 0)).astype(np.int16))
    finally:
        d.quit()
