"""Several gateway processes sharing one Postgres database and one Redis (issue 14): three replicas behind
nginx, or one gateway with several uvicorn workers.

The bench uses the servers a test machine runs (Postgres on 127.0.0.1:5432 as `postgres` without a password,
Redis on 127.0.0.1:6379), or the ones BENCH_POSTGRES_URL and BENCH_REDIS_URL name: a database made for the
run and dropped after it, and a key prefix of its own, deleted after it. Without them, the scenarios that
need them say so and are skipped: the other scenarios need neither.
"""

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import redis

from bench.gateway import run_gateway
from bench.nginx import run_nginx
from bench.procs import HOST
from bench.targets import Target

POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


class Unavailable(Exception):
    """Postgres or Redis does not answer: the scenario can't run here."""


@dataclass(frozen=True)
class SharedStores:
    """What the gateway processes share: their settings naming the run's database and Redis prefix, and
    the secrets a token made by one must be accepted with by every other."""

    settings: dict[str, str]


@contextlib.contextmanager
def shared_stores() -> Iterator[SharedStores]:
    """A throwaway database and Redis key prefix for one scenario; Unavailable if either server is missing."""
    name = f"bench_{secrets.token_hex(4)}"
    prefix = f"{name}:"
    try:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        cache = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        cache.ping()
    except (psycopg.Error, redis.RedisError, OSError) as exc:
        raise Unavailable(f"needs Postgres at {POSTGRES_URL} and Redis at {REDIS_URL}: {exc}") from None
    database = psycopg.conninfo.make_conninfo(POSTGRES_URL, dbname=name)
    try:
        yield SharedStores(
            {
                "DATABASE_URL": _as_url(database),
                "REDIS_URL": REDIS_URL,
                "REDIS_PREFIX": prefix,
                "SECRET_KEY": secrets.token_hex(32),
                "ADMIN_PASSWORD": secrets.token_urlsafe(32)[:20],
            }
        )
    finally:
        keys = list(cache.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            cache.delete(*keys)
        cache.close()
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _as_url(conninfo: str) -> str:
    """DATABASE_URL for a libpq keyword string (the gateway takes URLs)."""
    parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    user = parts.get("user") or "postgres"
    password = f":{parts['password']}" if parts.get("password") else ""
    return (
        f"postgresql://{user}{password}@{parts.get('host', HOST)}:{parts.get('port', 5432)}/{parts['dbname']}"
    )


@contextlib.contextmanager
def replicas_behind_nginx(upstream_ports: list[int], stores: SharedStores, count: int) -> Iterator[Target]:
    """`count` gateways (one uvicorn worker each) on the shared stores, nginx balancing them round-robin: a
    target whose relay processes are the replicas and nginx's worker. The first starts alone (it makes the
    schema and the admin); the others then."""
    with contextlib.ExitStack() as stack:
        started = [stack.enter_context(run_gateway(upstream_ports, stores.settings)) for _ in range(count)]
        port, workers = stack.enter_context(run_nginx([replica_port for replica_port, _, _ in started]))
        token = started[0][1]
        processes = [process for _, _, replica in started for process in replica] + workers
        yield Target(
            f"{count} gateways behind nginx",
            port,
            "/chat",
            headers={"Authorization": f"Bearer {token}"},
            relay=processes,
            admin_token=token,
        )
