"""The Files API (OpenAI shape): upload, list, retrieve, delete, content; split and dedupe (our own)."""

from django.http import FileResponse, Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from finetune_site.api_errors import error_response
from finetune_site.apiviews import api_user_or_error
from finetune_site.ids import unix
from finetune_site.openapi import cursor_parameters, errors
from finetune_site.pagination import cursor_page

from . import selectors, services
from .api_schema import FILE_ID, UPLOAD, FileDeleted, FileList, FileObject, FileSplitInput, FileSplitResult
from .models import Dataset


def file_object(dataset: Dataset) -> dict:
    return {
        "id": dataset.public_id,
        "object": "file",
        "bytes": dataset.bytes,
        "created_at": unix(dataset.created_at),
        "filename": dataset.filename,
        "purpose": dataset.purpose,
        "status": dataset.status,
        "status_details": dataset.status_details or None,
        "expires_at": None,
    }


def _owned(request, file_id: str) -> Dataset:
    dataset = selectors.dataset_for(request.user, file_id)
    if dataset is None:
        raise Http404(f"No file with id {file_id!r} was found.")
    return dataset


class FileListCreate(APIView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        operation_id="listFiles",
        summary="List your files, newest first",
        parameters=[
            OpenApiParameter("purpose", OpenApiTypes.STR, description="Only files of this purpose."),
            *cursor_parameters(default_limit=100, max_limit=10000),
        ],
        responses={200: FileList, **errors(400)},
    )
    def get(self, request):
        datasets = selectors.datasets_for(request.user)
        if request.query_params.get("purpose"):
            datasets = datasets.filter(purpose=request.query_params["purpose"])
        return Response(
            cursor_page(datasets, request.query_params, to_dict=file_object, default_limit=100, max_limit=10000)
        )

    @extend_schema(
        operation_id="createFile",
        summary="Upload a dataset; it is validated in the background",
        request=UPLOAD,
        responses={200: FileObject, **errors(400)},
    )
    def post(self, request):
        dataset = services.dataset_create(
            owner=request.user,
            upload=request.FILES.get("file"),
            purpose=request.data.get("purpose") or "",
        )
        return Response(file_object(dataset))


@extend_schema(parameters=[FILE_ID])
class FileDetail(APIView):
    @extend_schema(operation_id="retrieveFile", summary="A file", responses={200: FileObject, **errors(404)})
    def get(self, request, file_id):
        return Response(file_object(_owned(request, file_id)))

    @extend_schema(
        operation_id="deleteFile",
        summary="Delete a file no active job needs",
        responses={200: FileDeleted, **errors(400, 404)},
    )
    def delete(self, request, file_id):
        dataset = _owned(request, file_id)
        services.dataset_delete(dataset=dataset)
        return Response({"id": file_id, "object": "file", "deleted": True})


class FileSplit(APIView):
    """New train/validation(/test) files, answered at once with status `uploaded` and written in the background."""

    @extend_schema(
        operation_id="splitFile",
        summary="Split a processed file into train, validation and test files",
        parameters=[FILE_ID],
        request=FileSplitInput,
        responses={200: FileSplitResult, **errors(400, 404)},
    )
    def post(self, request, file_id):
        dataset = _owned(request, file_id)
        parts = services.dataset_split(dataset=dataset, **services.split_options(request.data))
        return Response({"object": "list", "data": [file_object(part) for part in parts]})


class FileDedupe(APIView):
    """A new file without exact duplicates, answered at once with status `uploaded` and written in the background."""

    @extend_schema(
        operation_id="dedupeFile",
        summary="A copy of a processed file without exact duplicates",
        parameters=[FILE_ID],
        request=None,
        responses={200: FileObject, **errors(400, 404)},
    )
    def post(self, request, file_id):
        return Response(file_object(services.dataset_dedupe(dataset=_owned(request, file_id))))


def file_content(request, file_id):
    """The raw bytes; a plain view because DRF answers `Accept: application/binary` with 406."""
    user, error = api_user_or_error(request)
    if error:
        return error
    dataset = selectors.dataset_for(user, file_id)
    if dataset is None:
        return error_response(f"No file with id {file_id!r} was found.", status_code=404, code="not_found")
    if dataset.is_being_written:
        return error_response(
            f"File {file_id} is still being written; retry when its status is processed.", code="file_not_ready"
        )
    return FileResponse(
        dataset.file.open("rb"), content_type="application/octet-stream", as_attachment=True, filename=dataset.filename
    )
