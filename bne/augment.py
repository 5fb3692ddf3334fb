"""Training augmentation of a whole batch at once, on the batch's device (the GPU path of training).

:class:`bne.data.Augment` runs torchvision's transforms image by image on the CPU: right for 2 cores, where it
is ~11x faster than the trainer, but a GPU trains Lite0 at 224 px far faster than one CPU thread can augment.
:class:`BatchAugment` draws the same kinds of random parameters per image (from torch's global RNG, so seeded
runs repeat) and applies them to the batch in a handful of kernels: random resized crop and horizontal flip as
one affine ``grid_sample`` (bilinear), then brightness, contrast, saturation and hue in that fixed order
(torchvision permutes the four per call), then random grayscale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bne.data import AugmentConfig

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    w = torch.tensor(GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, ((g - b) / d) % 6, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)  # r, g, b
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * (torch.minimum(k, 4 - k).clamp(0, 1))


def crop_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """Per-image crop (width, height, x0, y0) as fractions of a square image, drawn as torchvision's
    RandomResizedCrop does (area fraction ~ U(scale), log aspect ~ U(log ratio), up to ``tries`` draws,
    else the whole image)."""
    box = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(n, 1)
    todo = torch.ones(n, dtype=torch.bool)
    for _ in range(tries):
        area = torch.empty(n).uniform_(*scale)
        aspect = torch.exp(torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1])))
        w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
        ok = todo & (w <= 1) & (h <= 1)
        x0, y0 = torch.rand(n) * (1 - w).clamp_min(0), torch.rand(n) * (1 - h).clamp_min(0)
        box[ok] = torch.stack([w, h, x0, y0], 1)[ok]
        todo &= ~ok
        if not todo.any():
            break
    return box


class BatchAugment:
    """Random resized crop, flip, colour jitter and grayscale of a uint8 NHWC batch, on its own device."""

    def __init__(self, cfg: AugmentConfig, size: int) -> None:
        self.cfg, self.size = cfg, size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) on any device -> float (N, 3, size, size) in [0, 1] on that device."""
        cfg, dev = self.cfg, images.device
        x = images.permute(0, 3, 1, 2).float().div_(255)
        n = x.shape[0]
        box = crop_boxes(n, tuple(cfg.crop_scale))
        flip = torch.where(torch.rand(n) < cfg.hflip, -1.0, 1.0)
        w, h, x0, y0 = box.unbind(1)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = w * flip  # output x in [-1, 1] -> input x of the crop, mirrored when flipped
        theta[:, 0, 2] = 2 * x0 + w - 1
        theta[:, 1, 1] = h
        theta[:, 1, 2] = 2 * y0 + h - 1
        grid = F.affine_grid(theta.to(dev), [n, 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

        def factor(strength: float) -> torch.Tensor:
            return torch.empty(n).uniform_(max(0.0, 1 - strength), 1 + strength).to(dev).view(n, 1, 1, 1)

        if cfg.brightness:
            x = (x * factor(cfg.brightness)).clamp_(0, 1)
        if cfg.contrast:
            m = _gray(x).mean((1, 2, 3), keepdim=True)
            x = ((x - m) * factor(cfg.contrast) + m).clamp_(0, 1)
        if cfg.saturation:
            g = _gray(x)
            x = ((x - g) * factor(cfg.saturation) + g).clamp_(0, 1)
        if cfg.hue:
            hsv = _rgb_to_hsv(x)
            shift = torch.empty(n).uniform_(-cfg.hue, cfg.hue).to(dev).view(n, 1, 1)
            hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
            x = _hsv_to_rgb(hsv).clamp_(0, 1)
        if cfg.grayscale:
            gray = (torch.rand(n) < cfg.grayscale).to(dev).view(n, 1, 1, 1)
            x = torch.where(gray, _gray(x).expand_as(x), x)
        return x.contiguous()
