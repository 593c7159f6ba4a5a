"""rcfd.data: the digits default, the CIFAR-10 reader (safe unpickling), image folders; and
rcfd.data.loader: the resumable, shardable batch iterator."""

import os
import pickle
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rcfd.data import (
    DatasetSpec,
    ImageDataset,
    digits_split,
    load_dataset,
    to_float,
    to_uint8,
)
from rcfd.data.folder import find_images
from rcfd.data.loader import batches, epoch_seed
from rcfd.errors import DataError

# --------------------------------------------------------------------------- conversions


def test_uint8_float_round_trip_is_exact():
    u = torch.arange(256, dtype=torch.uint8)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = to_float(u, dtype) if dtype in (torch.float32, torch.float64) else to_float(u).to(dtype)
        assert torch.equal(to_uint8(x), u), dtype
    x = to_float(u)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(torch.tensor([-3.0, -1.0, 1.0, 7.0])), torch.tensor([0, 0, 255, 255], dtype=torch.uint8))


def test_to_uint8_rounds_to_nearest_level():
    u = torch.arange(255, dtype=torch.float64)
    below, above = (u + 0.49) / 127.5 - 1, (u + 0.51) / 127.5 - 1
    assert torch.equal(to_uint8(below), u.to(torch.uint8))
    assert torch.equal(to_uint8(above), (u + 1).to(torch.uint8))
    with pytest.raises(TypeError):
        to_uint8(torch.zeros(2, dtype=torch.uint8))


# --------------------------------------------------------------------------- spec


def test_spec_defaults_and_round_trip():
    s = DatasetSpec()
    assert (s.name, s.image_size, s.channels) == ("digits", 16, 1)
    assert DatasetSpec.from_dict(s.to_dict()) == s
    c = DatasetSpec(name="cifar10", path="x")
    assert (c.image_size, c.channels) == (32, 3)
    assert DatasetSpec.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="mnist"), "name"),
        (dict(path="somewhere"), "embedded"),
        (dict(name="cifar10"), "path is required"),
        (dict(name="folder", path="p"), "image_size is required"),
        (dict(image_size=0), "image_size"),
        (dict(channels=2), "channels"),
    ],
)
def test_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DatasetSpec(**kwargs)
    with pytest.raises(ValueError, match="unknown key"):
        DatasetSpec.from_dict({"name": "digits", "size": 3})


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetSpec(), "train"), load_dataset(DatasetSpec(), "test")


def test_digits_shapes_range_balance(digits):
    train, test = digits
    assert train.images.shape == (1497, 1, 16, 16) and test.images.shape == (300, 1, 16, 16)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.num_classes == test.num_classes == 10
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 30))
    x = train.to_float()
    assert x.min() == -1 and x.max() <= 1 and x.max() > 0.9  # background is exactly -1, strokes reach ~1


def test_digits_split_is_fixed_stratified_and_disjoint(digits):
    from sklearn.datasets import load_digits

    y = load_digits().target
    mask = digits_split(y, 0)
    assert mask.sum() == 300 and np.array_equal(np.bincount(y[mask]), np.full(10, 30))
    assert np.array_equal(mask, digits_split(y, 0)) and not np.array_equal(mask, digits_split(y, 1))
    again = load_dataset(DatasetSpec(), "train")
    assert again.fingerprint() == digits[0].fingerprint()
    assert load_dataset(DatasetSpec(split_seed=1), "train").fingerprint() != digits[0].fingerprint()


def test_digits_native_size_is_the_data_and_upsampling_preserves_it(digits):
    from sklearn.datasets import load_digits

    d = load_digits()
    native = load_dataset(DatasetSpec(image_size=8), "test")
    raw = torch.from_numpy(d.images[digits_split(d.target)]).unsqueeze(1).double()
    assert torch.equal(native.images, to_uint8(raw / 8 - 1))  # 0..16 -> [-1, 1], no resampling
    # reference: PIL's bicubic (float mode), clamped; and it averages back (2x2) close to the data
    from PIL import Image

    pil = [np.asarray(Image.fromarray(a, "F").resize((16, 16), Image.Resampling.BICUBIC))
           for a in (raw[:, 0] / 8 - 1).float().numpy()]
    up = torch.from_numpy(np.stack(pil)).unsqueeze(1).clamp(-1, 1)
    assert (digits[1].images.int() - to_uint8(up).int()).abs().max() <= 1
    back, orig = F.avg_pool2d(digits[1].to_float(torch.float64), 2), native.to_float(torch.float64)
    assert (back - orig).abs().mean() < 0.1 and np.corrcoef(back.flatten(), orig.flatten())[0, 1] > 0.97
    rgb = load_dataset(DatasetSpec(channels=3), "test")
    assert rgb.images.shape == (300, 3, 16, 16) and torch.equal(rgb.images[:, 2:], digits[1].images)


