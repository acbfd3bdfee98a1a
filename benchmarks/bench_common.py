"""Shared pieces of the benchmarks: model configs, random-weight pipelines, timers, memory and environment reports.

Nothing here downloads anything: the models get random weights and the text encoder is a stand-in (see
:func:`build_pipeline`). Run the benchmarks from the repository root with ``PYTHONPATH=src`` (or an installed
``var-erase``); when neither is set up, ``src/`` next to this folder is put on ``sys.path``.
"""

# ruff: noqa: E402 - var_erase is imported after the src/ fallback below puts it on the path
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if importlib.util.find_spec("var_erase") is None and _SRC.is_dir():
    sys.path.insert(0, str(_SRC))

import torch

from var_erase.conversion.infinity import INFINITY_TRANSFORMER_CONFIGS, INFINITY_VAE_CONFIGS
from var_erase.models.autoencoder_bsq import BSQAutoencoder
from var_erase.models.transformer_var import VARTransformer2DModel
from var_erase.pipelines.pipeline_var import VARPipeline

GIB = 1024**3

CONFIGS: dict[str, dict] = {
    # Infinity-2B: 32 blocks, width 2048, 16 heads, 32-bit tokens, Flan-T5-XL text (2048), d32 BSQ VAE, 1024x1024
    "infinity-2b": {
        "transformer": dict(INFINITY_TRANSFORMER_CONFIGS["infinity-2b"]),
        "vae": dict(INFINITY_VAE_CONFIGS["infinity-2b"]),
        "height": 1024,
        "width": 1024,
    },
    # CPU smoke size (as tests/_tiny.py): 2 blocks of width 64, 8-bit tokens, stride-4 VAE, 64x64 (7 scales, 521 tokens)
    "tiny": {
        "transformer": dict(num_layers=2, hidden_size=64, num_attention_heads=4, codebook_dim=8, text_dim=32,
                            max_text_len=64, sample_size=64),
        "vae": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, codebook_dim=8),
        "height": 64,
        "width": 64,
    },
}
"""Benchmark configurations: ``VARTransformer2DModel`` and ``BSQAutoencoder`` keyword arguments and the image size."""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------------------------------
# models


def resolve_device(name: str | None) -> torch.device:
    """``cuda`` when available (or asked for), else ``cpu``."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    return device


def stub_text_encoder(text_dim: int):
    """A random one-layer T5 encoder of width ``text_dim`` (Flan-T5-XL: 2048) with ByT5's byte vocabulary.

    It stands in for Flan-T5-XL where the pipeline needs a text encoder (anchor sampling, the trainer's prompt
    encoding): its features have the real shape ``(B, T, text_dim)`` with one token per UTF-8 byte plus ``</s>``, at a
    negligible cost. The real encoder (1.22 B parameters) costs about 0.03-0.04 s per prompt on an H200
    (research/svare_reference_perf.md) and is not part of the timed work, as the trainer encodes each prompt once.
    """
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=384, d_model=text_dim, d_kv=8, d_ff=8, num_layers=1, num_heads=1, dropout_rate=0.0)
    return T5EncoderModel(config).eval()


def flan_t5_xl_shaped_encoder(dtype: torch.dtype):
    """A random T5 encoder of Flan-T5-XL's shape (24 layers, width 2048, gated GELU, 32,128-entry vocabulary: 1.22 B
    parameters, 2.4 GB in bf16) in ``dtype``, built on the current default device. Where memory is measured, this
    holds the memory the real text encoder holds; ByT5's byte ids (< 384) index its vocabulary."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return T5EncoderModel(config).to(dtype).eval()


