"""Predictor: a run directory in, label maps and prototype/group maps out, for any image.

``Predictor.from_run("runs/x")`` reads ``final/`` (or a stage's checkpoint) and needs nothing else: the config, the
class names, palette, normalisation and the head's structure are stored beside the weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scaleprotoseg.checkpoint import CheckpointMeta, load_model
from scaleprotoseg.config import Config
from scaleprotoseg.engine.distributed import resolve_device
from scaleprotoseg.models.heads import ModelOutput
from scaleprotoseg.models.segmenter import Segmenter


class Predictor:
    """Segment and explain images with a trained run."""

    def __init__(
        self,
        model: Segmenter,
        cfg: Config,
        info: CheckpointMeta,
        device: torch.device,
        run_dir: Path | None = None,
        stage: str | None = None,
    ) -> None:
        self.model, self.cfg, self.info, self.device = model, cfg, info, device
        self.run_dir = run_dir  # the run the weights came from (its final/ holds prototype patches)
        self.stage = stage  # the checkpoint: None for final/

    @classmethod
    def from_run(cls, run: str | Path, stage: str | None = None, device: str = "cpu") -> Predictor:
        """The model of ``final/`` (or of ``stage``'s checkpoint) of ``run`` on ``device`` (``auto``, ``cpu``, ...)."""
        dev = resolve_device(device)
        loaded = load_model(run, stage, dev)
        return cls(loaded.model, loaded.config, loaded.meta, dev, Path(run), stage)

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
            msc_fusion=d.msc_fusion,
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
