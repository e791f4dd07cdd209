"""One exploring session of a run: images analysed once, then every question answered from the cache.

:meth:`ExploreSession.analyse` runs the model once on an image (resized like the run's test mode: short side to
``data.test_size`` for ``short_side``, else the whole image; one scale, no flip) and keeps the prototype activations
on the feature grid. A click (:meth:`ExploreSession.cell`) is then a gather and the decomposition of
:class:`~scaleprotoseg.explore.decision.DecisionTables`; switching prototypes or groups off recomputes the scores of
every cell from the cached activations (:meth:`ExploreSession.prediction`) and never runs the backbone again.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaleprotoseg.checkpoint import CheckpointMeta, load_model
from scaleprotoseg.config import Config
from scaleprotoseg.explain.resources import NearestGallery, PrototypeGallery, load_galleries
from scaleprotoseg.explore.decision import Ablation, DecisionTables, ExploreError
from scaleprotoseg.models.segmenter import Segmenter, prototype_head
from scaleprotoseg.ops import resize_image, upsample_logits

__all__ = ["MAX_PIXELS", "ExploreSession", "ImageCatalog", "ImageState"]

MAX_PIXELS = 4096 * 4096  # larger images are refused with a message (the activations of one would be gigabytes)
CACHE_IMAGES = 4  # analysed images kept per session
NO_ABLATION = Ablation()  # everything on


@dataclass
class ImageState:
    """One analysed image: ``activations`` (P, h, w) and ``logits`` (C, h, w) of the model on the feature grid."""

    key: str
    name: str
    image: np.ndarray
    activations: torch.Tensor
    logits: torch.Tensor
    predictions: dict[Ablation, np.ndarray] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.activations.shape[-2]), int(self.activations.shape[-1])

    def cell_of(self, y: int, x: int) -> tuple[int, int]:
        """The feature-grid cell under image pixel (y, x)."""
        (H, W), (h, w) = self.size, self.grid
        if not (0 <= y < H and 0 <= x < W):
            raise ExploreError(f"pixel ({y}, {x}) is outside the image of {H} x {W} pixels")
        return min(h - 1, y * h // H), min(w - 1, x * w // W)


class ExploreSession:
    """The model of a run with its decision tables, galleries and a small cache of analysed images."""

    def __init__(
        self,
        model: Segmenter,
        cfg: Config,
        meta: CheckpointMeta,
        *,
        run_dir: Path | None = None,
        stage: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        head = prototype_head(model)
        if head is None:
            raise ExploreError(
                f"{run_dir or 'this run'}: a {meta.method} model has no prototypes, so its decisions cannot be "
                "explored; expected a ScaleProtoSeg (or ProtoSeg) run"
            )
        self.model, self.cfg, self.meta = model.eval(), cfg, meta
        self.device = torch.device(device)
        self.run_dir, self.stage = run_dir, stage
        self.tables = DecisionTables.of_head(head)
        self._ablated: dict[Ablation, DecisionTables] = {}
        self._images: OrderedDict[str, ImageState] = OrderedDict()
        self._galleries: tuple[PrototypeGallery, NearestGallery] | None = None

    @classmethod
    def from_run(cls, run: str | Path, stage: str | None = None, device: str = "cpu") -> ExploreSession:
        from scaleprotoseg.engine.distributed import resolve_device

        dev = resolve_device(device)
        loaded = load_model(run, stage, dev)
        return cls(loaded.model, loaded.config, loaded.meta, run_dir=Path(run), stage=stage, device=dev)

    # -- what the page needs to know once ------------------------------------------------------------------------
    @property
    def notes(self) -> list[str]:
        out = []
        if not self.tables.grouped:
            out.append(
                f"this {self.meta.method} model has no groups: each class score is a sum over prototypes (h_proto); "
                "the group views are not available"
            )
        d = self.cfg.data
        if d.test_mode == "sliding" or d.msc_scales:
            out.append(
                f"the run predicts with {d.test_mode} windows / scales {list(d.msc_scales)}; the explorer runs the "
                "model once on the whole image, so its prediction can differ slightly from `predict`"
            )
        out += [p for p in (g.problem for g in self.galleries()) if p]
        return out

    def describe(self) -> dict[str, Any]:
        """The model's structure for the page: classes, prototypes, groups."""
        t = self.tables
        groups = []
        if t.grouped:
            w = t.group_weight
            for g in range(t.num_groups):
                nz = torch.nonzero(w[g] > 0).flatten().tolist()  # type: ignore[index]
                groups.append({"group": g, "class": int(t.group_class[g]), "prototypes": nz})  # type: ignore[index]
        return {
            "method": self.meta.method,
            "stage": self.meta.stage,
            "grouped": t.grouped,
            "classes": [
                {"index": i, "name": n, "color": [int(v) for v in self.meta.palette[i]]}
                for i, n in enumerate(self.meta.class_names)
            ],
            "prototypes": [
                {"prototype": p, "class": int(t.prototype_class[p]), "scale": int(t.prototype_scale[p])}
                for p in range(t.num_prototypes)
            ],
            "groups": groups,
            "output_stride": int(self.meta.output_stride),
            "notes": self.notes,
        }

    def galleries(self) -> tuple[PrototypeGallery, NearestGallery]:
        """Projected prototype patches and nearest training patches (``final/`` only), read once."""
        if self._galleries is None:
            self._galleries = load_galleries(self.run_dir, self.stage)
        return self._galleries

    # -- images --------------------------------------------------------------------------------------------------
    def _input_size(self, H: int, W: int) -> tuple[int, int]:
        d = self.cfg.data
        if d.test_mode == "short_side" and d.test_size > 0:
            f = d.test_size / min(H, W)
            return max(1, math.floor(H * f + 0.5)), max(1, math.floor(W * f + 0.5))
        return H, W

    @torch.no_grad()
    def analyse(self, image: np.ndarray, name: str = "image") -> ImageState:
        """Run the model once on ``image`` (uint8 RGB, or anything :func:`to_rgb_uint8` reads) and cache the maps."""
        from scaleprotoseg.data.io import to_rgb_uint8
        from scaleprotoseg.data.transforms import normalize

        try:
            image = to_rgb_uint8(np.asarray(image), source=name)
        except ValueError as err:
            raise ExploreError(str(err)) from err
        H, W = image.shape[:2]
        if H * W > MAX_PIXELS:
            raise ExploreError(
                f"{name}: {H} x {W} pixels is too large; expected at most {MAX_PIXELS // 1_000_000} megapixels"
            )
        key = hashlib.sha1(image.tobytes() + repr(image.shape).encode()).hexdigest()[:16]
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        x = normalize(x, self.meta.normalization).unsqueeze(0).to(self.device)
        x = resize_image(x, self._input_size(H, W))
        out = self.model(x)
        state = ImageState(key, name, image, out.activations[0].float().cpu(), out.logits[0].float().cpu())
        self._images[key] = state
        while len(self._images) > CACHE_IMAGES:
            self._images.popitem(last=False)
        return state

    def image(self, key: str) -> ImageState:
        if key not in self._images:
            raise ExploreError(f"image {key!r} is not loaded (or no longer cached); expected to pick it again")
        return self._images[key]

    # -- answers -------------------------------------------------------------------------------------------------
    def tables_for(self, ablation: Ablation) -> DecisionTables:
        if ablation not in self._ablated:
            if len(self._ablated) > 16:
                self._ablated.clear()
            self._ablated[ablation] = self.tables.ablate(ablation)
        return self._ablated[ablation]

    def grid_logits(self, state: ImageState, ablation: Ablation = NO_ABLATION) -> torch.Tensor:
        """(C, h, w) scores from the cached activations with ``ablation`` applied."""
        return self.tables_for(ablation).logits(state.activations)

    def prediction(self, state: ImageState, ablation: Ablation = NO_ABLATION) -> np.ndarray:
        """(H, W) labels: the grid scores upsampled bilinearly to the image (as ``predict``), then the argmax."""
        if ablation not in state.predictions:
            if len(state.predictions) > 8:
                state.predictions = {k: v for k, v in state.predictions.items() if k.empty}
            logits = self.grid_logits(state, ablation)
            up = upsample_logits(logits.unsqueeze(0), state.size)[0]
            state.predictions[ablation] = up.argmax(0).numpy().astype(np.uint8)
        return state.predictions[ablation]

    def changes(self, state: ImageState, ablation: Ablation) -> dict[str, Any]:
        """Which pixels change class when ``ablation`` is applied: the mask and (from, to) counts."""
        base, new = self.prediction(state), self.prediction(state, ablation)
        changed = base != new
        names = self.meta.class_names
        pairs: dict[tuple[int, int], int] = {}
        if changed.any():
            code = base[changed].astype(np.int64) * len(names) + new[changed]
            for v, n in zip(*np.unique(code, return_counts=True)):
                pairs[(int(v) // len(names), int(v) % len(names))] = int(n)
        return {
            "mask": changed,
            "changed_pixels": int(changed.sum()),
            "fraction": float(changed.mean()),
            "transitions": [
                {"from": names[a], "to": names[b], "pixels": n}
                for (a, b), n in sorted(pairs.items(), key=lambda i: -i[1])
            ],
        }

    def cell(
        self,
        state: ImageState,
        y: int,
        x: int,
        classes: list[int] | None = None,
        ablation: Ablation = NO_ABLATION,
    ) -> dict[str, Any]:
        """The decision at the cell under pixel (y, x): scores of every class and the decomposition of the cell's
        predicted class plus ``classes``, with ``ablation`` applied."""
        r, c = state.cell_of(y, x)
        tables = self.tables_for(ablation)
        acts = state.activations[:, r, c]
        scores = tables.logits(acts)
        predicted = int(scores.argmax())
        wanted = [predicted] + [k for k in (classes or []) if k != predicted]
        out = tables.decompose(acts, wanted)
        names = self.meta.class_names
        for entry in out["classes"]:
            entry["name"] = names[entry["class"]]
        out.update(
            pixel=[y, x],
            cell=[r, c],
            grid=list(state.grid),
            predicted=predicted,
            predicted_name=names[predicted],
            pixel_class=int(self.prediction(state, ablation)[y, x]),
            ablation=ablation.to_dict(),
            prototype_activations=[float(v) for v in acts],
        )
        return out

    def prototype_map(self, state: ImageState, p: int) -> np.ndarray:
        """(h, w) activation of prototype ``p`` on the grid (Eq. 1)."""
        if not 0 <= p < self.tables.num_prototypes:
            raise ExploreError(f"prototype {p} does not exist; expected 0..{self.tables.num_prototypes - 1}")
        return state.activations[p].numpy()

    def group_map(self, state: ImageState, g: int, ablation: Ablation = NO_ABLATION) -> np.ndarray:
        """(h, w) activation of group ``g`` on the grid (Eq. 2), with ``ablation``'s renormalised weights."""
        tables = self.tables_for(ablation)
        if not tables.grouped:
            raise ExploreError("this model has no groups (ProtoSeg or stage 1): there are no group maps")
        if not 0 <= g < tables.num_groups:
            raise ExploreError(f"group {g} does not exist; this model has {tables.num_groups} groups")
        w = tables.group_weight[g]  # type: ignore[index]
        t = tables._terms(state.activations)
        return torch.exp(torch.tensordot(w, t, dims=([0], [0]))).numpy()

    def prototype_info(self, p: int) -> dict[str, Any]:
        """Class, scale, source patch (projection) and nearest training patches of prototype ``p``."""
        if not 0 <= p < self.tables.num_prototypes:
            raise ExploreError(f"prototype {p} does not exist; expected 0..{self.tables.num_prototypes - 1}")
        gallery, nearest = self.galleries()
        t = self.tables
        groups = []
        if t.grouped:
            col = t.group_weight[:, p]  # type: ignore[index]
            groups = [{"group": g, "weight": float(col[g])} for g in torch.nonzero(col > 0).flatten().tolist()]
        return {
            "prototype": p,
            "class": int(t.prototype_class[p]),
            "class_name": self.meta.class_names[int(t.prototype_class[p])],
            "scale": int(t.prototype_scale[p]),
            "groups": groups,
            "source": gallery.source(p),
            "has_patch": gallery.path(p) is not None,
            "nearest": [
                {k: e.get(k) for k in ("rank", "name", "activation", "distance", "patch", "overlay")}
                for e in nearest.patches(p)
            ],
        }


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageCatalog:
    """The images the page offers: the run's validation split (read on first use) and the files of a folder."""

    def __init__(self, cfg: Config, folder: Path | None = None) -> None:
        self.cfg, self.folder = cfg, folder
        self._dataset: Any = None
        self.problem: str | None = None

    def _split(self) -> Any:
        if self._dataset is None and self.problem is None:
            from scaleprotoseg.data.registry import build_dataset

            d = self.cfg.data
            try:
                self._dataset = build_dataset(d, d.val_split, train=False)
            except Exception as err:  # the run's data may not be on this machine: the page says so
                self.problem = f"validation split {d.val_split!r} of {d.root} is not readable ({err})"
        return self._dataset

    def entries(self) -> list[dict[str, str]]:
        out = []
        ds = self._split()
        if ds is not None:
            out += [{"source": "val", "name": ds.sample_name(i)} for i in range(len(ds))]
        if self.folder is not None:
            files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            out += [{"source": "folder", "name": p.name} for p in files]
        return out

    def read(self, source: str, name: str) -> np.ndarray:
        """The uint8 RGB image ``name`` of ``source`` (``val`` or ``folder``); only listed names are read."""
        from scaleprotoseg.data.io import read_image

        if source == "val":
            ds = self._split()
            names = [] if ds is None else [ds.sample_name(i) for i in range(len(ds))]
            if name not in names:
                raise ExploreError(f"image {name!r} is not in the validation split; expected one of the listed names")
            return ds.load_raw(names.index(name))[0]
        if source == "folder" and self.folder is not None:
            path = self.folder / name
            if Path(name).name != name or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                raise ExploreError(f"{name!r} is not an image of {self.folder}; expected one of the listed names")
            try:
                return read_image(path)
            except Exception as err:
                raise ExploreError(f"{path}: not a readable image ({err})") from err
        raise ExploreError(f"image source {source!r} is not known; expected 'val' or 'folder'")
