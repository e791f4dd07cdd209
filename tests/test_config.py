from pathlib import Path

import pytest

from scaleprotoseg.config import ConfigError, default_stages, load_config, save_config, to_dict

CONFIGS = sorted(p for p in (Path(__file__).parents[1] / "configs").rglob("*.yaml") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert cfg.model.method in path.stem
    save_config(cfg, tmp_path / "resolved.yaml")
    assert to_dict(load_config(tmp_path / "resolved.yaml")) == to_dict(cfg)


def test_paper_hyperparameters_in_configs():
    root = Path(__file__).parents[1] / "configs"
    city = load_config(root / "cityscapes/scaleprotoseg.yaml")
    st = city.train.stages
    assert [n for n in st] == ["warmup", "joint", "projection", "group_warmup", "group_joint", "threshold"]
    assert (st["warmup"].steps, st["joint"].steps, st["group_warmup"].steps, st["group_joint"].steps) == (
        3000,
        30000,
        2000,
        30000,
    )
    assert st["joint"].lr == {"backbone": 2.5e-5, "aspp": 2.5e-4, "prototypes": 2.5e-4}
    assert st["joint"].schedule == "poly" and st["warmup"].schedule == "constant"
    assert city.data.batch_size * st["joint"].accumulation == 10
    assert st["threshold"].alpha == 0.05 and city.loss.diversity == 0.25 and city.loss.l1_group == 1e-3
    ade = load_config(root / "ade20k/scaleprotoseg.yaml")
    assert ade.train.stages["joint"].steps == 60000 and ade.loss.entropy == 0.25 and ade.loss.l1_proto == 1e-5
    assert ade.data.test_mode == "short_side" and ade.data.test_size == 512
    assert load_config(root / "ade20k/protoseg.yaml").model.prototypes_per_class == 12
    assert load_config(root / "pascal_voc/protoseg.yaml").train.stages["finetune"].steps == 6000
    voc = load_config(root / "pascal_voc/scaleprotoseg.yaml").data
    assert voc.msc_scales == [0.5, 0.75, 1.0] and voc.msc_fusion == "features"
    assert (voc.test_mode, voc.test_size) == ("fixed", 513)  # every validation image at 513 x 513, as the release
    em = load_config(root / "isbi_em/scaleprotoseg.yaml")
    assert em.model.backbone == "unet" and not em.model.freeze_bn
    assert (em.loss.entropy, em.loss.l1_group) == (0.05, 1e-4)  # the release's EM values (the text says 0.25)
    assert not em.train.stages["warmup"].enabled and em.train.stages["group_joint"].lr["groups"] == 5e-5


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key 'model.backbon'.*valid keys here: method, backbone"):
        load_config(None, ["model.backbon=resnet18"])


def test_unknown_stage_and_bad_values():
    with pytest.raises(ConfigError, match="deeplabv2 has no stage 'joint'"):
        load_config(None, ["model.method=deeplabv2", "train.stages.joint.steps=3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["data.batch_size=two"])
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(None, ["model.method=unet"])
    with pytest.raises(ConfigError, match="no learning rate for trainable group"):
        load_config(None, ["train.stages.warmup.trainable=[aspp, backbone]"])
    with pytest.raises(ConfigError, match="unknown group 'head'"):
        load_config(None, ["train.stages.warmup.trainable=[head]"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["nonsense"])
    with pytest.raises(ConfigError, match="data.test_size: 0 with test_mode 'fixed'"):
        load_config(None, ["data.test_mode=fixed"])
    with pytest.raises(ConfigError, match="expected one of 'features', 'logits'"):
        load_config(None, ["data.msc_fusion=mean"])


def test_overrides_and_defaults():
    cfg = load_config(None, ["train.stages.joint.steps=7", "data.crop_size=[65, 97]", "model.pretrained=null"])
    assert cfg.train.stages["joint"].steps == 7 and cfg.train.stages["warmup"].steps == 3000
    assert cfg.data.crop_size == [65, 97] and cfg.model.pretrained is None
    assert list(cfg.train.stages) == list(default_stages("scaleprotoseg"))
    custom = load_config(None, ["train.stages.extra={kind: threshold, alpha: 0.1}"])
    assert list(custom.train.stages)[-1] == "extra"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_stage_losses_and_groups_checked_at_load(tmp_path):
    """An unknown loss or trainable group fails when the file loads, on one line naming file, stage, value, choices."""
    path = tmp_path / "run.yaml"
    cases = [
        ("group_warmup", "losses", "[ce, entropyy]", "'entropyy'", "ce, diversity, l1_proto, entropy, l1_group"),
        ("joint", "trainable", "[backbone, protos]", "'protos'", "backbone, aspp, prototypes, groups, last_layer"),
    ]
    for stage, field, value, bad, allowed in cases:
        path.write_text(f"train:\n  stages:\n    {stage}:\n      {field}: {value}\n")
        with pytest.raises(ConfigError) as err:
            load_config(path)
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg and f"train.stages.{stage}.{field}" in msg
        assert bad in msg and allowed in msg
    assert load_config(None, ["train.stages.joint.losses=[ce, l1_proto]"]).train.stages["joint"].losses == [
        "ce",
        "l1_proto",
    ]
