"""Start and stop a real `vllm-affinity serve` (i.e. `vllm serve`) on 127.0.0.1.

Used by the demo, the server tests and the serving benchmark. No vLLM import: the
server is a child process; we talk to it over HTTP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _samples(url: str, name: str) -> list[tuple[str, float]]:
    """(label set, value) of each sample of metric ``name`` on a server's ``/metrics``; ``url`` is
    the server's root or its ``/v1`` base URL."""
    with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/metrics", timeout=10) as r:
        return [(line[len(name):].rsplit(" ", 1)[0], float(line.rsplit(" ", 1)[1]))
                for line in r.read().decode().splitlines()
                if line.startswith(name + "{") or line.startswith(name + " ")]


def metric(url: str, name: str) -> float | None:
    """A metric of a server's ``/metrics`` summed over its label sets (None: not exported)."""
    samples = _samples(url, name)
    return sum(v for _, v in samples) if samples else None


def metric_by_label(url: str, name: str, label: str) -> dict[str, float]:
    """A metric summed per value of one label (e.g. vLLM's ``engine`` under data parallelism)."""
    out: dict[str, float] = {}
    for labels, v in _samples(url, name):
        key = labels.split(f'{label}="', 1)[1].split('"', 1)[0] if f'{label}="' in labels else ""
        out[key] = out.get(key, 0.0) + v
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(model, ["--affinity", "paper-aggressive"]) as srv: srv.base_url``"""

    def __init__(
        self,
        model: str | Path,
        args: list[str] | None = None,
        *,
        log_path: str | Path,
        served_model_name: str = "model",
        env: dict[str, str] | None = None,
        startup_timeout: float = 240.0,
        plain_vllm: bool = False,
    ) -> None:
        self.port = free_port()
        self.model_name = served_model_name
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        bindir = Path(sys.executable).parent
        exe = [str(bindir / "vllm")] if plain_vllm else [str(bindir / "vllm-affinity")]
        self.cmd = exe + [
            "serve",
            str(model),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--served-model-name", served_model_name,
            *(args or []),
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} during start-up; log tail:\n"
                    + self.log()[-4000:]
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise TimeoutError(f"server not healthy after {self.startup_timeout} s; log tail:\n" + self.log()[-4000:])

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()
