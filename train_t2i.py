"""π-ID distillation of FLUX.1-dev / Qwen-Image into few-step π-Flow students (paper Alg. 2 / Alg. 3, Table 9).

    python train_t2i.py --model flux --prompts prompts.txt --out runs/piflux            # gmflux-k8-4nfe, data-free
    python train_t2i.py --model qwen --data images/ --data-dependent --out runs/piqwen   # Alg. 2 on an image folder
    torchrun --standalone --nproc_per_node=8 train_t2i.py --model flux --prompts prompts.txt --out runs/piflux
    python train_t2i.py --model flux --prompts prompts.txt --out runs/piflux --resume --steps 4000
    python train_t2i.py --preset dxqwen-n10-4nfe --prompts prompts.txt --out runs/dxqwen
    python sample.py --model flux --adapter runs/piflux/adapter --prompt "a cat"
    python train_t2i.py --model qwen --help                     # every flag, with the preset's defaults

A thin command line over trainer.py: --model picks the base (t2i.py FAMILIES), --preset a row of the paper's
Table 9 (trainer.PRESETS; default gmflux-k8-4nfe / gmqwen-k8-4nfe); flags derive from piflow.PiIDConfig,
trainer.TrainConfig and t2i.Options. The EMA student is exported as an adapter to OUT/adapter (or --export).
"""
import os
import sys

import trainer

MODELS = {"flux": "t2i", "qwen": "t2i"}                              # --model -> attachment module
DEFAULT_PRESET = {"flux": "gmflux-k8-4nfe", "qwen": "gmqwen-k8-4nfe"}


DESCRIPTION = "pi-ID distillation of FLUX.1-dev / Qwen-Image into a LoRA + policy-head adapter."


def main(argv=None):
    """Train; returns (attachment, EMA tensors) of rank 0. The adapter goes to OUT/adapter unless --export is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = trainer.parse("train_t2i.py", argv, "model", MODELS, DEFAULT_PRESET, DESCRIPTION)[0]
    if args.export is None:
        argv += ["--export", os.path.join(args.out, "adapter")]
    return trainer.main("train_t2i.py", argv, "model", MODELS, DEFAULT_PRESET, DESCRIPTION)


if __name__ == "__main__":
    main()
