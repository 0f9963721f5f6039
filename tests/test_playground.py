"""Playground helpers: validation samples, the rendered chat template, batch compare as evaluation runs."""

import json

import pytest
from django.utils.html import escape

from .test_model_square import BASE, alice, card, folders  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.django_db


def test_the_page_keeps_the_ids_the_browser_test_uses_and_offers_three_panes(client, card):
    page = client.get(f"/playground/?a={BASE}&b={card.model_id}").content.decode()
    for testid in (
        "model-a",
        "model-b",
        "model-c",
        "answer-a",
        "answer-b",
        "prompt",
        "send",
        "sample",
        "batch-run",
        "batch-totals",
        "batch-table",
        "copy-curl",
        "copy-python",
        "show-template",
    ):
        assert f'data-testid="{testid}"' in page, testid
    assert "<span>Max tokens</span>" in page and "<span>Top p</span>" in page and "<span>Seed</span>" in page


def test_sample_fills_the_prompt_from_the_models_data(client, card):
    body = client.get("/playground/sample/", {"model": card.model_id}).json()
    assert body["system"] == "You answer with the colour code."
    assert body["prompt"].startswith("What is the code for item ") and body["reference"].startswith(
        "The code for item "
    )
    assert client.get("/playground/sample/", {"model": BASE}).status_code == 400


def test_the_rendered_template_is_what_the_model_sees(client, card):
    response = client.post(
        "/playground/template/",
        {
            "model": card.model_id,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        },
        content_type="application/json",
    )
    body = response.json()
    assert "<|im_start|>system\nBe brief.<|im_end|>" in body["prompt"] and body["prompt"].rstrip().endswith(
        "<|im_start|>assistant"
    )
    assert body["prompt_tokens"] > 5
    bad = client.post(
        "/playground/template/",
        {"model": BASE, "messages": [{"role": "bot", "content": "x"}]},
        content_type="application/json",
    )
    assert bad.status_code == 400
    assert (
        client.post(
            "/playground/template/", {"model": "nope", "messages": []}, content_type="application/json"
        ).status_code
        == 404
    )


@pytest.fixture
def sent(monkeypatch):
    """The run ids that would go to the evaluations worker; tests run them here with run_execute."""
    from evals_app import services

    queued = []
    monkeypatch.setattr(services, "_enqueue", queued.append)
    return queued


def start_batch(client, card, **extra):
    body = {"models": [BASE, card.model_id], "n": 3, "max_tokens": 4, "temperature": 0, "source": card.model_id}
    return client.post("/playground/batch/", {**body, **extra}, content_type="application/json")


def batch_partial(client, eval_id):
    return client.get("/playground/", {"batch": eval_id}, HTTP_HX_REQUEST="true")


def test_batch_compare_queues_an_evaluation_run_per_model_and_answers_nothing_in_the_request(
    client, card, sent, django_capture_on_commit_callbacks
):
    from evals_app.models import Eval, EvalOutputItem

    with django_capture_on_commit_callbacks(execute=True):
        response = start_batch(
            client, card, models=[card.model_id, BASE, card.model_id], system="Answer in one word.", seed=3
        )
    assert response.status_code == 201, response.content
    started = response.json()
    evaluation = Eval.objects.get(public_id=started["id"])
    assert evaluation.kind == Eval.COMPARE and evaluation.owner == card.owner
    assert [c["name"] for c in evaluation.testing_criteria] == ["exact_match", "rouge_l"]
    assert evaluation.testing_criteria[1]["evaluation_metric"] == "rouge_l"
    runs = list(evaluation.runs.order_by("id"))
    # A model chosen in two panes is one run.
    assert [r.model for r in runs] == [card.model_id, BASE] == [r["model"] for r in started["runs"]]
    assert sent == [r.pk for r in runs] and all(r.status == "queued" and r.total == 3 for r in runs)
    assert EvalOutputItem.objects.count() == 0
    source = runs[0].data_source
    assert source["sampling_params"] == {"temperature": 0, "top_p": 1.0, "max_completion_tokens": 4, "seed": 3}
    items = [entry["item"] for entry in source["source"]["content"]]
    assert len(items) == 3 and all(item["reference"].startswith("The code for item ") for item in items)
    # The playground's system prompt replaces the example's own.
    assert all(item["input"][0] == {"role": "system", "content": "Answer in one word."} for item in items)
    assert all(sum(m["role"] == "system" for m in item["input"]) == 1 for item in items)
    assert started["progress_url"] == f"/playground/?batch={evaluation.public_id}"
    assert started["eval_url"] == f"/evals/{evaluation.public_id}/"
    # Until the worker answers, the results poll themselves and show every prompt waiting.
    partial = batch_partial(client, evaluation.public_id).content.decode()
    assert 'hx-trigger="every 2s"' in partial and "data-done" not in partial
    assert partial.count('data-testid="batch-row"') == 3 and partial.count('class="muted">…</td>') == 6


