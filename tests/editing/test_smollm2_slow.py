"""MEMIT end to end on the real default model and real CounterFact records (slow; CI runs it)."""

import pytest

from editing.cli import run_edit

pytestmark = pytest.mark.slow


def test_memit_edits_32_counterfact_records_on_smollm2():
    report = run_edit(model="smollm2", dataset="counterfact", n=32, mode="sequential")
    pre, post = report["pre"], report["post"]
    print({"pre": pre, "post": post, "seconds": report["seconds"]})
    assert report["requests"] == 32
    assert post["es"] >= 90, post
    assert post["ps"] >= pre["ps"] + 20, (pre, post)  # clearly above the unedited model
    assert post["ns"] >= pre["ns"] - 15, (pre, post)  # neighbours mostly kept
