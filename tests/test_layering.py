"""The rooms' import rules (docs/design.md, "Data flow"), read from the source so that an import inside a
function counts as much as one at the top: a room that reaches the wrong way fails here, naming file and import."""
from __future__ import annotations

import ast
import importlib.util
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "geoalign_jax"
CONFIGS = PACKAGE.parent / "configs"

# room (a sub-package or a top-level module of geoalign_jax) -> the rooms it must never import
FORBIDDEN = {
    "models": {"data", "losses", "eval", "train", "convert", "params_checkpoint"},
    "losses": {"data", "eval", "train", "convert", "params_checkpoint"},
    "data": {"models", "losses", "eval", "train", "convert", "params_checkpoint"},  # grain workers stay jax-free
    "eval": {"losses", "train"},  # RoI-Align comes from models/, parameters from params_checkpoint
    "convert": {"losses", "train", "eval"},
    "params_checkpoint": {"losses", "train", "eval", "convert", "data"},
    "checkpoint_steps": {"models", "losses", "data", "eval", "train", "convert", "parallel", "params_checkpoint"},
    "batch_contract": {"models", "losses", "data", "eval", "train", "convert", "parallel", "params_checkpoint"},
    # leaves every room may use (plain Python): they import no room
    **{leaf: {"models", "losses", "data", "eval", "train", "convert", "parallel", "params_checkpoint", "batch_contract",
              "tokenizer"} for leaf in ("config_checks", "error_text", "cli_logging")},
    # runs before anything else in a CLI process (it may re-execute it): imports no room
    "host_allocator": {"models", "losses", "data", "eval", "train", "convert", "parallel", "params_checkpoint",
                       "batch_contract", "config_checks", "error_text", "cli_logging", "tokenizer"},
}


# data/filesystem.py (local paths and gs:// behind one API) imports only error_text: a leaf in data/'s folder,
# which checkpoint_steps and params_checkpoint use for gs:// workdirs without importing the rest of data/.
FILESYSTEM_LEAF = "geoalign_jax.data.filesystem"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_rooms(path: pathlib.Path) -> list[tuple[str, str]]:
    """(room, dotted name) of every geoalign_jax import in the file, wherever it sits."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            relative = "." * node.level + (node.module or "")
            base = importlib.util.resolve_name(relative, package) if node.level else node.module
            # `from geoalign_jax import tokenizer`: the room is the imported name
            targets = [f"{base}.{alias.name}" if base == "geoalign_jax" or f"{base}.{alias.name}" == FILESYSTEM_LEAF
                       else base for alias in node.names]
        else:
            continue
        for target in targets:
            parts = (target or "").split(".")
            if target == FILESYSTEM_LEAF:  # the one file-system layer, a leaf any room may reach (see above)
                found.append(("filesystem", target))
            elif parts[0] == "geoalign_jax" and len(parts) > 1:
                found.append((parts[1], target))
            elif parts[0] == "configs":  # the recipes: above the package, so no room may reach them
                found.append(("configs", target))
    return found


def _room(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_no_room_imports_against_the_data_flow():
    violations = [
        f"{path.relative_to(PACKAGE.parent)} imports {target}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for room, target in _imported_rooms(path)
        if room in FORBIDDEN.get(_room(path), set())
    ]
    assert not violations, "\n".join(violations)


def test_the_scan_sees_imports_inside_functions():
    """eval/regions.py imports RoI-Align lazily, inside a function: the scan must see it (or it checks nothing)."""
    assert ("models", "geoalign_jax.models.roi_align") in _imported_rooms(PACKAGE / "eval" / "regions.py")
    assert set(FORBIDDEN) <= {_room(path) for path in PACKAGE.rglob("*.py")}


def test_no_arrow_runs_back_up_from_the_package_to_the_recipes():
    """configs/ is data (recipes): no package file imports it, and a recipe reads the schema from the package,
    not from another configs/ module (the old configs/common.py alias excepted)."""
    back_up = [f"{path.relative_to(PACKAGE.parent)} imports {target}" for path in sorted(PACKAGE.rglob("*.py"))
               for room, target in _imported_rooms(path) if room == "configs"]
    assert not back_up, "\n".join(back_up)
    between_recipes = [
        f"{path.relative_to(PACKAGE.parent)} imports {target}" for path in sorted(CONFIGS.glob("*.py"))
        if path.name != "common.py"
        for room, target in _imported_rooms(path) if room == "configs"
    ]
    assert not between_recipes, "\n".join(between_recipes)
    assert ("train", "geoalign_jax.train") in _imported_rooms(CONFIGS / "farslip.py")  # the scan reads recipes
