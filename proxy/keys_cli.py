"""``ssegate keys``: generate API keys, hash them for key files, check a key file.

    ssegate keys generate [--prefix sk-] [--count N] [--bytes 32] [--with-hash]
    ssegate keys hash KEY...            # one sha256:<hex> line per key
    ssegate keys hash < api_keys.txt    # a key file with every raw key replaced by its hash
    ssegate keys check FILE             # parse a key file; exit 1 naming each bad line
"""
from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any

__all__ = ["add_parser"]


def cmd_generate(args: argparse.Namespace) -> int:
    from plugins._keys import hash_key

    if args.count < 1 or args.bytes < 16:
        print("ssegate keys generate: --count must be >= 1 and --bytes >= 16", file=sys.stderr)
        return 2
    for _ in range(args.count):
        key = args.prefix + secrets.token_urlsafe(args.bytes)
        print(f"{key}  {hash_key(key)}" if args.with_hash else key)
    return 0


def _hash_line(line: str) -> str:
    """A key-file line with its raw key replaced by ``sha256:<hex>`` (comments, blanks and hashes kept)."""
    from plugins._keys import HASH_PREFIX, hash_key

    stripped = line.lstrip()
    if not stripped or stripped.startswith("#"):
        return line
    indent = line[: len(line) - len(stripped)]
    end = next((i for i, c in enumerate(stripped) if c.isspace()), len(stripped))
    key, rest = stripped[:end], stripped[end:]
    if key.startswith(HASH_PREFIX):
        return line
    return f"{indent}{hash_key(key)}{rest}"


def cmd_hash(args: argparse.Namespace) -> int:
    from plugins._keys import KeyFileError, hash_key, parse_line

    if args.keys:
        for key in args.keys:
            print(hash_key(key))
        return 0
    status = 0
    for number, line in enumerate(sys.stdin.read().splitlines(), start=1):
        try:
            parse_line(line, where=f"<stdin>:{number}")
        except KeyFileError as exc:
            print(f"ssegate keys hash: {exc}", file=sys.stderr)
            status = 1
        print(_hash_line(line))
    return status


def cmd_check(args: argparse.Namespace) -> int:
    from plugins._keys import KeyFileError, KeyStore, read_key_file

    try:
        store = KeyStore(read_key_file(args.file))
    except KeyFileError as exc:
        print(exc, file=sys.stderr)
        return 1
    raw = sum(1 for line in open(args.file, encoding="utf-8")
              if line.strip() and not line.lstrip().startswith(("#", "sha256:")))
    note = f"; {raw} stored raw (`ssegate keys hash < FILE` writes a hashed copy)" if raw else ""
    print(f"{args.file}: OK ({len(store)} keys{note})")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``keys`` and its subcommands on the main parser's subparsers."""
    keys = sub.add_parser("keys", help="generate, hash and check API keys for the auth plugin")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    gen = keys_sub.add_parser("generate", help="print new random API keys")
    gen.add_argument("--prefix", default="sk-", help="text before the random part (default: sk-)")
    gen.add_argument("--count", "-n", type=int, default=1, help="how many keys (default: 1)")
    gen.add_argument("--bytes", type=int, default=32, help="random bytes per key (default: 32, min 16)")
    gen.add_argument("--with-hash", action="store_true", help="print each key's sha256: hash beside it")
    gen.set_defaults(func=cmd_generate)

    hsh = keys_sub.add_parser("hash", help="print sha256: hashes of keys (or hash a key file read from stdin)")
    hsh.add_argument("keys", nargs="*", help="keys to hash; none: read key-file lines from stdin")
    hsh.set_defaults(func=cmd_hash)

    chk = keys_sub.add_parser("check", help="validate a key file")
    chk.add_argument("file")
    chk.set_defaults(func=cmd_check)
