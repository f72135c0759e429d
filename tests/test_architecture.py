"""The rules of docs/architecture.md that the code itself can be checked for: the layers (no
import cycle), the error policy (no handler that swallows every exception), no patching of a
library's private names, and one source for the settings that change a tile."""

import ast
import re
from pathlib import Path

import pytest

import zemosaic_cli
import zemosaic_runstate

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("zemosaic_*.py"))

# The handlers allowed to catch every exception without re-raising it, each for its reason.
BROAD_HANDLERS_ALLOWED = {
    # Probing an optional GPU: a broken CUDA installation is "no GPU", never a crash.
    ("zemosaic_utils", "gpu_unavailable_reason"),
    # logging.Handler.emit's own convention: a record that cannot be shown goes to handleError.
    ("zemosaic_gui", "emit"),
    # The front ends' last line: the run has stopped; exit 1 (CLI) or the error dialog (window),
    # the traceback in the run log.
    ("zemosaic_cli", "_run"),
    ("zemosaic_gui", "run"),
}


def _tree(module: str) -> ast.Module:
    return ast.parse((ROOT / f"{module}.py").read_text(), filename=f"{module}.py")


def _is_main_block(node) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _project_imports(module: str) -> set[str]:
    """Return the project modules ``module`` imports, at any depth, but its ``__main__`` block."""
    found = set()

    def visit(node):
        if _is_main_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
            found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(_tree(module))
    return found - {module}


def _cycle(graph: dict) -> list | None:
    """Return one import cycle of ``graph`` as a list of modules, or None."""
    state, stack = {}, []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_module_graph_has_no_cycle():
    graph = {m: _project_imports(m) for m in MODULES}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_bottom_layers_import_only_below_them():
    assert _project_imports("zemosaic_files") == set()
    assert _project_imports("zemosaic_config") <= {"zemosaic_files"}
    # The pipeline does not import its front ends, nor the synthetic data.
    for module in MODULES:
        if module not in ("zemosaic_cli", "zemosaic_gui") and not module.startswith("zemosaic_synth"):
            assert not _project_imports(module) & {"zemosaic_cli", "zemosaic_gui", "zemosaic_synth",
                                                   "zemosaic_synth_sky"}, module


def _functions_with_broad_handlers(module: str):
    """Yield the functions of ``module`` holding an ``except Exception``/``BaseException``/bare
    handler that does not end by raising."""
    def broad(handler):
        names = []
        if handler.type is None:
            return True
        for node in (handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]):
            names.append(node.id if isinstance(node, ast.Name) else getattr(node, "attr", ""))
        return bool({"Exception", "BaseException"} & set(names))

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.ExceptHandler) and broad(node) and not isinstance(node.body[-1], ast.Raise):
            # A handler that re-raises unless the error is the one it expects ends with its
            # raise inside an if: accept a plain `raise` anywhere at the handler's top level.
            if not any(isinstance(s, ast.If) and any(isinstance(b, ast.Raise) for b in s.body)
                       for s in node.body):
                yield function, node.lineno
        for child in ast.iter_child_nodes(node):
            yield from visit(child, function)

    yield from visit(_tree(module), "<module>")


def test_no_handler_swallows_every_exception():
    """The error policy: a bug stops the run. Expected failures are typed exceptions."""
    found = [(m, f, line) for m in MODULES for f, line in _functions_with_broad_handlers(m)
             if (m, f) not in BROAD_HANDLERS_ALLOWED]
    assert found == []


def test_the_handler_check_sees_a_swallowing_handler(tmp_path, monkeypatch):
    (tmp_path / "zemosaic_fake.py").write_text(
        "def f():\n    try:\n        g()\n    except Exception:\n        return None\n"
        "def h():\n    try:\n        g()\n    except BaseException:\n        cleanup()\n        raise\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert list(_functions_with_broad_handlers("zemosaic_fake")) == [("f", 4)]


def test_no_private_name_of_another_module_is_assigned():
    """No monkeypatching of a library's private names (production code; tests monkeypatch)."""
    offences = []
    for module in MODULES:
        tree = _tree(module)
        imported = {a.asname or a.name.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) \
                        and t.value.id in imported and t.attr.startswith("_"):
                    offences.append(f"{module}:{node.lineno} {t.value.id}.{t.attr}")
    assert offences == []


def test_the_code_cites_its_own_map():
    cited = [p.name for p in ROOT.glob("*.py") if "DESIGN.md" in p.read_text()]
    assert cited == []
    assert (ROOT / "docs" / "architecture.md").is_file()


_TILE_TASK_MODULES = ("zemosaic_master_tile", "zemosaic_align_stack", "zemosaic_quality",
                      "zemosaic_photometry", "zemosaic_background")
# Settings a tile task reads that do not change the tile's pixels: where it is written, and the
# backend (the same kernels on CPU and GPU).
_NOT_TILE_SETTINGS = {"output_folder", "use_gpu_phase5", "num_processing_workers"}


def test_the_tile_task_reads_only_the_settings_that_key_a_tile():
    read = set()
    for module in _TILE_TASK_MODULES:
        text = (ROOT / f"{module}.py").read_text()
        read |= set(re.findall(r"\bconfig\.([a-z][a-z0-9_]*)\b", text))
        # Settings named as text (the screening tests look their thresholds up by name).
        read |= {s for s in re.findall(r'"([a-z][a-z0-9_]+)"', text) if s.startswith("screen_")}
    read -= {"replace"}  # MosaicConfig's method, not a setting
    assert read, "no setting found: the pattern no longer matches the code"
    assert read - _NOT_TILE_SETTINGS <= set(zemosaic_runstate.TILE_SETTINGS), \
        sorted(read - _NOT_TILE_SETTINGS - set(zemosaic_runstate.TILE_SETTINGS))


@pytest.mark.parametrize("module", ["zemosaic_executor", "zemosaic_worker", "zemosaic_gui",
                                    "zemosaic_background", "zemosaic_files"])
def test_the_log_level_reaches_every_module(module):
    assert module in zemosaic_cli.pipeline_logger_names()
    assert set(zemosaic_cli.pipeline_logger_names()) == set(MODULES)


def test_every_module_is_installed():
    """pyproject's py-modules list every module: an installed copy imports them all."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as fh:
        listed = tomllib.load(fh)["tool"]["setuptools"]["py-modules"]
    assert sorted(listed) == MODULES
