"""The exponential moving average of a model's weights kept during fine-tuning (``model_ema``)."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


class ModelEma:
    """Exponential moving average of a model's parameters and float buffers (timm's ModelEma):
    ema = decay * ema + (1 - decay) * model, after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_t, model_t = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                ema_t.append(e)
                model_t.append(m.detach())
            else:
                e.copy_(m)
        torch._foreach_lerp_(ema_t, model_t, 1.0 - self.decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(sd)
