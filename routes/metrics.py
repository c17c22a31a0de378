"""GET /metrics: the gateway's Prometheus metrics (observe.metrics), for admins and for METRICS_TOKEN.

Never public: the metrics say which models and hosts there are and how busy they are. Prometheus reads it
with `Authorization: Bearer <METRICS_TOKEN>`, a token that is no one's credential, so the credentials guard
leaves this path to the check here; anyone else needs an admin's token or API key.
"""

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from auth.authenticate import token_from_header
from core.errors import Forbidden
from observe.metrics import CONTENT_TYPE, scrape
from observe.request_log import request_log
from routes.dependencies import AppServices, bearer_scheme
from routes.schemas import errors

router = APIRouter(tags=["metrics"])


async def metrics_reader(
    request: Request,
    services: AppServices,
    _documented_bearer: Annotated[object, Depends(bearer_scheme)],
) -> None:
    """Lets METRICS_TOKEN and admins through: 401 without valid credentials, 403 for anyone else."""
    authorization = request.headers.get("authorization")
    expected = services.settings.metrics_token
    if expected is not None:
        # In constant time: how much of it matched must not show in how long the answer took.
        sent = token_from_header(authorization).encode("utf-8", "surrogateescape")
        if hmac.compare_digest(sent, expected.get_secret_value().encode()):
            return
    caller = await services.authenticator.identify(authorization)
    if (entry := request_log(request.scope)) is not None:
        entry.user_id = caller.user.id
        entry.key_id = caller.key.id if caller.key is not None else None
    if not caller.user.is_admin:
        raise Forbidden("metrics are for admins, or for METRICS_TOKEN")


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus' text format"},
        **errors(401, 403),
    },
    summary="Prometheus metrics (admins, or METRICS_TOKEN)",
    dependencies=[Depends(metrics_reader)],
)
async def metrics(services: AppServices) -> Response:
    return Response(scrape(services.fleet), media_type=CONTENT_TYPE)
