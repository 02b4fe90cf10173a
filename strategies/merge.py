"""Merge rules for collaborative editing, as pure numpy functions (float64).

Per edited layer, client i sends some of:
  delta : Delta_i, d_out x d_in, its own MEMIT update;
  kkt   : S_i = K_i K_i^T, d_in x d_in (or packed, see `pack_symmetric`);
  rkt   : R_i K_i^T, d_out x d_in.

Each merge is a streaming accumulator (`add` one client's payload for one layer, then `result`)
that folds payloads into running sums and keeps no per-client array, so server memory does not
grow with the number of clients. The all-at-once functions below are the reference the
accumulators are tested against. See docs/ALGORITHMS.md sections 2-4.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

__all__ = [
    "MERGES", "Merge", "CollabEdit", "SimpleAverage", "TaskArithmetic", "Ties", "make_merge", "merge",
    "collabedit", "simple_average", "task_arithmetic", "ties", "trim_top_magnitude",
    "pack_symmetric", "unpack_symmetric", "PayloadError", "validate_layer_payload",
    "validate_layers", "dynamic_cov", "MergeError",
]


class MergeError(ValueError):
    """A merge cannot produce a result (no clients, singular system)."""


def _f64(x) -> np.ndarray:
    # Always a fresh float64 array: accumulators must never alias a client's buffer.
    return np.array(x, dtype=np.float64, copy=True)


# --------------------------------------------------------------------------- packed symmetric


def pack_symmetric(s: np.ndarray) -> np.ndarray:
    """Upper triangle of a square matrix, diagonal included, row-major (np.triu_indices order)."""
    s = np.asarray(s)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"pack_symmetric needs a square matrix, got shape {s.shape}")
    return s[np.triu_indices(s.shape[0])]


def packed_size_to_n(m: int) -> int:
    n = int(round((np.sqrt(8 * m + 1) - 1) / 2))
    if n * (n + 1) // 2 != m:
        raise ValueError(f"{m} is not a triangular number n(n+1)/2: not a packed symmetric matrix")
    return n


def unpack_symmetric(v: np.ndarray) -> np.ndarray:
    """Inverse of `pack_symmetric`: exact (both triangles receive the same stored values)."""
    v = np.asarray(v)
    if v.ndim != 1:
        raise ValueError(f"unpack_symmetric needs a 1-D array, got shape {v.shape}")
    n = packed_size_to_n(v.shape[0])
    rows, cols = np.triu_indices(n)
    s = np.empty((n, n), dtype=v.dtype)
    s[rows, cols] = v
    s[cols, rows] = v
    return s


def _square_kkt(kkt: np.ndarray) -> np.ndarray:
    kkt = np.asarray(kkt)
    return unpack_symmetric(kkt) if kkt.ndim == 1 else kkt


# --------------------------------------------------------------------------- CollabEdit


def _solve_right(b: np.ndarray, a: np.ndarray, *, name: str | None, max_cond: float) -> np.ndarray:
    """X with X A = B for symmetric A, via A X^T = B^T (A^T = A), never forming A^{-1}."""
    where = f"layer {name!r}" if name else "layer"
    eig = np.linalg.eigvalsh(a)
    cond = np.inf if eig[0] <= 0 else eig[-1] / eig[0]
    if not cond <= max_cond:
        raise MergeError(
            f"{where}: C + sum_j K_j K_j^T is singular or badly conditioned "
            f"(eigenvalues in [{eig[0]:.3g}, {eig[-1]:.3g}], condition {cond:.3g} > {max_cond:.3g}); "
            "raise the covariance weight lam or check the covariance statistics"
        )
    try:
        x = np.linalg.solve(a, b.T).T
    except np.linalg.LinAlgError as e:
        raise MergeError(f"{where}: solve failed: {e}") from e
    if not np.all(np.isfinite(x)):
        raise MergeError(f"{where}: merged delta is not finite")
    return x


class Merge:
    """Streaming merge of one layer. Subclasses set `needs` and implement `_add`, `_result`."""

    needs: tuple[str, ...] = ()

    def __init__(self, name: str | None = None):
        self.name = name
        self.count = 0  # clients folded in so far

    def add(self, payload: Mapping[str, np.ndarray]) -> None:
        self._add(payload)
        self.count += 1

    def result(self) -> np.ndarray:
        if self.count == 0:
            raise MergeError(f"layer {self.name!r}: no client payload was added")
        return self._result()

    def _add(self, payload):
        raise NotImplementedError

    def _result(self):
        raise NotImplementedError


class CollabEdit(Merge):
    """Delta_G = (sum_i R_i K_i^T) (C + sum_j S_j)^{-1}; exact GLOBAL-EDIT for shared keys/cov.

    A client may send `rkt` or, instead, its `delta`: since Delta_i = R_i K_i^T (C + S_i)^{-1},
    R_i K_i^T = Delta_i (C + S_i), which needs only the server's own C.
    """

    needs = ("rkt", "kkt")

    def __init__(self, cov: np.ndarray, *, name: str | None = None, max_cond: float = 1e12):
        super().__init__(name)
        self.cov = np.asarray(cov, dtype=np.float64)
        if self.cov.ndim != 2 or self.cov.shape[0] != self.cov.shape[1]:
            raise ValueError(f"cov must be square, got shape {self.cov.shape}")
        self.max_cond = max_cond
        self.kkt_sum = np.zeros_like(self.cov)
        self.rkt_sum: np.ndarray | None = None  # shape known only at the first payload

    def _add(self, payload):
        kkt = _square_kkt(payload["kkt"]).astype(np.float64)
        if kkt.shape != self.cov.shape:
            raise ValueError(f"layer {self.name!r}: kkt shape {kkt.shape} != cov shape {self.cov.shape}")
        if "rkt" in payload:
            rkt = np.asarray(payload["rkt"], dtype=np.float64)
        elif "delta" in payload:
            rkt = np.asarray(payload["delta"], dtype=np.float64) @ (self.cov + kkt)
        else:
            raise KeyError(f"layer {self.name!r}: CollabEdit needs 'rkt' or 'delta' with 'kkt'")
        self.kkt_sum += kkt
        if self.rkt_sum is None:
            self.rkt_sum = _f64(rkt)
        else:
            self.rkt_sum += rkt

    def _result(self):
        return _solve_right(self.rkt_sum, self.cov + self.kkt_sum, name=self.name, max_cond=self.max_cond)


# --------------------------------------------------------------------------- destructive baselines


class _DeltaSum(Merge):
    needs = ("delta",)

    def __init__(self, name: str | None = None):
        super().__init__(name)
        self.delta_sum: np.ndarray | None = None

    def _add(self, payload):
        delta = np.asarray(payload["delta"], dtype=np.float64)
        if self.delta_sum is None:
            self.delta_sum = _f64(delta)
        else:
            self.delta_sum += delta


class SimpleAverage(_DeltaSum):
    """mean_i Delta_i over the clients actually added (the official code divides by 10)."""

    def _result(self):
        return self.delta_sum / self.count


class TaskArithmetic(_DeltaSum):
    """lam * sum_i Delta_i (official lam = 1)."""

    def __init__(self, lam: float = 1.0, *, name: str | None = None):
        super().__init__(name)
        self.lam = lam

    def _result(self):
        return self.lam * self.delta_sum


def trim_top_magnitude(delta: np.ndarray, density: float) -> np.ndarray:
    """Keep exactly k = int(density * size) entries of largest |value| (mergekit `magnitude`).

    Equal magnitudes at the threshold keep the earlier entry in row-major order (stable sort),
    so the result is deterministic.
    """
    delta = np.asarray(delta, dtype=np.float64)
    if density >= 1:
        return delta.copy()
    k = int(density * delta.size)
    if k <= 0:
        raise ValueError(f"density {density} keeps no entry of a {delta.shape} matrix")
    keep = np.argsort(-np.abs(delta), axis=None, kind="stable")[:k]
    trimmed = np.zeros(delta.size)
    trimmed[keep] = delta.ravel()[keep]
    return trimmed.reshape(delta.shape)


class Ties(Merge):
    """TIES-Merging (Yadav et al. 2023) with mergekit semantics; official density 0.2, lam 0.4.

    Trim each client to its top `density` entries, elect per entry the sign of the sum of trimmed
    values (a zero sum elects +1), average only the entries carrying the elected sign (a trimmed
    zero agrees with no sign), scale by lam. Four running arrays suffice: the elected sign is
    sign(pos_sum + neg_sum) and the disjoint mean is pos_sum/pos_count or neg_sum/neg_count.
    """

    needs = ("delta",)

    def __init__(self, density: float = 0.2, lam: float = 0.4, *, name: str | None = None):
        super().__init__(name)
        if not 0 < density <= 1:
            raise ValueError(f"TIES density must be in (0, 1], got {density}")
        self.density, self.lam = density, lam
        self.pos_sum = self.neg_sum = self.pos_count = self.neg_count = None

    def _add(self, payload):
        trimmed = trim_top_magnitude(payload["delta"], self.density)
        if self.pos_sum is None:
            self.pos_sum, self.neg_sum = np.zeros_like(trimmed), np.zeros_like(trimmed)
            self.pos_count = np.zeros(trimmed.shape, dtype=np.int64)
            self.neg_count = np.zeros(trimmed.shape, dtype=np.int64)
        pos, neg = trimmed > 0, trimmed < 0
        self.pos_sum += np.where(pos, trimmed, 0.0)
        self.neg_sum += np.where(neg, trimmed, 0.0)
        self.pos_count += pos
        self.neg_count += neg

    def _result(self):
        elected_positive = self.pos_sum + self.neg_sum >= 0
        # A zero count implies a zero sum, so max(count, 1) turns "no agreeing client" into 0.
        pos_mean = self.pos_sum / np.maximum(self.pos_count, 1)
        neg_mean = self.neg_sum / np.maximum(self.neg_count, 1)
        return self.lam * np.where(elected_positive, pos_mean, neg_mean)


# --------------------------------------------------------------------------- registry

MERGES: dict[str, type[Merge]] = {
    "collabedit": CollabEdit,
    "simple-average": SimpleAverage,
    "task-arithmetic": TaskArithmetic,
    "ties": Ties,
}


def make_merge(name: str, /, **params) -> Merge:
    """A fresh accumulator for one layer, e.g. make_merge("ties", density=0.2, lam=0.4, name="l5").

    `name` is positional-only so that `name=` can still pass the layer name to the accumulator.
    """
    try:
        cls = MERGES[name]
    except KeyError:
        raise ValueError(f"unknown merge {name!r}; known: {sorted(MERGES)}") from None
    return cls(**params)


def merge(name: str, payloads: Iterable[Mapping[str, np.ndarray]], /, **params) -> np.ndarray:
    """Stream the payloads (one dict per client, one layer) through the named merge."""
    acc = make_merge(name, **params)
    for payload in payloads:
        acc.add(payload)
    return acc.result()


# --------------------------------------------------------------------------- all-at-once references


def collabedit(kkts, cov, *, rkts=None, deltas=None, name: str | None = None,
               max_cond: float = 1e12) -> np.ndarray:
    """(sum_i R_i K_i^T)(C + sum_j S_j)^{-1}, from `rkts` or from `deltas` (exactly one)."""
    if (rkts is None) == (deltas is None):
        raise ValueError("pass exactly one of rkts= or deltas=")
    cov = np.asarray(cov, dtype=np.float64)
    kkts = [_square_kkt(s).astype(np.float64) for s in kkts]
    if rkts is None:
        rkts = [np.asarray(d, dtype=np.float64) @ (cov + s) for d, s in zip(deltas, kkts, strict=True)]
    rkt_sum = np.sum([np.asarray(r, dtype=np.float64) for r in rkts], axis=0)
    return _solve_right(rkt_sum, cov + np.sum(kkts, axis=0), name=name, max_cond=max_cond)


def simple_average(deltas) -> np.ndarray:
    return np.mean(np.asarray(deltas, dtype=np.float64), axis=0)


def task_arithmetic(deltas, lam: float = 1.0) -> np.ndarray:
    return lam * np.sum(np.asarray(deltas, dtype=np.float64), axis=0)


def ties(deltas, density: float = 0.2, lam: float = 0.4) -> np.ndarray:
    trimmed = np.stack([trim_top_magnitude(d, density) for d in deltas])
    elected = np.where(trimmed.sum(axis=0) >= 0, 1.0, -1.0)
    agrees = np.sign(trimmed) == elected
    count = agrees.sum(axis=0)
    return lam * np.where(agrees, trimmed, 0.0).sum(axis=0) / np.maximum(count, 1)


# --------------------------------------------------------------------------- payload validation


class PayloadError(ValueError):
    """A client's reply is malformed; raised before it touches any running sum."""


