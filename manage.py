"""The operator's command line: people, API keys and Ollama hosts, straight on the database in DATA_DIR.

It needs neither the HTTP API nor a running gateway, so a locked-out admin can always get back in. It reads
the same settings as the gateway (environment and `.env`). Run it with the project's environment:

    .venv/bin/python manage.py users
    .venv/bin/python manage.py create-user ada@example.com --role admin
    .venv/bin/python manage.py reset-password ada@example.com
    .venv/bin/python manage.py create-key ada@example.com "nightly job" --expires-days 90 --batch
    .venv/bin/python manage.py keys
    .venv/bin/python manage.py revoke-key 3
    .venv/bin/python manage.py hosts
    .venv/bin/python manage.py add-host gpu-2 http://gpu-2.lan:11434 --slots 2
    .venv/bin/python manage.py change-host h1 --no-drain --learn-slots
    .venv/bin/python manage.py drain-host h1
    .venv/bin/python manage.py remove-host h1
    .venv/bin/python manage.py copy-database --to postgresql://gateway@db.internal/gateway
    .venv/bin/python manage.py audit --limit 50
    .venv/bin/python manage.py usage --since 2026-11-01 --group-by user,model

Passwords are generated and printed once unless `--password-stdin` reads one from standard input.

Like the gateway, it finds the database through DATABASE_URL, or else SQLite in DATA_DIR, `./data` unless
set, taken from the folder it is run in: it says which database it opened, and only `create-user` may start a
new SQLite one. Any other command refuses when there is none, rather than create an empty one and report "no
user" (issue 10, item 5).

The host commands change the stored hosts (those `/admin/hosts` adds); a running gateway takes the change up
at its next periodic check, within HOST_CHECK_SECONDS. OLLAMA_URL's hosts are listed too, as the environment
sets them at start (what `/admin/hosts` changed of them in a running gateway is that gateway's alone).

Every command that changes something is in the audit trail (`GET /admin/audit`, `manage.py audit`), its
actor "manage.py".

`copy-database --to URL` copies everything (users, keys, upload records, sign-in limits' state, stored hosts)
from that database into an empty one, such as a new Postgres database for several replicas; then set
DATABASE_URL to it.
"""

import argparse
import json
import secrets
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import SQLAlchemyError

from audit.actions import Action
from audit.actor import COMMAND_LINE
from audit.details import CHANGED, concealed, every_field
from audit.query import DEFAULT_LIMIT, MAX_LIMIT, AuditQuery
from audit.store import AuditStore
from auth.api_keys import ApiKeyStore
from auth.passwords import hash_password
from auth.throttle import SignInLimits, SignInThrottle
from auth.users import ROLES, User, UserStore
from core.password_rule import password_problem
from core.setting_checks import checked_database_url
from core.settings import ConfigurationError, Settings
from core.settings_errors import configuration_error_line, read_settings
from core.storage_errors import NotFound, StorageError
from db.copy import copy_database
from db.engine import Database, database_problem, database_url
from db.models import BATCH, INTERACTIVE
from fleet.hosts import HostConfig, environment_hosts
from fleet.store import HostChange, HostStore, StoredHost, refuse_clashes, row_id_of, stored_config
from routes.schemas import HostPatch, NewHost, NewUser
from upstream.client import public_url
from usage.report_text import ReportQueryError, as_csv, as_table, read_groups, read_range
from usage.store import UsageStore

Checked = TypeVar("Checked", bound=BaseModel)


class CommandError(Exception):
    pass


@dataclass(frozen=True)
class Stores:
    db: Database
    users: UserStore
    keys: ApiKeyStore
    throttle: SignInThrottle
    hosts: HostStore
    usage: UsageStore
    settings: Settings
    audit: AuditStore


def _password(args: argparse.Namespace) -> tuple[str, bool]:
    """The new password, and whether it was generated (and so must be shown)."""
    if not args.password_stdin:
        return secrets.token_urlsafe(15), True
    password = sys.stdin.readline().rstrip("\r\n")
    problem = password_problem(password)
    if problem:
        raise CommandError(f"the password {problem}")
    return password, False


def _user(users: UserStore, email: str) -> User:
    user = users.find_by_email(email)
    if user is None:
        raise CommandError(f"no user with the email {email}")
    return user


def list_users(stores: Stores, _: argparse.Namespace) -> None:
    for user in stores.users.all():
        models = "every model" if user.models is None else ", ".join(user.models) or "no model"
        state = "disabled" if user.disabled else "enabled"
        print(f"{user.id}\t{user.email}\t{user.role}\t{state}\t{models}")


