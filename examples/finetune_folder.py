"""Fine-tune a ConvNeXt V2 on your own ImageFolder from Python, with the reproduction trainer.

    python examples/finetune_folder.py /data/flowers --model atto --epochs 30           # FCMAE-pretrained start
    python examples/finetune_folder.py /data/flowers --model tiny --init my_fcmae-encoder.safetensors
    python examples/finetune_folder.py /data/digits --model atto --init atto.safetensors --quick   # offline smoke test

``DATA`` holds ``train/<class>/*.jpg`` and (optionally) ``val/<class>/*.jpg``. The run uses the
trainer's Python API (``convnextv2_hub.train``: ``config.resolve`` + ``engine.train``), the same code
as ``convnextv2-train finetune``: the paper's per-size IN-1K fine-tuning recipe (Tables 9-11: AdamW,
layer-wise lr decay, drop path, RandAugment, label smoothing, EMA, head init 0.001) with the few
values a small dataset needs overridden below. Without ``--init`` the variant's released FCMAE
encoder is downloaded; the classifier head is sized to the folder's classes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

from convnextv2_hub.models.factory import create
from convnextv2_hub.preprocessing.image_folder import list_images
from convnextv2_hub.inference.predictor import predict
from convnextv2_hub.train.config import resolve
from convnextv2_hub.train.engine import Run, train


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="folder with train/<class>/ and optionally val/<class>/")
    parser.add_argument("--model", default="atto", help="variant (atto ... huge)")
    parser.add_argument("--init", help="start from these weights (FCMAE encoder or classifier); default: released FCMAE")
    parser.add_argument("--output", default="runs/finetune_folder")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="absolute lr (default: the recipe's blr x batch / 256)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="1 epoch at 64 px, batch 4, no EMA/augmentation: a smoke test")
    args = parser.parse_args(argv)

    overrides = {
        "epochs": args.epochs,
        "warmup_epochs": min(5, args.epochs // 10),  # the recipe's 0-40 warm-up epochs assume ImageNet's length
        "batch_size": args.batch_size,
        "eff_batch_size": None,  # no gradient accumulation up to ImageNet's 1024 on a small folder
        "input_size": args.input_size,
        "model_ema": False,  # an EMA of decay 0.9999 needs far more steps than a small folder gives
        "model_ema_eval": False,
        "tensorboard": False,
    }
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.quick:
        overrides.update(epochs=1, warmup_epochs=0, batch_size=4, input_size=64, aa=None, reprob=0.0,
                         mixup=0.0, cutmix=0.0, num_workers=0, use_amp=False, log_interval=1)
    variant = args.model.split(".")[0]
    cfg, notes = resolve("finetune", variant, "finetune_in1k", overrides)
    run = Run(mode="finetune", model=args.model if args.init else f"{variant}.fcmae", data_path=args.data,
              output_dir=args.output, cfg=cfg, init=args.init, pretrained=args.init is None,
              device=args.device, recipe="finetune_in1k", notes=notes)
    summary = train(run)
    print(json.dumps(summary, indent=1, default=str))

    # The result is an ordinary checkpoint: reload it and classify a few images with the folder's labels.
    split = Path(args.data) / ("val" if (Path(args.data) / "val").is_dir() else "train")
    paths, labels, classes = list_images(split, limit=3)
    model = create(variant, num_classes=len(classes), checkpoint_path=summary["weights"])
    model.label_names = classes  # predict() reads the names from here
    for path, label, top in zip(paths, labels, predict(model, paths, topk=1)):
        print(f"{Path(path).name}: true {classes[label]}, predicted {top[0][0]} ({top[0][1]:.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
