"""What FP8 blocks (``transformer.enable_fp8()``) cost in quality against bf16 blocks, printed as one JSON object.

1. ``drift``: per-bit probability drift along one teacher-forced trajectory. A trajectory is sampled with bf16 blocks
   (guided, the pipeline's own sampler); the model is then teacher-forced along it under the prompt, once with bf16
   blocks and once with FP8 blocks, and the two bitwise Bernoulli distributions are compared bit by bit: per scale the
   mean and max of ``KL(p_bf16 || p_fp8)`` (nats per bit), the share of bits whose most likely value flips, and the
   relative L2 error of the logits. Run at ``--config`` (Infinity-2B with random weights by default; see
   ``bench_common.build_pipeline``) and on the embedded toy model (trained weights).
2. ``toy_adherence``: the embedded toy model (``var_erase.DEFAULT_MODEL``) samples fully specified held-out prompts
   (``toy_metrics.fully_specified_prompts``) on the same seeds with float32, bf16 and FP8 blocks (FP8 is made from the
   bf16 weights); the toy oracle reads the prompted shape / colour / style (``toy_metrics.prompt_adherence``), with
   the sampling settings erasures are validated with (``ErasureConfig``'s inference defaults).
3. ``--grid PATH``: a PNG of the first ``--grid_prompts`` prompts, bf16 left and FP8 right, same seed per row.

Examples::

    PYTHONPATH=src python benchmarks/bench_fp8_quality.py --output_json outputs/bench/fp8_quality.json \\
        --grid outputs/bench/fp8_grid.png
    PYTHONPATH=src python benchmarks/bench_fp8_quality.py --config tiny --device cpu --toy_prompts 2 --grid_prompts 2
"""

# ruff: noqa: E402 - bench_common puts src/ on the path before var_erase is imported
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from bench_common import CONFIGS, build_pipeline, emit, environment, log, resolve_device

from var_erase.schedules import ScaleSchedule

TOY_VARIANTS = ("fp32", "bf16", "fp8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="infinity-2b",
                   help="random-weight model of the drift measurement (the toy model is measured too)")
    p.add_argument("--prompt", default="a watercolor painting of a lighthouse at dusk",
                   help="prompt of the drift trajectory (random-weight model: through the stub text encoder)")
    p.add_argument("--guidance_scale", type=float, default=4.0, help="of the sampled drift trajectory")
    p.add_argument("--toy_prompts", type=int, default=64, help="fully specified held-out toy prompts")
    p.add_argument("--toy_images_per_prompt", type=int, default=2)
    p.add_argument("--toy_batch_size", type=int, default=64)
    p.add_argument("--toy_variants", nargs="+", choices=TOY_VARIANTS, default=list(TOY_VARIANTS))
    p.add_argument("--grid", default=None, help="write the bf16 | FP8 side-by-side PNG here")
    p.add_argument("--grid_prompts", type=int, default=8, help="rows of the grid")
    p.add_argument("--fp8_fast_accum", action="store_true", help="torch._scaled_mm(use_fast_accum=True)")
    p.add_argument("--skip_random", action="store_true", help="skip the --config drift (the toy model only)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_json", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.toy_prompts < 1 or args.toy_images_per_prompt < 1 or args.grid_prompts < 1:
        p.error("--toy_prompts, --toy_images_per_prompt and --grid_prompts must be >= 1")
    if args.grid and not {"bf16", "fp8"} <= set(args.toy_variants):
        p.error("--grid compares bf16 and fp8: keep both in --toy_variants")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# per-bit drift


def bit_drift(logits_ref_BL2d: torch.Tensor, logits_new_BL2d: torch.Tensor, schedule: ScaleSchedule) -> list[dict]:
    """Per scale: ``KL(ref || new)`` of the bitwise Bernoulli distributions (nats per bit; mean and max over tokens
    and bits), the share of bits whose argmax flips, and ``||new - ref|| / ||ref||`` of the logits."""
    batch, length = logits_ref_BL2d.shape[:2]
    logp_ref = logits_ref_BL2d.float().view(batch, length, -1, 2).log_softmax(-1)
    logp_new = logits_new_BL2d.float().view(batch, length, -1, 2).log_softmax(-1)
    kl_BLd = (logp_ref.exp() * (logp_ref - logp_new)).sum(-1).clamp(min=0)  # >= 0 up to float rounding
    flips_BLd = logp_ref.argmax(-1) != logp_new.argmax(-1)
    rows = []
    for k, (h, w) in enumerate(schedule.grids):
        cut = schedule.scale_slice(k)
        ref, new = logits_ref_BL2d[:, cut].float(), logits_new_BL2d[:, cut].float()
        rows.append({"scale": k, "grid": f"{h}x{w}", "kl_mean": kl_BLd[:, cut].mean().item(),
                     "kl_max": kl_BLd[:, cut].max().item(),
                     "argmax_flip_share": flips_BLd[:, cut].float().mean().item(),
                     "logit_rel_l2": ((new - ref).norm() / ref.norm().clamp(min=1e-30)).item()})
    return rows


@torch.no_grad()
def teacher_forced_drift(pipe, prompt: str, guidance_scale: float, seed: int, fast_accum: bool) -> dict:
    """Sample one trajectory with the pipeline's blocks as they are (bf16), then teacher-force it with those blocks
    and with FP8 blocks; the per-scale drift (:func:`bit_drift`) and its summary over all scales. Leaves FP8 off."""
    height = width = pipe.transformer.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompt, height=height, width=width, guidance_scale=guidance_scale, generator=generator,
               output_type="latent", return_trajectory=True)
    trajectory = out.trajectory
    states, mask = pipe.encode_prompt(prompt)[:2]

    def forward() -> torch.Tensor:
        return pipe.transformer(trajectory.inputs, states, mask, schedule=trajectory.schedule).sample

    logits_ref = forward()
    pipe.transformer.enable_fp8(use_fast_accum=fast_accum)
    try:
        logits_fp8 = forward()
    finally:
        pipe.transformer.disable_fp8()
    per_scale = bit_drift(logits_ref, logits_fp8, trajectory.schedule)
    return {"total_tokens": trajectory.schedule.total_tokens,
            "kl_mean": float(np.mean([r["kl_mean"] for r in per_scale])),
            "kl_max": max(r["kl_max"] for r in per_scale),
            "argmax_flip_share_max": max(r["argmax_flip_share"] for r in per_scale),
            "logit_rel_l2_max": max(r["logit_rel_l2"] for r in per_scale),
            "per_scale": per_scale}


