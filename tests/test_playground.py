"""Playground helpers: ROUGE-L, validation samples, the rendered chat template, batch compare."""

import asyncio
import json

import pytest

from deployments_app.metrics import exact_match, lcs_length, rouge_l

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
    for testid in ("model-a", "model-b", "model-c", "answer-a", "answer-b", "prompt", "send", "sample", "batch-run", "copy-curl", "copy-python", "show-template"):
        assert f'data-testid="{testid}"' in page, testid
    assert "<span>Max tokens</span>" in page and "<span>Top p</span>" in page and "<span>Seed</span>" in page


def test_sample_fills_the_prompt_from_the_models_data(client, card):
    body = client.get("/playground/sample/", {"model": card.model_id}).json()
    assert body["system"] == "You answer with the colour code."
    assert body["prompt"].startswith("What is the code for item ") and body["reference"].startswith("The code for item ")
    assert client.get("/playground/sample/", {"model": BASE}).status_code == 400


def test_the_rendered_template_is_what_the_model_sees(client, card):
    response = client.post("/playground/template/", {"model": card.model_id, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]}, content_type="application/json")
    body = response.json()
    assert "<|im_start|>system\nBe brief.<|im_end|>" in body["prompt"] and body["prompt"].rstrip().endswith("<|im_start|>assistant")
    assert body["prompt_tokens"] > 5
    bad = client.post("/playground/template/", {"model": BASE, "messages": [{"role": "bot", "content": "x"}]}, content_type="application/json")
    assert bad.status_code == 400
    assert client.post("/playground/template/", {"model": "nope", "messages": []}, content_type="application/json").status_code == 404


@pytest.mark.django_db(transaction=True)  # rows are generated in other threads, which need committed data
def test_batch_compare_streams_a_scored_row_per_prompt_then_totals(client, card):
    response = client.post("/playground/batch/", {"models": [BASE, card.model_id], "n": 3, "max_tokens": 4, "temperature": 0,
                                                  "source": card.model_id}, content_type="application/json")
    assert response.status_code == 200 and response["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in body_of(response).decode().splitlines()]
    assert [line["type"] for line in lines] == ["start", "row", "row", "row", "total"]
    row = lines[1]
    assert row["reference"].startswith("The code for item ") and set(row["answers"]) == {BASE, card.model_id}
    answer = row["answers"][card.model_id]
    assert answer["error"] is None and answer["text"] and 0 <= answer["rouge_l"] <= 1
    assert answer["rouge_l"] == pytest.approx(round(rouge_l(answer["text"], row["reference"]), 4))
    total = lines[-1]["models"][card.model_id]
    assert total["rouge_l"] == pytest.approx(sum(r["answers"][card.model_id]["rouge_l"] for r in lines[1:4]) / 3, abs=1e-3)


def test_batch_compare_refuses_bad_input(client, card):
    assert client.post("/playground/batch/", {"models": [], "n": 3}, content_type="application/json").status_code == 400
    assert client.post("/playground/batch/", {"models": [BASE], "n": 500}, content_type="application/json").status_code == 400
