"""Cost of an S-VARE erasure run at Infinity-2B size: anchor sampling per prompt, seconds per training iteration,
peak memory, and the projected time of a whole run (50 prompt pairs, 500 iterations).

What runs is the product's own code on an Infinity-2B-shaped pipeline with random weights (blocks in bf16):

1. ``var_erase.erasure.anchors.sample_anchors``: the frozen model samples the auxiliary visual tokens of each safe
   prompt at 1024x1024 (guidance 4 on logits, so a batch of 2B rows, tau 1, top-k 900, top-p 0.97); the conditional
   logits come from the guidance batch. On a GPU the scale loop replays CUDA graphs (``sample_anchors``' default;
   ``--no_anchor_cuda_graphs`` runs it eagerly): the first batch captures them (``anchor_first_batch_s``), the timed
   batches replay them (``anchor_s_per_prompt``), and what the capture costs beyond a replayed batch
   (``anchor_capture_overhead_s``) is counted once in the projection.
2. ``var_erase.erasure.trainer.ErasureTrainer.training_step``: one S-VARE iteration on a batch of 2 pairs, the
   reference's alternating update: filtered cross-entropy under the unsafe prompts teacher-forced on the anchor tokens,
   backward, clip, AdamW step; then ``0.5 * KL`` against the stored guided logits under the safe prompts, backward,
   clip, AdamW step. Both forwards in training mode with 10% condition dropout. Trainable: a rank-4 LoRA on
   cross-attention + FFN (the trainer's default targets), float32, its products zero-padded to rank 8 on a GPU (the
   trainer's default, ``--no_lora_rank_padding`` turns it off), or with ``--full_finetune`` the cross-attention and
   FFN weights themselves (the reference's setting; the trainer keeps float32 master weights). bf16 autocast through
   ``accelerate`` (``--mixed_precision``), gradient checkpointing of whole blocks (``--no_gradient_checkpointing``
   turns it off). Iterations are timed host-side with a device synchronisation around each, after ``--warmup``
   untimed iterations; the reported value is the median of ``--iters``. Also reported: the host's share of an
   iteration (``host_s_per_iteration``, until its work is queued) and ``s_per_iteration_back_to_back``, ``--iters``
   more iterations run by ``ErasureTrainer.train`` itself (queued back to back, logs read one step late).

Text: at infinity-2b size the pipeline's text encoder is a random T5 encoder of Flan-T5-XL's shape (1.22 B
parameters in ``--dtype``, as ``train_svare.py --mixed_precision bf16`` loads the real one), so the memory of every
phase is what a real run holds: the encoder sits on the GPU while the anchors are sampled and in CPU memory while
training (``ErasureTrainer.unused_models_offloaded``, as ``train`` runs). Its tokenizer is ByT5's (bytes), about 25
tokens per prompt, the length of the reference's Flan-T5 prompts. The trainer encodes every prompt once before
training. ``--stub_text_encoder`` swaps in a one-layer stub (the ``tiny`` config always uses one).

Checks reported with the timings: every trainable tensor changed after the first iteration (``lora_all_changed`` for a
LoRA), and every trainable tensor received a nonzero gradient during it (a LoRA's ``A`` matrices change through weight
decay alone, so the gradient check is the stricter one).

``projected_run_s = anchor_capture_overhead_s + num_pairs * anchor_s_per_prompt + num_iterations * s_per_iteration``
(defaults 50 and 500, ``--projected_pairs`` / ``--projected_iterations``); it leaves out loading the model, the first
iteration's compilation with ``--compile`` (``first_iteration_s``; ``projected_run_with_first_iteration_min`` adds
what the first iteration took beyond a timed one) and writing the adapter.

Examples::

    PYTHONPATH=src python benchmarks/bench_erasure.py --output_json outputs/bench/erasure_lora.json
    PYTHONPATH=src python benchmarks/bench_erasure.py --full_finetune --output_json outputs/bench/erasure_full.json
    PYTHONPATH=src python benchmarks/bench_erasure.py --fp8 --output_json outputs/bench/erasure_lora_fp8.json
    PYTHONPATH=src python benchmarks/bench_erasure.py --config tiny --device cpu --warmup 1 --iters 2
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from bench_common import (
    CONFIGS,
    DTYPES,
    add_diagnostic_args,
    apply_fp8,
    build_pipeline,
    count_parameters,
    emit,
    environment,
    fresh_accelerate_state,
    gap_report,
    log,
    peak_memory,
    profile_call,
    reset_peak_memory,
    resolve_device,
    schedule_info,
    sdpa_backends,
    set_backend_flags,
    summarize,
    sync_report,
    synchronize,
    target_check,
)

from var_erase.erasure.anchors import AnchorSet, sample_anchors, temporary_cuda_graphs
from var_erase.erasure.config import FULL_FINETUNE_MODULES, ErasureConfig
from var_erase.erasure.prompts import PromptPair
from var_erase.erasure.trainer import ErasureTrainer, check_activation_memory_budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="infinity-2b")
    p.add_argument("--batch_size", type=int, default=2, help="prompt pairs per forward (micro-batch)")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer step: an iteration sees batch_size x this many pairs (the same "
                        "losses and update as one batch of that size, in less activation memory)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations (the first is the change check)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--full_finetune", action="store_true",
                   help=f"fully fine-tune {list(FULL_FINETUNE_MODULES)} instead of training a LoRA")
    p.add_argument("--lora_rank", type=int, default=4)
    p.add_argument("--update", choices=["alternating", "joint"], default="alternating")
    p.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="keep every block's activations instead of recomputing them in the backward")
    p.add_argument("--selective_checkpointing", action="store_true",
                   help="recompute the blocks except their attention kernels (gradient_checkpointing='selective')")
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="frozen transformer blocks")
    p.add_argument("--anchor_prompts", type=int, default=8, help="safe prompts whose anchors are timed")
    p.add_argument("--anchor_batch_size", type=int, default=8, help="sample_anchors' batch (its default is 8)")
    p.add_argument("--no_anchor_cuda_graphs", action="store_true",
                   help="sample the anchors eagerly instead of replaying CUDA graphs (sample_anchors' GPU default)")
    p.add_argument("--projected_pairs", type=int, default=50)
    p.add_argument("--projected_iterations", type=int, default=500)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (ErasureTrainer(compile_blocks=True), regional)")
    p.add_argument("--activation_memory_budget", type=float, default=None,
                   help="with --compile and --no_gradient_checkpointing: the share (0-1] of the compiled block's "
                        "activations kept for the backward (ErasureTrainer(activation_memory_budget=...))")
    p.add_argument("--no_lora_rank_padding", action="store_true",
                   help="LoRA products at the adapter's own rank (ErasureTrainer(pad_lora_rank=False)); by default, "
                        "on a GPU, they run zero-padded to a multiple of 8: the same adapter on aligned kernels")
    p.add_argument("--preservation_student", choices=["conditional", "guided"], default="conditional",
                   help="L_Pre on the student's conditional logits (the reference) or its guided mix (twice the rows)")
    p.add_argument("--stub_text_encoder", action="store_true",
                   help="infinity-2b: the one-layer stub text encoder instead of a Flan-T5-XL-shaped one (1.22 B "
                        "parameters in --dtype, on the GPU while anchors are sampled, in CPU memory while training)")
    p.add_argument("--fp8", action="store_true",
                   help="pipe.transformer.enable_fp8() before the anchors: the frozen base's block linears as e4m3 "
                        "matmuls (anchors and the training forward/backward); LoRA stays in its own dtype")
    p.add_argument("--fp8_fast_accum", action="store_true", help="with --fp8: torch._scaled_mm(use_fast_accum=True)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls (off in the library)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_json", default=None, help="also write the JSON here")
    add_diagnostic_args(p, "one more iteration and write its operator table to DIR/erasure_<lora|full>.txt")
    args = p.parse_args(argv)
    try:
        check_activation_memory_budget(args.activation_memory_budget, args.compile,
                                       "selective" if args.selective_checkpointing else args.gradient_checkpointing)
    except ValueError as err:
        p.error(f"--activation_memory_budget (with --compile, without gradient checkpointing): {err}")
    if args.warmup < 1 or args.iters < 1:
        p.error("--warmup must be >= 1 (the first iteration is the change check) and --iters >= 1")
    if args.fp8 and args.full_finetune:
        p.error("--fp8 converts the frozen base weights; --full_finetune trains them: use one or the other")
    if args.fp8_fast_accum and not args.fp8:
        p.error("--fp8_fast_accum needs --fp8")
    if args.gradient_accumulation_steps < 1:
        p.error(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
    pairs_per_iteration = args.batch_size * args.gradient_accumulation_steps
    if args.anchor_prompts < pairs_per_iteration:
        p.error(f"--anchor_prompts ({args.anchor_prompts}) must be at least --batch_size x "
                f"--gradient_accumulation_steps ({pairs_per_iteration}): the pairs of an iteration are distinct")
    return args


def make_pairs(n: int) -> list[PromptPair]:
    """``n`` unsafe -> safe pairs of about 25 bytes each (Flan-T5 prompts of the reference are 17-29 tokens)."""
    return [PromptPair(f"a van gogh painting, no. {i}", f"an oil painting, no. {i}", "van gogh") for i in range(n)]


def erasure_config(args) -> ErasureConfig:
    return ErasureConfig(method="svare", update=args.update, train_batch_size=args.batch_size,
                         lora_rank=args.lora_rank, lora_alpha=float(args.lora_rank),
                         preservation_student=args.preservation_student,
                         train_modules=list(FULL_FINETUNE_MODULES) if args.full_finetune else None)


# ---------------------------------------------------------------------------------------------------------------------
# phases


def time_anchors(pipe, prompts: list[str], config: ErasureConfig, args, device: torch.device) -> tuple[AnchorSet, dict]:
    """One warm-up batch (it captures the CUDA graphs), then the anchors of every prompt through ``sample_anchors``
    (replaying them); seconds per prompt of the second call, and what the first batch cost beyond a replayed one."""
    spec = CONFIGS[args.config]
    graphs = device.type == "cuda" and not args.no_anchor_cuda_graphs
    kwargs = dict(guidance_scale=config.anchor_guidance_scale, temperature=config.anchor_temperature,
                  top_k=config.anchor_top_k, top_p=config.anchor_top_p, seed=config.anchor_seed,
                  height=spec["height"], width=spec["width"], batch_size=args.anchor_batch_size, progress=False,
                  cuda_graphs=graphs)
    first = prompts[: args.anchor_batch_size]
    with temporary_cuda_graphs(pipe, graphs):  # kept over both calls: the first captures, the timed one replays
        reset_peak_memory(device)  # the peak includes the capture
        first_s = timed(lambda: sample_anchors(pipe, first, **kwargs), device)[1]
        anchors, elapsed = timed(lambda: sample_anchors(pipe, prompts, **kwargs), device)
        memory = peak_memory(device)
    per_prompt = elapsed / len(prompts)
    return anchors, {"anchor_s_per_prompt": per_prompt, "anchor_s_total": elapsed, "anchor_prompts": len(prompts),
                     "anchor_peak_memory_gib": memory["peak_memory_gib"], "anchor_cuda_graphs": graphs,
                     "anchor_first_batch_s": first_s,
                     "anchor_capture_overhead_s": max(0.0, first_s - len(first) * per_prompt)}


def timed(fn, device: torch.device):
    """``(fn(), wall seconds)`` with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def trainable(trainer: ErasureTrainer) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in trainer.transformer.named_parameters() if p.requires_grad}


