"""Read prompts with rubrics from the public formats and the project's own schema.

    rows = load_prompts(path, fmt="auto", drop_unsupported=False)

Each row becomes {prompt_id, messages, rubric, source} (the prompts table without
run_id / iteration). Formats (detected from the first row's fields when fmt="auto"):

- `ifeval` (IFEval and IFBench JSONL): {key, prompt, instruction_id_list, kwargs}. Each
  instruction becomes a verifiable item of that kind with its non-null kwargs and a
  description made from them. Ids without a registered check are listed by name and the
  import fails, unless drop_unsupported (then those items, and prompts left with none,
  are dropped and counted).
- `rar` (RaR JSON / JSONL): {question, rubric: [{title, description, weight}]}; judge items.
- `healthbench` (JSONL): {prompt_id, prompt: [messages], rubrics: [{criterion, points, tags}]};
  judge items weighted by points (negative points are pitfalls).
- `herl` (JSONL or Parquet): the prompts schema itself; kinds must be registered.

Besides one .jsonl / .json / .parquet file, `path` can be a Hugging Face `datasets` folder
(`Dataset.save_to_disk`; of a DatasetDict, the split `split`) or a glob of .jsonl / .json /
.parquet files (`data/train-*.parquet`), both read through `datasets`, offline.
`columns` ({field: column}) reads each field a format expects from a column of another
name, as TRL users map their data: {"prompt": "instruction"}.

Every error names the file, the line (or row) and the field; nothing is returned on error.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import NoReturn

import pyarrow as pa
import pyarrow.parquet as pq

# through herl.grading.rubric: importing it registers the built-in and IFEval checks
from herl.grading.rubric import CHECKS, JUDGE_KIND, check_params, describe_item, is_known_kind
from schemas.errors import UserError, read_utf8

FORMATS = ("auto", "herl", "ifeval", "rar", "healthbench")
# RaR's rubric-writing guide names categories; numbers are what its data uses
RAR_CATEGORY_WEIGHTS = {"essential": 5.0, "important": 3.0, "optional": 1.0, "pitfall": -1.0}


class PromptFileError(UserError, ValueError):
    """A prompts file row is invalid; the message names file, line or row, and field."""


def detect_format(row: dict) -> str:
    if "instruction_id_list" in row:
        return "ifeval"
    if "rubrics" in row and isinstance(row.get("prompt"), list):
        return "healthbench"
    if "question" in row and "rubric" in row:
        return "rar"
    if "prompt_id" in row and "rubric" in row:
        return "herl"
    raise ValueError("cannot tell the format from the fields " + ", ".join(sorted(row)[:12])
                     + "; expected IFEval/IFBench, RaR, HealthBench or the herl prompts schema")


def is_glob(path: str | Path) -> bool:
    """Whether a path's last part is a glob pattern (`data/train-*.parquet`)."""
    return any(ch in Path(path).name for ch in "*?[")


def read_records(path: Path, columns: dict[str, str] | None = None, split: str = "train") -> list[tuple[str, dict]]:
    """(where, record) pairs from .jsonl, .json (a list or one object per line) or .parquet,
    a `datasets` folder or a glob of such files, with `columns` renamed to their fields."""
    path = Path(path)
    if path.is_dir() or is_glob(path):
        records = _read_with_datasets(path, split)
    else:
        records = _read_file(path)
    return _rename(records, columns) if columns else records


def _rename(records: list[tuple[str, dict]], columns: dict[str, str]) -> list[tuple[str, dict]]:
    out = []
    for where, rec in records:
        if isinstance(rec, dict):
            missing = [c for c in columns.values() if c not in rec]
            if missing:
                raise PromptFileError(f"{where}: no column {missing[0]!r} (task.columns maps "
                                      f"{next(f for f, c in columns.items() if c == missing[0])!r} to it); "
                                      f"columns here: {', '.join(sorted(rec))}")
            rec = {**{k: v for k, v in rec.items() if k not in columns.values()},
                   **{field: rec[column] for field, column in columns.items()}}
        out.append((where, rec))
    return out


