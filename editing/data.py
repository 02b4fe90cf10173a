"""Edit requests and the benchmarks they come from.

One entry point, `load_requests(name)`, turns a benchmark file into `EditRequest`s; `resolve_dataset` finds
the file (explicit path > $COLLABEDIT_DATA > download cache). Every record is validated on load and a bad
record raises `DataError` naming the file, its index and case_id: nothing is dropped unless the caller asks
(`skip_malformed=True`, `skip_incomplete=True`), and then a warning gives the count.
`partition` and `chunks` split requests over clients and rounds.
"""

from __future__ import annotations

import json
import logging
import os
import random
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A record or a dataset location is unusable; the message names the record."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to change, plus the prompts that evaluate the change.

    `prompt` holds a single "{}" where the subject goes ("The mother tongue of {} is").
    Targets are stored without a leading space; the editor and the metrics prepend one when they
    tokenise (as MEMIT does), so " English" is what the model must produce.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None  # None for zsRE (MEMIT uses "<|endoftext|>" there)
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    # zsRE: the locality question's true answer; CounterFact neighbourhoods are scored on target_true
    neighborhood_answer: str | None = None
    relation_id: str | None = None
    source: str = ""  # "counterfact", "zsre", "conflict", "demo": decides which metrics apply
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.format(self.subject)


# ---------------------------------------------------------------------------------------------------------
# Where the files are

DATA_ENV = "COLLABEDIT_DATA"
CACHE_ENV = "COLLABEDIT_CACHE"
DEMO_FILE = Path(__file__).with_name("demo_edits.json")

# Path inside a data directory laid out like the project's shared/data folder. Multi-CounterFact and
# CounterFact share schema and case_ids (MCF is MEMIT's conflict-filtered subset), so offline both names
# read the same union file; only the download differs.
LOCAL_FILES = {
    "counterfact": "counterfact/rome_format/counterfact_rome_union.json",
    "mcf": "counterfact/rome_format/counterfact_rome_union.json",
    "zsre": "zsre/mem_eval_format/zsre_eval_union.json",
    "conflict": "collabedit_conflict/GPT2-XL/easy_conflict_1000_p1.json",
}
URLS = {
    "counterfact": "https://rome.baulab.info/data/dsets/counterfact.json",
    "mcf": "https://rome.baulab.info/data/dsets/multi_counterfact.json",
    "zsre": "https://rome.baulab.info/data/dsets/zsre_mem_eval.json",
    "conflict": "https://raw.githubusercontent.com/LINs-lab/CollabEdit/main/data/GPT2-XL/easy_conflict_1000_p1.json",
}
NAMES = ("counterfact", "mcf", "zsre", "conflict", "demo")


def resolve_dataset(name: str, path: str | Path | None = None) -> Path:
    """The JSON file for dataset `name`.

    Order: `path` (a file, or a directory holding either the shared/data layout or the canonical file name,
    e.g. MEMIT's data/dsets); else $COLLABEDIT_DATA (a directory laid out like shared/data); else the
    canonical URL, downloaded once into $COLLABEDIT_CACHE (default ~/.cache/collabedit/data). A path or
    $COLLABEDIT_DATA that lacks the file raises rather than falling back to a download.
    "demo" is shipped with the package and needs no location.
    """
    if name not in NAMES:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(NAMES)}")
    if path is not None:
        return _find(Path(path), name, "path argument")
    if name == "demo":
        return DEMO_FILE
    if os.environ.get(DATA_ENV):
        return _find(Path(os.environ[DATA_ENV]), name, f"${DATA_ENV}")
    return _download(name)


def _find(where: Path, name: str, origin: str) -> Path:
    if where.is_file():
        return where
    if not where.is_dir():
        raise DataError(f"{origin} {where} does not exist")
    if name == "demo":
        candidates = [where / DEMO_FILE.name]
    else:
        candidates = [where / LOCAL_FILES[name], where / URLS[name].rsplit("/", 1)[1]]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"{origin} {where} holds none of: {', '.join(str(c) for c in candidates)}")


