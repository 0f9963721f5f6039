"""Graders against hand-computed values; definitions refused with the field named; templates."""

import json

import pytest

from llm.evals.graders import (
    GraderError,
    Sample,
    check_criteria,
    default_criteria,
    grade,
    judge_models,
)
from llm.evals.templates import MissingField, referenced_fields, render

ITEM = {
    "input": [{"role": "user", "content": "What is the capital of France?"}],
    "reference": "Paris",
    "meta": {"tags": ["geo", "easy"], "level": 2},
}


def string_check(operation: str, reference: str = "{{item.reference}}") -> dict:
    return {
        "type": "string_check",
        "name": operation,
        "input": "{{sample.output_text}}",
        "reference": reference,
        "operation": operation,
    }


def fuzzy(threshold: float = 0.5) -> dict:
    return {
        "type": "text_similarity",
        "name": "fuzzy",
        "input": "{{sample.output_text}}",
        "reference": "{{item.reference}}",
        "evaluation_metric": "fuzzy_match",
        "pass_threshold": threshold,
    }


def tool(name: str, arguments: dict | str | None = None) -> dict:
    """A tool call in OpenAI's shape, arguments as a JSON string."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments or {})
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": text}}


def fake_judge(answer: str, seen: list | None = None):
    def judge(model: str, messages: list[dict], sampling_params: dict) -> str:
        if seen is not None:
            seen.append((model, messages, sampling_params))
        return answer

    return judge


# Templates


def test_it_renders_paths_into_the_item_and_the_sample():
    sample = Sample("Paris", [tool("lookup", {"q": "x"})])
    template = "Q: {{ item.input.0.content }} | tags {{item.meta.tags}} | level {{item.meta.level}} | A: {{sample.output_text}}"
    assert render(template, ITEM, sample) == (
        'Q: What is the capital of France? | tags ["geo","easy"] | level 2 | A: Paris'
    )
    assert render("{{sample.output_tools}}", ITEM, sample) == (
        '[{"id":"call_lookup","type":"function","function":{"name":"lookup","arguments":"{\\"q\\": \\"x\\"}"}}]'
    )
    assert referenced_fields(template) == {
        "item.input.0.content",
        "item.meta.tags",
        "item.meta.level",
        "sample.output_text",
    }


def test_it_names_the_whole_missing_path():
    for template, path in [
        ("{{item.answer}}", "item.answer"),
        ("{{item.input.3.content}}", "item.input.3.content"),
        ("{{item.reference.x}}", "item.reference.x"),
        ("{{sample.output_text}}", "sample.output_text"),
    ]:
        with pytest.raises(MissingField) as missing:
            render(template, ITEM, None)
        assert missing.value.path == path
        assert str(missing.value) == f"{path} is missing"


# string_check


@pytest.mark.parametrize(
    "operation, answer, score",
    [
        ("eq", " Paris\n", 1.0),  # eq strips surrounding whitespace
        ("eq", "paris", 0.0),
        ("eq", "Paris is the capital", 0.0),
        ("ne", "Lyon", 1.0),
        ("ne", "Paris ", 0.0),
        ("like", "The capital is Paris.", 1.0),
        ("like", "the capital is paris.", 0.0),
        ("ilike", "the capital is PARIS.", 1.0),
        ("ilike", "Lyon", 0.0),
    ],
)
def test_string_check_operations(operation, answer, score):
    result = grade(string_check(operation), ITEM, Sample(answer))
    assert (result.score, result.passed, result.error) == (score, score == 1.0, None)
    assert result.detail == {"input": answer, "reference": "Paris"}


# text_similarity


def test_fuzzy_match_is_the_indel_ratio_computed_by_hand():
    # kitten / sitting: the longest common subsequence is "ittn", 4 characters of 6 + 7: 2 * 4 / 13.
    item = {"reference": "sitting"}
    result = grade(fuzzy(0.6), item, Sample("kitten"))
    assert result.score == pytest.approx(8 / 13) and result.passed is True
    assert grade(fuzzy(0.62), item, Sample("kitten")).passed is False


def test_rouge_l_grader_scores_chinese_by_character():
    spec = {**fuzzy(), "evaluation_metric": "rouge_l"}
    # LCS 猫在垫子上 = 5 of 6 answer characters and 5 of 5 reference characters: F = 10 / 11.
    result = grade(spec, {"reference": "猫在垫子上"}, Sample("猫坐在垫子上"))
    assert result.score == pytest.approx(10 / 11) and result.passed is True


# tool_call


WEATHER_REFERENCE = [
    {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    {"name": "get_time", "arguments": {}},
]


def grade_tools(calls: list[dict], reference) -> tuple:
    result = grade({"type": "tool_call", "name": "tool_call"}, {"reference_tool_calls": reference}, Sample("", calls))
    return result.score, result.passed, result.detail.get("mismatches"), result.error


def test_tool_call_all_keys_and_names_match():
    calls = [tool("get_weather", {"unit": "celsius", "city": "Paris"}), tool("get_time")]
    assert grade_tools(calls, WEATHER_REFERENCE) == (1.0, True, [], None)
    # The reference may be stored as a JSON string, in OpenAI's shape, with arguments as a string.
    assert grade_tools(
        calls, json.dumps([tool("get_weather", {"city": "Paris", "unit": "celsius"}), tool("get_time")])
    )[:2] == (1.0, True)


def test_tool_call_scores_matched_keys_over_reference_keys():
    # 3 keys in all: city and unit, plus 1 for get_time, which has no arguments. city and get_time match.
    calls = [tool("get_weather", {"city": "Paris", "unit": "fahrenheit"}), tool("get_time")]
    score, passed, mismatches, _ = grade_tools(calls, WEATHER_REFERENCE)
    assert score == pytest.approx(2 / 3) and passed is False
    assert mismatches == [
        {"call": 0, "key": "unit", "expected": "celsius", "got": "fahrenheit", "problem": "wrong value"}
    ]


def test_tool_call_wrong_name_scores_none_of_its_keys():
    calls = [tool("get_forecast", {"city": "Paris", "unit": "celsius"}), tool("get_time")]
    score, passed, mismatches, _ = grade_tools(calls, WEATHER_REFERENCE)
    assert score == pytest.approx(1 / 3) and passed is False
    assert mismatches == [
        {"call": 0, "key": None, "expected": "get_weather", "got": "get_forecast", "problem": "wrong name"}
    ]


def test_tool_call_missing_and_extra_calls_and_keys_fail():
    score, passed, mismatches, _ = grade_tools([tool("get_weather", {"city": "Paris"})], WEATHER_REFERENCE)
    assert score == pytest.approx(1 / 3) and passed is False
    assert [(m["call"], m["key"], m["problem"]) for m in mismatches] == [
        (0, "unit", "missing key"),
        (1, None, "missing call"),
    ]

    extra = [tool("get_weather", {"city": "Paris", "unit": "celsius", "days": 3}), tool("get_time"), tool("get_time")]
    score, passed, mismatches, _ = grade_tools(extra, WEATHER_REFERENCE)
    # Extra keys and calls cost no reference key, but the calls are not the expected ones.
    assert score == 1.0 and passed is False
    assert [(m["call"], m["key"], m["problem"]) for m in mismatches] == [
        (0, "days", "extra key"),
        (2, None, "extra call"),
    ]


def test_tool_call_compares_arguments_as_json_values():
    reference = [{"name": "f", "arguments": {"n": 1, "flag": True, "xs": [1, {"a": None}]}}]
    assert grade_tools([tool("f", {"n": 1.0, "flag": True, "xs": [1.0, {"a": None}]})], reference)[:2] == (1.0, True)
    score, passed, mismatches, _ = grade_tools([tool("f", {"n": True, "flag": 1, "xs": [1]})], reference)
    assert score == 0.0 and passed is False and [m["key"] for m in mismatches] == ["n", "flag", "xs"]


def test_tool_call_answer_that_is_not_json_scores_zero_and_a_broken_reference_is_an_error():
    score, passed, mismatches, error = grade_tools([tool("get_time", "{not json")], [{"name": "get_time"}])
    # get_time has no reference arguments: its name is matched, but its arguments are not the empty object.
    assert (score, passed, error) == (1.0, False, None) and mismatches[0]["problem"] == "wrong arguments"
    assert grade_tools([], [])[:2] == (1.0, True)
    assert grade_tools([tool("get_time")], [])[:2] == (0.0, False)
    *_, error = grade_tools([], "not a list")
    assert error == "the reference is not a list of tool calls: 'not a list'"


def test_tool_call_without_reference_field_is_an_error_result():
    result = grade({"type": "tool_call", "name": "tool_call"}, ITEM, Sample("", [tool("get_time")]))
    assert (result.score, result.passed, result.error) == (None, None, "item.reference_tool_calls is missing")


# multi


def multi(formula: str, **extra) -> dict:
    return {
        "type": "multi",
        "name": "combined",
        "graders": {"exact": string_check("eq"), "fuzzy": fuzzy()},
        "calculate_output": formula,
        **extra,
    }


def test_multi_formula_over_sub_scores():
    item = {"reference": "sitting"}
    # exact = 0, fuzzy = 8/13.
    assert grade(multi("(2 * exact + fuzzy) / 3"), item, Sample("kitten")).score == pytest.approx(8 / 39)
    result = grade(
        multi("max(exact, fuzzy) + sqrt(4) - abs(-1) + exp(0) * log(1) + -exact ** 2"), item, Sample("kitten")
    )
    assert result.score == pytest.approx(8 / 13 + 1)
    assert result.detail["graders"]["fuzzy"]["score"] == pytest.approx(8 / 13)
    # Without a threshold a multi passes when every sub-grader passed; exact did not.
    assert result.passed is False
    assert grade(multi("fuzzy", pass_threshold=0.6), item, Sample("kitten")).passed is True
    assert grade(multi("exact + fuzzy"), item, Sample("sitting")).score == 2.0


def test_multi_is_an_error_when_a_sub_grader_or_the_formula_fails():
    result = grade(multi("exact + fuzzy"), {"answer": "x"}, Sample("kitten"))
    assert result.score is None and result.error == "grader 'exact' failed: item.reference is missing"
    result = grade(multi("fuzzy / exact"), {"reference": "sitting"}, Sample("kitten"))
    assert result.score is None and result.error.startswith("calculate_output failed")


@pytest.mark.parametrize(
    "formula, message",
    [
        ("exact + other", "unknown name 'other'"),
        ("__import__('os')", "unknown function '__import__'"),
        ("exact.real", "'exact.real' is not allowed"),
        ("exact if fuzzy else 1", "is not allowed"),
        ("exact + 'x'", "'x' is not a number"),
        ("sqrt(exact, fuzzy)", "sqrt() takes 1 argument"),
        ("min()", "min() takes at least one argument"),
        ("exact +", "is not a formula"),
        ("exact // 2", "is not allowed"),
    ],
)
def test_multi_refuses_a_bad_formula_naming_it(formula, message):
    with pytest.raises(GraderError) as refused:
        check_criteria([multi(formula)], None)
    assert refused.value.path == "testing_criteria[0].calculate_output"
    assert message in refused.value.message


# score_model and label_model


def score_model(**extra) -> dict:
    return {
        "type": "score_model",
        "name": "quality",
        "model": "judge-model",
        "input": [
            {"role": "system", "content": "Rate the answer."},
            {"role": "user", "content": "Reference: {{item.reference}}\nAnswer: {{sample.output_text}}"},
        ],
        **extra,
    }


@pytest.mark.parametrize(
    "answer, score_range, score",
    [
        ("0.8", [0, 1], 0.8),
        ("  1 ", [0, 1], 1.0),
        ('{"score": 7, "why": "mostly right, 2 slips"}', [1, 10], 7.0),
        ('```json\n{"reason": "close", "score": 3.5}\n```', [0, 5], 3.5),
        ("I would rate this 4 out of 5.", [0, 5], 4.0),
    ],
)
def test_score_model_reads_the_judges_number(answer, score_range, score):
    result = grade(score_model(range=score_range), ITEM, Sample("Paris"), fake_judge(answer))
    assert (result.score, result.error, result.detail) == (score, None, {"answer": answer})


def test_score_model_sends_the_rendered_prompt_and_passes_at_the_threshold():
    seen: list = []
    spec = score_model(range=[1, 10], sampling_params={"temperature": 0, "seed": 7})
    result = grade(spec, ITEM, Sample("Paris."), fake_judge("6", seen))
    assert seen == [
        (
            "judge-model",
            [
                {"role": "system", "content": "Rate the answer."},
                {"role": "user", "content": "Reference: Paris\nAnswer: Paris."},
            ],
            {"temperature": 0, "seed": 7},
        )
    ]
    assert result.passed is True  # the middle of [1, 10] is 5.5
    assert grade({**spec, "pass_threshold": 8}, ITEM, Sample("Paris."), fake_judge("6")).passed is False


@pytest.mark.parametrize(
    "answer, error",
    [
        ("maybe", "the judge answered 'maybe': no score in [0, 1]"),
        ("7", "the judge answered '7': no score in [0, 1]"),
        ('{"score": "high"}', 'the judge answered \'{"score": "high"}\': no score in [0, 1]'),
        ("x" * 300, "the judge answered '" + "x" * 119 + "…': no score in [0, 1]"),
    ],
)
def test_score_model_answer_without_a_score_in_range_is_an_error_result(answer, error):
    result = grade(score_model(), ITEM, Sample("Paris"), fake_judge(answer))
    assert (result.score, result.passed, result.error) == (None, None, error)
    assert result.detail == {"answer": answer}


def test_a_judge_that_fails_or_is_missing_gives_an_error_result():
    def broken(model, messages, sampling_params):
        raise ConnectionError("engine is down")

    result = grade(score_model(), ITEM, Sample("Paris"), broken)
    assert result.error == "the judge judge-model failed: ConnectionError: engine is down"
    assert grade(score_model(), ITEM, Sample("Paris")).error == "no judge was given to run judge-model"
    result = grade(score_model(), {"input": []}, Sample("Paris"), fake_judge("1"))
    assert result.error == "item.reference is missing"


def label_model(labels: list[str], passing: list[str]) -> dict:
    return {
        "type": "label_model",
        "name": "sentiment",
        "model": "judge-model",
        "input": [{"role": "user", "content": "Classify: {{sample.output_text}}"}],
        "labels": labels,
        "passing_labels": passing,
    }


@pytest.mark.parametrize(
    "answer, label, passed",
    [
        ("Positive", "positive", True),
        ("  NEGATIVE\n", "negative", False),
        ("The sentiment is negative.", "negative", False),
        ("Label: neutral", "neutral", False),
    ],
)
def test_label_model_matches_one_label(answer, label, passed):
    spec = label_model(["positive", "negative", "neutral"], ["positive"])
    result = grade(spec, ITEM, Sample("great!"), fake_judge(answer))
    assert (result.label, result.passed, result.score, result.error) == (label, passed, float(passed), None)


@pytest.mark.parametrize(
    "answer, error",
    [
        ("positive or negative", "the judge answered 'positive or negative': several labels (positive, negative)"),
        ("unsure", "the judge answered 'unsure': no label of positive, negative, neutral"),
        ("nonpositive", "the judge answered 'nonpositive': no label of positive, negative, neutral"),
    ],
)
def test_label_model_without_exactly_one_label_is_an_error_result(answer, error):
    spec = label_model(["positive", "negative", "neutral"], ["positive"])
    result = grade(spec, ITEM, Sample("great!"), fake_judge(answer))
    assert (result.label, result.score, result.passed, result.error) == (None, None, None, error)


def test_label_model_matches_chinese_labels_and_prefers_the_longer_label():
    spec = label_model(["正面", "负面"], ["正面"])
    result = grade(spec, ITEM, Sample("好"), fake_judge("这条评论是正面的。"))
    assert (result.label, result.passed) == ("正面", True)
    spec = label_model(["card", "credit card"], ["card"])
    assert grade(spec, ITEM, Sample("x"), fake_judge("It is about a credit card.")).label == "credit card"
    assert grade(spec, ITEM, Sample("x"), fake_judge("card")).label == "card"


# Results and errors


def test_missing_field_is_an_error_result_not_an_exception():
    result = grade(string_check("eq", "{{item.answer}}"), ITEM, Sample("Paris"))
    assert result.as_dict() == {
        "name": "eq",
        "type": "string_check",
        "score": None,
        "passed": None,
        "error": "item.answer is missing",
        "label": None,
        "detail": {},
    }
    json.dumps(result.as_dict())


# check_criteria


FIELDS = {"input", "reference"}


def refused(criteria, item_fields=FIELDS) -> GraderError:
    with pytest.raises(GraderError) as error:
        check_criteria(criteria, item_fields)
    return error.value


def test_it_accepts_every_supported_type():
    label = label_model(["a", "b"], ["a"])
    criteria = [
        string_check("eq"),
        fuzzy(),
        score_model(range=[1, 5], pass_threshold=3),
        label,
        multi("exact * fuzzy", pass_threshold=0.5),
        {"type": "tool_call", "name": "tools", "reference": "{{item.reference}}"},
    ]
    check_criteria(criteria, FIELDS)
    check_criteria([{"type": "tool_call", "name": "tools"}], None)


def test_a_reference_to_a_missing_item_field_is_refused_naming_the_field():
    error = refused([string_check("eq"), string_check("ne", "{{item.nope}}")])
    assert error.path == "testing_criteria[1].reference"
    assert "{{item.nope}}" in error.message and "input, reference" in error.message
    # The tool_call grader's default reference needs item.reference_tool_calls.
    assert refused([{"type": "tool_call", "name": "tools"}]).path == "testing_criteria[0].reference"
    nested = multi("exact", graders={"exact": {**fuzzy(), "input": "{{item.meta}}"}})
    assert refused([nested]).path == "testing_criteria[0].graders.exact.input"
    judge = score_model()
    judge["input"][1]["content"] += " {{item.rubric}}"
    assert refused([judge]).path == "testing_criteria[0].input[1].content"


@pytest.mark.parametrize(
    "criteria, path, message",
    [
        ({"type": "string_check"}, "testing_criteria", "must be a list of graders"),
        ([], "testing_criteria", "at least one grader"),
        (["eq"], "testing_criteria[0]", "must be a grader object"),
        ([{"type": "python", "name": "p", "source": "def grade(): ..."}], "testing_criteria[0].type", "'python'"),
        ([{**string_check("eq"), "name": ""}], "testing_criteria[0].name", "non-empty"),
        ([string_check("eq"), string_check("eq")], "testing_criteria[1].name", "'eq' is used"),
        ([{**string_check("eq"), "operation": "contains"}], "testing_criteria[0].operation", "eq, ne, like, ilike"),
        ([{**string_check("eq"), "input": None}], "testing_criteria[0].input", "is required"),
        ([{**string_check("eq"), "input": ["x"]}], "testing_criteria[0].input", "template string"),
        (
            [{**fuzzy(), "evaluation_metric": "cosine"}],
            "testing_criteria[0].evaluation_metric",
            "cosine needs embeddings",
        ),
        ([{**fuzzy(), "evaluation_metric": "bertscore"}], "testing_criteria[0].evaluation_metric", "rouge_l"),
        ([{**fuzzy(), "pass_threshold": "high"}], "testing_criteria[0].pass_threshold", "must be a number"),
        ([{**fuzzy(), "pass_threshold": 2}], "testing_criteria[0].pass_threshold", "between 0 and 1"),
        ([string_check("eq", "{{sample.output_text}}")], "testing_criteria[0].reference", "must come from the data"),
        ([{**string_check("eq"), "input": "{{sample.output_json}}"}], "testing_criteria[0].input", "output_text"),
        ([{**string_check("eq"), "input": "{{answer}}"}], "testing_criteria[0].input", "{{answer}} is not a field"),
        ([{**score_model(), "model": ""}], "testing_criteria[0].model", "judge model"),
        ([{**score_model(), "input": []}], "testing_criteria[0].input", "non-empty list"),
        ([{**score_model(), "input": [{"role": "tool", "content": "x"}]}], "testing_criteria[0].input[0].role", "user"),
        ([score_model(range=[5, 1])], "testing_criteria[0].range", "low must be below high"),
        ([score_model(range=[0, "10"])], "testing_criteria[0].range", "two numbers"),
        ([score_model(pass_threshold=3)], "testing_criteria[0].pass_threshold", "between 0 and 1"),
        ([score_model(sampling_params=[0.7])], "testing_criteria[0].sampling_params", "object"),
        ([label_model([], ["a"])], "testing_criteria[0].labels", "non-empty list"),
        ([label_model(["a", "A"], ["a"])], "testing_criteria[0].labels", "repeat"),
        ([label_model(["a", "b"], ["c"])], "testing_criteria[0].passing_labels", "'c' is not one of labels"),
        ([multi("exact", graders={})], "testing_criteria[0].graders", "named graders"),
        ([multi("x", graders={"a-b": fuzzy()})], "testing_criteria[0].graders", "'a-b'"),
        ([multi("exact", graders={"exact": {"type": "python"}})], "testing_criteria[0].graders.exact.type", "python"),
    ],
)
def test_a_malformed_definition_is_refused_naming_the_field(criteria, path, message):
    error = refused(criteria)
    assert error.path == path
    assert message in error.message
    assert str(error) == f"{path}: {error.message}"


def test_judge_models_lists_every_judge_once_nested_too():
    nested = multi(
        "exact", graders={"exact": {**score_model(), "model": "judge-b"}, "label": label_model(["a"], ["a"])}
    )
    criteria = [string_check("eq"), score_model(), nested, {**score_model(), "name": "again"}]
    assert judge_models(criteria) == ["judge-model", "judge-b"]


# Defaults


def test_default_is_exact_match_for_short_answers():
    items = [{"input": [], "reference": "card_arrival"}, {"input": [], "reference": "Refund not showing up"}]
    assert default_criteria(items) == [
        {
            "type": "string_check",
            "name": "exact_match",
            "input": "{{sample.output_text}}",
            "reference": "{{item.reference}}",
            "operation": "eq",
        }
    ]


def test_default_is_rouge_l_for_long_or_multiline_answers_counting_chinese_by_character():
    for long_answer in ["one two three four five six seven eight nine", "a\nb", "北京是中华人民共和国的首都"]:
        items = [{"input": [], "reference": "yes"}, {"input": [], "reference": long_answer}]
        criteria = default_criteria(items)
        assert [(c["type"], c["name"], c.get("evaluation_metric")) for c in criteria] == [
            ("text_similarity", "rouge_l", "rouge_l")
        ]
        assert criteria[0]["pass_threshold"] == 0.5
    assert default_criteria([{"reference": "北京是首都"}])[0]["name"] == "exact_match"


def test_default_for_tool_calling_data_adds_text_grader_only_for_text_references():
    calls = [{"name": "get_time", "arguments": {}}]
    tools_only = [{"input": [], "reference": "", "reference_tool_calls": calls}]
    assert [c["name"] for c in default_criteria(tools_only)] == ["tool_call"]
    mixed = [*tools_only, {"input": [], "reference": "It is noon."}]
    criteria = default_criteria(mixed)
    assert [c["name"] for c in criteria] == ["tool_call", "exact_match"]
    check_criteria(criteria, {"input", "reference", "reference_tool_calls"})
