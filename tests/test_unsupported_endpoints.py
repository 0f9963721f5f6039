"""Endpoints of the OpenAI API that we lack answer in the API's error shape, naming the route."""

import pytest


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/v1/embeddings"),
        ("post", "/v1/responses"),
        ("get", "/v1/batches"),
        ("post", "/api/paas/v4/images/generations"),
    ],
)
def test_an_endpoint_we_lack_answers_a_404_in_the_error_shape(client, method, path):
    body = {"data": "{}", "content_type": "application/json"} if method == "post" else {}
    response = getattr(client, method)(path, **body)

    assert response.status_code == 404 and response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "unsupported_endpoint" and error["type"] == "not_found_error"
    assert f"{method.upper()} {path} is not an endpoint" in error["message"]
    assert ("/api/paas/v4/" if path.startswith("/api/") else "/v1/") in error["message"].split("under ")[1]


def test_known_routes_still_answer_as_before(client):
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/files/file-nope").status_code == 401
