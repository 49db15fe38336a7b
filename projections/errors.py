"""Errors raised by the read side.

    ProjectionError                      root of everything projections/ raises
     └── InvalidQuery (ValueError)       a caller asked for something a read model can't answer
          ├── InvalidFilter              bad field, operator or value in a filter
          │    └── InvalidOrdering       bad order_by key
          ├── InvalidCursor              a page cursor that is malformed, tampered or foreign
          └── InvalidPagination          limit/offset out of range
     ├── ProjectionFailed                a projector raised on events; its batch rolled back
     ├── ProjectionParked                a projector stopped at an event it cannot apply
     ├── RebuildError                    a rebuild could not finish (its child process failed)
     └── InvalidSkip (ValueError)        an operator's skip names no skippable event

Projector, checkpoint and replay errors belong under ProjectionError too.
Every InvalidQuery is the caller's fault and safe to show them: messages name
the offending part and, where there is a closed set, the valid choices.
"""

from __future__ import annotations


class ProjectionError(Exception):
    """Root of the errors raised by the read side."""


class InvalidQuery(ProjectionError, ValueError):
    """A read-model query that was rejected before it reached the database."""


class InvalidFilter(InvalidQuery):
    """A filter names an unknown field or operator, or carries an unusable value.

    ``field`` and ``operator`` are the parts the caller wrote (``None`` when
    not the issue); ``reason`` is the full message.
    """

    def __init__(self, reason: str, field: str | None = None, operator: str | None = None) -> None:
        super().__init__(reason, field, operator)
        self.reason = reason
        self.field = field
        self.operator = operator

    def __str__(self) -> str:
        return self.reason


class InvalidOrdering(InvalidFilter):
    """An ``order_by`` key names an unknown or unorderable field, or repeats one."""


class InvalidCursor(InvalidQuery):
    """A ``page`` cursor that this table and ordering did not produce."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidPagination(InvalidQuery):
    """``limit`` or ``offset`` outside the accepted range."""


class CheckpointMoved(ProjectionError):
    """Another runner moved a checkpoint during this batch; the batch was rolled back."""

    def __init__(self, name: str, expected: int) -> None:
        super().__init__(f"checkpoint of {name} is no longer at {expected}")
        self.name = name
        self.expected = expected


class InlineProjectionBehind(ProjectionError):
    """An inline projector missed events appended by another path; catch up and retry."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"inline projections behind the log: {', '.join(names)}")
        self.names = names


class ProjectionTimeout(ProjectionError, TimeoutError):
    """``wait_for(position)`` gave up before the projections reached the position.

    The write at ``position`` is committed (do not resend it, or resend it with the
    same ``command_id``); only the read models lag. In worker mode that means no
    worker is running, or it is behind."""

    def __init__(self, position: int, reached: int, timeout: float) -> None:
        super().__init__(
            f"the write at position {position} is committed, but the read models reached "
            f"only position {reached} within {timeout:g}s: projections run in a worker, so "
            "one must be running (`tiu worker`, or run_worker=True)"
        )
        self.position = position
        self.reached = reached
        self.timeout = timeout


class RebuildError(ProjectionError):
    """A rebuild of ``projector`` could not finish (``reason``); its live tables are
    untouched. :meth:`tiu.DatabaseService.rebuild` raises it for a name the service has
    no projector of, and when the rebuild's child process failed: ``exit_code`` is its
    exit status and ``reason`` its last error line. What the child committed before it
    failed is resumed from by the next rebuild of the projector."""

    def __init__(self, projector: str, reason: str, exit_code: int | None = None) -> None:
        super().__init__(f"rebuild of {projector} failed: {reason}")
        self.projector = projector
        self.reason = reason
        self.exit_code = exit_code


class ProjectionFailed(ProjectionError):
    """A projector raised while applying events ``first``..``last`` (one event when
    they are equal); nothing of the batch was committed. ``error`` is the cause."""

    def __init__(
        self, name: str, first: int | None, last: int | None, error: BaseException, event_type: str
    ) -> None:
        where = "a new event" if first is None else f"position {first}"
        if last is not None and last != first:
            where = f"positions {first}-{last}"
        super().__init__(f"projector {name} failed on {where} ({event_type}): {error!r}")
        self.name = name
        self.first = first
        self.last = last
        self.error = error
        self.event_type = event_type


class ProjectionParked(ProjectionError):
    """Projectors stopped at an event they could not apply, after retries: nothing that
    waits for them can succeed until an operator runs ``tiu projections retry NAME`` or
    skips the event. ``parked`` maps each projector's name to its event's position."""

    def __init__(self, parked: dict[str, int]) -> None:
        names = ", ".join(f"{n} at position {p}" for n, p in sorted(parked.items()))
        super().__init__(f"projections parked: {names}")
        self.parked = parked
        self.names = sorted(parked)


class InvalidSkip(ProjectionError, ValueError):
    """A skip that names no event the projector has still to apply, or gives no reason."""
