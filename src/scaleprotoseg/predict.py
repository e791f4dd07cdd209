"""Predictor: a run directory in, label maps and prototype/group maps out, for any image.

``Predictor.from_run("runs/x")`` reads ``final/`` (or a stage's checkpoint) and needs nothing else: the config, the
class names, palette, normalisation and the head's structure are stored beside the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaleprotoseg.config import Config, load_config
from scaleprotoseg.engine.checkpoint import load_weights, read_checkpoint
from scaleprotoseg.engine.distributed import resolve_device
from scaleprotoseg.models.heads import ModelOutput
from scaleprotoseg.models.segmenter import Segmenter, build_model


@dataclass
class RunInfo:
    """What a checkpoint says about itself (meta.json)."""

    method: str
    stage: str
    class_names: list[str]
    palette: np.ndarray
    ignore_index: int
    normalization: str
    output_stride: int
    structure: dict[str, Any]

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> RunInfo:
        return cls(
            method=meta["method"],
            stage=meta.get("stage", ""),
            class_names=list(meta["class_names"]),
            palette=np.asarray(meta["palette"], dtype=np.uint8).reshape(-1, 3),
            ignore_index=int(meta["ignore_index"]),
            normalization=meta.get("normalization", "imagenet"),
            output_stride=int(meta.get("output_stride", 8)),
            structure=meta["structure"],
        )


def checkpoint_dir(run: str | Path, stage: str | None = None) -> Path:
    """``final/`` of a run, or ``checkpoints/<stage>/`` when ``stage`` is given."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    if stage is None or stage == "final":
        d = run / "final"
        if not (d / "model.safetensors").is_file():
            raise FileNotFoundError(f"{d} has no model.safetensors; has training finished? (try --stage NAME)")
        return d
    d = run / "checkpoints" / stage
    if not d.is_dir():
        have = sorted(p.name for p in (run / "checkpoints").glob("*") if p.is_dir())
        raise FileNotFoundError(f"{run} has no checkpoint for stage {stage!r}; it has: {', '.join(have) or 'none'}")
    return d


def load_run_model(
    run: str | Path, stage: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Segmenter, Config, RunInfo]:
    """Rebuild a run's model from its checkpoint; pretrained backbone files are not needed (weights are stored)."""
    run = Path(run)
    ckpt = checkpoint_dir(run, stage)
    cfg_path = ckpt / "config.yaml" if (ckpt / "config.yaml").is_file() else run / "config.yaml"
    cfg = load_config(cfg_path)
    cfg.model.pretrained = None
    weights, meta, _ = read_checkpoint(ckpt)
    info = RunInfo.from_meta(meta)
    model = build_model(cfg.model, len(info.class_names))
    model.apply_structure(info.structure)
    load_weights(model, weights, str(ckpt))
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model.to(dev).eval()
    return model, cfg, info


class Predictor:
    """Segment and explain images with a trained run."""

    def __init__(
        self, model: Segmenter, cfg: Config, info: RunInfo, device: torch.device, run_dir: Path | None = None
    ) -> None:
        self.model, self.cfg, self.info, self.device = model, cfg, info, device
        self.run_dir = run_dir  # the run the weights came from (its final/ holds prototype patches)

    @classmethod
    def from_run(cls, run: str | Path, stage: str | None = None, device: str = "cpu") -> Predictor:
        dev = resolve_device(device)
        model, cfg, info = load_run_model(run, stage, dev)
        return cls(model, cfg, info, dev, Path(run))

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) (or gray (H, W)) -> normalised (1, 3, H, W) on the device."""
        from scaleprotoseg.data.transforms import normalize

        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"image has shape {image.shape}; expected (H, W, 3) RGB")
        x = torch.from_numpy(np.array(image[..., :3], dtype=np.float32)).permute(2, 0, 1)
        return normalize(x, self.info.normalization).unsqueeze(0).to(self.device)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution class scores (B, C, H, W) for a normalised batch, with the config's test mode."""
        from scaleprotoseg.evaluation.inference import predict_logits

        d = self.cfg.data
        return predict_logits(
            self.model,
            x.to(self.device),
            mode=d.test_mode,
            crop_size=tuple(d.crop_size),
            test_size=d.test_size,
            msc_scales=tuple(d.msc_scales),
        )

    def predict_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Label maps (B, H, W) for a normalised batch (the same path ``evaluate`` takes)."""
        return self.logits(x).argmax(1)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Label map (H, W) int64 for one uint8 RGB image."""
        return self.predict_tensor(self.preprocess(image))[0].cpu().numpy()

    @torch.no_grad()
    def maps(self, image: np.ndarray | torch.Tensor) -> ModelOutput:
        """The model's output on the feature grid for one image (prototype, group activations, ...), on the CPU."""
        x = image if isinstance(image, torch.Tensor) else self.preprocess(image)
        return self.model(x.to(self.device)).map(lambda t: t.detach().cpu())

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """Index map -> RGB with the run's palette (ignore/out-of-range values black)."""
        pal = np.zeros((256, 3), dtype=np.uint8)
        n = min(len(self.info.palette), 256)
        pal[:n] = self.info.palette[:n]
        return pal[np.clip(labels, 0, 255).astype(np.int64)]
