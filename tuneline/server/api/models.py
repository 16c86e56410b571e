"""/v1/models: list, retrieve, delete (fine-tuned models and checkpoints only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from tuneline.server.api.common import respond
from tuneline.server.services.models import ModelService

router = APIRouter(prefix="/v1/models")


def service(request: Request) -> ModelService:
    return request.app.state.models  # type: ignore[no-any-return]


@router.get("")
def list_models(models: ModelService = Depends(service)) -> Response:
    return respond(models.listing())


# Model ids hold colons and may hold slashes (`ft:base:org:suffix:id:ckpt-step-N`).
@router.get("/{model_id:path}")
def retrieve_model(model_id: str, models: ModelService = Depends(service)) -> Response:
    return respond(models.retrieve(model_id))


@router.delete("/{model_id:path}")
def delete_model(model_id: str, models: ModelService = Depends(service)) -> Response:
    return respond(models.delete(model_id))
