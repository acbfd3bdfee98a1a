"""var-erase: concept erasure (S-VARE) for visual autoregressive text-to-image models."""

from pathlib import Path

from .schedules import INFINITY_TEMPLATES, PIXEL_BUDGETS, ScaleSchedule

__version__ = "0.1.0"

DEFAULT_MODEL: str = str(Path(__file__).parent / "toy" / "weights" / "var-toy")
"""The embedded toy text-to-image VAR pipeline (a local folder ``VARPipeline.from_pretrained`` loads offline)."""

__all__ = ["DEFAULT_MODEL", "INFINITY_TEMPLATES", "PIXEL_BUDGETS", "ScaleSchedule", "__version__"]
