"""Drawing helpers shared by the explanation views: Agg figures, activation overlays, boxes, placeholders.

Matplotlib is imported inside the functions (no work at import time) and every figure gets its own Agg canvas, so
nothing touches pyplot's global state and rendering works without a display.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CMAP = "jet"  # activation colour map (ProtoPNet / ProtoSeg visualisations use jet)
ALPHA = 0.5  # opacity of activation heat maps over the image
DPI = 100
BOX_COLORS = ("#e41a1c", "#4daf4a", "#377eb8", "#ff7f00", "#984ea3", "#a65628")  # red, green, blue, ...


def new_figure(width: float, height: float, layout: str | None = None) -> Any:
    """A matplotlib ``Figure`` on its own Agg canvas (no pyplot). Without ``layout`` the margins are fixed (see
    :func:`grid`): constrained layout is slow with dozens of panels and colour bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(width, 1.0), max(height, 1.0)), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def grid(fig: Any, nrows: int, ncols: int, *, title_lines: int = 1, colorbars: bool = True) -> np.ndarray:
    """``nrows`` x ``ncols`` axes with fixed margins: room for a suptitle, panel titles of ``title_lines`` lines
    and a colour bar right of each panel."""
    w, h = fig.get_size_inches()
    axes = fig.subplots(nrows, ncols, squeeze=False)
    panel_w = w / max(ncols, 1)
    panel_h = h / max(nrows, 1)
    fig.subplots_adjust(
        left=0.15 / w,
        right=1 - (0.55 if colorbars else 0.15) / w,
        top=1 - 0.6 / h,
        bottom=0.1 / h,
        wspace=(0.75 if colorbars else 0.15) / max(panel_w - 0.75, 0.5),
        hspace=(0.2 + 0.17 * title_lines) / max(panel_h - 0.5, 0.5),
    )
    return axes


def save_figure(fig: Any, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` to ``path`` (parents created) and release it. Texts are made drawable first: sample names from
    file names that are not UTF-8 (surrogate escapes) would crash the font renderer, so they get U+FFFD."""
    from matplotlib.text import Text

    from scaleprotoseg.data.io import printable

    for text in fig.findobj(Text):
        raw = text.get_text()
        if raw and printable(raw) != raw:
            text.set_text(printable(raw))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, pil_kwargs={"compress_level": 2})
    return path


def slug(text: str) -> str:
    """A file-name-safe version of a class name."""
    s = re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_").lower()
    return s or "class"


def fit_image(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` (H, W, 3) uint8 scaled down (bilinear) so that its long side is at most ``max_side``."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    from PIL import Image

    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def upsample(maps: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Activation maps (K, h, w) or (h, w) on the feature grid -> (K, H, W) / (H, W) float32, nearest neighbour
    (``ops.resize_activations``) so that each grid cell keeps its own value."""
    from scaleprotoseg.ops import resize_activations

    t = torch.as_tensor(np.asarray(maps, dtype=np.float32) if isinstance(maps, np.ndarray) else maps).float()
    squeeze = t.dim() == 2
    t = t[None, None] if squeeze else t[None]
    out = resize_activations(t, (int(size[0]), int(size[1])))[0]
    return (out[0] if squeeze else out).numpy()


def cell_box(cell: tuple[int, int], grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel footprint (y0, x0, y1, x1) of feature cell (row, col) of a ``grid`` (h, w) on an image of ``size``."""
    r, c = int(cell[0]), int(cell[1])
    sy, sx = size[0] / grid[0], size[1] / grid[1]
    return int(r * sy), int(c * sx), max(int((r + 1) * sy), int(r * sy) + 1), max(int((c + 1) * sx), int(c * sx) + 1)


def scale_box_to(box: tuple[int, int, int, int], src: tuple[int, int], dst: tuple[int, int]) -> tuple[float, ...]:
    """A pixel box on an image of size ``src`` in the coordinates of the same image resized to ``dst``."""
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    y0, x0, y1, x1 = box
    return y0 * sy, x0 * sx, y1 * sy, x1 * sx


def draw_box(ax: Any, box: tuple[float, ...], color: str = "#e41a1c", lw: float = 2.0) -> None:
    """Rectangle (y0, x0, y1, x1) in pixel coordinates on an ``imshow`` axes."""
    from matplotlib.patches import Rectangle

    y0, x0, y1, x1 = box
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=lw))


def hide_ticks(ax: Any) -> None:
    ax.set_axis_off()


def show_image(ax: Any, image: np.ndarray, title: str | None = None, fontsize: float = 9) -> None:
    ax.imshow(image, interpolation="nearest")
    hide_ticks(ax)
    if title:
        ax.set_title(title, fontsize=fontsize)


