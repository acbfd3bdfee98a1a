"""Peak GPU memory and seconds per image of a full ``VARPipeline`` call under each offloading mode.

Each mode runs the whole pipeline, prompt to image, at batch size 1 with guidance: the text is tokenised and encoded
on every call (offloading moves the text encoder too), then the transformer samples every scale and the VAE decodes.
The models have random weights: Infinity-2B's transformer and d32 BSQ VAE and a Flan-T5-XL-shaped text encoder (1.22 B
parameters) in ``--dtype``, at 1024x1024 (``--config tiny``: the CPU smoke size with a one-layer stub text encoder).
The pipeline is built once on the CPU; each mode gets its own copy of it, so that no hook of one mode is left on the
modules the next mode measures. The modes:

- ``none``: the whole pipeline on the GPU (``pipe.to("cuda")``), the reference for speed and for the images;
- ``model_cpu_offload``: ``pipe.enable_model_cpu_offload()``, one whole model on the GPU at a time;
- ``sequential_cpu_offload``: ``pipe.enable_sequential_cpu_offload()``, every leaf module's weights moved in on use;
- ``group_block``: ``pipe.enable_group_offload(offload_type="block_level", num_blocks_per_group=1)`` on every
  component (diffusers' group offloading: one transformer block, VAE encoder/decoder or T5 block at a time);
- ``group_leaf``: ``pipe.enable_group_offload(offload_type="leaf_level")``, every leaf module its own group.

``--use_stream`` passes ``use_stream=True`` to both group modes (the next group is copied in on a side stream while
the current one computes, from pinned host memory). Per mode the report gives the seconds per image (median, mean,
min, max over ``--iters`` timed calls after ``--warmup`` untimed ones; host wall time of the synchronised call), the
first call's seconds, the set-up seconds, the memory held after set-up, the peak allocated and reserved GPU memory
(GiB) over the warm-up and timed calls, and ``max_abs_diff_vs_none``: the largest difference of the last image (values
in [0, 1]) from the ``none`` mode's image of the same seed (0.0: the same image). A mode that fails reports its error
and the others still run; without CUDA the offloading modes are reported as skipped.

Run it on a GPU from the repository root::

    PYTHONPATH=src python benchmarks/bench_offload.py --output_json docs/perf/offload_h100.json
    PYTHONPATH=src python benchmarks/bench_offload.py --modes group_block group_leaf --use_stream
    PYTHONPATH=src python benchmarks/bench_offload.py --config tiny --device cpu --modes none  # CPU smoke run

What to take from it: ``fits`` lists the modes whose peak reserved memory stays below 12 and 16 GiB. Reserved memory
is what PyTorch's caching allocator holds; a card also needs room for the CUDA context and libraries (about 0.3-1 GiB,
not counted here) and a desktop may hold some, so a mode near a threshold does not fit in practice. Among the modes
that fit, the seconds per image say what the saving costs against ``none``; ``max_abs_diff_vs_none`` should be 0.0
(offloading moves weights and does not change the arithmetic). Host memory is not reported: every offload mode keeps
the offloaded weights in host RAM (pinned with ``--use_stream``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
import traceback

import numpy as np
import torch
from bench_common import (
    CONFIGS,
    DTYPES,
    GIB,
    build_pipeline,
    count_parameters,
    emit,
    environment,
    log,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    summarize,
    synchronize,
    weights_gib,
)

from var_erase.pipelines.pipeline_var import VARPipeline

MODES = ("none", "model_cpu_offload", "sequential_cpu_offload", "group_block", "group_leaf")
FIT_THRESHOLDS_GIB = (12, 16)
DEFAULT_PROMPT = "a red fox sitting in fresh snow at sunrise"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="infinity-2b")
    p.add_argument("--modes", nargs="+", choices=(*MODES, "all"), default=["all"],
                   help="offloading modes to measure, in this order (all: every mode, none first)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per mode")
    p.add_argument("--iters", type=int, default=3, help="timed calls per mode")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the one prompt of every call")
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="transformer blocks and the Flan-T5-XL-shaped text encoder")
    p.add_argument("--vae_dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--use_stream", action="store_true",
                   help="group modes: enable_group_offload(use_stream=True) (prefetch on a side stream)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="weights and the sampling generator")
    p.add_argument("--output_json", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.warmup < 0 or args.iters < 1:
        p.error("--warmup must be >= 0 and --iters >= 1")
    args.modes = list(MODES) if "all" in args.modes else list(dict.fromkeys(args.modes))
    return args


# ---------------------------------------------------------------------------------------------------------------------
# pipelines and modes


def build_base(args) -> VARPipeline:
    """The random-weight pipeline on the CPU; at Infinity-2B size with the Flan-T5-XL-shaped text encoder."""
    full_text_encoder = args.config == "infinity-2b"
    return build_pipeline(args.config, torch.device("cpu"), DTYPES[args.dtype], DTYPES[args.vae_dtype], args.seed,
                          full_text_encoder=full_text_encoder)


def fresh_copy(base: VARPipeline) -> VARPipeline:
    """A pipeline with deep copies of ``base``'s models (still on the CPU, no hooks), sharing its tokenizer."""
    pipe = VARPipeline(tokenizer=base.tokenizer, text_encoder=copy.deepcopy(base.text_encoder),
                       transformer=copy.deepcopy(base.transformer), vae=copy.deepcopy(base.vae))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply_mode(pipe: VARPipeline, mode: str, device: torch.device, use_stream: bool = False) -> str:
    """Put ``pipe`` under ``mode`` with ``device`` as the execution device; returns the call made."""
    if mode == "none":
        pipe.to(device)
        return f'pipe.to("{device}")'
    if mode == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
        return "pipe.enable_model_cpu_offload()"
    if mode == "sequential_cpu_offload":
        pipe.enable_sequential_cpu_offload(device=device)
        return "pipe.enable_sequential_cpu_offload()"
    if mode in ("group_block", "group_leaf"):
        kwargs = ({"offload_type": "block_level", "num_blocks_per_group": 1} if mode == "group_block"
                  else {"offload_type": "leaf_level"})
        pipe.enable_group_offload(device, offload_device=torch.device("cpu"), use_stream=use_stream, **kwargs)
        shown = ", ".join(f"{k}={v!r}" for k, v in {**kwargs, "use_stream": use_stream}.items())
        return f"pipe.enable_group_offload({shown})"
    raise ValueError(f"unknown offload mode {mode!r}; expected one of {', '.join(MODES)}")


