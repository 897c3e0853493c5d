"""Sample a π-Flow student: NFE student calls, each followed by a dense policy rollout (paper §3, Fig. 2c).

    python sample.py --nfe 4                          # the embedded digits student (assets/): offline, ~5 s on a CPU
    python sample.py --model toy --nfe 2 --temperature auto --seed 1 --out samples/toy.png    # the toy lab's student
    python sample.py --model toy --nfe 4 --h 1 --reference euler  # flow-map SDE sampling (docs/sampling.md)
    python sample.py --model imagenet --help          # every model has its own options, shown with their defaults
    python sample.py --model imagenet --ckpt gmrepa_k32_imagenet_piid_1step --class-labels 207 360 387 974
    python sample.py --model flux --adapter Lakonik/pi-FLUX.1:gmflux_k8_piid_4step --prompt "a cat"
    python sample.py --model flux2 --prompt "make it night" --image street.png     # FLUX.2 editing

Every model writes one labelled PNG grid (default samples/<model>_nfe<NFE>.png); the output path is checked
before any work. The schedule (shift, final-step scale, substeps) comes from the student's training settings;
--nfe may differ from the training NFE for GM students (elastic inference).
"""
import argparse
import contextlib
import importlib
import sys
import time

import torch

from runtime import common

MODELS = {"digits": "models.digits", "toy": "models.toy", "imagenet": "models.sit", "flux": "models.pipelines",
          "flux2": "models.pipelines", "qwen": "models.pipelines", "sd3": "models.pipelines"}   # --model -> its module
SIZED_BY = {"digits": "--per-class", "toy": "--per-class",
            "imagenet": "--batch-size (grids: --per-class; --npz: --num-samples)"}


@contextlib.contextmanager
def lean_imports(model):
    """diffusers imports peft, transformers and bitsandbytes whenever they are installed (about 3 s of the embedded
    default's 5 s on one core); the embedded students use none of them, so their import is refused meanwhile."""
    hidden = [m for m in ("peft", "transformers", "bitsandbytes") if model in ("digits", "toy") and m not in
              sys.modules]
    sys.modules.update(dict.fromkeys(hidden, None))
    try:
        yield
    finally:
        for m in hidden:
            if sys.modules.get(m, False) is None:
                del sys.modules[m]


def parser_for(model):
    p = argparse.ArgumentParser(prog="sample.py", description=f"Few-step pi-Flow sampling (--model {model}). "
                                "Pass --model M --help for the options of model M.")
    p.add_argument("--model", choices=sorted(MODELS), default="digits", help="which student (default: %(default)s)")
    p.add_argument("--nfe", type=int, default=None, help="student steps, any value >= 1 (default: the student's "
                   "training NFE)")
    p.add_argument("--temperature", type=common.parse_temperature, default=None, help="GM temperature on all but "
                   "the last step: none, auto (0.1 (NFE - 1)) or a value > 0 (default: %(default)s; None = off)")
    p.add_argument("--h", type=common.parse_h, default=0.0, help="flow-map SDE sampling: 0 = the deterministic "
                   "sampler; h > 0 rolls each step's policy part of the way and re-noises from --seed (a "
                   "stochastic sampler); inf = denoise fully, then re-noise (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, also of the --h re-noising: sample i is "
                   "reproducible (default: %(default)s)")
    p.add_argument("--out", default=f"samples/{model}_nfe{{nfe}}.png", help="output PNG grid; {nfe} is filled in "
                   "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default "
                   "(default: %(default)s)")
    with lean_imports(model):
        module = importlib.import_module(MODELS[model])
    module.add_sample_flags(p.add_argument_group(f"--model {model}"), model)
    return p, module


def main(argv=None):
    argv = common.hyphenate(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", choices=sorted(MODELS), default="digits")
    model = pre.parse_known_args(argv)[0].model
    p, module = parser_for(model)
    args = p.parse_args(argv)
    common.check(args, [("nfe", args.nfe is None or args.nfe >= 1, "an integer >= 1"),
                        ("out", args.out.lower().endswith(".png"), "a .png path"),
                        ("threads", args.threads >= 0, "an integer >= 0")], p)
    with common.user_errors("sample.py", sized_by=SIZED_BY.get(model, "--batch-size / --height / --width")):
        common.check_writable(args.out.format(nfe=args.nfe or 0), "--out")
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
        t0 = time.time()
        result = module.sample_grid(args)
        if result.get("rows"):
            out = args.out.format(nfe=result.get("nfe", args.nfe))
            size = common.save_grid(result["rows"], out, result.get("row_labels"), result.get("col_labels"),
                                    result.get("title"))
            print(f"wrote {out} ({size[0]}x{size[1]} px) in {time.time() - t0:.1f} s")
        return result


if __name__ == "__main__":
    main()
