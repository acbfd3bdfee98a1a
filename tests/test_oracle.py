"""The oracle classifier: input formats, save/load with its vocabulary, and the shipped weights' accuracy."""

import numpy as np
import pytest
import torch
from PIL import Image

from var_erase.toy.data import sample_scenes, to_pixel_values
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier, score_reading
from var_erase.toy.render import render_batch

HAS_WEIGHTS = (ORACLE_PATH / "config.json").exists()
needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS,
    reason=f"no shipped oracle weights at {ORACLE_PATH}; train them with "
    "`python examples/toy/train_oracle.py --output_dir src/var_erase/toy/weights/oracle`",
)


@pytest.fixture(scope="module")
def tiny_oracle() -> OracleClassifier:
    torch.manual_seed(0)
    return OracleClassifier(block_channels=(4, 8, 8, 8), feature_dim=16).eval()


@pytest.fixture(scope="module")
def oracle() -> OracleClassifier:
    return OracleClassifier.from_pretrained(ORACLE_PATH).eval()


@pytest.fixture(scope="module")
def fresh():
    """64 fresh renders (a seed no training run uses) and their scenes."""
    scenes = sample_scenes(np.random.default_rng([12345, 2]), 64)
    return render_batch(scenes), scenes


# ------------------------------------------------------------------------------------------------------------------
# any model (random weights)
def test_heads_and_features_have_the_vocabulary_sizes(tiny_oracle):
    logits = tiny_oracle(torch.zeros(2, 3, 64, 64))
    assert {k: v.shape[1] for k, v in logits.items()} == {"shape": 8, "colour": 8, "style": 4, "background": 4,
                                                           "count": 3}
    assert tiny_oracle.features(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, 16)


def test_every_input_format_reads_the_same(tiny_oracle, fresh):
    images_BHW3 = fresh[0][:4]
    reference = tiny_oracle.predict(images_BHW3).probs["shape"]
    as_float = to_pixel_values(images_BHW3)  # (B, 3, H, W) in [-1, 1]
    for images in (as_float, torch.from_numpy(images_BHW3).permute(0, 3, 1, 2), [Image.fromarray(i) for i in
                                                                                  images_BHW3], list(images_BHW3)):
        assert torch.allclose(tiny_oracle.predict(images).probs["shape"], reference, atol=1e-5)
    upscaled = np.repeat(np.repeat(images_BHW3, 2, axis=1), 2, axis=2)  # 128 x 128 is resized to the oracle's 64
    assert tiny_oracle.prepare(upscaled).shape == (4, 3, 64, 64)


def test_bad_inputs_say_what_to_pass(tiny_oracle):
    with pytest.raises(ValueError, match="uint8"):
        tiny_oracle.predict(torch.zeros(2, 64, 64, 3))
    with pytest.raises(TypeError, match="numpy"):
        tiny_oracle.predict("image.png")


def test_save_and_load_keep_weights_and_vocabulary(tiny_oracle, tmp_path):
    tiny_oracle.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = OracleClassifier.from_pretrained(tmp_path).eval()
    assert list(loaded.config.shape_names) == list(tiny_oracle.config.shape_names)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(loaded(x)["style"], tiny_oracle(x)["style"])


def test_reading_detected_and_score_agree_with_the_sets(tiny_oracle, fresh):
    images, scenes = fresh
    reading = tiny_oracle.predict(images[:8])
    circle = reading.detected("circle")
    assert circle.tolist() == ["circle" in s for s in reading.shapes]
    scores = score_reading(reading, scenes[:8])
    assert set(scores) >= {"shape/per_attribute", "colour/exact_set", "background", "count"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


# ------------------------------------------------------------------------------------------------------------------
# the shipped weights
@needs_weights
def test_shipped_oracle_reads_fresh_renders(oracle, fresh):
    images, scenes = fresh
    scores = score_reading(oracle.predict(images), scenes)
    for kind in ("shape", "colour", "style"):
        assert scores[f"{kind}/per_attribute"] >= 0.95, scores
        assert scores[f"{kind}/exact_set"] >= 0.85, scores
    assert scores["background"] >= 0.95 and scores["count"] >= 0.95, scores


@needs_weights
def test_shipped_oracle_reads_blurry_images(oracle, fresh):
    images, scenes = fresh
    pixels = to_pixel_values(images)
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4  # a light blur, like a generator's soft edges
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(pixels, (1, 1, 1, 1), mode="replicate"),
        (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3), groups=3,
    )
    scores = score_reading(oracle.predict(blurred), scenes)
    assert min(scores[f"{k}/per_attribute"] for k in ("shape", "colour", "style")) >= 0.95, scores


@needs_weights
def test_shipped_oracle_sees_nothing_in_an_empty_image(oracle):
    empty = np.full((2, 64, 64, 3), 248, np.uint8)
    reading = oracle.predict(empty)
    assert reading.counts == [0, 0] and reading.shapes == [frozenset(), frozenset()]


@needs_weights
def test_shipped_weights_are_small(oracle):
    files = list(ORACLE_PATH.glob("*.safetensors"))
    assert files and all(f.stat().st_size <= 16 * 2**20 for f in files)
    assert sum(p.numel() for p in oracle.parameters()) < 2_000_000
