"""What the cache's parts agree on: a stored entry, the store, the embedder and the failure they raise.

A vector is a 1-D float32 numpy array of unit length (the embedder normalises), so cosine similarity is
a dot product. An entry's id is its exact key (sluice/cache/keys.py): a hash of the scope and the whole
normalised conversation, so the exact level is one lookup by id. `scope` is a hash of everything that
must match for an answer to be reusable (tenant, model, system prompt, output-changing parameters, earlier
turns): the semantic level only ever compares vectors within one scope.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]


class CacheUnavailable(Exception):
    """The cache's storage (Redis) failed or timed out: the request goes on without the cache."""


class EmbedderUnavailable(Exception):
    """The embedder failed or timed out: the semantic level is skipped for this request."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    id: str  # the exact key (hex)
    scope: str  # hex hash of what must match (tenant, model, parameters, earlier turns)
    tenant: str  # for purges and the tenant check on every hit
    model: str  # the requested model name (base or adapter), for purges
    probe: str  # the text compared by meaning (the last user message), for the lexical guard
    vector: Vector | None  # the probe's embedding (None when the semantic level is off)
    embedder: str  # the name of the model that made `vector`: vectors of different models are never compared
    body: bytes  # the complete answer as a non-streaming JSON body (replayed as SSE when asked)
    created: float  # time.time() when stored


class CacheStore(Protocol):
    """Where entries live: in process (embedded mode) or in Redis shared by every replica.

    Every method that touches Redis raises `CacheUnavailable` on failure or timeout; none raises anything
    else for a storage fault.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, entry_id: str) -> CacheEntry | None:
        """The live entry with this id (and mark it recently used), or None."""
        ...

    async def put(self, entry: CacheEntry) -> None:
        """Store (or replace) an entry with the store's TTL, evicting the least recently used past the bound."""
        ...

    def nearest(
        self, scope: str, embedder: str, vector: Vector, threshold: float, limit: int = 3
    ) -> list[tuple[str, float]]:
        """Ids and cosine similarities of the live entries of `scope` embedded by `embedder` at or above
        `threshold`, best first.

        Answered from memory (no I/O): the in-process index, kept in sync with the other replicas.
        """
        ...

    async def purge(self, tenant: str | None = None, model: str | None = None) -> int:
        """Delete every entry of `tenant` and/or `model` (both None: everything); the number deleted."""
        ...

    async def size(self) -> int:
        """How many entries are stored (for metrics and the admin endpoint)."""
        ...


class Embedder(Protocol):
    """Turns texts into unit vectors; raises `EmbedderUnavailable` on failure or timeout."""

    @property
    def name(self) -> str:
        """The embedding model's name: entries embedded by another model are never compared."""
        ...

    async def embed(self, texts: Sequence[str]) -> list[Vector]: ...

    async def close(self) -> None: ...
