"""Per-request work on one row's scores before the engine picks its token, and after.

Presence and frequency penalties, a logit bias, a grammar mask and logprobs are each
asked for by few requests, so a request that asks for none of them has no RowShaper:
its row costs the decoding pass nothing more than before. A request that asks for any
gets one, which, on that row's scores only:

1. subtracts the penalties (OpenAI's formula, over the tokens this answer generated so
   far: `score - frequency_penalty * count - presence_penalty * (count > 0)`),
2. adds the logit bias,
3. takes the log-softmax of those scores for logprobs (as OpenAI does: the model's
   scores after penalties and bias, before the grammar mask, temperature and top_p),
4. masks out what the grammar forbids next.

Once the engine has picked the token, `accept` counts it, advances the grammar and
writes its logprob entry.
"""

import re
from typing import Any

import torch

from .constraints import GrammarMatcher
from .errors import InvalidRequest
from .schema import GenerationRequest

MAX_TOP_LOGPROBS = 20
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def needs_shaping(request: GenerationRequest) -> bool:
    """Whether a request asks for any per-row work on its scores (grammars are decided apart)."""
    return bool(request.presence_penalty or request.frequency_penalty or request.logit_bias or request.logprobs)


def read_logit_bias(logit_bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """Token id -> bias, refusing ids that are not tokens of this model (a 400 naming logit_bias)."""
    bias: dict[int, float] = {}
    bad = []
    for key, value in (logit_bias or {}).items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            bad.append(str(key))
            continue
        if not 0 <= token < vocab_size:
            bad.append(str(key))
            continue
        bias[token] = float(value)
    if bad:
        raise InvalidRequest(
            [f"logit_bias names tokens this model does not have: {', '.join(bad[:5])} (ids are 0..{vocab_size - 1})"],
            param="logit_bias",
        )
    return bias


class TokenTable:
    """Each token's text and exact bytes, for logprob entries; read from the tokenizer on first use."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._known: dict[int, tuple[str, list[int]]] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def entry(self, token: int) -> tuple[str, list[int]]:
        known = self._known.get(token)
        if known is None:
            raw = self._bytes(token)
            known = self._known[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return known

    def _bytes(self, token: int) -> bytes:
        if token not in self._special:
            piece = self._tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str):
                byte = _BYTE_TOKEN.fullmatch(piece)
                if byte:  # SentencePiece's byte fallback
                    return bytes([int(byte.group(1), 16)])
                if self._byte_level and all(ch in _BYTE_OF_CHARACTER for ch in piece):
                    return bytes(_BYTE_OF_CHARACTER[ch] for ch in piece)
        text: str = self._tokenizer.decode([token], skip_special_tokens=False)
        return text.encode()


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE vocabularies spell each byte as one printable character: printable
    ASCII and Latin-1 bytes as themselves, the others shifted to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(byte): byte for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet


_BYTE_OF_CHARACTER = _byte_level_alphabet()


class RowShaper:
    """One request's penalties, bias, grammar and logprobs, applied to its own row of scores."""

    def __init__(
        self,
        request: GenerationRequest,
        *,
        vocab_size: int,
        device: torch.device,
        tokens: TokenTable,
        grammar: GrammarMatcher | None = None,
    ) -> None:
        self._presence = request.presence_penalty
        self._frequency = request.frequency_penalty
        penalised = bool(self._presence or self._frequency)
        self._counts = torch.zeros(vocab_size, device=device) if penalised else None
        bias = read_logit_bias(request.logit_bias, vocab_size)
        self._bias: torch.Tensor | None = None
        if bias:
            self._bias = torch.zeros(vocab_size, device=device)
            self._bias[torch.tensor(list(bias), device=device)] = torch.tensor(list(bias.values()), device=device)
        self._top = min(request.top_logprobs, MAX_TOP_LOGPROBS) if request.logprobs else None
        self._tokens = tokens
        self._logprobs: torch.Tensor | None = None
        self.grammar = grammar
        self.entries: list[dict[str, Any]] = []
        """Every generated token's logprob entry so far (with logprobs)."""
        self._sent = 0

    def shape(self, scores: torch.Tensor) -> torch.Tensor:
        """The row's float32 scores as the token is to be picked from them (may be the same tensor, changed)."""
        width = scores.shape[-1]
        if self._counts is not None:
            counts = self._counts[:width]
            scores = scores - self._frequency * counts - self._presence * (counts > 0).float()
        if self._bias is not None:
            scores = scores + self._bias[:width]
        if self._top is not None:
            self._logprobs = torch.log_softmax(scores, dim=-1)
        if self.grammar is not None:
            self.grammar.mask(scores)
        return scores

    def accept(self, token: int) -> None:
        """Follow the token the engine picked: count it, advance the grammar, write its logprob entry."""
        if self._counts is not None:
            self._counts[token] += 1
        if self.grammar is not None:
            self.grammar.accept(token)
        if self._top is not None and self._logprobs is not None:
            self.entries.append(self._entry(token, self._logprobs))

    def unsent(self) -> list[dict[str, Any]]:
        """The entries not yet handed out with a piece of text."""
        fresh = self.entries[self._sent :]
        self._sent = len(self.entries)
        return fresh

    @property
    def wants_logprobs(self) -> bool:
        return self._top is not None

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing more may be generated."""
        return self.grammar is not None and self.grammar.done

    def _entry(self, token: int, logprobs: torch.Tensor) -> dict[str, Any]:
        entry = self._token(token, float(logprobs[token]))
        top: list[dict[str, Any]] = []
        if self._top:
            values, ids = torch.topk(logprobs, self._top)
            top = [self._token(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True)]
        return {**entry, "top_logprobs": top}

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        text, raw = self._tokens.entry(token)
        # OpenAI writes -9999.0 for a token that cannot occur (a -100 bias); JSON has no -Infinity.
        return {"token": text, "logprob": min(max(logprob, -9999.0), 0.0), "bytes": raw}
