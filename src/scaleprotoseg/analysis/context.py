"""What every analysis of ``scaleprotoseg analyze`` reads: a trained run's model, config and checkpoint meta, the
datasets it is analysed on, the test-time settings and the options of the command (:class:`AnalysisContext`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from scaleprotoseg.analysis.registry import MissingInput, NotApplicable
from scaleprotoseg.analysis.stability import NOISE_STD
from scaleprotoseg.checkpoint import CheckpointMeta, load_model
from scaleprotoseg.config import Config
from scaleprotoseg.evaluation.inference import InferenceSettings
from scaleprotoseg.models.heads import ModelOutput, PrototypeHead
from scaleprotoseg.rundir import RunDir

T = TypeVar("T")


@dataclass
class AnalysisOptions:
    """What ``scaleprotoseg analyze`` passes to the analyses (see ``commands/analyze.py`` for each option)."""

    split: str | None = None
    data_root: str | None = None
    max_images: int = 0
    stage: str | None = None
    parts_dataset: str | None = None
    parts_root: str | None = None
    seed: int = 0
    count_background: bool = False
    noise_std: float = NOISE_STD
    progress: bool = True
    num_workers: int | None = None


@dataclass
class AnalysisContext:
    """A trained run (``final/`` or ``options.stage``) opened for analysis, and the metrics asked for together
    (``metrics``: analyses that share a pass over the data, such as consistency and stability, read it)."""

    run: RunDir
    device: torch.device
    options: AnalysisOptions
    model: Any
    cfg: Config
    info: CheckpointMeta
    metrics: tuple[str, ...] = ()
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls,
        run: str | Path,
        device: torch.device,
        options: AnalysisOptions | None = None,
        metrics: Sequence[str] = (),
    ) -> AnalysisContext:
        """Load the run's model (``options.stage`` or ``final/``) with its config; ``--data-root`` replaces
        ``data.root`` and the training-time ``max_val_samples`` shortcut is dropped (analyses take --max-images)."""
        opts = options or AnalysisOptions()
        loaded = load_model(Path(run), opts.stage, device)
        cfg = loaded.config
        if opts.data_root:
            cfg.data.root = opts.data_root
        cfg.data.max_val_samples = 0
        return cls(RunDir(run), device, opts, loaded.model, cfg, loaded.meta, tuple(metrics))

    def shared(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per context: a pass over the data that several analyses read."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    # -- what the run has ----------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.run.root.name

    @property
    def head(self) -> Any:
        return self.model.head

    @property
    def has_prototypes(self) -> bool:
        return isinstance(self.head, PrototypeHead)

    @property
    def grouped(self) -> bool:
        return isinstance(self.head, PrototypeHead) and self.head.grouped

    @property
    def num_scales(self) -> int:
        return self.head.num_scales if isinstance(self.head, PrototypeHead) else 1

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def num_workers(self) -> int:
        return self.cfg.data.num_workers if self.options.num_workers is None else self.options.num_workers

    @property
    def inference(self) -> InferenceSettings:
        """The run's test-time settings (mIoU evaluations; the other analyses feed images at native size)."""
        return InferenceSettings.from_config(self.cfg.data)

    def need_prototypes(self) -> None:
        if not self.has_prototypes:
            raise NotApplicable(f"{self.info.method} runs have no prototypes")

    def used_prototype_mask(self) -> np.ndarray:
        """(P,) bool: every prototype (ProtoSeg) or those some group uses after thresholding (ScaleProtoSeg)."""
        P = self.head.num_prototypes
        if not self.grouped:
            return np.ones(P, dtype=bool)
        mask = np.zeros(P, dtype=bool)
        mask[self.head.grouping.used_prototypes().cpu().numpy()] = True
        return mask

    def meta(self, **extra: Any) -> dict[str, Any]:
        """The ``meta`` block of a metric's JSON."""
        return {
            "run": str(self.run.root),
            "method": self.info.method,
            "stage": self.options.stage or "final",
            "checkpoint_stage": self.info.stage,
            "seed": self.options.seed,
            **extra,
        }

    # -- data ----------------------------------------------------------------------------------------------------
    def split(self, default: str | None = None) -> str:
        return self.options.split or default or self.cfg.data.val_split

    def dataset(self, split: str) -> Any:
        from scaleprotoseg.data.registry import build_dataset

        return build_dataset(self.cfg.data, split, train=False, seed=self.options.seed)

    def parts_dataset(self) -> Any:
        """The part-annotated dataset: ``--parts-dataset``/``--parts-root``, or the run's own if it has parts."""
        from scaleprotoseg.data import folder_parts  # noqa: F401  (registers folder_parts)
        from scaleprotoseg.data.base import SegmentationDataset
        from scaleprotoseg.data.registry import build_dataset, get_dataset_class

        d = copy.deepcopy(self.cfg.data)
        name = self.options.parts_dataset or d.name
        cls = get_dataset_class(name)
        if not (isinstance(cls, type) and issubclass(cls, SegmentationDataset) and cls.has_parts):
            raise MissingInput(
                f"needs part annotations; dataset {name!r} has none: pass --parts-dataset "
                "cityscapes_panoptic_parts|pascal_panoptic_parts|folder_parts and --parts-root DIR"
            )
        if name != d.name:
            d.name, d.options = name, {}
        if self.options.parts_root:
            root = str(Path(self.options.parts_root).resolve())
            options = cls.option_names()
            if "parts_root" in options:
                d.options["parts_root"] = root
            elif "parts_dir" in options:
                d.options["parts_dir"] = root  # an absolute path replaces <root>/<parts_dir>
            else:
                d.root = root
        ds = build_dataset(d, self.split(), train=False, seed=self.options.seed)
        if ds.info.num_classes != len(self.class_names):
            raise ValueError(
                f"part dataset {name!r} ({d.root}) has {ds.info.num_classes} classes but the run {self.run.root} "
                f"has {len(self.class_names)}; expected the run's classes ({', '.join(self.class_names[:5])}, ...)"
            )
        if not ds.part_names:
            raise ValueError(f"part dataset {name!r} ({d.root}) names no parts for any class; expected part_names")
        return ds

    def num_images(self, dataset: Any) -> int:
        """How many of ``dataset``'s images the analyses read (the first ``--max-images``)."""
        n = len(dataset)
        return min(n, self.options.max_images) if self.options.max_images > 0 else n

    def items(self, dataset: Any, desc: str) -> Iterator[dict[str, Any]]:
        """Dataset items one by one (native size), the first ``--max-images`` only, with a progress bar."""
        from torch.utils.data import DataLoader, Subset
        from tqdm import tqdm

        n = self.num_images(dataset)
        loader = DataLoader(Subset(dataset, range(n)), batch_size=None, shuffle=False, num_workers=self.num_workers)
        yield from tqdm(loader, total=n, desc=desc, disable=not self.options.progress, dynamic_ncols=True)

    @torch.inference_mode()
    def forward(self, image: torch.Tensor) -> ModelOutput:
        """ModelOutput of one normalised image (3, H, W) or batch (1, 3, H, W), on the feature grid."""
        x = image if image.dim() == 4 else image.unsqueeze(0)
        return self.model(x.to(self.device, dtype=torch.float32))

    def activations(self, image: torch.Tensor) -> np.ndarray:
        """(P, h, w) float prototype activations (Eq. 1) of one image."""
        maps = self.forward(image).activations
        if maps is None:
            raise NotApplicable(f"{self.info.method} runs have no prototypes")
        return maps[0].float().cpu().numpy()

    def group_activations(self, image: torch.Tensor) -> np.ndarray:
        """(G, h, w) float group activations (Eq. 2) of one image; grouped runs only."""
        maps = self.forward(image).group_activations
        if maps is None:
            raise NotApplicable("needs groups (ScaleProtoSeg after the group stages)")
        return maps[0].float().cpu().numpy()
