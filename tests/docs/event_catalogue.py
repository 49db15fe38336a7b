"""The event catalogue (docs/events.md), generated from the registered event classes.

    .venv/bin/python -m tests.docs.event_catalogue > docs/events.md

``tests/docs/test_event_catalogue.py`` fails when the page and the code disagree.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from typing import Any

import domain  # registers every event type
from domain import registered_event_types, registered_upcasters
from domain.base import Event

HEADER = """# Event catalogue

Every event type in the log: its stored name, its current schema version, its fields,
which of them hold personal data (encrypted under the subject's key, see
[privacy](privacy.md)), and the upcasters that lift older stored versions on read
(stored events are never rewritten). Generated from the code by
`python -m tests.docs.event_catalogue > docs/events.md`; a test fails when the two
disagree.
"""


def catalogue() -> str:
    by_module: dict[str, list[type[Event]]] = {}
    for cls in registered_event_types().values():
        by_module.setdefault(cls.__module__, []).append(cls)
    upcasters = registered_upcasters()
    lines = [HEADER]
    for module in sorted(by_module):
        lines.append(f"## `{module}`\n")
        for cls in sorted(by_module[module], key=lambda c: c.event_type):
            lines.extend(_event(cls, upcasters))
    return "\n".join(lines).rstrip() + "\n"


def _event(cls: type[Event], upcasters: Any) -> list[str]:
    out = [f"### `{cls.event_type}` (v{cls.schema_version})\n"]
    doc = inspect.getdoc(cls)
    if doc and doc != inspect.getdoc(Event):
        out.append(doc.split("\n\n")[0].replace("\n", " ") + "\n")
    out.append("| field | type | personal |")
    out.append("|---|---|---|")
    for name, info in cls.model_fields.items():
        personal = "yes" if name in cls.personal_fields else ""
        kind = _type_name(info.annotation).replace("|", "\\|")  # a table cell
        out.append(f"| `{name}` | `{kind}` | {personal} |")
    out.append("")
    if cls.personal_fields:
        out.append(f"Subject: `{cls.subject_field}`.\n")
    lifted = sorted(v for (t, v) in upcasters if t == cls.event_type)
    for version in lifted:
        fn = upcasters[(cls.event_type, version)]
        out.append(f"Upcaster v{version} -> v{version + 1}: `{fn.__module__}.{fn.__name__}`.")
    if lifted:
        out.append("")
    return out


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not isinstance(annotation, types.GenericAlias):
        return annotation.__name__
    text = str(annotation)
    return re.sub(r"\b(?:[a-z_][a-z0-9_]*\.)+([A-Za-z_][A-Za-z0-9_]*)", r"\1", text)


if __name__ == "__main__":
    assert domain  # imported for its registrations
    sys.stdout.write(catalogue())
