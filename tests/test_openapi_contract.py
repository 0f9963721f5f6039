"""The OpenAPI schema is the API's contract: it describes every route, and the live API answers as it says.

The first tests read the schema (no stack needed): it is a valid OpenAPI 3.1 document,
and every route under /v1, /api/paas/v4 and /api is in it with each of its methods,
an answer body and its errors. The live test drives the running stack with
schemathesis, which sends generated requests to every operation and fails on a
response the schema does not allow (status, content type, headers, body) and on any 500.
"""

import json
import re
import zlib

import httpx
import openai
import pytest
import schemathesis
from django.contrib.auth import get_user_model
from django.urls import URLPattern, URLResolver, get_resolver
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from finetune_site.apiviews import unsupported_endpoint
from finetune_site.schema import PLAIN_VIEWS
from llm.bundled import TINY_MODEL_ID

from .live import chat_lines, wait_finished, wait_until

PREFIXES = ("v1/", "api/paas/v4/", "api/deployments")
EXACT = {
    "type": "string_check",
    "name": "exact",
    "operation": "eq",
    "input": "{{sample.output_text}}",
    "reference": "{{item.reference}}",
}


@pytest.fixture
def schema(client, db):
    client.force_login(get_user_model().objects.create_user("alice"))
    response = client.get("/api/schema/?format=json")
    assert response.status_code == 200
    return response.json()


