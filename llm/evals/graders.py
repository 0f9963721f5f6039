"""Graders in OpenAI's JSON shapes: checked once when an eval is created, then applied per example.

The same definitions work here and on OpenAI's Evals API. Supported types: `string_check`,
`text_similarity`, `score_model`, `label_model`, `multi`, and our own `tool_call` (OpenAI has
none). `check_criteria` refuses a bad definition up front, naming the field; `grade` never
raises for a problem of one example (a missing field, a judge that fails or answers nonsense)
but returns an error result, so a run goes on and counts such examples apart.

Choices of ours where OpenAI's shape leaves room:
- `string_check` `eq` and `ne` compare the strings with surrounding whitespace stripped, since
  models end answers with newlines; `like` and `ilike` compare the strings as they are.
- A `reference` template must come from the data: `{{sample.*}}` there is refused.
- `text_similarity` passes at 0.5 when it has no `pass_threshold`; `score_model` at the middle
  of its range; `multi` when every sub-grader passed.
"""

import ast
import json
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from llm.evals.templates import MissingField, referenced_fields, render
from llm.evals.text import METRICS, is_cjk, similarity, tokens


@dataclass(frozen=True)
class Sample:
    """What a model produced for one example."""

    output_text: str
    output_tools: list[dict[str, Any]] = field(default_factory=list)
    """Tool calls in OpenAI's `tool_calls` shape."""


@dataclass
class GraderResult:
    """One grader's verdict on one example; an error result has no score and no verdict."""

    name: str
    type: str
    score: float | None
    passed: bool | None
    error: str | None = None
    label: str | None = None
    """The label a label_model judge chose."""
    detail: dict[str, Any] = field(default_factory=dict)
    """What the score was computed from: rendered texts, tool-call mismatches, the judge's answer."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Judge = Callable[[str, list[dict[str, Any]], dict[str, Any]], str]
"""(model id, rendered messages, sampling_params) -> the judge's answer text; may raise any Exception -> error result."""


