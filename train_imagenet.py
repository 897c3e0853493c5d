"""π-ID training of a class-conditional π-Flow student (paper Alg. 2 data-dependent / Alg. 3 data-free).

    python train_imagenet.py --teacher toy --out runs/toy_gm                 # the toy teacher: CPU, minutes
    torchrun --standalone --nproc_per_node=2 train_imagenet.py --teacher toy --out runs/toy_gm2
    python train_imagenet.py --teacher toy --out runs/toy_gm --resume --steps 3000       # continue a run
    torchrun --nproc_per_node=8 train_imagenet.py --preset gmrepa-k32-1nfe --latents latents/ --out runs/gmrepa
    python train_imagenet.py --teacher sit --help                            # every flag of the SiT attachment

A thin command line over trainer.py: --teacher picks the attachment (toy.py or sit.py), --preset a row of the
paper's Table 8; flags derive from piflow.PiIDConfig, trainer.TrainConfig and the attachment's Options.
"""
from runtime import trainer

TEACHERS = {"toy": "models.toy", "sit": "models.sit"}                        # --teacher -> attachment module
DEFAULT_PRESET = {"toy": "toy", "sit": "gmrepa-k32-1nfe"}        # --teacher sit alone = Table 8, 1 NFE


def main(argv=None):
    """Train; returns (attachment, EMA tensors) of rank 0."""
    return trainer.main("train_imagenet.py", argv, "teacher", TEACHERS, DEFAULT_PRESET,
                        "pi-ID training of a class-conditional pi-Flow student (paper Alg. 2 / Alg. 3).")


if __name__ == "__main__":
    main()
