"""CUDA-graph replay of the scale loop: each scale's transformer step is captured once and then replayed.

At batch 1 the transformer's early scales are tiny (1 to a few hundred tokens) and the GPU waits for the host to launch
about 1,500 kernels per scale (32 blocks x ~45 kernels): on an H200 the GPU is busy for about half of a 1024x1024
generation. A CUDA graph replays a whole scale (all blocks and the head) with one launch.

What a graph needs, and how it is provided here:

- fixed memory addresses: the text condition is copied into static tensors at every generation, the next-scale input
  into a static tensor per scale, and the key/value cache is one preallocated :class:`KVCache` owned by the graphs
  (its buffers persist between generations; only its token count is rewound);
- a fixed shape per graph: one graph per scale, per (schedule, batch rows, text length bucket, dtype); a new key
  evicts the old graphs (the KV buffers of a 1024x1024 batch are large). The text is right-padded (masked) to a
  multiple of ``text_bucket`` tokens (``TEXT_BUCKET``, 32, by default), so prompts of different lengths share
  graphs: a batch of prompts of 17-32 tokens replays the graphs captured for another;
- the same model: graphs bake in the weights' addresses and the LoRA layers active at capture time, so they are
  dropped and recaptured whenever a parameter moves or an adapter is added, removed, (de)activated, rescaled,
  merged or unmerged (checked at the start of each generation).

The first generation per key captures: a warm-up step on a side stream, then the capture. The warm-up's logits and
keys/values stand for the first replay (capturing runs nothing, and the warm-up wrote its keys/values into the same
buffers), except at scale 0, whose graph computes the text keys/values in its own memory and is replayed. The next
generations only replay. The logits are those of the eager path on the same device (the same kernels; padded text
keys are masked, so they add exact zeros to the attention), which ``tests/test_cuda_graphs.py`` checks on a GPU.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ..models.attention import KVCache
from ..models.transformer_var import TextCondition, VARTransformer2DModel
from ..schedules import ScaleSchedule

TEXT_BUCKET = 32  # text memories are padded to a multiple of this many tokens (Flan-T5 prompts: mostly 10-40)


def model_fingerprint(transformer: torch.nn.Module) -> int:
    """What a captured graph depends on besides its inputs: every parameter's and buffer's address and dtype (the
    buffers: ``enable_fp8``'s FP8 weights), and the state of every LoRA layer (active adapters, disabled, merged,
    scaling)."""
    parameters = tuple((p.data_ptr(), p.dtype) for p in (*transformer.parameters(), *transformer.buffers()))
    adapters = tuple(
        (name, tuple(module.active_adapters), module.disable_adapters, module.merged,
         tuple(sorted(getattr(module, "scaling", {}).items())))
        for name, module in transformer.named_modules() if isinstance(module, BaseTunerLayer)
    )
    return hash((parameters, adapters))


_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream per device on which every capture's warm-up runs. cuBLAS keeps a workspace for each
    stream it has run on until the process ends (32 MiB or more each), so a fresh stream per captured scale would leave
    about 0.4 GB behind per capture of Infinity's 13 scales."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


class _GraphedGeneration:
    """The captured scales of one (schedule, batch, text length bucket): static inputs, outputs, KV cache and
    graphs."""

    def __init__(self, transformer: VARTransformer2DModel, schedule: ScaleSchedule, condition: TextCondition,
                 pool, side_stream: torch.cuda.Stream) -> None:
        self.transformer, self.schedule, self.pool, self.side_stream = transformer, schedule, pool, side_stream
        self.condition = TextCondition(*(getattr(condition, f.name).clone() for f in fields(TextCondition)))
        self.cache = KVCache(transformer.config.num_layers, max_tokens=schedule.total_tokens)
        self.inputs: list[torch.Tensor | None] = [None] * schedule.num_scales
        self.outputs: list[torch.Tensor | None] = [None] * schedule.num_scales
        self.graphs: list[torch.cuda.CUDAGraph | None] = [None] * schedule.num_scales

    def load(self, condition: TextCondition) -> None:
        """Copy this generation's condition into the static tensors and rewind the cache (the text keys/values stay:
        the graph of scale 0 recomputes them in place)."""
        for f in fields(TextCondition):
            getattr(self.condition, f.name).copy_(getattr(condition, f.name))
        self.cache.truncate(0)

    def forward_scale(self, token_inputs_Bld: torch.Tensor | None, k: int) -> torch.Tensor:
        """Logits (B, h_k * w_k, 2d) of scale ``k`` (scales in order, as :meth:`forward_scale` of the transformer)."""
        if token_inputs_Bld is not None:
            if self.inputs[k] is None:
                self.inputs[k] = token_inputs_Bld.clone()
            else:
                self.inputs[k].copy_(token_inputs_Bld)
        if self.graphs[k] is None:
            logits = self._capture(k)
            if logits is not None:
                return logits
        self.graphs[k].replay()
        self.cache.truncate(self.schedule.offsets[k + 1])  # the replay wrote this scale's keys/values
        return self.outputs[k].clone()

    def _step(self, k: int) -> torch.Tensor:
        return self.transformer.forward_scale(self.inputs[k], k, self.schedule, self.condition, self.cache)

    def _capture(self, k: int) -> torch.Tensor | None:
        """Warm up and capture scale ``k``. Returns the warm-up's logits when they can stand for the capture's replay
        (every scale but the first), with this scale's keys/values in the cache; None for scale 0, whose graph
        computes the text keys/values into the graph's own memory, so it must be replayed once."""
        start, end = self.schedule.offsets[k], self.schedule.offsets[k + 1]
        side = self.side_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy kernel set-up (cuBLAS, attention plans) must not be captured
            logits = self._step(k)
        torch.cuda.current_stream().wait_stream(side)
        logits.record_stream(torch.cuda.current_stream())
        self.cache.truncate(start)
        if k == 0:
            self.cache.clear_text()  # the graph of scale 0 must compute the text keys/values itself
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[k] = self._step(k)
        self.graphs[k] = graph
        if k == 0:
            self.cache.truncate(start)
            return None
        # capturing ran nothing: the KV buffers (fixed addresses, the graph's too) still hold the warm-up's keys/values
        # of this scale, so the warm-up stands for the first replay
        self.cache.truncate(end)
        return logits


