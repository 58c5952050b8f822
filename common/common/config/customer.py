"""Model of ``inboxbooster-mailer-customer.yaml``: one section per service plus ``common-config``.

Every section is optional in the file; a service refuses to start when its own section (or one
it depends on, such as ``transformer.domain-settings`` for the receivers) is missing.
"""

from __future__ import annotations

from pydantic import Field

from common.config.backdata import BackDataSection
from common.config.base import StrictModel
from common.config.commonconfig import CommonConfig
from common.config.httpreceiver import HttpReceiverSection
from common.config.mxserver import MxServerSection
from common.config.postfixlog import PostfixLogSection
from common.config.receiver import ReceiverSection
from common.config.redismodule import RedisSection
from common.config.transformer import TransformerSection


class CustomerConfig(StrictModel):
    """The whole customer file."""

    httpreceiver: HttpReceiverSection | None = None
    receiver: ReceiverSection | None = None
    transformer: TransformerSection | None = None
    postfixlog: PostfixLogSection | None = None
    mxserver: MxServerSection | None = None
    backdata: BackDataSection | None = None
    redis: RedisSection | None = None
    common_config: CommonConfig = Field(default_factory=CommonConfig)
