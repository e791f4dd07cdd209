"""The small exact pieces the paper is built from: distances, the prototype activation (Eq. 1), the simplex
projection used by the grouping (section 3.2), and the one resize convention per kind of tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATION_EPS = 1e-4


def full_precision(tensor: torch.Tensor) -> torch.autocast:
    """A context with autocast off on ``tensor``'s device: what Eq. 1 needs under mixed precision.

    In bfloat16 the expansion ``||z||^2 - 2 z.p + ||p||^2`` loses the small distances that Eq. 1 depends on (at an
    exact match the activation falls from log(1/eps) = 9.2 to about 2.2 on a GPU), so the prototype layer, the groups
    and the losses run in float32 inside this context, with 16-bit inputs cast (:func:`at_least_float32`); the
    backbone and the ASPP may stay in bfloat16.
    """
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 when it is in a 16-bit float type (autocast's outputs), unchanged otherwise (float64)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def squared_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between every feature vector and every prototype.

    Uses the expansion ``||z||^2 - 2 z.p + ||p||^2``, clamped at 0 against round-off.

    Args:
        features: (B, D, H, W) feature map.
        prototypes: (P, D).
    Returns:
        (B, P, H, W) distances.
    """
    z2 = (features * features).sum(dim=1, keepdim=True)  # (B, 1, H, W)
    p2 = (prototypes * prototypes).sum(dim=1).view(1, -1, 1, 1)  # (1, P, 1, 1)
    zp = torch.einsum("bdhw,pd->bphw", features, prototypes)
    return (z2 - 2 * zp + p2).clamp_min(0)


def scale_counts(prototype_scale: torch.Tensor, num_scales: int) -> list[int] | None:
    """Prototypes per scale when they are scale-major (``prototype_scale`` non-decreasing), else None."""
    if len(prototype_scale) and not bool((prototype_scale[1:] >= prototype_scale[:-1]).all()):
        return None
    return torch.bincount(prototype_scale, minlength=num_scales).tolist()


def multiscale_squared_distances(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    prototype_scale: torch.Tensor,
    num_scales: int,
    counts: list[int] | None = None,
) -> torch.Tensor:
    """Squared distances where prototype ``p`` sees only the D channels of its own scale (section 3.1).

    The per-scale comparison is one matrix product: each prototype is placed in its scale's block of a
    (P, S*D) matrix, zeros elsewhere, so any mix of prototypes per scale (e.g. after duplicate removal) costs
    the same single product.

    Args:
        features: (B, S*D, H, W), scale-major channel blocks.
        prototypes: (P, D).
        prototype_scale: (P,) int64 scale index of each prototype.
        num_scales: S.
        counts: :func:`scale_counts` of ``prototype_scale`` if already known (saves reading it back from a GPU).
    Returns:
        (B, P, H, W) distances.
    """
    B, SD, H, W = features.shape
    P, D = prototypes.shape
    if SD != num_scales * D:
        raise ValueError(f"features have {SD} channels; expected num_scales * D = {num_scales} * {D}")
    if num_scales == 1:
        return squared_distances(features, prototypes)
    if counts is None and P:
        counts = scale_counts(prototype_scale, num_scales)
    if P and counts is not None and len(set(counts)) == 1:
        # Scale-major with as many prototypes at every scale (the heads' layout before any removal): one batched
        # product over the scales, and few enough operations that a GPU step is not bound by kernel launches.
        m = counts[0]
        z = features.reshape(B * num_scales, D, H * W)
        protos = prototypes.view(1, num_scales, m, D).expand(B, -1, -1, -1).reshape(B * num_scales, m, D)
        p2 = (protos * protos).sum(dim=2, keepdim=True)  # (B*S, m, 1)
        z2 = (z * z).sum(dim=1, keepdim=True)  # (B*S, 1, HW)
        d = torch.baddbmm(p2, protos, z, beta=1, alpha=-2).add_(z2)  # ||p||^2 - 2 p.z + ||z||^2
        return d.clamp_min_(0).view(B, P, H, W)
    if P and counts is not None:
        # Scale-major prototypes (the layout the heads keep, also after removals): one product per scale block,
        # a quarter of the arithmetic of the dense block matrix below.
        blocks = features.view(B, num_scales, D, H, W)
        parts = [
            squared_distances(blocks[:, s], chunk)
            for s, chunk in enumerate(torch.split(prototypes, counts))
            if chunk.shape[0]
        ]
        return torch.cat(parts, dim=1)
    onehot = F.one_hot(prototype_scale, num_scales).to(prototypes.dtype)  # (P, S)
    block = (onehot.unsqueeze(2) * prototypes.unsqueeze(1)).reshape(P, SD)  # (P, S*D)
    z2_per_scale = (features * features).view(B, num_scales, D, H, W).sum(dim=2)  # (B, S, H, W)
    z2 = z2_per_scale.index_select(1, prototype_scale)  # (B, P, H, W)
    zp = torch.einsum("bchw,pc->bphw", features, block)
    p2 = (prototypes * prototypes).sum(dim=1).view(1, -1, 1, 1)
    return (z2 - 2 * zp + p2).clamp_min(0)


