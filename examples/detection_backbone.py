"""ConvNeXt V2 + FPN as the backbone of torchvision's Mask R-CNN / Faster R-CNN (paper §5, Table 6).

    python examples/detection_backbone.py --model base.fcmae_ft_in1k           # Mask R-CNN, pretrained backbone
    python examples/detection_backbone.py --arch faster --model tiny.fcmae_ft_in1k
    python examples/detection_backbone.py --model atto --checkpoint-path atto.safetensors --quick   # offline

It builds the detector, runs one eval forward pass and one AdamW training step on synthetic images
with synthetic boxes (and masks), and prints the losses and detections: the wiring a real COCO
training loop needs. Backbone = ``create(..., features_only=True)`` (strides 4/8/16/32), a
LayerNorm on each output (as the ConvNeXt authors' released detection backbone does: block outputs
are un-normalised residual streams), then torchvision's FeaturePyramidNetwork with a max-pool P6.

The paper's COCO recipe (Mask R-CNN, App. A.3), the recommended values for a real run:

- initialise from the **IN-1K fine-tuned** weights (e.g. ``base.fcmae_ft_in1k``), not the raw FCMAE;
- AdamW, lr 1e-4, weight decay 0.05, batch 32, 3x schedule (36 epochs);
- **layer-wise lr decay** swept over {0.9, 0.95}; **stochastic depth (drop path)** swept over
  {0.2, 0.3, 0.4, 0.5} (which value won per model is not reported); defaults here: 0.9 and 0.2;
- large-scale jitter at 1024 x 1024 (scale 0.1-2.0); single-scale testing with soft-NMS.

Layer decay uses the package's fine-tuning rule (``convnextv2_hub.train.optim.param_groups``, the
authors' per-block ids): block k of L gets lr x decay^(L + 1 - k); the FPN and detection heads train
at the full lr, and norms, biases and GRN gamma/beta get no weight decay.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from convnextv2_hub.models.factory import create
from convnextv2_hub.models.layers import LayerNorm2d
from convnextv2_hub.train.optim import param_groups

COCO_RECIPE = {
    "optimizer": "AdamW", "lr": 1e-4, "weight_decay": 0.05, "batch_size": 32, "epochs": 36,
    "layer_decay": (0.9, 0.95), "drop_path": (0.2, 0.3, 0.4, 0.5), "input": "LSJ 1024x1024, scale 0.1-2.0",
}


class ConvNeXtV2FPN(nn.Module):
    """ConvNeXt V2 stage maps -> per-level LayerNorm -> FPN: the ``backbone`` torchvision detectors take.

    ``out_channels`` is the attribute torchvision's detectors read; outputs are named "0".."3" and
    "pool", the names their default anchor generator and RoI pooler expect.
    """

    def __init__(self, name: str, pretrained: bool = True, checkpoint_path: Optional[str] = None,
                 drop_path_rate: float = 0.2, out_channels: int = 256) -> None:
        super().__init__()
        self.body = create(name, pretrained=pretrained and checkpoint_path is None, checkpoint_path=checkpoint_path,
                           features_only=True, out_indices=(0, 1, 2, 3), drop_path_rate=drop_path_rate)
        dims = [info["num_chs"] for info in self.body.feature_info]
        self.norms = nn.ModuleList(LayerNorm2d(d) for d in dims)
        self.fpn = FeaturePyramidNetwork(dims, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), norm(m)) for i, (norm, m) in enumerate(zip(self.norms, maps))))


def build_detector(arch: str, backbone: ConvNeXtV2FPN, num_classes: int, min_size: int, max_size: int) -> nn.Module:
    """torchvision's Mask R-CNN or Faster R-CNN (no torchvision weights) on our backbone."""
    cls = {"mask": MaskRCNN, "faster": FasterRCNN}[arch]
    # The backbone normalises nothing itself: the detector's transform applies ImageNet mean/std,
    # the statistics every ConvNeXt V2 checkpoint was trained with.
    return cls(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def optimizer_for(detector: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> torch.optim.AdamW:
    """AdamW with layer-wise lr decay over the ConvNeXt V2 blocks and full lr for everything else."""
    body = detector.backbone.body
    groups = param_groups(body, weight_decay, layer_decay=layer_decay, mode="finetune")
    in_body = {id(p) for g in groups for p in g["params"]}
    rest = [(n, p) for n, p in detector.named_parameters() if p.requires_grad and id(p) not in in_body]
    for decay, keep in ((weight_decay, lambda p: p.ndim > 1), (0.0, lambda p: p.ndim <= 1)):
        chosen = [(n, p) for n, p in rest if keep(p)]
        # "param_names" because the package's groups carry them, and torch wants all groups or none named.
        groups.append({"params": [p for _, p in chosen], "param_names": [n for n, _ in chosen],
                       "weight_decay": decay, "lr_scale": 1.0})
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr)


def synthetic_batch(n: int, height: int, width: int, num_classes: int, masks: bool, seed: int = 0):
    """Images with bright rectangles and their boxes/labels/masks: targets a detector can fit."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.rand(3, height, width, generator=g) * 0.3
        boxes, labels, ms = [], [], []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            w, h = (int(v) for v in torch.randint(16, min(height, width) // 2, (2,), generator=g))
            x0 = int(torch.randint(0, width - w, (1,), generator=g))
            y0 = int(torch.randint(0, height - h, (1,), generator=g))
            label = int(torch.randint(1, num_classes, (1,), generator=g))
            img[:, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.5
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
            m = torch.zeros(height, width, dtype=torch.uint8)
            m[y0:y0 + h, x0:x0 + w] = 1
            ms.append(m)
        t = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}
        if masks:
            t["masks"] = torch.stack(ms)
        images.append(img)
        targets.append(t)
    return images, targets


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("mask", "faster"), default="mask")
    parser.add_argument("--model", default="tiny.fcmae_ft_in1k", help="backbone checkpoint (IN-1K fine-tuned)")
    parser.add_argument("--checkpoint-path", help="local backbone weights instead of downloading")
    parser.add_argument("--num-classes", type=int, default=81, help="including background (COCO: 80 + 1)")
    parser.add_argument("--layer-decay", type=float, default=0.9, help="paper sweep: 0.9, 0.95")
    parser.add_argument("--drop-path", type=float, default=0.2, help="paper sweep: 0.2, 0.3, 0.4, 0.5")
    parser.add_argument("--lr", type=float, default=COCO_RECIPE["lr"])
    parser.add_argument("--weight-decay", type=float, default=COCO_RECIPE["weight_decay"])
    parser.add_argument("--size", type=int, default=512, help="synthetic image side and detector min_size")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="128 px images: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.size = 128

    torch.manual_seed(0)
    backbone = ConvNeXtV2FPN(args.model, pretrained=True, checkpoint_path=args.checkpoint_path,
                             drop_path_rate=args.drop_path)
    detector = build_detector(args.arch, backbone, args.num_classes, min_size=args.size, max_size=args.size)
    n_params = sum(p.numel() for p in detector.parameters())
    print(f"{type(detector).__name__} on ConvNeXt V2 ({args.model}) + FPN: {n_params / 1e6:.1f}M params")
    print(f"paper COCO recipe: {COCO_RECIPE}")

    images, targets = synthetic_batch(args.batch_size, args.size, args.size + 32, args.num_classes,
                                      masks=args.arch == "mask")
    detector.eval()
    with torch.inference_mode():
        detections = detector(images)
    for i, det in enumerate(detections):
        print(f"eval image {i}: {len(det['boxes'])} detections, keys {sorted(det)}")

    detector.train()
    optimizer = optimizer_for(detector, args.lr, args.weight_decay, args.layer_decay)
    losses = detector(images, targets)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    print("train step losses: " + ", ".join(f"{k} {v.item():.4f}" for k, v in losses.items())
          + f"; total {total.item():.4f}")
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    print(f"layer decay {args.layer_decay}: backbone lr {lrs[0]:.2e} (stem) .. {lrs[-1]:.2e} (heads), "
          f"drop path {args.drop_path}")
    return 0 if torch.isfinite(total) else 1


if __name__ == "__main__":
    raise SystemExit(main())
