"""Each format's validator: every bad row is reported with its line and what to fix."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, get_args

import pytest

from kubetune.api.finetunejob import FORMATS_BY_STAGE, DatasetFormat
from kubetune.api.preferencedataset import FORMAT_BY_SCHEMA
from kubetune_trainer.data import FORMATS, DataError, RowError, ValidationReport, load_rows, validate


def jsonl(tmp_path: Path, *rows: Any, name: str = "data.jsonl") -> str:
    """Write rows (dicts, or raw strings written as they are) one a line; return the path."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def errors(report: ValidationReport) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for e in report.errors:
        out.setdefault(e.line, []).append(e.reason)
    return out


def only_error(tmp_path: Path, fmt: str, row: Any, good: dict[str, Any]) -> str:
    """The single problem of `row`, placed on line 2 between two good rows."""
    report = validate(jsonl(tmp_path, good, row, good), fmt)
    assert (report.rows, report.valid_rows) == (3, 2)
    assert [e.line for e in report.errors] == [2], report.errors
    return report.errors[0].reason


USER = {"role": "user", "content": "What is the weather in Paris?"}
ASSISTANT = {"role": "assistant", "content": "Sunny."}
GOOD_CHAT = {"messages": [USER, ASSISTANT]}


def call(arguments: Any, id: str = "call_1") -> dict[str, Any]:
    return {"id": id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def test_every_dataset_format_of_the_api_has_a_validator() -> None:
    assert set(FORMATS) == set(get_args(DatasetFormat))
    assert {f for formats in FORMATS_BY_STAGE.values() for f in formats} <= set(FORMATS)
    assert set(FORMAT_BY_SCHEMA.values()) <= set(FORMATS)


def test_invalid_json_is_reported_on_its_line_and_blank_lines_keep_numbering(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"text": "one"}, "", '{"text": "two",}', {"text": "three"}, '{"text": ')
    report = validate(path, "text")
    assert (report.rows, report.valid_rows) == (4, 2)
    found = errors(report)
    assert sorted(found) == [3, 5]
    assert found[3][0].startswith("not valid JSON (") and "one JSON object per line" in found[3][0]


def test_missing_key_wrong_type_null_and_empty(tmp_path: Path) -> None:
    good = {"prompt": "2+2=", "completion": "4"}
    path = jsonl(
        tmp_path,
        good,
        {"prompt": "2+2="},
        {"prompt": 4, "completion": "4"},
        {"prompt": "2+2=", "completion": "   "},
        {"prompt": None, "completion": "4"},
        ["not", "an", "object"],
    )
    found = errors(validate(path, "promptCompletion"))
    assert found == {
        2: ['missing "completion"; add it, or map your column to it with columns: {completion: yourColumn}'],
        3: ['"prompt" must be a string, got a number'],
        4: ['"completion" is empty; write the completion or drop the row'],
        5: ['"prompt" is null; give it a value or drop the row'],
        6: ['row must be a JSON object with "prompt", "completion", got a list'],
    }


def test_text_format(tmp_path: Path) -> None:
    assert only_error(tmp_path, "text", {"text": ""}, {"text": "a"}) == '"text" is empty; write the text or drop the row'
    assert only_error(tmp_path, "text", {"body": "a"}, {"text": "a"}).startswith('missing "text"')


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([{"role": "bot", "content": "hi"}, ASSISTANT],
         'turn 1 has unknown role "bot"; use system, user, assistant or tool'),
        ([USER], "conversation ends with a user turn; end it with the assistant's reply to train on"),
        ([USER, ASSISTANT, {"role": "user", "content": "And tomorrow?"}],
         "conversation ends with a user turn; end it with the assistant's reply to train on"),
        ([USER, {"role": "assistant", "content": ""}], "turn 2 (assistant) has empty content; write the message text or drop the turn"),
        ([USER, {"role": "assistant"}], "turn 2 (assistant) has no content; write the message text"),
        ([USER, {"role": "assistant", "content": ["Sunny."]}], "turn 2 (assistant) content must be a string, got a list"),
        ([{"content": "hi"}, ASSISTANT], "turn 1 has no role; set it to system, user, assistant or tool"),
        ([ASSISTANT, USER, ASSISTANT], "turn 1 is assistant; start with a user turn (after an optional system turn)"),
        ([USER, {"role": "system", "content": "Be brief."}, ASSISTANT],
         "turn 2 is a system turn; only the first turn may be the system message"),
        ([], "\"messages\" is empty; give a user turn and the assistant's reply"),
        ("hi", '"messages" must be a list of messages, got a string'),
        ([USER, "Sunny."], "turn 2 must be an object with role and content, got a string"),
    ],
)
def test_messages_rows(tmp_path: Path, messages: Any, reason: str) -> None:
    assert only_error(tmp_path, "messages", {"messages": messages}, GOOD_CHAT) == reason


