"""The before/after web demo: the base model and erasure adapters side by side, for the same prompt and seed.

What ``examples/app.py`` serves (``python examples/app.py --lora FOLDER_OR_REPO_ID``; docs/app.md): adapters are
loaded once (:func:`load_adapters`); the page (:func:`build_demo`, Gradio, the ``demo`` extra) calls an
:class:`ErasureDemo`, which checks the inputs, draws the base model's image (``pipe.disable_lora()``) and the adapter's
(:func:`generate_pair`) from the same ``torch.Generator`` seed, and turns failures into messages; the card summary
(:func:`adapter_summary`) reads the adapter's var-erase metadata (:mod:`var_erase.hub`) or ``eval.json`` beside it.
Gradio is imported only by :func:`build_demo` and :func:`page_theme`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .hub import (
    METHOD_DESCRIPTIONS,
    METRIC_DESCRIPTIONS,
    AdapterMetadata,
    AdapterMismatchWarning,
    check_adapter_compatibility,
    format_value,
    is_number,
    looks_like_repo_id,
    read_adapter_metadata,
)
from .pipelines.pipeline_var import VARPipeline

logger = logging.getLogger(__name__)

MAX_SEED = 2**31 - 1
MAX_PROMPT_CHARS = 500
DEFAULT_PROMPT = "a red striped circle"


# ---------------------------------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedAdapter:
    """An adapter loaded into the pipeline under ``name`` (what ``set_adapters`` takes)."""

    name: str
    source: str
    metadata: AdapterMetadata | None
    eval_results: dict[str, Any] | None
    compatibility_warning: str | None = None

    @property
    def label(self) -> str:
        """What the dropdown shows: ``red · svare · erase-red``."""
        short = self.source.rstrip("/\\").replace("\\", "/").split("/")[-1] or self.source
        if self.metadata is None:
            return f"{short} (no var-erase metadata)"
        return f"{', '.join(self.metadata.concepts)} · {self.metadata.method} · {short}"


def load_adapters(pipe: VARPipeline, sources: list[str]) -> tuple[list[LoadedAdapter], list[str]]:
    """Load each adapter (folder, ``.safetensors`` file or Hub repo id) into ``pipe`` as ``adapter_0``, ``adapter_1``...

    Returns the loaded adapters and, for those that failed, one readable message each (no traceback: that goes to the
    log). Adapters whose metadata names another base model load, with a warning kept for the card summary.
    """
    loaded, errors = [], []
    taken = set(getattr(pipe.transformer, "peft_config", None) or {})
    for source in sources:
        name = next(f"adapter_{i}" for i in range(len(taken) + 1) if f"adapter_{i}" not in taken)
        try:
            metadata = read_adapter_metadata(source)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", AdapterMismatchWarning)
                compatible = check_adapter_compatibility(metadata, pipe.transformer, adapter=source)
            with warnings.catch_warnings():  # PEFT warns on every adapter after the first; several is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipe.load_lora_weights(source, adapter_name=name)
        except Exception as err:  # noqa: BLE001 - any failure becomes a message in the page
            if name in (getattr(pipe.transformer, "peft_config", None) or {}):  # half-loaded: remove what was added
                pipe.delete_adapters(name)
            errors.append(f"Could not load adapter `{source}`: {short_error(err)}. Pass a folder holding "
                          "`pytorch_lora_weights.safetensors`, the file itself, or a Hub repo id (`org/name`; "
                          "offline, it must already be in the Hugging Face cache).")
            logger.error(errors[-1])
            logger.debug("traceback of the failed load of %s", source, exc_info=True)
            continue
        mismatch = None if compatible else next(
            (str(w.message) for w in caught if issubclass(w.category, AdapterMismatchWarning)), "another base model")
        eval_results = (metadata.eval_results if metadata else None) or _eval_json_beside(source)
        loaded.append(LoadedAdapter(name, source, metadata, eval_results, mismatch))
        taken.add(name)
    return loaded, errors


def _eval_json_beside(source: str) -> dict[str, Any] | None:
    """``eval.json`` in a local adapter folder (``examples/demo.py`` writes it there), or None."""
    if not os.path.exists(source):  # a Hub repo id: its card metadata is what counts
        return None
    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    path = folder / "eval.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        logger.warning("ignoring unreadable %s", path)
        return None
    return results if isinstance(results, dict) else None


def short_error(err: BaseException) -> str:
    """The first line of an error, capped: Hub errors append request ids and URLs on further lines."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0].rstrip(".") if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ---------------------------------------------------------------------------------------------------------------------