def skip_reason(mode: str, device: torch.device) -> str | None:
    """Why ``mode`` is not run on ``device`` (None: it runs). Offloading moves weights between the CPU and a GPU."""
    if mode != "none" and device.type != "cuda":
        return f"{mode} offloads to the CPU from a CUDA device; this run is on {device.type}"
    return None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# one mode


@torch.no_grad()
def generate(pipe: VARPipeline, args, height: int, width: int, device: torch.device) -> tuple[np.ndarray, float]:
    """One synchronised pipeline call from the prompt: the image (H, W, 3) in [0, 1] and its host seconds."""
    generator = torch.Generator(device).manual_seed(args.seed)
    synchronize(device)
    start = time.perf_counter()
    images = pipe(args.prompt, height=height, width=width, guidance_scale=args.guidance_scale, generator=generator,
                  output_type="np").images
    synchronize(device)
    return images[0], time.perf_counter() - start


def measure_mode(base: VARPipeline, mode: str, args, device: torch.device) -> tuple[dict, np.ndarray]:
    """Set-up, warm-up and timed calls of one mode on a fresh copy of ``base``: the report and the last image."""
    spec = CONFIGS[args.config]
    pipe = fresh_copy(base)
    try:
        _free(device)
        start = time.perf_counter()
        call = apply_mode(pipe, mode, device, args.use_stream)
        synchronize(device)
        setup_s = time.perf_counter() - start
        resident = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
        reset_peak_memory(device)
        times = []
        for _ in range(args.warmup + args.iters):
            image, seconds = generate(pipe, args, spec["height"], spec["width"], device)
            times.append(seconds)
        report = {"mode": mode, "call": call, "setup_s": setup_s, "memory_after_setup_gib": resident,
                  "first_call_s": times[0], "s_per_image": summarize(times[args.warmup:]), **peak_memory(device)}
        return report, image
    finally:
        del pipe
        _free(device)


