"""API keys: the key-file line format, hashing, masking and the in-memory key store of the ``auth`` plugin.

One key per line; ``#`` starts a comment (at the start of a line, or after whitespace); blank lines are ignored.
A key is followed by optional ``attribute=value`` words::

    sk-prod-4f9a...                       name=alice tier=tier-3 models=gpt-4o,gpt-4o-mini expires=2027-01-01
    sha256:0c5e0b7c...                    name=bob rpm=200 tpm=20000      # a hashed key (ssegate keys hash)

Attributes: ``name``, ``tier``, ``models`` (comma-separated, ``*`` wildcards), ``expires`` (ISO date or
date-time, UTC unless an offset is given), ``rpm``, ``tpm``, ``rpm_burst``, ``tpm_burst`` (positive integers).
The same line format is used for the ``keys:`` list of the plugin's configuration.

Keys are kept as SHA-256 digests (``hash_api_keys: true``): a presented key is hashed once and looked up by its
digest. API keys are long random strings, not passwords, so an unsalted fast hash is the right tool (a lookup
must cost microseconds, and a digest of a 256-bit random key cannot be reversed).
"""
from __future__ import annotations

import hashlib
import hmac
import os
from datetime import date, datetime, timezone
from typing import Iterable

import attrs

from proxy import Principal

__all__ = [
    "KeyFileError",
    "KeyRecord",
    "KeyStore",
    "LIMIT_ATTRIBUTES",
    "MAX_LIMIT",
    "env_keys",
    "hash_key",
    "key_id",
    "mask_key",
    "parse_line",
    "parse_lines",
    "read_key_file",
]

HASH_PREFIX = "sha256:"
LIMIT_ATTRIBUTES = ("rpm", "tpm", "rpm_burst", "tpm_burst")
ATTRIBUTES = ("name", "tier", "models", "expires", *LIMIT_ATTRIBUTES)
#: Largest accepted limit: keeps the rate limiter's integer arithmetic exact in Lua's doubles.
MAX_LIMIT = 10_000_000_000


class KeyFileError(ValueError):
    """A key file or key line is invalid; the message names the source and line."""


