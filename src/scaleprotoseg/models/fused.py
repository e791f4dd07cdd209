"""Class scores of the prototype heads computed block by block, without keeping the intermediate maps.

Inference needs only the logits, yet the plain forward pass materialises several (B, P, h, w) tensors (distances,
Eq. 1 activations and the intermediate results of each) and pays for their allocation each time: with 1800
prototypes on a 64x64 grid that is ~30 MB each. Here one (P, T) buffer of T cells is reused, channel-first so that
every product is a wide matrix product, and every step runs on it in place:

1. distances per scale, one ``addmm`` per scale written straight into the block's rows (section 3.1);
2. Eq. 1 in place as ``log(1 + (1 - eps) / (d + eps))``, which equals ``log((d + 1) / (d + eps))``;
3. Eq. 2 (grouped heads): each class's member rows gathered, one batched product over classes, then ``exp``;
4. the last layer.

Prototypes that no group uses (weight exactly 0 after thresholding, section 3.2) cannot change the logits, so a
grouped head skips their distances altogether. The result equals ``PrototypeHead.forward(x).logits`` up to float
round-off (tests). It runs without autograd only; training uses the plain forward, which keeps every map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_TINY = 1e-6  # the grouping layer's floor before the log of the 'geometric' form
BLOCK_ELEMENTS = 1 << 23  # distances held at once: 8M floats (32 MB), so memory stays bounded on large images


def blockwise_logits(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    counts: Sequence[int],
    eps: float,
    combine: Callable[[torch.Tensor], torch.Tensor],
    num_outputs: int,
    block: int | None = None,
) -> torch.Tensor:
    """Logits (B, C, h, w) from sigmoid features (B, S*D, h, w) and scale-major prototypes (P, D), ``counts[s]`` of
    them for scale s.

    Works channel-first, on (P, T) blocks of T cells of one image (T = ``block``, default: as many cells as keep
    the block within ``BLOCK_ELEMENTS``). ``combine`` maps a block of activations (P, T) (Eq. 1; it may modify them in
    place) to its class scores (C, T). Nothing is read back to the host, so on a GPU the kernels queue up unhindered.
    """
    B, SD, h, w = features.shape
    P, D = prototypes.shape
    num_scales = len(counts)
    if SD != num_scales * D:
        raise ValueError(f"features have {SD} channels; expected num_scales * D = {num_scales} * {D}")
    if sum(counts) != P:
        raise ValueError(f"counts per scale {list(counts)} sum to {sum(counts)}; expected the {P} prototypes")
    starts = [sum(counts[:s]) for s in range(num_scales)]
    ranges = [(s, a, a + n) for s, (a, n) in enumerate(zip(starts, counts)) if n]
    M = h * w
    T = min(M, block or max(256, BLOCK_ELEMENTS // max(P, 1)))
    protos = [prototypes[a:b] for _, a, b in ranges]
    p2 = [(p * p).sum(dim=1, keepdim=True) + eps for p in protos]  # (P_s, 1), eps of Eq. 1 folded in
    out = features.new_empty(B, num_outputs, M)
    buf = features.new_empty(P, T)
    for bi in range(B):
        z = features[bi].reshape(num_scales, D, M)
        z2 = (z * z).sum(dim=1)  # (S, M)
        for i in range(0, M, T):
            t = min(T, M - i)
            d = buf if t == T else buf[:, :t]
            for (s, a, b), p, pp in zip(ranges, protos, p2):
                rows = d[a:b]
                torch.addmm(pp, p, z[s, :, i : i + t], beta=1, alpha=-2, out=rows)  # ||p||^2 + eps - 2 p.z
                rows.add_(z2[s, i : i + t])  # + ||z||^2: d + eps
            torch.div(1 - eps, d.clamp_min_(eps), out=d)  # max(d, 0) + eps = max(d + eps, eps)
            out[bi, :, i : i + t] = combine(d.add_(1).log_())  # Eq. 1: log(1 + (1 - eps) / (d + eps))
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
            g = g.clamp_min_(_TINY).log_()
        groups = torch.bmm(weight, g).exp_()  # (C, N, T)
        return last_layer @ groups.view(-1, g.shape[-1])

    return combine


def used_subset(
    member_index: torch.Tensor, weight: torch.Tensor, num_prototypes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototypes with a non-zero weight in some group (ascending), and ``member_index`` renumbered into them.

    Members with zero weight everywhere are pointed at column 0: their weight is 0, so any finite activation works.
    """
    used_mask = torch.zeros(num_prototypes, dtype=torch.bool, device=member_index.device)
    used_mask[member_index[(weight != 0).any(dim=1)]] = True
    if not bool(used_mask.any()):
        used_mask[0] = True  # keep one column so that the gather has something to read
    used = torch.nonzero(used_mask).flatten()
    new_index = torch.cumsum(used_mask.long(), 0) - 1
    remapped = torch.where(used_mask[member_index], new_index[member_index], torch.zeros_like(member_index))
    return used, remapped
