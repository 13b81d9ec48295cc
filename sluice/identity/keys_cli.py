"""`sluice keys create|list|revoke|rotate` and `sluice db upgrade|status`: managed keys and the schema.

Both read `database.url` (and, for keys, `auth.key_secret`) from `--config FILE`; the keys commands apply
pending migrations first, `db status` only reads. Output is a table for people or JSON with `--json`. The
key itself is printed by `create` and `rotate` only, that once. Revoking or rotating is announced to the
running gateways over Redis when `redis.url` is set (otherwise they notice within `auth.key_cache_ttl`).
Exit codes as every database command (sluice/cli_common.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime

from sluice.cli_common import UsageError, common_options, run_command, table, when
from sluice.config import NAME_PATTERN, SluiceConfig
from sluice.identity.keys import InvalidKeyRequest, KeyRecord, KeyStore, KeyStoreError
from sluice.store.database import Database
from sluice.store.migrations import status, upgrade

NOT_SHOWN_AGAIN = "Store it now: it cannot be shown again (Sluice keeps only a keyed hash of it)."


def main(argv: list[str]) -> int:
    """`sluice keys ...` (the arguments after `keys`)."""
    args = _keys_parser().parse_args(argv)
    return run_command(
        "sluice keys",
        lambda config: _keys(args, config),
        args.config,
        usage_errors=(InvalidKeyRequest,),
        failures=(KeyStoreError,),
    )


def db_main(argv: list[str]) -> int:
    """`sluice db ...` (the arguments after `db`)."""
    args = _db_parser().parse_args(argv)
    return run_command("sluice db", lambda config: _db(args, config), args.config)


# ---- sluice keys ----


async def _keys(args: argparse.Namespace, config: SluiceConfig) -> None:
    secret = config.auth.key_secret
    if secret is None:
        raise UsageError(
            f"{args.config} sets no auth.key_secret, the secret managed keys are hashed with: set "
            "auth.key_secret: ${SLUICE_KEY_SECRET} and export SLUICE_KEY_SECRET (32+ random characters, "
            "the same for every gateway and this command)"
        )
    db = await Database.connect(config.database)
    try:
        await upgrade(db)
        store = KeyStore(db, secret.encode())
        if args.command == "create":
            key, record = await store.create(
                args.name,
                models=args.models,
                tenant=args.tenant,
                requests_per_minute=args.rpm,
                tokens_per_minute=args.tpm,
                max_concurrency=args.max_concurrency,
                expires_at=args.expires,
                log_bodies=args.log_bodies,
                cache=not args.no_cache,
            )
            _print_new_key(f"Created key {record.name!r}.", key, record, args.json)
        elif args.command == "list":
            _print_list(await store.list(include_revoked=args.all), args.json)
        elif args.command == "revoke":
            record = await store.revoke(args.key)
            await _announce(config, record)
            _print_record(f"Revoked key {record.name!r}.", record, args.json)
        elif args.command == "rotate":
            key, record = await store.rotate(args.key)
            await _announce(config, record)
            _print_new_key(f"Rotated key {record.name!r}; the previous key no longer works.", key, record, args.json)
    finally:
        await db.close()


async def _announce(config: SluiceConfig, record: KeyRecord) -> None:
    if config.redis.url is None:
        return
    import redis  # only here: it costs a tenth of a second of start-up for every other command

    from sluice.identity.revocations import publish_revocation

    try:
        await publish_revocation(config.redis.url, record.id)
    except (redis.RedisError, OSError) as exc:
        print(
            f"warning: could not tell the gateways over Redis ({exc}); they stop accepting the old key "
            f"within auth.key_cache_ttl ({config.auth.key_cache_ttl:g} s)",
            file=sys.stderr,
        )


def _print_new_key(headline: str, key: str, record: KeyRecord, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"key": key, **record.as_dict()}, indent=2))
        print(NOT_SHOWN_AGAIN, file=sys.stderr)
        return
    print(f"{headline}\n\n    {key}\n\n{NOT_SHOWN_AGAIN}\n")
    print(_fields(record))


def _print_record(headline: str, record: KeyRecord, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record.as_dict(), indent=2))
        return
    print(f"{headline}\n")
    print(_fields(record))


def _print_list(records: Sequence[KeyRecord], as_json: bool) -> None:
    if as_json:
        print(json.dumps([record.as_dict() for record in records], indent=2))
        return
    if not records:
        print("No keys.")
        return
    headers = ("ID", "NAME", "PREFIX", "STATE", "MODELS", "TENANT", "RPM", "TPM", "CONC", "EXPIRES", "CREATED")
    rows = [
        (
            r.id,
            r.name,
            f"{r.prefix}…",
            r.state(),
            _models(r.models),
            r.tenant or "-",
            _number(r.requests_per_minute),
            _number(r.tokens_per_minute),
            _number(r.max_concurrency),
            when(r.expires_at, "never"),
            when(r.created_at),
        )
        for r in records
    ]
    print(table(headers, rows))


def _fields(record: KeyRecord) -> str:
    limits = (record.requests_per_minute, record.tokens_per_minute, record.max_concurrency)
    pairs = [
        ("id", record.id),
        ("name", record.name),
        ("prefix", f"{record.prefix}…"),
        ("state", record.state()),
        ("models", _models(record.models)),
        ("tenant", record.tenant or "-"),
        ("limits", "requests/min {}, tokens/min {}, concurrency {}".format(*(_number(v) for v in limits))),
        ("expires", when(record.expires_at, "never")),
        ("created", when(record.created_at)),
    ]
    pairs += [("bodies", "logged in the audit log")] if record.log_bodies else []
    pairs += [("cache", "off: never answered from or stored in the response cache")] if not record.cache else []
    pairs += [("rotated", when(record.rotated_at))] if record.rotated_at else []
    pairs += [("revoked", when(record.revoked_at))] if record.revoked_at else []
    return "\n".join(f"  {name:<8} {value}" for name, value in pairs)


def _keys_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice keys", description="Managed API keys, kept in database.url.")
    common = common_options()
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    create = commands.add_parser("create", parents=[common], help="make a key and print it (this once)")
    create.add_argument("--name", required=True, type=_name, help="a unique name, e.g. team-search")
    create.add_argument("--models", type=_model_list, metavar="A,B", help="models it may use (default: every model)")
    create.add_argument("--tenant", help="the tenant its requests are accounted and cached under")
    create.add_argument("--rpm", type=_positive, metavar="N", help="requests per minute (default: unlimited)")
    create.add_argument("--tpm", type=_positive, metavar="N", help="tokens per minute (default: unlimited)")
    create.add_argument("--max-concurrency", type=_positive, metavar="N", help="requests in flight at once")
    create.add_argument(
        "--expires", type=_expiry, metavar="WHEN", help="2027-01-31 (00:00 UTC that day) or 2027-01-31T12:00:00Z"
    )
    create.add_argument(
        "--log-bodies", action="store_true", help="store its prompts and responses in the audit log (capped)"
    )
    create.add_argument("--no-cache", action="store_true", help="keep its requests out of the response cache")

    listing = commands.add_parser("list", parents=[common], help="list keys (never the keys themselves)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")

    for name, text in (("revoke", "stop a key working"), ("rotate", "replace a key's secret, keeping its settings")):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument("key", metavar="ID_OR_NAME")
    return parser


# ---- sluice db ----


async def _db(args: argparse.Namespace, config: SluiceConfig) -> None:
    db = await Database.connect(config.database)
    try:
        if args.command == "upgrade":
            applied = await upgrade(db)
            if args.json:
                print(json.dumps({"database": db.url, "applied": [m.file for m in applied]}, indent=2))
            elif applied:
                print("\n".join(f"applied {db.dialect}/{m.file}" for m in applied))
            else:
                print(f"{db.url}: the schema is up to date")
            return
        states = await status(db)
        if args.json:
            items = [
                {"version": s.version, "name": s.name, "applied_at": s.applied_at and s.applied_at.isoformat()}
                for s in states
            ]
            print(json.dumps({"database": db.url, "migrations": items}, indent=2))
            return
        rows = [
            (f"{s.version:04d}", s.name, _migration_state(s.applied_at, s.known), when(s.applied_at)) for s in states
        ]
        print(f"{db.url}\n\n{table(('VERSION', 'NAME', 'STATE', 'APPLIED'), rows)}")
    finally:
        await db.close()


def _migration_state(applied_at: datetime | None, known: bool) -> str:
    if applied_at is None:
        return "pending"
    return "applied" if known else "applied (by a newer Sluice)"


def _db_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice db", description="The database schema (database.url).")
    common = common_options()
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("upgrade", parents=[common], help="apply pending migrations")
    commands.add_parser("status", parents=[common], help="show applied and pending migrations")
    return parser


# ---- shared ----


def _name(value: str) -> str:
    if not re.fullmatch(NAME_PATTERN, value):
        raise argparse.ArgumentTypeError("use letters, digits, '.', '_' and '-' (at most 64 characters)")
    return value


def _model_list(value: str) -> list[str]:
    models = [model.strip() for model in value.split(",") if model.strip()]
    if not models:
        raise argparse.ArgumentTypeError("list at least one model (leave --models out for every model)")
    return models


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def _expiry(value: str) -> datetime:
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date (2027-01-31) or time (2027-01-31T12:00Z)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _models(models: tuple[str, ...] | None) -> str:
    return "all" if models is None else ",".join(models)
