"""Time Infinity's own sampler: FoundationVision/Infinity's ``Infinity.autoregressive_infer_cfg`` with random weights.

This is the reference beside ``bench_sampling.py`` (our ``VARPipeline``): run both in one call on one machine and
compare their numbers as ratios. Infinity's code is not part of this project: ``scripts/get_infinity_reference.sh``
puts its ``infinity/`` package into ``third_party/infinity/`` (git-ignored), and this script imports it from there
(``--infinity_path``).

What is built, as Infinity's ``tools/run_infinity.py`` builds it for ``scripts/infer.sh`` (``model_type=infinity_2b``,
``vae_type=32``, ``pn=1M``): the d32 BSQ VAE from ``infinity.models.bsq_vae.vae.vae_model`` (patch size 16, channel
multipliers 1-2-4-4-4; no checkpoint, so random weights, float32) and ``Infinity`` with depth 32, width 2048, 16 heads,
MLP ratio 4, 8 block chunks, text width 2048, ``shared_aln``, ``fused_norm``, ``pad_to_multiplier=128``, bit labels,
2D RoPE normalised by h/w (mode 2), the level embedding on the first block only, ``customized_flash_attn=False`` (the
self-attention runs through ``scaled_dot_product_attention``) and its blocks cast to bf16; every call runs under bf16
autocast. The sampler gets random Flan-T5-XL-shaped text features, ``(kv_compact, lens, cu_seqlens_k, max_seqlen_k)``
with ``--text_len`` tokens per prompt, the 13-scale 1024x1024 schedule (``dynamic_resolution_h_w[1.0]['1M']``), cfg 4
on the logits (``cfg_insertion_layer=[0]``, run_infinity's default), tau 0.5, top-k 900, top-p 0.97.

Two timings per batch size (medians of ``--iters`` after ``--warmup``, CUDA-synchronised host wall time):
``sample_s``: ``autoregressive_infer_cfg(..., ret_img=False)`` (the transformer's 13 scales and the VAE quantizer's
code upsampling, no decode) and ``total_s``: ``ret_img=True`` (plus ``vae.decode`` and the uint8 conversion), which is
what run_infinity times as "infinity cost". ``--no_decode`` skips the second.

Dependencies: Infinity's modules import ``timm``, ``einops``, ``pytz``, ``tqdm``, ``safetensors``, ``torchvision`` and
``imageio`` at module level; a missing one stops the script with its name. Its ``infinity/models/basic.py`` also
imports ``flash_attn`` at module level, and its cross-attention (text) always calls
``flash_attn_varlen_kvpacked_func``: there is no non-flash path for it. ``--flash_attn shim`` installs a stand-in
``flash_attn`` module whose ``flash_attn_varlen_kvpacked_func`` runs ``scaled_dot_product_attention`` per sequence
(batched when every sequence has the maximum length, as here); the report says which one ran (key ``flash_attn``).
``--flash_attn auto`` (default) takes the real package when it imports, else the shim on the CPU, and stops on CUDA.
``--stub_modules torchvision imageio`` replaces those two (imported by the VAE's module, never called by the sampler
or the decode) with empty modules where they cannot be installed, as on a CPU-only torch without torchvision.

The CPU smoke path: ``--config tiny --device cpu`` builds 2 blocks of width 128 (2 heads, text width 256) with the
same VAE, on the 7-scale 256x256 schedule (``'0.06M'``, the smallest one Infinity's RoPE tables cover); the fused
norm (``torch.compile``) is off on the CPU unless ``--fused_norm``.

Examples::

    INFINITY_GIT=/path/to/Infinity.git bash scripts/get_infinity_reference.sh
    PYTHONPATH=src python benchmarks/bench_reference_sampler.py --flash_attn shim --batch_sizes 1 8 \\
        --output_json outputs/bench/reference_sampler.json
    PYTHONPATH=src python benchmarks/bench_reference_sampler.py --config tiny --device cpu --batch_sizes 1 \\
        --warmup 0 --iters 1 --stub_modules torchvision imageio
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import math
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import emit, environment, log, peak_memory, reset_peak_memory, resolve_device, synchronize

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INFINITY_PATH = REPO_ROOT / "third_party" / "infinity"
GET_SCRIPT = "scripts/get_infinity_reference.sh"

CONFIGS: dict[str, dict] = {
    # tools/run_infinity.py's infinity_2b kwargs, vae_type=32, pn=1M (1024x1024, 13 scales), Flan-T5-XL text width
    "infinity-2b": {"model": dict(depth=32, embed_dim=2048, num_heads=16, drop_path_rate=0.1, mlp_ratio=4,
                                  block_chunks=8),
                    "text_channels": 2048, "vae_type": 32, "pn": "1M"},
    # CPU smoke size: 2 blocks of width 128, 2 heads of 64, text width 256 (2 attention-pool heads), 256x256
    "tiny": {"model": dict(depth=2, embed_dim=128, num_heads=2, drop_path_rate=0.0, mlp_ratio=4, block_chunks=2),
             "text_channels": 256, "vae_type": 32, "pn": "0.06M"},
}
"""Reference configurations: ``Infinity`` keyword arguments, text width, VAE bits and the schedule's pixel key."""

