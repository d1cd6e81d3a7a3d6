"""Random crop with zero padding and horizontal flip: batched for the in-memory path, per sample
for the DataLoader path. Both draw the same distributions (offsets uniform in 0..2*padding,
flips with probability 1/2), so the two paths train alike.

Both work on uint8 images, before normalisation: padding is black, as in torchvision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Crop each image of the N, C, H, W batch `x` at its own random offset after zero-padding
    by `padding`, and mirror about half of them; all on x's device, in a few kernel calls."""
    n, _, h, w = x.shape
    span = 2 * padding + 1
    dy = torch.randint(span, (n,), generator=generator, device=x.device)
    dx = torch.randint(span, (n,), generator=generator, device=x.device)
    flip = torch.rand(n, generator=generator, device=x.device) < 0.5
    # every H x W window of the padded images, as a view: N, C, span, span, H, W
    windows = F.pad(x, (padding,) * 4).unfold(2, h, 1).unfold(3, w, 1)
    crops = windows[torch.arange(n, device=x.device), :, dy, dx]
    return torch.where(flip.view(n, 1, 1, 1), crops.flip(3), crops)


def per_sample_crop_flip(size: tuple[int, int], padding: int):
    """The same augmentation for one C, H, W image, from torchvision's transforms: what a
    DataLoader's workers apply sample by sample."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip()])
