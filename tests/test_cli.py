import os
import subprocess
import sys


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
