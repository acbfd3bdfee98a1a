"""The training forward and backward of the block-causal self-attention at Infinity-2B size, by implementation:
the library's per-scale fused SDPA (``var_erase.models.attention.block_causal_attention``, compiled as in the
trainer's compiled blocks) against FlexAttention over the same scale-causal mask (a block mask of 128 x 128 tiles).

Inputs are one layer's q, k, v at 1024x1024 (10,521 tokens), batch 2, 16 heads of 128, bf16, in the token-major
layout the blocks hand over. Each implementation is timed with CUDA events over ``--iters`` calls after 3 warm-ups:
the forward alone (no grad) and forward + backward. TFLOP/s count only the visible 62% of the score matrix (forward
``4 B H c V``, backward 2.5x that, V the visible query-key pairs). Also reported: each output's largest difference
from the per-scale path. FlexAttention runs on a GPU only (it has no backward on the CPU).

Example::

    PYTHONPATH=src python benchmarks/bench_attention.py --output_json outputs/bench/attention.json
"""

from __future__ import annotations

import argparse

import torch
from bench_common import CONFIGS, emit, environment, log, resolve_device, schedule_info

from var_erase.models.attention import block_causal_attention
from var_erase.schedules import ScaleSchedule


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="infinity-2b")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--flex_block_size", type=int, default=128, help="FlexAttention's mask tile")
    p.add_argument("--no_compile", dest="compile", action="store_false",
                   help="run eagerly (FlexAttention then uses its slow reference path; for CPU smoke runs)")
    p.add_argument("--device", default=None)
    p.add_argument("--output_json", default=None)
    return p.parse_args(argv)


def time_call(fn, device: torch.device, iters: int) -> float:
    """Seconds per call of ``fn`` after 3 warm-ups (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    if device.type != "cuda":
        import time

        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3 / iters


def flex_block_causal(schedule: ScaleSchedule, block_size: int, device: torch.device, compile_: bool):
    """``attn(q, k, v)`` by FlexAttention under the scale-causal mask (query of scale k sees keys before its end)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    ends_L = torch.repeat_interleave(torch.tensor(schedule.offsets[1:], device=device),
                                     torch.tensor(schedule.token_counts, device=device))
    L = schedule.total_tokens
    mask = create_block_mask(lambda b, h, q, kv: kv < ends_L[q], None, None, L, L, device=str(device),
                             BLOCK_SIZE=block_size)
    flex = torch.compile(flex_attention) if compile_ else flex_attention
    return lambda q, k, v: flex(q, k, v, block_mask=mask)


def time_attention(attn, qkv_BL3Hc: torch.Tensor, grad_BHLc: torch.Tensor, device: torch.device, iters: int
                   ) -> tuple[dict, torch.Tensor]:
    """Milliseconds of ``attn(q, k, v)`` forward (no grad) and forward + backward, and its float32 output."""
    leaf = qkv_BL3Hc.clone().requires_grad_(True)
    q, k, v = (leaf[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, c) views, token-major storage
    with torch.no_grad():
        forward_s = time_call(lambda: attn(q, k, v), device, iters)
        out = attn(q, k, v).float()

    def step():
        leaf.grad = None
        attn(q, k, v).backward(grad_BHLc)

    both_s = time_call(step, device, iters)
    return {"forward_ms": forward_s * 1e3, "forward_backward_ms": both_s * 1e3}, out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    spec = CONFIGS[args.config]
    schedule = ScaleSchedule.for_image_size(spec["height"], spec["width"])
    cfg = spec["transformer"]
    heads, dim = cfg["num_attention_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, L = args.batch_size, schedule.total_tokens
    visible = sum(n * end for n, end in zip(schedule.token_counts, schedule.offsets[1:]))
    flops_forward = 4 * B * heads * dim * visible

    torch.manual_seed(0)
    qkv_BL3Hc = torch.randn(B, L, 3, heads, dim, device=device, dtype=dtype)
    grad_BHLc = torch.randn(B, heads, L, dim, device=device, dtype=dtype)
    per_scale = lambda q, k, v: block_causal_attention(q, k, v, schedule.offsets)  # noqa: E731
    implementations = {"per_scale_sdpa": torch.compile(per_scale) if args.compile else per_scale}
    if device.type == "cuda":  # FlexAttention has no backward on the CPU
        implementations[f"flex_attention_{args.flex_block_size}"] = flex_block_causal(
            schedule, args.flex_block_size, device, args.compile)
    results, reference = {}, None
    for name, attn in implementations.items():
        log(f"{name}: {args.iters} calls after 3 warm-ups")
        timings, out = time_attention(attn, qkv_BL3Hc, grad_BHLc, device, args.iters)
        reference = out if reference is None else reference
        results[name] = {**timings, "forward_tflops": flops_forward / timings["forward_ms"] / 1e9,
                         "forward_backward_tflops": 3.5 * flops_forward / timings["forward_backward_ms"] / 1e9,
                         "max_abs_diff_vs_per_scale": float((out - reference).abs().max())}
    report = {"benchmark": "attention", "config": args.config, "batch_size": B, "heads": heads, "head_dim": dim,
              "dtype": str(dtype), "visible_share": visible / L**2, "results": results,
              "schedule": schedule_info(schedule), "settings": vars(args), "environment": environment(device)}
    return emit(report, args.output_json)


if __name__ == "__main__":
    main()
