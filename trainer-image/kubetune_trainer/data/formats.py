"""The dataset formats: which fields a row has, what is wrong with a row, and its canonical form.

    text                {"text": str}
    promptCompletion    {"prompt": str, "completion": str}
    messages            {"messages": [{"role": system|user|assistant|tool, "content": str, ...}],
                         "tools": [function schemas] (optional)}
    preference          {"prompt": str, "chosen": str, "rejected": str}
    unpairedPreference  {"prompt": str, "completion": str, "label": bool}
    imageLabel          {"image": path or {bytes|path}, "label": str or int}
    imageCaption        {"image": path or {bytes|path}, "caption": str, "label": str or int (optional: the
                         class, for zero-shot accuracy)}
    audioTranscript     {"audio": path or {bytes|path|array}, "text": str}
    audio               {"audio": path or {bytes|path|array}}

prompt, completion, chosen and rejected may also be message lists (TRL's conversational
form): the prompt starts with a user turn (after an optional system turn) and does not end
with an assistant turn; completion, chosen and rejected hold the assistant's reply. A row uses
text throughout or message lists throughout.

An assistant turn may call tools: `tool_calls: [{"type": "function", "id": ..., "function":
{"name": ..., "arguments": <JSON object, or a string holding one>}}]`; `tool` turns that follow
carry the results (`content`, optionally `tool_call_id` and `name`). The canonical form gives
arguments as an object, as chat templates expect, and drops null keys (Parquet fills them in).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.formats import FORMAT_FIELDS

from kubetune_trainer.data.readers import json_type

ROLES = ("system", "user", "assistant", "tool")
ROLE_LIST = "system, user, assistant or tool"

Problems = list[str]


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]
    check: Callable[[dict[str, Any]], Problems]
    optional: tuple[str, ...] = ()
    text_fields: tuple[str, ...] = ()  # the fields whose length in tokens token_stats reports

    @property
    def fields(self) -> tuple[str, ...]:
        return self.required + self.optional


# --- field checks (each looks only at a field that is present and not null) ---------------


def _text(row: dict[str, Any], key: str) -> Problems:
    value = row.get(key)
    if value is None:
        return []
    if not isinstance(value, str):
        return [f'"{key}" must be a string, got {json_type(value)}']
    if not value.strip():
        return [f'"{key}" is empty; write the {key} or drop the row']
    return []


def _media(row: dict[str, Any], key: str, keys: tuple[str, ...]) -> Problems:
    value = row.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [] if value.strip() else [f'"{key}" is empty; give the path of the {key} file']
    if isinstance(value, (bytes, bytearray)) and "bytes" in keys:  # a binary column (Parquet)
        return [] if value else [f'"{key}" holds no bytes; give the {key} file\'s bytes or its path']
    if isinstance(value, dict):
        if any(value.get(k) is not None for k in keys):
            return []
        return [f'"{key}" has none of {", ".join(keys)}; give a file path, or an object with one of them']
    return [f'"{key}" must be a file path or an object with {" or ".join(keys)}, got {json_type(value)}']


def _label(row: dict[str, Any]) -> Problems:
    value = row.get("label")
    if value is None:
        return []
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return [f'"label" must be a string or an integer class, got {json_type(value)}']
    if isinstance(value, str) and not value.strip():
        return ['"label" is empty; give the class name']
    return []


def _boolean_label(row: dict[str, Any]) -> Problems:
    value = row.get("label")
    if value is None or isinstance(value, bool):
        return []
    return [f'"label" must be true or false (is the completion desirable?), got {json.dumps(value, default=str)}']


def _tool_calls(calls: Any, where: str) -> tuple[set[str], Problems]:
    """The ids of the calls and the problems of an assistant turn's tool_calls."""
    if not isinstance(calls, list) or not calls:
        got = "an empty list" if isinstance(calls, list) else json_type(calls)
        return set(), [f"{where} tool_calls must be a list of calls, got {got}; drop tool_calls if it calls none"]
    ids: set[str] = set()
    out: Problems = []
    for j, call in enumerate(calls, 1):
        c = f"{where} tool call {j}"
        if not isinstance(call, dict):
            out.append(f'{c} must be an object like {{"type": "function", "function": {{"name": ..., "arguments": {{...}}}}}}, '
                       f"got {json_type(call)}")
            continue
        if call.get("type") not in (None, "function"):
            out.append(f'{c} has type {json.dumps(call["type"])}; only "function" calls are supported')
        if call.get("id") is not None:
            if isinstance(call["id"], str):
                ids.add(call["id"])
            else:
                out.append(f"{c} id must be a string, got {json_type(call['id'])}")
        fn = call.get("function", call)
        if not isinstance(fn, dict):
            out.append(f"{c} function must be an object with name and arguments, got {json_type(fn)}")
            continue
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            out.append(f"{c} has no function name; set function.name")
            name = "?"
        c = f"{c} ({name})"
        args = fn.get("arguments")
        if args is None:
            out.append(f"{c} has no arguments; give a JSON object ({{}} when the function takes none)")
        elif isinstance(args, str):
            try:
                parsed = json.loads(args)
            except json.JSONDecodeError as e:
                out.append(f"{c} arguments are not JSON ({e.msg} at column {e.colno}); "
                           "write them as a JSON object, or a string holding one")
                continue
            if not isinstance(parsed, dict):
                out.append(f"{c} arguments must be a JSON object, got {json_type(parsed)}")
        elif not isinstance(args, dict):
            out.append(f"{c} arguments must be a JSON object, got {json_type(args)}")
    return ids, out