def checked_first_step(trainer: ErasureTrainer) -> tuple[dict, float]:
    """Run iteration 0 and check it: every trainable tensor changed, every one received a nonzero gradient."""
    params = trainable(trainer)
    before = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    received = {n: torch.zeros((), dtype=torch.bool, device=p.device) for n, p in params.items()}

    def hook(name: str):
        def record(param: torch.Tensor) -> None:
            received[name] |= param.grad.ne(0).any()
        return record

    handles = [p.register_post_accumulate_grad_hook(hook(n)) for n, p in params.items()]
    logs, elapsed = timed(lambda: trainer.training_step(0), trainer.accelerator.device)
    for handle in handles:
        handle.remove()
    unchanged = [n for n, p in params.items() if torch.equal(before[n], p.detach().cpu())]
    checks = {"trainable_all_changed": not unchanged, "unchanged_tensors": unchanged[:10],
              "trainable_all_received_grad": all(bool(v) for v in received.values()), "first_step_logs": logs}
    return checks, elapsed


def time_iterations(trainer: ErasureTrainer, first_step: int, count: int) -> tuple[list[float], list[float]]:
    """Seconds of ``count`` iterations starting at ``first_step``, each between device synchronisations, and the
    host's share of each: the time until ``training_step`` has queued its work (its logs unread), before waiting for
    the GPU. A host time close to the iteration's means the host sets the pace."""
    device, times, host = trainer.accelerator.device, [], []
    for step in range(first_step, first_step + count):
        synchronize(device)
        start = time.perf_counter()
        trainer.training_step(step, read_logs=False)
        host.append(time.perf_counter() - start)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, host


