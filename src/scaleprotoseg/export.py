"""Export a trained model to a file another runtime can run: ONNX, TorchScript or a ``torch.export`` program.

The exported graph is the model's plain forward pass (:meth:`Segmenter.forward`) at one fixed input size, returning
a tuple of the outputs asked for, in the order of :data:`OUTPUTS`:

- ``logits`` (B, C, h, w): class scores on the feature grid, h = H / output stride (as :meth:`Segmenter.logits`;
  upsample them bilinearly to the image size for a label map, as :mod:`scaleprotoseg.evaluation.inference` does);
- ``prototypes`` (B, P, h, w): prototype activations (Eq. 1), prototype heads only;
- ``groups`` (B, G, h, w): group activations (Eq. 2), grouped ScaleProtoSeg heads only.

The input is a normalised image batch (B, 3, H, W) (the run's ``normalization``, stored with the file). Every format
carries the metadata of :func:`export_metadata` (class names, palette, normalisation, output stride, outputs): ONNX as
model properties, TorchScript and exported programs as an ``extra_files`` entry ``scaleprotoseg.json``.

ONNX goes through ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter; it needs
``onnxscript``), and :func:`verify_export` runs the file with ``onnxruntime`` when it is installed (extra ``export``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scaleprotoseg import __version__
from scaleprotoseg.checkpoint import CheckpointMeta, load_model
from scaleprotoseg.models.heads import PrototypeHead
from scaleprotoseg.models.segmenter import Segmenter, unwrap

FORMATS = ("onnx", "torchscript", "exported-program")
OUTPUTS = ("logits", "prototypes", "groups")
METADATA_FILE = "scaleprotoseg.json"  # the extra file of TorchScript and exported-program files
ONNX_OPSET = 18


class RuntimeMissing(RuntimeError):
    """An optional package an export format needs (onnx, onnxscript, onnxruntime) is not installed."""


class ExportModule(nn.Module):
    """``forward(x (B, 3, H, W)) -> tuple`` of the named ``outputs`` of ``model`` (see :data:`OUTPUTS`), tensors
    only, so that every exporter can trace it."""

    def __init__(self, model: Segmenter, outputs: Sequence[str] = ("logits",)) -> None:
        super().__init__()
        self.model = unwrap(model)
        self.outputs = check_outputs(self.model, outputs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        maps = {"logits": out.logits, "prototypes": out.activations, "groups": out.group_activations}
        return tuple(maps[name] for name in self.outputs)  # type: ignore[misc]  # check_outputs: none is None


def check_outputs(model: Segmenter, outputs: Sequence[str]) -> tuple[str, ...]:
    """The requested outputs in :data:`OUTPUTS` order, or a one-line error naming what the model cannot give."""
    wanted = [str(o).strip() for o in outputs if str(o).strip()]
    unknown = [o for o in wanted if o not in OUTPUTS]
    if unknown or not wanted:
        raise ValueError(f"export outputs {','.join(wanted) or '(none)'}; expected some of {','.join(OUTPUTS)}")
    head = model.head
    if "prototypes" in wanted and not isinstance(head, PrototypeHead):
        raise ValueError(f"export output 'prototypes': a {model.method} model has no prototypes")
    if "groups" in wanted and not (isinstance(head, PrototypeHead) and head.grouped):
        raise ValueError(f"export output 'groups': the {model.method} model has no groups (only grouped ScaleProtoSeg)")
    return tuple(o for o in OUTPUTS if o in wanted)


def export_metadata(meta: CheckpointMeta, outputs: Sequence[str], size: tuple[int, int]) -> dict[str, Any]:
    """What a consumer of the file needs besides the graph: classes, colours, input normalisation and shapes."""
    return {
        "format": "scaleprotoseg-export/1",
        "scaleprotoseg_version": __version__,
        "method": meta.method,
        "stage": meta.stage,
        "class_names": list(meta.class_names),
        "palette": np.asarray(meta.palette).reshape(-1, 3).tolist(),
        "ignore_index": int(meta.ignore_index),
        "normalization": meta.normalization,
        "output_stride": int(meta.output_stride),
        "input": {"name": "image", "shape": [1, 3, int(size[0]), int(size[1])], "layout": "NCHW, normalised"},
        "outputs": list(outputs),
    }


def export_model(
    model: Segmenter,
    path: str | Path,
    fmt: str,
    *,
    outputs: Sequence[str] = ("logits",),
    size: tuple[int, int] = (512, 512),
    metadata: dict[str, Any] | None = None,
) -> ExportModule:
    """Write ``model`` (put in eval mode) as ``fmt`` (one of :data:`FORMATS`) to ``path`` for inputs of ``size``
    (H, W); returns the traced :class:`ExportModule` (what the file must agree with)."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    H, W = (int(s) for s in size)
    if H <= 0 or W <= 0:
        raise ValueError(f"export size {H} {W}; expected a positive height and width")
    module = ExportModule(model, outputs).eval()
    param = next(module.parameters())
    example = torch.zeros(1, 3, H, W, dtype=param.dtype, device=param.device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {METADATA_FILE: json.dumps(metadata or {}, indent=2)}
    if fmt == "onnx":
        _export_onnx(module, example, path, metadata or {})
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            # shapes and the prototype layout are constants of the trace, as intended for one input size
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(module, (example,))
        torch.jit.save(traced, str(path), _extra_files=extra)
    else:
        program = torch.export.export(module, (example,))
        torch.export.save(program, str(path), extra_files=extra)
    return module


def _export_onnx(module: ExportModule, example: torch.Tensor, path: Path, metadata: dict[str, Any]) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  # the exporter needs it; fail here with the install hint
    except ImportError as err:
        raise RuntimeMissing(
            f"ONNX export needs onnx and onnxscript ({err}); pip install 'scaleprotoseg[export]'"
        ) from err
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=True,
        external_data=False,  # one file (ONNX protobufs hold up to 2 GB)
        opset_version=ONNX_OPSET,
        input_names=["image"],
        output_names=list(module.outputs),
        verbose=False,
    )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"scaleprotoseg": json.dumps(metadata)})
    onnx.save(proto, str(path))


