"""/v1/files: upload (multipart), list, retrieve, content, delete."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from tuneline.server.api.common import query, respond
from tuneline.server.errors import APIError, invalid_request
from tuneline.server.protocol import CreateFileRequest, ListFilesQuery
from tuneline.server.services.files import FileService

router = APIRouter(prefix="/v1/files")


def service(request: Request) -> FileService:
    return request.app.state.files  # type: ignore[no-any-return]


@router.post("")
async def upload_file(request: Request, files: FileService = Depends(service)) -> Response:
    # The gatekeeper (tuneline/server/middleware.py) refuses a body over the upload limit as it streams.
    try:
        form = await request.form(max_files=1, max_fields=8)
    except APIError:
        raise
    except Exception as exc:
        raise invalid_request(f"Could not parse the multipart form: {exc}.") from None
    upload = CreateFileRequest.model_validate({"purpose": form.get("purpose"), "file": form.get("file")})
    try:
        filename = files.check_upload(upload)
        created = await run_in_threadpool(files.create, filename, upload.purpose, upload.file.file)
    finally:
        await upload.file.close()
    return respond(created)


@router.get("")
def list_files(
    listed: ListFilesQuery = Depends(query(ListFilesQuery)), files: FileService = Depends(service)
) -> Response:
    return respond(files.listing(listed))


@router.get("/{file_id}")
def retrieve_file(file_id: str, files: FileService = Depends(service)) -> Response:
    return respond(files.retrieve(file_id))


@router.get("/{file_id}/content")
def file_content(file_id: str, files: FileService = Depends(service)) -> Response:
    path, filename = files.content(file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=filename)


@router.delete("/{file_id}")
def delete_file(file_id: str, files: FileService = Depends(service)) -> Response:
    return respond(files.delete(file_id))
