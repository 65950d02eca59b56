"""Pinned staging of CUDA tensors: consistent, exact-sized, reused (GPU tests skip without one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from killsafe import format as fmt
from killsafe.staging import ALIGN, PinnedStaging
from killsafe.state import tensors_in
from killsafe.store import CheckpointStore

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_tree_without_cuda_tensors_stages_nothing() -> None:
    tree = {"w": torch.ones(3), "meta": [1, ("a", torch.zeros(2)), {torch.zeros(1)}]}
    staged = PinnedStaging().stage(tree)
    assert staged.copies == {} and staged.devices == set()
    staged.wait()
    assert len(list(tensors_in(tree))) == 3


def test_encoding_from_host_copies_reads_them_instead_of_the_tensors() -> None:
    live = torch.arange(12, dtype=torch.float32)
    tree = {"a": live[2:8].view(2, 3), "b": live}
    key = (str(live.device), live.untyped_storage().data_ptr())
    copy = live.view(torch.uint8).clone()  # another storage, same bytes
    with torch.no_grad():
        live.zero_()  # the loop changed the tensors after the copy was taken
    encoded = fmt.encode(tree, host_copies={key: copy})
    assert len(encoded.entries) == 1
    entry = encoded.entries[0]
    assert entry.owner.untyped_storage().data_ptr() == copy.untyped_storage().data_ptr()
    assert bytes(entry.data) == copy.numpy().tobytes()


def _cuda_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 384), torch.nn.Linear(384, 512)).cuda()
    model[1].weight = torch.nn.Parameter(model[0].weight.t())  # tied, non-contiguous
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 512, device="cuda")).sum().backward()
    optimizer.step()
    extra = {
        "half": torch.randn(1000, device="cuda", dtype=torch.bfloat16),
        "slice": torch.arange(10_000, device="cuda", dtype=torch.int64)[17:9000:3],
        "empty": torch.empty(0, device="cuda"),
        "host": torch.randn(100),
    }
    return model, optimizer, extra


def _snapshot_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _snapshot_of(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot_of(v) for v in value)
    return value


def _assert_same(loaded: Any, expected: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        assert torch.equal(loaded.cpu(), expected)
    elif isinstance(expected, dict):
        assert set(loaded) == set(expected)
        for key in expected:
            _assert_same(loaded[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(loaded) == len(expected)
        for a, b in zip(loaded, expected, strict=True):
            _assert_same(a, b)
    else:
        assert loaded == expected


@pytest.mark.gpu
@needs_cuda
def test_the_next_step_changing_every_tensor_does_not_leak_into_the_checkpoint(
    tmp_path: Path,
) -> None:
    model, optimizer, extra = _cuda_state()
    with CheckpointStore(tmp_path / "ck") as store:
        for step in range(1, 4):
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra}
            expected = _snapshot_of(state)
            pending = store.save_async(state, step)
            assert pending is not None
            # The very next step: queued right after the call, changes everything.
            model(torch.randn(8, 512, device="cuda")).sum().backward()
            optimizer.step()
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-3.0)
                extra["half"].add_(1)
            loaded = store.load(pending.wait().path)
            _assert_same(loaded, expected)


@pytest.mark.gpu
@needs_cuda
def test_tied_weights_stay_one_entry_and_one_copy(tmp_path: Path) -> None:
    model, _, _ = _cuda_state()
    with CheckpointStore(tmp_path / "ck") as store:
        store.save_async({"model": model.state_dict()}, 1)
        info = store.wait()
        assert info is not None
        loaded = store.load(info.path)["model"]
    assert torch.equal(loaded["1.weight"], loaded["0.weight"].t())
    loaded["0.weight"][0, 0] = 123.0
    assert loaded["1.weight"][0, 0] == 123.0  # still sharing, as on the device


@pytest.mark.gpu
@needs_cuda
def test_the_arena_is_page_locked_exact_sized_and_reused() -> None:
    model, optimizer, extra = _cuda_state()
    staging = PinnedStaging()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra}
    device_storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in tensors_in(state)
        if t.is_cuda and t.numel()
    }
    expected_size = sum(-(-n // ALIGN) * ALIGN for n in device_storages.values())
    first = staging.stage(state)
    first.wait()
    arena = staging._arenas["cuda:0"]
    assert arena._registered  # locked in place, not torch's power-of-two pinned blocks
    assert arena.nbytes == max(expected_size, ALIGN)
    assert len(first.copies) == len(device_storages)
    for (device, pointer), copy in first.copies.items():
        assert device == "cuda:0" and pointer in device_storages
        assert copy.device.type == "cpu" and copy.is_pinned() and staging.owns(copy)
        assert copy.numel() == device_storages[pointer]
    assert not staging.owns(extra["host"])
    arena_pointer = arena.pointer
    second = staging.stage(state)
    second.wait()
    assert staging._arenas["cuda:0"].pointer == arena_pointer
    assert all(second.copies[key] is piece for key, piece in first.copies.items())
    staging.release()
    assert staging._arenas == {}
    # The copies handed out keep the memory alive after the release.
    for tensor in tensors_in(state):
        if tensor.is_cuda and tensor.numel():
            storage = tensor.untyped_storage()
            copy = second.copies[("cuda:0", storage.data_ptr())]
            live = torch.empty(0, dtype=torch.uint8, device="cuda").set_(storage)
            assert torch.equal(copy, live.cpu())


@pytest.mark.gpu
@needs_cuda
def test_a_state_that_grows_gets_a_new_arena() -> None:
    staging = PinnedStaging()
    small = {"w": torch.randn(1000, device="cuda")}
    staging.stage(small).wait()
    before = staging._arenas["cuda:0"].nbytes
    big = {"w": torch.randn(1_000_000, device="cuda")}
    staged = staging.stage(big)
    staged.wait()
    assert staging._arenas["cuda:0"].nbytes > before
    (copy,) = staged.copies.values()
    assert torch.equal(copy.view(torch.float32), big["w"].cpu())
    staging.release()
