"""The package's shape: stage packages that import one way, no import cycles, small modules, a short ``train()``.

The import graph among ``finetuning`` modules is read with ``ast`` from every import statement of each module,
at module level and inside functions alike (an import inside a function still ties the two modules together).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "finetuning"
MAX_MODULE_LINES = 450
MAX_TRAIN_LINES = 150
COMMANDS = ("data_preparation", "finetune", "generate", "evaluate", "demo")
STAGES = ("preparation", "training", "evaluation")  # in the order data flows


def _modules() -> dict[str, Path]:
    """{dotted name: file} for every module of the package; a package is named by its ``__init__.py``."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _imported(path: Path) -> set[str]:
    """The finetuning modules ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    return found


GRAPH = {name: _imported(path) for name, path in MODULES.items()}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def _layer(module: str) -> int:
    """0: settings, constants and helpers at the top of the package; 1-3: the stages; 4: the commands."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return 1 + STAGES.index(parts[1])
    return 4 if len(parts) > 1 and parts[1] in COMMANDS else 0


def test_every_module_imports_in_a_fresh_interpreter():
    training = [name for name in MODULES if name.startswith("finetuning.training")]
    script = (
        "import importlib, json, sys\n"
        f"for name in {training!r}: importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('finetuning.evaluation'))\n"
        f"for name in {sorted(MODULES)!r}: importlib.import_module(name)\n"
        "print(json.dumps(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [], "importing training loaded evaluation modules"


def test_import_graph_has_no_cycle():
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every import below it is checked

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [])


def test_imports_flow_one_way_and_training_never_imports_evaluation():
    backwards = [(a, b) for a, targets in GRAPH.items() for b in targets if _layer(b) > _layer(a)]
    assert not backwards, f"imports must flow commands -> stages -> settings/constants: {backwards}"
    for module in MODULES:
        if module.startswith("finetuning.training"):
            evaluation = sorted(m for m in _reachable(module) if m.startswith("finetuning.evaluation"))
            assert not evaluation, f"{module} reaches {evaluation}"


def test_no_module_is_over_the_line_limit():
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert not {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}


def test_train_is_short():
    tree = ast.parse((PACKAGE / "training" / "loop.py").read_text())
    (train,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train"]
    assert train.end_lineno - train.lineno + 1 < MAX_TRAIN_LINES
