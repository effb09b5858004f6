"""eff_attn.dist: Dask execution over batch, heads, queries and key blocks.

Every expected value is the single-machine :func:`eff_attn.attention` on the
same NumPy arrays (an independent code path: one backend call, no graph, no
merge) or, for the merge algebra, exact attention over all keys at once.
Most tests run on an in-process ``LocalCluster`` (two workers, one thread
each); the worker-death test starts two worker processes.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest

pytest.importorskip("dask.distributed", reason="eff_attn.dist needs the dist extra")

import dask  # noqa: E402
import dask.array as da  # noqa: E402
from dask.distributed import Client, LocalCluster  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import eff_attn  # noqa: E402
import eff_attn.dist  # noqa: E402
from eff_attn import registry  # noqa: E402
from eff_attn.dist.merge import merge_partials, merged_output  # noqa: E402
from eff_attn.dist.parts import Part, split_value  # noqa: E402
from eff_attn.methods.exact.reference import exact_naive  # noqa: E402
from eff_attn.registry import NotSupportedError, Sharding  # noqa: E402
from eff_attn.testing import assert_close, emulate_cupy, random_qkv  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    with Client(cluster) as c:
        yield c
    cluster.close()


def chunked(x, chunks):
    return da.from_array(x, chunks=chunks)


def task_keys(out, kind):
    """Keys of eff_attn.dist's own tasks of one kind: part, merge or zeros."""
    return [k for k in out.__dask_graph__() if isinstance(k, tuple) and str(k[0]).startswith("eff_attn-")
            and f"-{kind}-" in str(k[0])]


def problem(seed=0, batch=(2, 3), Nq=37, Nk=53, D=6, Dv=5, dtype=np.float64, keep=0.7):
    q, k, v = random_qkv(seed, batch=batch, Nq=Nq, Nk=Nk, D=D, Dv=Dv, dtype=dtype, scale=1.5)
    mask = np.random.default_rng(seed + 100).random((*batch, Nk)) < keep
    return q, k, v, mask


# --------------------------------------------------------------------------------------
# Key-block sharding: exact and uniform
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True, "top_left"])
@pytest.mark.parametrize("Nq, Nk", [(37, 53), (53, 37)])
def test_exact_key_blocks_equal_single_machine_float64(client, causal, Nq, Nk):
    q, k, v, mask = problem(Nq=Nq, Nk=Nk)
    # uneven chunks everywhere, different on every input; the mask's borders differ from k's
    qd = chunked(q, (1, 2, 13, 6))
    kd = chunked(k, (2, 1, 11, 6))
    vd = chunked(v, (1, 3, 17, 5))
    md = chunked(mask, (2, 2, 9))
    out = eff_attn.dist.attention(qd, kd, vd, mask=md, causal=causal, backend="numpy")
    assert task_keys(out, "merge"), "the key axis was not split"
    assert out.chunks == (qd.chunks[0], qd.chunks[1], qd.chunks[2], (5,))
    expected = eff_attn.attention(q, k, v, mask=mask, causal=causal, backend="numpy")
    assert_close(out.compute(), expected, rel=1e-12)


# Numba tests run the graph in this thread: Numba's fallback "workqueue" threading layer
# aborts on parallel kernels launched from two threads at once, as two in-process workers
# would (the omp and tbb layers, and worker processes, are fine).


