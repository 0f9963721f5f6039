"""Preference pairs (DPO data): what validation refuses and warns about, their token counts, their split."""

import json

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app import services
from datasets_app.models import Dataset
from datasets_app.token_stats import billable_tokens_at, token_statistics
from llm.chat.pairs import render_pair
from tests.datasets.support import WEATHER_TOOL, jsonl, only_error, validate, weather_call

DROP_EMPTY = (
    "DPO compares the two answers of a pair, so each needs text or tool calls: write the answer, or drop the pair"
)
# The tiny model's chat template (SmolLM2's) adds this system message when a conversation has none.
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def pair(question="Hi", preferred="Hello!", rejected="What do you want?", **fields) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": question}]},
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
        **fields,
    }


# --- validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "path", "message"),
    [
        (
            [{"role": "assistant", "content": "   \n"}],
            "preferred_output[0].content",
            f"the answer is empty; {DROP_EMPTY}",
        ),
        (
            [{"role": "assistant", "content": [{"type": "text", "text": ""}]}],
            "preferred_output[0].content",
            f"the answer is empty; {DROP_EMPTY}",
        ),
        ([], "preferred_output", f"is an empty list; {DROP_EMPTY}"),
    ],
)
def test_it_refuses_a_pair_with_an_empty_answer_with_its_line_and_path(answer, path, message):
    report, written = validate(jsonl(pair(), pair("Yo"), pair() | {"preferred_output": answer}))

    error = only_error(report)
    assert (error.line, error.path, error.code, error.message) == (3, path, "empty_answer", message)
    assert str(error) == f"line 3: {path}: {message}"
    assert not report.ok and len(written) == 2


def test_it_refuses_an_empty_answer_in_a_later_message_of_the_non_preferred_output():
    two_messages = pair()
    two_messages["non_preferred_output"].append({"role": "assistant", "content": ""})
    report, _ = validate(jsonl(two_messages))

    assert str(only_error(report)) == f"line 1: non_preferred_output[1].content: the answer is empty; {DROP_EMPTY}"
    assert "empty_assistant_content" not in report.warning_counts


def test_an_answer_of_tool_calls_only_is_not_empty():
    calls = pair(tools=[WEATHER_TOOL])
    calls["preferred_output"] = [{"role": "assistant", "content": None, "tool_calls": [weather_call()]}]
    report, _ = validate(jsonl(calls))

    assert report.ok, [str(issue) for issue in report.errors]


def test_it_warns_about_a_pair_whose_answers_are_the_same_with_its_line():
    same = pair("Yo", preferred="Hello!", rejected="  Hello!\n")
    report, written = validate(jsonl(pair(), same))

    assert report.ok and len(written) == 2
    [warning] = [issue for issue in report.warnings if issue.code == "identical_answers"]
    assert str(warning) == (
        "line 2: non_preferred_output: is the same answer as preferred_output, so this pair teaches no preference "
        "(DPO learns from the difference between the two); write a worse answer here, or drop the pair"
    )


def test_answers_calling_the_same_tool_with_the_same_arguments_are_the_same():
    def calls(call_id, arguments):
        return [{"role": "assistant", "content": None, "tool_calls": [weather_call(call_id, arguments)]}]

    same = pair(tools=[WEATHER_TOOL])
    same["preferred_output"] = calls("call_1", '{"city": "Paris"}')
    same["non_preferred_output"] = calls("call_9", '{ "city":"Paris" }')
    other = same | {"non_preferred_output": calls("call_1", '{"city": "Lyon"}')}
    report, _ = validate(jsonl(same, other))

    assert report.ok
    assert [(issue.line, issue.path) for issue in report.warnings if issue.code == "identical_answers"] == [
        (1, "non_preferred_output")
    ]


