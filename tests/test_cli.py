import os
import subprocess
import sys

import pytest

from scaleprotoseg.cli import main


def _run(code: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_cli_makes_idle_openmp_threads_sleep_unless_the_user_chose():
    code = (
        "import os; from scaleprotoseg import cli; "
        "rc = cli.main(['data', 'check', '/nonexistent-folder']); "
        "print(rc, os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _run(code, env) == "1 PASSIVE"  # the check fails (no such folder), the policy was set before torch
    assert _run(code, {**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "1 ACTIVE"


@pytest.mark.parametrize(
    "error,fragment",
    [
        (PermissionError(13, "Permission denied", "/ro/out/a.png"), "error: /ro/out/a.png: Permission denied"),
        (MemoryError(), "error: out of memory"),
        (ValueError("x.png: bad\nsecond line"), "error: x.png: bad second line"),
        (ValueError("caf\udce9.png: truncated"), "error: caf\ufffd.png: truncated"),
    ],
)
def test_user_errors_are_one_line_and_debug_keeps_the_traceback(error, fragment, monkeypatch, capsys):
    import scaleprotoseg.commands.report as report_cmd

    def boom(args):
        raise error

    monkeypatch.setattr(report_cmd, "run", boom)
    assert main(["report", "some-run"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(fragment)
    with pytest.raises(type(error)):
        main(["report", "some-run", "--debug"])


def test_config_errors_reach_the_user_as_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert main(["train", "-c", str(path)]) == 1
    assert capsys.readouterr().err.strip().startswith(f"error: {path}: byte 9 is not UTF-8 text")
    path.write_text("name: x\n")
    assert main(["train", "-c", str(path), "--set", "data.crop_size=[1, 2"]) == 1
    assert "is not valid YAML" in capsys.readouterr().err
