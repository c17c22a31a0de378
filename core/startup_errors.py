"""Configuration mistakes found while the app starts, reported in one line instead of a traceback.

Starlette reports any exception raised in the lifespan with its whole traceback, which uvicorn prints as an
error. A `ConfigurationError` is not a bug: the operator needs the one sentence that says what to change.
"""

from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.settings import ConfigurationError
from core.settings_errors import configuration_error_line


class OneLineStartupErrors:
    """Pure ASGI: only the lifespan passes through it; requests go straight to the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A request gets the app's own coroutine, not one of this layer's around it: a stream held open for
        # minutes keeps no frame of this.
        if scope["type"] != "lifespan":
            return self.app(scope, receive, send)
        return self._lifespan(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        held: list[Message] = []

        async def send_unless_startup_failed(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)  # sent below, once it is known what failed
            else:
                await send(message)

        try:
            await self.app(scope, receive, send_unless_startup_failed)
        except ConfigurationError as exc:
            await send({"type": "lifespan.startup.failed", "message": configuration_error_line(exc)})
            return
        except BaseException:
            for message in held:
                await send(message)
            raise
        for message in held:
            await send(message)
