from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scaleprotoseg.config import load_config


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


def write_synthetic_folder(root: Path, n_train: int = 6, n_val: int = 2, size: int = 40, seed: int = 0) -> Path:
    """A tiny dataset in the folder format: background, a red square (class 1), a blue disc (class 2), with a void
    border (255) on one side; shapes move and change size from image to image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    names = {"train": [], "val": []}
    for i in range(n_train + n_val):
        img = (rng.random((size, size, 3)) * 60 + 40).astype(np.uint8)
        lab = np.zeros((size, size), np.uint8)
        s = int(rng.integers(8, 16))
        y, x = rng.integers(0, size - s, 2)
        img[y : y + s, x : x + s] = (200, 30, 30)
        lab[y : y + s, x : x + s] = 1
        r = int(rng.integers(4, 8))
        cy, cx = rng.integers(r, size - r, 2)
        yy, xx = np.mgrid[:size, :size]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[disc] = (30, 30, 210)
        lab[disc] = 2
        lab[:, :2] = 255
        name = f"img{i:02d}"
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        Image.fromarray(lab, mode="L").save(root / "masks" / f"{name}.png")
        names["train" if i < n_train else "val"].append(name)
    for split, stems in names.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    (root / "classes.yaml").write_text(
        "name: synthetic\nclasses:\n  - {name: background, color: [0, 0, 0]}\n"
        "  - {name: square, color: [200, 30, 30]}\n  - {name: disc, color: [30, 30, 210]}\nignore_index: 255\n"
    )
    return root


@pytest.fixture
def synthetic_folder(tmp_path: Path) -> Path:
    return write_synthetic_folder(tmp_path / "synthetic")


def make_tiny_config(root, method, **extra):
    """A resnet18 model with 2-step stages on the synthetic folder: every stage of a method in ~20 s on CPU."""
    sets = [
        f"data.root={root}",
        "data.crop_size=[32, 32]",
        "data.batch_size=2",
        "data.num_workers=0",
        f"model.method={method}",
        "model.backbone=resnet18",
        "model.output_stride=8",
        "model.aspp_rates=[1, 2]",
        "model.aspp_channels=8",
        f"model.prototypes_per_class={2 if method == 'scaleprotoseg' else 3}",
        "model.groups_per_class=2",
        "train.checkpoint_every=0",
        "train.log_every=1",
        "train.seed=3",
    ]
    stages = {
        "scaleprotoseg": ["warmup", "joint", "group_warmup", "group_joint"],
        "protoseg": ["warmup", "joint", "finetune"],
        "deeplabv2": ["train"],
    }[method]
    for s in stages:
        sets += [f"train.stages.{s}.steps=2", f"train.stages.{s}.accumulation=1"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, sets)


@pytest.fixture(scope="session")
def tiny_config():
    return make_tiny_config


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """``{"root", "scaleprotoseg", "protoseg"}``: the synthetic folder dataset and two tiny trained runs, shared by
    the prediction, explanation and analysis tests (with the nearest patches ``scaleprotoseg train`` exports)."""
    from scaleprotoseg.engine.trainer import Trainer
    from scaleprotoseg.explain.nearest import export_final_nearest

    base = tmp_path_factory.mktemp("trained_runs")
    root = write_synthetic_folder(base / "synthetic")
    out = {"root": root}
    torch.set_num_threads(2)
    for method in ("scaleprotoseg", "protoseg"):
        torch.manual_seed(0)
        run = base / f"run_{method}"
        Trainer(make_tiny_config(root, method), run, device="cpu", progress=False).run_stages()
        export_final_nearest(run)
        out[method] = run
    return out


TINY_INFO = SimpleNamespace(
    class_names=["background", "square", "disc"],
    palette=np.array([[0, 0, 0], [200, 30, 30], [30, 30, 210]], np.uint8),
    ignore_index=255,
)


def make_tiny_model(method: str, *, grouped: bool = False, seed: int = 0):
    """(model in eval mode, config): a 31k-parameter U-Net model for 16x16 inputs, 3 classes. Grouped ScaleProtoSeg
    heads lose one scale-0 prototype (a layout uneven across scales) and get thresholded groups (some prototypes
    unused)."""
    from scaleprotoseg.models.segmenter import build_model

    torch.manual_seed(seed)
    cfg = load_config(
        None,
        [
            f"model.method={method}",
            "model.backbone=unet",
            "model.output_stride=1",
            "model.backbone_options={base_channels: 2}",
            "model.aspp_rates=[1, 2]",
            "model.aspp_channels=4",
            "model.prototypes_per_class=2",
            "model.groups_per_class=2",
            "data.crop_size=[16, 16]",
        ],
    )
    model = build_model(cfg.model, len(TINY_INFO.class_names))
    if grouped:
        head = model.head
        head.remove_prototypes(torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]))
        head.enable_groups()
        with torch.no_grad():
            head.grouping.weight.copy_(torch.rand(head.grouping.weight.shape) ** 3)
        head.project_groups_()
        head.threshold_groups_(0.3)
    return model.eval(), cfg


def write_tiny_run(root: Path, method: str, *, grouped: bool = False) -> Path:
    """A run directory holding only the ``final/`` checkpoint of :func:`make_tiny_model` (no training)."""
    from scaleprotoseg.checkpoint import CheckpointMeta, write_checkpoint
    from scaleprotoseg.config import save_config
    from scaleprotoseg.rundir import RunDir

    model, cfg = make_tiny_model(method, grouped=grouped)
    run = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config)
    meta = CheckpointMeta.of_model(model, stage="final", step=0, info=TINY_INFO, normalization="imagenet")
    write_checkpoint(run.final, model, meta, config=cfg)
    return root


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_run():
    return write_tiny_run
