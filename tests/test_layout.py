"""The package's architecture as its imports show it: the method is plain PyTorch, the subpackages form a chain
without circles, and no stage imports another stage."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "transfgu_dist"
ORDER = ["config", "method", "io", "inference", "pipeline"]  # each may import only those before it


def imports() -> dict[str, set[str]]:
    """module name -> the modules and packages of transfgu_dist and the top-level packages it imports."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        out[name] = deps
    return out


def subpackage(module: str) -> str:
    return module.split(".")[1]


def test_method_reads_no_storage_and_imports_no_ray():
    for module, deps in imports().items():
        if module.startswith("transfgu_dist.method"):
            bad = {d for d in deps if d.split(".")[0] in ("ray", "pyarrow", "boto3", "mlflow")}
            bad |= {d for d in deps if d.startswith("transfgu_dist.") and subpackage(d) not in ("config", "method")}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_subpackages_import_only_earlier_ones():
    for module, deps in imports().items():
        if module == "transfgu_dist":
            continue
        own = ORDER.index(subpackage(module))
        for d in deps:
            if d.startswith("transfgu_dist.") and subpackage(d) in ORDER:
                assert ORDER.index(subpackage(d)) <= own, f"{module} imports {d}"


def test_no_stage_imports_another_stage():
    graph = imports()
    stages = {m for m in graph if m.startswith("transfgu_dist.pipeline.stages.") and not m.endswith("stages")}
    assert stages == {
        f"transfgu_dist.pipeline.stages.{s}" for s in ("extract", "cluster", "pseudo_label", "bootstrap", "evaluate")
    }
    for module in stages:
        assert not (graph[module] & (stages - {module})), f"{module} imports another stage"


def test_no_module_cycles():
    found = imports()
    graph = {m: deps & set(found) for m, deps in found.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, "import cycle: " + " -> ".join([*path, d])
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
