"""Caffe-style image preprocessing: warp-resize, crop, mirror, mean subtraction.

Images are uint8 ``HxWx3`` RGB arrays; network inputs are float32 ``3xSxS`` tensors on the
0-255 scale with the per-channel mean subtracted (no std division, as in Caffe). Randomness
comes from an explicit ``numpy.random.Generator`` so that every sample is reproducible from its
seed, whatever the worker that decodes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

#: Caffe's ILSVRC-2012 mean pixel in RGB order (Caffe stores it as BGR 104.0, 116.7, 122.7).
IMAGENET_MEAN_RGB = (122.68, 116.67, 104.01)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``HxWx3`` uint8 array -> ``3xHxW`` uint8 tensor (no copy of the pixel values' meaning)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def subtract_mean(image: torch.Tensor, mean: Sequence[float]) -> torch.Tensor:
    """uint8/float ``3xHxW`` -> float32 with the per-channel ``mean`` subtracted."""
    return image.float() - torch.tensor(mean, dtype=torch.float32, device=image.device).view(3, 1, 1)


def caffe_train_view(image: np.ndarray, rng: np.random.Generator, *, resize: int, crop: int,
                     mean: Sequence[float], mirror: bool = True) -> torch.Tensor:
    """Warp to ``resize x resize`` (aspect ignored), random ``crop`` square, random mirror."""
    x = TF.resize(to_tensor(image), [resize, resize], antialias=True)
    top, left = (int(v) for v in rng.integers(0, resize - crop + 1, size=2))
    x = x[:, top:top + crop, left:left + crop]
    if mirror and rng.random() < 0.5:
        x = TF.horizontal_flip(x)
    return subtract_mean(x, mean)


def caffe_test_view(image: np.ndarray, *, resize: int, crop: int,
                    mean: Sequence[float]) -> torch.Tensor:
    """Warp to ``resize x resize`` and take the centre ``crop`` (Caffe's test phase)."""
    x = TF.resize(to_tensor(image), [resize, resize], antialias=True)
    off = (resize - crop) // 2
    return subtract_mean(x[:, off:off + crop, off:off + crop], mean)