def api_routes() -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every route of the URL conf under the API prefixes, read from the views."""
    routes = set()

    def walk(patterns, prefix):
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, route)
            elif pattern.callback is unsupported_endpoint:
                continue  # the catch-all that names a route we lack: no operation of its own
            elif isinstance(pattern, URLPattern) and route.startswith(PREFIXES):
                path = "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)
                view = getattr(pattern.callback, "cls", None) or PLAIN_VIEWS[pattern.callback]
                for method in ("get", "post", "put", "patch", "delete"):
                    if hasattr(view, method):
                        routes.add((path, method))

    walk(get_resolver().url_patterns, "")
    return routes


def operations(schema):
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_the_schema_is_a_valid_openapi_document(schema):
    validate(schema)
    assert schema["openapi"].startswith("3.1")


def test_it_describes_every_route_under_both_prefixes_and_nothing_else(schema):
    routes = api_routes()
    assert ("/v1/chat/completions", "post") in routes and ("/api/paas/v4/files/{file_id}/content", "get") in routes
    assert {(path, method) for path, method, _ in operations(schema)} == routes


def test_operation_ids_are_unique_and_the_mirror_says_what_it_mirrors(schema):
    ids = [operation["operationId"] for _, _, operation in operations(schema)]
    assert len(ids) == len(set(ids))
    mirrored = schema["paths"]["/api/paas/v4/fine_tuning/jobs"]["post"]
    assert mirrored["operationId"] == "createFineTuningJobPaasV4" and "/v1/fine_tuning/jobs" in mirrored["description"]


def test_every_operation_describes_its_answer_body_and_its_errors(schema):
    for path, method, operation in operations(schema):
        responses = operation["responses"]
        content = responses["200"]["content"]
        for media_type, body in content.items():
            described = body["schema"]
            assert "$ref" in described or described.get("properties") or described.get("format") == "binary", (
                path,
                method,
                media_type,
            )
        assert {"401", "429"} <= set(responses) or operation["operationId"].startswith("downloadFile"), (path, method)
        if method != "get":
            assert {"403", "413"} <= set(responses), (path, method)
        if "{" in path:
            assert "404" in responses, (path, method)
        if any(parameter["name"] == "limit" for parameter in operation.get("parameters", [])):
            assert "400" in responses, (path, method)


def test_list_routes_name_their_query_parameters_with_their_bounds(schema):
    parameters = {p["name"]: p for p in schema["paths"]["/v1/files"]["get"]["parameters"]}
    assert set(parameters) == {"after", "limit", "purpose"}
    assert parameters["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100}
    jobs = {p["name"]: p for p in schema["paths"]["/v1/fine_tuning/jobs"]["get"]["parameters"]}
    assert jobs["metadata"]["style"] == "deepObject"


def test_errors_have_the_shape_of_api_errors(schema):
    from finetune_site.api_errors import error_body

    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]) == set(error_body("x", status_code=404)["error"])
    assert detail["properties"]["param"]["type"] == ["string", "null"]
    unauthorized = schema["components"]["responses"]["Unauthorized"]
    assert "WWW-Authenticate" in unauthorized["headers"]


def test_chat_completions_are_described_as_json_and_as_server_sent_events(schema):
    operation = schema["paths"]["/v1/chat/completions"]["post"]
    answers = operation["responses"]["200"]["content"]
    assert answers["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    event = answers["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
    assert event[1]["contentSchema"]["anyOf"][0] == {"$ref": "#/components/schemas/ChatCompletionChunk"}
    request = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for name in (
        "n",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tool_choice",
        "parallel_tool_calls",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "stream_options",
    ):
        assert name in request, name
    choice = schema["components"]["schemas"]["ChatCompletion"]["properties"]["choices"]["items"]
    assert "logprobs" in choice["properties"]


def test_file_content_is_described_as_raw_bytes(schema):
    answers = schema["paths"]["/v1/files/{file_id}/content"]["get"]["responses"]
    assert list(answers["200"]["content"]) == ["application/octet-stream"]


def test_swagger_ui_and_redoc_are_served_from_this_server(client, db):
    assert client.get("/api/docs/swagger/").status_code == 302  # to the login page
    client.force_login(get_user_model().objects.create_user("alice"))
    for page in ("/api/docs/", "/api/docs/swagger/"):
        html = client.get(page).content.decode()
        assert "/api/schema/" in html and "/static/drf_spectacular_sidecar/" in html, page
        assert "cdn." not in html and "unpkg" not in html, page
    assets = re.findall(
        r'src="(/static/drf_spectacular_sidecar/[^"]+)"', client.get("/api/docs/swagger/").content.decode()
    )
    assert assets and all(client.get(asset).status_code == 200 for asset in assets)
    keys_page = client.get("/keys/").content.decode()
    assert "/api/docs/swagger/" in keys_page and "/api/docs/" in keys_page


def test_eval_metadata_is_held_to_the_same_limits_as_a_jobs(client, db):
    """Found by the live test: evals took any object as metadata, and then answered more than the schema allows."""
    client.force_login(get_user_model().objects.create_user("alice"))
    too_many = {f"k{i}": "v" for i in range(17)}
    body = {"data_source_config": {"type": "chat"}, "testing_criteria": [EXACT], "metadata": {"team": "a"}}
    created = client.post("/v1/evals", body, content_type="application/json")
    assert created.status_code == 200, created.content
    for refused in (
        client.post("/v1/evals", {**body, "metadata": too_many}, content_type="application/json"),
        client.post(f"/v1/evals/{created.json()['id']}", {"metadata": too_many}, content_type="application/json"),
        client.post(f"/v1/evals/{created.json()['id']}", {"metadata": {"n": 1}}, content_type="application/json"),
    ):
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "metadata", refused.content


# --- The live API against its schema ------------------------------------------------------

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
"""Every response: no 5xx, a documented status and content type, documented headers, a body the schema allows."""

MAX_EXAMPLES = 10
"""Generated requests per operation and mode (valid and invalid input)."""
MIRROR_EXAMPLES = 3
"""The same for /api/paas/v4, whose operations run the same views as /v1's: fewer, enough to see each one
answer in its own paths' schema."""


@pytest.fixture(scope="module")
def contract_key(stack):
    return stack.api_key("contract")


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def seeded(stack, contract_key):
    """Real things for the generated requests to find: a processed file, a finished job and its model, an eval
    with a completed run and its output items."""
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=contract_key, max_retries=0, timeout=120)
    uploaded = client.files.create(file=("train.jsonl", chat_lines(8)), purpose="fine-tune")
    data = client.files.wait_for_processing(uploaded.id, poll_interval=0.5, max_wait_seconds=120)
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=data.id, hyperparameters={"n_epochs": 1, "batch_size": 4}
    )
    evaluation = client.evals.create(name="contract", data_source_config={"type": "chat"}, testing_criteria=[EXACT])
    run = client.evals.runs.create(
        evaluation.id,
        data_source={
            "type": "completions",
            "model": TINY_MODEL_ID,
            "source": {"type": "file_id", "id": data.id},
            "sampling_params": {"max_completion_tokens": 4},
        },
    )
    done = wait_finished(client, job.id, timeout=300)
    assert done.status == "succeeded", done.error
    run = wait_until(
        lambda: (
            (r := client.evals.runs.retrieve(run.id, eval_id=evaluation.id)).status in ("completed", "failed") and r
        ),
        timeout=300,
        what="the eval run",
    )
    assert run.status == "completed", run.error
    item = next(iter(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id)))
    return {
        "file_id": data.id,
        "job_id": job.id,
        "model": done.fine_tuned_model,
        "eval_id": evaluation.id,
        "run_id": run.id,
        "item_id": item.id,
    }


