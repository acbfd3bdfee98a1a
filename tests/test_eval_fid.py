"""Feature-FID: exact on cases with a closed form, equal to pytorch-fid's formula, and meaningful in the oracle's
feature space."""

import numpy as np
import pytest
import torch

from var_erase.evaluation.fid import (
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    oracle_features,
    oracle_fid,
    reference_renders,
)
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _features(n=300, d=16, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing.double()) * scale


def _reference_fid(feats_a, feats_b):
    """The textbook formula in numpy, with tr(sqrt(A B)) from the (real, non-negative) eigenvalues of A @ B."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues = np.linalg.eigvals(sigma_a @ sigma_b).real.clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.sqrt(eigenvalues).sum())


def test_set_against_itself_is_zero():
    feats = _features()
    assert frechet_distance(feats, feats, method="torch") == pytest.approx(0.0, abs=1e-9)


def test_a_mean_shift_adds_its_squared_norm():
    """Same covariance, means moved by delta: FID is exactly |delta|^2, growing with the shift."""
    feats = _features()
    distances = []
    for step in (0.1, 0.5, 2.0):
        delta = torch.full((feats.shape[1],), step, dtype=torch.float64)
        distances.append(frechet_distance(feats, feats + delta, method="torch"))
        assert distances[-1] == pytest.approx(float(delta.square().sum()), rel=1e-8, abs=1e-9)
    assert distances == sorted(distances)


def test_diagonal_gaussians_have_the_closed_form():
    """For commuting (diagonal) covariances: |mu_a - mu_b|^2 + sum (sqrt(var_a) - sqrt(var_b))^2."""
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 0.0])
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float((mu_a - mu_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    got = frechet_distance_from_statistics(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b), method="torch")
    assert got == pytest.approx(expected, rel=1e-12)


def test_matches_the_reference_formula_and_is_symmetric():
    a, b = _features(seed=0), _features(seed=1, scale=1.5) + 0.3
    expected = _reference_fid(a, b)
    assert frechet_distance(a, b, method="torch") == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(b, a, method="torch") == pytest.approx(expected, rel=1e-8)


def test_singular_covariances_fewer_rows_than_features():
    """N < D (rank-deficient covariances) stays finite and non-negative, and 0 against itself."""
    a, b = _features(n=10, d=32, seed=0), _features(n=10, d=32, seed=1)
    assert frechet_distance(a, a, method="torch") == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b, method="torch") == pytest.approx(_reference_fid(a, b), rel=1e-6)


def test_scipy_method_equals_pytorch_fid():
    """When SciPy is installed: the 'scipy' method is pytorch-fid's computation and agrees with 'torch'."""
    pytest.importorskip("scipy")
    a, b = _features(seed=0), _features(seed=1, scale=1.5) + 0.3
    mu_a, sigma_a = gaussian_statistics(a)
    mu_b, sigma_b = gaussian_statistics(b)
    scipy_fid = frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b, method="scipy")
    assert scipy_fid == pytest.approx(frechet_distance(a, b, method="torch"), rel=1e-6)
    assert scipy_fid == pytest.approx(_reference_fid(a, b), rel=1e-6)


def test_clear_errors():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="width"):
        frechet_distance(torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="unknown FID method"):
        frechet_distance(torch.randn(5, 4), torch.randn(5, 4), method="inception")
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((5, 4), float("nan")), torch.randn(5, 4))


@pytest.fixture(scope="module")
def oracle():
    return OracleClassifier.from_pretrained(ORACLE_PATH)


def test_oracle_fid_separates_distributions(oracle):
    """Two independent draws of one render distribution are closer than renders of another concept, and closer than
    blurred renders (all sets of the same size: FID's small-sample bias is the same for each)."""
    reds = reference_renders(["red"], 64, seed=0)
    assert reds.shape == (64, 64, 64, 3) and reds.dtype == torch.uint8
    assert oracle_fid(oracle, reds, reds) == pytest.approx(0.0, abs=1e-6)
    reds_again = reference_renders(["red"], 64, seed=1)
    blurred = torch.nn.functional.avg_pool2d(reds_again.permute(0, 3, 1, 2).float(), 3, 1, 1).round().to(torch.uint8)
    feats = {name: oracle_features(oracle, images) for name, images in [
        ("reds", reds), ("reds_again", reds_again), ("blues", reference_renders(["blue"], 64, seed=2)),
        ("blurred", blurred)]}
    same = frechet_distance(feats["reds"], feats["reds_again"])
    assert same < frechet_distance(feats["reds"], feats["blues"])
    assert same < frechet_distance(feats["reds"], feats["blurred"])


def test_oracle_features_shape_and_formats(oracle):
    images_NHW3 = reference_renders(["circle", "striped"], 2, seed=0)
    feats = oracle_features(oracle, images_NHW3)
    assert feats.shape == (4, oracle.config.feature_dim)
    pixels_N3HW = images_NHW3.permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(oracle_features(oracle, pixels_N3HW), feats)
