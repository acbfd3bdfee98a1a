"""The toy world's renderer and data stream: determinism, exact labels, visible styles, clear errors."""

import numpy as np
import pytest
import torch

from var_erase.toy.concepts import BACKGROUNDS, COLOURS, SHAPES, STYLES, names
from var_erase.toy.data import ToyDataset, encode_labels
from var_erase.toy.render import (
    SHAPE_SDFS,
    Scene,
    ToyObject,
    object_masks,
    render,
    sample_scene,
)

RGB = {c.name: np.array(c.rgb) for c in COLOURS}


def scenes(seed: int, n: int, **kwargs) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------------------
# determinism and format
def test_same_seed_gives_same_scenes_and_pixels():
    first, again = scenes(7, 20), scenes(7, 20)
    assert first == again
    assert all(np.array_equal(render(a), render(b)) for a, b in zip(first, again))
    assert scenes(8, 20) != first


@pytest.mark.parametrize("size", [64, 128])
def test_render_is_uint8_rgb_of_the_requested_size(size):
    image = render(scenes(0, 1)[0], size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_128_is_the_same_picture_as_64_at_twice_the_resolution():
    scene = scenes(1, 1, n_objects=1, style="solid")[0]
    small, large = render(scene, 64).astype(float), render(scene, 128).astype(float)
    pooled = large.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(pooled - small).mean() < 3.0


def test_every_vocabulary_value_can_be_drawn():
    assert set(SHAPE_SDFS) == set(names(SHAPES))
    for shape in names(SHAPES):
        for style in names(STYLES):
            scene = scenes(2, 1, n_objects=1, shape=shape, style=style, size="large")[0]
            assert object_masks(scene).max() > 0.99


# ------------------------------------------------------------------------------------------------------------------
# exact labels
def test_pixels_fully_inside_an_object_have_exactly_its_colour():
    for scene in scenes(3, 40):
        image, masks = render(scene), object_masks(scene)
        for obj, mask in zip(scene.objects, masks):
            inside = mask >= 1.0
            assert inside.sum() > 10, obj
            assert (image[inside] == RGB[obj.colour]).all()


def test_two_object_scene_has_two_disjoint_masks_inside_the_image():
    for scene in scenes(4, 50, n_objects=2):
        masks = object_masks(scene) > 0
        assert masks.shape[0] == 2 and masks[0].any() and masks[1].any()
        assert not (masks[0] & masks[1]).any()
        assert scene.objects[0].shape != scene.objects[1].shape  # distinct shapes unless forced
        border = masks[:, [0, -1], :].any() or masks[:, :, [0, -1]].any()
        assert not border


def test_forced_attributes_are_kept_and_labels_encode_them():
    scene = sample_scene(np.random.default_rng(0), shape="star", colour="red", style="dotted", size="large",
                         background="black", n_objects=1)
    obj = scene.objects[0]
    assert (obj.shape, obj.colour, obj.style, obj.size, scene.background) == ("star", "red", "dotted", "large", "black")
    labels = encode_labels(scene)
    assert labels["shape"][names(SHAPES).index("star")] == 1 and labels["shape"].sum() == 1
    assert labels["colour"][names(COLOURS).index("red")] == 1 and labels["count"] == 1
    assert labels["background"] == names(BACKGROUNDS).index("black")


def test_sampler_covers_the_whole_vocabulary():
    drawn = scenes(5, 400)
    for kind, table in (("shape", SHAPES), ("colour", COLOURS), ("style", STYLES)):
        assert set().union(*(s.values(kind) for s in drawn)) == set(names(table))
    assert {s.background for s in drawn} == set(names(BACKGROUNDS))
    assert {s.count for s in drawn} == {1, 2}


def test_empty_scene_is_the_background():
    image = render(Scene(objects=(), background="grey"))
    assert (image == 128).all()


# ------------------------------------------------------------------------------------------------------------------
# styles are visible, and laid out for a stride-8 latent
def _object(style: str) -> Scene:
    obj = ToyObject("square", "blue", style, "large", cx=0.5, cy=0.5, half_extent=0.28)
    return Scene(objects=(obj,), background="white")


def test_styles_differ_in_how_much_of_the_silhouette_is_full_colour():
    full = {style: (object_masks(_object(style)) >= 1.0).sum() for style in names(STYLES)}
    assert full["solid"] > full["striped"] > full["outlined"] > 0
    assert full["solid"] > full["dotted"] > full["outlined"]
    images = [render(_object(style)) for style in names(STYLES)]
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])


@pytest.mark.parametrize("style", ["striped", "dotted"])
def test_patterns_repeat_every_8_pixels_at_64(style):
    image = render(_object(style)).astype(int)
    interior = image[24:32, 24:32]  # a latent cell well inside the square
    assert np.array_equal(interior, image[32:40, 24:32]) and np.array_equal(interior, image[24:32, 32:40])
    assert interior.std() > 20  # the pattern is there, not a flat fill


# ------------------------------------------------------------------------------------------------------------------
# errors
def test_bad_inputs_name_the_valid_choices():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="circle"):
        sample_scene(rng, shape="blob")
    with pytest.raises(ValueError, match="white"):
        sample_scene(rng, background="plaid")
    with pytest.raises(ValueError, match="0 to 2"):
        sample_scene(rng, n_objects=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        render(scenes(0, 1)[0], 60)
    with pytest.raises(ValueError, match="smaller sizes"):
        sample_scene(rng, objects=[{"size": "large"}, {"size": "large"}])


# ------------------------------------------------------------------------------------------------------------------
# the streaming dataset
def test_dataset_stream_is_deterministic_with_consistent_labels():
    ds = ToyDataset(seed=3, num_samples=6)
    first, again = list(ds), list(ds)
    assert [e["caption"] for e in first] == [e["caption"] for e in again]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, again))
    example = first[0]
    assert example["pixel_values"].shape == (3, 64, 64)
    assert example["pixel_values"].min() >= -1 and example["pixel_values"].max() <= 1
    assert set(example["labels"]) == {"shape", "colour", "style", "background", "count"}
    ds.set_epoch(1)
    assert [e["caption"] for e in ds] != [e["caption"] for e in first]


def test_dataset_workers_get_distinct_streams_that_add_up_to_num_samples():
    loader = torch.utils.data.DataLoader(ToyDataset(seed=0, num_samples=7), batch_size=None, num_workers=2)
    captions = [e["caption"] for e in loader]
    assert len(captions) == 7 and len(set(captions)) == 7