REQUIRED_MODULES = ("timm", "einops", "pytz", "tqdm", "safetensors", "numpy", "PIL", "torchvision", "imageio")
STUBBABLE_MODULES = ("torchvision", "imageio")
TEXT_MAXLEN = 512  # run_infinity's load_infinity


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--infinity_path", default=str(DEFAULT_INFINITY_PATH),
                   help=f"folder holding Infinity's infinity/ package (made by {GET_SCRIPT})")
    p.add_argument("--config", choices=sorted(CONFIGS), default="infinity-2b")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1], help="images per call (e.g. 1 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per batch size and mode")
    p.add_argument("--iters", type=int, default=5, help="timed calls per batch size and mode")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale on the logits (scripts/infer.sh: 4)")
    p.add_argument("--tau", type=float, default=0.5, help="sampling temperature (scripts/infer.sh: 0.5)")
    p.add_argument("--top_k", type=int, default=900)
    p.add_argument("--top_p", type=float, default=0.97)
    p.add_argument("--text_len", type=int, default=24, help="text tokens per prompt of the random text features")
    p.add_argument("--no_decode", action="store_true", help="time only ret_img=False (no VAE decode)")
    p.add_argument("--flash_attn", choices=["auto", "real", "shim"], default="auto",
                   help="the flash_attn package Infinity imports: real, the SDPA stand-in, or real when it imports "
                        "(else the stand-in on the CPU)")
    p.add_argument("--stub_modules", nargs="*", choices=STUBBABLE_MODULES, default=[],
                   help="replace these imported-but-unused modules with empty ones")
    p.add_argument("--fused_norm", action=argparse.BooleanOptionalAction, default=None,
                   help="Infinity's torch.compile'd fused AdaLN (run_infinity: on); default on for CUDA, off on CPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_json", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.warmup < 0 or args.iters < 1 or any(b < 1 for b in args.batch_sizes):
        p.error("--warmup must be >= 0, --iters >= 1 and every batch size >= 1")
    if not 1 <= args.text_len <= TEXT_MAXLEN:
        p.error(f"--text_len must be in [1, {TEXT_MAXLEN}]")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# importing Infinity's code


def varlen_kvpacked_attention(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                              softmax_scale=None, causal=False, **unused):
    """``flash_attn_varlen_kvpacked_func``'s contract through ``scaled_dot_product_attention``.

    ``q``: ``(total_q, H, c)``, ``kv``: ``(total_k, 2, H, c)``; sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``
    of each. When every sequence has the maximum length (known from the shapes, no device sync) the call is one batched
    SDPA; otherwise one SDPA per sequence (which reads the offsets on the host).
    """
    if dropout_p or causal:
        raise NotImplementedError("the flash_attn stand-in supports neither dropout nor causal masks")
    batch = cu_seqlens_q.shape[0] - 1
    heads, dim = q.shape[1], q.shape[2]
    if q.shape[0] == batch * max_seqlen_q and kv.shape[0] == batch * max_seqlen_k:
        qb = q.view(batch, max_seqlen_q, heads, dim).transpose(1, 2)
        k, v = kv.view(batch, max_seqlen_k, 2, heads, dim).unbind(2)
        out = F.scaled_dot_product_attention(qb, k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
        return out.transpose(1, 2).reshape(q.shape)
    out = torch.empty_like(q)
    for qs, qe, ks, ke in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k[:-1].tolist(),
                              cu_seqlens_k[1:].tolist()):
        k, v = kv[ks:ke].unbind(1)
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], scale=softmax_scale)
        out[qs:qe] = o[0].transpose(0, 1)
    return out


