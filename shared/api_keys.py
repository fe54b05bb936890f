"""API keys as configured: each secret with the key id that names its traffic, jobs and quota.

``IMBEDDINGS_API_KEYS`` lists entries separated by commas; ``IMBEDDINGS_API_KEYS_FILE`` names a
file of one entry per line (lines starting with ``#`` are comments), which keeps secrets out of the
process environment. ``name:secret`` names a key; a bare secret gets a derived id, ``key-`` and the
first 12 hex digits of the secret's SHA-256, which is stable across processes and restarts and does
not give the secret away. The id, never the secret, is what job records, quota ledgers, logs and
metrics hold.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr

KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ApiKey(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    secret: SecretStr


def derived_key_id(secret: str) -> str:
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def read_keys_file(path: Path) -> list[ApiKey]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {str(path)!r} ({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc})") from None
    # Whole-line comments only: a secret may contain '#'.
    return parse_api_keys([line for line in lines if not line.lstrip().startswith("#")])


def parse_api_keys(entries: list[str]) -> list[ApiKey]:
    """Keys from ``name:secret`` and bare-secret entries; raises ValueError naming the bad entry
    by position (never by its secret)."""
    entries = [entry.strip() for entry in entries]
    entries = [entry for entry in entries if entry]
    if not entries:
        # An empty list would mean "no authentication", which must be asked for by leaving the
        # variable unset, not by a template or secret store that rendered nothing.
        raise ValueError("is set but lists no key; unset it to run without API keys, or list keys as name:secret")
    keys: list[ApiKey] = []
    for position, entry in enumerate(entries, start=1):
        name, colon, secret = entry.partition(":")
        if not colon:
            keys.append(ApiKey(id=derived_key_id(entry), secret=SecretStr(entry)))
            continue
        if not KEY_NAME.fullmatch(name):
            raise ValueError(f"entry {position}: a key name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if not secret.strip():
            raise ValueError(f"entry {position} ({name!r}) has an empty secret")
        keys.append(ApiKey(id=name, secret=SecretStr(secret.strip())))
    _refuse_duplicates(keys)
    return keys


def _refuse_duplicates(keys: list[ApiKey]) -> None:
    seen_ids: dict[str, int] = {}
    seen_secrets: dict[str, int] = {}
    for position, key in enumerate(keys, start=1):
        if key.id in seen_ids:
            raise ValueError(f"entries {seen_ids[key.id]} and {position} have the same key id {key.id!r}; key ids must be unique")
        secret = key.secret.get_secret_value()
        if secret in seen_secrets:
            raise ValueError(f"entries {seen_secrets[secret]} and {position} have the same secret")
        seen_ids[key.id] = position
        seen_secrets[secret] = position
