"""Request bodies parsed strictly, whatever ``Content-Type`` the client sent.

The runbook's ``curl -X POST … -d '{"value": true}'`` sends no JSON content type, so
routes read the raw bytes and parse them with :func:`requiem.digest.parse_json`
(duplicate keys, NaN and garbage refused with their own codes) before validating
them against a model.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from requiem.api.responses import BadRequest
from requiem.digest import parse_json

Model = TypeVar("Model", bound=BaseModel)


async def json_document(request: Request) -> Any:
    """The request body as JSON; ``json_parse_error`` when it is empty or not JSON."""
    raw = await request.body()
    return parse_json(raw)


async def parse_body(request: Request, model: type[Model]) -> Model:
    """The request body validated as ``model``; ``invalid_request`` names the field."""
    document = await json_document(request)
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise BadRequest(f"{where}: {first['msg']}") from exc


# Models used as hand-parsed bodies; the OpenAPI document lists them as components.
BODY_COMPONENTS: dict[str, dict[str, Any]] = {}
REF_TEMPLATE = "#/components/schemas/{model}"


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the JSON request body."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    BODY_COMPONENTS.update(schema.pop("$defs", {}))
    BODY_COMPONENTS[model.__name__] = schema
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": REF_TEMPLATE.format(model=model.__name__)}
                }
            },
        }
    }
