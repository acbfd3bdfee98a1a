"""FP8 blocks (``transformer.enable_fp8()``, var_erase.models.fp8): accuracy of the e4m3 matmul, an exact round trip
back to the bf16 path, LoRA training on a frozen FP8 base, clear errors, and the benchmarks' ``--fp8`` switches.

``torch._scaled_mm`` runs on the CPU, so everything but the speed is checked here; ``@pytest.mark.gpu`` tests repeat
the numerics on CUDA (sm_89+).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from torch import nn

from var_erase.models.fp8 import (
    FP8Linear,
    disable_fp8,
    enable_fp8,
    fp8_enabled,
    fp8_supported,
    quantize_rowwise,
)
from var_erase.pipelines.cuda_graphs import model_fingerprint

from ._tiny import LORA_TARGETS, TINY_SIZE, tiny_pipeline, tiny_transformer

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
# e4m3 keeps 3 mantissa bits (relative rounding error <= 2^-4 per element); over a dot product of K random terms the
# errors average out: the relative L2 error of a whole output is about 3% on random data. 6% is the bound checked.
REL_L2_BOUND = 0.06


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear(in_features=64, out_features=48, dtype=torch.bfloat16, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, out_features)).to(dtype)


def _bf16_transformer(seed=0):
    model = tiny_transformer(seed)
    model.transformer_blocks.to(torch.bfloat16)
    return model


def _teacher_forced(model, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    schedule = tiny_pipeline().prepare_schedule(TINY_SIZE, TINY_SIZE)
    inputs = torch.randn(batch, schedule.total_tokens - 1, 8, generator=g)
    states = torch.randn(batch, 5, 32, generator=g)
    return inputs, states, schedule


# ---------------------------------------------------------------------------------------------------------------------
# the FP8 linear layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_matches_the_linear_within_the_e4m3_tolerance(dtype):
    layer = _linear(dtype=dtype)
    x = torch.randn(3, 7, 64, dtype=dtype)
    with torch.no_grad():
        expected = layer(x)
        report = enable_fp8(layer)
        got = layer(x)
    assert report == {"converted": ["0"], "skipped": []} and type(layer[0]) is FP8Linear
    assert got.dtype == dtype and got.shape == (3, 7, 48)
    assert 0 < _rel_l2(got, expected) < REL_L2_BOUND  # FP8 did run (not bitwise the same), within e4m3's rounding
    # and it is exactly the product of the quantized operands (float32 accumulation, bf16 result)
    x_fp8, x_scale = quantize_rowwise(x.reshape(-1, 64))
    reference = (x_fp8.float() * x_scale) @ layer[0].dequantized_weight().t()
    reference = reference.to(torch.bfloat16).to(dtype) + layer[0].bias.to(dtype)
    torch.testing.assert_close(got.reshape(-1, 48), reference, rtol=1e-2, atol=1e-2)


def test_the_bias_in_the_matmul_epilogue_matches_the_bias_added_after_it(monkeypatch):
    import var_erase.models.fp8 as fp8

    layer = _linear()
    enable_fp8(layer)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        fused = layer(x)
        monkeypatch.setitem(fp8._FUSED_BIAS, "cpu", False)  # the path of a device whose _scaled_mm refuses a bias
        separate = layer(x)
    assert not torch.equal(fused, separate)  # two paths: one rounding to bf16 instead of two
    torch.testing.assert_close(fused, separate, rtol=1e-2, atol=1e-2)


def test_a_cpu_scaled_mm_without_rowwise_scales_falls_back_to_the_same_product(monkeypatch):
    """torch 2.11's CPU ``_scaled_mm`` takes per-tensor scales only (an internal assert); the layer then emulates the
    row-wise product in float32, from the same e4m3 operands, and keeps doing so without asking again."""
    import var_erase.models.fp8 as fp8

    layer = _linear()
    enable_fp8(layer)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        native = layer(x)
        calls = []

        def refuse(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("INTERNAL ASSERT FAILED: Now _scaled_mm only supports per-tensor scaling for CPU "
                               "backend.")

        monkeypatch.setattr(torch, "_scaled_mm", refuse)
        monkeypatch.setattr(fp8, "_ROWWISE_SCALED_MM", {})
        emulated = [layer(x), layer(x)]
    assert len(calls) == 1 and fp8._ROWWISE_SCALED_MM == {"cpu": False}
    for got in emulated:
        torch.testing.assert_close(got, native, rtol=1e-2, atol=1e-2)  # summation order and bf16 rounding only
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("other failure")))
    monkeypatch.setattr(fp8, "_ROWWISE_SCALED_MM", {})
    with torch.no_grad(), pytest.raises(RuntimeError, match="other failure"):  # any other error is not swallowed
        layer(x)


def test_rowwise_quantization_keeps_every_row_within_e4m3_range_and_handles_zero_rows():
    w = torch.randn(4, 32) * torch.tensor([[1e-3], [1.0], [1e3], [0.0]])
    w_fp8, scale = quantize_rowwise(w)
    assert w_fp8.dtype == torch.float8_e4m3fn and scale.shape == (4, 1) and torch.isfinite(scale).all()
    assert w_fp8.float().abs().amax(dim=1)[:3].eq(448).all()  # each row's largest value maps to e4m3's maximum
    assert w_fp8[3].float().eq(0).all()  # an all-zero row stays zero (no division by zero)
    assert _rel_l2(w_fp8.float()[:3] * scale[:3], w[:3]) < 0.05


def test_input_gradient_flows_through_the_dequantized_weight_and_the_weight_gets_none():
    layer = _linear(dtype=torch.float32)
    layer.requires_grad_(False)
    enable_fp8(layer)
    x = torch.randn(5, 64, requires_grad=True)
    grad_out = torch.randn(5, 48)
    layer(x).backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ layer[0].dequantized_weight(), rtol=1e-5, atol=1e-5)
    assert layer[0].weight.grad is None and layer[0].bias.grad is None


def test_fp8_output_follows_autocast_and_survives_a_dtype_cast_of_the_module():
    layer = _linear(dtype=torch.float32)
    enable_fp8(layer)
    x = torch.randn(4, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    fp8_bits = layer[0].weight_fp8_bits.clone()
    scale_bits = layer[0].weight_scale_bits.clone()
    layer.to(torch.bfloat16)  # integer-typed buffers: a dtype cast leaves the FP8 weight and its scales exact
    assert torch.equal(layer[0].weight_fp8_bits, fp8_bits) and torch.equal(layer[0].weight_scale_bits, scale_bits)
    assert layer[0].weight_fp8_bits.dtype == torch.uint8 and layer[0].weight_scale_bits.dtype == torch.int32


def test_misaligned_layers_are_kept_and_reported():
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 20), nn.Linear(20, 32)).to(torch.bfloat16)
    report = enable_fp8(model)
    assert report["converted"] == ["0"]
    assert [s.split(":")[0] for s in report["skipped"]] == ["1", "2"] and "multiple of 16" in report["skipped"][0]
    assert [type(m) for m in model] == [FP8Linear, nn.Linear, nn.Linear]
    with torch.no_grad():
        assert model(torch.randn(2, 64, dtype=torch.bfloat16)).shape == (2, 32)


# ---------------------------------------------------------------------------------------------------------------------
# the transformer switch


def test_enable_then_disable_restores_the_bf16_path_bitwise():
    model = _bf16_transformer()
    reference = _bf16_transformer()  # never touched: the default path
    inputs, states, schedule = _teacher_forced(model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = reference(inputs, states, schedule=schedule).sample
        assert torch.equal(model(inputs, states, schedule=schedule).sample, expected)

        report = model.enable_fp8()
        assert model.fp8_enabled and not reference.fp8_enabled
        assert len(report["converted"]) == 2 * 10 and not report["skipped"]  # q, k, v, out x 2 attentions, FFN x 2
        assert model.state_dict().keys() == state_before.keys()  # FP8 copies are not saved with the model
        fp8_out = model(inputs, states, schedule=schedule).sample
        assert 0 < _rel_l2(fp8_out, expected) < REL_L2_BOUND

        assert len(model.disable_fp8()) == 20 and not model.fp8_enabled
        assert torch.equal(model(inputs, states, schedule=schedule).sample, expected)
    assert all(type(m) is not FP8Linear for m in model.modules())
    assert not any("fp8" in name for name, _ in model.named_buffers())
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())


def test_only_the_block_linears_are_converted():
    model = _bf16_transformer()
    model.enable_fp8()
    converted = {name for name, m in model.named_modules() if type(m) is FP8Linear}
    block_linears = {f"transformer_blocks.{i}.{t}" for i in range(2) for t in LORA_TARGETS}
    assert converted == block_linears
    # embeddings, text modules, AdaLN and the head stay as they were
    for module in (model.token_embed, model.proj_out, model.adaln_single.linear, model.norm_out.linear):
        assert type(module) is nn.Linear


def test_enable_twice_requantizes_from_the_current_weight():
    model = _bf16_transformer()
    model.enable_fp8()
    layer = model.transformer_blocks[0].attn1.to_q
    before = layer.weight_fp8_bits.clone()
    with torch.no_grad():
        layer.weight.mul_(2)
    model.enable_fp8()
    assert torch.equal(layer.weight_fp8_bits, before)  # x2 is absorbed by the row scale...
    assert torch.equal(layer.weight_scale_bits.view(torch.float32),
                       quantize_rowwise(layer.weight.detach())[1].t())  # ...which follows the new weight


def test_enable_fp8_changes_the_cuda_graph_fingerprint_and_disable_restores_it():
    model = _bf16_transformer()
    before = model_fingerprint(model)
    model.enable_fp8()
    assert model_fingerprint(model) != before  # captured graphs of the bf16 path are not replayed with FP8 on
    model.disable_fp8()
    assert model_fingerprint(model) == before


# ---------------------------------------------------------------------------------------------------------------------
# LoRA on a frozen FP8 base


@pytest.mark.parametrize("order", ["fp8_then_lora", "lora_then_fp8"])
def test_lora_trains_on_a_frozen_fp8_base(order):
    model = _bf16_transformer()
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    if order == "fp8_then_lora":
        model.enable_fp8()
        model.add_adapter(config, adapter_name="erase")
    else:
        model.add_adapter(config, adapter_name="erase")
        model.enable_fp8()
    model.requires_grad_(False)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for p in lora.values():
        p.requires_grad_(True)
    fp8_layers = [m for m in model.modules() if type(m) is FP8Linear]
    assert len(fp8_layers) == 20  # every base layer, none of the adapter's own layers
    plain = _bf16_transformer()
    plain.add_adapter(config, adapter_name="erase")
    plain_dtypes = {n: p.dtype for n, p in plain.named_parameters() if "lora_" in n}
    assert {n: p.dtype for n, p in lora.items()} == plain_dtypes  # as without FP8 (PEFT's choice)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    fp8_bits = [m.weight_fp8_bits.clone() for m in fp8_layers]

    inputs, states, schedule = _teacher_forced(model, batch=1)
    target = torch.randint(0, 2, (1, schedule.total_tokens, 8), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    losses = []
    for step in range(8):
        logits = model(inputs, states, schedule=schedule).sample
        loss = F.cross_entropy(logits.unflatten(-1, (-1, 2)).flatten(0, 2).float(), target.flatten())
        optimizer.zero_grad()
        loss.backward()
        if step == 1:  # (B is zero at step 0) block 0's adapters get gradients only through block 1's FP8 layers
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)
    assert all(torch.equal(m.weight_fp8_bits, bits) for m, bits in zip(fp8_layers, fp8_bits))


# ---------------------------------------------------------------------------------------------------------------------
# errors


def test_a_trainable_fp8_weight_is_refused_with_the_fix_in_the_message():
    layer = _linear()
    enable_fp8(layer)
    with pytest.raises(RuntimeError, match=r"requires_grad_\(False\).*disable_fp8"):
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
    with torch.no_grad():  # inference with the same module is fine
        assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).shape == (2, 48)


def test_unsupported_devices_and_dtypes_are_refused_before_anything_is_converted():
    assert fp8_supported("cpu") == (True, "")
    ok, why = fp8_supported("meta")
    assert not ok and "CUDA (sm_89+) or the CPU" in why
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(64, 48))
    with pytest.raises(RuntimeError, match="not on meta"):
        enable_fp8(meta)
    assert type(meta[0]) is nn.Linear
    mixed = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 32))
    mixed[1].to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="1: enable_fp8 converts float32/bf16/fp16 weights"):
        enable_fp8(mixed)
    assert not fp8_enabled(mixed)  # the first layer was not converted either
    with pytest.raises(ValueError, match="no linear layer could be converted"):
        enable_fp8(nn.Sequential(nn.Linear(20, 30)))


def test_disable_without_enable_is_a_no_op():
    layer = _linear()
    assert disable_fp8(layer) == [] and type(layer[0]) is nn.Linear


# ---------------------------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_fp8_on_cuda_matches_the_cpu_numerics_forward_and_backward():
    ok, why = fp8_supported("cuda")
    if not ok:
        pytest.skip(why)
    layer = _linear(in_features=256, out_features=512).cuda().requires_grad_(False)
    x = torch.randn(33, 256, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    expected = layer(x)
    enable_fp8(layer)
    got = layer(x)
    assert got.dtype == torch.bfloat16 and 0 < _rel_l2(got, expected) < REL_L2_BOUND
    got.float().sum().backward()
    expected_grad = torch.ones(33, 512, device="cuda") @ layer[0].dequantized_weight()
    torch.testing.assert_close(x.grad.float(), expected_grad, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_pipeline_samples_with_fp8_blocks_and_cuda_graphs():
    if not fp8_supported("cuda")[0]:
        pytest.skip(fp8_supported("cuda")[1])
    pipe = tiny_pipeline().to("cuda")
    pipe.transformer.transformer_blocks.to(torch.bfloat16)
    pipe.transformer.enable_fp8()

    def generate():
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt").images

    eager = generate()
    pipe.enable_cuda_graphs(text_bucket=1)  # the eager call's shapes exactly (no text padding): the same kernels
    graphed = [generate() for _ in range(2)]  # capture, then replay
    assert eager.shape == (1, 3, TINY_SIZE, TINY_SIZE)
    assert torch.equal(graphed[0], eager) and torch.equal(graphed[1], eager)


# ---------------------------------------------------------------------------------------------------------------------
# benchmark switches (CPU smoke runs at the tiny config)


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH_DIR))
        import importlib

        yield importlib.import_module


TINY = ["--config", "tiny", "--device", "cpu"]


@pytest.mark.slow
def test_sampling_benchmark_fp8_switch(bench, capsys):
    report = bench("bench_sampling").main(TINY + ["--batch_sizes", "1", "--warmup", "0", "--iters", "1", "--fp8"])
    capsys.readouterr()
    assert report["fp8"]["converted_layers"] == 20 and report["fp8"]["skipped_layers"] == []
    assert report["fp8"]["fp8_weights_gib"] > 0 and report["results"][0]["total_s_per_image"] > 0
    plain = bench("bench_sampling").main(TINY + ["--batch_sizes", "1", "--warmup", "0", "--iters", "1"])
    assert plain["fp8"] is None
    with pytest.raises(SystemExit):
        bench("bench_sampling").parse_args(["--fp8_fast_accum"])
    assert "--fp8_fast_accum needs --fp8" in capsys.readouterr().err


@pytest.mark.slow
def test_erasure_benchmark_fp8_switch_trains_the_lora(bench, capsys):
    from accelerate.state import AcceleratorState

    report = bench("bench_erasure").main(TINY + ["--warmup", "1", "--iters", "1", "--anchor_prompts", "2",
                                                 "--anchor_batch_size", "2", "--fp8"])
    capsys.readouterr()
    assert report["fp8"]["converted_layers"] == 20
    assert report["trainable_all_changed"] and report["trainable_all_received_grad"]
    assert report["finetune_mode"] == "lora" and report["s_per_iteration"] > 0
    assert not AcceleratorState._shared_state
    with pytest.raises(SystemExit):
        bench("bench_erasure").parse_args(["--fp8", "--full_finetune"])
    assert "--fp8 converts the frozen base weights" in capsys.readouterr().err


@pytest.mark.slow
def test_fp8_quality_benchmark_reports_drift_adherence_and_a_grid(bench, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    report = bench("bench_fp8_quality").main(TINY + ["--toy_prompts", "2", "--toy_images_per_prompt", "1",
                                                     "--grid_prompts", "2", "--grid", str(grid),
                                                     "--output_json", str(tmp_path / "q.json")])
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "q.json").read_text())
    for drift in (report["drift"], report["toy"]["drift"]):
        assert len(drift["per_scale"]) == 7 and drift["total_tokens"] == 521
        assert all(0 <= r["kl_mean"] <= r["kl_max"] and 0 <= r["argmax_flip_share"] <= 1
                   for r in drift["per_scale"])
        assert 0 < drift["logit_rel_l2_max"] < 0.5
    toy = report["toy"]
    assert set(toy["adherence"]) == {"fp32", "bf16", "fp8"} and toy["adherence"]["fp8"]["n_images"] == 2
    assert set(toy["fp8_minus_bf16"]) == {"shape", "colour", "style", "all"}
    from PIL import Image

    with Image.open(grid) as image:  # 2 rows of [bf16 | fp8] 64x64 images with 2-pixel gaps
        assert image.size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)


def test_toy_variants_are_made_from_the_float32_weights_each_time(bench):
    quality = bench("bench_fp8_quality")
    pipe = tiny_pipeline()
    blocks = pipe.transformer.transformer_blocks
    original = {k: v.clone() for k, v in blocks.state_dict().items()}
    for variant in ("bf16", "fp8", "fp32"):
        quality.set_toy_variant(pipe, variant, False, original)
        assert pipe.transformer.fp8_enabled == (variant == "fp8")
        assert blocks[0].attn1.to_q.weight.dtype == (torch.float32 if variant == "fp32" else torch.bfloat16)
    assert all(torch.equal(v, original[k]) for k, v in blocks.state_dict().items())  # not bf16-rounded


def test_bit_drift_is_zero_for_equal_logits_and_positive_otherwise(bench):
    quality = bench("bench_fp8_quality")
    schedule = tiny_pipeline().prepare_schedule(TINY_SIZE, TINY_SIZE)
    logits = torch.randn(1, schedule.total_tokens, 16)
    same = quality.bit_drift(logits, logits, schedule)
    assert all(r["kl_max"] == 0 and r["argmax_flip_share"] == 0 and r["logit_rel_l2"] == 0 for r in same)
    flipped = quality.bit_drift(logits, -logits, schedule)  # every bit's distribution mirrored
    assert all(r["kl_mean"] > 0 and r["argmax_flip_share"] > 0.9 for r in flipped)


@pytest.mark.slow
def test_fp8_suite_runs_end_to_end_on_the_cpu(tmp_path):
    """``run_fp8_suite.sh`` at the tiny config on the CPU: every JSON, the grid and the summary."""
    repo = BENCH_DIR.parent
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": sys.executable, "SUITE_CONFIG": "tiny",
           "SUITE_DEVICE": "cpu", "SUITE_SMALL": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(BENCH_DIR / "run_fp8_suite.sh")], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "fp8_summary.json").read_text())
    assert summary["missing"] == [] and summary["device"] == "cpu"
    assert [r["batch_size"] for r in summary["sampling"]] == [1, 2]
    assert all(r["speedup"] > 0 for r in summary["sampling"]) and summary["erasure"]["speedup"] > 0
    assert summary["erasure"]["fp8_checks"] == {"trainable_all_changed": True, "trainable_all_received_grad": True}
    assert (tmp_path / "fp8_grid.png").stat().st_size > 0 and "sampling B=1: bf16" in done.stdout


def _fresh_compiled_kernels(monkeypatch, fp8, recompile_limit: int | None = None):
    import torch._dynamo

    monkeypatch.setitem(fp8._COMPILED, "enabled", True)
    for name in [k for k in fp8._COMPILED if k != "enabled"]:
        monkeypatch.delitem(fp8._COMPILED, name)
    if recompile_limit is not None:
        monkeypatch.setattr(torch._dynamo.config, "recompile_limit", recompile_limit)
    torch._dynamo.reset()


@pytest.mark.slow
def test_training_compiles_the_quantization_kernels_once(monkeypatch, recwarn):
    """An erasure step feeds the quantization views of several bases and inputs that require a gradient; the kernels
    get them detached, so one compilation (dynamic shapes) serves every layer, both steps and the backward: no
    recompilation (dynamo is told to fail on one), no eager fallback. Compiled for the CPU here (CUDA in use)."""
    import torch._dynamo

    from var_erase.erasure.anchors import sample_anchors
    from var_erase.erasure.config import ErasureConfig
    from var_erase.erasure.prompts import PromptPair
    from var_erase.erasure.trainer import ErasureTrainer
    from var_erase.models import fp8

    _fresh_compiled_kernels(monkeypatch, fp8)
    monkeypatch.setattr(fp8, "_COMPILE_ON", {"cpu", "cuda"})
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    pairs = [PromptPair("a red circle", "a red square", "circle"),
             PromptPair("a blue circle", "a blue square", "circle")]
    pipe = tiny_pipeline()
    pipe.transformer.transformer_blocks.to(torch.bfloat16)
    anchors = sample_anchors(pipe, [p.safe for p in pairs], anchors_per_prompt=1, progress=False)
    pipe.transformer.enable_fp8()
    trainer = ErasureTrainer(pipe, ErasureConfig(learning_rate=1e-3, max_train_steps=2), pairs, anchors)
    trainer.train(progress=False)
    assert fp8._COMPILED["enabled"] is True and {"quantize_rowwise", "dequantize_rowwise"} <= set(fp8._COMPILED)
    assert not [w for w in recwarn if "runs eagerly" in str(w.message)]


@pytest.mark.gpu
def test_hitting_the_recompile_limit_falls_back_to_the_eager_kernels(monkeypatch):
    """Should the fused quantization recompile past dynamo's limit (as it did in the erasure benchmark on an H200,
    before its inputs were detached), the kernels run eagerly with a warning instead of failing the run. Here each
    new dtype forces a recompilation past a limit of 1."""
    from var_erase.models import fp8

    _fresh_compiled_kernels(monkeypatch, fp8, recompile_limit=1)
    with pytest.warns(UserWarning, match="runs eagerly"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = torch.randn(40, 64, device="cuda", dtype=dtype)
            got = fp8.quantize_rowwise_fused(x)
            want = fp8.quantize_rowwise(x)
            assert all(torch.equal(g.float(), w.float()) for g, w in zip(got, want))
    assert fp8._COMPILED["enabled"] is False
