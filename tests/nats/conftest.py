"""NATS tests reuse the gateway fixtures (real gateways, the ``store`` switch)."""

from tests.gateway.conftest import gateway_factory, webhooks

__all__ = ["gateway_factory", "webhooks"]
