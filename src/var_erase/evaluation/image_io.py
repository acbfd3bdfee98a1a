"""Images in, for the real-model evaluators: whatever a VAR pipeline or a folder gives, as uint8 RGB arrays.

Accepted everywhere an evaluator takes ``images``:

- a folder (``str`` / ``PathLike``) of ``.png .jpg .jpeg .webp .bmp .tif .tiff`` files, read in natural order of file
  names (``2.png`` before ``10.png``), not recursively;
- a list of PIL images (any mode; converted to RGB, as ``Image.convert("RGB")`` does);
- a list of arrays or tensors, each ``(H, W, 3)`` or ``(3, H, W)``;
- one batch array or tensor, ``(N, H, W, 3)`` or ``(N, 3, H, W)``.

Arrays and tensors are uint8 (0..255) or float in ``[0, 1]`` (what ``VARPipeline(output_type="pt" | "np")`` returns);
floats are mapped to uint8 with ``round(x * 255)``, as ``VaeImageProcessor.numpy_to_pil`` does. Anything else raises a
``ValueError`` that says what to pass instead. Evaluators go through :func:`iter_image_batches`, which reads a folder's
files one batch at a time, so tens of thousands of 1024 px images never sit in memory together.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

ImagesLike = str | os.PathLike | Sequence | np.ndarray | torch.Tensor


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, in natural order of their names; a clear error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; pass a folder of images, or the images themselves")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}, not in sub-folders)")
    return sorted(files, key=_natural_key)


def load_images(images: ImagesLike) -> list[np.ndarray]:
    """Every image as a uint8 ``(H, W, 3)`` RGB array (module docstring for the accepted inputs)."""
    return [to_uint8_rgb(item, index) for index, item in enumerate(_sources(images))]


def count_images(images: ImagesLike) -> int:
    """How many images ``images`` holds, without reading any file."""
    return len(_sources(images))


def iter_image_batches(images: ImagesLike, batch_size: int) -> Iterator[list[np.ndarray]]:
    """Batches of uint8 ``(H, W, 3)`` RGB arrays, in order; a folder's files are read only when their batch comes, so
    memory holds one batch, not the whole set."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sources = _sources(images)
    for start in range(0, len(sources), batch_size):
        yield [to_uint8_rgb(item, start + i) for i, item in enumerate(sources[start: start + batch_size])]


def _sources(images: ImagesLike) -> Sequence:
    """A folder's file paths, or the images themselves, checked to be a non-empty sequence of images."""
    if isinstance(images, str | os.PathLike):
        return list_image_files(images)
    if isinstance(images, np.ndarray | torch.Tensor) and images.ndim != 4:
        raise ValueError(f"a batch of images must be (N, H, W, 3) or (N, 3, H, W), got shape {tuple(images.shape)}; "
                         f"wrap a single image in a list")
    if isinstance(images, PIL.Image.Image) or not isinstance(images, Sequence | np.ndarray | torch.Tensor):
        raise ValueError(f"pass a folder, a list of images or a batch array/tensor, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("no images given (an empty list)")
    return images


def to_uint8_rgb(image, index: int = 0) -> np.ndarray:
    """One image (PIL, array or tensor; ``(H, W, 3)`` or ``(3, H, W)``) as a uint8 ``(H, W, 3)`` RGB array."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, str | os.PathLike):
        return _read_file(Path(image))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image {index}: expected a PIL image, an array or a tensor, got {type(image).__name__}")
    return _array_to_uint8_hw3(image, index)


def _array_to_uint8_hw3(array_HW3: np.ndarray, index: int) -> np.ndarray:
    if array_HW3.ndim == 3 and array_HW3.shape[0] == 3 and array_HW3.shape[-1] != 3:
        array_HW3 = array_HW3.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if array_HW3.ndim != 3 or array_HW3.shape[-1] != 3:
        raise ValueError(f"image {index}: expected an RGB image (H, W, 3) or (3, H, W), got shape "
                         f"{tuple(array_HW3.shape)}; convert grey or RGBA images with PIL's .convert('RGB')")
    if array_HW3.dtype == np.uint8:
        return np.ascontiguousarray(array_HW3)
    if not np.issubdtype(array_HW3.dtype, np.floating):
        raise ValueError(f"image {index}: dtype {array_HW3.dtype} not understood; pass uint8 (0..255) or float [0, 1]")
    low, high = float(np.min(array_HW3)), float(np.max(array_HW3))
    if not np.isfinite([low, high]).all() or low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"image {index}: float values span [{low:.3g}, {high:.3g}]; float images must be in [0, 1] "
                         f"(VARPipeline output_type='pt' or 'np'); for [-1, 1] pass (x + 1) / 2")
    return np.round(np.clip(array_HW3, 0, 1) * 255).astype(np.uint8)


def _read_file(path: Path) -> np.ndarray:
    try:
        with PIL.Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]
