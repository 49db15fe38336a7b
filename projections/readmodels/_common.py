"""Helpers shared by the read-model projectors."""

from __future__ import annotations

from datetime import datetime
from typing import Final

from projections.projector import Envelope

ID_LENGTH: Final = 64
"""Aggregate ids (``domain.base.EntityId``) and actor ids, including ``system``."""


def occurred_at(envelope: Envelope) -> datetime:
    """The event's own time (its ``at`` field) when it has one, else when it was recorded."""
    at = getattr(envelope.event, "at", None)
    return at if isinstance(at, datetime) else envelope.recorded_at