def _read_with_datasets(path: Path, split: str) -> list[tuple[str, dict]]:
    """A `save_to_disk` folder, or a glob of JSON Lines / JSON / Parquet files, through
    Hugging Face `datasets` (offline: nothing is downloaded)."""
    import os
    import tempfile

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError as exc:
        raise PromptFileError(f"{path}: reading a datasets folder or a glob of files needs the datasets package "
                              f"({exc}); pip install 'herl[datasets]'") from None
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise PromptFileError(f"{path}: not a folder written by datasets' save_to_disk ({exc})") from None
        where = str(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise PromptFileError(f"{path}: no split {split!r} (task.split); splits: {', '.join(ds)}")
            ds, where = ds[split], f"{path} split {split}"
    else:
        import glob

        files = sorted(glob.glob(str(path)))
        if not files:
            raise PromptFileError(f"{path}: no file matches")
        kinds = {Path(f).suffix for f in files}
        if len(kinds) != 1 or not kinds <= {".jsonl", ".json", ".parquet"}:
            raise PromptFileError(f"{path}: the files must all be .jsonl / .json or all .parquet, got {sorted(kinds)}")
        builder = "parquet" if kinds == {".parquet"} else "json"
        with tempfile.TemporaryDirectory() as cache:
            try:
                ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache, keep_in_memory=True)
            except Exception as exc:  # noqa: BLE001 (datasets raises many kinds for a bad file)
                raise PromptFileError(f"{path}: datasets cannot read these files ({type(exc).__name__}: {exc})") from None
        where = str(path)
    return [(f"{where} row {i}", r) for i, r in enumerate(ds.to_list())]


def _read_file(path: Path) -> list[tuple[str, dict]]:
    if not path.exists():
        raise PromptFileError(f"{path}: file not found")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise PromptFileError(f"{path}: not a readable Parquet file: {exc}") from None
        return [(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())]
    if path.suffix not in (".jsonl", ".json"):
        raise PromptFileError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")
    text = read_utf8(path, PromptFileError)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = _parse_json(text, str(path))
        if not isinstance(rows, list):
            raise PromptFileError(f"{path}: not valid JSON: a list of prompt objects was expected")
        for i, r in enumerate(rows):
            _check_size(len(json.dumps(r)), f"{path} item {i}")
        return [(f"{path} item {i}", r) for i, r in enumerate(rows)]
    out = []
    # JSON Lines are split on "\n" only: str.splitlines() would also split on U+2028 and
    # friends, which JSON strings may contain raw (HealthBench does)
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        _check_size(len(line), f"{path} line {i}")  # before parsing: a 200 MB row is refused, not built
        out.append((f"{path} line {i}", _parse_json(line, f"{path} line {i}")))
    return out


MAX_ROW_CHARS = 16 * 2**20  # a prompt row, rubric included: far above any real one, far below what exhausts memory


def _check_size(chars: int, where: str) -> None:
    if chars > MAX_ROW_CHARS:
        raise PromptFileError(f"{where}: the row is {chars / 2**20:.1f} M characters, more than the "
                              f"{MAX_ROW_CHARS // 2**20} M a prompt row may hold (prompt, messages and rubric together)")


