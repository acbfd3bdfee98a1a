"""Feature-FID: the Fréchet distance between Gaussian fits of two feature sets, and its toy-world form in the oracle's
feature space.

For feature sets ``A`` and ``B`` with means ``mu_a``, ``mu_b`` and covariances ``sigma_a``, ``sigma_b`` (unbiased,
``N - 1`` in the denominator, as pytorch-fid and clean-fid compute them)::

    FID = |mu_a - mu_b|^2 + tr(sigma_a) + tr(sigma_b) - 2 tr((sigma_a sigma_b)^(1/2))

This is the Fréchet (2-Wasserstein) distance of Heusel et al. (2017), eq. 6. The trace of the matrix square root is
computed in float64 by one of two methods:

- ``"scipy"``: ``scipy.linalg.sqrtm(sigma_a @ sigma_b)``, as pytorch-fid's ``calculate_frechet_distance`` does it
  (an ``eps`` ridge when the root is not finite; the real part, when the imaginary residue is negligible);
- ``"torch"``: ``sigma_a @ sigma_b`` has the same eigenvalues as the symmetric PSD ``S sigma_b S`` with
  ``S = sigma_a^(1/2)``, so the trace is ``sum(sqrt(eigvalsh(S sigma_b S)))``, from two symmetric eigen-decompositions
  (round-off negatives clamped to 0). No SciPy needed, and stable for singular covariances.

``method="auto"`` uses SciPy when it is installed and torch otherwise; the two agree to ~1e-6 relative
(``tests/test_eval_fid.py``).

Toy world (:func:`oracle_fid`): the features are the oracle's penultimate activations, ``(N, 256)``. Use it for
*erased vs original model on non-target prompts* (same prompts, same seeds: what an erasure changed in images it should
leave alone) and *generated vs real renders* (:func:`reference_renders`). FID is biased upwards for small ``N`` (the
covariance of 256-d features needs a few hundred images): compare numbers only at the same ``N``; a set against
itself is 0 for any ``N``.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.util import find_spec

import numpy as np
import torch

from ..toy.concepts import get_concept
from ..toy.render import render_batch, sample_scene

FID_METHODS = ("auto", "scipy", "torch")


def gaussian_statistics(feats_ND) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)``, float64, of ``N >= 2`` feature rows ``(N, D)``."""
    feats = _as_features(feats_ND, "feats_ND")
    return feats.mean(dim=0), torch.cov(feats.T, correction=1).reshape(feats.shape[1], feats.shape[1])


def frechet_distance_from_statistics(mu_a_D, sigma_a_DD, mu_b_D, sigma_b_DD, method: str = "auto",
                                     eps: float = 1e-6) -> float:
    """Fréchet distance between ``N(mu_a, sigma_a)`` and ``N(mu_b, sigma_b)`` (module docstring for the formula).

    Args:
        mu_a_D, mu_b_D: means ``(D,)``; sigma_a_DD, sigma_b_DD: covariances ``(D, D)`` (tensors or arrays).
        method: ``"auto"`` (SciPy if installed, else torch), ``"scipy"`` or ``"torch"``.
        eps: the ridge added to both covariances by the SciPy method when their product is singular (pytorch-fid's).
    """
    mu_a, mu_b = (torch.as_tensor(m, dtype=torch.float64).cpu() for m in (mu_a_D, mu_b_D))
    sigma_a, sigma_b = (torch.as_tensor(s, dtype=torch.float64).cpu() for s in (sigma_a_DD, sigma_b_DD))
    dim = mu_a.shape[0]
    if mu_a.shape != (dim,) or mu_b.shape != (dim,) or sigma_a.shape != (dim, dim) or sigma_b.shape != (dim, dim):
        raise ValueError(
            f"statistics do not match: means {tuple(mu_a.shape)} and {tuple(mu_b.shape)}, covariances "
            f"{tuple(sigma_a.shape)} and {tuple(sigma_b.shape)}; expected (D,) means and (D, D) covariances"
        )
    trace_sqrt = _trace_sqrt_product(sigma_a, sigma_b, _resolve_method(method), eps)
    distance = (mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace() - 2.0 * trace_sqrt
    return max(float(distance), 0.0)  # a few ulps below 0 for identical sets


def frechet_distance(feats_a_ND, feats_b_MD, method: str = "auto") -> float:
    """Fréchet distance between Gaussian fits of two feature sets ``(N, D)`` and ``(M, D)``, ``N, M >= 2``.

    Symmetric in its arguments; 0 for a set against itself.
    """
    mu_a, sigma_a = gaussian_statistics(feats_a_ND)
    mu_b, sigma_b = gaussian_statistics(feats_b_MD)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sets differ in width: {mu_a.shape[0]} vs {mu_b.shape[0]} features per row")
    return frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b, method=method)