def test_messages_with_tool_calls_are_valid_and_canonical(tmp_path: Path) -> None:
    row = {"messages": [
        {"role": "system", "content": "You can look up the weather."},
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call('{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 21 C"},
        {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Lyon"}}]},
        {"role": "tool", "content": "rain"},
        ASSISTANT,
    ], "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}
    path = jsonl(tmp_path, row)
    assert validate(path, "messages").ok
    (loaded,) = load_rows(path, "messages")
    turns = loaded["messages"]
    assert turns[2] == {"role": "assistant", "content": "",
                        "tool_calls": [{"type": "function", "id": "call_1",
                                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert turns[4]["tool_calls"] == [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}]
    assert loaded["tools"] == row["tools"]


@pytest.mark.parametrize(
    "turns, reason",
    [
        ([USER, {"role": "assistant", "content": "", "tool_calls": [call('{"city": "Paris"')]}, ASSISTANT],
         "turn 2 tool call 1 (get_weather) arguments are not JSON (Expecting ',' delimiter at column 17); "
         "write them as a JSON object, or a string holding one"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [call('["Paris"]')]}, ASSISTANT],
         "turn 2 tool call 1 (get_weather) arguments must be a JSON object, got a list"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [call(None)]}, ASSISTANT],
         "turn 2 tool call 1 (get_weather) has no arguments; give a JSON object ({} when the function takes none)"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
          ASSISTANT],
         "turn 2 tool call 1 has no function name; set function.name"),
        ([USER, {"role": "tool", "content": "sunny"}, ASSISTANT],
         "turn 2 (tool) does not follow an assistant turn with tool_calls; put each tool result right after the call"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [call("{}", id="a")]},
          {"role": "tool", "tool_call_id": "b", "content": "sunny"}, ASSISTANT],
         'turn 3 (tool) answers tool_call_id "b", which no call before it has; use the id of the call it answers'),
        ([{"role": "user", "content": "hi", "tool_calls": [call("{}")]}, ASSISTANT],
         "turn 1 (user) has tool_calls; only assistant turns call tools"),
    ],
)
def test_tool_call_rows(tmp_path: Path, turns: list[Any], reason: str) -> None:
    assert only_error(tmp_path, "messages", {"messages": turns}, GOOD_CHAT) == reason


def test_preference_rows(tmp_path: Path) -> None:
    good = {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}
    path = jsonl(
        tmp_path,
        good,
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Paris "},
        {"prompt": "Capital of France?", "chosen": "Paris"},
        {"prompt": "Capital of France?", "chosen": "", "rejected": "Lyon"},
        {"prompt": "Capital of France?", "chosen": [{"role": "assistant", "content": "Paris"}], "rejected": "Lyon"},
    )
    report = validate(path, "preference")
    assert report.format_text().splitlines()[1:] == [
        "line 2: chosen equals rejected; make the rejected answer differ",
        'line 3: missing "rejected"; add it, or map your column to it with columns: {rejected: yourColumn}',
        'line 4: "chosen" is empty; write the chosen or drop the row',
        "line 5: prompt, chosen, rejected mix text and message lists; give them all as text or all as message lists",
    ]
    assert report.valid_rows == 1


def test_conversational_preference(tmp_path: Path) -> None:
    good = {"prompt": [{"role": "system", "content": "Be brief."}, USER],
            "chosen": [{"role": "assistant", "content": "Sunny."}],
            "rejected": [{"role": "assistant", "content": "I do not know."}]}
    same = dict(good, rejected=good["chosen"])
    ends_with_answer = dict(good, prompt=[USER, ASSISTANT])
    user_in_answer = dict(good, chosen=[USER, ASSISTANT])
    found = errors(validate(jsonl(tmp_path, good, same, ends_with_answer, user_in_answer), "preference"))
    assert found == {
        2: ["chosen equals rejected; make the rejected answer differ"],
        3: ["prompt ends with an assistant turn; end it with the turn the answer replies to"],
        4: ["chosen turn 1 is a user turn; chosen holds only the assistant's reply (and the results of its tool calls)"],
    }
    (row,) = load_rows(jsonl(tmp_path, good, name="ok.jsonl"), "preference")
    assert row == good


