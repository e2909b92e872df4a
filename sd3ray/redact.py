"""Credentials never reach the tracker or the console: every config value becomes an MLflow param, and a tracking or
storage URI may carry a password (`https://user:PASSWORD@host`) or a key in its query (`?access_key=...`)."""

from __future__ import annotations

import re

MASK = "***"
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/\s:@]+):([^/\s@]+)@")
_SECRET_QUERY = re.compile(
    r"([?&](?:access[_-]?key(?:[_-]?id)?|secret(?:[_-]?(?:access[_-]?)?key)?|password|passwd|pwd|token|"
    r"session[_-]?token|security[_-]?token|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|"
    r"credential|api[_-]?key)=)[^&\s#]*",
    re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` and the value of every secret-looking query
    parameter replaced by ***; the rest (host, path, endpoint_override, ...) stays readable."""
    return _SECRET_QUERY.sub(rf"\1{MASK}", _USERINFO.sub(rf"\1:{MASK}@", text))