# --------------------------------------------------------------------------- CIFAR-10


SIZES = {"data_batch_1": 7, "data_batch_2": 3, "data_batch_3": 5, "data_batch_4": 1, "data_batch_5": 2, "test_batch": 9}


def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_batch(data: np.ndarray, labels: list) -> bytes:
    """A batch byte for byte as Python 2's cPickle (protocol 2) writes it, memo opcodes left
    out: str keys and payloads are 8-bit strings, the array goes through
    ``numpy.core.multiarray._reconstruct`` and ``ndarray.__setstate__``."""
    k = lambda v: b"K" + bytes([v])  # noqa: E731  (BININT1)
    n, d = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + k(0) + b"\x85" + _py2_str(b"b") + b"\x87R"
        + b"(" + k(1) + b"M" + struct.pack("<H", n) + b"M" + struct.pack("<H", d) + b"\x86"
        + b"cnumpy\ndtype\n" + _py2_str(b"u1") + k(0) + k(1) + b"\x87R"
        + b"(" + k(3) + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + k(0) + b"tb"
        + b"\x89" + _py2_str(data.tobytes()) + b"tb"
    )
    return (b"\x80\x02}(" + _py2_str(b"batch_label") + _py2_str(b"training batch") + _py2_str(b"data") + array
            + _py2_str(b"labels") + b"](" + b"".join(k(v) for v in labels) + b"eu.")


def _official_pickle(obj, style: int) -> bytes:
    """Three encodings of one batch: 0, Python 2's (the official files); 1, protocol 2 from
    Python 3 with numpy 1's global name (bytes go through ``_codecs.encode``); 2, protocol 4."""
    if style == 0:
        return _py2_batch(obj[b"data"], obj[b"labels"])
    blob = pickle.dumps(obj, protocol=2 if style == 1 else 4)
    return blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n") if style == 1 else blob


def _write_cifar(root, sizes=SIZES, tamper=None):
    rng = np.random.RandomState(0)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    truth = {}
    for i, (name, n) in enumerate(sizes.items()):
        data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.randint(0, 10, size=n)]
        truth[name] = (data, labels)
        obj = {b"batch_label": b"batch", b"labels": labels, b"data": data, b"filenames": [b"f.png"] * n}
        blob = tamper(name, obj) if tamper else _official_pickle(obj, i % 3)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(blob)
    names = [f"c{i}".encode() for i in range(10)]
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        f.write(_official_pickle({b"label_names": names, b"num_vis": 3072}, 1))
    return folder, truth