@pytest.mark.django_db(transaction=True)  # the run's writes come from the event loop's helper thread
def test_the_worker_answers_every_row_and_the_page_shows_the_answers_and_totals(client, card, sent):
    from evals_app.models import Eval, EvalRun
    from evals_app.services import run_execute
    from llm.evals.text import similarity

    eval_id = start_batch(client, card).json()["id"]
    for run_id in sent:
        run_execute(run_id=run_id)
    evaluation = Eval.objects.get(public_id=eval_id)
    runs = list(evaluation.runs.order_by("id"))
    assert [r.status for r in runs] == [EvalRun.COMPLETED] * 2, [r.error for r in runs]
    for run in runs:
        for item in run.items.all():
            exact, rouge = item.results
            assert exact["passed"] == (item.output_text.strip() == item.item["reference"])
            assert rouge["score"] == pytest.approx(similarity("rouge_l", item.output_text, item.item["reference"]))

    response = batch_partial(client, eval_id)
    partial = response.content.decode()
    assert response.status_code == 200 and "<html" not in partial
    assert "hx-get" not in partial and 'data-done="1"' in partial  # nothing left to poll for
    assert partial.count('data-testid="batch-row"') == 3 and "…</td>" not in partial
    assert f'href="/evals/{eval_id}/"' in partial
    for run in runs:
        exact, rouge = run.aggregates["exact_match"], run.aggregates["rouge_l"]
        assert exact["n"] == rouge["n"] == 3
        totals = (
            f"exact match {100 * exact['mean']:.1f}% [{100 * exact['low']:.1f}, {100 * exact['high']:.1f}]"
            f" · ROUGE-L {rouge['mean']:.3f} [{rouge['low']:.3f}, {rouge['high']:.3f}] over 3 prompts"
        )
        assert escape(totals) in partial, totals
        for item in run.items.all():
            assert escape(item.output_text) in partial
            assert f"{item.results[1]['score']:.3f}]" in partial
    # Without htmx, the same address is the whole page with the results in it.
    page = client.get("/playground/", {"batch": eval_id}).content.decode()
    assert 'data-testid="batch-run"' in page and page.count('data-testid="batch-row"') == 3


def test_nobody_else_sees_a_batch_compare(client, card, sent):
    from django.contrib.auth import get_user_model

    eval_id = start_batch(client, card).json()["id"]
    bob = get_user_model().objects.create_user("bob", password="pw-bob-123")
    client.force_login(bob)
    assert batch_partial(client, eval_id).status_code == 404
    page = client.get("/playground/", {"batch": eval_id}).content.decode()
    assert eval_id not in page and 'data-testid="batch-row"' not in page


def test_batch_compare_of_a_model_that_does_not_exist_is_refused_and_leaves_nothing(client, card, sent):
    from evals_app.models import Eval

    response = start_batch(client, card, models=[BASE, "ft:nope"])
    assert response.status_code == 404 and "ft:nope" in response.json()["error"]["message"]
    assert Eval.objects.count() == 0 and sent == []


