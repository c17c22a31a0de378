"""Where every model call's usage goes: opened by the route, held against the quotas, and once it ends,
recorded (the writer), counted (the quotas), and told to whoever watches (the metrics, the access log)."""

import logging
from collections.abc import Callable

from usage.quotas import Estimate, QuotaBook, QuotaExceeded, Subject
from usage.reading import prompt_estimate
from usage.records import Outcome, UsageRecord
from usage.tally import RecordHolder, Tally
from usage.writer import UsageWriter

logger = logging.getLogger("gateway.usage")


class UsageBook:
    def __init__(
        self,
        writer: UsageWriter,
        quotas: QuotaBook,
        observers: list[Callable[[UsageRecord], None]] | None = None,
    ) -> None:
        self.writer = writer
        self.quotas = quotas
        self.observers = observers or []

    def open(
        self,
        *,
        user_id: int,
        key_id: int | None,
        surface: str,
        model: str,
        band: str,
        openai: bool,
        embeds: bool,
        body_bytes: int,
        holder: RecordHolder | None,
    ) -> Tally:
        return Tally(
            self._recorded,
            user_id=user_id,
            key_id=key_id,
            surface=surface,
            model=model,
            band=band,
            openai=openai,
            embeds=embeds,
            body_bytes=body_bytes,
            holder=holder,
        )

    async def hold(self, tally: Tally, subjects: list[Subject], slot_seconds: float) -> None:
        """Hold an estimate of the request's use against `subjects`' quotas; past one, the request is
        recorded as refused and QuotaExceeded raised (a 429, in the surface's error shape; a 503 when
        Redis does not answer and quotas are closed without it)."""
        if not subjects:
            return
        tally.subjects = subjects
        tokens = prompt_estimate(tally.body_bytes) + (
            0 if tally.embeds else self.quotas.answer_tokens(subjects)
        )
        try:
            tally.hold = await self.quotas.hold(subjects, Estimate(tokens, slot_seconds))
        except QuotaExceeded as refused:
            tally.finish(Outcome.REFUSED, refused.status)
            raise

    def _recorded(self, tally: Tally, record: UsageRecord) -> None:
        self.quotas.ended(tally.hold, tally.subjects, record)
        self.writer.add(record)
        if tally.holder is not None:
            tally.holder.usage = record
        for observer in self.observers:
            try:
                observer(record)
            except Exception:  # a watcher's bug must not break the answer it watches, nor the next ones
                logger.exception("a usage observer failed")
