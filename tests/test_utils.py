"""Shared helpers: atomic writes, host-to-device copies that do not wait for the GPU."""

import os

import pytest
import torch

from var_erase.utils import atomic_write_bytes, to_device_async


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and os.listdir(path.parent) == ["a.bin"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_to_device_async_on_the_cpu_is_a_plain_move():
    x = torch.arange(6).view(2, 3)
    assert to_device_async(x, "cpu") is x


@pytest.mark.gpu
def test_to_device_async_copies_through_pinned_memory_without_a_sync():
    x = torch.randn(4, 1000)
    torch.cuda.set_sync_debug_mode("error")  # any synchronising copy raises
    try:
        y = to_device_async(x, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.is_cuda and torch.equal(y.cpu(), x)