def _tar(folder, path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return path


@pytest.fixture
def cifar(tmp_path):
    folder, truth = _write_cifar(str(tmp_path))
    return folder, truth, _tar(folder, str(tmp_path / "cifar-10-python.tar.gz"))


@pytest.mark.parametrize("form", ["folder", "parent", "archive", "archive_parent"])
def test_cifar_reads_every_form(cifar, tmp_path, form):
    folder, truth, archive = cifar
    if form == "archive_parent":
        os.makedirs(tmp_path / "only_archive")
        os.rename(archive, tmp_path / "only_archive" / "cifar-10-python.tar.gz")
    path = {"folder": folder, "parent": str(tmp_path), "archive": archive,
            "archive_parent": str(tmp_path / "only_archive")}[form]
    train = load_dataset(DatasetSpec(name="cifar10", path=path), "train")
    test = load_dataset(DatasetSpec(name="cifar10", path=path), "test")
    want = np.concatenate([truth[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(want))
    assert train.labels.tolist() == sum((truth[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert torch.equal(test.images, torch.from_numpy(truth["test_batch"][0].reshape(-1, 3, 32, 32)))
    assert test.num_classes == 10 and test.class_names == tuple(f"c{i}" for i in range(10))


def test_cifar_resize_and_grayscale(cifar):
    folder, truth, _ = cifar
    ds = load_dataset(DatasetSpec(name="cifar10", path=folder, image_size=16, channels=1), "test")
    assert ds.images.shape == (9, 1, 16, 16) and ds.images.dtype == torch.uint8
    x = torch.from_numpy(truth["test_batch"][0].reshape(-1, 3, 32, 32)).double()
    luma = (x * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert (F.avg_pool2d(ds.images.double(), 16) - F.avg_pool2d(luma, 32)).abs().max() < 3


class _Evil:
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar_refuses_a_malicious_pickle_without_running_it(tmp_path):
    marker = str(tmp_path / "pwned")
    _Evil.marker = marker

    def tamper(name, obj):
        if name == "data_batch_3":
            obj = {**obj, b"batch_label": _Evil()}
        return pickle.dumps(obj, protocol=2)

    folder, _ = _write_cifar(str(tmp_path / "c"), tamper=tamper)
    with pytest.raises(ValueError, match=r"refusing to load global (io|builtins)\.open"):
        load_dataset(DatasetSpec(name="cifar10", path=folder), "train")
    assert not os.path.exists(marker)
    pickle.loads(pickle.dumps(_Evil())).close()  # the payload is real: plain pickle runs it
    assert os.path.exists(marker)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda o: pickle.dumps({b"labels": o[b"labels"]}, 2), "b'data'"),
        (lambda o: pickle.dumps({**o, b"data": o[b"data"][:, :100]}, 2), "uint8 array"),
        (lambda o: pickle.dumps({**o, b"data": o[b"data"].astype(np.float32)}, 2), "uint8 array"),
        (lambda o: pickle.dumps({**o, b"labels": [12] * len(o[b"labels"])}, 2), "ints in 0..9"),
        (lambda o: pickle.dumps({**o, b"labels": [0]}, 2), "ints in 0..9"),
        (lambda o: pickle.dumps([1, 2, 3], 2), "got list"),
        (lambda o: b"\x80\x02}q\x00(X", "not a readable"),
    ],
)
def test_cifar_wrong_contents(tmp_path, bad, match):
    folder, _ = _write_cifar(str(tmp_path), tamper=lambda name, o: bad(o) if name == "test_batch" else pickle.dumps(o, 2))
    with pytest.raises(ValueError, match=match) as e:
        load_dataset(DatasetSpec(name="cifar10", path=folder), "test")
    assert "test_batch" in str(e.value)


@pytest.mark.parametrize("labels", [[2**70], [1.0], [True]])
def test_cifar_labels_that_are_not_small_ints(tmp_path, labels):
    def tamper(name, o):
        n = len(o[b"labels"])
        return pickle.dumps({**o, b"labels": labels * n} if name == "test_batch" else o, 2)

    folder, _ = _write_cifar(str(tmp_path), tamper=tamper)
    with pytest.raises(DataError, match=r"test_batch: b'labels' must be \d+ ints in 0..9"):
        load_dataset(DatasetSpec(name="cifar10", path=folder), "test")


def test_cifar_oversized_batch_file_is_refused_before_reading(cifar, monkeypatch):
    from rcfd.data import cifar10

    folder, _, _ = cifar
    monkeypatch.setattr(cifar10, "_MAX_MEMBER_BYTES", 1000)  # the test batches are ~28 KB
    with pytest.raises(DataError, match=r"data_batch_1 is \d+ bytes, too large for a CIFAR-10 batch"):
        load_dataset(DatasetSpec(name="cifar10", path=folder), "train")


def test_cifar_missing_truncated_and_absent(cifar, tmp_path):
    folder, _, archive = cifar
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(DatasetSpec(name="cifar10", path=str(tmp_path / "nowhere")))
    os.remove(os.path.join(folder, "data_batch_4"))
    with pytest.raises(ValueError, match=r"missing CIFAR-10 batch file\(s\) \['data_batch_4'\]"):
        load_dataset(DatasetSpec(name="cifar10", path=folder), "train")
    blob = open(archive, "rb").read()
    for name, content in (("cut.tar.gz", blob[: len(blob) // 2]), ("junk.tar.gz", b"not an archive" * 50)):
        with open(tmp_path / name, "wb") as f:
            f.write(content)
        with pytest.raises(ValueError, match="unreadable or truncated archive"):
            load_dataset(DatasetSpec(name="cifar10", path=str(tmp_path / name)), "train")


# --------------------------------------------------------------------------- image folders


def _stripes(w, h):
    """Red outer fifths, blue middle three fifths: a square center crop of a 5:1 image keeps
    its middle fifth, all blue (with a margin for the resampling filter)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 5, 0] = 255
    a[:, w * 4 // 5 :, 0] = 255
    a[:, w // 5 : w * 4 // 5, 2] = 255
    return a


def test_folder_nested_resized_center_cropped(tmp_path):
    from PIL import Image

    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(_stripes(100, 20)).save(tmp_path / "one.png")
    Image.fromarray(_stripes(100, 20).transpose(1, 0, 2)).save(tmp_path / "a" / "tall.PNG")
    Image.fromarray(_stripes(150, 30)).save(tmp_path / "a" / "b" / "photo.JPG", quality=95)
    Image.fromarray(_stripes(50, 10)).save(tmp_path / "a" / "b" / "x.jpeg", quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=8))
    assert ds.images.shape == (4, 3, 8, 8) and ds.labels is None and ds.num_classes == 0
    wide = [0, 1, 3]  # sorted: a/b/photo.JPG, a/b/x.jpeg, a/tall.PNG, one.png
    m = ds.images[wide].double().mean((2, 3))
    assert (m[:, 2] > 200).all() and (m[:, 0] < 60).all()  # the blue middle survives, the red sides don't
    assert (ds.images[2].double().mean((1, 2))[2] > 200).all()  # tall: cropped top/bottom
    gray = load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=5, channels=1))
    assert gray.images.shape == (4, 1, 5, 5)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(DatasetSpec(name="folder", path=str(tmp_path / "none"), image_size=8))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no"):
        load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=8))
    (tmp_path / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ValueError, match="broken.png: cannot read"):
        load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=8))
    with pytest.raises(ValueError, match="only split='train'"):
        load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=8), "test")


# --------------------------------------------------------------------------- image folders: modes


def _png(samples, bit_depth, color_type, chunks=()) -> bytes:
    """A PNG written from ``samples [H, W(, K)]`` without Pillow (filter 0 on every row), so
    the tests know every stored value. ``chunks``: extra ``(type, data)`` before IDAT."""
    h, w = samples.shape[:2]
    rows = samples.reshape(h, -1)
    if bit_depth == 16:
        raw = [r.astype(">u2").tobytes() for r in rows]
    elif bit_depth == 8:
        raw = [r.astype(np.uint8).tobytes() for r in rows]
    else:  # pack bit_depth-bit values, most significant first
        bits = np.unpackbits(rows.astype(np.uint8)[..., None], axis=-1)[..., 8 - bit_depth:]
        raw = [np.packbits(b.reshape(-1)).tobytes() for b in bits]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    body = zlib.compress(b"".join(b"\x00" + r for r in raw))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(chunk(k, d) for k, d in chunks)
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _reference_8bit(samples, bits, alpha, channels):
    """The documented conversion, from the numbers written: [0, 1] units, over white, 601
    luma, x255, rounded once."""
    x = np.asarray(samples, np.float64).reshape(samples.shape[:2] + (-1,)) / (2 ** bits - 1)
    if alpha:
        x = x[..., :-1] * x[..., -1:] + (1 - x[..., -1:])
    if x.shape[-1] == 3 and channels == 1:
        x = 0.299 * x[..., :1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:]
    if x.shape[-1] == 1 and channels == 3:
        x = np.concatenate([x, x, x], -1)
    return np.rint(x * 255).transpose(2, 0, 1)


def _read_one(tmp_path, name, data, channels, size=6):
    folder = tmp_path / f"{name}_{channels}"
    folder.mkdir()
    (folder / name).write_bytes(data)
    ds = load_dataset(DatasetSpec(name="folder", path=str(folder), image_size=size, channels=channels))
    return ds.images[0].numpy().astype(np.int64)


_RNG = np.random.RandomState(7)
_KEYED = _RNG.randint(0, 256, size=(6, 6, 3))
_KEYED[::2, ::3] = (10, 20, 30)  # a tRNS colour key that some pixels match
# name: (samples, bit depth, PNG colour type, samples as read (or None: as written), bits, alpha, chunks)
_PNG_CASES = {
    "grey8": (_RNG.randint(0, 256, (6, 6)), 8, 0, None, 8, False, ()),
    "grey16": (_RNG.randint(0, 65536, (6, 6)), 16, 0, None, 16, False, ()),
    "grey_alpha8": (_RNG.randint(0, 256, (6, 6, 2)), 8, 4, None, 8, True, ()),
    "grey_alpha16": (_RNG.randint(0, 65536, (6, 6, 2)), 16, 4, None, 16, True, ()),
    "rgb8": (_RNG.randint(0, 256, (6, 6, 3)), 8, 2, None, 8, False, ()),
    "rgb16": (_RNG.randint(0, 65536, (6, 6, 3)), 16, 2, None, 16, False, ()),
    "rgba8": (_RNG.randint(0, 256, (6, 6, 4)), 8, 6, None, 8, True, ()),
    "rgba16": (_RNG.randint(0, 65536, (6, 6, 4)), 16, 6, None, 16, True, ()),
}


def _palette_cases():
    pal = _RNG.randint(0, 256, (5, 3))
    idx = _RNG.randint(0, 5, (6, 6))
    trns = np.array([0, 255, 128, 7, 200])
    plte = (b"PLTE", pal.astype(np.uint8).tobytes())
    opaque = np.concatenate([pal[idx], np.full((6, 6, 1), 255)], -1)
    return {
        "palette": (idx, 8, 3, pal[idx], 8, False, (plte,)),
        "palette_alpha": (idx, 8, 3, np.concatenate([pal[idx], trns[idx][..., None]], -1), 8, True,
                          (plte, (b"tRNS", trns.astype(np.uint8).tobytes()))),
        "palette_opaque_trns": (idx, 8, 3, opaque, 8, True, (plte, (b"tRNS", b"\xff" * 5))),
    }


def _key_cases():
    grey = _RNG.randint(0, 256, (6, 6))
    grey[0] = 77
    grey2 = _RNG.randint(0, 4, (6, 8))  # 2-bit grey: Pillow scales v -> 85 v
    grey2 = grey2[:, :6].copy()
    rgb16 = _RNG.randint(0, 65536, (6, 6, 3))
    rgb16[1, :] = (1000, 2000, 3000)

    def keyed(a, key, top):
        hit = np.all(a.reshape(6, 6, -1) == key, -1)
        return np.concatenate([a.reshape(6, 6, -1), np.where(hit, 0, top)[..., None]], -1)

    return {
        "grey8_key": (grey, 8, 0, keyed(grey, 77, 255), 8, True, ((b"tRNS", struct.pack(">H", 77)),)),
        "grey2_key": (grey2, 2, 0, keyed(grey2 * 85, 2 * 85, 255), 8, True, ((b"tRNS", struct.pack(">H", 2)),)),
        "rgb8_key": (_KEYED, 8, 2, keyed(_KEYED, (10, 20, 30), 255), 8, True,
                     ((b"tRNS", struct.pack(">HHH", 10, 20, 30)),)),
        "rgb16_key": (rgb16, 16, 2, keyed(rgb16, (1000, 2000, 3000), 65535), 16, True,
                      ((b"tRNS", struct.pack(">HHH", 1000, 2000, 3000)),)),
    }


_ALL_PNG_CASES = {**_PNG_CASES, **_palette_cases(), **_key_cases()}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("case", sorted(_ALL_PNG_CASES))
def test_folder_reads_every_png_mode_from_its_samples(tmp_path, case, channels):
    """8/16-bit grey, grey+alpha, RGB, RGBA, palettes with and without alpha, tRNS colour
    keys: each equals the documented conversion of the numbers written into the file."""
    written, depth, ctype, as_read, bits, alpha, chunks = _ALL_PNG_CASES[case]
    got = _read_one(tmp_path, f"{case}.png", _png(written, depth, ctype, chunks), channels)
    want = _reference_8bit(written if as_read is None else as_read, bits, alpha, channels)
    tol = 1 if channels == 1 and ctype in (2, 3, 6) else 0  # luma: float summation order
    assert got.shape == want.shape == (channels, 6, 6)
    assert np.abs(got - want).max() <= tol, case


def test_16bit_ramp_reads_at_its_true_level(tmp_path):
    """A 0..65535 ramp (the reported case: it read with mean 248 when 16-bit grey went
    through Pillow's "L"): its mean is the ramp's, ~127.5 on 0..255."""
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.int64).reshape(64, 64)
    got = _read_one(tmp_path, "ramp.png", _png(ramp, 16, 0), 1, size=64)
    assert np.array_equal(got[0], np.rint(ramp * 255 / 65535))
    assert abs(got.mean() - 127.5) < 0.5


def _flat_blocks(colours):
    """16x16 of four flat 8x8 blocks (JPEG's own block size, so quality 100 keeps them)."""
    a = np.zeros((16, 16, len(colours[0])), np.uint8)
    for i, c in enumerate(colours):
        a[(i // 2) * 8:(i // 2) * 8 + 8, (i % 2) * 8:(i % 2) * 8 + 8] = c
    return a


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
@pytest.mark.parametrize("channels", [1, 3])
def test_folder_reads_jpeg_grey_rgb_and_cmyk(tmp_path, mode, channels):
    from PIL import Image

    colours = {"L": [(0,), (90,), (180,), (255,)],
               "RGB": [(255, 0, 0), (20, 200, 60), (0, 0, 255), (250, 250, 250)],
               "CMYK": [(0, 255, 255, 0), (200, 30, 0, 40), (255, 255, 0, 0), (0, 0, 0, 0)]}[mode]
    a = _flat_blocks(colours)
    folder = tmp_path / "j"
    folder.mkdir()
    Image.fromarray(a[..., 0] if mode == "L" else a, mode).save(folder / "x.jpg", quality=100)
    got = load_dataset(DatasetSpec(name="folder", path=str(folder), image_size=16, channels=channels))
    if mode == "CMYK":  # (255 - C)(255 - K) / 255 per channel, in [0, 1] units
        x = a.astype(np.float64) / 255
        a = (1 - x[..., :3]) * (1 - x[..., 3:]) * 255
    want = _reference_8bit(a, 8, False, channels)
    blocks = lambda v: v.reshape(v.shape[0], 2, 8, 2, 8)[:, :, 2:6, :, 2:6].mean((2, 4))  # noqa: E731
    assert np.abs(blocks(got.images[0].numpy().astype(np.float64)) - blocks(want)).max() <= 3


@pytest.mark.parametrize("orientation", range(1, 9))
def test_folder_applies_exif_orientation_as_pillow_does(tmp_path, orientation):
    from PIL import Image, ImageOps

    im = Image.fromarray(np.random.RandomState(orientation).randint(0, 256, (6, 6, 3)).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    folder = tmp_path / "o"
    folder.mkdir()
    im.save(folder / "o.png", exif=exif)
    with Image.open(folder / "o.png") as reopened:
        want = np.asarray(ImageOps.exif_transpose(reopened).convert("RGB")).transpose(2, 0, 1)
    got = load_dataset(DatasetSpec(name="folder", path=str(folder), image_size=6)).images[0]
    assert np.array_equal(got.numpy(), want)


def test_to_8bit_works_in_row_blocks(monkeypatch):
    """The conversion of a large image (many row blocks) equals the one-block result."""
    from rcfd.data import folder

    x = np.random.RandomState(0).randint(0, 65536, (37, 11, 4))
    whole = folder.to_8bit(x, 16, True, 1)
    monkeypatch.setattr(folder, "_CHUNK_PIXELS", 25)  # 2 rows a block
    assert np.array_equal(folder.to_8bit(x, 16, True, 1), whole)
    assert np.abs(whole.transpose(2, 0, 1) - _reference_8bit(x, 16, True, 1)).max() <= 1
    with pytest.raises(ValueError, match="2-channel"):
        folder.to_8bit(x[..., :2], 16, False, 3)


# --------------------------------------------------------------------------- image folders: files


def _solid_png(path, size, colour):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)


def test_folder_links_loops_and_duplicates_count_each_image_once(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    _solid_png(root / "a" / "img.png", (5, 5), (255, 0, 0))
    _solid_png(root / "other.PNG", (9, 4), (0, 0, 255))
    os.symlink(root, root / "a" / "loop")  # a loop back to the top
    os.symlink(root / "a", root / "b")  # a second name for a folder
    os.symlink(root / "a" / "img.png", root / "c.png")  # a second name for a file
    os.link(root / "a" / "img.png", root / "hard.png")  # and a hard link
    found = find_images(str(root))
    assert found == [str(root / "a" / "img.png"), str(root / "other.PNG")]
    ds = load_dataset(DatasetSpec(name="folder", path=str(root), image_size=4))
    assert len(ds) == 2 and torch.equal(ds.images[0, 0], torch.full((4, 4), 255, dtype=torch.uint8))


def test_folder_broken_links_fifos_and_unreadable_files_are_named(tmp_path, monkeypatch):
    _solid_png(tmp_path / "ok.png", (4, 4), (1, 2, 3))
    os.symlink(tmp_path / "gone", tmp_path / "notes")  # not an image name: a warning only
    with pytest.warns(UserWarning, match="notes: broken symbolic link skipped"):
        assert len(load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=4))) == 1
    os.symlink(tmp_path / "gone.png", tmp_path / "dead.png")
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would block: it is never opened
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=4))
    assert "dead.png: a broken symbolic link" in str(e.value) and "pipe.jpg: not a regular file" in str(e.value)
    os.remove(tmp_path / "dead.png")
    os.remove(tmp_path / "pipe.jpg")
    os.remove(tmp_path / "notes")
    from rcfd.data import folder

    real_open = folder.Image.open

    def refusing(path, *a, **k):  # what a file without read permission does
        if str(path).endswith("ok.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(folder.Image, "open", refusing)
    with pytest.raises(DataError, match=r"ok.png: cannot read this image \(PermissionError"):
        load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=4))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_folder_file_without_read_permission_is_named(tmp_path):
    _solid_png(tmp_path / "locked.png", (4, 4), (1, 2, 3))
    os.chmod(tmp_path / "locked.png", 0)
    if os.access(tmp_path / "locked.png", os.R_OK):
        pytest.skip("this user can read a file without read permission")
    with pytest.raises(DataError, match="locked.png: cannot read this image"):
        load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=4))


def test_folder_empty_and_fake_images_are_all_listed(tmp_path):
    for i in range(6):
        (tmp_path / f"empty{i}.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(DataError) as e:
        load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=4))
    msg = str(e.value)
    assert "7 problem(s)" in msg and "empty0.png: cannot read this image: the file is empty (0 bytes)" in msg
    assert "and 2 more" in msg and "text.jpg" not in msg  # sorted: the empty files come first
    for i in range(6):
        os.remove(tmp_path / f"empty{i}.png")
    with pytest.raises(DataError, match="text.jpg: cannot read this image: not a PNG or JPEG"):
        load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=4))


@pytest.mark.parametrize("side", [10_000, 100_000])  # over PIL's limit, and over twice it
def test_folder_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    """A PNG header claiming side x side pixels over a few bytes of data: a clear error
    naming the file, raised before any pixel memory is allocated."""
    import resource

    (tmp_path / "bomb.png").write_bytes(_png(np.zeros((1, 1), np.uint8), 8, 0).replace(
        struct.pack(">II", 1, 1), struct.pack(">II", side, side)))
    # the IHDR CRC no longer matches: fix it, so only the size is wrong
    data = bytearray((tmp_path / "bomb.png").read_bytes())
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match=r"bomb.png: cannot read this image: too large to decode"):
        load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=4))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB


