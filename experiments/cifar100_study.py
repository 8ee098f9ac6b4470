"""CIFAR-100: MLP vs ConvNet vs wider ConvNets vs +BatchNorm vs +BatchNorm+dropout vs flip/crop augmentation
vs ResNet from scratch vs ResNet fine-tuned from a CIFAR-10 checkpoint; one table and one plot.

    python -m experiments.cifar100_study [--data DIR_OR_ZIP] [--pretrained runs/c10_resnet/checkpoints] [--quick]

Default training: Adam lr 1e-4, batch 256, 20 epochs (``jaxcifar.configs.cifar100``). The fine-tuned
variant loads every layer but the classifier from --pretrained (a ``fit`` checkpoint directory of the same
ResNet trained on CIFAR-10, e.g. ``python -m experiments.baseline``-style runs or your own ``fit``); without
it that variant is skipped. Each variant trains --seeds seeds in one program and is compared with the plain
convnet, paired by seed. Writes results.json, report.md, forest.png and val_accuracy.png into --out.
"""

from __future__ import annotations

from jaxcifar import cli, configs
from jaxcifar.configs import FLIP_CROP
from jaxcifar.errors import ConfigError
from jaxcifar.study import run_study
from jaxcifar.train.predict import load_trained


def variants(common: dict, resnet: str) -> dict:
    base = configs.cifar100(**common)
    conv = base.replace(model="convnet")

    def wide(w: int):
        return conv.replace(model_kwargs={"channels": ((w, w), (w, w))})

    return {
        "mlp 2x4096": base.replace(model="mlp", model_kwargs={"hidden": (4096, 4096)}),
        "convnet": conv,
        "convnet 128 filters": wide(128),
        "convnet 256 filters": wide(256),
        "convnet 512 filters": wide(512),
        "convnet + batchnorm": conv.replace(model_kwargs={"batch_norm": True}),
        "convnet + batchnorm + dropout": conv.replace(model_kwargs={"batch_norm": True}, dropout_rate=0.5),
        "convnet + flip/crop": conv.replace(augment=FLIP_CROP),
        f"{resnet} from scratch": base.replace(model=resnet),
        f"{resnet} fine-tuned from cifar10": base.replace(model=resnet),
    }


def main(argv: list[str] | None = None) -> None:
    p = cli.common_parser(__doc__.splitlines()[0], epochs=20, batch_size=256, out="runs/cifar100_study")
    p.set_defaults(dataset="cifar100")
    p.add_argument("--pretrained", metavar="DIR", help="CIFAR-10 checkpoint directory of the same ResNet")
    p.add_argument("--resnet", default="resnet18", choices=["resnet18", "resnet20", "resnet56"])
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="train only these variants")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (seed, seed+1, ...), in one program each")
    args = cli.parse(p, argv)
    if args.seeds < 1:
        p.error(f"--seeds must be a positive integer, got {args.seeds}")
    common = {"epochs": args.epochs, "val_size": args.val_size, "seed": args.seed, "batch_size": args.batch_size,
              "devices": args.devices}
    chosen = variants(common, args.resnet)
    tuned = f"{args.resnet} fine-tuned from cifar10"
    chosen = cli.selected_variants(p, chosen, args)
    bodies, skipped = {}, []
    if tuned in chosen:
        if args.pretrained:
            trained = load_trained(args.pretrained)  # checks the directory before any training starts
            if trained.config.model != args.resnet:
                raise ConfigError(f"--pretrained holds a {trained.config.model}, not a {args.resnet}: pass "
                                  f"--resnet {trained.config.model} or another checkpoint")
            bodies[tuned] = lambda: trained.variables
        else:
            chosen.pop(tuned)
            skipped.append(f"{tuned} (no --pretrained checkpoint given)")
    out = cli.out_dir(args)
    data = cli.load_data(args)
    intro = "Adam lr {lr}, batch {b}, {e} epochs.".format(lr=common.get("learning_rate", 1e-4), b=args.batch_size,
                                                         e=args.epochs)
    if skipped:
        intro += " Skipped: " + "; ".join(skipped) + "."
    results = run_study("CIFAR-100 study", chosen, data, out, resume=args.resume,
                        progress=not args.no_progress, bodies=bodies, intro=intro, seeds=args.seeds,
                        reference="convnet",
                        extra={"pretrained": args.pretrained, "skipped": skipped})
    for k, v in results.items():
        print(f"{k:34s} test {v['summary']['test_accuracy']:.4f}")
    print(f"results in {out}")


if __name__ == "__main__":
    cli.run_main(main)
