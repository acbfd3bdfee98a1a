"""var-erase: concept erasure (S-VARE) for visual autoregressive text-to-image models."""

from pathlib import Path

from .schedules import INFINITY_TEMPLATES, PIXEL_BUDGETS, ScaleSchedule

__version__ = "0.1.0"

DEFAULT_MODEL: str = str(Path(__file__).parent / "toy" / "weights" / "var-toy")
"""The embedded toy text-to-image VAR pipeline (a local folder ``VARPipeline.from_pretrained`` loads offline)."""

_LAZY = {  # heavy imports (diffusers, transformers) only when used
    "VARPipeline": "var_erase.pipelines.pipeline_var",
    "VARTransformer2DModel": "var_erase.models.transformer_var",
    "BSQAutoencoder": "var_erase.models.autoencoder_bsq",
    "ErasureConfig": "var_erase.erasure.config",
    "erase": "var_erase.erasure.erase",
    "ErasureResult": "var_erase.erasure.erase",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'var_erase' has no attribute {name!r}")


__all__ = ["DEFAULT_MODEL", "INFINITY_TEMPLATES", "PIXEL_BUDGETS", "ScaleSchedule", "__version__", *_LAZY]
