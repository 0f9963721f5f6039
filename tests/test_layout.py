"""The import rules of CONTRIBUTING.md that import-linter cannot express, checked on the source.

- No module imports another module's private (underscore) names, or reaches
  into one through an imported module (`chat._session_csrf_error`).
- The ML core (llm/) imports nothing from Django or the apps even inside a
  function (import-linter sees those too; this names the line when it fails).
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("llm", "finetune_site", "datasets_app", "jobs_app", "deployments_app", "benchmarks")
FORBIDDEN_IN_CORE = (
    "django",
    "rest_framework",
    "channels",
    "celery",
    "finetune_site",
    "datasets_app",
    "jobs_app",
    "deployments_app",
)


def sources() -> list[Path]:
    return sorted(
        path for package in PACKAGES for path in (REPO / package).rglob("*.py") if "migrations" not in path.parts
    )


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    if not level:
        return module or ""
    base = importer.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join([*base, module] if module else base)


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(path: Path, importer: str | None = None) -> list[str]:
    """Each place the file uses another of our modules' private names, as 'line: what'."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    importer = importer or module_name(path)
    is_package = path.name == "__init__.py"
    found, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = absolute(node.module, node.level, importer, is_package)
            for alias in node.names:
                if is_private(alias.name) and source != importer and source.startswith(PACKAGES):
                    found.append(f"{node.lineno}: from {source} import {alias.name}")
                elif not is_private(alias.name):
                    module_aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                module_aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and is_private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
            and module_aliases[node.value.id].startswith(PACKAGES)
        ):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_checker_sees_a_private_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from .chat import _helper\nfrom . import chat\nchat._other()\nfrom os import _exit\n")
    found = private_imports(probe, importer="deployments_app.probe")
    assert found == ["1: from deployments_app.chat import _helper", "3: chat._other"]


@pytest.mark.parametrize("path", sources(), ids=lambda path: str(path.relative_to(REPO)))
def test_no_module_imports_another_modules_private_names(path):
    assert private_imports(path) == []


@pytest.mark.parametrize(
    "path", [p for p in sources() if p.parts[len(REPO.parts)] == "llm"], ids=lambda path: str(path.relative_to(REPO))
)
def test_the_ml_core_imports_no_django_and_no_app(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = [
        (node.lineno, name)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in ([alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if not getattr(node, "level", 0)
    ]
    assert [f"{line}: {name}" for line, name in imported if name.split(".")[0] in FORBIDDEN_IN_CORE] == []
