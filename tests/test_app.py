"""examples/app.py: the before/after demo's functions, then the page itself driven in headless Chromium.

The adapter here is a random LoRA on the embedded default model (cross-attention K/V, random ``lora_B``), made in a
second. What these tests check is the app: the left image is the base model and the right one the adapter at the
chosen weight, for the same prompt and seed, pixel for pixel as the pipeline itself draws them, and they differ. How
well an adapter erases is not the app's business (a trained adapter takes minutes on a CPU; the erasure is measured by
the trainer tests, ``examples/demo.py`` and ``examples/evaluate.py``). Its metadata says ``concepts=["red"]``,
``method="random"``, which is what the page's card summary then shows.

The browser test needs Playwright's Python client (``pip install -e ".[demo]"``) and Debian's Chromium
(``apt-get install -y chromium``, at /usr/bin/chromium; ``playwright install`` is not used: it downloads a browser).
Without them it is skipped, saying which is missing. It writes docs/images/app_screenshot.png.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from var_erase import DEFAULT_MODEL
from var_erase.hub import AdapterMetadata, compute_fingerprint, read_adapter_metadata, write_adapter_metadata
from var_erase.models.transformer_var import VARTransformer2DModel
from var_erase.pipelines.pipeline_var import VARPipeline

ROOT = Path(__file__).resolve().parents[1]
APP_PATH = ROOT / "examples" / "app.py"
SCREENSHOT = ROOT / "docs" / "images" / "app_screenshot.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ERASED_PROMPT = "a red circle"
SEED = 5  # the same seed throughout, so that the reference images are generated once


pytestmark = pytest.mark.slow  # a script / app / benchmark / real-evaluator test: `make test-slow`


def _import_app():
    spec = importlib.util.spec_from_file_location("var_erase_demo_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


app = _import_app()


def _random_adapter(folder: Path, seed: int = 0) -> Path:
    """A LoRA on the default transformer's cross-attention with random, non-zero ``lora_B``, saved as train_svare.py
    saves adapters (weights, diffusers' LoRA config and var-erase metadata in the safetensors header)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = VARTransformer2DModel.from_pretrained(DEFAULT_MODEL, subfolder="transformer")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["attn2.to_k", "attn2.to_v"])
    metadata = AdapterMetadata.from_training(DEFAULT_MODEL, transformer, concepts=["red"], method="random",
                                             hyperparameters={"seed": seed}, lora_config=config)
    transformer.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)  # both factors from it: the same adapter on every run
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_A" in name:  # the scale of PEFT's default (Kaiming-uniform) init of lora_A
                param.copy_(torch.randn(param.shape, generator=generator) / (3 * param.shape[1]) ** 0.5)
            elif "lora_B" in name:  # PEFT starts it at zero (no effect); random makes the adapter change images
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    VARPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                  transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
                                  extra_metadata=metadata.to_safetensors_metadata())
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return _random_adapter(tmp_path_factory.mktemp("adapters") / "random-red")


@pytest.fixture(scope="module")
def loaded(adapter_dir):
    """The default pipeline with the adapter loaded by the app's own function."""
    pipe = app.load_pipeline(DEFAULT_MODEL, "cpu")
    adapters, errors = app.load_adapters(pipe, [str(adapter_dir)])
    assert errors == [] and [a.name for a in adapters] == ["adapter_0"]
    return pipe, adapters[0]


def _generate(pipe, prompt, seed, adapter_name=None, weight=1.0) -> Image.Image:
    """Straight from the pipeline: the base model when ``adapter_name`` is None."""
    if adapter_name is None:
        pipe.disable_lora()
    else:
        pipe.set_adapters([adapter_name], adapter_weights=[weight])
    try:
        return pipe(prompt, guidance_scale=4.0, generator=torch.Generator().manual_seed(seed)).images[0]
    finally:
        pipe.enable_lora()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def reference(loaded):
    """``reference(prompt, seed, adapter_name=None)``: pixels straight from the pipeline (the base model when
    ``adapter_name`` is None), generated once per module."""
    pipe, _ = loaded
    cache = {}

    def pixels(prompt: str, seed: int, adapter_name: str | None = None) -> np.ndarray:
        key = (prompt, seed, adapter_name)
        if key not in cache:
            cache[key] = _pixels(_generate(pipe, prompt, seed, adapter_name))
        return cache[key]

    return pixels


