"""The streaming best-k search on its own: a caller's criterion and payload, empty slots, ties, the rank merge."""

from __future__ import annotations

import math

import torch
from torch import nn

from scaleprotoseg.models.heads import ScaleProtoSegHead
from scaleprotoseg.models.segmenter import Segmenter
from scaleprotoseg.ops import resize_labels
from scaleprotoseg.prototypes.boxes import prototype_rates, receptive_field_box
from scaleprotoseg.prototypes.streaming import SENTINEL, ImageMaps, _Slots, best_k, lex_order, smallest_cells


class _Backbone(nn.Module):
    out_channels = 3
    output_stride = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x, 2)


def _model() -> Segmenter:
    torch.manual_seed(0)
    head = ScaleProtoSegHead(3, 2, rates=(1, 2), dim=3, prototypes_per_class=1)
    return Segmenter(_Backbone(), head)


def _items(n: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    sizes = [(8, 10), (12, 8), (10, 10), (6, 12), (8, 8)]
    return [
        {
            "image": torch.randn(3, *sizes[i], generator=g),
            "label": torch.randint(0, 3, sizes[i], generator=g),
            "name": f"n{i}",
            "index": 10 + i,
        }
        for i in range(n)
    ]


def test_any_criterion_with_a_payload_equals_brute_force():
    """The 3 cells labelled 2 nearest to each prototype (several per image), with the cell label doubled as payload."""
    model, items, k = _model().train(), _items(), 3

    def label_two(maps: ImageMaps) -> tuple[torch.Tensor, torch.Tensor]:
        return smallest_cells(torch.where(maps.grid_label == 2, maps.distances, math.inf), k)

    def doubled(maps: ImageMaps, cells: torch.Tensor, enters: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"twice": 2 * maps.grid_label[cells]}

    got = best_k(
        model,
        items,
        k=k,
        propose=label_two,
        fill=doubled,
        initial={"twice": torch.full((4, k), -7)},
        progress=False,
    )
    assert model.training  # restored
    model.eval()
    rates = prototype_rates(model.head)
    for p in range(4):
        want = []
        for item in items:
            with torch.no_grad():
                dist = model(item["image"][None]).distances[0, p]
            h, w = dist.shape
            lab = resize_labels(item["label"], (h, w))
            cells = [(r, c) for r in range(h) for c in range(w) if lab[r, c] == 2]
            want += [(float(dist[r, c]), item["index"], r * w + c, (r, c), item) for r, c in cells]
        want.sort(key=lambda t: t[:3])
        for j, (d, idx, _, rc, item) in enumerate(want[:k]):
            assert float(got.distances[p, j]) == d and int(got.dataset_indices[p, j]) == idx
            assert tuple(got.cells[p, j].tolist()) == rc and got.names[p][j] == item["name"]
            size = tuple(item["image"].shape[-2:])
            assert tuple(got.image_sizes[p, j].tolist()) == size
            box = receptive_field_box(rc, rate=rates[p], output_stride=2, image_size=size)
            assert tuple(got.boxes[p, j].tolist()) == box
            assert int(got.payload["twice"][p, j]) == 4
    assert got.prototypes.tolist() == [0, 1, 2, 3] and got.rank == 0


def test_empty_slots_keep_the_initial_payload():
    model, items = _model().eval(), _items(2)
    one = best_k(
        model,
        items,
        k=4,
        propose=lambda maps: smallest_cells(maps.distances, 1),
        fill=lambda maps, cells, enters: {"v": torch.ones(cells.shape[0], cells.shape[1], 2)},
        initial={"v": torch.zeros(2, 4, 2)},
        prototypes=torch.tensor([3, 1]),
        progress=False,
    )
    assert one.prototypes.tolist() == [3, 1]
    assert torch.isfinite(one.distances[:, :2]).all() and one.empty[:, 2:].all()
    assert (one.payload["v"][:, :2] == 1).all() and (one.payload["v"][:, 2:] == 0).all()
    assert (one.dataset_indices[:, 2:] == -1).all() and (one.cells[:, 2:] == -1).all()
    assert one.names[0][2:] == [None, None]


def test_smallest_cells_prefers_lower_cells_among_ties():
    masked = torch.tensor([[3.0, 1.0, 1.0, math.inf], [math.inf, math.inf, math.inf, math.inf]])
    d, c = smallest_cells(masked, 1)
    assert c.tolist() == [[1], [0]] and d[0, 0] == 1 and math.isinf(d[1, 0])
    d, c = smallest_cells(masked, 9)
    assert c[0].tolist() == [1, 2, 0, 3] and d.shape == (2, 4)


def test_merging_in_parts_equals_sorting_everything():
    """What the ranks do: each keeps its k best, the merge of the parts is the k best of all candidates."""
    g = torch.Generator().manual_seed(0)
    Q, k, n = 3, 4, 12
    d = torch.randint(0, 4, (Q, n), generator=g).float()
    d[0, :5] = math.inf
    i = torch.randint(0, 3, (Q, n), generator=g)
    c = torch.arange(n).repeat(Q, 1)
    i = torch.where(torch.isfinite(d), i, SENTINEL)
    c = torch.where(torch.isfinite(d), c, SENTINEL)
    values = torch.arange(Q * n).reshape(Q, n, 1).float()
    init = {"x": torch.full((Q, k, 1), -1.0)}

    def part(sl: slice) -> _Slots:
        return _Slots.empty(Q, k, torch.device("cpu"), dict(init)).merge(
            [_Slots(d[:, sl], i[:, sl], c[:, sl], {"x": values[:, sl]})]
        )

    merged = part(slice(0, 5)).merge([part(slice(5, 9)), part(slice(9, n))])
    order = lex_order(d, i, c)[:, :k]
    assert torch.equal(merged.d, d.gather(1, order)) and torch.equal(merged.i, i.gather(1, order))
    finite = torch.isfinite(merged.d)
    assert torch.equal(merged.payload["x"][..., 0][finite], values[..., 0].gather(1, order)[finite])
