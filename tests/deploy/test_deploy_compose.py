"""docker-compose.yml: it validates, and it carries what a GPU deployment needs.

``docker-compose config`` (Debian's docker-compose 1.29, or the ``docker compose`` plugin)
checks the file against the compose schema and resolves it; the tests then read the
resolved YAML. An empty ``--env-file`` keeps a developer's own ``.env`` out of the way.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    IMAGE_SETTINGS,
    NGINX_TEMPLATE,
    REPO,
    clean_environment,
    settings_defaults,
)

PROFILES = ("replicas", "big-model", "cpu")
REPLICA = re.compile(r"^depass(-\d+)?$")  # depass (GPU 0), depass-1, depass-2, ...
#: Settings whose .env.example line shows an example, not the default.
EXAMPLES = {"model", "api_key", "device_map"}
TEMPLATE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def resolve(
    compose: list[str], tmp_path: Path, profiles: tuple[str, ...] = (), env: str = ""
) -> dict[str, Any]:
    """``config`` of docker-compose.yml with the given profiles and .env contents."""
    env_file = tmp_path / f"env-{len(list(tmp_path.iterdir()))}"
    env_file.write_text(env)
    command = [*compose, "--env-file", str(env_file), "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        command += ["--profile", profile]
    done = subprocess.run(
        [*command, "config"],
        cwd=REPO,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(command)} config failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def full(compose: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The resolved file with every profile enabled (every service), default settings."""
    return resolve(compose, tmp_path_factory.mktemp("compose"), PROFILES)


def raw_file() -> dict[str, Any]:
    """docker-compose.yml as written (anchors and merge keys resolved by PyYAML)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def replicas(config: dict[str, Any]) -> list[str]:
    return sorted(name for name in config["services"] if REPLICA.match(name))


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    return ((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or []


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume, in the short (1.29) or long (v2) form."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = str(volume.get("source")), str(volume["target"])
        out.append((source, target))
    return out


def environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return env


def seconds(value: str) -> float:
    """An nginx or compose duration ("130s", "2m", "90") in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", value.strip())
    assert match, f"not a duration: {value!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


@pytest.mark.parametrize("profiles", [(), ("replicas",)], ids=["default", "replicas"])
def test_compose_file_validates(
    compose: list[str], tmp_path: Path, profiles: tuple[str, ...]
) -> None:
    config = resolve(compose, tmp_path, profiles)
    services = set(config["services"])
    assert "depass" in services
    if profiles:
        assert {"depass", "depass-1", "lb"} <= services
    assert "hf-cache" in config.get("volumes", {})


