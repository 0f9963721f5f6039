"""DPO in the engine: pairs render and pack right, the loss and reference are DPO's, runs learn and resume."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm.train import ConfigError, TrainConfig, train
from llm.train.dpo import answer_logps
from llm.train.packing import ATTENTION
from llm.train.preference import load_pairs, pack_pairs, render_pair

from .conftest import Recorder, chat_examples, write_jsonl

_GOOD = "yes indeed certainly right correct".split()
_BAD = "no never wrong false mistaken".split()
_TOPICS = "cats dogs rivers mountains stars clouds bread music".split()


def pairs(count: int, *, seed: int = 0) -> list[dict]:
    """Pairs whose preferred answers use one small vocabulary and rejected ones another: learnable fast."""
    rng = random.Random(seed)
    made = []
    for i in range(count):
        prompt = [{"role": "system", "content": "Answer briefly."}] if i % 4 == 0 else []
        prompt.append({"role": "user", "content": f"Tell me about {rng.choice(_TOPICS)} and {rng.choice(_TOPICS)}."})
        if i % 5 == 0:  # a multi-turn prompt: its assistant turn is context, never trained
            prompt += [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Go on."}]
        good = " ".join(rng.choice(_GOOD) for _ in range(rng.randint(2, 6))).capitalize() + "."
        bad = " ".join(rng.choice(_BAD) for _ in range(rng.randint(2, 6))).capitalize() + "."
        made.append(
            {
                "input": {"messages": prompt},
                "preferred_output": [{"role": "assistant", "content": good}],
                "non_preferred_output": [{"role": "assistant", "content": bad}],
            }
        )
    return made


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def dpo_config(tiny_config, tmp_path):
    """tiny_config's quick LoRA run on 12 preference pairs (4 for validation) with objective dpo."""
    files = {
        "train_file": str(write_jsonl(tmp_path / "pairs.jsonl", pairs(12, seed=1))),
        "validation_file": str(write_jsonl(tmp_path / "pairs-validation.jsonl", pairs(4, seed=2))),
    }

    def make(**changes) -> TrainConfig:
        return tiny_config(**{**files, "objective": "dpo", **changes})

    return make


def separate_logps(model, pair) -> tuple[float, float]:
    """Each answer's log-probability from its own forward pass of prompt + answer: what packing must equal."""
    found = []
    for answer, trained in ((pair.chosen_ids, pair.chosen_trained), (pair.rejected_ids, pair.rejected_trained)):
        ids = torch.tensor([pair.prompt_ids + answer])
        logits = model(input_ids=ids, use_cache=False).logits[0, len(pair.prompt_ids) - 1 : -1]
        token_logps = -F.cross_entropy(logits.float(), torch.tensor(answer), reduction="none")
        found.append(float(token_logps[torch.tensor(trained)].sum()))
    return found[0], found[1]


def test_a_pair_splits_into_the_shared_prompt_and_two_answers_ending_with_their_end_of_turn(tokenizer):
    example = pairs(1)[0]

    pair = render_pair(tokenizer, example)

    prompt = tokenizer.decode(pair.prompt_ids)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert example["input"]["messages"][-1]["content"] in prompt
    assert tokenizer.decode(pair.chosen_ids) == example["preferred_output"][0]["content"] + "<|im_end|>"
    assert tokenizer.decode(pair.rejected_ids) == example["non_preferred_output"][0]["content"] + "<|im_end|>"
    assert all(pair.chosen_trained) and all(pair.rejected_trained)


def test_a_long_pair_loses_the_start_of_its_prompt_first(tokenizer):
    example = pairs(1)[0]
    example["input"]["messages"][-1]["content"] = "word " * 200
    full = render_pair(tokenizer, example)

    cut = render_pair(tokenizer, example, max_seq_len=64)

    assert len(cut.prompt_ids) + max(len(cut.chosen_ids), len(cut.rejected_ids)) <= 64
    assert cut.prompt_ids == full.prompt_ids[-len(cut.prompt_ids) :]
    assert cut.chosen_ids == full.chosen_ids and cut.rejected_ids == full.rejected_ids
    assert cut.truncated_tokens == len(full.prompt_ids) - len(cut.prompt_ids)


