"""Projection (push), duplicate removal, nearest patches and ProtoPNet pruning against brute force and built cases."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from scaleprotoseg.models.heads import ProtoSegHead, make_head
from scaleprotoseg.models.segmenter import Segmenter
from scaleprotoseg.ops import resize_labels
from scaleprotoseg.prototypes.boxes import prototype_rates, receptive_field_box, scale_box
from scaleprotoseg.prototypes.nearest import find_nearest_patches, nearest_patches
from scaleprotoseg.prototypes.projection import (
    ProjectionResult,
    apply_projection,
    project_prototypes,
    remove_duplicates,
    save_prototype_patches,
)
from scaleprotoseg.prototypes.pruning import prune_prototypes

IGNORE = 255
C = 3


class TinyBackbone(nn.Module):
    out_channels = 8
    output_stride = 4
    freeze_bn = True

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class IdentityBackbone(nn.Module):
    """Features = the image itself (output stride 1), so a test controls every feature vector."""

    out_channels = 3
    output_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SynthDataset(Dataset):
    """Random images of varying sizes with random labels (some ignore pixels); ``load_raw`` gives uint8 images."""

    sizes = [(16, 20), (24, 16), (20, 20), (16, 16), (28, 12), (12, 24)]

    def __init__(self, classes: int = C, seed: int = 0, duplicate: tuple[int, int] | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i, (h, w) in enumerate(self.sizes):
            label = torch.randint(0, classes, (h, w), generator=g)
            label[torch.rand(h, w, generator=g) < 0.2] = IGNORE
            image = torch.randn(3, h, w, generator=g)
            self.items.append({"image": image, "label": label, "name": f"s{i}", "index": i})
        if duplicate is not None:  # item dst becomes a copy of item src (same pixels, own index/name)
            src, dst = duplicate
            self.items[dst] = {**self.items[src], "name": f"s{dst}", "index": dst}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def load_raw(self, i: int):
        img = self.items[i]["image"]
        raw = ((img - img.min()) / (img.max() - img.min()) * 255).round().byte().permute(1, 2, 0).numpy()
        return raw, self.items[i]["label"].numpy(), self.items[i]["name"]


def _model(method: str = "scaleprotoseg", seed: int = 0) -> Segmenter:
    torch.manual_seed(seed)
    if method == "scaleprotoseg":
        head = make_head(method, 8, C, rates=(1, 2), dim=4, prototypes_per_class=2)
    else:
        head = make_head(method, 8, C, rates=(1, 2), dim=4, prototypes_per_class=3)
    with torch.no_grad():  # make the ASPP outputs spread over the sigmoid's range
        for conv in head.aspp.branches:
            conv.weight.normal_(0, 0.5)
    return Segmenter(TinyBackbone(), head).eval()


def _brute_force(model: Segmenter, items) -> list[tuple | None]:
    """Loop over images, cells and prototypes; key (distance, dataset index, cell index); None without a cell."""
    head = model.head
    cls, scale = head.prototype_class.tolist(), head.prototype_scale.tolist()
    D = head.prototypes.prototypes.shape[1]
    protos = head.prototypes.prototypes.detach()
    best: list[tuple | None] = [None] * len(cls)
    with torch.no_grad():
        for item in items:
            out = model(item["image"][None])
            h, w = out.distances.shape[-2:]
            lab = resize_labels(item["label"], (h, w))
            H, W = item["image"].shape[-2:]
            for p in range(len(cls)):
                for r in range(h):
                    for c in range(w):
                        if int(lab[r, c]) != cls[p]:
                            continue
                        d = float(out.distances[0, p, r, c])
                        z = out.features[0, scale[p] * D : (scale[p] + 1) * D, r, c]
                        assert d == pytest.approx(float(((z - protos[p]) ** 2).sum()), abs=1e-5)
                        key = (d, item["index"], r * w + c)
                        if best[p] is None or key < best[p][0]:
                            best[p] = (key, z.clone(), (r, c), item["name"], (H, W))
    return best


def _check_against_brute(model: Segmenter, result: ProjectionResult, items) -> None:
    best = _brute_force(model, items)
    rates = prototype_rates(model.head)
    for p, b in enumerate(best):
        src = result.sources[p]
        if b is None:
            assert src is None
            continue
        (d, idx, _), z, cell, name, size = b
        assert src is not None, p
        assert (src.dataset_index, src.cell, src.name, src.image_size) == (idx, cell, name, size), p
        assert src.distance == d and float(result.distances[p]) == d
        assert src.scale == int(model.head.prototype_scale[p]) and src.class_index == int(model.head.prototype_class[p])
        assert src.box == receptive_field_box(cell, rate=rates[p], output_stride=4, image_size=size)
        assert torch.equal(result.vectors[p], z), p


@pytest.mark.parametrize("method", ["scaleprotoseg", "protoseg"])
def test_projection_equals_brute_force(method):
    model = _model(method)
    ds = SynthDataset()
    before = model.head.prototypes.prototypes.detach().clone()
    result = project_prototypes(model, ds, device="cpu", progress=False)
    assert torch.equal(model.head.prototypes.prototypes.detach(), before)  # not applied yet
    assert not model.training
    _check_against_brute(model, result, ds.items)


def test_projection_uses_own_scale_channels_and_largest_rate_for_protoseg():
    spm = _model("scaleprotoseg")
    assert prototype_rates(spm.head) == [1] * 6 + [2] * 6
    assert prototype_rates(_model("protoseg").head) == [2] * 9


def test_projection_with_dataloader_workers_matches():
    model, ds = _model(), SynthDataset()
    a = project_prototypes(model, ds, progress=False)
    model.train()
    b = project_prototypes(model, ds, progress=False, num_workers=1)
    assert model.training  # the training flag is restored
    assert torch.equal(a.vectors, b.vectors) and a.sources == b.sources


def test_applied_prototypes_have_zero_distance_to_their_source():
    model, ds = _model(), SynthDataset()
    result = project_prototypes(model, ds, progress=False)
    apply_projection(model, result)
    head = model.head
    D = head.prototypes.prototypes.shape[1]
    with torch.no_grad():
        for p, src in enumerate(result.sources):
            item = ds[src.dataset_index]
            out = model(item["image"][None])
            s, c = int(head.prototype_scale[p]), int(head.prototype_class[p])
            z = out.features[0, s * D : (s + 1) * D]  # (D, h, w)
            proto = head.prototypes.prototypes[p]
            assert torch.equal(z[:, src.cell[0], src.cell[1]], proto)  # bitwise the training feature
            lab = resize_labels(item["label"], z.shape[-2:])
            exact = ((z - proto[:, None, None]) ** 2).sum(0)
            assert float(exact[lab == c].min()) == 0.0
            assert float(out.distances[0, p][lab == c].min()) <= 1e-6  # the model's expansion, up to round-off


def test_deterministic_under_shuffling_and_ties():
    model = _model()
    ds = SynthDataset(duplicate=(1, 4))  # item 4 has the pixels of item 1: every distance ties between them
    ref = project_prototypes(model, ds.items, progress=False)
    _check_against_brute(model, ref, ds.items)
    assert all(src.dataset_index != 4 for src in ref.sources)  # ties go to the lower dataset index
    rng = random.Random(0)
    for _ in range(3):
        items = list(ds.items)
        rng.shuffle(items)
        res = project_prototypes(model, iter(items), progress=False)  # a plain iterable works too
        assert torch.equal(res.vectors, ref.vectors)
        assert res.sources == ref.sources


def _identity_model(num_classes: int, per_class: int, rates=(1,)) -> Segmenter:
    """ProtoSeg head whose ASPP is the identity on 3 channels: features = sigmoid(image)."""
    head = ProtoSegHead(3, num_classes, rates=rates, dim=3, prototypes_per_class=per_class)
    with torch.no_grad():
        for conv in head.aspp.branches:
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(3) / len(rates)
            conv.bias.zero_()
    return Segmenter(IdentityBackbone(), head).eval()


def test_other_class_and_ignore_cells_are_never_chosen():
    model = _identity_model(2, 1)  # p0 class 0, p1 class 1
    v, w = torch.full((3,), 2.0), torch.full((3,), -2.0)
    image = torch.zeros(3, 4, 4)
    label = torch.zeros(4, 4, dtype=torch.long)
    image[:, 0, 0], label[0, 0] = v, 1  # exact match of p0, but class 1
    image[:, 0, 1], label[0, 1] = v, IGNORE  # exact match of p0, but ignore
    image[:, 2, 2] = v + 0.3  # class 0, a little off: p0's answer
    image[:, 1, 1], label[1, 1] = w, IGNORE  # exact match of p1, but ignore
    image[:, 3, 3], label[3, 3] = w + 0.5, 1  # p1's answer
    with torch.no_grad():
        model.head.prototypes.prototypes.copy_(torch.stack([torch.sigmoid(v), torch.sigmoid(w)]))
    item = {"image": image, "label": label, "name": "x", "index": 0}
    result = project_prototypes(model, [item], progress=False)
    assert result.sources[0].cell == (2, 2) and result.sources[1].cell == (3, 3)
    assert torch.equal(result.vectors[0], torch.sigmoid(v + 0.3))
    assert torch.equal(result.vectors[1], torch.sigmoid(w + 0.5))
    assert result.sources[0].distance > 0


def test_prototypes_of_absent_classes_keep_their_vector_with_a_warning():
    model = _model()
    ds = SynthDataset(classes=2)  # class 2 never appears
    before = model.head.prototypes.prototypes.detach().clone()
    with pytest.warns(UserWarning, match="no labelled cell"):
        result = project_prototypes(model, ds, progress=False)
    absent = (model.head.prototype_class == 2).nonzero().flatten().tolist()
    assert absent and all(result.sources[p] is None for p in absent)
    assert all(result.sources[p] is not None for p in range(12) if p not in absent)
    assert torch.equal(result.vectors[absent], before[absent])
    assert torch.isinf(result.distances[absent]).all()
    apply_projection(model, result)
    assert torch.equal(model.head.prototypes.prototypes.detach()[absent], before[absent])
    round_trip = ProjectionResult.from_json(result.to_json())
    assert round_trip.sources == result.sources and round_trip.vectors is None
    assert torch.equal(round_trip.distances, result.distances)
    assert torch.equal(round_trip.prototype_class, result.prototype_class)
    assert json.loads(result.to_json())["prototypes"][absent[0]]["source"] is None


def test_receptive_field_box_clipping():
    assert receptive_field_box((0, 5), rate=2, output_stride=4, image_size=(16, 24)) == (0, 12, 12, 24)
    assert receptive_field_box((3, 3), rate=1, output_stride=8, image_size=(100, 100)) == (16, 16, 40, 40)
    assert receptive_field_box((64, 0), rate=24, output_stride=8, image_size=(513, 513)) == (320, 0, 513, 200)
    assert scale_box((0, 12, 12, 24), (16, 24), (32, 48)) == (0, 24, 24, 48)
    assert scale_box((3, 3, 5, 5), (10, 10), (5, 5)) == (1, 1, 3, 3)


def test_remove_duplicates_after_projection_keeps_bookkeeping():
    model, ds = _model(), SynthDataset()
    head = model.head
    with torch.no_grad():  # prototypes 0 and 1 share (class 0, scale 0) and start equal: same source cell
        head.prototypes.prototypes[1] = head.prototypes.prototypes[0]
    result = project_prototypes(model, ds, progress=False)
    assert result.sources[0] == result.sources[1]
    apply_projection(model, result)
    old_cls, old_scale = head.prototype_class.clone(), head.prototype_scale.clone()
    old_h, old_p = head.h_proto.detach().clone(), head.prototypes.prototypes.detach().clone()
    report = remove_duplicates(model)
    # the forced pair, and any other pair of the same (class, scale) that projected onto the same cell
    assert 1 in report.removed and report.duplicate_of[1] == 0 and report.num_before == 12
    assert all(old_cls[j] == old_cls[i] and old_scale[j] == old_scale[i] for j, i in report.duplicate_of.items())
    assert report.kept == [i for i in range(12) if i not in report.removed]
    keep = torch.tensor(report.kept)
    assert torch.equal(head.prototype_class, old_cls[keep]) and torch.equal(head.prototype_scale, old_scale[keep])
    assert torch.equal(head.h_proto.detach(), old_h[:, keep])
    assert torch.equal(head.prototypes.prototypes.detach(), old_p[keep])
    sel = result.select(report.kept)
    assert sel.sources == [result.sources[i] for i in report.kept]
    assert torch.equal(sel.prototype_class, head.prototype_class)
    apply_projection(model, sel)  # the reindexed result matches the model's new layout
    assert remove_duplicates(model).removed == []
    assert report.to_dict()["num_after"] == 12 - len(report.removed)


def test_remove_duplicates_needs_the_same_scale():
    model = _model()
    with torch.no_grad():
        p = model.head.prototypes.prototypes
        p[3] = p[2]  # same scale 0: duplicate
        p[8] = p[2]  # scale 1: not a duplicate of a scale-0 prototype
        p[9] = p[2] + 1e-6  # not bitwise identical
    report = remove_duplicates(model)
    assert report.removed == [3] and report.duplicate_of == {3: 2}
    assert model.head.num_prototypes == 11


# -- nearest patches and pruning --------------------------------------------------------------------------------
def _brute_nearest(model, items, k, one_per_image):
    P = model.head.num_prototypes
    cands: list[list] = [[] for _ in range(P)]
    with torch.no_grad():
        for item in items:
            out = model(item["image"][None])
            h, w = out.distances.shape[-2:]
            lab = resize_labels(item["label"], (h, w))
            for p in range(P):
                per = []
                for r in range(h):
                    for c in range(w):
                        if 0 <= int(lab[r, c]) < C:
                            d = float(out.distances[0, p, r, c])
                            per.append((d, item["index"], r * w + c, int(lab[r, c]), (r, c)))
                per.sort()
                cands[p].extend(per[:1] if one_per_image else per)
    return [sorted(c)[:k] for c in cands]


@pytest.mark.parametrize("one_per_image", [True, False])
def test_nearest_patches_equal_brute_force(one_per_image):
    model = _model("protoseg")
    ds = SynthDataset(duplicate=(0, 3))
    k = 4
    got = nearest_patches(model, ds, None, k, one_per_image, progress=False)
    want = _brute_nearest(model, ds.items, k, one_per_image)
    for p in range(model.head.num_prototypes):
        for j, (d, idx, _, lab, rc) in enumerate(want[p]):
            assert float(got.distances[p, j]) == d
            assert int(got.dataset_indices[p, j]) == idx
            assert tuple(got.cells[p, j].tolist()) == rc
            assert int(got.labels[p, j]) == lab
            assert got.names[p][j] == ds.items[idx]["name"]
        if one_per_image:
            assert len(set(got.dataset_indices[p].tolist())) == k
    sub = nearest_patches(model, ds, [4, 1], k, one_per_image, progress=False)
    assert torch.equal(sub.distances, got.distances[[4, 1]]) and torch.equal(sub.cells, got.cells[[4, 1]])


def test_nearest_patches_pad_when_fewer_images_than_k():
    model, ds = _model("protoseg"), SynthDataset()
    got = nearest_patches(model, ds.items[:2], [0], 5, progress=False)
    assert torch.isfinite(got.distances[0, :2]).all() and torch.isinf(got.distances[0, 2:]).all()
    assert got.dataset_indices[0, 2:].tolist() == [-1] * 3 and got.labels[0, 2:].tolist() == [-1] * 3
    assert got.names[0][2:] == [None] * 3


def test_footprint_patch_label_follows_protoseg_release():
    model = _model("protoseg")
    label = torch.ones(8, 8, dtype=torch.long)
    label[1::4, 1::4] = 0  # one class-0 pixel per 4x4 footprint, never the nearest-sampled one
    item = {"image": torch.randn(3, 8, 8), "label": label, "name": "a", "index": 0}
    cell = nearest_patches(model, [item], None, 1, progress=False)
    foot = nearest_patches(model, [item], None, 1, progress=False, patch_label="footprint")
    assert (cell.labels == 1).all()
    # own class if any footprint pixel has it (classes 0, 1), else the footprint's majority (class 2 -> 1)
    assert model.head.prototype_class.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert foot.labels[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]


PATTERNS = {0: (4.0, 4.0, 4.0), 1: (-4.0, -4.0, -4.0), 2: (4.0, -4.0, 4.0), 3: (-4.0, 4.0, -4.0)}


def _prune_dataset(own_images: dict[int, int]) -> list[dict]:
    """6 images 4x4: columns 0-1 class 0, 2-3 class 1, (3, 3) ignore. Pattern p sits in row p, in its prototype's
    class region in the first ``own_images[p]`` images and in the other class's region afterwards. Pattern 0 also
    sits in the ignore pixel of every image (an exact match that must never count)."""
    items = []
    proto_class = {0: 0, 1: 0, 2: 1, 3: 1}
    for i in range(6):
        image = torch.zeros(3, 4, 4)
        label = torch.zeros(4, 4, dtype=torch.long)
        label[:, 2:] = 1
        label[3, 3] = IGNORE
        image[:, 3, 3] = torch.tensor(PATTERNS[0])
        for p, pat in PATTERNS.items():
            cls = proto_class[p] if i < own_images[p] else 1 - proto_class[p]
            image[:, p, 0 if cls == 0 else 2] = torch.tensor(pat)
        items.append({"image": image, "label": label, "name": f"p{i}", "index": i})
    return items


def _prune_model() -> Segmenter:
    model = _identity_model(2, 2)  # prototype classes [0, 0, 1, 1]
    with torch.no_grad():
        model.head.prototypes.prototypes.copy_(torch.sigmoid(torch.tensor([PATTERNS[p] for p in range(4)])))
    return model


def test_prune_known_case():
    model = _prune_model()
    items = _prune_dataset({0: 2, 1: 6, 2: 3, 3: 2})  # own-class patches among the 6 nearest: 2, 6, 3, 2
    old_h = model.head.h_proto.detach().clone()
    nearest = find_nearest_patches(model, items, k=6, progress=False)
    assert not ((nearest.cells[..., 0] == 3) & (nearest.cells[..., 1] == 3)).any()  # the ignore pixel never counts
    assert (nearest.distances == 0).all()
    report = prune_prototypes(model, items, k=6, threshold=3, progress=False)
    assert report.own_class_counts == [2, 6, 3, 2]
    assert report.pruned == [0, 3] and report.kept == [1, 2] and report.rescued == []
    assert model.head.prototype_class.tolist() == [0, 1]
    assert torch.equal(model.head.h_proto.detach(), old_h[:, [1, 2]])
    assert report.to_dict()["num_after"] == 2


def test_prune_ties_go_to_lower_dataset_index():
    model = _prune_model()
    items = _prune_dataset({0: 4, 1: 6, 2: 2, 3: 6})  # all distances 0: k = 2 keeps images 0 and 1
    report = prune_prototypes(model, list(reversed(items)), k=2, threshold=2, progress=False)
    assert report.nearest.dataset_indices.tolist() == [[0, 1]] * 4
    assert report.pruned == [] and model.head.num_prototypes == 4


def test_prune_never_removes_a_whole_class():
    model = _prune_model()
    items = _prune_dataset({0: 2, 1: 6, 2: 2, 3: 1})  # both class-1 prototypes fail
    with pytest.warns(UserWarning, match="every prototype"):
        report = prune_prototypes(model, items, k=6, threshold=3, progress=False)
    assert report.own_class_counts == [2, 6, 2, 1]
    assert report.rescued == [2] and report.pruned == [0, 3] and report.kept == [1, 2]
    assert sorted(set(model.head.prototype_class.tolist())) == [0, 1]


def test_save_prototype_patches(tmp_path):
    model, ds = _model(), SynthDataset()
    result = project_prototypes(model, ds, progress=False)
    entries = save_prototype_patches(result, ds, tmp_path)
    assert len(entries) == result.num_prototypes
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["file"] for e in manifest["prototypes"]] == [f"proto_{i:04d}.png" for i in range(12)]
    for i, src in enumerate(result.sources):
        raw, _, _ = ds.load_raw(src.dataset_index)
        y0, x0, y1, x1 = src.box
        crop = np.asarray(Image.open(tmp_path / f"proto_{i:04d}.png"))
        assert np.array_equal(crop, raw[y0:y1, x0:x1])

    class Doubled:  # raw images twice the size the model saw
        def load_raw(self, i):
            raw, label, name = ds.load_raw(i)
            return np.repeat(np.repeat(raw, 2, 0), 2, 1), label, name

    out = tmp_path / "doubled"
    entries = save_prototype_patches(result, Doubled(), out)
    for i, src in enumerate(result.sources):
        y0, x0, y1, x1 = src.box
        assert entries[i]["raw_box"] == [2 * y0, 2 * x0, 2 * y1, 2 * x1]
        assert Image.open(out / f"proto_{i:04d}.png").size == (2 * (x1 - x0), 2 * (y1 - y0))
