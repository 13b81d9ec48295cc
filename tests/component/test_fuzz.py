"""Fuzzing the gateway's API over HTTP, bounded to about a minute and reproducible (derandomized).

(a) schemathesis generates requests from `/openapi.json`, inside the schema and outside it, for every
route, on SQLite and on PostgreSQL; (b) Hypothesis builds raw chat bodies the schema cannot describe: odd
unicode, huge and empty fields, wrong types, deep nesting, duplicate keys, content parts, tool calls,
invalid UTF-8, non-JSON; (c) the admin API's edges: times at the ends of the calendar, huge limits, NUL.
The backends are healthy fakes, so every 5xx is the gateway's bug; every non-2xx must be OpenAI's error
body; schemathesis also checks statuses, content types, headers, bodies and auth against the document.
Afterwards the gateway must still answer. What the fuzzing found stays below as plain regressions. Cases
and failures are counted and printed as one line at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from sluice.app import Gateway
from tests.conftest import API_KEY, StartFake, StartGateway

ADMIN_KEY = "admin-fuzz-0123456789abcdef"
KEY_SECRET = "fuzz-secret-0123456789abcdef-0123456789"
TIMEOUT = 10.0  # seconds for one answer; longer is a hang
SCHEMATHESIS_EXAMPLES = 1500  # per generation mode and database
RAW_EXAMPLES = 3000
ADMIN_EXAMPLES = 800  # per database
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,  # a credential-protected operation answers 2xx without one, or with a wrong one
]
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
COUNTS: Counter[str] = Counter()
FAILURES: set[str] = set()  # kinds of failure found
GOOD_TURN = {"role": "user", "content": "hi"}
GOOD_CHAT = {"model": "base", "messages": [GOOD_TURN]}


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    line = (
        f"fuzz summary: {COUNTS['schemathesis']} schemathesis cases, {COUNTS['raw']} raw bodies, "
        f"{COUNTS['admin']} admin requests, {COUNTS['regression']} regression requests, {len(FAILURES)} failures"
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n" + line)


async def start_served(fake: StartFake, gateway: StartGateway, folder: Path, database: str) -> Gateway:
    """A gateway with every feature the API reaches (managed keys, admin, cache, repair, audit) over a
    healthy fake, started from a file so that `POST /admin/reload` works."""
    backend = await fake("base")
    config = {
        "database": {"url": database},
        "audit": {"journal_dir": str(folder / "journal")},
        "server": {"host": "127.0.0.1", "port": 0},
        "backends": [{"name": "b0", "url": backend.url}],
        "auth": {"api_keys": [{"name": "test", "key": API_KEY}], "admin_key": ADMIN_KEY, "key_secret": KEY_SECRET},
        "health": {"interval": 0.2, "timeout": 1.0, "discovery_interval": 1.0},
        "logging": {"level": "warning"},
        "cache": {"enabled": True, "semantic": {"enabled": False}},
        "repair": {"enabled": True},
    }
    path = folder / "sluice.yaml"
    path.write_text(yaml.safe_dump(config))
    return await gateway(config_path=path)


@pytest.fixture
async def served(fake: StartFake, gateway: StartGateway, tmp_path: Path) -> Gateway:
    return await start_served(fake, gateway, tmp_path, f"sqlite:///{tmp_path}/sluice.db")


def fail(kind: str, detail: str) -> None:
    """Count a failure once per kind (where and what, e.g. a route and a status), however often
    Hypothesis meets it while shrinking, and fail the example."""
    FAILURES.add(kind)
    raise AssertionError(f"{kind}: {detail}")


def error_body_problem(status: int, content_type: str, body: bytes) -> str | None:
    """Why a non-2xx answer is not OpenAI's error body, or None when it is."""
    if status < 400:
        return None
    if not content_type.startswith("application/json"):
        return f"{status} with content type {content_type!r}"
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"{status} with a body that is not JSON: {body[:200]!r}"
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return f"{status} without an error object: {body[:200]!r}"
    if not isinstance(error.get("message"), str) or not isinstance(error.get("type"), str):
        return f"{status} error without a message and type: {body[:200]!r}"
    if not (error.get("param") is None or isinstance(error["param"], str)):
        return f"{status} error with a param that is not a string: {body[:200]!r}"
    if not (error.get("code") is None or isinstance(error["code"], str | int)):
        return f"{status} error with an odd code: {body[:200]!r}"
    return None


