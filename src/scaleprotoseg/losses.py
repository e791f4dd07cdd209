"""The training objective: cross-entropy on the feature grid, the diversity loss (Eqs. 3-6), the group entropy
(Eq. 8) and the off-class L1 terms (Eq. 9 and ProtoPNet's last-layer L1). Each returns its named term; Eq. 7 and
Eq. 9 are their weighted sums in :func:`compute_losses`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from scaleprotoseg.config import LOSS_TERMS
from scaleprotoseg.models.heads import ModelOutput, PrototypeHead
from scaleprotoseg.models.layout import member_table
from scaleprotoseg.ops import at_least_float32, full_precision, resize_labels, upsample_logits

CE_RESOLUTIONS = ("features", "labels")


def cross_entropy_on_grid(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Per-cell cross-entropy with the labels downsampled (nearest) to the logits' grid; ignore cells excluded.

    Returns 0 (with a graph) when no cell is labelled, instead of NaN; nothing is read back to the host.
    """
    small = resize_labels(labels, tuple(logits.shape[-2:]))
    total = F.cross_entropy(logits, small, ignore_index=ignore_index, reduction="sum")
    return total / (small != ignore_index).sum().clamp_min(1)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, resolution: str = "features"
) -> torch.Tensor:
    """The CE term of Eqs. 7 and 9 at the chosen resolution.

    ``"features"``: labels downsampled to the logits' grid (:func:`cross_entropy_on_grid`; the paper and the authors'
    release). ``"labels"``: logits up-sampled bilinearly to the label size, every labelled pixel counted (as the
    evaluation scores them). At output stride 8 a 12-pixel object covers one or two grid cells, and the grid loss
    cannot ask for its outline; ``docs/results/learning.md`` measures the difference.
    """
    if resolution == "features":
        return cross_entropy_on_grid(logits, labels, ignore_index)
    if resolution != "labels":
        raise ValueError(f"CE resolution {resolution!r} is not known; expected one of {', '.join(CE_RESOLUTIONS)}")
    full = upsample_logits(logits, tuple(labels.shape[-2:]))
    total = F.cross_entropy(full, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


def diversity_loss(
    distances: torch.Tensor,
    labels: torch.Tensor,
    prototype_class: torch.Tensor,
    prototype_scale: torch.Tensor,
    num_classes: int,
    num_scales: int,
    *,
    jeffreys: Literal["half", "full"] = "half",
    ignore_index: int = 255,
    table: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Diversity loss L_J (Eqs. 3-6), computed independently per scale, vectorised over images, classes, scales and
    prototype pairs. Each cell is visited once, with its own class's prototypes; the softmax and the pair sums are
    segment-wise (per image and class) reductions. Cells that are void, or whose class has fewer than 2 cells in the
    image, go to one extra segment that is dropped, so that nothing is read back to the host (no GPU sync).

    For every image b, class c with at least 2 labelled cells, and scale s: each prototype of (c, s) gets the
    softmax of its squared distances over the cells of class c (Eq. 3, positive sign as in the release); every pair
    of them contributes ``exp(-D_J)`` (Eq. 4). ``jeffreys="half"`` uses 0.5 * (KL(p||q) + KL(q||p)) as the release
    does; ``"full"`` the plain Jeffrey's divergence of Eq. 4. The result is the flat mean over all (image, class,
    scale, pair) terms (the release's reduction; with equal prototypes per (c, s) it is the mean of Eq. 5 over the
    (image, class, scale) triples present). Returns 0 when no term exists.

    Args:
        distances: (B, P, h, w) squared distances on the feature grid.
        labels: (B, h, w) labels on the same grid (already downsampled), ``ignore_index`` for void.
        table: :func:`member_table` of the prototypes, if already known.
    """
    B, P, h, w = distances.shape
    if labels.shape != (B, h, w):
        raise ValueError(f"diversity_loss: labels have shape {tuple(labels.shape)}; expected {(B, h, w)}")
    if jeffreys not in ("half", "full"):
        raise ValueError(f"jeffreys {jeffreys!r} is not valid; expected 'half' or 'full'")
    if table is None:
        table = member_table(prototype_class, prototype_scale, num_classes, num_scales)
    index, valid = table  # (C, S, M)
    _, S, M = index.shape
    if M < 2:
        return distances.sum() * 0.0
    lab = labels.reshape(B, h * w)
    labelled = (lab >= 0) & (lab < num_classes)  # void / ignore cells never enter
    cls = lab.clamp(0, num_classes - 1)
    nseg = B * num_classes  # segment = (image, class); segment nseg collects the cells that take no part
    segment = torch.arange(B, device=lab.device).view(B, 1) * num_classes + cls
    segment = torch.where(labelled, segment, nseg)
    counts = torch.zeros(nseg + 1, device=lab.device, dtype=torch.long).index_add_(
        0, segment.flatten(), torch.ones_like(segment.flatten())
    )
    enough = counts[:nseg] >= 2  # (image, class) pairs with at least 2 cells
    seg = torch.where(labelled & enough[segment.clamp_max(nseg - 1)], segment, nseg).flatten()  # (N,)
    # Each cell's distances to its own class's prototypes, per scale: (N, S, M).
    g = torch.gather(distances.reshape(B, P, h * w).transpose(1, 2), 2, index[cls].view(B, h * w, S * M))
    g = g.reshape(-1, S, M)
    # Eq. 3: softmax over the cells of each (image, class), per prototype; a segment-wise log-sum-exp.
    seg3 = seg.view(-1, 1, 1).expand_as(g)
    top = torch.full((nseg + 1, S, M), float("-inf"), device=g.device, dtype=g.dtype)
    top = top.scatter_reduce(0, seg3, g.detach(), reduce="amax", include_self=True).index_select(0, seg)
    shifted = g - top
    total = torch.zeros((nseg + 1, S, M), device=g.device, dtype=g.dtype).index_add(0, seg, shifted.exp())
    logp = shifted - total.log().index_select(0, seg)
    prob = logp.exp()
    # Eq. 4: Jeffrey's divergence of every pair (i, j), summed over the cells of the segment; all M x M pairs are
    # formed by broadcasting (M is small) and the pairs i < j kept by the mask below.
    term = (prob.unsqueeze(-1) - prob.unsqueeze(-2)) * (logp.unsqueeze(-1) - logp.unsqueeze(-2))  # (N, S, M, M)
    jd = torch.zeros((nseg + 1, S, M, M), device=g.device, dtype=g.dtype).index_add(0, seg, term)[:nseg]
    if jeffreys == "half":
        jd = 0.5 * jd
    vs = valid[torch.arange(nseg, device=g.device) % num_classes]  # (nseg, S, M)
    upper = torch.ones(M, M, dtype=torch.bool, device=g.device).triu(1)
    pair_valid = vs.unsqueeze(-1) & vs.unsqueeze(-2) & upper & enough.view(-1, 1, 1, 1)
    weight = pair_valid.to(g.dtype)
    return (torch.exp(-jd) * weight).sum() / weight.sum().clamp_min(1)


def group_entropy_loss(weight: torch.Tensor, member_mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Group entropy L_ent (Eq. 8): the mean over all groups of the entropy of their simplex row, normalised by
    log |P_c| (the release's normalisation, so a uniform row scores ~1) with ``eps`` inside the log.

    Args:
        weight: (C, N, K) group weights; entries outside ``member_mask`` are ignored.
        member_mask: (C, K) which columns are prototypes of the class.
    """
    mask = member_mask.unsqueeze(1).expand_as(weight)
    w = weight * mask
    ent = -(w * torch.log(w + eps)).sum(-1)  # (C, N)
    size = member_mask.sum(-1).to(weight.dtype)  # |P_c|
    norm = torch.where(size > 1, torch.log(size.clamp_min(2)), torch.ones_like(size))
    has = size > 0
    return (ent / norm.unsqueeze(-1))[has].mean()


def off_class_l1(weight: torch.Tensor, column_class: torch.Tensor) -> torch.Tensor:
    """Sum of |w| over the last-layer weights linking class c to prototypes or groups NOT assigned to c (Eq. 9).

    Args:
        weight: (C, K) last layer (h_proto or h_group).
        column_class: (K,) class of each column.
    """
    rows = torch.arange(weight.shape[0], device=weight.device).unsqueeze(1)
    off = rows != column_class.unsqueeze(0)
    return (weight.abs() * off).sum()


def msc_loss_outputs(
    outputs: Sequence[ModelOutput], fused: ModelOutput, scales: Sequence[float], all_scales: bool = True
) -> list[ModelOutput]:
    """The outputs of multi-scale inputs that enter the loss, the largest scale's first: every scale's and the fused
    one (the release's four outputs for {0.5, 0.75, 1}), or with ``all_scales=False`` the largest scale's and the
    fused one."""
    largest = max(range(len(scales)), key=lambda i: scales[i])
    others = [o for i, o in enumerate(outputs) if i != largest] if all_scales else []
    return [outputs[largest], fused, *others]


def compute_losses(
    output: ModelOutput,
    labels: torch.Tensor,
    head: Any,
    loss_cfg: Any,
    terms: Sequence[str],
    *,
    ignore_index: int = 255,
    extra_outputs: Sequence[ModelOutput] = (),
) -> dict[str, torch.Tensor]:
    """The weighted objective of a stage (Eq. 7 in stage 1, Eq. 9 in stage 2) with each named term.

    ``terms`` picks from :data:`LOSS_TERMS`. ``extra_outputs`` (multi-scale inputs, :func:`msc_loss_outputs`) are
    averaged with ``output`` in the ``ce`` and ``diversity`` terms, each against the labels on its own grid (the
    release averages every term over its four outputs; the L1 terms do not depend on the output). Everything is
    computed in float32, also when called under autocast. Returns a dict with every unweighted term and ``total``.
    """
    for name in terms:
        if name not in LOSS_TERMS:
            raise ValueError(f"unknown loss term {name!r}; expected any of {', '.join(LOSS_TERMS)}")
    with full_precision(output.logits):
        outputs = [o.map(at_least_float32) for o in (output, *extra_outputs)]
        return _weighted_terms(outputs, labels, head, loss_cfg, terms, ignore_index)


def _weighted_terms(
    outputs: list[ModelOutput], labels: torch.Tensor, head: Any, loss_cfg: Any, terms: Sequence[str], ignore_index: int
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    total = outputs[0].logits.new_zeros(())
    if "ce" in terms:
        res = loss_cfg.ce_resolution
        out["ce"] = torch.stack([cross_entropy(o.logits, labels, ignore_index, res) for o in outputs]).mean()
        total = total + loss_cfg.ce * out["ce"]
    proto = head if isinstance(head, PrototypeHead) else None
    with_maps = [o.distances for o in outputs if o.distances is not None]
    if "diversity" in terms and proto is not None and with_maps:
        table = proto.member_table()
        out["diversity"] = torch.stack(
            [
                diversity_loss(
                    d,
                    resize_labels(labels, tuple(d.shape[-2:])),
                    proto.prototype_class,
                    proto.prototype_scale,
                    proto.num_classes,
                    proto.num_scales,
                    jeffreys=loss_cfg.jeffreys,
                    ignore_index=ignore_index,
                    table=table,
                )
                for d in with_maps
            ]
        ).mean()
        total = total + loss_cfg.diversity * out["diversity"]
    if "l1_proto" in terms and proto is not None:
        out["l1_proto"] = off_class_l1(proto.h_proto, proto.prototype_class)
        total = total + loss_cfg.l1_proto * out["l1_proto"]
    if "entropy" in terms and proto is not None and proto.grouping is not None:
        out["entropy"] = group_entropy_loss(proto.grouping.weight, proto.grouping.member_mask)
        total = total + loss_cfg.entropy * out["entropy"]
    if "l1_group" in terms and proto is not None and proto.grouping is not None and proto.h_group is not None:
        out["l1_group"] = off_class_l1(proto.h_group, proto.grouping.group_class)
        total = total + loss_cfg.l1_group * out["l1_group"]
    out["total"] = total
    return out
