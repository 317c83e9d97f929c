"""Input records of any supported format -> one normalized row per prompt (or an error row with the reason).

Supported, detected per record (`fmt="auto"`) or forced:
* ``prompts``      {"id", "prompt" | "instruction" [+ "input"] | "question", ["draft" | "output" | "response"]}
                   — this covers AlpacaEval JSON (`instruction`/`output`) and plain prompt files;
* ``messages``     {"id", "messages": [{"role", "content"}, ...] ending with a user turn, ["draft"]};
* ``mt_bench``     FastChat question file {"question_id", "turns": [...], "category"}; drafts for every turn may
                   come from a FastChat answer file {"question_id", "choices": [{"turns": [...]}]}.
* ``hh_rlhf``      Anthropic HH-RLHF {"chosen", "rejected"}: the dialogue up to the last human turn is the
                   prompt; the chosen final answer is kept as the reference, the rejected one in meta.

A normalized row, with the Arrow schema `ROW_SCHEMA` (real lists and structs, never JSON text):
    id          string               the row's key (output, resume and seeding all use it)
    history     list<{role,content}> messages before the first turn (system prompt, earlier dialogue)
    turns       list<string>         the user turns to answer, in order (one for single-turn data)
    drafts      list<string> | null  base answers, one per turn; null = the draft stage must write them
    references  list<string>         reference answers per turn, when the input has them
    meta        struct               category, dataset, generator, rejected (null where absent)
    alignment   map<string, double>  the record's own alignment knobs ({vector: λ}; null where absent)
    error       string | null        why the row cannot be processed
"""
from __future__ import annotations

import json
import re

import pyarrow as pa

FORMATS = ("auto", "prompts", "messages", "mt_bench", "hh_rlhf")
ID_KEYS = ("id", "question_id")
PROMPT_KEYS = ("prompt", "instruction", "question")
DRAFT_KEYS = ("draft", "output", "response")
META_KEYS = ("category", "dataset", "generator", "rejected")
REFERENCE_KEYS = ("reference_output", "reference")
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
META = pa.struct([(k, pa.string()) for k in META_KEYS])
KNOBS = pa.map_(pa.string(), pa.float64())
ROW_SCHEMA = pa.schema([("id", pa.string()), ("history", pa.list_(MESSAGE)), ("turns", pa.list_(pa.string())),
                        ("drafts", pa.list_(pa.string())), ("references", pa.list_(pa.string())),
                        ("meta", META), ("alignment", KNOBS), ("error", pa.string())])


def plain_value(v):
    """A Parquet cell (as pandas gives it) as plain JSON-like Python: numpy arrays and scalars unwrapped,
    bytes decoded as UTF-8 (UnicodeDecodeError if they are not), a numeric column's missing value (NaN) None."""
    import numpy as np

    if isinstance(v, np.ndarray):
        return [plain_value(x) for x in v.tolist()]
    if isinstance(v, list):
        return [plain_value(x) for x in v]
    if isinstance(v, dict):
        return {k: plain_value(x) for k, x in v.items()}
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def error_row(row_id: str, reason: str) -> dict:
    return {"id": str(row_id), "history": [], "turns": [], "drafts": None, "references": [], "meta": {},
            "alignment": None, "error": reason}


def _str_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, str) for t in x)


def normalize(rec, fallback_id: str, fmt: str = "auto", id_key: str | None = None,
              drafts_by_key: dict | None = None) -> dict:
    """Normalize one parsed record; never raises for bad data (returns an error row instead)."""
    if not isinstance(rec, dict):
        return error_row(fallback_id, f"record is {type(rec).__name__}, not a JSON object")
    keys = (id_key,) if id_key else ID_KEYS
    rid = next((rec[k] for k in keys if rec.get(k) is not None), None)
    if id_key and rid is None:
        return error_row(fallback_id, f"missing id field {id_key!r}")
    rid = str(rid) if rid is not None else fallback_id
    try:
        if fmt == "hh_rlhf" or (fmt == "auto" and "chosen" in rec and "messages" not in rec):
            rec = hh_rlhf_record(rec)
        history, turns, drafts = _parse(rec, fmt if fmt != "hh_rlhf" else "messages")
    except ValueError as e:
        return error_row(rid, str(e))
    if drafts is None and drafts_by_key:
        drafts = drafts_by_key.get(rid) or drafts_by_key.get(turns[0])
    if drafts is not None:
        if not _str_list(drafts):
            return error_row(rid, "draft must be a string (or a list of strings, one per turn)")
        if len(drafts) < len(turns):
            return error_row(rid, f"{len(turns)} turns but only {len(drafts)} drafts")
        drafts = drafts[:len(turns)]
    meta = {k: str(rec[k]) for k in META_KEYS if isinstance(rec.get(k), (str, int, float))}
    ref = next((rec[k] for k in REFERENCE_KEYS if isinstance(rec.get(k), str) or _str_list(rec.get(k))), None)
    knobs = rec.get("alignment")
    if knobs is not None and not (isinstance(knobs, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
            and abs(v) != float("inf") for k, v in knobs.items())):
        return error_row(rid, "alignment must be an object of vector name -> finite number")
    return {"id": rid, "history": history, "turns": turns, "drafts": drafts,
            "references": [ref] if isinstance(ref, str) else list(ref or []), "meta": meta,
            "alignment": None if knobs is None else {k: float(v) for k, v in knobs.items()}, "error": None}