def create_user(stores: Stores, args: argparse.Namespace) -> None:
    password, generated = _password(args)
    models = [name.strip() for name in args.models.split(",") if name.strip()] if args.models else None
    try:  # the same rules as POST /admin/users
        new = NewUser(email=args.email, password=password, role=args.role, models=models)
    except ValidationError as exc:
        raise CommandError("; ".join(error["msg"] for error in exc.errors())) from None
    # Hashed directly: a command line hashes once, and there is no event loop to wait on.
    user = stores.users.create_with_hash(new.email, hash_password(new.password), new.role, new.models)
    stores.audit.record(COMMAND_LINE, Action.USER_CREATE, f"user {user.id}", every_field(new))
    print(f"created {user.role} {user.email} (id {user.id})")
    if generated:
        print(f"password: {password}")


def reset_password(stores: Stores, args: argparse.Namespace) -> None:
    user = _user(stores.users, args.email)
    password, generated = _password(args)
    # A reset also lifts a disable and the email's sign-in limits: it is how a locked-out admin gets back in.
    stores.users.update(user.id, password_hash=hash_password(password), disabled=False)
    stores.throttle.lift_limits_for(user.email)
    details = {"password": CHANGED, "disabled": False}
    stores.audit.record(COMMAND_LINE, Action.USER_UPDATE, f"user {user.id}", details)
    print(f"reset the password of {user.email}; every token issued before no longer works")
    if generated:
        print(f"password: {password}")


def create_key(stores: Stores, args: argparse.Namespace) -> None:
    user = _user(stores.users, args.email)
    record, key = stores.keys.create(
        user.id, args.name, args.expires_days, BATCH if args.batch else INTERACTIVE
    )
    details = {
        "name": record.name,
        "expires_in_days": args.expires_days,
        "priority": record.priority,
        "user_id": user.id,
    }
    stores.audit.record(COMMAND_LINE, Action.KEY_CREATE, f"key {record.id}", details)
    expiry = f", expires {record.expires_at}" if record.expires_at else ""
    batch = ", batch: its requests wait behind interactive ones" if record.priority == BATCH else ""
    print(f"created key {record.id} '{record.name}' for {user.email}{expiry}{batch}")
    print(f"key: {key}")
    print("It is shown only this once.")


def list_keys(stores: Stores, _: argparse.Namespace) -> None:
    for key, email in stores.keys.all():
        used = key.last_used_at or "never"
        print(f"{key.id}\t{key.prefix}…\t{email}\t{key.name}\t{key.priority}\tlast used {used}")


def revoke_key(stores: Stores, args: argparse.Namespace) -> None:
    if not stores.keys.revoke(args.key_id):
        raise CommandError(f"no key with the id {args.key_id}")
    stores.audit.record(COMMAND_LINE, Action.KEY_REVOKE, f"key {args.key_id}")
    print(f"revoked key {args.key_id}")


def usage_report(stores: Stores, args: argparse.Namespace) -> None:
    """What GET /admin/usage answers, from the records written so far (a running gateway writes its own
    within a second)."""
    try:
        groups = read_groups(args.group_by)
        since, until = read_range(args.since, args.until, stores.usage.zone)
    except ReportQueryError as exc:
        raise CommandError(str(exc)) from None
    report = stores.usage.report(groups, since, until, args.user_id)
    if args.csv:
        print(as_csv(report, groups), end="")
    else:
        print(as_table(report, groups))


def _checked(model: type[Checked], **fields: Any) -> Checked:
    """The same rules as the API's."""
    try:
        return model(**fields)
    except ValidationError as exc:
        problems = (f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors())
        raise CommandError("; ".join(problems)) from None


def _every_host(stores: Stores) -> list[HostConfig]:
    settings = stores.settings
    return [*environment_hosts(settings.ollama_urls, settings.ollama_parallel), *stores.hosts.configs()]


def _state(config: HostConfig) -> str:
    return "disabled" if not config.enabled else "draining" if config.draining else "enabled"


def _described(config: HostConfig) -> str:
    slots = "slots learned" if config.slots is None else f"{config.slots} slots"
    return f"{config.id} '{config.name}' at {public_url(config.url)}, {_state(config)}, {slots}"


def _taken_up(stores: Stores) -> str:
    seconds = stores.settings.host_check_seconds
    return f"a running gateway takes it up within HOST_CHECK_SECONDS ({seconds:g} s)"


def _stored_row(host_id: str) -> int:
    row_id = row_id_of(host_id)
    if row_id is not None:
        return row_id
    if host_id.startswith("env-"):
        raise CommandError(
            f"{host_id} comes from OLLAMA_URL: change it there; a running gateway can drain or disable it "
            f"until its next start (/admin/hosts)"
        )
    raise CommandError(f"no host with the id {host_id} (stored hosts are h1, h2, ...: see manage.py hosts)")


def _record_host(
    stores: Stores, action: Action, row: StoredHost, details: dict[str, Any] | None = None
) -> None:
    config = stored_config(row)
    stores.audit.record(COMMAND_LINE, action, f"host {config.name}", {"id": config.id, **(details or {})})


