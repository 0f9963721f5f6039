"""A loaded training file keeps its tokens in flat, file-backed arrays, and gives back exactly what it rendered."""

import gc
import tracemalloc

import pytest
import torch
from transformers import AutoTokenizer

from llm.train import render_example
from llm.train.data import load_examples
from llm.train.packing import pack
from llm.train.preference import load_pairs, pack_pairs, render_pair

from .conftest import chat_examples, write_jsonl
from .test_dpo import pairs


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def batch_tensors(batch) -> list:
    return [value for value in vars(batch).values() if isinstance(value, torch.Tensor)]


def test_it_gives_back_each_example_and_packs_them_as_the_rendered_list(tokenizer, tmp_path):
    examples = chat_examples(30, seed=4)
    examples[2]["messages"][-1]["weight"] = 0  # its only reply: nothing left to train, skipped
    examples[7]["messages"][-1]["content"] = "word " * 200  # cut at max_seq_len
    path = write_jsonl(tmp_path / "train.jsonl", examples)
    rendered = [render_example(tokenizer, example, max_seq_len=128) for example in examples]
    kept = [example for example in rendered if example.trained_tokens]

    loaded = load_examples(path, tokenizer, loss_on="assistant", max_seq_len=128, spill_dir=tmp_path / "spill")

    assert list(loaded.examples) == kept
    assert [loaded.examples[i] for i in (5, -1, 0)] == [kept[5], kept[-1], kept[0]]
    assert (loaded.truncated_examples, loaded.skipped_examples, loaded.total_lines) == (1, 1, 30)
    assert loaded.tokens == sum(len(example.input_ids) for example in kept)
    for budget in (100, 400, 10_000):
        from_store, from_list = pack(loaded.examples, budget), pack(kept, budget)
        assert len(from_store) == len(from_list)
        for a, b in zip(from_store, from_list, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(batch_tensors(a), batch_tensors(b), strict=True))
    # The files have no name: nothing is left in the folder, whatever becomes of the run.
    assert list((tmp_path / "spill").iterdir()) == []


def test_it_gives_back_each_pair_and_packs_them_as_the_rendered_list(tokenizer, tmp_path):
    examples = pairs(25, seed=5)
    examples[2]["preferred_output"] = [
        {"role": "assistant", "content": "First part."},
        {"role": "assistant", "content": "Second part."},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", examples)
    rendered = [render_pair(tokenizer, example, max_seq_len=40) for example in examples]

    loaded = load_pairs(path, tokenizer, max_seq_len=40, spill_dir=tmp_path / "spill")

    assert list(loaded.examples) == rendered
    assert loaded.examples[-2] == rendered[-2]
    assert loaded.truncated_examples == sum(pair.truncated_tokens > 0 for pair in rendered) > 0
    assert loaded.tokens == sum(pair.tokens for pair in rendered)
    from_store, from_list = pack_pairs(loaded.examples, 120), pack_pairs(rendered, 120)
    assert len(from_store) == len(from_list) > 1
    for a, b in zip(from_store, from_list, strict=True):
        assert a.shared_prompt == b.shared_prompt and a.pairs == b.pairs
        assert all(torch.equal(x, y) for x, y in zip(batch_tensors(a), batch_tensors(b), strict=True))


def test_a_loaded_file_holds_a_few_bytes_of_memory_per_token(tokenizer, tmp_path):
    """Python lists of ints took about 44 bytes a token (ids and labels); the store keeps them out of the heap."""
    path = write_jsonl(tmp_path / "train.jsonl", chat_examples(300, seed=6))
    render_example(tokenizer, chat_examples(1)[0], loss_on="all")  # the format and template, made once, not counted
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        loaded = load_examples(path, tokenizer, loss_on="all", max_seq_len=512)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert loaded.tokens > 10_000
    assert held / loaded.tokens < 4


def test_a_file_with_nothing_to_train_gives_an_empty_store(tokenizer, tmp_path):
    silent = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0}]}
    loaded = load_examples(write_jsonl(tmp_path / "t.jsonl", [silent]), tokenizer, loss_on="assistant", max_seq_len=64)

    assert (len(loaded.examples), loaded.tokens, loaded.skipped_examples) == (0, 0, 1)
    assert list(loaded.examples) == [] and len(pack(loaded.examples, 100)) == 0
    with pytest.raises(IndexError):
        loaded.examples[0]
