"""One stack for the fault suite, with the tiny model only: the cases kill its processes, fill its disk
and hold its notifications worker, so it is never the stack other live tests share."""

import openai
import pytest

from llm.bundled import TINY_MODEL_ID

from ..live import chat_lines, start_stack, stop_stack


@pytest.fixture(scope="package")
def fault_stack(tmp_path_factory, tiny_model_dir):
    running = start_stack(
        tmp_path_factory.mktemp("faults"),
        {TINY_MODEL_ID: tiny_model_dir},
        # The slow receiver of the webhook case listens on the loopback address; a validation lost
        # with a killed worker is queued again within a sweep (60 s) plus FT_DATASET_STUCK_SECONDS.
        env={"FT_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "FT_DATASET_STUCK_SECONDS": "15"},
    )
    yield running
    stop_stack(running)


@pytest.fixture(scope="package")
def alice(fault_stack):
    return openai.OpenAI(
        base_url=fault_stack.url + "/v1", api_key=fault_stack.api_key("alice"), max_retries=0, timeout=60
    )


@pytest.fixture(scope="package")
def bob(fault_stack):
    return openai.OpenAI(
        base_url=fault_stack.url + "/v1", api_key=fault_stack.api_key("bob"), max_retries=0, timeout=60
    )


@pytest.fixture(scope="package")
def alice_file(alice):
    """Alice's training file: 40 examples, one optimizer step each at batch size 1."""
    uploaded = alice.files.create(file=("faults.jsonl", chat_lines(40)), purpose="fine-tune")
    return alice.files.wait_for_processing(uploaded.id, poll_interval=0.5, max_wait_seconds=120)