# Card summary
# ---------------------------------------------------------------------------------------------------------------------
def adapter_summary(adapter: LoadedAdapter | None) -> str:
    """Markdown summary of an adapter's card: concepts, method, base model, LoRA shape, training, evaluation."""
    if adapter is None:
        return "*No adapter loaded.* Start the app with `--lora PATH_OR_REPO_ID` (repeatable)."
    lines = [f"### Adapter: {_source_link(adapter.source)}"]
    metadata = adapter.metadata
    if metadata is None:
        lines.append("This LoRA carries no var-erase metadata (it was not written by var-erase), so its concepts, "
                     "method and evaluation are unknown.")
    else:
        method = METHOD_DESCRIPTIONS.get(metadata.method)
        lines += [
            f"- **Erased concepts:** {', '.join(metadata.concepts)}",
            f"- **Method:** `{metadata.method}`" + (f" — {method}" if method else ""),
            f"- **Base model:** `{metadata.base_model}`",
        ]
        if metadata.lora_rank is not None:
            targets = ", ".join(metadata.lora_target_modules) or "?"
            alpha = format_value(metadata.lora_alpha)
            lines.append(f"- **LoRA:** rank {metadata.lora_rank}, alpha {alpha}, on {targets}")
        hp = metadata.hyperparameters
        training = [f"{label} {format_value(hp[key])}" for key, label in
                    (("max_train_steps", "steps"), ("learning_rate", "learning rate"), ("num_pairs", "prompt pairs"))
                    if hp.get(key) is not None]
        if training:
            lines.append(f"- **Training:** {', '.join(training)}")
    if adapter.compatibility_warning:
        lines.append(f"\n**Warning:** {adapter.compatibility_warning}")
    lines.append("")
    lines += _eval_lines(adapter.eval_results)
    return "\n".join(lines)


def _eval_lines(results: dict[str, Any] | None) -> list[str]:
    if not results:
        return ["*No evaluation results in the card.* `examples/evaluate.py` measures them."]
    rows = []
    for key in ("acc_e", "acc_i"):
        if is_number(results.get(key)):
            before = results.get(f"{key}_before")
            value = format_value(results[key])
            value = f"{format_value(before)} → {value}" if is_number(before) else value
            rows.append(f"| `{key}` | {value} | {METRIC_DESCRIPTIONS[key]} |")
    rows += [f"| `{key}` | {format_value(value)} | |" for key, value in results.items()
             if is_number(value) and key not in ("acc_e", "acc_i", "acc_e_before", "acc_i_before", "n_images",
                                                  "seconds", "seed")]
    if not rows:
        return ["*The card's evaluation has no numeric results.*"]
    header = "**Evaluation**" + (f" ({results['n_images']} images)" if is_number(results.get("n_images")) else "")
    return [header, "", "| metric | base → adapter | meaning |", "| --- | --- | --- |", *rows]


def _source_link(source: str) -> str:
    return f"[`{source}`](https://huggingface.co/{source})" if looks_like_repo_id(source) else f"`{source}`"






# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------
def generate_pair(
    pipe: VARPipeline,
    adapter_name: str,
    prompt: str,
    seed: int,
    guidance_scale: float = 4.0,
    adapter_weight: float = 1.0,
    base_image: Image.Image | None = None,
) -> tuple[Image.Image, Image.Image]:
    """The base model's image and the adapter's image (at ``adapter_weight``) for one prompt and seed.

    Both come from ``torch.Generator().manual_seed(seed)``. Pass ``base_image`` (the base model's image for the same
    prompt, seed and guidance) to skip generating it again. The adapter stays the active one afterwards.
    """
    kwargs = dict(guidance_scale=guidance_scale, num_images_per_prompt=1)
    pipe.set_adapters([adapter_name], adapter_weights=[adapter_weight])
    if base_image is None:
        pipe.disable_lora()
        try:
            base_image = pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
        finally:
            pipe.enable_lora()
    erased_image = pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
    return base_image, erased_image


