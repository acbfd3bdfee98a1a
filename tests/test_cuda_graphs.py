"""CUDA-graph replay of the scale loop (``VARPipeline.enable_cuda_graphs``): same images as the eager loop, captured
once per shape, recaptured when the model changes. The GPU tests are skipped on CPU-only machines."""

import pytest
import torch

from var_erase.models.attention import KVCache

from ._tiny import tiny_pipeline


def test_cuda_graphs_need_a_gpu_model_and_a_positive_text_bucket():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="CUDA device"):
        pipe.enable_cuda_graphs()
    with pytest.raises(ValueError, match="text_bucket must be a positive"):
        pipe.enable_cuda_graphs(text_bucket=0)


def test_kv_cache_truncate_rewinds_and_keeps_buffers():
    cache = KVCache(2, max_tokens=6)
    for layer in range(2):
        cache.update(layer, torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))
        cache.set_cross_kv(layer, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    buffer = cache._keys[0]
    cache.truncate(1)
    assert cache.seq_len == 1 and cache._keys[0] is buffer and cache.cross_kv(0) is not None
    keys, _ = cache.update(0, torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 2.0))
    assert keys.shape[2] == 3 and keys[0, 0, 1:].eq(2).all() and cache._keys[0] is buffer
    cache.clear_text()
    assert cache.cross_kv(1) is None
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(7)


def _generate(pipe, seed: int, prompt: str = "a red circle"):
    generator = torch.Generator("cuda").manual_seed(seed)
    out = pipe(prompt, num_images_per_prompt=2, generator=generator, output_type="pt", return_trajectory=True)
    return out.images, out.trajectory


@pytest.mark.gpu
def test_graph_replay_gives_the_eager_images_and_recaptures_after_a_lora_change():
    from peft import LoraConfig

    pipe = tiny_pipeline().to("cuda")
    eager = [_generate(pipe, seed, prompt) for seed, prompt in [(0, "a red circle"), (1, "two blue squares")]]
    pipe.enable_cuda_graphs()
    for _ in range(2):  # the first pass captures, the second replays
        for (images, trajectory), (seed, prompt) in zip(eager, [(0, "a red circle"), (1, "two blue squares")]):
            got_images, got_trajectory = _generate(pipe, seed, prompt)
            assert torch.equal(got_trajectory.bits, trajectory.bits)
            torch.testing.assert_close(got_trajectory.logits, trajectory.logits, rtol=0, atol=0)
            torch.testing.assert_close(got_images, images)
    graphs = pipe._cuda_graphs
    assert graphs.captured_scales == pipe.prepare_schedule(64, 64).num_scales

    # a LoRA added while graphs are on changes the model's fingerprint: the next generation captures again
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    pipe.transformer.add_adapter(lora)
    replayed = _generate(pipe, 3)
    pipe.disable_cuda_graphs()
    with_adapter = _generate(pipe, 3)
    assert torch.equal(replayed[1].bits, with_adapter[1].bits)
    pipe.transformer.disable_adapters()
    assert not torch.equal(with_adapter[1].bits, _generate(pipe, 3)[1].bits)  # the adapter mattered


@pytest.mark.gpu
def test_the_capturing_generation_replays_only_the_first_scale(monkeypatch):
    """Capturing runs nothing, and the warm-up wrote each scale's keys/values into the graphs' buffers: the capturing
    generation returns the warm-up's logits and replays only scale 0 (whose graph computes the text keys/values)."""
    pipe = tiny_pipeline().to("cuda")
    _, eager = _generate(pipe, 0)
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: (replays.append(graph), replay(graph))[1])
    pipe.enable_cuda_graphs()
    num_scales = pipe.prepare_schedule(64, 64).num_scales
    for expected_replays in (1, num_scales):  # the first generation captures, the second replays every scale
        replays.clear()
        _, got = _generate(pipe, 0)
        assert len(replays) == expected_replays
        assert torch.equal(got.bits, eager.bits)
        torch.testing.assert_close(got.logits, eager.logits, rtol=0, atol=0)


@pytest.mark.gpu
def test_compiled_blocks_sample_the_eager_trajectory_with_and_without_graphs():
    """``compile_repeated_blocks`` (KV-cache steps left out as graph breaks) keeps the logits, eager and replayed."""
    pipe = tiny_pipeline().to("cuda")
    _, eager = _generate(pipe, 0)
    pipe.transformer.compile_repeated_blocks()
    for graphs in (False, True):
        if graphs:
            pipe.enable_cuda_graphs()
        for _ in range(2):  # compile (or capture), then reuse
            _, got = _generate(pipe, 0)
            torch.testing.assert_close(got.logits, eager.logits, rtol=1e-4, atol=1e-4)
            assert (got.bits != eager.bits).float().mean() < 1e-3


@pytest.mark.gpu
def test_prompts_of_different_lengths_share_the_graphs_of_their_length_bucket():
    """Text memories are padded (masked) to a multiple of ``TEXT_BUCKET`` tokens: one capture serves prompts of any
    length in the bucket, with the eager logits."""
    from var_erase.pipelines.cuda_graphs import TEXT_BUCKET

    prompts = ["a circle", "two blue squares"]
    pipe = tiny_pipeline().to("cuda")
    lengths = [pipe.encode_prompt(p)[0].shape[1] for p in prompts]
    assert lengths[0] != lengths[1] and max(lengths) <= TEXT_BUCKET
    eager = [_generate(pipe, 0, p) for p in prompts]
    pipe.enable_cuda_graphs()
    first = None
    for prompt, (images, trajectory) in zip(prompts, eager):
        got_images, got = _generate(pipe, 0, prompt)
        torch.testing.assert_close(got_images, images)
        first = first or pipe._cuda_graphs._generation
        assert pipe._cuda_graphs._generation is first  # replayed, not captured again
        assert torch.equal(got.bits, trajectory.bits)
        torch.testing.assert_close(got.logits, trajectory.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.cond_logits, trajectory.cond_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_captures_leave_no_memory_behind_once_the_graphs_are_dropped():
    """Every capture warms up on the same side stream: cuBLAS keeps a workspace per stream for good, so a new stream per
    capture would grow the allocated memory with every (re)capture."""
    import gc

    pipe = tiny_pipeline().to("cuda")
    _generate(pipe, 0)  # the eager path's own lazy allocations

    def allocated_after(batches: list[int]) -> int:
        pipe.enable_cuda_graphs()
        for n in batches:  # each batch size is a new key: the scales are captured again
            pipe(["a circle"] * n, generator=torch.Generator("cuda").manual_seed(0), output_type="latent")
        pipe.disable_cuda_graphs()
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    once = allocated_after([1])
    assert allocated_after([1, 2, 3]) == once