def test_folder_pixel_limit_is_pillows_setting(tmp_path, monkeypatch):
    from PIL import Image

    _solid_png(tmp_path / "x.png", (6, 6), (9, 9, 9))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30)
    with pytest.raises(DataError, match=r"6x6 = 36 pixels; the limit is PIL.Image.MAX_IMAGE_PIXELS = 30"):
        load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=4))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user switched the check off
    assert len(load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=4))) == 1


def test_folder_mixed_sizes_and_extension_cases(tmp_path):
    from PIL import Image

    sizes = {"a.PNG": (3, 40), "b.Jpeg": (33, 7), "c.JPG": (64, 64), "d.jpeg": (1, 1), "e.pNg": (200, 3)}
    for i, (name, size) in enumerate(sizes.items()):
        fmt = "PNG" if name.lower().endswith("png") else "JPEG"
        Image.new("RGB", size, (10 * i, 255 - 10 * i, 7)).save(tmp_path / name, fmt, quality=100)
    ds = load_dataset(DatasetSpec(name="folder", path=str(tmp_path), image_size=5))
    assert ds.images.shape == (5, 3, 5, 5)
    for i in range(5):
        want = torch.tensor([10 * i, 255 - 10 * i, 7]).view(3, 1, 1)
        assert (ds.images[i].int() - want).abs().max() <= 2  # flat colours stay flat (JPEG: +-2)


