"""The NATS JetStream store: state shared by many gateway replicas (docs/scaling.md)."""

from spirit_gpu.gateway.storage.nats.store import NatsStorage

__all__ = ["NatsStorage"]