def build_pipeline(config_name: str, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype,
                   seed: int = 0, full_text_encoder: bool = False) -> VARPipeline:
    """A ``VARPipeline`` with random weights, built directly on ``device``.

    The transformer gets its own (Infinity training) init; its blocks are cast to ``dtype`` while the text modules,
    embeddings, AdaLN projections and head stay float32, which is what ``from_pretrained(..., dtype=torch.bfloat16)``
    gives (``_keep_in_fp32_modules``). The VAE is cast to ``vae_dtype`` as a whole. The text encoder is
    :func:`stub_text_encoder`, or with ``full_text_encoder`` (Infinity-2B only) :func:`flan_t5_xl_shaped_encoder` in
    ``dtype``.
    """
    if full_text_encoder and config_name != "infinity-2b":
        raise ValueError(f"the Flan-T5-XL-shaped text encoder is for the infinity-2b config, not {config_name}")
    from transformers import ByT5Tokenizer

    spec = CONFIGS[config_name]
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = VARTransformer2DModel(**spec["transformer"]).eval()
        vae = BSQAutoencoder(**spec["vae"]).eval()
        text_encoder = (flan_t5_xl_shaped_encoder(dtype) if full_text_encoder
                        else stub_text_encoder(spec["transformer"]["text_dim"]))
    transformer.transformer_blocks.to(dtype)
    for child in vae.children():  # (vae.to(dtype) itself warns about _keep_in_fp32_modules, which it has none of)
        child.to(vae_dtype)
    pipe = VARPipeline(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, transformer=transformer, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply_fp8(pipe: VARPipeline, enabled: bool, use_fast_accum: bool = False) -> dict | None:
    """With ``enabled``: ``pipe.transformer.enable_fp8(...)``, the report key ``fp8`` (layers converted and skipped,
    the FP8 weights' size); else None (the bf16 path, untouched)."""
    if not enabled:
        return None
    report = pipe.transformer.enable_fp8(use_fast_accum=use_fast_accum)
    fp8_bytes = sum(b.numel() * b.element_size() for n, b in pipe.transformer.named_buffers() if "weight_fp8" in n)
    return {"converted_layers": len(report["converted"]), "skipped_layers": report["skipped"],
            "use_fast_accum": use_fast_accum, "fp8_weights_gib": fp8_bytes / GIB}


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def weights_gib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / GIB


# ---------------------------------------------------------------------------------------------------------------------
# timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Durations between consecutive :meth:`mark` calls: CUDA events on a GPU, ``perf_counter`` on the CPU.

    CUDA events time the GPU's timeline between the marks; when the host is the bottleneck (kernel launches), the GPU
    waits for work and the events still span the wall time. :meth:`stages` synchronises once at the end.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._marks: list = []
        self._wall: list[float] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        self._wall.append(time.perf_counter())

    def stages(self) -> list[float]:
        """Seconds between marks 0-1, 1-2, ... (synchronises)."""
        synchronize(self.device)
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self._marks[:-1], self._marks[1:])]
        return [b - a for a, b in zip(self._wall[:-1], self._wall[1:])]

    def wall(self) -> float:
        """Host seconds from the first to the last mark (valid after :meth:`stages`)."""
        return self._wall[-1] - self._wall[0]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | str]:
    """Peak memory since the last :func:`reset_peak_memory`: CUDA allocated/reserved GiB on a GPU; on the CPU the
    process's peak resident set (a whole-process, whole-run figure, only a smoke value)."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
                "peak_memory_source": "torch.cuda.max_memory_allocated"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_gib": rss_kib / 1024**2, "peak_memory_source": "process max RSS (CPU run)"}


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, mean, min and max of timed samples."""
    return {"median": statistics.median(samples), "mean": statistics.fmean(samples), "min": min(samples),
            "max": max(samples)}


# ---------------------------------------------------------------------------------------------------------------------
# set-up switches, environment, output


def set_backend_flags(tf32: bool, cudnn_benchmark: bool) -> None:
    """Opt-in backend switches (off by default: the library sets neither)."""
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


