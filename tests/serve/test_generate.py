from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from llm.serve.engine import BatchEngine
from llm.serve.errors import InvalidRequest, PromptTooLong, ServingError
from llm.serve.kv import ATTENTION
from llm.serve.schema import GenerationRequest

from .helpers import chat, drain


def test_it_streams_pieces_that_add_up_to_the_content(pool, chatty_model_dir):
    pieces, completion = drain(pool.generate_stream(chat(chatty_model_dir, max_tokens=20)))
    assert len(pieces) > 5 and "".join(pieces) == completion.content
    assert completion.prompt_tokens == pool.count_prompt_tokens(str(chatty_model_dir), chat(chatty_model_dir).messages)


def test_it_ends_with_length_at_max_tokens(pool, chatty_model_dir):
    completion = pool.generate(chat(chatty_model_dir, max_tokens=5))
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 5 and completion.tool_calls == []


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: each forward pass strongly prefers the next token of a script."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.script = list(script)
        self.vocab_size = vocab_size
        self.config = LlamaConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
        self.config._attn_implementation = ATTENTION
        self.calls = 0

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids, position_ids, use_cache, logits_to_keep):
        assert input_ids.shape[1] == (3 if self.calls == 0 else 1)  # the prompt once, then one token per step
        assert position_ids.tolist() == [[0, 1, 2]] if self.calls == 0 else [[2 + self.calls]]
        kept = len(logits_to_keep) if isinstance(logits_to_keep, torch.Tensor) else logits_to_keep
        logits = torch.zeros(1, kept, self.vocab_size)
        logits[0, -1, self.script[self.calls]] = 10.0
        self.calls += 1
        return SimpleNamespace(logits=logits)


def test_it_ends_with_stop_at_the_end_of_turn_token(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = tokenizer(" Paris is nice", add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id
    model = ScriptedModel([*words, end, *words], len(tokenizer))
    request = GenerationRequest(base_path="unused", messages=[], temperature=0.0, max_tokens=20)
    engine = BatchEngine(model, tokenizer, end_token_ids=frozenset({end}))
    try:
        pieces, completion = drain(engine.submit([1, 2, 3], request))
    finally:
        engine.close()
    assert completion.content == " Paris is nice" == "".join(pieces)
    assert completion.finish_reason == "stop"
    assert completion.completion_tokens == len(words) + 1 == model.calls


def test_it_cuts_at_a_stop_string_and_never_shows_it(pool, chatty_model_dir):
    full = pool.generate(chat(chatty_model_dir, max_tokens=20)).content
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    pieces, completion = drain(
        pool.generate_stream(chat(chatty_model_dir, max_tokens=20, stop=["never appears", stop]))
    )
    assert completion.content == full[: full.index(stop)]
    assert completion.finish_reason == "stop"
    assert "".join(pieces) == completion.content and stop not in "".join(pieces)
    assert completion.completion_tokens < 20
    assert pool.generate(chat(chatty_model_dir, max_tokens=20, stop=stop)).content == completion.content


def test_it_repeats_itself_for_the_same_seed(pool, chatty_model_dir):
    def sampled(seed):
        return pool.generate(chat(chatty_model_dir, temperature=1.0, top_p=0.95, seed=seed, max_tokens=12)).content

    assert sampled(1) == sampled(1)
    assert sampled(1) != sampled(2)


def test_it_refuses_a_prompt_that_does_not_fit(pool, chatty_model_dir):
    with pytest.raises(PromptTooLong, match="maximum context length is 4096 tokens") as raised:
        pool.generate_stream(chat(chatty_model_dir, text="hello " * 5000))
    assert raised.value.prompt_tokens > 4096
    with pytest.raises(PromptTooLong):
        pool.generate_stream(chat(chatty_model_dir, max_tokens=4090))
    assert pool.generate(chat(chatty_model_dir, max_tokens=2)).completion_tokens == 2


def test_it_lists_every_problem_with_a_request(pool, chatty_model_dir):
    request = GenerationRequest(
        base_path=str(chatty_model_dir),
        messages=[{"role": "user"}],
        max_tokens=0,
        top_p=0.0,
        temperature=-1.0,
    )
    with pytest.raises(InvalidRequest) as raised:
        pool.generate_stream(request)
    assert len(raised.value.problems) == 4
    assert isinstance(raised.value, ServingError) and "messages[0] has no content" in str(raised.value)


@pytest.mark.realmodel
def test_the_bundled_model_knows_the_capital_of_france(pool, bundled_model_dir):
    completion = pool.generate(chat(bundled_model_dir, text="What is the capital of France?", max_tokens=30))
    assert "Paris" in completion.content
    assert completion.finish_reason == "stop"
