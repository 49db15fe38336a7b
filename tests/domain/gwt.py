"""given/when/then for deciders: the command's route picks the decider."""

from functools import reduce
from typing import Any

import pytest
from domain_support import FAKE, decide

from domain import EMPTY, Command, CommandContext, DomainError, Event, route


class _When:
    def __init__(
        self,
        events: tuple[Event, ...],
        command: Command,
        ctx: CommandContext,
        related: Any,
        hasher: Any,
    ) -> None:
        self.given, self.command, self.ctx, self.related = events, command, ctx, related
        self.hasher = hasher

    def events(self) -> list[Event]:
        decider = route(self.command, self.ctx).decider
        state = reduce(decider.evolve, self.given, decider.initial_state())
        return decide(decider, self.command, state, self.ctx, self.related, self.hasher)

    def then(self, *expected: Event) -> None:
        assert self.events() == list(expected)

    def then_raises(self, error: type[DomainError], *, record: tuple[Event, ...] | None = None):
        with pytest.raises(error) as info:
            self.events()
        if record is not None:
            assert info.value.record == record
        return info.value


class given:  # lower-case: reads as a verb in specs
    def __init__(self, *events: Event) -> None:
        self.given = events

    def when(
        self, command: Command, *, ctx: CommandContext, related: Any = EMPTY, hasher: Any = FAKE
    ) -> _When:
        return _When(self.given, command, ctx, related, hasher)
