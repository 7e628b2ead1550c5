"""GET /model (scope: read) and POST /admin/reload (scope: admin): what serves, and swapping it."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from mqsa.service.deps import MetricsDep, RegistryDep, requires
from mqsa.service.keys import Scope
from mqsa.service.routes import BODY_ERRORS, KEY_ERRORS, errors
from mqsa.service.schemas import ModelOut, ReloadIn, ReloadOut

router = APIRouter(tags=["model"])


@router.get(
    "/model",
    response_model=ModelOut,
    dependencies=[Depends(requires(Scope.READ))],
    responses=errors(*KEY_ERRORS, 503),
    summary="What model is serving",
)
async def model_info(registry: RegistryDep) -> ModelOut:
    """The manifest's summary. The bundle's location on disk is not shown."""
    bundle = registry.bundle
    m = bundle.manifest
    return ModelOut(
        model_version=bundle.model_version,
        created_at=m.get("created_at"),
        num_items=bundle.num_items,
        max_len=bundle.max_len,
        hidden_size=int(m["hidden_size"]),
        alpha=bundle.alpha,
        index=m.get("index"),
        metrics=m.get("metrics"),
        popular_items=len(bundle.popular),
    )


@router.post(
    "/admin/reload",
    response_model=ReloadOut,
    dependencies=[Depends(requires(Scope.ADMIN))],
    responses=errors(*BODY_ERRORS, *KEY_ERRORS, 409),
    summary="Load the bundle again (or another one under MQSA_BUNDLE_ROOT)",
)
async def admin_reload(registry: RegistryDep, metrics: MetricsDep, body: ReloadIn | None = None) -> ReloadOut:
    """Verify and swap in a bundle; requests in flight finish on the old model.

    A bundle outside MQSA_BUNDLE_ROOT, missing, incomplete, corrupted or failing its
    manifest's checks is refused with one answer (409 `bundle_refused`, "not a usable
    bundle"), whatever the reason, so the route tells a caller nothing about the file
    system; the reason is in the service's log. The old model keeps serving.
    """
    result = await registry.reload(body.bundle_dir if body and body.bundle_dir else None)
    metrics.set_model(result.model_version)
    return ReloadOut(
        reloaded=True, model_version=result.model_version, previous_version=result.previous_version
    )
