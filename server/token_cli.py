"""``latentedge token``: issue, revoke and list the credentials a server accepts.

    latentedge token issue NODE_ID --db DB        # prints a node token (stored: a salted hash)
    latentedge token issue --admin [LABEL] --db DB
    latentedge token revoke NODE_ID --db DB       # every live token of that node / label
    latentedge token revoke --id TOKEN_ID --db DB
    latentedge token list --db DB [--json]

The token is printed once, alone on stdout (``TOKEN=$(latentedge token issue node-1 --db
server.db)``); the database keeps only its id, subject and a salted SHA-256 digest. A running
server sees issued and revoked tokens on the next RPC.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from common.errors import ConfigError

logger = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``token`` sub-actions."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    issue = actions.add_parser("issue", help="make a new token and print it")
    issue.add_argument("subject", nargs="?", default="", help="node id (admin: optional label)")
    issue.add_argument("--admin", action="store_true", help="an admin token")
    revoke = actions.add_parser("revoke", help="revoke a node's (or label's) tokens, or one id")
    revoke.add_argument("subject", nargs="?", default="", help="node id or admin label")
    revoke.add_argument("--id", dest="token_id", default="", help="revoke only this token id")
    listing = actions.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    for sub in (issue, revoke, listing):
        sub.add_argument(
            "--db", required=True, help="the server's database (SQLite path or postgresql:// URL)"
        )


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def run(args: argparse.Namespace) -> int:
    """Run one token action."""
    from server.auth import issue_token
    from server.store import describe_store, is_postgres_url, open_store

    where = describe_store(args.db)
    if args.action != "issue" and not is_postgres_url(args.db) and not Path(args.db).exists():
        raise ConfigError(f"--db {args.db!r} does not exist")
    store = open_store(args.db)
    try:
        if args.action == "issue":
            if not args.subject and not args.admin:
                raise ConfigError("token issue needs a NODE_ID (or --admin)")
            text, record = issue_token(store, args.subject or "admin", admin=args.admin)
            logger.info(
                "issued %s token %s for %r in %s",
                "an admin" if record.admin else "a node",
                record.token_id,
                record.subject,
                where,
            )
            sys.stdout.write(text + "\n")
        elif args.action == "revoke":
            if bool(args.subject) == bool(args.token_id):
                raise ConfigError("token revoke needs a NODE_ID or --id TOKEN_ID (one of them)")
            count = store.revoke_tokens(subject=args.subject, token_id=args.token_id)
            what = f"id {args.token_id}" if args.token_id else f"subject {args.subject!r}"
            if count == 0:
                raise ConfigError(f"no live token with {what} in {where!r}")
            sys.stdout.write(f"revoked {count} token(s) of {what}\n")
        else:
            rows = [
                {
                    "token_id": t.token_id,
                    "subject": t.subject,
                    "role": "admin" if t.admin else "node",
                    "created": _when(t.created_at),
                    "revoked": _when(t.revoked_at),
                }
                for t in store.list_tokens()
            ]
            if args.json:
                sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            else:
                sys.stdout.write(
                    f"{'TOKEN_ID':16}  {'SUBJECT':24}  ROLE   CREATED               REVOKED\n"
                )
                for r in rows:
                    sys.stdout.write(
                        f"{r['token_id']:16}  {r['subject']:24}  {r['role']:5}  {r['created']}  "
                        f"{r['revoked']}\n"
                    )
    finally:
        store.close()
    return 0