def _download(name: str) -> Path:
    url = URLS[name]
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "collabedit" / "data")
    target = cache / url.rsplit("/", 1)[1]
    if target.is_file():
        return target
    partial = target.with_suffix(".part")  # a killed download must not look like a finished file
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
        partial.replace(target)
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        partial.unlink(missing_ok=True)
        raise DataError(
            f"could not download {name!r} from {url} ({e}). Offline, set ${DATA_ENV} to a data directory "
            f"holding {LOCAL_FILES[name]} (the project's shared/data layout), or pass path= to "
            f"load_requests / resolve_dataset."
        ) from e
    return target


# ---------------------------------------------------------------------------------------------------------
# Loading and validation


def load_requests(
    name: str,
    path: str | Path | None = None,
    *,
    limit: int | None = None,
    offset: int = 0,
    **options,
) -> list[EditRequest]:
    """Load dataset `name` (one of NAMES) as edit requests, in file order.

    `offset`/`limit` slice the validated requests. Options:

    - all: `skip_malformed=False`: True drops records that fail validation, with a warning giving the count
      (the CollabEdit conflict file has 66 records whose conflict object equals the new object: not a conflict).
    - "counterfact" / "mcf" / "demo": ROME/MEMIT schema. Multi-CounterFact and CounterFact share schema and
      case_ids, so offline both names read the same union file.
    - "zsre": MEND/MEMIT `zsre_mem_eval` schema, mapped exactly as MEMIT's dsets/zsre.py: prompt = src with the
      subject replaced by "{}", paraphrase = [rephrase], neighbourhood = [loc + "?"] scored on loc_ans,
      target_true = None, case_id = index in the file.
      `zsre_target="answers"` (default) edits towards answers[0], as MEMIT (and the CollabEdit paper, which
      follows it) does: the edit installs the gold answer, which the unedited model often gets wrong.
      `"alt"` edits towards MEND's counterfactual `alt` instead.
      Records without loc/loc_ans cannot be scored for locality. By default they raise; the shared union
      file has 678 of them, so pass `skip_incomplete=True` to drop them (warning with the count) or
      `require_locality=False` to keep them with no neighbourhood prompt.
    - "conflict": the CollabEdit paper's knowledge-conflict set; `extra["conflict_object"]` holds the
      competing object (see `conflict_pairs`).
    """
    if name not in NAMES:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(NAMES)}")
    skip_malformed = options.pop("skip_malformed", False)
    allowed = {"zsre_target", "skip_incomplete", "require_locality"} if name == "zsre" else set()
    if unknown := set(options) - allowed:
        valid = sorted(allowed | {"skip_malformed"})
        raise TypeError(f"load_requests({name!r}): unknown option(s) {sorted(unknown)}; valid: {valid}")
    if options.get("zsre_target", "answers") not in ("answers", "alt"):
        raise DataError(f"zsre_target must be 'answers' or 'alt', got {options['zsre_target']!r}")
    if offset < 0 or (limit is not None and limit < 0):
        raise DataError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
    file = resolve_dataset(name, path)
    convert = {"zsre": _zsre, "conflict": _conflict}.get(name, _counterfact)
    source = {"mcf": "counterfact"}.get(name, name)
    requests, malformed, incomplete = [], [], 0
    for index, record in enumerate(_read_records(file)):
        where = f"{file}, record {index} (case_id {_case_id(record, index)})"
        try:
            request = convert(record, index, source, where, **options)
            if request is None:  # zsRE record without locality question, skip_incomplete=True
                incomplete += 1
                continue
            _validate(request, where)
            requests.append(request)
        except DataError as e:
            if not skip_malformed:
                raise
            malformed.append(str(e))
    if incomplete:
        log.warning("%s: skipped %d records without loc/loc_ans (skip_incomplete=True)", file, incomplete)
    if malformed:
        log.warning(
            "%s: skipped %d malformed records (skip_malformed=True); first: %s", file, len(malformed), malformed[0]
        )
    return requests[offset : None if limit is None else offset + limit]


