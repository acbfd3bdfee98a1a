"""The benchmark scripts (benchmarks/) run end to end at the tiny config on the CPU and report sane numbers.

These are smoke runs, not timings: the real measurements are made on a GPU (docs/performance.md).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--config", "tiny", "--device", "cpu", "--warmup", "1"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def bench():
    """Import a benchmark script by name (they import their shared ``bench_common`` as a sibling module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH_DIR))
        yield importlib.import_module


def _assert_positive(report: dict, keys: list[str]) -> None:
    for key in keys:
        value = report[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)


def test_sampling_benchmark_reports_every_batch_size(bench, tmp_path, capsys):
    out = tmp_path / "sampling.json"
    report = bench("bench_sampling").main(TINY + ["--batch_sizes", "1", "2", "--iters", "2", "--output_json", str(out),
                                                  "--sdpa_backends", "math", "--profile_dir", str(tmp_path / "prof")])
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())  # stdout holds only the JSON
    assert report["schedule"]["total_tokens"] == 521 and [r["batch_size"] for r in report["results"]] == [1, 2]
    for result in report["results"]:
        assert result["rows"] == 2 * result["batch_size"]  # guidance: conditional + unconditional in one batch
        _assert_positive(result, ["transformer_s_per_image", "vae_decode_s_per_image", "total_s_per_image",
                                  "tokens_per_s", "achieved_tflops", "mfu", "peak_memory_gib",
                                  "model_tflop_per_image"])
        assert result["total_s_per_image"] == pytest.approx(
            result["transformer_s_per_image"] + result["vae_decode_s_per_image"])
        profile = result["profile"]  # one profiled generation: the operator table is written, CPU time measured
        assert Path(profile["profile_table"]).read_text().count("aten::") > 5 and profile["profiled_wall_s"] > 0
        assert profile["gpu_busy"] is None and profile["kernel_launches"] == 0  # no GPU kernels on the CPU
    _assert_positive(report["parameters"], ["transformer", "vae"])
    assert report["environment"]["torch"] and "targets" not in report  # targets only at Infinity-2B size


def test_flop_count_matches_the_architecture_and_infinity_2b(bench):
    """The per-token linear term is 2 x the block's matmul weights that act on image tokens; at Infinity-2B, 1024x1024
    with guidance, one image is about 115 TFLOP (79 in linear layers, 36 in self-attention)."""
    common, sampling = bench("bench_common"), bench("bench_sampling")
    pipe = common.build_pipeline("tiny", common.resolve_device("cpu"), *[common.DTYPES["fp32"]] * 2)
    block = pipe.transformer.transformer_blocks[0]
    image_side = [block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.attn1.to_out, block.attn2.to_q,
                  block.attn2.to_out, block.ff.net[0].proj, block.ff.net[2]]
    per_token = sum(m.weight.numel() for m in image_side)
    config, schedule = dict(pipe.transformer.config), pipe.prepare_schedule(64, 64)
    flops = sampling.sampling_flops(config, schedule, rows=1, text_len=8)
    assert flops["linear"] == 2 * per_token * config["num_layers"] * schedule.total_tokens

    big = sampling.ScaleSchedule.for_image_size(1024, 1024)
    flops = sampling.sampling_flops(common.CONFIGS["infinity-2b"]["transformer"], big, rows=2, text_len=24)
    assert big.total_tokens == 10521
    assert flops["linear"] / 1e12 == pytest.approx(79.08, abs=0.01)
    assert flops["self_attn"] / 1e12 == pytest.approx(35.91, abs=0.01)
    assert flops["total"] / 1e12 == pytest.approx(115.15, abs=0.01)


@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_erasure_benchmark_trains_every_tensor(bench, tmp_path, capsys, full_finetune):
    from accelerate.state import AcceleratorState

    args = TINY + ["--iters", "1", "--anchor_prompts", "2", "--anchor_batch_size", "2"]
    # the full fine-tune runs its batch of 2 as two micro-batches of 1
    extra = ["--full_finetune", "--batch_size", "1", "--gradient_accumulation_steps", "2"] if full_finetune else []
    report = bench("bench_erasure").main(args + extra + ["--profile_dir", str(tmp_path), "--gap_report",
                                                         "--sync_report"])
    assert report["global_batch_size"] == 2
    assert report["gap_report"] is None and report["sync_report"] is None  # device timelines: CUDA only
    assert Path(report["profile"]["profile_table"]).name == f"erasure_{'full' if full_finetune else 'lora'}.txt"
    assert "Input Shapes" in Path(report["profile"]["profile_table_by_shape"]).read_text()
    assert json.loads(capsys.readouterr().out)["s_per_iteration"] == report["s_per_iteration"]
    _assert_positive(report, ["s_per_iteration", "peak_memory_gib", "anchor_s_per_prompt", "projected_run_s",
                              "projected_run_min", "trainable_parameters", "first_iteration_s",
                              "host_s_per_iteration", "s_per_iteration_back_to_back"])
    assert report["host_s_per_iteration"] <= max(report["iteration_times_s"])
    assert report["anchor_cuda_graphs"] is False and report["anchor_capture_overhead_s"] >= 0  # graphs: CUDA only
    assert report["projected_run_s"] == pytest.approx(report["anchor_capture_overhead_s"]
                                                      + 50 * report["anchor_s_per_prompt"]
                                                      + 500 * report["s_per_iteration"])
    assert report["projected_run_with_first_iteration_min"] * 60 == pytest.approx(
        report["projected_run_s"] + max(0.0, report["first_iteration_s"] - report["s_per_iteration"]))
    assert report["trainable_all_changed"] and report["trainable_all_received_grad"]
    assert report["lora_all_changed"] is (None if full_finetune else True)
    assert report["finetune_mode"] == ("full" if full_finetune else "lora")
    assert report["trainable_parameters"] < report["total_parameters"]
    assert math.isfinite(report["first_step_logs"]["loss"]) and math.isfinite(report["first_step_logs"]["pre"])
    assert not AcceleratorState._shared_state  # the run leaves no accelerate state behind for other tests


