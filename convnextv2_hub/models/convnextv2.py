"""ConvNeXt V2 (Woo et al., CVPR 2023): one model class for classification, features, FCMAE and export.

Module names and parameter shapes are the authors' (``downsample_layers``, ``stages``, ``dwconv``,
``pwconv1``, ``grn.gamma`` (1, 1, 1, 4C), ``norm``, ``head``), so their checkpoints load as they are.

``forward_features`` takes an optional FCMAE mask. Masked positions are kept at exactly zero through
every block (zeroed after each spatial op and before GRN), which makes the dense computation equal to
the sparse (submanifold) convolution of the paper, with GRN statistics per image.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .ablations import V1_LAYER_SCALE_INIT, ArchOptions, grn_slot
from .layers import GRN, DropPath, LayerNorm2d
from .sparse import SparseLayout, grn_rows
from .variants import get_variant


class Block(nn.Module):
    """dwconv 7x7 -> LN -> Linear C->4C -> GELU -> GRN -> Linear 4C->C, plus residual. No LayerScale.

    ``options`` (``ablations.ArchOptions``) swaps GRN for another module in its place (``grn``, always
    that attribute name, so GRN keeps the authors' keys) or makes this the ConvNeXt V1 block: nothing
    in GRN's place and LayerScale ``gamma`` (C,), initialised to 1e-6, on the branch output.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, options: Optional[ArchOptions] = None) -> None:
        super().__init__()
        options = options or ArchOptions()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = grn_slot(4 * dim, options)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma: Optional[nn.Parameter] = None
        if options.block == "v1":
            self.gamma = nn.Parameter(torch.full((dim,), V1_LAYER_SCALE_INIT))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        # keep: (N, 1, H, W), 1 at visible positions, 0 at masked ones (FCMAE); None = no mask.
        shortcut = x
        x = self.dwconv(x)
        if keep is not None:
            x = x * keep
        x = self.expand(x.permute(0, 2, 3, 1))  # NHWC: LN and both Linears act on the contiguous channel dim
        keep_nhwc: Optional[torch.Tensor] = None
        if keep is not None:
            keep_nhwc = keep.permute(0, 2, 3, 1)
            x = x * keep_nhwc  # GRN statistics over visible positions only
        x = self.pwconv2(self.grn(x, keep_nhwc))
        if self.gamma is not None:
            x = x * self.gamma
        x = x.permute(0, 3, 1, 2)
        if keep is not None:
            x = x * keep
        return shortcut + self.drop_path(x)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm -> Linear C->4C -> GELU on channels-last positions (an NHWC map or (V, C) rows)."""
        return self.act(self.pwconv1(self.norm(x)))

    def forward_sparse(self, rows: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        """The same block on the visible positions only (FCMAE sparse fast path; never scripted).

        ``rows`` (V, C) holds the visible positions of the NHWC map in ``layout.idx`` order. The 7x7
        depthwise conv runs dense on the map with zeros at masked positions (the submanifold conv:
        masked neighbours contribute nothing, masked outputs are never read back); LayerNorm, both
        Linears, GELU and GRN (or what is in its place) run on the V visible rows only.
        """
        x = self.expand(layout.gather(self.dwconv(layout.scatter(rows))))
        x = grn_rows(self.grn, x, layout) if isinstance(self.grn, GRN) else self.grn.forward_rows(x, layout)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = x * self.gamma
        if self.training and isinstance(self.drop_path, DropPath) and self.drop_path.drop_prob > 0.0:
            x = layout.per_image(x, self.drop_path)
        return rows + x


class ConvNeXtV2(nn.Module):
    """ConvNeXt V2: stem, four stages of Blocks, head (global average pool -> LayerNorm -> Linear).

    ``features_only=True`` drops the head and makes ``forward`` return the maps of ``out_indices``.
    The paper's architecture ablations are switches (``block``, ``grn``, ``grn_aggregation``,
    ``grn_normalization``, ``grn_residual``, ``grn_form``; see ``ablations.ArchOptions``); their
    defaults are the released model, and ``arch_options()`` returns those that differ.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        head_init_scale: float = 1.0,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        block: str = "v2",
        grn: str = "grn",
        grn_aggregation: str = "l2",
        grn_normalization: str = "divisive",
        grn_residual: bool = True,
        grn_form: str = "full",
    ) -> None:
        super().__init__()
        self.options = ArchOptions(block, grn, grn_aggregation, grn_normalization, grn_residual, grn_form)
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths and dims need 4 entries each, got {list(depths)} and {list(dims)}")
        if features_only and any(i not in range(4) for i in out_indices):
            raise ValueError(f"out_indices must be stage indices 0..3, got {list(out_indices)}")
        self.depths = tuple(depths)
        self.dims = tuple(dims)
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.features_only = features_only
        self.out_indices = tuple(out_indices)
        self.grad_checkpointing = False
        self.feature_info: List[Dict[str, Union[int, str]]] = [
            dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(4)
        ]

        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
            )
        n = sum(depths)  # drop path rises linearly 0 -> drop_path_rate over all blocks
        rates = [drop_path_rate * j / (n - 1) if n > 1 else 0.0 for j in range(n)]
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(nn.ModuleList([Block(dims[i], rates[start + j], self.options) for j in range(depth)]))

        if features_only:
            self.norm: nn.Module = nn.Identity()
            self.head: nn.Module = nn.Identity()
        else:
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
            self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    def arch_options(self) -> Dict[str, Any]:
        """The architecture switches that differ from the released ConvNeXt V2 ({} for it): what a
        checkpoint stores, and the keyword arguments that rebuild this architecture."""
        return self.options.non_default()

    # --- timm-style API -------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised ``Linear(num_features, num_classes)`` (0: no head)."""
        if self.features_only:
            raise ValueError("a features_only model has no classifier; create it with features_only=False")
        self.num_classes = num_classes
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        ref = self.norm.weight
        self.head = head.to(device=ref.device, dtype=ref.dtype)
        self.head.apply(init_weights)

    def forward_stages(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                       last_stage: int = 3) -> List[torch.Tensor]:
        """Run stem and stages up to ``last_stage``; return the output map of each stage run
        (N, C_i, H/2^(i+2), W/2^(i+2))."""
        outs: List[torch.Tensor] = []
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            # An if, not a break: TorchScript unrolls loops over modules and allows no break in them.
            if i <= last_stage:
                x = down(x)
                keep: Optional[torch.Tensor] = None
                if mask is not None:
                    keep = _stage_keep(mask, 1 << (3 - i), x.dtype)
                    x = x * keep
                for blk in stage:
                    if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                        x = torch.utils.checkpoint.checkpoint(blk, x, keep, use_reentrant=False)
                    else:
                        x = blk(x, keep)
                outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-stage map before the head's norm, (N, C3, H/32, W/32).

        ``mask``: (N, h, w) at the final-stage grid (h = H/32), 1 = masked (FCMAE); it is upsampled to
        every stage and masked positions stay exactly 0 in the output.
        """
        return self.forward_stages(x, mask)[-1]

    def forward_features_sparse(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``forward_features(x, mask)`` computed on the visible positions only (FCMAE fast path).

        Equal to the dense-masked path up to float summation order. Every per-position op (both
        LayerNorms, the Linears, GELU, GRN scaling, residual, drop path) runs on the gathered visible
        rows (V, C) of the NHWC map; only the stem conv, the 7x7 depthwise convs and the 2x2
        downsampling convs run dense, on maps with zeros at masked positions. GRN statistics are per
        image over its visible rows. Not part of the scripted/exported graph: it is a training path.
        """
        n, _, height, width = x.shape
        if mask.dim() != 3 or mask.shape[0] != n or mask.shape[1] * 32 != height or mask.shape[2] * 32 != width:
            raise ValueError(
                f"mask must be (N, H/32, W/32) = ({n}, {height / 32:g}, {width / 32:g}), got {tuple(mask.shape)}"
            )
        visible = mask == 0
        rows = torch.empty(0)
        layout: Optional[SparseLayout] = None
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            scale = 1 << (3 - i)
            new_layout = SparseLayout(upsample_mask(visible, scale))
            if i == 0:
                conv, norm = down[0], down[1]
                y = conv(x)  # stem on the full image, as the authors' sparse encoder does
                rows = new_layout.gather(y)
                rows = F.layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            else:
                assert layout is not None
                norm, conv = down[0], down[1]
                # LayerNorm is per position, so only visible rows; a 2x2/2 window never straddles a
                # 32x32 patch edge, so visible outputs only read visible (normalised) inputs.
                rows = F.layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
                rows = new_layout.gather(conv(layout.scatter(rows)))
            layout = new_layout
            for blk in stage:
                if self.grad_checkpointing and self.training:
                    rows = torch.utils.checkpoint.checkpoint(blk.forward_sparse, rows, layout, use_reentrant=False)
                else:
                    rows = blk.forward_sparse(rows, layout)
        assert layout is not None
        return layout.scatter(rows)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool -> LayerNorm -> Linear; ``pre_logits=True`` stops before the Linear."""
        x = self.norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if self.features_only:
            outs = self.forward_stages(x)
            return [outs[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))

    # --- Hugging Face Hub: the files `convnextv2 push` writes (huggingface_hub's ModelHubMixin API) ---------
    def save_pretrained(self, save_directory: Union[str, "os.PathLike[str]"], *, formats: Sequence[str] = ("ours",),
                        license: Optional[str] = None, repo_id: Optional[str] = None) -> Path:
        """Write this model's Hub repo folder (``model.safetensors``, ``config.json``, ``README.md``; ``formats``
        adds ``"timm"`` / ``"hf"`` subfolders), as ``convnextv2 push --dry-run`` does. The folder is written
        whole or not at all; an existing one is replaced only when it is empty or a repo folder of ours.
        ``license``: see ``checkpoints.model_card.choose_license`` (not recorded start: CC BY-NC 4.0 unless given)."""
        from ..checkpoints.hub import default_card_info
        from ..checkpoints.hub_folder import write_hub_folder

        # Without repo_id the card's loading lines name OWNER/<folder name>, for the uploader to fill in.
        name = repo_id or f"OWNER/{Path(save_directory).resolve().name or 'model'}"
        return write_hub_folder(self, save_directory, default_card_info(name, license), formats, overwrite=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, "os.PathLike[str]"], *,
                        revision: Optional[str] = None, force_download: bool = False, token: Optional[str] = None,
                        **model_kwargs: Any) -> "ConvNeXtV2":
        """The model of a repo folder (``save_pretrained``'s) or Hub repo (``OWNER/NAME``, ``hf-hub:OWNER/NAME``)
        with its head, label names and preprocessing: the same model as ``create("hf-hub:OWNER/NAME",
        pretrained=True)``. Downloads go through the Hub cache (``HF_HOME``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``)
        and are verified; ``model_kwargs`` go to the constructor (``drop_path_rate``, ``num_classes``, ...)."""
        from ..checkpoints.hub import load_pretrained

        return load_pretrained(cls, pretrained_model_name_or_path, revision=revision, force=force_download,
                               token=token, **model_kwargs)

    def push_to_hub(self, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None,
                    formats: Sequence[str] = ("ours",), license: Optional[str] = None,
                    commit_message: str = "Upload model with convnextv2-hub") -> str:
        """Upload this model's repo folder to ``repo_id`` in one commit (creating the repo, ``private`` when new)
        and return the commit URL; ``token``: huggingface_hub's (``HF_TOKEN`` or ``hf auth login``) by default."""
        from ..checkpoints.hub import default_card_info, push_model

        return push_model(self, repo_id, info=default_card_info(repo_id, license), formats=formats, private=private,
                          token=token, commit_message=commit_message)


def upsample_mask(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """(N, h, w) mask -> (N, h*scale, w*scale): each cell repeated over its scale x scale block."""
    if scale == 1:
        return mask
    return mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def _stage_keep(mask: torch.Tensor, scale: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, h, w) mask with 1 = masked -> (N, 1, h*scale, w*scale) multiplier with 1 = visible."""
    return upsample_mask(1.0 - mask.to(dtype), scale).unsqueeze(1)


def init_weights(m: nn.Module) -> None:
    """Truncated normal (std 0.02) weights and zero biases for every conv and Linear; other modules keep theirs."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)  # cut-offs at +-2 (absolute), as timm's
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def convnextv2(variant: str, **kwargs) -> ConvNeXtV2:
    """Build an untrained ConvNeXt V2 of the named variant (atto ... huge); kwargs go to ConvNeXtV2."""
    v = get_variant(variant)
    model = ConvNeXtV2(depths=v.depths, dims=v.dims, **kwargs)
    model.variant = v.name
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["Block", "ConvNeXtV2", "convnextv2", "count_params", "init_weights", "upsample_mask"]