def test_batch_compare_refuses_bad_input(client, card):
    assert client.post("/playground/batch/", {"models": [], "n": 3}, content_type="application/json").status_code == 400
    assert (
        client.post("/playground/batch/", {"models": [BASE], "n": 500}, content_type="application/json").status_code
        == 400
    )
    system = {"models": [BASE], "n": 1, "source": card.model_id, "system": ["Be brief."]}
    response = client.post("/playground/batch/", system, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["param"] == "system"


def refused(response, param=None) -> None:
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param


@pytest.mark.parametrize("url", ["/playground/batch/", "/playground/template/"])
@pytest.mark.parametrize("raw", ["[]", f'["{BASE}"]', '"hi"', "3", "{"])
def test_playground_posts_refuse_a_body_that_is_not_a_json_object(client, card, url, raw):
    refused(client.post(url, raw, content_type="application/json"))


@pytest.mark.parametrize(
    "field, raw", [("max_tokens", "1e400"), ("max_tokens", "NaN"), ("temperature", "Infinity"), ("seed", "1e400")]
)
def test_batch_compare_refuses_numbers_that_are_not_finite(client, card, field, raw):
    body = json.dumps({"models": [BASE], "n": 1, "source": card.model_id, field: "RAW"}).replace('"RAW"', raw)
    refused(client.post("/playground/batch/", body, content_type="application/json"), param=field)


def test_playground_posts_refuse_a_model_id_that_is_not_a_string(client, card):
    refused(
        client.post(
            "/playground/template/",
            {"model": [BASE], "messages": [{"role": "user", "content": "x"}]},
            content_type="application/json",
        ),
        param="model",
    )
    refused(
        client.post(
            "/playground/batch/",
            {"models": [BASE], "n": 1, "source": {"id": card.model_id}},
            content_type="application/json",
        ),
        param="source",
    )


SAMPLE_HARNESS = r"""
// Runs static/js/playground.js against a stub page, clicks "Sample", sends the
// sampled prompt, and prints the chat requests the panes make.
const handlers = {}, elements = {}, requests = [];
function element(id) {
  return {
    id, value: "", hidden: false, textContent: "", innerHTML: "", dataset: {}, children: [],
    classList: { add() {}, remove() {} },
    elements: { system: { value: "" }, temperature: { value: "0" }, top_p: { value: "1" }, max_tokens: { value: "8" }, seed: { value: "" } },
    append(child) { this.children.push(child); },
    addEventListener(type, handler) { handlers[id + ":" + type] = handler; },
  };
}
function pane(model) {
  const select = { value: model }, transcript = element("transcript");
  return { querySelector: (s) => (s === ".model-select" ? select : transcript), transcript };
}
const panes = [pane("base"), pane("ft:base:alice:x:12345678"), pane("")];
globalThis.document = {
  querySelectorAll: () => panes,
  querySelector: () => ({ value: "csrf" }),
  getElementById: (id) => (elements[id] = elements[id] || element(id)),
  createElement: () => element("new"),
};
globalThis.location = { origin: "http://testserver" };
globalThis.fetch = async (url, options) => {
  if (url.startsWith("/playground/sample/")) return { ok: true, json: async () => SAMPLE };
  requests.push(JSON.parse(options.body));
  return { ok: true, body: { getReader: () => ({ read: async () => ({ done: true }) }) } };
};
require(SCRIPT);
(async () => {
  await handlers["sample:click"]();
  handlers["prompt-form:submit"]({ preventDefault() {} });
  await new Promise((resolve) => setTimeout(resolve, 10));
  const shown = panes.map((p) => p.transcript.children.map((c) => c.className + ": " + c.textContent));
  console.log(JSON.stringify({ requests, shown }));
})();
"""


def test_a_sampled_example_keeps_its_earlier_turns_in_every_panes_conversation(tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    sample = {
        "system": "Be terse.",
        "prompt": "And item 2?",
        "reference": "green",
        "history": [{"role": "user", "content": "Code of item 1?"}, {"role": "assistant", "content": "blue"}],
    }
    script = Path(__file__).resolve().parent.parent / "static" / "js" / "playground.js"
    harness = tmp_path / "harness.js"
    harness.write_text(
        f"const SAMPLE = {json.dumps(sample)};\nconst SCRIPT = {json.dumps(str(script))};\n" + SAMPLE_HARNESS
    )
    result = json.loads(
        subprocess.run([node, str(harness)], capture_output=True, text=True, check=True, timeout=60).stdout
    )
    expected = [
        {"role": "system", "content": "Be terse."},
        *sample["history"],
        {"role": "user", "content": "And item 2?"},
    ]
    assert [r["model"] for r in result["requests"]] == ["base", "ft:base:alice:x:12345678"]
    assert all(r["messages"] == expected for r in result["requests"])
    assert result["shown"][0][:2] == ["msg user: Code of item 1?", "msg assistant: blue"]


def test_batch_compare_takes_at_most_as_many_models_as_the_playground_has_panes(client, card):
    models = [BASE, card.model_id, "m3", "m4"]
    response = client.post("/playground/batch/", {"models": models, "n": 1}, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["param"] == "models"
    assert "at most 3" in response.json()["error"]["message"]