def show_activation(
    ax: Any,
    image: np.ndarray,
    activation: np.ndarray,
    title: str | None = None,
    *,
    colorbar: bool = True,
    vmin: float | None = None,
    vmax: float | None = None,
    fontsize: float = 9,
) -> Any:
    """``image`` with an activation map of the same (H, W) size on top (jet, half transparent) and a colour bar."""
    ax.imshow(image, interpolation="nearest")
    lo = float(np.min(activation)) if vmin is None else vmin
    hi = float(np.max(activation)) if vmax is None else vmax
    if hi <= lo:
        hi = lo + 1e-6
    im = ax.imshow(activation, cmap=CMAP, alpha=ALPHA, vmin=lo, vmax=hi, interpolation="nearest")
    hide_ticks(ax)
    if title:
        ax.set_title(title, fontsize=fontsize)
    if colorbar:
        _colorbar(ax, im)
    return im


def _colorbar(ax: Any, mappable: Any, alpha: float | None = None) -> None:
    cax = ax.inset_axes((1.03, 0.0, 0.05, 1.0))
    cb = ax.figure.colorbar(mappable, cax=cax, alpha=alpha)
    cb.ax.tick_params(labelsize=7, length=2, pad=1)


def add_colorbar(ax: Any, vmin: float, vmax: float) -> None:
    """A colour bar for an already blended overlay image whose activation range was ``[vmin, vmax]``."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if vmax <= vmin:
        vmax = vmin + 1e-6
    _colorbar(ax, ScalarMappable(norm=Normalize(vmin, vmax), cmap=colormaps[CMAP]), alpha=ALPHA)


def blend_activation(image: np.ndarray, activation: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """uint8 RGB blend of ``image`` and the jet-coloured ``activation`` (same H, W), normalised to its own range."""
    from matplotlib import colormaps

    a = np.asarray(activation, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    norm = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    heat = colormaps[CMAP](norm)[..., :3] * 255.0
    return np.clip((1 - alpha) * image.astype(np.float64) + alpha * heat, 0, 255).astype(np.uint8)


def draw_box_on_array(image: np.ndarray, box: tuple[float, ...], color: tuple[int, int, int] = (228, 26, 28)) -> None:
    """Burn a 2-pixel rectangle (y0, x0, y1, x1) into a uint8 RGB array in place."""
    h, w = image.shape[:2]
    y0, x0, y1, x1 = (int(round(v)) for v in box)
    y0, x0 = min(max(y0, 0), h - 1), min(max(x0, 0), w - 1)
    y1, x1 = min(max(y1 - 1, y0), h - 1), min(max(x1 - 1, x0), w - 1)
    t = 2 if min(h, w) >= 64 else 1
    image[y0 : y0 + t, x0 : x1 + 1] = color
    image[max(y1 - t + 1, 0) : y1 + 1, x0 : x1 + 1] = color
    image[y0 : y1 + 1, x0 : x0 + t] = color
    image[y0 : y1 + 1, max(x1 - t + 1, 0) : x1 + 1] = color


def placeholder(size: int = 48) -> np.ndarray:
    """A grey crossed square standing in for a missing prototype patch."""
    img = np.full((size, size, 3), 215, dtype=np.uint8)
    idx = np.arange(size)
    for d in (-1, 0, 1):
        j = np.clip(idx + d, 0, size - 1)
        img[idx, j] = 150
        img[idx, size - 1 - j] = 150
    img[[0, -1], :] = 150
    img[:, [0, -1]] = 150
    return img


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index map -> RGB with ``palette`` (values outside the palette, e.g. ignore, are black)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    p = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
    pal[: len(p)] = p
    return pal[np.clip(labels, 0, 255).astype(np.int64)]


def hex_color(rgb: Any) -> str:
    r, g, b = (int(v) for v in list(rgb)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def legend_handles(class_ids: list[int], class_names: list[str], palette: np.ndarray) -> list[Any]:
    from matplotlib.patches import Patch

    return [
        Patch(
            facecolor=hex_color(palette[c]) if c < len(palette) else "#000000",
            edgecolor="#444444",
            label=class_names[c] if c < len(class_names) else str(c),
        )
        for c in class_ids
    ]


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Save a uint8 RGB array as PNG (parents created); an empty crop is saved as a placeholder."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.asarray(image)
    if a.size == 0:
        a = placeholder()
    Image.fromarray(np.ascontiguousarray(a.astype(np.uint8))).save(path)
    return path
