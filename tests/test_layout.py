"""The layers of docs/design.md: scripts on top, the bratsunet library beneath, imports pointing one way."""
import ast

from conftest import REPO

SCRIPTS = {path.stem for path in REPO.glob("*.py")}
ORCHESTRATORS = {"demo", "crossval"}  # they run whole steps in order
LIBRARY = {path.stem for path in (REPO / "bratsunet").glob("*.py")} - {"__init__"}


def imported_modules(path):
    """The top-level names of the project modules that a file imports (bratsunet.x as x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "bratsunet":
                names |= {f"bratsunet.{alias.name}" for alias in node.names}
            else:
                names.add(node.module)
    return {name.split(".")[1] if name.startswith("bratsunet.") else name for name in names
            if name.split(".")[0] in SCRIPTS or name.startswith("bratsunet.")}


def test_the_library_never_imports_a_script():
    for path in (REPO / "bratsunet").glob("*.py"):
        assert not imported_modules(path) & SCRIPTS, path.name


def test_no_script_imports_another_script_but_the_orchestrators():
    for path in REPO.glob("*.py"):
        scripts = imported_modules(path) & SCRIPTS - {path.stem}
        assert path.stem in ORCHESTRATORS or not scripts, f"{path.name} imports {sorted(scripts)}"


def test_library_imports_have_no_circles():
    graph = {name: imported_modules(REPO / "bratsunet" / f"{name}.py") & LIBRARY - {name} for name in LIBRARY}
    done, path = set(), []

    def visit(name):
        assert name not in path, "import circle: " + " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_every_module_opens_with_a_one_line_summary():
    for path in [*REPO.glob("*.py"), *(REPO / "bratsunet").glob("*.py")]:
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring and docstring.splitlines()[0].strip(), f"{path.name} has no opening summary"
