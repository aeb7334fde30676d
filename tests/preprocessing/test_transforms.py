"""Eval preprocessing: shapes, normalisation, every PIL mode, EXIF, and agreement with timm's pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from convnextv2_hub.checkpoints.registry import get_checkpoint
from convnextv2_hub.checkpoints.registry import create_transform
from convnextv2_hub.preprocessing.transforms import eval_transform, to_rgb, train_transform

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def images():
    return {
        "chelsea": Image.fromarray(skimage.data.chelsea()),  # 451 x 300
        "astronaut": Image.fromarray(skimage.data.astronaut()),  # 512 x 512
        "coffee": Image.fromarray(skimage.data.coffee()),  # 600 x 400
        "china": Image.fromarray(load_sample_image("china.jpg")),  # 640 x 427
    }


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def test_center_224_resizes_short_side_to_256_then_crops(images):
    img = images["china"].resize((640, 480), Image.Resampling.BICUBIC)
    x = create_transform("tiny.fcmae_ft_in1k")(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # Reference built by hand with PIL: 640x480 -> 341x256 (floor 224/0.875 = 256), centre 224 crop.
    ref = img.resize((341, 256), Image.Resampling.BICUBIC)
    left, top = round((341 - 224) / 2.0), round((256 - 224) / 2.0)
    ref = np.asarray(ref.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    got = _unnormalise(x).permute(1, 2, 0).numpy()
    assert np.abs(got - ref).max() < 1e-5
    # Normalised: the photo's pixels map to the ImageNet-normalised range, not [0, 1].
    assert x.min() < -1.0 and x.max() > 1.0
    assert torch.all(_unnormalise(x) >= -1e-6) and torch.all(_unnormalise(x) <= 1 + 1e-6)


def test_squash_384_warps_without_crop(images):
    img = images["chelsea"]
    assert img.size == (451, 300)
    x = create_transform("tiny.fcmae_ft_in22k_in1k_384")(img)
    assert x.shape == (3, 384, 384) and x.dtype == torch.float32
    ref = np.asarray(img.resize((384, 384), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    assert np.abs(_unnormalise(x).permute(1, 2, 0).numpy() - ref).max() < 1e-5
    # A centre crop would have lost the left and right edges; the warp keeps them.
    centre = eval_transform(384, 0.875, "center")(img)
    assert (centre - x).abs().max() > 0.5


def test_512_and_fcmae_entries(images):
    assert create_transform("huge.fcmae_ft_in22k_in1k_512")(images["coffee"]).shape == (3, 512, 512)
    assert create_transform(get_checkpoint("atto.fcmae"))(images["coffee"]).shape == (3, 224, 224)
    assert get_checkpoint("base").transforms()(images["coffee"]).shape == (3, 224, 224)


@pytest.mark.parametrize("name", ["tiny.fcmae_ft_in1k", "base.fcmae_ft_in22k_in1k_384", "huge.fcmae_ft_in22k_in1k_512"])
def test_matches_timm_eval_transform(images, name):
    from timm.data.transforms_factory import transforms_imagenet_eval

    c = get_checkpoint(name)
    ours = create_transform(c)
    theirs = transforms_imagenet_eval(img_size=c.resolution, crop_pct=c.crop_pct, crop_mode=c.crop_mode,
                                      interpolation=c.interpolation, mean=c.mean, std=c.std)
    for img in images.values():
        a, b = ours(img), theirs(img)
        assert a.shape == b.shape == (3, c.resolution, c.resolution)
        # Same PIL resampling, so pixel-identical; measured max |diff| 7.2e-7 (float rounding of /255 and Normalize).
        assert (a - b).abs().max().item() < 2e-6


def test_tensor_and_array_inputs_match_pil(images):
    img = images["astronaut"]
    tf = create_transform("tiny.fcmae_ft_in1k")
    ref = tf(img)
    a = np.array(img)  # a writable copy: torch.from_numpy warns on read-only PIL buffers
    assert torch.equal(tf(a), ref)
    assert torch.equal(tf(torch.from_numpy(a).permute(2, 0, 1).contiguous()), ref)
    grey = np.array(img.convert("L"))
    assert torch.equal(tf(grey), tf(img.convert("L")))
    assert torch.equal(tf(torch.from_numpy(grey)[None]), tf(img.convert("L")))
    with pytest.raises(TypeError, match="uint8"):
        tf(a.astype(np.float32))
    with pytest.raises(TypeError):
        tf("not an image")


def _all_modes(img: Image.Image):
    rgb = img.convert("RGB")
    grey = np.asarray(rgb.convert("L"))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, rgb.width, dtype=np.uint8), (rgb.height, 1))))
    pal_t = rgb.quantize(64)
    pal_t.info["transparency"] = 0
    return {
        "1": rgb.convert("1"),
        "L": rgb.convert("L"),
        "LA": rgba.convert("LA"),
        "P": rgb.quantize(64),
        "P+transparency": pal_t,
        "RGBA": rgba,
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),
        "I": Image.fromarray(grey.astype(np.int32) * 257),
        "F": Image.fromarray(grey.astype(np.float32) / 255),
    }


def test_every_pil_mode_gives_a_finite_rgb_tensor(images):
    tf = eval_transform(224)
    modes = _all_modes(images["coffee"])
    assert modes["I;16"].mode == "I;16" and modes["I"].mode == "I" and modes["F"].mode == "F"
    for name, img in modes.items():
        rgb = to_rgb(img)
        assert rgb.mode == "RGB" and rgb.size == img.size, name
        x = tf(img)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all(), name


def test_high_bit_depth_greyscale_is_scaled_not_clipped(images):
    grey = images["coffee"].convert("L")
    expected = np.asarray(grey.convert("RGB"))
    modes = _all_modes(images["coffee"])
    # Scaling v*257 back by 255/65535 recovers v exactly; Pillow's convert("L") would clip at 255.
    assert np.array_equal(np.asarray(to_rgb(modes["I;16"])), expected)
    assert np.array_equal(np.asarray(to_rgb(modes["I"])), expected)
    assert np.array_equal(np.asarray(to_rgb(modes["F"])), expected)
    assert np.asarray(modes["I;16"].convert("L")).mean() > np.asarray(grey).mean() + 50
    # A float image outside [0, 1] is stretched over its own range instead of saturating.
    hdr = Image.fromarray(np.asarray(grey, dtype=np.float32) * 10.0)
    out = np.asarray(to_rgb(hdr))[:, :, 0].astype(int)
    g = np.asarray(grey).astype(int)
    assert out.max() == 255 and out.min() == 0
    assert np.corrcoef(out.ravel(), g.ravel())[0, 1] > 0.999


def test_transparency_is_composited_on_white(images):
    rgb = images["astronaut"]
    rgba = rgb.copy()
    alpha = np.zeros((rgb.height, rgb.width), np.uint8)
    alpha[:, rgb.width // 2:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    out = np.asarray(to_rgb(rgba))
    assert (out[:, : rgb.width // 2] == 255).all()
    assert np.array_equal(out[:, rgb.width // 2:], np.asarray(rgb)[:, rgb.width // 2:])
    pal = rgb.quantize(16)
    idx = np.asarray(pal)[0, 0]
    pal.info["transparency"] = int(idx)
    out = np.asarray(to_rgb(pal))
    assert (out[np.asarray(pal) == idx] == 255).all()
    assert (np.asarray(pal.convert("RGB"))[np.asarray(pal) == idx] != 255).any()


def test_exif_orientation_is_applied(images, tmp_path):
    upright = images["chelsea"]
    # Orientation 6 means "rotate 90 degrees clockwise to display": store the pixels rotated the other way.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif)
    with Image.open(path) as f:
        assert f.getexif()[0x0112] == 6 and f.size == (300, 451)
        out = to_rgb(f)
        x = create_transform("tiny.fcmae_ft_in1k")(f)
    assert out.size == upright.size
    with Image.open(path) as f:
        expected = f.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    # The JPEG round trip aside, the result is the upright photo.
    diff = np.abs(np.asarray(out, dtype=int) - np.asarray(upright, dtype=int))
    assert diff.mean() < 3
    ref = create_transform("tiny.fcmae_ft_in1k")(upright)
    assert (x - ref).abs().mean() < 0.05


def test_train_transform_is_random_but_well_formed(images):
    torch.manual_seed(0)
    tf = create_transform("tiny.fcmae_ft_in22k_in1k_384", train=True)
    a, b = tf(images["china"]), tf(images["china"])
    assert a.shape == b.shape == (3, 384, 384) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    assert torch.isfinite(a).all()
    assert train_transform(224)(images["coffee"]).shape == (3, 224, 224)


def test_bad_settings_fail_loudly():
    with pytest.raises(ValueError, match="crop_mode"):
        eval_transform(224, 0.875, "border")
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(224, 0.0)
    with pytest.raises(ValueError, match="interpolation"):
        eval_transform(224, interpolation="lanczos5")
    with pytest.raises(ValueError, match="list_checkpoints"):
        create_transform("tinny")
