import threading
import time

import pytest
import torch

from llm.serve.errors import ModelLoadError
from llm.serve.pool import ModelPool

from .helpers import chat, drain, paused

N_TOKENS = 24


def answer(pool, base_dir, adapter=None, **fields) -> str:
    request = chat(base_dir, adapter_path=str(adapter) if adapter else None, max_tokens=N_TOKENS, **fields)
    return pool.generate(request).content


def transformers_answer(model, base_dir, text="Hello there, how are you?") -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=N_TOKENS)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_it_loads_a_base_once_across_requests_and_adapters(pool, chatty_model_dir, adapters):
    for adapter in [None, adapters["a"], adapters["b"], None, adapters["a"]]:
        answer(pool, chatty_model_dir, adapter)
    stats = pool.stats()
    assert stats["base_loads"] == {str(chatty_model_dir.resolve()): 1}
    assert stats["adapter_loads"] == {str(adapters["a"].resolve()): 1, str(adapters["b"].resolve()): 1}


def test_it_answers_like_plain_transformers_and_peft(pool, chatty_model_dir, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(chatty_model_dir).eval()
    expected_base = transformers_answer(plain, chatty_model_dir)
    expected_a = transformers_answer(PeftModel.from_pretrained(plain, adapters["a"]).eval(), chatty_model_dir)
    assert len(expected_base.split()) > 5 and expected_base != expected_a

    assert answer(pool, chatty_model_dir) == expected_base
    assert answer(pool, chatty_model_dir, adapters["a"]) == expected_a
    # With an adapter loaded into the shared model, the base still answers as itself.
    assert answer(pool, chatty_model_dir) == expected_base


def test_it_switches_adapters_without_reloading_the_base(pool, chatty_model_dir, adapters):
    first = {name: answer(pool, chatty_model_dir, adapters[name]) for name in "ab"}
    again = {name: answer(pool, chatty_model_dir, adapters[name]) for name in "ba"}
    assert first == again
    assert len({first["a"], first["b"], answer(pool, chatty_model_dir)}) == 3
    assert sum(pool.stats()["base_loads"].values()) == 1
    assert sum(pool.stats()["adapter_loads"].values()) == 2


def test_it_evicts_the_least_recently_used_adapter(chatty_model_dir, adapters):
    pool = ModelPool(device="cpu", dtype="float32", max_adapters=2)
    a, b, c = (str(adapters[name].resolve()) for name in "abc")
    expected_a = answer(pool, chatty_model_dir, a)
    answer(pool, chatty_model_dir, b)
    answer(pool, chatty_model_dir, a)  # a is now the most recent, b the least
    answer(pool, chatty_model_dir, c)
    base_key = str(chatty_model_dir.resolve())
    assert pool.stats()["adapters"][base_key] == [a, c]
    assert pool.stats()["adapter_evictions"] == 1

    answer(pool, chatty_model_dir, b)  # b comes back, evicting a
    assert pool.stats()["adapters"][base_key] == [c, b]
    assert pool.stats()["adapter_loads"] == {a: 1, b: 2, c: 1}
    assert answer(pool, chatty_model_dir, a) == expected_a
    assert pool.stats()["base_loads"] == {base_key: 1}
    pool.close()


def test_it_can_keep_a_single_adapter(chatty_model_dir, adapters):
    pool = ModelPool(device="cpu", dtype="float32", max_adapters=1)
    expected = {name: answer(pool, chatty_model_dir, adapters[name]) for name in "ab"}
    assert answer(pool, chatty_model_dir, adapters["a"]) == expected["a"]
    assert pool.stats()["adapter_evictions"] == 2
    pool.close()


def test_it_loads_once_when_threads_ask_together(pool, chatty_model_dir):
    start = threading.Barrier(3)
    counts = []

    def ask():
        start.wait()
        counts.append(pool.count_prompt_tokens(str(chatty_model_dir), [{"role": "user", "content": "hi"}]))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(counts) == 3 and len(set(counts)) == 1
    assert pool.stats()["base_loads"] == {str(chatty_model_dir.resolve()): 1}


def test_it_answers_threads_with_different_adapters_correctly(pool, chatty_model_dir, adapters):
    expected = {name: answer(pool, chatty_model_dir, adapters[name]) for name in "ab"}
    start = threading.Barrier(2)
    results = {"a": [], "b": []}

    def ask(name):
        start.wait()
        for _ in range(3):
            pieces, completion = drain(
                pool.generate_stream(chat(chatty_model_dir, adapter_path=str(adapters[name]), max_tokens=N_TOKENS))
            )
            results[name].append("".join(pieces))

    threads = [threading.Thread(target=ask, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {"a": [expected["a"]] * 3, "b": [expected["b"]] * 3}


def test_streams_on_one_base_take_turns_token_by_token(pool, chatty_model_dir, adapters):
    """Side-by-side panes: base, fine-tuned and another adapter all stream at once, each still right."""
    expected = {name: answer(pool, chatty_model_dir, adapters.get(name)) for name in ("base", "a", "b")}
    paused = pool.generate_stream(chat(chatty_model_dir, adapter_path=str(adapters["a"]), max_tokens=N_TOKENS))
    first = next(paused)  # this stream is now suspended between two of its tokens

    # Another stream on the same base (a different adapter) runs to the end meanwhile.
    finished = []
    other = threading.Thread(target=lambda: finished.append(answer(pool, chatty_model_dir, adapters["b"])))
    other.start()
    other.join(timeout=60)
    assert finished == [expected["b"]]
    pieces, _ = drain(paused)
    assert first + "".join(pieces) == expected["a"]

    # Three threads at once: the order pieces arrive in shows them interleaved.
    order, texts, start = [], {}, threading.Barrier(3)

    def ask(name):
        start.wait()
        adapter = adapters.get(name)
        text = ""
        for event in pool.generate_stream(
            chat(chatty_model_dir, adapter_path=str(adapter) if adapter else None, max_tokens=N_TOKENS)
        ):
            if isinstance(event, str):
                order.append(name)
                text += event
        texts[name] = text

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("base", "a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert texts == expected
    first_done = min(max(i for i, name in enumerate(order) if name == who) for who in ("base", "a", "b"))
    assert set(order[:first_done]) == {"base", "a", "b"}, order  # every pane had text before any finished


def test_it_releases_the_model_when_a_stream_is_closed_early(pool, chatty_model_dir):
    stream = pool.generate_stream(chat(chatty_model_dir, max_tokens=500))
    assert isinstance(next(stream), str)
    assert pool.is_busy(str(chatty_model_dir))
    stream.close()
    deadline = time.monotonic() + 10
    while pool.is_busy(str(chatty_model_dir)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pool.is_busy(str(chatty_model_dir))

    finished = []
    other = threading.Thread(target=lambda: finished.append(pool.generate(chat(chatty_model_dir, max_tokens=4))))
    other.start()
    other.join(timeout=30)
    assert finished and finished[0].completion_tokens == 4


def test_it_unloads_and_loads_again_on_demand(pool, chatty_model_dir, adapters):
    expected = answer(pool, chatty_model_dir, adapters["a"])
    assert pool.unload(str(chatty_model_dir))
    assert pool.stats()["bases"] == [] and not pool.unload(str(chatty_model_dir))
    assert answer(pool, chatty_model_dir, adapters["a"]) == expected
    assert pool.stats()["base_loads"] == {str(chatty_model_dir.resolve()): 2}


def test_it_says_clearly_when_a_model_or_adapter_is_missing_and_keeps_where_for_the_log(
    pool, chatty_model_dir, tmp_path
):
    with pytest.raises(ModelLoadError, match="the model's files are missing") as missing:
        pool.generate_stream(chat(tmp_path))
    assert str(tmp_path) not in str(missing.value) and f"no model at {tmp_path}" in missing.value.detail
    with pytest.raises(ModelLoadError, match="adapter is missing") as no_adapter:
        pool.generate_stream(chat(chatty_model_dir, adapter_path=str(tmp_path)))
    assert str(tmp_path) not in str(no_adapter.value) and "no adapter at" in no_adapter.value.detail


def test_past_max_bases_the_least_recently_used_idle_base_is_unloaded(chatty_model_dir, tiny_model_dir):
    pool = ModelPool(device="cpu", dtype="float32", max_bases=1)
    chatty, tiny = str(chatty_model_dir.resolve()), str(tiny_model_dir.resolve())
    busy = pool.generate_stream(chat(chatty_model_dir, max_tokens=400))
    next(busy)  # a stream is generating on the chatty base
    with paused(pool._base(chatty).model):  # ... and still is
        pool.generate(chat(tiny_model_dir, max_tokens=2))
        assert pool.stats()["bases"] == sorted([chatty, tiny])  # in use: kept, even past the limit
    busy.close()
    pool.generate(chat(chatty_model_dir, max_tokens=2))
    assert pool.stats()["bases"] == [chatty]  # tiny was idle and least recently used
    pool.generate(chat(tiny_model_dir, max_tokens=2))
    assert pool.stats()["bases"] == [tiny]
    assert pool.stats()["base_loads"] == {chatty: 1, tiny: 2}
