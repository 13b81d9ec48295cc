"""The cache key: what must match is in the scope, whitespace alone never splits a key, the probe is bounded."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sluice.cache.keys import MAX_PROBE_CHARS, cache_key

words = st.text(alphabet="abcdefgh ", min_size=1, max_size=30).filter(lambda t: t.strip())
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": words}), min_size=0, max_size=4
)
OUTPUT_PARAMS = {
    "temperature": st.sampled_from([0, 0.0, 0.5]),
    "top_p": st.sampled_from([0.1, 0.9]),
    "max_tokens": st.integers(1, 50),
    "stop": st.lists(words, max_size=2),
    "seed": st.integers(0, 5),
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "name": words}), max_size=2),
    "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}]),
    "n": st.integers(1, 3),
    "frequency_penalty": st.sampled_from([0.0, 1.0]),
}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(["base", "base-lora-a", "other"])),
        "messages": [
            *([{"role": "system", "content": draw(words)}] if draw(st.booleans()) else []),
            *draw(messages),
            {"role": "user", "content": draw(words)},
        ],
    }
    for name, strategy in OUTPUT_PARAMS.items():
        if draw(st.booleans()):
            body[name] = draw(strategy)
    return body


@st.composite
def mutated(draw: st.DrawFn) -> tuple[dict[str, Any], str, dict[str, Any], str]:
    """A request and a copy that differs in one thing that can change the answer (never the last message)."""
    body = draw(requests())
    tenant = draw(st.sampled_from(["tenant:a", "tenant:b", "caller:static:x"]))
    other, other_tenant = copy.deepcopy(body), tenant
    what = draw(st.sampled_from(["tenant", "model", "system", "param", "earlier"]))
    if what == "tenant":
        other_tenant = tenant + "-other"
    elif what == "model":
        other["model"] = body["model"] + "-other"
    elif what == "system":
        first = other["messages"][0]
        if first["role"] == "system":
            first["content"] += " and more"
        else:
            other["messages"].insert(0, {"role": "system", "content": "be brief"})
    elif what == "param":
        name = draw(st.sampled_from(sorted(OUTPUT_PARAMS)))
        value = draw(OUTPUT_PARAMS[name])
        if (name in body and body[name] == value) or (name not in body and value is None):
            value = {"changed": True}
        other[name] = value
    else:
        other["messages"].insert(-1, {"role": "assistant", "content": "an earlier answer"})
    return body, tenant, other, other_tenant


@given(mutated())
def test_anything_that_changes_the_answer_changes_the_scope(
    case: tuple[dict[str, Any], str, dict[str, Any], str],
) -> None:
    body, tenant, other, other_tenant = case
    a, b = cache_key("chat", body, tenant), cache_key("chat", other, other_tenant)
    assert a.scope != b.scope
    assert a.exact != b.exact


@given(requests(), st.sampled_from(["tenant:a", "caller:key:1"]))
def test_fields_that_do_not_change_the_answer_and_whitespace_keep_the_key(body: dict[str, Any], tenant: str) -> None:
    other = copy.deepcopy(body)
    other.update(stream=True, stream_options={"include_usage": True}, user="someone")
    for message in other["messages"]:
        message["content"] = "  " + message["content"].replace(" ", "  \n") + "\t"
    assert cache_key("chat", body, tenant) == cache_key("chat", other, tenant)


def test_the_last_turn_is_in_the_exact_key_but_not_the_scope() -> None:
    one = cache_key("chat", {"model": "m", "messages": [{"role": "user", "content": "What is 2+2?"}]}, "t")
    two = cache_key("chat", {"model": "m", "messages": [{"role": "user", "content": "What's 2 + 2?"}]}, "t")
    assert one.scope == two.scope
    assert one.exact != two.exact
    assert (one.probe, two.probe) == ("What is 2+2?", "What's 2 + 2?")


def test_case_is_not_normalised_away() -> None:
    lower = cache_key("completions", {"model": "m", "prompt": "paris"}, "t")
    upper = cache_key("completions", {"model": "m", "prompt": "Paris"}, "t")
    assert lower.exact != upper.exact


def test_a_single_text_part_is_the_same_as_a_string() -> None:
    text = cache_key("chat", {"model": "m", "messages": [{"role": "user", "content": "hi there"}]}, "t")
    parts = cache_key(
        "chat", {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi  there"}]}]}, "t"
    )
    assert text == parts


def test_routes_and_corpus_versions_are_separate_scopes() -> None:
    body = {"model": "m", "prompt": "hello"}
    assert cache_key("completions", body, "t").scope != cache_key("completions", body, "t", corpus="v2").scope
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    assert cache_key("completions", body, "t").exact != cache_key("chat", chat, "t").exact


def test_only_short_user_text_is_compared_by_meaning() -> None:
    def probe(messages: list[dict[str, Any]]) -> str | None:
        return cache_key("chat", {"model": "m", "messages": messages}, "t").probe

    assert probe([{"role": "user", "content": "x" * MAX_PROBE_CHARS}]) is not None
    assert probe([{"role": "user", "content": "x" * (MAX_PROBE_CHARS + 1)}]) is None  # the model would truncate it
    assert probe([{"role": "user", "content": "word " * 151}]) is None
    assert probe([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}]) is None
    assert probe([{"role": "user", "content": "q"}, {"role": "tool", "content": "result", "tool_call_id": "1"}]) is None
    assert cache_key("completions", {"model": "m", "prompt": [1, 2, 3]}, "t").probe is None
