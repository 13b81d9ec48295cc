"""The OpenAPI document stays in step with the route table and the admin models, and validates as 3.1."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from sluice.admin import NewKey
from sluice.admin_cache import Purge
from sluice.errors import InvalidRequest
from sluice.openapi import build_document, route_of
from sluice.openapi_schemas import BODY_MODELS, REF_TEMPLATE
from sluice.pipeline.validation import CHECKS
from sluice.repair import Notification
from sluice.routes import PATHS, PREFIXES
from tests.conftest import StartFake, StartGateway

DOCUMENT = build_document()
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def documented() -> set[tuple[str, str]]:
    return {
        (path, method.upper())
        for path, operations in DOCUMENT["paths"].items()
        for method in operations
        if method in HTTP_METHODS
    }


def test_every_route_is_documented_and_nothing_else() -> None:
    in_table = {(path, method) for path, route in PATHS.items() for method in route.methods}
    in_spec = documented()
    exact = {(path, method) for path, method in in_spec if path in PATHS}
    assert exact == in_table
    for prefix, route in PREFIXES.items():
        templated = {(path, method) for path, method in in_spec if path.startswith(prefix)}
        assert templated, f"nothing documented under {prefix}"
        assert {method for _, method in templated} == set(route.methods)
    unrouted = {path for path, _ in in_spec if path not in PATHS and not path.startswith(tuple(PREFIXES))}
    assert not unrouted, "documented, but not in the route table"


def test_security_follows_the_route_table() -> None:
    for path, operations in DOCUMENT["paths"].items():
        route = route_of(path)
        expected = [{"adminKey": []}] if route.admin else [] if route.public else [{"apiKey": []}]
        for method, operation in operations.items():
            assert operation["security"] == expected, (method, path)
            if not route.public:
                assert "401" in operation["responses"], (method, path)


def test_validates_as_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    validate(DOCUMENT, cls=OpenAPIV31SpecValidator)


def test_every_error_response_is_the_openai_error_body() -> None:
    responses = DOCUMENT["components"]["responses"]
    for path, operations in DOCUMENT["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if int(status) >= 400:
                    assert answer == {"$ref": f"#/components/responses/{status}"}, (method, path, status)
                    assert responses[status]["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }


def test_admin_bodies_are_the_pydantic_models_schemas() -> None:
    schemas = DOCUMENT["components"]["schemas"]
    for model in BODY_MODELS:
        generated: dict[str, Any] = model.model_json_schema(ref_template=REF_TEMPLATE)
        for name, nested in generated.pop("$defs", {}).items():
            assert schemas[name] == nested
        assert schemas[model.__name__] == generated
    bodies = {
        ("/admin/keys", "post"): NewKey,
        ("/admin/cache/purge", "post"): Purge,
        ("/admin/alerts", "post"): Notification,
    }
    for (path, method), model in bodies.items():
        body = DOCUMENT["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def test_every_reference_resolves() -> None:
    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return found + [ref for value in node.values() for ref in refs(value)]
        if isinstance(node, list):
            return [ref for value in node for ref in refs(value)]
        return []

    for ref in refs(DOCUMENT):
        node: Any = DOCUMENT
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]


async def test_served_document_is_the_module_one(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/openapi.json") as r:  # no credential
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json"
        served = await r.read()
    assert served == gw.openapi.body
    assert orjson.loads(served) == orjson.loads(orjson.dumps(DOCUMENT))


# The proxied bodies' schemas say exactly what pipeline/validation.py accepts. JSON Schema counts 1.0 as an
# integer where the gateway wants 1, so integral floats are left out of the generated values.
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
small_ints = st.integers(-1, 3)
messages = st.lists(
    st.fixed_dictionaries({}, optional={"role": st.text(max_size=5) | values, "content": values}) | values, max_size=3
)
prompt_items = st.text(max_size=3) | small_ints | st.booleans() | st.lists(small_ints, max_size=2) | values
FIELDS = {  # each field mostly of the right type, so that one wrong field decides
    "model": st.sampled_from(["base", ""]) | values,
    "stream": st.booleans() | values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | values}) | values,
    **{name: small_ints | values for name in ("max_tokens", "max_completion_tokens", "n")},
    **{name: small_ints | values for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty")},
    "messages": messages | values,
    "prompt": st.text(max_size=3) | st.lists(prompt_items, max_size=3) | values,
    "input": st.text(max_size=3) | st.lists(values, max_size=3) | values,
}
REQUESTS = {"chat": "ChatCompletionRequest", "completions": "CompletionRequest", "embeddings": "EmbeddingRequest"}


def accepted_by_gateway(route: str, body: dict[str, Any]) -> bool:
    try:
        CHECKS[route](body)
    except InvalidRequest:
        return False
    return True


@pytest.mark.parametrize("route", sorted(REQUESTS))
def test_request_schemas_accept_what_the_gateway_accepts(route: str) -> None:
    schema = {"$ref": REF_TEMPLATE.format(model=REQUESTS[route]), "components": DOCUMENT["components"]}
    validator = Draft202012Validator(schema)

    @settings(max_examples=2000, derandomize=True, database=None, deadline=None)
    @given(body=st.fixed_dictionaries({}, optional=FIELDS))
    def agree(body: dict[str, Any]) -> None:
        body = orjson.loads(orjson.dumps(body))  # as it arrives
        assert validator.is_valid(body) == accepted_by_gateway(route, body), body

    agree()
