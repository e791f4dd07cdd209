"""Small per-module memo for values derived from buffers and parameters (prototype layouts, group plans).

Deriving a layout (counts per scale, the member table, the prototypes a group uses) needs the values on the host,
which on a GPU means waiting for every queued kernel. The layouts change only when prototypes are removed, a run is
loaded or group weights are updated, so they are memoised on the module, keyed by the source tensors themselves (held,
so that their storage cannot be reused by another tensor), their storage address (``.to(device)`` swaps it) and
their version counter (which every in-place change, ``load_state_dict`` included, increments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


def memoised(owner: nn.Module, name: str, sources: Sequence[torch.Tensor], compute: Callable[[], T]) -> T:
    """``compute()``, recomputed only when one of ``sources`` was replaced or modified since the last call."""
    key = tuple((t.data_ptr(), t._version, tuple(t.shape), str(t.device)) for t in sources)
    entry = owner.__dict__.get(name)
    if entry is not None:
        held, old_key, value = entry
        if old_key == key and len(held) == len(sources) and all(a is b for a, b in zip(held, sources)):
            return value
    value = compute()
    owner.__dict__[name] = (tuple(sources), key, value)
    return value
