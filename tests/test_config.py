from pathlib import Path

import pytest

from scaleprotoseg.config import ConfigError, default_stages, load_config, resolve_config_path, save_config, to_dict

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
    assert [n for n in st] == [
        "warmup",
        "joint",
        "projection",
        "proto_finetune",
        "group_warmup",
        "group_joint",
        "threshold",
    ]
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
    # the release's h_proto fine-tuning after projection: on in every paper ScaleProtoSeg config, off elsewhere
    finetune = {"cityscapes": 2000, "pascal_voc": 6000, "ade20k": 4000, "coco_stuff": 4000, "isbi_em": 10000}
    for dataset, steps in finetune.items():
        ft = load_config(root / dataset / "scaleprotoseg.yaml").train.stages["proto_finetune"]
        assert (ft.enabled, ft.kind, ft.steps, ft.trainable) == (True, "proto_finetune", steps, ["last_layer"])
    assert not default_stages("scaleprotoseg")["proto_finetune"].enabled
    for path in (root / "samples").glob("*scaleprotoseg*.yaml"):
        assert not load_config(path).train.stages["proto_finetune"].enabled, path
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


def test_output_stride_error_names_every_supported_value():
    with pytest.raises(ConfigError, match=r"output_stride: 4 is not supported by resnet101; expected one of \[8, 16"):
        load_config(None, ["model.output_stride=4"])
    assert load_config(None, ["model.output_stride=32"]).model.output_stride == 32
    lite = ["model.backbone=efficientnet_lite0"]
    assert load_config(None, [*lite, "model.output_stride=4"]).model.output_stride == 4
    with pytest.raises(ConfigError, match=r"2 is not supported by efficientnet_lite0; expected one of \[4"):
        load_config(None, [*lite, "model.output_stride=2"])
    unet = [*lite, "model.backbone_options={features: unet}"]
    assert load_config(None, [*unet, "model.output_stride=2"]).model.output_stride == 2
    with pytest.raises(
        ConfigError, match=r"16 is not supported by efficientnet_lite0/unet; expected one of \[1, 2, 4, 8\]"
    ):
        load_config(None, [*unet, "model.output_stride=16"])


def test_configs_path_falls_back_to_the_shipped_copy(tmp_path, monkeypatch):
    """From a directory without ``configs/``, ``configs/...`` is read from the package's copy of the configs."""
    monkeypatch.chdir(tmp_path)
    shipped = resolve_config_path("configs/samples/nuclei_scaleprotoseg.yaml")
    assert shipped.is_absolute() and shipped.is_file() and shipped.parent.parent.name == "configs"
    assert load_config("configs/samples/nuclei_scaleprotoseg.yaml").name == "nuclei-scaleprotoseg"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "own.yaml").write_text("name: own\n")
    assert resolve_config_path("configs/own.yaml") == Path("configs/own.yaml")  # a local file comes first
    with pytest.raises(FileNotFoundError, match="configs/none.yaml"):
        load_config("configs/none.yaml")


@pytest.mark.parametrize(
    "sets, message",
    [
        (["train.stages.joint.trainable=[groups]", "train.stages.joint.lr={groups: 1.0}"], "joint.groups: false"),
        (["train.stages.group_warmup.groups=false"], "uses groups, entropy, l1_group; expected true"),
        (["train.stages.joint.losses=[ce, entropy]"], "uses entropy; expected true"),
        (["model.method=protoseg", "train.stages.x={kind: train, groups: true, steps: 1}"], "x.groups: true needs"),
        (["train.stages.proto_finetune.enabled=true", "train.stages.proto_finetune.trainable=[prototypes]"], "only"),
        (["train.stages.proto_finetune.enabled=true", "train.stages.projection.enabled=false"], "after a projection"),
        (["train.stages.z={kind: proto_finetune, steps: 1, trainable: [last_layer], lr: {last_layer: 1}}"], "before"),
    ],
)
def test_stage_fields_checked_at_load(sets, message):
    """``groups`` is stated, not inferred; proto_finetune trains h_proto alone, between projection and the groups."""
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, sets)
    assert "\n" not in str(err.value)


