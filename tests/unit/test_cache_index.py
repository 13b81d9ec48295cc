"""The in-memory vector index: lookups within one scope, removal, purges, expiry, and its speed at 10,000 rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.cache.index import VectorIndex

NOW = 1_000.0


def unit(*components: float) -> np.ndarray:
    vector = np.array(components, np.float32)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def test_nearest_compares_only_within_the_scope_and_embedder_best_first() -> None:
    index = VectorIndex()
    index.add("a", "s1", "e", "t", "m", unit(1, 0), NOW + 10)
    index.add("b", "s1", "e", "t", "m", unit(1, 1), NOW + 10)
    index.add("c", "s1", "e", "t", "m", unit(0, 1), NOW + 10)
    index.add("other-scope", "s2", "e", "t", "m", unit(1, 0), NOW + 10)
    index.add("other-embedder", "s1", "e2", "t", "m", unit(1, 0), NOW + 10)
    found = index.nearest("s1", "e", unit(1, 0.1), 0.5, 3, NOW)
    assert [entry_id for entry_id, _ in found] == ["a", "b"]
    assert found[0][1] == pytest.approx(0.995, abs=1e-3)
    assert index.nearest("s1", "e", unit(1, 0.1), 0.5, 1, NOW) == found[:1]
    assert index.nearest("nope", "e", unit(1, 0), 0.0, 3, NOW) == []
    assert index.nearest("s1", "e", unit(1, 0, 0), 0.0, 3, NOW) == []  # another dimension matches nothing
    assert len(index) == 5


def test_expired_rows_are_skipped_then_pruned() -> None:
    index = VectorIndex()
    index.add("old", "s", "e", "t", "m", unit(1, 0), NOW)
    index.add("new", "s", "e", "t", "m", unit(1, 0), NOW + 1)
    assert [entry_id for entry_id, _ in index.nearest("s", "e", unit(1, 0), 0.9, 3, NOW)] == ["new"]
    assert index.prune(NOW) == 1
    assert "old" not in index and "new" in index


def test_remove_moves_the_last_row_into_the_hole_and_empty_groups_go() -> None:
    index = VectorIndex()
    for i in range(5):
        index.add(f"id{i}", "s", "e", "t", "m", unit(1, i), NOW + 10)
    assert index.remove("id1") and not index.remove("id1")
    assert {entry_id for entry_id, _ in index.nearest("s", "e", unit(1, 0), -1.0, 10, NOW)} == {
        "id0",
        "id2",
        "id3",
        "id4",
    }
    for entry_id in ("id0", "id2", "id3", "id4"):
        index.remove(entry_id)
    assert len(index) == 0 and not index._groups


def test_re_adding_an_id_replaces_its_row_even_in_the_same_group() -> None:
    index = VectorIndex()
    first = index.add("x", "s", "e", "t", "m", unit(1, 0), NOW + 10)
    second = index.add("x", "s", "e", "t", "m", unit(0, 1), NOW + 10)
    assert len(index) == 1 and index.nearest("s", "e", unit(0, 1), 0.9, 3, NOW)[0][0] == "x"
    assert not index.remove("x", first)  # the row was re-added since: a stale removal leaves it
    assert index.remove("x", second)


def test_a_vector_of_another_dimension_for_the_same_embedder_is_refused() -> None:
    index = VectorIndex()
    index.add("a", "s", "e", "t", "m", unit(1, 0), NOW + 10)
    with pytest.raises(ValueError, match="dimensions"):
        index.add("b", "s", "e", "t", "m", unit(1, 0, 0), NOW + 10)


def test_purge_by_tenant_by_model_and_everything() -> None:
    index = VectorIndex()
    for i, (tenant, model) in enumerate([("t1", "m1"), ("t1", "m2"), ("t2", "m1"), ("t2", "m2")] * 3):
        index.add(f"id{i}", f"s{i % 2}", "e", tenant, model, unit(1, i), NOW + 10)
    assert index.purge(tenant="t1") == 6
    assert index.purge(model="m1") == 3
    assert sorted(index) == ["id11", "id3", "id7"]
    assert index.purge() == 3 and len(index) == 0


# Components are multiples of 1/4 in [-1, 1]: every dot product of 3 of them is exact in float32, so the
# matrix product and the brute-force reference agree to the bit and only ties are left to compare.
_component = st.integers(-4, 4).map(lambda n: n / 4)
_vector = st.tuples(_component, _component, _component).map(lambda c: np.array(c, np.float32))
_ids = st.sampled_from([f"id{i}" for i in range(12)])
_scopes = st.sampled_from(["s1", "s2"])
_embedders = st.sampled_from(["e1", "e2"])
_tenants = st.sampled_from(["t1", "t2", None])
_models = st.sampled_from(["m1", "m2", None])
_ops = st.one_of(
    st.tuples(
        st.just("add"),
        _ids,
        _scopes,
        _embedders,
        _tenants.filter(bool),
        _models.filter(bool),
        _vector,
        st.sampled_from([NOW - 1, NOW, NOW + 1, NOW + 5]),
    ),
    st.tuples(st.just("remove"), _ids),
    st.tuples(st.just("purge"), _tenants, _models),
    st.tuples(st.just("prune"), st.sampled_from([NOW - 2, NOW, NOW + 2])),
    st.tuples(
        st.just("nearest"),
        _scopes,
        _embedders,
        _vector,
        st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0]),
        st.integers(1, 5),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ops, max_size=60))
def test_the_index_agrees_with_a_brute_force_reference(ops: list[tuple[object, ...]]) -> None:
    index = VectorIndex()
    reference: dict[str, tuple[str, str, str, str, np.ndarray, float]] = {}
    for op in ops:
        kind = op[0]
        if kind == "add":
            _, entry_id, scope, embedder, tenant, model, vector, expires = op
            index.add(entry_id, scope, embedder, tenant, model, vector, expires)  # type: ignore[arg-type]
            reference[entry_id] = (scope, embedder, tenant, model, vector, expires)  # type: ignore[index,assignment]
        elif kind == "remove":
            assert index.remove(op[1]) == (reference.pop(op[1], None) is not None)  # type: ignore[arg-type]
        elif kind == "purge":
            _, tenant, model = op
            doomed = [
                entry_id
                for entry_id, row in reference.items()
                if (tenant is None or row[2] == tenant) and (model is None or row[3] == model)
            ]
            assert index.purge(tenant, model) == len(doomed)  # type: ignore[arg-type]
            for entry_id in doomed:
                del reference[entry_id]
        elif kind == "prune":
            doomed = [entry_id for entry_id, row in reference.items() if row[5] <= op[1]]  # type: ignore[operator]
            assert index.prune(op[1]) == len(doomed)  # type: ignore[arg-type]
            for entry_id in doomed:
                del reference[entry_id]
        else:
            _, scope, embedder, vector, threshold, limit = op
            found = index.nearest(scope, embedder, vector, threshold, limit, NOW)  # type: ignore[arg-type]
            scores = {
                entry_id: float(np.dot(row[4].astype(np.float64), vector))  # type: ignore[union-attr]
                for entry_id, row in reference.items()
                if row[:2] == (scope, embedder) and row[5] > NOW and np.dot(row[4], vector) >= threshold  # type: ignore[operator]
            }
            best = sorted(scores.values(), reverse=True)[:limit]  # type: ignore[index]
            assert [score for _, score in found] == best
            assert all(scores[entry_id] == score for entry_id, score in found)
            assert len({entry_id for entry_id, _ in found}) == len(found)
        assert len(index) == len(reference) and set(index) == set(reference)
