"""Dockerfiles and compose file, checked by parsing: no Docker engine runs on the team's machines."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from shared.settings import REPO_ROOT

API_IMPORTS = re.compile(r"^\s*(import|from)\s+(torch|transformers|torchvision)\b", re.MULTILINE)


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = path.read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            rows.append((keyword.upper(), rest.strip()))
    return rows


def test_api_image_is_slim_and_runs_the_api() -> None:
    rows = _instructions(REPO_ROOT / "Dockerfile.api")
    text = " ".join(rest for _, rest in rows)
    assert rows[0][0] == "FROM" and "slim" in rows[0][1]
    assert "requirements-api.txt" in text and "requirements.txt " not in text + " "
    packages = [line.split("==")[0] for line in (REPO_ROOT / "requirements-api.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert not {"torch", "torchvision", "transformers"} & set(packages)
    copied = [rest.split()[0] for keyword, rest in rows if keyword == "COPY"]
    assert "api/" in copied and "shared/" in copied and "worker/" not in copied
    assert ("CMD", '["python", "-m", "api"]') in rows
    assert any(keyword == "USER" for keyword, _ in rows)
    assert any(keyword == "HEALTHCHECK" for keyword, _ in rows)


def test_worker_image_installs_torch_and_has_a_cuda_switch() -> None:
    rows = _instructions(REPO_ROOT / "Dockerfile.worker")
    args = {rest.split("=")[0] for keyword, rest in rows if keyword == "ARG"}
    assert {"BASE_IMAGE", "TORCH_INDEX_URL"} <= args
    assert rows[0] == ("ARG", "BASE_IMAGE=python:3.11-slim") and rows[1] == ("FROM", "${BASE_IMAGE}")
    run = " ".join(rest for keyword, rest in rows if keyword == "RUN")
    assert "torch==2.14.1" in run and "torchvision==0.29.1" in run and "requirements.txt" in run
    copied = [rest.split()[0] for keyword, rest in rows if keyword == "COPY"]
    assert "worker/" in copied and "shared/" in copied
    assert ("CMD", '["python", "-m", "worker"]') in rows
    env = " ".join(rest for keyword, rest in rows if keyword == "ENV")
    assert "HF_HOME=/cache/huggingface" in env


def test_compose_wires_redis_api_worker_and_optional_flower() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"redis", "api", "worker", "flower"}
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert "healthcheck" in redis and any(v.endswith(":/data") for v in redis["volumes"])
    for name in ("api", "worker"):
        service = services[name]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["environment"]["IMBEDDINGS_REDIS_URL"] == "redis://redis:6379/0"
        assert (REPO_ROOT / service["build"]["dockerfile"]).exists()
    assert services["api"]["build"]["dockerfile"] == "Dockerfile.api" and "8000:8000" in services["api"]["ports"]
    # Passed through only when set: an empty default would stop the API (set-but-empty keys are refused).
    assert services["api"]["environment"]["IMBEDDINGS_API_KEYS"] is None
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "Dockerfile.worker"
    assert any(v.startswith("hf-cache:") for v in worker["volumes"]) and "hf-cache" in compose["volumes"]
    assert worker["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
    flower = services["flower"]
    assert flower["profiles"] == ["monitoring"]
    # Its API answers without credentials, so it is published on the host's loopback only.
    assert flower["ports"] == ["127.0.0.1:5555:5555"] and flower["environment"]["FLOWER_UNAUTHENTICATED_API"] == "true"


def test_api_package_never_imports_torch_or_transformers() -> None:
    for path in list((REPO_ROOT / "api").rglob("*.py")) + list((REPO_ROOT / "shared").rglob("*.py")):
        assert not API_IMPORTS.search(path.read_text()), path


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    assert (REPO_ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def _make_install(tmp_path: Path, *variables: str) -> list[str]:
    """The commands ``make install`` would run into a fresh virtualenv (printed, not run)."""
    result = subprocess.run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}", *variables], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if "pip install" in line]


def test_make_install_leaves_the_backfill_client_runnable(tmp_path: Path) -> None:
    commands = _make_install(tmp_path)
    assert any("-r requirements.txt" in line and "-r requirements-client.txt" in line for line in commands)
    assert not any("--index-url" in line for line in commands)


def test_make_install_can_take_cpu_only_torch(tmp_path: Path) -> None:
    commands = _make_install(tmp_path, "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    torch_line = next(i for i, line in enumerate(commands) if "--index-url https://download.pytorch.org/whl/cpu" in line)
    assert "torch==2.14.1" in commands[torch_line] and "torchvision==0.29.1" in commands[torch_line]
    # The pinned requirements come after, and the CPU build (2.14.1+cpu) satisfies their pins.
    assert torch_line < next(i for i, line in enumerate(commands) if "-r requirements.txt" in line)


def test_worker_image_variants_are_the_ones_the_kubernetes_overlays_run() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile.worker").read_text()
    rows = _instructions(REPO_ROOT / "Dockerfile.worker")
    assert ("ARG", "TORCH_VARIANT=cpu") in rows
    run = " ".join(rest for keyword, rest in rows if keyword == "RUN")
    assert '--index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/${TORCH_VARIANT}}"' in run
    version = re.search(r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    # The documented builds: each variant tagged <version>-<variant>.
    builds = dict(re.findall(r"--build-arg TORCH_VARIANT=(\w+) -t imbeddings-worker:(\S+) \.", dockerfile))
    assert builds == {"cpu": f"{version}-cpu", "cu130": f"{version}-cu130"}
    for overlay, variant in (("cpu", "cpu"), ("gpu", "cu130")):
        kustomization = yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())
        tags = {image["name"]: image["newTag"] for image in kustomization["images"]}
        assert tags["imbeddings-worker"] == builds[variant] and tags["imbeddings-api"] == version, overlay
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yaml").read_text())
    assert compose["services"]["worker"]["build"]["args"]["TORCH_VARIANT"] == "${TORCH_VARIANT:-cpu}"