def time_back_to_back(trainer: ErasureTrainer, first_step: int, count: int) -> float:
    """Seconds per iteration of ``count`` iterations run by ``ErasureTrainer.train`` itself (queued one after the
    other, each one's logs read after the next is queued), between two device synchronisations."""
    trainer.state.step = first_step
    _, elapsed = timed(lambda: trainer.train(first_step + count, progress=False), trainer.accelerator.device)
    return elapsed / count


def time_training(pipe, config: ErasureConfig, pairs: list[PromptPair], anchors: AnchorSet, accelerator,
                  args) -> dict:
    """Build the trainer and measure its iterations with the unused models offloaded, as ``train`` runs them."""
    start = time.perf_counter()
    trainer = ErasureTrainer(pipe, config, pairs, anchors, accelerator, seed=args.seed,
                             gradient_accumulation_steps=args.gradient_accumulation_steps,
                             gradient_checkpointing=("selective" if args.selective_checkpointing
                                                     else args.gradient_checkpointing),
                             compile_blocks=args.compile, activation_memory_budget=args.activation_memory_budget,
                             pad_lora_rank=False if args.no_lora_rank_padding else None)
    setup_s = time.perf_counter() - start
    with trainer.unused_models_offloaded():  # as in ErasureTrainer.train: the text encoder and VAE wait on the CPU
        return {**measure_training(trainer, config, args), "trainer_setup_s": setup_s}