# ---------------------------------------------------------------------------------------------------------------------
# toy model


def load_toy(device: torch.device):
    from var_erase import DEFAULT_MODEL
    from var_erase.pipelines.pipeline_var import VARPipeline

    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_toy_variant(pipe, variant: str, fast_accum: bool, blocks_fp32: dict[str, torch.Tensor]) -> None:
    """Blocks in float32 or bf16 (the rest of the model as loaded), or bf16 blocks with FP8 linears; each made from
    the loaded float32 block weights ``blocks_fp32`` (a bf16 round trip would not give them back)."""
    blocks = pipe.transformer.transformer_blocks
    pipe.transformer.disable_fp8()
    blocks.to(torch.float32)
    blocks.load_state_dict(blocks_fp32)
    blocks.to(torch.float32 if variant == "fp32" else torch.bfloat16)
    if variant == "fp8":
        pipe.transformer.enable_fp8(use_fast_accum=fast_accum)


def sampling_settings() -> dict:
    from var_erase.erasure.config import ErasureConfig

    config = ErasureConfig()
    return {"guidance_scale": config.inference_guidance_scale, "temperature": config.inference_temperature,
            "top_k": config.inference_top_k, "top_p": config.inference_top_p}


def toy_quality(args, device: torch.device) -> tuple[dict, dict]:
    """The toy model's drift (bf16 vs FP8) and adherence per variant; also the grid images per variant."""
    from var_erase.evaluation.toy_metrics import fully_specified_prompts, generate_images, prompt_adherence
    from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier

    pipe = load_toy(device)
    blocks_fp32 = {k: v.detach().float().clone() for k, v in pipe.transformer.transformer_blocks.state_dict().items()}
    oracle = OracleClassifier.from_pretrained(ORACLE_PATH).to(device).eval()
    rows = fully_specified_prompts(args.toy_prompts, args.seed)
    sampling = sampling_settings()
    report: dict = {"prompts": len(rows), "images_per_prompt": args.toy_images_per_prompt, "sampling": sampling,
                    "adherence": {}}
    set_toy_variant(pipe, "bf16", args.fp8_fast_accum, blocks_fp32)
    report["drift"] = teacher_forced_drift(pipe, rows[0][0], sampling["guidance_scale"], args.seed,
                                           args.fp8_fast_accum)
    grid_images = {}
    for variant in args.toy_variants:
        log(f"toy model, {variant} blocks: {len(rows)} prompts x {args.toy_images_per_prompt} images")
        set_toy_variant(pipe, variant, args.fp8_fast_accum, blocks_fp32)
        report["adherence"][variant] = prompt_adherence(pipe, oracle, rows, args.toy_images_per_prompt, args.seed,
                                                        args.toy_batch_size, progress=False, **sampling)
        if args.grid and variant in ("bf16", "fp8"):
            prompts = [p for p, _ in rows[: args.grid_prompts]]
            grid_images[variant] = generate_images(pipe, prompts, 1, args.seed, args.toy_batch_size, progress=False,
                                                   **sampling)
    pipe.transformer.disable_fp8()
    if "bf16" in report["adherence"] and "fp8" in report["adherence"]:
        bf16, fp8 = report["adherence"]["bf16"], report["adherence"]["fp8"]
        report["fp8_minus_bf16"] = {k: fp8[k] - bf16[k] for k in bf16 if k != "n_images"}
    return report, grid_images


def save_grid(left_NHW3: torch.Tensor, right_NHW3: torch.Tensor, path: str, pad: int = 2) -> str:
    """Rows of ``[left | right]`` (uint8 images) as a PNG, written atomically; returns the path."""
    from PIL import Image

    n, h, w, _ = left_NHW3.shape
    canvas = np.full((n * (h + pad) + pad, 2 * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        top = pad + i * (h + pad)
        canvas[top: top + h, pad: pad + w] = left_NHW3[i].numpy()
        canvas[top: top + h, 2 * pad + w: 2 * pad + 2 * w] = right_NHW3[i].numpy()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(fd)
    try:
        Image.fromarray(canvas).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    result: dict = {"benchmark": "fp8_quality", "config": args.config}
    if not args.skip_random:
        log(f"drift at {args.config} with random weights on {device}")
        pipe = build_pipeline(args.config, device, torch.bfloat16, torch.bfloat16, args.seed)
        result["drift"] = teacher_forced_drift(pipe, args.prompt, args.guidance_scale, args.seed,
                                               args.fp8_fast_accum)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["toy"], grid_images = toy_quality(args, device)
    if args.grid:
        result["grid"] = save_grid(grid_images["bf16"], grid_images["fp8"], args.grid)
    result["settings"] = {k: v for k, v in vars(args).items() if k != "output_json"}
    result["environment"] = environment(device)
    return emit(result, args.output_json)


if __name__ == "__main__":
    main()
