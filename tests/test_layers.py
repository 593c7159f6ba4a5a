"""The package's layers (README, "Layout"): every module imports only layers listed before
its own, so dependencies point down; core/, io/ and data/ form one bottom layer; only the
``python -m`` doors import the command lines (the top-level modules in DOORS, and a layer's
``__main__.py``, such as ``report/__main__.py`` behind ``python -m rcfd.report``)."""

import ast
from pathlib import Path

import rcfd

PACKAGE = Path(rcfd.__file__).parent
LAYERS = [{"errors"}, {"config"}, {"distributed"}, {"core", "io", "data", "interop"}, {"losses"},
          {"samplers"}, {"training"}, {"methods"}, {"report"}, {"evaluation"}, {"study"}, {"api"}, {"cli"}]
DOORS = {"train", "sample", "evaluate", "export", "__main__"}
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def is_door(path: Path) -> bool:
    return layer_of(path) in DOORS or path.name == "__main__.py"


def imported_layers(path: Path) -> set[str]:
    """The rcfd layers a module imports (``from rcfd import x`` names layer ``x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "rcfd":
                out |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names
                    if a.name.startswith("rcfd.") and len(a.name.split(".")) > 1}
    return out - {"__version__", "_C"}


def test_every_module_imports_only_layers_below_its_own():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer_of(path)
        if is_door(path) or own == "__init__":
            continue
        assert own in RANK, f"{path.relative_to(PACKAGE)}: add its layer to LAYERS and the README"
        for target in imported_layers(path):
            if target not in RANK or RANK[target] > RANK[own]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not wrong, wrong


def test_only_the_doors_import_the_command_lines():
    importers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "cli" in imported_layers(p) and not is_door(p) and layer_of(p) != "cli"}
    assert not importers, importers


def test_a_library_module_beside_a_door_is_still_checked():
    assert is_door(PACKAGE / "report" / "__main__.py") and is_door(PACKAGE / "train.py")
    assert not is_door(PACKAGE / "report" / "study.py")


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from rcfd.study.pipeline import run\nfrom rcfd import report\n")
    assert imported_layers(module) == {"study", "report"}
