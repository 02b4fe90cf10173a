"""How per-layer arrays travel in Flower records: key "<layer>.<field>", numpy arrays.

Two forms, chosen by the run config (`payload`, `payload-dtype`):

dense     `kkt` packed (upper triangle, `pack_symmetric`: it is symmetric, so half the bytes
          carry all of it), `rkt` and `delta` as matrices: d_in^2 / 2 + d_out d_in numbers.
factored  the same information in (d_in + d_out) x r numbers, r = the numerical rank (at most
          the number of edited keys), computed by `factor_layer` from the dense fields ALONE:
            w, U = eigh(K K^T), kept where w > d_in eps max(w), in descending order, each
              column of U signed so that its entry of largest magnitude is positive;
            kkt-factor F = U diag(sqrt(w))         (F F^T = K K^T)
            rkt-factor G = (R K^T) U diag(1/sqrt(w)) (G F^T = R K^T U U^T = R K^T: the rows of
                                                    R K^T lie in the range of K)
            U, s, V = svd(Delta), kept where s > max(shape) eps max(s), each column of V signed
              as above (U's column with it): delta-left A = U diag(s), delta-right B = V
              (A B^T = Delta).
          A layer whose factors would not be smaller than its dense fields travels dense.
          Being a deterministic function of what the dense form sends, the factored message
          tells the server nothing the dense one does not.

`payload-dtype="float32"` casts every array for transport (the server folds in float64 either
way); its effect on exactness is measured in benchmarks/bench_protocol.py.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from .merge import FACTORED, delta_dense, kkt_square, pack_symmetric, unpack_symmetric

FIELDS = ("delta", "rkt", "kkt")  # what a server may ask for (in their dense meaning)
FORMS = ("factored", "dense")
DTYPES = ("float64", "float32")


def key(layer: int, field: str) -> str:
    return f"{layer}.{field}"


def _canonical_signs(v: np.ndarray) -> np.ndarray:
    """+1 / -1 per column making each column's entry of largest magnitude positive."""
    if v.shape[1] == 0:
        return np.ones(0)
    pick = v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])]
    return np.where(pick < 0, -1.0, 1.0)


def psd_factor(kkt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, w) of the module docstring: the canonical eigenpairs of K K^T above rounding."""
    s = kkt_square(kkt)
    w, u = np.linalg.eigh(s)
    w, u = w[::-1], u[:, ::-1]
    keep = w > s.shape[0] * np.finfo(np.float64).eps * max(w[0] if w.size else 0.0, 0.0)
    w, u = w[keep], u[:, keep]
    return u * _canonical_signs(u), w


def delta_factor(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of the module docstring: Delta = A B^T at its numerical rank."""
    delta = np.asarray(delta, dtype=np.float64)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    keep = s > max(delta.shape) * np.finfo(np.float64).eps * (s[0] if s.size else 0.0)
    u, s, v = u[:, keep], s[keep], vt[keep].T
    sign = _canonical_signs(v)
    return u * (s * sign), v * sign