def _flash_attn_func_unavailable(*args, **kwargs):
    raise NotImplementedError("the flash_attn stand-in has no flash_attn_func: keep customized_flash_attn=False")


def install_flash_attn(choice: str, device: torch.device) -> str:
    """Make ``import flash_attn`` work for Infinity's ``basic.py``; returns what was installed (for the report)."""
    real = importlib.util.find_spec("flash_attn") is not None
    if choice == "real" or (choice == "auto" and real):
        if not real:
            raise SystemExit("--flash_attn real: the flash_attn package is not installed")
        return f"flash_attn {importlib.import_module('flash_attn').__version__}"
    if choice == "auto" and device.type == "cuda":
        raise SystemExit("Infinity's infinity/models/basic.py imports flash_attn, which is not installed, and its text "
                         "cross-attention has no other path: install flash-attn, or pass --flash_attn shim to run it "
                         "through scaled_dot_product_attention (reported as such)")
    shim = types.ModuleType("flash_attn")
    shim.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    shim.__doc__ = "bench_reference_sampler's stand-in: flash_attn_varlen_kvpacked_func through SDPA"
    shim.flash_attn_varlen_kvpacked_func = varlen_kvpacked_attention
    shim.flash_attn_func = _flash_attn_func_unavailable
    sys.modules["flash_attn"] = shim
    return "shim: flash_attn_varlen_kvpacked_func through torch scaled_dot_product_attention"


def stub_module(name: str) -> types.ModuleType:
    """An empty module registered as ``name`` (with a spec, so that ``find_spec`` still answers for it)."""
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
    return sys.modules[name]


def import_infinity(path: str, flash_attn: str, stubs: list[str], device: torch.device):
    """Import Infinity's model modules from ``path``; returns (infinity module, vae module, dynamic_resolution module,
    the flash_attn description)."""
    root = Path(path)
    if not (root / "infinity" / "models" / "infinity.py").is_file():
        raise SystemExit(f"Infinity's code is not in {root} (no infinity/models/infinity.py): run {GET_SCRIPT} first "
                         "(INFINITY_GIT=<a clone of FoundationVision/Infinity> bash scripts/get_infinity_reference.sh)")
    for name in stubs:
        stub_module(name)
        if name == "torchvision":
            sys.modules["torchvision"].transforms = stub_module("torchvision.transforms")
    missing = [m for m in REQUIRED_MODULES if m not in sys.modules and importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"Infinity's modules import {', '.join(missing)}, which is not installed"
                         + (" (--stub_modules can stand in for torchvision and imageio)"
                            if set(missing) & set(STUBBABLE_MODULES) else ""))
    flash = install_flash_attn(flash_attn, device)
    sys.path.insert(0, str(root.resolve()))
    model = importlib.import_module("infinity.models.infinity")
    vae = importlib.import_module("infinity.models.bsq_vae.vae")
    schedules = importlib.import_module("infinity.utils.dynamic_resolution")
    return model, vae, schedules, flash


# ---------------------------------------------------------------------------------------------------------------------
# building


