"""FP8 (e4m3) matmuls for the frozen linear layers of the transformer blocks.

:func:`enable_fp8` converts, in place, the ``nn.Linear`` layers of a module tree (the transformer's blocks: self-
attention q/k/v/out, cross-attention q/k/v/out, the FFN's two projections) into :class:`FP8Linear`:

- the weight is quantized once to ``float8_e4m3fn`` with one float32 scale per output row (``amax(row) / 448``);
- at every call the input is quantized per token (one scale per row of the flattened input, ``amax / 448``);
- ``torch._scaled_mm`` multiplies them with row-wise scaling, float32 accumulation and a bf16 result, cast to the
  input's dtype; a bf16 bias is added in the matmul's epilogue (a bias of another dtype after it, in the output's).

The original weight stays the layer's ``weight`` parameter, unchanged: :func:`disable_fp8` only drops the FP8 copy
and restores the class, so the bf16 path afterwards is bitwise the one before. PEFT sees an ``nn.Linear`` (the class
is a subclass) and wraps it as usual, before or after :func:`enable_fp8`; LoRA's products run in the adapter's own
dtype on the layer's input. The FP8 layer is frozen: its backward returns the input gradient only, computed in the
gradient's dtype with the dequantized weight (``w_fp8 * scale``), so gradients reach the LoRA layers of earlier
blocks; a forward that would need the weight's or bias's own gradient (trainable, with autograd on) is refused.

On CUDA the activation quantization and the backward's dequantization are compiled (``torch.compile``, dynamic
shapes) when :func:`enable_fp8` is called, so that each is one kernel; eager, they would cost more than the FP8
matmul saves. Where that compilation fails, a warning says so and they run eagerly.

Not converted: the embeddings, norms, text modules, AdaLN projections and the head (they sit outside the blocks and
are kept in float32 as the reference does), PEFT's adapter layers (``lora_A``/``lora_B``...), and any layer whose
``in_features`` or ``out_features`` is not a multiple of 16 (``_scaled_mm``'s requirement on CUDA): such a layer stays
in its own dtype and is listed in the report :func:`enable_fp8` returns.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_MIN_SCALE = 1e-12  # an all-zero row or token gets this scale instead of 0 (its quantized values are all 0)
_ALIGNMENT = 16


def fp8_supported(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``torch._scaled_mm`` with e4m3 inputs runs on ``device``, and why not: CUDA needs compute capability
    8.9 or newer (Ada, Hopper and later); the CPU runs it (slowly: it is what the tests use)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True, ""
    if device.type != "cuda":
        return False, f"FP8 matmuls run on CUDA (sm_89+) or the CPU, not on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return False, (f"FP8 matmuls need a GPU of compute capability 8.9 or newer (Ada, Hopper); {name} is "
                       f"sm_{major}{minor}. Run without enable_fp8() (--fp8) on this GPU")
    return True, ""


def quantize_rowwise(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> ``(x_fp8 (M, K) float8_e4m3fn, scale (M, 1) float32)`` with ``x ~= x_fp8 * scale`` row by row."""
    x_MK = x_MK.float()
    scale_M1 = x_MK.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_SCALE) / E4M3_MAX
    x_fp8 = (x_MK / scale_M1).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x_fp8, scale_M1


_COMPILED: dict[str, object] = {"enabled": True}
_COMPILE_ON = {"cuda"}  # device types whose quantization kernels are compiled (a test adds "cpu")


def _fused(fn):
    """``fn`` compiled once (dynamic shapes) on CUDA, where eager would run it as 5-6 memory-bound kernels: the
    quantization then costs one pass over the activations instead of costing more than the FP8 matmul saves. On the
    CPU (tests), inside an outer ``torch.compile`` (which fuses it anyway) and where compiling failed at
    :func:`enable_fp8` (a warning says so) ``fn`` itself runs."""
    def run(x: torch.Tensor, *args):
        if x.device.type not in _COMPILE_ON or torch.compiler.is_compiling() or not _COMPILED["enabled"]:
            return fn(x, *args)
        if fn.__name__ not in _COMPILED:
            _COMPILED[fn.__name__] = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            # detached: no gradient flows through the quantization, and a view's base (its rank, sizes and strides)
            # and requires_grad would each be guarded on, recompiling past dynamo's limit within one training step
            return _COMPILED[fn.__name__](x.detach(), *args)
        except _COMPILER_ERRORS as err:  # e.g. dynamo's recompile limit, hit by views of many shapes while training
            _disable_compiled(err)
            return fn(x, *args)
    return run