def list_hosts(stores: Stores, _: argparse.Namespace) -> None:
    for config in _every_host(stores):
        slots = "learned" if config.slots is None else str(config.slots)
        url = public_url(config.url)
        print(f"{config.id}\t{config.name}\t{url}\t{config.source}\t{_state(config)}\tslots {slots}")


def add_host(stores: Stores, args: argparse.Namespace) -> None:
    new = _checked(NewHost, name=args.name, url=args.url, slots=args.slots, enabled=not args.disabled)
    refuse_clashes(new.name, new.url, _every_host(stores))
    row = stores.hosts.add(new.name, new.url, slots=new.slots, enabled=new.enabled)
    _record_host(stores, Action.HOST_ADD, row, every_field(new))
    print(f"added host {_described(stored_config(row))}; {_taken_up(stores)}")


def _change(stores: Stores, host_id: str, change: HostChange) -> None:
    row_id = _stored_row(host_id)
    refuse_clashes(change.name, change.url, _every_host(stores), itself=host_id)
    try:
        row = stores.hosts.change(row_id, change)
    except NotFound:
        raise CommandError(f"no host with the id {host_id}") from None
    fields = {name: value for name, value in asdict(change).items() if value is not None}
    if fields.pop("learn_slots"):
        fields["slots"] = None  # as PATCH /admin/hosts says it
    _record_host(stores, Action.HOST_CHANGE, row, concealed(fields))
    print(f"changed host {_described(stored_config(row))}; {_taken_up(stores)}")


def change_host(stores: Stores, args: argparse.Namespace) -> None:
    sent = {name: getattr(args, name) for name in ("name", "url", "slots") if getattr(args, name) is not None}
    patch = _checked(HostPatch, **sent)
    change = HostChange(
        name=patch.name,
        url=patch.url,
        enabled=args.enabled,
        draining=args.draining,
        slots=patch.slots,
        learn_slots=args.learn_slots,
    )
    if change == HostChange():
        raise CommandError(
            "nothing to change: give --name, --url, --slots or --learn-slots, --enable or "
            "--disable, --drain or --no-drain"
        )
    _change(stores, args.host_id, change)


def drain_host(stores: Stores, args: argparse.Namespace) -> None:
    _change(stores, args.host_id, HostChange(draining=True))


def remove_host(stores: Stores, args: argparse.Namespace) -> None:
    row_id = _stored_row(args.host_id)
    try:
        row = stores.hosts.remove(row_id)
    except NotFound:
        raise CommandError(f"no host with the id {args.host_id}") from None
    _record_host(stores, Action.HOST_REMOVE, row)
    config = stored_config(row)
    print(f"removed host {config.id} '{config.name}'; {_taken_up(stores)} (what runs there finishes)")


def copy_to(stores: Stores, args: argparse.Namespace) -> None:
    try:
        target = Database(database_url(checked_database_url(args.to), Path()))
    except ValueError as exc:
        raise CommandError(
            f"--to {args.to!r}: expected a postgresql:// URL naming a database {exc}"
        ) from None
    try:
        copied = copy_database(stores.db, target)
    finally:
        target.close()
    counts = ", ".join(f"{count} {table}" for table, count in copied.items())
    print(f"copied {counts} to {target.name}")
    print("Set DATABASE_URL to it, and start the gateway (uploaded files stay in DATA_DIR/uploads).")


def list_audit(stores: Stores, args: argparse.Namespace) -> None:
    # Oldest first, so that the newest is the last line a terminal shows.
    for entry in reversed(stores.audit.read(AuditQuery(limit=args.limit)).entries):
        details = json.dumps(entry.details) if entry.details is not None else ""
        fields = (entry.id, entry.at, entry.actor, entry.address, entry.action, entry.target, details)
        print("\t".join("" if field is None else str(field) for field in fields))