def add_diagnostic_args(p, profiled: str) -> None:
    """``--sdpa_backends`` and ``--profile_dir`` (``profiled``: what is profiled and where its table goes)."""
    p.add_argument("--sdpa_backends", nargs="+", choices=SDPA_BACKENDS, default=None,
                   help="restrict scaled_dot_product_attention to these backends in this order (default: PyTorch's)")
    p.add_argument("--profile_dir", default=None,
                   help=f"after timing, profile {profiled} with torch.profiler (the report gets a summary by kernel "
                        "class)")
    p.add_argument("--gap_report", action="store_true",
                   help="after timing, run the timed call once more with the device timeline recorded: the GPU's idle "
                        "time and its longest gaps (report key gap_report)")
    p.add_argument("--sync_report", action="store_true",
                   help="after timing, run it once more with torch.cuda.set_sync_debug_mode('warn'): every place where "
                        "the host waits for the GPU (report key sync_report)")


@contextmanager
def sdpa_backends(names: list[str] | None) -> Iterator[None]:
    """Restrict ``scaled_dot_product_attention`` to these backends, tried in this order (None: PyTorch's choice)."""
    if not names:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    by_name = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    with sdpa_kernel([by_name[n] for n in names], set_priority=True):
        yield


def raise_compile_limits() -> None:
    """Raise torch.compile's recompilation limits (8 by default) so that a shape or guard the compiled block has not
    seen yet (a new batch size, text length or scale) recompiles instead of silently falling back to eager."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 1024)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 4096)


def _version(module_name: str) -> str | None:
    try:
        return getattr(importlib.import_module(module_name), "__version__", "unknown")
    except ImportError:
        return None


def environment(device: torch.device) -> dict:
    """Versions and device of this run."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        **{name: _version(name) for name in ("diffusers", "transformers", "peft", "accelerate")},
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB,
                   gpu_capability=f"{props.major}.{props.minor}", gpu_multiprocessors=props.multi_processor_count)
    return env


def schedule_info(schedule) -> dict:
    return {"height": schedule.height, "width": schedule.width, "num_scales": schedule.num_scales,
            "total_tokens": schedule.total_tokens, "grids": [f"{h}x{w}" for h, w in schedule.grids]}


def target_check(measured: float | None, target: float, reference: float | str, lower_is_better: bool = True) -> dict:
    """One performance target of design.md section 7: the measured value, the target, the reference code's value and
    whether the target is met (None when not measured in this run)."""
    met = None if measured is None else (measured <= target if lower_is_better else measured >= target)
    return {"measured": measured, "target": target, "reference": reference, "met": met}


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


def emit(result: dict, output_json: str | None) -> dict:
    """Print ``result`` as one JSON object on stdout (and write it to ``output_json``); returns it."""
    text = json.dumps(_jsonable(result), indent=2)
    print(text, flush=True)
    if output_json:
        os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
        Path(output_json).write_text(text + "\n")
    return result