def test_every_replica_reserves_its_own_gpu(full: dict[str, Any]) -> None:
    pinned: list[str] = []
    for name in replicas(full):
        devices = gpu_devices(full["services"][name])
        assert len(devices) == 1, f"{name}: one GPU reservation expected, got {devices}"
        device = devices[0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert len(device.get("device_ids", [])) == 1 and "count" not in device, (
            f"{name} must be pinned to one GPU with device_ids"
        )
        pinned += device["device_ids"]
    assert pinned == sorted(set(pinned)) and len(pinned) >= 2, f"GPUs shared: {pinned}"
    assert pinned[0] == "0"

    big = gpu_devices(full["services"]["depass-big"])
    assert [d["count"] for d in big] == ["all"] and big[0]["driver"] == "nvidia"
    assert environment(full["services"]["depass-big"])["DEPASS_DEVICE_MAP"] == "auto"

    cpu = full["services"]["depass-cpu"]
    assert not gpu_devices(cpu) and environment(cpu)["DEPASS_DEVICE"] == "cpu"
    assert cpu["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_services_have_healthcheck_cache_volume_and_restart(full: dict[str, Any]) -> None:
    model_services = [name for name in full["services"] if name.startswith("depass")]
    assert len(model_services) >= 4
    for name in model_services:
        service = full["services"][name]
        check = service["healthcheck"]
        assert "/health" in " ".join(check["test"]), name
        assert seconds(check["start_period"]) >= 300, f"{name}: allow for a model download"
        assert ("hf-cache", "/data/hf") in mounts(service), name
        assert service["restart"] in ("unless-stopped", "always"), name
        assert service.get("shm_size"), name
        assert "HF_TOKEN" in environment(service), name
        assert service["build"]["dockerfile"] == "docker/Dockerfile", name
    assert full["services"]["lb"]["healthcheck"]["test"]
    assert full["services"]["lb"]["restart"] == "unless-stopped"
    assert set(full["volumes"]) == {"hf-cache"}


def test_every_setting_passes_through_from_env(compose: list[str], tmp_path: Path) -> None:
    """Every DEPASS_* setting of the service is listed in compose, reaches the container
    from .env when set, and is absent (service default) when not."""
    fields = set(settings_defaults()) - IMAGE_SETTINGS
    listed = set(environment(raw_file()["services"]["depass"]))
    missing = sorted(f"DEPASS_{f.upper()}" for f in fields if f"DEPASS_{f.upper()}" not in listed)
    assert not missing, f"docker-compose.yml does not pass through {missing}"

    config = resolve(compose, tmp_path, ("replicas",), "DEPASS_MAX_QUEUE=5\nHF_TOKEN=hf_t\n")
    for name in replicas(config):
        env = environment(config["services"][name])
        assert env["DEPASS_MAX_QUEUE"] == "5" and env["HF_TOKEN"] == "hf_t", name
        assert env.get("DEPASS_MODEL") in (None, ""), "unset settings must stay unset"
        assert "DEPASS_HOST" not in env and "DEPASS_PORT" not in env

    pinned = resolve(compose, tmp_path, (), "DEPASS_GPU=3\nDEPASS_HTTP_PORT=9000\n")
    depass = pinned["services"]["depass"]
    assert gpu_devices(depass)[0]["device_ids"] == ["3"]
    assert [str(p["published"]) for p in depass["ports"]] == ["9000"]


def test_env_example_documents_valid_settings(
    compose: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """.env.example names every setting; uncommented, it validates for compose and for
    the service's Settings, and its DEPASS_* values are the service's defaults (EXAMPLES
    aside)."""
    from service.settings import Settings

    values = dict(
        re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line).groups()  # type: ignore[union-attr]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if re.fullmatch(r"#?[A-Z][A-Z0-9_]*=.*", line)
    )
    fields = set(settings_defaults()) - IMAGE_SETTINGS
    undocumented = sorted(f for f in fields if f"DEPASS_{f.upper()}" not in values)
    assert not undocumented, f".env.example does not mention {undocumented}"

    resolve(compose, tmp_path, PROFILES, "".join(f"{k}={v}\n" for k, v in values.items()))

    for key in [k for k in os.environ if k.startswith("DEPASS_")]:
        monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    defaults = settings_defaults()
    for field in fields - EXAMPLES:
        assert getattr(settings, field) == defaults[field], f".env.example: DEPASS_{field}"


def test_load_balancer_matches_the_service_limits(full: dict[str, Any]) -> None:
    lb = full["services"]["lb"]
    env = environment(lb)
    defaults = settings_defaults()
    assert int(env["LB_MAX_BODY_BYTES"]) == defaults["max_body_bytes"]
    assert seconds(env["LB_READ_TIMEOUT"]) > defaults["request_timeout_s"]
    assert seconds(env["LB_FAIL_TIMEOUT"]) > 0

    targets = {target: Path(source) for source, target in mounts(lb)}
    mounted = targets["/etc/nginx/templates/depass.conf.template"]
    assert mounted.resolve() == NGINX_TEMPLATE.resolve()

    template = NGINX_TEMPLATE.read_text()
    variables = set(TEMPLATE_VARIABLE.findall(template))
    filter_ = re.compile(env["NGINX_ENVSUBST_FILTER"])
    assert variables and all(filter_.search(v) for v in variables), (
        "NGINX_ENVSUBST_FILTER must let every template variable through"
    )
    assert all(v.startswith("LB_") for v in variables), "nginx's own variables: $name only"
    assert variables <= set(env), f"lb lacks {sorted(variables - set(env))}"

    # One upstream server per replica service, each at its container port.
    names = replicas(full)
    servers = re.findall(r"^\s*server \$\{(LB_REPLICA_\d+)\}", template, re.MULTILINE)
    assert sorted(env[s] for s in servers) == sorted(f"{n}:8000" for n in names)
    assert set(lb["depends_on"]) == set(names)
    assert all(lb["depends_on"][n]["condition"] == "service_healthy" for n in names)