def _turns(value: Any, key: str, kind: str) -> Problems:
    """Problems of a message list. kind: "conversation" (user first, ends with the assistant),
    "prompt" (user first, does not end with the assistant) or "answer" (the assistant's reply)."""
    if not isinstance(value, list):
        return [f'"{key}" must be a list of messages, got {json_type(value)}']
    if not value:
        need = {"conversation": "a user turn and the assistant's reply", "prompt": "the user turn",
                "answer": "the assistant's reply"}[kind]
        return [f'"{key}" is empty; give {need}']
    where = "" if key == "messages" else f"{key} "
    out: Problems = []
    roles: list[str | None] = []
    call_ids: set[str] | None = None  # calls a tool turn may answer; None when no call precedes it
    for i, turn in enumerate(value, 1):
        t = f"{where}turn {i}"
        role = turn.get("role") if isinstance(turn, dict) else None
        if not isinstance(turn, dict):
            out.append(f"{t} must be an object with role and content, got {json_type(turn)}")
        elif role is None:
            out.append(f"{t} has no role; set it to {ROLE_LIST}")
        elif role not in ROLES:
            out.append(f"{t} has unknown role {json.dumps(role)}; use {ROLE_LIST}")
        if not isinstance(turn, dict) or role not in ROLES:
            roles.append(None)
            call_ids = None
            continue
        roles.append(role)
        calls = turn.get("tool_calls")
        has_calls = calls is not None and role == "assistant"
        if calls is not None and role != "assistant":
            out.append(f"{t} ({role}) has tool_calls; only assistant turns call tools")
        content = turn.get("content")
        if content is None:
            if not has_calls:
                out.append(f"{t} ({role}) has no content; write the message text")
        elif not isinstance(content, str):
            out.append(f"{t} ({role}) content must be a string, got {json_type(content)}")
        elif not content.strip() and not has_calls:
            out.append(f"{t} ({role}) has empty content; write the message text or drop the turn")
        if role == "system" and i != 1:
            out.append(f"{t} is a system turn; only the first turn may be the system message")
        if has_calls:
            call_ids, problems = _tool_calls(calls, t)
            out += problems
        elif role == "tool":
            out += _tool_result(turn, t, call_ids)
        else:
            call_ids = None
    if None in roles:
        return out
    if kind == "answer":
        for i, role in enumerate(roles, 1):
            if role not in ("assistant", "tool") or (i == 1 and role != "assistant"):
                out.append(f"{where}turn {i} is a {role} turn; {key} holds only the assistant's reply "
                           "(and the results of its tool calls)")
        return out
    talk = [(i, r) for i, r in enumerate(roles, 1) if r != "system"]
    if not talk:
        out.append(f'"{key}" has only a system turn; add the user turn'
                   + (" and the assistant's reply" if kind == "conversation" else ""))
    elif talk[0][1] != "user":
        out.append(f"{where}turn {talk[0][0]} is {talk[0][1]}; start with a user turn (after an optional system turn)")
    elif kind == "conversation" and roles[-1] != "assistant":
        out.append(f"conversation ends with a {roles[-1]} turn; end it with the assistant's reply to train on")
    elif kind == "prompt" and roles[-1] == "assistant":
        out.append(f"{key} ends with an assistant turn; end it with the turn the answer replies to")
    return out


