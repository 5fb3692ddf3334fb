"""The batched (GPU-path) augmentation: each operation against its definition, on the CPU."""

import colorsys

import numpy as np
import pytest
import torch
from conftest import augment_cfg

from bne.augment import GRAY, BatchAugment, _hsv_to_rgb, _rgb_to_hsv, crop_boxes

NONE = dict(crop_scale=(1.0, 1.0), hflip=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale=0.0)
#: The strengths the per-image test means (params.yaml's train.augment).
DEFAULT = dict(crop_scale=(0.7, 1.0), hflip=0.5, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, grayscale=0.1)


def _images(n=6, size=24, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _float(images):
    return images.permute(0, 3, 1, 2).float() / 255


def test_no_augmentation_is_identity():
    x = _images()
    out = BatchAugment(augment_cfg(**NONE), 24)(x)
    assert out.shape == (6, 3, 24, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out, _float(x), atol=1e-5, rtol=0)


def test_flip_mirrors_every_image():
    x = _images()
    out = BatchAugment(augment_cfg(**{**NONE, "hflip": 1.0}), 24)(x)
    torch.testing.assert_close(out, _float(x).flip(-1), atol=1e-5, rtol=0)


def test_grayscale_uses_luma_weights():
    x = _images()
    out = BatchAugment(augment_cfg(**{**NONE, "grayscale": 1.0}), 24)(x)
    f = _float(x)
    luma = sum(w * f[:, c] for c, w in enumerate(GRAY))
    for c in range(3):
        torch.testing.assert_close(out[:, c], luma, atol=1e-5, rtol=0)


def test_hsv_round_trip_matches_colorsys():
    rgb = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    hsv = _rgb_to_hsv(rgb)
    ref = torch.tensor([colorsys.rgb_to_hsv(*rgb[0, :, 1, 2].tolist())])
    torch.testing.assert_close(hsv[0, :, 1, 2], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(_hsv_to_rgb(hsv), rgb, atol=1e-5, rtol=0)


def test_crops_follow_scale_and_ratio():
    torch.manual_seed(0)
    box = crop_boxes(4000, (0.7, 1.0))
    w, h, x0, y0 = box.unbind(1)
    area, aspect = w * h, w / h
    fallback = (w == 1) & (h == 1)
    assert fallback.float().mean() < 0.05  # torchvision's ten tries rarely all fail at scale >= 0.7
    a, r = area[~fallback], aspect[~fallback]
    assert a.min() >= 0.7 - 1e-6 and a.max() <= 1.0 + 1e-6
    assert r.min() >= 3 / 4 - 1e-5 and r.max() <= 4 / 3 + 1e-5
    assert (x0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 >= 0).all() and (y0 + h <= 1 + 1e-6).all()


def test_parameters_are_per_image_and_seeded():
    x = _images(1).repeat(8, 1, 1, 1)  # eight copies of one image
    aug = BatchAugment(augment_cfg(**DEFAULT), 20)
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    assert torch.equal(a, b)
    assert a.shape == (8, 3, 20, 20) and a.min() >= 0 and a.max() <= 1
    diffs = [(a[0] - a[i]).abs().mean().item() for i in range(1, 8)]
    assert min(diffs) > 1e-3  # every copy got its own crop / colours


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_jitter_strength_zero_point_and_range(op):
    x = _images()
    torch.manual_seed(0)
    out = BatchAugment(augment_cfg(**{**NONE, op: 0.5}), 24)(x)
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, _float(x), atol=1e-3)
