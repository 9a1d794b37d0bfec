"""docs/configuration.md lists every setting of both configs."""

from __future__ import annotations

from dataclasses import fields

import pytest

from spirit_gpu.config import WorkerConfig
from spirit_gpu.gateway.config import GatewayConfig
from tests.conftest import ROOT


@pytest.mark.parametrize("config", [WorkerConfig, GatewayConfig], ids=lambda c: c.__name__)
def test_every_setting_is_documented(config: type) -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f.metadata["env"] for f in fields(config)
               if f.metadata.get("env") and f"`{f.metadata['env']}`" not in doc]
    assert missing == []