def test_attention_benchmark_times_the_per_scale_path(bench):
    report = bench("bench_attention").main(["--config", "tiny", "--device", "cpu", "--no_compile", "--iters", "1"])
    result = report["results"]["per_scale_sdpa"]
    assert 0 < result["forward_ms"] and 0 < result["forward_backward_ms"]
    assert result["max_abs_diff_vs_per_scale"] == 0.0 and 0.5 < report["visible_share"] < 1


def test_timeline_gaps_count_overlaps_once_and_name_the_longest_gap(bench):
    spans = [(0.0, 10.0, "a"), (5.0, 20.0, "b"), (20.0, 30.0, "c"), (130.0, 140.0, "d"), (150.0, 160.0, "e")]
    report = bench("bench_common").timeline_gaps(spans, top=1)
    assert report["kernels"] == 5 and report["timeline_s"] == pytest.approx(160e-6)
    assert report["gpu_busy_s"] == pytest.approx(50e-6) and report["gpu_idle_s"] == pytest.approx(110e-6)
    assert report["gaps_over_50us"] == 1 and report["idle_in_gaps_over_50us_s"] == pytest.approx(100e-6)
    assert report["longest_gaps"] == [{"us": 100.0, "after": "c", "before": "d"}]
    assert bench("bench_common").timeline_gaps([]) == {"kernels": 0}


def test_sampling_benchmark_runs_as_a_script(tmp_path):
    """``PYTHONPATH=src python benchmarks/bench_sampling.py ...``, as on the GPU machine: one JSON object on stdout."""
    repo = BENCH_DIR.parent
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(BENCH_DIR / "bench_sampling.py"), *TINY[:4], "--batch_sizes", "1", "--warmup", "0",
               "--iters", "1"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["results"][0]["total_s_per_image"] > 0


def test_erasure_benchmark_refuses_too_few_anchor_prompts_for_the_accumulated_batch(bench, capsys):
    with pytest.raises(SystemExit):
        bench("bench_erasure").parse_args(["--batch_size", "2", "--gradient_accumulation_steps", "2",
                                          "--anchor_prompts", "3"])
    assert "batch_size x --gradient_accumulation_steps (4)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench("bench_erasure").parse_args(["--gradient_accumulation_steps", "0"])
    assert "--gradient_accumulation_steps must be >= 1" in capsys.readouterr().err


def test_offload_benchmark_reports_every_mode_and_skips_offloading_without_cuda(bench, tmp_path, capsys):
    out = tmp_path / "offload.json"
    report = bench("bench_offload").main(TINY[:4] + ["--warmup", "0", "--iters", "1", "--output_json", str(out)])
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())  # stdout holds only the JSON
    results = {r["mode"]: r for r in report["results"]}
    assert list(results) == ["none", "model_cpu_offload", "sequential_cpu_offload", "group_block", "group_leaf"]
    none = results.pop("none")
    _assert_positive(none, ["first_call_s", "peak_memory_gib", "setup_s"])
    _assert_positive(none["s_per_image"], ["median", "mean", "min", "max"])
    assert none["max_abs_diff_vs_none"] == 0.0 and none["matches_none"] is True
    assert all("CUDA" in r["skipped"] and len(r) == 2 for r in results.values())
    assert report["fits"]["below_12_gib"] == [] and report["fits"]["peak_reserved_gib"] == {}
    assert (report["height"], report["batch_size"], report["text_encoder"]) == (64, 1, "stub (one T5 layer)")
    assert report["environment"]["device"] == "cpu" and report["settings"]["guidance_scale"] == 4.0


def test_offload_modes_give_the_plain_image_and_leave_the_base_pipeline_without_hooks(bench, monkeypatch):
    """The hooks also run with the CPU as the execution device: each mode's copy gives the ``none`` image, the base
    pipeline stays hook-free, and a mode that raises is reported without stopping the run."""
    offload = bench("bench_offload")
    args = offload.parse_args(TINY[:4] + ["--warmup", "0", "--iters", "1"])
    cpu, base = offload.resolve_device("cpu"), offload.build_base(args)
    results, images = [], {}
    for mode in ("none", "model_cpu_offload", "group_block"):
        result, images[mode] = offload.measure_mode(base, mode, args, cpu)
        results.append(result)
    def out_of_memory(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(offload, "apply_mode", out_of_memory)
    results.append(offload.run_mode(base, "none", args, cpu)[0])
    offload.compare_to_none(results, images)
    assert [r.get("max_abs_diff_vs_none") for r in results] == [0.0, 0.0, 0.0, None]
    assert results[-1] == {"mode": "none", "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert not any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook")
                   for m in (base.text_encoder, base.transformer, base.vae))
    fits = offload.fits_summary([{"mode": "a", "peak_reserved_gib": 11.9}, {"mode": "b", "peak_reserved_gib": 12.0},
                                 {"mode": "c", "error": "OutOfMemoryError"}])
    assert fits["below_12_gib"] == ["a"] and fits["below_16_gib"] == ["a", "b"]
