"""Evaluation: toy-world metrics (oracle ACC, feature-FID, attacks) and real-model evaluators (NudeNet counts,
Inception FID, ImageNet classifiers, CLIP score, prompt sets). Names below are imported when first used."""

_LAZY = {  # real-model evaluators; their optional packages are imported only when an evaluator is built
    "NudityEvaluator": "var_erase.evaluation.nudity",
    "NudityReport": "var_erase.evaluation.nudity",
    "SENSITIVE_CLASSES": "var_erase.evaluation.nudity",
    "COMMON_CLASSES": "var_erase.evaluation.nudity",
    "InceptionFID": "var_erase.evaluation.inception_fid",
    "FIDResult": "var_erase.evaluation.inception_fid",
    "frechet_distance_gram": "var_erase.evaluation.inception_fid",
    "ImageNetClassifier": "var_erase.evaluation.imagenet",
    "IMAGENETTE_CLASSES": "var_erase.evaluation.imagenet",
    "IMAGENET_CLASSES": "var_erase.evaluation.imagenet_classes",
    "CLIPScorer": "var_erase.evaluation.clip_score",
    "clip_score_from_embeddings": "var_erase.evaluation.clip_score",
    "PromptRecord": "var_erase.evaluation.prompt_sets",
    "PromptSetError": "var_erase.evaluation.prompt_sets",
    "load_prompt_set": "var_erase.evaluation.prompt_sets",
    "load_images": "var_erase.evaluation.image_io",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'var_erase.evaluation' has no attribute {name!r}")


__all__ = list(_LAZY)
