"""Inference API keys: who may call `/v1`, and which domains each key may use.

    crma serve --api-key-file keys.txt          one key a line:  KEY [DOMAIN,DOMAIN,...]  (# comments)
    crma serve --api-key KEY[=DOMAIN,...]        repeatable (visible in the process list: prefer the file)
    CRMA_API_KEY=KEY[=DOMAIN,...] crma serve     one more key

A request sends `Authorization: Bearer KEY` (what the `openai` client sends as api_key). Keys are kept only
as their sha256 and compared in constant time against every key; the id that logs and metrics show is the
first 12 hex digits of that hash. A key limited to some domains gets 403 for another domain, and `auto`
routes among its domains only (`base` is always allowed). Without keys, `/v1` is open: the server then
listens on loopback unless told otherwise, and says so at start.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, check_domain_name
from .protocol import APIError

ENV = "CRMA_API_KEY"


@dataclass(frozen=True)
class ApiKey:
    id: str                                  # sha256(key)[:12]: what logs and metrics name
    digest: bytes                            # sha256(key)
    domains: frozenset[str] | None = None    # None: every domain

    def allows(self, model: str, specials: tuple[str, ...]) -> bool:
        return self.domains is None or model in specials or model.split("@")[0] in self.domains   # DOMAIN@vK


def parse_key(spec: str, where: str) -> ApiKey:
    """'KEY' or 'KEY=DOMAIN,DOMAIN' (a key file's 'KEY DOMAIN,DOMAIN' too) -> ApiKey."""
    secret, _, domains = spec.strip().replace(" ", "=", 1).partition("=")
    secret, domains = secret.strip(), domains.strip()
    if len(secret) < 8 or any(c.isspace() for c in secret):
        raise ConfigError(f"{where}: an API key needs at least 8 characters and no spaces")
    names = None
    if domains:
        names = frozenset(d.strip() for d in domains.split(",") if d.strip())
        for name in names:
            check_domain_name(name)
    digest = hashlib.sha256(secret.encode("utf-8")).digest()
    return ApiKey(digest.hex()[:12], digest, names)


def load_keys(specs: list[str], path: Path | None, environ=os.environ) -> tuple[ApiKey, ...]:
    """Every key: --api-key values, the lines of --api-key-file, $CRMA_API_KEY."""
    keys = [parse_key(s, "--api-key") for s in specs]
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--api-key-file: cannot read {path}: {err}") from None
        for n, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(parse_key(line, f"{path}:{n}"))
        if os.name == "posix" and Path(path).stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            raise ConfigError(f"--api-key-file: {path} is readable by other users; chmod 600 it")
    if environ.get(ENV):
        keys.append(parse_key(environ[ENV], f"${ENV}"))
    if len({k.digest for k in keys}) != len(keys):
        raise ConfigError("the same API key is given twice")
    return tuple(keys)


def match(keys: tuple[ApiKey, ...], authorization: str | None) -> ApiKey | None:
    """The key an `Authorization: Bearer KEY` header carries, or None. Every key is compared (in constant
    time), so the time taken does not say which key, or how much of one, matched."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    digest = hashlib.sha256(value.strip().encode("utf-8")).digest()
    found = None
    for key in keys:
        if hmac.compare_digest(digest, key.digest):
            found = key
    return found


def authorize(keys: tuple[ApiKey, ...], authorization: str | None) -> ApiKey | None:
    """The caller's key for a `/v1` request: None when the server has no keys; 401 (an OpenAI-style error
    object, as the `openai` client expects) when it has keys and the request carries none of them."""
    if not keys:
        return None
    key = match(keys, authorization)
    if key is None:
        missing = not (authorization or "").strip()
        raise APIError(401, "You didn't provide an API key: send 'Authorization: Bearer KEY'" if missing else
                       "Incorrect API key provided", "invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    return key


def check_model(key: ApiKey | None, model: str, specials: tuple[str, ...]) -> None:
    """403 when `key` is limited to domains and `model` is another domain."""
    if key is not None and not key.allows(model, specials):
        raise APIError(403, f"this API key may not use the model '{model}'; it may use: "
                            f"{', '.join(sorted(key.domains))}, {', '.join(specials)}", "permission_error",
                       param="model", code="model_not_allowed")


def check_token(expected: str, authorization: str | None) -> bool:
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected.encode())
