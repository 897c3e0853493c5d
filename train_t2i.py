"""π-ID distillation of a diffusers text-to-image model into a few-step π-Flow student (Alg. 2 / Alg. 3, Table 9).

    python train_t2i.py --model flux --prompts prompts.txt --out runs/piflux            # gmflux-k8-4nfe, data-free
    python train_t2i.py --model flux2 --prompts prompts.txt --out runs/piflux2          # gmflux2-k8-4nfe
    python train_t2i.py --model qwen --data images/ --data-dependent --out runs/piqwen   # Alg. 2 on an image folder
    python train_t2i.py --model sd3 --base stabilityai/stable-diffusion-3.5-medium --prompts prompts.txt
    torchrun --standalone --nproc_per_node=8 train_t2i.py --model flux --prompts prompts.txt --out runs/piflux
    python train_t2i.py --model flux --prompts prompts.txt --out runs/piflux --resume --steps 4000
    python train_t2i.py --model flux --prompts prompts.txt --base-quant nf4 --optimizer adamw8bit --micro-batch 1
    python train_t2i.py --model flux --prompts p.txt --eval-clip openai/clip-vit-large-patch14 --eval-every 500
    python train_t2i.py --model qwen --help                     # every flag, with the preset's defaults

A thin command line over trainer.py, and the trainer attachment of t2i.py's students: --model picks the base (a row
of t2i.FAMILIES), --preset a row of trainer.PRESETS (default gm<model>-k8-4nfe); flags derive from
piflow.PiIDConfig, trainer.TrainConfig and Options below. The EMA student is exported as an adapter to OUT/adapter
(or --export); sample.py / pipelines.piflow_pipeline read it.
"""
from models import t2i
from runtime import trainer

MODELS = dict.fromkeys(t2i.FAMILIES, "models.t2i")      # --model -> the attachment module (models/t2i.py)
DEFAULT_PRESET = {m: f"gm{m}-k8-4nfe" for m in t2i.FAMILIES}
DESCRIPTION = "pi-ID distillation of a diffusers text-to-image model into a LoRA + policy-head adapter."


def main(argv=None):
    """Train; returns (attachment, EMA tensors) of rank 0. The adapter goes to OUT/adapter unless --export is given."""
    return trainer.main("train_t2i.py", argv, "model", MODELS, DEFAULT_PRESET, DESCRIPTION, export="adapter")


if __name__ == "__main__":
    main()
