"""Route declarations that FastAPI builds once, when they are added to the app.

FastAPI builds a route's state (its dependencies, parameter and response models) when the
route is created. A route declared on an ``APIRouter`` that the app includes is built twice:
by the decorator, at import, and again for the inclusion, at the first request that reaches
it (FastAPI 0.165 builds an included router lazily). For the daemon's routes that was
~30 ms of CPU at import and ~30 ms more in the first answer of every start (issue #12).
``Routes`` only records what its decorators are given (the ``APIRouter`` decorator surface:
``prefix``, ``tags``, and the keyword arguments of ``add_api_route``); ``add_to`` creates
each route once, on the app, with ``app.router.add_api_route``, as a ``JSONRoute``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from h3d.api.schemas import COLUMNS_MEDIA_TYPE
from h3d.errors import InvalidInput

F = TypeVar("F", bound=Callable[..., Any])

#: A body larger than this is parsed and validated in a worker thread, not in the event
#: loop (as a gzip body over this size is inflated in one: h3d.middleware).
PARSE_IN_THREAD_BYTES = 256 * 1024


class _JSONRequest(Request):
    """A request whose body, where Python's JSON parser gives up on it with other than a
    decode error (nested deeper than the recursion limit, an integer of more than 4 300
    digits, bytes of no Unicode encoding), fails as malformed JSON does: FastAPI answers a
    decode error with a 422 ``validation_error``, anything else with a bare 400.

    ``validated``: the body model, where a worker thread already parsed and validated it;
    FastAPI then takes the instance as it is (a model instance is not validated again)."""

    validated: BaseModel | None = None

    async def json(self) -> Any:
        if self.validated is not None:
            return self.validated
        try:
            return await super().json()
        except json.JSONDecodeError:
            raise
        except (RecursionError, ValueError) as exc:
            raise json.JSONDecodeError(f"unreadable JSON ({exc})", "", 0) from exc


def _validated(model: type[BaseModel], body: bytes) -> BaseModel | None:
    """``body`` parsed and validated as ``model``; None if it is not valid (FastAPI then reads
    it again, in the loop, and answers the error as it answers any body's)."""
    try:  # pydantic's parser: ~3x json.loads' speed, and it lets the event loop run meanwhile
        return model.model_validate_json(body)
    except ValueError:  # pydantic's ValidationError (invalid JSON included)
        return None


def media_type(content_type: str) -> str:
    """A Content-Type without its parameters (charset), in lower case."""
    return content_type.partition(";")[0].strip().lower()


def is_json(content_type: str) -> bool:
    """Whether a Content-Type is one FastAPI reads a body as JSON by: application/json or
    application/*+json, any parameters (charset) after it."""
    kind = media_type(content_type)
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def _read_binary(read: Callable[[bytes], BaseModel], body: bytes) -> BaseModel:
    """``read(body)`` (a model's ``from_binary``), its failures answered as a JSON body's
    are: an invalid column as FastAPI's 422 (the same ``loc`` under ``body``), a body that
    is not in the binary layout as a 422 saying what does not fit."""
    try:
        return read(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors()]
        ) from None
    except ValueError as exc:
        raise InvalidInput(
            f"the {COLUMNS_MEDIA_TYPE} body cannot be read: {exc}",
            details={"media_type": COLUMNS_MEDIA_TYPE},
        ) from None


