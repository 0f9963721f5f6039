"""From token ids to the text a caller may see: incremental decoding and held-back stop strings."""

from typing import Any

from llm.chat.tools import TOOL_CALL_OPEN, parse_tool_calls

from .hf import TokenDecoder

_PARTIAL_CHARACTER = "\ufffd"


class IncrementalDecoder:
    """Turn token ids into text pieces, one token at a time.

    Decoding a token alone loses what depends on its neighbours (a SentencePiece
    word-start space, the rest of a multi-byte character split over several byte
    tokens). So each step decodes a short window that starts at the previous step's
    tokens and keeps only what the new tokens added; a window that ends in the middle
    of a character waits for the bytes that complete it.
    """

    def __init__(self, tokenizer: TokenDecoder) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._window_start = 0
        self._shown_end = 0

    def push(self, token_id: int) -> str:
        """Add one token and return the text it completes (may be empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return what is still held back; call once after the last token."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._shown_end == len(self._ids):
            return ""
        before = self._decode(self._ids[self._window_start : self._shown_end])
        after = self._decode(self._ids[self._window_start :])
        if after.endswith(_PARTIAL_CHARACTER) and not final:
            return ""
        self._window_start, self._shown_end = self._shown_end, len(self._ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class OutputFilter:
    """Decide how much generated text may be shown yet.

    Text that could be the start of a stop string is held back until it is clearly
    not one; a stop string ends the text. With tools, tool-call markup (and a reply
    that starts like bare JSON) is held back too, to be parsed at the end instead of
    shown. What was shown is always the start of the final content.
    """

    def __init__(self, *, stop: list[str] | None = None, tools: bool = False) -> None:
        self.text = ""
        self.stopped = False
        self._stop = [s for s in stop or [] if s]
        self._tools = tools
        self._guarded = self._stop + ([TOOL_CALL_OPEN] if tools else [])
        self._shown = 0

    def push(self, piece: str) -> str:
        """Add newly decoded text and return the part that may be shown now."""
        if self.stopped or not piece:
            return ""
        searched_up_to = len(self.text)
        self.text += piece
        if self._tools and self._shown == 0:
            self.text = self.text.lstrip()
            searched_up_to = 0
        self._cut_at_stop_string(searched_up_to)
        return self._show_up_to(self._safe_end())

    def finish(self) -> tuple[str, list[dict[str, Any]], str]:
        """Return the final content, its tool calls and the last piece to show."""
        if self._tools:
            content, tool_calls = parse_tool_calls(self.text)
        else:
            content, tool_calls = self.text, []
        shown = self.text[: self._shown]
        last_piece = content[len(shown) :] if content.startswith(shown) else ""
        return content, tool_calls, last_piece

    def _cut_at_stop_string(self, searched_up_to: int) -> None:
        cuts = []
        for stop in self._stop:
            found = self.text.find(stop, max(0, searched_up_to - len(stop) + 1))
            if found >= 0:
                cuts.append(found)
        if cuts:
            self.text = self.text[: min(cuts)]
            self.stopped = True

    def _safe_end(self) -> int:
        text = self.text
        end = len(text) if self.stopped else len(text) - _held_suffix_length(text, self._guarded)
        if self._tools:
            markup = text.find(TOOL_CALL_OPEN)
            if markup >= 0:
                end = min(end, markup)
            if text[:1] in ("{", "[", "`"):
                end = 0
            end = len(text[:end].rstrip())  # trailing space may turn out to precede markup
        return end

    def _show_up_to(self, end: int) -> str:
        if end <= self._shown:
            return ""
        piece = self.text[self._shown : end]
        self._shown = end
        return piece


def _held_suffix_length(text: str, guarded: list[str]) -> int:
    """Length of the longest end of text that is the beginning of a guarded string."""
    longest = min(len(text), max((len(s) - 1 for s in guarded), default=0))
    for length in range(longest, 0, -1):
        tail = text[-length:]
        if any(s.startswith(tail) for s in guarded):
            return length
    return 0
