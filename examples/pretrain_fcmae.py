"""FCMAE self-supervised pre-training of a ConvNeXt V2 encoder on a folder of images (paper §3).

    python examples/pretrain_fcmae.py /data/images --variant atto --steps 200 --batch-size 64 --out fcmae.safetensors
    python examples/pretrain_fcmae.py /data/images --quick          # 3 steps at 64 px, a smoke test

Labels are not used: any folder of images works, flat or with class sub-folders. The settings follow
the paper's Table 8: mask ratio 0.6 on 32x32 patches, a one-block 512-wide decoder, loss on
per-patch-normalised pixels of the masked patches, AdamW (betas 0.9/0.95, weight decay 0.05, no
decay on biases and 1-D parameters), lr = 1.5e-4 x batch / 256, RandomResizedCrop(scale 0.2-1) + flip.
(Real runs use 800-1600 epochs with a 40-epoch warm-up and cosine decay: use ``convnextv2-train
pretrain`` for that.) The script writes the whole FCMAE (to resume or inspect reconstructions) and
the encoder alone, which ``create(..., checkpoint_path=...)`` loads for fine-tuning.
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import List, Optional

import torch
from PIL import Image

from convnextv2_hub.checkpoints.io import save_checkpoint
from convnextv2_hub.models.fcmae import FCMAE
from convnextv2_hub.models.factory import create
from convnextv2_hub.preprocessing.image_folder import list_images
from convnextv2_hub.preprocessing.transforms import train_transform


class Images(torch.utils.data.Dataset):
    def __init__(self, paths: List[str], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            return self.transform(img)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="folder of images (flat or class sub-folders)")
    parser.add_argument("--variant", default="atto")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=224, help="multiple of 32")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--blr", type=float, default=1.5e-4, help="base lr per 256 images (Table 8)")
    parser.add_argument("--out", default="fcmae.safetensors", help="the FCMAE; the encoder goes to OUT-encoder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 steps, batch 4, 64 px: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.resolution, args.workers = 3, 4, 64, 0

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths, _, _ = list_images(args.data)
    transform = train_transform(args.resolution, scale=(0.2, 1.0))  # FCMAE's crop range, not 0.08
    loader = torch.utils.data.DataLoader(Images(paths, transform), batch_size=args.batch_size, shuffle=True,
                                         drop_last=len(paths) >= args.batch_size, num_workers=args.workers)

    model = FCMAE(args.variant, mask_ratio=args.mask_ratio).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    lr = args.blr * args.batch_size / 256
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    print(f"FCMAE-{args.variant}: {len(paths)} images, batch {args.batch_size}, lr {lr:.2e}, "
          f"mask ratio {args.mask_ratio}, {device}")

    start = time.time()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # as many epochs as the steps need
    for step, imgs in zip(range(1, args.steps + 1), batches):
        loss, _, mask = model(imgs.to(device))
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  masked {mask.mean().item():.2f}  "
                  f"{(time.time() - start) / step:.2f} s/step")

    out = Path(args.out)
    model.save(out)
    encoder_path = save_checkpoint(model.encoder, out.with_name(out.stem + "-encoder" + out.suffix))
    # The encoder is an ordinary ConvNeXtV2: load it as the start of a fine-tune.
    encoder = create(f"{args.variant}.fcmae", checkpoint_path=encoder_path)
    resumed = FCMAE.from_checkpoint(out)
    same = all(torch.equal(a, b.cpu()) for a, b in zip(encoder.parameters(), model.encoder.parameters()))
    print(f"wrote {out} (FCMAE, reload with FCMAE.from_checkpoint: mask ratio {resumed.mask_ratio}) and "
          f"{encoder_path} (encoder, identical after reload: {same})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