def measure_training(trainer: ErasureTrainer, config: ErasureConfig, args) -> dict:
    """The checked first iteration, the other warm-ups, the timed iterations and the optional diagnostics."""
    device = trainer.accelerator.device
    reset_peak_memory(device)
    log(f"training: 1 checked + {args.warmup - 1} warm-up + {args.iters} timed iterations")
    checks, first_s = checked_first_step(trainer)
    time_iterations(trainer, 1, args.warmup - 1)
    times, host_times = time_iterations(trainer, args.warmup, args.iters)
    step = args.warmup + args.iters
    back_to_back = time_back_to_back(trainer, step, args.iters)
    step += args.iters
    lora = config.finetune_mode == "lora"
    diagnostics = {}
    if args.profile_dir:
        diagnostics["profile"] = profile_call(lambda: trainer.training_step(step), device, os.path.join(
            args.profile_dir, f"erasure_{'lora' if lora else 'full'}.txt"))
    if args.gap_report:
        diagnostics["gap_report"] = gap_report(lambda: trainer.training_step(step + 1), device)
    if args.sync_report:
        diagnostics["sync_report"] = sync_report(lambda: trainer.training_step(step + 2), device)
    return {
        "s_per_iteration": summarize(times)["median"],
        **peak_memory(device),
        "trainable_parameters": count_parameters(trainer.transformer, trainable_only=True),
        "total_parameters": count_parameters(trainer.transformer),
        "lora_all_changed": checks["trainable_all_changed"] if lora else None,
        **checks,
        "first_iteration_s": first_s,
        "iteration_s": summarize(times),
        "iteration_times_s": times,
        "host_s_per_iteration": summarize(host_times)["median"],
        "s_per_iteration_back_to_back": back_to_back,
        **diagnostics,
    }


