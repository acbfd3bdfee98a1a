"""Sampling speed of ``VARPipeline`` at Infinity-2B size: seconds per image, tokens/s, TFLOP/s, MFU, peak memory.

What runs: the pipeline's own scale loop (``VARPipeline._guidance_condition`` + ``VARPipeline._sample_scales``, the
code ``__call__`` runs between text encoding and decoding) and its decode (``VARPipeline._decode``), on an
Infinity-2B-shaped transformer and BSQ VAE with random weights, blocks in bf16. Text features are random tensors of
Flan-T5-XL's shape ``(B, T, 2048)``: there is no T5 (its cost, about 0.04 s per 512-token batch on an H200, is not
part of the sampler). With guidance (the default, ``g = 4``), the conditional and unconditional branches run as one
batch of ``2B`` rows and guidance is applied on the logits, exactly as the pipeline does.

Timings are CUDA events around each stage (``perf_counter`` on the CPU), after ``--warmup`` untimed runs; the
reported value is the median over ``--iters`` runs.

FLOP count (analytic, matmuls only, of one generation of R rows; R = 2B with guidance, B without). C width, F FFN width,
N blocks, d bits per token, T text tokens, D_t text width, K scales with n_k tokens each, S_k = n_0 + ... + n_k the
keys visible at scale k (KV cache plus the scale itself), L = S_{K-1} tokens in all::

    linear      = 2 R L N (6 C^2 + 2 C F)      attn1 q, k, v, out (4 C^2), attn2 q, out (2 C^2), FFN (2 C F) per token
    self_attn   = 4 R N C sum_k n_k S_k        QK^T and AV against the KV cache, all heads
    cross_attn  = 4 R N C L T  +  4 R N T C^2  scores/values over the text, plus the text K/V projections (once: cached)
    embed_head  = 2 R L (d C + 2 d C)          token embedding and bitwise head, per token
    text_cond   = 2 R T (3 D_t C + C^2) + 2 R (7 C^2) + 4 R K C^2
                                               attentive pool K/V, context projection, pool output, shared AdaLN
                                               (once) and the head's AdaLN (once per scale)

``achieved_tflops = total / transformer seconds`` and ``mfu = achieved_tflops / --peak_tflops`` (790: the bf16 dense
matmul rate measured on this H200). The VAE decode is timed apart and not counted in the FLOPs. At 1024x1024 with
guidance the count is about 115 TFLOP per image (linear 79, self-attention 36), so 0.30 s per image is 49% MFU.

Examples::

    PYTHONPATH=src python benchmarks/bench_sampling.py --batch_sizes 1 8 --output_json outputs/bench/sampling.json
    PYTHONPATH=src python benchmarks/bench_sampling.py --config tiny --device cpu --batch_sizes 1 2 --iters 2
    PYTHONPATH=src python benchmarks/bench_sampling.py --batch_sizes 1 8 --cuda_graphs --fp8  # FP8 blocks
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from bench_common import (
    CONFIGS,
    DTYPES,
    StageTimer,
    add_diagnostic_args,
    apply_fp8,
    build_pipeline,
    count_parameters,
    emit,
    environment,
    log,
    peak_memory,
    profile_call,
    raise_compile_limits,
    reset_peak_memory,
    resolve_device,
    schedule_info,
    sdpa_backends,
    set_backend_flags,
    summarize,
    target_check,
    weights_gib,
)

from var_erase.schedules import ScaleSchedule


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="infinity-2b")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="images per call")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per batch size")
    p.add_argument("--iters", type=int, default=5, help="timed runs per batch size")
    p.add_argument("--guidance_scale", type=float, default=4.0, help="1 disables guidance (a batch of B rows)")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--top_k", type=int, default=900)
    p.add_argument("--top_p", type=float, default=0.97)
    p.add_argument("--text_len", type=int, default=24,
                   help="text tokens per prompt (</s> included) of the random Flan-T5-XL-shaped features")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="transformer blocks")
    p.add_argument("--vae_dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--generator", choices=["none", "cuda", "cpu"], default="none",
                   help="none: the pipeline default (draws on the device); cuda: one device generator; cpu: one CPU "
                        "generator per image, as anchor sampling passes them")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="pipe.enable_cuda_graphs(): replay each scale as a CUDA graph (captured in the first warm-up)")
    p.add_argument("--text_bucket", type=int, default=32,
                   help="with --cuda_graphs: the text is padded (masked) to a multiple of this many tokens so that "
                        "prompt lengths share graphs (pipe.enable_cuda_graphs(text_bucket=...)); 1: no padding")
    p.add_argument("--compile_vae", action="store_true",
                   help="torch.compile the VAE decoder (inductor fuses its GroupNorms, slow in eager bf16)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (compile_repeated_blocks: one compiled block for all "
                        "layers and scales, the KV-cache steps left out as graph breaks); combines with --cuda_graphs")
    p.add_argument("--compile_mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--fp8", action="store_true",
                   help="pipe.transformer.enable_fp8(): the blocks' linear layers as e4m3 matmuls (row-wise weight "
                        "scales, per-token activation scales, bf16 out); needs sm_89+ on CUDA")
    p.add_argument("--fp8_fast_accum", action="store_true", help="with --fp8: torch._scaled_mm(use_fast_accum=True)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for the float32 matmuls/convs (off in the library)")
    p.add_argument("--cudnn_benchmark", action="store_true", help="torch.backends.cudnn.benchmark (VAE convs)")
    p.add_argument("--peak_tflops", type=float, default=790.0, help="the device's dense bf16 matmul peak, for MFU")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_json", default=None, help="also write the JSON here")
    add_diagnostic_args(p, "one more generation per batch size and write its operator table to DIR/sampling_b<B>.txt")
    args = p.parse_args(argv)
    if args.warmup < 0 or args.iters < 1 or any(b < 1 for b in args.batch_sizes):
        p.error("--warmup must be >= 0, --iters >= 1 and every batch size >= 1")
    if args.fp8_fast_accum and not args.fp8:
        p.error("--fp8_fast_accum needs --fp8")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs


def sampling_flops(transformer_config: dict, schedule: ScaleSchedule, rows: int, text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one generation of ``rows`` sequences (see the module docstring for the formula)."""
    C, N = transformer_config["hidden_size"], transformer_config["num_layers"]
    F = round(C * transformer_config.get("mlp_ratio", 4.0) / 256) * 256
    d, Dt, T = transformer_config["codebook_dim"], transformer_config["text_dim"], text_len
    L, K = schedule.total_tokens, schedule.num_scales
    visible = sum(n * end for n, end in zip(schedule.token_counts, schedule.offsets[1:]))  # sum_k n_k S_k
    parts = {
        "linear": 2 * rows * L * N * (6 * C * C + 2 * C * F),
        "self_attn": 4 * rows * N * C * visible,
        "cross_attn": 4 * rows * N * C * L * T + 4 * rows * N * T * C * C,
        "embed_head": 2 * rows * L * (d * C + 2 * d * C),
        "text_cond": 2 * rows * T * (3 * Dt * C + C * C) + 2 * rows * 7 * C * C + 4 * rows * K * C * C,
    }
    parts["total"] = sum(parts.values())
    return {k: float(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------------------------------
# one generation


def random_text(pipe, batch_size: int, text_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Flan-T5-XL-shaped features (B, T, text_dim) in the transformer's dtype, as ``encode_prompt`` returns
    them, and an all-True (B, T) mask (every prompt has ``text_len`` tokens)."""
    text_dim, max_len = pipe.transformer.config.text_dim, pipe.transformer.config.max_text_len
    if not 1 <= text_len <= max_len:
        raise SystemExit(f"--text_len must be in [1, {max_len}] (the model's max_text_len), got {text_len}")
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch_size, text_len, text_dim, generator=g)
    device = pipe.transformer.device
    return states.to(device, pipe.transformer.dtype), torch.ones(batch_size, text_len, dtype=torch.bool, device=device)


def make_generator(kind: str, batch_size: int, device: torch.device, seed: int):
    if kind == "none":
        return None
    if kind == "cpu":
        return [torch.Generator().manual_seed(seed + i) for i in range(batch_size)]
    return torch.Generator(device).manual_seed(seed)


@torch.no_grad()
def generate_once(pipe, schedule: ScaleSchedule, states: torch.Tensor, mask: torch.Tensor, args, generator,
                  device: torch.device) -> tuple[float, float, float]:
    """One pipeline generation from text features: (transformer s, VAE decode s, host wall s)."""
    batch = states.shape[0]
    timer = StageTimer(device)
    timer.mark()
    condition = pipe._guidance_condition(states, mask, None, None, args.guidance_scale)
    f_hat, _ = pipe._sample_scales(schedule, condition, batch, args.guidance_scale, args.temperature, args.top_k,
                                   args.top_p, generator, None, [], False)
    timer.mark()
    pipe._decode(f_hat, "pt")
    timer.mark()
    sample_s, decode_s = timer.stages()
    return sample_s, decode_s, timer.wall()


def bench_batch(pipe, schedule: ScaleSchedule, args, batch_size: int, device: torch.device) -> dict:
    """Warm-up and timed generations at one batch size; seconds per image, throughput, MFU and peak memory."""
    states, mask = random_text(pipe, batch_size, args.text_len, args.seed)
    generator = make_generator(args.generator, batch_size, device, args.seed)
    reset_peak_memory(device)
    samples, first_call_s = [], None
    for i in range(args.warmup + args.iters):
        start = time.perf_counter()
        timing = generate_once(pipe, schedule, states, mask, args, generator, device)
        first_call_s = time.perf_counter() - start if first_call_s is None else first_call_s
        if i >= args.warmup:
            samples.append(timing)
    sample_s = summarize([s[0] for s in samples])
    decode_s = summarize([s[1] for s in samples])
    wall_s = summarize([s[2] for s in samples])
    profile = None
    if args.profile_dir:
        profile = profile_call(lambda: generate_once(pipe, schedule, states, mask, args, generator, device), device,
                               os.path.join(args.profile_dir, f"sampling_b{batch_size}.txt"))
    guided = args.guidance_scale != 1.0
    rows = batch_size * (2 if guided else 1)
    flops = sampling_flops(dict(pipe.transformer.config), schedule, rows, args.text_len)
    achieved = flops["total"] / sample_s["median"] / 1e12
    return {
        "batch_size": batch_size,
        "rows": rows,
        "transformer_s_per_image": sample_s["median"] / batch_size,
        "vae_decode_s_per_image": decode_s["median"] / batch_size,
        "total_s_per_image": (sample_s["median"] + decode_s["median"]) / batch_size,
        "images_per_s": batch_size / (sample_s["median"] + decode_s["median"]),
        "tokens_per_s": batch_size * schedule.total_tokens / sample_s["median"],
        "row_tokens_per_s": rows * schedule.total_tokens / sample_s["median"],
        "model_tflop_per_image": flops["total"] / batch_size / 1e12,
        "achieved_tflops": achieved,
        "mfu": achieved / args.peak_tflops,
        "first_call_s": first_call_s,
        **peak_memory(device),
        "flops_per_batch": flops,
        "transformer_s_per_batch": sample_s,
        "vae_decode_s_per_batch": decode_s,
        "wall_s_per_batch": wall_s,
        **({"profile": profile} if profile else {}),
    }


# ---------------------------------------------------------------------------------------------------------------------
# main


def sampling_targets(results: list[dict]) -> dict:
    """design.md section 7 at Infinity-2B size: <= 0.30 s per 1024x1024 image at B=1 with guidance (reference code
    1.05-1.10 s, VAE decode included), >= 55% MFU at B=8."""
    by_batch = {r["batch_size"]: r for r in results if "error" not in r}
    b1, b8 = by_batch.get(1, {}), by_batch.get(8, {})
    reference_mfu = "about 0.26-0.28 at B=4 (2.07-2.27 s per batch of 4 without the decode)"
    return {"total_s_per_image_at_b1": target_check(b1.get("total_s_per_image"), 0.30, "1.05-1.10"),
            "mfu_at_b8": target_check(b8.get("mfu"), 0.55, reference_mfu, lower_is_better=False)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    set_backend_flags(args.tf32, args.cudnn_benchmark)
    spec = CONFIGS[args.config]
    log(f"building {args.config} with random weights on {device}")
    pipe = build_pipeline(args.config, device, DTYPES[args.dtype], DTYPES[args.vae_dtype], args.seed)
    schedule = pipe.prepare_schedule(spec["height"], spec["width"])
    fp8 = apply_fp8(pipe, args.fp8, args.fp8_fast_accum)
    if args.compile:
        raise_compile_limits()
        pipe.transformer.compile_repeated_blocks(**({"mode": args.compile_mode} if args.compile_mode else {}))
    if args.cuda_graphs:
        pipe.enable_cuda_graphs(text_bucket=args.text_bucket)
    if args.compile_vae:
        raise_compile_limits()
        pipe.vae.decoder.compile()
    results = []
    for batch_size in args.batch_sizes:
        log(f"batch size {batch_size}: {args.warmup} warm-up + {args.iters} timed generations")
        try:
            with sdpa_backends(args.sdpa_backends):
                results.append(bench_batch(pipe, schedule, args, batch_size, device))
        except torch.OutOfMemoryError as err:
            results.append({"batch_size": batch_size, "error": f"out of memory: {str(err).splitlines()[0]}"})
        reset_peak_memory(device)
    result = {
        "benchmark": "sampling",
        "config": args.config,
        "transformer_config": dict(pipe.transformer.config),
        "vae_config": dict(pipe.vae.config),
        "schedule": schedule_info(schedule),
        "settings": {k: v for k, v in vars(args).items() if k not in ("output_json", "batch_sizes")},
        "parameters": {"transformer": count_parameters(pipe.transformer), "vae": count_parameters(pipe.vae),
                       "transformer_weights_gib": weights_gib(pipe.transformer),
                       "vae_weights_gib": weights_gib(pipe.vae)},
        "environment": environment(device),
        "fp8": fp8,
        "results": results,
    }
    if args.config == "infinity-2b" and args.guidance_scale != 1.0:
        result["targets"] = sampling_targets(results)
    return emit(result, args.output_json)


if __name__ == "__main__":
    main()
