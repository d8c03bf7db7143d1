"""asyncio transport for the sans-IO core: the only part of protocol/ that does I/O."""

from protocol.net.association import AssociationInfo, Timeouts
from protocol.net.client import Association, ContextRequest, associate
from protocol.net.server import SCPServer, ServiceHandler, StoreOutcome, StoreSink, start_server

__all__ = [
    "Association",
    "AssociationInfo",
    "ContextRequest",
    "SCPServer",
    "ServiceHandler",
    "StoreOutcome",
    "StoreSink",
    "Timeouts",
    "associate",
    "start_server",
]
