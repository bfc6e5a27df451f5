"""Bodies that come as JSON or as form fields (/embed/text, /search): one pydantic model
validates both, so a field has the same limits and the same error messages whichever
way it is sent, and the OpenAPI document shows the three encodings."""

# No `from __future__ import annotations` here: the models' annotations are read at run time.

import contextlib
import json
import typing
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from mumic.serve.limits import JSON_TYPE, MULTIPART, URLENCODED


def _invalid(loc: tuple[Any, ...], msg: str, kind: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": msg, "type": kind}])


def _form_data(form: Any, model: type[BaseModel], files: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fields for the model, uploads by name) from form data. A list field takes every
    value of its name; any other field takes its one value (several are refused by the
    model) and an empty value counts as absent, as FastAPI's Form fields do."""
    lists = {name for name, f in model.model_fields.items() if typing.get_origin(f.annotation) is list}
    data: dict[str, Any] = {}
    uploads: dict[str, Any] = {}
    for key in dict.fromkeys(form.keys()):
        values = form.getlist(key)
        if key in files:
            if len(values) > 1:
                raise _invalid((key,), f"one file at most, got {len(values)}", "too_long")
            if not isinstance(values[0], UploadFile):
                raise _invalid((key,), "expected an uploaded file", "value_error")
            uploads[key] = values[0]
        elif key in lists:
            data[key] = values
        else:
            values = [v for v in values if v != ""]
            if values:
                data[key] = values[0] if len(values) == 1 else values
    return data, uploads


@contextlib.asynccontextmanager
async def parsed_body(request: Request, model: type[BaseModel], files: tuple[str, ...] = ()) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
    """(the body validated by `model`, the uploads named in `files`) of a JSON or form
    request; invalid bodies raise RequestValidationError (422), as FastAPI's own do.
    Uploads are open inside the block and closed after it."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == JSON_TYPE:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _invalid((getattr(e, "pos", 0),), "JSON decode error", "json_invalid") from None
        except RecursionError:  # arrays or objects nested thousands deep
            raise _invalid((), "JSON nested too deeply", "json_invalid") from None
        yield _validate(model, data), {}
        return
    if ctype not in (MULTIPART, URLENCODED):  # RequestGuard answers 415 before this
        raise _invalid((), f"expected {JSON_TYPE}, {MULTIPART} or {URLENCODED}", "value_error")
    async with request.form() as form:
        data, uploads = _form_data(form, model, files)
        yield _validate(model, data), uploads


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def request_body(model: type[BaseModel], files: dict[str, str] | None = None, description: str = "") -> dict[str, Any]:
    """The OpenAPI `requestBody` of a route that reads `model` as JSON or form fields; the
    `files` (name -> description) are uploads, in multipart/form-data only."""
    schema = model.model_json_schema()
    uploads = {k: {"type": "string", "format": "binary", "description": d} for k, d in (files or {}).items()}
    multipart = {**schema, "properties": {**schema.get("properties", {}), **uploads}}
    return {"requestBody": {"required": True, "description": description, "content": {
        JSON_TYPE: {"schema": schema}, MULTIPART: {"schema": multipart}, URLENCODED: {"schema": schema},
    }}}
