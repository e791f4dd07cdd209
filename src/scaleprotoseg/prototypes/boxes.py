"""Receptive-field boxes of feature cells (what a prototype patch shows).

A cell (row, col) on the feature grid of output stride ``os`` seen through the 3x3 ASPP branch of rate ``r``
(scale ``s`` uses ``head.aspp.rates[s]``; ProtoSeg's summed ASPP uses its largest rate) covers cells
``row - r .. row + r``, i.e. pixels ``[(row - r) * os, (row + r + 1) * os)`` clipped to the image. The backbone's
own receptive field is NOT included, so the box is a lower bound of the true receptive field.
"""

from __future__ import annotations

import math

from torch import nn


def prototype_rates(head: nn.Module) -> list[int]:
    """ASPP rate that defines each prototype's receptive field: ``aspp.rates[scale]`` for concatenated ASPP, the
    largest rate for ProtoSeg's summed ASPP (one scale)."""
    rates = [int(r) for r in head.aspp.rates]
    scales = head.prototype_scale.tolist()
    if head.num_scales == 1:
        return [max(rates)] * len(scales)
    return [rates[s] for s in scales]


def receptive_field_box(
    cell: tuple[int, int], *, rate: int, output_stride: int, image_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) pixels of the 3x3 atrous conv of ``rate`` at ``cell``: cells ``row - rate .. row + rate``
    times the output stride, clipped to ``image_size`` = (H, W). The backbone's own receptive field is not included."""
    row, col = int(cell[0]), int(cell[1])
    H, W = int(image_size[0]), int(image_size[1])
    y0 = min(max(0, (row - rate) * output_stride), H)
    x0 = min(max(0, (col - rate) * output_stride), W)
    y1 = max(min(H, (row + rate + 1) * output_stride), y0)
    x1 = max(min(W, (col + rate + 1) * output_stride), x0)
    return y0, x0, y1, x1


def scale_box(
    box: tuple[int, int, int, int], from_size: tuple[int, int], to_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Map a pixel box from an image of ``from_size`` (H, W) to the same image resized to ``to_size`` (outward
    rounding, clipped, at least one pixel when the box was non-empty)."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    y0, x0, y1, x1 = box
    ny0, nx0 = min(int(math.floor(y0 * sy)), to_size[0]), min(int(math.floor(x0 * sx)), to_size[1])
    ny1, nx1 = min(int(math.ceil(y1 * sy)), to_size[0]), min(int(math.ceil(x1 * sx)), to_size[1])
    if y1 > y0 and ny1 <= ny0:
        ny0, ny1 = max(0, ny1 - 1), max(ny1, 1)
    if x1 > x0 and nx1 <= nx0:
        nx0, nx1 = max(0, nx1 - 1), max(nx1, 1)
    return ny0, nx0, ny1, nx1