def log_activation(distances: torch.Tensor, eps: float = ACTIVATION_EPS) -> torch.Tensor:
    """Prototype activation of Eq. 1: ``log((d + 1) / (d + eps))``, in (0, log(1/eps)]; equals log(1/eps) at d = 0."""
    return torch.log((distances + 1) / (distances + eps))


def project_simplex(v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex (sort-based; Held 1974, Duchi 2008).

    ``argmin_w ||w - v||^2  s.t.  w >= 0, sum(w) = 1``, batched over all leading dimensions. With ``mask`` (same
    shape, bool), each row is projected onto the simplex of its masked-in entries and the others are set to 0; a
    row needs at least one masked-in entry.

    Example: (0.5, 0.3, -0.2) -> (0.6, 0.4, 0).
    """
    if mask is None:
        mask = torch.ones_like(v, dtype=torch.bool)
    if (mask.sum(dim=-1) == 0).any():
        raise ValueError("project_simplex: a row has no entries to project onto (empty mask)")
    neg = torch.finfo(v.dtype).min
    u, _ = torch.sort(torch.where(mask, v, torch.full_like(v, neg)), dim=-1, descending=True)
    valid = torch.sort(mask.to(torch.int8), dim=-1, descending=True).values.bool()  # masked-in entries come first
    u = torch.where(valid, u, torch.zeros_like(u))
    css = u.cumsum(dim=-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / k > 0) & valid
    rho = cond.to(v.dtype).cumsum(dim=-1).argmax(dim=-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return torch.where(mask, (v - theta).clamp_min(0), torch.zeros_like(v))


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images (and logits): bilinear, align_corners=False."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class scores to the label size: bilinear, align_corners=False (section 3.1, evaluation)."""
    return resize_image(logits, size)


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Label maps (B, H, W) or (H, W): nearest neighbour, so that no new class values appear.

    Centre-aligned (PIL's NEAREST, the authors' release): output cell ``j`` takes the input pixel under its centre,
    ``floor((j + 0.5) * H / h)``; for a feature grid of stride 8 that is pixel ``8j + 4``, the pixel the centred
    feature grid sees. (PyTorch's ``mode="nearest"`` takes ``floor(j * H / h)``, the cell's top-left pixel: 3.5
    pixels away from the cell centre at stride 8.)
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    squeeze = labels.dim() == 2
    x = labels[None, None] if squeeze else labels[:, None]
    out = F.interpolate(x.float(), size=tuple(size), mode="nearest-exact").to(labels.dtype)
    return out[0, 0] if squeeze else out[:, 0]


def resize_activations(activations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Prototype or group activation maps (B, K, h, w): nearest neighbour, so each cell keeps its own value."""
    if tuple(activations.shape[-2:]) == tuple(size):
        return activations
    return F.interpolate(activations, size=tuple(size), mode="nearest")
