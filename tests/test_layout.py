"""The package's shape: a library below, the commands on top, side by side.

Commands (the modules run with `python -m`) import the library and never each other, as torchvision's
references/detection scripts import `engine` and `utils` and no other script: what two commands share belongs
in the library. The scan reads every module of the package with `ast`, imports inside functions included.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hvd_megdet"
COMMANDS = {"hvd_megdet.train", "hvd_megdet.evaluate", "hvd_megdet.predict", "hvd_megdet.export",
            "hvd_megdet.data.browse", "hvd_megdet.experiments.ablation"} | \
           {f"hvd_megdet.bench.{p.stem}" for p in (PACKAGE / "bench").glob("*.py") if p.stem != "__init__"}


def module_name(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source, module, is_package=False):
    """[(line, module name)] of everything `source` (the code of `module`) imports, at any depth: for
    `from X import y`, both X and X.y (y may be a module), relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def commands_imported(path):
    """[(line, command)] of the command modules that the module at `path` imports, itself aside."""
    module = module_name(path)
    return [(line, name) for line, name in imported_modules(path.read_text(), module, path.stem == "__init__")
            if name in COMMANDS and name != module]


def test_the_scan_finds_what_it_looks_for():
    source = ("import hvd_megdet.train as trainer\nfrom hvd_megdet import evaluate, dist\n"
              "def f():\n    from hvd_megdet.predict import main\n    from .browse import browse\n"
              "from ..export import export\n")
    names = {name for _, name in imported_modules(source, "hvd_megdet.data.x") if name in COMMANDS}
    assert names == {"hvd_megdet.train", "hvd_megdet.evaluate", "hvd_megdet.predict", "hvd_megdet.export",
                     "hvd_megdet.data.browse"}
    assert {"hvd_megdet.train", "hvd_megdet.bench.train_iter", "hvd_megdet.data.browse"} <= COMMANDS


def test_no_module_of_the_package_imports_a_command():
    """Commands are siblings (none imports another) and the library imports none of them."""
    found = [f"{path.relative_to(REPO)}:{line}: imports {name}"
             for path in sorted(PACKAGE.rglob("*.py")) for line, name in commands_imported(path)]
    assert not found, found