def source_records(name: str, path: str | Path | None, requests: Sequence[EditRequest]) -> list[dict]:
    """The dataset's own records behind `requests`, as the file holds them (to hand a party a file
    of its own in the dataset's format)."""
    records = _read_records(resolve_dataset(name, path))
    by_id = {_case_id(r, i): r for i, r in enumerate(records)}
    by_index = {str(i): r for i, r in enumerate(records)}
    out = []
    for req in requests:
        record = (by_index if name == "zsre" else by_id).get(req.case_id)
        if record is None:
            raise DataError(f"{name}: no record with case_id {req.case_id}")
        out.append(_without_none(record))
    return out


def _without_none(value):
    """Undo the None that `datasets` fills into keys a record lacked."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _read_records(file: Path) -> list[dict]:
    import datasets  # imported here: modules that only need EditRequest should not pay for pyarrow

    # load_dataset keeps file order, fills keys a record lacks with None and stores mixed-type columns as
    # JSON values, so every record reaches validation as written.
    try:
        return datasets.load_dataset("json", data_files=str(file), split="train").to_list()
    except Exception as e:  # datasets wraps parse errors in several exception types
        if _empty_list(file):
            raise DataError(f"{file}: holds no records (an empty JSON list)") from e
        raise DataError(f"{file}: not a readable JSON list of records ({e})") from e


def _empty_list(file: Path) -> bool:
    try:
        return json.loads(file.read_text()) == []
    except (OSError, ValueError):
        return False


def _case_id(record: dict, index: int) -> str:
    return str(record["case_id"]) if record.get("case_id") is not None else str(index)


def _get(record: dict, key: str, where: str, kind: type | tuple = str):
    """record["a.b.c"], required to be a `kind` (and not blank where it is a str or list); returned as is."""
    value = record
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        raise DataError(f"{where}: missing key {key!r}")
    if not isinstance(value, kind) or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
        raise DataError(f"{where}: {key!r} has the wrong type: {value!r}")
    if isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
        raise DataError(f"{where}: {key!r} is empty")
    return value


def _counterfact(record: dict, index: int, source: str, where: str) -> EditRequest:
    return EditRequest(
        case_id=str(_get(record, "case_id", where, (int, str))),
        prompt=_get(record, "requested_rewrite.prompt", where),
        subject=_get(record, "requested_rewrite.subject", where),
        target_new=_get(record, "requested_rewrite.target_new.str", where).strip(),
        target_true=_get(record, "requested_rewrite.target_true.str", where).strip(),
        paraphrase_prompts=tuple(_get(record, "paraphrase_prompts", where, list)),
        neighborhood_prompts=tuple(_get(record, "neighborhood_prompts", where, list)),
        relation_id=_get(record, "requested_rewrite.relation_id", where),
        source=source,
        # kept for the optional generation metrics (reference score, fluency)
        extra={k: record[k] for k in ("attribute_prompts", "generation_prompts") if record.get(k)},
    )


def _zsre(
    record: dict,
    index: int,
    source: str,
    where: str,
    *,
    zsre_target: str = "answers",
    skip_incomplete: bool = False,
    require_locality: bool = True,
) -> EditRequest | None:
    if record.get("loc") is None or record.get("loc_ans") is None:
        if skip_incomplete:
            return None
        if require_locality:
            raise DataError(
                f"{where}: no loc/loc_ans (locality question); pass skip_incomplete=True to drop such "
                f"records or require_locality=False to keep them without a neighbourhood prompt"
            )
        neighborhood, answer = (), None
    else:
        neighborhood, answer = (_get(record, "loc", where) + "?",), _get(record, "loc_ans", where).strip()
    subject, src = _get(record, "subject", where), _get(record, "src", where)
    if subject not in src:
        raise DataError(f"{where}: subject {subject!r} does not occur in src {src!r}")
    answers = _get(record, "answers", where, list)
    # stripped: the release has targets like " Delaware River", and tokenisation adds the space back
    target = (answers[0] if zsre_target == "answers" else _get(record, "alt", where)).strip()
    return EditRequest(
        case_id=str(index),
        prompt=src.replace(subject, "{}"),
        subject=subject,
        target_new=target,
        target_true=None,
        paraphrase_prompts=(_get(record, "rephrase", where),),
        neighborhood_prompts=neighborhood,
        neighborhood_answer=answer,
        source=source,
        extra={"answers": answers, "alt": record.get("alt"), "pred": record.get("pred")},
    )


def _label(value) -> str | None:
    # new_object is a plain string in the conflict file but an {id, label} object in easy.json
    return value.get("label") if isinstance(value, dict) else value


def _conflict(record: dict, index: int, source: str, where: str) -> EditRequest:
    edit = _get(record, "edit", where, dict)
    target_new = _label(edit.get("new_object"))
    if not isinstance(target_new, str) or not target_new.strip():
        raise DataError(f"{where}: missing or empty 'edit.new_object'")
    request = EditRequest(
        case_id=str(index),
        prompt=_get(record, "edit.relation.prompt", where),
        subject=_get(record, "edit.subject.label", where),
        target_new=target_new.strip(),
        target_true=_get(record, "edit.object.label", where).strip(),
        relation_id=_get(record, "edit.relation.id", where),
        source=source,
        extra={
            "conflict_object": _get(record, "edit.conflict_object.label", where).strip(),
            "true_objects": [_label(o) for o in record.get("true_objects") or []],
        },
    )
    if request.extra["conflict_object"] in (request.target_new, request.target_true):
        raise DataError(
            f"{where}: conflict_object {request.extra['conflict_object']!r} equals the new or the true "
            "object: not a conflict (skip_malformed=True drops such records with a warning)"
        )
    return request


def _validate(request: EditRequest, where: str) -> None:
    prompt = request.prompt
    if prompt.count("{}") != 1 or "{" in prompt.replace("{}", "", 1) or "}" in prompt.replace("{}", "", 1):
        raise DataError(f"{where}: prompt {prompt!r} must hold exactly one '{{}}' and no other braces")
    if not request.subject or request.subject not in request.text:
        raise DataError(f"{where}: subject {request.subject!r} not in the filled prompt {request.text!r}")
    if not request.target_new:
        raise DataError(f"{where}: empty target_new")
    if request.target_new == request.target_true:
        raise DataError(f"{where}: target_new equals target_true ({request.target_new!r}): nothing to edit")
    for prompt in request.paraphrase_prompts + request.neighborhood_prompts:
        if not prompt.strip():
            raise DataError(f"{where}: empty paraphrase or neighbourhood prompt")


# ---------------------------------------------------------------------------------------------------------
# Conflicting counterparts


def _counterpart(request: EditRequest, target: str) -> EditRequest:
    """A': same subject, prompt and relation as A, another new object."""
    return replace(
        request,
        case_id=f"{request.case_id}:conflict",
        target_new=target,
        extra={"conflict_of": request.case_id, "conflict_object": request.target_new},
    )


