"""Auxiliary visual tokens (VARE): the token trajectories the frozen model draws for the safe prompts.

S-VARE fine-tunes the model under the unsafe prompt ``c*`` while teacher-forcing it along a trajectory ``r^ori`` that
the *original* model sampled for the safe prompt ``c`` (research/paper.md §1.2). The reference
(``tools/preprocess_data.py``) samples one image per safe prompt with guidance 4 on logits, temperature 1, top-k 900,
top-p 0.97 and the seed 42 for every prompt, and stores three things, which :class:`AnchorSet` holds:

- ``bits`` (N, L, d): the sampled bits of every scale (the filtered-CE targets);
- ``inputs`` (N, L - 1, d): the teacher-forcing inputs that replay them (the model's input in every loss);
- ``logits`` (N, L, 2d): the guided logits they were drawn from (the preservation-KL teacher).

It adds ``cond_logits`` (N, L, 2d): the frozen model's *conditional* logits along the same trajectory (no guidance),
the teacher of VARE-basic (paper Eq. 7), so baselines need no second frozen forward during training. They are the
conditional half of the sampler's guidance batch (``VARTrajectory.cond_logits``), which is what a teacher-forced forward
under the prompt along the trajectory computes, within rounding, without running it.

On a GPU the scale loop is replayed as CUDA graphs (:meth:`VARPipeline.enable_cuda_graphs`), captured once for all
batches: prompts are padded to a common text length bucket, so different prompt lengths reuse the graphs.

Anchors are cached as safetensors keyed by the base model, the prompts and the sampling settings, and reused across
runs; several anchors per prompt use seeds ``seed, seed + 1, ...``.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

import safetensors.torch
import torch
from tqdm.auto import tqdm

from ..loaders.lora import adapters_disabled
from ..schedules import ScaleSchedule
from ..utils import atomic_write_bytes


@dataclass
class AnchorSet:
    """Trajectories of the frozen model, row ``i`` drawn for ``prompts[i]`` (a prompt repeats for several anchors)."""

    prompts: list[str]
    bits: torch.Tensor  # (N, L, d) uint8
    inputs: torch.Tensor  # (N, L - 1, d) float32
    logits: torch.Tensor  # (N, L, 2d) float32, guided
    cond_logits: torch.Tensor  # (N, L, 2d) float32, conditional (no guidance)
    schedule: ScaleSchedule
    settings: dict

    def __len__(self) -> int:
        return len(self.prompts)

    def rows_for(self, prompt: str) -> list[int]:
        return [i for i, p in enumerate(self.prompts) if p == prompt]

    def save(self, path: str) -> None:
        """Atomic safetensors write; prompts, schedule and settings go in the header."""
        tensors = {"bits": self.bits.contiguous(), "inputs": self.inputs.contiguous(),
                   "logits": self.logits.contiguous(), "cond_logits": self.cond_logits.contiguous()}
        header = {"prompts": json.dumps(self.prompts), "schedule": json.dumps(self.schedule.to_dict()),
                  "settings": json.dumps(self.settings, sort_keys=True)}
        atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=header))

    @classmethod
    def load(cls, path: str) -> AnchorSet:
        with safetensors.safe_open(path, "pt") as f:
            header = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(json.loads(header["prompts"]), tensors["bits"], tensors["inputs"], tensors["logits"],
                   tensors["cond_logits"], ScaleSchedule.from_dict(json.loads(header["schedule"])),
                   json.loads(header["settings"]))


def anchor_cache_key(model_id: str, prompts: list[str], settings: dict) -> str:
    blob = json.dumps({"model": model_id, "prompts": prompts, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def sample_anchors(
    pipe,
    prompts: list[str],
    anchors_per_prompt: int = 1,
    guidance_scale: float = 4.0,
    temperature: float = 1.0,
    top_k: int = 900,
    top_p: float = 0.97,
    seed: int = 42,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    cuda_graphs: bool | None = None,
) -> AnchorSet:
    """Sample ``anchors_per_prompt`` trajectories per prompt with the pipeline's (frozen) transformer.

    Anchor ``j`` of every prompt uses a generator seeded ``seed + j`` (the reference: one anchor, seed 42 for every
    prompt). Any active LoRA adapter is disabled while sampling. ``cuda_graphs``: replay the scale loop as CUDA
    graphs (the same trajectories); None turns them on when the transformer is on a GPU. At Infinity-2B, batch 2, on
    an H200 a replayed batch takes 0.70 s against 1.04 s eager, and the first batch, which captures, 4 s: graphs
    pay off from about 9 batches (docs/performance.md, eighth round). Graphs enabled here are dropped afterwards,
    with their key/value buffers; graphs the caller enabled stay.
    """
    if not prompts:
        raise ValueError("no safe prompts to sample anchors for")
    if anchors_per_prompt < 1:
        raise ValueError(f"anchors_per_prompt must be >= 1, got {anchors_per_prompt}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (prompts sampled at once), got {batch_size}")
    rows = [(p, seed + j) for j in range(anchors_per_prompt) for p in prompts]
    settings = dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    anchors_per_prompt=anchors_per_prompt, height=height, width=width)
    parts = {"bits": [], "inputs": [], "logits": [], "cond_logits": []}
    schedule = None
    with adapters_disabled(pipe.transformer), temporary_cuda_graphs(pipe, cuda_graphs):
        for start in tqdm(range(0, len(rows), batch_size), desc="auxiliary visual tokens", disable=not progress):
            batch = rows[start: start + batch_size]
            generators = [torch.Generator().manual_seed(s) for _, s in batch]
            out = pipe([p for p, _ in batch], height=height, width=width, guidance_scale=guidance_scale,
                       temperature=temperature, top_k=top_k, top_p=top_p, generator=generators,
                       output_type="latent", return_trajectory=True)
            traj = out.trajectory
            schedule = traj.schedule
            parts["bits"].append(traj.bits.to(torch.uint8).cpu())
            parts["inputs"].append(traj.inputs.float().cpu())
            parts["logits"].append(traj.logits.float().cpu())
            parts["cond_logits"].append(traj.cond_logits.float().cpu())
    return AnchorSet([p for p, _ in rows], *(torch.cat(parts[k]) for k in parts), schedule, settings)


@contextmanager
def temporary_cuda_graphs(pipe, cuda_graphs: bool | None = None):
    """CUDA graphs on ``pipe`` for the block (None: when its transformer is on a GPU); graphs enabled here are
    dropped on exit and their memory returned, graphs the caller had enabled are left as they are."""
    if cuda_graphs is None:
        cuda_graphs = pipe.transformer.device.type == "cuda"
    if not cuda_graphs or pipe.cuda_graphs_enabled:
        yield
        return
    pipe.enable_cuda_graphs()
    try:
        yield
    finally:
        pipe.disable_cuda_graphs()
        torch.cuda.empty_cache()  # the graphs' private memory pool goes back to the device


def load_or_sample_anchors(pipe, prompts: list[str], cache_dir: str | None, model_id: str, **kwargs) -> AnchorSet:
    """:func:`sample_anchors`, reusing ``cache_dir/anchors-<key>.safetensors`` when the same request was cached.

    ``model_id`` names the weights the anchors come from; :func:`var_erase.hub.pipeline_fingerprint` (what
    ``train_svare.py`` passes) keeps the cache valid wherever the same weights are installed, unlike a path.
    """
    settings = {k: v for k, v in kwargs.items() if k not in ("batch_size", "progress", "cuda_graphs")}
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, f"anchors-{anchor_cache_key(model_id, prompts, settings)}.safetensors")
        if os.path.exists(path):
            return AnchorSet.load(path)
    anchors = sample_anchors(pipe, prompts, **kwargs)
    if path is not None:
        anchors.save(path)
    return anchors
