"""A local browser demo of π-Flow (Gradio, an optional extra: pip install gradio).

    python -m labs.demo                       # the embedded CPU student + the 2-D lab, http://127.0.0.1:7860
    python -m labs.demo --port 7861 --threads 1
    python -m labs.demo --model digits        # the embedded digits student: student | teacher Euler | teacher ODE
    python -m labs.demo --model flux --adapter Lakonik/pi-FLUX.1:gmflux_k8_piid_4step     # the pipeline API

Embedded student (sample.py's --model toy, or --model digits): class, seed, NFE, GM temperature and the flow-map SDE knob h; the page
shows exactly the grid `python sample.py ... --reference euler` writes for the same settings (it runs sample.py's
own main into a PNG): the student's samples | the teacher's Euler sampler at the same NFE, from the same noise.
The 2-D tab draws the 2-D lab's policy trajectories at the chosen NFE and h (labs.toy2d's teacher and a GM
student distilled at 4 NFE, sampled at any NFE; both trained once, about a minute on one core, then cached under
runs/cache2d/). With --model flux|flux2|qwen|sd3 the page runs the pipeline API (models.pipelines): prompt, NFE,
seed, guidance, h. The server listens on 127.0.0.1 only.
"""
import argparse
import contextlib
import io
import itertools
import os
import sys
import tempfile
import time

import torch

import piflow
import sample
from labs import sde_h
from runtime import common

EMBEDDED = {"toy": dict(classes=list(range(10)), extra=["--reference", "euler"], per_class=8),   # sample.py model
            "digits": dict(classes=list(range(10)), extra=["--ode-steps", "8"], per_class=2)}   # -> page
T2I = ("flux", "flux2", "qwen", "sd3")
H_CHOICES = ["0", "0.5", "1", "inf"]


class DemoError(Exception):
    """A bad setting on the page: shown there in one line."""


def run_sample(argv):
    """sample.main(argv) with its printed lines captured: (result, text). A user error -> DemoError(its line)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result = sample.main(argv)
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise DemoError(lines[-1] if lines else "sample.py refused these settings") from None
    return result, out.getvalue()


#################################################################################
#                   The embedded CPU student (sample.py's grid)                 #
#################################################################################

class EmbeddedPage:
    """Generate sample.py's grid for the page's settings into `folder` (one new PNG per click)."""

    def __init__(self, model, folder, threads=0):
        self.model, self.folder, self.threads, self.count = model, folder, threads, itertools.count()

    def argv(self, cls, seed, nfe, temperature, h, per_class):
        """The sample.py command line of these settings (without --out)."""
        a = ["--model", self.model, "--nfe", str(int(nfe)), "--seed", str(int(seed)), "--temperature",
             str(temperature).strip() or "none", "--h", str(h).strip() or "0", "--per-class", str(int(per_class))]
        if str(cls) != "all":
            a += ["--class-labels", str(cls)]
        return a + EMBEDDED[self.model]["extra"] + (["--threads", str(self.threads)] if self.threads else [])

    def generate(self, cls, seed, nfe, temperature, h, per_class):
        argv = self.argv(cls, seed, nfe, temperature, h, per_class)
        out = os.path.join(self.folder, f"{self.model}_{next(self.count):05d}.png")
        t0 = time.time()
        _, text = run_sample(argv + ["--out", out])
        command = "python sample.py " + " ".join(argv)
        return out, f"{command}\n{text.strip()}\n({time.time() - t0:.1f} s)"


#################################################################################
#                     The 2-D lab: policy trajectories at NFE, h                #
#################################################################################

STARTS = [[-1.6, 1.3], [1.5, 1.5], [1.3, -1.6], [-1.4, -1.0], [0.3, 0.5]]      # the lab figure's drawn paths


def figure2d(teacher, student, nfe, h=0.0, seed=0, n_points=2000):
    """Two labelled panels (Pillow): the teacher's Euler sampler at `nfe` and the GM student at `nfe` and `h`
    (re-noise draws from `seed`), 2000 points from the lab's noise and 5 drawn trajectories each."""
    from PIL import Image, ImageDraw, ImageFont
    from labs import toy2d
    from models import toy
    noise = torch.randn(n_points, 2, generator=torch.Generator().manual_seed(1234))
    ref = piflow.teacher_rk4(teacher, noise)
    starts = torch.tensor(STARTS)
    x_e = piflow.teacher_euler(teacher, noise, None, piflow.nfe_schedule(nfe)[1])
    x_s = piflow.sample(student, noise, None, nfe, h=h, generator=torch.Generator().manual_seed(seed))
    path, calls = sde_h.sde_path(student, starts, nfe, h, torch.Generator().manual_seed(seed + 1))
    e_path, e_calls = toy2d.euler_path(teacher, starts, nfe)
    ref_paths = list(toy2d.euler_path(teacher, starts, 256)[0].transpose(0, 1))
    P, gap, top = 320, 50, 60
    img = Image.new("RGB", (2 * P + 3 * gap, P + top + 50), (255, 255, 255))
    d, font, small = ImageDraw.Draw(img), ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    d.text((gap, 8), f"2-D checkerboard, NFE {nfe}: dots = 2000 samples from the same noise; lines = 5 paths, "
           "circles = network calls, grey = teacher ODE", fill=0, font=small)
    for k, (title, x, p, c) in enumerate([(f"teacher Euler, {nfe} steps", x_e, e_path, e_calls),
                                          (f"pi-Flow GM student, NFE {nfe}, h {h}", x_s, path, calls)]):
        sub = f"align {toy.teacher_alignment(x, ref):.4f} | hit {toy2d.hit_rate(x):.3f}"
        toy2d.draw_panel(d, gap + k * (P + gap), top, P, x, title, sub, [(q, c) for q in p.transpose(0, 1)],
                         ref_paths, font, small)
    return img


