"""Typed configuration: dataclasses (the schema), YAML files and ``--set a.b=c`` overrides.

Unknown keys are errors that list the valid ones; values are checked against the annotated types. The method's
default stage list (paper section 3.3, supplement 6) is filled in by :func:`default_stages` when a config names no
stages, so a YAML file only states what differs from the paper's Cityscapes schedule.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

logger = logging.getLogger(__name__)

METHODS = ("scaleprotoseg", "protoseg", "deeplabv2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key, the value and what was expected."""


@dataclass
class DataConfig:
    """Where the data is and how it is read and augmented."""

    name: str = "folder"  # dataset registry name (scaleprotoseg.data)
    root: str = ""  # dataset root directory
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int = 0  # 0: taken from the dataset
    ignore_index: int = 255
    crop_size: list[int] = field(default_factory=lambda: [321, 321])  # (height, width) of training crops
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])  # random scale jitter
    flip: bool = True
    normalization: Literal["imagenet", "tf"] = "imagenet"  # tf: (x - 127) / 128
    msc_scales: list[float] = field(default_factory=list)  # multi-scale inputs with max fusion, e.g. [0.5, 0.75, 1]
    # features: max over the scales' ASPP outputs (the release, training and test); logits: max over class scores
    msc_fusion: Literal["features", "logits"] = "features"
    test_mode: Literal["whole", "sliding", "short_side", "fixed"] = "whole"
    test_size: int = 0  # short side for short_side; side of the square for fixed; window for sliding (0: crop size)
    batch_size: int = 2
    val_batch_size: int = 1
    num_workers: int = 2
    max_train_samples: int = 0  # 0: all
    max_val_samples: int = 0
    # before training: every train/val file's header (opens, size, mode) and the label values of this many masks per
    # split (spread over it; -1: all, 0: none) are checked (data.check.preflight); false skips the check
    preflight: bool = True
    preflight_labels: int = 32
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific options


@dataclass
class ModelConfig:
    """Which of the three systems, on which backbone, with which head sizes."""

    method: Literal["scaleprotoseg", "protoseg", "deeplabv2"] = "scaleprotoseg"
    backbone: str = "resnet101"
    pretrained: str | None = None  # None, a state-dict path, or "package" (weights from an installed package)
    output_stride: int = 8
    freeze_bn: bool = True
    bn_momentum: float = 0.0  # 0: library default; EfficientNet-Lite0 trains best with a higher value (e.g. 0.01)
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    aspp_channels: int = 64  # D: prototype dimension (per scale for ScaleProtoSeg)
    aspp_init_std: float = 0.01  # std of the ASPP weights at initialisation (DeepLabv2: 0.01)
    prototypes_per_class: int = 3  # per scale for ScaleProtoSeg (M), in total for ProtoSeg
    groups_per_class: int = 3  # N_c
    group_activation: Literal["ratio", "geometric"] = "ratio"  # see grouping.py
    activation_eps: float = 1e-4  # epsilon of Eq. 1
    backbone_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """Loss weights (Eqs. 7 and 9)."""

    ce: float = 1.0
    diversity: float = 0.25  # lambda_J
    l1_proto: float = 1e-4  # off-class L1 on h_proto
    entropy: float = 0.05  # lambda_ent
    l1_group: float = 1e-3  # off-class L1 on h_group (lambda_L1 of Eq. 9)
    jeffreys: Literal["half", "full"] = "half"  # half: 0.5 (KL(p||q) + KL(q||p)), the release; full: Eq. 4 as written
    msc_all_scales: bool = True  # multi-scale inputs: CE and diversity averaged over every scale's and the fused output
    # features: labels downsampled to the feature grid (the paper); labels: logits up-sampled to the label size
    ce_resolution: Literal["features", "labels"] = "features"


# The loss terms a stage may name: every weight of LossConfig (its float fields) is one term of Eqs. 7 and 9.
LOSS_TERMS = tuple(f.name for f in dataclasses.fields(LossConfig) if f.type in ("float", float))


# The stage kinds (each one function of scaleprotoseg.engine.stages). Gradient stages: train (the groups named in
# ``trainable``) and proto_finetune (h_proto alone, after projection: the release's stage-1 last-layer fine-tuning).
StageKind = Literal["train", "proto_finetune", "projection", "pruning", "threshold"]
STAGE_KINDS: tuple[str, ...] = typing.get_args(StageKind)
GRADIENT_KINDS = ("train", "proto_finetune")


