"""The package's layers: imports only go down, no cycle (imports inside functions counted), the
recipe root imports nothing heavy, and only the commands print."""
import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

from dsclip_testutils import REPO

# Lowest first. A module may import modules of its own layer (without a cycle) and of lower layers;
# the first pattern a module name matches gives its layer.
LAYERS = [
    ("base", ["dsclip", "dsclip.errors", "dsclip.logs", "dsclip.fileio", "dsclip.credentials", "dsclip.metric_keys",
              "dsclip.ranks", "dsclip_kernels", "dsclip_kernels.*"]),
    ("config", ["dsclip.*.config", "dsclip.config", "dsclip.data.templates", "dsclip.model.architectures"]),
    ("components", ["dsclip.model", "dsclip.model.*", "dsclip.data", "dsclip.data.*", "dsclip.loss", "dsclip.loss.*",
                    "dsclip.report", "dsclip.report.*"]),
    ("evaluation", ["dsclip.eval", "dsclip.eval.*"]),
    ("runs", ["dsclip.training", "dsclip.training.*", "dsclip.ensemble", "dsclip.ensemble.*"]),
    ("commands", ["dsclip.commands", "dsclip.commands.*", "dsclip.train", "dsclip.cli"]),
]
HEAVY = {"torch", "open_clip", "deepspeed", "matplotlib", "webdataset", "wandb", "triton", "numpy", "PIL"}
PRINTING = {"commands"}  # the only layer that writes to stdout/stderr itself


# folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"dsclip": "dsclip", "kernels": "dsclip_kernels"}


def module_files() -> dict[str, Path]:
    files = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [package, *path.relative_to(REPO / folder).with_suffix("").parts]
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages (kernels/ installs under another name): a new folder must join."""
    import tomllib
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dsclip").rglob("__init__.py")}
    assert folders | {"dsclip_kernels"} == listed


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known)
    return found - {name}


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(path, name, set(files)) for name, path in files.items()}


def layer_of(module: str) -> int:
    return next(i for i, (_, patterns) in enumerate(LAYERS) if any(fnmatch.fnmatchcase(module, p) for p in patterns))


def test_every_import_goes_down_or_stays_in_its_layer():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_counting_imports_inside_functions():
    edges, cycles = graph(), []
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [node, target]))
            elif target not in state:
                visit(target, path + [node] if target != node else path)
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_importing_the_recipe_root_loads_no_heavy_library():
    code = "import sys, dsclip.config; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.split())
    assert not loaded & HEAVY, f"import dsclip.config loads {sorted(loaded & HEAVY)}"


def test_only_the_commands_print():
    """Everything else reports through the `dsclip` logger; `python -m` entry blocks may print."""
    printing = []
    for name, path in module_files().items():
        if LAYERS[layer_of(name)][0] in PRINTING:
            continue
        tree = ast.parse(path.read_text())
        main_blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        allowed = {id(node) for block in main_blocks for node in ast.walk(block)}
        printing += [f"{path.relative_to(REPO)}:{node.lineno}" for node in ast.walk(tree)
                     if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
                     and id(node) not in allowed]
    assert not printing, "print() outside the commands layer: " + ", ".join(printing)
