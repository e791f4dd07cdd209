"""The import layering of docs/architecture.md: no module imports from a layer above its own."""

import ast
from pathlib import Path

import scaleprotoseg

ROOT = Path(scaleprotoseg.__file__).parent
LAYER = {
    **dict.fromkeys(("config", "ops", "thresholds", "rundir", "data"), 0),  # data and ops at the bottom
    **dict.fromkeys(("losses", "models", "prototypes", "evaluation"), 1),  # models and what works on them
    "checkpoint": 2,  # checkpoints of models
    **dict.fromkeys(("engine", "predict", "export", "pretrained"), 3),  # training, inference, export and sharing
    **dict.fromkeys(("explain", "analysis", "explore"), 4),  # explanations, analyses and reports
    **dict.fromkeys(("commands", "cli", "__main__", "__init__"), 5),  # the commands
}


def _imports(path: Path) -> set[str]:
    """Top-level scaleprotoseg modules ``path`` imports (absolute or relative, anywhere in the file)."""
    package = ["scaleprotoseg", *path.relative_to(ROOT).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names = [".".join([*base, *([node.module] if node.module else [])])]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("scaleprotoseg.")}
    return found


def test_no_module_imports_from_a_higher_layer():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        own = path.relative_to(ROOT).with_suffix("").parts[0]
        assert own in LAYER, f"{path}: add its package to LAYER"
        wrong += [f"{path.relative_to(ROOT)} imports {m}" for m in _imports(path) if LAYER[m] > LAYER[own]]
    assert not wrong, wrong
