"""analyze aggregate: fabricated run directories summarised as mean +- std in the paper's table layouts."""

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from scaleprotoseg.analysis.aggregate import AggregateError, build_tables, mean_std, read_run, write_aggregate
from scaleprotoseg.cli import main


def fake_run(root: Path, name: str, dataset: str, method: str, miou: float, *, via_eval: bool = True, **extra):
    """A run directory with only what the aggregation reads: config, mIoU, and optional analysis JSON files."""
    run = root / name
    (run / "analysis").mkdir(parents=True)
    data = {"name": dataset, "root": f"data/{dataset}", "val_split": "val", "options": {}}
    if "split_seed" in extra:
        data["options"]["split_seed"] = extra.pop("split_seed")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data, "model": {"method": method}}))
    if via_eval:
        (run / "eval" / "final-val").mkdir(parents=True)
        (run / "eval" / "final-val" / "summary.json").write_text(json.dumps({"miou": miou}))
    lines = [{"stage": "joint", "event": "validation", "val_miou": 0.01}, {"event": "stage_end", "val_miou": miou}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    for metric, values in extra.items():
        (run / "analysis" / f"{metric}.json").write_text(json.dumps({"metric": metric, **values}))
    return run


@pytest.fixture
def runs(tmp_path):
    out = []
    for seed, (m1, m2) in enumerate([(0.70, 0.72), (0.68, 0.71), (0.69, 0.70)]):
        for method, miou in (("protoseg", m1), ("scaleprotoseg", m2)):
            out.append(
                fake_run(
                    tmp_path,
                    f"pascal-{method}-{seed}",
                    "pascal_voc",
                    method,
                    miou,
                    via_eval=seed != 2,  # the third run only has its training log
                    consistency={"score": 30.0 + seed + (5 if method == "scaleprotoseg" else 0)},
                    stability={"score": 70.0 + 2 * seed},
                    sparsity={"sparsity": 20.0 + seed, "avg_abs_weight": 0.5, "extra_parameters": 12000 + 300 * seed},
                )
            )
    out.append(fake_run(tmp_path, "city-dl", "cityscapes", "deeplabv2", 0.714))
    for seed, split in enumerate((0, 0, 1)):
        out.append(fake_run(tmp_path, f"em-{seed}", "isbi_em", "scaleprotoseg", 0.78 + seed / 100, split_seed=split))
    return out


def test_mean_std_is_the_sample_standard_deviation():
    mean, std, n = mean_std([1.0, 2.0, 3.0, math.nan])
    assert (mean, n) == (2.0, 3) and std == pytest.approx(1.0)
    assert mean_std([5.0]) == (5.0, 0.0, 1)
    assert mean_std([math.nan])[2] == 0


def test_read_run_takes_eval_summary_then_the_training_log(runs):
    rec = read_run(runs[0])
    assert (rec.dataset, rec.method) == ("pascal_voc", "protoseg")
    assert rec.value("miou") == pytest.approx(70.0) and rec.value("consistency") == 30.0
    assert read_run(runs[4]).value("miou") == pytest.approx(69.0)  # no eval/: the last logged validation
    assert read_run(runs[-1]).split_seed == 1
    assert math.isnan(read_run(runs[6]).value("sparsity"))  # not analysed


def test_tables_follow_the_paper_layout(runs):
    tables = {t.name: t for t in build_tables([read_run(r) for r in runs])}
    assert list(tables) == ["table1", "table3_4_pascal_voc", "table5", "table10"]
    t1 = tables["table1"]
    assert t1.value_columns == ["Cityscapes", "Pascal VOC"]  # the paper's column order
    rows = {labels[0]: cells for labels, cells in t1.rows}
    assert list(rows) == ["DeepLabv2", "ProtoSeg", "ScaleProtoSeg"]
    assert mean_std(rows["ScaleProtoSeg"][1])[:2] == pytest.approx((71.0, 1.0))
    assert mean_std(rows["DeepLabv2"][0]) == pytest.approx((71.4, 0.0, 1))
    t3 = tables["table3_4_pascal_voc"]
    assert t3.title.startswith("Table 3") and t3.value_columns == ["Consistency", "Stability", "Sparsity"]
    assert mean_std(dict((lab[0], c) for lab, c in t3.rows)["ScaleProtoSeg"][0])[:2] == pytest.approx((36.0, 1.0))
    t5 = tables["table5"]
    assert t5.value_columns == ["EM Split 1", "EM Split 2"]
    assert mean_std(t5.rows[0][1][0])[:2] == pytest.approx((78.5, math.sqrt(0.5)))
    t10 = dict((tuple(lab), c) for lab, c in tables["table10"].rows)
    assert mean_std(t10[("Pascal VOC", "ProtoSeg")][1])[:2] == pytest.approx((12.3, 0.3))


def test_cli_writes_markdown_and_csv(runs, tmp_path, capsys):
    out = tmp_path / "agg"
    assert main(["analyze", "aggregate", *map(str, runs), "--out", str(out)]) == 0
    md = (out / "tables.md").read_text()
    assert "### Table 1: val mIoU (%)" in md and "| ScaleProtoSeg | - | 71.00 ± 1.00 (n=3) |" in md
    assert "Table 3" in capsys.readouterr().out
    with (out / "table1.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Method", "Cityscapes mean", "Cityscapes std", "Cityscapes n", "Pascal VOC mean"] + [
        "Pascal VOC std",
        "Pascal VOC n",
    ]
    assert rows[3][0] == "ScaleProtoSeg" and float(rows[3][4]) == pytest.approx(71.0) and rows[3][6] == "3"
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + len(runs)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["tables.md", "runs.csv", "table1.csv", "table3_4_pascal_voc.csv", "table5.csv", "table10.csv"]
    )


def test_a_directory_without_config_is_named(tmp_path, capsys):
    with pytest.raises(AggregateError, match=r"config.yaml: no such file"):
        write_aggregate([read_run(tmp_path)], tmp_path / "out")
    assert main(["analyze", "aggregate", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "nope/config.yaml: no such file" in capsys.readouterr().err


def test_unknown_metric_is_an_error(tmp_path, capsys):
    assert main(["analyze", str(tmp_path), "sparsity", "bogus"]) == 1
    assert "unknown metric(s) bogus" in capsys.readouterr().err