def validate_layers(names: Iterable[str], expected_names: Iterable[str], client: str) -> None:
    names, expected_names = set(names), set(expected_names)
    if missing := expected_names - names:
        raise PayloadError(f"client {client}: missing layers {sorted(missing)}")
    if unknown := names - expected_names:
        raise PayloadError(f"client {client}: unknown layers {sorted(unknown)}")


def validate_layer_payload(payload: Mapping[str, np.ndarray], *, expected: Mapping[str, tuple],
                           client: str, layer: str, rel_tol: float = 1e-6) -> None:
    """Check fields, shapes, dtypes, finiteness; kkt (square or packed) symmetric and PSD."""
    def fail(field, why):
        raise PayloadError(f"client {client}, layer {layer}, field {field!r}: {why}")

    for field in expected:
        if field not in payload:
            fail(field, "missing")
    for field in payload:
        if field not in expected:
            fail(field, f"unknown field (expected {sorted(expected)})")
    for field, shape in expected.items():
        value = payload[field]
        if not isinstance(value, np.ndarray):
            fail(field, f"not a numpy array but {type(value).__name__}")
        if value.shape != tuple(shape):
            fail(field, f"shape {value.shape} != expected {tuple(shape)}")
        if not np.issubdtype(value.dtype, np.floating):
            fail(field, f"dtype {value.dtype} is not floating point")
        if not np.all(np.isfinite(value)):
            fail(field, "contains NaN or Inf")
        if field == "kkt":
            _check_kkt(value, rel_tol, lambda why: fail(field, why))


