"""Command line: ``python run.py [serve|migrate|token|...]``.

Every entry point builds the one Config from the environment first, so a bad
setting stops here with one clear line and a non-zero exit, before anything is
created.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..config import Config, ConfigError

log = logging.getLogger("storage")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description="Storage element")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes serving this element on one port (SO_REUSEPORT)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the HTTP API (default)")
    mig = sub.add_parser("migrate", help="apply, list or roll back schema migrations")
    mig.add_argument("--rollback", nargs="?", const=1, type=int, metavar="N",
                     help="roll back the last N migrations (default 1)")
    mig.add_argument("--list", action="store_true", help="show applied and pending migrations")
    tok = sub.add_parser("token", help="print a signed JWT for trying the API")
    tok.add_argument("--role", default="admin")
    tok.add_argument("--type", dest="token_type", default="service_account")
    tok.add_argument("--name", default="dev")
    tok.add_argument("--sub", default=None)
    tok.add_argument("--ttl", default="1h")
    tok.add_argument("--private-key", type=Path, default=None)
    from .ops import add_subcommands

    add_subcommands(sub)  # rebuild, check, recover, migrate-attrs, scrub
    return parser


def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    from ..db import migrate
    from ..db.embedded import database

    with database(config) as dsn:
        if args.list:
            status = migrate.status(dsn, config.table_prefix)
            for mid in status.applied:
                print(f"applied  {mid}")
            for mid in status.pending:
                print(f"pending  {mid}")
        elif args.rollback:
            done = migrate.rollback(dsn, config.table_prefix, args.rollback)
            print(f"rolled back: {', '.join(done) or 'nothing'}")
        else:
            done = migrate.apply(dsn, config.table_prefix)
            print(f"applied: {', '.join(done) or 'nothing (schema is current)'}")
    return 0


def cmd_token(config: Config, args: argparse.Namespace) -> int:
    from ..auth import devkeys

    key_path = args.private_key
    if key_path is None:
        if config.jwt_public_key_path or config.jwt_jwks_url:
            print("error: a production key is configured (JWT_PUBLIC_KEY_PATH/JWT_JWKS_URL); "
                  "pass --private-key to sign with it", file=sys.stderr)
            return 2
        key_path, _public = devkeys.ensure_dev_keys(config.data_dir / "keys")
    token = devkeys.mint_token(
        key_path.read_bytes(), role=args.role, token_type=args.token_type, name=args.name,
        sub=args.sub, ttl=devkeys.parse_ttl(args.ttl),
    )
    print(token)
    return 0


OPS = ("rebuild", "check", "recover", "migrate-attrs", "scrub")


def cmd_ops(config: Config, args: argparse.Namespace) -> int:
    from . import ops

    return ops.run(config, args)


def serve(config: Config, workers: int | None = None) -> int:
    from .server import run

    return run(config, workers or config.server_workers)


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = Config.from_env(os.environ if environ is None else environ)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    from ..observability.logs import setup_logging

    setup_logging(config)
    command = args.command or "serve"
    handlers = {"migrate": cmd_migrate, "token": cmd_token, **dict.fromkeys(OPS, cmd_ops)}
    try:
        if command == "serve":
            return serve(config, args.workers)
        return handlers[command](config, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line for the operator; the log has the traceback
        log.debug("command failed", exc_info=True)
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

