"""The shape of the code, held by tests: no import cycles, long modules say why they are long, no code outside the
task classes asks a task whether it has a hook, and --help shows every flag in one of its groups."""
import ast
import dataclasses
import os
import re

from config import FLAG_GROUPS, Config, build_parser
from conftest import ROOT

PACKAGES = ("modes", "textrec")


def project_modules():
    """{module name: path} of the project's own modules (the top level and its packages; not tests, benchmarks)."""
    found = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    for package in PACKAGES:
        for name in os.listdir(os.path.join(ROOT, package)):
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                found[module] = os.path.join(ROOT, package, name)
    return found


def imports_of(path, modules):
    """The project modules a file imports, at any depth (an import inside a function counts too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def test_no_import_cycles():
    modules = project_modules()
    edges = {m: imports_of(path, modules) - {m} for m, path in modules.items()}
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(trail[trail.index(module):] + [module])
        state[module] = "open"
        for imported in sorted(edges[module]):
            visit(imported, trail + [module])
        state[module] = "done"

    for module in sorted(modules):
        visit(module, [])


def test_long_modules_say_why_at_their_top():
    for module, path in project_modules().items():
        source = open(path).read()
        if source.count("\n") > 400:
            docstring = ast.get_docstring(ast.parse(source)) or ""
            assert "over 400 lines" in docstring, f"{module} has {source.count(chr(10))} lines and does not say why"


def test_no_code_outside_the_task_classes_asks_a_task_for_a_hook():
    probing = re.compile(r"\b(hasattr|getattr)\(\s*(self\.)?task\b")
    task_modules = ("tasks", "classification", "textrec.task", "textrec.trocr_student")
    for module, path in project_modules().items():
        if module not in task_modules:
            assert not probing.search(open(path).read()), module


def test_help_shows_every_flag_in_one_group():
    grouped = [name for names in FLAG_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(Config))  # each once
    help_text = build_parser().format_help()
    positions = [help_text.index(f"\n{title}:\n") for title in FLAG_GROUPS]
    assert positions == sorted(positions)  # in FLAG_GROUPS' order
    for title, names in FLAG_GROUPS.items():
        section = help_text.split(f"\n{title}:\n")[1].split("\n\n")[0]
        for name in names:
            assert "--" + name.replace("_", "-") in section, (title, name)
