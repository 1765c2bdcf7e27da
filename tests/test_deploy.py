"""deploy/: the container image, the compose stack and the Helm chart configure the server only through DSOCR_*
variables, so every variable they name must be one the server reads; and the compose stack's wiring (Open WebUI ->
dsocr by its service name, through the Host check, with one key) must hold together. Building and running the image
is deploy/test_image.sh (it needs a Docker daemon)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

import server
from common.options.flags import variable_of
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
VARIABLE = re.compile(r"\bDSOCR_[A-Z0-9_]+\b")
# Read by the code itself rather than by a flag (dsocr_torch.weights.prepared).
NOT_FLAGS = {"DSOCR_PREPARED_CACHE"}


def server_variables() -> set[str]:
    return {name for action in server.build_parser()._actions if (name := variable_of(action)) is not None}


def deploy_files() -> list[Path]:
    files = [p for p in sorted(DEPLOY.rglob("*")) if p.is_file() and p.suffix != ".sh"]
    return files + [ROOT / "docs" / "deploy.md"]


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_every_dsocr_variable_named_in_deploy_is_read_by_the_server() -> None:
    known = server_variables() | NOT_FLAGS
    named = {path.relative_to(ROOT).as_posix(): set(VARIABLE.findall(path.read_text())) for path in deploy_files()}
    for path in ("deploy/Dockerfile", "deploy/compose.yaml", "deploy/helm/dsocr/templates/deployment.yaml"):
        assert {"DSOCR_MODEL", "DSOCR_API_KEY"} <= named[path] or "DSOCR_PORT" in named[path], path
    unknown = {path: sorted(names - known) for path, names in named.items() if names - known}
    assert unknown == {}


def test_the_image_listens_everywhere_as_an_unprivileged_user() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    final_stage = dockerfile[dockerfile.rindex("\nFROM "):]
    assert "DSOCR_HOST=0.0.0.0" in final_stage and "DSOCR_PORT=8000" in final_stage and "EXPOSE 8000" in final_stage
    user = re.search(r"^USER (\d+):(\d+)$", final_stage, re.MULTILINE)
    assert user is not None and int(user.group(1)) > 0  # numeric: Kubernetes' runAsNonRoot can check it
    healthcheck = final_stage[final_stage.index("\nHEALTHCHECK "):].split("\n\n")[0]
    assert "/health" in healthcheck and "CMD" in healthcheck
    assert not re.search(r"apt-get|gcc|build-essential|pytest", final_stage)
    assert re.search(r"^ARG TORCH_VERSION=(\d+\.\d+\.\d+)$", dockerfile, re.MULTILINE)  # pinned
    assert "--index-url \"$TORCH_INDEX_URL\"" in dockerfile and "whl/cpu" in dockerfile  # CPU by default


def test_compose_points_open_webui_at_dsocr_through_the_host_check() -> None:
    services = compose()["services"]
    dsocr, webui = services["dsocr"]["environment"], services["open-webui"]["environment"]
    allowed = {name.strip() for name in dsocr["DSOCR_ALLOWED_HOSTS"].split(",")}
    chat, loader = urlsplit(webui["OPENAI_API_BASE_URL"]), urlsplit(webui["EXTERNAL_DOCUMENT_LOADER_URL"])
    assert chat.hostname == loader.hostname == "dsocr" and "dsocr" in services and "dsocr" in allowed
    assert chat.port == loader.port == 8000 and chat.path == "/v1" and loader.path in ("", "/")
    assert webui["CONTENT_EXTRACTION_ENGINE"] == "external"
    # Open WebUI uses the External loader only when its key is set: the same key as dsocr's.
    assert webui["OPENAI_API_KEY"] == webui["EXTERNAL_DOCUMENT_LOADER_API_KEY"] == dsocr["DSOCR_API_KEY"]
    assert dsocr["DSOCR_API_KEY"].startswith("${DSOCR_API_KEY")


@pytest.mark.parametrize("service, target", [("dsocr", "/data"), ("open-webui", "/app/backend/data")])
def test_compose_keeps_each_services_data_on_a_named_volume(service: str, target: str) -> None:
    stack = compose()
    mounts = [entry.split(":") for entry in stack["services"][service]["volumes"]]
    assert [source for source, path, *_ in mounts if path == target] != []
    assert {source for source, path, *_ in mounts if path == target} <= set(stack["volumes"])
    published = stack["services"][service].get("ports", [])
    assert all(port.startswith("127.0.0.1:") for port in published)  # local by default


def test_helm_values_leave_the_chart_variables_to_the_chart() -> None:
    values = yaml.safe_load((DEPLOY / "helm" / "dsocr" / "values.yaml").read_text())
    assert values["env"] == {} and values["port"] == values["service"]["port"] == 8000
    deployment = (DEPLOY / "helm" / "dsocr" / "templates" / "deployment.yaml").read_text()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert re.search(probe + r":\n\s+httpGet:\n\s+path: /health", deployment)
    assert "prometheus.io/path: /metrics" in deployment and "runAsNonRoot: true" in deployment
