"""The README and docs/*.md name only commands, options, repository paths and Python names that exist.

- Commands: every ``scaleprotoseg VERB [ACTION] --option ...`` in a code block or in backticks is checked against the
  argparse parsers the CLI builds (``cli.build_parser`` and each verb module's ``add_arguments``), and the keys of
  its ``--set KEY=VALUE`` against the config schema.
- Paths: backticked paths that start with a top-level entry of the repository (``src/``, ``docs/``, ``configs/``,
  ...) and relative Markdown links must exist; ``<name>`` and ``*`` are wildcards and ``{a,b}`` alternatives. Paths
  that runs create (``runs/...``, ``data/...``, ``weights/...``) are in an explicit allow-list.
- Python names: backticked dotted names of the package (``scaleprotoseg.data.folder.write_sample``,
  ``ops.project_simplex``) must import, or be config keys (``data.crop_size``, ``train.stages.joint.steps``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import itertools
import re
import shlex
import typing
from pathlib import Path

import pytest

import scaleprotoseg
from scaleprotoseg import cli
from scaleprotoseg.config import Config, StageConfig, TrainConfig

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Created at run time, not in the repository: run directories, datasets, weights, outputs.
RUNTIME_PREFIXES = ("runs/", "data/", "weights/", "bench-results/", ".venv/", "explain/", "expl/", "out/")
RUNTIME_NAMES = {"PROVENANCE.md", "tables.md"}  # written by `data samples` and `analyze aggregate`
TOP_LEVEL = sorted(p.name for p in ROOT.iterdir() if not p.name.startswith(".") and p.name != "data")
PACKAGE_MODULES = {p.stem for p in Path(scaleprotoseg.__file__).parent.iterdir() if not p.name.startswith("_")}

CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?:^|\s|/|-m )scaleprotoseg ([a-z].*)$")


def _text(page: Path) -> str:
    return page.read_text()


def _commands(page: Path) -> list[str]:
    """``scaleprotoseg ...`` command lines of a page: code-block lines (continuations joined) and inline spans."""
    text = _text(page)
    lines: list[str] = []
    for block in CODE_BLOCK.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += INLINE.findall(CODE_BLOCK.sub("", text))
    found = []
    for line in lines:
        line = re.split(r"\s#\s", line, maxsplit=1)[0]  # a trailing comment
        m = COMMAND.search(line.strip())
        if m:
            found.append(m.group(1))
    return found


def _parser_tree(verb: str) -> argparse.ArgumentParser:
    module = importlib.import_module(f"scaleprotoseg.commands.{verb}")
    parser = argparse.ArgumentParser(prog=f"scaleprotoseg {verb}")
    module.add_arguments(parser)
    return parser


def _options(parser: argparse.ArgumentParser) -> tuple[set[str], dict[str, argparse.ArgumentParser]]:
    options: set[str] = set()
    actions: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        options.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            actions.update(action.choices)
    return options, actions


def command_problems(command: str) -> list[str]:
    """What is wrong with one documented command line (``command`` starts after ``scaleprotoseg``)."""
    try:
        tokens = shlex.split(command.replace("[", " ").replace("]", " ").replace("\\|", "|"))
    except ValueError:
        tokens = command.replace("[", " ").replace("]", " ").split()
    tokens = [t for t in tokens if t not in ("...", "|")]
    if not tokens:
        return []
    verb = tokens[0]
    if verb not in cli.VERBS:
        return [f"unknown verb {verb!r}; the CLI has {', '.join(cli.VERBS)}"]
    options, actions = _options(_parser_tree(verb))
    rest = tokens[1:]
    if actions:
        positional = [t for t in rest if not t.startswith("-")]
        if not positional or positional[0] not in actions:
            return [f"{verb}: expected one of the actions {', '.join(actions)}, got {positional[:1]}"]
        more, _ = _options(actions[positional[0]])
        options = options | more
    top_options, _ = _options(cli.build_parser())
    problems = []
    for before, token in zip(["", *rest], rest):
        if before == "--set" and not _config_key(token.split("=", 1)[0]):
            problems.append(f"{verb}: --set {token!r}: no such config key")
        if token.startswith("-") and not re.fullmatch(r"-\d.*", token):
            name = token.split("=", 1)[0]
            if name not in options | top_options:
                problems.append(f"{verb}: unknown option {name!r}; it has {', '.join(sorted(options))}")
    return problems


def _expand(pattern: str) -> list[str]:
    """``a/{b,c}/d`` -> ``a/b/d``, ``a/c/d``."""
    parts = re.split(r"\{([^{}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def path_exists(path: str) -> bool:
    """Every alternative of ``path`` exists (a wildcard pattern: matches at least one file)."""
    for variant in _expand(path.rstrip("/")):
        glob = re.sub(r"<[^>]*>|\.\.\.", "*", variant)
        found = any(ROOT.glob(glob)) if "*" in glob else (ROOT / glob).exists()
        if not found:
            return False
    return True


def _paths(page: Path) -> list[str]:
    text = _text(page)
    found = []
    for span in INLINE.findall(text) + LINK.findall(text):
        for token in span.split():
            token = token.strip("(),;'\"").removeprefix("./")
            if token.startswith(("http:", "https:", "#", "mailto:")) or token.startswith(RUNTIME_PREFIXES):
                continue
            in_repo = token.split("/", 1)[0] in TOP_LEVEL if "/" in token else token.endswith((".md", ".cff"))
            if in_repo and token not in RUNTIME_NAMES:
                found.append(token)
    links = [link.split("#")[0] for link in LINK.findall(text) if not link.startswith(("http", "#", "mailto:"))]
    found += [str((page.parent / link).resolve().relative_to(ROOT)) for link in links if link]
    return found


def _config_key(dotted: str) -> bool:
    """``dotted`` is a key of the config schema (``data.crop_size``, ``train.stages.joint.steps``, ...)."""
    node: object = Config
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        if not dataclasses.is_dataclass(node):
            return True  # below a mapping field (options, lr, ...): free keys
        fields = {f.name: f for f in dataclasses.fields(node)}
        if parts[i] not in fields:
            return False
        if node is TrainConfig and parts[i] == "stages":
            node, i = StageConfig, i + 2  # train.stages.<any stage name>.<field>
            continue
        node = typing.get_type_hints(node)[parts[i]]
        i += 1
    return True


def _resolve(dotted: str) -> bool:
    """Import the longest module prefix of ``scaleprotoseg.<dotted>`` and look the rest up as attributes."""
    parts = dotted.removeprefix("scaleprotoseg.").split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("scaleprotoseg." + ".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if hasattr(obj, name):
                obj = getattr(obj, name)
                continue
            # a dataclass field, or an instance attribute / buffer set in the class's __init__ (``self.stage = ...``)
            init = inspect.getsource(obj.__init__) if inspect.isclass(obj) else ""
            return name in inspect.get_annotations(obj) or f"self.{name} =" in init or f'"{name}"' in init
        return True
    return False


FILE_SUFFIXES = {"json", "jsonl", "yaml", "yml", "md", "csv", "png", "txt", "pt", "onnx", "html", "safetensors"}


def _python_names(page: Path) -> list[str]:
    names = []
    for span in INLINE.findall(CODE_BLOCK.sub("", _text(page))):
        m = re.fullmatch(r"(scaleprotoseg\.)?([a-z_]+(?:\.[A-Za-z_]\w*)+)(\(.*\))?", span.strip())
        parts = m.group(2).split(".") if m else []
        if m and parts[0] in PACKAGE_MODULES and parts[-1] not in FILE_SUFFIXES:  # `config.json` is a file
            names.append(m.group(2))
    return names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_commands_exist(page):
    commands = _commands(page)
    problems = [f"{page.name}: `scaleprotoseg {c}`: {p}" for c in commands for p in command_problems(c)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_paths_exist(page):
    missing = [p for p in _paths(page) if not path_exists(p)]
    assert not missing, f"{page.name} names paths that are not in the repository: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_python_names_exist(page):
    missing = [n for n in _python_names(page) if not (_config_key(n) or _resolve(n))]
    assert not missing, f"{page.name} names Python objects that do not exist: {missing}"


def test_the_checks_find_what_is_wrong():
    """The parsers above catch a wrong verb, action and option, a missing path and a missing name."""
    assert command_problems("train -c configs/x.yaml --resume runs/x --stop-at joint:5") == []
    assert command_problems("data init my-data --val-fraction 0.3") == []
    assert command_problems("trian runs/x")[0].startswith("unknown verb 'trian'")
    assert "expected one of the actions" in command_problems("data chekc my-data")[0]
    assert "unknown option '--stage'" in command_problems("train --stage joint")[0]
    assert "unknown option '--foo'" in command_problems("data check my-data --foo")[0]
    assert "no such config key" in command_problems("train -c x.yaml --set train.stages.joint.stepz=3")[0]
    assert path_exists("configs/<dataset>/<method>.yaml") and path_exists("src/scaleprotoseg/config.py")
    assert path_exists("configs/{cityscapes,pascal_voc}/_base.yaml")
    assert not path_exists("docs/nothing.md") and not path_exists("configs/{cityscapes,nowhere}/_base.yaml")
    assert _resolve("data.folder.write_sample") and _resolve("predict.Predictor.stage")
    assert not _resolve("models.segmenter.build_models") and not _resolve("models.memo.memo")
    assert _config_key("train.stages.joint.lr") and _config_key("data.options.intensity")
    assert not _config_key("data.crop") and not _config_key("train.stages.joint.step")
    page = ROOT / "README.md"
    assert "data samples --out data/samples" in _commands(page) and "docs/paper-map.md" in _paths(page)


def test_one_version_source_and_shipped_configs():
    """The version is written once (``scaleprotoseg.__version__``); the package's link to configs/ sees every file."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "scaleprotoseg.__version__"}
    assert not re.search(r"^version:", (ROOT / "CITATION.cff").read_text(), re.M)
    assert re.fullmatch(r"\d+\.\d+\.\d+", scaleprotoseg.__version__)
    shipped = Path(scaleprotoseg.__file__).parent / "configs"
    mine = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml"))
    assert mine and sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml")) == mine
