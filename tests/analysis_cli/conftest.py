"""One tiny trained ScaleProtoSeg run and one ProtoSeg run per test session, plus synthetic part annotations."""

from pathlib import Path

import numpy as np
import pytest


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
def tiny_runs(trained_runs, tmp_path_factory):
    """``{"root", "parts", "scaleprotoseg", "protoseg"}``: the shared tiny runs plus synthetic part maps."""
    parts = write_synthetic_parts(trained_runs["root"], tmp_path_factory.mktemp("analysis_cli") / "parts")
    return {**trained_runs, "parts": parts}