class GraderError(ValueError):
    """A grader definition is malformed; `path` names the field, like "testing_criteria[1].reference"."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.message = message
        self.path = path


GRADER_TYPES = ("string_check", "text_similarity", "score_model", "label_model", "multi", "tool_call")
STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
SAMPLE_FIELDS = ("output_text", "output_tools")
JUDGE_ROLES = ("system", "developer", "user", "assistant")
DEFAULT_SHORT_WORDS = 8
DEFAULT_TOOL_INPUT = "{{sample.output_tools}}"
DEFAULT_TOOL_REFERENCE = "{{item.reference_tool_calls}}"
_QUOTED_ANSWER_CHARS = 120


# Checking definitions


def check_criteria(criteria: Any, item_fields: set[str] | None, path: str = "testing_criteria") -> None:
    """Refuse a malformed list of graders with a GraderError naming the field.

    With item_fields, a template naming `{{item.X}}` for an X not among them is refused too.
    """
    if not isinstance(criteria, list):
        raise GraderError("must be a list of graders", path)
    if not criteria:
        raise GraderError("must hold at least one grader", path)
    names: set[str] = set()
    for index, spec in enumerate(criteria):
        where = f"{path}[{index}]"
        _check_grader(spec, item_fields, where, name_required=True)
        if spec["name"] in names:
            raise GraderError(f"the name {spec['name']!r} is used by an earlier grader", f"{where}.name")
        names.add(spec["name"])


def _check_grader(spec: Any, item_fields: set[str] | None, where: str, *, name_required: bool) -> None:
    if not isinstance(spec, dict):
        raise GraderError("must be a grader object", where)
    kind = spec.get("type")
    if kind not in GRADER_TYPES:
        raise GraderError(f"unsupported grader type {kind!r}; use one of {', '.join(GRADER_TYPES)}", f"{where}.type")
    name = spec.get("name")
    if (name_required or name is not None) and (not isinstance(name, str) or not name.strip()):
        raise GraderError("must be a non-empty string", f"{where}.name")

    if kind == "string_check":
        _check_template(spec, "input", item_fields, where)
        _check_template(spec, "reference", item_fields, where)
        if spec.get("operation") not in STRING_OPERATIONS:
            raise GraderError(f"must be one of {', '.join(STRING_OPERATIONS)}", f"{where}.operation")
    elif kind == "text_similarity":
        _check_template(spec, "input", item_fields, where)
        _check_template(spec, "reference", item_fields, where)
        metric = spec.get("evaluation_metric")
        if metric == "cosine":
            raise GraderError(
                "cosine needs embeddings, which this product does not serve", f"{where}.evaluation_metric"
            )
        if metric not in METRICS:
            raise GraderError(f"must be one of {', '.join(METRICS)}", f"{where}.evaluation_metric")
        _check_number(spec, "pass_threshold", where, low=0.0, high=1.0)
    elif kind in ("score_model", "label_model"):
        _check_judge(spec, item_fields, where)
    elif kind == "multi":
        _check_multi(spec, item_fields, where)
    else:
        _check_template(spec, "input", item_fields, where, default=DEFAULT_TOOL_INPUT)
        _check_template(spec, "reference", item_fields, where, default=DEFAULT_TOOL_REFERENCE)


def _check_template(
    spec: dict[str, Any], key: str, item_fields: set[str] | None, where: str, *, default: str | None = None
) -> None:
    template = spec.get(key, default)
    path = f"{where}.{key}"
    if template is None:
        raise GraderError("is required", path)
    if not isinstance(template, str):
        raise GraderError("must be a template string", path)
    _check_placeholders(template, item_fields, path, sample_allowed=key != "reference")


def _check_placeholders(template: str, item_fields: set[str] | None, path: str, *, sample_allowed: bool) -> None:
    for reference in sorted(referenced_fields(template)):
        placeholder = "{{" + reference + "}}"
        root, *segments = reference.split(".")
        if root not in ("item", "sample") or not all(segments):
            raise GraderError(
                f"{placeholder} is not a field: use {{{{item.<field>}}}} or {{{{sample.output_text}}}}", path
            )
        if root == "item":
            if segments and item_fields is not None and segments[0] not in item_fields:
                known = ", ".join(sorted(item_fields)) or "none"
                raise GraderError(f"{placeholder} names a field the data does not have (it has: {known})", path)
            continue
        if not sample_allowed:
            raise GraderError(f"{placeholder}: a reference must come from the data, not from the model's answer", path)
        if not segments or segments[0] not in SAMPLE_FIELDS or (segments[0] == "output_text" and len(segments) > 1):
            raise GraderError(f"{placeholder}: a sample has only output_text and output_tools", path)


def _check_number(
    spec: dict[str, Any], key: str, where: str, *, low: float | None = None, high: float | None = None
) -> None:
    value = spec.get(key)
    if value is None:
        return
    if not _is_number(value):
        raise GraderError("must be a number", f"{where}.{key}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise GraderError(f"must be between {low:g} and {high:g}", f"{where}.{key}")


def _check_judge(spec: dict[str, Any], item_fields: set[str] | None, where: str) -> None:
    model = spec.get("model")
    if not isinstance(model, str) or not model.strip():
        raise GraderError("must name the judge model", f"{where}.model")
    messages = spec.get("input")
    if not isinstance(messages, list) or not messages:
        raise GraderError("must be a non-empty list of messages", f"{where}.input")
    for index, message in enumerate(messages):
        message_path = f"{where}.input[{index}]"
        if not isinstance(message, dict):
            raise GraderError("must be a message object with role and content", message_path)
        if message.get("role") not in JUDGE_ROLES:
            raise GraderError(f"must be one of {', '.join(JUDGE_ROLES)}", f"{message_path}.role")
        _check_template(message, "content", item_fields, message_path)
    if spec.get("sampling_params") is not None and not isinstance(spec["sampling_params"], dict):
        raise GraderError("must be an object", f"{where}.sampling_params")

    if spec["type"] == "score_model":
        low, high = _score_range(spec, where)
        _check_number(spec, "pass_threshold", where, low=low, high=high)
        return
    labels = spec.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise GraderError("must be a non-empty list of non-empty strings", f"{where}.labels")
    if len({label.strip().lower() for label in labels}) < len(labels):
        raise GraderError("must not repeat a label", f"{where}.labels")
    passing = spec.get("passing_labels")
    if not isinstance(passing, list) or not passing:
        raise GraderError("must be a non-empty list of labels", f"{where}.passing_labels")
    for label in passing:
        if label not in labels:
            raise GraderError(f"{label!r} is not one of labels", f"{where}.passing_labels")


def _score_range(spec: Mapping[str, Any], where: str = "") -> tuple[float, float]:
    bounds = spec.get("range", [0, 1])
    if not isinstance(bounds, list) or len(bounds) != 2 or not all(_is_number(x) for x in bounds):
        raise GraderError("must be [low, high], two numbers", f"{where}.range")
    low, high = float(bounds[0]), float(bounds[1])
    if not low < high:
        raise GraderError("low must be below high", f"{where}.range")
    return low, high


def _check_multi(spec: dict[str, Any], item_fields: set[str] | None, where: str) -> None:
    graders = spec.get("graders")
    if not isinstance(graders, dict) or not graders:
        raise GraderError("must be an object of named graders", f"{where}.graders")
    for key, sub_spec in graders.items():
        if not key.isidentifier():
            raise GraderError(f"{key!r} cannot appear in a formula: use letters, digits and _", f"{where}.graders")
        _check_grader(sub_spec, item_fields, f"{where}.graders.{key}", name_required=False)
    formula = spec.get("calculate_output")
    if not isinstance(formula, str) or not formula.strip():
        raise GraderError("must be a formula over the sub-grader names", f"{where}.calculate_output")
    _parse_formula(formula, set(graders), f"{where}.calculate_output")
    _check_number(spec, "pass_threshold", where)


def judge_models(criteria: list[dict[str, Any]]) -> list[str]:
    """Return every model named by a score_model or label_model grader, nested ones too, each once."""
    models: list[str] = []
    for spec in criteria:
        if spec.get("type") in ("score_model", "label_model") and spec.get("model") not in models:
            models.append(spec["model"])
        elif spec.get("type") == "multi" and isinstance(spec.get("graders"), dict):
            models.extend(model for model in judge_models(list(spec["graders"].values())) if model not in models)
    return models


# Formulas of multi graders, evaluated over the syntax tree: never eval().


def _min(*values: float) -> float:
    return min(values)


def _max(*values: float) -> float:
    return max(values)


_FUNCTIONS: dict[str, tuple[Callable[..., float], int | None]] = {
    "min": (_min, None),
    "max": (_max, None),
    "abs": (abs, 1),
    "sqrt": (math.sqrt, 1),
    "log": (math.log, 1),
    "exp": (math.exp, 1),
}
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    # math.pow raises on a negative base with a fractional power, where ** returns a complex number.
    ast.Pow: math.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _parse_formula(formula: str, names: set[str], path: str) -> ast.expr:
    try:
        tree = ast.parse(formula.strip(), mode="eval")
    except SyntaxError as error:
        raise GraderError(f"is not a formula: {error.msg}", path) from None
    _check_formula_node(tree.body, names, path)
    return tree.body


def _check_formula_node(node: ast.expr, names: set[str], path: str) -> None:
    if isinstance(node, ast.Constant):
        if not _is_number(node.value):
            raise GraderError(f"{node.value!r} is not a number", path)
    elif isinstance(node, ast.Name):
        if node.id not in names:
            raise GraderError(f"unknown name {node.id!r}; the graders are {', '.join(sorted(names))}", path)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check_formula_node(node.left, names, path)
        _check_formula_node(node.right, names, path)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check_formula_node(node.operand, names, path)
    elif isinstance(node, ast.Call):
        function = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        if function not in _FUNCTIONS:
            raise GraderError(f"unknown function {function!r}; use {', '.join(_FUNCTIONS)}", path)
        arity = _FUNCTIONS[function][1]
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            raise GraderError(f"{function}() takes plain arguments", path)
        if not node.args or (arity is not None and len(node.args) != arity):
            raise GraderError(f"{function}() takes {arity or 'at least one'} argument{'s' if arity != 1 else ''}", path)
        for arg in node.args:
            _check_formula_node(arg, names, path)
    else:
        raise GraderError(f"{ast.unparse(node)!r} is not allowed: use numbers, names, + - * / ** and functions", path)


def _evaluate(node: ast.expr, values: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, values))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return float(_FUNCTIONS[node.func.id][0](*(_evaluate(arg, values) for arg in node.args)))
    raise AssertionError(f"unchecked formula node {ast.dump(node)}")


# Grading one example


class _ExampleError(Exception):
    """This example cannot be scored; the detail says what was seen."""

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.detail = detail or {}


def grade(spec: dict[str, Any], item: Mapping[str, Any], sample: Sample, judge: Judge | None = None) -> GraderResult:
    """Apply one grader (already passed by check_criteria) to one example.

    Never raises for a per-example problem (missing field, judge failure/unparseable): an error result.
    """
    return _grade(spec, spec.get("name", ""), item, sample, judge)


def _grade(
    spec: dict[str, Any], name: str, item: Mapping[str, Any], sample: Sample, judge: Judge | None
) -> GraderResult:
    kind = spec["type"]
    try:
        return _GRADERS[kind](spec, name, item, sample, judge)
    except MissingField as missing:
        return GraderResult(name, kind, None, None, error=str(missing))
    except _ExampleError as problem:
        return GraderResult(name, kind, None, None, error=str(problem), detail=problem.detail)


def _string_check(
    spec: dict[str, Any], name: str, item: Mapping[str, Any], sample: Sample, judge: Judge | None
) -> GraderResult:
    text, reference = render(spec["input"], item, sample), render(spec["reference"], item, sample)
    operation = spec["operation"]
    if operation == "eq":
        passed = text.strip() == reference.strip()
    elif operation == "ne":
        passed = text.strip() != reference.strip()
    elif operation == "like":
        passed = reference in text
    else:
        passed = reference.casefold() in text.casefold()
    detail = {"input": text, "reference": reference}
    return GraderResult(name, "string_check", float(passed), passed, detail=detail)


def _text_similarity(
    spec: dict[str, Any], name: str, item: Mapping[str, Any], sample: Sample, judge: Judge | None
) -> GraderResult:
    text, reference = render(spec["input"], item, sample), render(spec["reference"], item, sample)
    score = similarity(spec["evaluation_metric"], text, reference)
    passed = score >= spec.get("pass_threshold", 0.5)
    return GraderResult(name, "text_similarity", score, passed, detail={"input": text, "reference": reference})


def _score_model(
    spec: dict[str, Any], name: str, item: Mapping[str, Any], sample: Sample, judge: Judge | None
) -> GraderResult:
    answer = _ask_judge(spec, item, sample, judge)
    low, high = _score_range(spec)
    score = parse_score(answer)
    if score is None or not low <= score <= high:
        raise _ExampleError(f"the judge answered {_quote(answer)}: no score in [{low:g}, {high:g}]", {"answer": answer})
    passed = score >= spec.get("pass_threshold", (low + high) / 2)
    return GraderResult(name, "score_model", score, passed, detail={"answer": answer})


def _label_model(
    spec: dict[str, Any], name: str, item: Mapping[str, Any], sample: Sample, judge: Judge | None
) -> GraderResult:
    answer = _ask_judge(spec, item, sample, judge)
    found = match_labels(answer, spec["labels"])
    if len(found) != 1:
        why = f"several labels ({', '.join(found)})" if found else f"no label of {_label_list(spec['labels'])}"
        raise _ExampleError(f"the judge answered {_quote(answer)}: {why}", {"answer": answer})
    label = found[0]
    passed = label in spec["passing_labels"]
    return GraderResult(name, "label_model", float(passed), passed, label=label, detail={"answer": answer})


def _ask_judge(spec: dict[str, Any], item: Mapping[str, Any], sample: Sample, judge: Judge | None) -> str:
    messages = [{"role": m["role"], "content": render(m["content"], item, sample)} for m in spec["input"]]
    if judge is None:
        raise _ExampleError(f"no judge was given to run {spec['model']}")
    try:
        answer = judge(spec["model"], messages, dict(spec.get("sampling_params") or {}))
    except Exception as failure:  # noqa: BLE001 - any judge failure scores this example as an error
        raise _ExampleError(f"the judge {spec['model']} failed: {type(failure).__name__}: {failure}") from None
    return str(answer)


_FENCED = re.compile(r"\A```(?:json)?\s*(.*?)\s*```\Z", re.DOTALL)
_BARE_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_FIRST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_score(answer: str) -> float | None:
    """Read a judge's score: a bare number, a JSON object's "score", or else the first number in the text."""
    text = answer.strip()
    fenced = _FENCED.match(text)
    if fenced:
        text = fenced.group(1)
    if _BARE_NUMBER.fullmatch(text):
        return float(text)
    embedded = _JSON_OBJECT.search(text)
    if embedded:
        try:
            value = json.loads(embedded.group())
        except ValueError:
            value = None
        if isinstance(value, dict) and _is_number(value.get("score")) and math.isfinite(value["score"]):
            return float(value["score"])
    first = _FIRST_NUMBER.search(text)
    return float(first.group()) if first else None


def match_labels(answer: str, labels: Sequence[str]) -> list[str]:
    """Return the labels a judge's answer names: the one it equals (ignoring case), else those it contains as words.

    A label found only inside a longer label's match ("card" in "credit card") does not count.
    """
    text = answer.strip().casefold()
    for label in labels:
        if text == label.strip().casefold():
            return [label]
    spans = {label: [m.span() for m in _label_pattern(label).finditer(text)] for label in labels}
    found = []
    for label, own in spans.items():
        others = [span for other, its in spans.items() if other != label for span in its]
        if any(not any(o[0] <= s[0] and s[1] <= o[1] for o in others) for s in own):
            found.append(label)
    return found


def _label_pattern(label: str) -> re.Pattern[str]:
    # A word boundary means nothing between Han or kana characters, so a CJK end of a label needs none.
    core = label.strip().casefold()
    before = r"(?<!\w)" if _needs_boundary(core[0]) else ""
    after = r"(?!\w)" if _needs_boundary(core[-1]) else ""
    return re.compile(before + re.escape(core) + after)


def _needs_boundary(character: str) -> bool:
    return bool(re.match(r"\w", character)) and not is_cjk(character)


def _tool_call(
    spec: dict[str, Any], name: str, item: Mapping[str, Any], sample: Sample, judge: Judge | None
) -> GraderResult:
    text = render(spec.get("input", DEFAULT_TOOL_INPUT), item, sample)
    reference = render(spec.get("reference", DEFAULT_TOOL_REFERENCE), item, sample)
    detail: dict[str, Any] = {"input": text, "reference": reference}
    expected_calls = _parse_tool_calls(reference)
    if expected_calls is None:
        raise _ExampleError(f"the reference is not a list of tool calls: {_quote(reference)}", detail)
    # An answer that does not parse made no usable call: it scores zero rather than an error.
    calls = _parse_tool_calls(text) or []
    score, mismatches = compare_tool_calls(calls, expected_calls)
    detail["mismatches"] = mismatches
    return GraderResult(name, "tool_call", score, not mismatches, detail=detail)


def _parse_tool_calls(text: str) -> list[tuple[str, Any]] | None:
    """Read rendered tool calls into (name, arguments) pairs; None when the text is no list of calls."""
    if not text.strip():
        return []
    try:
        value = json.loads(text)
        if isinstance(value, str):
            value = json.loads(value)
    except ValueError:
        return None
    calls = [value] if isinstance(value, dict) else value
    if not isinstance(calls, list):
        return None
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        function = function if isinstance(function, dict) else call
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return None
        parsed.append((function["name"], _arguments(function.get("arguments"))))
    return parsed


def _arguments(arguments: Any) -> Any:
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def compare_tool_calls(
    calls: list[tuple[str, Any]], expected_calls: list[tuple[str, Any]]
) -> tuple[float, list[dict[str, Any]]]:
    """Compare calls to the expected ones in order; return (matched keys / expected keys, mismatches)."""
    mismatches: list[dict[str, Any]] = []

    def mismatch(call: int, key: str | None, expected: Any, got: Any, problem: str) -> None:
        mismatches.append({"call": call, "key": key, "expected": expected, "got": got, "problem": problem})

    matched = total = 0
    for index, (expected_name, expected_args) in enumerate(expected_calls):
        keyed = isinstance(expected_args, dict) and bool(expected_args)
        total += len(expected_args) if keyed else 1
        if index >= len(calls):
            mismatch(index, None, expected_name, None, "missing call")
            continue
        name, args = calls[index]
        if name != expected_name:
            mismatch(index, None, expected_name, name, "wrong name")
            continue
        if not keyed:
            # A call without arguments is right by its name alone; other arguments must still be equal to pass.
            if expected_args == {} or _json_equal(expected_args, args):
                matched += 1
            if not _json_equal(expected_args, args):
                mismatch(index, None, expected_args, args, "wrong arguments")
            continue
        if not isinstance(args, dict):
            mismatch(index, None, expected_args, args, "arguments are not a JSON object")
            continue
        for key, expected in expected_args.items():
            if key not in args:
                mismatch(index, key, expected, None, "missing key")
            elif not _json_equal(expected, args[key]):
                mismatch(index, key, expected, args[key], "wrong value")
            else:
                matched += 1
        for key in args.keys() - expected_args.keys():
            mismatch(index, key, None, args[key], "extra key")
    for index in range(len(expected_calls), len(calls)):
        mismatch(index, None, None, calls[index][0], "extra call")

    if total == 0:
        return (0.0 if calls else 1.0), mismatches
    return matched / total, mismatches


def _json_equal(a: Any, b: Any) -> bool:
    """Equal as JSON values: 1 equals 1.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _multi(
    spec: dict[str, Any], name: str, item: Mapping[str, Any], sample: Sample, judge: Judge | None
) -> GraderResult:
    results = {key: _grade(sub, sub.get("name", key), item, sample, judge) for key, sub in spec["graders"].items()}
    detail: dict[str, Any] = {"graders": {key: result.as_dict() for key, result in results.items()}}
    for key, result in results.items():
        if result.error is not None:
            raise _ExampleError(f"grader {key!r} failed: {result.error}", detail)
    scores = {key: float(result.score or 0.0) for key, result in results.items()}
    formula = _parse_formula(spec["calculate_output"], set(scores), "calculate_output")
    try:
        score = _evaluate(formula, scores)
    except (ArithmeticError, ValueError) as failure:
        raise _ExampleError(f"calculate_output failed on {scores}: {failure}", detail) from None
    if not math.isfinite(score):
        raise _ExampleError(f"calculate_output gave {score} on {scores}", detail)
    threshold = spec.get("pass_threshold")
    passed = all(result.passed for result in results.values()) if threshold is None else score >= threshold
    return GraderResult(name, "multi", score, passed, detail=detail)


