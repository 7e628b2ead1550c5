"""GET and PUT /admin/traffic (scope: admin): the champion's challengers, their shares and shadows.

PUT loads each challenger on this worker first (a bundle outside MQSA_BUNDLE_ROOT or
not usable is refused: 409 ``bundle_refused`` naming the field, and the plan in force
stays), then stores the plan in Redis for every replica (``service/traffic.py``) and
follows it at once; the other workers follow within MQSA_TRAFFIC_POLL_SECONDS. GET shows
the plan this worker follows and the models it serves from it.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.exceptions import RequestValidationError

from mqsa.errors import BundleRefused
from mqsa.service.deps import RegistryDep, TrafficDep, requires
from mqsa.service.keys import Scope
from mqsa.service.registry import ModelRegistry
from mqsa.service.routes import BODY_ERRORS, KEY_ERRORS, errors
from mqsa.service.schemas import ChallengerOut, TrafficIn, TrafficOut
from mqsa.service.traffic import Challenger

router = APIRouter(tags=["traffic"])


def traffic_out(registry: ModelRegistry) -> TrafficOut:
    """The plan this worker follows and what it serves from it."""
    plan, in_force, now = registry.plan, registry.in_force(), registry.traffic()
    challengers = [
        ChallengerOut(**c.to_dict(), model_version=in_force.get(c.bundle_dir)) for c in plan.challengers
    ]
    return TrafficOut(
        version=plan.version,
        salt=plan.salt,
        updated_at=plan.updated_at,
        challengers=challengers,
        champion=now["champion"],
        shares=now["shares"],
        shadow=now["shadow"],
    )


@router.get(
    "/admin/traffic",
    response_model=TrafficOut,
    dependencies=[Depends(requires(Scope.ADMIN))],
    responses=errors(*KEY_ERRORS, 503),
    summary="The traffic plan this worker follows, and the models it serves",
)
async def get_traffic(registry: RegistryDep) -> TrafficOut:
    return traffic_out(registry)


async def _stage(registry: ModelRegistry, challengers: tuple[Challenger, ...]) -> None:
    """Load every challenger here; refuse an unusable bundle (409) or a model served twice (422),
    naming the field."""
    served = {registry.bundle.model_version: "the champion"}
    for n, challenger in enumerate(challengers):
        field = f"challengers.{n}.bundle_dir"
        try:
            version = await registry.stage(challenger.bundle_dir)
        except BundleRefused as exc:
            raise BundleRefused(str(exc), [{"field": field, "message": str(exc)}]) from exc
        if version in served:
            message = f"model {version} is {served[version]} already"
            loc = ("body", "challengers", n, "bundle_dir")
            raise RequestValidationError([{"type": "value_error", "loc": loc, "msg": message}])
        served[version] = f"challenger {n}"


@router.put(
    "/admin/traffic",
    response_model=TrafficOut,
    dependencies=[Depends(requires(Scope.ADMIN))],
    responses=errors(*BODY_ERRORS, *KEY_ERRORS, 409, 503),
    summary="Set the challengers: bundles, shares, shadows (every replica follows)",
)
async def put_traffic(body: TrafficIn, registry: RegistryDep, traffic: TrafficDep) -> TrafficOut:
    """Replace the plan. Each challenger serves its share of the users, picked by a stable hash
    of `user_id` with the plan's salt, or (`shadow`) scores every request without serving it;
    the champion serves the rest. The answer is the plan as this worker now follows it."""
    challengers = tuple(Challenger(c.bundle_dir, c.share, c.shadow) for c in body.challengers)
    try:
        await _stage(registry, challengers)
        plan = await traffic.store.put(body.salt or registry.plan.salt, challengers)
    except Exception:
        registry.unstage()
        raise
    await traffic.adopt(plan)
    return traffic_out(registry)
