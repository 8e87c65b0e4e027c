"""What every kiln HTTP app shares: the API key, the body-size limit and OpenAI-shaped errors.

`protect(app, max_body_bytes)` installs them on a FastAPI app. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, and name the field at fault, so the `openai`
client raises its usual exceptions with our message.

The API key comes only from the environment of the Ray processes (`KILN_API_KEY`, exported
before `ray start`), never from a config file; when it is set, every route except the health
and readiness probes needs `Authorization: Bearer <key>`. The key is compared in constant time
and never logged or echoed.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REPO = Path(__file__).resolve().parent.parent
API_KEY_ENV = "KILN_API_KEY"
PUBLIC_PATHS = ("/health", "/ready")  # probes of load balancers and Kubernetes carry no key


def resolve(path: str) -> Path:
    """Model folders in serve configs: absolute, or relative to the repository root (the same
    checkout on a laptop and on every cluster node, whatever a replica's working directory)."""
    return REPO / Path(path).expanduser()


def error_response(
    status: int, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def protect(app: FastAPI, max_body_bytes: int) -> None:
    app.add_middleware(Guard, api_key=os.environ.get(API_KEY_ENV), max_body_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems, params = [], []
    for item in error.errors():
        if item["type"] == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {item['ctx']['error']}")
        field = ".".join(str(part) for part in item["loc"][1:])  # after "body", "query"...
        params.append(field)
        problems.append(f"{field or 'body'}: {item['msg']}")
    return error_response(400, "; ".join(problems), ",".join(params) or None)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return error_response(error.status_code, str(error.detail), headers=error.headers)


class Guard:
    """ASGI middleware: 401 without the configured key, 413 for bodies over the limit (also
    when they arrive chunked, without a Content-Length)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"][len(scope.get("root_path", "")) :] or "/"
        if self.api_key and path not in PUBLIC_PATHS and not self._authorised(scope):
            response = error_response(
                401,
                "a valid API key is required: send `Authorization: Bearer <key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                response = error_response(
                    413, f"the body is over the limit of {self.max_body_bytes} bytes"
                )
                return await response(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        return await self.app(scope, _replay(messages, receive), send)

    def _authorised(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            given.strip().encode(), self.api_key.encode()
        )


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that hands back the body already read, then defers to the real one."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
