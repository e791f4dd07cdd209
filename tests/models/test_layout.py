import torch

from scaleprotoseg.models.layout import member_table, padded_index, padded_layout


def test_padded_index_by_hand():
    index, mask = padded_index(torch.tensor([2, 0, 2, 2]), 4)
    assert index.tolist() == [[1, 0, 0], [0, 0, 0], [0, 2, 3], [0, 0, 0]]
    assert mask.tolist() == [[True, False, False], [False] * 3, [True] * 3, [False] * 3]
    index, mask = padded_index(torch.zeros(0, dtype=torch.long), 2)  # no entries: one padding column
    assert index.shape == (2, 1) and not mask.any()


def test_member_table_and_layout_share_the_rows():
    cls, scale = torch.tensor([0, 1, 0, 1, 0]), torch.tensor([1, 0, 1, 1, 0])
    index, mask = member_table(cls, scale, 2, 2)
    assert index.shape == (2, 2, 2)
    assert index[0, 1][mask[0, 1]].tolist() == [0, 2] and index[0, 0][mask[0, 0]].tolist() == [4]
    source, slot, m = padded_layout(scale, 2, torch.tensor([True, True, False, True, True]))
    assert m == 2 and slot.tolist() == [2, 0, -1, 3, 1] and source.tolist() == [1, 4, 0, 3]
    source, slot, m = padded_layout(scale, 2, torch.zeros(5, dtype=torch.bool))  # nothing kept
    assert m == 1 and slot.tolist() == [-1] * 5 and source.tolist() == [0, 0]
