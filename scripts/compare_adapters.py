"""Compare two LoRA adapters (or any two safetensors state dicts) tensor by tensor, e.g. the adapter of a 2-GPU run
against the one-GPU run with the same global batch and seed.

    python scripts/compare_adapters.py outputs/one_gpu outputs/two_gpus [--rtol 0.02] [--output_json report.json]

Each argument is a folder with ``pytorch_lora_weights.safetensors`` or a ``.safetensors`` file. Prints one JSON
object: per-tensor maximum absolute difference and relative difference ``||a - b|| / ||a||``, the worst relative
difference, the cosine similarity of all tensors flattened together, and ``match`` (every relative difference
<= ``--rtol``). Exit status 1 when they do not match, 2 when the keys or shapes differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def load_state(path: str) -> dict[str, torch.Tensor]:
    file = os.path.join(path, WEIGHT_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file) or not file.endswith(".safetensors"):
        raise SystemExit(f"{path}: expected a .safetensors file or a folder holding {WEIGHT_NAME}")
    return {k: v.float() for k, v in load_file(file).items()}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> dict:
    """The comparison report of two state dicts with the same keys and shapes."""
    if a.keys() != b.keys():
        missing, extra = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        return {"match": False, "error": f"different keys: only in the first {missing[:5]}, only in the second "
                                         f"{extra[:5]}"}
    shapes = [k for k in a if a[k].shape != b[k].shape]
    if shapes:
        return {"match": False, "error": f"different shapes for {shapes[:5]}"}
    tensors = {}
    for key in sorted(a):
        diff = (a[key] - b[key]).norm().item()
        tensors[key] = {"max_abs_diff": (a[key] - b[key]).abs().max().item(),
                        "relative_diff": diff / max(a[key].norm().item(), 1e-12)}
    flat_a, flat_b = (torch.cat([t[k].flatten() for k in sorted(t)]) for t in (a, b))
    worst = max(tensors.items(), key=lambda kv: kv[1]["relative_diff"])
    return {
        "match": worst[1]["relative_diff"] <= rtol,
        "rtol": rtol,
        "tensors_compared": len(tensors),
        "worst_tensor": worst[0],
        "worst_relative_diff": worst[1]["relative_diff"],
        "overall_relative_diff": ((flat_a - flat_b).norm() / flat_a.norm().clamp_min(1e-12)).item(),
        "cosine_similarity": torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0).item(),
        "max_abs_diff": max(t["max_abs_diff"] for t in tensors.values()),
        "per_tensor": tensors,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--rtol", type=float, default=0.02, help="largest accepted ||a - b|| / ||a|| per tensor")
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    report = {"first": args.first, "second": args.second, **compare(load_state(args.first), load_state(args.second),
                                                                     args.rtol)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["match"] else (2 if "error" in result else 1))