def run_mode(base: VARPipeline, mode: str, args, device: torch.device) -> tuple[dict, np.ndarray | None]:
    """:func:`measure_mode`, or the reason it was skipped, or the error it raised (the run goes on)."""
    reason = skip_reason(mode, device)
    if reason:
        return {"mode": mode, "skipped": reason}, None
    log(f"{mode}: {args.warmup} warm-up + {args.iters} timed calls")
    try:
        return measure_mode(base, mode, args, device)
    except Exception as err:  # one mode failing (out of memory, a hook that does not fit) must not stop the others
        log(f"{mode} failed:\n{traceback.format_exc()}")
        first_line = (str(err).strip().splitlines() or [""])[0]
        return {"mode": mode, "error": f"{type(err).__name__}: {first_line}"}, None


# ---------------------------------------------------------------------------------------------------------------------
# report


def compare_to_none(results: list[dict], images: dict[str, np.ndarray]) -> None:
    """Add ``max_abs_diff_vs_none`` and ``matches_none`` to every measured result (None without a ``none`` image)."""
    reference = images.get("none")
    for result in results:
        if "s_per_image" not in result or result["mode"] not in images:  # skipped or failed
            continue
        image = images[result["mode"]]
        if reference is None:
            diff = None
        elif image.shape != reference.shape:
            diff = float("inf")
        else:
            diff = float(np.abs(image.astype(np.float64) - reference.astype(np.float64)).max())
        result["max_abs_diff_vs_none"] = diff
        result["matches_none"] = None if diff is None else diff == 0.0


def fits_summary(results: list[dict]) -> dict:
    """For each threshold, the measured modes whose peak reserved GPU memory is below it."""
    measured = {r["mode"]: r["peak_reserved_gib"] for r in results if "peak_reserved_gib" in r}
    summary = {f"below_{t}_gib": [m for m, gib in measured.items() if gib < t] for t in FIT_THRESHOLDS_GIB}
    summary["peak_reserved_gib"] = measured
    summary["basis"] = ("torch.cuda.max_memory_reserved over the warm-up and timed calls; the CUDA context and "
                        "libraries (about 0.3-1 GiB) come on top" if measured else
                        "no GPU memory measured in this run (CPU run or every GPU mode failed)")
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    spec = CONFIGS[args.config]
    log(f"building {args.config} with random weights on the CPU")
    base = build_base(args)
    results, images = [], {}
    for mode in args.modes:
        result, image = run_mode(base, mode, args, device)
        results.append(result)
        if image is not None:
            images[mode] = image
    compare_to_none(results, images)
    result = {
        "benchmark": "offload",
        "config": args.config,
        "height": spec["height"],
        "width": spec["width"],
        "batch_size": 1,
        "text_encoder": "flan-t5-xl-shaped" if args.config == "infinity-2b" else "stub (one T5 layer)",
        "settings": {k: v for k, v in vars(args).items() if k != "output_json"},
        "parameters": {name: count_parameters(getattr(base, name)) for name in ("text_encoder", "transformer", "vae")},
        "weights_gib": {name: weights_gib(getattr(base, name)) for name in ("text_encoder", "transformer", "vae")},
        "environment": environment(device),
        "results": results,
        "fits": fits_summary(results),
    }
    return emit(result, args.output_json)


if __name__ == "__main__":
    main()