def _parse(rec: dict, fmt: str):
    if fmt == "auto":
        fmt = "messages" if "messages" in rec else "mt_bench" if "turns" in rec else "prompts"
    if fmt == "messages":
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("missing or empty 'messages'")
        from pipeline.prompts import check_messages

        check_messages(msgs)
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return msgs[:-1], [msgs[-1]["content"]], _draft_field(rec)
    if fmt == "mt_bench":
        turns = rec.get("turns")
        if not _str_list(turns) or not turns:
            raise ValueError("'turns' must be a non-empty list of strings")
        if any(not t.strip() for t in turns):
            raise ValueError("empty turn")
        drafts = None
        ch = rec.get("choices")
        if isinstance(ch, list) and ch and isinstance(ch[0], dict):
            drafts = ch[0].get("turns")
        return [], turns, drafts
    if fmt == "prompts":
        key = next((k for k in PROMPT_KEYS if k in rec), None)
        if key is None:
            raise ValueError(f"no prompt field (looked for {', '.join(PROMPT_KEYS)}, messages, turns)")
        prompt = rec[key]
        if not isinstance(prompt, str):
            raise ValueError(f"'{key}' must be a string")
        extra = rec.get("input")
        if isinstance(extra, str) and extra.strip():  # Alpaca-style instruction + input
            prompt = f"{prompt}\n\n{extra}"
        if not prompt.strip():
            raise ValueError("empty prompt")
        return [], [prompt], _draft_field(rec)
    raise ValueError(f"unknown input format {fmt!r}")


_HH_SPLIT = re.compile(r"\n\n(Human|Assistant): ")


def hh_dialogue(text: str) -> list[dict]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages."""
    if not isinstance(text, str):
        raise ValueError("HH-RLHF 'chosen'/'rejected' must be strings")
    parts = _HH_SPLIT.split("\n\n" + text.lstrip("\n"))
    msgs = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]
    if not msgs:
        raise ValueError("no 'Human:'/'Assistant:' turns in the HH-RLHF dialogue")
    return msgs


def hh_rlhf_record(rec: dict) -> dict:
    """{"chosen", "rejected"} -> {"messages" up to the last human turn, "reference": chosen answer, "rejected"}."""
    chosen, rejected = hh_dialogue(rec.get("chosen")), hh_dialogue(rec.get("rejected", ""))
    if chosen[-1]["role"] != "assistant" or len(chosen) < 2:
        raise ValueError("HH-RLHF 'chosen' must end with an assistant turn after a human turn")
    out = {k: v for k, v in rec.items() if k not in ("chosen", "rejected")}
    out.update(messages=chosen[:-1], reference=chosen[-1]["content"],
               rejected=rejected[-1]["content"] if rejected and rejected[-1]["role"] == "assistant" else "")
    return out


def _draft_field(rec: dict, keys=DRAFT_KEYS):
    for k in keys:
        if k in rec and rec[k] is not None:
            v = rec[k]
            return [v] if isinstance(v, str) else v
    return None


def parse_line(raw: bytes, n: int, source: str):
    """(record or None, fallback id, error reason or None) of line `n` (1-based) of a JSONL file."""
    fid = f"{source}:{n}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, fid, f"line {n} is not valid UTF-8 ({e.reason} at byte {e.start})"
    try:
        return json.loads(text), fid, None
    except json.JSONDecodeError as e:
        return None, fid, f"line {n} is not valid JSON: {e.msg}"


def parse_lines(data: bytes, source: str):
    """Yield (record or None, fallback id, error reason or None) for each non-blank line of a JSONL file."""
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some tools write
    for n, raw in enumerate(data.splitlines(), start=1):
        if raw.strip():
            yield parse_line(raw, n, source)


def parse_json_array(data: bytes, source: str):
    """Yield records of a JSON array file (AlpacaEval style); the index is the fallback id."""
    try:
        items = json.loads(data.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        yield None, f"{source}:0", f"file is not a valid UTF-8 JSON array: {e}"
        return
    if not isinstance(items, list):
        items = [items]
    for i, rec in enumerate(items):
        yield rec, str(i), None


def load_drafts(path: str, prefer: tuple = ()) -> dict:
    """Drafts from a separate file, keyed by id (FastChat answers, JSONL with id+draft) or by prompt text
    (AlpacaEval outputs JSON, which carries no ids). Fields in `prefer` win over the FastChat turns and
    the usual draft fields (the evaluation reads reference answers this way)."""
    with open(path, "rb") as f:
        return drafts_from(f.read(), path, prefer)


def drafts_from(data: bytes, path: str, prefer: tuple = ()) -> dict:
    """`load_drafts` of a file's bytes (`path`: its name, which says JSON array or JSON lines)."""
    parse = parse_json_array if path.endswith(".json") else parse_lines
    out = {}
    for rec, fid, err in parse(data, path):
        if err or not isinstance(rec, dict):
            raise ValueError(f"drafts file {path}: {err or 'record is not an object'}")
        drafts = _draft_field(rec, prefer)
        ch = rec.get("choices")
        if drafts is None and isinstance(ch, list) and ch and isinstance(ch[0], dict):
            drafts = ch[0].get("turns")
        if drafts is None:
            drafts = _draft_field(rec)
        if drafts is None:
            continue
        rid = next((rec[k] for k in ID_KEYS if rec.get(k) is not None), None)
        if rid is not None:
            out[str(rid)] = drafts
        if isinstance(rec.get("instruction"), str):
            out[rec["instruction"]] = drafts
    return out