def conflict_pairs(requests: Sequence[EditRequest]) -> list[tuple[EditRequest, EditRequest]]:
    """(A, A') for requests carrying extra["conflict_object"] (the "conflict" dataset)."""
    pairs = []
    for request in requests:
        if not request.extra.get("conflict_object"):
            raise DataError(f"request {request.case_id} ({request.source}) has no extra['conflict_object']")
        pairs.append((request, _counterpart(request, request.extra["conflict_object"])))
    return pairs


def counterfact_conflicts(
    requests: Sequence[EditRequest], seed: int = 0, *, pool: Sequence[EditRequest] | None = None
) -> list[tuple[EditRequest, EditRequest]]:
    """(A, A') with A' = A but target_new = another record's target_new of the same relation.

    The object is drawn from `pool` (default: `requests`), excluding A's new and true objects, with an RNG
    seeded by (seed, case_id): a request's counterpart depends on the seed and the pool, not on order.
    """
    objects = defaultdict(set)
    for other in pool if pool is not None else requests:
        objects[other.relation_id].add(other.target_new)
    pairs = []
    for request in requests:
        candidates = sorted(objects[request.relation_id] - {request.target_new, request.target_true})
        if request.relation_id is None or not candidates:
            raise DataError(
                f"request {request.case_id}: no other new object of relation {request.relation_id!r} to conflict with"
            )
        target = random.Random(f"{seed}:{request.case_id}").choice(candidates)
        pairs.append((request, _counterpart(request, target)))
    return pairs


