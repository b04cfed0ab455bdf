"""Client API keys: who may call, and which routes each key may use.

Keys come from a YAML file (``api_keys_file``)::

    keys:
      - name: team-a                # shows up nowhere but this file and the logs' key *name*
        sha256: 9f86d08...          # hex digest of the key; or `key: sk-...` in plain text
        routes: [arith]             # "*" (the default) for every route
        reference_ids: false        # may not name reference items (`reference_id`); default true
        max_in_flight: 64           # this key's share of the gateway's max_in_flight (default: none)

A request sends ``Authorization: Bearer <key>``. The presented key is hashed
and compared with every configured digest in constant time (no early exit),
so timing says nothing about which key, or which prefix, was close. Keys are
never logged. With ``auth = "off"`` (explicit only) every request is let in
and start-up logs a warning.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import Forbidden, Unauthorized
from gateway.settings import ConfigError, Settings

log = logging.getLogger("stopgate")

ALL_ROUTES = "*"


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    key: str | None = Field(default=None, min_length=16)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    routes: tuple[str, ...] = (ALL_ROUTES,)
    # Whether requests with this key may send `reference_id` (name a reference item, a gold EM sample).
    reference_ids: bool = True
    # Live requests of this key at once; None: only the gateway-wide and route limits apply.
    max_in_flight: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_secret(self) -> KeyEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of 'key' or 'sha256'")
        return self

    @property
    def digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.key is not None
        return hashlib.sha256(self.key.encode()).digest()


@dataclass(frozen=True)
class Principal:
    """Who made a request: the key's name and the routes it may use."""

    name: str
    routes: frozenset[str]
    reference_ids: bool = True
    max_in_flight: int | None = None

    def may_use(self, route: str) -> bool:
        return ALL_ROUTES in self.routes or route in self.routes


ANONYMOUS = Principal("anonymous", frozenset({ALL_ROUTES}))


def load_keys(path: Path, routes: set[str]) -> list[KeyEntry]:
    """Read and check the keys file; a bad entry or an unknown route stops start-up."""
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"api_keys_file: cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"api_keys_file: {path} is not valid YAML") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list) or not raw["keys"]:
        raise ConfigError(f"api_keys_file: {path} must have a non-empty top-level 'keys' list")
    entries: list[KeyEntry] = []
    for number, item in enumerate(raw["keys"]):
        try:
            entry = KeyEntry.model_validate(item)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "entry"
            raise ConfigError(f"api_keys_file: {path}: keys[{number}].{where}: {err['msg']}") from None
        unknown = set(entry.routes) - routes - {ALL_ROUTES}
        if unknown:
            raise ConfigError(f"api_keys_file: {path}: keys[{number}] ({entry.name}): unknown routes {sorted(unknown)}")
        entries.append(entry)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"api_keys_file: {path}: key names must be unique")
    return entries


def bearer_token(authorization: str | None) -> str | None:
    """The key in ``Authorization: Bearer <key>`` (scheme in any case, spaces around the key ignored), or None.

    The client and the admin API both parse the header here, so they accept exactly the same forms.
    """
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Authenticator:
    def __init__(self, entries: list[KeyEntry] | None) -> None:
        """``None``: authentication is off (explicitly configured)."""
        self.enabled = entries is not None
        self._keys = [
            (e.digest, Principal(e.name, frozenset(e.routes), e.reference_ids, e.max_in_flight)) for e in entries or []
        ]

    @property
    def keys(self) -> int:
        """How many client keys are configured (0 with authentication off)."""
        return len(self._keys)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        presented = hashlib.sha256(token.encode()).digest()
        found: Principal | None = None
        for digest, principal in self._keys:  # every digest is compared: no early exit
            if hmac.compare_digest(presented, digest):
                found = principal
        if found is None:
            raise Unauthorized("Invalid API key.")
        return found

    @staticmethod
    def authorize(principal: Principal, route: str, *, reference_id: bool = False) -> None:
        if not principal.may_use(route):
            raise Forbidden(f"This API key may not use the model route '{route}'.", param="model")
        if reference_id and not principal.reference_ids:
            raise Forbidden("This API key may not send reference_id.", param="reference_id")


def build_authenticator(settings: Settings, routes: set[str]) -> Authenticator:
    if settings.auth == "off":
        log.warning("AUTHENTICATION IS OFF (auth=off): anyone who reaches this port may use every route")
        return Authenticator(None)
    if settings.api_keys_file is None:
        raise ConfigError(
            "api_keys_file: auth is 'keys' but no keys file is set; pass --api-keys FILE "
            "(or STOPGATE_API_KEYS_FILE), or run with --auth off to serve without authentication"
        )
    return Authenticator(load_keys(settings.api_keys_file, routes))