def test_unpaired_preference_label_must_be_boolean(tmp_path: Path) -> None:
    good = {"prompt": "2+2=", "completion": "4", "label": True}
    for label, shown in (("yes", '"yes"'), (1, "1"), (None, None)):
        reason = only_error(tmp_path, "unpairedPreference", dict(good, label=label), good)
        if shown is None:
            assert reason == '"label" is null; give it a value or drop the row'
        else:
            assert reason == f'"label" must be true or false (is the completion desirable?), got {shown}'
    assert validate(jsonl(tmp_path, good, dict(good, label=False)), "unpairedPreference").ok


@pytest.mark.parametrize(
    "fmt, good, bad, reason",
    [
        ("imageLabel", {"image": "cats/1.png", "label": "cat"}, {"image": "cats/1.png", "label": True},
         '"label" must be a string or an integer class, got a boolean'),
        ("imageLabel", {"image": {"bytes": None, "path": "1.png"}, "label": 3}, {"image": {"bytes": None, "path": None}, "label": 3},
         '"image" has none of bytes, path; give a file path, or an object with one of them'),
        ("imageCaption", {"image": "1.png", "caption": "a cat"}, {"image": "1.png", "caption": " "},
         '"caption" is empty; write the caption or drop the row'),
        ("audioTranscript", {"audio": "a.wav", "text": "hello"}, {"audio": 7, "text": "hello"},
         '"audio" must be a file path or an object with bytes or path or array, got a number'),
        ("audio", {"audio": {"array": [0.0, 0.1] * 1000, "sampling_rate": 16000}}, {"sound": "a.wav"},
         'missing "audio"; add it, or map your column to it with columns: {audio: yourColumn}'),
    ],
)
def test_media_formats_are_checked_for_shape(tmp_path: Path, fmt: str, good: Any, bad: Any, reason: str) -> None:
    if fmt.startswith("image"):  # images are decoded too (test_data_images.py): the good rows' must exist
        from PIL import Image

        for name in ("cats/1.png", "1.png"):
            (tmp_path / name).parent.mkdir(exist_ok=True)
            Image.new("RGB", (4, 4)).save(tmp_path / name)
    if fmt.startswith("audio"):  # so are clips (test_data_audio.py)
        import numpy as np
        import soundfile

        soundfile.write(tmp_path / "a.wav", np.full(8000, 0.1, dtype=np.float32), 16000)
    assert only_error(tmp_path, fmt, bad, good) == reason


def test_report_lists_every_bad_row_counts_them_and_hashes_the_bytes(tmp_path: Path) -> None:
    rows = [{"text": "ok"} if i % 3 else {"text": ""} for i in range(1, 31)]
    path = jsonl(tmp_path, *rows)
    report = validate(path, "text")
    assert [e.line for e in report.errors] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert (report.rows, report.valid_rows, report.ok) == (30, 20, False)
    assert report.checksum == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    capped = validate(path, "text", max_errors=2)
    assert [e.line for e in capped.errors] == [3, 6] and capped.valid_rows == 20
    assert capped.format_text().splitlines()[-1] == "... and 8 more problems"
    as_dict = report.to_dict()
    assert set(as_dict) == {"rows", "validRows", "errors", "checksum"}
    assert as_dict["validRows"] == 20
    assert as_dict["errors"][0] == {"line": 3, "reason": '"text" is empty; write the text or drop the row'}
    assert report.format_text().splitlines()[1] == 'line 3: "text" is empty; write the text or drop the row'


def test_load_rows_raises_data_error_with_the_report(tmp_path: Path) -> None:
    path = jsonl(tmp_path, *[{"text": "ok"} if i % 2 else {"text": ""} for i in range(1, 31)])
    with pytest.raises(DataError) as caught:
        load_rows(path, "text")
    assert isinstance(caught.value, ValueError)
    assert caught.value.report.errors[0] == RowError(2, '"text" is empty; write the text or drop the row')
    message = str(caught.value)
    assert "(15 of 30 rows have problems)" in message
    assert "line 2: " in message and "line 20: " in message and "line 22: " not in message
    assert "... and 5 more problems" in message


def test_an_empty_file_is_not_valid(tmp_path: Path) -> None:
    report = validate(jsonl(tmp_path), "text")
    assert not report.ok and report.rows == 0
    assert report.format_text().splitlines()[1] == "source: no rows: the data set is empty"


def test_unknown_format_and_bad_columns_are_refused(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"text": "a"})
    with pytest.raises(ValueError, match="unknown dataset format 'chat'"):
        validate(path, "chat")
    with pytest.raises(ValueError, match="columns maps 'question', which the text format does not have"):
        validate(path, "text", columns={"question": "text"})
