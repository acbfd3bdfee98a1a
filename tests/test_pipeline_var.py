import numpy as np
import pytest
import torch

from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.pipelines.sampling import guide_logits

from ._tiny import TINY_SIZE, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_generates_pil_images_of_the_requested_size(pipe):
    out = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, generator=_gen())
    assert len(out.images) == 4
    assert all(im.size == (TINY_SIZE, TINY_SIZE) for im in out.images)


def test_same_generator_same_image_and_seeds_differ(pipe):
    a = pipe("a red circle", generator=_gen(1), output_type="np").images
    b = pipe("a red circle", generator=_gen(1), output_type="np").images
    c = pipe("a red circle", generator=_gen(2), output_type="np").images
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_output_types(pipe):
    np_img = pipe("x", generator=_gen(), output_type="np").images
    assert np_img.shape == (1, TINY_SIZE, TINY_SIZE, 3) and 0 <= np_img.min() and np_img.max() <= 1
    pt = pipe("x", generator=_gen(), output_type="pt").images
    assert pt.shape == (1, 3, TINY_SIZE, TINY_SIZE)
    latent = pipe("x", generator=_gen(), output_type="latent").images
    assert latent.shape == (1, 8, 16, 16)


def test_save_and_reload_regenerates_identical_image(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    loaded = VARPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    a = pipe("a green star", generator=_gen(3), output_type="np").images
    b = loaded("a green star", generator=_gen(3), output_type="np").images
    assert np.array_equal(a, b)


def test_trajectory_replays_under_teacher_forcing(pipe):
    """The trajectory's inputs teacher-force the model back to the same guided logits (auxiliary visual tokens)."""
    g = 3.0
    out = pipe(["a red circle", "two blue squares"], guidance_scale=g, temperature=1.0, generator=_gen(4),
               return_trajectory=True, output_type="latent")
    traj = out.trajectory
    L, d = traj.schedule.total_tokens, 8
    assert traj.bits.shape == (2, L, d) and traj.inputs.shape == (2, L - 1, d) and traj.logits.shape == (2, L, 2 * d)
    per_scale = [traj.bits[:, traj.schedule.scale_slice(k)] for k in range(traj.schedule.num_scales)]
    assert torch.allclose(pipe.vae.quantizer.teacher_forcing_inputs(per_scale, traj.schedule), traj.inputs)

    states, mask = pipe.encode_prompt(["a red circle", "two blue squares"])
    uncond = pipe.transformer.unconditional_states(2, states.shape[1])
    tf = pipe.transformer
    cond_logits = tf(traj.inputs, states, mask, schedule=traj.schedule).sample
    uncond_logits = tf(traj.inputs, uncond, mask, schedule=traj.schedule).sample
    assert torch.allclose(guide_logits(cond_logits, uncond_logits, g), traj.logits, atol=1e-4)
    assert torch.allclose(cond_logits, traj.cond_logits, atol=1e-4)  # the guidance batch's conditional half


def test_unguided_trajectory_keeps_the_logits_before_temperature_as_conditional(pipe):
    traj = pipe("a red circle", guidance_scale=1.0, temperature=0.5, generator=_gen(4), return_trajectory=True,
                output_type="latent").trajectory
    torch.testing.assert_close(traj.logits, traj.cond_logits / 0.5)


def test_negative_prompt_and_no_guidance_run(pipe):
    a = pipe("a red circle", negative_prompt="blue", generator=_gen(5), output_type="np").images
    b = pipe("a red circle", generator=_gen(5), output_type="np").images
    c = pipe("a red circle", guidance_scale=1.0, generator=_gen(5), output_type="np").images
    assert a.shape == b.shape == c.shape
    assert not np.array_equal(a, b)


def test_callback_sees_every_scale(pipe):
    seen = []

    def callback(p, k, _t, tensors):
        seen.append((k, tensors["bits"].shape))
        return tensors

    pipe("x", generator=_gen(), callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["bits"])
    assert [k for k, _ in seen] == list(range(7))
    assert seen[-1][1] == (1, 256, 8)


def test_bf16_pipeline_generates(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = VARPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16)
    loaded.set_progress_bar_config(disable=True)
    assert loaded("a red circle", generator=_gen(), output_type="np").images.shape == (1, TINY_SIZE, TINY_SIZE, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[]), "non-empty"),
    (dict(prompt=""), None),  # an empty string is a valid (unconditional-like) prompt
    (dict(height=0), "positive integer"),
    (dict(height=-64), "positive integer"),
    (dict(height=64, width=640), "aspect ratio"),
    (dict(height=62), "multiple of the VAE stride"),
    (dict(height=64, width=48), "not a size this model draws"),
    (dict(guidance_scale=-2.0), "guidance_scale"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt"),
])
def test_bad_inputs_name_the_fix(pipe, kwargs, match):
    args = dict(prompt="a red circle", generator=_gen(), output_type="latent") | kwargs
    if match is None:
        pipe(**args)
        return
    with pytest.raises(ValueError, match=match):
        pipe(**args)
