"""Queue, statuses and results behind one interface (memory now, NATS JetStream later)."""

from spirit_gpu.gateway.storage.base import (
    CancelOutcome,
    ChunkEvent,
    EndEvent,
    NewRequest,
    RequestRecord,
    SidStats,
    Storage,
)
from spirit_gpu.gateway.storage.memory import MemoryStorage

__all__ = ["CancelOutcome", "ChunkEvent", "EndEvent", "MemoryStorage", "NewRequest",
           "RequestRecord", "SidStats", "Storage"]
