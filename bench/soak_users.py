"""Simulated users of the soak: each thinks for a while, sends one chat completion, reads the whole answer.

A user keeps one API key for the whole run. Half the requests stream. Some questions come back again and
again (a fixed list asked at temperature 0, so the response cache can answer them); the rest are new
prompts at temperature 0.7, which the cache lets through. Each request asks the fake engine for its own
latency (`X-Fake-TTFT-Ms`, `X-Fake-ITL-Ms`) and its length (`max_tokens`), and carries the user's own
address in `X-Forwarded-For` (the gateway believes it from 127.0.0.1). Every request ends as one `Outcome`.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import aiohttp

from bench.soak_services import MODEL, ApiKey

FAQ_TOPICS = (
    "reset my password", "rotate an API key", "read the usage report", "raise my rate limit",
    "stream a chat completion", "choose between the models", "load a LoRA adapter", "cache an answer",
    "cancel a running request", "see which backend answered", "count prompt tokens", "set max_tokens",
    "write a system prompt", "retry after a 429", "read the audit log", "export my conversations",
    "use the completions route", "get embeddings", "set a timeout in the SDK", "handle a 503",
    "pick a temperature", "call the gateway from LangChain", "send a long document", "log out",
)  # fmt: skip
WORDS = (
    "river", "lamp", "orbit", "garden", "ledger", "copper", "signal", "harbor", "puzzle", "meadow",
    "vector", "timber", "falcon", "canvas", "thread", "summit", "pepper", "glacier", "anchor", "violet",
)  # fmt: skip
SYSTEM = "You are the support assistant of a small software company. Answer briefly."


@dataclass(frozen=True, slots=True)
class Mix:
    """What the users do. Times in seconds, latencies in milliseconds; ranges are uniform."""

    users: int = 100
    metered_users: int = 6  # on the key with a tight requests-per-minute limit: its 429s are expected
    stream_share: float = 0.5
    repeated_share: float = 0.3  # questions from FAQ_TOPICS at temperature 0 (cacheable)
    think_s: tuple[float, float] = (0.5, 2.0)
    ttft_ms: tuple[float, float] = (50.0, 200.0)
    itl_ms: tuple[float, float] = (10.0, 20.0)
    max_tokens: tuple[int, int] = (20, 100)
    request_timeout_s: float = 60.0


@dataclass(slots=True)
class Outcome:
    """One request as the user saw it. `kind`: `ok` (a complete answer), `cut` (a stream ended by the
    gateway's `stream_interrupted` error event), `bad_stream` (a stream that ended any other way short of
    `[DONE]`), `refused` (an HTTP error status), `no_answer` (no status: connection failure or timeout)."""

    user: int
    key: str
    stream: bool
    repeated: bool
    started: float  # time.monotonic()
    ended: float = 0.0
    status: int = 0
    kind: str = "no_answer"
    request_id: str = ""
    ttft_s: float | None = None
    cache: str = ""
    detail: str = ""

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


@dataclass(slots=True)
class Users:
    """The population: `await users.run(session, deadline)`; outcomes accumulate in `outcomes`."""

    url: str
    keys: list[ApiKey]  # the unmetered keys, shared round-robin by the ordinary users
    metered: ApiKey
    mix: Mix
    seed: int = 1
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: int = 0

    async def run(self, session: aiohttp.ClientSession, deadline: float) -> None:
        await asyncio.gather(*(self._user(session, index, deadline) for index in range(self.mix.users)))

    def _key_of(self, index: int) -> ApiKey:
        if index < self.mix.metered_users:
            return self.metered
        return self.keys[index % len(self.keys)]

    async def _user(self, session: aiohttp.ClientSession, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 100_003 + index)
        key = self._key_of(index)
        address = f"10.{index // 250}.{index % 250}.{1 + rng.randrange(250)}"
        await asyncio.sleep(rng.uniform(0.0, self.mix.think_s[1]))  # users arrive over the first seconds
        sent = 0
        while time.monotonic() < deadline:
            stream = rng.random() < self.mix.stream_share
            repeated = rng.random() < self.mix.repeated_share
            body = _body(rng, index, sent, stream, repeated, self.mix)
            headers = {
                "Authorization": f"Bearer {key.secret}",
                "X-Forwarded-For": address,
                "X-Fake-TTFT-Ms": f"{rng.uniform(*self.mix.ttft_ms):.0f}",
                "X-Fake-ITL-Ms": f"{rng.uniform(*self.mix.itl_ms):.1f}",
            }
            outcome = Outcome(user=index, key=key.name, stream=stream, repeated=repeated, started=time.monotonic())
            self.outcomes.append(outcome)
            self.in_flight += 1
            try:
                await self._send(session, body, headers, outcome)
            finally:
                self.in_flight -= 1
                outcome.ended = time.monotonic()
            sent += 1
            await asyncio.sleep(rng.uniform(*self.mix.think_s))

    async def _send(
        self, session: aiohttp.ClientSession, body: dict[str, object], headers: dict[str, str], outcome: Outcome
    ) -> None:
        try:
            async with asyncio.timeout(self.mix.request_timeout_s):
                async with session.post(f"{self.url}/v1/chat/completions", json=body, headers=headers) as response:
                    outcome.status = response.status
                    outcome.request_id = response.headers.get("x-request-id", "")
                    outcome.cache = response.headers.get("x-sluice-cache", "")
                    if response.status != 200:
                        outcome.kind = "refused"
                        outcome.detail = (await response.read())[:300].decode(errors="replace")
                    elif outcome.stream:
                        await _read_stream(response, outcome)
                    else:
                        await response.read()
                        outcome.kind = "ok"
        except TimeoutError:
            outcome.kind = "no_answer" if outcome.status == 0 else "bad_stream"
            outcome.detail = f"no complete answer within {self.mix.request_timeout_s:g} s"
        except aiohttp.ClientError as exc:
            outcome.kind = "no_answer" if outcome.status == 0 else "bad_stream"
            outcome.detail = f"{type(exc).__name__}: {exc}"


async def _read_stream(response: aiohttp.ClientResponse, outcome: Outcome) -> None:
    done = cut = other_error = False
    async for line in response.content:
        if not line.startswith(b"data:"):
            continue
        if outcome.ttft_s is None:
            outcome.ttft_s = time.monotonic() - outcome.started
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
        elif payload.startswith(b'{"error"'):
            if b"stream_interrupted" in payload:
                cut = True
            else:
                other_error = True
            outcome.detail = payload[:300].decode(errors="replace")
    if cut:
        outcome.kind = "cut"
    elif done and not other_error:
        outcome.kind = "ok"
    else:
        outcome.kind = "bad_stream"
        outcome.detail = outcome.detail or "the stream ended without [DONE]"


def _body(rng: random.Random, user: int, sent: int, stream: bool, repeated: bool, mix: Mix) -> dict[str, object]:
    if repeated:
        topic = rng.randrange(len(FAQ_TOPICS))
        low, high = mix.max_tokens
        prompt = f"How do I {FAQ_TOPICS[topic]}?"
        max_tokens = low + (topic * 37) % (high - low + 1)  # fixed per question: part of the cache key
        temperature = 0.0
    else:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
        prompt = f"User {user}, message {sent}: tell me about {words}."
        max_tokens = rng.randint(*mix.max_tokens)
        temperature = 0.7
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": stream,
    }
