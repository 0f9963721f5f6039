"""The chat completions schema: documentation only, mirroring `protocol` (what a request may hold, what an answer is).

The view is a plain async Django view (it streams), which DRF's schema generator cannot
see, so `ChatCompletions` stands in for it (`finetune_site.schema.PLAIN_VIEWS`). The
shapes are written as JSON Schema, not serializers: a message's content, `stop`,
`tool_choice` and `response_format` are each one of several shapes.
"""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.views import APIView

from finetune_site.openapi import errors

from .protocol import DEFAULT_MAX_TOKENS, IGNORED_FIELDS, MAX_CHOICES, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    """Accepts null too: the SDKs send `"response_format": null` and the like."""
    return {"anyOf": [schema, {"type": "null"}]}


_TEXT_PARTS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    },
}

_TOOL_CALL = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string", "enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "arguments": {"type": "string", "description": "The arguments as a JSON text."},
            },
        },
    },
}

_PROBABILITY = {
    "type": "object",
    "required": ["token", "logprob", "bytes"],
    "properties": {
        "token": {"type": "string"},
        "logprob": {"type": "number", "maximum": 0},
        "bytes": {
            "anyOf": [{"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}, {"type": "null"}]
        },
    },
}

_LOGPROBS = {
    "type": "object",
    "required": ["content"],
    "description": "Each generated token with its log probability and the most likely alternatives.",
    "properties": {
        "content": {
            "type": ["array", "null"],
            "items": {
                **_PROBABILITY,
                "required": [*_PROBABILITY["required"], "top_logprobs"],
                "properties": {**_PROBABILITY["properties"], "top_logprobs": {"type": "array", "items": _PROBABILITY}},
            },
        },
        "refusal": {"type": "null"},
    },
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "description": "The prompt counted once, and the tokens of every choice.",
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
    },
}

_FINISH_REASONS = ["stop", "length", "tool_calls"]

_ANSWER_META = {
    "id": {"type": "string", "description": "`chatcmpl-...`, the same in every chunk of one answer."},
    "created": {"type": "integer", "description": "Unix seconds."},
    "model": {"type": "string"},
}

COMPONENTS = {
    "ChatMessage": {
        "type": "object",
        "required": ["role"],
        "description": "One turn of the conversation; content may be null only on an assistant turn with tool_calls.",
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"anyOf": [{"type": "string"}, _TEXT_PARTS, {"type": "null"}]},
            "name": {"type": "string"},
            "tool_calls": {"type": "array", "items": _TOOL_CALL},
            "tool_call_id": {"type": "string", "description": "role tool: the call this answers."},
        },
    },
    "ChatTool": {
        "type": "object",
        "required": ["type", "function"],
        "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "description": {"type": "string"},
                    "parameters": {"type": "object", "description": "A JSON schema of the arguments."},
                    "strict": _nullable({"type": "boolean"}),
                },
            },
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "description": "OpenAI's and zhipuai's request. Null means the default for every field; a field we cannot "
        "honour (audio, modalities other than text, prediction, web_search_options, store true, the legacy "
        "functions...) is answered 400 naming it, never ignored. Accepted and ignored: "
        + ", ".join(f"`{name}`" for name in IGNORED_FIELDS)
        + ".",
        "properties": {
            "model": {"type": "string", "minLength": 1, "description": "A base, fine-tuned or checkpoint model id."},
            "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
            "max_tokens": _nullable(
                {"type": "integer", "minimum": 1, "maximum": 32768, "description": f"Default {DEFAULT_MAX_TOKENS}."}
            ),
            "max_completion_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": 32768}),
            "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2, "description": "0: greedy."}),
            "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
            "stop": _nullable(
                {
                    "anyOf": [
                        {"type": "string", "minLength": 1},
                        {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}},
                    ],
                    "description": "Up to 4 strings that end the answer (left out of it).",
                }
            ),
            "seed": _nullable({"type": "integer", "minimum": 0, "maximum": 2**63 - 1}),
            "n": _nullable(
                {"type": "integer", "minimum": 1, "maximum": MAX_CHOICES, "description": "How many choices."}
            ),
            "stream": _nullable({"type": "boolean", "description": "Answer as server-sent events."}),
            "stream_options": _nullable(
                {
                    "type": "object",
                    "properties": {
                        "include_usage": {"type": "boolean", "description": "End with a chunk holding only usage."}
                    },
                }
            ),
            "tools": _nullable({"type": "array", "items": _ref("ChatTool")}),
            "tool_choice": _nullable(
                {
                    "anyOf": [
                        {"type": "string", "enum": ["none", "auto", "required"]},
                        {
                            "type": "object",
                            "required": ["type", "function"],
                            "properties": {
                                "type": {"type": "string", "enum": ["function"]},
                                "function": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {"name": {"type": "string"}},
                                },
                            },
                        },
                    ],
                    "description": '"required" and a named function need tools holding it.',
                }
            ),
            "parallel_tool_calls": _nullable({"type": "boolean", "description": "false: at most one tool call."}),
            "logprobs": _nullable({"type": "boolean"}),
            "top_logprobs": _nullable(
                {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": MAX_TOP_LOGPROBS,
                    "description": "Needs logprobs: true.",
                }
            ),
            "response_format": _nullable(
                {
                    "anyOf": [
                        {
                            "type": "object",
                            "required": ["type"],
                            "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}},
                        },
                        {
                            "type": "object",
                            "required": ["type", "json_schema"],
                            "properties": {
                                "type": {"type": "string", "enum": ["json_schema"]},
                                "json_schema": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {
                                        "name": {"type": "string", "minLength": 1},
                                        "description": {"type": "string"},
                                        "schema": {"type": "object"},
                                        "strict": _nullable({"type": "boolean"}),
                                    },
                                },
                            },
                        },
                    ],
                    "description": "json_object and json_schema are decoded under a grammar: the answer parses.",
                }
            ),
            "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
            "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
            "logit_bias": _nullable(
                {
                    "type": "object",
                    "maxProperties": MAX_LOGIT_BIAS,
                    "propertyNames": {"pattern": "^[0-9]+$"},
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                    "description": "Token id (as a string) to a bias added to its score; ids must be the model's.",
                }
            ),
            "do_sample": _nullable({"type": "boolean", "description": "zhipuai: false decodes greedily."}),
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "description": "The whole answer (a request without `stream`).",
        "properties": {
            **_ANSWER_META,
            "object": {"type": "string", "enum": ["chat.completion"]},
            "choices": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer", "minimum": 0},
                        "message": {
                            "type": "object",
                            "required": ["role", "content"],
                            "properties": {
                                "role": {"type": "string", "enum": ["assistant"]},
                                "content": {
                                    "type": ["string", "null"],
                                    "description": "null when the answer is only tool calls.",
                                },
                                "tool_calls": {"type": "array", "items": _TOOL_CALL},
                            },
                        },
                        "finish_reason": {"type": "string", "enum": _FINISH_REASONS},
                        "logprobs": {**_LOGPROBS, "description": "With logprobs: true."},
                    },
                },
            },
            "usage": _USAGE,
        },
    },
    "ChatCompletionChunk": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "description": "One event of a streamed answer: the first delta of a choice holds its role, the last "
        "its finish_reason; with `stream_options.include_usage` a last chunk has no choices, only usage.",
        "properties": {
            **_ANSWER_META,
            "object": {"type": "string", "enum": ["chat.completion.chunk"]},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "delta", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer", "minimum": 0},
                        "delta": {
                            "type": "object",
                            "properties": {
                                "role": {"type": "string", "enum": ["assistant"]},
                                "content": {"type": ["string", "null"]},
                                "tool_calls": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                        "finish_reason": {"type": ["string", "null"], "enum": [*_FINISH_REASONS, None]},
                        "logprobs": {**_LOGPROBS, "description": "With logprobs: true."},
                    },
                },
            },
            "usage": _USAGE,
            "extra_json": {"type": "object", "description": "Always {}: zhipuai's SDK requires the field."},
        },
    },
}
"""The chat shapes, added to the schema's components by `finetune_site.schema.add_components`."""

SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "description": 'Each event is `data: <chunk JSON>`; an error after the stream began is `data: {"error": ...}`, '
    "and the stream ends with `data: [DONE]`.",
    "properties": {
        "data": {
            "anyOf": [
                {"type": "string", "enum": ["[DONE]"]},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": [_ref("ChatCompletionChunk"), _ref("ErrorBody")]},
                },
            ]
        }
    },
}
"""One server-sent event (OpenAPI 3.1 reads a text/event-stream schema as one event's)."""


ANSWERED = "The whole answer as JSON; with `stream: true`, server-sent events of chunks."


class ChatCompletions(APIView):
    """Documentation only: stands in for `api_router.chat_completions` in the schema."""

    @extend_schema(
        operation_id="createChatCompletion",
        summary="Answer a conversation, whole or streamed as server-sent events",
        description="`model` is a base model id, one of your fine-tuned models, or one of their checkpoints; "
        "a model with a deployment is answered by it, any other by the shared pool.",
        request={"application/json": _ref("ChatCompletionRequest")},
        responses={
            (200, "application/json"): OpenApiResponse(_ref("ChatCompletion"), description=ANSWERED),
            (200, "text/event-stream"): OpenApiResponse(SSE_EVENT, description=ANSWERED),
            **errors(400, 404, 500, 503, 504),
        },
    )
    def post(self, request):
        raise NotImplementedError