def hash_key(key: str) -> str:
    """``sha256:<hex>`` of a raw key: the form stored in key files and produced by ``ssegate keys hash``."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(digest: bytes) -> str:
    """The loggable identifier of a key: ``sha256:`` and the first 8 hex digits of its digest."""
    return HASH_PREFIX + digest[:4].hex()


def mask_key(key: str) -> str:
    """A key as error messages may show it: OpenAI-style, never whole (``sk-ab***xyz``)."""
    if len(key) >= 20 and key.isascii() and key.isprintable():
        return f"{key[:5]}***{key[-3:]}"
    return "***"


def _parse_expiry(value: str) -> float:
    try:
        if "T" in value or " " in value:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        else:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day)
    except ValueError:
        raise ValueError(f"expires={value!r} is not an ISO date (2027-01-01) or date-time "
                         "(2027-01-01T12:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _parse_limit(name: str, value: str) -> int:
    try:
        number = int(value.replace("_", ""))
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
    if not 1 <= number <= MAX_LIMIT:
        raise ValueError(f"{name}={value} must be between 1 and {MAX_LIMIT:_}")
    return number


@attrs.define(slots=True, eq=False)
class KeyRecord:
    """One accepted key: its digest (or, with ``hash_api_keys: false``, the raw key) and its metadata."""

    digest: bytes
    name: str
    raw: str | None = None
    tier: str | None = None
    models: tuple[str, ...] | None = None
    expires: float | None = None
    limits: dict[str, int] = attrs.field(factory=dict)
    source: str = ""
    principal: Principal = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # One Principal per key, built once and shared by every request of that key: treat it as read-only.
        self.principal = Principal(
            name=self.name, tier=self.tier, allowed_models=self.models,
            metadata={"key_id": key_id(self.digest), "rate_limit_key": self.digest[:8].hex(),
                      "limits": self.limits, "expires": self.expires},
        )

    @property
    def key_id(self) -> str:
        return key_id(self.digest)


def _split_comment(line: str) -> str:
    if line.lstrip().startswith("#"):
        return ""
    cut = len(line)
    for marker in (" #", "\t#"):
        at = line.find(marker)
        if at >= 0:
            cut = min(cut, at)
    return line[:cut].strip()


def parse_line(line: str, keep_raw: bool = False, where: str = "") -> KeyRecord | None:
    """Parse one key line; None for a blank or comment line. Raises KeyFileError naming ``where``."""
    text = _split_comment(line)
    if not text:
        return None
    words = text.split()
    key, attributes = words[0], words[1:]
    prefix = f"{where}: " if where else ""
    if "=" in key and not key.startswith(HASH_PREFIX):
        raise KeyFileError(f"{prefix}a line must start with the key, then name=value attributes")
    if key.startswith(HASH_PREFIX):
        hexdigest = key[len(HASH_PREFIX):]
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise KeyFileError(f"{prefix}a hashed key must be 'sha256:' and 64 hex digits (see `ssegate keys hash`)")
        raw = None
    else:
        if len(key) < 8:
            raise KeyFileError(f"{prefix}the key is shorter than 8 characters")
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        raw = key if keep_raw else None
    values: dict[str, str] = {}
    for word in attributes:
        name, sep, value = word.partition("=")
        if not sep or not value:
            raise KeyFileError(f"{prefix}expected name=value, got {word!r}")
        if name not in ATTRIBUTES:
            raise KeyFileError(f"{prefix}unknown attribute {name!r} (known: {', '.join(ATTRIBUTES)})")
        if name in values:
            raise KeyFileError(f"{prefix}attribute {name!r} given twice")
        values[name] = value
    try:
        models = None
        if "models" in values:
            models = tuple(m for m in values["models"].split(",") if m)
            if not models:
                raise ValueError("models= names no model")
        limits = {n: _parse_limit(n, values[n]) for n in LIMIT_ATTRIBUTES if n in values}
        expires = _parse_expiry(values["expires"]) if "expires" in values else None
    except ValueError as exc:
        raise KeyFileError(f"{prefix}{exc}") from None
    return KeyRecord(digest=digest, name=values.get("name") or f"key-{digest[:4].hex()}", raw=raw,
                     tier=values.get("tier"), models=models, expires=expires, limits=limits, source=where)


def parse_lines(lines: Iterable[str], source: str, keep_raw: bool = False) -> list[KeyRecord]:
    """Parse key lines; every problem is collected and raised at once (KeyFileError, one problem a line)."""
    records, problems = [], []
    for number, line in enumerate(lines, start=1):
        try:
            record = parse_line(line, keep_raw, f"{source}:{number}")
        except KeyFileError as exc:
            problems.append(str(exc))
            continue
        if record is not None:
            records.append(record)
    if problems:
        raise KeyFileError("\n".join(problems))
    return records


def read_key_file(path: str, keep_raw: bool = False) -> list[KeyRecord]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the key file: {exc}") from None
    return parse_lines(text.splitlines(), path, keep_raw)


def env_keys(variable: str, keep_raw: bool = False) -> list[KeyRecord]:
    """Keys from an environment variable: comma-separated keys (or ``sha256:`` hashes), no attributes."""
    value = os.environ.get(variable, "")
    items = [item.strip() for item in value.split(",") if item.strip()]
    for item in items:
        if any(c.isspace() for c in item):
            raise KeyFileError(f"environment {variable}: keys are comma-separated and contain no spaces")
        if item.startswith(("/", "./", "../", "~")) or os.path.isfile(item):
            # (some gateways take a key file's path here: taken as a key, the path itself would let callers in)
            raise KeyFileError(f"environment {variable}: {item!r} is a file path, not a key; name a key file with "
                               "auth.key_file")
    return parse_lines(items, f"environment {variable}", keep_raw)


class KeyStore:
    """The accepted keys, immutable once built: a reload builds a new store and swaps it in.

    With hashed keys (the default), the presented key is hashed, the digest looked up in a dict, and the
    match confirmed with :func:`hmac.compare_digest`: only digests are ever compared, so lookup timing says
    nothing about the stored keys. With ``hash_api_keys: false``, raw keys are compared one by one with
    ``compare_digest`` (every key, no early exit); hashed entries still match by digest.
    """

    __slots__ = ("_by_digest", "_raw", "records")

    def __init__(self, records: list[KeyRecord]) -> None:
        seen: dict[bytes, KeyRecord] = {}
        for record in records:
            other = seen.get(record.digest)
            if other is not None:
                raise KeyFileError(f"{record.source}: the same key is also listed at {other.source}")
            seen[record.digest] = record
        self.records = tuple(records)
        self._raw = tuple((r.raw.encode("utf-8"), r) for r in records if r.raw is not None)
        self._by_digest = {r.digest: r for r in records if r.raw is None}

    def __len__(self) -> int:
        return len(self.records)

    def lookup(self, key: str) -> KeyRecord | None:
        found = None
        if self._raw:
            presented = key.encode("utf-8", "surrogatepass")
            for raw, record in self._raw:
                if hmac.compare_digest(raw, presented):
                    found = record
        if self._by_digest:
            digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
            record = self._by_digest.get(digest)
            if record is not None and hmac.compare_digest(record.digest, digest):
                found = record
        return found

    def names(self) -> list[str]:
        return [r.name for r in self.records]
