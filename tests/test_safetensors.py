"""Our safetensors reader and writer: round trips with the safetensors package both ways,
every dtype, 0-d and empty tensors, and hostile files refused before anything is allocated."""

import json
import re
import struct

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

from rcfd.errors import CheckpointError
from rcfd.io import safetensors as st


def _sample(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * (1 + 2j)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2 ** 62)), min(info.max, 2 ** 62)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


ALL = [d for d in st.DTYPES.values() if d in set(safetensors_torch._TYPES.values())]


def _tensors():
    out = {f"{d}".replace("torch.", ""): _sample(d, (3, 5), i) for i, d in enumerate(ALL)}
    out.update({"scalar": torch.tensor(2.5, dtype=torch.float64),
                "empty": torch.empty(0, 4), "empty_int": torch.empty(2, 0, dtype=torch.int64),
                "strided": torch.arange(24.0).reshape(4, 6)[:, ::2],
                "unicode-näme/ü": torch.ones(1)})
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bytes(a[k]), _bytes(b[k])), k


def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_covers_every_dtype_we_use():
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
              torch.int32, torch.uint8, torch.bool):
        assert d in ALL


def test_ours_loads_in_the_package(tmp_path):
    tensors, meta = _tensors(), {"format": "rcfd", "note": "ü"}
    path = st.save_safetensors(tmp_path / "a.safetensors", tensors, meta)
    loaded = safetensors_torch.load_file(path)
    _same({k: v.contiguous() for k, v in tensors.items()}, loaded)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta


def test_package_file_loads_in_ours(tmp_path):
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    path = tmp_path / "b.safetensors"
    safetensors_torch.save_file(tensors, path, metadata={"k": "v"})
    loaded, meta = st.read_safetensors(path)
    _same(tensors, loaded)
    assert meta == {"k": "v"}
    entries, meta2 = st.read_safetensors_header(path)
    assert meta2 == meta and entries["scalar"].shape == () and entries["empty"].nbytes == 0


def test_bytes_equal_the_package_without_metadata():
    """Same layout rule as the package (decreasing element size, then name): identical bytes."""
    tensors = {"b": torch.randn(3), "a": torch.arange(4), "c": torch.ones(2, dtype=torch.uint8)}
    assert st.safetensors_bytes(tensors) == safetensors_torch.save(tensors)


def test_data_section_aligned_and_tensors_independent(tmp_path):
    path = st.save_safetensors(tmp_path / "c.safetensors",
                               {"x": torch.zeros(3, dtype=torch.uint8), "y": torch.ones(2)})
    raw = path.read_bytes()
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % 8 == 0
    loaded, _ = st.read_safetensors(path)
    loaded["y"] += 1  # each tensor owns its memory
    assert loaded["x"].tolist() == [0, 0, 0]


def test_writer_refuses_bad_input_and_writes_nothing(tmp_path):
    target = tmp_path / "d.safetensors"
    with pytest.raises(TypeError, match="not a tensor"):
        st.save_safetensors(target, {"a": [1, 2]})
    with pytest.raises(TypeError, match="str to str"):
        st.save_safetensors(target, {"a": torch.ones(1)}, {"k": 1})
    with pytest.raises(TypeError, match="__metadata__"):
        st.save_safetensors(target, {"__metadata__": torch.ones(1)})
    assert not target.exists() and not list(tmp_path.iterdir())


def test_is_safetensors_file(tmp_path):
    a = st.save_safetensors(tmp_path / "w.bin", {"a": torch.ones(1)})
    b = tmp_path / "t.pt"
    torch.save({"a": torch.ones(1)}, b)
    c = tmp_path / "legacy.pt"
    torch.save({"a": torch.ones(1)}, c, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\x01")
    assert st.is_safetensors_file(a) and st.is_safetensors_file(cut)
    assert not st.is_safetensors_file(b) and not st.is_safetensors_file(c)
    assert not st.is_safetensors_file(tmp_path / "missing")


# ----------------------------------------------------------------------------- hostile files
def _file(tmp_path, header, data=b"", n=None, raw_header=None):
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text) if n is None else n) + text + data)
    return path