def _entries(text: str) -> int:
    count = int(text)
    if not 1 <= count <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"from 1 to {MAX_LIMIT}")
    return count


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manage.py", description=__doc__.split("\n\n")[0])
    parser.set_defaults(may_create_database=False)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("users", help="list every user").set_defaults(run=list_users)

    create = commands.add_parser("create-user", help="add a user")
    create.add_argument("email")
    create.add_argument("--role", choices=ROLES, default="user")
    create.add_argument("--models", help="comma-separated allow-list (default: every model)")
    create.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    # The first user may come before the gateway's first start.
    create.set_defaults(run=create_user, may_create_database=True)

    reset = commands.add_parser("reset-password", help="set a new password (and re-enable the user)")
    reset.add_argument("email")
    reset.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    reset.set_defaults(run=reset_password)

    key = commands.add_parser("create-key", help="create an API key for a user")
    key.add_argument("email")
    key.add_argument("name")
    key.add_argument("--expires-days", type=int, default=None)
    key.add_argument("--batch", action="store_true", help="its requests wait behind interactive ones")
    key.set_defaults(run=create_key)

    commands.add_parser("keys", help="list every API key (no secrets)").set_defaults(run=list_keys)

    revoke = commands.add_parser("revoke-key", help="revoke an API key by its id")
    revoke.add_argument("key_id", type=int)
    revoke.set_defaults(run=revoke_key)

    commands.add_parser(
        "hosts", help="list the Ollama hosts (OLLAMA_URL's, then the stored ones)"
    ).set_defaults(run=list_hosts)

    add = commands.add_parser("add-host", help="add an Ollama host (stored)")
    add.add_argument("name", help="what X-Ollama-Host names it by")
    add.add_argument("url", help="http(s)://[user:password@]host[:port][/path], as in OLLAMA_URL")
    add.add_argument("--slots", type=int, help="requests it runs at once per loaded model (default: learned)")
    add.add_argument("--disabled", action="store_true", help="add it disabled")
    add.set_defaults(run=add_host)

    change = commands.add_parser("change-host", help="change a stored host (by its id: h1, h2, ...)")
    change.add_argument("host_id")
    change.add_argument("--name")
    change.add_argument("--url")
    slots = change.add_mutually_exclusive_group()
    slots.add_argument("--slots", type=int, help="requests it runs at once per loaded model")
    slots.add_argument("--learn-slots", action="store_true", help="forget the slots set: learn them")
    enabled = change.add_mutually_exclusive_group()
    enabled.add_argument("--enable", dest="enabled", action="store_const", const=True)
    enabled.add_argument("--disable", dest="enabled", action="store_const", const=False)
    change.add_argument(
        "--drain",
        dest="draining",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="no new work (what runs finishes); --no-drain: take work again",
    )
    change.set_defaults(run=change_host)

    drain = commands.add_parser("drain-host", help="send a stored host no new work (what runs finishes)")
    drain.add_argument("host_id")
    drain.set_defaults(run=drain_host)

    remove = commands.add_parser("remove-host", help="remove a stored host (what runs there finishes)")
    remove.add_argument("host_id")
    remove.set_defaults(run=remove_host)

    audit = commands.add_parser("audit", help="the latest entries of the audit trail of admin actions")
    audit.add_argument("--limit", type=_entries, default=DEFAULT_LIMIT, help=f"at most {MAX_LIMIT}")
    audit.set_defaults(run=list_audit)

    copy = commands.add_parser("copy-database", help="copy everything into another (empty) database")
    copy.add_argument("--to", required=True, metavar="URL", help="postgresql://user@host/database")
    copy.set_defaults(run=copy_to)

    usage = commands.add_parser(
        "usage", help="requests, tokens and slot-seconds used, as GET /admin/usage reports them"
    )
    usage.add_argument("--since", help="from this day or ISO-8601 moment (in TIME_ZONE unless it says)")
    usage.add_argument("--until", help="up to this day or moment, excluded (default: now)")
    usage.add_argument("--group-by", help="comma-separated, any of: user, key, model, host, day")
    usage.add_argument("--user-id", type=int, help="one person's use only")
    usage.add_argument("--csv", action="store_true", help="CSV, one row per group, as format=csv gives it")
    usage.set_defaults(run=usage_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = read_settings()
    except ConfigurationError as exc:
        print(configuration_error_line(exc, "manage.py"), file=sys.stderr)
        return 1
    db = Database(database_url(settings.database_url, settings.data_dir.resolve()))
    if db.path is not None and not db.path.is_file() and not args.may_create_database:
        print(
            f"manage.py: no database at {db.path}; run manage.py from the gateway's folder (a relative "
            f"DATA_DIR and .env are read from the current folder), or set DATA_DIR to the folder that holds "
            f"{db.path.name}",
            file=sys.stderr,
        )
        db.close()
        return 1
    new = "" if db.path is None or db.path.is_file() else " (none was there: creating it)"
    print(f"manage.py: database {db.name}{new}", file=sys.stderr)
    try:
        db.migrate()
        throttle = SignInThrottle(db, SignInLimits.from_settings(settings))
        usage = UsageStore(db, ZoneInfo(settings.time_zone))
        stores = Stores(
            db, UserStore(db), ApiKeyStore(db), throttle, HostStore(db), usage, settings, AuditStore(db)
        )
        args.run(stores, args)
    except (CommandError, StorageError) as exc:
        print(f"manage.py: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a DATA_DIR that can't be created or written
        print(f"manage.py: cannot use {db.name}: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:  # a database that can't be reached
        print(f"manage.py: cannot use the database: {database_problem(exc)}", file=sys.stderr)
        return 1
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