class ErasureDemo:
    """What the page calls: checks the inputs, serialises access to the pipeline, keeps recent base images, and turns
    every failure into a message instead of a traceback."""

    def __init__(self, pipe: VARPipeline, adapters: list[LoadedAdapter], load_errors: list[str] | None = None,
                 base_cache_size: int = 16):
        self.pipe = pipe
        self.adapters = {adapter.name: adapter for adapter in adapters}
        self.load_errors = list(load_errors or [])
        self._lock = threading.Lock()
        self._base_cache: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._base_cache_size = base_cache_size

    def summary(self, adapter_name: str | None) -> str:
        return adapter_summary(self.adapters.get(adapter_name))

    def generate(self, prompt: str, seed: float, guidance_scale: float, adapter_name: str | None,
                 adapter_weight: float) -> tuple[Image.Image | None, Image.Image | None, str]:
        """``(base image, adapter image, status markdown)``; on bad input or failure, images are None and the status
        says what went wrong and what to do."""
        problem = self._check_inputs(prompt, seed, guidance_scale, adapter_name, adapter_weight)
        if problem:
            return None, None, f"**Cannot generate:** {problem}"
        prompt, seed = prompt.strip(), int(seed)
        key = (prompt, seed, float(guidance_scale))
        try:
            with self._lock:
                base = self._base_cache.get(key)
                base, erased = generate_pair(self.pipe, adapter_name, prompt, seed, guidance_scale, adapter_weight,
                                             base_image=base)
                self._remember(key, base)
        except Exception as err:  # noqa: BLE001 - shown in the page, traceback in the log
            logger.exception("generation failed for prompt %r, seed %d, adapter %s", prompt, seed, adapter_name)
            return None, None, f"**Generation failed:** {short_error(err)}"
        adapter = self.adapters[adapter_name]
        return base, erased, (f"Seed {seed}, guidance {guidance_scale:g}: left without the adapter, right with "
                              f"**{adapter.label}** at weight {adapter_weight:g}.")

    def _check_inputs(self, prompt, seed, guidance_scale, adapter_name, adapter_weight) -> str | None:
        if not self.adapters:
            return "no adapter is loaded. Start the app with `--lora PATH_OR_REPO_ID`."
        if adapter_name not in self.adapters:
            return f"unknown adapter {adapter_name!r}; pick one of the list."
        if not isinstance(prompt, str) or not prompt.strip():
            return "enter a prompt."
        if len(prompt) > MAX_PROMPT_CHARS:
            return f"the prompt has {len(prompt)} characters; keep it under {MAX_PROMPT_CHARS}."
        if seed is None or not float(seed).is_integer() or not 0 <= seed <= MAX_SEED:
            return f"the seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}."
        if guidance_scale is None or not guidance_scale >= 1:
            return f"guidance must be at least 1 (1 turns it off), got {guidance_scale!r}."
        if adapter_weight is None:
            return "set the adapter weight."
        return None

    def _remember(self, key: tuple, image: Image.Image) -> None:
        self._base_cache[key] = image
        self._base_cache.move_to_end(key)
        while len(self._base_cache) > self._base_cache_size:
            self._base_cache.popitem(last=False)


# ---------------------------------------------------------------------------------------------------------------------
# Page
# ---------------------------------------------------------------------------------------------------------------------
CSS = """
#base-image img, #erased-image img { width: 100%; height: 100%; object-fit: contain; }
.pixelated img { image-rendering: pixelated; }
#load-errors { border-left: 4px solid #d97706; padding-left: 0.75em; }
"""


def page_theme():
    """Gradio's default theme with the system's fonts: nothing to download, and every glyph present."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


def build_demo(demo: ErasureDemo, default_prompt: str = DEFAULT_PROMPT, title: str = "VAR concept erasure"):
    """The Gradio page (``gr.Blocks``); ``.launch(css=CSS, theme=page_theme())`` serves it."""
    import gradio as gr

    choices = [(adapter.label, adapter.name) for adapter in demo.adapters.values()]
    first = choices[0][1] if choices else None
    size = demo.pipe.transformer.config.sample_size
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"# {title}: before / after\nThe same prompt and seed, without (left) and with (right) an "
                    "erasure adapter. Ask for the erased concept and compare.")
        gr.Markdown("\n\n".join(demo.load_errors), visible=bool(demo.load_errors), elem_id="load-errors")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                prompt = gr.Textbox(label="Prompt", value=default_prompt, lines=2, max_lines=4,
                                    max_length=MAX_PROMPT_CHARS, elem_id="prompt")
                adapter = gr.Dropdown(choices=choices, value=first, label="Adapter", interactive=bool(choices),
                                      elem_id="adapter")
                weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Adapter weight",
                                   info="0 = base model, 1 = as trained", elem_id="weight")
                with gr.Row():
                    seed = gr.Number(value=0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED,
                                     elem_id="seed")
                    guidance = gr.Slider(1.0, 10.0, value=4.0, step=0.5, label="Guidance", elem_id="guidance")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                with gr.Row():
                    image_kwargs = dict(type="pil", format="png", interactive=False, height=384,
                                        buttons=["download", "fullscreen"],
                                        elem_classes=["pixelated"] if size < 256 else None)
                    base_image = gr.Image(label="Base model", elem_id="base-image", **image_kwargs)
                    erased_image = gr.Image(label="With the adapter", elem_id="erased-image", **image_kwargs)
                status = gr.Markdown(elem_id="status")
        summary = gr.Markdown(demo.summary(first), elem_id="adapter-summary")

        inputs = [prompt, seed, guidance, adapter, weight]
        outputs = [base_image, erased_image, status]
        button.click(demo.generate, inputs, outputs, api_name="generate")
        prompt.submit(demo.generate, inputs, outputs, api_name=False)
        adapter.change(demo.summary, adapter, summary, api_name=False)
    return page


__all__ = ["CSS", "DEFAULT_PROMPT", "MAX_PROMPT_CHARS", "MAX_SEED", "ErasureDemo", "LoadedAdapter", "adapter_summary",
           "build_demo", "generate_pair", "load_adapters", "page_theme", "short_error"]
