"""Playground helpers: ROUGE-L, validation samples, the rendered chat template, batch compare."""

import json

import pytest

from deployments_app.playground.metrics import exact_match, lcs_length, rouge_l

from .test_model_square import BASE, alice, body_of, card, folders  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.django_db


def test_rouge_l_is_the_lcs_f1_over_whitespace_tokens():
    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("the cat", "dog") == 0.0
    # LCS "the sat" = 2; precision 2/3, recall 2/4 -> F1 = 4/7
    assert rouge_l("the cat sat", "the dog has sat") == pytest.approx(4 / 7)
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0
    assert exact_match(" The  code\n", "The code") and not exact_match("the code", "The code")


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


@pytest.mark.django_db(transaction=True)  # rows are generated in other threads, which need committed data
def test_batch_compare_streams_a_scored_row_per_prompt_then_totals(client, card):
    response = client.post(
        "/playground/batch/",
        {"models": [BASE, card.model_id], "n": 3, "max_tokens": 4, "temperature": 0, "source": card.model_id},
        content_type="application/json",
    )
    assert response.status_code == 200 and response["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in body_of(response).decode().splitlines()]
    assert [line["type"] for line in lines] == ["start", "row", "row", "row", "total"]
    row = lines[1]
    assert row["reference"].startswith("The code for item ") and set(row["answers"]) == {BASE, card.model_id}
    answer = row["answers"][card.model_id]
    assert answer["error"] is None and answer["text"] and 0 <= answer["rouge_l"] <= 1
    assert answer["rouge_l"] == pytest.approx(round(rouge_l(answer["text"], row["reference"]), 4))
    total = lines[-1]["models"][card.model_id]
    assert total["rouge_l"] == pytest.approx(
        sum(r["answers"][card.model_id]["rouge_l"] for r in lines[1:4]) / 3, abs=1e-3
    )


def test_batch_compare_refuses_bad_input(client, card):
    assert client.post("/playground/batch/", {"models": [], "n": 3}, content_type="application/json").status_code == 400
    assert (
        client.post("/playground/batch/", {"models": [BASE], "n": 500}, content_type="application/json").status_code
        == 400
    )


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


@pytest.mark.django_db(transaction=True)
def test_batch_compare_scores_a_model_chosen_in_two_panes_once(client, card):
    response = client.post(
        "/playground/batch/",
        {
            "models": [card.model_id, BASE, card.model_id],
            "n": 2,
            "max_tokens": 2,
            "temperature": 0,
            "source": card.model_id,
        },
        content_type="application/json",
    )
    lines = [json.loads(line) for line in body_of(response).decode().splitlines()]
    assert lines[0]["models"] == [card.model_id, BASE]
    assert all(list(line["answers"]) == [card.model_id, BASE] for line in lines[1:-1])
    for model, total in lines[-1]["models"].items():
        rows = [line["answers"][model] for line in lines[1:-1]]
        assert total["exact_match"] == sum(r["exact_match"] for r in rows) / 2 <= 1
        assert total["rouge_l"] == pytest.approx(sum(r["rouge_l"] for r in rows) / 2, abs=1e-3)


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


def test_scoring_a_huge_reference_never_holds_the_event_loop(monkeypatch):
    """A 300,000-word reference against a 200-word answer: the server keeps answering meanwhile."""
    import asyncio
    import time

    from deployments_app.playground import batch

    async def long_answer(user, params):  # the model is not under test here: its answer is given
        return " ".join(f"w{i}" for i in range(200)), None

    monkeypatch.setattr(batch, "_answer", long_answer)
    examples = [{"messages": [{"role": "user", "content": "Say many words."}], "reference": "word " * 300_000}]

    async def run() -> tuple[list[str], float]:
        gaps, stop = [0.0], asyncio.Event()

        async def ticker():
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)  # the ticker is running before the batch starts
        lines = [line async for line in batch.batch_rows(None, [BASE], examples, {}, "")]
        stop.set()
        await ticking
        return lines, max(gaps)

    lines, longest_gap = asyncio.run(run())
    assert [json.loads(line)["type"] for line in lines] == ["start", "row", "total"]
    assert longest_gap < 0.5, f"the event loop stood still for {longest_gap:.2f} s"


def test_rouge_l_reads_a_bounded_number_of_words():
    from deployments_app.playground.metrics import MAX_SCORED_WORDS

    long = " ".join(f"w{i}" for i in range(MAX_SCORED_WORDS * 10))
    assert rouge_l(long, long) == 1.0
    # Only the first MAX_SCORED_WORDS words count: a difference after them does not.
    assert rouge_l(long + " extra", long) == 1.0


def test_batch_compare_takes_at_most_as_many_models_as_the_playground_has_panes(client, card):
    models = [BASE, card.model_id, "m3", "m4"]
    response = client.post("/playground/batch/", {"models": models, "n": 1}, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["param"] == "models"
    assert "at most 3" in response.json()["error"]["message"]
