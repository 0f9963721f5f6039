"""The chat completions API (`POST /v1/chat/completions`), split as vLLM splits its OpenAI server.

`api_router` is the view (auth, CSRF, then the others), `protocol` reads requests
and writes response objects, `serving` resolves the model and routes the request
to its deployment or the shared pool, `streaming` carries tokens from worker
threads to the response, and `pool` owns the process-wide model pool.
"""