def test_exact_key_blocks_numba_backend():
    q, k, v, mask = problem(seed=1, batch=(2,), Nq=40, Nk=50, D=8, Dv=8)
    out = eff_attn.dist.attention(chunked(q, (1, 16, 8)), chunked(k, (2, 19, 8)), chunked(v, (2, 19, 8)),
                                  mask=mask, causal=True, backend="numba")
    expected = eff_attn.attention(q, k, v, mask=mask, causal=True, backend="numba")
    assert_close(out.compute(scheduler="sync"), expected, rel=1e-12)
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    out = eff_attn.dist.attention(chunked(q32, (1, 16, 8)), chunked(k32, (2, 19, 8)), chunked(v32, (2, 19, 8)),
                                  causal=True, backend="numba").compute(scheduler="sync")
    assert out.dtype == np.float32
    assert_close(out, eff_attn.attention(q32, k32, v32, causal=True, backend="numba"), rel=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_uniform_key_blocks_equal_single_machine(client, causal):
    q, k, v, mask = problem(seed=2, Nq=29, Nk=41)
    out = eff_attn.dist.attention(chunked(q, (2, 1, 10, 6)), chunked(k, (1, 3, 12, 6)), chunked(v, (1, 3, 12, 5)),
                                  mask=chunked(mask, (1, 1, 7)), method="uniform", causal=causal, backend="numpy")
    assert task_keys(out, "merge")
    expected = eff_attn.attention(q, k, v, mask=mask, method="uniform", causal=causal, backend="numpy")
    assert_close(out.compute(), expected, rel=1e-12)


def visible_block_pairs(q_chunks, k_chunks, offset):
    """(query block, key block) pairs with at least one visible pair, by brute force over positions."""
    q_edges, k_edges = np.cumsum((0,) + q_chunks), np.cumsum((0,) + k_chunks)
    pairs = 0
    for a in range(len(q_chunks)):
        for b in range(len(k_chunks)):
            i = np.arange(q_edges[a], q_edges[a + 1])[:, None]
            j = np.arange(k_edges[b], k_edges[b + 1])[None, :]
            pairs += bool((j <= i + offset).any())
    return pairs


@pytest.mark.parametrize("causal, offset", [(True, 20 - 30), ("top_left", 0)])
def test_causal_key_blocks_in_the_future_get_no_task(causal, offset):
    q, k, v, _ = problem(batch=(1,), Nq=30, Nk=20)
    q_chunks, k_chunks = (8, 8, 8, 6), (5, 5, 5, 5)
    out = eff_attn.dist.attention(chunked(q, (1, 8, 6)), chunked(k, (1, 5, 6)), chunked(v, (1, 5, 5)),
                                  causal=causal, backend="numpy")
    assert len(task_keys(out, "part")) == visible_block_pairs(q_chunks, k_chunks, offset)
    expected = eff_attn.attention(q, k, v, causal=causal, backend="numpy")
    assert_close(out.compute(scheduler="sync"), expected, rel=1e-12)


def test_query_block_before_every_key_is_zero():
    q, k, v, _ = problem(batch=(2,), Nq=30, Nk=12)          # bottom-right: rows 0..17 see no key
    out = eff_attn.dist.attention(chunked(q, (1, 10, 6)), chunked(k, (2, 4, 6)), chunked(v, (2, 4, 5)),
                                  causal=True, backend="numpy")
    assert len(task_keys(out, "zeros")) == 2                # query block [0, 10) of each leading block
    result = out.compute(scheduler="sync")
    assert (result[:, :18] == 0).all()
    assert_close(result, eff_attn.attention(q, k, v, causal=True, backend="numpy"), rel=1e-12)


def test_fully_masked_rows_stay_zero_across_key_blocks(client):
    q, k, v, mask = problem(seed=3, batch=(3,), Nq=16, Nk=24)
    mask[0] = False                                          # slice 0 sees nothing
    mask[1, :12] = False                                     # slice 1: the first two key blocks are empty
    out = eff_attn.dist.attention(chunked(q, (1, 16, 6)), chunked(k, (3, 6, 6)), chunked(v, (3, 6, 5)),
                                  mask=mask, backend="numpy").compute()
    assert (out[0] == 0).all() and np.isfinite(out).all()
    assert_close(out, eff_attn.attention(q, k, v, mask=mask, backend="numpy"), rel=1e-12)


def test_split_every_changes_the_tree_not_the_result():
    q, k, v, mask = problem(seed=4, batch=(1,), Nq=9, Nk=64)
    args = chunked(q, (1, 9, 6)), chunked(k, (1, 4, 6)), chunked(v, (1, 4, 5))
    binary = eff_attn.dist.attention(*args, mask=mask, split_every=2, backend="numpy")
    wide = eff_attn.dist.attention(*args, mask=mask, split_every=16, backend="numpy")
    assert len(task_keys(binary, "merge")) == 8 + 4 + 2 + 1 and len(task_keys(wide, "merge")) == 1
    expected = eff_attn.attention(q, k, v, mask=mask, backend="numpy")
    assert_close(binary.compute(scheduler="sync"), expected, rel=1e-12)
    assert_close(wide.compute(scheduler="sync"), expected, rel=1e-12)


# --------------------------------------------------------------------------------------
# The merge algebra on its own
# --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=6), st.integers(0, 2**16), st.booleans())
def test_merge_of_any_key_partition_equals_attention_over_all_keys(sizes, seed, causal):
    Nk = sum(sizes)
    q, k, v, mask = problem(seed=seed, batch=(2,), Nq=7, Nk=Nk, D=3, Dv=2, keep=0.6)
    offset = Nk - 7 if causal else None
    full, full_lse = exact_naive(q, k, v, mask=mask, offset=offset, scale=0.8)
    edges = np.cumsum([0, *sizes])
    parts = [exact_naive(q, k[:, a:b], v[:, a:b], mask=mask[:, a:b], offset=None if offset is None else offset - a,
                         scale=0.8) for a, b in zip(edges[:-1], edges[1:])]
    with np.errstate(all="raise"):
        out, lse = merge_partials(*parts)
        assert_close(out, full, rel=1e-13)
        assert_close(lse, full_lse, rel=1e-13)
        # any grouping and order: a tree of pairwise merges from the right
        right = parts[-1]
        for part in reversed(parts[:-1]):
            right = merge_partials(right, part)
        assert_close(right[0], full, rel=1e-13)


def test_merge_of_empty_partials_is_zero_without_warnings():
    out = np.ones((2, 3, 4))
    lse = np.full((2, 3), -np.inf)
    with np.errstate(all="raise"):
        merged, merged_lse = merge_partials((0 * out, lse), (0 * out, lse))
    assert (merged == 0).all() and np.isneginf(merged_lse).all()
    assert (merged_output((2 * out, np.zeros((2, 3)))) == 2).all()


# --------------------------------------------------------------------------------------
# Batch and head sharding of every method; the same seed gives the same draws
# --------------------------------------------------------------------------------------


def single_or_error(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(), None
    except (ValueError, TypeError) as exc:        # NotSupportedError is a ValueError
        return None, exc


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nk", [40, 48])
@pytest.mark.parametrize("name", registry.method_names(builtin_only=True))
def test_every_method_sharded_over_batch_heads_and_queries_equals_single_machine(client, name, Nk, causal):
    q, k, v, mask = problem(seed=5, batch=(2, 2), Nq=40, Nk=Nk, D=8, Dv=8)
    rng = 7 if registry.get_method(name).randomized else None
    expected, refused = single_or_error(
        lambda: eff_attn.attention(q, k, v, mask=mask, method=name, backend="numpy", rng=rng, causal=causal))
    dq = chunked(q, (1, 1, 16, 8))
    dk, dv = (chunked(a, (1, 1, 24, 8)) for a in (k, v))

    def run():
        return eff_attn.dist.attention(dq, dk, dv, mask=chunked(mask, (2, 1, 40)), method=name, backend="numpy",
                                       rng=rng, causal=causal).compute()

    if refused is not None:
        with pytest.raises(type(refused)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    ran_as_one_task = any("declares no Method.sharding" in str(w.message) for w in caught)
    assert ran_as_one_task == (registry.get_method(name).sharding is None)
    assert_close(result, expected, rel=1e-12, what=name)


def test_yoso_equals_single_machine_at_one_seed_and_differs_across_seeds(client):
    q, k, v, mask = problem(seed=6, batch=(2, 3), Nq=48, Nk=40, D=8, Dv=4)
    dq, dk, dv = chunked(q, (1, 2, 16, 8)), chunked(k, (2, 1, 40, 8)), chunked(v, (1, 1, 40, 4))
    one = eff_attn.dist.attention(dq, dk, dv, mask=mask, method="yoso", rng=11, num_hashes=8, backend="numpy")
    assert one.chunks[:3] == dq.chunks[:3]
    one = one.compute()
    assert_close(one, eff_attn.attention(q, k, v, mask=mask, method="yoso", rng=11, num_hashes=8, backend="numpy"),
                 rel=1e-12)
    other = eff_attn.dist.attention(dq, dk, dv, mask=mask, method="yoso", rng=12, num_hashes=8,
                                    backend="numpy").compute()
    assert np.abs(other - one).max() > 1e-2


def test_yoso_numba_backend_at_one_seed():
    q, k, v, _ = problem(seed=7, batch=(2, 2), Nq=32, Nk=32, D=8, Dv=4)
    out = eff_attn.dist.attention(chunked(q, (1, 2, 10, 8)), chunked(k, (2, 1, 32, 8)), chunked(v, (2, 2, 32, 4)),
                                  method="yoso", rng=3, backend="numba")
    expected = eff_attn.attention(q, k, v, method="yoso", rng=3, backend="numba")
    assert_close(out.compute(scheduler="sync"), expected, rel=1e-12)


def test_a_generator_is_advanced_as_on_one_machine():
    q, k, v, _ = problem(seed=8, batch=(2,), Nq=8, Nk=8, D=4, Dv=4)
    g_single, g_dist = np.random.default_rng(5), np.random.default_rng(5)
    eff_attn.attention(q, k, v, method="yoso", rng=g_single, backend="numpy")
    eff_attn.dist.attention(chunked(q, (1, 8, 4)), chunked(k, (1, 8, 4)), chunked(v, (1, 8, 4)), method="yoso",
                            rng=g_dist, backend="numpy")
    assert g_single.random() == g_dist.random()


def test_yoso_given_codes_and_hyperplanes_are_cut_per_slice_and_query(client):
    q, k, v, _ = problem(seed=9, batch=(2, 3), Nq=20, Nk=24, D=8, Dv=4)
    gen = np.random.default_rng(0)
    codes = (gen.integers(0, 8, size=(2, 3, 20, 5)), gen.integers(0, 8, size=(2, 3, 24, 5)))
    planes = gen.standard_normal((3, 5, 3, 8))                          # one set per head, shared over batch
    dq, dk, dv = chunked(q, (1, 2, 7, 8)), chunked(k, (1, 2, 24, 8)), chunked(v, (2, 1, 24, 4))
    for given in ({"codes": codes, "tau": 3}, {"hyperplanes": planes}):
        expected = eff_attn.attention(q, k, v, method="yoso", backend="numpy", **given)
        out = eff_attn.dist.attention(dq, dk, dv, method="yoso", backend="numpy", **given)
        assert_close(out.compute(), expected, rel=1e-12)


# --------------------------------------------------------------------------------------
# Declarations: the defaults, data-reading draws, undeclared entries
# --------------------------------------------------------------------------------------


@pytest.fixture
def registered():
    added = []

    def add(method):
        registry.register(method, replace=True)
        added.append(method.name)
        return method.name

    yield add
    for name in added:
        registry.METHOD_MODULES.pop(name, None)
        registry._loaded.pop(name, None)


def test_a_method_without_sharding_runs_as_one_task_and_warns(client, registered):
    name = registered(dataclasses.replace(registry.get_method("exact"), name="exact_undeclared", sharding=None))
    q, k, v, mask = problem(seed=10)
    qd = chunked(q, (1, 2, 13, 6))
    with pytest.warns(UserWarning, match="declares no Method.sharding"):
        out = eff_attn.dist.attention(qd, chunked(k, (1, 1, 20, 6)), chunked(v, (2, 3, 53, 5)), mask=mask,
                                      method=name, causal=True, backend="numpy")
    assert out.chunks[:3] == qd.chunks[:3]
    assert_close(out.compute(), eff_attn.attention(q, k, v, mask=mask, causal=True, backend="numpy"), rel=1e-12)


def _centred_forward(q, k, v, *, mask, offset, scale, v_shift, **params):
    """Exact attention minus a per-slice shift drawn from the data (a test method)."""
    out, res = exact_naive(q, k, v, mask=mask, offset=offset, scale=scale)
    return out - v_shift[:, None, :], {"lse": res}


def _draw_shift_from_data(rng, problem, params):
    """Mean of each slice's values plus noise: needs the data and the seed."""
    noise = np.random.default_rng(rng).standard_normal((problem.G, problem.Dv))
    return {"v_shift": problem.v.mean(axis=1) + noise}


def data_reading_method(queries):
    exact = registry.get_method("exact")
    return registry.Method(
        name=f"centred_{queries}", summary="test", resolve=lambda problem: {}, flops=exact.flops,
        impls=(registry.Impl("numpy", types.SimpleNamespace(forward=_centred_forward)),),
        draw=_draw_shift_from_data,
        sharding=Sharding(split={"v_shift": ("slice",)}, reads_data=True, queries=queries),
    )


@pytest.mark.parametrize("queries", [False, True])
def test_a_draw_that_reads_the_data_runs_once_on_the_whole_inputs(client, registered, queries):
    name = registered(data_reading_method(queries))
    q, k, v, mask = problem(seed=11)
    qd = chunked(q, (1, 2, 13, 6))
    out = eff_attn.dist.attention(qd, chunked(k, (2, 1, 20, 6)), chunked(v, (1, 1, 53, 5)), mask=mask,
                                  method=name, rng=4, causal=True)
    assert len([k for k in out.__dask_graph__() if "prepare_on_data" in str(k)]) == 1
    assert len(task_keys(out, "part")) == 4 * (3 if queries else 1)
    assert out.chunks[:3] == qd.chunks[:3]
    expected = eff_attn.attention(q, k, v, mask=mask, method=name, rng=4, causal=True)
    assert_close(out.compute(), expected, rel=1e-12)


@pytest.mark.parametrize("queries", [False, True])
def test_a_fit_runs_once_on_the_whole_inputs_though_resolve_reads_only_shapes(client, registered, queries):
    method = dataclasses.replace(data_reading_method(queries), name=f"fitted_{queries}", draw=None,
                                 fit=_draw_shift_from_data,
                                 sharding=Sharding(split={"v_shift": ("slice",)}, reads_data=False, queries=queries))
    name = registered(method)
    q, k, v, mask = problem(seed=13)
    qd = chunked(q, (1, 2, 13, 6))
    out = eff_attn.dist.attention(qd, chunked(k, (2, 1, 20, 6)), chunked(v, (1, 1, 53, 5)), mask=mask,
                                  method=name, rng=4, causal=True)
    assert len([k for k in out.__dask_graph__() if "prepare_on_data" in str(k)]) == 1
    assert len(task_keys(out, "part")) == 4 * (3 if queries else 1)
    expected = eff_attn.attention(q, k, v, mask=mask, method=name, rng=4, causal=True)
    assert_close(out.compute(), expected, rel=1e-12)


def test_an_undeclared_array_entry_is_refused(registered):
    method = dataclasses.replace(data_reading_method(False), name="centred_undeclared",
                                 sharding=Sharding(reads_data=False))
    name = registered(method)
    q, k, v, _ = problem(seed=12)
    with pytest.raises(NotSupportedError, match="'v_shift'.*neither splits nor shares"):
        eff_attn.dist.attention(chunked(q, (1, 1, 37, 6)), k, v, method=name, rng=0)


def test_split_value_follows_the_declared_roles():
    part = Part(slices=np.array([1, 3]), queries=slice(2, 5), keys=slice(0, 9))
    x = np.arange(4 * 6 * 2).reshape(4, 6, 2)
    assert (split_value(x, ("slice", "query"), part, G=4) == x[[1, 3], 2:5]).all()
    assert (split_value(x, (None, "query"), part, G=4) == x[:, 2:5]).all()
    shared = x[:1]
    assert split_value(shared, ("slice",), part, G=4) is shared          # a length-1 slice axis is shared
    pair = split_value((x, x + 1), ("slice",), part, G=4)
    assert isinstance(pair, tuple) and (pair[1] == x[[1, 3]] + 1).all()
    assert split_value(None, lambda value, part: 1 / 0, part, G=4) is None
    assert split_value({"a": 5}, lambda value, part: (value["a"], part.queries.start), part, G=4) == (5, 2)
    with pytest.raises(ValueError, match="length 4 on axis 0, not G=5"):
        split_value(x, ("slice",), part, G=5)
    with pytest.raises(ValueError, match="unknown axis role 'keys'"):
        split_value(x, ("keys",), part, G=4)


def test_sharding_defaults_are_the_conservative_ones():
    s = Sharding()
    assert s.split == {} and s.shared == () and s.reads_data is True and s.queries is False
    assert s.key_blocks is None


# --------------------------------------------------------------------------------------
# Failures: a flaky task is retried, a dying worker is replaced
# --------------------------------------------------------------------------------------


def _first_call(flag_dir) -> bool:
    """True exactly once per ``flag_dir``, across threads and processes (an exclusive create)."""
    try:
        os.close(os.open(os.path.join(flag_dir, "failed-once"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _flaky_forward(q, k, v, *, mask, offset, scale, flag_dir, crash, **params):
    if _first_call(flag_dir):
        if crash:
            os._exit(1)                                     # the worker process dies mid-run
        raise RuntimeError("transient failure on the first attempt")
    from eff_attn.methods.exact.reference import forward

    return forward(q, k, v, mask=mask, offset=offset, scale=scale, algorithm="naive")


def flaky_method(name):
    exact = registry.get_method("exact")
    return registry.Method(
        name=name, summary="test", resolve=lambda problem, *, flag_dir, crash=False: {"flag_dir": flag_dir,
                                                                                       "crash": crash},
        flops=exact.flops, impls=(registry.Impl("numpy", types.SimpleNamespace(forward=_flaky_forward)),),
        sharding=dataclasses.replace(exact.sharding),
    )


def test_a_failed_task_is_retried_without_a_wrong_result(client, registered, tmp_path):
    name = registered(flaky_method("flaky_exact"))
    q, k, v, mask = problem(seed=13)
    args = chunked(q, (1, 2, 13, 6)), chunked(k, (2, 1, 20, 6)), chunked(v, (2, 3, 20, 5))
    out = eff_attn.dist.attention(*args, mask=mask, method=name, causal=True, flag_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="transient failure"):
        client.compute(out, retries=0).result()
    os.remove(tmp_path / "failed-once")
    out = eff_attn.dist.attention(*args, mask=mask, method=name, causal=True, flag_dir=str(tmp_path))
    result = client.compute(out, retries=1).result()
    assert (tmp_path / "failed-once").exists()                # one task did fail once
    assert_close(result, eff_attn.attention(q, k, v, mask=mask, causal=True, backend="numpy"), rel=1e-12)


def test_a_worker_that_dies_mid_run_is_replaced_without_a_wrong_result(registered, tmp_path, monkeypatch):
    # Worker processes start with this process's sys.path; a folder holding a module named
    # distributed.py (examples/) placed before site-packages would shadow the dask
    # distributed package there.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not os.path.isfile(os.path.join(p or ".", "distributed.py"))])
    name = registered(flaky_method("crashing_exact"))
    q, k, v, mask = problem(seed=14, batch=(2, 2), Nq=24, Nk=24)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as proc_client:
        out = eff_attn.dist.attention(chunked(q, (1, 1, 12, 6)), chunked(k, (1, 2, 12, 6)), chunked(v, (2, 1, 8, 5)),
                                      mask=mask, method=name, flag_dir=str(tmp_path), crash=True)
        result = proc_client.compute(out).result(timeout=120)
    assert (tmp_path / "failed-once").exists()                # one worker did die
    assert_close(result, eff_attn.attention(q, k, v, mask=mask, backend="numpy"), rel=1e-12)


# --------------------------------------------------------------------------------------
# Inputs, errors, layout
# --------------------------------------------------------------------------------------


def test_bad_inputs_raise_the_single_machine_errors():
    q, k, v, mask = problem(seed=15, batch=(2,), Nq=8, Nk=9)
    dq, dk, dv = chunked(q, (1, 4, 6)), chunked(k, (1, 9, 6)), chunked(v, (1, 9, 5))
    with pytest.raises(ValueError, match="k has D=5 features but q has D=6"):
        eff_attn.dist.attention(dq, dk[..., :5], dv)
    with pytest.raises(ValueError, match="v has Nk=8 rows but k has Nk=9"):
        eff_attn.dist.attention(dq, dk, dv[:, :8])
    with pytest.raises(ValueError, match="mask must have shape"):
        eff_attn.dist.attention(dq, dk, dv, mask=mask[:, :4])
    with pytest.raises(ValueError, match="do not broadcast"):
        eff_attn.dist.attention(dq, chunked(np.zeros((3, 9, 6)), 3), chunked(np.zeros((3, 9, 5)), 3))
    with pytest.raises(NotSupportedError, match="float16"):
        eff_attn.dist.attention(dq.astype(np.float16), dk.astype(np.float16), dv.astype(np.float16))
    with pytest.raises(ValueError, match="causal='left' is not valid"):
        eff_attn.dist.attention(dq, dk, dv, causal="left")
    with pytest.raises(NotSupportedError, match="return_info"):
        eff_attn.dist.attention(dq, dk, dv, return_info=True)
    with pytest.raises(ValueError, match="split_every=1 is too small"):
        eff_attn.dist.attention(dq, dk, dv, split_every=1)
    with pytest.raises(TypeError, match="has no parameter 'topk'"):
        eff_attn.dist.attention(dq, dk, dv, topk=3)
    with pytest.raises(NotSupportedError, match="yoso defines no causal form"):
        eff_attn.dist.attention(dq, dk, dv, method="yoso", causal=True)
    with pytest.raises(TypeError, match="must be a dask array"):
        eff_attn.dist.attention([[1.0]], dk, dv)


def test_non_finite_inputs_are_caught_in_the_tasks():
    q, k, v, _ = problem(seed=16, batch=(2,), Nq=8, Nk=8)
    q[1, 5, 0] = np.nan
    out = eff_attn.dist.attention(chunked(q, (1, 4, 6)), chunked(k, (1, 4, 6)), chunked(v, (1, 4, 5)))
    with pytest.raises(ValueError, match="q contains NaN"):
        out.compute(scheduler="sync")


def test_broadcast_leading_axes_take_their_chunks_from_the_input_that_has_them():
    q, k, v, _ = problem(seed=17, batch=(4, 3), Nq=10, Nk=12)
    q1 = q[:, :1]                                           # one query head shared by three key heads
    # batch chunks from q (first), head chunks from k (q is broadcast there), v's ignored
    out = eff_attn.dist.attention(chunked(q1, (2, 1, 5, 6)), chunked(k, (1, 1, 12, 6)), chunked(v, (4, 3, 6, 5)),
                                  backend="numpy")
    assert out.shape == (4, 3, 10, 5) and out.chunks == ((2, 2), (1, 1, 1), (5, 5), (5,))
    assert_close(out.compute(scheduler="sync"), eff_attn.attention(q1, k, v, backend="numpy"), rel=1e-12)


def test_host_arrays_and_sequences_without_leading_axes_are_accepted():
    q, k, v, mask = problem(seed=18, batch=(), Nq=9, Nk=11)
    out = eff_attn.dist.attention(chunked(q, (4, 6)), k, v, mask=mask, backend="numpy")
    assert out.chunks == ((4, 4, 1), (5,))
    assert_close(out.compute(scheduler="sync"), eff_attn.attention(q, k, v, mask=mask, backend="numpy"), rel=1e-12)


def test_the_example_runs_on_a_given_cluster(client, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "distributed.py"
    spec = importlib.util.spec_from_file_location("eff_attn_example_distributed", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--address", client.scheduler.address, "--n", "48", "--heads", "2", "--d", "8",
                           "--q-chunk", "20", "--k-chunk", "16", "--causal", "--backend", "numpy", "--repeats", "1"])
    out = capsys.readouterr().out
    assert result.shape == (1, 2, 48, 8)
    difference = float(out.split("single-machine call: ")[1].split()[0])
    assert difference < 1e-5


def test_importing_eff_attn_does_not_import_dask():
    code = "import sys, eff_attn; print(any(m == 'dask' or m.startswith('dask.') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------------------
# CuPy-backed chunks
# --------------------------------------------------------------------------------------


@pytest.mark.cudasim
def test_cupy_backend_runs_key_blocks_emulated():
    q, k, v, mask = problem(seed=19, batch=(1,), Nq=6, Nk=8, D=4, Dv=3)
    with emulate_cupy():
        out = eff_attn.dist.attention(chunked(q, (1, 3, 4)), chunked(k, (1, 4, 4)), chunked(v, (1, 4, 3)),
                                      mask=mask, causal=True, backend="cupy")
        result = out.compute(scheduler="sync")
    assert_close(result, eff_attn.attention(q, k, v, mask=mask, causal=True, backend="numpy"), rel=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("method, params", [("exact", {"causal": True}), ("yoso", {"rng": 2})])
def test_cupy_chunks_equal_the_single_gpu_call(client, method, params):
    cupy = pytest.importorskip("cupy")
    q, k, v, mask = problem(seed=20, batch=(2, 2), Nq=64, Nk=64, D=16, Dv=16)
    if method == "yoso":
        mask = None
    dq, dk, dv = (chunked(a, (1, 1, 32, 16)).map_blocks(cupy.asarray) for a in (q, k, v))
    dm = None if mask is None else chunked(mask, (1, 1, 32)).map_blocks(cupy.asarray)
    out = eff_attn.dist.attention(dq, dk, dv, mask=dm, method=method, **params).compute()
    assert isinstance(out, cupy.ndarray)
    gq, gk, gv = (cupy.asarray(a) for a in (q, k, v))
    gm = None if mask is None else cupy.asarray(mask)
    assert_close(out, eff_attn.attention(gq, gk, gv, mask=gm, method=method, **params), rel=1e-12)


def test_dask_stays_lazy_until_computed():
    q, k, v, _ = problem(seed=21, batch=(2,), Nq=8, Nk=8)
    calls = []
    with dask.config.set(scheduler=lambda dsk, keys, **kw: calls.append(keys)):
        out = eff_attn.dist.attention(chunked(q, (1, 4, 6)), chunked(k, (1, 4, 6)), chunked(v, (1, 4, 5)))
    assert calls == [] and isinstance(out, da.Array)
