"""Odd input must come back as issues, never as a crash of the validator."""

import copy
import json
import random

from datasets_app.formats import check_example
from tests.datasets.support import chat, function_calling_example, image_question, line, only_error, validate

ODD_VALUES = [
    None,
    0,
    2,
    1.5,
    True,
    "",
    "x",
    "assistant",
    "call_1",
    [],
    {},
    [1],
    {"a": 1},
    [{"type": "text"}],
    "data:image/png;base64,xx",
]
SEEDS = [
    chat("Hi", "Hello"),
    function_calling_example(),
    image_question("https://example.com/a.png"),
    {"prompt": "a", "completion": "b"},
    {"instruction": "a", "input": "b", "output": "c", "system": "d"},
    {
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
            {"from": "observation", "value": "r"},
            {"from": "gpt", "value": "a"},
        ]
    },
    {
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "a"}],
        "non_preferred_output": [{"role": "assistant", "content": "b"}],
    },
]


def _containers(value, found):
    if isinstance(value, (dict, list)):
        found.append(value)
        for child in value.values() if isinstance(value, dict) else value:
            _containers(child, found)
    return found


def test_it_turns_random_damage_into_issues():
    rng = random.Random(7)
    outcomes = set()
    for _ in range(3000):
        example = copy.deepcopy(rng.choice(SEEDS))
        target = rng.choice(_containers(example, []))
        key = rng.choice(list(target) if isinstance(target, dict) else range(len(target))) if target else None
        if key is not None:
            target[key] = copy.deepcopy(rng.choice(ODD_VALUES))

        checked = check_example(example)

        assert (checked.example is None) == bool(checked.errors)
        outcomes.add(bool(checked.errors))
    assert outcomes == {True, False}


def test_it_reports_json_nested_too_deeply():
    report, _ = validate(b"[" * 100_000 + b"]" * 100_000 + b"\n")

    assert str(only_error(report)) == "line 1: the JSON is nested too deeply to be an example"


def test_it_reports_a_number_too_long_to_read_on_its_line():
    huge = b'{"prompt": "a", "completion": "b", "id": ' + b"9" * 5000 + b"}\n"
    report, written = validate(line(chat("Hi", "Hello")) + huge + line(chat("Bye", "Goodbye")))

    error = only_error(report)
    assert (error.line, error.code) == (2, "invalid_json")
    assert error.message == "a number has more than 4,300 digits, too long to read; write it as a string"
    assert report.stats["lines"] == 3 and len(written) == 2


def test_it_writes_lone_surrogates_as_escapes():
    report, written = validate(b'{"prompt": "a\\ud800", "completion": "b"}\n')

    assert report.ok
    assert written == [{"messages": [{"role": "user", "content": "a\ud800"}, {"role": "assistant", "content": "b"}]}]
    assert json.loads(line(written[0])) == written[0]
