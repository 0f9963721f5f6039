"""The Evals API through the official openai SDK against the live stack: the evaluations worker answers."""

import time

import httpx
import openai
import pytest

from llm.bundled import TINY_MODEL_ID

from ..live import chat_lines
from .conftest import EXACT

pytestmark = [pytest.mark.live, pytest.mark.timeout(600)]

ITEM_SCHEMA = {
    "type": "object",
    "properties": {"input": {"type": "array"}, "reference": {"type": "string"}},
    "required": ["input", "reference"],
}


@pytest.fixture(scope="module")
def alice(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key("alice"), max_retries=0, timeout=120)


def wait_run(client, eval_id, run_id, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status in ("completed", "failed", "canceled"):
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} still {run.status} after {timeout}s")


def test_the_openai_sdk_creates_an_eval_runs_it_on_a_file_and_reads_the_output_items(alice, stack):
    uploaded = alice.files.create(file=("heldout.jsonl", chat_lines(8, seed_word="green")), purpose="fine-tune")
    data = alice.files.wait_for_processing(uploaded.id, poll_interval=0.5, max_wait_seconds=120)
    evaluation = alice.evals.create(
        name="codes",
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True},
        testing_criteria=[EXACT],
    )
    assert evaluation.id.startswith("eval-") and evaluation.testing_criteria[0].name == "exact"
    run = alice.evals.runs.create(
        evaluation.id,
        name="tiny",
        data_source={
            "type": "completions",
            "model": TINY_MODEL_ID,
            "source": {"type": "file_id", "id": data.id},
            "sampling_params": {"max_completion_tokens": 8, "seed": 3},
        },
    )
    assert run.status in ("queued", "in_progress")
    done = wait_run(alice, evaluation.id, run.id)
    assert done.status == "completed", done.error
    assert done.result_counts.total == 8 and done.result_counts.errored == 0
    assert done.per_testing_criteria_results[0].testing_criteria == "exact"
    items = list(alice.evals.runs.output_items.list(run.id, eval_id=evaluation.id))
    assert sorted(item.datasource_item_id for item in items) == list(range(8))
    assert all(item.sample.output[0].content is not None and item.results for item in items)
    assert [r.id for r in alice.evals.runs.list(evaluation.id)] == [run.id]

    # The same eval and run under zhipuai's prefix, and a cancel of a queued-or-running run.
    key = stack.api_key("alice")
    paas = httpx.get(
        f"{stack.url}/api/paas/v4/evals/{evaluation.id}/runs/{run.id}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert paas.status_code == 200 and paas.json()["result_counts"]["total"] == 8
    second = alice.evals.runs.create(
        evaluation.id,
        name="long",
        data_source={
            "type": "completions",
            "model": TINY_MODEL_ID,
            "source": {"type": "file_id", "id": data.id},
            "sampling_params": {"max_completion_tokens": 400},
        },
    )
    cancelled = alice.evals.runs.cancel(second.id, eval_id=evaluation.id)
    assert cancelled.status in ("canceled", "in_progress")
    assert wait_run(alice, evaluation.id, second.id).status == "canceled"
