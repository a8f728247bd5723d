"""The one credential scrub: what every printed, logged or tagged line goes through."""

from __future__ import annotations

import re

# user[:password]@ right after a URI's scheme, up to the authority's last @ (a password
# may hold an unencoded @ of its own)
_URI_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/'\"]+@")


# A query parameter whose name says it holds a secret (?token=, &api_key=, a presigned
# URL's X-Amz-Signature / X-Amz-Credential / X-Amz-Security-Token, Azure's sig=, ...):
# its value, up to the next parameter, fragment, quote or space.
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;][A-Za-z0-9_.\-]*(?:token|key|secret|signature|passw(?:or)?d|pwd|credential|sig|auth)"
    r"[A-Za-z0-9_.\-]*)=(?P<value>[^&;#\s'\"]+)", re.IGNORECASE)


def scrub_credentials(text: str) -> str:
    """`text` with the user and password of every URI in it, and the value of every query
    parameter named as a secret, replaced by `***`: the one scrub that config errors,
    failure reasons, longview's log lines, the run's log file and every MLflow tag and
    param go through before they are printed, logged or tagged."""
    return _QUERY_SECRET.sub(r"\g<name>=***", _URI_CREDENTIALS.sub(r"\g<scheme>***@", text))
