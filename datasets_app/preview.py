"""What a page shows of a dataset: examples as chats and the exact text the model trains on.

Reads the stored files line by line; nothing here holds a whole file in memory.
"""

import json
from functools import lru_cache
from itertools import islice

from .formats import CONVERTED_FORMATS, normalize_example


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _non_blank(fp):
    for raw in fp:
        if raw.strip():
            yield raw


def preview_page(original_fp, normalized_fp, *, page: int, per_page: int, tokenizer=None, max_seq_len: int = 1024) -> list[dict]:
    """Examples page (1-based): original line, normalized chat, conversion and trained segments."""
    start = (page - 1) * per_page
    originals = islice(_non_blank(original_fp), start, start + per_page)
    normalized = islice(_non_blank(normalized_fp), start, start + per_page)
    items = []
    for offset, (raw, chat_line) in enumerate(zip(originals, normalized)):
        example = json.loads(chat_line)
        source = json.loads(raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw)
        _, source_format = normalize_example(source)
        item = {
            "number": start + offset + 1,
            "example": example,
            "source_format": source_format,
            "converted_from": json.dumps(source, ensure_ascii=False, indent=1) if source_format in CONVERTED_FORMATS else "",
            "segments": trained_segments(tokenizer, example, max_seq_len=max_seq_len) if tokenizer and "messages" in example else [],
        }
        items.append(item)
    return items


def trained_segments(tokenizer, example: dict, *, max_seq_len: int) -> list[dict]:
    """The rendered chat template split into runs of trained and untrained tokens."""
    from jobs_app.engine.data import render_example

    rendered = render_example(tokenizer, example, loss_on="assistant", max_seq_len=max_seq_len)
    mask = rendered.loss_mask
    segments, run, current = [], [], None
    for token, trained in zip(rendered.input_ids, mask):
        if trained != current and run:
            segments.append({"text": tokenizer.decode(run), "trained": bool(current)})
            run = []
        current = trained
        run.append(token)
    if run:
        segments.append({"text": tokenizer.decode(run), "trained": bool(current)})
    if rendered.truncated_tokens:
        segments.append({"text": f" … {rendered.truncated_tokens} tokens cut at max length {max_seq_len}", "trained": False, "note": True})
    return segments