_GRADERS: dict[str, Callable[[dict[str, Any], str, Mapping[str, Any], Sample, Judge | None], GraderResult]] = {
    "string_check": _string_check,
    "text_similarity": _text_similarity,
    "score_model": _score_model,
    "label_model": _label_model,
    "tool_call": _tool_call,
    "multi": _multi,
}


# Defaults for a dataset


ANSWER, REFERENCE = "{{sample.output_text}}", "{{item.reference}}"


def similarity_grader(metric: str, pass_threshold: float, name: str | None = None) -> dict[str, Any]:
    """A text_similarity grader of the answer against item.reference."""
    return {
        "type": "text_similarity",
        "name": name or metric,
        "input": ANSWER,
        "reference": REFERENCE,
        "evaluation_metric": metric,
        "pass_threshold": pass_threshold,
    }


EXACT_MATCH: dict[str, Any] = {
    "type": "string_check",
    "name": "exact_match",
    "input": ANSWER,
    "reference": REFERENCE,
    "operation": "eq",
}
CONTAINS: dict[str, Any] = {**EXACT_MATCH, "name": "contains", "operation": "ilike"}
ROUGE_L = similarity_grader("rouge_l", 0.5)
TOOL_CALL: dict[str, Any] = {
    "type": "tool_call",
    "name": "tool_call",
    "input": "{{sample.output_tools}}",
    "reference": "{{item.reference_tool_calls}}",
}
"""Graders over items made from chat examples (item.reference, item.reference_tool_calls), named by what they check."""


