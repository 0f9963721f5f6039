"""Domain errors: what services raise when they refuse, with no HTTP in them.

A service says *why* it refuses (bad input, not found, not allowed now...); the
API (`finetune_site.api_errors`) and the pages (`finetune_site.middleware`) each
map these to a response in one place. `param` names the input at fault and
`code` is a stable machine-readable reason (None unless the service names one, as
OpenAI's errors often are; a NotFound says "not_found", as a 404 always did here);
both reach API callers unchanged.
"""


class ApplicationError(Exception):
    """A request a service refuses; the message is written for the user and safe to show."""

    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code


class InvalidInput(ApplicationError):
    """The input is wrong: a field out of range, a file of the wrong kind."""


class NotFound(ApplicationError):
    """The thing does not exist, or the caller may not see it (the two are never told apart)."""

    default_code = "not_found"


class NotAllowed(ApplicationError):
    """The caller may see the thing but not do this to it (delete a base model)."""


class InvalidState(ApplicationError):
    """The thing exists but is not in a state that allows this now (cancel a finished job)."""


class TooLarge(ApplicationError):
    """The input is larger than this installation accepts."""


class CapacityExceeded(ApplicationError):
    """Not enough capacity (serving slots, storage) left for this now."""


class Busy(ApplicationError):
    """Too much is running to take this now; `retry_after` says in how many seconds to send it again."""

    def __init__(self, message: str, *, retry_after: float, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class Unavailable(ApplicationError):
    """Nothing could take this in time (no serving instance picked the request up); the same request may work later."""


class TimedOut(ApplicationError):
    """What took the request stopped answering before it was done."""


class ModelFailed(ApplicationError):
    """The model failed while answering: a fault on our side, not in the request."""