_COMPILER_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


def _disable_compiled(err: BaseException) -> None:
    """Run the fused kernels eagerly from now on (slower, same numbers), saying why once."""
    import warnings

    _COMPILED["enabled"] = False
    warnings.warn(f"FP8: compiling the activation quantization failed ({type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else ''}); it runs eagerly (slower)", stacklevel=3)


quantize_rowwise_fused = _fused(quantize_rowwise)


def dequantize_rowwise(w_fp8_NK: torch.Tensor, w_scale_1N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) ``w_fp8 * scale`` in ``dtype``: the weight an FP8 layer multiplies by."""
    return (w_fp8_NK.float() * w_scale_1N.t()).to(dtype)


dequantize_rowwise_fused = _fused(dequantize_rowwise)


# whether torch._scaled_mm takes a bf16 bias with row-wise scales on this device type (added to the float32
# accumulator in the matmul's epilogue); probed by enable_fp8's warm-up on CUDA, where a refusal turns it off
_FUSED_BIAS = {"cpu": True, "cuda": True}


def fp8_matmul(x_MK: torch.Tensor, w_fp8_NK: torch.Tensor, w_scale_1N: torch.Tensor,
               bias_N: torch.Tensor | None = None, use_fast_accum: bool = False) -> torch.Tensor:
    """``x @ w.T + bias`` (M, N) in bf16, with ``x`` quantized per row here and ``w`` given as e4m3 rows and their
    scales; ``bias_N`` must be bf16 (it is added in the epilogue).

    ``torch._scaled_mm`` (the same keywords in torch 2.4-2.13) wants the first operand row-major and the second
    column-major: ``w_fp8_NK.t()`` is, for a contiguous ``(N, K)`` weight. Row-wise scales: ``scale_a`` (M, 1),
    ``scale_b`` (1, N), both float32 and contiguous, with a bf16 result.
    """
    x_fp8, x_scale_M1 = quantize_rowwise_fused(x_MK)
    device = x_MK.device.type
    if _ROWWISE_SCALED_MM.get(device, True):
        try:
            return torch._scaled_mm(x_fp8, w_fp8_NK.t(), scale_a=x_scale_M1, scale_b=w_scale_1N, bias=bias_N,
                                    out_dtype=torch.bfloat16, use_fast_accum=use_fast_accum)
        except RuntimeError as err:
            if device == "cuda" or "per-tensor" not in str(err):
                raise
            _ROWWISE_SCALED_MM[device] = False  # e.g. torch 2.11's CPU kernel: per-tensor scales only
    return emulated_scaled_mm(x_fp8, x_scale_M1, w_fp8_NK, w_scale_1N, bias_N)


# whether torch._scaled_mm takes row-wise scales on a device type other than CUDA (torch 2.11's CPU kernel takes
# per-tensor scales only; 2.13's takes both): learnt from the first refusal, after which the CPU emulates the product
_ROWWISE_SCALED_MM: dict[str, bool] = {}


def emulated_scaled_mm(x_fp8_MK: torch.Tensor, x_scale_M1: torch.Tensor, w_fp8_NK: torch.Tensor,
                       w_scale_1N: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """What ``torch._scaled_mm`` computes with row-wise scales, in float32 arithmetic: the e4m3 operands times their
    scales, multiplied with float32 accumulation, plus the bias, as bf16 (M, N). The CPU's path where its
    ``_scaled_mm`` refuses row-wise scales (same quantized values, so the same numbers up to summation order)."""
    out_MN = (x_fp8_MK.float() * x_scale_M1) @ (w_fp8_NK.float() * w_scale_1N.t()).t()
    if bias_N is not None:
        out_MN = out_MN + bias_N.float()
    return out_MN.to(torch.bfloat16)


class _FP8LinearFunction(torch.autograd.Function):
    """``y = x @ (w_fp8 * scale).T`` in ``out_dtype`` through :func:`fp8_matmul`; the backward gives the input's
    gradient only, ``grad_y @ (w_fp8 * scale)`` in the gradient's dtype (``out_dtype``)."""

    @staticmethod
    def forward(ctx, x_MK, w_fp8_NK, w_scale_1N, bias_N, use_fast_accum: bool, out_dtype: torch.dtype):  # noqa: D102
        ctx.save_for_backward(w_fp8_NK, w_scale_1N)
        ctx.x_dtype = x_MK.dtype
        return fp8_matmul(x_MK, w_fp8_NK, w_scale_1N, bias_N, use_fast_accum).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_MN):  # noqa: D102 - see the class
        w_fp8_NK, w_scale_1N = ctx.saved_tensors
        w_NK = dequantize_rowwise_fused(w_fp8_NK, w_scale_1N, grad_MN.dtype)  # the weight the forward used
        return (grad_MN @ w_NK).to(ctx.x_dtype), None, None, None, None, None


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose forward multiplies by an e4m3 copy of its frozen weight (see the module docstring).

    Made by :func:`enable_fp8` from an existing layer (its class is swapped; nothing is copied but the FP8 weight).
    Buffers, both non-persistent (not in ``state_dict``, so a saved model is the bf16 one) and stored as integer
    views so that ``module.to(dtype)`` leaves them alone:

    - ``weight_fp8_bits`` (N, K) uint8: the e4m3 weight;
    - ``weight_scale_bits`` (1, N) int32: the float32 scale of each output row.
    """

    use_fast_accum: bool = False

    def quantize_weight(self) -> None:
        """(Re)build the FP8 copy from the current ``weight`` (call again after changing the weight)."""
        with torch.no_grad():
            w_fp8_NK, scale_N1 = quantize_rowwise(self.weight.detach())
        self.register_buffer("weight_fp8_bits", w_fp8_NK.view(torch.uint8).contiguous(), persistent=False)
        self.register_buffer("weight_scale_bits", scale_N1.t().contiguous().view(torch.int32), persistent=False)

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) float32: the weight the FP8 forward multiplies by."""
        return dequantize_rowwise(self.weight_fp8_bits.view(torch.float8_e4m3fn),
                                  self.weight_scale_bits.view(torch.float32), torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trainable = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if trainable and torch.is_grad_enabled():
            raise RuntimeError(
                "an FP8 linear layer is frozen but its weight or bias requires a gradient: freeze the base weights "
                "(requires_grad_(False), as LoRA training does) or call transformer.disable_fp8() to train them")
        x_MK = x.reshape(-1, self.in_features)
        if not x_MK.is_contiguous():
            x_MK = x_MK.contiguous()
        w_fp8_NK = self.weight_fp8_bits.view(torch.float8_e4m3fn)
        w_scale_1N = self.weight_scale_bits.view(torch.float32)
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        fused = (self.bias is not None and self.bias.dtype == torch.bfloat16 and out_dtype == torch.bfloat16
                 and _FUSED_BIAS.get(x.device.type, False))
        y_MN = _FP8LinearFunction.apply(x_MK, w_fp8_NK, w_scale_1N, self.bias if fused else None,
                                        self.use_fast_accum, out_dtype)
        if self.bias is not None and not fused:
            y_MN = y_MN + self.bias.to(out_dtype)
        return y_MN.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=e4m3 rowwise, use_fast_accum={self.use_fast_accum}"


def _is_adapter_path(name: str) -> bool:
    """Whether a module name lies inside a PEFT adapter container (``lora_A``, ``lora_B``, ``lora_embedding_A``...)."""
    return any(part.startswith("lora_") for part in name.split("."))


def fp8_candidates(root: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear layers :func:`enable_fp8` acts on: every ``nn.Linear`` (or already :class:`FP8Linear`) under
    ``root`` that is not part of a PEFT adapter. PEFT's ``lora.Linear`` keeps the base layer as ``.base_layer``."""
    return [(name, m) for name, m in root.named_modules()
            if type(m) in (nn.Linear, FP8Linear) and not _is_adapter_path(name)]


def enable_fp8(root: nn.Module, use_fast_accum: bool = False) -> dict[str, list[str]]:
    """Convert the frozen linear layers under ``root`` to :class:`FP8Linear` (in place; idempotent: layers already
    converted are re-quantized from their current weight).

    Args:
        root: the module tree, e.g. ``transformer.transformer_blocks``.
        use_fast_accum: ``torch._scaled_mm``'s fast accumulation (Hopper: faster, accumulates in lower precision).

    Returns:
        ``{"converted": [...names], "skipped": [...'name: reason']}``.

    Raises:
        ValueError: a weight is not floating point, or none of the layers can be converted.
        RuntimeError: the device of the weights cannot run FP8 matmuls (see :func:`fp8_supported`).
    """
    report: dict[str, list[str]] = {"converted": [], "skipped": []}
    candidates = fp8_candidates(root)
    for name, linear in candidates:  # every check before the first conversion: nothing is left half-converted
        ok, why = fp8_supported(linear.weight.device)
        if not ok:
            raise RuntimeError(why)
        if linear.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}: enable_fp8 converts float32/bf16/fp16 weights, got {linear.weight.dtype}")
    for name, linear in candidates:
        if linear.in_features % _ALIGNMENT or linear.out_features % _ALIGNMENT:
            report["skipped"].append(f"{name}: {linear.out_features}x{linear.in_features} is not a multiple of "
                                     f"{_ALIGNMENT} in both dimensions (kept in {linear.weight.dtype})")
            continue
        linear.__class__ = FP8Linear
        linear.use_fast_accum = use_fast_accum
        linear.quantize_weight()
        report["converted"].append(name)
    if candidates and not report["converted"]:
        raise ValueError(f"no linear layer could be converted to FP8: {report['skipped']}")
    _warm_up(root)
    return report


def _warm_up(root: nn.Module) -> None:
    """On CUDA, compile the fused quantization now, once per input width and dtype, rather than in the first
    generation (where a CUDA-graph warm-up or a timed call would pay for it)."""
    seen = set()
    for module in root.modules():
        if type(module) is FP8Linear and module.weight.is_cuda:
            key = (module.in_features, module.weight.dtype)
            if key not in seen:
                seen.add(key)
                for rows in (1, 3):  # one token (scale 0 at batch 1) is a shape of its own; then dynamic
                    x = torch.ones(rows, module.in_features, dtype=module.weight.dtype, device=module.weight.device)
                    _compile_kernels(module, x)
                    _probe_fused_bias(module, x)
                    with torch.inference_mode():
                        module(x)


def _compile_kernels(module: FP8Linear, x: torch.Tensor) -> None:
    """Compile the fused quantization (no-grad and inference mode) and dequantization for ``x``'s shape; if the
    compiler fails here, warn and run them eagerly from now on (slower, same numbers)."""
    if not _COMPILED["enabled"]:
        return
    w_fp8_NK = module.weight_fp8_bits.view(torch.float8_e4m3fn)
    w_scale_1N = module.weight_scale_bits.view(torch.float32)
    try:
        with torch.no_grad():
            quantize_rowwise_fused(x)
            dequantize_rowwise_fused(w_fp8_NK, w_scale_1N, x.dtype)
        with torch.inference_mode():
            quantize_rowwise_fused(x)
    except Exception as err:  # noqa: BLE001 - any compiler failure: fall back to the eager kernels
        _disable_compiled(err)


def _probe_fused_bias(module: FP8Linear, x: torch.Tensor) -> None:
    """Run ``module(x)``; if ``_scaled_mm`` refuses the bias in its epilogue on this device, add it afterwards from
    now on (a separate elementwise kernel)."""
    with torch.no_grad():
        try:
            module(x)
        except RuntimeError:
            if module.bias is None or not _FUSED_BIAS.get(x.device.type, False):
                raise
            _FUSED_BIAS[x.device.type] = False
            module(x)


def disable_fp8(root: nn.Module) -> list[str]:
    """Turn every :class:`FP8Linear` under ``root`` back into the ``nn.Linear`` it was (its weight was never changed),
    dropping the FP8 copies; returns their names."""
    restored = []
    for name, module in root.named_modules():
        if type(module) is FP8Linear:
            del module.weight_fp8_bits, module.weight_scale_bits
            module.__dict__.pop("use_fast_accum", None)
            module.__class__ = nn.Linear
            restored.append(name)
    return restored


def fp8_enabled(root: nn.Module) -> bool:
    """Whether any layer under ``root`` runs in FP8."""
    return any(type(m) is FP8Linear for m in root.modules())
