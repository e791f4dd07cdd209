"""Which EfficientNet-Lite0 features can segment a sample set? A linear probe per stage (docs/results/learning.md).

For every training image of a folder dataset (default: the nuclei sample set), the frozen ImageNet backbone at
output stride 8 (``features="head"``, so that every stage exists) is run once on the whole image; the outputs of
chosen blocks (stages 2-7 and the 1280-channel head) are taken on the stride-8 grid (finer ones average-pooled) and
paired with the label under each cell's centre. A ridge regression (features standardised, lambda 10) per feature set
predicts "is class ``--cls``"; the nucleus IoU of its 0.5 threshold on the training cells and on the validation
cells of the same split files is printed as a markdown table. Nothing is trained but the probe: a stage whose
features a linear map cannot read is a poor input for the ASPP and the prototypes, whatever their training recipe.

    python benchmarks/learning_probe.py [--root data/samples/nuclei] [--cls 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import markdown_table

from scaleprotoseg.data.folder import FolderDataset
from scaleprotoseg.models.backbones import build_backbone

# block index -> name (Lite0 stages end at blocks 0, 2, 4, 7, 10, 14, 15)
TAPS = {2: "stage 2 (24 ch, stride 4)", 4: "stage 3 (40 ch)", 7: "stage 4 (80 ch)", 10: "stage 5 (112 ch)",
        14: "stage 6 (192 ch)", 15: "stage 7 (320 ch)"}  # fmt: skip
SETS = [
    ["mean intensity"],
    [TAPS[2]],
    [TAPS[4]],
    [TAPS[7]],
    [TAPS[10]],
    [TAPS[14]],
    [TAPS[15]],
    ["head (1280 ch)"],
    [TAPS[4], TAPS[7], TAPS[10]],
    [TAPS[4], TAPS[7], TAPS[10], "head (1280 ch)"],
]


def collect(backbone: torch.nn.Module, dataset: FolderDataset, cls: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features per named set (N cells, F) and the 0/1 target of each stride-8 cell, over the whole split."""
    feats: dict[str, list[np.ndarray]] = {}
    targets = []
    for i in range(len(dataset)):
        item = dataset[i]
        x, y = item["image"], item["label"]
        H, W = (s - s % 8 for s in y.shape)
        x, y = x[:, :H, :W], y[:H, :W]
        h, w = H // 8, W // 8
        outs: dict[str, torch.Tensor] = {"mean intensity": F.avg_pool2d(x[None, :1], 8)}
        with torch.no_grad():
            z = backbone._stem(x[None])
            for idx, block in enumerate(backbone.blocks):
                z = block(z)
                if idx in TAPS:
                    outs[TAPS[idx]] = z if z.shape[-1] == w else F.adaptive_avg_pool2d(z, (h, w))
            outs["head (1280 ch)"] = backbone.act(backbone.bn1(backbone.conv_head(z)))
        for name, t in outs.items():
            feats.setdefault(name, []).append(t[0].reshape(t.shape[1], -1).T.numpy())
        targets.append((y[4:H:8, 4:W:8] == cls).reshape(-1).numpy().astype(np.float64))
    return {k: np.concatenate(v).astype(np.float64) for k, v in feats.items()}, np.concatenate(targets)


def probe(train: dict[str, np.ndarray], yt: np.ndarray, val: dict[str, np.ndarray], yv: np.ndarray, names: list[str]):
    """Ridge regression on standardised features; IoU of ``pred > 0.5`` on train and val cells."""
    a = np.concatenate([train[n] for n in names], 1)
    b = np.concatenate([val[n] for n in names], 1)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    a, b = np.concatenate([a, np.ones((len(a), 1))], 1), np.concatenate([b, np.ones((len(b), 1))], 1)
    w = np.linalg.solve(a.T @ a + 10.0 * np.eye(a.shape[1]), a.T @ yt)

    def iou(x: np.ndarray, y: np.ndarray) -> float:
        p, t = x @ w > 0.5, y > 0.5
        return float((p & t).sum() / max((p | t).sum(), 1))

    return iou(a, yt), iou(b, yv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "data" / "samples" / "nuclei"))
    parser.add_argument("--cls", type=int, default=1, help="class to probe (default 1: nucleus)")
    args = parser.parse_args()
    start = time.perf_counter()
    backbone = build_backbone("efficientnet_lite0", output_stride=8, pretrained="package", features="head").eval()
    train, yt = collect(backbone, FolderDataset(args.root, "train"), args.cls)
    val, yv = collect(backbone, FolderDataset(args.root, "val"), args.cls)
    rows = []
    for names in SETS:
        ti, vi = probe(train, yt, val, yv, names)
        dim = sum(train[n].shape[1] for n in names)
        rows.append([" + ".join(names), dim, f"{ti:.3f}", f"{vi:.3f}"])
    print(f"## Linear probe of frozen EfficientNet-Lite0 features ({args.root}, class {args.cls}, stride-8 cells)\n")
    print(markdown_table(["features", "dims", "train IoU", "val IoU"], rows))
    print(f"\n{len(yt)} train / {len(yv)} val cells; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