def generated_schema() -> dict:
    """The schema as the server generates it, by the same code: read at collection, so that each operation is a
    test of its own (test_the_live_server_serves_the_schema_under_test checks the server answers the same)."""
    return json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))


contract = schemathesis.openapi.from_dict(generated_schema())
MIRROR = "^/api/paas/v4/"


def _most(value) -> bool:
    """True for three generated values in four, the same way every run: aim most requests at real things,
    and leave the rest to find nothing (a 404 is part of the contract too)."""
    return zlib.crc32(repr(value).encode()) % 4 != 0


def aim(case, seeded) -> None:
    """Point a generated request at the seeded data, and keep chat answers tiny.

    DELETE stays aimed at nothing: it would take the seeded things from the operations
    after it (test_deleting_answers_as_the_schema_says deletes real things).
    """
    if case.method != "DELETE":
        for name, value in (case.path_parameters or {}).items():
            if name in seeded and _most(value):
                case.path_parameters[name] = seeded[name]
    if case.path.endswith("/chat/completions") and isinstance(case.body, dict):
        if _most(case.body.get("model")):
            case.body["model"] = TINY_MODEL_ID
        for name, most in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):
            if isinstance(case.body.get(name), int) and case.body[name] > most:
                case.body[name] = most


def call_and_check(case, stack, key, seeded) -> None:
    aim(case, seeded)
    case.call_and_validate(base_url=stack.url, headers=bearer(key), checks=CHECKS, timeout=120)


@pytest.mark.live
@pytest.mark.timeout(900)
def test_the_live_server_serves_the_schema_under_test(stack, contract_key):
    served = httpx.get(f"{stack.url}/api/schema/?format=json", headers=bearer(contract_key), timeout=60).json()
    tested = contract.raw_schema
    # All but the session cookie's name, which holds the port.
    assert served["paths"] == tested["paths"]
    for part in ("schemas", "responses"):
        assert served["components"][part] == tested["components"][part], part


@pytest.mark.live
@pytest.mark.timeout(900)
@contract.exclude(path_regex=MIRROR).parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_live_api_answers_as_its_schema_says(case, stack, contract_key, seeded):
    call_and_check(case, stack, contract_key, seeded)


@pytest.mark.live
@pytest.mark.timeout(900)
@contract.include(path_regex=MIRROR).parametrize()
@settings(max_examples=MIRROR_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_mirrored_api_answers_as_its_schema_says(case, stack, contract_key, seeded):
    call_and_check(case, stack, contract_key, seeded)


@pytest.mark.live
@pytest.mark.timeout(900)
def test_deleting_answers_as_the_schema_says(stack, contract_key, seeded):
    """What DELETE answers on real things, under both prefixes, checked against the schema."""
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=contract_key, max_retries=0, timeout=120)

    def delete(path, **path_parameters):
        case = contract[path]["DELETE"].Case(path_parameters=path_parameters)
        response = case.call_and_validate(base_url=stack.url, headers=bearer(contract_key), checks=CHECKS)
        assert response.status_code == 200, response.text
        return response.json()

    for prefix in ("/v1", "/api/paas/v4"):
        uploaded = client.files.create(file=("spare.jsonl", chat_lines(2)), purpose="fine-tune")
        assert delete(f"{prefix}/files/{{file_id}}", file_id=uploaded.id)["deleted"] is True
        spare = client.evals.create(name="spare", data_source_config={"type": "chat"}, testing_criteria=[EXACT])
        assert delete(f"{prefix}/evals/{{eval_id}}", eval_id=spare.id)["deleted"] is True
    assert delete("/v1/evals/{eval_id}/runs/{run_id}", eval_id=seeded["eval_id"], run_id=seeded["run_id"])["deleted"]
    assert delete("/api/paas/v4/fine_tuning/jobs/{job_id}", job_id=seeded["job_id"])["id"] == seeded["job_id"]
    assert delete("/api/paas/v4/fine_tuning/fine_tuned_models/{model}", model=seeded["model"])["deleted"] is True