def test_config_changes_lists_leaf_differences():
    from scaleprotoseg.config import config_changes

    a = load_config(None)
    b = load_config(None, ["train.seed=1", "train.stages.joint.lr.backbone=0.5", "data.crop_size=[8, 8]"])
    assert config_changes(a, a) == {}
    assert config_changes(a, b) == {
        "data.crop_size": [[321, 321], [8, 8]],
        "train.seed": [0, 1],
        "train.stages.joint.lr.backbone": [2.5e-5, 0.5],
    }


NUMERIC_CASES = [  # (key=value, key, value as the message shows it, expected range)
    ("train.stages.joint.lr.backbone=-2.5e-5", "train.stages.joint.lr.backbone", "-2.5e-05", "a finite number > 0"),
    ("train.stages.joint.lr.aspp=.nan", "train.stages.joint.lr.aspp", "nan", "a finite number > 0"),
    ("train.stages.warmup.steps=-1", "train.stages.warmup.steps", "-1", "an integer >= 0"),
    ("train.stages.joint.weight_decay=-1", "train.stages.joint.weight_decay", "-1.0", "a finite number >= 0"),
    ("train.stages.joint.power=.inf", "train.stages.joint.power", "inf", "a finite number >= 0"),
    ("data.crop_size=[0, 32]", "data.crop_size[0]", "0", "an integer >= 1"),
    ("data.max_train_samples=-3", "data.max_train_samples", "-3", "an integer >= 0 (0: all)"),
    ("data.val_batch_size=0", "data.val_batch_size", "0", "an integer >= 1"),
    ("data.msc_scales=[0.5, 0]", "data.msc_scales[1]", "0.0", "a finite number > 0"),
    ("model.bn_momentum=1.5", "model.bn_momentum", "1.5", "a number in [0, 1]"),
    ("model.activation_eps=0", "model.activation_eps", "0.0", "a finite number > 0"),
    ("loss.diversity=-0.25", "loss.diversity", "-0.25", "a finite number >= 0"),
    ("train.stages.pruning.prune_k=0", "train.stages.pruning.prune_k", "0", "an integer >= 1"),
    ("train.seed=-1", "train.seed", "-1", "an integer >= 0"),
    ("data.ignore_index=-1", "data.ignore_index", "-1", "an integer >= 0 (usually 255)"),
]


