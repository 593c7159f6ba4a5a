import pytest
import torch
import torch.nn.functional as F

from rcfd.data.augment import (
    _cifar10_policy,
    apply_autoaugment,
    autoaugment_cifar10,
    autoaugment_decisions,
    classifier_augment,
    cutout_hole,
    from_uint8,
    pad_value,
    random_crop,
    random_cutout,
    random_flip,
    to_uint8,
)


def images(b, c, h, w=None, dtype=torch.float32):
    """Images on the 8-bit grid, as the datasets provide them."""
    return from_uint8(torch.randint(0, 256, (b, c, h, w or h), dtype=torch.uint8), dtype)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(7, 1, 16, 16), (4, 3, 32, 32), (3, 3, 13, 17), (1, 1, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_range(shape, dtype):
    x = images(*shape, dtype=dtype)
    y = classifier_augment(x, gen(0))
    assert y.shape == x.shape and y.dtype == dtype
    assert y.min() >= -1 and y.max() <= 1


def test_reproducible_under_seeded_generator():
    x = images(16, 3, 32)
    a, b = classifier_augment(x, gen(3)), classifier_augment(x, gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, classifier_augment(x, gen(4)))
    assert not torch.equal(a, x)
    x_before = x.clone()
    classifier_augment(x, gen(3))
    assert torch.equal(x, x_before)  # the input is never modified


def test_global_rng_when_no_generator():
    x = images(8, 1, 16)
    torch.manual_seed(5)
    a = classifier_augment(x)
    torch.manual_seed(5)
    assert torch.equal(a, classifier_augment(x))


def test_flip_mirrors_some_images_and_keeps_the_rest():
    x = images(64, 3, 8, 5)
    y = random_flip(x, gen(0))
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)


@pytest.mark.parametrize("padding", [1, 2, 4])
def test_crop_is_a_window_of_the_padded_image(padding):
    x = images(24, 2, 9, 11)
    y = random_crop(x, padding, gen(1), fill=0.25)
    padded = F.pad(x, (padding,) * 4, value=0.25)
    offsets = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                if torch.equal(y[i], padded[i, :, dy:dy + 9, dx:dx + 11])]
        assert hits, f"image {i} is not a crop of its padded version"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # offsets vary over the batch
    assert torch.equal(random_crop(x, 0, gen(1)), x)


def test_crop_flip_alone_through_classifier_augment():
    x = images(12, 1, 16)
    y = classifier_augment(x, gen(2), autoaugment=False, cutout=False, padding=2)
    padded = F.pad(x, (2,) * 4, value=-1.0)  # the default fill: black
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 16, dx:dx + 16] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(y[i], w) or torch.equal(y[i], w.flip(-1)) for w in windows)


@pytest.mark.parametrize("size", [4, (3, 5)])
def test_cutout_sets_one_clipped_rectangle(size):
    sh, sw = (size, size) if isinstance(size, int) else size
    x = images(64, 3, 12, 10) * 0.9  # no pixel equals the fill value -1
    y = random_cutout(x, size, gen(0), fill=-1.0)
    full = 0
    for i in range(len(x)):
        hole = (y[i] != x[i]).any(0)
        assert torch.equal(hole, (y[i] == -1).all(0))  # changed pixels are the fill, all channels
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert len(rows) and len(cols)  # the centre is a pixel, so the hole is never empty
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert hole.sum() == h * w and h <= sh and w <= sw  # one rectangle, clipped at borders
        full += (h, w) == (sh, sw)
    assert full > 0


def test_default_sizes_scale_with_the_image():
    # a quarter of the side: 32x32: Cutout hole 8x8; 16x16 images: 4x4 hole.
    for hw in (32, 16):
        x = images(32, 1, hw) * 0.9
        y = classifier_augment(x, gen(0), crop=False, flip=False, autoaugment=False)
        sides = [int((y[i, 0] == -1).any(1).sum()) for i in range(len(x))]
        assert max(sides) == hw // 4


def test_autoaugment_decisions_follow_the_cifar10_policy():
    policies, space = _cifar10_policy(32, 32)
    assert len(policies) == 25
    decisions = autoaugment_decisions(2000, 32, 32, gen(0))
    names = {name for ops in decisions for name, _ in ops}
    assert names == {op for sub in policies for op, _, _ in sub}
    assert max(len(ops) for ops in decisions) == 2
    assert sum(not ops for ops in decisions) > 0  # probabilities < 1 leave some images alone
    for ops in decisions:
        for name, magnitude in ops:
            bins, signed = space[name]
            allowed = {float(b) for b in bins} if isinstance(bins, list) else {0.0}
            assert abs(magnitude) in allowed and (signed or magnitude >= 0)


