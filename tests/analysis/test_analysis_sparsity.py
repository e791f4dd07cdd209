import numpy as np
import pytest
import torch

from scaleprotoseg.analysis.sparsity import (
    active_prototype_counts,
    active_prototypes_per_class,
    average_abs_weight,
    extra_parameters,
    prototype_counts,
    used_prototypes,
)


def test_protoseg_sparsity_counts_weights_at_or_above_threshold():
    W = np.array([[1.0, 0.004, -0.5, 0.0], [0.006, 1.0, 0.0, -0.005]])
    assert active_prototype_counts(W).tolist() == [2, 3]
    assert active_prototypes_per_class(torch.tensor(W)) == pytest.approx(2.5)
    assert active_prototypes_per_class(W, threshold=0.01) == pytest.approx(1.5)


def _group_matrix():
    # 2 classes x 2 groups over 6 prototypes (class 0: 0-2, class 1: 3-5)
    M = np.zeros((4, 6))
    M[0, [0, 1]] = [0.97, 0.03]
    M[1, [1, 2]] = [0.04, 0.96]
    M[2, 3] = 1.0
    M[3, [4, 5]] = [0.5, 0.5]
    return M


def test_scaleprotoseg_sparsity_counts_distinct_prototypes_reachable_through_active_groups():
    M = _group_matrix()
    W = np.array([[1.0, 0.5, 0.001, 0.0], [0.0, 0.0, 1.0, 0.01]])
    assert active_prototype_counts(W, group_prototype_weights=M).tolist() == [3, 3]
    # alpha 0.05 drops prototype 1 from both groups of class 0
    assert active_prototype_counts(W, group_prototype_weights=M, alpha=0.05).tolist() == [2, 3]
    # class 0 also reaches class 1's group 2 when that weight survives
    W[0, 2] = -0.2
    assert active_prototype_counts(W, group_prototype_weights=M).tolist() == [4, 3]
    assert active_prototypes_per_class(W, group_prototype_weights=M) == pytest.approx(3.5)


def test_used_prototypes_and_average_weight():
    M = _group_matrix()
    assert used_prototypes(M).tolist() == [True] * 6
    assert used_prototypes(M, alpha=0.05).tolist() == [True, False, True, True, True, True]
    assert average_abs_weight(np.array([[1.0, -0.5], [0.0, -0.5]])) == pytest.approx(0.5)


def test_prototype_counts_at_alphas_0_005_01():
    w = np.array(
        [
            [[0.62, 0.30, 0.08], [0.96, 0.04, 0.0]],
            [[1.0, 0.0, 0.0], [0.5, 0.5, 0.3]],  # class 1 owns only 2 slots: the 0.3 is masked out
        ]
    )
    mask = np.array([[True, True, True], [True, True, False]])
    res = prototype_counts(w, mask)
    assert res[0.0]["prototypes"] == 5 and res[0.0]["group_avg"] == pytest.approx(2.0)
    assert res[0.05]["prototypes"] == 5 and res[0.05]["group_avg"] == pytest.approx(1.75)
    assert res[0.1]["prototypes"] == 4 and res[0.1]["group_avg"] == pytest.approx(1.5)
    assert res[0.1]["per_class"].tolist() == [2, 2]


@pytest.mark.parametrize(
    "args, table",
    [
        ((158, 64, 21, 158), 12.1),  # ProtoSeg Pascal
        ((134, 64, 19, 134), 9.9),  # ProtoSeg Cityscapes
        ((131, 64, 21, 63, 21 * 3 * 12), 9.1),  # ScaleProtoSeg Pascal
        ((1132, 64, 150, 450, 150 * 3 * 12), 135.4),  # ScaleProtoSeg ADE20K
    ],
)
def test_extra_parameters_reproduce_table_10(args, table):
    assert extra_parameters(*args) / 1000 == pytest.approx(table, abs=0.4)
