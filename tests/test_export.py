"""Export to ONNX, TorchScript and torch.export programs: the files give the PyTorch model's outputs."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from scaleprotoseg.export import (
    FORMATS,
    ExportModule,
    check_outputs,
    export_model,
    export_run,
    read_metadata,
    run_exported,
)
from scaleprotoseg.models.segmenter import Segmenter

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
CLASS_NAMES = ["background", "square", "disc"]


CASES = [("deeplabv2", False, "logits"), ("protoseg", False, "logits,prototypes"), ("scaleprotoseg", True, "all")]


def _outputs(spec: str) -> list[str]:
    return ["logits", "prototypes", "groups"] if spec == "all" else spec.split(",")


@pytest.mark.parametrize("method,grouped,outputs", CASES)
def test_torch_export_of_the_model_gives_its_outputs(method, grouped, outputs, tiny_model):
    model, _ = tiny_model(method, grouped=grouped)
    module = ExportModule(model, _outputs(outputs)).eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(module, (x,))
    with torch.no_grad():
        got = program.module()(x)
        out = model(x)
    expected = {"logits": out.logits, "prototypes": out.activations, "groups": out.group_activations}
    assert len(got) == len(module.outputs)
    for name, g in zip(module.outputs, got):
        torch.testing.assert_close(g, expected[name])


def test_torch_export_and_trace_of_the_inference_path(tiny_model):
    """``Segmenter.logits`` without autograd (the blockwise path of models.fused) exports and traces too."""
    model, _ = tiny_model("scaleprotoseg", grouped=True)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.logits(x)

    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x).logits
        program = torch.export.export(Logits(), (x,))
        traced = torch.jit.trace(Logits(), (x,))  # check_trace compares a second run
        for got in (program.module()(x), traced(x)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_files_give_the_model_outputs_and_carry_the_metadata(tmp_path, fmt, tiny_model):
    model, _ = tiny_model("scaleprotoseg", grouped=True)
    path = tmp_path / f"model.{fmt}"
    module = export_model(model, path, fmt, outputs=["groups", "logits"], size=(16, 16), metadata={"k": 1})
    assert module.outputs == ("logits", "groups")  # always in OUTPUTS order
    assert read_metadata(path, fmt) == {"k": 1}
    x = torch.randn(1, 3, 16, 16)
    got = run_exported(path, fmt, x)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(got[0], out.logits)
    torch.testing.assert_close(got[1], out.group_activations)


@pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxscript and onnxruntime are not installed (extra 'export')")
@pytest.mark.parametrize("method,grouped,outputs", CASES)
def test_onnx_runs_in_onnxruntime_like_pytorch(tmp_path, method, grouped, outputs, tiny_run):
    run = tiny_run(tmp_path / "run", method, grouped=grouped)
    result = export_run(run, tmp_path / "model.onnx", "onnx", outputs=_outputs(outputs), size=(16, 24))
    assert result.check is not None and result.size == (16, 24)
    assert result.check.worst_rel < 1e-5, result.check
    meta = read_metadata(result.path, "onnx")
    assert meta["class_names"] == CLASS_NAMES and meta["outputs"] == list(result.outputs)
    assert meta["input"]["shape"] == [1, 3, 16, 24] and meta["normalization"] == "imagenet"
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(result.outputs)
    x = torch.randn(1, 3, 16, 24)
    got = session.run(None, {"image": x.numpy()})
    from scaleprotoseg.checkpoint import load_model

    with torch.no_grad():
        logits = load_model(run).model(x).logits
    np.testing.assert_allclose(got[0], logits.numpy(), rtol=1e-4, atol=1e-5 * float(logits.abs().max()))


def test_export_run_defaults_to_the_crop_size_and_checks_itself(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run", "protoseg")
    result = export_run(run, tmp_path / "m.pt2", "exported-program")
    assert result.size == (16, 16) and result.outputs == ("logits",)
    assert result.check is not None and result.check.max_abs["logits"] < 1e-5


def test_outputs_a_model_cannot_give_are_one_line_errors(tiny_model):
    deeplab, _ = tiny_model("deeplabv2")
    with pytest.raises(ValueError, match="'prototypes': a deeplabv2 model has no prototypes"):
        check_outputs(deeplab, ["logits", "prototypes"])
    stage1, _ = tiny_model("scaleprotoseg")
    with pytest.raises(ValueError, match="'groups'.*no groups"):
        check_outputs(stage1, ["groups"])
    with pytest.raises(ValueError, match="expected some of logits,prototypes,groups"):
        check_outputs(stage1, ["logit"])
    assert check_outputs(stage1, ["prototypes", "logits"]) == ("logits", "prototypes")
    with pytest.raises(ValueError, match="expected one of onnx, torchscript, exported-program"):
        export_model(stage1, "x.bin", "tflite")
    assert isinstance(stage1, Segmenter) and set(FORMATS) == {"onnx", "torchscript", "exported-program"}
