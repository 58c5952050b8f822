"""Model of ``inboxbooster-mailer-global.yaml``: settings users rarely change.

Key names and defaults are the original's; ``reliable-queue.*`` tuning keys are new.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from common.config.base import StrictModel


class QueueNames(StrictModel):
    """Names of the two submission streams."""

    primary_queue: str = Field("IB-MAIL-QUEUE-P0", min_length=1, description="Priority mail (X-Priority: 0).")
    default_queue: str = Field("IB-MAIL-QUEUE-P1", min_length=1, description="Default mail.")


class ReliableQueueSettings(StrictModel):
    """Queue semantics shared by every producer and consumer."""

    queue_names: QueueNames = Field(default_factory=QueueNames)
    max_deliveries: int = Field(
        5, ge=1, description="Deliveries (crashes or unexpected errors) before an entry is dead-lettered."
    )
    claim_idle_seconds: float = Field(
        60.0, gt=0, description="An entry pending this long on a silent consumer is claimed by another."
    )
    max_queue_length: int = Field(
        200_000,
        ge=0,
        description="Producers get a temporary failure when a queue holds this many entries (0 = no limit).",
    )
    priority_share: int = Field(
        10,
        ge=2,
        description="Under sustained priority load, every Nth batch is taken from the default queue first.",
    )
    batch_size: int = Field(64, ge=1, le=10_000, description="Entries a consumer reads per round trip.")
    dead_letter_max_length: int = Field(
        100_000,
        ge=0,
        description=(
            "Each <queue>:dead stream keeps about this many newest entries (0 = no cap); "
            "`mailer-queue purge QUEUE --older-than` removes old ones on demand."
        ),
    )


class BackDataGlobal(StrictModel):
    """``backdata`` block of the global file."""

    queue_name: str = Field("EVENT_QUEUE", min_length=1, description="The event stream.")


class TransformerGlobal(StrictModel):
    """``transformer`` block of the global file."""

    x_mailer: str | None = Field(
        "Inboxbooster-Mailer", description="X-Mailer header value; explicit null means no X-Mailer header."
    )


class PostfixGlobal(StrictModel):
    """``postfix`` block of the global file."""

    incoming_queue_name: str = Field(
        "INCOMING-TO-POSTFIX", min_length=1, description="Transformer -> PostfixLog stream."
    )


class GlobalConfig(StrictModel):
    """The whole global file."""

    reliable_queue: ReliableQueueSettings = Field(default_factory=ReliableQueueSettings)
    backdata: BackDataGlobal = Field(default_factory=BackDataGlobal)
    transformer: TransformerGlobal = Field(default_factory=TransformerGlobal)
    postfix: PostfixGlobal = Field(default_factory=PostfixGlobal)

    @model_validator(mode="after")
    def _distinct_queue_names(self) -> GlobalConfig:
        names = [
            ("reliable-queue.queue-names.primary-queue", self.reliable_queue.queue_names.primary_queue),
            ("reliable-queue.queue-names.default-queue", self.reliable_queue.queue_names.default_queue),
            ("backdata.queue-name", self.backdata.queue_name),
            ("postfix.incoming-queue-name", self.postfix.incoming_queue_name),
        ]
        seen: dict[str, str] = {}
        for key, value in names:
            if value in seen:
                raise ValueError(f"{key}: queue name {value!r} is already used by {seen[value]}")
            seen[value] = key
        return self
