"""The route of ``GET /v1/model``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from service.dependencies import serving_of
from service.endpoints.model.protocol import ModelResponse
from service.endpoints.model.serving import ModelServing
from service.routing import v1_router

router = v1_router()
ServingDep = Annotated[ModelServing, Depends(serving_of(ModelServing))]


@router.get("/model", response_model=ModelResponse, summary="The loaded model and the limits")
async def model_info(serving: ServingDep) -> ModelResponse:
    return serving.model_card()
