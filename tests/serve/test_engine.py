"""The continuous-batching engine: batched answers equal lone ones, rows join and leave at every step.

These run the real engine loop on the chatty tiny model in float32. A forward
hook on the model records the shape of every pass, which shows what ran
together without reaching into the engine.
"""

import asyncio
import threading
import time

import pytest
import torch

from llm.serve.errors import InvalidRequest, Overloaded, ServingError
from llm.serve.pool import ModelPool
from llm.serve.schema import Completion

from .helpers import chat, drain, make_lora_adapter, paused

PROMPTS = [
    "Hi",
    "Tell me everything you know about the history of the printing press in Europe and Asia.",
    "What is two plus two?",
    "Write a short poem about autumn leaves falling on a quiet river at dusk.",
    "你好，今天天气怎么样？",
    "List three colours.",
]


@pytest.fixture
def passes(pool, chatty_model_dir):
    """Every forward pass's input shape (rows, tokens), in order, once the base is loaded."""
    pool.preload(str(chatty_model_dir))
    shapes: list[tuple[int, int]] = []
    model = pool._base(str(chatty_model_dir)).model
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    yield shapes
    handle.remove()


def mixed_requests(base_dir, adapters):
    """Different prompt lengths, adapters (and none), max_tokens and stop rules."""
    adapter_cycle = [None, adapters["a"], adapters["b"], None, adapters["c"], adapters["a"]]
    requests = []
    for i, (text, adapter) in enumerate(zip(PROMPTS, adapter_cycle, strict=True)):
        requests.append(
            chat(
                base_dir,
                text,
                adapter_path=str(adapter) if adapter else None,
                max_tokens=8 + 5 * i,
                stop=["e"] if i == 3 else None,
            )
        )
    return requests


