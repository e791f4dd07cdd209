import numpy as np

from scaleprotoseg.analysis.components import ComponentsAccumulator
from scaleprotoseg.analysis.plots import (
    plot_components,
    plot_consistency_stability,
    plot_equivariance,
    plot_group_overlap,
)


def test_every_plot_writes_a_titled_figure(tmp_path):
    rng = np.random.default_rng(0)
    comp = ComponentsAccumulator([0, 1, 2, 3])
    comp.update(rng.random((4, 12, 12)))
    comp_res = comp.compute()
    fig = plot_components({"Cityscapes": comp_res, "ADE20K": comp_res}, path=tmp_path / "fig3.png")
    assert [ax.get_xlabel() for ax in fig.axes] == ["Scale", "Scale"]
    plot_components(comp_res, path=tmp_path / "fig3b.png")

    eq = {q: {"ratio_groups": 0.3, "ratio_prototypes": 0.2, "ratio_classes": 0.6} for q in (0.6, 0.7)}
    fig = plot_equivariance({"Cityscapes": eq, "Pascal": eq}, path=tmp_path / "fig7.png")
    assert len(fig.axes) == 3 and all(ax.get_title() for ax in fig.axes)
    plot_equivariance(eq, path=tmp_path / "fig7b.png")

    cons = {"score": 40.0, "scores": {70.0: 45.0, 80.0: 40.0, 90.0: 35.0}}
    fig = plot_consistency_stability(cons, cons, path=tmp_path / "cs.png")
    assert [ax.get_ylabel() for ax in fig.axes] == ["Consistency (%)", "Stability (%)"]

    ov = {"miou": 40.0, "class_iou": {0: 30.0, 2: 50.0}}
    fig = plot_group_overlap(ov, class_names=["car", "bus", "person"], path=tmp_path / "ov.png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["car", "person"]
    for name in ("fig3.png", "fig3b.png", "fig7.png", "fig7b.png", "cs.png", "ov.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_equivariant_pairs_figure_has_a_row_per_pair(tmp_path):
    from scaleprotoseg.analysis.plots import plot_equivariant_pairs

    rng = np.random.default_rng(0)
    side = {"image": rng.integers(0, 255, (16, 20, 3), dtype=np.uint8), "activation": rng.random((2, 3))}
    panels = [
        {"left": {**side, "label": "prototype 0"}, "right": {**side, "label": "prototype 5"}, "caption": "car"}
        for _ in range(3)
    ]
    fig = plot_equivariant_pairs(panels, path=tmp_path / "fig8.png")
    assert len(fig.axes) == 6 and [ax.get_title() for ax in fig.axes[:2]] == ["prototype 0", "prototype 5"]
    # the activation is laid over the whole image, one cell per block of pixels
    assert fig.axes[0].images[1].get_extent() == [0, 20, 16, 0]
    assert (tmp_path / "fig8.png").is_file()
    assert len(plot_equivariant_pairs([]).axes) == 1  # no pair: a figure that says so
