import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from scaleprotoseg.config import DataConfig
from scaleprotoseg.data import build_dataset, make_generator, seed_worker
from scaleprotoseg.data.transforms import (
    EvalTransform,
    RandomScale,
    TrainTransform,
    denormalize,
    normalize,
)

COLORS = np.array([[0, 0, 0], [250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0]], dtype=np.uint8)


def _blocky(h=48, w=64, block=8, seed=0):
    """A label of constant blocks and an image that encodes the label as a colour."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 5, (h // block, w // block))
    label = np.kron(small, np.ones((block, block), dtype=np.int64))
    return COLORS[label], label


def _decode(image_t, mode="imagenet"):
    return denormalize(image_t, mode).astype(np.int64)


def test_alignment_exact_without_scaling():
    image, label = _blocky()
    t = TrainTransform(crop_size=(64, 80), scale_range=(1.0, 1.0), flip=True)
    for seed in range(8):
        img, lab, _ = t(image, label, rng=np.random.default_rng(seed), ignore_index=255)
        assert img.shape == (3, 64, 80) and lab.shape == (64, 80)
        rgb = _decode(img)
        valid = lab != 255
        assert (rgb[valid] == COLORS[lab[valid].numpy()]).all()
        # padding: ignore label, image 0 after normalisation (= the mean)
        assert (lab[48:] == 255).all() and torch.allclose(img[:, 48:], torch.zeros(1), atol=1e-6)


def test_alignment_under_random_scale_crop_flip():
    image, label = _blocky(96, 128, block=16)
    t = TrainTransform(crop_size=(40, 40), scale_range=(0.5, 1.5), flip=True)
    for seed in range(10):
        img, lab, _ = t(image, label, rng=np.random.default_rng(seed))
        rgb = _decode(img)
        lab_np = lab.numpy()
        # compare pixels whose 3x3 neighbourhood has a single label (bilinear and nearest agree there)
        pad = np.pad(lab_np, 1, mode="edge")
        same = np.ones_like(lab_np, dtype=bool)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                same &= pad[dy : dy + 40, dx : dx + 40] == lab_np
        ok = same & (lab_np != 255)
        # the crop's outermost pixels: their neighbourhood continues outside the crop, where the check cannot look
        ok[0, :] = ok[-1, :] = ok[:, 0] = ok[:, -1] = False
        assert ok.sum() > 100
        err = np.abs(rgb[ok] - COLORS[lab_np[ok]]).max()
        assert err <= 2, (seed, err)


def test_extra_maps_follow_the_label():
    image, label = _blocky()
    parts = label * 10
    t = TrainTransform(crop_size=(60, 70), scale_range=(0.7, 1.3), flip=True)
    _, lab, extras = t(image, label, rng=np.random.default_rng(3), extras={"parts": parts})
    p = extras["parts"]
    valid = lab != 255
    assert (p[valid] == lab[valid] * 10).all() and (p[~valid] == 0).all()


def test_seed_determinism():
    image, label = _blocky()
    t = TrainTransform(crop_size=(32, 32), scale_range=(0.5, 2.0))
    a = t(image, label, rng=np.random.default_rng([0, 1, 2]))
    b = t(image, label, rng=np.random.default_rng([0, 1, 2]))
    c = t(image, label, rng=np.random.default_rng([0, 2, 2]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_normalisation_modes():
    x = torch.full((3, 2, 2), 127.0)
    assert torch.allclose(normalize(x, "tf"), torch.zeros(3, 2, 2))
    assert torch.allclose(normalize(torch.full((3, 1, 1), 255.0), "tf"), torch.full((3, 1, 1), 1.0))
    m = normalize(torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255, "imagenet")
    assert torch.allclose(m, torch.zeros(3, 1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        normalize(x, "other")


def test_eval_transform_whole_and_short_side():
    image, label = _blocky(48, 64)
    img, lab, _ = EvalTransform()(image, label)
    assert img.shape == (3, 48, 64) and torch.equal(lab, torch.from_numpy(label))
    img, lab, _ = EvalTransform("tf", short_side=24)(image, label)
    assert img.shape == (3, 24, 32) and lab.shape == (48, 64)  # labels stay at the original size


def test_random_scale_rejects_bad_range():
    with pytest.raises(ValueError, match="scale range"):
        RandomScale(1.5, 0.5)


def test_dataset_items_independent_of_workers(synthetic_folder):
    cfg = DataConfig(name="folder", root=str(synthetic_folder), crop_size=[24, 24], scale_range=[0.5, 2.0])
    ds = build_dataset(cfg, "train", train=True, seed=7)

    def batches(workers):
        loader = DataLoader(
            ds,
            batch_size=2,
            shuffle=True,
            num_workers=workers,
            worker_init_fn=seed_worker,
            generator=make_generator(11),
        )
        return [(b["index"].tolist(), b["image"], b["label"]) for b in loader]

    a, b = batches(0), batches(2)
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, ia, la), (_, ib, lb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    first = ds[0]
    ds.set_epoch(1)
    assert not torch.equal(first["image"], ds[0]["image"])
    ds.set_epoch(0)
    assert torch.equal(first["image"], ds[0]["image"])
