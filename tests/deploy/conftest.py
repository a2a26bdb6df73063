"""Fixtures of the deployment tests (helpers: deploy_support.py)."""

from __future__ import annotations

import pytest
from deploy_support import compose_command


@pytest.fixture(scope="session")
def compose() -> list[str]:
    command = compose_command()
    if command is None:
        pytest.skip(
            "docker-compose not found: apt-get install docker-compose (Debian) to validate "
            "docker-compose.yml"
        )
    return command
