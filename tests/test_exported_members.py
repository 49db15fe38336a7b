"""The public surface is exactly what ``__all__`` says (httpx's test_exported_members)."""

import types

import pytest

import domain
import eventstore
import tiu


@pytest.mark.parametrize("module", [tiu, eventstore, domain], ids=lambda m: m.__name__)
def test_all_lists_exactly_the_public_names(module):
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not (isinstance(value, types.ModuleType) and name not in module.__all__)
    }
    assert set(module.__all__) == public
    assert len(module.__all__) == len(set(module.__all__))


def test_the_face_exports_the_service_and_every_error_a_caller_handles():
    assert {"create_database_service", "DatabaseService"} <= set(tiu.__all__)
    errors = [getattr(tiu, name) for name in tiu.__all__ if name.endswith(("Error", "Denied"))]
    assert all(issubclass(e, Exception) for e in errors)
