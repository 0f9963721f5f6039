"""The one pagination helper: OpenAI-style cursor lists (`after` is an item id)."""

from .api_errors import ApiError


def cursor_page(
    queryset, params, *, to_dict, id_field: str = "public_id", default_limit: int = 20, max_limit: int = 100
) -> dict:
    """Newest first; `has_more` must be exact or the openai SDK's auto-pagination loops forever."""
    raw_limit = params.get("limit")
    try:
        limit = default_limit if raw_limit in (None, "") else int(raw_limit)
    except ValueError:
        raise ApiError(f"limit must be an integer, got {raw_limit!r}.", param="limit") from None
    if not 1 <= limit <= max_limit:
        raise ApiError(f"limit must be between 1 and {max_limit}, got {limit}.", param="limit")
    ordered = queryset.order_by("-pk")
    after = params.get("after")
    if after:
        anchor = queryset.filter(**{id_field: after}).values_list("pk", flat=True).first()
        if anchor is None:
            raise ApiError(f"No item with id {after!r} to page after.", param="after")
        ordered = ordered.filter(pk__lt=anchor)
    items = list(ordered[: limit + 1])
    data = [to_dict(item) for item in items[:limit]]
    return {
        "object": "list",
        "data": data,
        "has_more": len(items) > limit,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