# ---------------------------------------------------------------------------------------------------------------------
# main


def erasure_targets(report: dict) -> dict:
    """design.md section 7 at Infinity-2B size, batch 2, LoRA: an iteration <= 1.4 s at <= 20 GiB, a whole run
    <= 13 min. Reference code (full fine-tune of cross-attention + FFN, full-block checkpointing): 4.24 s, 19.03 GiB,
    about 38-40 min, 1.18 s per anchor image."""
    return {"s_per_iteration": target_check(report["s_per_iteration"], 1.4, 4.24),
            "peak_memory_gib": target_check(report["peak_memory_gib"], 20.0, 19.03),
            "projected_run_min": target_check(report["projected_run_min"], 13.0, "38-40"),
            "anchor_s_per_prompt": {"measured": report["anchor_s_per_prompt"], "reference": 1.18}}


def run(args, device: torch.device) -> dict:
    """Anchors, then training, on a fresh random-weight pipeline; the report without settings and environment."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=device.type == "cpu")
    log(f"building {args.config} with random weights on {accelerator.device}")
    full_text_encoder = args.config == "infinity-2b" and not args.stub_text_encoder
    pipe = build_pipeline(args.config, accelerator.device, DTYPES[args.dtype], DTYPES[args.dtype], args.seed,
                          full_text_encoder=full_text_encoder)
    fp8 = apply_fp8(pipe, args.fp8, args.fp8_fast_accum)
    config = erasure_config(args)
    pairs = make_pairs(args.anchor_prompts)
    log(f"anchors: {len(pairs)} safe prompts, batch {args.anchor_batch_size} (after one warm-up batch)"
        + ("" if device.type != "cuda" or args.no_anchor_cuda_graphs else ", CUDA graphs"))
    anchors, anchor_report = time_anchors(pipe, [p.safe for p in pairs], config, args, device)
    train_report = time_training(pipe, config, pairs, anchors, accelerator, args)
    projected = (anchor_report["anchor_capture_overhead_s"]
                 + args.projected_pairs * anchor_report["anchor_s_per_prompt"]
                 + args.projected_iterations * train_report["s_per_iteration"])
    # the first iteration's extra time: AdamW state allocation and, with --compile, the compilation
    first_extra = max(0.0, train_report["first_iteration_s"] - train_report["s_per_iteration"])
    return {
        **train_report,
        **anchor_report,
        "projected_run_s": projected,
        "projected_run_min": projected / 60,
        "projected_run_with_first_iteration_min": (projected + first_extra) / 60,
        "text_encoder_parameters": count_parameters(pipe.text_encoder),
        "finetune_mode": config.finetune_mode,
        "num_processes": accelerator.num_processes,
        "global_batch_size": args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes,
        "is_main_process": accelerator.is_main_process,
        "erasure_config": config.to_dict(),
        "schedule": schedule_info(anchors.schedule),
        "transformer_config": dict(pipe.transformer.config),
        "fp8": fp8,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    set_backend_flags(args.tf32, cudnn_benchmark=False)
    with fresh_accelerate_state():
        with sdpa_backends(args.sdpa_backends):
            report = run(args, device)
    result = {"benchmark": "erasure", "config": args.config, **report,
              "settings": {k: v for k, v in vars(args).items() if k != "output_json"},
              "environment": environment(device)}
    if args.config == "infinity-2b" and device.type == "cuda" and report["num_processes"] == 1:
        result["targets"] = erasure_targets(report)
    if not report["is_main_process"]:  # under accelerate launch only the main process reports
        return result
    return emit(result, args.output_json)


if __name__ == "__main__":
    main()
