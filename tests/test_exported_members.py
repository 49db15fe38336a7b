"""The public surface is exactly what ``__all__`` says (httpx's test_exported_members)."""

import importlib
import importlib.metadata
import inspect
import tomllib
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

import domain
import eventstore
import tiu
import tiu.repositories
from tiu.cli import app


@pytest.mark.parametrize("module", [tiu, eventstore, domain], ids=lambda m: m.__name__)
def test_all_lists_exactly_the_public_names(module):
    # dir() and getattr(), not vars(): tiu imports its names on first use (PEP 562).
    public = {
        name
        for name in dir(module)
        if not name.startswith("_")
        and not (isinstance(getattr(module, name), types.ModuleType) and name not in module.__all__)
    }
    assert set(module.__all__) == public
    assert len(module.__all__) == len(set(module.__all__))


def test_the_face_exports_the_service_and_every_error_a_caller_handles():
    assert {"create_database_service", "DatabaseService"} <= set(tiu.__all__)
    errors = [getattr(tiu, name) for name in tiu.__all__ if name.endswith(("Error", "Denied"))]
    assert all(issubclass(e, Exception) for e in errors)


ERROR_MODULES = ["domain.errors", "eventstore.errors", "projections.errors", "tiu.errors"]


def test_every_error_class_of_the_layers_is_exported_from_tiu():
    modules = [importlib.import_module(name) for name in ERROR_MODULES] + [tiu.repositories]
    defined = {
        name
        for module in modules
        for name, value in vars(module).items()
        if inspect.isclass(value)
        and issubclass(value, Exception)
        and value.__module__ == module.__name__
    }
    assert defined - set(tiu.__all__) == set()
    assert {"InvalidPagination", "Conflict", "InvalidQuery"} <= defined


def test_what_callers_type_against_is_exported():
    assert tiu.TaskStatus("in_progress") is tiu.TaskStatus.IN_PROGRESS
    assert tiu.Priority("urgent").rank == 4
    assert {r.value for r in tiu.Role} == {"admin", "member", "viewer"}
    assert {r.value for r in tiu.ProjectRole} == {"viewer", "editor", "manager"}
    assert tiu.SYSTEM_ACTOR == "system"
    assert {"User", "Project", "Task", "Session", "Page", "UserRepository"} <= set(tiu.__all__)


ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["domain", "eventstore", "projections", "tiu", "migrations"]


def test_every_package_ships_py_typed():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    for package in PACKAGES:
        assert (ROOT / package / "py.typed").is_file(), package
        assert "py.typed" in package_data[package], package


def test_the_license_pyproject_declares_is_in_the_repository():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_the_version_is_the_installed_distributions_and_tiu_version_prints_it():
    assert tiu.__version__ == importlib.metadata.version("tiu-core")
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"tiu {tiu.__version__}\n"
