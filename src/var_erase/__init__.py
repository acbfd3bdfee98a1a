"""var-erase: concept erasure (S-VARE) for visual autoregressive text-to-image models."""

from .schedules import INFINITY_TEMPLATES, PIXEL_BUDGETS, ScaleSchedule

__version__ = "0.1.0"

__all__ = ["INFINITY_TEMPLATES", "PIXEL_BUDGETS", "ScaleSchedule", "__version__"]
