"""Errors the serving engine raises; the API layer maps them to HTTP statuses."""


class ServingError(Exception):
    """A request the engine cannot serve; the message is safe to show to the caller."""


class InvalidRequest(ServingError):
    """The request itself is wrong (bad messages, tools or sampling settings): a 400.

    `param` names the request field at fault when it is not the messages (logit_bias, response_format...).
    """

    def __init__(self, problems: list[str], *, param: str | None = None):
        self.problems = list(problems)
        self.param = param
        super().__init__("; ".join(self.problems))


class PromptTooLong(InvalidRequest):
    """The prompt plus the tokens asked for do not fit in the model's context window."""

    def __init__(self, *, prompt_tokens: int, max_tokens: int, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        super().__init__(
            [
                f"this model's maximum context length is {context_length} tokens, but the request "
                f"needs {prompt_tokens + max_tokens} ({prompt_tokens} in the messages, "
                f"{max_tokens} for the completion); shorten the messages or lower max_tokens"
            ]
        )


class ModelLoadError(ServingError):
    """A base model or adapter folder is missing or cannot be loaded.

    The message says what failed and is shown to callers; `detail` says where on the
    server and why, for the log only (a caller has no business knowing the paths).
    """

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


class Overloaded(ServingError):
    """The engine's batch and KV memory stayed full for as long as a request may wait: a 429.

    `retry_after` is how many seconds the caller should wait before sending it again.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
