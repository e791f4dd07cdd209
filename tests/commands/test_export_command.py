"""``scaleprotoseg export``: each format through the CLI, and one-line errors."""

from __future__ import annotations

import torch

from scaleprotoseg import cli
from scaleprotoseg.checkpoint import load_model
from scaleprotoseg.export import run_exported
from scaleprotoseg.pretrained import from_pretrained


def test_export_exported_program_and_hub(tmp_path, tiny_run, capsys):
    run = tiny_run(tmp_path / "run", "scaleprotoseg", grouped=True)
    out = tmp_path / "model.pt2"
    args = ["export", str(run), "--format", "exported-program", "--outputs", "logits,groups", "--size", "8", "12"]
    assert cli.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "input 1x3x8x12, outputs: logits, groups" in printed and "max |difference| logits" in printed
    x = torch.randn(1, 3, 8, 12)
    logits, groups = run_exported(out, "exported-program", x)
    with torch.no_grad():
        expected = load_model(run).model(x)
    torch.testing.assert_close(logits, expected.logits)
    torch.testing.assert_close(groups, expected.group_activations)
    assert cli.main(["export", str(run), "--format", "hub", "--out", str(tmp_path / "hub")]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    assert from_pretrained(tmp_path / "hub").meta.method == "scaleprotoseg"


def test_export_errors_are_one_line(tmp_path, tiny_run, capsys):
    run = tiny_run(tmp_path / "run", "deeplabv2")
    rc = cli.main(
        ["export", str(run), "--format", "torchscript", "--outputs", "prototypes", "--out", str(tmp_path / "m")]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == "error: export output 'prototypes': a deeplabv2 model has no prototypes"
    rc = cli.main(["export", str(tmp_path / "none"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert rc == 1 and "does not exist" in capsys.readouterr().err
