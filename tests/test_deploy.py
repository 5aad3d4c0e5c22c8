"""What can be checked of the Docker set-up without a Docker engine: the compose file's structure,
that its settings are the service's settings, that the Dockerfiles copy what exists and run what
compose runs, that the containers' commands and healthchecks work here, outside Docker, and that
CI fails on an empty or failing suite."""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from contract.settings import Settings
from rib_core.io.storage import bucket_exists
from tests.service_stack import moto_s3, redis_server, s3

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ("api", "worker", "training-worker", "flower")
BRIEF_ENV = {"RIB_BROKER_URL", "RIB_RESULT_BACKEND", "RIB_STORAGE_URI", "RIB_S3_ENDPOINT_URL",
             "RIB_S3_PUBLIC_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
             "RIB_CLASSIFIER_URI", "RIB_COMPANION_MANIFEST_URI", "RIB_IRN_URI", "RIB_API_KEYS", "RIB_DEVICE"}


def _interpolate(value: object) -> str:
    """Compose's ``${VAR:-default}`` with nothing set: the default (the only form the file uses)."""
    text = str(value)
    assert re.fullmatch(r"[^$]*(\$\{\w+:-[^}]*\}[^$]*)*", text), text
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def _dockerfile(name: str) -> str:
    return (ROOT / "docker" / name).read_text()