def _as_json(scope: Any, body: bytes) -> tuple[Any, Callable[[], Coroutine[Any, Any, Any]]]:
    """``scope`` with its Content-Type application/json, and an ASGI ``receive`` that gives
    ``body`` again: FastAPI then takes the model already read (``_JSONRequest.json``)."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    headers.append((b"content-type", b"application/json"))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return {**scope, "headers": headers}, receive


class JSONRoute(APIRoute):
    """An ``APIRoute`` whose endpoint reads its body as a ``_JSONRequest``, and refuses a
    body sent as another Content-Type, or with none, in words that say so: FastAPI does not
    parse it, and its 422 said "Input should be a valid dictionary or object to extract
    fields from" of valid JSON sent as text/plain.

    A body over :data:`PARSE_IN_THREAD_BYTES` is parsed and validated in a worker thread:
    in the loop, a 30 MiB batches body in rows (a JSON object per batch, a float per loss)
    held every other request, ``/healthz`` too, for a second or more."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None
        # the body is one model, not embedded: FastAPI validates the body as that model
        kind = None if self.body_field is None else self.body_field.field_info.annotation
        model = (
            kind
            if isinstance(kind, type)
            and issubclass(kind, BaseModel)
            and not getattr(self, "_embed_body_fields", True)
            else None
        )

        # a model that also reads a binary body (BatchesIn: the client's packed columns)
        binary = getattr(model, "from_binary", None)

        async def route_handler(request: Request) -> Response:
            req = _JSONRequest(request.scope, request.receive)
            if not takes_body:
                return await handler(req)
            content_type = request.headers.get("content-type")
            if (
                binary is not None
                and content_type is not None
                and media_type(content_type) == COLUMNS_MEDIA_TYPE
            ):
                body = await req.body()
                if len(body) > PARSE_IN_THREAD_BYTES:
                    value = await anyio.to_thread.run_sync(_read_binary, binary, body)
                else:
                    value = _read_binary(binary, body)
                req = _JSONRequest(*_as_json(request.scope, body))
                req.validated = value
                return await handler(req)
            if content_type is None:
                if await req.body():  # an empty body is no body (a 422 if one is required)
                    raise InvalidInput(
                        "the body is sent without a Content-Type; send it as JSON, with "
                        "Content-Type: application/json",
                        details={"content_type": None},
                    )
            elif not is_json(content_type):
                also = f" (or as {COLUMNS_MEDIA_TYPE})" if binary is not None else ""
                raise InvalidInput(
                    f"the body is sent as {content_type[:100]!r}; send it as JSON, with "
                    f"Content-Type: application/json{also}",
                    details={"content_type": content_type[:100]},
                )
            elif model is not None:
                body = await req.body()
                if len(body) > PARSE_IN_THREAD_BYTES:
                    req.validated = await anyio.to_thread.run_sync(_validated, model, body)
            return await handler(req)

        return route_handler


class Routes:
    """A resource module's routes: ``router = Routes(prefix="/runs", tags=["runs"])``."""

    def __init__(self, *, prefix: str = "", tags: list[str] | None = None) -> None:
        self.prefix = prefix
        self.tags = list(tags or [])
        self.declared: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []

    def api_route(self, path: str, *, methods: list[str], **kwargs: Any) -> Callable[[F], F]:
        def decorator(endpoint: F) -> F:
            self.declared.append((self.prefix + path, endpoint, {"methods": methods, **kwargs}))
            return endpoint

        return decorator

    def get(self, path: str, **kwargs: Any) -> Callable[[F], F]:
        return self.api_route(path, methods=["GET"], **kwargs)

    def post(self, path: str, **kwargs: Any) -> Callable[[F], F]:
        return self.api_route(path, methods=["POST"], **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Callable[[F], F]:
        return self.api_route(path, methods=["PATCH"], **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Callable[[F], F]:
        return self.api_route(path, methods=["DELETE"], **kwargs)

    def add_to(self, app: FastAPI, prefix: str = "") -> None:
        """Create every declared route on ``app``, under ``prefix``, in declaration order."""
        for path, endpoint, kwargs in self.declared:
            tags = [*self.tags, *kwargs.get("tags", [])]
            app.router.add_api_route(
                prefix + path,
                endpoint,
                route_class_override=JSONRoute,
                **{**kwargs, "tags": tags},
            )


@contextlib.contextmanager
def v1_checked_only_if_loaded() -> Iterator[None]:
    """FastAPI refuses pydantic.v1 models with a clear error: it asks of every parameter and
    response annotation of every route whether it is one, and imports ``pydantic.v1`` to
    answer (about 20 ms of a daemon's start, which nothing else needs). No class can be a
    pydantic.v1 model unless that module is imported, so while it is not, the answer is no
    without importing it; once it is, FastAPI's own check answers. Where FastAPI has no such
    check (another version), nothing is changed."""
    import fastapi.utils as module

    name = "annotation_is_pydantic_v1"  # what fastapi.utils.create_model_field calls
    check = getattr(module, name, None)
    if check is None:
        yield
        return

    def v1_if_loaded(annotation: Any) -> bool:
        return "pydantic.v1" in sys.modules and bool(check(annotation))

    setattr(module, name, v1_if_loaded)
    try:
        yield
    finally:
        setattr(module, name, check)
