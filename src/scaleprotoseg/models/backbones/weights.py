"""Reading weight files and strict, well-reported state-dict loading shared by the backbones."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_checked", "read_state_dict"]

# Wrapper keys under which training scripts commonly nest the actual state dict.
_NESTING_KEYS = ("state_dict", "model", "model_state_dict", "net")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (``.pth``/``.pt``/other).

    Torch files are read with ``weights_only=True`` on the CPU. A dict nesting the weights under ``state_dict``,
    ``model``, ``model_state_dict`` or ``net`` is unwrapped, and a ``module.`` prefix (DataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # re-raised with the path
            raise ValueError(f"{str(path)!r}: cannot read as a torch state dict ({err})") from err
    for _ in range(2):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{str(path)!r}: expected a non-empty mapping of parameter names to tensors")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{str(path)!r}: the file holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _preview(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_checked(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    optional: tuple[str, ...] = ("num_batches_tracked",),
    skip_missing_prefixes: tuple[str, ...] = (),
) -> None:
    """Copy ``state_dict`` (already in ``model``'s key names) into ``model``, strictly.

    Every key of ``model.state_dict()`` must be present except those ending in one of ``optional`` (batch-norm
    counters, absent from old checkpoints) or starting with one of ``skip_missing_prefixes``; no unexpected key may
    remain and every shape must match. Otherwise a ``ValueError`` names ``source`` and lists the offending keys.
    """
    own = model.state_dict()
    missing = [
        k
        for k in own
        if k not in state_dict and not k.endswith(optional) and not k.startswith(skip_missing_prefixes or ("\0",))
    ]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"cannot load {source} into {type(model).__name__}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_preview(mismatched)}")
        raise ValueError("; ".join(parts))
    with torch.no_grad():
        for k, v in state_dict.items():
            own[k].copy_(v.to(dtype=own[k].dtype))
