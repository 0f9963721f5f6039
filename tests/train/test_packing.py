"""Packed examples never see each other, and a packed step's loss is the padded batch's loss."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm.train import render_example, train
from llm.train.data import IGNORE_INDEX, epoch_order, load_examples
from llm.train.packing import ATTENTION, pack, trained_logits

from .conftest import Recorder, chat_examples


def rendered_examples(tokenizer, count, *, loss_on="all"):
    return [render_example(tokenizer, example, loss_on=loss_on) for example in chat_examples(count, seed=3)]


def packed_logits_match_alone(model_dir, examples):
    """Max difference between each example's logits inside one pack and when run alone."""
    packed_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=ATTENTION)
    plain_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    [batch] = pack(examples, token_budget=10_000)
    with torch.no_grad():
        packed = trained_logits(packed_model.eval(), batch)
        alone = [plain_model.eval()(input_ids=torch.tensor([example.input_ids])).logits[0, :-1] for example in examples]
    return (packed - torch.cat(alone)).abs().max().item()


def test_an_example_in_a_pack_gets_the_logits_it_gets_alone(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = rendered_examples(tokenizer, 4)

    assert packed_logits_match_alone(tiny_model_dir, examples) < 1e-4


def test_plain_attention_over_the_same_row_would_leak_across_examples(tiny_model_dir):
    """The control for the test above: without the packed attention, later examples see earlier ones."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = rendered_examples(tokenizer, 2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    row = torch.tensor([examples[0].input_ids + examples[1].input_ids])
    with torch.no_grad():
        leaked = model(input_ids=row).logits[0, len(examples[0].input_ids) :]
        alone = model(input_ids=torch.tensor([examples[1].input_ids])).logits[0]

    assert (leaked - alone).abs().max().item() > 1e-2


@pytest.mark.realmodel
def test_packing_keeps_the_real_models_logits(bundled_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    examples = rendered_examples(tokenizer, 3)

    assert packed_logits_match_alone(bundled_model_dir, examples) < 1e-4


def padded_batch_loss(model_dir, examples) -> float:
    """The loss transformers computes for the examples padded into one batch (right padding, mask)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    longest = max(len(example.input_ids) for example in examples)
    pad = [longest - len(example.input_ids) for example in examples]
    input_ids = torch.tensor([example.input_ids + [0] * n for example, n in zip(examples, pad, strict=True)])
    labels = torch.tensor([example.labels + [IGNORE_INDEX] * n for example, n in zip(examples, pad, strict=True)])
    mask = torch.tensor([[1] * len(example.input_ids) + [0] * n for example, n in zip(examples, pad, strict=True)])
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.item()


@pytest.mark.parametrize("micro_batch_tokens", [4096, 80])
def test_a_steps_loss_is_the_padded_batchs_loss(tiny_config, tiny_model_dir, micro_batch_tokens):
    """80 tokens splits the step into several micro-batches: the loss must still be the mean over all its tokens."""
    config = tiny_config(micro_batch_tokens=micro_batch_tokens)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = load_examples(config.train_file, tokenizer, loss_on="assistant", max_seq_len=config.max_seq_len).examples
    first_step = [examples[i] for i in epoch_order(len(examples), seed=config.seed, epoch=0)[: config.batch_size]]
    assert len(pack(first_step, micro_batch_tokens)) == (1 if micro_batch_tokens == 4096 else config.batch_size)

    recorder = Recorder(stop_answers=[None, "cancel"])
    train(config, sink=recorder, should_stop=recorder.should_stop)

    # LoRA starts as a no-op, so the first step's loss is the base model's.
    [metric] = recorder.of("metric")
    assert metric["loss"] == pytest.approx(padded_batch_loss(tiny_model_dir, first_step), abs=1e-5)


def test_gradient_accumulation_gives_the_same_gradient(tiny_config):
    norms = []
    for micro_batch_tokens in (4096, 80):
        recorder = Recorder(stop_answers=[None, "cancel"])
        train(tiny_config(micro_batch_tokens=micro_batch_tokens), sink=recorder, should_stop=recorder.should_stop)
        norms.append(recorder.of("metric")[0]["grad_norm"])

    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
