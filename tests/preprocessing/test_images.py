"""The shared preprocessing pieces: ``open_image`` (the one file reader), ``to_normalized_tensor``,
``interpolation_mode`` and ``default_transform``, on real photos."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import skimage.data
import torch
from conftest import write_bomb_png, write_skimage_photos
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from convnextv2_hub.checkpoints.registry import create_transform
from convnextv2_hub.models.convnextv2 import convnextv2
from convnextv2_hub.preprocessing.image_folder import ImageList, default_transform
from convnextv2_hub.preprocessing.images import (
    IMAGE_EXTENSIONS,
    ImageTooLargeError,
    expand_image_paths,
    open_image,
    sample_image_path,
)
from convnextv2_hub.preprocessing.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    interpolation_mode,
    to_normalized_tensor,
    to_rgb,
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    return dict(zip(("chelsea", "camera"), write_skimage_photos(folder, ("chelsea", "camera"))))


def test_open_image_reads_a_photo_as_rgb(photos):
    img = open_image(photos["chelsea"])
    assert img.mode == "RGB" and img.size == (451, 300)
    assert np.array_equal(np.asarray(img), skimage.data.chelsea())
    grey = open_image(photos["camera"])  # an 8-bit greyscale PNG
    assert grey.mode == "RGB"
    assert all(np.array_equal(np.asarray(grey)[:, :, c], skimage.data.camera()) for c in range(3))


def test_open_image_fails_at_the_call_on_a_truncated_or_foreign_file(photos, tmp_path):
    jpeg = tmp_path / "chelsea.jpg"
    Image.fromarray(skimage.data.chelsea()).save(jpeg, quality=90)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(jpeg.read_bytes()[:3000])
    with Image.open(truncated) as lazy:  # PIL alone opens it: only decoding finds the missing data
        assert lazy.size == (451, 300)
    with pytest.raises(OSError, match="truncated"):
        open_image(truncated)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UnidentifiedImageError):
        open_image(text)
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "missing.png")
    # ImageList names the file in its error
    with pytest.raises(OSError, match="cut.jpg"):
        ImageList([str(truncated)], [0], lambda im: im)[0]


def test_open_image_turns_exif_rotated_photos_upright_once(tmp_path):
    upright = Image.fromarray(skimage.data.chelsea())
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    img = open_image(path)
    assert img.size == upright.size
    assert np.abs(np.asarray(img, dtype=int) - np.asarray(upright, dtype=int)).mean() < 3
    # The transforms start with to_rgb again: it must not rotate a second time.
    assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(img))
    tf = create_transform("tiny.fcmae_ft_in1k")
    with Image.open(path) as raw:
        assert torch.equal(tf(img), tf(raw))


def test_sample_photo_and_extensions():
    img = open_image(sample_image_path())
    assert img.mode == "RGB" and min(img.size) >= 224
    assert ".jpg" in IMAGE_EXTENSIONS and ".png" in IMAGE_EXTENSIONS


def test_to_normalized_tensor_is_the_normalisation_formula():
    img = Image.fromarray(skimage.data.coffee())
    x = to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD)(img)
    ref = torch.from_numpy(skimage.data.coffee().astype(np.float32) / 255.0).permute(2, 0, 1)
    ref = (ref - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert x.dtype == torch.float32 and x.shape == (3, 400, 600)
    assert torch.allclose(x, ref, atol=1e-6)


def test_interpolation_mode_names():
    assert interpolation_mode("bicubic") is v2.InterpolationMode.BICUBIC
    assert interpolation_mode("BILINEAR") is v2.InterpolationMode.BILINEAR
    with pytest.raises(ValueError, match="unknown interpolation 'lanczos5'"):
        interpolation_mode("lanczos5")


def test_default_transform_without_a_checkpoint_is_the_tiny_in1k_pipeline(photos):
    model = convnextv2("atto", num_classes=10)
    assert getattr(model, "checkpoint", None) is None
    img = open_image(photos["chelsea"])
    assert torch.equal(default_transform(model)(img), create_transform("tiny.fcmae_ft_in1k")(img))


def test_export_verification_photos_are_the_sample_and_scikit_image_photos():
    from convnextv2_hub.inference.export import verification_inputs

    size = 64
    batches = verification_inputs(size, IMAGENET_MEAN, IMAGENET_STD)
    natural = batches[3]  # random batch 1, natural batch 1, random batch 3, natural batch 3
    normalize = to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD)
    for x, img in zip(natural, [open_image(sample_image_path()), Image.fromarray(skimage.data.astronaut()),
                                Image.fromarray(skimage.data.coffee())]):
        w, h = img.size  # the short side resized to ``size`` (rounded), then the centre crop
        img = img.resize((max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))),
                         Image.BICUBIC)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        assert torch.allclose(x, normalize(img.crop((left, top, left + size, top + size))), atol=1e-6)
    assert torch.equal(batches[1][0], natural[0])


def test_open_image_refuses_decompression_bombs_naming_the_file(bomb_png, tmp_path):
    # Above 2x MAX_IMAGE_PIXELS PIL raises DecompressionBombError; between 1x and 2x it only warns (naming
    # no file) and decodes: both are refused here, with the file, its size and how to allow it.
    between = write_bomb_png(tmp_path / "between.png", 10000, 10000)
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS < 14000 * 14000
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for path, size in ((bomb_png, "196,000,000 pixels"), (between, "10000 x 10000 = 100,000,000 pixels")):
            with pytest.raises(ImageTooLargeError) as info:
                open_image(path)
            message = str(info.value)
            assert isinstance(info.value, OSError)
            assert path in message and size in message
            assert "exceeds the pixel limit" in message and "PIL.Image.MAX_IMAGE_PIXELS = None" in message
    assert not [w for w in record if issubclass(w.category, Image.DecompressionBombWarning)]
    with pytest.raises(OSError, match="between.png"):  # the training and analysis readers name it too
        ImageList([between], [0], lambda im: im)[0]


def test_the_pixel_limit_is_the_one_users_set(photos, monkeypatch):
    # The camera photo (512 x 512 = 262,144 px) sits between 1x and 2x of this limit: PIL would only warn.
    path = photos["camera"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    with pytest.raises(ImageTooLargeError, match="512 x 512 = 262,144 pixels exceeds the pixel limit of 200,000"):
        open_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # what the message advises for a trusted file
    assert open_image(path).size == (512, 512)


def test_expand_image_paths_lists_folders_recursively_and_sorted(tmp_path):
    folder = tmp_path / "shots"
    for name in ("b.png", "a.jpg", "sub/c.JPG", "sub/deeper/d.webp", "notes.txt", ".hidden.png", ".cache/e.png",
                 "z.tiff"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    loose = tmp_path / "loose.dat"  # named explicitly: kept whatever its extension
    loose.write_bytes(b"x")
    got = expand_image_paths([str(loose), folder])
    assert got == [str(loose)] + [str(folder / n) for n in ("a.jpg", "b.png", "sub/c.JPG", "sub/deeper/d.webp",
                                                            "z.tiff")]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images \(\.jpg.*\) in folder .*empty or its sub-folders"):
        expand_image_paths([str(loose), str(empty)])
    with pytest.raises(FileNotFoundError, match="typo.png"):
        expand_image_paths([str(loose), str(tmp_path / "typo.png")])
