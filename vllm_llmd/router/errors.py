"""The router's own error answers, OpenAI-style: `{"error": {"message", "type", "code"}}`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web


def error(
    kind: type[web.HTTPException], message: str, headers: Mapping[str, str] | None = None
) -> web.HTTPException:
    """An OpenAI-style error answer."""
    return kind(
        text=json.dumps(error_payload(kind, message)),
        content_type="application/json",
        headers=headers,
    )


def error_payload(kind: type[web.HTTPException], message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind.__name__, "code": kind.status_code}}


class JSONError(web.HTTPException):
    """An error answer with a JSON body and any status (a pod's, passed through)."""

    status_code = 502

    def __init__(self, status: int, answer: Any) -> None:
        super().__init__(text=json.dumps(answer), content_type="application/json")
        self.set_status(status)
