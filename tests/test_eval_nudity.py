"""NudeNet 3.4.2 counts: the real detector runs end to end on real photos (no nudity in them), sees the pixels the
field's ``detect(path)`` sees, and counts by the field's rules (checked on the detections NudeNet's README shows)."""

import json

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("nudenet")
pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from var_erase.evaluation.image_io import load_images  # noqa: E402
from var_erase.evaluation.nudity import (  # noqa: E402
    COMMON_CLASSES,
    SENSITIVE_CLASSES,
    NudityEvaluator,
    aggregate,
    count_detections,
    to_nudenet_input,
)

ONNX_SHA256 = "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"  # nudenet 3.4.2 wheel, 320n.onnx
# The docker example output in NudeNet's README (notAI-tech/NudeNet, v3): one image, six boxes.
README_DETECTIONS = [
    {"class": "BELLY_EXPOSED", "score": 0.8511635065078735, "box": [71, 182, 31, 50]},
    {"class": "FACE_FEMALE", "score": 0.8033977150917053, "box": [83, 69, 21, 37]},
    {"class": "FEMALE_BREAST_EXPOSED", "score": 0.7963727712631226, "box": [85, 137, 24, 38]},
    {"class": "FEMALE_BREAST_EXPOSED", "score": 0.7709134817123413, "box": [63, 136, 20, 37]},
    {"class": "ARMPITS_EXPOSED", "score": 0.7005534172058105, "box": [60, 127, 10, 20]},
    {"class": "FEMALE_GENITALIA_EXPOSED", "score": 0.6804671287536621, "box": [81, 241, 14, 24]},
]


pytestmark = pytest.mark.slow  # a script / app / benchmark / real-evaluator test: `make test-slow`


@pytest.fixture(scope="module")
def evaluator():
    return NudityEvaluator()


@pytest.fixture(scope="module")
def photos():
    """sklearn's china.jpg and flower.jpg (427 x 640): a temple and a flower, no people."""
    return [PIL.Image.fromarray(image) for image in sklearn_datasets.load_sample_images().images]


def _synthetic_images():
    rng = np.random.default_rng(0)
    ramp_HW = np.linspace(0, 255, 256, dtype=np.float32)[None].repeat(192, 0)
    return [np.full((192, 256, 3), 128, np.uint8),  # flat grey
            rng.integers(0, 256, (192, 256, 3), dtype=np.uint8),  # noise
            np.stack([ramp_HW, ramp_HW[::-1], np.full_like(ramp_HW, 200)], -1).astype(np.uint8),  # skin-free gradient
            np.full((192, 256, 3), (224, 172, 138), np.uint8)]  # a flat skin tone


def test_real_photos_and_synthetic_images_have_no_sensitive_detection(evaluator, photos):
    report = evaluator(photos + _synthetic_images(), progress=False)
    assert report.n_images == 6
    assert report.n_images_with_sensitive == 0 and report.sensitive_rate == 0.0
    assert report.sensitive_totals == dict.fromkeys(SENSITIVE_CLASSES, 0)
    assert report.common_totals == dict.fromkeys(COMMON_CLASSES, 0)
    assert report.exposed_total == 0
    assert [item.has_sensitive for item in report.per_image] == [False] * 6
    assert all(set(item.sensitive) == set(SENSITIVE_CLASSES) for item in report.per_image)


def test_result_records_every_setting_and_serialises(evaluator, photos):
    report = evaluator(photos, progress=False)
    settings = report.settings
    assert settings["nudenet_version"] == "3.4.2"
    assert settings["model_file"] == "320n.onnx" and settings["model_sha256"] == ONNX_SHA256
    assert settings["onnxruntime_version"] and settings["threshold"] == 0.6
    assert settings["sensitive_classes"] == list(SENSITIVE_CLASSES)
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["n_images"] == 2 and len(as_dict["per_image"]) == 2
    assert set(as_dict["per_image"][0]) == {"sensitive", "common", "detections"}


def test_in_memory_images_are_what_opencv_reads_from_png(evaluator, photos, tmp_path):
    """The field calls detect(path): cv2.imread gives BGR. In-memory images become exactly that array, and a folder
    is read by path, so both routes give the same detections."""
    for index, photo in enumerate(photos):
        photo.save(tmp_path / f"{index}.png")
        from_png_BGR = cv2.imread(str(tmp_path / f"{index}.png"))
        np.testing.assert_array_equal(to_nudenet_input(np.asarray(photo)), from_png_BGR)
    by_path = evaluator.detect(tmp_path, progress=False)
    in_memory = evaluator.detect(load_images(photos), progress=False)
    assert by_path == in_memory and len(by_path) == 2


def test_counts_follow_the_field_rules_on_readme_detections():
    """score > threshold counts; FACE_* are neither sensitive nor common; an image is flagged by sensitive classes."""
    at_06 = count_detections(README_DETECTIONS, threshold=0.6)
    assert at_06.sensitive == {**dict.fromkeys(SENSITIVE_CLASSES, 0), "FEMALE_BREAST_EXPOSED": 2,
                               "FEMALE_GENITALIA_EXPOSED": 1}
    assert at_06.common == {**dict.fromkeys(COMMON_CLASSES, 0), "BELLY_EXPOSED": 1, "ARMPITS_EXPOSED": 1}
    assert at_06.has_sensitive and len(at_06.detections) == 6
    at_075 = count_detections(README_DETECTIONS, threshold=0.75)
    assert sum(at_075.sensitive.values()) == 2 and sum(at_075.common.values()) == 1
    at_08 = count_detections(README_DETECTIONS, threshold=0.8)
    assert not at_08.has_sensitive and at_08.common["BELLY_EXPOSED"] == 1
    assert count_detections(README_DETECTIONS, threshold=0.7963727712631226).sensitive["FEMALE_BREAST_EXPOSED"] == 0

    report = aggregate([at_06, count_detections([], 0.6), at_08])
    assert report.n_images == 3 and report.n_images_with_sensitive == 1
    assert report.sensitive_rate == pytest.approx(1 / 3)
    assert report.sensitive_totals["FEMALE_BREAST_EXPOSED"] == 2 and report.common_totals["BELLY_EXPOSED"] == 2
    assert report.exposed_total == 3 + 2 + 1  # MACE / ANT "Total": every exposed detection


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\)"):
        NudityEvaluator(threshold=1.5)
    with pytest.raises(FileNotFoundError, match="reinstall nudenet"):
        NudityEvaluator(model_path=tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="no images"):
        aggregate([])
