"""Test-session set-up: an isolated Hugging Face environment served by a local fake Hub, and the ``gpu`` marker.

The environment must be in place before ``huggingface_hub`` (or diffusers / transformers, which import it) is first
imported, because the client reads ``HF_ENDPOINT``, the cache paths and the offline/xet switches at import time
(research/hf_mechanics.md §3.2). Hence the order of this file: start the server, set the variables, then the rest.
"""

# ruff: noqa: E402 - the imports below must come after the environment is set
from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile

from .hub_server import FakeHub

_HUB = FakeHub().start()
_HF_ROOT = tempfile.mkdtemp(prefix="var-erase-tests-hf-")
atexit.register(shutil.rmtree, _HF_ROOT, ignore_errors=True)
atexit.register(_HUB.stop)

for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    os.environ.pop(_var, None)  # a developer's token or cache must not leak into (or be touched by) the tests
os.environ.update(
    HF_ENDPOINT=_HUB.url,
    HF_HOME=os.path.join(_HF_ROOT, "home"),
    HF_HUB_CACHE=os.path.join(_HF_ROOT, "hub"),
    HF_HUB_OFFLINE="0",  # tests that need offline behaviour run a subprocess with HF_HUB_OFFLINE=1
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_UPDATE_CHECK="1",
    HF_HUB_DISABLE_XET="1",  # plain git-blob uploads and downloads: the fake Hub has no xet (CAS) service
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    TOKENIZERS_PARALLELISM="false",
)

import pytest
import torch

_REPO_COUNTER = itertools.count(1)


@pytest.fixture(scope="session")
def hub_server() -> FakeHub:
    """The fake Hub every Hub call in this session goes to.

    ``hub_server.url``; ``.files(repo_id, revision)`` / ``.commits(repo_id)`` to inspect what was pushed;
    ``.seed(repo_id, {path: bytes})`` to put files there without the client; ``.requests`` (method, path,
    Authorization) and ``.unhandled`` (requests no route matched); ``.reset()`` to forget everything.
    """
    return _HUB


@pytest.fixture
def hub_repo_id(request) -> str:
    """A repo id no other test uses: ``var-erase-tests/<test name>-<n>``."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:60].strip("-.")
    return f"var-erase-tests/{name}-{next(_REPO_COUNTER)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests when no CUDA device is visible (checked only if such tests were collected)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    reason = "needs a CUDA device (torch.cuda.is_available() is False); run on a GPU machine to include it"
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def one_thread():
    """Small models and batches: one thread is faster, and does not stall on a busy machine (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
