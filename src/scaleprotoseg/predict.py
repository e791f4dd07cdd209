"""Predictor: a run directory in, label maps and prototype/group maps out, for any image.

``Predictor.from_run("runs/x")`` reads ``final/`` (or a stage's checkpoint) and needs nothing else: the config, the
class names, palette, normalisation and the head's structure are stored beside the weights.

Input arrays are converted as :func:`scaleprotoseg.data.io.read_image` converts files, so an array and the file it
came from give the same labels: uint8 as is; bool as 0/255; uint16 (and other integer types) scaled by the full range
of their type (x * 255 / 65535, the bit depth of a 16-bit file); floats in [0, 1] times 255, floats in (1, 255] as
0..255. Float arrays with values outside [0, 255], or without a finite value, are refused.

The test-time settings are the run's (its data section: ``test_mode``, ``test_size``, multi-scale inputs) unless an
:class:`~scaleprotoseg.evaluation.inference.InferenceSettings` is given (``inference=``; the command line's
``--mode``, ``--test-size``, ``--msc``, ``--msc-fusion``, ``--flip``). The device is chosen as the command line
chooses it (``auto``: the GPU when there is one).

Large images are predicted in tiles: with the ``whole`` test mode, an image of more than ``tile_above`` pixels is
predicted with overlapping ``tile_size`` windows whose logits are averaged (the ``sliding`` mode of
:func:`~scaleprotoseg.evaluation.inference.predict_logits`), so the network's memory stays bounded by the window.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from scaleprotoseg.checkpoint import CheckpointMeta, load_model
from scaleprotoseg.config import Config
from scaleprotoseg.engine.distributed import resolve_device
from scaleprotoseg.models.heads import ModelOutput
from scaleprotoseg.models.segmenter import Segmenter

if TYPE_CHECKING:
    from scaleprotoseg.evaluation.inference import InferenceSettings

TILE_SIZE = 1024  # window side of tiled prediction
TILE_ABOVE = 2048 * 2048  # images with more pixels are predicted in tiles (whole test mode)


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
        *,
        tile_size: int = TILE_SIZE,
        tile_above: int = TILE_ABOVE,
        inference: InferenceSettings | None = None,
    ) -> None:
        self.model, self.cfg, self.info, self.device = model, cfg, info, device
        self.run_dir = run_dir  # the run the weights came from (its final/ holds prototype patches)
        self.stage = stage  # the checkpoint: None for final/
        if tile_size < 0 or tile_above < 0:
            raise ValueError(f"tile_size {tile_size}, tile_above {tile_above}: expected values >= 0 (0: no tiling)")
        self.tile_size = tile_size  # window side for images above tile_above pixels (0: never tile)
        self.tile_above = tile_above
        self._inference = inference  # None: the config's data section (read at each call)

    @property
    def inference(self) -> InferenceSettings:
        """The test-time settings: those given to the constructor, else the config's (``data.test_mode``, ...)."""
        from scaleprotoseg.evaluation.inference import InferenceSettings

        return self._inference if self._inference is not None else InferenceSettings.from_config(self.cfg.data)

    @inference.setter
    def inference(self, settings: InferenceSettings | None) -> None:
        self._inference = settings

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        stage: str | None = None,
        device: str = "auto",
        *,
        tile_size: int = TILE_SIZE,
        tile_above: int = TILE_ABOVE,
        inference: InferenceSettings | None = None,
    ) -> Predictor:
        """The model of ``final/`` (or of ``stage``'s checkpoint) of ``run`` on ``device`` (``auto``: the GPU when
        there is one, as on the command line; ``cpu``, ``cuda``, ``cuda:N``)."""
        dev = resolve_device(device)
        loaded = load_model(run, stage, dev)
        return cls(
            loaded.model,
            loaded.config,
            loaded.meta,
            dev,
            Path(run),
            stage,
            tile_size=tile_size,
            tile_above=tile_above,
            inference=inference,
        )

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB (H, W, 3), RGBA or gray (H, W) array -> normalised (1, 3, H, W) on the device (see the module
        docstring for the accepted pixel types and their scaling)."""
        from scaleprotoseg.data.io import to_rgb_uint8
        from scaleprotoseg.data.transforms import normalize

        image = np.asarray(image)
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"image has shape {image.shape}; expected (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) gray")
        if np.issubdtype(image.dtype, np.floating) and image.size:
            finite = image[np.isfinite(image)]
            if finite.size and (finite.min() < 0 or finite.max() > 255):
                raise ValueError(
                    f"image array of {image.dtype} has values in [{finite.min():g}, {finite.max():g}]; expected "
                    "floats in [0, 1] (or 0..255), uint8, or integer pixels scaled by their type's range"
                )
        image = to_rgb_uint8(image, source="image array")
        x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
        return normalize(x, self.info.normalization).unsqueeze(0).to(self.device)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution class scores (B, C, H, W) for a normalised batch, with :attr:`inference`'s settings."""
        settings = self.inference
        if settings.mode == "whole" and self.tiled(x.shape[-2], x.shape[-1]):
            settings = dataclasses.replace(settings, mode="sliding", test_size=self.tile_size, tile_batch_size=1)
        return settings.logits(self.model, x.to(self.device))

    def tiled(self, height: int, width: int) -> bool:
        """Whether an image of this size is predicted in tiles (``whole`` test mode only; see the module docstring)."""
        return self.inference.mode == "whole" and self.tile_size > 0 and height * width > self.tile_above

    def predict_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Label maps (B, H, W) for a normalised batch (the same path ``evaluate`` takes)."""
        return self.logits(x).argmax(1)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Label map (H, W) int64 for one image array (see :meth:`preprocess`)."""
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
