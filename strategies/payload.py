"""How per-layer arrays travel in Flower records: key "<layer>.<field>", float64 numpy arrays.

`kkt` travels packed (upper triangle): it is symmetric, so half the bytes carry all of it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from .merge import pack_symmetric, unpack_symmetric

FIELDS = ("delta", "rkt", "kkt")


def key(layer: int, field: str) -> str:
    return f"{layer}.{field}"


def encode(layers: dict[int, dict[str, np.ndarray]]) -> ArrayRecord:
    arrays = {}
    for layer, fields in layers.items():
        for field, value in fields.items():
            value = np.ascontiguousarray(value, dtype=np.float64)
            arrays[key(layer, field)] = Array(pack_symmetric(value) if field == "kkt" else value)
    return ArrayRecord(arrays)


def decode(record: ArrayRecord, *, unpack: bool = True) -> dict[int, dict[str, np.ndarray]]:
    """{layer: {field: array}}; a malformed key raises ValueError naming it."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for name, array in record.items():
        layer, _, field = name.partition(".")
        if not layer.isdigit() or not field:
            raise ValueError(f"malformed array key {name!r}: expected '<layer>.<field>'")
        value = array.numpy()
        if field == "kkt" and unpack and value.ndim == 1:
            value = unpack_symmetric(value)
        out.setdefault(int(layer), {})[field] = value
    return out


def encode_deltas(deltas: dict[int, np.ndarray]) -> ArrayRecord:
    return encode({layer: {"delta": d} for layer, d in deltas.items()})


def decode_deltas(record: ArrayRecord) -> dict[int, np.ndarray]:
    return {layer: fields["delta"] for layer, fields in decode(record).items()}


def nbytes(record: ArrayRecord) -> int:
    """Bytes of array data in a record (simulation reports no network traffic: count it here)."""
    return sum(len(array.data) for array in record.values())
