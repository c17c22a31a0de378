"""The composition root: builds the long-lived objects one gateway process shares (every store and
client), once, in the app's lifespan (`main.py`), and closes them. Routes receive them as
`routes.dependencies.Services`.
"""

import asyncio
from functools import partial
from zoneinfo import ZoneInfo

from sqlalchemy.exc import SQLAlchemyError

from audit.store import AuditStore
from auth.api_keys import ApiKeyStore
from auth.authenticate import Authenticator
from auth.bootstrap import ensure_admin, load_secret_key
from auth.cache import CredentialCache
from auth.login import PasswordCheck
from auth.passwords import PasswordHasher
from auth.policy import ModelPolicy
from auth.throttle import SignInLimits, SignInThrottle
from auth.tokens import TokenSigner
from auth.users import UserStore
from cluster.redis_link import RedisLink
from core.private_files import make_tree_private
from core.settings import ConfigurationError, Settings
from db.changes import watch_changes
from db.engine import Database, database_problem, database_url
from fleet.admission import Fleet, SharedQueue
from fleet.changes import HostChanges
from fleet.hosts import HostConfig, Hosts, environment_hosts
from fleet.scheduler import Limits
from fleet.store import HostStore
from observe.metrics import record_usage
from routes.dependencies import Services
from uploads.store import UploadStore
from upstream.client import UpstreamTimeouts
from usage.book import UsageBook
from usage.quotas import QuotaBook
from usage.shared_quotas import SharedLedgers
from usage.store import UsageStore
from usage.writer import UsageWriter


def _open_storage(
    settings: Settings,
) -> tuple[Database, UserStore, UploadStore, str, HostStore, list[HostConfig]]:
    """The blocking part of start-up (files, schema, first admin, stored hosts), run in a worker thread."""
    try:
        # The first to write in DATA_DIR: a folder that can't be made or written is the operator's to fix.
        secret_key = load_secret_key(settings)
        # Also what older versions left readable by everyone (0644, 0755).
        make_tree_private(settings.data_dir)
    except OSError as exc:
        where = str(settings.data_dir)
        raise ConfigurationError(f"DATA_DIR={where!r}: cannot use this folder: {exc}") from None
    db = Database(database_url(settings.database_url, settings.data_dir))
    try:
        db.migrate()
    except SQLAlchemyError as exc:  # a server that can't be reached, a refused login, a missing database
        raise ConfigurationError(f"cannot use the database {db.name}: {database_problem(exc)}") from None
    users = UserStore(db)
    ensure_admin(settings, users)
    uploads = UploadStore(settings.uploads_dir, db, settings.max_upload_bytes)
    uploads.prepare()
    host_store = HostStore(db)
    return db, users, uploads, secret_key, host_store, host_store.configs()


async def open_services(settings: Settings) -> Services:
    opened = await asyncio.to_thread(_open_storage, settings)
    db, users, uploads, secret_key, host_store, stored_hosts = opened
    timeouts = UpstreamTimeouts(
        connect=settings.upstream_connect_timeout,
        first_byte=settings.upstream_first_byte_timeout,
        idle=settings.upstream_idle_timeout,
    )
    hosts = Hosts(timeouts)
    # The environment's first: the first of them answers /health and /api/version (upstream.probe).
    for config in [*environment_hosts(settings.ollama_urls, settings.ollama_parallel), *stored_hosts]:
        hosts.add(config)
    redis = None
    shared = None
    if settings.redis_url:
        # Up or degraded from its first answer on, never fatal: an unreachable Redis is a degraded mode.
        redis = RedisLink(settings.redis_url)
        await redis.start()
        shared = SharedQueue(redis, settings.redis_prefix, settings.lease_seconds)
    fleet = Fleet(
        hosts,
        queue_limits(settings),
        settings.host_check_seconds,
        read_stored=partial(db.run, host_store.configs),
        shared=shared,
    )

    signer = TokenSigner(secret_key, settings.access_token_expire_minutes * 60)
    watcher = await asyncio.to_thread(watch_changes, db)
    cache = CredentialCache(watcher)
    users.on_change = cache.forget_all
    keys = ApiKeyStore(db, on_change=cache.forget_all)
    hasher = PasswordHasher()
    throttle = SignInThrottle(db, SignInLimits.from_settings(settings))
    zone = ZoneInfo(settings.time_zone)
    usage_store = UsageStore(db, zone)
    usage_writer = UsageWriter(db, usage_store)
    usage_writer.start()
    return Services(
        settings=settings,
        db=db,
        users=users,
        keys=keys,
        signer=signer,
        authenticator=Authenticator(db, signer, users, keys, cache),
        hasher=hasher,
        throttle=throttle,
        passwords=PasswordCheck(db, users, hasher, throttle),
        uploads=uploads,
        fleet=fleet,
        host_changes=HostChanges(fleet, db, host_store),
        # The first of OLLAMA_URL's hosts answers /health and /api/version (upstream.probe).
        upstream=next(iter(hosts)).upstream,
        policy=ModelPolicy(),
        changes=watcher,
        usage=UsageBook(
            usage_writer,
            QuotaBook(
                db,
                usage_store,
                zone,
                flush=usage_writer.flush,
                shared=None
                if redis is None
                else SharedLedgers(redis, settings.redis_prefix, settings.lease_seconds),
                without_redis=settings.quotas_without_redis,
            ),
            observers=[record_usage],
        ),
        usage_store=usage_store,
        audit=AuditStore(db),
        redis=redis,
    )


def queue_limits(settings: Settings) -> Limits:
    def limit(value: int) -> int | None:
        return value or None  # 0: no limit

    return Limits(
        user_inflight=limit(settings.max_inflight_per_user),
        user_waiting=limit(settings.max_waiting_per_user),
        key_inflight=limit(settings.max_inflight_per_key),
        key_waiting=limit(settings.max_waiting_per_key),
        interactive_timeout=settings.queue_timeout_interactive,
        batch_timeout=settings.queue_timeout_batch,
    )


async def close_services(services: Services) -> None:
    await services.fleet.close()
    if services.usage.quotas.shared is not None:
        await services.usage.quotas.shared.aclose()
    if services.redis is not None:
        await services.redis.aclose()
    await services.usage.writer.close()
    services.changes.close()
    services.db.close()
