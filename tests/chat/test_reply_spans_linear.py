"""Locating every reply of a long conversation costs time linear in its turns, and finds what prefix renders find.

The definition of a reply's span renders the conversation up to the reply and
through it; doing that for each of n replies renders O(n^2) messages. These
tests count what reaches the chat template, and check the linear reading
against the definition on random conversations, for regular templates (read
off one marked render) and irregular ones (which fall back to the definition).
"""

import copy
import random
from os.path import commonprefix

import pytest
from transformers import AutoTokenizer

from llm.chat import IGNORE_INDEX, ChatFormat
from tests.chat.test_parity import CONVERSATIONS, TOOLS_TEMPLATE

TEMPLATES = {
    "tiny (SmolLM2's)": None,
    "tools shown": TOOLS_TEMPLATE,
    # Qwen3-like: an empty think block in assistant turns after the last user turn, so earlier
    # prefixes render their last reply differently from the whole conversation.
    "rewrites earlier turns": (
        "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
        "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and loop.index0 > ns.last %}<think>\n\n</think>\n\n{% endif %}"
        "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Gemma-like: trims the content it is given, and names the assistant "model".
    "trims content": (
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m.role == 'assistant' else m.role %}"
        "<start_of_turn>{{ role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    # Llama-3-like: no newline between turns, a blank line after each header.
    "headers with blank lines": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    # Marks only the last user turn: a prefix never renders a prefix of the whole text.
    "marks the last user turn": (
        "{% for m in messages %}{% if loop.last and m.role == 'user' %}[LAST] {% endif %}"
        "{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    ),
}
_WORDS = "the quick brown fox jumps over a lazy dog 東京 🚀 \n  <|im_end|>".split(" ")


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def with_template(tokenizer, template):
    copied = copy.deepcopy(tokenizer)
    if template is not None:
        copied.chat_template = template
    return copied


def long_conversation(turns: int) -> dict:
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"Question {i}: what does the fox do?"},
            {"role": "assistant", "content": f"Answer {i}: it jumps over the lazy dog."},
        ]
    return {"messages": messages}


def random_conversation(rng: random.Random) -> dict:
    def words():
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 8)))

    messages = [{"role": "system", "content": words()}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 9)):
        reply = {"role": "assistant", "content": words()}
        if rng.random() < 0.3:
            reply["weight"] = 0
        messages += [{"role": "user", "content": words()}, reply]
    return {"messages": messages}


def rendered_by_prefixes(chat: ChatFormat, example: dict) -> tuple[list[int], list[int]]:
    """(ids, labels) by the definition: each reply located by rendering up to it and through it."""
    originals = example["messages"]
    messages, tools = chat.template_messages(originals, example.get("tools") or None)

    def render(upto, prompt):
        if not upto:
            return ""
        extra = {"tools": tools} if tools else {}
        return chat.tokenizer.apply_chat_template(upto, tokenize=False, add_generation_prompt=prompt, **extra)

    text = render(messages, False)
    spans = []
    for i, message in enumerate(originals):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        i += len(messages) - len(originals)
        start = len(commonprefix([render(messages[:i], True), text]))
        end = len(commonprefix([render(messages[: i + 1], False), text]))
        while end > start and text[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    encoded = chat.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(a < span_end and b > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (a, b) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def messages_rendered(tokenizer, example) -> int:
    """How many messages the chat template is given, in all, to render example for training."""
    chat = ChatFormat(tokenizer)
    chat.render(long_conversation(3))  # what a format learns once about its template is not counted
    counted = []
    template = tokenizer.apply_chat_template

    def counting(conversation, **kwargs):
        counted.append(len(conversation))
        return template(conversation, **kwargs)

    tokenizer.apply_chat_template = counting
    try:
        chat.render(example)
    finally:
        del tokenizer.apply_chat_template
    return sum(counted)


def test_it_renders_a_number_of_messages_linear_in_the_turns(tiny_tokenizer):
    short, long = (messages_rendered(tiny_tokenizer, long_conversation(turns)) for turns in (50, 200))

    # Four times the turns: four times the messages (rendering each prefix would be sixteen times).
    assert long <= 4.5 * short
    assert long <= 8 * len(long_conversation(200)["messages"])


@pytest.mark.parametrize("name", TEMPLATES)
def test_it_finds_the_spans_prefix_renders_find(tiny_tokenizer, name):
    chat = ChatFormat(with_template(tiny_tokenizer, TEMPLATES[name]))
    rng = random.Random(name)
    examples = [random_conversation(rng) for _ in range(40)] + [long_conversation(12)]
    examples += [{**example, "messages": example["messages"] * 3} for example in CONVERSATIONS.values()]
    compared = 0
    for example in examples:
        try:
            expected = rendered_by_prefixes(chat, example)
        except Exception:  # noqa: BLE001  # a conversation this template refuses
            continue
        rendered = chat.render(example)
        assert (rendered.input_ids, rendered.labels) == expected, example
        compared += 1
    assert compared >= 40
