"""Make the ResNet ImageNet weights file the paper configs name (``weights/resnet101_imagenet.pth``).

Reads a local torchvision or DeepLab (kazuto1011/deeplab-pytorch, caffe-converted) ResNet checkpoint, renames its
keys to the backbone's own (torchvision) names, drops what is not backbone (``fc.*``, ``aspp.*``, ``fc8*``), loads the
result strictly into the DeepLabv2 ResNet to check it, and writes it (``.pth`` with ``torch.save`` or
``.safetensors``). Nothing is downloaded; the key mapping is the one of
``scaleprotoseg.models.backbones.deeplab_resnet`` (see docs/backbones.md).

    python scripts/convert_resnet101.py resnet101-63fe2227.pth weights/resnet101_imagenet.pth
    python scripts/convert_resnet101.py deeplabv2_resnet101_msc-cocostuff164k-100000.pth weights/deeplab.pth

A DeepLab caffe model expects BGR pixels in 0..255 minus the caffe mean: after converting one, train with
``--set model.backbone_options.input_transform=caffe`` (the renamed file no longer says where it came from).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from scaleprotoseg.models.backbones.deeplab_resnet import DeepLabResNet, deeplab_caffe_key_to_ours
from scaleprotoseg.models.backbones.weights import load_checked, read_state_dict

FORMATS = ("auto", "torchvision", "deeplab")
DEPTHS = (18, 50, 101)


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """``deeplab`` when the stem has DeepLab's names, ``torchvision`` when it has ``conv1.weight``."""
    if any(deeplab_caffe_key_to_ours(k) in ("conv1.weight",) for k in state):
        return "deeplab"
    if "conv1.weight" in state:
        return "torchvision"
    raise ValueError(
        "unrecognised ResNet weights; expected torchvision keys ('conv1.weight', 'layer1.0.conv1.weight', ...) or "
        f"DeepLab caffe keys ('[base.]layer1.conv1.conv.weight', ...), found e.g. {sorted(state)[:5]}"
    )


def convert_state_dict(state: Mapping[str, torch.Tensor], fmt: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """The backbone tensors of ``state`` under the backbone's (torchvision) names, and the format that was read.

    Classifier and ASPP tensors (``fc.*`` of torchvision; ``aspp.*``, ``fc*`` of DeepLab) are dropped; any other key
    that maps to no backbone weight is an error naming it.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; expected one of {', '.join(FORMATS)}")
    fmt = detect_format(state) if fmt == "auto" else fmt
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if fmt == "torchvision":
            if key.startswith("fc."):
                continue
            out[key] = value
        else:
            ours = deeplab_caffe_key_to_ours(key)
            if ours is not None:
                out[ours] = value
            elif key.removeprefix("base.").startswith(("aspp.", "fc")):
                continue
            else:
                unknown.append(key)
    if unknown:
        raise ValueError(f"DeepLab checkpoint keys that are neither backbone nor ASPP/fc: {sorted(unknown)[:10]}")
    return {k: v.detach().contiguous() for k, v in out.items()}, fmt


def check_loads(state: Mapping[str, torch.Tensor], depth: int = 101) -> None:
    """Load ``state`` strictly into the DeepLabv2 ResNet of ``depth``; a missing or extra key is a ValueError."""
    if depth not in DEPTHS:
        raise ValueError(f"--depth {depth}; expected one of {', '.join(map(str, DEPTHS))}")
    load_checked(DeepLabResNet(depth), state, source=f"the converted ResNet-{depth} weights")


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """``.safetensors`` with safetensors, anything else with ``torch.save`` (a plain dict of tensors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(dict(state), str(path))
    else:
        torch.save(dict(state), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="local torchvision or DeepLab checkpoint (.pth, .pt, .safetensors)")
    parser.add_argument(
        "output",
        type=Path,
        nargs="?",
        default=Path("weights/resnet101_imagenet.pth"),
        help="file to write (default: weights/resnet101_imagenet.pth, the paper configs' model.pretrained)",
    )
    parser.add_argument("--format", choices=FORMATS, default="auto", help="key format of the source (default: auto)")
    parser.add_argument("--depth", type=int, choices=DEPTHS, default=101, help="ResNet depth to check against")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        if args.output.exists() and not args.overwrite:
            raise ValueError(f"{args.output}: already exists; pass --overwrite to replace it")
        state, fmt = convert_state_dict(read_state_dict(args.source), args.format)
        check_loads(state, args.depth)
        save_state_dict(state, args.output)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {args.source}: {err}", file=sys.stderr)
        return 1
    print(f"{args.output}: {len(state)} ResNet-{args.depth} tensors from {fmt} keys; loads strictly")
    if fmt == "deeplab":
        print("caffe weights expect BGR 0..255 input: train with --set model.backbone_options.input_transform=caffe")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
