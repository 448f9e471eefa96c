"""Administrative steps, run by whoever installs or starts the system (not by daemons).

    python -m qe.admin write-acl ACL_FILE SECRETS_DIR [--admin-dir DIR]
        the Redis ACL file (lib/qe/acl.py) and one password file per user, qe-admin
        included (in DIR if given; existing passwords are kept).
    python -m qe.admin load-functions [--wait SECONDS]
        FUNCTION LOAD REPLACE of the runtime's function library (lib/qe/functions.py)
        as `qe-admin`, then checks that the expected version answers. Every daemon
        commits through it; until it is loaded they back off and retry.

Connection: QE_REDIS_URL (default redis://127.0.0.1:6379/0); credentials: qe-admin's
password from QE_REDIS_SECRETS_DIR (`qe-admin.pass`), or QE_REDIS_USERNAME +
QE_REDIS_PASSWORD_FILE, or none (a Redis without ACL users). Exit 0 on success,
1 on failure (the message says why), 78 on a configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import redis

from . import acl, functions
from .config import ConfigError, load_settings, redact_url


def admin_client(env: dict[str, str] | None = None) -> tuple[redis.Redis, str]:
    """A client as qe-admin, and the (redacted) URL it talks to."""
    settings = load_settings(dict(os.environ if env is None else env))
    username, password = settings.redis_credentials(acl.ADMIN)
    client = redis.Redis.from_url(settings.redis_url, username=username, password=password, socket_timeout=5)
    return client, redact_url(settings.redis_url)


def load_functions(r: redis.Redis, wait_s: float = 0.0) -> str:
    """Load the library (waiting up to `wait_s` for Redis to answer); returns its version."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            functions.load(r)
            break
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
    functions.check(r)
    return functions.VERSION


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qe.admin", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load-functions", help="load the runtime's Redis function library (as qe-admin)")
    load.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait for Redis to answer")
    write = sub.add_parser("write-acl", help="write the Redis ACL file and the password files")
    write.add_argument("acl_file", type=Path)
    write.add_argument("secrets_dir", type=Path)
    write.add_argument("--admin-dir", type=Path, help="where qe-admin.pass lives (default: SECRETS_DIR)")
    args = parser.parse_args(argv)
    if args.command == "write-acl":
        written = acl.write_acl_file(args.acl_file, args.secrets_dir, args.admin_dir)
        print(f"ACL file {written} (passwords in {args.secrets_dir}, qe-admin's in {args.admin_dir or args.secrets_dir})")
        return 0
    try:
        r, url = admin_client()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 78
    try:
        version = load_functions(r, args.wait)
    except (redis.RedisError, functions.FunctionsMissing) as exc:
        print(f"{url}: could not load the function library: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{url}: function library {functions.LIBRARY_NAME!r} version {version} loaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
