"""fcmae-show: the four-panel reconstruction picture of an FCMAE checkpoint, from Python and the CLI."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2_hub.analysis.reconstruction import PANEL_GAP, fcmae_show
from convnextv2_hub.cli.fcmae_show import add_fcmae_show_parser

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


def test_fcmae_show_writes_the_four_panels(tmp_path, overfit):
    _, _, ckpt = overfit
    from skimage import data

    src = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()).save(src)
    out = fcmae_show(src, ckpt, tmp_path / "recon.png", mask_ratio=0.6, seed=3, size=96)
    assert out == tmp_path / "recon.png" and sorted(os.listdir(tmp_path)) == ["cat.png", "recon.png"]
    row = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)
    assert row.shape == (96, 4 * 96 + 3 * PANEL_GAP, 3)
    orig, masked, recon, pasted = (row[:, i * (96 + PANEL_GAP) : i * (96 + PANEL_GAP) + 96] for i in range(4))
    # Masked patches are the mean grey in "masked", the rest is the original, in "masked" and "pasted".
    grey = (MEAN.view(3) * 255).round().to(torch.int16).numpy()
    cells = [(r, c) for r in range(3) for c in range(3)]
    is_grey = [np.abs(masked[r * 32 : r * 32 + 32, c * 32 : c * 32 + 32] - grey).max() <= 1 for r, c in cells]
    assert sum(is_grey) == 9 - int(9 * (1 - 0.6))  # 6 of 9 patches masked
    for (r, c), g in zip(cells, is_grey):
        sl = np.s_[r * 32 : r * 32 + 32, c * 32 : c * 32 + 32]
        if g:
            assert np.array_equal(pasted[sl], recon[sl])
        else:
            assert np.abs(masked[sl] - orig[sl]).max() <= 1 and np.abs(pasted[sl] - orig[sl]).max() <= 1
    # The same seed gives the same picture; the command-line entry point writes the same file.
    parser = argparse.ArgumentParser()
    add_fcmae_show_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["fcmae-show", str(src), "--checkpoint", str(ckpt), "--out", str(tmp_path / "cli.png"), "--seed", "3", "--size", "96"]
    )
    assert args.func(args) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")), row.astype(np.uint8))