class Lab2DPage:
    """The 2-D tab: the lab's teacher and a 4-NFE GM student, loaded (or trained and cached) at the first draw."""

    def __init__(self, steps=200, cache=sde_h.CACHE2D):
        self.steps, self.cache, self.models = steps, cache, None

    def draw(self, nfe, h, seed):
        t0 = time.time()
        if self.models is None:
            teacher, students = sde_h.lab2d_models((4,), self.steps, self.cache)
            self.models = teacher, students[4]
        h = parse_h(h)
        img = figure2d(*self.models, int(nfe), h, int(seed))
        return img, f"NFE {int(nfe)}, h {h}, seed {int(seed)} ({time.time() - t0:.1f} s)"


def parse_h(v):
    try:
        return common.parse_h(str(v).strip())
    except argparse.ArgumentTypeError as e:
        raise DemoError(f"h: {e}") from None


#################################################################################
#                     Text-to-image students: the pipeline API                  #
#################################################################################

class T2IPage:
    """PiFlowPipeline(prompt, num_inference_steps, generator, guidance_scale, h): loaded once."""

    def __init__(self, args):
        from models import pipelines, t2i
        self.fam = t2i.FAMILIES[args.model]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype) or \
            (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.pipe = pipelines.piflow_pipeline(args.model, args.base, args.adapter, dtype, flags=("--base", "--adapter"))
        if args.cpu_offload:
            self.pipe.enable_model_cpu_offload(device=device)
        else:
            self.pipe.to(device)
        self.model, self.height, self.width = args.model, args.height, args.width
        self.nfe = self.pipe.student.piid_config.nfe

    def generate(self, prompt, nfe, seed, guidance, h):
        t0 = time.time()
        if not str(prompt).strip():
            raise DemoError("prompt: give a prompt")
        guidance = None if guidance in (None, "") or self.fam.guidance != "distilled" else float(guidance)
        try:
            out = self.pipe(prompt, height=self.height, width=self.width, num_inference_steps=int(nfe),
                            generator=[torch.Generator().manual_seed(int(seed))], guidance_scale=guidance,
                            h=parse_h(h), temperature="auto")
        except (common.UserError, ValueError) as e:
            raise DemoError(common.first_line(e)) from None
        return out.images[0], f"{self.model}: NFE {int(nfe)}, seed {int(seed)}, h {h} ({time.time() - t0:.1f} s)"


#################################################################################
#                                    The page                                   #
#################################################################################

def build(args, folder):
    """The gr.Blocks page (gradio imported here)."""
    import gradio as gr

    def safe(fn):
        def wrapped(*a):
            try:
                return fn(*a)
            except DemoError as e:
                raise gr.Error(str(e)) from None
        return wrapped

    with gr.Blocks(title="pi-Flow demo") as page:
        gr.Markdown("## π-Flow: few-step generation by policy rollouts (arXiv 2510.14974)")
        if args.model in EMBEDDED:
            emb = EmbeddedPage(args.model, folder, args.threads)
            with gr.Tab(f"{args.model} student vs teacher Euler"):
                gr.Markdown("The embedded CPU student (`sample.py --model " + args.model + "`): its samples, then "
                            "the teacher's Euler sampler at the same NFE (digits: and the teacher's ODE), from the "
                            "same noise. h = 0 is the deterministic sampler; h > 0 re-noises each step (flow-map "
                            "SDE).")
                with gr.Row():
                    cls = gr.Dropdown(["all"] + [str(c) for c in EMBEDDED[args.model]["classes"]], value="all",
                                      label="class", elem_id="cls")
                    seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                    nfe = gr.Slider(1, 8, value=4, step=1, label="NFE", elem_id="nfe")
                    temp = gr.Dropdown(["none", "auto", "0.3", "0.5", "1"], value="none", allow_custom_value=True,
                                       label="GM temperature", elem_id="temperature")
                    h = gr.Dropdown(H_CHOICES, value="0", allow_custom_value=True, label="h (SDE)", elem_id="h")
                    per_class = gr.Slider(1, 16, value=EMBEDDED[args.model]["per_class"], step=1,
                                          label="samples per class", elem_id="per_class")
                go = gr.Button("generate", variant="primary", elem_id="generate")
                grid = gr.Image(type="filepath", format="png", label="samples", elem_id="grid", interactive=False)
                log = gr.Textbox(label="sample.py command and metrics", lines=6, elem_id="log")
                go.click(safe(emb.generate), [cls, seed, nfe, temp, h, per_class], [grid, log])
            lab = Lab2DPage(args.steps2d, args.cache2d)
            with gr.Tab("2-D policy trajectories"):
                gr.Markdown("The 2-D lab (labs.toy2d): the teacher's Euler sampler against a GM student at the same "
                            "NFE. The first draw trains both once (about a minute on one core; cached in "
                            "runs/cache2d/).")
                with gr.Row():
                    nfe2 = gr.Slider(1, 8, value=4, step=1, label="NFE", elem_id="nfe2d")
                    h2 = gr.Dropdown(H_CHOICES, value="0", allow_custom_value=True, label="h (SDE)", elem_id="h2d")
                    seed2 = gr.Number(0, precision=0, label="seed", elem_id="seed2d")
                go2 = gr.Button("draw", variant="primary", elem_id="draw2d")
                fig = gr.Image(type="pil", format="png", label="trajectories", elem_id="fig2d", interactive=False)
                log2 = gr.Textbox(label="settings", elem_id="log2d")
                go2.click(safe(lab.draw), [nfe2, h2, seed2], [fig, log2])
        else:
            t2i_page = T2IPage(args)
            with gr.Tab(f"{args.model}: {args.adapter}"):
                with gr.Row():
                    prompt = gr.Textbox("a photo of a cat", label="prompt", elem_id="prompt", scale=4)
                    nfe = gr.Slider(1, 8, value=t2i_page.nfe, step=1, label="NFE", elem_id="nfe")
                    seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                    guidance = gr.Number(t2i_page.fam.guidance_scale, label="guidance (distilled rows)",
                                         elem_id="guidance", interactive=t2i_page.fam.guidance == "distilled")
                    h = gr.Dropdown(H_CHOICES, value="0", allow_custom_value=True, label="h (SDE)", elem_id="h")
                go = gr.Button("generate", variant="primary", elem_id="generate")
                image = gr.Image(type="pil", format="png", label="image", elem_id="grid", interactive=False)
                log = gr.Textbox(label="settings", elem_id="log")
                go.click(safe(t2i_page.generate), [prompt, nfe, seed, guidance, h], [image, log])
    return page


def main(argv=None):
    p = argparse.ArgumentParser(description="Local browser demo of pi-Flow (Gradio; http://127.0.0.1:PORT only).")
    p.add_argument("--model", choices=sorted(EMBEDDED) + list(T2I), default="toy", help="the embedded CPU student "
                   "or a text-to-image family over the pipeline API (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default: %(default)s)")
    p.add_argument("--out", default=None, help="folder for the generated PNGs (default: a new temporary folder)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default "
                   "(default: %(default)s)")
    p.add_argument("--steps2d", type=int, default=200, help="π-ID steps of the 2-D student (default: %(default)s)")
    p.add_argument("--cache2d", default=sde_h.CACHE2D, help="folder of the cached 2-D teacher and student "
                   "(default: %(default)s)")
    g = p.add_argument_group("--model flux|flux2|qwen|sd3")
    g.add_argument("--adapter", default=None, help="adapter folder, released id or owner/repo:subfolder (default: "
                   "the family's released one)")
    g.add_argument("--base", default=None, help="diffusers folder or hub id of the base (default: the family's)")
    g.add_argument("--height", type=int, default=1024, help="image height (default: %(default)s)")
    g.add_argument("--width", type=int, default=1024, help="image width (default: %(default)s)")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="weights dtype "
                   "(default: %(default)s)")
    g.add_argument("--cpu-offload", action="store_true", help="diffusers' enable_model_cpu_offload")
    args = p.parse_args(argv)
    common.check(args, [("port", 1 <= args.port <= 65535, "a port in [1, 65535]"),
                        ("threads", args.threads >= 0, "an integer >= 0"),
                        ("steps2d", args.steps2d >= 1, "an integer >= 1")], p)
    with common.user_errors("demo.py"):
        import socket
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", args.port))
            except OSError:
                raise common.UserError(f"--port={args.port} is not free on 127.0.0.1; pass another --port") from None
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")       # no calls home
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise common.UserError("gradio is not installed: pip install gradio (an optional extra, not in "
                                   "requirements.txt)") from None
        folder = args.out or tempfile.mkdtemp(prefix="piflow-demo-")
        common.check_writable(folder, "--out", is_dir=True)
        os.makedirs(folder, exist_ok=True)
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
        page = build(args, folder)
        print(f"pi-Flow demo: http://127.0.0.1:{args.port} (images in {folder}; Ctrl-C stops it)", flush=True)
        page.queue().launch(server_name="127.0.0.1", server_port=args.port, share=False, show_error=True,
                            ssr_mode=False, mcp_server=False, allowed_paths=[os.path.abspath(folder)],
                            footer_links=[], quiet=True)


if __name__ == "__main__":
    main(sys.argv[1:])