def factor_layer(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One layer's dense fields -> its factored fields (float64), dense where that is smaller."""
    out: dict[str, np.ndarray] = {}
    if "kkt" in fields:
        u, w = psd_factor(fields["kkt"])
        d_in, r = u.shape
        rkt = np.asarray(fields["rkt"], dtype=np.float64) if "rkt" in fields else None
        d_out = 0 if rkt is None else rkt.shape[0]
        if r * (d_in + d_out) < d_in * (d_in + 1) // 2 + d_out * d_in:
            root = np.sqrt(w)
            out["kkt-factor"] = u * root
            if rkt is not None:
                out["rkt-factor"] = (rkt @ u) / root
        else:
            out["kkt"] = np.asarray(fields["kkt"])
            if rkt is not None:
                out["rkt"] = rkt
    elif "rkt" in fields:  # without K K^T there is no basis to factor R K^T in
        out["rkt"] = fields["rkt"]
    if "delta" in fields:
        delta = np.asarray(fields["delta"], dtype=np.float64)
        left, right = delta_factor(delta)
        if left.shape[1] * sum(delta.shape) < delta.size:
            out["delta-left"], out["delta-right"] = left, right
        else:
            out["delta"] = delta
    return out


def factor_keys(keys: np.ndarray, residuals: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The factored fields of K K^T and R K^T from K (d_in x n) and R (d_out x n) in O(d n^2),
    without forming d_in x d_in: K = Q T (thin QR), T T^T = V diag(w) V^T, U = Q V. Equal to
    `factor_layer({"kkt": K K^T, "rkt": R K^T})` up to rounding (same rank threshold and signs;
    tests check it); for parties and benchmarks at shapes where d_in^3 is too much."""
    keys = np.asarray(keys, dtype=np.float64)
    q, t = np.linalg.qr(keys)
    w, v = np.linalg.eigh(t @ t.T)
    w, v = w[::-1], v[:, ::-1]
    keep = w > keys.shape[0] * np.finfo(np.float64).eps * max(w[0] if w.size else 0.0, 0.0)
    w, v = w[keep], v[:, keep]
    u = q @ v
    sign = _canonical_signs(u)
    u, root = u * sign, np.sqrt(w)
    out = {"kkt-factor": u * root}
    if residuals is not None:  # R K^T U / sqrt(w) = R T^T (V sign) / sqrt(w)
        out["rkt-factor"] = np.asarray(residuals, dtype=np.float64) @ (t.T @ (v * sign)) / root
    return out


def encode(layers: dict[int, dict[str, np.ndarray]], *, form: str = "dense",
           dtype: str = "float64") -> ArrayRecord:
    """{layer: {field: array}} -> record. form="factored" factors dense fields (`factor_layer`);
    form="dense" sends the fields as given (a factor stays a factor); kkt travels packed."""
    if form not in FORMS or dtype not in DTYPES:
        raise ValueError(f"payload form {form!r} / dtype {dtype!r}: choose from {FORMS} / {DTYPES}")
    arrays = {}
    for layer, fields in layers.items():
        if form == "factored":
            fields = factor_layer(fields)
        for field, value in fields.items():
            value = np.asarray(value)
            if field == "kkt" and value.ndim == 2:
                value = pack_symmetric(value)
            arrays[key(layer, field)] = Array(np.ascontiguousarray(value, dtype=dtype))
    return ArrayRecord(arrays)


def decode(record: ArrayRecord, *, unpack: bool = False) -> dict[int, dict[str, np.ndarray]]:
    """{layer: {field: array}} as sent (each array decoded once); `unpack` squares packed kkt.
    A malformed key raises ValueError naming it."""
    out: dict[int, dict[str, np.ndarray]] = {}
    known = {f for w in FIELDS for f in (w, *FACTORED[w])}
    for name, array in record.items():
        layer, _, field = name.partition(".")
        if not layer.isdigit() or field not in known:
            raise ValueError(f"malformed array key {name!r}: expected '<layer>.<field>' with a "
                             f"field in {sorted(known)}")
        value = array.numpy()
        if field == "kkt" and unpack and value.ndim == 1:
            value = unpack_symmetric(value)
        out.setdefault(int(layer), {})[field] = value
    return out


def dense(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Any layer's fields back in the dense form (float64, kkt square): for tests and clients."""
    out = {}
    if "kkt" in fields or "kkt-factor" in fields:
        out["kkt"] = kkt_square(fields)
    if "rkt" in fields:
        out["rkt"] = np.asarray(fields["rkt"], dtype=np.float64)
    elif "rkt-factor" in fields:
        out["rkt"] = (np.asarray(fields["rkt-factor"], dtype=np.float64)
                      @ np.asarray(fields["kkt-factor"], dtype=np.float64).T)
    if "delta" in fields or "delta-left" in fields:
        out["delta"] = delta_dense(fields)
    return out


def encode_deltas(deltas: dict[int, np.ndarray]) -> ArrayRecord:
    return encode({layer: {"delta": d} for layer, d in deltas.items()})


def decode_deltas(record: ArrayRecord) -> dict[int, np.ndarray]:
    return {layer: fields["delta"] for layer, fields in decode(record).items()}


def nbytes(record: ArrayRecord) -> int:
    """Bytes of array data in a record (simulation reports no network traffic: count it here)."""
    return sum(len(array.data) for array in record.values())