# --------------------------------------------------------------------------- batches


def _indexed(n=23, size=5):
    """Image i is a horizontal ramp offset by i, label i: every batch names its indices."""
    ramp = torch.arange(size).view(1, 1, 1, size) * 40 + torch.arange(n).view(n, 1, 1, 1)
    images = ramp.expand(n, 1, size, size).to(torch.uint8).contiguous()
    return ImageDataset(images, torch.arange(n), n, "indexed", "train")


def test_one_epoch_visits_everything_once():
    ds = _indexed()
    it = batches(ds, 5, 7, flip=False, drop_last=False, num_epochs=1)
    ys = [y for _, y in it]
    assert [len(y) for y in ys] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(ys).tolist()) == list(range(23))
    dropped = list(batches(ds, 5, 7, flip=False, drop_last=True, num_epochs=2))
    assert len(dropped) == 8 and all(len(y) == 5 for _, y in dropped)


def test_order_depends_on_seed_and_epoch_only():
    ds = _indexed()
    a = [y.tolist() for _, y in batches(ds, 4, 3, num_epochs=3)]
    b = [y.tolist() for _, y in batches(ds, 4, torch.Generator().manual_seed(3), num_epochs=3)]
    c = [y.tolist() for _, y in batches(ds, 4, 4, num_epochs=3)]
    assert a == b and a != c and a[:5] != a[5:10]  # epochs reshuffle
    assert epoch_seed(3, 0) != epoch_seed(3, 1) != epoch_seed(4, 0)


