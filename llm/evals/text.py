"""Text similarity metrics over one CJK-aware tokenizer.

The metrics come from the libraries people cite (sacrebleu, rouge-score, nltk, rapidfuzz);
only the tokenisation is ours. Splitting on whitespace would turn a Chinese or Japanese
answer into a single token, and every metric into exact match, so Han ideographs, kana and
Hangul syllables each count as one token, as sacrebleu's "zh" tokenizer counts Han.
"""

import re
from functools import cache, lru_cache
from typing import Any

from nltk.translate.gleu_score import sentence_gleu
from nltk.translate.meteor_score import meteor_score
from rapidfuzz import fuzz
from rouge_score import rouge_scorer
from sacrebleu.metrics.bleu import BLEU

CJK = (  # character ranges written one token each (also the comparison page's diff)
    "\u3005"  # 々, the ideographic iteration mark
    "\u3040-\u30ff"  # hiragana, katakana
    "\u31f0-\u31ff"  # katakana phonetic extensions
    "\u3400-\u4dbf"  # Han extension A
    "\u4e00-\u9fff"  # Han
    "\uac00-\ud7af"  # Hangul syllables
    "\uf900-\ufaff"  # Han compatibility ideographs
    "\uff66-\uff9f"  # half-width katakana
    "\U00020000-\U0003134f"  # Han extensions B to G
)
_TOKEN = re.compile(f"[{CJK}]|[^\\W{CJK}]+")
_CJK_CHARACTER = re.compile(f"[{CJK}]")

ROUGE_KINDS = {f"rouge_{n}": f"rouge{n}" for n in range(1, 6)} | {"rouge_l": "rougeL"}
METRICS = ("fuzzy_match", "bleu", "gleu", "meteor", *ROUGE_KINDS)


def tokens(text: str) -> list[str]:
    """Split text into lowercased word tokens, one per Han ideograph, kana or Hangul syllable; drop punctuation."""
    return [token.lower() for token in _TOKEN.findall(text)]


def is_cjk(character: str) -> bool:
    """Tell whether the character is a Han ideograph, kana or Hangul syllable: a token of its own."""
    return bool(_CJK_CHARACTER.fullmatch(character))


def fuzzy_match(a: str, b: str) -> float:
    """Return rapidfuzz's normalised Indel similarity of the raw strings, in [0, 1]."""
    if not a or not b:
        return _empty_score(a, b)
    return float(fuzz.ratio(a, b)) / 100


def bleu(hyp: str, ref: str) -> float:
    """Return sacrebleu's sentence BLEU (exponential smoothing, effective order) over our tokens, in [0, 1]."""
    hyp_tokens, ref_tokens = tokens(hyp), tokens(ref)
    if not hyp_tokens or not ref_tokens:
        return _empty_score(hyp_tokens, ref_tokens)
    score = _bleu_metric().sentence_score(" ".join(hyp_tokens), [" ".join(ref_tokens)])
    return float(score.score) / 100


def gleu(hyp: str, ref: str) -> float:
    """Return nltk's sentence GLEU (1- to 4-grams) over our tokens."""
    hyp_tokens, ref_tokens = tokens(hyp), tokens(ref)
    if not hyp_tokens or not ref_tokens:
        return _empty_score(hyp_tokens, ref_tokens)
    return float(sentence_gleu([ref_tokens], hyp_tokens))


def meteor(hyp: str, ref: str) -> float:
    """Return nltk's METEOR over our tokens, with exact and Porter-stem matches only.

    nltk's METEOR also matches WordNet synonyms, but the WordNet corpus is a separate
    download that this product does not ship, so synonyms never match here and scores can
    be lower than those of a setup that has WordNet.
    """
    hyp_tokens, ref_tokens = tokens(hyp), tokens(ref)
    if not hyp_tokens or not ref_tokens:
        return _empty_score(hyp_tokens, ref_tokens)
    return float(meteor_score([ref_tokens], hyp_tokens, wordnet=_NoSynonyms()))


def rouge(hyp: str, ref: str, kind: str) -> float:
    """Return rouge-score's F-measure for kind ("rouge1" to "rouge5" or "rougeL") over our tokens."""
    if kind not in ROUGE_KINDS.values():
        raise ValueError(f"unknown ROUGE kind {kind!r}")
    hyp_tokens, ref_tokens = tokens(hyp), tokens(ref)
    if not hyp_tokens or not ref_tokens:
        return _empty_score(hyp_tokens, ref_tokens)
    return float(_rouge_scorer(kind).score(ref, hyp)[kind].fmeasure)


def similarity(metric: str, hyp: str, ref: str) -> float:
    """Score hyp against ref with an OpenAI text_similarity metric name ("bleu", "rouge_l", ...)."""
    if metric == "fuzzy_match":
        return fuzzy_match(hyp, ref)
    if metric == "bleu":
        return bleu(hyp, ref)
    if metric == "gleu":
        return gleu(hyp, ref)
    if metric == "meteor":
        return meteor(hyp, ref)
    if metric in ROUGE_KINDS:
        return rouge(hyp, ref, ROUGE_KINDS[metric])
    raise ValueError(f"unknown similarity metric {metric!r}")


def _empty_score(a: object, b: object) -> float:
    # Two empty answers agree; one empty answer shares nothing. Some libraries divide by zero here.
    return 1.0 if not a and not b else 0.0


class _Tokenizer:
    """The tokenizer object rouge-score asks for."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


class _NoSynonyms:
    """Stands in for nltk's WordNet reader: it knows no synonyms."""

    def synsets(self, word: str) -> list[Any]:
        return []


@lru_cache(maxsize=1)
def _bleu_metric() -> BLEU:
    return BLEU(tokenize="none", effective_order=True)


@cache
def _rouge_scorer(kind: str) -> Any:
    return rouge_scorer.RougeScorer([kind], tokenizer=_Tokenizer())