def build_vae(vae_module, vae_type: int, device: torch.device):
    """run_infinity's ``load_visual_tokenizer`` for ``vae_type`` bits without a checkpoint (random weights)."""
    return vae_module.vae_model(None, "dynamic", vae_type, 2**vae_type, patch_size=16,
                                encoder_ch_mult=[1, 2, 4, 4, 4], decoder_ch_mult=[1, 2, 4, 4, 4],
                                test_mode=True).to(device)


def build_infinity(model_module, vae, spec: dict, fused_norm: bool, device: torch.device):
    """run_infinity's ``load_infinity`` (``scripts/infer.sh`` settings, ``bf16=1``) without loading weights.

    On the CPU the blocks stay float32: CPU autocast leaves their LayerNorms' bf16 weights beside float32 inputs, which
    ``layer_norm`` refuses (CUDA autocast runs them in float32)."""
    with torch.autocast(device.type, dtype=torch.bfloat16), torch.no_grad():
        model = model_module.Infinity(
            vae_local=vae, text_channels=spec["text_channels"], text_maxlen=TEXT_MAXLEN, shared_aln=True,
            raw_scale_schedule=None, checkpointing="full-block", customized_flash_attn=False, fused_norm=fused_norm,
            pad_to_multiplier=128, use_flex_attn=False, add_lvl_embeding_only_first_block=1, use_bit_label=1,
            rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn=spec["pn"], apply_spatial_patchify=0,
            inference_mode=True, train_h_div_w_list=[1.0], **spec["model"],
        ).to(device=device)
    if device.type == "cuda":
        for block in model.unregistered_blocks:
            block.bfloat16()
    model.eval().requires_grad_(False)
    model.rng = torch.Generator(device=device)
    return model


def random_text(batch_size: int, text_len: int, text_channels: int, device: torch.device, seed: int):
    """Random Flan-T5-XL-shaped features in run_infinity's ``encode_prompt`` format: ``(kv_compact (B*T, Ct5) float32,
    lens, cu_seqlens_k int32 (B+1,), max_seqlen_k)``, every prompt ``text_len`` tokens long."""
    g = torch.Generator().manual_seed(seed)
    kv_compact = torch.randn(batch_size * text_len, text_channels, generator=g).to(device)
    lens = [text_len] * batch_size
    cu_seqlens_k = torch.arange(0, text_len * (batch_size + 1), text_len, dtype=torch.int32, device=device)
    return kv_compact, lens, cu_seqlens_k, text_len


# ---------------------------------------------------------------------------------------------------------------------
# timing


def sample_once(model, vae, schedule, text, batch_size: int, args, decode: bool, device: torch.device) -> float:
    """One ``autoregressive_infer_cfg`` call as run_infinity's ``gen_one_img`` makes it; host seconds, synchronised."""
    n = len(schedule)
    synchronize(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=True), torch.no_grad():
        model.autoregressive_infer_cfg(
            vae=vae, scale_schedule=schedule, label_B_or_BLT=text, g_seed=args.seed, B=batch_size,
            negative_label_B_or_BLT=None, force_gt_Bhw=None, cfg_sc=3, cfg_list=[args.cfg] * n,
            tau_list=[args.tau] * n, top_k=args.top_k, top_p=args.top_p, returns_vemb=1, ratio_Bl1=None, gumbel=0,
            norm_cfg=False, cfg_exp_k=0.0, cfg_insertion_layer=[0], vae_type=args.vae_type, softmax_merge_topk=-1,
            ret_img=decode, trunk_scale=1000, gt_leak=0, gt_ls_Bl=None, inference_mode=True, sampling_per_bits=1)
    synchronize(device)
    return time.perf_counter() - start


def time_mode(model, vae, schedule, text, batch_size: int, args, decode: bool, device: torch.device) -> dict:
    samples = []
    for i in range(args.warmup + args.iters):
        seconds = sample_once(model, vae, schedule, text, batch_size, args, decode, device)
        if i >= args.warmup:
            samples.append(seconds)
    return {"median": statistics.median(samples), "mean": statistics.fmean(samples), "min": min(samples),
            "max": max(samples), "samples": samples}


