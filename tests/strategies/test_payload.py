"""The factored payload: exact, a deterministic function of the dense payload, and accepted by
every merge and by the dynamic covariance in place of the dense one."""

import numpy as np
import pytest

from strategies import payload
from strategies.merge import (
    MERGES, CollabEdit, MergeError, add_psd, collabedit, dynamic_cov, kkt_square, merge,
    pack_symmetric, simple_average, task_arithmetic, ties,
)

D_IN, D_OUT = 40, 9


def rel_err(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def setup(seed=0, n_clients=4):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((D_IN, 2 * D_IN))
    cov = a @ a.T / D_IN + 0.5 * np.eye(D_IN)
    clients = []
    for i in range(n_clients):
        k = rng.standard_normal((D_IN, 2 + i))
        r = rng.standard_normal((D_OUT, 2 + i))
        kkt, rkt = k @ k.T, r @ k.T
        delta = np.linalg.solve((cov + kkt).T, rkt.T).T
        clients.append({"k": k, "r": r, "kkt": kkt, "rkt": rkt, "delta": delta})
    return cov, clients


def dense_fields(c, needs):
    return {f: c[f] for f in needs}


def test_factors_reproduce_the_dense_fields():
    _, clients = setup()
    for c in clients:
        f = payload.factor_layer(dense_fields(c, ("kkt", "rkt", "delta")))
        assert set(f) == {"kkt-factor", "rkt-factor", "delta-left", "delta-right"}
        n = c["k"].shape[1]
        assert f["kkt-factor"].shape == (D_IN, n) and f["rkt-factor"].shape == (D_OUT, n)
        assert f["delta-left"].shape == (D_OUT, n) and f["delta-right"].shape == (D_IN, n)
        back = payload.dense(f)
        for field in ("kkt", "rkt", "delta"):
            assert rel_err(back[field], c[field]) <= 1e-13, field


def test_factored_message_is_a_deterministic_function_of_the_dense_payload():
    """Recomputed from kkt / rkt / delta alone (packed or square), the message is the same: it
    carries nothing the dense payload does not."""
    _, clients = setup(1)
    c = clients[2]
    sent = payload.decode(payload.encode({3: dense_fields(c, ("kkt", "rkt", "delta"))},
                                         form="factored"))[3]
    for kkt in (c["kkt"], pack_symmetric(c["kkt"])):
        again = payload.factor_layer({"kkt": kkt, "rkt": c["rkt"], "delta": c["delta"]})
        assert set(again) == set(sent)
        for field in sent:
            np.testing.assert_allclose(again[field], sent[field], rtol=0, atol=1e-13)
    # the signs are canonical: each column's entry of largest magnitude is positive
    f = sent["kkt-factor"]
    assert (f[np.argmax(np.abs(f), axis=0), np.arange(f.shape[1])] > 0).all()


def test_factor_from_keys_is_the_same_message():
    _, clients = setup(2)
    for c in clients:
        from_dense = payload.factor_layer(dense_fields(c, ("kkt", "rkt")))
        from_keys = payload.factor_keys(c["k"], c["r"])
        for field in from_dense:
            np.testing.assert_allclose(from_keys[field], from_dense[field], rtol=0, atol=1e-12)


def test_dense_is_kept_where_factors_are_not_smaller():
    rng = np.random.default_rng(3)
    k = rng.standard_normal((6, 6))  # full rank: 6 x (6 + 4) factor numbers > 21 + 24 dense
    fields = {"kkt": k @ k.T, "rkt": rng.standard_normal((4, 6))}
    assert set(payload.factor_layer(fields)) == {"kkt", "rkt"}
    assert set(payload.factor_layer({"delta": rng.standard_normal((4, 6))})) == {"delta"}


def test_encode_sizes_and_float32():
    _, clients = setup(4)
    c = clients[0]  # 2 keys
    dense = payload.encode({1: dense_fields(c, ("rkt", "kkt"))})
    factored = payload.encode({1: dense_fields(c, ("rkt", "kkt"))}, form="factored")
    f32 = payload.encode({1: dense_fields(c, ("rkt", "kkt"))}, form="factored", dtype="float32")
    assert payload.nbytes(dense) >= 8 * (D_IN * (D_IN + 1) // 2 + D_OUT * D_IN)
    assert payload.nbytes(factored) <= 8 * 2 * (D_IN + D_OUT) + 2 * 256
    assert payload.nbytes(f32) <= 4 * 2 * (D_IN + D_OUT) + 2 * 256
    assert all(v.dtype == np.float32 for v in payload.decode(f32)[1].values())
    with pytest.raises(ValueError, match="form"):
        payload.encode({}, form="compressed")


@pytest.mark.parametrize("name", sorted(MERGES))
def test_factored_and_dense_payloads_give_the_same_merge(name):
    cov, clients = setup(5)
    deltas = [c["delta"] for c in clients]
    reference = {
        "collabedit": lambda: collabedit([c["kkt"] for c in clients], cov,
                                         rkts=[c["rkt"] for c in clients]),
        "simple-average": lambda: simple_average(deltas),
        "task-arithmetic": lambda: task_arithmetic(deltas, 1.0),
        "ties": lambda: ties(deltas, 0.2, 0.4),
    }[name]()
    params = {"cov": cov} if name == "collabedit" else {}
    needs = MERGES[name].needs
    dense = merge(name, [payload.decode(payload.encode({0: dense_fields(c, needs)}))[0]
                         for c in clients], **params)
    factored = merge(name, [payload.decode(payload.encode({0: dense_fields(c, needs)},
                                                          form="factored"))[0]
                            for c in clients], **params)
    assert rel_err(dense, reference) <= 1e-10
    assert rel_err(factored, reference) <= 1e-10
    if name == "collabedit":  # a delta instead of R K^T, dense or factored, with factored K K^T
        from_delta = merge(name, [payload.factor_layer(dense_fields(c, ("delta", "kkt")))
                                  for c in clients], **params)
        assert rel_err(from_delta, reference) <= 1e-10
        k = np.concatenate([c["k"] for c in clients], 1)
        r = np.concatenate([c["r"] for c in clients], 1)
        assert rel_err(factored, r @ k.T @ np.linalg.inv(cov + k @ k.T)) <= 1e-10


def test_float32_transport_is_exact_to_float32_rounding():
    cov, clients = setup(6)
    reference = collabedit([c["kkt"] for c in clients], cov, rkts=[c["rkt"] for c in clients])
    f32 = merge("collabedit", [payload.decode(payload.encode(
        {0: dense_fields(c, ("rkt", "kkt"))}, form="factored", dtype="float32"))[0]
        for c in clients], cov=cov)
    assert 1e-12 < rel_err(f32, reference) <= 1e-5


def test_collabedit_one_cholesky_conditioning_and_mixed_forms():
    cov, clients = setup(7)
    acc = CollabEdit(cov, name="layer 5")
    for i, c in enumerate(clients):  # packed, square and factored clients in one merge
        fields = dense_fields(c, ("rkt", "kkt"))
        acc.add(payload.factor_layer(fields) if i % 2 else
                {"rkt": c["rkt"], "kkt": pack_symmetric(c["kkt"]) if i else c["kkt"]})
    expected = collabedit([c["kkt"] for c in clients], cov, rkts=[c["rkt"] for c in clients])
    assert rel_err(acc.result(), expected) <= 1e-10
    assert acc.system is None and acc.rhs is None  # the work arrays are released after the solve
    with pytest.raises(MergeError, match="layer 5.*condition"):  # factored input, tiny C
        bad = CollabEdit(1e-30 * np.eye(D_IN), name="layer 5")
        bad.add(payload.factor_layer(dense_fields(clients[0], ("rkt", "kkt"))))
        bad.result()
    with pytest.raises(MergeError, match="layer 5.*not positive definite"):
        bad = CollabEdit(np.zeros((D_IN, D_IN)), name="layer 5")
        bad.add(payload.factor_layer(dense_fields(clients[0], ("rkt", "kkt"))))
        bad.result()


def test_collabedit_does_not_write_the_covariance():
    cov, clients = setup(8)
    before = cov.copy()
    merge("collabedit", [payload.factor_layer(dense_fields(c, ("rkt", "kkt"))) for c in clients],
          cov=cov)
    np.testing.assert_array_equal(cov, before)


def test_dynamic_cov_from_a_factored_running_sum():
    cov, clients = setup(9)
    total = None
    for c in clients:
        total = add_psd(total, payload.factor_layer({"kkt": c["kkt"]}))
    assert set(total) == {"kkt-factor"} and total["kkt-factor"].shape == (D_IN, 2 + 3 + 4 + 5)
    dense_sum = sum(c["kkt"] for c in clients)
    assert rel_err(kkt_square(total), dense_sum) <= 1e-13
    assert rel_err(dynamic_cov(cov, 2.0, 0.5, 3.0, total), cov + 3.0 * dense_sum) <= 1e-13
    # past the point where a factor is smaller, the sum turns dense; mixed forms add up
    for _ in range(3):
        total = add_psd(total, payload.factor_layer({"kkt": clients[-1]["kkt"]}))
    assert set(total) == {"kkt"}
    mixed = add_psd(add_psd(None, pack_symmetric(clients[0]["kkt"])),
                    payload.factor_layer({"kkt": clients[1]["kkt"]}))
    assert rel_err(kkt_square(mixed), clients[0]["kkt"] + clients[1]["kkt"]) <= 1e-13


def test_factored_payloads_stay_compact_until_the_result_and_c_is_built_then():
    cov, clients = setup(10, n_clients=4)  # ranks 2 + 3 + 4 + 5 = 14 < d_in = 40
    built = []

    def make_cov():
        built.append(1)
        return cov.copy()

    acc = CollabEdit(make_cov, dim=D_IN, name="layer 3")
    for c in clients:
        acc.add(payload.factor_layer(dense_fields(c, ("rkt", "kkt"))))
        assert acc.system is None and acc.rhs is None and not built  # no d_in x d_in array yet
    assert acc.cols == 14 and acc.f_buf.shape[0] == D_IN
    expected = collabedit([c["kkt"] for c in clients], cov, rkts=[c["rkt"] for c in clients])
    assert rel_err(acc.result(), expected) <= 1e-10 and built == [1]
    assert acc.system is None and acc.f_buf is None


def test_compact_factors_turn_dense_once_they_would_be_larger():
    cov, clients = setup(11, n_clients=8)  # ranks 2..9, 44 in all > d_in = 40
    acc = CollabEdit(lambda: cov.copy(), dim=D_IN)
    states = []
    for c in clients:
        acc.add(payload.factor_layer(dense_fields(c, ("rkt", "kkt"))))
        states.append(acc.system is not None)
    assert states[0] is False and states[-1] is True and acc.f_buf is None
    expected = collabedit([c["kkt"] for c in clients], cov, rkts=[c["rkt"] for c in clients])
    assert rel_err(acc.result(), expected) <= 1e-10
    # a dense payload after compact ones folds them first
    acc = CollabEdit(lambda: cov.copy(), dim=D_IN)
    acc.add(payload.factor_layer(dense_fields(clients[0], ("rkt", "kkt"))))
    acc.add(dense_fields(clients[1], ("rkt", "kkt")))
    acc.add(payload.factor_layer(dense_fields(clients[2], ("rkt", "kkt"))))
    expected = collabedit([c["kkt"] for c in clients[:3]], cov,
                          rkts=[c["rkt"] for c in clients[:3]])
    assert rel_err(acc.result(), expected) <= 1e-10
    # a delta (R K^T = Delta (C + S)) needs C itself: the factory's C is kept, a copy is worked on
    acc = CollabEdit(lambda: cov.copy(), dim=D_IN)
    acc.add(payload.factor_layer(dense_fields(clients[0], ("delta", "kkt"))))
    acc.add(payload.factor_layer(dense_fields(clients[1], ("rkt", "kkt"))))
    acc.add(payload.factor_layer(dense_fields(clients[2], ("delta", "kkt"))))
    expected = collabedit([c["kkt"] for c in clients[:3]], cov,
                          rkts=[c["rkt"] for c in clients[:3]])
    assert rel_err(acc.result(), expected) <= 1e-10