def conversation(row: dict, turn: int, answers: list[str]) -> list[dict]:
    """Messages up to user turn `turn` (0-based), with `answers` as the assistant's earlier turns."""
    turns = row["turns"]
    msgs = [{"role": m["role"], "content": m["content"]} for m in row["history"]]
    for k in range(turn):
        msgs += [{"role": "user", "content": turns[k]}, {"role": "assistant", "content": answers[k]}]
    msgs.append({"role": "user", "content": turns[turn]})
    return msgs


# ---- the same, a block of simple records at once ------------------------------------------------------------------
# Columns `normalize_table` handles exactly as `normalize` does; a record with any of these fields has another
# format or more to check (messages, MT-bench turns, HH-RLHF, Alpaca input, its own knobs): per record
_OTHER_FORMATS = ("messages", "turns", "chosen", "input", "alignment", "question_id")


def _flat(col: pa.ChunkedArray) -> pa.Array:
    """One array of a column: its only chunk as it is (a block's columns have one), else the chunks joined."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def normalize_table(t: pa.Table, fmt: str = "auto", id_key: str | None = None) -> pa.Table | None:
    """The rows `normalize` gives for the records of `t` (a block of JSON records as Arrow infers them), computed
    column-wise, or None where that would not be exactly `normalize`'s result (another format, a field of another
    type, a missing id or prompt, an empty prompt): the caller then normalizes record by record. Covers the plain
    prompt files (id, prompt | instruction | question, draft | output | response, meta and reference fields),
    the bulk of large inputs."""
    import numpy as np
    import pyarrow.compute as pc

    if fmt not in ("auto", "prompts") or not t.num_rows:
        return None
    names = set(t.column_names)
    id_col = id_key or "id"
    if names & set(_OTHER_FORMATS) - {id_col} or id_col not in names:
        return None

    def strings(col: str) -> bool:
        return pa.types.is_string(t.schema.field(col).type) or pa.types.is_null(t.schema.field(col).type)

    ids = t.column(id_col)
    if ids.null_count or not (pa.types.is_string(ids.type) or pa.types.is_int64(ids.type)):
        return None
    prompt_keys = [k for k in PROMPT_KEYS if k in names]
    if len(prompt_keys) != 1 or not pa.types.is_string(t.schema.field(prompt_keys[0]).type):
        return None
    prompts = _flat(t.column(prompt_keys[0]))
    if prompts.null_count:
        return None  # a missing prompt: its error row comes from `normalize`
    # an empty prompt (as str.strip sees it): only prompts without a visible ASCII character are looked at in Python
    unsure = pc.invert(pc.match_substring_regex(prompts, "[!-~]"))
    if pc.any(unsure).as_py() and any(not p.strip() for p in prompts.filter(unsure).to_pylist()):
        return None
    if not all(strings(k) for k in DRAFT_KEYS + META_KEYS + REFERENCE_KEYS if k in names):
        return None
    n = t.num_rows

    def column(keys) -> pa.Array:  # the first non-null value of `keys` per record (normalize's order)
        cols = [_flat(t.column(k)).cast(pa.string()) for k in keys if k in names]
        return pa.nulls(n, pa.string()) if not cols else cols[0] if len(cols) == 1 else pc.coalesce(*cols)

    def lists(values: pa.Array, none_is_null: bool) -> pa.Array:  # [value] per record; null or [] without one
        valid = pc.is_valid(values)
        if none_is_null:  # a null list where the value is null (the values are not copied)
            return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), values,
                                            mask=pc.invert(valid))
        offsets = np.concatenate([[0], np.cumsum(valid.to_numpy(zero_copy_only=False))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), values.filter(valid))

    columns = {"id": _flat(ids).cast(pa.string()),
               "history": pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], MESSAGE)),
               "turns": lists(prompts, False), "drafts": lists(column(DRAFT_KEYS), True),
               "references": lists(column(REFERENCE_KEYS), False),
               "meta": pa.StructArray.from_arrays([column([k]) for k in META_KEYS], fields=list(META)),
               "alignment": pa.nulls(n, KNOBS), "error": pa.nulls(n, pa.string())}
    return pa.Table.from_arrays([columns[f.name] for f in ROW_SCHEMA], schema=ROW_SCHEMA)