def test_packing_both_answers_after_one_prompt_gives_the_log_probs_of_separate_passes(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=ATTENTION).eval()
    examples = pairs(5, seed=3)
    # A two-message answer: the header between its messages is not trained.
    examples[1]["preferred_output"] = [
        {"role": "assistant", "content": "First part."},
        {"role": "assistant", "content": "Second part."},
    ]
    rendered = [render_pair(tokenizer, example) for example in examples]
    assert not all(rendered[1].chosen_trained)

    with torch.no_grad():
        chosen, rejected = answer_logps(model, pack_pairs(rendered, token_budget=10_000)[0])
        expected = [separate_logps(model, pair) for pair in rendered]

    torch.testing.assert_close(chosen, torch.tensor([c for c, _ in expected]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rejected, torch.tensor([r for _, r in expected]), rtol=1e-5, atol=1e-4)


def test_the_first_step_is_log_2_with_zero_rewards_and_training_makes_chosen_win(dpo_config):
    config = dpo_config(epochs=6, eval_every=3)
    sink = Recorder()

    summary = train(config, sink=sink)

    first, last = sink.of("metric")[0], sink.of("metric")[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference before the first update
    assert first["rewards_chosen"] == pytest.approx(0, abs=1e-6)
    assert first["rewards_rejected"] == pytest.approx(0, abs=1e-6)
    assert "token_accuracy" not in first
    assert last["loss"] < first["loss"]
    assert summary["final_reward_accuracy"] > 0.5
    assert summary["objective"] == "dpo" and summary["dpo_beta"] == 0.1
    evaluations = sink.of("eval")
    assert set(evaluations[-1]) >= {"eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_logps_chosen"}
    assert evaluations[-1]["eval_reward_margin"] > evaluations[0]["eval_reward_margin"]
    checkpoint = sink.of("checkpoint")[-1]["metrics"]
    assert checkpoint["train_reward_accuracy"] == last["reward_accuracy"]
    assert (Path(config.out_dir) / "adapter" / "adapter_config.json").is_file()


def test_the_step_loss_is_the_mean_dpo_loss_of_its_pairs_against_the_base(dpo_config, tiny_model_dir, tokenizer):
    config = dpo_config(epochs=2, batch_size=12, dpo_beta=0.5)
    sink = Recorder()
    train(config, sink=sink)
    # Recompute step 2 by hand: the adapter after step 1 against the plain base model.
    from peft import PeftModel

    first_step_adapter = TrainConfig(**{**config.__dict__, "epochs": 1, "out_dir": config.out_dir + "-one"})
    train(first_step_adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=ATTENTION).eval()
    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=ATTENTION),
        Path(first_step_adapter.out_dir) / "adapter",
    ).eval()
    losses = []
    with torch.no_grad():
        for pair in load_pairs(config.train_file, tokenizer, max_seq_len=config.max_seq_len).examples:
            (pc, pr), (rc, rr) = separate_logps(policy, pair), separate_logps(base, pair)
            losses.append(-F.logsigmoid(torch.tensor(0.5 * ((pc - rc) - (pr - rr)))))

    assert sink.of("metric")[1]["loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-4)


def test_a_paused_and_resumed_dpo_run_ends_where_an_uninterrupted_one_does(dpo_config, tmp_path):
    whole = Recorder()
    train(dpo_config(epochs=2, out_dir=str(tmp_path / "whole")), sink=whole)
    paused = Recorder()
    # Pause after step 2 (should_stop is also asked while the reference is computed).
    train(
        dpo_config(epochs=2, out_dir=str(tmp_path / "parts")),
        sink=paused,
        should_stop=lambda: "pause" if len(paused.of("metric")) == 2 else None,
    )
    checkpoint = paused.of("checkpoint")[-1]["path"]

    resumed = Recorder()
    train(dpo_config(epochs=2, out_dir=str(tmp_path / "parts"), resume_from=checkpoint), sink=resumed)

    assert [m["loss"] for m in resumed.of("metric")] == pytest.approx([m["loss"] for m in whole.of("metric")[2:]])
    assert resumed.of("summary")[0]["eval_loss"] == pytest.approx(whole.of("summary")[0]["eval_loss"])


def test_dpo_can_continue_an_sft_adapter_whose_model_is_the_reference(dpo_config, tiny_model_dir, tmp_path):
    sft = TrainConfig(
        model=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "chat.jsonl", chat_examples(8))),
        out_dir=str(tmp_path / "sft"),
        epochs=1,
        batch_size=4,
        lr=1e-2,
        lora_r=4,
        lora_alpha=8,
    )
    train(sft)
    sink = Recorder()

    train(dpo_config(init_from=str(tmp_path / "sft" / "adapter"), lora_r=16), sink=sink)

    # The reference is the SFT model: before the first update policy and reference agree.
    assert sink.of("metric")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4  # the SFT adapter was trained further, not a new one of the config's rank
    events = " ".join(event["message"] for event in sink.of("event"))
    assert "from the starting weights" in events