@dataclass
class StageConfig:
    """One step of the multi-stage procedure."""

    kind: StageKind = "train"
    steps: int = 0  # optimizer steps (train stages)
    trainable: list[str] = field(default_factory=list)  # parameter groups: backbone, aspp, prototypes, ...
    lr: dict[str, float] = field(default_factory=dict)  # learning rate per parameter group
    schedule: Literal["constant", "poly"] = "constant"
    power: float = 0.9
    accumulation: int = 1  # gradient accumulation (effective batch = batch_size * accumulation)
    optimizer: Literal["adam", "sgd"] = "adam"  # adam: the prototype methods (supplement 6); sgd: DeepLabv2's recipe
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4  # on convolution kernels (backbone, ASPP), and their biases when bias_decay
    bias_decay: bool = True  # decay convolution biases too (the release decays the ASPP biases; DeepLabv2: false)
    bias_lr_factor: float = 1.0  # convolution biases learn at this multiple of their group's rate (DeepLabv2: 2)
    losses: list[str] = field(default_factory=list)  # loss terms; empty: the method's default for this stage
    alpha: float = 0.05  # threshold stage: group weights below alpha are zeroed
    prune_k: int = 6  # pruning stage: nearest patches inspected
    prune_threshold: int = 3  # pruning stage: prune when fewer than this many of the k are of the class
    groups: bool = False  # the stage works on the grouped head (stage 2): groups are added first if missing
    enabled: bool = True


@dataclass
class TrainConfig:
    """The run as a whole."""

    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA only
    stages: dict[str, StageConfig] = field(default_factory=dict)  # ordered; empty: default_stages(method)
    log_every: int = 10
    val_every: int = 0  # optimizer steps between validations (0: at the end of each train stage only)
    checkpoint_every: int = 200  # optimizer steps between mid-stage checkpoints
    tensorboard: bool = False
    deterministic: bool = True


@dataclass
class Config:
    """The whole configuration of a run."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------------------------
# Default schedules (the Cityscapes schedule of docs/paper-map.md, "Numbers the paper leaves out")


def _prototype_stages() -> dict[str, StageConfig]:
    """Stage 1 shared by ProtoSeg and ScaleProtoSeg: warm-up (ASPP + prototypes), joint (+ backbone), projection."""
    S = StageConfig
    return {
        "warmup": S(
            steps=3000,
            trainable=["aspp", "prototypes"],
            lr={"aspp": 2.5e-4, "prototypes": 2.5e-4},
            accumulation=5,
            losses=["ce", "diversity", "l1_proto"],
        ),
        "joint": S(
            steps=30000,
            trainable=["backbone", "aspp", "prototypes"],
            lr={"backbone": 2.5e-5, "aspp": 2.5e-4, "prototypes": 2.5e-4},
            schedule="poly",
            accumulation=5,
            losses=["ce", "diversity", "l1_proto"],
        ),
        "projection": S(kind="projection"),
    }


def _proto_finetune_stage() -> StageConfig:
    """The release's stage-1 last-layer fine-tuning after projection (off by default; the paper configs turn it on
    with their dataset's steps). The learning rate is ProtoSeg's fine-tuning rate."""
    return StageConfig(
        kind="proto_finetune",
        steps=2000,
        trainable=["last_layer"],
        lr={"last_layer": 1e-5},
        accumulation=5,
        losses=["ce", "diversity", "l1_proto"],
        enabled=False,
    )


def default_stages(method: str) -> dict[str, StageConfig]:
    """The paper's stage list for ``method`` with the Cityscapes step counts and learning rates."""
    S = StageConfig
    if method == "scaleprotoseg":
        return {
            **_prototype_stages(),
            "proto_finetune": _proto_finetune_stage(),
            "group_warmup": S(
                steps=2000,
                groups=True,
                trainable=["groups"],
                lr={"groups": 2.5e-4},
                accumulation=5,
                losses=["ce", "entropy", "l1_group"],
            ),
            "group_joint": S(
                steps=30000,
                groups=True,
                trainable=["groups", "last_layer"],
                lr={"groups": 2.5e-4, "last_layer": 2.5e-4},
                schedule="poly",
                accumulation=5,
                losses=["ce", "entropy", "l1_group"],
            ),
            "threshold": S(kind="threshold", alpha=0.05),
        }
    if method == "protoseg":
        return {
            **_prototype_stages(),
            "pruning": S(kind="pruning", prune_k=6, prune_threshold=3),
            "finetune": S(
                steps=2000,
                trainable=["last_layer"],
                lr={"last_layer": 1e-5},
                accumulation=5,
                losses=["ce", "diversity", "l1_proto"],
            ),
        }
    if method == "deeplabv2":
        # DeepLabv2's own recipe (Chen et al. 2017; kazuto1011/deeplab-pytorch): SGD, momentum 0.9, poly 0.9, base
        # rate 2.5e-4 with the classifier (ASPP) at 10x and its biases at 20x without weight decay, batch norm frozen.
        return {
            "train": S(
                steps=30000,
                trainable=["backbone", "aspp"],
                lr={"backbone": 2.5e-4, "aspp": 2.5e-3},
                schedule="poly",
                accumulation=5,
                losses=["ce"],
                optimizer="sgd",
                momentum=0.9,
                weight_decay=5e-4,
                bias_decay=False,
                bias_lr_factor=2.0,
            ),
        }
    raise ConfigError(f"model.method: unknown method {method!r}; expected one of {', '.join(METHODS)}")


