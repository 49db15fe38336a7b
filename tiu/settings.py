"""Settings, read from ``TIU_*`` environment variables; each also a keyword argument."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from eventstore.engine import EngineOptions

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./tiu.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIU_", extra="forbid", frozen=True)

    database_url: str = DEFAULT_DATABASE_URL
    pool_size: int = Field(10, ge=1)
    max_overflow: int = Field(10, ge=0)
    pool_timeout: float = Field(30.0, gt=0)
    pool_recycle: int = Field(1800, ge=-1)
    #: Off by default: a ping is a round trip per transaction (~25% of an append on
    #: PostgreSQL). A connection dropped by a server restart then fails one transaction
    #: with StoreUnavailable, and the pool discards every connection older than it.
    pool_pre_ping: bool = False
    busy_timeout: float = Field(5.0, gt=0)
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "NORMAL"
    lock_timeout_ms: int = Field(5000, ge=0)
    idle_in_transaction_timeout_ms: int = Field(60_000, ge=0)
    echo_sql: bool = False
    #: PostgreSQL only: the schema search path (e.g. a schema per tenant or test run).
    search_path: str | None = None

    bcrypt_rounds: int = Field(12, ge=4, le=31)
    lockout_threshold: int = Field(5, ge=1)
    lockout_window: timedelta = timedelta(minutes=15)
    lockout_duration: timedelta = timedelta(minutes=15)
    session_lifetime: timedelta = timedelta(hours=12)
    session_idle_timeout: timedelta = timedelta(minutes=30)
    session_touch_interval: timedelta = timedelta(minutes=1)
    password_reset_ttl: timedelta = timedelta(hours=1)

    #: A PostgreSQL streaming replica that repositories and audit queries read from
    #: (``tiu.replicas``); commands and projections always use ``database_url``.
    read_database_url: str | None = None
    #: How long a read after a write waits for the replica to replay it before it
    #: reads the primary instead.
    replica_wait: float = Field(1.0, ge=0)
    #: A Redis server for the session cache (``redis://127.0.0.1:6379/0``); off when unset.
    redis_url: str | None = None
    #: Prefix of the cache's keys: one per store sharing the server (a tenant, a test run).
    redis_prefix: str = Field("tiu:", min_length=1, max_length=100)
    #: How long a revoking command waits for the cache to reflect it before returning.
    session_cache_wait: float = Field(2.0, ge=0)

    snapshot_every: int = Field(100, ge=0)
    #: Concurrent commands of this process share one transaction (each in a savepoint).
    group_commit: bool = True
    max_group: int = Field(64, ge=1)
    #: SQLite: a group takes no further command once its commands have used this many
    #: seconds of the event loop thread's CPU (they run on the loop, holding the write
    #: lock); ``None``: only ``max_group``.
    group_budget: float | None = Field(0.004, ge=0)
    command_retries: int = Field(5, ge=0)
    auto_migrate: bool = True
    #: ``DatabaseService.rebuild`` (and the start-up rebuild of stale projections) runs
    #: each rebuild in a child process of its own, leaving the host's event loop, GIL
    #: and garbage collector alone; off: in the host's process, sharing its loop.
    rebuild_in_child: bool = True

    #: Publish the log to NATS JetStream from inside the service (docs/publishing.md);
    #: ``tiu publish`` runs the same publisher as a process of its own.
    run_publisher: bool = False
    nats_url: str = "nats://127.0.0.1:4222"
    publish_name: str = Field("default", min_length=1, max_length=80)
    publish_stream: str = "TIU_EVENTS"
    publish_subject_prefix: str = Field("tiu", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    publish_categories: frozenset[str] | None = None
    publish_types: frozenset[str] | None = None
    publish_personal_data: Literal["encrypted", "omit"] = "encrypted"
    publish_max_in_flight: int = Field(1000, ge=1)
    publish_ack_timeout: float = Field(10.0, gt=0)
    #: Seconds between checkpoint writes (each a short write transaction).
    publish_checkpoint_interval: float = Field(1.0, gt=0)
    #: Fields of the JetStream stream created when missing (nats-py's StreamConfig).
    publish_stream_config: dict[str, Any] = Field(default_factory=dict)
    #: The Ed25519 key that signs checkpoints, kept outside the database: a file holding
    #: it, or the key itself (``TIU_CHECKPOINT_KEY``). ``tiu checkpoint keygen`` makes one.
    checkpoint_key_file: Path | None = None
    checkpoint_key: SecretStr | None = None
    #: ``tiu worker`` grows the Merkle tree (and signs a checkpoint, given a key) once
    #: the log has grown by this many events, or this long after the last round.
    checkpoint_every: int = Field(1000, ge=1)
    checkpoint_interval: timedelta = timedelta(seconds=60)

    def signing_key_text(self) -> str | None:
        """The checkpoint signing key's text, from the environment or its file."""
        if self.checkpoint_key is not None:
            return self.checkpoint_key.get_secret_value()
        if self.checkpoint_key_file is not None:
            return self.checkpoint_key_file.read_text(encoding="utf-8")
        return None

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            pool_size=self.pool_size,
            max_overflow=self.max_overflow,
            pool_timeout=self.pool_timeout,
            pool_recycle=self.pool_recycle,
            pool_pre_ping=self.pool_pre_ping,
            busy_timeout=self.busy_timeout,
            sqlite_synchronous=self.sqlite_synchronous,
            lock_timeout_ms=self.lock_timeout_ms,
            idle_in_transaction_timeout_ms=self.idle_in_transaction_timeout_ms,
            search_path=self.search_path,
            echo=self.echo_sql,
        )