def _parse_json(text: str, where: str):
    """json.loads with its failures as one line naming `where`: invalid JSON, or nesting so
    deep the parser's recursion gives out."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{where}: not valid JSON: {exc}") from None
    except RecursionError:
        raise PromptFileError(f"{where}: JSON nested too deeply to be a prompt row") from None


def _fail(where: str, field: str, msg: str) -> NoReturn:
    raise PromptFileError(f"{where}: field '{field}': {msg}")


def _item(item_id: str, description: str, weight: float, kind: str, params: dict) -> dict:
    return {"item_id": item_id, "description": description, "weight": float(weight), "kind": kind,
            "params": json.dumps(params, sort_keys=True)}


def _messages(value, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        _fail(where, field, "must be a non-empty list of {role, content}")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            _fail(where, f"{field}[{j}]", "must be an object with string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _number(value, where: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, field, f"must be a number, got {value!r}")
    if not math.isfinite(value):  # a NaN weight would silently zero the reward
        _fail(where, field, f"must be a finite number, got {value!r}")
    return float(value)


def from_ifeval(row: dict, where: str, source: str, drop_unsupported: bool, dropped: Counter) -> dict | None:
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        _fail(where, "prompt", "must be a non-empty string")
    ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        _fail(where, "instruction_id_list", "must be a list of instruction id strings")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        _fail(where, "kwargs", f"must be a list with one object per instruction ({len(ids)})")
    items = []
    for j, (iid, kw) in enumerate(zip(ids, kwargs)):
        if iid not in CHECKS:
            dropped[iid] += 1
            continue
        # IFBench writes counts as floats (N: 3.0); a whole number reads as an int, so
        # descriptions say "3 numbers" and positions index lists
        params = {k: int(v) if isinstance(v, float) and v.is_integer() else v
                  for k, v in (kw or {}).items() if v is not None}
        try:
            check_params(iid, params)
            description = describe_item(iid, params)
        except TypeError as exc:
            _fail(where, f"kwargs[{j}]", f"do not fit instruction {iid!r}: {exc}")
        items.append(_item(iid, description, 1.0, iid, params))
    if len(items) < len(ids) and not drop_unsupported:
        return None  # reported, all at once, by load_prompts
    if not items:
        return None
    return {"prompt_id": f"{source}-{row.get('key')}", "messages": [{"role": "user", "content": row["prompt"]}],
            "rubric": items, "source": source}


def from_rar(row: dict, where: str, index: int) -> dict:
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        _fail(where, "question", "must be a non-empty string")
    rubric = row.get("rubric")
    if not isinstance(rubric, list) or not rubric:
        _fail(where, "rubric", "must be a non-empty list of {title, description, weight}")
    items = []
    for j, it in enumerate(rubric):
        if not isinstance(it, dict) or not isinstance(it.get("description"), str):
            _fail(where, f"rubric[{j}].description", "must be a string")
        weight = it.get("weight", 1.0)
        if isinstance(weight, str) and weight.strip().lower() in RAR_CATEGORY_WEIGHTS:
            weight = RAR_CATEGORY_WEIGHTS[weight.strip().lower()]
        weight = _number(weight, where, f"rubric[{j}].weight")
        title = str(it.get("title") or f"item-{j}")
        items.append(_item(title, it["description"], weight, JUDGE_KIND, {}))
    pid = row.get("id") or row.get("prompt_id") or f"rar-{index}"
    return {"prompt_id": str(pid), "messages": [{"role": "user", "content": row["question"]}],
            "rubric": items, "source": "rar"}


def from_healthbench(row: dict, where: str) -> dict:
    if not isinstance(row.get("prompt_id"), str) or not row["prompt_id"]:
        _fail(where, "prompt_id", "must be a non-empty string")
    messages = _messages(row.get("prompt"), where, "prompt")
    rubrics = row.get("rubrics")
    if not isinstance(rubrics, list) or not rubrics:
        _fail(where, "rubrics", "must be a non-empty list of {criterion, points, tags}")
    items = []
    for j, it in enumerate(rubrics):
        if not isinstance(it, dict) or not isinstance(it.get("criterion"), str) or not it["criterion"].strip():
            _fail(where, f"rubrics[{j}].criterion", "must be a non-empty string")
        points = _number(it.get("points"), where, f"rubrics[{j}].points")
        items.append(_item(f"c{j}", it["criterion"], points, JUDGE_KIND, {"tags": it.get("tags") or []}))
    return {"prompt_id": row["prompt_id"], "messages": messages, "rubric": items, "source": "healthbench"}


def from_herl(row: dict, where: str) -> dict:
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("prompt_id"), str) or not row["prompt_id"]:
        _fail(where, "prompt_id", "must be a non-empty string")
    messages = _messages(row.get("messages"), where, "messages")
    rubric = row.get("rubric")
    if not isinstance(rubric, list) or not rubric:
        _fail(where, "rubric", "must be a non-empty list of rubric items")
    items = []
    for j, it in enumerate(rubric):
        if not isinstance(it, dict):
            _fail(where, f"rubric[{j}]", "must be an object")
        for key in ("item_id", "kind"):
            if not isinstance(it.get(key), str) or not it[key]:
                _fail(where, f"rubric[{j}].{key}", "must be a non-empty string")
        if not is_known_kind(it["kind"]):
            _fail(where, f"rubric[{j}].kind", f"unknown kind {it['kind']!r}; registered: {JUDGE_KIND} and "
                  + ", ".join(sorted(CHECKS)))
        weight = _number(it.get("weight", 1.0), where, f"rubric[{j}].weight")
        params = it.get("params") or {}
        if isinstance(params, str):
            try:
                params = json.loads(params)
            except json.JSONDecodeError as exc:
                _fail(where, f"rubric[{j}].params", f"is not valid JSON: {exc}")
            except RecursionError:
                _fail(where, f"rubric[{j}].params", "is JSON nested too deeply")
        if not isinstance(params, dict):
            _fail(where, f"rubric[{j}].params", "must be an object")
        try:  # params must fit the check even when the item brings its own description
            check_params(it["kind"], params)
        except TypeError as exc:
            _fail(where, f"rubric[{j}].params", f"do not fit kind {it['kind']!r}: {exc}")
        description = it.get("description")
        if not isinstance(description, (str, type(None))):
            _fail(where, f"rubric[{j}].description", "must be a string")
        description = description or describe_item(it["kind"], params)
        items.append(_item(it["item_id"], description, weight, it["kind"], params))
    return {"prompt_id": row["prompt_id"], "messages": messages, "rubric": items, "source": str(row.get("source") or "")}


def convert(records: list[tuple[str, dict]], path: Path, fmt: str = "auto",
            drop_unsupported: bool = False) -> tuple[list[dict | None], dict]:
    """Convert (where, record) pairs; returns (prompt rows aligned with records or None
    where dropped, report). Raises PromptFileError on the first bad record."""
    if fmt not in FORMATS:
        raise PromptFileError(f"{path}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not records:
        raise PromptFileError(f"{path}: no records")
    if fmt == "auto":
        where, first = records[0]
        if not isinstance(first, dict):
            raise PromptFileError(f"{where}: expected a JSON object")
        try:
            fmt = detect_format(first)
        except ValueError as exc:
            raise PromptFileError(f"{where}: {exc}") from None
    source = "ifbench" if "ifbench" in path.name.lower() else "ifeval"
    dropped: Counter = Counter()
    rows: list[dict | None] = []
    for i, (where, rec) in enumerate(records):
        if not isinstance(rec, dict):
            raise PromptFileError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if fmt == "ifeval":
            rows.append(from_ifeval(rec, where, source, drop_unsupported, dropped))
        elif fmt == "rar":
            rows.append(from_rar(rec, where, i))
        elif fmt == "healthbench":
            rows.append(from_healthbench(rec, where))
        else:
            rows.append(from_herl(rec, where))
    if dropped and not drop_unsupported:
        names = ", ".join(f"{k} ({n})" for k, n in sorted(dropped.items()))
        raise PromptFileError(f"{path}: {len(dropped)} instruction ids have no registered check: {names}. "
                              "Register checks for them, or import with drop_unsupported to skip those items")
    seen: dict[str, str] = {}
    for (where, _), row in zip(records, rows):
        if row is None:
            continue
        if row["prompt_id"] in seen:
            _fail(where, "prompt_id", f"duplicate {row['prompt_id']!r} (first at {seen[row['prompt_id']]})")
        seen[row["prompt_id"]] = where
        row["source"] = row["source"] or str(path)
    report = {"format": fmt, "records": len(records), "prompts": sum(r is not None for r in rows),
              "dropped_items": dict(dropped), "dropped_prompts": sum(r is None for r in rows)}
    return rows, report


# prompt files shipped with herl, by the name a config gives them
BUILTIN_FILES = {"builtin:ifeval": Path(__file__).resolve().parent / "builtin" / "ifeval.jsonl"}
"""builtin:ifeval: IFEval's 541 prompts (Apache-2.0; herl/data/builtin/IFEVAL_LICENSE.md)."""


def source_path(source: str | Path) -> Path:
    """The file a prompts source names: a shipped one (BUILTIN_FILES) or the path itself."""
    return BUILTIN_FILES.get(str(source), Path(source))


def load_prompts(path: str | Path, fmt: str = "auto", drop_unsupported: bool = False,
                 columns: dict[str, str] | None = None, split: str = "train") -> list[dict]:
    """Read and validate a prompts file (or datasets folder, or glob) in any supported
    format; `builtin:ifeval` names IFEval's prompts, shipped with herl."""
    path = source_path(path)
    rows, _ = convert(read_records(path, columns, split), path, fmt, drop_unsupported)
    kept = [r for r in rows if r is not None]
    if not kept:
        raise PromptFileError(f"{path}: no prompts left to use")
    return kept
