"""The README and the docs/ pages name only code that exists: the equation table's `file:function` entries are
defined where it says, it covers every numbered equation of the paper, and every repository path, dotted
`transfgu_dist.` name, config key and local link in the pages, the cluster configs, the sweep spaces and the jobs
resolves."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from transfgu_dist.config import Config

ROOT = Path(__file__).resolve().parents[1]
# the guide, its pages, and where its commands and paths are also written down
FILES = [
    ROOT / "README.md",
    *sorted(ROOT.glob("docs/*.md")),
    *sorted(ROOT.glob("cluster/*.yaml")),
    *sorted(ROOT.glob("tune_spaces/*.yaml")),
    *sorted(ROOT.glob("jobs/*.py")),
]
N_EQUATIONS = 16  # the paper numbers Eqs 1-16
PATH = re.compile(r"(?<![\w./-])((?:transfgu_dist|jobs|cluster|tune_spaces|docs|tests|benchmarks|configs)/[\w./-]*\w)")
DOTTED = re.compile(r"(?<![\w./-])(transfgu_dist(?:\.\w+)+)")
LINK = re.compile(r"\]\(([^)#:]+)(?:#[^)]*)?\)")
ENTRY = re.compile(r"`([\w/]+\.py):([\w.]+)`")
SECTIONS = {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}  # section -> its default
SECTIONS = {name: value for name, value in SECTIONS.items() if dataclasses.is_dataclass(value)}
KEY = re.compile(rf"(?<![\w./-])({'|'.join(SECTIONS)})\.(\w+)(?=[=`\s,)])")


def definitions(source: Path) -> set[str]:
    """Qualified names of the module's classes, functions, methods and assignments (module and class level)."""
    names: set[str] = set()

    def walk(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + node.name)
                if isinstance(node, ast.ClassDef):
                    walk(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.Assign):
                names.update(prefix + t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(prefix + node.target.id)

    walk(ast.parse(source.read_text()).body, "")
    return names


def equation_rows() -> list[tuple[str, list[tuple[str, str]]]]:
    """(paper cell, [(file, function), ...]) of each row of the README's "Equations -> code" table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Equations -> code", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    return [(cells[0].strip(), ENTRY.findall(cells[-1])) for cells in rows[1:]]


def test_equation_table_names_real_functions():
    rows = equation_rows()
    assert len(rows) >= N_EQUATIONS
    for paper, entries in rows:
        assert entries, f"README equation row {paper!r} names no file:function"
        for file, function in entries:
            assert (ROOT / file).is_file(), f"README equation row {paper!r}: {file} does not exist"
            assert function in definitions(ROOT / file), f"README equation row {paper!r}: {file} has no {function}"


def test_equation_table_covers_every_equation():
    covered = {int(n) for paper, _ in equation_rows() if paper.startswith("Eq") for n in re.findall(r"\d+", paper)}
    assert covered == set(range(1, N_EQUATIONS + 1))


def test_definitions_finds_methods_and_rejects_missing_ones():
    names = definitions(ROOT / "transfgu_dist" / "method" / "decoder.py")
    assert {"MaskTransformer", "MaskTransformer.forward", "DecoderOutput", "DecoderOutput.logits"} <= names
    assert "MaskTransformer.backward" not in names and "forward" not in names


@pytest.mark.parametrize("page", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_names_and_links_exist(page):
    text = page.read_text()
    for path in PATH.findall(text):
        assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"
    for name in DOTTED.findall(text):
        parts = name.split(".")
        n = max(i for i in range(1, len(parts) + 1) if module_file(parts[:i]) is not None)
        rest = ".".join(parts[n:])
        assert not rest or rest in definitions(module_file(parts[:n])), f"{page.name} names {name}, not defined"
    for link in LINK.findall(text):
        assert (page.parent / link).exists(), f"{page.name} links to {link}, which does not exist"


@pytest.mark.parametrize("page", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_keys_exist(page):
    for section, key in KEY.findall(page.read_text()):
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
        assert key in fields, f"{page.name} names the config key {section}.{key}, which does not exist"


def module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None