def answer_problem(response: requests.Response, path: str, body: bytes) -> str | None:
    """What is wrong with the answer to a raw POST: a 5xx, a bad error body, the wrong kind of answer."""
    status, content_type = response.status_code, response.headers.get("content-type", "")
    if status >= 500:
        return f"{status}: {response.content[:300]!r}"
    problem = error_body_problem(status, content_type, response.content)
    if problem is not None or status >= 300:
        return problem
    try:
        sent = orjson.loads(body)  # as the gateway reads it: the last of duplicate keys wins
    except orjson.JSONDecodeError:
        return f"{status} for a body that is not JSON"
    streams = path != "/v1/embeddings" and isinstance(sent, dict) and sent.get("stream") is True
    if content_type.startswith("text/event-stream") != streams:
        return f"{status} {content_type} answer to a request with stream={streams}"
    if streams:
        for line in response.content.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]" and "error" in orjson.loads(line[6:]):
                return f"a healthy stream carried an error: {line[:300]!r}"
        return None
    if not isinstance(orjson.loads(response.content), dict):
        return f"{status} answer that is not a JSON object: {response.content[:200]!r}"
    return None


def still_serving(url: str) -> None:
    with requests.Session() as session:
        assert session.get(url + "/health", timeout=TIMEOUT).status_code == 200
        answer = session.post(
            url + "/v1/chat/completions",
            json=GOOD_CHAT,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=TIMEOUT,
        )
        assert answer.status_code == 200, answer.content
        assert answer.json()["object"] == "chat.completion"


# (a) schemathesis, from the served document


def run_schemathesis(url: str, mode: GenerationMode, examples: int) -> None:
    schema = schemathesis.openapi.from_dict(orjson.loads(requests.get(url + "/openapi.json", timeout=TIMEOUT).content))
    session = requests.Session()

    @settings(FUZZ, max_examples=examples)
    @given(case=schema.as_strategy(generation_mode=mode), served_model=st.booleans())
    def one(case: Any, served_model: bool) -> None:
        if served_model and case.path.startswith("/v1/") and isinstance(case.body, dict):
            case.body["model"] = "base"  # reach the backend, not only the model lookup
        credential = ADMIN_KEY if case.path.startswith("/admin/") else API_KEY
        COUNTS["schemathesis"] += 1
        where = f"{mode.value} {case.method} {case.formatted_path}"
        try:
            response = case.call(
                base_url=url, session=session, headers={"Authorization": f"Bearer {credential}"}, timeout=TIMEOUT
            )
        except requests.RequestException as exc:
            fail(f"{where}: no answer", repr(exc))
        content_type = (response.headers.get("content-type") or [""])[0]
        problem = error_body_problem(response.status_code, content_type, response.content)
        if problem is not None:
            fail(f"{where}: {response.status_code} answer", problem)
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as failures:
            fail(f"{where}: {', '.join(sorted(type(f).__name__ for f in failures.exceptions))}", str(failures))

    try:
        one()
    finally:
        session.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
async def test_schemathesis(
    fake: StartFake, gateway: StartGateway, tmp_path: Path, url: str, mode: GenerationMode
) -> None:
    served = await start_served(fake, gateway, tmp_path, url)  # `url`: SQLite, then PostgreSQL
    await asyncio.to_thread(run_schemathesis, served.url, mode, SCHEMATHESIS_EXAMPLES)
    await asyncio.to_thread(still_serving, served.url)


# (b) raw chat bodies

