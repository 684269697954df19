"""The layout holds: imports point down the layers, no module imports itself in a circle, and
importing the product changes nothing in the process (``cli.bootstrap`` is the one place that does)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Top to bottom: a package may import only those after it (README, "Architecture").
LAYERS = ["cli", "deployments", "flows", "tasks", "screening", "store", "imaging", "templates", "model"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every product module and the product modules it imports (at any depth of its code)."""
    modules = {_module_name(path): path for layer in LAYERS for path in (ROOT / layer).rglob("*.py")}
    found: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            found[name].update(target for target in targets if target in modules and target != name)
    return {name: found[name] for name in modules}


def test_imports_point_down_the_layers():
    rank = {layer: index for index, layer in enumerate(LAYERS)}
    upward = sorted(f"{module} -> {target}" for module, targets in _imports().items() for target in targets
                    if rank[target.split(".")[0]] < rank[module.split(".")[0]])
    assert not upward, f"imports pointing up the layers {LAYERS}: {upward}"


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_model_stays_free_of_prefect_storage_and_the_environment():
    offenders = []
    for path in (ROOT / "model").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name} imports {name}" for name in names
                          if name.split(".")[0] in {"prefect", "boto3", "botocore", "store", "tasks", "flows"}]
            if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv", "putenv"}:
                offenders.append(f"{path.name} reads the environment (line {node.lineno})")
    assert not offenders, offenders


def test_importing_the_product_changes_nothing_in_the_process(tmp_path):
    """Every module of every package but cli/ imported in a fresh interpreter: the environment
    variables and the Prefect loggers' filters are as they were (third-party libraries may set
    their own variables at import; ours must not)."""
    script = """
import importlib, json, logging, os, pkgutil, sys
sys.path.insert(0, sys.argv[1])
packages = sys.argv[2].split(",")
import tensorflow, prefect, keras  # their own import-time variables, taken out of the comparison
before = dict(os.environ)
filters = {name: len(logging.getLogger(name).filters) for name in ("prefect.flow_runs", "prefect.task_runs")}
for package in packages:
    module = importlib.import_module(package)
    for found in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(found.name)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
after = {name: len(logging.getLogger(name).filters) for name in filters}
print(json.dumps({"changed": changed, "filters": [filters, after]}))
"""
    packages = [layer for layer in LAYERS if layer != "cli"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script, str(ROOT), ",".join(packages)], capture_output=True,
                            text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["changed"] == [], f"importing {packages} changed environment variables: {found['changed']}"
    assert found["filters"][0] == found["filters"][1], "importing the product changed Prefect's loggers"


def test_bootstrap_sets_the_process_options_and_keeps_the_users(tmp_path):
    script = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"  # the user's choice
from cli import bootstrap
bootstrap(settings_file=False)
import logging
print(json.dumps({key: os.environ.get(key) for key in ("TF_ENABLE_ONEDNN_OPTS", "PREFECT_SERVER_ANALYTICS_ENABLED")}
                 | {"filters": len(logging.getLogger("prefect.flow_runs").filters)}))
"""
    result = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == {"TF_ENABLE_ONEDNN_OPTS": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "filters": 1}