def default_criteria(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the default graders for items in our convention.

    item["input"] holds the prompt messages, item["reference"] the reference answer text and
    item.get("reference_tool_calls") the expected tool calls. Data where some row expects a call gets the
    tool_call grader; text references get exact match when all are short (at most
    DEFAULT_SHORT_WORDS tokens, one line), ROUGE-L otherwise.
    """
    criteria: list[dict[str, Any]] = []
    if any(item.get("reference_tool_calls") for item in items):  # an empty list: this row expects no call
        criteria.append(TOOL_CALL)
    references = [item["reference"] for item in items if isinstance(item.get("reference"), str)]
    references = [reference for reference in references if reference.strip()]
    if criteria and not references:
        return criteria
    short = all(len(tokens(r)) <= DEFAULT_SHORT_WORDS and "\n" not in r.strip() for r in references)
    criteria.append(EXACT_MATCH if short else ROUGE_L)
    return criteria


# Helpers


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _label_list(labels: Sequence[str]) -> str:
    shown = ", ".join(labels[:10])
    return shown if len(labels) <= 10 else f"{shown} and {len(labels) - 10} more"


def _quote(answer: str) -> str:
    text = answer.strip()
    if len(text) > _QUOTED_ANSWER_CHARS:
        text = text[: _QUOTED_ANSWER_CHARS - 1] + "…"
    return repr(text)