ODD_PIECES = [
    "\x00", "\u202e", "\u200f", "\u2066", "\ufeff", "\uffff", "\ufffd", "a\u0301", "\U0001f600",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\U0001d54f", "\ud800", "\udfff", "\\", '"', "\n\r\t",
    "\u2028", "ﷺ", "\x7f", "<script>",
]  # fmt: skip
printable_text = st.one_of(  # no lone surrogates: JSON parsers refuse those before anything else looks
    st.text(max_size=40),
    st.lists(st.sampled_from([p for p in ODD_PIECES if not "\ud800" <= p <= "\udfff"]), max_size=8).map("".join),
    st.sampled_from(["", "x" * 100_000, "word " * 3_000]),
)
odd_text = printable_text | st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates included
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([2**64, -(2**63) - 1, 10**30]), st.floats(), odd_text
)
any_json = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4), max_leaves=12
)
content_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": odd_text}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.fixed_dictionaries(
                {"url": st.sampled_from(["https://example.com/a.png", "data:image/png;base64,iVBORw0KGgo=", "", "x"])},
                optional={"detail": st.sampled_from(["auto", "low", "high", ""])},
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("input_audio"),
            "input_audio": st.fixed_dictionaries(
                {"data": st.sampled_from(["UklGRg==", "", "not base64"]), "format": st.sampled_from(["wav", "mp3"])}
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("file"),
            "file": st.fixed_dictionaries(
                {}, optional={"file_data": odd_text, "file_id": odd_text, "filename": odd_text}
            ),
        }
    ),
    any_json,
)
tool_call = st.fixed_dictionaries(
    {
        "id": odd_text,
        "type": st.sampled_from(["function", ""]),
        "function": st.fixed_dictionaries({"name": odd_text, "arguments": odd_text | any_json}),
    }
)
turns = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | odd_text,
            "content": odd_text | st.lists(content_parts, max_size=4) | st.none(),
        },
        optional={"name": odd_text},
    ),
    st.fixed_dictionaries(
        {"role": st.just("assistant"), "content": st.none() | odd_text, "tool_calls": st.lists(tool_call, max_size=3)}
    ),
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": odd_text, "content": odd_text | any_json}),
)
messages = turns | any_json

tools = st.lists(
    st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": odd_text, "parameters": any_json})}
    ),
    max_size=3,
)
chat_bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["base"] * 6 + [""]) | any_json,
        "messages": st.lists(messages, min_size=1, max_size=5) | st.just([]) | any_json,
    },
    optional={
        "stream": st.sampled_from([True, True, False]) | any_json,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | any_json}) | any_json,
        "temperature": st.sampled_from([0, 0.0, 0.7, 2]) | any_json,
        "top_p": st.floats(0, 1) | any_json,
        "max_tokens": st.integers(-3, 40) | any_json,
        "max_completion_tokens": st.integers(-3, 40) | any_json,
        "n": st.integers(-1, 3) | any_json,
        "tools": tools | any_json,
        "tool_choice": st.sampled_from(["auto", "none", "required"]) | any_json,
        "logprobs": st.booleans(),
        "seed": any_json,
        "\u202eextra\x00": any_json,
    },
)
valid_chat_bodies = st.fixed_dictionaries(
    {
        "model": st.just("base"),
        "messages": st.lists(turns, max_size=3).map(lambda m: [*m, GOOD_TURN]),
        "stream": st.booleans(),
    },
    optional={"temperature": st.sampled_from([0, 1])},
)  # past validation, so that what is mutated next reaches the later stages and the backend

SPLICED_BYTES = [b"\xff", b"\xfe\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\x00"]
NOT_JSON = [
    b"", b"null", b"true", b"1", b'"text"', b"[]", b"{}", b"1e400", b"\xef\xbb\xbf{}", b"NaN",
    b"model=base&messages=hi", b"<xml/>", b"{", b'{"model": "base"', b"\x00" * 16, b"{}" * 10_000,
]  # fmt: skip
DEPTHS = st.sampled_from([1, 100, 254, 255, 256, 300, 500, 1000, 1023, 1024, 1025, 10_000])


def pairs_json(pairs: list[tuple[str, Any]]) -> bytes:
    """A JSON object written from (key, value) pairs, so keys may repeat."""
    return b"{" + b",".join(json.dumps(k).encode() + b":" + json.dumps(v).encode() for k, v in pairs) + b"}"