# ----------------------------------------------------------------------------------------------------------------
# Typed conversion from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not valid; expected one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the list of valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {full!r}; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if cls is TrainConfig and key == "stages":
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of stage name to stage settings, got {value!r}")
            kwargs[key] = {str(k): from_dict(StageConfig, v or {}, f"{full}.{k}") for k, v in value.items()}
            continue
        kwargs[key] = _convert(value, tp, full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config (for YAML)."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Overrides and files


_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the numbers of YAML 1.2 (core schema): ``1e-4`` and ``1E5`` are floats (YAML 1.1
    reads a float without a dot as a string), ``010`` is ten and ``0o10`` eight, ``1:30`` is a string, not 90.
    Booleans, null and everything else are read as by :class:`yaml.SafeLoader`."""

    # fresh lists: add_implicit_resolver would append to the lists SafeLoader shares with every other loader
    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_FLOAT_TAG, _INT_TAG)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_INT_12 = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_12 = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


YamlLoader.add_implicit_resolver(_INT_TAG, _INT_12, list("-+0123456789"))
YamlLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_12, list("-+0123456789."))
YamlLoader.add_constructor(_INT_TAG, _construct_int)


def yaml_load(text: str) -> Any:
    """Parse YAML text with :class:`YamlLoader` (YAML 1.2 numbers); config files and ``--set`` values use it."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def _parse_scalar(text: str) -> Any:
    return yaml_load(text) if text != "" else ""


# Config values that are paths; a relative one is read against the file that states it (see resolve_paths).
PATH_KEYS = ("data.root", "model.pretrained")
_PATH_WORDS = {"model.pretrained": ("package",)}  # values of a path key that are not paths


def _absolute(path: Path) -> str:
    return os.path.normpath(os.path.abspath(path))


def resolve_paths(data: dict[str, Any], config_file: str | Path | None) -> dict[str, Any]:
    """Make the relative paths of :data:`PATH_KEYS` in ``data`` (one file's mapping, or ``--set`` values when
    ``config_file`` is None) absolute, in place: the path beside ``config_file`` when it exists, else the one in the
    current directory when it exists (configs written for the repository root, e.g. ``configs/samples``). When
    neither exists the value stays as written (the current directory's) and a warning names both places; a
    ``--set`` value is read against the current directory. Returns ``data``."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        node = data.get(section)
        value = node.get(name) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value or value in _PATH_WORDS.get(key, ()) or Path(value).is_absolute():
            continue
        here = Path.cwd() / value
        if config_file is None:
            node[name] = _absolute(here)
            continue
        beside = Path(config_file).parent / value
        found = next((p for p in (beside, here) if p.exists()), None)
        if found is not None:
            node[name] = _absolute(found)
        else:
            logger.warning(
                "%s: %s %r exists neither beside the config file (%s) nor in the current directory (%s); "
                "expected one of them (the current directory's is used)",
                config_file,
                key,
                value,
                _absolute(beside),
                _absolute(here),
            )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML 1.2) to a plain mapping; returns a new mapping. A
    relative path of :data:`PATH_KEYS` is made absolute against the current directory (where it was typed)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = _parse_scalar(raw)
        except yaml.YAMLError as err:
            problem = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({problem}); expected e.g. 3, 0.1, [1, 2]"
            ) from None
        if len(parts) == 2 and ".".join(parts) in PATH_KEYS:
            node.update(resolve_paths({parts[0]: {parts[1]: node[parts[1]]}}, None)[parts[0]])
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def find_base(path: Path, base: Any) -> Path:
    """The file ``base: <base>`` of config ``path`` names: beside ``path``, else as :func:`resolve_config_path` finds
    it (the current directory; ``configs/...`` also in the configs the package ships, so a copied config can extend
    a shipped one from anywhere)."""
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: {base!r}; expected the file name of the config this one extends")
    beside = path.parent / base
    if beside.is_file():
        return beside.resolve()
    found = resolve_config_path(base)
    if found.is_file():
        return found.resolve()
    raise FileNotFoundError(
        f"{path}: base {base!r} exists neither beside it ({_absolute(beside)}) nor in the current directory "
        f"({_absolute(Path(base))}); expected the config it extends (a shipped one: base: configs/samples/NAME.yaml)"
    )


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config; a top-level ``base: other.yaml`` (:func:`find_base`) is merged underneath."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: byte {err.start} is not UTF-8 text ({err.reason}); expected a UTF-8 YAML file"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    resolve_paths(data, path)
    base = data.pop("base", None)
    if base is not None:
        base_path = find_base(path, base)
        if base_path in seen:
            raise ConfigError(f"{path}: circular base {base_path}")
        data = _merge(_read_yaml(base_path, (*seen, base_path)), data)
    return data


def build_config(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain mapping into a :class:`Config` and fill in the method's default stages."""
    try:
        cfg = from_dict(Config, data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    defaults = default_stages(cfg.model.method)
    raw_stages = (data.get("train") or {}).get("stages") or {}
    if raw_stages:
        # Stages named in the file override the defaults field by field; unnamed defaults keep their values. A stage
        # the method does not have is a typo unless it says its ``kind`` (a user's own extra stage).
        stages: dict[str, StageConfig] = {}
        for name, raw in raw_stages.items():
            if name not in defaults and not (isinstance(raw, dict) and "kind" in raw):
                raise ConfigError(
                    f"{source}: train.stages.{name}: {cfg.model.method} has no stage {name!r}; its stages are "
                    f"{', '.join(defaults)} (a new stage must set its kind)"
                )
        for name in list(defaults) + [k for k in raw_stages if k not in defaults]:
            base = to_dict(defaults[name]) if name in defaults else {}
            merged = _merge(base, raw_stages.get(name) or {})
            stages[name] = from_dict(StageConfig, merged, f"train.stages.{name}")
        cfg.train.stages = stages
    else:
        cfg.train.stages = defaults
    validate(cfg, source)
    return cfg


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it exists; else a relative ``configs/...`` path is looked up in the copy of ``configs/``
    that the installed package ships (``scaleprotoseg/configs``), so the shipped configs work from any directory."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] != "configs":
        return path
    shipped = Path(__file__).parent.joinpath(*path.parts)
    return shipped if shipped.is_file() else path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply ``--set`` overrides; a missing
    ``configs/...`` path falls back to the shipped configs (:func:`resolve_config_path`)."""
    data = _read_yaml(resolve_config_path(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return build_config(data, str(path) if path else "config")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_changes(old: Config, new: Config) -> dict[str, list[Any]]:
    """``{"a.b.c": [old value, new value]}`` for every leaf value that differs between two configs."""

    def leaves(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out

    a, b = leaves(to_dict(old)), leaves(to_dict(new))
    return {k: [a.get(k), b.get(k)] for k in list(a) + [k for k in b if k not in a] if a.get(k) != b.get(k)}


TRAINABLE_GROUPS = ("backbone", "aspp", "prototypes", "groups", "last_layer")
# output strides each backbone supports (others: 8, 16, 32; the U-Net keeps full resolution)
_OUTPUT_STRIDES = {"efficientnet_lite0": (4, 8, 16, 32), "efficientnet_lite0/unet": (1, 2, 4, 8)}


def validate(cfg: Config, source: str = "config") -> None:
    """Semantic checks that a type check cannot make; each error names the key and the expected value."""

    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    for key, value, ok, expected in _numeric_ranges(cfg):
        if not ok(value):
            fail(f"{key}: {value!r} is out of range; expected {expected}")
    m, d = cfg.model, cfg.data
    if m.backbone == "unet" and m.output_stride != 1:
        fail(f"model.output_stride: {m.output_stride}; the U-Net keeps full resolution, expected 1")
    elif m.backbone != "unet":
        variant = f"{m.backbone}/{m.backbone_options.get('features')}"
        allowed = _OUTPUT_STRIDES.get(variant, _OUTPUT_STRIDES.get(m.backbone, (8, 16, 32)))
        if m.output_stride not in allowed:
            which = variant if variant in _OUTPUT_STRIDES else m.backbone
            fail(f"model.output_stride: {m.output_stride} is not supported by {which}; expected one of {list(allowed)}")
    if not m.aspp_rates:
        fail("model.aspp_rates: expected at least one atrous rate")
    if m.aspp_channels <= 0 or m.prototypes_per_class <= 0 or m.groups_per_class <= 0:
        fail("model.aspp_channels, prototypes_per_class and groups_per_class must be positive")
    if len(d.crop_size) != 2 or min(d.crop_size) <= 0:
        fail(f"data.crop_size: {d.crop_size} is not valid; expected [height, width] with positive values")
    if len(d.scale_range) != 2 or not 0 < d.scale_range[0] <= d.scale_range[1]:
        fail(f"data.scale_range: {d.scale_range} is not valid; expected [low, high] with 0 < low <= high")
    if d.batch_size <= 0:
        fail(f"data.batch_size: {d.batch_size} is not valid; expected a positive integer")
    if d.test_mode in ("short_side", "fixed") and d.test_size <= 0:
        fail(f"data.test_size: {d.test_size} with test_mode {d.test_mode!r}; expected the positive size to resize to")
    if any(s <= 0 for s in d.msc_scales):
        fail(f"data.msc_scales: {d.msc_scales} is not valid; expected positive scale factors")
    for name, st in cfg.train.stages.items():
        for g in st.trainable:
            if g not in TRAINABLE_GROUPS:
                fail(
                    f"train.stages.{name}.trainable: unknown group {g!r}; expected any of {', '.join(TRAINABLE_GROUPS)}"
                )
        for term in st.losses:
            if term not in LOSS_TERMS:
                fail(f"train.stages.{name}.losses: unknown loss {term!r}; expected any of {', '.join(LOSS_TERMS)}")
        for g in st.lr:
            if g not in TRAINABLE_GROUPS:
                fail(f"train.stages.{name}.lr: unknown group {g!r}; expected any of {', '.join(TRAINABLE_GROUPS)}")
        if st.kind == "proto_finetune" and st.trainable != ["last_layer"]:
            fail(f"train.stages.{name}.trainable: {st.trainable}; a proto_finetune stage trains ['last_layer'] only")
        missing = [g for g in st.trainable if g not in st.lr]
        gradient = st.kind in GRADIENT_KINDS and st.enabled
        if gradient and missing:
            fail(f"train.stages.{name}.lr: no learning rate for trainable group(s) {', '.join(missing)}")
        if gradient and st.steps <= 0:
            fail(f"train.stages.{name}.steps: {st.steps} is not valid; expected a positive number of steps")
        needs_groups = [t for t in ("groups", "entropy", "l1_group") if t in st.trainable or t in st.losses]
        if st.enabled and needs_groups and not st.groups:
            fail(f"train.stages.{name}.groups: false, but the stage uses {', '.join(needs_groups)}; expected true")
        if st.enabled and st.groups and (m.method != "scaleprotoseg" or st.kind != "train"):
            fail(f"train.stages.{name}.groups: true needs a train stage of a scaleprotoseg model")
        if st.optimizer == "sgd" and not 0 <= st.momentum < 1:
            fail(f"train.stages.{name}.momentum: {st.momentum}; expected 0 <= momentum < 1")
        if st.bias_lr_factor <= 0:
            fail(f"train.stages.{name}.bias_lr_factor: {st.bias_lr_factor}; expected a positive factor")
        if st.accumulation <= 0:
            fail(f"train.stages.{name}.accumulation: {st.accumulation}; expected a positive integer")
        if not 0 <= st.alpha < 1:
            fail(f"train.stages.{name}.alpha: {st.alpha}; expected 0 <= alpha < 1")
    order = [(n, st) for n, st in cfg.train.stages.items() if st.enabled]
    for i, (name, st) in enumerate(order):
        if st.kind != "proto_finetune":
            continue
        if m.method == "deeplabv2" or not any(s.kind == "projection" for _, s in order[:i]):
            fail(f"train.stages.{name}: a proto_finetune stage fine-tunes h_proto after a projection stage")
        if any(s.groups for _, s in order[:i]):
            fail(f"train.stages.{name}: a proto_finetune stage must come before the group stages")


def _finite(v: float) -> bool:
    return math.isfinite(v)


_POSITIVE = (lambda v: _finite(v) and v > 0, "a finite number > 0")
_NON_NEGATIVE = (lambda v: _finite(v) and v >= 0, "a finite number >= 0")
_POSITIVE_INT = (lambda v: v >= 1, "an integer >= 1")
_COUNT = (lambda v: v >= 0, "an integer >= 0")
_PROBABILITY = (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]")


def _numeric_ranges(cfg: Config) -> list[tuple[str, Any, Any, str]]:
    """``(key, value, predicate, expected)`` for every numeric field of ``cfg``: the range each one must lie in."""
    d, m, lo, t = cfg.data, cfg.model, cfg.loss, cfg.train
    rows: list[tuple[str, Any, Any, str]] = [
        ("data.num_classes", d.num_classes, *_COUNT),
        (
            "data.ignore_index",
            d.ignore_index,
            lambda v: v >= 0 and not 0 <= v < d.num_classes,
            f"an integer >= 0 outside the class indices 0..{d.num_classes - 1} (usually 255)"
            if d.num_classes
            else "an integer >= 0 (usually 255)",
        ),
        ("data.test_size", d.test_size, *_COUNT),
        ("data.batch_size", d.batch_size, *_POSITIVE_INT),
        ("data.val_batch_size", d.val_batch_size, *_POSITIVE_INT),
        ("data.num_workers", d.num_workers, *_COUNT),
        ("data.max_train_samples", d.max_train_samples, lambda v: v >= 0, "an integer >= 0 (0: all)"),
        ("data.max_val_samples", d.max_val_samples, lambda v: v >= 0, "an integer >= 0 (0: all)"),
        ("data.preflight_labels", d.preflight_labels, lambda v: v >= -1, "an integer >= -1 (-1: all, 0: none)"),
        ("model.bn_momentum", m.bn_momentum, *_PROBABILITY),
        ("model.aspp_init_std", m.aspp_init_std, *_NON_NEGATIVE),
        ("model.activation_eps", m.activation_eps, *_POSITIVE),
        ("train.seed", t.seed, *_COUNT),
        ("train.log_every", t.log_every, *_COUNT),
        ("train.val_every", t.val_every, *_COUNT),
        ("train.checkpoint_every", t.checkpoint_every, *_COUNT),
    ]
    rows += [(f"data.crop_size[{i}]", v, *_POSITIVE_INT) for i, v in enumerate(d.crop_size)]
    rows += [(f"data.scale_range[{i}]", v, *_POSITIVE) for i, v in enumerate(d.scale_range)]
    rows += [(f"data.msc_scales[{i}]", v, *_POSITIVE) for i, v in enumerate(d.msc_scales)]
    rows += [(f"model.aspp_rates[{i}]", v, *_POSITIVE_INT) for i, v in enumerate(m.aspp_rates)]
    rows += [(f"loss.{name}", getattr(lo, name), *_NON_NEGATIVE) for name in LOSS_TERMS]
    for name, st in t.stages.items():
        k = f"train.stages.{name}"
        rows += [
            (f"{k}.steps", st.steps, *_COUNT),
            (f"{k}.power", st.power, *_NON_NEGATIVE),
            (f"{k}.accumulation", st.accumulation, *_POSITIVE_INT),
            (f"{k}.weight_decay", st.weight_decay, *_NON_NEGATIVE),
            (f"{k}.alpha", st.alpha, lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
            (f"{k}.prune_k", st.prune_k, *_POSITIVE_INT),
            (f"{k}.prune_threshold", st.prune_threshold, *_COUNT),
        ]
        rows += [(f"{k}.lr.{g}", v, *_POSITIVE) for g, v in st.lr.items()]
    return rows