def _cmd(dockerfile: str) -> list[str]:
    (cmd,) = re.findall(r"^CMD (\[.+\])$", dockerfile, flags=re.M)
    return json.loads(cmd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(cmd: list[str], env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run a container's command as a real process here; stop it on exit."""
    log = (tmp_path / f"{Path(cmd[0]).name}.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _healthy(test: list[str], port: int, internal_port: int, env: dict[str, str],
             proc: subprocess.Popen[bytes]) -> bool:
    """Run a compose ``CMD`` healthcheck here, with the host port in place of the container's,
    retrying while the process starts (as compose does); False at once if the process died."""
    assert test[0] == "CMD" and test[1] == "python", test
    argv = [sys.executable, *[arg.replace(f":{internal_port}/", f":{port}/") for arg in test[2:]]]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0:
            return True
        time.sleep(0.5)
    return False


def test_compose_names_every_service_with_health_and_order():
    assert {"redis", "s3", "createbucket", *APP_SERVICES} <= set(SERVICES)
    for name, service in SERVICES.items():  # every service but the one-shot bucket maker is watched
        assert ("healthcheck" in service) == (name != "createbucket"), name
    for name in ("api", "worker", "training-worker"):
        deps = SERVICES[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["s3"]["condition"] == "service_healthy"
        assert deps["createbucket"]["condition"] == "service_completed_successfully"
    assert SERVICES["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert SERVICES["createbucket"]["depends_on"]["s3"]["condition"] == "service_healthy"
    assert "create_bucket" in SERVICES["createbucket"]["command"][-1]
    for name in ("worker", "training-worker"):
        (device,) = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
        assert "inspect ping --destination celery@$$HOSTNAME" in SERVICES[name]["healthcheck"]["test"][-1]
    assert ":8000/healthz" in SERVICES["api"]["healthcheck"]["test"][-1]
    assert ":5555/healthcheck" in SERVICES["flower"]["healthcheck"]["test"][-1]
    assert SERVICES["s3"]["healthcheck"]["test"] == ["CMD", "curl", "-fsS", "http://127.0.0.1:8333/healthz"]
    redis = SERVICES["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes" and "redis-data:/data" in SERVICES["redis"]["volumes"]


def _pinned(image: str) -> bool:
    """``name:tag`` with a tag that names a version (a digit in it), never ``latest``."""
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and any(c.isdigit() for c in tag)


def test_every_image_is_pinned_to_a_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, service in SERVICES.items():
        assert _pinned(service["image"]), (name, service["image"])
        if "build" in service:  # built here: tagged with the project's version
            assert service["image"].endswith(f":{version}"), (name, service["image"])
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        text = _dockerfile(dockerfile)
        args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
        (syntax,) = re.findall(r"^# syntax=(\S+)$", text, flags=re.M)
        for image in [syntax, *re.findall(r"^FROM (\S+)", text, flags=re.M)]:
            for arg, default in args.items():
                image = image.replace(f"${{{arg}}}", default)
            assert _pinned(image), (dockerfile, image)


def test_service_doc_documents_every_setting_and_the_compose_services():
    doc = (ROOT / "docs" / "SERVICE.md").read_text()
    table = doc[doc.index("\n## Settings"):doc.index("\n## API")]
    documented = set(re.findall(r"^\| `(RIB_\w+)`", table, flags=re.M))
    assert documented == {f"RIB_{name.upper()}" for name in Settings.model_fields}
    docker = doc[doc.index("\n## Full stack with Docker"):]
    for mentioned, service in (("Redis", "redis"), ("SeaweedFS", "s3"), ("the API", "api"), ("GPU worker", "worker"),
                               ("training worker", "training-worker"), ("Flower", "flower")):
        assert mentioned in docker and service in SERVICES, (mentioned, service)


def test_compose_settings_are_service_settings(monkeypatch):
    fields = {f"RIB_{name.upper()}" for name in Settings.model_fields}
    for name in APP_SERVICES:
        env = SERVICES[name]["environment"]
        unknown = [k for k in env if not k.startswith("AWS_") and k not in fields]
        assert not unknown, (name, unknown)
        assert BRIEF_ENV <= set(env), (name, BRIEF_ENV - set(env))
    env = {k: _interpolate(v) for k, v in SERVICES["api"]["environment"].items()}
    assert env["RIB_STORAGE_URI"].startswith("s3://rib/")  # the bucket createbucket makes
    for key in [k for k in os.environ if k.startswith("RIB_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()  # the compose defaults are valid settings
    assert (s.broker_url, s.device, s.api_keys) == ("redis://redis:6379/0", "cuda", ["dev-key"])
    assert not s.irn_uri  # an empty RIB_IRN_URI means no IRN


def test_dockerfiles_copy_what_exists_and_run_the_compose_commands():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()]
    for name in ("api.Dockerfile", "worker.Dockerfile"):
        text = _dockerfile(name)
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
            *sources, _ = line.split()
            for src in sources:
                assert (ROOT / src).exists(), (name, src)
                assert not any(fnmatch.fnmatch(src.removeprefix("./"), pat) for pat in ignored), (name, src)
        assert re.search(r"^USER rib$", text, flags=re.M), name
    for name, service in (("api.Dockerfile", "api"), ("worker.Dockerfile", "worker")):
        assert SERVICES[service]["build"]["dockerfile"] == f"docker/{name}"
        assert _cmd(_dockerfile(name)) == SERVICES[service]["command"]
    assert "torch==2.14.1 torchvision==0.29.1" in _dockerfile("worker.Dockerfile")
    assert "'.[worker]'" in _dockerfile("worker.Dockerfile")


def test_the_api_image_installs_what_the_api_needs_and_no_torch():
    """The API also exports a job's masks (the `export` extra); torch, torchvision and the CRF stay out."""
    text = _dockerfile("api.Dockerfile")
    (command,) = re.findall(r"python (requirements\.py [^>]+)>", text)
    assert "pip install --no-deps ." in text and '! python -c "import torch"' in text  # the build checks it
    out = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), *command.split()[1:],
                          "--pyproject", str(ROOT / "pyproject.toml")], capture_output=True, text=True, check=True)
    names = {re.match(r"[\w.-]+", line).group(0).lower() for line in out.stdout.splitlines()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["api"],
              *project["optional-dependencies"]["export"]]
    assert names == {re.match(r"[\w.-]+", line).group(0).lower() for line in wanted} - {"torch", "torchvision",
                                                                                         "pydensecrf2"}


def test_the_torch_index_is_a_build_argument():
    """No Dockerfile names a package index; the worker's comes from TORCH_INDEX_URL (compose passes cu130's)."""
    for name in ("api.Dockerfile", "worker.Dockerfile"):
        assert "--index-url http" not in _dockerfile(name) and "download.pytorch.org" not in _dockerfile(name)
    worker = _dockerfile("worker.Dockerfile")
    assert re.search(r"^ARG TORCH_INDEX_URL=$", worker, flags=re.M) and '--index-url "$TORCH_INDEX_URL"' in worker
    assert SERVICES["worker"]["build"]["args"]["TORCH_INDEX_URL"].startswith("${TORCH_INDEX_URL:-https://")


@pytest.mark.heavy  # starts processes
def test_worker_commands_name_real_queues_tasks_and_options(tmp_path):
    env = {**os.environ, "RIB_STORAGE_URI": str(tmp_path), "RIB_API_KEYS": "k"}
    s = Settings()
    help_text = subprocess.run([str(BIN / "celery"), "-A", "worker.celery_app", "worker", "--help"],
                               capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=True).stdout
    for name, queue in (("worker", s.image_queue), ("training-worker", s.training_queue)):
        cmd = SERVICES[name]["command"]
        assert cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
        assert cmd[cmd.index("-Q") + 1] == queue
        assert cmd[cmd.index("--concurrency") + 1] == "1" and cmd[cmd.index("--prefetch-multiplier") + 1] == "1"
        for option in (arg for arg in cmd if arg.startswith("-")):
            assert option in help_text, (name, option)
    # The Celery app the containers name loads and registers the tasks the API sends.
    check = ("from worker.celery_app import app; from contract.stages import PROCESS_CHUNK, TRAINING_JOB; "
             "app.loader.import_default_modules(); "
             "assert PROCESS_CHUNK in app.tasks and TRAINING_JOB in app.tasks")
    subprocess.run([sys.executable, "-c", check], check=True, env=env, cwd=ROOT, timeout=120)


def test_createbucket_command_makes_the_bucket_here_and_is_idempotent():
    """createbucket's command, run here (this Python, this rib_core) against moto's S3 server."""
    cmd = SERVICES["createbucket"]["command"]
    assert cmd[:2] == ["python", "-c"]
    with moto_s3() as endpoint:
        assert not bucket_exists("made-here", s3(endpoint))
        env = {**os.environ, "RIB_STORAGE_URI": "s3://made-here/results", "RIB_S3_ENDPOINT_URL": endpoint,
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        for _ in range(2):  # a restarted stack runs it again on the existing bucket
            out = subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and "bucket made-here ready" in out.stdout, out.stderr
        # moto's in-process state is shared with other tests' servers: look for this bucket only
        assert s3(endpoint).head_bucket(Bucket="made-here")["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_redis_healthcheck_answers_here():
    test = SERVICES["redis"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "redis-cli"]
    out = subprocess.run(test[1:], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "PONG"


@pytest.mark.heavy  # starts processes
def test_api_command_serves_and_passes_its_healthcheck(tmp_path):
    cmd = SERVICES["api"]["command"]
    assert cmd[:2] == ["uvicorn", "service.main:app"] and cmd[cmd.index("--port") + 1] == "8000"
    port = _free_port()
    here = [str(BIN / "uvicorn"), *cmd[1:]]
    here[here.index("--host") + 1], here[here.index("--port") + 1] = "127.0.0.1", str(port)
    env = {**os.environ, "RIB_STORAGE_URI": str(tmp_path / "results"), "RIB_API_KEYS": "k"}
    with _serving(here, env, tmp_path) as proc:
        healthy = _healthy(SERVICES["api"]["healthcheck"]["test"], port, 8000, env, proc)
        assert healthy, (tmp_path / "uvicorn.log").read_text()


@pytest.mark.heavy  # starts processes
def test_flower_command_serves_and_passes_its_healthcheck(tmp_path):
    cmd = SERVICES["flower"]["command"]
    assert cmd[:4] == ["celery", "-A", "worker.celery_app", "flower"] and "--port=5555" in cmd
    port = _free_port()
    here = [str(BIN / "celery"), *[f"--port={port}" if a == "--port=5555" else a for a in cmd[1:]]]
    here.append("--address=127.0.0.1")
    env = {**os.environ, "RIB_STORAGE_URI": str(tmp_path / "results")}
    with _serving(here, env, tmp_path) as proc:
        healthy = _healthy(SERVICES["flower"]["healthcheck"]["test"], port, 5555, env, proc)
        assert healthy, (tmp_path / "celery.log").read_text()


@pytest.mark.heavy  # starts a Celery worker
def test_worker_healthcheck_passes_on_a_worker_started_with_the_compose_command(tmp_path):
    """The workers' healthcheck (a ping through the broker) against a real worker, started with the
    compose command on a private redis-server; a fixed name stands in for the container's hostname."""
    test = SERVICES["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and test[1].startswith("celery ")
    check = f"{BIN / 'celery'} {test[1].removeprefix('celery ').replace('$$HOSTNAME', '$HOSTNAME')}"
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as url:
        env = {**os.environ, "RIB_BROKER_URL": f"{url}/0", "RIB_RESULT_BACKEND": f"{url}/1",
               "RIB_STORAGE_URI": str(tmp_path / "results"), "HOSTNAME": "rib-health"}
        ping = subprocess.run(["sh", "-c", check], env=env, capture_output=True, text=True, timeout=120)
        assert ping.returncode != 0  # no worker yet: unhealthy
        cmd = [str(BIN / "celery"), *SERVICES["worker"]["command"][1:], "--hostname", "celery@rib-health"]
        with _serving(cmd, env, tmp_path) as proc:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                ping = subprocess.run(["sh", "-c", check], env=env, capture_output=True, text=True, timeout=120)
                if ping.returncode == 0:
                    break
            assert ping.returncode == 0, (tmp_path / "celery.log").read_text()


def _ci_clone(tmp_path: Path) -> Path:
    """A project holding only the CI scripts and pyproject.toml, whose .venv runs this one's tools.
    Its set-up stamp matches, so the real setup.sh only checks Redis and Chromium there."""
    clone = tmp_path / "clone"
    for rel in (".ci/run", "scripts/setup.sh", "scripts/test.sh", "pyproject.toml"):
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, clone / rel)
    (clone / ".venv" / "bin").mkdir(parents=True)
    for tool in ("python", "ruff", "pytest"):
        wrapper = clone / ".venv" / "bin" / tool
        wrapper.write_text(f'#!/bin/sh\nexec "{BIN / tool}" "$@"\n')
        wrapper.chmod(0o755)
    digest = subprocess.run(["sha256sum", "pyproject.toml"], cwd=clone, capture_output=True, text=True, check=True)
    (clone / ".venv" / ".rib-setup-stamp").write_text(digest.stdout.split()[0] + "\n")
    (clone / "tests").mkdir()
    return clone


def _ci(clone: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(clone / ".ci" / "run")], capture_output=True, text=True, timeout=300)


def test_setup_and_ci_scripts():
    for script in ("scripts/setup.sh", "scripts/test.sh", "scripts/demo.sh", ".ci/run"):
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/setup.sh" in ci and "ruff check" in ci and "scripts/test.sh" in ci


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("apt-get") is None, reason="needs apt-get, as root")
def test_setup_waits_for_the_dpkg_lock_instead_of_failing(tmp_path):
    """Another process holds dpkg's lock (as unattended upgrades do): setup.sh's apt-get waits for it."""
    script = (ROOT / "scripts" / "setup.sh").read_text()
    helpers = "\n".join(re.findall(r"^(?:as_root|apt_get)\(\) \{.*\}$", script, flags=re.M))
    calls = [line for line in script.splitlines() if "apt-get" in line and not line.lstrip().startswith("#")]
    assert len(calls) == 1 and calls[0].startswith("apt_get()")  # every apt-get call goes through apt_get
    with open("/var/lib/dpkg/lock-frontend", "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        # Installing a package that is there already: apt-get takes the lock, then has nothing to do.
        waiting = subprocess.Popen(["bash", "-c", f"{helpers}\napt_get install -y -qq bash"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        with pytest.raises(subprocess.TimeoutExpired):  # still waiting: without the timeout, exit 100 at once
            waiting.wait(timeout=3)
        fcntl.lockf(lock, fcntl.LOCK_UN)
    assert waiting.wait(timeout=120) == 0, waiting.stdout.read() if waiting.stdout else ""


def test_readme_quick_start_is_two_commands_that_set_up_first_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Quick start")
    (block,) = re.findall(r"```bash\n(.*?)```", readme[start:readme.index("\n## ", start + 1)], flags=re.S)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()  # exactly as the README shows it
    for script, runs in (("scripts/demo.sh", ".venv/bin/rib demo"), ("scripts/test.sh", ".venv/bin/pytest")):
        text = (ROOT / script).read_text()
        assert "bash scripts/setup.sh" in text and text.index("bash scripts/setup.sh") < text.index(runs), script


@pytest.mark.heavy  # starts processes
def test_ci_fails_on_an_empty_or_failing_suite_and_passes_a_passing_one(tmp_path):
    clone = _ci_clone(tmp_path)
    empty = _ci(clone)
    assert empty.returncode != 0 and "collected no tests" in empty.stderr, empty.stdout + empty.stderr
    (clone / "tests" / "test_one.py").write_text("def test_sum():\n    assert sum([1, 2]) == 3\n")
    passing = _ci(clone)
    assert passing.returncode == 0 and "1 passed" in passing.stdout, passing.stdout + passing.stderr
    (clone / "tests" / "test_two.py").write_text("def test_sum():\n    assert sum([1, 2]) == 4\n")
    failing = _ci(clone)
    assert failing.returncode != 0 and "1 failed" in failing.stdout, failing.stdout + failing.stderr