def serialise(body: dict[str, Any], ascii_only: bool) -> bytes:
    # Lone surrogates become \\udXXX escapes with ensure_ascii, else raw (invalid UTF-8) bytes.
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def raw_bodies(draw: Callable[..., Any]) -> bytes:
    shape = draw(st.sampled_from(["json"] * 3 + ["duplicate", "nested", "nested", "spliced", "cut", "not json"]))
    mutated = shape in ("duplicate", "nested", "spliced")  # mostly of valid bodies, to reach the later stages
    body: dict[str, Any] = draw(valid_chat_bodies | chat_bodies if mutated else chat_bodies | valid_chat_bodies)
    if shape == "json":
        return serialise(body, draw(st.booleans()))
    if shape == "duplicate":
        pairs = list(body.items())
        key = draw(st.sampled_from([*body, "model", "stream"]))
        pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(any_json)))
        return pairs_json(pairs)
    if shape == "nested":
        depth, where = draw(DEPTHS), draw(st.sampled_from(["content", "x", "tools", "stream_options", "messages"]))
        placeholder = "\x01deep\x01"
        if where == "content" and isinstance(body.get("messages"), list) and body["messages"]:
            body["messages"][0] = {"role": "user", "content": "hi", "extra": placeholder}
        else:
            body[where] = placeholder
        return serialise(body, True).replace(b'"\\u0001deep\\u0001"', ("[" * depth + "]" * depth).encode())
    data = serialise(body, True)
    if shape == "spliced":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from(SPLICED_BYTES)) + data[at:]
    if shape == "cut":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return bytes(draw(st.sampled_from(NOT_JSON) | st.binary(max_size=64)))


CONTENT_TYPES = st.sampled_from(["application/json"] * 6 + ["text/plain", "", "application/x-www-form-urlencoded"])
PATHS = st.sampled_from(["/v1/chat/completions"] * 8 + ["/v1/completions", "/v1/embeddings", "/admin/keys"])


def run_raw(url: str, examples: int) -> None:
    session = requests.Session()

    @settings(FUZZ, max_examples=examples)
    @given(body=raw_bodies(), content_type=CONTENT_TYPES, path=PATHS)
    def one(body: bytes, content_type: str, path: str) -> None:
        credential = ADMIN_KEY if path.startswith("/admin/") else API_KEY
        headers = {"Authorization": f"Bearer {credential}", "Content-Type": content_type}
        COUNTS["raw"] += 1
        try:
            response = session.post(url + path, data=body, headers=headers, timeout=TIMEOUT)
        except requests.RequestException as exc:
            fail(f"raw POST {path}: no answer", f"{body[:300]!r}: {exc!r}")
        problem = answer_problem(response, path, body)
        if problem is not None:
            fail(f"raw POST {path}: {response.status_code} answer", f"{body[:300]!r}: {problem}")

    try:
        one()
    finally:
        session.close()


async def test_raw_chat_bodies(served: Gateway) -> None:
    await asyncio.to_thread(run_raw, served.url, RAW_EXAMPLES)
    await asyncio.to_thread(still_serving, served.url)


# (c) the admin API's edges: dates near the ends of the calendar, huge limits, NUL, odd key ids, on both databases

offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda minutes: timezone(timedelta(minutes=minutes)))
times = st.one_of(  # ISO times, near the ends of the calendar a third of the time each, where offsets overflow
    st.datetimes(min_value=datetime(2030, 1, 1), timezones=offsets),
    st.datetimes(min_value=datetime(9999, 12, 31), timezones=offsets),
    st.datetimes(max_value=datetime(1, 1, 1, 23, 59), timezones=offsets),
).map(datetime.isoformat) | st.sampled_from(["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
moments = st.one_of(  # what `since` and `until` read
    times,
    st.dates().map(date.isoformat),
    st.builds("{}{}".format, st.integers(0, 10**20), st.sampled_from("mhdw")),
    printable_text,
)
limits = st.sampled_from([1, 2**31 - 1, 2**31, 2**63 - 1, 2**63]) | st.integers(1, 2**31 - 1) | st.integers()
SERIAL = itertools.count()
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True).map(lambda name: f"{name}.{next(SERIAL)}")


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` nine times in ten, else any JSON value (a wrong type, most likely)."""
    return st.integers(0, 9).flatmap(lambda pick: valid if pick else any_json)


new_keys = st.fixed_dictionaries(
    {"name": mostly(names)},
    optional={
        "models": mostly(st.lists(printable_text.filter(bool), min_size=1, max_size=3)),
        "tenant": mostly(printable_text),
        "requests_per_minute": mostly(limits),
        "tokens_per_minute": mostly(limits),
        "max_concurrency": mostly(limits),
        "expires_at": mostly(times),
        "log_bodies": mostly(st.booleans()),
        "cache": mostly(st.booleans()),
    },
)
purges = st.fixed_dictionaries(
    {},
    optional={
        "tenant": printable_text | any_json,
        "caller": printable_text,
        "model": printable_text,
        "all": st.booleans() | any_json,
    },
)
alerts = st.fixed_dictionaries(
    {
        "alerts": st.lists(
            st.fixed_dictionaries(
                {
                    "status": st.sampled_from(["firing", "resolved"]) | printable_text,
                    "labels": st.dictionaries(
                        st.sampled_from(["alertname", "backend", "instance"]) | printable_text,
                        st.sampled_from(["VLLMKVCacheSaturated", "SluiceBackendErrorRateHigh", "b0"]) | printable_text,
                    ),
                },
                optional={"fingerprint": printable_text},
            )
            | any_json,
            max_size=3,
        )
    }
)


def quoted(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


usage_queries = st.dictionaries(
    st.sampled_from(["since", "until", "daily", "key", "model"]),
    times | moments | st.sampled_from(["1", "true", "0"]),
    max_size=5,
).map(lambda query: "&".join(f"{name}={quoted(value)}" for name, value in query.items()))
ADMIN_REQUESTS = st.one_of(
    st.tuples(st.just("POST"), st.just("/admin/keys"), new_keys),
    st.tuples(st.just("GET"), usage_queries.map("/admin/usage?{}".format), st.none()),
    st.tuples(st.just("POST"), st.just("/admin/cache/purge"), purges),
    st.tuples(st.just("POST"), st.just("/admin/alerts"), alerts),
    st.tuples(
        st.sampled_from(["GET", "POST"]),
        st.tuples(printable_text.map(quoted), st.sampled_from(["", "/revoke", "/rotate", "/x/y"])).map(
            lambda parts: f"/admin/keys/{parts[0]}{parts[1]}"
        ),
        st.none(),
    ),
)


def run_admin(url: str, examples: int) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {ADMIN_KEY}"

    @settings(FUZZ, max_examples=examples)
    @given(request=ADMIN_REQUESTS)
    def one(request: tuple[str, str, Any]) -> None:
        method, path, body = request
        COUNTS["admin"] += 1
        data = None if body is None else serialise(body, True)
        try:
            response = session.request(method, url + path, data=data, timeout=TIMEOUT)
        except requests.RequestException as exc:
            fail(f"admin {method} {path.partition('?')[0]}: no answer", f"{data!r}: {exc!r}")
        problem = admin_answer_problem(response)
        if problem is not None:
            where = path.partition("?")[0] if not path.startswith("/admin/keys/") else "/admin/keys/{key}"
            fail(f"admin {method} {where}: {response.status_code} answer", f"{path[:300]} {data!r}: {problem}")

    try:
        one()
    finally:
        session.close()


def admin_answer_problem(response: requests.Response) -> str | None:
    status, content_type = response.status_code, response.headers.get("content-type", "")
    if status >= 500:
        return f"{status}: {response.content[:300]!r}"
    problem = error_body_problem(status, content_type, response.content)
    if problem is None and status < 300 and not isinstance(orjson.loads(response.content), dict):
        return f"{status} answer that is not a JSON object: {response.content[:200]!r}"
    return problem


async def test_admin_api_edges(fake: StartFake, gateway: StartGateway, tmp_path: Path, url: str) -> None:
    served = await start_served(fake, gateway, tmp_path, url)  # `url`: SQLite, then PostgreSQL
    await asyncio.to_thread(run_admin, served.url, ADMIN_EXAMPLES)
    await asyncio.to_thread(still_serving, served.url)


# Bugs the fuzzing found, kept as plain regressions (on both databases: some were PostgreSQL's alone)

DEEP = b"[" * 300 + b"]" * 300  # orjson reads 1024 levels but writes only 254


def chat_with(extra: bytes, nested: bytes = DEEP) -> bytes:
    return b'{"model":"base",%s"messages":[{"role":"user","content":"hi","x":%s}]}' % (extra, nested)


def new_key(**fields: Any) -> bytes:
    return orjson.dumps({"name": f"regression-{next(SERIAL)}", **fields})


REGRESSIONS = [
    # were 500s: re-serialising for stream_options.include_usage raised orjson's recursion error
    ("POST", "/v1/chat/completions", chat_with(b'"stream":true,'), 400),
    ("POST", "/v1/completions", b'{"model":"base","stream":true,"prompt":"hi","x":%s}' % DEEP, 400),
    # were 500s: the cache key of a cacheable request (temperature 0) serialised the body too
    ("POST", "/v1/chat/completions", chat_with(b'"temperature":0,'), 400),
    ("POST", "/v1/completions", b'{"model":"base","temperature":0,"prompt":"hi","x":%s}' % DEEP, 400),
    ("POST", "/v1/chat/completions", chat_with(b"", b"[" * 10_000 + b"]" * 10_000), 400),
    ("POST", "/v1/chat/completions", chat_with(b'"stream":true,', b"[" * 250 + b"]" * 250), 200),  # 254 in all
    # was a 200 labelled text/event-stream holding JSON: embeddings with stream=true were relayed as a stream
    ("POST", "/v1/embeddings", b'{"model":"base","input":"hi","stream":true,"stream_options":{}}', 200),
    # was a 200: booleans passed as token ids (the schema check in test_openapi.py found it)
    ("POST", "/v1/completions", b'{"model":"base","prompt":[true, 1]}', 400),
    # were 500s: an expiry whose offset takes it past year 1 or 9999 in UTC overflowed
    ("POST", "/admin/keys", new_key(expires_at="0001-01-01T00:00:00+01:00"), 400),
    ("POST", "/admin/keys", new_key(expires_at="9999-12-31T23:59:59-01:00"), 400),
    # were 500s: limits past the 32-bit columns (PostgreSQL) or 64 bits (SQLite)
    ("POST", "/admin/keys", new_key(max_concurrency=2**31), 400),
    ("POST", "/admin/keys", new_key(requests_per_minute=2**63), 400),
    ("POST", "/admin/keys", new_key(tokens_per_minute=2**31 - 1), 201),
    # were 500s on PostgreSQL: its text cannot hold NUL
    ("POST", "/admin/keys", new_key(tenant="a\x00b"), 400),
    ("POST", "/admin/keys", new_key(models=["\x00"]), 400),
    ("GET", "/admin/usage?key=%00", b"", 400),
    ("GET", "/admin/usage?model=a%00", b"", 400),
    # were 500s: report windows whose offsets overflow, or whose last day has no next one
    ("GET", "/admin/usage?since=0001-01-01T00:00:00%2B01:00", b"", 400),
    ("GET", "/admin/usage?since=9999-12-31T23:59:59-01:00&until=9999-12-31T23:59:59-02:00", b"", 400),
    ("GET", "/admin/usage?since=9999-12-30&until=9999-12-31T12:00:00&daily=1", b"", 200),
]


async def test_fuzzing_regressions(fake: StartFake, gateway: StartGateway, tmp_path: Path, url: str) -> None:
    served = await start_served(fake, gateway, tmp_path, url)

    def send(method: str, path: str, body: bytes) -> requests.Response:
        credential = ADMIN_KEY if path.startswith("/admin/") else API_KEY
        headers = {"Authorization": f"Bearer {credential}", "Content-Type": "application/json"}
        return requests.request(method, served.url + path, data=body, headers=headers, timeout=TIMEOUT)

    for method, path, body, status in REGRESSIONS:
        COUNTS["regression"] += 1
        response = await asyncio.to_thread(send, method, path, body)
        assert response.status_code == status, (path, body[:100], response.content[:300])
        if path.startswith("/v1/"):
            assert answer_problem(response, path, body) is None
        else:
            assert admin_answer_problem(response) is None