@torch.no_grad()
def oracle_features(oracle, images, batch_size: int = 256) -> torch.Tensor:
    """The oracle's penultimate features ``(N, feature_dim)`` float32 on the CPU, for images in any format
    ``OracleClassifier.prepare`` accepts (uint8 ``(N, H, W, 3)`` as ``generate_images`` returns them)."""
    oracle.eval()
    pixels = oracle.prepare(images)
    chunks = [oracle.features(pixels[i: i + batch_size]).float().cpu() for i in range(0, len(pixels), batch_size)]
    return torch.cat(chunks)


def oracle_fid(oracle, images_a, images_b, method: str = "auto", batch_size: int = 256) -> float:
    """Feature-FID of two image sets in the oracle's feature space (module docstring for the protocol)."""
    return frechet_distance(oracle_features(oracle, images_a, batch_size),
                            oracle_features(oracle, images_b, batch_size), method=method)


def reference_renders(concepts: Sequence[str], n_per_concept: int, seed: int = 0) -> torch.Tensor:
    """Real renders for a *generated vs real* FID: uint8 ``(len(concepts) * n_per_concept, 64, 64, 3)``.

    Concept-major order; each image is a one-object scene showing the concept, every other attribute random (the
    distribution ``toy.captions.evaluation_prompts`` draws its prompts' scenes from). Deterministic from ``seed``.
    """
    rng = np.random.default_rng(seed)
    scenes = []
    for name in concepts:
        concept = get_concept(name)
        scenes += [sample_scene(rng, n_objects=1, **{concept.kind: concept.name}) for _ in range(n_per_concept)]
    if not scenes:
        raise ValueError("no reference renders requested: pass at least one concept and n_per_concept >= 1")
    return torch.from_numpy(np.asarray(render_batch(scenes)))


# ---------------------------------------------------------------------------------------------------------------------
# helpers
def _as_features(feats, name: str) -> torch.Tensor:
    feats = torch.as_tensor(feats).detach().to(device="cpu", dtype=torch.float64)
    if feats.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) matrix of feature rows, got shape {tuple(feats.shape)}")
    if feats.shape[0] < 2:
        raise ValueError(f"{name} has {feats.shape[0]} row(s); a covariance needs at least 2 (use a few hundred)")
    if not torch.isfinite(feats).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return feats


def _resolve_method(method: str) -> str:
    if method not in FID_METHODS:
        raise ValueError(f"unknown FID method {method!r}; choose one of {list(FID_METHODS)}")
    has_scipy = find_spec("scipy") is not None
    if method == "scipy" and not has_scipy:
        raise ImportError("method='scipy' needs SciPy (pip install scipy); method='torch' needs nothing extra")
    if method == "auto":
        return "scipy" if has_scipy else "torch"
    return method


def _trace_sqrt_product(sigma_a: torch.Tensor, sigma_b: torch.Tensor, method: str, eps: float) -> torch.Tensor:
    """``tr((sigma_a sigma_b)^(1/2))`` for PSD float64 matrices."""
    if method == "scipy":
        return torch.tensor(_trace_sqrt_product_scipy(sigma_a.numpy(), sigma_b.numpy(), eps), dtype=torch.float64)
    root_a = _psd_sqrt(sigma_a)
    middle = root_a @ sigma_b @ root_a
    middle = (middle + middle.T) / 2  # symmetric up to round-off; eigvalsh reads one triangle
    return torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum()


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix (negative round-off eigenvalues set to 0)."""
    values, vectors = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def _trace_sqrt_product_scipy(sigma_a: np.ndarray, sigma_b: np.ndarray, eps: float) -> float:
    """pytorch-fid's ``calculate_frechet_distance`` square-root step (pytorch_fid/fid_score.py, v0.3.0), without its
    ``disp=False`` (deprecated in SciPy 1.17, removed in 1.18)."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma_a.dot(sigma_b))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_a + offset).dot(sigma_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(sigma_a @ sigma_b); the "
                f"covariances are far from PSD. Use method='torch', which is exact for singular covariances"
            )
        covmean = covmean.real
    return float(np.trace(covmean))
