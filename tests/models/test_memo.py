import torch
from torch import nn

from scaleprotoseg.models.memo import memoised


def test_memoised_recomputes_exactly_when_a_source_changes():
    owner = nn.Module()
    owner.register_buffer("a", torch.tensor([1, 2, 3]))
    calls = []

    def compute():
        calls.append(1)
        return int(owner.a.sum())

    assert memoised(owner, "_m", [owner.a], compute) == 6
    assert memoised(owner, "_m", [owner.a], compute) == 6 and len(calls) == 1
    owner.a.add_(1)  # in place: version counter moves
    assert memoised(owner, "_m", [owner.a], compute) == 9 and len(calls) == 2
    owner.a = torch.tensor([5, 5, 5])  # replaced, same shape
    assert memoised(owner, "_m", [owner.a], compute) == 15 and len(calls) == 3
    owner.load_state_dict({"a": torch.tensor([0, 0, 1])})
    assert memoised(owner, "_m", [owner.a], compute) == 1 and len(calls) == 4
