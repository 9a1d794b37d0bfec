"""Client tests run against a real gateway and a real supervisor process."""

from tests.gateway.conftest import gateway_factory, webhooks  # noqa: F401 - fixtures
