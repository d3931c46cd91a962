"""Caffe-style image preprocessing: warp-resize, crop, mirror, mean subtraction.

Images are uint8 ``HxWx3`` RGB arrays; network inputs are float32 ``3xSxS`` tensors on the
0-255 scale with the mean subtracted (no std division, as in Caffe). The mean is Caffe's mean
pixel (three floats, RGB) or, with ``model.mean_image``, Caffe's mean image (``Mean``: a float
``3xSxS`` RGB tensor, see ``load_mean_image``), cropped where Caffe crops it. Randomness
comes from an explicit ``numpy.random.Generator`` so that every sample is reproducible from its
seed, whatever the worker that decodes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from cnnft.errors import ConfigError

#: A mean pixel (three floats, RGB) or a mean image (float ``3xSxS`` RGB tensor).
Mean = tuple[float, ...] | torch.Tensor

#: Caffe's ILSVRC-2012 mean pixel in RGB order (Caffe stores it as BGR 104.0, 116.7, 122.7).
IMAGENET_MEAN_RGB = (122.68, 116.67, 104.01)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``HxWx3`` uint8 array -> ``3xHxW`` uint8 tensor (no copy of the pixel values' meaning)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def subtract_mean(image: torch.Tensor, mean: Mean) -> torch.Tensor:
    """uint8/float ``3xHxW`` -> float32 minus the per-channel ``mean`` or a ``3xHxW`` mean image."""
    if isinstance(mean, torch.Tensor):
        if mean.shape != image.shape:
            raise ValueError(f"mean image {tuple(mean.shape)} does not match the image {tuple(image.shape)}")
        return image.float() - mean.to(image.device)
    return image.float() - torch.tensor(mean, dtype=torch.float32, device=image.device).view(3, 1, 1)


def as_mean(mean: Mean | Sequence[float]) -> Mean:
    """A mean image stays a tensor; a mean pixel becomes a tuple of floats."""
    return mean if isinstance(mean, torch.Tensor) else tuple(float(v) for v in mean)


def center_mean(mean: Mean, size: int) -> Mean:
    """The centre ``size x size`` of a mean image (R-CNN and Caffe's WindowDataLayer crop the
    256x256 mean to 227 this way); a mean pixel is returned as is."""
    if not isinstance(mean, torch.Tensor):
        return mean
    side = mean.shape[-1]
    if side < size or mean.shape[-2] < size:
        raise ConfigError(f"model.mean_image is {mean.shape[-2]}x{side}; this view needs at least "
                          f"{size}x{size}")
    top, left = (mean.shape[-2] - size) // 2, (side - size) // 2
    return mean[:, top:top + size, left:left + size]


def mean_key(mean: Mean) -> Any:
    """A JSON value naming ``mean`` for cache keys: the floats, or a digest of the mean image."""
    if isinstance(mean, torch.Tensor):
        data = mean.detach().cpu().contiguous().numpy().tobytes()
        return {"mean_image": hashlib.sha256(data).hexdigest()[:16], "shape": list(mean.shape)}
    return mean


def load_mean_image(path: str | Path) -> torch.Tensor:
    """Caffe's mean image as a float32 ``3xSxS`` RGB tensor, from a ``.npy`` file holding it as
    Caffe stores it: ``3xHxW`` BGR on the 0-255 scale (``ilsvrc_2012_mean.npy``, as converted from
    ``imagenet_mean.binaryproto``; a leading batch axis of 1 is accepted)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.mean_image={path} does not exist; expected a .npy file with "
                          "Caffe's 3xHxW BGR mean image")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"model.mean_image={path} is not a readable .npy file: {e}") from e
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[0] != 3 or not np.issubdtype(array.dtype, np.number):
        raise ConfigError(f"model.mean_image={path} holds a {array.dtype} array of shape "
                          f"{array.shape}; expected Caffe's mean image, 3xHxW BGR (e.g. 3x256x256)")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise ConfigError(f"model.mean_image={path}: values outside 0-255 (or not finite); "
                          "expected Caffe's mean image on the 0-255 pixel scale")
    return torch.from_numpy(np.ascontiguousarray(array[::-1], dtype=np.float32))  # BGR -> RGB


def resolve_mean(mean: Sequence[float], mean_image: str | Path | None = None) -> Mean:
    """The mean a run subtracts: ``model.mean_image`` if set, else the mean pixel ``model.mean``."""
    return load_mean_image(mean_image) if mean_image else as_mean(mean)


def window_source(image: torch.Tensor, mean: Mean, crop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``cnnft.data.windows.warp_boxes`` takes for windows of ``image`` (uint8 ``3xHxW``):
    with a mean pixel, the mean-subtracted image and no mean image; with a mean image, the image
    as float and the centre ``crop`` of the mean, subtracted inside each warped window (as
    R-CNN's ``rcnn_im_crop`` and Caffe's WindowDataLayer do)."""
    if isinstance(mean, torch.Tensor):
        return image.float(), center_mean(mean, crop)
    return subtract_mean(image, mean), None


def caffe_train_view(image: np.ndarray, rng: np.random.Generator, *, resize: int, crop: int,
                     mean: Mean, mirror: bool = True) -> torch.Tensor:
    """Warp to ``resize x resize`` (aspect ignored), random ``crop`` square, random mirror. A mean
    image is cropped at the image's offset and subtracted before the mirror (Caffe's
    DataTransformer)."""
    x = TF.resize(to_tensor(image), [resize, resize], antialias=True)
    top, left = (int(v) for v in rng.integers(0, resize - crop + 1, size=2))
    mean = center_mean(mean, resize)
    if isinstance(mean, torch.Tensor):
        mean = mean[:, top:top + crop, left:left + crop]
    x = subtract_mean(x[:, top:top + crop, left:left + crop], mean)
    if mirror and rng.random() < 0.5:
        x = TF.horizontal_flip(x)
    return x


def caffe_test_view(image: np.ndarray, *, resize: int, crop: int, mean: Mean) -> torch.Tensor:
    """Warp to ``resize x resize`` and take the centre ``crop`` (Caffe's test phase; a mean image
    is centre-cropped alike)."""
    x = TF.resize(to_tensor(image), [resize, resize], antialias=True)
    off = (resize - crop) // 2
    return subtract_mean(x[:, off:off + crop, off:off + crop], center_mean(mean, crop))
