"""Class scores of the prototype heads computed block by block, without keeping the intermediate maps.

Inference needs only the logits, yet the plain forward pass materialises several (B, P, h, w) tensors (distances,
Eq. 1 activations and the intermediate results of each) and pays for their allocation each time: with 1800
prototypes on a 64x64 grid that is ~30 MB each. Here one (P, T) buffer of T cells is reused, channel-first so that
every product is a wide matrix product, and every step runs on it in place:

1. distances to every prototype of its own scale (section 3.1): one batched product over the scales, the prototypes
   laid out (S, m, D) with padding slots where a scale has fewer than m;
2. Eq. 1 in place as ``log(1 + (1 - eps) / (d + eps))``, which equals ``log((d + 1) / (d + eps))``;
3. Eq. 2 (grouped heads): each class's member rows gathered, one batched product over classes, then ``exp``;
4. the last layer.

Prototypes that no group uses (weight exactly 0 after thresholding, section 3.2) cannot change the logits, so a
grouped head skips their distances altogether. The result equals ``PrototypeHead.forward(x).logits`` up to float
round-off (tests). It runs without autograd only; training uses the plain forward, which keeps every map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from scaleprotoseg.models.grouping import GEOMETRIC_FLOOR

BLOCK_ELEMENTS = 1 << 23  # distances held at once: 8M floats (32 MB), so memory stays bounded on large images


def blockwise_logits(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    eps: float,
    combine: Callable[[torch.Tensor], torch.Tensor],
    num_outputs: int,
    block: int | None = None,
) -> torch.Tensor:
    """Logits (B, C, h, w) from sigmoid features (B, S*D, h, w) and prototypes laid out per scale (S, m, D)
    (:func:`.layout.padded_layout`; slot ``s * m + j`` is prototype j of scale s).

    Works channel-first, on (S*m, T) blocks of T cells of one image (T = ``block``, default: as many cells as keep
    the block within ``BLOCK_ELEMENTS``): one batched product over the scales gives the block's distances. ``combine``
    maps the block's activations (S*m, T) (Eq. 1; it may modify them in place) to its class scores (C, T). Nothing is
    read back to the host, so on a GPU the kernels queue up unhindered.
    """
    B, SD, h, w = features.shape
    S, m, D = prototypes.shape
    if SD != S * D:
        raise ValueError(f"features have {SD} channels; expected num_scales * D = {S} * {D}")
    M = h * w
    T = min(M, block or max(256, BLOCK_ELEMENTS // max(S * m, 1)))
    p2 = (prototypes * prototypes).sum(dim=2, keepdim=True) + eps  # (S, m, 1), the eps of Eq. 1 folded in
    out = features.new_empty(B, num_outputs, M)
    buf = features.new_empty(S * m, T)
    for bi in range(B):
        z = features[bi].reshape(S, D, M)
        z2 = (z * z).sum(dim=1, keepdim=True)  # (S, 1, M)
        for i in range(0, M, T):
            t = min(T, M - i)
            d = buf if t == T else buf[:, :t]
            ds = d.view(S, m, t)
            torch.baddbmm(p2, prototypes, z[:, :, i : i + t], beta=1, alpha=-2, out=ds)  # ||p||^2 + eps - 2 p.z
            ds.add_(z2[:, :, i : i + t])  # + ||z||^2: d + eps
            torch.div(1 - eps, d.clamp_min_(eps), out=d)  # max(d, 0) + eps = max(d + eps, eps)
            out[bi, :, i : i + t] = combine(d.log1p_())  # Eq. 1: log(1 + (1 - eps) / (d + eps))
    return out.view(B, num_outputs, h, w)


def linear_combine(last_layer: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Stage-1 / ProtoSeg scores: ``h_proto`` (C, P) times the activations (P, T)."""
    return lambda act: last_layer @ act


def group_combine(
    member_index: torch.Tensor, weight: torch.Tensor, last_layer: torch.Tensor, mode: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Grouped scores: Eq. 2 for every group of every class (one batched product over classes), then ``h_group``.

    ``member_index`` (C, K) indexes the activation rows, ``weight`` (C, N, K) is already masked (padding 0),
    ``last_layer`` is (C, C*N) with groups class-major.
    """
    C, K = member_index.shape
    flat = member_index.reshape(-1)

    def combine(act: torch.Tensor) -> torch.Tensor:
        g = act.index_select(0, flat).view(C, K, -1)
        if mode == "geometric":
            g = g.clamp_min_(GEOMETRIC_FLOOR).log_()
        groups = torch.bmm(weight, g).exp_()  # (C, N, T)
        return last_layer @ groups.view(-1, g.shape[-1])

    return combine
