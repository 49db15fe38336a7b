"""A session read model in Redis: token hash -> actor, expiry, idle deadline.

Fed from the log like every projection: the session events (and the user-wide
revocations: password change, deactivation, revoke-all, forget) are read past a
checkpoint, decoded (:func:`projections.projector.decode_records`) and applied in
batches. The checkpoint lives in Redis, and a batch is one Lua script: it checks
that the checkpoint is still where the batch started (so several runners never
apply a batch twice), applies the batch and moves the checkpoint, atomically.

Keys, under ``prefix`` (one per store: a tenant, a test run):

- ``s:<token sha-256>``: a hash (session and user id, started, expires, last seen,
  idle deadline, revoked at and why), expiring at the session's absolute expiry;
  a revoked session keeps its entry, marked, until then;
- ``sid:<session id>`` -> token hash, and ``u:<user id>``: the user's token hashes,
  for revocations by session or by user;
- ``checkpoint``: the position the entries reflect.

Times are milliseconds since the epoch, as strings (Lua numbers are doubles). The
script touches keys it computes, so it needs one Redis server, not a cluster.

How a reader never accepts a revoked session (``tiu.repositories.SessionRepository``):
it answers from Redis only when the checkpoint read with the entry (one round trip)
is at least the head this process has seen committed (its own commits at once,
other processes' through NOTIFY on PostgreSQL); else, and whenever Redis fails, it
reads the SQL read model. A revoking command returns only once Redis reflects it
(bounded), so no instance accepts the token after the call returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from domain import sessions, users
from eventstore.store import EventStore
from projections.projector import Envelope, decode_records
from projections.readmodels._common import occurred_at
from projections.readmodels.sessions import RevokedReason, SessionsProjector

log = logging.getLogger("projections.redis")

#: What a reader treats as "Redis is not usable now": fall back to SQL.
CACHE_ERRORS: Final = (RedisError, OSError, TimeoutError)

_APPLY: Final = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then return {0, current} end
local p = ARGV[3]
local function revoke(th, at, reason)
  local key = p .. 's:' .. th
  if redis.call('HGET', key, 'revoked_at') == '' then
    redis.call('HSET', key, 'revoked_at', at, 'revoked_reason', reason)
  end
end
for _, op in ipairs(cjson.decode(ARGV[4])) do
  local kind = op[1]
  if kind == 'start' then
    local key = p .. 's:' .. op[2]
    redis.call('HSET', key, 'session_id', op[3], 'user_id', op[4], 'started_at', op[5],
      'expires_at', op[6], 'last_seen_at', op[5], 'idle_deadline', op[7],
      'revoked_at', '', 'revoked_reason', '')
    redis.call('PEXPIREAT', key, op[6])
    redis.call('SET', p .. 'sid:' .. op[3], op[2], 'PXAT', op[6])
    redis.call('SADD', p .. 'u:' .. op[4], op[2])
  elseif kind == 'touch' then
    local th = redis.call('GET', p .. 'sid:' .. op[2])
    if th and redis.call('EXISTS', p .. 's:' .. th) == 1 then
      redis.call('HSET', p .. 's:' .. th, 'last_seen_at', op[3], 'idle_deadline', op[4])
    end
  elseif kind == 'revoke' then
    local th = redis.call('GET', p .. 'sid:' .. op[2])
    if th then revoke(th, op[3], op[4]) end
  elseif kind == 'revoke_user' then
    local ukey = p .. 'u:' .. op[2]
    for _, th in ipairs(redis.call('SMEMBERS', ukey)) do
      local started = redis.call('HGET', p .. 's:' .. th, 'started_at')
      if not started then
        redis.call('SREM', ukey, th)
      elseif tonumber(started) < tonumber(op[3]) then
        revoke(th, op[3], op[4])
      end
    end
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return {1, tonumber(ARGV[2])}
"""


def _ms(value: datetime) -> str:
    return str(int(value.timestamp() * 1000))


def _time(value: str) -> datetime:
    return datetime.fromtimestamp(int(value) / 1000, UTC)


@dataclass(frozen=True, slots=True)
class CachedSession:
    session_id: str
    user_id: str
    started_at: datetime
    expires_at: datetime
    last_seen_at: datetime
    idle_deadline: datetime
    revoked_at: datetime | None
    revoked_reason: str | None

    @classmethod
    def from_hash(cls, found: dict[str, str]) -> CachedSession:
        return cls(
            found["session_id"],
            found["user_id"],
            _time(found["started_at"]),
            _time(found["expires_at"]),
            _time(found["last_seen_at"]),
            _time(found["idle_deadline"]),
            _time(found["revoked_at"]) if found["revoked_at"] else None,
            found["revoked_reason"] or None,
        )

    def refusal(self, now: datetime) -> str | None:
        """Why the session may not act at ``now`` (``None``: it may)."""
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if now >= self.idle_deadline:
            return "idle"
        return None


