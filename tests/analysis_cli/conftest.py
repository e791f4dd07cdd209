"""One tiny trained ScaleProtoSeg run and one ProtoSeg run per test session, plus synthetic part annotations."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_synthetic_parts(data_root: Path, parts_root: Path) -> Path:
    """Part maps for the synthetic folder dataset: the square (class 1) has a top and a bottom half, the disc
    (class 2) a left and a right half; written as ``folder_parts`` expects (``<stem>.png`` + part_names.yaml)."""
    from PIL import Image

    parts_root.mkdir(parents=True, exist_ok=True)
    for mask_file in sorted((data_root / "masks").glob("*.png")):
        lab = np.asarray(Image.open(mask_file)).astype(np.int64)
        parts = np.zeros(lab.shape, np.uint8)
        for c, axis in ((1, 0), (2, 1)):
            coords = np.nonzero(lab == c)[axis]
            if len(coords) == 0:
                continue
            mid = (coords.min() + coords.max() + 1) / 2
            grid = np.mgrid[: lab.shape[0], : lab.shape[1]][axis]
            parts[(lab == c) & (grid < mid)] = 1
            parts[(lab == c) & (grid >= mid)] = 2
        Image.fromarray(parts, mode="L").save(parts_root / mask_file.name)
    (parts_root / "part_names.yaml").write_text("square: [top, bottom]\ndisc: [left, right]\n")
    return parts_root


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """``{"root", "parts", "scaleprotoseg", "protoseg"}``: the synthetic folder, its part maps and two trained runs."""
    import torch

    from scaleprotoseg.engine.trainer import Trainer

    write_synthetic_folder = _load(TESTS / "conftest.py", "_sps_tests_conftest").write_synthetic_folder
    tiny_config = _load(TESTS / "engine" / "test_trainer.py", "_sps_tests_trainer").tiny_config
    base = tmp_path_factory.mktemp("analysis_cli")
    root = write_synthetic_folder(base / "synthetic")
    out = {"root": root, "parts": write_synthetic_parts(root, base / "parts")}
    torch.set_num_threads(2)
    for method in ("scaleprotoseg", "protoseg"):
        torch.manual_seed(0)
        run = base / f"run_{method}"
        Trainer(tiny_config(root, method), run, device="cpu", progress=False).run_stages()
        out[method] = run
    return out
