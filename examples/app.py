"""Before / after web demo: the base model and an erasure adapter side by side, for the same prompt and seed.

    python examples/app.py --lora outputs/demo                        # http://127.0.0.1:7860
    python examples/app.py --lora outputs/erase-red --lora org/var-erased-nudity \\
        --pretrained_model_name_or_path path/to/infinity-2b --port 7861

Needs the ``demo`` extra (``pip install -e ".[demo]"``, i.e. Gradio). Every ``--lora`` (a folder holding
``pytorch_lora_weights.safetensors``, the file itself, or a Hub repo id) is loaded once at start-up; the page picks one
and its weight (``pipe.set_adapters``). The left image is the base model (``pipe.disable_lora()``), the right one the
model with the adapter, from the same ``torch.Generator`` seed, so any difference is the adapter's doing. Below them,
the adapter's card: erased concepts, method, LoRA shape and evaluation results (from its safetensors metadata, or
``eval.json`` beside a local adapter, as ``examples/demo.py`` writes it).

Runs offline: telemetry is off, the page uses the system's fonts and fetches nothing but the app's own files, and a
Hub adapter is read from the local cache when ``HF_HUB_OFFLINE=1``. An adapter that fails to load, and a generation
that fails, are reported as a message in the page (the traceback goes to the server log).

On a Hugging Face Space (no command line) the environment gives the arguments: ``VAR_ERASE_MODEL`` (the base
pipeline) and ``VAR_ERASE_LORA`` (adapters, comma-separated); see docs/app.md.
"""

from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it reads this at import

import torch  # noqa: E402

from var_erase import DEFAULT_MODEL  # noqa: E402
from var_erase.app import (  # noqa: E402, F401 - the library's demo, re-exported for `import app`
    CSS,
    DEFAULT_PROMPT,
    ErasureDemo,
    LoadedAdapter,
    adapter_summary,
    build_demo,
    generate_pair,
    load_adapters,
    page_theme,
    short_error,
)
from var_erase.hub import TOY_BASE_MODEL  # noqa: E402
from var_erase.pipelines.pipeline_var import VARPipeline  # noqa: E402

logger = logging.getLogger("var_erase.app")


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").replace("\n", ",").split(",") if item.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=os.environ.get("VAR_ERASE_MODEL") or DEFAULT_MODEL,
                   help="base pipeline: folder or Hub repo id (default: $VAR_ERASE_MODEL, else the embedded model)")
    p.add_argument("--lora", action="append", default=None,
                   help="adapter folder, .safetensors file or Hub repo id; repeatable (default: $VAR_ERASE_LORA, "
                        "comma-separated)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt the page starts with")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1, or $GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: $GRADIO_SERVER_PORT, else the first free one from 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs the network)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.lora is None:
        args.lora = _env_list("VAR_ERASE_LORA")
    return args


def load_pipeline(path: str, device: str) -> VARPipeline:
    try:
        pipe = VARPipeline.from_pretrained(path).to(device)
    except (OSError, ValueError) as err:
        raise SystemExit(f"Could not load the base pipeline {path!r}: {short_error(err)}. Pass a folder written by "
                         "VARPipeline.save_pretrained or a Hub repo id.") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    args = parse_args(argv)
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.device)
    adapters, errors = load_adapters(pipe, args.lora)
    if not args.lora:
        logger.warning("no --lora given: the page can only say so. Pass --lora PATH_OR_REPO_ID.")
    toy = args.pretrained_model_name_or_path in (DEFAULT_MODEL, TOY_BASE_MODEL)
    title = "VAR concept erasure" + (" (toy model)" if toy else "")
    page = build_demo(ErasureDemo(pipe, adapters, errors), default_prompt=args.prompt, title=title)
    page.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                   css=CSS, theme=page_theme(), ssr_mode=False)


if __name__ == "__main__":
    main()