@pytest.mark.parametrize(
    ("last", "message"),
    [
        (
            {"role": "assistant", "content": "Hello!"},
            "the input ends with an assistant message, but both answers are the assistant's reply to the user "
            "(or tool) message before them; end input.messages with that message (was an answer copied into the input?)",
        ),
        (
            {"role": "system", "content": "Be kind."},
            "the input ends with a system message, but both answers are the assistant's reply to a user "
            "(or tool) message; end input.messages with the user message the answers reply to",
        ),
    ],
)
def test_it_refuses_an_input_that_does_not_end_with_a_user_message(last, message):
    ends_badly = pair()
    ends_badly["input"]["messages"].append(last)
    report, _ = validate(jsonl(pair(), ends_badly))

    error = only_error(report)
    assert (error.line, error.path, error.code) == (2, "input.messages[1]", "bad_prompt_end")
    assert str(error) == f"line 2: input.messages[1]: {message}"


def test_an_input_may_end_with_a_tool_reply():
    after_tool = pair("Weather in Paris?", "It is 21 C.", "No idea.", tools=[WEATHER_TOOL])
    after_tool["input"]["messages"] += [
        {"role": "assistant", "content": None, "tool_calls": [weather_call()]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    report, _ = validate(jsonl(after_tool))

    assert report.ok, [str(issue) for issue in report.errors]


def test_it_refuses_an_answer_weighted_0():
    weighted = pair()
    weighted["non_preferred_output"][0]["weight"] = 0
    report, _ = validate(jsonl(pair("Yo"), weighted))

    error = only_error(report)
    assert (error.line, error.path, error.code) == (2, "non_preferred_output[0].weight", "bad_weight")
    assert error.message == (
        "is 0, but DPO trains every token of both answers, so an answer cannot be weighted; "
        "remove the weight (to leave the pair out of training, drop the pair)"
    )


def test_it_drops_a_weight_of_1_or_in_the_input_with_a_warning():
    weighted = pair()
    weighted["preferred_output"][0]["weight"] = 1
    weighted["input"]["messages"] += [
        {"role": "assistant", "content": "Hm?", "weight": 1},
        {"role": "user", "content": "Hi"},
    ]
    report, written = validate(jsonl(weighted))

    assert report.ok
    assert [str(issue) for issue in report.warnings if issue.code == "weight_ignored"] == [
        "line 1: input.messages[1].weight: is ignored: the input of a preference pair is never trained; remove it",
        "line 1: preferred_output[0].weight: is ignored: DPO trains every token of both answers; remove it",
    ]
    assert written[0]["preferred_output"] == [{"role": "assistant", "content": "Hello!"}]
    assert all("weight" not in message for message in written[0]["input"]["messages"])


# --- token statistics ------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_a_pair_counts_its_input_once_and_trains_both_answers(tokenizer):
    stats = token_statistics([pair(rejected="What do you want from me?")], tokenizer, max_seq_len=512)

    # One packed sequence: the input through the assistant header, then each answer through its end-of-turn token.
    prompt = count(tokenizer, DEFAULT_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    preferred = count(tokenizer, "Hello!<|im_end|>")
    rejected = count(tokenizer, "What do you want from me?<|im_end|>")
    assert (prompt, preferred, rejected) == (31, 3, 8)
    assert stats["total_tokens"] == stats["billable_tokens"] == 31 + 3 + 8
    assert stats["trained_tokens"] == 3 + 8
    # The length max_seq_len must hold: the rejected answer restarts where the input ends.
    assert stats["tokens_per_example"]["max"] == 31 + 8
    # What the job estimate reads (billable_tokens_at): billable tokens per epoch at the job's max_seq_len.
    assert stats["billable_tokens_by_max_seq_len"]["512"] == billable_tokens_at(stats, 2048) == 42


def test_assistant_turns_of_the_input_are_counted_once_and_not_trained(tokenizer):
    conversation = pair("Bye", "Goodbye", "Go away")
    conversation["input"]["messages"][:0] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    stats = token_statistics([conversation], tokenizer, max_seq_len=512)

    prompt = DEFAULT_SYSTEM + (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )
    answers = count(tokenizer, "Goodbye<|im_end|>") + count(tokenizer, "Go away<|im_end|>")
    assert stats["total_tokens"] == count(tokenizer, prompt) + answers
    assert stats["trained_tokens"] == answers


def test_a_long_pair_is_cut_as_training_cuts_it_input_first(tokenizer):
    lines = [b"", json.dumps(pair(rejected="What do you want from me?")).encode()]
    stats = token_statistics(lines, tokenizer, max_seq_len=36)

    # 31 input + 8 for the longer answer is 3 too many: the input loses its first 3 tokens.
    assert (stats["billable_tokens"], stats["trained_tokens"], stats["tokens_lost"]) == (28 + 3 + 8, 3 + 8, 3)
    assert stats["warnings"] == [
        {
            "line": 2,
            "path": "",
            "code": "too_long",
            "message": "the pair (its input and its longer answer) is 39 tokens, "
            "longer than the maximum sequence length 36: 3 tokens will be cut off",
        }
    ]
    # At 12 the input keeps half, 6 tokens, and each answer its first 6.
    short = token_statistics(lines, tokenizer, max_seq_len=12)
    assert (short["billable_tokens"], short["trained_tokens"], short["tokens_lost"]) == (6 + 3 + 6, 3 + 6, 42 - 15)


def test_it_counts_pairs_as_the_training_engine_renders_and_cuts_them(tokenizer):
    calls = pair("Weather in Paris?", "It is 21 C.", "I cannot know that.", tools=[WEATHER_TOOL])
    calls["input"]["messages"] += [
        {"role": "assistant", "content": None, "tool_calls": [weather_call()]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    two_turns = pair(rejected="Go away.")
    two_turns["preferred_output"] += [{"role": "assistant", "content": "How can I help?"}]
    pairs = [pair(rejected="What do you want from me? " * 20), calls, two_turns]

    for max_seq_len in (16, 48, 100, 4096):
        stats = token_statistics(pairs, tokenizer, max_seq_len=max_seq_len)
        rendered = [render_pair(tokenizer, example, max_seq_len=max_seq_len) for example in pairs]
        assert stats["billable_tokens"] == sum(r.tokens for r in rendered)
        assert stats["trained_tokens"] == sum(sum(r.chosen_trained) + sum(r.rejected_trained) for r in rendered)
        assert stats["tokens_lost"] == sum(r.truncated_tokens for r in rendered)


# --- split -------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_preference_file_splits_into_preference_files(settings, tmp_path, tiny_model_dir):
    settings.MEDIA_ROOT = tmp_path / "media"
    alice = get_user_model().objects.create_user("alice", password="pw-alice-123")
    pairs = [pair(f"Question {i}?", f"Answer {i}.", f"No {i}.") for i in range(8)]
    pairs[3]["preferred_output"][0]["weight"] = 1
    upload = SimpleUploadedFile("prefs.jsonl", b"\n" + jsonl(*pairs))
    dataset = services.dataset_validate(dataset_id=services.dataset_create(owner=alice, upload=upload).pk)
    assert (dataset.status, dataset.format, dataset.examples) == (Dataset.PROCESSED, "preference", 8)

    parts = services.dataset_split(dataset=dataset, validation_percent=25, seed=3, validate=False)
    parts = [services.dataset_validate(dataset_id=part.pk) for part in parts]

    assert [(part.status, part.format, part.examples) for part in parts] == [
        (Dataset.PROCESSED, "preference", 6),
        (Dataset.PROCESSED, "preference", 2),
    ]
    split_pairs = [json.loads(line) for part in parts for line in part.file.open("rb")]
    del pairs[3]["preferred_output"][0]["weight"]  # validation drops it from the normalized copy
    assert sorted(split_pairs, key=json.dumps) == sorted(pairs, key=json.dumps)
