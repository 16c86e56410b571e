"""/v1/files: uploads stored whole or not at all, listed, read back and deleted."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO

from tuneline.server.errors import APIError, file_not_found, file_too_large, invalid_request
from tuneline.server.logs import printable
from tuneline.server.protocol import (
    CreateFileRequest,
    DeleteFileResponse,
    FileObject,
    ListFilesQuery,
    ListFilesResponse,
)
from tuneline.server.services.paging import stale_cursor
from tuneline.server.settings import ServerSettings
from tuneline.server.store import CursorNotFound, FileRecord, Store

log = logging.getLogger("tuneline.server")


def file_object(record: FileRecord) -> FileObject:
    return FileObject(
        id=record.id,
        bytes=record.bytes,
        created_at=record.created_at,
        filename=record.filename,
        purpose=record.purpose,
        status=record.status,  # type: ignore[arg-type]
    )


class FileService:
    def __init__(self, store: Store, settings: ServerSettings) -> None:
        self.store = store
        self.settings = settings

    def too_large(self, size: int) -> APIError:
        return file_too_large(size, self.settings.max_upload_bytes)

    def check_upload(self, request: CreateFileRequest) -> str:
        """The file name to store an upload under, or the APIError that refuses it before it is read."""
        upload = request.file
        filename = Path(upload.filename or "upload").name
        if request.purpose == "fine-tune" and not filename.lower().endswith(".jsonl"):
            raise invalid_request(
                "Invalid file format for Fine-Tuning API. Must be .jsonl",
                param="file",
                code="invalid_file_format",
            )
        if upload.size is not None and upload.size > self.settings.max_upload_bytes:
            raise self.too_large(upload.size)
        return filename

    def create(self, filename: str, purpose: str, content: IO[bytes]) -> FileObject:
        """Store an upload (blocking: call it in a thread)."""
        record = self.store.add_file(filename, purpose, content)
        if record.bytes > self.settings.max_upload_bytes:
            self.store.delete_file(record.id)
            raise self.too_large(record.bytes)
        if record.bytes == 0:
            self.store.delete_file(record.id)
            raise invalid_request("The uploaded file is empty.", param="file", code="empty_file")
        log.info(
            "stored %s (%s, %d bytes, purpose %s)", record.id, printable(filename), record.bytes, purpose
        )
        return file_object(record)

    def listing(self, query: ListFilesQuery) -> ListFilesResponse:
        try:
            records, has_more = self.store.list_files(
                purpose=query.purpose, after=query.after, limit=query.limit, order=query.order
            )
        except CursorNotFound as exc:
            raise stale_cursor(exc, "file") from None
        data = [file_object(r) for r in records]
        return ListFilesResponse(
            data=data,
            has_more=has_more,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    def retrieve(self, file_id: str) -> FileObject:
        record = self.store.get_file(file_id)
        if record is None:
            raise file_not_found(file_id)
        return file_object(record)

    def content(self, file_id: str) -> tuple[Path, str]:
        """Where a file's bytes are and the name to send them under."""
        record = self.store.get_file(file_id)
        path = self.store.file_path(file_id)
        if record is None or not path.is_file():
            raise file_not_found(file_id)
        return path, record.filename

    def delete(self, file_id: str) -> DeleteFileResponse:
        if not self.store.delete_file(file_id):
            raise file_not_found(file_id)
        log.info("deleted %s", file_id)
        return DeleteFileResponse(id=file_id, deleted=True)
