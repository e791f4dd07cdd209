"""``import scaleprotoseg`` (and every submodule) does no file or network I/O beyond reading its own code."""

import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys
import numpy, numpy.testing, scipy, scipy.io, scipy.ndimage, tifffile, torch, yaml, PIL.Image, safetensors.torch, tqdm
# (third-party imports may read their own files; they are loaded before the hook)
events = []
def hook(event, args):
    if event == "open":
        path = str(args[0])
        own_code = path.endswith((".py", ".pyc", ".so")) or "__pycache__" in path or path in sys.path
        if not own_code:
            events.append(("open", path))
    elif event.startswith("socket.") or event in ("urllib.Request", "http.client.connect"):
        events.append((event, str(args)[:80]))
sys.addaudithook(hook)
import scaleprotoseg
names = [m.name for m in pkgutil.walk_packages(scaleprotoseg.__path__, "scaleprotoseg.")]
for name in names:
    if name == "scaleprotoseg.__main__":
        continue
    importlib.import_module(name)
print(len(names))
print(events)
"""


def test_importing_every_module_does_no_io():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    count, events = out.stdout.strip().splitlines()[-2:]
    assert int(count) > 20
    # matplotlib reads its rc file and fonts when it is imported: no module may import it at module level
    assert events == "[]", events
