"""Shareable models: a directory in the Hugging Face Hub layout, written from a run and loaded back offline.

``save_pretrained(run_or_checkpoint, directory)`` writes

- ``model.safetensors``: the weights, as in a checkpoint;
- ``config.json``: ``{"format", "library_name", "meta", "config"}``: the checkpoint metadata
  (:class:`~scaleprotoseg.checkpoint.CheckpointMeta`: classes, palette, head structure) and the run's full config;
- ``README.md``: a model card (classes, the run's evaluation results, method, backbone, citation of the paper);
- ``prototypes/``: the projected prototype patches of the run's ``final/`` checkpoint when it has them.

``from_pretrained(directory)`` rebuilds the model from those files alone (no pretrained backbone files, no network).
Only when ``source`` is not an existing path, has the form ``owner/name`` of a Hub repository id and ``huggingface_hub``
is installed (extra ``hub``) does it download that repository first; :func:`upload` pushes a directory to the Hub.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from scaleprotoseg import __version__
from scaleprotoseg.checkpoint import CheckpointMeta, LoadedCheckpoint, load_model, load_weights
from scaleprotoseg.config import Config, build_config, to_dict
from scaleprotoseg.models.segmenter import Segmenter, build_model
from scaleprotoseg.rundir import FINAL, RunDir, fresh_dir, replace_dir

PRETRAINED_FORMAT = "scaleprotoseg-pretrained/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
GALLERY = "prototypes"
CARD_GALLERY_IMAGES = 12  # prototype patches shown in the model card (all are copied)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

CITATION = """@misc{porta_scaleprotoseg,
  title  = {Multi-Scale Grouped Prototypes for Interpretable Semantic Segmentation},
  author = {Porta, Hugo and Dalsasso, Emanuele and Marcos, Diego and Tuia, Devis},
  note   = {Code: https://github.com/eceo-epfl/ScaleProtoSeg}
}"""  # what the paper's first page states; add the venue and year of the version you cite

METHOD_TEXT = {
    "scaleprotoseg": "ScaleProtoSeg: prototypes learned per scale of a concatenated ASPP (Eq. 1), combined by "
    "class-wise sparse groups (Eq. 2) before the last layer.",
    "protoseg": "ProtoSeg: prototypes on a summed ASPP (Eq. 1), linked to the classes by the last layer.",
    "deeplabv2": "DeepLabv2: the non-interpretable baseline (ASPP straight to class scores).",
}


@dataclass
class Pretrained:
    """What :func:`from_pretrained` returns: the model (eval mode), its config and metadata, and the directory."""

    model: Segmenter
    config: Config
    meta: CheckpointMeta
    directory: Path


def save_pretrained(
    source: str | Path | RunDir | LoadedCheckpoint, directory: str | Path, *, stage: str | None = None
) -> Path:
    """Write a run's model (``final/``, or ``stage``'s checkpoint) or a :class:`LoadedCheckpoint` to ``directory``
    in the Hub layout (module docstring); the directory is replaced as a whole. Returns it."""
    run: RunDir | None = None
    if isinstance(source, LoadedCheckpoint):
        loaded = source
    else:
        run = source if isinstance(source, RunDir) else RunDir(source)
        loaded = load_model(run, stage, "cpu")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(directory.parent, f".{directory.name}.tmp")
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in loaded.model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = {
            "format": PRETRAINED_FORMAT,
            "library_name": "scaleprotoseg",
            "scaleprotoseg_version": __version__,
            "meta": loaded.meta.to_dict(),
            "config": to_dict(loaded.config),
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        gallery = loaded.directory / GALLERY
        images: list[str] = []
        if gallery.is_dir():
            shutil.copytree(gallery, tmp / GALLERY)
            images = sorted(p.name for p in (tmp / GALLERY).glob("*.png"))
        metrics = read_eval_results(run, loaded.meta.stage) if run is not None else {}
        (tmp / CARD).write_text(model_card(loaded, metrics, images))
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_eval_results(run: RunDir, stage: str | None) -> dict[str, dict[str, Any]]:
    """``metrics.json`` of each ``eval/<stage>-<split>/`` of the run (``final`` for the final model), by split."""
    prefix = f"{stage or FINAL}-"
    found: dict[str, dict[str, Any]] = {}
    if not run.eval.is_dir():
        return found
    for path in sorted(run.eval.glob(f"{prefix}*/metrics.json")):
        try:
            found[path.parent.name[len(prefix) :]] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a half-written or foreign file is not a result
    return found


def _pct(value: Any) -> str:
    return "n/a" if not isinstance(value, int | float) else f"{100 * float(value):.2f}"


def model_card(loaded: LoadedCheckpoint, metrics: dict[str, dict[str, Any]], images: list[str]) -> str:
    """The ``README.md`` of a shared model: Hub metadata header, method, backbone, classes, results, citation."""
    cfg, meta = loaded.config, loaded.meta
    head = meta.structure
    lines = [
        "---",
        "library_name: scaleprotoseg",
        "pipeline_tag: image-segmentation",
        "tags:",
        "- image-segmentation",
        "- interpretability",
        "- prototypes",
        f"- {meta.method}",
        "---",
        "",
        f"# {meta.method} ({cfg.model.backbone}) on {cfg.data.name}",
        "",
        METHOD_TEXT.get(meta.method, meta.method),
        "",
        "| | |",
        "|---|---|",
        f"| method | {meta.method} |",
        f"| backbone | {cfg.model.backbone} (output stride {meta.output_stride}) |",
        f"| checkpoint | {meta.stage or FINAL} |",
        f"| input | RGB, normalised ({meta.normalization}) |",
    ]
    if "prototype_class" in head:
        lines.append(f"| prototypes | {len(head['prototype_class'])} |")
    if head.get("grouped"):
        lines.append(f"| groups | {len(head.get('group_class', []))} |")
    lines += ["", "## Classes", "", "| index | class | colour |", "|---|---|---|"]
    for i, (name, colour) in enumerate(zip(meta.class_names, meta.palette)):
        lines.append(f"| {i} | {name} | rgb({', '.join(str(int(c)) for c in colour)}) |")
    lines += ["", "## Results", ""]
    if metrics:
        lines += ["| split | mIoU (%) | pixel accuracy (%) | mean accuracy (%) |", "|---|---|---|---|"]
        for split, m in metrics.items():
            values = [_pct(m.get(k)) for k in ("miou", "pixel_accuracy", "mean_accuracy")]
            lines.append(f"| {split} | {' | '.join(values)} |")
    else:
        lines.append("No evaluation results were found in the run (`scaleprotoseg evaluate RUN` writes them).")
    if images:
        lines += ["", "## Prototypes", "", f"Projected prototype patches (`{GALLERY}/`, {len(images)} in all):", ""]
        lines.append(" ".join(f"![{Path(n).stem}]({GALLERY}/{n})" for n in images[:CARD_GALLERY_IMAGES]))
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from scaleprotoseg.pretrained import from_pretrained",
        "",
        'loaded = from_pretrained("path/to/this/directory")  # offline; a Hub repo id needs huggingface_hub',
        "logits = loaded.model.logits(images)  # (B, C, H / stride, W / stride) for normalised (B, 3, H, W)",
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def _resolve(source: str | Path) -> Path:
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file; expected a directory written by save_pretrained")
        return path
    if isinstance(source, str) and REPO_ID.match(source):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise FileNotFoundError(
                f"{source} is not a local directory; to read it as a Hub repository id, "
                "pip install 'scaleprotoseg[hub]'"
            ) from None
        return Path(snapshot_download(repo_id=source))
    raise FileNotFoundError(f"pretrained model directory {path} does not exist")


def from_pretrained(source: str | Path, device: torch.device | str = "cpu") -> Pretrained:
    """Load a model saved by :func:`save_pretrained` from a local directory (see the module docstring for repo ids),
    on ``device``, in eval mode."""
    directory = _resolve(source)
    config_path = directory / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; expected a directory written by save_pretrained")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not JSON ({err})") from err
    found = data.get("format") if isinstance(data, dict) else None
    if found != PRETRAINED_FORMAT:
        raise ValueError(f"{config_path}: format {found!r}; expected {PRETRAINED_FORMAT!r}")
    meta = CheckpointMeta.from_dict(data.get("meta", {}), config_path)
    cfg = build_config(data.get("config", {}), str(config_path))
    cfg.model.pretrained = None  # the weights are stored: never look for backbone files
    weights_path = directory / WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    try:
        weights = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from err
    model = build_model(cfg.model, meta.num_classes)
    model.apply_structure(meta.structure)
    load_weights(model, weights, str(weights_path))
    model.refresh_layout()
    model.to(torch.device(device)).eval()
    return Pretrained(model, cfg, meta, directory)


def upload(directory: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Push a :func:`save_pretrained` directory to the Hub repository ``repo_id`` (needs ``huggingface_hub`` and a
    login); returns the commit URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError as err:
        raise RuntimeError("uploading needs huggingface_hub; pip install 'scaleprotoseg[hub]'") from err
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(folder_path=str(directory), repo_id=repo_id))
