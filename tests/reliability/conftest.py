"""Real parts for the reliability checks: the demo model's architecture with random
weights in a model store (published through ModelStore.publish), served by real uvicorn
processes that each test starts with the settings it needs (bench.serving.serve)."""

from __future__ import annotations

import pytest

from tests.support.serving import ModelSource, demo_model


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    """The demo-like model (compact_cnn, 28 px greyscale, 10 classes x 10 prototypes),
    never the developer's own trained one, so results do not depend on ./store."""
    return demo_model(tmp_path_factory.mktemp("reliability-store"), prefer_trained=False)