def run_together(pool, requests, base_dir):
    """Queue every request before the engine's next pass, then read them all at once: one batch.

    The engine starts on the first request at once; holding its first pass until
    all are queued keeps the test from depending on how fast the machine renders
    prompts.
    """
    with paused(pool._base(str(base_dir)).model):
        streams = [pool.generate_stream(request) for request in requests]
    results = [None] * len(streams)

    def read(i):
        results[i] = drain(streams[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_a_mixed_batch_answers_token_for_token_as_each_request_alone(pool, chatty_model_dir, adapters, passes):
    requests = mixed_requests(chatty_model_dir, adapters)
    alone = [drain(pool.generate_stream(request)) for request in requests]
    assert max(rows for rows, _ in passes) == 1  # alone really was alone
    passes.clear()

    together = run_together(pool, requests, chatty_model_dir)

    assert max(rows for rows, _ in passes) >= 4, passes  # ... and together really shared passes
    for (pieces_alone, done_alone), (pieces_together, done_together) in zip(alone, together, strict=True):
        assert "".join(pieces_together) == "".join(pieces_alone)
        assert done_together == done_alone
    assert together[3][1].finish_reason == "stop"  # its stop string cut it
    assert {done.finish_reason for _, done in together} >= {"length"}
    assert len({done.content for _, done in together}) == len(requests)


def test_a_long_prompt_is_read_in_chunks_between_the_running_streams_steps(chatty_model_dir):
    pool = ModelPool(device="cpu", dtype="float32", prefill_tokens=16)
    try:
        pool.preload(str(chatty_model_dir))
        shapes = []
        model = pool._base(str(chatty_model_dir)).model
        model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
        running = pool.generate_stream(chat(chatty_model_dir, max_tokens=200))
        next(running)
        long_text = " ".join(f"word{i}" for i in range(150))
        alone = ModelPool(device="cpu", dtype="float32").generate(chat(chatty_model_dir, long_text, max_tokens=5))
        shapes.clear()
        answer = pool.generate(chat(chatty_model_dir, long_text, max_tokens=5))
        running.close()
    finally:
        pool.close()

    assert answer == alone
    prefill_at = [i for i, (rows, tokens) in enumerate(shapes) if tokens > 1]
    assert len(prefill_at) >= 5, shapes  # a prompt of hundreds of tokens, read 16 at a time
    assert all(rows_tokens[1] <= 16 for rows_tokens in shapes)
    # Between two chunks of the prompt, the running stream took a decoding step.
    for before, after in zip(prefill_at, prefill_at[1:], strict=False):
        assert any(shapes[i] == (1, 1) for i in range(before + 1, after)), shapes


def test_a_closed_stream_leaves_the_batch_at_the_next_step(pool, chatty_model_dir, passes):
    staying = pool.generate_stream(chat(chatty_model_dir, "stay", max_tokens=300))
    leaving = pool.generate_stream(chat(chatty_model_dir, "leave", max_tokens=300))
    next(staying), next(leaving)
    deadline = time.monotonic() + 10
    while max(rows for rows, _ in passes[-3:]) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    leaving.close()
    closed_at = len(passes)
    for _ in range(5):
        next(staying)
    staying.close()
    after = passes[closed_at:]
    # The pass under way when it closed may still hold it; none after that does.
    assert all(rows == 1 for rows, _ in after[1:]), after


def test_a_full_kv_memory_makes_new_requests_wait_then_refuses_them_with_a_retry_time(chatty_model_dir):
    probe = ModelPool(device="cpu", dtype="float32")
    bytes_per_token = probe._base(str(chatty_model_dir)).engine.kv.bytes_per_token
    prompt_tokens = probe.count_prompt_tokens(str(chatty_model_dir), chat(chatty_model_dir).messages)
    probe.close()
    reserved = prompt_tokens + 400
    pool = ModelPool(device="cpu", dtype="float32", kv_memory_bytes=reserved * bytes_per_token, queue_timeout=0.5)
    try:
        first = pool.generate_stream(chat(chatty_model_dir, max_tokens=400))
        next(first)
        started = time.monotonic()
        # Held, the first stream cannot end (and free its memory) before the second's wait runs out.
        with paused(pool._base(str(chatty_model_dir)).model):
            second = pool.generate_stream(chat(chatty_model_dir, max_tokens=400))
            time.sleep(0.6)
        with pytest.raises(Overloaded) as refused:
            drain(second)
        assert time.monotonic() - started >= 0.5
        assert 1 <= refused.value.retry_after <= 60
        _, done = drain(first)  # the running stream finishes
        assert done.completion_tokens == 400 and done.finish_reason == "length"
        with pytest.raises(InvalidRequest, match="KV memory"):
            pool.generate_stream(chat(chatty_model_dir, max_tokens=reserved * 2))
    finally:
        pool.close()


def test_finish_all_ends_every_stream_with_that_reason(pool, chatty_model_dir):
    streams = [pool.generate_stream(chat(chatty_model_dir, text, max_tokens=400)) for text in PROMPTS[:3]]
    pieces = [next(stream) for stream in streams]
    pool.finish_all("cancelled")
    for first, stream in zip(pieces, streams, strict=True):
        rest, done = drain(stream)
        assert done.finish_reason == "cancelled" and done.completion_tokens < 400
        assert done.content == first + "".join(rest)


def test_a_failing_pass_fails_its_requests_and_the_engine_goes_on(pool, chatty_model_dir, passes):
    model = pool._base(str(chatty_model_dir)).model
    calls = []

    def fail_once(module, args, kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory in a test")

    handle = model.register_forward_pre_hook(fail_once, with_kwargs=True)
    with pytest.raises(ServingError, match="out of memory in a test"):
        drain(pool.generate_stream(chat(chatty_model_dir, max_tokens=5)))
    handle.remove()
    _, done = drain(pool.generate_stream(chat(chatty_model_dir, max_tokens=5)))
    assert done.completion_tokens == 5


def test_an_asyncio_consumer_reads_the_stream_without_a_thread(pool, chatty_model_dir):
    expected = pool.generate(chat(chatty_model_dir, max_tokens=12))

    async def read():
        events = [event async for event in pool.open_stream(chat(chatty_model_dir, max_tokens=12)).events()]
        return events

    events = asyncio.run(read())
    assert isinstance(events[-1], Completion) and events[-1] == expected
    assert "".join(events[:-1]) == expected.content


def test_load_stats_count_queue_running_rate_and_first_token_latency(pool, chatty_model_dir):
    assert pool.load_stats()["first_token_p50_ms"] is None
    stream = pool.generate_stream(chat(chatty_model_dir, max_tokens=300))
    next(stream)
    load = pool.load_stats()
    assert load["running"] == 1 and load["queue_depth"] == 0
    assert load["first_token_p50_ms"] > 0 and load["first_token_p95_ms"] >= load["first_token_p50_ms"]
    drain(stream)
    assert pool.load_stats()["tokens_per_second"] > 0


@pytest.mark.parametrize("kind", ["dora", "rslora"])
def test_dora_and_rslora_adapters_answer_like_peft_in_a_shared_batch(pool, chatty_model_dir, tmp_path, kind, adapters):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_dora=kind == "dora",
        use_rslora=kind == "rslora",
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(chatty_model_dir), config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(tmp_path / kind)
    plain = AutoModelForCausalLM.from_pretrained(chatty_model_dir).eval()
    reference = PeftModel.from_pretrained(plain, tmp_path / kind).eval()

    request = chat(chatty_model_dir, adapter_path=str(tmp_path / kind), max_tokens=16)
    [(_, done), (_, other)] = run_together(
        pool, [request, chat(chatty_model_dir, adapter_path=str(adapters["a"]))], chatty_model_dir
    )

    tokenizer = pool._base(str(chatty_model_dir)).tokenizer
    prompt = pool._prompt_ids(pool._base(str(chatty_model_dir)), request.messages, None)
    output = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    assert done.content == tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)
    assert pool.stats()["adapters"][str(chatty_model_dir.resolve())]  # applied per row, not merged


def test_an_adapter_that_cannot_be_applied_per_row_is_served_merged(pool, chatty_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(chatty_model_dir), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    model.save_pretrained(tmp_path / "saved-head")
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(chatty_model_dir), tmp_path / "saved-head"
    )

    request = chat(chatty_model_dir, adapter_path=str(tmp_path / "saved-head"), max_tokens=12)
    done = pool.generate(request)

    prompt = pool._prompt_ids(pool._base(str(chatty_model_dir)), request.messages, None)
    output = reference.eval().generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    tokenizer = pool._base(str(chatty_model_dir)).tokenizer
    assert done.content == tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)
    assert not pool.stats()["adapters"][str(chatty_model_dir.resolve())]


def test_many_adapters_over_the_cache_size_in_one_batch_all_answer_right(chatty_model_dir, tmp_path):
    """Past max_adapters, adapters in use are kept until their requests end; idle ones are evicted."""
    paths = [make_lora_adapter(chatty_model_dir, tmp_path / f"ad{i}", seed=10 + i) for i in range(4)]
    reference = ModelPool(device="cpu", dtype="float32")
    expected = [reference.generate(chat(chatty_model_dir, adapter_path=str(p), max_tokens=10)).content for p in paths]
    reference.close()
    pool = ModelPool(device="cpu", dtype="float32", max_adapters=2)
    try:
        results = run_together(
            pool, [chat(chatty_model_dir, adapter_path=str(p), max_tokens=10) for p in paths], chatty_model_dir
        )
        assert [done.content for _, done in results] == expected
        assert len(pool.stats()["adapters"][str(chatty_model_dir.resolve())]) == 2
    finally:
        pool.close()