def _check_kkt(kkt: np.ndarray, rel_tol: float, fail) -> None:
    # Rounding in a float32 K K^T (rank-deficient: fewer edits than d_in) leaves eigenvalues of
    # order eps * ||S|| around zero, so the tolerance scales with the payload's precision.
    tol = max(rel_tol, 1e3 * np.finfo(kkt.dtype).eps)
    s = _square_kkt(kkt).astype(np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        fail(f"not square: {s.shape}")
    scale = np.linalg.norm(s)
    if np.linalg.norm(s - s.T) > tol * scale:
        fail("not symmetric")
    eig = np.linalg.eigvalsh(s)
    if eig[0] < -tol * max(eig[-1], 0.0):
        fail(f"not positive semi-definite (smallest eigenvalue {eig[0]:.3g}, largest {eig[-1]:.3g})")


# --------------------------------------------------------------------------- dynamic covariance


def dynamic_cov(c0: np.ndarray, lam: float, beta0: float = 1.0, beta1: float = 0.0,
                past_kkt_sum: np.ndarray | None = None) -> np.ndarray:
    """C_r = beta0 * lam * C0 + beta1 * sum of earlier rounds' K K^T (ALGORITHMS.md section 4).

    With beta0=1, beta1=0 it is the fixed lam * C0. The caller must update past_kkt_sum only
    after a round, so clients and server share the same C within it.
    """
    cov = beta0 * lam * np.asarray(c0, dtype=np.float64)
    if past_kkt_sum is not None and beta1 != 0:
        cov = cov + beta1 * _square_kkt(past_kkt_sum).astype(np.float64)
    return cov
