"""What a page shows of a dataset: examples as chats and the exact text the model trains on.

Reads the stored files line by line; nothing here holds a whole file in memory.
"""

import json
import logging
from functools import lru_cache
from itertools import islice
from urllib.parse import urlsplit

from llm.chat import ChatFormatError, chat_format

from .formats import CONVERTED_FORMATS, normalize_example
from .token_stats import IMAGE_TOKENS, count_images, training_sequences, without_images
from .validation import example_lines

log = logging.getLogger(__name__)

MAX_SHOWN_IMAGE_CHARS = 256 * 1024
"""An inline (data URL) image up to this long is shown; a page holds ten examples, so larger ones are only named."""


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def preview_page(
    original_fp, normalized_fp, *, page: int, per_page: int, tokenizer=None, max_seq_len: int = 1024
) -> list[dict]:
    """Examples page (1-based): original line, messages to show, conversion and trained segments.

    Each item has "messages" (a chat, or a preference pair's input), "answers"
    (a preference pair's preferred and non-preferred outputs, labelled) and
    "rendered": one block of segments per sequence training sees.
    """
    start = (page - 1) * per_page
    # The validator's own line reading, so a BOM or blank line cannot pair an original with the wrong example.
    originals = islice(example_lines(original_fp), start, start + per_page)
    normalized = islice(example_lines(normalized_fp), start, start + per_page)
    items = []
    for offset, (raw, chat_line) in enumerate(zip(originals, normalized, strict=False)):
        example = json.loads(chat_line)
        source = json.loads(raw.decode("utf-8"))
        _, source_format = normalize_example(source)
        items.append(
            {
                "number": start + offset + 1,
                "messages": shown_messages(
                    example["messages"] if "messages" in example else example["input"]["messages"]
                ),
                "answers": _shown_answers(example),
                "source_format": source_format,
                "converted_from": json.dumps(source, ensure_ascii=False, indent=1)
                if source_format in CONVERTED_FORMATS
                else "",
                "rendered": _rendered(tokenizer, example, max_seq_len=max_seq_len) if tokenizer else [],
            }
        )
    return items


def shown_messages(messages: list[dict]) -> list[dict]:
    """The messages as a page shows them: content split into text, image and link parts.

    Inline images small enough are shown; web images only get a link, so opening
    the preview never makes the browser fetch from addresses in an uploaded file.
    """
    return [{**message, "parts": _shown_parts(message.get("content"))} for message in messages]


def _shown_parts(content) -> list[dict]:
    if not content:
        return []
    if isinstance(content, str):
        return [{"text": content}]
    return [{"text": part.get("text", "")} if part.get("type") == "text" else _shown_image(part) for part in content]


def _shown_image(part: dict) -> dict:
    url = (part.get("image_url") or {}).get("url") or ""
    if url.startswith("data:image/"):
        if len(url) <= MAX_SHOWN_IMAGE_CHARS:
            return {"image": url}
        return {"marker": f"[image: inline, about {len(url) * 3 // 4 // 1024:,} KB, too large to show here]"}
    if urlsplit(url).scheme in ("http", "https"):
        return {"link": url}
    return {"marker": "[image]"}


def _shown_answers(example: dict) -> list[dict]:
    if "messages" in example:
        return []
    return [
        {"label": "Preferred answer", "preferred": True, "messages": shown_messages(example["preferred_output"])},
        {
            "label": "Non-preferred answer",
            "preferred": False,
            "messages": shown_messages(example["non_preferred_output"]),
        },
    ]


def _rendered(tokenizer, example: dict, *, max_seq_len: int) -> list[dict]:
    """One labelled block of segments per sequence: the chat, or the input with each answer."""
    labels = [""] if "messages" in example else ["input + preferred answer", "input + non-preferred answer"]
    return [
        {"label": label, "segments": trained_segments(tokenizer, sequence, max_seq_len=max_seq_len)}
        for label, sequence in zip(labels, training_sequences(example), strict=True)
    ]


def trained_segments(tokenizer, example: dict, *, max_seq_len: int) -> list[dict]:
    """The rendered chat template split into runs of trained and untrained tokens.

    Images are left out of the text (the template renders text only) and named in
    a note; a template that refuses the example gets a note instead of the text.
    """
    try:
        rendered = chat_format(tokenizer).render(without_images(example), max_seq_len=max_seq_len)
    except ChatFormatError as problem:  # one example the template refuses must not take the page down
        log.info("preview cannot render an example: %s", problem)
        return [_note(f"The trained tokens cannot be shown for this example: {problem}")]
    mask = rendered.loss_mask
    segments, run, current = [], [], None
    for token, trained in zip(rendered.input_ids, mask, strict=True):
        if trained != current and run:
            segments.append({"text": tokenizer.decode(run), "trained": bool(current)})
            run = []
        current = trained
        run.append(token)
    if run:
        segments.append({"text": tokenizer.decode(run), "trained": bool(current)})
    if rendered.truncated_tokens:
        segments.append(_note(f" … {rendered.truncated_tokens} tokens cut at max length {max_seq_len}"))
    images, _ = count_images(example["messages"])
    if images:
        segments.append(
            _note(
                f" … plus {images} image{'s' if images != 1 else ''}, {IMAGE_TOKENS:,} tokens each, not shown as text"
            )
        )
    return segments


def _note(text: str) -> dict:
    return {"text": text, "trained": False, "note": True}