def run_exported(path: str | Path, fmt: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Run an exported file on ``x`` with its own runtime (onnxruntime, TorchScript, ``torch.export.load``)."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise RuntimeMissing("running an ONNX file needs onnxruntime; pip install 'scaleprotoseg[export]'") from err
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return [torch.from_numpy(np.asarray(o)) for o in session.run(None, {name: x.detach().cpu().numpy()})]
    if fmt == "torchscript":
        with torch.no_grad():
            return list(torch.jit.load(str(path), map_location=x.device)(x))
    if fmt == "exported-program":
        with torch.no_grad():
            return list(torch.export.load(str(path)).module()(x))
    raise ValueError(f"export format {fmt!r}; expected one of {', '.join(FORMATS)}")


def read_metadata(path: str | Path, fmt: str) -> dict[str, Any]:
    """The :func:`export_metadata` stored in an exported file."""
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props.get("scaleprotoseg", "{}"))
    extra = {METADATA_FILE: ""}
    if fmt == "torchscript":
        torch.jit.load(str(path), _extra_files=extra)
    else:
        torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[METADATA_FILE] or "{}")


@dataclass
class ExportCheck:
    """How far an exported file's outputs are from PyTorch's on one random input: max |difference| per output,
    relative to the output's largest magnitude."""

    max_abs: dict[str, float]
    max_rel: dict[str, float]

    @property
    def worst_rel(self) -> float:
        return max(self.max_rel.values(), default=0.0)


def verify_export(module: ExportModule, path: str | Path, fmt: str, *, seed: int = 0) -> ExportCheck:
    """Compare the file at ``path`` with ``module`` (from :func:`export_model`) on a random input of its size."""
    param = next(module.parameters())
    size = read_metadata(path, fmt).get("input", {}).get("shape")
    if not size:
        raise ValueError(f"{path}: no scaleprotoseg metadata with the input shape; expected a file written by export")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*size, generator=gen).to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        expected = module(x)
    got = run_exported(path, fmt, x)
    if len(got) != len(expected):
        raise ValueError(f"{path}: {len(got)} outputs; expected {len(expected)} ({', '.join(module.outputs)})")
    max_abs, max_rel = {}, {}
    for name, e, g in zip(module.outputs, expected, got):
        if tuple(g.shape) != tuple(e.shape):
            raise ValueError(f"{path}: output {name} has shape {tuple(g.shape)}; expected {tuple(e.shape)}")
        diff = float((g.to(e) - e).abs().max()) if e.numel() else 0.0
        max_abs[name] = diff
        max_rel[name] = diff / max(float(e.abs().max()) if e.numel() else 0.0, 1e-12)
    return ExportCheck(max_abs, max_rel)


@dataclass
class ExportResult:
    """What :func:`export_run` wrote and how it checked out (``check`` is ``None`` when it could not be run)."""

    path: Path
    format: str
    outputs: tuple[str, ...]
    size: tuple[int, int]
    check: ExportCheck | None
    note: str = ""


def export_run(
    run: str | Path,
    out: str | Path,
    fmt: str,
    *,
    stage: str | None = None,
    outputs: Sequence[str] = ("logits",),
    size: tuple[int, int] | None = None,
    verify: bool = True,
) -> ExportResult:
    """Export the model of a run's ``final/`` (or ``stage``) checkpoint; ``size`` defaults to the config's crop size.

    With ``verify`` the file is run with its runtime and compared with PyTorch (for ONNX only when onnxruntime is
    installed; ``note`` says so otherwise).
    """
    loaded = load_model(run, stage, "cpu")
    hw = tuple(int(s) for s in (size if size is not None else loaded.config.data.crop_size))
    if len(hw) != 2:
        raise ValueError(f"export size {hw}; expected height and width")
    names = check_outputs(loaded.model, outputs)
    metadata = export_metadata(loaded.meta, names, (hw[0], hw[1]))
    module = export_model(loaded.model, out, fmt, outputs=names, size=(hw[0], hw[1]), metadata=metadata)
    check, note = None, ""
    if verify:
        try:
            check = verify_export(module, out, fmt)
        except RuntimeMissing as err:
            note = f"not verified: {err}"
    return ExportResult(Path(out), fmt, names, (hw[0], hw[1]), check, note)
