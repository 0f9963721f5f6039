"""The API's JSON parser: DRF's, with deep nesting and lone surrogates as 400s instead of 500s."""

import io

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser as DRFJSONParser

from .jsonbody import check_text


class JSONParser(DRFJSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        raw = stream.read()  # kept, so that only a body with a surrogate escape is walked
        try:
            data = super().parse(io.BytesIO(raw), media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the JSON is nested too deeply") from None
        try:
            check_text(data, raw)
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        return data
