"""Text metrics equal the reference libraries' own outputs, on English and on Chinese text."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from llm.evals.text import METRICS, bleu, fuzzy_match, gleu, meteor, rouge, similarity, tokens

ENGLISH_PAIRS = [
    ("the cat sat on the mat", "the cat is sitting on the mat"),
    ("there is a cat on the mat today", "a cat was on the mat"),
    ("my card has not arrived yet", "my new card has still not arrived"),
    ("completely different words", "nothing shared here"),
]
CHINESE_PAIRS = [
    ("猫坐在垫子上", "猫在垫子上"),
    ("我的银行卡还没有到", "我的新卡还没有寄到"),
    ("今天天气很好", "明天会下雨"),
]


def test_tokens_split_cjk_by_character_and_words_by_word():
    assert tokens("The cat, the MAT!") == ["the", "cat", "the", "mat"]
    assert tokens("猫坐在垫子上。") == ["猫", "坐", "在", "垫", "子", "上"]
    assert tokens("東京タワーに行きました。") == ["東", "京", "タ", "ワ", "ー", "に", "行", "き", "ま", "し", "た"]
    assert tokens("GPT-4は便利です") == ["gpt", "4", "は", "便", "利", "で", "す"]
    assert tokens("안녕하세요 world_1") == ["안", "녕", "하", "세", "요", "world_1"]
    assert tokens(" ...!? ") == []


@pytest.mark.parametrize("hyp, ref", ENGLISH_PAIRS)
def test_bleu_on_english_equals_sacrebleu_default(hyp, ref):
    assert bleu(hyp, ref) == pytest.approx(sacrebleu.sentence_bleu(hyp, [ref]).score / 100)


@pytest.mark.parametrize("hyp, ref", CHINESE_PAIRS)
def test_bleu_on_chinese_equals_sacrebleu_zh(hyp, ref):
    expected = sacrebleu.sentence_bleu(hyp, [ref], tokenize="zh").score / 100
    assert bleu(hyp, ref) == pytest.approx(expected)
    assert expected > 0 or hyp == "今天天气很好"


@pytest.mark.parametrize("hyp, ref", ENGLISH_PAIRS)
@pytest.mark.parametrize("kind", ["rouge1", "rouge2", "rouge3", "rouge4", "rouge5", "rougeL"])
def test_rouge_on_english_equals_rouge_score_default(hyp, ref, kind):
    expected = rouge_scorer.RougeScorer([kind]).score(ref, hyp)[kind].fmeasure
    assert rouge(hyp, ref, kind) == pytest.approx(expected)


def test_rouge_on_chinese_needs_our_tokenizer_and_equals_a_hand_count():
    hyp, ref = "猫坐在垫子上", "猫在垫子上"
    # rouge-score's own tokenizer keeps only [a-z0-9] runs, so Chinese text has no tokens at all.
    default = rouge_scorer.RougeScorer(["rouge1", "rougeL"]).score(ref, hyp)
    assert default["rouge1"].fmeasure == 0 and default["rougeL"].fmeasure == 0
    # LCS 猫在垫子上: 5 of the 6 answer characters, 5 of the 5 reference ones. F = 2 * 5/6 * 1 / (5/6 + 1) = 10/11.
    assert rouge(hyp, ref, "rougeL") == pytest.approx(10 / 11)
    assert rouge(hyp, ref, "rouge1") == pytest.approx(10 / 11)
    # Bigrams: 猫坐 坐在 在垫 垫子 子上 against 猫在 在垫 垫子 子上; 3 shared. P 3/5, R 3/4, F = 2/3.
    assert rouge(hyp, ref, "rouge2") == pytest.approx(2 / 3)
    assert similarity("rouge_l", hyp, ref) == rouge(hyp, ref, "rougeL")


def test_fuzzy_match_by_hand():
    # The longest common subsequence of kitten and sitting is "ittn": 2 * 4 / (6 + 7).
    assert fuzzy_match("kitten", "sitting") == pytest.approx(8 / 13)
    assert fuzzy_match("abc", "abc") == 1.0


def test_gleu_by_hand():
    # 1- to 4-grams of "the cat sat": the, cat, sat, the cat, cat sat, the cat sat (6); of "the cat ran" also 6.
    # Shared: the, cat, the cat (3). GLEU = min(3/6, 3/6).
    assert gleu("the cat sat", "the cat ran") == pytest.approx(0.5)
    assert gleu("猫坐下", "猫坐下") == 1.0


def test_meteor_by_hand_with_stems_but_no_synonyms():
    # 3 matches in 1 chunk: P = R = F = 1; penalty 0.5 * (1/3)^3 = 1/54.
    assert meteor("the cat sat", "the cat sat") == pytest.approx(53 / 54)
    # "cats" and "cat" share a Porter stem, so the score is the same.
    assert meteor("the cats sat", "the cat sat") == pytest.approx(53 / 54)
    # WordNet would call these synonyms; without its data they do not match.
    assert meteor("big", "large") == 0.0


@pytest.mark.parametrize("metric", METRICS)
def test_empty_answers(metric):
    assert similarity(metric, "", "") == 1.0
    assert similarity(metric, "", "reference") == 0.0
    assert similarity(metric, "answer", "") == 0.0
    if metric != "fuzzy_match":
        assert similarity(metric, "!!!", "?") == 1.0  # no tokens on either side
    assert 0.0 <= similarity(metric, "the cat sat on the mat", "the cat is on the mat") <= 1.0


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="cosine"):
        similarity("cosine", "a", "b")
    with pytest.raises(ValueError, match="rouge9"):
        rouge("a", "b", "rouge9")