@pytest.mark.parametrize("override,key,value,expected", NUMERIC_CASES, ids=[c[1] for c in NUMERIC_CASES])
def test_numeric_ranges_checked_at_load(override, key, value, expected, tmp_path):
    """Every numeric field's range: one line naming the file, the key, the value and the range."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  method: protoseg\n" if "pruning" in key else "name: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert str(err.value) == f"{path}: {key}: {value} is out of range; expected {expected}"


def test_bad_yaml_in_set_and_non_utf8_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"--set 'data.crop_size=\[1, 2': the value is not valid YAML"):
        load_config(None, ["data.crop_size=[1, 2"])
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: byte 9 is not UTF-8 text"):
        load_config(path)


def test_ignore_index_must_lie_outside_the_classes(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.num_classes=3", "data.ignore_index=2"])
    assert str(err.value) == (
        f"{path}: data.ignore_index: 2 is out of range; expected an integer >= 0 outside the class indices 0..2 "
        "(usually 255)"
    )
    assert load_config(path, ["data.num_classes=3", "data.ignore_index=3"]).data.ignore_index == 3


def test_numbers_are_read_as_yaml_1_2_in_files_and_set(tmp_path):
    """``1e-4`` is a float (YAML 1.1 reads it as a string), ``010`` ten, ``1:30`` a string; PyYAML's own loader is
    left as it is."""
    import yaml

    from scaleprotoseg.config import yaml_load

    path = tmp_path / "run.yaml"
    path.write_text("loss:\n  l1_proto: 1e-5\ntrain:\n  stages:\n    joint: {lr: {backbone: 2E-5}, steps: 010}\n")
    cfg = load_config(path, ["train.stages.warmup.lr.aspp=1e-4", "loss.entropy=5e-2"])
    assert cfg.loss.l1_proto == 1e-5 and cfg.train.stages["joint"].lr["backbone"] == 2e-5
    assert cfg.train.stages["joint"].steps == 10 and cfg.train.stages["warmup"].lr["aspp"] == 1e-4
    assert cfg.loss.entropy == 0.05
    assert yaml_load("[1e-4, -2.5E+3, .5, 1., 0o17, 0x1f, 1:30, 1_000, .inf, yes, null]") == [
        1e-4,
        -2500.0,
        0.5,
        1.0,
        15,
        31,
        "1:30",
        "1_000",
        float("inf"),
        True,
        None,
    ]
    assert yaml.safe_load("1e-4") == "1e-4" and yaml.safe_load("010") == 8  # SafeLoader unchanged


def test_relative_paths_are_read_against_the_config_file_then_the_current_directory(tmp_path, monkeypatch, caplog):
    (tmp_path / "project" / "configs" / "data" / "beside").mkdir(parents=True)
    (tmp_path / "cwd" / "data" / "here").mkdir(parents=True)
    (tmp_path / "project" / "weights.pth").write_text("")
    monkeypatch.chdir(tmp_path / "cwd")
    configs = tmp_path / "project" / "configs"
    (configs / "_base.yaml").write_text("model: {pretrained: ../weights.pth}\n")
    path = configs / "a.yaml"
    path.write_text("base: _base.yaml\ndata: {root: data/beside}\n")
    cfg = load_config(path)
    assert cfg.data.root == str(configs / "data" / "beside")  # beside the file that states it
    assert cfg.model.pretrained == str(tmp_path / "project" / "weights.pth")  # the base file's own folder
    path.write_text("data: {root: data/here}\nmodel: {pretrained: package}\n")
    cfg = load_config(path)
    assert cfg.data.root == str(tmp_path / "cwd" / "data" / "here")  # not beside it: the current directory's
    assert cfg.model.pretrained == "package"  # a word, not a path
    assert load_config(path, ["data.root=typed"]).data.root == str(tmp_path / "cwd" / "typed")  # --set: typed here
    path.write_text("data: {root: data/nowhere}\n")
    with caplog.at_level("WARNING", logger="scaleprotoseg.config"):
        assert load_config(path).data.root == "data/nowhere"  # kept as written
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"{path}: data.root 'data/nowhere' exists neither beside the config file")
    assert str(configs / "data" / "nowhere") in message and str(tmp_path / "cwd" / "data" / "nowhere") in message


def test_a_copied_config_finds_its_base_beside_it_here_or_in_the_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a directory without configs/
    alone = tmp_path / "mine" / "nuclei.yaml"
    alone.parent.mkdir()
    alone.write_text("base: _cpu_scaleprotoseg.yaml\nname: mine\n")  # a sample config copied without its base file
    with pytest.raises(FileNotFoundError) as err:
        load_config(alone)
    assert str(err.value) == (
        f"{alone}: base '_cpu_scaleprotoseg.yaml' exists neither beside it ({alone.parent / '_cpu_scaleprotoseg.yaml'})"
        f" nor in the current directory ({tmp_path / '_cpu_scaleprotoseg.yaml'}); expected the config it extends "
        "(a shipped one: base: configs/samples/NAME.yaml)"
    )
    shipped = Path(__file__).parents[1] / "configs" / "samples" / "_cpu_scaleprotoseg.yaml"
    expected = to_dict(load_config(shipped, ["name=mine"]))
    alone.write_text("base: configs/samples/_cpu_scaleprotoseg.yaml\nname: mine\n")
    assert to_dict(load_config(alone)) == expected  # the package's copy of configs/samples
    (alone.parent / "_cpu_scaleprotoseg.yaml").write_text("base: configs/samples/_cpu_scaleprotoseg.yaml\n")
    alone.write_text("base: _cpu_scaleprotoseg.yaml\nname: mine\ntrain: {seed: 7}\n")  # a base file beside it
    assert to_dict(load_config(alone)) == {**expected, "train": {**expected["train"], "seed": 7}}
    alone.write_text("base: 3\n")
    with pytest.raises(ConfigError, match=r"nuclei.yaml: base: 3; expected the file name"):
        load_config(alone)
