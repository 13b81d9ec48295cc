"""The in-memory vector index of the semantic cache: which stored entries are nearest to a probe's vector.

Every replica holds one (Redis 7 has no vector search; docs/cache-store.md). Rows are grouped by
(scope, embedder) — the semantic level only ever compares within one scope and one embedding model — and
each group is one contiguous float32 matrix, so a lookup is a single matrix-vector product over that
group's rows (about 0.3 ms for 10,000 rows of 384 dimensions, see the design note). Rows are appended
(the matrix grows by doubling) and removed by moving the last row into the hole, so the matrix never has
gaps. Each row also keeps its id, expiry time, tenant and model (for purges). Nothing here does I/O or
blocks: callers run on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from sluice.cache.types import Vector

_FIRST_CAPACITY = 4  # most scopes (one conversation prefix each) hold a handful of entries


@dataclass(slots=True)
class _Group:
    matrix: npt.NDArray[np.float32]
    expires: npt.NDArray[np.float64]
    ids: list[str] = field(default_factory=list)
    tenants: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class _Where:
    key: tuple[str, str]
    generation: int


class VectorIndex:
    """Vectors of live entries grouped by (scope, embedder); `nearest` compares a probe within one group."""

    __slots__ = ("_generation", "_groups", "_rows", "_where")

    def __init__(self) -> None:
        self._groups: dict[tuple[str, str], _Group] = {}
        self._where: dict[str, _Where] = {}
        self._rows: dict[str, int] = {}  # id → row in its group's matrix
        self._generation = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._rows))

    def add(
        self, entry_id: str, scope: str, embedder: str, tenant: str, model: str, vector: Vector, expires: float
    ) -> int:
        """Index (or re-index) an entry; returns the row's generation, which `remove` can require.

        Raises ValueError when `vector` is not 1-D or its dimension differs from the group's.
        """
        if vector.ndim != 1:
            raise ValueError("an index vector must be 1-D")
        self.remove(entry_id)  # first: it may empty (and so delete) the group the entry goes back into
        key = (scope, embedder)
        group = self._groups.get(key)
        if group is not None and group.matrix.shape[1] != vector.shape[0]:
            dims = (vector.shape[0], group.matrix.shape[1])
            raise ValueError(f"embedder {embedder!r} gave {dims[0]} dimensions, its indexed vectors have {dims[1]}")
        if group is None:
            group = _Group(
                np.empty((_FIRST_CAPACITY, vector.shape[0]), np.float32), np.empty(_FIRST_CAPACITY, np.float64)
            )
            self._groups[key] = group
        row = group.count
        if row == group.matrix.shape[0]:
            group.matrix = np.concatenate((group.matrix, np.empty_like(group.matrix)))
            group.expires = np.concatenate((group.expires, np.empty_like(group.expires)))
        group.matrix[row] = vector
        group.expires[row] = expires
        group.ids.append(entry_id)
        group.tenants.append(tenant)
        group.models.append(model)
        self._generation += 1
        self._where[entry_id] = _Where(key, self._generation)
        self._rows[entry_id] = row
        return self._generation

    def generation(self, entry_id: str) -> int | None:
        where = self._where.get(entry_id)
        return None if where is None else where.generation

    def remove(self, entry_id: str, generation: int | None = None) -> bool:
        """Drop an entry's row; with `generation`, only if the row is still the one indexed then (a row
        re-added since, by a newer put of the same id, stays)."""
        where = self._where.get(entry_id)
        if where is None or (generation is not None and where.generation != generation):
            return False
        self._remove_row(where.key, self._rows[entry_id])
        return True

    def purge(self, tenant: str | None = None, model: str | None = None) -> int:
        """Drop every row of `tenant` and/or `model` (both None: every row); how many were dropped."""
        if tenant is None and model is None:
            dropped = len(self._rows)
            self._groups.clear()
            self._where.clear()
            self._rows.clear()
            return dropped
        dropped = 0
        for key, group in list(self._groups.items()):
            rows = [
                row
                for row in range(group.count)
                if (tenant is None or group.tenants[row] == tenant) and (model is None or group.models[row] == model)
            ]
            for row in reversed(rows):  # descending, so the row moved into each hole is never one still to drop
                self._remove_row(key, row)
            dropped += len(rows)
        return dropped

    def prune(self, now: float) -> int:
        """Drop the rows expired at `now` (lookups already skip them; this frees their memory)."""
        dropped = 0
        for key, group in list(self._groups.items()):
            rows = np.flatnonzero(group.expires[: group.count] <= now)
            for row in rows[::-1]:
                self._remove_row(key, int(row))
            dropped += len(rows)
        return dropped

    def nearest(
        self, scope: str, embedder: str, vector: Vector, threshold: float, limit: int, now: float
    ) -> list[tuple[str, float]]:
        """Ids and dot products (cosine similarities of unit vectors) of the unexpired rows of the group at or
        above `threshold`, best first, at most `limit`. A vector of another dimension matches nothing."""
        group = self._groups.get((scope, embedder))
        if group is None or limit < 1 or vector.shape != (group.matrix.shape[1],):
            return []
        count = group.count
        scores = group.matrix[:count] @ vector.astype(np.float32, copy=False)
        hits = np.flatnonzero(scores >= threshold)
        if hits.size:
            hits = hits[group.expires[hits] > now]
        if hits.size > limit:
            hits = hits[np.argpartition(-scores[hits], limit - 1)[:limit]]
        hits = hits[np.argsort(-scores[hits], kind="stable")]
        ids = group.ids
        return [(ids[row], float(scores[row])) for row in hits.tolist()]

    def _remove_row(self, key: tuple[str, str], row: int) -> None:
        group = self._groups[key]
        last = group.count - 1
        gone = group.ids[row]
        if row != last:
            moved = group.ids[last]
            group.matrix[row] = group.matrix[last]
            group.expires[row] = group.expires[last]
            group.ids[row] = moved
            group.tenants[row] = group.tenants[last]
            group.models[row] = group.models[last]
            self._rows[moved] = row
        group.ids.pop()
        group.tenants.pop()
        group.models.pop()
        del self._where[gone]
        del self._rows[gone]
        if not group.ids:
            del self._groups[key]  # scopes are many and short-lived: an empty group must not linger
