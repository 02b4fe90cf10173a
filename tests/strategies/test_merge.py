import itertools

import numpy as np
import pytest

from strategies import payload
from strategies.merge import (
    MERGES, CollabEdit, MergeError, PayloadError, SimpleAverage, TaskArithmetic, Ties, collabedit,
    dynamic_cov, make_merge, merge, pack_symmetric, simple_average, task_arithmetic, ties,
    trim_top_magnitude, unpack_symmetric, validate_layer_payload, validate_layers,
)

D_IN, D_OUT = 12, 7


def rel_err(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def random_spd(rng, n, scale=1.0):
    a = rng.standard_normal((n, 2 * n))
    return scale * a @ a.T / (2 * n) + 0.1 * np.eye(n)


def make_clients(rng, n_clients, cov):
    """Per client: keys K_i, residuals R_i, and the payload fields derived from them."""
    clients = []
    for _ in range(n_clients):
        n_i = int(rng.integers(1, 6))
        k = rng.standard_normal((D_IN, n_i))
        r = rng.standard_normal((D_OUT, n_i))
        kkt, rkt = k @ k.T, r @ k.T
        delta = np.linalg.solve((cov + kkt).T, rkt.T).T
        clients.append(dict(k=k, r=r, kkt=kkt, rkt=rkt, delta=delta))
    return clients


# --------------------------------------------------------------------------- CollabEdit


@pytest.mark.parametrize("n_clients", [1, 2, 4, 10])
def test_collabedit_equals_global_edit(n_clients):
    rng = np.random.default_rng(n_clients)
    cov = random_spd(rng, D_IN, scale=3.0)
    clients = make_clients(rng, n_clients, cov)
    k = np.concatenate([c["k"] for c in clients], axis=1)
    r = np.concatenate([c["r"] for c in clients], axis=1)
    global_edit = r @ k.T @ np.linalg.inv(cov + k @ k.T)

    from_rkt = merge("collabedit", ({"rkt": c["rkt"], "kkt": c["kkt"]} for c in clients), cov=cov)
    from_delta = merge("collabedit", ({"delta": c["delta"], "kkt": c["kkt"]} for c in clients), cov=cov)
    packed = merge("collabedit", ({"rkt": c["rkt"], "kkt": pack_symmetric(c["kkt"])} for c in clients),
                   cov=cov)
    for merged in (from_rkt, from_delta, packed):
        assert merged.shape == (D_OUT, D_IN)
        assert rel_err(merged, global_edit) <= 1e-10
    kkts = [c["kkt"] for c in clients]
    assert rel_err(collabedit(kkts, cov, rkts=[c["rkt"] for c in clients]), global_edit) <= 1e-10
    assert rel_err(collabedit(kkts, cov, deltas=[c["delta"] for c in clients]), global_edit) <= 1e-10


def test_collabedit_mixed_rkt_and_delta_clients():
    rng = np.random.default_rng(0)
    cov = random_spd(rng, D_IN)
    clients = make_clients(rng, 4, cov)
    payloads = [{"rkt": c["rkt"], "kkt": c["kkt"]} if i % 2 else {"delta": c["delta"], "kkt": c["kkt"]}
                for i, c in enumerate(clients)]
    expected = collabedit([c["kkt"] for c in clients], cov, rkts=[c["rkt"] for c in clients])
    assert rel_err(merge("collabedit", payloads, cov=cov), expected) <= 1e-10


def test_collabedit_singular_system_names_layer():
    cov = np.zeros((D_IN, D_IN))
    k = np.ones((D_IN, 1))  # rank-1 system
    acc = CollabEdit(cov, name="model.layers.5.mlp.down_proj")
    acc.add({"rkt": np.ones((D_OUT, 1)) @ k.T, "kkt": k @ k.T})
    with pytest.raises(MergeError, match="model.layers.5.mlp.down_proj"):
        acc.result()


def test_collabedit_badly_conditioned_raises():
    cov = np.diag([1.0] * (D_IN - 1) + [1e-14])
    acc = CollabEdit(cov, name="l3")
    acc.add({"rkt": np.ones((D_OUT, D_IN)), "kkt": np.zeros((D_IN, D_IN))})
    with pytest.raises(MergeError, match="l3.*condition"):
        acc.result()


def test_result_without_clients_raises():
    for name, params in [("collabedit", {"cov": np.eye(3)}), ("simple-average", {}), ("ties", {})]:
        with pytest.raises(MergeError):
            make_merge(name, name="lx", **params).result()


def test_unknown_merge_name():
    with pytest.raises(ValueError, match="known"):
        make_merge("fedavg")


# --------------------------------------------------------------------------- baselines


def random_deltas(rng, n):
    return [rng.standard_normal((D_OUT, D_IN)) for _ in range(n)]


def test_simple_average_divides_by_clients_added():
    rng = np.random.default_rng(1)
    deltas = random_deltas(rng, 3)
    expected = (deltas[0] + deltas[1] + deltas[2]) / 3
    np.testing.assert_allclose(merge("simple-average", ({"delta": d} for d in deltas)), expected, rtol=1e-12)
    np.testing.assert_allclose(simple_average(deltas), expected, rtol=1e-12)


def test_task_arithmetic():
    rng = np.random.default_rng(2)
    deltas = random_deltas(rng, 4)
    expected = 0.7 * (deltas[0] + deltas[1] + deltas[2] + deltas[3])
    np.testing.assert_allclose(merge("task-arithmetic", ({"delta": d} for d in deltas), lam=0.7), expected,
                               rtol=1e-12)
    np.testing.assert_allclose(task_arithmetic(deltas, 0.7), expected, rtol=1e-12)
    np.testing.assert_allclose(TaskArithmetic().lam, 1.0)


def ties_by_loops(deltas, density, lam):
    """TIES written out entry by entry."""
    n_rows, n_cols = deltas[0].shape
    k = int(density * n_rows * n_cols)
    trimmed = []
    for d in deltas:
        threshold = sorted((abs(v) for v in d.ravel()), reverse=True)[k - 1]
        trimmed.append([[v if abs(v) >= threshold else 0.0 for v in row] for row in d])
    out = np.zeros((n_rows, n_cols))
    for i in range(n_rows):
        for j in range(n_cols):
            values = [t[i][j] for t in trimmed]
            sign = 1.0 if sum(values) >= 0 else -1.0
            agreeing = [v for v in values if v != 0 and np.sign(v) == sign]
            out[i, j] = lam * sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


def ties_case():
    """3 clients, 2x4, density 0.5 -> 4 kept entries each; distinct magnitudes within a client."""
    deltas = [
        np.array([[3.0, -2.0, 0.1, 5.0], [-4.0, 0.2, 0.3, 1.0]]),
        np.array([[-3.0, 1.0, 0.2, 6.0], [2.0, 0.1, -0.4, 7.0]]),
        np.array([[0.5, -1.5, 0.3, -8.0], [3.0, 0.4, 0.2, 9.0]]),
    ]
    return deltas, 0.5, 0.4


def test_ties_trim_keeps_exactly_k():
    rng = np.random.default_rng(3)
    d = rng.standard_normal((D_OUT, D_IN))
    for density in (0.05, 0.2, 0.5, 0.99):
        assert np.count_nonzero(trim_top_magnitude(d, density)) == int(density * d.size)
    np.testing.assert_array_equal(trim_top_magnitude(d, 1.0), d)


def test_ties_matches_loop_reference_with_edge_cases():
    deltas, density, lam = ties_case()
    trimmed = [trim_top_magnitude(d, density) for d in deltas]
    # [0,0]: trimmed 3, -3, 0 -> zero sum, +1 elected, mean of {3} = 3.
    assert [t[0, 0] for t in trimmed] == [3.0, -3.0, 0.0]
    # [1,1]: trimmed away by every client -> 0.
    assert all(t[1, 1] == 0 for t in trimmed)
    expected = ties_by_loops(deltas, density, lam)
    assert expected[0, 0] == pytest.approx(lam * 3.0)
    assert expected[1, 1] == 0.0
    np.testing.assert_allclose(ties(deltas, density, lam), expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(merge("ties", ({"delta": d} for d in deltas), density=density, lam=lam),
                               expected, rtol=1e-12, atol=0)


def test_ties_random_matches_loop_reference():
    rng = np.random.default_rng(4)
    deltas = random_deltas(rng, 5)
    expected = ties_by_loops(deltas, 0.2, 0.4)
    np.testing.assert_allclose(merge("ties", ({"delta": d} for d in deltas)), expected, rtol=1e-12, atol=0)


def test_ties_defaults_are_official():
    acc = Ties()
    assert (acc.density, acc.lam) == (0.2, 0.4)


@pytest.mark.parametrize("name", sorted(MERGES))
def test_streaming_equals_all_at_once_in_any_order(name):
    rng = np.random.default_rng(5)
    cov = random_spd(rng, D_IN)
    clients = make_clients(rng, 4, cov)
    deltas = [c["delta"] for c in clients]
    reference = {
        "collabedit": lambda: collabedit([c["kkt"] for c in clients], cov, rkts=[c["rkt"] for c in clients]),
        "simple-average": lambda: simple_average(deltas),
        "task-arithmetic": lambda: task_arithmetic(deltas, 1.0),
        "ties": lambda: ties(deltas, 0.2, 0.4),
    }[name]()
    params = {"cov": cov} if name == "collabedit" else {}
    for order in itertools.permutations(range(4)):
        payloads = [{f: clients[i][f] for f in MERGES[name].needs} for i in order]
        np.testing.assert_allclose(merge(name, payloads, **params), reference, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", sorted(MERGES))
def test_accumulator_holds_no_per_client_arrays(name):
    rng = np.random.default_rng(6)
    cov = random_spd(rng, D_IN)
    clients = make_clients(rng, 50, cov)
    acc = make_merge(name, **({"cov": cov} if name == "collabedit" else {}))

    def arrays():
        return sorted(k for k, v in vars(acc).items() if isinstance(v, np.ndarray))

    def containers():
        return [k for k, v in vars(acc).items() if isinstance(v, (list, tuple, dict, set))]

    acc.add({f: clients[0][f] for f in acc.needs})
    after_one = arrays()
    for c in clients[1:]:
        payload = {f: c[f] for f in acc.needs}
        acc.add(payload)
        assert not any(v is a for v in vars(acc).values() for a in payload.values())
    assert arrays() == after_one and not containers()
    assert acc.count == 50


def test_accumulator_does_not_alias_first_payload():
    d = np.ones((2, 2))
    acc = SimpleAverage()
    acc.add({"delta": d})
    acc.add({"delta": d})
    np.testing.assert_array_equal(d, np.ones((2, 2)))


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_pack_unpack_round_trip(n):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n))
    s = a + a.T
    v = pack_symmetric(s)
    assert v.shape == (n * (n + 1) // 2,)
    np.testing.assert_array_equal(unpack_symmetric(v), s)
    np.testing.assert_array_equal(pack_symmetric(unpack_symmetric(v)), v)


def test_unpack_rejects_non_triangular_length():
    with pytest.raises(ValueError):
        unpack_symmetric(np.zeros(4))


# --------------------------------------------------------------------------- validation


def good_payload(rng, packed=False):
    k = rng.standard_normal((D_IN, 3))
    kkt = k @ k.T
    return {"rkt": rng.standard_normal((D_OUT, D_IN)), "kkt": pack_symmetric(kkt) if packed else kkt}


def check(payload, wanted=("rkt", "kkt"), max_rank=None):
    validate_layer_payload(payload, wanted=wanted, d_out=D_OUT, d_in=D_IN, client="client-7",
                           layer="layers.4", max_rank=max_rank)


def test_validation_accepts_good_payloads():
    rng = np.random.default_rng(7)
    check(good_payload(rng))
    check({k: v.astype(np.float32) for k, v in good_payload(rng).items()})
    check(good_payload(rng, packed=True))
    check(good_payload(rng, packed=True), max_rank=3)  # the randomized low-rank PSD test
    factored = payload.factor_layer(good_payload(rng))
    assert set(factored) == {"kkt-factor", "rkt-factor"}
    check(factored, max_rank=3)
    check({k: v.astype(np.float32) for k, v in factored.items()}, max_rank=3)
    check(payload.factor_layer({"delta": good_payload(rng)["rkt"]}), wanted=("delta",))


def _bad_cases():
    rng = np.random.default_rng(8)
    p = good_payload(rng)
    asym = p["kkt"].copy()
    asym[0, 1] += 1.0
    not_psd = p["kkt"] - 0.5 * np.linalg.eigvalsh(p["kkt"])[-1] * np.eye(D_IN)
    nan = p["rkt"].copy()
    nan[0, 0] = np.nan
    inf = p["rkt"].copy()
    inf[1, 2] = np.inf
    f = payload.factor_layer(p)  # rank 3
    f_nan = f["kkt-factor"].copy()
    f_nan[2, 1] = np.nan
    wide = np.concatenate([f["kkt-factor"], rng.standard_normal((D_IN, D_IN))], axis=1)
    return {
        "missing": ({"kkt": p["kkt"]}, "rkt", "missing"),
        "unknown": ({**p, "delta": p["rkt"]}, "delta", "unknown"),
        "shape": ({**p, "rkt": p["rkt"][:, :-1]}, "rkt", "shape"),
        "int dtype": ({**p, "rkt": p["rkt"].astype(np.int64)}, "rkt", "dtype"),
        "not array": ({**p, "rkt": p["rkt"].tolist()}, "rkt", "numpy"),
        "nan": ({**p, "rkt": nan}, "rkt", "NaN"),
        "inf": ({**p, "rkt": inf}, "rkt", "Inf"),
        "asymmetric": ({**p, "kkt": asym}, "kkt", "symmetric"),
        "not psd": ({**p, "kkt": not_psd}, "kkt", "semi-definite"),
        "dense and factored": ({**p, "kkt-factor": f["kkt-factor"]}, "kkt", "both"),
        "factor nan": ({**f, "kkt-factor": f_nan}, "kkt-factor", "NaN"),
        "factor rows": ({**f, "kkt-factor": f["kkt-factor"][:-1]}, "kkt-factor", "rows"),
        "factor ranks differ": ({**f, "rkt-factor": f["rkt-factor"][:, :2]}, "rkt-factor", "rank"),
        "factor rank above dimension": ({"kkt-factor": wide, "rkt-factor": rng.standard_normal(
            (D_OUT, wide.shape[1]))}, "kkt-factor", "rank"),
        "rkt-factor alone": ({"kkt": p["kkt"], "rkt-factor": f["rkt-factor"]}, "rkt-factor",
                             "needs kkt-factor"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_validation_rejects_bad_payload(case):
    bad, field, why = _bad_cases()[case]
    with pytest.raises(PayloadError) as err:
        check(bad)
    msg = str(err.value)
    assert "client-7" in msg and "layers.4" in msg and repr(field) in msg and why in msg


def test_validation_rejects_rank_above_the_number_of_keys():
    rng = np.random.default_rng(10)
    p = good_payload(rng)  # 3 keys
    with pytest.raises(PayloadError, match="'kkt-factor'.*rank 3 > 2"):
        check(payload.factor_layer(p), max_rank=2)
    check(p, max_rank=3)
    # dense: the randomized range test, once the bound leaves room for it (k + 8 <= d / 2)
    k = rng.standard_normal((64, 3))
    dense = {"kkt": pack_symmetric(k @ k.T)}
    kw = dict(wanted=("kkt",), d_out=D_OUT, d_in=64, client="client-7", layer="layers.4")
    validate_layer_payload(dense, max_rank=3, **kw)
    with pytest.raises(PayloadError, match="'kkt'.*rank above 2"):
        validate_layer_payload(dense, max_rank=2, **kw)


def test_validation_rejects_packed_not_psd():
    for max_rank in (None, 1):  # shifted Cholesky, or the randomized range test
        with pytest.raises(PayloadError, match="client-7.*'kkt'.*semi-definite"):
            validate_layer_payload({"kkt": pack_symmetric(np.diag([1.0, 1.0, -1.0] + [0.0] * 9))},
                                   wanted=("kkt",), d_out=D_OUT, d_in=D_IN, client="client-7",
                                   layer="layers.4", max_rank=max_rank)


def test_validate_layers():
    validate_layers(["a", "b"], ["b", "a"], client="c1")
    with pytest.raises(PayloadError, match="c1.*missing.*'b'"):
        validate_layers(["a"], ["a", "b"], client="c1")
    with pytest.raises(PayloadError, match="c1.*unknown.*'z'"):
        validate_layers(["a", "b", "z"], ["a", "b"], client="c1")


# --------------------------------------------------------------------------- dynamic covariance


def test_dynamic_cov():
    rng = np.random.default_rng(9)
    c0 = random_spd(rng, D_IN)
    past = random_spd(rng, D_IN)
    np.testing.assert_allclose(dynamic_cov(c0, 15000.0, 1.0, 0.0, past), 15000.0 * c0)
    np.testing.assert_allclose(dynamic_cov(c0, 15000.0), 15000.0 * c0)
    np.testing.assert_allclose(dynamic_cov(c0, 2.0, 0.5, 3.0, past), c0 + 3.0 * past)
    np.testing.assert_allclose(dynamic_cov(c0, 2.0, 0.5, 3.0, pack_symmetric(past)), c0 + 3.0 * past)