def test_full_dpo_needs_no_copy_of_the_model(dpo_config):
    sink = Recorder()

    summary = train(dpo_config(method="full", lr=1e-4), sink=sink)

    assert sink.of("metric")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["output_dir"].endswith("model")


def test_a_chat_file_given_to_dpo_names_its_lines_and_the_objective_it_needs(dpo_config, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_examples(2))

    with pytest.raises(ConfigError) as refused:
        train(dpo_config(train_file=str(chat), validation_file=None))

    assert refused.value.problems[0].startswith("train_file line 1: expected a preference pair")
    assert 'objective "sft"' in refused.value.problems[0]


def test_a_pair_with_an_empty_answer_is_refused_with_its_line(dpo_config, tmp_path):
    examples = pairs(3)
    examples[1]["non_preferred_output"] = []
    bad = write_jsonl(tmp_path / "bad.jsonl", examples)

    with pytest.raises(ConfigError) as refused:
        train(dpo_config(train_file=str(bad), validation_file=None))

    assert refused.value.problems == [
        "train_file line 2: non_preferred_output must be a non-empty list of assistant messages"
    ]


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"objective": "ppo"}, "objective: must be one of sft, dpo, got 'ppo'"),
        ({"dpo_beta": 0}, "dpo_beta: must be a number >= 0.001, got 0"),
        ({"init_from": "/nowhere"}, "init_from: /nowhere is not an adapter folder (no adapter_config.json)"),
        ({"method": "full", "init_from": "/nowhere"}, "init_from: /nowhere is not a full model folder"),
    ],
)
def test_the_config_refuses_bad_dpo_settings(dpo_config, changes, problem):
    assert any(found.startswith(problem) for found in dpo_config(**changes).problems())


def test_a_dora_run_cannot_continue_a_lora_adapter(dpo_config, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"use_dora": False}))

    problems = dpo_config(method="dora", init_from=str(adapter)).problems()

    assert any("is a LoRA adapter; continue it with method lora, not dora" in problem for problem in problems)


def test_a_pause_is_heard_while_the_reference_is_computed(dpo_config):
    recorder = Recorder(stop_answers=["pause"])

    summary = train(dpo_config(), sink=recorder, should_stop=recorder.should_stop)

    assert summary["stopped"] == "pause" and summary["steps"] == 0
    assert not recorder.of("metric") and not recorder.of("checkpoint")
    assert "Paused before training started" in [event["message"] for event in recorder.of("event")]
