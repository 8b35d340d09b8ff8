"""Read pinning across requests: after a request that wrote, the same
client's reads stay on the writer (or on standbys that have replayed past
that write) for the read-your-writes window, through a signed cookie; and
within a request, reads after its first write go only where that write is."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta

from django.core.signing import BadSignature
from django.http import HttpRequest, HttpResponseBase

from dbha import _core

COOKIE = "dbha_pin"
#: Keeps the signature apart from other signed cookies.
SALT = "dbha.middleware.PinningMiddleware"


class PinningMiddleware:
    """Add after `SessionMiddleware`/`AuthenticationMiddleware` in
    `MIDDLEWARE`. Synchronous only: under ASGI, Django runs it in the
    request's thread, where the view's ORM calls run too, so its pins
    follow them (async views included)."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        window = _core.pin_window()
        if window is None:
            # Reads follow writes anyway (READS="writer").
            return self.get_response(request)
        now = int(time.time() * 1000)
        pins = read_pins(request, window, now)
        _core.begin_request(pins)
        try:
            response = self.get_response(request)
        finally:
            written = _core.end_request()
        if written:
            pins.update(dict.fromkeys(written, now))
            response.set_signed_cookie(
                COOKIE,
                json.dumps(pins, separators=(",", ":")),
                salt=SALT,
                max_age=timedelta(seconds=window),
                httponly=True,
                samesite="Lax",
                secure=request.is_secure(),
            )
        return response


def read_pins(request: HttpRequest, window: float, now: int) -> dict[str, int]:
    """The client's last write per group (ms since the epoch), from its
    cookie: only well-signed, well-formed entries still inside the window."""
    try:
        raw = request.get_signed_cookie(
            COOKIE, default=None, salt=SALT, max_age=timedelta(seconds=window)
        )
        pins = json.loads(raw) if raw else {}
    except (BadSignature, ValueError):
        return {}
    if not isinstance(pins, dict):
        return {}
    oldest = now - int(window * 1000)
    return {
        group: at
        for group, at in pins.items()
        # Not bounded above: another host's clock may run a little ahead.
        if isinstance(group, str) and isinstance(at, int) and at >= oldest
    }
