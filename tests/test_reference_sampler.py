"""benchmarks/bench_reference_sampler.py: the flash_attn stand-in's attention, its errors, and a CPU smoke run of
Infinity's own sampler (only where scripts/get_infinity_reference.sh has put Infinity's code into third_party/, which
CI does not)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
INFINITY_PATH = BENCH_DIR.parent / "third_party" / "infinity"


@pytest.fixture(scope="module")
def ref():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH_DIR))
        yield importlib.import_module("bench_reference_sampler")


def _naive_varlen(q, kv, cu_q, cu_k, scale):
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qi, (ki, vi) = q[cu_q[i]:cu_q[i + 1]], kv[cu_k[i]:cu_k[i + 1]].unbind(1)
        weights = torch.einsum("qhc,khc->hqk", qi, ki).mul(scale).softmax(-1)
        out[cu_q[i]:cu_q[i + 1]] = torch.einsum("hqk,khc->qhc", weights, vi)
    return out


@pytest.mark.parametrize("lens_q, lens_k", [([3, 3], [5, 5]), ([1, 4, 2], [5, 2, 3])])
def test_flash_attn_stand_in_matches_per_sequence_attention(ref, lens_q, lens_k):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens_q), 2, 8, generator=g)
    kv = torch.randn(sum(lens_k), 2, 2, 8, generator=g)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    out = ref.varlen_kvpacked_attention(q, kv, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=0, softmax_scale=0.3)
    torch.testing.assert_close(out, _naive_varlen(q, kv, cu_q.tolist(), cu_k.tolist(), 0.3))


def test_missing_reference_code_names_the_script_that_gets_it(ref, tmp_path):
    with pytest.raises(SystemExit, match="get_infinity_reference.sh"):
        ref.import_infinity(str(tmp_path), "shim", [], torch.device("cpu"))


def test_no_flash_attn_on_cuda_is_an_error_unless_the_stand_in_is_asked_for(ref):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed")
    with pytest.raises(SystemExit, match="--flash_attn shim"):
        ref.install_flash_attn("auto", torch.device("cuda"))
    with pytest.raises(SystemExit, match="not installed"):
        ref.install_flash_attn("real", torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.skipif(not (INFINITY_PATH / "infinity").is_dir(), reason="run scripts/get_infinity_reference.sh first")
@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="Infinity's code imports timm")
def test_reference_sampler_runs_on_the_cpu_at_the_tiny_config(tmp_path):
    stubs = [m for m in ("torchvision", "imageio") if importlib.util.find_spec(m) is None]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(BENCH_DIR.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(BENCH_DIR / "bench_reference_sampler.py"), "--config", "tiny", "--device", "cpu",
               "--batch_sizes", "1", "2", "--warmup", "0", "--iters", "1", "--output_json", str(tmp_path / "r.json"),
               *(["--stub_modules", *stubs] if stubs else [])]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # Infinity's own prints go to stderr
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert report["schedule"]["num_scales"] == 7 and report["schedule"]["total_tokens"] == 521
    assert report["flash_attn"].startswith("shim") or report["flash_attn"].startswith("flash_attn ")
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    for result in report["results"]:
        assert result["rows"] == 2 * result["batch_size"]
        assert 0 < result["sample_s_per_image"] < result["total_s_per_image"]