# ---------------------------------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------------------------------
def test_load_adapters_keeps_the_good_ones_and_explains_the_bad_ones(adapter_dir, tmp_path):
    not_lora = tmp_path / "not-lora"
    not_lora.mkdir()
    (not_lora / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    pipe = app.load_pipeline(DEFAULT_MODEL, "cpu")
    sources = [str(tmp_path / "missing"), str(adapter_dir), "var-erase-tests/no-such-adapter", str(not_lora),
               str(adapter_dir / "pytorch_lora_weights.safetensors")]
    adapters, errors = app.load_adapters(pipe, sources)

    assert [(a.name, a.source) for a in adapters] == [("adapter_0", sources[1]), ("adapter_1", sources[4])]
    assert adapters[0].metadata.concepts == ["red"] and adapters[0].compatibility_warning is None
    assert adapters[0].label == "red · random · random-red"
    assert len(errors) == 3
    for source, error in zip([sources[0], sources[2], sources[3]], errors):
        assert f"`{source}`" in error and "Traceback" not in error and "\n" not in error
    assert "FileNotFoundError" in errors[0] and "NotFoundError" in errors[1]
    assert sorted(pipe.transformer.peft_config) == ["adapter_0", "adapter_1"]  # nothing half-loaded stays
    more, _ = app.load_adapters(pipe, [str(adapter_dir)])  # a second call picks a free name
    assert more[0].name == "adapter_2"


def test_an_adapter_for_another_base_model_loads_with_a_warning(adapter_dir, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(adapter_dir, other)
    metadata = read_adapter_metadata(other)
    digest = compute_fingerprint(VARTransformer2DModel.from_pretrained(DEFAULT_MODEL, subfolder="transformer")).digest
    write_adapter_metadata(other, dataclasses.replace(metadata, base_model="org/another-var", base_model_probes=None,
                                                      base_model_fingerprint=digest.split("-")[0] + "-000000000000"))
    pipe = app.load_pipeline(DEFAULT_MODEL, "cpu")
    (adapter,), errors = app.load_adapters(pipe, [str(other)])
    assert errors == [] and "org/another-var" in adapter.compatibility_warning
    assert "**Warning:**" in app.adapter_summary(adapter)


# ---------------------------------------------------------------------------------------------------------------------
# Card summary
# ---------------------------------------------------------------------------------------------------------------------
def test_summary_shows_concepts_method_lora_and_evaluation():
    metadata = AdapterMetadata(base_model="var_erase.DEFAULT_MODEL", concepts=["red", "pink"], method="svare",
                               hyperparameters={"max_train_steps": 200, "learning_rate": 1e-3}, lora_rank=8,
                               lora_alpha=8.0, lora_target_modules=["attn2.to_k", "ff.net.2"])
    results = {"acc_e": 0.12, "acc_i": 0.93, "acc_e_before": 0.94, "acc_i_before": 0.99, "n_images": 128,
               "fid": 31.5, "settings": {"seed": 1}}
    text = app.adapter_summary(app.LoadedAdapter("adapter_0", "org/var-erased-red", metadata, results))

    assert "[`org/var-erased-red`](https://huggingface.co/org/var-erased-red)" in text
    assert "**Erased concepts:** red, pink" in text and "`svare` — S-VARE" in text
    assert "rank 8, alpha 8, on attn2.to_k, ff.net.2" in text and "steps 200, learning rate 0.001" in text
    assert "| `acc_e` | 0.94 → 0.12 |" in text and "| `acc_i` | 0.99 → 0.93 |" in text
    assert "| `fid` | 31.5 |" in text and "(128 images)" in text and "settings" not in text


def test_summary_without_metadata_or_evaluation_says_so(tmp_path):
    plain = app.adapter_summary(app.LoadedAdapter("adapter_0", str(tmp_path), None, None))
    assert "no var-erase metadata" in plain and "No evaluation results" in plain
    assert "--lora" in app.adapter_summary(None)


def test_eval_json_beside_a_local_adapter_fills_in_the_evaluation(adapter_dir, tmp_path):
    folder = tmp_path / "with-eval"
    shutil.copytree(adapter_dir, folder)
    (folder / "eval.json").write_text(json.dumps({"acc_e": 0.25, "acc_e_before": 0.9, "n_images": 64}))
    (adapter,), _ = app.load_adapters(app.load_pipeline(DEFAULT_MODEL, "cpu"), [str(folder)])
    assert adapter.eval_results["acc_e"] == 0.25
    assert "| `acc_e` | 0.9 → 0.25 |" in app.adapter_summary(adapter)


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------
def test_generate_pair_is_the_base_model_and_the_adapter_for_the_same_seed(loaded, reference):
    pipe, adapter = loaded
    base, erased = app.generate_pair(pipe, adapter.name, ERASED_PROMPT, seed=SEED)

    assert np.array_equal(_pixels(base), reference(ERASED_PROMPT, SEED))
    assert np.array_equal(_pixels(erased), reference(ERASED_PROMPT, SEED, adapter.name))
    assert not np.array_equal(_pixels(base), _pixels(erased))
    _, at_zero = app.generate_pair(pipe, adapter.name, ERASED_PROMPT, seed=SEED, adapter_weight=0.0)
    assert np.array_equal(_pixels(at_zero), _pixels(base))  # weight 0 is the base model
    assert pipe.get_active_adapters() == [adapter.name]


def test_demo_reuses_the_base_image_when_only_the_weight_changes(loaded, monkeypatch):
    pipe, adapter = loaded
    demo = app.ErasureDemo(pipe, [adapter])
    calls = []
    original = VARPipeline.__call__
    monkeypatch.setattr(VARPipeline, "__call__", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))

    base, _, status = demo.generate(ERASED_PROMPT, 5, 4.0, adapter.name, 1.0)
    again, half, _ = demo.generate(f"  {ERASED_PROMPT} ", 5.0, 4.0, adapter.name, 0.5)
    assert len(calls) == 3 and again is base and half is not None
    assert "Seed 5" in status and "red · random · random-red" in status and "weight 1" in status


@pytest.mark.parametrize("inputs, message", [
    (("  ", 0, 4.0, "adapter_0", 1.0), "enter a prompt"),
    (("x" * 501, 0, 4.0, "adapter_0", 1.0), "keep it under 500"),
    (("a red circle", -1, 4.0, "adapter_0", 1.0), "the seed must be a whole number"),
    (("a red circle", 1.5, 4.0, "adapter_0", 1.0), "the seed must be a whole number"),
    (("a red circle", None, 4.0, "adapter_0", 1.0), "the seed must be a whole number"),
    (("a red circle", 0, 0.5, "adapter_0", 1.0), "guidance must be at least 1"),
    (("a red circle", 0, 4.0, "adapter_9", 1.0), "unknown adapter"),
])
def test_bad_inputs_give_a_message_not_an_error(loaded, inputs, message):
    pipe, adapter = loaded
    base, erased, status = app.ErasureDemo(pipe, [adapter]).generate(*inputs)
    assert base is None and erased is None
    assert status.startswith("**Cannot generate:**") and message in status


def test_a_failing_generation_is_a_message_and_the_adapter_state_is_restored(loaded, reference, monkeypatch):
    pipe, adapter = loaded

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n  (request details on further lines)")

    monkeypatch.setattr(VARPipeline, "__call__", out_of_memory)
    base, erased, status = app.ErasureDemo(pipe, [adapter]).generate(ERASED_PROMPT, 0, 4.0, adapter.name, 1.0)
    assert (base, erased) == (None, None)
    assert status == "**Generation failed:** RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    monkeypatch.undo()
    assert pipe.get_active_adapters() == [adapter.name]  # disable_lora was undone despite the failure
    with_adapter = _generate(pipe, ERASED_PROMPT, SEED, adapter.name)
    assert np.array_equal(_pixels(with_adapter), reference(ERASED_PROMPT, SEED, adapter.name))


def test_without_adapters_the_page_says_what_to_pass(loaded):
    pipe, _ = loaded
    _, _, status = app.ErasureDemo(pipe, []).generate(ERASED_PROMPT, 0, 4.0, None, 1.0)
    assert "no adapter is loaded" in status and "--lora" in status


# ---------------------------------------------------------------------------------------------------------------------
# Command line and page
# ---------------------------------------------------------------------------------------------------------------------
def test_arguments_default_to_the_environment_for_spaces(monkeypatch):
    monkeypatch.setenv("VAR_ERASE_LORA", "org/erase-red, ./erase-blue\norg/erase-star")
    monkeypatch.setenv("VAR_ERASE_MODEL", "org/var-2b")
    args = app.parse_args([])
    assert args.lora == ["org/erase-red", "./erase-blue", "org/erase-star"]
    assert args.pretrained_model_name_or_path == "org/var-2b" and args.share is False and args.port is None
    assert app.parse_args(["--lora", "a", "--lora", "b"]).lora == ["a", "b"]  # the command line wins
    monkeypatch.delenv("VAR_ERASE_LORA")
    monkeypatch.delenv("VAR_ERASE_MODEL")
    args = app.parse_args([])
    assert args.lora == [] and args.pretrained_model_name_or_path == DEFAULT_MODEL


def test_a_missing_base_model_is_a_one_line_exit(tmp_path):
    with pytest.raises(SystemExit, match="Could not load the base pipeline"):
        app.load_pipeline(str(tmp_path / "nowhere"), "cpu")


def test_the_page_builds_with_its_controls(loaded):
    pytest.importorskip("gradio", reason="the page needs Gradio: pip install -e '.[demo]'")
    pipe, adapter = loaded
    page = app.build_demo(app.ErasureDemo(pipe, [adapter], ["Could not load adapter `x`: ..."]))
    elem_ids = {block.elem_id for block in page.blocks.values() if getattr(block, "elem_id", None)}
    assert {"prompt", "adapter", "weight", "seed", "guidance", "generate", "base-image", "erased-image", "status",
            "adapter-summary", "load-errors"} <= elem_ids
    assert page.analytics_enabled is False


# ---------------------------------------------------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def sync_api():
    """Playwright's sync API, or a skip that says what to install."""
    pytest.importorskip("gradio", reason="the app needs Gradio: pip install -e '.[demo]'")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright's Python client is missing: pip install -e '.[demo]'")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"Debian's Chromium is not at {CHROMIUM}: apt-get install -y chromium (as root)")
    return sync_api


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_served(process: subprocess.Popen, url: str, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise AssertionError(f"the app did not answer at {url} within {timeout:.0f} s")


@pytest.fixture
def served_app(sync_api, adapter_dir, tmp_path):
    """examples/app.py in a subprocess on a free localhost port, offline, with one good and one bad adapter."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "app.log"
    process = subprocess.Popen(  # from the adapter's parent folder: the page shows a short relative path
        [sys.executable, str(APP_PATH), "--lora", adapter_dir.name, "--lora", "var-erase-tests/no-such-adapter",
         "--port", str(port), "--prompt", "a blue star", "--device", "cpu"],
        cwd=adapter_dir.parent, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_served(process, url, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _shown_image(page, request, elem_id: str) -> Image.Image:
    img = page.locator(f"#{elem_id} img")
    img.wait_for(state="visible", timeout=60_000)
    response = request.get(img.get_attribute("src"))
    assert response.ok, f"{elem_id}: {response.status}"
    return Image.open(io.BytesIO(response.body()))


def _save_screenshot(png: bytes) -> None:
    """Write the docs' screenshot, unless the one there looks the same: a few anti-aliased pixels differ from run to
    run, and rewriting the file for them would leave the git tree dirty after every test run."""
    new = _pixels(Image.open(io.BytesIO(png)))
    if SCREENSHOT.exists():
        old = _pixels(Image.open(SCREENSHOT))
        if old.shape == new.shape and (np.abs(old - new).max(axis=-1) > 16).mean() < 1e-3:
            return
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.write_bytes(png)


def test_the_page_in_chromium_shows_base_and_erased_images(sync_api, served_app, loaded, reference, tmp_path):
    _, adapter = loaded
    seed = SEED
    requested = []
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.on("request", lambda r: requested.append(r.url))
            page.goto(served_app, wait_until="load")

            # the bad adapter id is a message in the page, the good adapter's card is summarised
            assert "var-erase-tests/no-such-adapter" in page.locator("#load-errors").inner_text()
            summary = page.locator("#adapter-summary").inner_text()
            assert "Erased concepts: red" in summary and "random" in summary

            # an empty prompt is refused in words
            prompt = page.get_by_label("Prompt")
            prompt.fill("")
            page.locator("#generate").click()
            sync_api.expect(page.locator("#status")).to_contain_text("enter a prompt", timeout=30_000)

            # ask for the erased concept
            prompt.fill(ERASED_PROMPT)
            page.get_by_label("Seed").fill(str(seed))
            page.locator("#generate").click()
            sync_api.expect(page.locator("#status")).to_contain_text(f"Seed {seed}", timeout=60_000)
            base = _shown_image(page, context.request, "base-image")
            erased = _shown_image(page, context.request, "erased-image")
            _save_screenshot(page.screenshot(full_page=True, animations="disabled"))

            # weight 0 through the slider's number box: the right image becomes the base model's
            weight = page.locator("#weight input[type=number]")
            weight.fill("0")
            weight.press("Enter")
            page.locator("#generate").click()
            sync_api.expect(page.locator("#status")).to_contain_text("at weight 0.", timeout=60_000)
            at_zero = _shown_image(page, context.request, "erased-image")
        finally:
            context.close()

    assert base.size == erased.size == (64, 64)
    assert np.array_equal(_pixels(base), reference(ERASED_PROMPT, seed))
    assert np.array_equal(_pixels(erased), reference(ERASED_PROMPT, seed, adapter.name))
    assert np.abs(_pixels(base) - _pixels(erased)).mean() > 1.0  # the adapter changed the picture
    assert np.array_equal(_pixels(at_zero), _pixels(base))
    offsite = [url for url in requested if not url.startswith(served_app) and not url.startswith(("data:", "blob:"))]
    assert offsite == [], f"the page fetched from outside the app (it must render offline): {offsite[:5]}"