def test_flip_mirrors_about_half_and_nothing_else():
    ds = _indexed(n=400)
    x, y = next(batches(ds, 400, 1, flip=True))
    orig = ds.to_float()[y]
    same = (x == orig).flatten(1).all(1)
    mirrored = (x == orig.flip(-1)).flatten(1).all(1)
    assert (same ^ mirrored).all() and 150 < int(mirrored.sum()) < 250


@pytest.mark.parametrize("steps", [1, 5, 6, 13])
def test_resume_from_state_continues_exactly(steps):
    ds = _indexed()
    ref = batches(ds, 4, 11)
    seq = [next(ref) for _ in range(20)]
    it = batches(ds, 4, 11)
    for _ in range(steps):
        next(it)
    state = it.state_dict()
    resumed = batches(ds, 4, 11)
    resumed.load_state_dict(state)
    for k in range(steps, 20):
        x, y = next(resumed)
        assert torch.equal(x, seq[k][0]) and torch.equal(y, seq[k][1])
    also = batches(ds, 4, 11, epoch=state["epoch"], position=state["position"])
    assert torch.equal(next(also)[1], seq[steps][1])
    with pytest.raises(ValueError, match="batch_size"):
        batches(ds, 2, 11).load_state_dict(state)


@pytest.mark.parametrize("world_size, drop_last", [(2, True), (3, True), (3, False)])
def test_ranks_share_each_global_batch(world_size, drop_last):
    ds = _indexed(n=37)  # 37 = 6 * 6 + 1: without drop_last the last global batch is one image
    single = batches(ds, 6, 5, num_epochs=2, drop_last=drop_last)
    ranks = [batches(ds, 6, 5, rank=r, world_size=world_size, num_epochs=2, drop_last=drop_last)
             for r in range(world_size)]
    for x, y in single:
        parts = [next(r) for r in ranks]
        sizes = [len(p[1]) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and (sizes == [6 // world_size] * world_size or len(y) < 6)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert all(r.state_dict()["position"] == single.state_dict()["position"] for r in ranks)


def test_batches_argument_errors():
    ds = _indexed()
    with pytest.raises(ValueError, match="divisible by world_size"):
        batches(ds, 5, 0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        batches(ds, 4, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="generator"):
        batches(ds, 4, -1)
    with pytest.raises(ValueError, match="exceeds"):
        batches(ds, 24, 0)
    with pytest.raises(ValueError, match="images must be uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), None, 0, "x", "train")


@pytest.mark.cuda
def test_batches_on_cuda_match_cpu():
    ds = _indexed()
    for (xc, yc), (xg, yg) in zip(batches(ds, 4, 2, num_epochs=1), batches(ds, 4, 2, device="cuda", num_epochs=1)):
        assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
