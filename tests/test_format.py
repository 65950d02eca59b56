"""The on-disk format: exact round trips, safetensors compatibility, hostile files."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from manifest_helpers import edit_manifest
from roundtrip_helpers import assert_same, tensor_bytes

from killsafe import format as fmt
from killsafe.errors import CheckpointNotFound, CorruptCheckpoint, UnsupportedFormat

ALL_DTYPES = [
    d
    for name in dir(torch)
    if isinstance(d := getattr(torch, name), torch.dtype)
    and str(d) == f"torch.{name}"
    and not name.startswith(("qint", "quint"))
]


def write(tmp_path: Path, tree: Any, **kwargs: Any) -> Path:
    directory = tmp_path / f"ckpt-{len(list(tmp_path.iterdir()))}"
    directory.mkdir()
    fmt.write_checkpoint(directory, tree, step=kwargs.pop("step", 1), **kwargs)
    return directory


def roundtrip(tmp_path: Path, tree: Any, **kwargs: Any) -> Any:
    directory = write(tmp_path, tree, **kwargs)
    return fmt.read_tree(directory)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    numel = int(np.prod(shape)) if shape else 1
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    raw = np.random.default_rng(seed).integers(0, 256, numel * itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_torch_dtype_round_trips_byte_for_byte(tmp_path: Path, dtype: torch.dtype) -> None:
    tree = {
        "matrix": random_tensor(dtype, (3, 4), 1),
        "scalar": random_tensor(dtype, (), 2),
        "empty": torch.empty(0, 5, dtype=dtype),
    }
    tree["transposed"] = tree["matrix"].t()
    loaded = roundtrip(tmp_path, tree)
    assert_same(tree, loaded)


def test_quantized_tensors_are_refused_with_their_path(tmp_path: Path) -> None:
    q = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)
    with pytest.raises(Exception, match=r"state\['model'\]\['q'\].*quantized"):
        write(tmp_path, {"model": {"q": q}})


def test_strided_views_keep_their_strides_and_share_storage(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float64).reshape(6, 10)
    tree = {"base": base, "cols": base[:, 1::3], "t": base.t(), "row": base[2]}
    loaded = roundtrip(tmp_path, tree)
    assert_same(tree, loaded)
    ptrs = {loaded[k].untyped_storage().data_ptr() for k in tree}
    assert len(ptrs) == 1
    loaded["base"][2, 1] = -1.0
    assert loaded["row"][1].item() == -1.0 and loaded["t"][1, 2].item() == -1.0


def test_a_small_view_of_a_big_tensor_stores_only_its_span(tmp_path: Path) -> None:
    big = torch.zeros(1_000_000)
    directory = write(tmp_path, {"piece": big[10:20]})
    assert (directory / fmt.TENSOR_FILE).stat().st_size < 1000
    assert fmt.read_tree(directory)["piece"].storage_offset() == 0


def test_views_of_mixed_widths_past_the_storage_end_are_padded(tmp_path: Path) -> None:
    base = torch.arange(6, dtype=torch.uint8)  # 6 bytes; the int32 view makes 4 the widest
    tree = {"bytes": base, "word": base[:4].view(torch.int32)}
    (entry,) = fmt.encode(tree).entries
    assert entry.nbytes == 8 and entry.shape == (8,) and entry.nbytes % entry.align == 0
    assert bytes(entry.data) == bytes(range(6)) + b"\0\0"
    assert_same(tree, roundtrip(tmp_path, tree))


def test_tied_weights_are_stored_once_and_restored_shared(tmp_path: Path) -> None:
    embedding = torch.randn(100, 16)
    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 100, bias=False))
    model[1].weight = model[0].weight
    state = model.state_dict()
    state["again"] = embedding
    state["again_too"] = embedding
    directory = write(tmp_path, state)
    size = (directory / fmt.TENSOR_FILE).stat().st_size
    assert size < 2 * 100 * 16 * 4 + 1000
    loaded = fmt.read_tree(directory)
    assert loaded["0.weight"] is loaded["1.weight"]
    assert loaded["again"] is loaded["again_too"]
    assert torch.equal(loaded["0.weight"], model[0].weight)


def test_views_of_one_storage_with_different_dtypes(tmp_path: Path) -> None:
    base = torch.arange(16, dtype=torch.int32)
    tree = {"ints": base, "bytes": base.view(torch.uint8)[3:9], "halves": base.view(torch.int16)}
    assert_same(tree, roundtrip(tmp_path, tree))


def test_plain_values_round_trip_exactly(tmp_path: Path) -> None:
    tree = {
        "none": None,
        "flags": [True, False],
        "big": 2**200 + 1,
        "negbig": -(3**300),
        "floats": (-0.0, float("nan"), float("inf"), -float("inf"), 5e-324, 1.1),
        "text": "caf\u00e9 \ud800 \x00",
        "blob": bytes(range(256)) * 3,
        "small": b"\x00\x01",
        7: "int key",
        -3: {"nested": ({1, 2}, frozenset({"a"}))},
        "list_vs_tuple": [(1, 2), [1, 2]],
    }
    loaded = roundtrip(tmp_path, tree)
    assert_same(tree, loaded)
    assert struct.pack("<d", loaded["floats"][0]) == struct.pack("<d", -0.0)


def test_numpy_arrays_and_scalars_round_trip(tmp_path: Path) -> None:
    tree = {
        "c": np.arange(12, dtype=np.int16).reshape(3, 4),
        "f": np.asfortranarray(np.ones((3, 2), dtype=np.float32)),
        "strided": np.arange(20.0)[::3],
        "big_endian": np.arange(4, dtype=">i4"),
        "dates": np.array(["2020-01-01", "2021-06-30"], dtype="M8[D]"),
        "strings": np.array(["ab", "cde"]),
        "empty": np.empty((0, 3)),
        "zero_d": np.array(3.5),
        "scalars": [np.float32(1.5), np.int64(-7), np.bool_(True), np.complex64(1 + 2j)],
    }
    loaded = roundtrip(tmp_path, tree)
    assert_same(tree, loaded)
    assert loaded["f"].flags.f_contiguous
    loaded["c"][0, 0] = 99  # arrays are writable


def test_safetensors_reads_the_weights_without_killsafe(tmp_path: Path) -> None:
    from safetensors import safe_open

    tree = {
        "model": {"w": torch.randn(4, 3), "b": torch.randn(3, dtype=torch.bfloat16)},
        "f8": torch.randn(5).to(torch.float8_e5m2),
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        "step": 3,
    }
    directory = write(tmp_path, tree)
    with safe_open(str(directory / fmt.TENSOR_FILE), "pt") as f:
        assert set(f.keys()) == {"model.w", "model.b", "f8", "u16"}
        for key, value in [("model.w", tree["model"]["w"]), ("model.b", tree["model"]["b"])]:
            assert torch.equal(f.get_tensor(key), value)
        assert tensor_bytes(f.get_tensor("f8")) == tensor_bytes(tree["f8"])
        assert torch.equal(f.get_tensor("u16"), tree["u16"])


def test_header_is_padded_and_entries_aligned(tmp_path: Path) -> None:
    tree = {"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(3, dtype=torch.float64)}
    tree["c"] = torch.ones(1, dtype=torch.complex128)
    directory = write(tmp_path, tree)
    raw = (directory / fmt.TENSOR_FILE).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    assert entries[0][0][0] == 0 and entries[-1][0][1] == len(raw) - 8 - length
    for (start, _), key in entries:
        assert start % tree[key].element_size() == 0


def test_zstd_compression_round_trips_and_is_recorded(tmp_path: Path) -> None:
    tree = {"zeros": torch.zeros(100_000), "x": torch.arange(10)}
    directory = write(tmp_path, tree, compression="zstd")
    manifest = fmt.read_manifest(directory)
    info = manifest["files"][fmt.TENSOR_FILE_ZSTD]
    assert info["codec"] == "zstd" and info["size"] < 20_000
    assert_same(tree, fmt.read_tree(directory))
    fmt.verify_checkpoint(directory)


def test_mmap_tensors_are_writable_and_never_touch_the_file(tmp_path: Path) -> None:
    directory = write(tmp_path, {"w": torch.arange(1000, dtype=torch.float32)})
    before = (directory / fmt.TENSOR_FILE).read_bytes()
    loaded = fmt.read_tree(directory, mmap=True)
    loaded["w"].add_(1)
    assert loaded["w"][0].item() == 1.0
    assert (directory / fmt.TENSOR_FILE).read_bytes() == before
    fmt.verify_checkpoint(directory)


def test_subtree_reads_and_verifies_only_its_tensors(tmp_path: Path) -> None:
    tree = {"model": {"w": torch.ones(100)}, "optimizer": {"m": torch.zeros(100)}}
    directory = write(tmp_path, tree)
    table = fmt.read_manifest(directory)["tensors"]
    start = table["header_size"] + table["entries"]["optimizer.m"]["offsets"][0]
    flip_byte(directory / fmt.TENSOR_FILE, start + 5)
    model = fmt.read_tree(directory, subtree="model")
    assert torch.equal(model["w"], torch.ones(100))
    with pytest.raises(CorruptCheckpoint, match=r"optimizer\.m"):
        fmt.read_tree(directory, subtree="optimizer")
    with pytest.raises(CheckpointNotFound, match="sub-tree"):
        fmt.read_tree(directory, subtree="nothing")


# ------------------------------------------------------------ property-based

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=100)
)
hashables = st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.binary(max_size=5)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(ALL_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    tensor = random_tensor(dtype, shape, draw(st.integers(0, 1000)))
    if tensor.dim() >= 2 and draw(st.booleans()):
        tensor = tensor.transpose(0, 1)
    return tensor


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(["<f8", "<f4", "<i2", "|u1", "|b1", ">i8", "<c16", "<M8[s]"]))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    count = int(np.prod(shape)) if shape else 1
    data = np.random.default_rng(draw(st.integers(0, 99))).integers(0, 2, count * 16)
    return np.frombuffer(data.astype(np.uint8).tobytes(), dtype=dtype, count=count).reshape(shape)


leaves = scalars | tensors() | arrays()
trees = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6) | st.integers(), children, max_size=4)
        | st.frozensets(hashables, max_size=4)
        | st.sets(hashables, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=trees, mmap=st.booleans(), zstd=st.booleans())
def test_generated_trees_round_trip_exactly(
    tmp_path: Path, tree: Any, mmap: bool, zstd: bool
) -> None:
    directory = write(tmp_path, tree, compression="zstd" if zstd else None)
    assert_same(tree, fmt.read_tree(directory, mmap=mmap))
    fmt.verify_checkpoint(directory)


# ------------------------------------------------------------ hostile files


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return write(tmp_path, {"w": torch.arange(256, dtype=torch.float32), "n": 3, "b": b"x" * 500})


def test_bit_flips_anywhere_in_the_tensor_file_are_caught(checkpoint: Path) -> None:
    size = (checkpoint / fmt.TENSOR_FILE).stat().st_size
    for offset in (3, 20, size // 2, size - 1):
        flip_byte(checkpoint / fmt.TENSOR_FILE, offset)
        with pytest.raises(CorruptCheckpoint):
            fmt.verify_checkpoint(checkpoint)
        with pytest.raises(CorruptCheckpoint):
            fmt.read_tree(checkpoint)
        flip_byte(checkpoint / fmt.TENSOR_FILE, offset)
    fmt.verify_checkpoint(checkpoint)


def test_truncated_files_are_corrupt(checkpoint: Path) -> None:
    data = checkpoint / fmt.TENSOR_FILE
    raw = data.read_bytes()
    data.write_bytes(raw[:-7])
    with pytest.raises(CorruptCheckpoint, match="bytes, expected"):
        fmt.read_tree(checkpoint)
    data.write_bytes(raw)
    manifest = checkpoint / fmt.MANIFEST_NAME
    manifest.write_bytes(manifest.read_bytes()[:50])
    with pytest.raises(CorruptCheckpoint, match="not valid JSON"):
        fmt.read_manifest(checkpoint)


def test_missing_directory_and_non_checkpoint_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        fmt.read_manifest(tmp_path / "nope")
    with pytest.raises(CheckpointNotFound, match="not a checkpoint"):
        fmt.read_manifest(tmp_path)


def test_newer_format_version_is_refused(checkpoint: Path) -> None:
    edit_manifest(checkpoint, lambda m: m.update(format_version=99))
    with pytest.raises(UnsupportedFormat, match="upgrade killsafe"):
        fmt.read_manifest(checkpoint)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(step="5"), r"Expected `int`, got `str` - at `\$.step`"),
        (lambda m: m.update(step=True), r"Expected `int`, got `bool` - at `\$.step`"),
        (lambda m: m.update(metrics=[1]), r"Expected `object`, got `array` - at `\$.metrics`"),
        (lambda m: m.update(tree="x"), r"Expected `object`, got `str` - at `\$.tree`"),
        (lambda m: m.update(name=3), r"at `\$.name`"),
        (lambda m: m.update(format="other"), "not a killsafe manifest"),
        (
            lambda m: m["files"].update({"../../etc/passwd": {"size": 1, "xxh3": "0"}}),
            r"Invalid enum value '../../etc/passwd' - at `key` in `\$.files`",
        ),
        (lambda m: m["tensors"].update(file="../outside.safetensors"), r"at `\$.tensors.file`"),
        (lambda m: m["tensors"].update(file="tensors.safetensors.zst"), "not listed in files"),
        (
            lambda m: m["tensors"]["entries"]["w"].update(offsets=[0, 10**12]),
            "outside the tensor file",
        ),
        (lambda m: m["tensors"]["entries"]["w"].update(offsets=[-8, 4]), r"Expected `int` >= 0"),
        (lambda m: m["files"]["tensors.safetensors"].update(size="big"), r"got `str` - at `\$"),
    ],
)
def test_hostile_manifests_get_typed_errors(checkpoint: Path, change: Any, message: str) -> None:
    edit_manifest(checkpoint, change)
    with pytest.raises(CorruptCheckpoint, match=message):
        fmt.read_tree(checkpoint)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["tree"]["entries"]["w"].update(shape=[10**9]),
        lambda m: m["tree"]["entries"]["w"].update(stride=[10**6]),
        lambda m: m["tree"]["entries"]["w"].update(offset=-1),
        lambda m: m["tree"]["entries"]["w"].update(dtype="Tensor"),
        lambda m: m["tree"]["entries"]["w"].update(dtype="qint8"),
        lambda m: m["tree"]["entries"]["w"].update(entry="missing"),
        lambda m: m["tree"]["entries"].update(
            x={"type": "ndarray", "dtype": "|O8", "shape": [1], "entry": "w"}
        ),
        lambda m: m["tree"]["entries"].update(x={"type": "pickle", "data": "gASV"}),
        lambda m: m["tree"]["entries"].update(x={"type": "int", "value": "1"}),
        lambda m: m.update(
            tree={"type": "dict", "items": [[{"type": "float", "value": 1.5}, {"type": "none"}]]}
        ),
        lambda m: m.update(tree={"type": "list", "items": {"a": 1}}),
    ],
)
def test_hostile_trees_get_typed_errors(checkpoint: Path, change: Any) -> None:
    edit_manifest(checkpoint, change)
    with pytest.raises(CorruptCheckpoint):
        fmt.read_tree(checkpoint)


def test_deeply_nested_manifest_is_corrupt_not_a_crash(checkpoint: Path) -> None:
    (checkpoint / fmt.MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorruptCheckpoint):
        fmt.read_manifest(checkpoint)


class Bomb:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_where_the_tensor_file_should_be_is_never_executed(
    checkpoint: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Bomb(marker))
    (checkpoint / fmt.TENSOR_FILE).write_bytes(payload)
    with pytest.raises(CorruptCheckpoint):
        fmt.read_tree(checkpoint)
    edit_manifest(checkpoint, lambda m: m["files"][fmt.TENSOR_FILE].update(size=len(payload)))
    with pytest.raises(CorruptCheckpoint):
        fmt.read_tree(checkpoint)
    with pytest.raises(CorruptCheckpoint):
        fmt.verify_checkpoint(checkpoint)
    (checkpoint / fmt.MANIFEST_NAME).write_bytes(payload)
    with pytest.raises(CorruptCheckpoint):
        fmt.read_manifest(checkpoint)
    assert not marker.exists()


def test_a_bit_flip_in_the_manifest_or_in_its_checksum_is_caught(tmp_path: Path) -> None:
    directory = write(tmp_path, {"w": torch.ones(3)}, step=500)
    path = directory / fmt.MANIFEST_NAME
    raw = path.read_bytes()
    at = raw.index(b'"step": 500') + len(b'"step": ')
    checksum_at = raw.index(b'"manifest_xxh3": "') + len(b'"manifest_xxh3": "')
    for offset, bit in ((at, 0x02), (checksum_at, 0x01)):  # "500" -> "700"; one hex digit
        flipped = bytearray(raw)
        flipped[offset] ^= bit
        path.write_bytes(bytes(flipped))
        with pytest.raises(CorruptCheckpoint, match="fails its own checksum"):
            fmt.read_manifest(directory)
    path.write_bytes(raw)
    assert fmt.read_manifest(directory)["step"] == 500


def test_a_version_2_manifest_without_its_checksum_is_corrupt(checkpoint: Path) -> None:
    edit_manifest(checkpoint, lambda m: m.pop(fmt.CHECKSUM_FIELD), reseal=False)
    with pytest.raises(CorruptCheckpoint, match="has no manifest_xxh3"):
        fmt.read_manifest(checkpoint)