def _tool_result(turn: dict[str, Any], where: str, call_ids: set[str] | None) -> Problems:
    if call_ids is None:
        return [f"{where} (tool) does not follow an assistant turn with tool_calls; "
                "put each tool result right after the call"]
    out: Problems = []
    call_id = turn.get("tool_call_id")
    if call_id is not None:
        if not isinstance(call_id, str):
            out.append(f"{where} (tool) tool_call_id must be a string, got {json_type(call_id)}")
        elif call_ids and call_id not in call_ids:
            out.append(f"{where} (tool) answers tool_call_id {json.dumps(call_id)}, which no call before it has; "
                       "use the id of the call it answers")
    name = turn.get("name")
    if name is not None and not isinstance(name, str):
        out.append(f"{where} (tool) name must be a string, got {json_type(name)}")
    return out


def _text_or_turns(row: dict[str, Any], key: str, kind: str) -> Problems:
    value = row.get(key)
    if value is None:
        return []
    return _turns(value, key, kind) if isinstance(value, list) else _text(row, key)


def _same_shape(row: dict[str, Any], keys: tuple[str, ...]) -> Problems:
    shapes = {isinstance(row[k], list) for k in keys if row.get(k) is not None}
    if len(shapes) > 1:
        return [f"{', '.join(keys)} mix text and message lists; give them all as text or all as message lists"]
    return []


# --- the formats --------------------------------------------------------------------------


def _check_text(row: dict[str, Any]) -> Problems:
    return _text(row, "text")


def _check_prompt_completion(row: dict[str, Any]) -> Problems:
    return (_text_or_turns(row, "prompt", "prompt") + _text_or_turns(row, "completion", "answer")
            + _same_shape(row, ("prompt", "completion")))


def _check_messages(row: dict[str, Any]) -> Problems:
    out = _turns(row["messages"], "messages", "conversation") if row.get("messages") is not None else []
    tools = row.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        out.append(f'"tools" must be a list of function schemas (objects), got {json_type(tools)}')
    return out


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return bool(a == b)


def _check_preference(row: dict[str, Any]) -> Problems:
    out = (_text_or_turns(row, "prompt", "prompt") + _text_or_turns(row, "chosen", "answer")
           + _text_or_turns(row, "rejected", "answer") + _same_shape(row, ("prompt", "chosen", "rejected")))
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is not None and _equal(chosen, rejected):
        out.append("chosen equals rejected; make the rejected answer differ")
    return out


def _check_unpaired(row: dict[str, Any]) -> Problems:
    return _check_prompt_completion(row) + _boolean_label(row)


# The checks of each format; its required and optional fields come from kubetune.api.formats,
# the table `kubetune validate` reads too.
_CHECKS: dict[str, tuple[Callable[[dict[str, Any]], Problems], tuple[str, ...]]] = {
    "text": (_check_text, ("text",)),
    "promptCompletion": (_check_prompt_completion, ("prompt", "completion")),
    "messages": (_check_messages, ("messages",)),
    "preference": (_check_preference, ("prompt", "chosen", "rejected")),
    "unpairedPreference": (_check_unpaired, ("prompt", "completion")),
    "imageLabel": (lambda r: _media(r, "image", ("bytes", "path")) + _label(r), ()),
    "imageCaption": (lambda r: _media(r, "image", ("bytes", "path")) + _text(r, "caption") + _label(r), ("caption",)),
    "audioTranscript": (lambda r: _media(r, "audio", ("bytes", "path", "array")) + _text(r, "text"), ("text",)),
    "audio": (lambda r: _media(r, "audio", ("bytes", "path", "array")), ()),
}
FORMATS: dict[str, Format] = {
    name: Format(name, required, _CHECKS[name][0], optional=optional, text_fields=_CHECKS[name][1])
    for name, (required, optional) in FORMAT_FIELDS.items()
}