# ---------------------------------------------------------------------------------------------------------
# Splitting over clients and rounds


def partition(
    requests: Sequence[EditRequest],
    num_clients: int,
    *,
    mode: str = "contiguous",
    seed: int = 0,
    allow_uneven: bool = False,
) -> list[list[EditRequest]]:
    """Client i gets the i-th contiguous block (the paper's split); "random" permutes with `seed` first.

    Blocks must be equal unless `allow_uneven`, which gives the first len % num_clients clients one more.
    """
    if mode not in ("contiguous", "random"):
        raise DataError(f"mode must be 'contiguous' or 'random', got {mode!r}")
    if num_clients < 1 or len(requests) < num_clients:
        raise DataError(f"cannot split {len(requests)} requests over {num_clients} clients")
    items = list(requests)
    if mode == "random":
        random.Random(seed).shuffle(items)
    size, rest = divmod(len(items), num_clients)
    if rest and not allow_uneven:
        raise DataError(
            f"{len(items)} requests do not split evenly over {num_clients} clients; pass allow_uneven=True "
            f"to give the first {rest} clients one more"
        )
    blocks, start = [], 0
    for i in range(num_clients):
        end = start + size + (i < rest)
        blocks.append(items[start:end])
        start = end
    return blocks


def chunks(requests: Sequence[EditRequest], size: int, *, allow_partial: bool = False) -> list[list[EditRequest]]:
    """Consecutive chunks of `size` requests: round r of multi-round editing takes chunk r.

    A shorter last chunk raises unless `allow_partial` (rounds of unequal size skew per-round comparisons).
    """
    if size < 1:
        raise DataError(f"chunk size must be >= 1, got {size}")
    if len(requests) % size and not allow_partial:
        raise DataError(f"{len(requests)} requests do not fill chunks of {size}; pass allow_partial=True")
    return [list(requests[i : i + size]) for i in range(0, len(requests), size)]


def dataset_options(name: str) -> dict:
    # zsRE records without a locality question cannot be scored for NA: MEMIT's eval file has
    # them all; the shared subset does not, so they are dropped with a logged count
    # (zsRE). In the conflict set 66 records name the same object twice: not conflicts, dropped
    # with a logged count as well.
    return {"zsre": {"skip_incomplete": True}, "conflict": {"skip_malformed": True}}.get(name, {})


# ---------------------------------------------------------------------------------------------------------
# Augmented requests (resolving a knowledge conflict, CollabEdit paper section 4.2.2)


def round_prompts(path: str | Path | None = None) -> dict[str, list[str]]:
    """Paraphrase templates per relation id: the CollabEdit repo's round_prompts.json (10 per relation of the
    conflict set). Default location: beside the "conflict" dataset file (`resolve_dataset`)."""
    import json

    file = Path(path) if path is not None else resolve_dataset("conflict").with_name("round_prompts.json")
    if not file.is_file():
        raise DataError(f"{file}: no such file (round_prompts.json lies beside the conflict dataset)")
    prompts = json.loads(file.read_text())
    for relation, templates in prompts.items():
        for template in templates:
            if template.count("{}") != 1:
                raise DataError(f"{file}: relation {relation}: template {template!r} needs exactly one '{{}}'")
    return prompts


def augmented(request: EditRequest, templates: Sequence[str], k: int, seed: int = 0) -> list[EditRequest]:
    """`k` extra requests for the same fact on other prompts of its relation ("related prompts of the same
    fact"), drawn with an RNG seeded by (seed, case_id); the request's own prompt is never drawn."""
    candidates = sorted(set(templates) - {request.prompt})
    if k > len(candidates):
        raise DataError(f"request {request.case_id}: {k} augmentations asked, {len(candidates)} templates left")
    chosen = random.Random(f"{seed}:{request.case_id}").sample(candidates, k)
    return [
        replace(request, case_id=f"{request.case_id}:aug{i}", prompt=t, paraphrase_prompts=(),
                neighborhood_prompts=(), extra={**request.extra, "augments": request.case_id})
        for i, t in enumerate(chosen)
    ]
