"""Loading, validating and splitting edit requests (real shared data, no model, never downloads)."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections import Counter

import datasets
import pytest

from editing.data import (
    DataError,
    EditRequest,
    augmented,
    chunks,
    conflict_pairs,
    counterfact_conflicts,
    load_requests,
    partition,
    resolve_dataset,
    round_prompts,
)

ZSRE_FILE = "zsre/mem_eval_format/zsre_eval_union.json"


@pytest.fixture(autouse=True, scope="module")
def _arrow_cache(tmp_path_factory):
    # keep the arrow files that load_dataset builds for the tmp JSON files out of the user's HF cache
    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets")
    yield
    datasets.config.HF_DATASETS_CACHE = saved


@pytest.fixture(autouse=True)
def _no_download(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("tests never download")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("COLLABEDIT_CACHE", str(tmp_path / "cache"))


def cf_record(case_id=7, **changes) -> dict:
    record = {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Victor Hugo",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
            "relation_id": "P103",
        },
        "paraphrase_prompts": ["Victor Hugo grew up speaking", "Victor Hugo's native language is"],
        "neighborhood_prompts": ["The mother tongue of Voltaire is"],
    }
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = record
        for part in parents:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return record


def write(path, records):
    path.write_text(json.dumps(records))
    return path


# --- real files ---------------------------------------------------------------------------------------------


def test_counterfact_counts_and_first_record(shared_data):
    requests = load_requests("counterfact")
    assert len(requests) == 1448
    first = requests[0]
    assert (first.case_id, first.subject, first.prompt) == ("0", "Danielle Darrieux", "The mother tongue of {} is")
    assert (first.target_new, first.target_true, first.relation_id) == ("English", "French", "P103")
    assert len(first.paraphrase_prompts) == 2 and len(first.neighborhood_prompts) == 10
    assert first.source == "counterfact" and first.text == "The mother tongue of Danielle Darrieux is"
    assert all(len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 10 for r in requests)
    assert len({r.case_id for r in requests}) == 1448
    # offline, Multi-CounterFact reads the same union file
    assert load_requests("mcf") == requests


def test_limit_and_offset(shared_data):
    everything = load_requests("counterfact")
    assert load_requests("counterfact", limit=5, offset=10) == everything[10:15]
    assert load_requests("counterfact", offset=1440) == everything[1440:]
    with pytest.raises(DataError):
        load_requests("counterfact", offset=-1)


def test_zsre_follows_memit(shared_data, caplog):
    raw = json.loads((shared_data / ZSRE_FILE).read_text())
    with caplog.at_level(logging.WARNING):
        requests = load_requests("zsre", skip_incomplete=True)
    assert len(requests) == 1037 == sum("loc" in r for r in raw)
    assert "skipped 678" in caplog.text
    for request in requests:
        record = raw[int(request.case_id)]
        assert request.prompt == record["src"].replace(record["subject"], "{}")
        assert request.text == record["src"]
        assert request.target_new == record["answers"][0].strip()
        assert request.target_true is None
        assert request.paraphrase_prompts == (record["rephrase"],)
        assert request.neighborhood_prompts == (record["loc"] + "?",)
        assert request.neighborhood_answer == record["loc_ans"].strip()
        assert request.source == "zsre"
    first = requests[0]
    assert (first.prompt, first.target_new) == ("When was the inception of {}?", "1998")
    assert first.neighborhood_prompts == ("nq question: what is the name of the last episode of spongebob?",)
    assert first.neighborhood_answer == "The String"
    # the counterfactual target is an option; alt values carry stray spaces in the release
    alt = load_requests("zsre", skip_incomplete=True, zsre_target="alt")
    assert alt[0].target_new == "2006"
    assert all(r.target_new == raw[int(r.case_id)]["alt"].strip() for r in alt)
    with pytest.raises(DataError, match="zsre_target"):
        load_requests("zsre", zsre_target="pred")


def test_zsre_incomplete_records_need_an_explicit_choice(shared_data, caplog):
    with pytest.raises(DataError, match=r"record 1037 .*skip_incomplete=True"):
        load_requests("zsre")
    # keeping records without locality exposes 9 whose subject is not spelled as in src
    with pytest.raises(DataError, match=r"record 1054 .*Rio Grande 463.*does not occur"):
        load_requests("zsre", require_locality=False)
    with caplog.at_level(logging.WARNING):
        everything = load_requests("zsre", require_locality=False, skip_malformed=True)
    assert len(everything) == 1715 - 9 and "skipped 9 malformed" in caplog.text
    incomplete = [r for r in everything if not r.neighborhood_prompts]
    assert len(incomplete) == 678 - 9
    assert all(r.neighborhood_answer is None for r in incomplete)


def test_conflict_set(shared_data):
    with pytest.raises(DataError, match=r"record 6 .*'Amiuk'.*skip_malformed"):
        load_requests("conflict")
    requests = load_requests("conflict", skip_malformed=True)
    assert len(requests) == 1000 - 66
    first = requests[0]
    assert (first.prompt, first.subject, first.target_new, first.target_true) == (
        "{} has use(s), such as", "fpart", "fraking", "data migration"
    )
    assert first.extra["conflict_object"] == "franking" and first.source == "conflict"
    pairs = conflict_pairs(requests)
    assert len(pairs) == len(requests)
    for a, b in pairs:
        assert (b.prompt, b.subject, b.relation_id) == (a.prompt, a.subject, a.relation_id)
        assert b.target_true == a.target_true
        assert b.target_new == a.extra["conflict_object"] != a.target_new
        assert b.case_id != a.case_id and b.extra["conflict_of"] == a.case_id
    with pytest.raises(DataError, match="conflict_object"):
        conflict_pairs(load_requests("counterfact", limit=1))


def test_counterfact_conflicts(shared_data):
    requests = load_requests("counterfact")
    pairs = counterfact_conflicts(requests, seed=0)
    assert pairs == counterfact_conflicts(requests, seed=0)
    # a request's counterpart depends on the seed and the pool, not on the order
    reversed_pairs = counterfact_conflicts(requests[::-1], seed=0)
    assert {b.case_id: b.target_new for _, b in pairs} == {b.case_id: b.target_new for _, b in reversed_pairs}
    new_objects = {(r.relation_id, r.target_new) for r in requests}
    for a, b in pairs:
        assert (b.prompt, b.subject, b.relation_id) == (a.prompt, a.subject, a.relation_id)
        assert b.target_true == a.target_true
        assert b.target_new not in (a.target_new, a.target_true)
        assert (a.relation_id, b.target_new) in new_objects
    other_seed = counterfact_conflicts(requests, seed=1)
    assert sum(p[1].target_new != q[1].target_new for p, q in zip(pairs, other_seed)) > len(pairs) // 2
    # a small batch can draw its conflicting objects from the whole file
    assert len(counterfact_conflicts(requests[:3], pool=requests)) == 3
    with pytest.raises(DataError, match="no other new object"):
        counterfact_conflicts(requests[:1])


def test_demo_set_loads_and_validates(monkeypatch):
    monkeypatch.delenv("COLLABEDIT_DATA", raising=False)
    requests = load_requests("demo")  # shipped with the package: no data folder needed
    assert len(requests) == 40
    assert all(r.source == "demo" and r.target_true for r in requests)
    assert all(len(r.paraphrase_prompts) == 2 and 3 <= len(r.neighborhood_prompts) <= 10 for r in requests)
    assert all(r.subject in p for r in requests for p in r.paraphrase_prompts)
    assert all(r.subject not in n for r in requests for n in r.neighborhood_prompts)
    assert len({(r.subject, r.relation_id) for r in requests}) == 40
    assert len(counterfact_conflicts(requests, seed=0)) == 40
    assert [len(block) for block in partition(requests, 8)] == [5] * 8


# --- locating files -----------------------------------------------------------------------------------------


def test_explicit_path_beats_env_var(shared_data, tmp_path):
    mine = write(tmp_path / "mine.json", [cf_record(3), cf_record(4)])
    assert resolve_dataset("counterfact", mine) == mine
    assert [r.case_id for r in load_requests("counterfact", mine)] == ["3", "4"]
    # a directory with the shared/data layout, or holding the canonical file name
    layout = tmp_path / "data" / "counterfact" / "rome_format"
    layout.mkdir(parents=True)
    write(layout / "counterfact_rome_union.json", [cf_record(5)])
    assert [r.case_id for r in load_requests("counterfact", tmp_path / "data")] == ["5"]
    write(tmp_path / "multi_counterfact.json", [cf_record(6)])
    assert [r.case_id for r in load_requests("mcf", tmp_path)] == ["6"]
    assert resolve_dataset("zsre") == shared_data / ZSRE_FILE


def test_missing_locations_raise(monkeypatch, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_dataset("counterfact", tmp_path / "nowhere.json")
    monkeypatch.setenv("COLLABEDIT_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"COLLABEDIT_DATA.*holds none of"):
        resolve_dataset("zsre")
    with pytest.raises(DataError, match=r"valid names: counterfact, mcf, zsre, conflict, demo"):
        load_requests("wikidata")
    with pytest.raises(TypeError, match="skip_incomplete"):
        load_requests("demo", skip_incomplete=True)  # a zsRE-only option


def test_download_failure_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.delenv("COLLABEDIT_DATA", raising=False)
    with pytest.raises(DataError, match=r"rome\.baulab\.info.*COLLABEDIT_DATA.*path="):
        resolve_dataset("counterfact")
    assert not list((tmp_path / "cache").glob("*"))  # no partial file left behind
    cached = write(tmp_path / "cache" / "zsre_mem_eval.json", [])  # the failed download made the folder
    assert resolve_dataset("zsre") == cached  # an earlier download is reused without the network


# --- validation ---------------------------------------------------------------------------------------------

MALFORMED = {
    "missing key": ({"paraphrase_prompts": None}, "missing key 'paraphrase_prompts'"),
    "missing nested key": ({"requested_rewrite.target_true": None}, "missing key 'requested_rewrite.target_true.str'"),
    "prompt without {}": ({"requested_rewrite.prompt": "The mother tongue is"}, "exactly one"),
    "prompt with two {}": ({"requested_rewrite.prompt": "{} and {} speak"}, "exactly one"),
    "empty target": ({"requested_rewrite.target_new": {"str": "  "}}, "'requested_rewrite.target_new.str' is empty"),
    "new equals true": ({"requested_rewrite.target_new": {"str": "French"}}, "target_new equals target_true"),
    "wrong type": ({"neighborhood_prompts": "The mother tongue of Voltaire is"}, "wrong type"),
    "empty prompt list item": ({"neighborhood_prompts": ["  "]}, "empty paraphrase or neighbourhood"),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_counterfact_record_is_named(tmp_path, kind):
    changes, message = MALFORMED[kind]
    file = write(tmp_path / "bad.json", [cf_record(3), cf_record(42, **changes)])
    with pytest.raises(DataError) as error:
        load_requests("counterfact", file)
    assert str(file) in str(error.value) and "record 1 (case_id 42)" in str(error.value)
    assert message in str(error.value)


def test_skip_malformed_drops_with_warning(tmp_path, caplog):
    file = write(tmp_path / "bad.json", [cf_record(3), cf_record(4, **{"requested_rewrite.subject": None})])
    with caplog.at_level(logging.WARNING):
        requests = load_requests("counterfact", file, skip_malformed=True)
    assert [r.case_id for r in requests] == ["3"] and "skipped 1 malformed" in caplog.text


def test_malformed_zsre_record_is_named(tmp_path):
    good = {"subject": "Apple A5", "src": "Which company made Apple A5?", "rephrase": "Who made Apple A5?",
            "alt": "Google", "answers": ["Apple"], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
    bad_subject = dict(good, src="Which company made the A5 chip?")
    no_answers = dict(good, answers=[])
    file = write(tmp_path / "z.json", [good, bad_subject])
    with pytest.raises(DataError, match=r"record 1 \(case_id 1\): subject 'Apple A5' does not occur"):
        load_requests("zsre", file)
    with pytest.raises(DataError, match=r"record 1 \(case_id 1\): 'answers' is empty"):
        load_requests("zsre", write(tmp_path / "z2.json", [good, no_answers]))
    incomplete = {k: v for k, v in good.items() if k not in ("loc", "loc_ans")}
    kept = load_requests("zsre", write(tmp_path / "z3.json", [good, incomplete]), require_locality=False)
    assert [r.neighborhood_prompts for r in kept] == [("nq question: who wrote hamlet?",), ()]


def test_unparsable_file(tmp_path):
    file = tmp_path / "broken.json"
    file.write_text('[{"case_id": 1,')
    with pytest.raises(DataError, match="not a readable JSON"):
        load_requests("counterfact", file)


# --- splitting ----------------------------------------------------------------------------------------------


def requests_(n: int) -> list[EditRequest]:
    return [EditRequest(case_id=str(i), prompt="{} is", subject=f"s{i}", target_new="x") for i in range(n)]


def test_partition_contiguous_is_the_papers_split():
    items = requests_(12)
    blocks = partition(items, 3)
    assert blocks == [items[0:4], items[4:8], items[8:12]]
    with pytest.raises(DataError, match="allow_uneven=True"):
        partition(requests_(10), 4)
    assert [len(b) for b in partition(requests_(10), 4, allow_uneven=True)] == [3, 3, 2, 2]
    assert sum(partition(requests_(10), 4, allow_uneven=True), []) == requests_(10)
    for bad in (0, 13):
        with pytest.raises(DataError):
            partition(items, bad)
    with pytest.raises(DataError, match="mode"):
        partition(items, 3, mode="dirichlet")


def test_partition_random_is_seeded():
    items = requests_(40)
    first = partition(items, 4, mode="random", seed=1)
    assert first == partition(items, 4, mode="random", seed=1)
    assert first != partition(items, 4, mode="random", seed=2)
    assert first != partition(items, 4)
    assert Counter(r.case_id for b in first for r in b) == Counter(r.case_id for r in items)
    assert [len(b) for b in first] == [10] * 4


def test_chunks_for_rounds():
    items = requests_(9)
    assert chunks(items, 3) == [items[0:3], items[3:6], items[6:9]]
    with pytest.raises(DataError, match="allow_partial"):
        chunks(items, 4)
    assert [len(c) for c in chunks(items, 4, allow_partial=True)] == [4, 4, 1]
    with pytest.raises(DataError):
        chunks(items, 0)


def test_round_prompts_and_augmented(shared_data, tmp_path):
    prompts = round_prompts()
    assert len(prompts) == 10 and all(len(t) == 10 for t in prompts.values())
    request = load_requests("conflict", limit=1, skip_malformed=True)[0]
    templates = prompts[request.relation_id]
    aug = augmented(request, templates, 3, seed=0)
    assert aug == augmented(request, templates, 3, seed=0) != augmented(request, templates, 3, seed=1)
    assert len({a.prompt for a in aug}) == 3 and all(a.prompt in templates for a in aug)
    assert all(a.subject == request.subject and a.target_new == request.target_new for a in aug)
    assert all(a.case_id.startswith(f"{request.case_id}:aug") for a in aug)
    # the request's own prompt is never drawn, even when it is one of the templates
    own = augmented(request, [request.prompt, "{} x", "{} y"], 2)
    assert {a.prompt for a in own} == {"{} x", "{} y"}
    with pytest.raises(DataError, match="augmentations"):
        augmented(request, templates, 11)
    with pytest.raises(DataError, match="exactly one"):
        round_prompts(write(tmp_path / "bad.json", {"P1": ["no slot"]}))
