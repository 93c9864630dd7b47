"""Every setting of the service and the operator, read from ``BEAM_*`` environment variables.

One class per process kind, one home per setting:

- ``StoreSettings``: where the stores are; every process that opens them (the migration and
  integrity jobs, the CLI's local commands) reads only these.
- ``RuntimeSettings``: the stores plus what a ``Runtime`` tunes (caches, holds, the reaper).
- ``ServiceSettings``: the enforcement service, the one process that signs and verifies
  request tokens, so the only class with ``request_token_secret``. Any other process
  never sees the key: the operator's settings have no such field, and the chart renders
  ``BEAM_REQUEST_TOKEN_SECRET`` into the service's pods only.
- ``OperatorSettings``: the Kopf operator.

Secrets have no usable default outside dev: ``ServiceSettings.check_production`` refuses
placeholders so a forgotten ``existingSecret`` fails at start-up, not after money has moved
under a guessable request-token key.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from beam.constants import HOLDS_PER_SCRIPT

DEV_REQUEST_TOKEN_SECRET = "beam-dev-request-token-secret-not-for-production"  # noqa: S105
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", DEV_REQUEST_TOKEN_SECRET})


class Environment(StrEnum):
    DEV = "dev"
    PRODUCTION = "production"


class RedisMode(StrEnum):
    STANDALONE = "standalone"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


class StoreSettings(BaseSettings):
    """Where the stores are. Shared by every process that opens them; no request-token key."""

    model_config = SettingsConfigDict(env_prefix="BEAM_", extra="ignore")

    environment: Environment = Environment.PRODUCTION
    redis_mode: RedisMode = RedisMode.STANDALONE
    # Standalone: the server. Cluster: any node (the rest are discovered).
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Sentinel: "host:port,host:port,..." and the master set name.
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str = "mymaster"
    redis_password: SecretStr | None = None
    redis_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    database_url: SecretStr = SecretStr("postgresql://beam@127.0.0.1:5432/beam")
    database_pool_min: int = Field(default=2, ge=1, le=100)
    database_pool_max: int = Field(default=20, ge=1, le=500)
    # A second, separate pool for the read-only paths (usage analytics, ListCustomers,
    # GetCustomer, VerifyIntegrity, request history), so a burst of them can never hold the
    # connections that settlements, credits, debits and the reaper need (database_pool_max).
    # Opened on demand; a read waits for one of these at most 10 s, then answers
    # STORE_UNAVAILABLE (retry). Counted in the connection budget next to database_pool_max.
    database_read_pool_max: int = Field(default=4, ge=1, le=100)
    # asyncpg's per-connection cache of named prepared statements (asyncpg's default, 100).
    # 0 turns it off (asyncpg then uses the unnamed statement, re-parsed each call): needed
    # behind a transaction-mode pooler that does not track prepared statements, such as
    # PgBouncer before 1.21 or with max_prepared_statements = 0, where a statement prepared
    # on one server connection is missing on the next ("prepared statement does not exist").
    database_statement_cache_size: int = Field(default=100, ge=0, le=10_000)

    @model_validator(mode="before")
    @classmethod
    def split_sentinels(cls, data: object) -> object:
        if isinstance(data, dict):
            raw = data.get("redis_sentinels")
            if isinstance(raw, str):
                data["redis_sentinels"] = [s.strip() for s in raw.split(",") if s.strip()]
        return data

    @model_validator(mode="after")
    def check_sentinels(self) -> Self:
        if self.is_dev:
            return self
        if self.redis_mode is RedisMode.SENTINEL and not self.redis_sentinels:
            raise ValueError("BEAM_REDIS_SENTINELS is required when BEAM_REDIS_MODE=sentinel")
        return self

    @property
    def is_dev(self) -> bool:
        return self.environment is Environment.DEV


class RuntimeSettings(StoreSettings):
    """What a ``Runtime`` (``beam.core.runtime``) tunes besides the stores."""

    hold_ttl_seconds: int = Field(default=900, ge=1, le=86_400)
    reaper_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    # Holds settled per reaper pass (bounded work per tick).
    reaper_batch_size: int = Field(default=500, ge=1, le=10_000)
    # The most holds one Redis script sums or lists (VerifyIntegrity, SyncAll, resyncs);
    # a customer with more is scanned in steps of this many, so its holds never make a
    # script that stalls Redis for everybody (constants.HOLDS_PER_SCRIPT).
    redis_holds_per_script: int = Field(default=HOLDS_PER_SCRIPT, ge=1, le=10_000)
    # How long API keys and prices may be cached before a forced reload (changes are also
    # pushed by PostgreSQL NOTIFY; this is the fallback).
    cache_max_age_seconds: float = Field(default=5.0, gt=0, le=300)
    migrate_on_start: bool = False


class ServiceSettings(RuntimeSettings):
    """The enforcement service (``beam serve``): the only holder of the request-token key."""

    # HMAC key for request tokens (>= 32 characters outside dev).
    request_token_secret: SecretStr = SecretStr(DEV_REQUEST_TOKEN_SECRET)
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(default=9090, ge=0, le=65535)
    log_level: str = "INFO"
    max_body_bytes: int = Field(default=65_536, ge=1024, le=10_485_760)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=600)
    # After SIGTERM, keep serving this long with readiness 503 and gRPC health NOT_SERVING
    # before draining, so load balancers (Endpoints, kube-proxy, ingresses) stop sending first.
    shutdown_delay_seconds: float = Field(default=0.0, ge=0, le=300)
    # While PostgreSQL or Redis is not reachable yet, or the schema is not migrated yet,
    # start-up retries with back-off for this long instead of exiting. 0 = until stopped.
    startup_timeout_seconds: float = Field(default=300.0, ge=0, le=86_400)
    # /ready (and gRPC health) needs "all" stores to answer, or "any": then a Redis failover
    # or a PostgreSQL restart does not take every replica out of its Service at once (calls
    # answer STORE_UNAVAILABLE, which clients retry, instead of connection refused).
    ready_stores: Literal["all", "any"] = "all"
    # gRPC connections are closed (GOAWAY) after this age, so clients reconnect and reach pods
    # the autoscaler added (HTTP/2 otherwise stays on its first pod); in-flight calls get the
    # grace to finish. 0 = never.
    grpc_max_connection_age_seconds: float = Field(default=300.0, ge=0, le=86_400)
    grpc_max_connection_age_grace_seconds: float = Field(default=30.0, ge=0, le=3600)
    # `beam serve --workers N`: N processes share the gRPC and HTTP ports (SO_REUSEPORT), each
    # with its own event loop, stores and pools (count them in the connection budget). The
    # supervisor sets reuse_port and worker for each worker.
    # metrics_port: Prometheus metrics on a port of their own (one process: its own; N
    # workers: their sum, from the supervisor), and none on the HTTP port. 0: /metrics on the
    # HTTP port (each worker's shows only itself).
    workers: int = Field(default=1, ge=1, le=64)
    reuse_port: bool = False
    worker: int = Field(default=0, ge=0, le=63)
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # A direct PostgreSQL connection for LISTEN (API key and price changes), for when
    # BEAM_DATABASE_URL goes through a transaction-mode pooler such as PgBouncer, which cannot
    # carry LISTEN. Unset: LISTEN uses a connection of the pool.
    database_listen_url: SecretStr | None = None

    @model_validator(mode="after")
    def check_production(self) -> Self:
        if self.is_dev:
            return self
        secret = self.request_token_secret.get_secret_value()
        if secret in PLACEHOLDER_SECRETS or len(secret) < 32:
            raise ValueError(
                "BEAM_REQUEST_TOKEN_SECRET must be set to a random value of at least 32 "
                "characters outside dev (BEAM_ENVIRONMENT=dev)"
            )
        return self


class OperatorSettings(StoreSettings):
    """The Kopf operator (``beam operator``). No request-token key: it never signs a token."""

    log_level: str = "INFO"
    # Empty: all namespaces (cluster-wide). Otherwise a comma-separated list.
    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    status_interval_seconds: float = Field(default=10.0, ge=1, le=3600)
    key_rotation_grace_seconds: int = Field(default=3600, ge=0, le=30 * 86_400)
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    # Kopf's liveness endpoint (GET /healthz): healthy while Kopf's activities and watch
    # streams run, unlike the metrics port, which answers even when Kopf is stuck. 0: off.
    health_port: int = Field(default=8081, ge=0, le=65535)
    # A second release in the same cluster: handle only objects labelled
    # beam.dev/operator-instance=<this>. Empty: the objects without that label.
    operator_instance: str = Field(
        default="", max_length=63, pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"
    )
    migrate_on_start: bool = True
    # Kopf peering: operators of one peering see each other and only the one that started
    # last reconciles; the others wait, paused, until its keep-alive (renewed well within
    # peering_lifetime_seconds) stops. The object is a ClusterKopfPeering when watching all
    # namespaces, else a KopfPeering in each watched namespace, and must exist (the chart
    # creates it). standalone: no peering at all (a dev operator; never two at once).
    peering_name: str = Field(
        default="beam",
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    )
    peering_lifetime_seconds: int = Field(default=60, ge=10, le=3600)
    standalone: bool = False

    @model_validator(mode="before")
    @classmethod
    def split_namespaces(cls, data: object) -> object:
        if isinstance(data, dict):
            raw = data.get("namespaces")
            if isinstance(raw, str):
                data["namespaces"] = [s.strip() for s in raw.split(",") if s.strip()]
        return data