def test_batched_autoaugment_equals_per_image_torchvision():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    u = torch.randint(0, 256, (48, 3, 12, 12), dtype=torch.uint8)
    decisions = autoaugment_decisions(48, 12, 12, gen(7))
    batched = apply_autoaugment(u, decisions, fill=128)
    for i, ops in enumerate(decisions):
        ref = u[i:i + 1]
        for name, magnitude in ops:
            ref = _apply_op(ref, name, magnitude, interpolation=InterpolationMode.NEAREST,
                            fill=[128.0] * 3)
        assert torch.equal(batched[i:i + 1], ref), f"image {i}: {ops}"


@pytest.mark.parametrize("channels", [1, 3])
def test_every_policy_op_runs_on_one_and_three_channels(channels):
    policies, space = _cifar10_policy(16, 16)
    ops = sorted({(name, float(space[name][0][b]) if b is not None else 0.0)
                  for sub in policies for name, _, b in sub})
    u = torch.randint(0, 256, (len(ops), channels, 16, 16), dtype=torch.uint8)
    out = apply_autoaugment(u, [[op] for op in ops])
    assert out.shape == u.shape and out.dtype == torch.uint8


def test_autoaugment_keeps_untouched_images_exactly():
    x = torch.rand(64, 1, 16, 16) * 2 - 1  # off the 8-bit grid
    decisions = autoaugment_decisions(64, 16, 16, gen(9))
    y = autoaugment_cifar10(x, gen(9))
    for i, ops in enumerate(decisions):
        if not ops:
            assert torch.equal(y[i], x[i])
        else:  # augmented images are on the 8-bit grid
            assert torch.equal(from_uint8(to_uint8(y[i])), y[i])


def test_uint8_round_trip_is_exact_on_the_grid():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(to_uint8(from_uint8(u, dtype)), u)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        classifier_augment(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="float"):
        classifier_augment(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="padding"):
        random_crop(torch.zeros(1, 1, 4, 4), -1)
    with pytest.raises(ValueError, match="size"):
        random_cutout(torch.zeros(1, 1, 4, 4), 0)


@pytest.mark.cuda
def test_cuda_generator_reproducible():
    x = images(32, 3, 32).cuda()
    g1 = torch.Generator(device="cuda").manual_seed(0)
    g2 = torch.Generator(device="cuda").manual_seed(0)
    a, b = classifier_augment(x, g1), classifier_augment(x, g2)
    assert a.is_cuda and torch.equal(a, b) and a.shape == x.shape


def test_a_padded_crop_of_a_black_image_stays_black():
    """With the data's background as the fill (what the classifier stage pads with by
    default), no crop, AutoAugment op or Cutout hole adds a pixel the data never has."""
    black = torch.full((64, 1, 8, 8), -1.0)
    fill = pad_value("background", torch.zeros(10, 1, 8, 8, dtype=torch.uint8))
    assert fill == -1.0
    y = classifier_augment(black, gen(0), flip=False, pad_fill=fill)
    assert torch.equal(y, black)
    grey = classifier_augment(black, gen(0), flip=False, autoaugment=False, cutout=False, pad_fill=0.0)
    assert (grey == 0.0).any()  # the old mid-grey border shows, so the test above can fail


def test_pad_value():
    u = torch.tensor([[[[30, 200], [12, 255]]]], dtype=torch.uint8)
    assert pad_value("background", u) == pytest.approx(12 / 127.5 - 1)
    assert pad_value(0.25, u) == 0.25


@pytest.mark.parametrize("hw,fraction,hole", [(8, 0.25, 2), (8, 0.5, 4), (32, 0.5, 16), (28, 0.25, 7), (7, 0.5, 3),
                                              (3, 0.25, 1)])
def test_cutout_hole_is_a_fraction_of_the_side(hw, fraction, hole):
    assert cutout_hole(hw, hw, fraction) == (hole, hole)
    x = images(64, 1, hw) * 0.9
    y = classifier_augment(x, gen(0), crop=False, flip=False, autoaugment=False, cutout_fraction=fraction)
    assert max(int((y[i, 0] == -1).any(1).sum()) for i in range(len(x))) == hole
    with pytest.raises(ValueError, match="fraction"):
        cutout_hole(8, 8, 0.0)
