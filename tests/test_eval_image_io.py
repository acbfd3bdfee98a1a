"""Images in for the real-model evaluators: every format a pipeline or a folder gives becomes the same uint8 RGB
arrays, and bad input gets an error that says what to pass."""

import numpy as np
import PIL.Image
import pytest
import torch

from var_erase.evaluation.image_io import count_images, iter_image_batches, list_image_files, load_images


@pytest.fixture(scope="module")
def photo_HW3():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    return sklearn_datasets.load_sample_images().images[1][:96, :128].copy()  # flower.jpg's corner, uint8 (96, 128, 3)


def test_every_format_gives_the_same_pixels(photo_HW3, tmp_path):
    """PIL, NHWC / NCHW uint8, float [0, 1] tensors (the pipeline's output_type='pt'), and a PNG folder agree."""
    as_float_N3HW = torch.from_numpy(photo_HW3).permute(2, 0, 1)[None].float() / 255
    PIL.Image.fromarray(photo_HW3).save(tmp_path / "0.png")
    variants = {
        "pil": [PIL.Image.fromarray(photo_HW3)],
        "pil_rgba": [PIL.Image.fromarray(photo_HW3).convert("RGBA")],
        "uint8_NHW3": photo_HW3[None],
        "uint8_N3HW_tensor": torch.from_numpy(photo_HW3).permute(2, 0, 1)[None],
        "float_N3HW_tensor": as_float_N3HW,
        "float_NHW3_numpy": as_float_N3HW.permute(0, 2, 3, 1).numpy(),
        "list_of_CHW": [as_float_N3HW[0]],
        "folder": tmp_path,
    }
    for name, images in variants.items():
        arrays = load_images(images)
        assert len(arrays) == 1 and arrays[0].dtype == np.uint8, name
        np.testing.assert_array_equal(arrays[0], photo_HW3, err_msg=name)


def test_folder_in_natural_order(tmp_path):
    for index in (10, 2, 1):
        PIL.Image.new("RGB", (8, 8), (index, 0, 0)).save(tmp_path / f"img_{index}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in list_image_files(tmp_path)] == ["img_1.png", "img_2.png", "img_10.png"]
    assert [int(a[0, 0, 0]) for a in load_images(tmp_path)] == [1, 2, 10]


def test_batches_read_a_folder_lazily(tmp_path):
    """Files are read when their batch comes: a broken last file fails only at its batch, after the first ones."""
    for index in range(3):
        PIL.Image.new("RGB", (8, 8), (index, 0, 0)).save(tmp_path / f"{index}.png")
    (tmp_path / "3.png").write_bytes(b"not a png")
    assert count_images(tmp_path) == 4
    batches = iter_image_batches(tmp_path, batch_size=2)
    assert [int(a[0, 0, 0]) for a in next(batches)] == [0, 1]
    with pytest.raises(ValueError, match="cannot read image .*3.png"):
        next(batches)
    tensor_batches = list(iter_image_batches(torch.zeros(5, 3, 4, 4), batch_size=2))
    assert [len(b) for b in tensor_batches] == [2, 2, 1] and tensor_batches[2][0].shape == (4, 4, 3)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no images in"):
        load_images(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        load_images(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*\(x \+ 1\) / 2"):
        load_images(torch.full((1, 3, 8, 8), -1.0))
    with pytest.raises(ValueError, match="RGB image"):
        load_images([np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        load_images(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        load_images([])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_images(tmp_path)
