"""Request bodies: strict UTF-8 JSON, lone surrogates named by path, and no slow walks on the event loop."""

import asyncio
import json
import threading

import pytest

from finetune_site import jsonbody


def test_a_lone_surrogate_is_named_by_its_path():
    with pytest.raises(ValueError, match=r"a\[1\]\.b holds a lone UTF-16 surrogate \(\\ud800\)"):
        jsonbody.loads(b'{"a": [1, {"b": "\\ud800"}]}')


def test_a_valid_pair_in_a_big_body_is_not_walked_item_by_item(monkeypatch):
    walked = []
    monkeypatch.setattr(jsonbody, "_name_the_lone_surrogate", lambda value: walked.append(value))
    body = b'{"a": [' + b",".join([b'"x"'] * 200_000) + b'], "emoji": "\\ud83d\\ude00"}'
    assert jsonbody.loads(body)["emoji"] == "\U0001f600"
    assert walked == []


def test_a_large_body_is_parsed_off_the_event_loop():
    threads = []
    real = jsonbody.loads

    def spy(raw):
        threads.append(threading.current_thread())
        return real(raw)

    small, large = b'{"a": 1}', json.dumps({"a": "x" * (jsonbody.LOOP_SAFE_BYTES + 1)}).encode()

    async def parse_both():
        return await jsonbody.aloads(small), await jsonbody.aloads(large)

    original, jsonbody.loads = jsonbody.loads, spy
    try:
        parsed = asyncio.run(parse_both())
    finally:
        jsonbody.loads = original
    assert parsed[0] == {"a": 1} and len(parsed[1]["a"]) == jsonbody.LOOP_SAFE_BYTES + 1
    assert threads[0] is threading.main_thread() and threads[1] is not threading.main_thread()
