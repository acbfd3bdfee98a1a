"""CLIP score (text-image alignment) through transformers, from CLIP weights already on this machine.

Per image ``i`` with prompt ``c_i``: ``CLIPScore = 100 * max(cos(E_I(i), E_T(c_i)), 0)``, the image and text embeddings
being CLIP's projected features (Hessel et al. 2021 with ``w = 100``, as ``torchmetrics.multimodal.CLIPScore`` computes
it); a set's score is the mean. MACE (``metrics/evaluate_clip_score.py``) reports ``logits_per_image``, i.e.
``logit_scale.exp() * cos`` without the clamp: the same number for OpenAI CLIP (``logit_scale.exp() == 100``) whenever
the cosine is positive, which it is for any caption of a natural image. The field uses ViT-B/32 (MACE) or ViT-L/14
(AdaVD); results record which.

Weights are never downloaded here: :meth:`CLIPScorer.from_pretrained` takes a local folder (``save_pretrained`` of a
``CLIPModel`` and its ``CLIPProcessor``) or a Hub repo id already in the Hugging Face cache, and names what is missing
otherwise. Weights must be safetensors (project convention).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .image_io import ImagesLike, count_images, iter_image_batches

CLIP_SCORE_WEIGHT = 100.0
_REQUIRED_FILES = {
    "config.json": ("config.json",),
    "safetensors weights": ("model.safetensors", "model.safetensors.index.json"),
    "tokenizer": ("tokenizer.json", "vocab.json"),
    "image processor config": ("preprocessor_config.json", "processor_config.json"),
}


def clip_score_from_embeddings(image_embeds_ND: torch.Tensor, text_embeds_ND: torch.Tensor) -> torch.Tensor:
    """``100 * max(cos, 0)`` per row of paired image / text embeddings ``(N, D)`` (normalised here): ``(N,)``."""
    if image_embeds_ND.shape != text_embeds_ND.shape or image_embeds_ND.ndim != 2:
        raise ValueError(f"expected paired (N, D) embeddings, got {tuple(image_embeds_ND.shape)} and "
                         f"{tuple(text_embeds_ND.shape)}")
    cos_N = torch.nn.functional.cosine_similarity(image_embeds_ND.float(), text_embeds_ND.float(), dim=-1)
    return CLIP_SCORE_WEIGHT * cos_N.clamp_min(0)


def missing_clip_files(folder: str | os.PathLike) -> list[str]:
    """What a local CLIP folder lacks for :meth:`CLIPScorer.from_pretrained` (empty when complete)."""
    folder = Path(folder)
    missing = [f"{what} ({' or '.join(names)})" for what, names in _REQUIRED_FILES.items()
               if not any((folder / name).is_file() for name in names)]
    if (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file() \
            and not (folder / "merges.txt").is_file():
        missing.append("tokenizer merges (merges.txt, next to vocab.json)")
    return missing


class CLIPScorer:
    """CLIP score of images against their prompts (module docstring for the formula).

    Example::

        scorer = CLIPScorer.from_pretrained("/models/clip-vit-base-patch32")
        result = scorer(images, prompts)  # {"clip_score", "clip_score_std", "per_image", "settings", ...}
    """

    def __init__(self, model, tokenizer, image_processor, device: str | torch.device = "cpu", batch_size: int = 32,
                 source: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.source = source

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, batch_size: int = 32) -> CLIPScorer:
        """Load ``CLIPModel`` + tokenizer + image processor from a local folder or the Hub cache (never downloads)."""
        from transformers import CLIPModel, CLIPTokenizer
        from transformers.models.clip import CLIPImageProcessorPil

        folder = resolve_local_clip(path_or_repo_id)
        model = CLIPModel.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        image_processor = CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, image_processor, device, batch_size, source=str(path_or_repo_id))

    @property
    def settings(self) -> dict:
        return {"clip_model": self.source, "formula": "100 * max(cos(image, text), 0)",
                "projection_dim": int(self.model.config.projection_dim),
                "transformers_version": importlib.metadata.version("transformers")}

    @torch.no_grad()
    def embed_images(self, images: ImagesLike, progress: bool = False) -> torch.Tensor:
        """Projected image features ``(N, D)`` float32 on the CPU."""
        bar = tqdm(total=count_images(images), desc="CLIP images", disable=not progress)
        chunks = []
        for batch in iter_image_batches(images, self.batch_size):
            pixel_values = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            features = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.model.dtype))
            chunks.append(_features(features).float().cpu())
            bar.update(len(batch))
        bar.close()
        return torch.cat(chunks)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text features ``(N, D)`` float32 on the CPU (texts truncated to CLIP's context length)."""
        max_length = self.model.config.text_config.max_position_embeddings
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start: start + self.batch_size]), padding=True, truncation=True,
                                    max_length=max_length, return_tensors="pt").to(self.device)
            features = self.model.get_text_features(input_ids=tokens["input_ids"],
                                                    attention_mask=tokens["attention_mask"])
            chunks.append(_features(features).float().cpu())
        return torch.cat(chunks)

    def scores(self, images: ImagesLike, prompts: str | Sequence[str], progress: bool = True) -> torch.Tensor:
        """Per-image CLIP scores ``(N,)``; ``prompts`` is one text per image, or one text for all of them."""
        n_images = count_images(images)
        prompts = [prompts] * n_images if isinstance(prompts, str) else list(prompts)
        if len(prompts) != n_images:
            raise ValueError(f"{n_images} images but {len(prompts)} prompts; pass one prompt per image (in the "
                             f"images' order) or a single prompt for all")
        return clip_score_from_embeddings(self.embed_images(images, progress), self.embed_texts(prompts))

    def __call__(self, images: ImagesLike, prompts: str | Sequence[str], progress: bool = True) -> dict:
        """Mean and standard deviation of the per-image scores, the scores themselves, and the settings."""
        per_image = self.scores(images, prompts, progress)
        return {"clip_score": float(per_image.mean()), "clip_score_std": float(np.std(per_image.numpy())),
                "n_images": len(per_image), "per_image": per_image.tolist(), "settings": self.settings}


def resolve_local_clip(path_or_repo_id: str | os.PathLike) -> Path:
    """A complete local CLIP folder: ``path_or_repo_id`` itself, or its snapshot in the Hugging Face cache."""
    path = Path(path_or_repo_id)
    if not path.is_dir():
        path = _cached_snapshot(str(path_or_repo_id))
    missing = missing_clip_files(path)
    if missing:
        raise FileNotFoundError(
            f"CLIP folder {path} is missing: {'; '.join(missing)}. On a machine with Hub access run "
            f"CLIPModel.from_pretrained(repo).save_pretrained(dir) and CLIPProcessor.from_pretrained(repo)"
            f".save_pretrained(dir) (e.g. repo='openai/clip-vit-base-patch32'), then copy dir here"
        )
    return path


def _cached_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as err:
        raise FileNotFoundError(
            f"no CLIP weights at {repo_id!r}: it is not a local folder, nor a repo id in the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE', 'HF_HUB_CACHE unset')}). CLIP weights cannot be downloaded here; pass "
            f"the folder of a saved CLIPModel + CLIPProcessor"
        ) from err


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` is it (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