class ScaleGraphs:
    """CUDA graphs of :meth:`VARTransformer2DModel.forward_scale`, one per scale, kept for the latest shape.

    Use through :meth:`VARPipeline.enable_cuda_graphs`. ``generation(schedule, condition)`` returns a step function
    ``step(token_inputs_Bld | None, k) -> logits`` for one generation, scales in order.

    Args:
        transformer: the (CUDA) transformer whose steps are captured.
        text_bucket: the text memory is padded (masked) to a multiple of this many tokens, so that prompts of
            different lengths replay the same graphs; 1 captures every prompt length apart.
    """

    def __init__(self, transformer: VARTransformer2DModel, text_bucket: int = TEXT_BUCKET) -> None:
        if not isinstance(text_bucket, int) or text_bucket < 1:
            raise ValueError(f"text_bucket must be a positive number of tokens (1: no padding), got {text_bucket!r}")
        if not torch.cuda.is_available() or transformer.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the transformer on a CUDA device, it is on {transformer.device}; "
                             "move the pipeline with pipe.to('cuda') first, or leave CUDA graphs off")
        self.transformer, self.text_bucket = transformer, text_bucket
        self._key: tuple | None = None
        self._fingerprint: int | None = None
        self._generation: _GraphedGeneration | None = None
        self._pool = torch.cuda.graph_pool_handle()
        self._side_stream = _warmup_stream(transformer.device)

    @property
    def captured_scales(self) -> int:
        """Scales with a captured graph for the current key (0 before the first generation)."""
        return 0 if self._generation is None else sum(g is not None for g in self._generation.graphs)

    def generation(self, schedule: ScaleSchedule, condition: TextCondition):
        length = condition.context_BTC.shape[1]
        condition = condition.padded(-(-length // self.text_bucket) * self.text_bucket)
        fingerprint = model_fingerprint(self.transformer)
        key = (schedule, condition.batch_size, condition.context_BTC.shape[1], condition.context_BTC.dtype,
               condition.context_BTC.device)
        if key != self._key or fingerprint != self._fingerprint or self._generation is None:
            self.reset()
            self._generation = _GraphedGeneration(self.transformer, schedule, condition, self._pool,
                                                  self._side_stream)
            self._key, self._fingerprint = key, fingerprint
        self._generation.load(condition)
        return self._generation.forward_scale

    def reset(self) -> None:
        """Drop the graphs, their memory pool and the KV buffers (they are captured again on the next use)."""
        self._generation, self._key, self._fingerprint = None, None, None
        self._pool = torch.cuda.graph_pool_handle()


__all__ = ["TEXT_BUCKET", "ScaleGraphs", "model_fingerprint"]