def _length_field_cut(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    return path


def _f32(name="w", shape=(2,), offsets=(0, 8)):
    return {name: {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}}


BAD = {
    "length field cut": (_length_field_cut, "shorter than the 8-byte"),
    "header length huge": (lambda p: _file(p, _f32(), bytes(8), n=2 ** 63), "exceeds the file"),
    "header not JSON": (lambda p: _file(p, None, raw_header=b"{not json"), "not valid JSON"),
    "header not UTF-8": (lambda p: _file(p, None, raw_header=b'{"\xff": 1}'), "not UTF-8"),
    "header a list": (lambda p: _file(p, [1, 2]), "not an object"),
    "deep nesting": (lambda p: _file(p, None, raw_header=b"[" * 100000 + b"]" * 100000),
                     "nested too deeply|not an object"),
    "duplicate name": (lambda p: _file(p, None, bytes(8), raw_header=(
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')), "appears twice"),
    "unknown dtype": (lambda p: _file(p, {"w": {"dtype": "F33", "shape": [2],
                                               "data_offsets": [0, 8]}}, bytes(8)),
                      "unknown dtype 'F33'"),
    "negative dim": (lambda p: _file(p, _f32(shape=(-2,)), bytes(8)), "non-negative integers"),
    "float dim": (lambda p: _file(p, _f32(shape=(2.0,)), bytes(8)), "non-negative integers"),
    "bool dim": (lambda p: _file(p, _f32(shape=(True, 2)), bytes(8)), "non-negative integers"),
    "extra field": (lambda p: _file(p, {"w": {**_f32()["w"], "x": 1}}, bytes(8)), "exactly"),
    "offsets beyond data": (lambda p: _file(p, _f32(offsets=(0, 8)), bytes(4)), "outside"),
    "offsets reversed": (lambda p: _file(p, _f32(shape=(0,), offsets=(8, 0)), bytes(8)),
                         "outside"),
    "shape mismatch": (lambda p: _file(p, _f32(shape=(3,)), bytes(8)), "span 8"),
    "huge shape": (lambda p: _file(p, _f32(shape=(2 ** 40, 2 ** 40)), bytes(8)), "span 8"),
    "overlap": (lambda p: _file(p, {**_f32("a", (2,), (0, 8)), **_f32("b", (2,), (4, 12))},
                                bytes(12)), "overlaps 'a'"),
    "hole": (lambda p: _file(p, {**_f32("a", (1,), (0, 4)), **_f32("b", (1,), (8, 12))},
                             bytes(12)), "hole of 4 bytes"),
    "trailing bytes": (lambda p: _file(p, _f32(), bytes(12)), "trailing bytes"),
    "truncated data": (lambda p: _file(p, {**_f32("a", (1,), (0, 4)), **_f32("b", (2,), (4, 12))},
                                       bytes(6)), "outside"),
    "metadata not strings": (lambda p: _file(p, {"__metadata__": {"k": 1}, **_f32()}, bytes(8)),
                             "strings to strings"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_hostile_file_refused_with_a_message(tmp_path, case):
    make, message = BAD[case]
    path = make(tmp_path)
    for read in (st.read_safetensors, st.read_safetensors_header):
        with pytest.raises(CheckpointError) as e:
            read(path)
        text = str(e.value)
        assert "\n" not in text and str(path) in text
        assert re.search(message, text), text


def test_header_over_the_cap_refused_before_reading_it(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "MAX_HEADER_BYTES", 64)
    header = json.dumps({**_f32(), "__metadata__": {"pad": "x" * 100}}).encode()
    path = _file(tmp_path, None, bytes(8), raw_header=header)
    with pytest.raises(CheckpointError, match="limit of 64 bytes"):
        st.read_safetensors_header(path)


def test_truncated_real_file_refused(tmp_path):
    path = st.save_safetensors(tmp_path / "t.safetensors", {"w": torch.randn(100)})
    raw = path.read_bytes()
    for cut in (4, 20, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="not a valid safetensors file"):
            st.read_safetensors(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        st.read_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        st.read_safetensors(tmp_path)
