"""The trainer's augmentations are built from ``preprocessing.transforms``' pieces, and its data set
reads files with ``preprocessing.images.open_image``; on real photos."""
from __future__ import annotations

import pickle

import pytest
import skimage.data
import torch
from conftest import write_skimage_photos
from PIL import Image
from torchvision.transforms import v2

from convnextv2_hub.preprocessing.transforms import (
    ToRGB,
    interpolation_mode,
    to_normalized_tensor,
    train_transform,
)
from convnextv2_hub.train.data import (
    ImageDataset,
    fcmae_train_transform,
    finetune_train_transform,
    rand_augment,
    seeded_call,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SEEDS = (0, 1, 2024)


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(getattr(skimage.data, n)()) for n in ("chelsea", "coffee", "camera")]


def _same(tf_a, tf_b, photos) -> None:
    for img in photos:
        for seed in SEEDS:
            a, b = seeded_call(tf_a, img, seed), seeded_call(tf_b, img, seed)
            assert torch.equal(a, b)


def test_fcmae_augmentation_is_the_basic_train_transform_at_scale_0_2(photos):
    _same(fcmae_train_transform(96, MEAN, STD), train_transform(96, "bicubic", MEAN, STD, (0.2, 1.0)), photos)
    _same(fcmae_train_transform(64, (0.5,) * 3, (0.5,) * 3, "bilinear", (0.3, 0.9)),
          train_transform(64, "bilinear", (0.5,) * 3, (0.5,) * 3, (0.3, 0.9)), photos)


def test_finetune_augmentation_is_composed_of_the_shared_pieces(photos):
    # Written out step by step, with the tensor tail the trainer used before it shared
    # to_normalized_tensor (ToImage instead of PILToTensor): the same numbers.
    reference = v2.Compose([
        ToRGB(),
        v2.RandomResizedCrop(96, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        rand_augment("rand-m9-mstd0.5-inc1", MEAN),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD)),
        v2.RandomErasing(p=0.25, value="random"),
    ])
    _same(finetune_train_transform(96, MEAN, STD), reference, photos)
    plain = v2.Compose([
        ToRGB(),
        v2.RandomResizedCrop(64, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), interpolation=interpolation_mode("bilinear"),
                             antialias=True),
        v2.RandomHorizontalFlip(),
        to_normalized_tensor(MEAN, STD),
    ])
    _same(finetune_train_transform(64, MEAN, STD, aa=None, reprob=0.0, interpolation="bilinear", scale=(0.5, 1.0)),
          plain, photos)


def test_augmentations_pickle_for_worker_processes(photos):
    for tf in (fcmae_train_transform(64, MEAN, STD), finetune_train_transform(64, MEAN, STD)):
        copy = pickle.loads(pickle.dumps(tf))
        _same(tf, copy, photos[:1])


def test_data_set_reads_photos_and_skips_a_truncated_one(tmp_path):
    paths = write_skimage_photos(tmp_path, ("chelsea", "camera"))
    jpeg = tmp_path / "coffee.jpg"
    Image.fromarray(skimage.data.coffee()).save(jpeg, quality=90)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(jpeg.read_bytes()[:4000])
    tf = finetune_train_transform(48, MEAN, STD)
    ds = ImageDataset([(paths[0], 0), (str(truncated), 1), (paths[1], 2)], ["a", "b", "c"], tf)
    x, label, skipped = ds[(0, 7)]
    assert x.shape == (3, 48, 48) and label == 0 and skipped == 0
    with pytest.warns(UserWarning, match="skipping unreadable image .*cut.jpg"):
        x, label, skipped = ds[(1, 7)]
    assert label == 2 and skipped == 1  # the next readable sample, the greyscale photo as RGB
    assert torch.equal(x, ds[(2, 7)][0])


def test_uint8_batches_normalised_as_a_batch_equal_the_normalised_pipelines(photos):
    # The loader sends uint8 images, the trainer normalises the whole batch on the device: the same
    # numbers as normalising each image in the worker, for every pipeline that can send uint8.
    from convnextv2_hub.preprocessing.transforms import eval_transform, normalize_images

    normalize = normalize_images(MEAN, STD)
    pairs = [
        (fcmae_train_transform(64, MEAN, STD, uint8=True), fcmae_train_transform(64, MEAN, STD)),
        (finetune_train_transform(64, MEAN, STD, reprob=0.0, uint8=True), finetune_train_transform(64, MEAN, STD, reprob=0.0)),
        (eval_transform(64, uint8=True), eval_transform(64)),
    ]
    for as_uint8, as_float in pairs:
        batch = torch.stack([seeded_call(as_uint8, img, 5) for img in photos])
        assert batch.dtype == torch.uint8
        assert torch.equal(normalize(batch), torch.stack([seeded_call(as_float, img, 5) for img in photos]))
    with pytest.raises(ValueError, match="uint8 output needs reprob=0: random erasing"):
        finetune_train_transform(64, MEAN, STD, uint8=True)
