"""The `metadata` of jobs and evals: OpenAI's up to 16 string pairs, checked the same way for both."""

from .errors import InvalidInput

METADATA_LIMITS = {"keys": 16, "key_chars": 64, "value_chars": 512}
"""OpenAI's limits on an object's metadata."""


def check_metadata(metadata) -> None:
    """Raise InvalidInput naming `metadata` unless it is None or at most 16 short string pairs."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise InvalidInput("metadata must be an object of string keys and string values.", param="metadata")
    if len(metadata) > METADATA_LIMITS["keys"]:
        raise InvalidInput(
            f"metadata may hold at most {METADATA_LIMITS['keys']} pairs, got {len(metadata)}.", param="metadata"
        )
    for key, value in metadata.items():
        if len(key) > METADATA_LIMITS["key_chars"]:
            raise InvalidInput(
                f"metadata key {key[:20]!r}... is longer than {METADATA_LIMITS['key_chars']} characters.",
                param="metadata",
            )
        if not isinstance(value, str) or len(value) > METADATA_LIMITS["value_chars"]:
            raise InvalidInput(
                f"metadata[{key!r}] must be a string of at most {METADATA_LIMITS['value_chars']} characters.",
                param="metadata",
            )