# Fields that hold lists or booleans, which a CSV cell can only hold as text.
_LIST_FIELDS = ("messages", "tools", "prompt", "completion", "chosen", "rejected")


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown dataset format {name!r}; use one of {', '.join(FORMATS)}") from None


def check_columns(fmt: Format, columns: Mapping[str, str] | None) -> None:
    """ValueError unless columns maps the format's own fields to column names."""
    for field, column in (columns or {}).items():
        if field not in fmt.fields:
            raise ValueError(f"columns maps {field!r}, which the {fmt.name} format does not have; "
                             f"its fields are {', '.join(fmt.fields)} (write {{field: yourColumn}})")
        if not isinstance(column, str) or not column:
            raise ValueError(f"columns.{field} must name a column of the data, got {column!r}")


def rename(row: Any, columns: Mapping[str, str] | None) -> Any:
    """Give each mapped field its value from the column it is mapped to, as {field: column} says."""
    if not columns or not isinstance(row, dict):
        return row
    out = {k: v for k, v in row.items() if k not in columns.values() and k not in columns}
    for field, column in columns.items():
        if column in row:
            out[field] = row[column]
    return out


def decode_untyped(row: dict[str, Any], fmt: Format) -> tuple[dict[str, Any], Problems]:
    """Decode a CSV row's text cells: a JSON list where the field may hold one, true/false labels."""
    row = dict(row)
    out: Problems = []
    for key in fmt.fields:
        value = row.get(key)
        if not isinstance(value, str):
            continue
        if key in _LIST_FIELDS and value.lstrip().startswith("["):
            try:
                row[key] = json.loads(value)
            except json.JSONDecodeError as e:
                if key in ("messages", "tools"):
                    out.append(f'"{key}" is not valid JSON ({e.msg} at column {e.colno}); write it as a JSON list')
        elif key == "label" and fmt.name == "unpairedPreference":
            row[key] = {"true": True, "1": True, "false": False, "0": False}.get(value.strip().lower(), value)
    return row, out


def problems(row: Any, fmt: Format, columns: Mapping[str, str] | None = None) -> Problems:
    """What is wrong with one row (already renamed and decoded), each with what to fix."""
    if not isinstance(row, dict):
        names = ", ".join(f'"{k}"' for k in fmt.required)
        return [f"row must be a JSON object with {names}, got {json_type(row)}"]
    out: Problems = []
    for key in fmt.required:
        if key in row and row[key] is not None:
            continue
        column = (columns or {}).get(key)
        if key in row:
            out.append(f'"{key}" is null; give it a value or drop the row')
        elif column:
            out.append(f'missing "{column}" (mapped to {key} by columns); check the column name')
        else:
            out.append(f'missing "{key}"; add it, or map your column to it with columns: {{{key}: yourColumn}}')
    return out + fmt.check(row)


# --- canonical rows -----------------------------------------------------------------------


def _canonical_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = call["function"] if isinstance(call.get("function"), dict) else call
    args = fn["arguments"]
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": fn["name"], "arguments": json.loads(args) if isinstance(args, str) else args},
    }
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def _canonical_turns(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for turn in turns:
        t = {k: v for k, v in turn.items() if v is not None}
        if "tool_calls" in t:
            t["tool_calls"] = [_canonical_call(c) for c in t["tool_calls"]]
            t.setdefault("content", "")
        out.append(t)
    return out


def canonical(row: dict[str, Any], fmt: Format) -> dict[str, Any]:
    """The row as recipes read it: only the format's fields; message lists cleaned up."""
    out: dict[str, Any] = {}
    for key in fmt.fields:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, list) and key != "tools":
            value = _canonical_turns(value)
        out[key] = value
    return out