class SessionCache:
    """The Redis session read model of one store (``prefix`` keeps stores apart)."""

    handles: Final = SessionsProjector.handles

    def __init__(
        self, client: Redis, *, prefix: str, idle_timeout: timedelta, batch_size: int = 500
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.idle_timeout = idle_timeout
        self.batch_size = batch_size
        self._checkpoint_key = f"{prefix}checkpoint"
        self._apply = client.register_script(_APPLY)
        self._applied = asyncio.Event()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SessionCache:
        # A short socket timeout: a reader falls back to SQL rather than wait on a dead
        # server. Connecting gets longer: a refused connection fails at once anyway, and
        # 0.5 s timed out a runner's connect on a loaded 2-core CI machine (the timer
        # counts loop time, which other work on the loop delays).
        client = Redis.from_url(
            url, decode_responses=True, socket_timeout=0.5, socket_connect_timeout=2.0
        )
        return cls(client, **options)

    # -- reading ---------------------------------------------------------------------------

    async def lookup(self, token_hash: str) -> tuple[CachedSession | None, int]:
        """The session of ``token_hash`` (``None``: none in Redis) and the checkpoint it
        reflects, read together in one MULTI/EXEC round trip."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(f"{self.prefix}s:{token_hash}")
            pipe.get(self._checkpoint_key)
            found, checkpoint = await pipe.execute()
        session = CachedSession.from_hash(found) if found else None
        return session, int(checkpoint or 0)

    async def checkpoint(self) -> int:
        return int(await self.client.get(self._checkpoint_key) or 0)

    async def wait_for(self, position: int, timeout: float) -> bool:
        """Whether the cache reached ``position`` within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while await self.checkpoint() < position:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._applied.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._applied.wait(), min(remaining, 0.05))
        return True

    # -- projecting ------------------------------------------------------------------------

    def _ops(self, envelope: Envelope) -> list[list[str]]:
        event = envelope.event
        at = _ms(occurred_at(envelope))
        match event:
            case sessions.SessionStarted():
                idle = _ms(event.started_at + self.idle_timeout)
                started, expires = _ms(event.started_at), _ms(event.expires_at)
                ids = [event.token_hash, event.session_id, event.user_id]
                return [["start", *ids, started, expires, idle]]
            case sessions.SessionTouched():
                return [["touch", event.session_id, at, _ms(event.at + self.idle_timeout)]]
            case sessions.SessionRevoked():
                own = event.by == event.user_id
                reason = RevokedReason.LOGOUT if own else RevokedReason.REVOKED
                return [["revoke", event.session_id, at, str(reason)]]
            case users.PasswordChanged():
                reason = (
                    RevokedReason.PASSWORD_RESET
                    if event.via == "reset"
                    else RevokedReason.PASSWORD_CHANGED
                )
                return [["revoke_user", event.user_id, at, str(reason)]]
            case users.UserDeactivated():
                return [["revoke_user", event.user_id, at, str(RevokedReason.USER_DEACTIVATED)]]
            case users.UserSessionsRevoked():
                return [["revoke_user", event.user_id, at, str(RevokedReason.ALL_SESSIONS_REVOKED)]]
            case users.UserForgotten():
                return [["revoke_user", event.user_id, at, str(RevokedReason.USER_FORGOTTEN)]]
        return []

    async def run_batch(self, store: EventStore) -> int:
        """Apply one batch past the Redis checkpoint; returns the events read (0 when
        caught up, or when another runner moved the checkpoint first)."""
        position = await self.checkpoint()
        async with store.engine.connect() as conn:
            head = await store.head_position(conn)
            records = await store.read_all(
                conn, position, self.batch_size, types=sorted(self.handles), until_position=head
            )
            envelopes: Sequence[Envelope] = await decode_records(conn, records) if records else []
        # Positions are gap-free: a batch that is not full reaches the head.
        new = records[-1].position if len(records) == self.batch_size else head
        if new <= position:
            return 0
        ops = [op for e in envelopes for op in self._ops(e)]
        done, _ = await self._apply(
            keys=[self._checkpoint_key],
            args=[str(position), str(new), self.prefix, json.dumps(ops)],
        )
        if not done:
            return 0
        self._applied.set()
        return len(records)

    async def catch_up(self, store: EventStore) -> None:
        while await self.run_batch(store):
            pass

    async def run(self, store: EventStore, stop: asyncio.Event, poll_interval: float = 0.5) -> None:
        """Keep the cache at the log's head until ``stop``; Redis or database failures
        are logged and retried with back-off (readers fall back to SQL meanwhile)."""
        backoff = 0.1
        while not stop.is_set():
            try:
                if await self.run_batch(store):
                    backoff = 0.1
                    continue
                head = await self.checkpoint()
                backoff = 0.1
            except Exception as error:  # logged; the loop is the retry
                log.warning("session cache paused: %r; retrying in %.1fs", error, backoff)
                await _sleep_unless(stop, backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            waiter = asyncio.ensure_future(store.wait_for_append(head, poll_interval))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (waiter, stopper):
                task.cancel()

    async def clear(self) -> int:
        """Delete every key under the prefix (a rebuild starts from position 0)."""
        removed = 0
        async for key in self.client.scan_iter(match=f"{self.prefix}*", count=1000):
            removed += int(await self.client.unlink(key))
        return removed

    async def aclose(self) -> None:
        await self.client.aclose()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