def bench_batch(model, vae, schedule, args, batch_size: int, text_channels: int, device: torch.device) -> dict:
    """Both timings at one batch size, per batch and per image, with the peak memory over both."""
    text = random_text(batch_size, args.text_len, text_channels, device, args.seed)
    reset_peak_memory(device)
    result = {"batch_size": batch_size, "rows": batch_size * (2 if args.cfg != 1 else 1)}
    sample = time_mode(model, vae, schedule, text, batch_size, args, False, device)
    result.update(sample_s_per_image=sample["median"] / batch_size, sample_s_per_batch=sample)
    if not args.no_decode:
        total = time_mode(model, vae, schedule, text, batch_size, args, True, device)
        result.update(total_s_per_image=total["median"] / batch_size, images_per_s=batch_size / total["median"],
                      total_s_per_batch=total)
    result.update(peak_memory(device))
    return result


# ---------------------------------------------------------------------------------------------------------------------
# main


def run_batch(model, vae, schedule, args, batch_size: int, text_channels: int, device: torch.device) -> dict:
    """:func:`bench_batch`, or an error entry when it runs out of memory."""
    log(f"batch size {batch_size}: {args.warmup} warm-up + {args.iters} timed calls per mode")
    try:
        return bench_batch(model, vae, schedule, args, batch_size, text_channels, device)
    except torch.OutOfMemoryError as err:
        return {"batch_size": batch_size, "error": f"out of memory: {str(err).splitlines()[0]}"}
    finally:
        reset_peak_memory(device)


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    spec = CONFIGS[args.config]
    args.vae_type = spec["vae_type"]
    fused_norm = device.type == "cuda" if args.fused_norm is None else args.fused_norm
    if fused_norm:  # Infinity's fullgraph-compiled norm sees each scale's shape, per batch size and dtype: > 8 graphs
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
    with contextlib.redirect_stdout(sys.stderr):  # Infinity prints as it builds; stdout carries only the JSON
        model_module, vae_module, schedules, flash = import_infinity(args.infinity_path, args.flash_attn,
                                                                     args.stub_modules, device)
        torch.manual_seed(args.seed)
        log(f"building Infinity ({args.config}) and its d{args.vae_type} VAE with random weights on {device}")
        vae = build_vae(vae_module, args.vae_type, device)
        model = build_infinity(model_module, vae, spec, fused_norm, device)
        schedule = [(1, h, w) for _, h, w in schedules.dynamic_resolution_h_w[1.0][spec["pn"]]["scales"]]
        results = [run_batch(model, vae, schedule, args, b, spec["text_channels"], device) for b in args.batch_sizes]
    commit_file = Path(args.infinity_path) / "COMMIT"
    return emit({
        "benchmark": "reference_sampler",
        "reference": "FoundationVision/Infinity Infinity.autoregressive_infer_cfg",
        "reference_commit": commit_file.read_text().strip() if commit_file.is_file() else None,
        "config": args.config,
        "model_config": {**spec, "fused_norm": fused_norm, "autocast": "bfloat16",
                         "blocks_dtype": "bfloat16" if device.type == "cuda" else "float32"},
        "schedule": {"num_scales": len(schedule), "total_tokens": sum(math.prod(s) for s in schedule),
                     "grids": [f"{h}x{w}" for _, h, w in schedule], "height": schedule[-1][1] * 16,
                     "width": schedule[-1][2] * 16},
        "flash_attn": flash,
        "stubbed_modules": args.stub_modules,
        "settings": {k: v for k, v in vars(args).items() if k not in ("output_json", "batch_sizes")},
        "parameters": {"transformer": parameters(model), "vae": parameters(vae)},
        "environment": environment(device),
        "results": results,
    }, args.output_json)


if __name__ == "__main__":
    main()