def log(message: str) -> None:
    """Progress to stderr (stdout carries only the JSON)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# profiling

KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "wgmma")),
    ("copy_cast", ("copy", "cast", "convert", "memcpy", "memset", "fill")),
    ("reduction_norm", ("norm", "reduce", "softmax", "welford")),
)


def kernel_category(name: str) -> str:
    """Coarse class of a GPU kernel from its name: attention, gemm, copy_cast, reduction_norm or elementwise."""
    lowered = name.lower()
    for category, keys in KERNEL_CATEGORIES:
        if any(key in lowered for key in keys):
            return category
    return "elementwise_other"


def profile_call(fn, device: torch.device, path: str, row_limit: int = 60) -> dict:
    """Run ``fn()`` once under ``torch.profiler`` and write the operator table (sorted by device time) to ``path``,
    and the same grouped by input shapes to ``<path stem>_by_shape.txt`` (which GEMM shapes the time goes to).

    Returns a summary: wall seconds, summed GPU kernel seconds by :func:`kernel_category`, kernel launches, and the
    share of the wall time the GPU was busy (``gpu_busy``; low means the host, not the GPU, sets the pace).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        synchronize(device)
    wall = time.perf_counter() - start
    by_category: dict[str, float] = {}
    launches = 0
    for event in prof.events():
        # "## Call CompiledFxGraph ... ##" spans a compiled graph's kernels (a GPU annotation, not a kernel)
        if (event.device_type == torch.autograd.DeviceType.CUDA and event.name != "Command Buffer Full"
                and not event.name.startswith("## ")):
            category = kernel_category(event.name)
            by_category[category] = by_category.get(category, 0.0) + event.time_range.elapsed_us() / 1e6
            launches += 1
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=row_limit, max_name_column_width=90)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Path(path).write_text(table + "\n")
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=sort_key, row_limit=row_limit,
                                                                  max_name_column_width=40, max_shapes_column_width=90)
    shape_path = os.path.splitext(path)[0] + "_by_shape.txt"
    Path(shape_path).write_text(by_shape + "\n")
    gpu_s = sum(by_category.values())
    return {"profile_table": path, "profile_table_by_shape": shape_path, "profiled_wall_s": wall, "gpu_kernel_s": gpu_s,
            "gpu_kernel_s_by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "kernel_launches": launches, "gpu_busy": gpu_s / wall if device.type == "cuda" and wall > 0 else None}


def gap_report(fn, device: torch.device, top: int = 15) -> dict | None:
    """Where the GPU waits while ``fn()`` runs: its kernels' timeline (``torch.profiler`` with device activity only,
    so the host is slowed less than by a full profile), the idle time between them, and the longest gaps with the
    kernels on either side. None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("## ")
                   and e.name != "Command Buffer Full")
    return timeline_gaps(spans, top)


def timeline_gaps(spans: list[tuple[float, float, str]], top: int = 15) -> dict:
    """Busy and idle time of a device timeline of ``(start_us, end_us, name)`` spans sorted by start (overlapping
    spans count once), and its ``top`` longest idle gaps with the spans that end and start them."""
    if not spans:
        return {"kernels": 0}
    gaps, busy_until, busy, previous = [], spans[0][0], 0.0, spans[0][2]
    for start, end, name in spans:
        if start > busy_until:
            gaps.append((start - busy_until, previous, name))
        busy += max(0.0, end - max(start, busy_until))
        if end > busy_until:
            busy_until, previous = end, name
    span_us = busy_until - spans[0][0]
    gaps.sort(key=lambda g: -g[0])
    return {"kernels": len(spans), "timeline_s": span_us / 1e6, "gpu_busy_s": busy / 1e6,
            "gpu_idle_s": (span_us - busy) / 1e6, "gaps_over_50us": sum(1 for g in gaps if g[0] > 50),
            "idle_in_gaps_over_50us_s": sum(g[0] for g in gaps if g[0] > 50) / 1e6,
            "longest_gaps": [{"us": round(us, 1), "after": a[:90], "before": b[:90]} for us, a, b in gaps[:top]]}


def sync_report(fn, device: torch.device, top: int = 20) -> list[dict] | None:
    """The places where ``fn()`` makes the host wait for the GPU (``torch.cuda.set_sync_debug_mode("warn")``): each
    distinct call stack (the frames in this project) with its count. None on the CPU."""
    if device.type != "cuda":
        return None
    import traceback
    import warnings

    sites: dict[str, int] = {}
    root = str(_SRC.parent)

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f"{os.path.relpath(f.filename, root)}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                  if f.filename.startswith(root)]
        key = " <- ".join(reversed(frames[-4:]))
        sites[key] = sites.get(key, 0) + 1

    synchronize(device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return [{"count": n, "where": k} for k, n in sorted(sites.items(), key=lambda kv: -kv[1])[:top]]


@contextmanager
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one process-wide state (mixed precision, device); start from, and leave, a clean one so that a
    benchmark run inside another process (the tests) neither inherits nor leaks its settings."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
