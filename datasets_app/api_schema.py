"""The Files API's schema: documentation only, each shape mirroring the function in api.py that writes it."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.views import APIView

from finetune_site.openapi import Choice, Const, errors, list_of, page_of, path_parameter

from .models import Dataset

FILE_ID = path_parameter("file_id", "A file id (`file-...`).")


class FileObject(serializers.Serializer):
    """An uploaded file (`file_object`); `status` moves from uploaded to processed or error."""

    id = serializers.CharField()
    object = Const("file")
    bytes = serializers.IntegerField()
    created_at = serializers.IntegerField(help_text="Unix seconds.")
    filename = serializers.CharField()
    purpose = Choice(["fine-tune"])
    status = Choice([status for status, _ in Dataset.STATUS_CHOICES])
    status_details = serializers.CharField(
        allow_null=True, help_text="Why validation failed, every problem with its line number; null otherwise."
    )
    expires_at = serializers.IntegerField(allow_null=True, help_text="Always null: files do not expire.")


class FileDeleted(serializers.Serializer):
    id = serializers.CharField()
    object = Const("file")
    deleted = serializers.BooleanField()


class FileSplitInput(serializers.Serializer):
    """How to split a processed file (`services.split_options`); validation + test must stay below 100."""

    validation_percent = serializers.FloatField(
        required=False, min_value=0, max_value=100, help_text="Share for validation, above 0; default 10."
    )
    test_percent = serializers.FloatField(
        required=False, min_value=0, max_value=100, help_text="Share for a test file; default 0 (none)."
    )
    seed = serializers.IntegerField(required=False, help_text="Shuffles the same way each time; default 42.")


FileList = page_of(FileObject, "FileList")
FileSplitResult = list_of(FileObject, "FileSplitResult")

UPLOAD = {
    "multipart/form-data": {
        "type": "object",
        "required": ["file", "purpose"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "JSON Lines, one example a line."},
            "purpose": {"type": "string", "enum": ["fine-tune"]},
        },
    }
}
"""The upload form the SDKs send: any file name and part type, `.jsonl` is not required."""


class FileContent(APIView):
    """Documentation only: `api.file_content` is a plain Django view (DRF answers `Accept: application/binary`
    with 406), so this stands in for it in the schema (`finetune_site.schema.PLAIN_VIEWS`)."""

    @extend_schema(
        operation_id="downloadFile",
        summary="The file's bytes, as uploaded",
        description="Answered once the file is written (a split or deduplicated file is written in the background).",
        parameters=[FILE_ID],
        responses={
            (200, "application/octet-stream"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The raw bytes, as an attachment named after the file."
            ),
            **errors(400, 404),
        },
    )
    def get(self, request, file_id):
        raise NotImplementedError
