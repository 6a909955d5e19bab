"""A real Ray head node for tests, started the way a user starts one (`ray start --head`) and stopped by its own pids.

Everything about it is private to the test: its temp dir (a short path: Ray's unix sockets live under it), free
ports for every server it opens, its dashboard on 127.0.0.1, and its HOME, so neither the real user's
`~/.ray/auth_token` nor anything else in their home is read or written. `ray start --block` keeps the node's
processes as its children and takes them down when it is terminated; whatever outlives it (workers reparented
elsewhere) is found by our unique temp dir in its command line and killed by pid. Never `ray stop`, which stops
every Ray on the machine.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_ports(count: int, low: int = 20000, high: int = 32000) -> list[int]:
    """Ports free right now, drawn from below the kernel's ephemeral range (32768+, where any process's outgoing
    connections take ports and could take ours between this check and Ray's bind) and above Ray's default worker
    ports (10002-19999)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(low, high)
        if port in ports:
            continue
        with closing(socket.socket()) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


class RayHead:
    def __init__(self, home: Path, num_cpus: int = 2, object_store_memory: int = 300 * 2**20,
                 extra_env: dict | None = None):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayt", dir="/tmp"))  # short: unix socket paths are limited
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self._pick_ports()
        self.env = self.user_env(extra_env)
        self.log = self.home / "ray-start.log"
        self.proc: subprocess.Popen | None = None

    def _pick_ports(self) -> None:
        gcs, dashboard, client, node_manager, object_manager, agent_grpc, agent_http, runtime_env, metrics = \
            free_ports(9)
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self._ports = ["--port", gcs, "--dashboard-port", dashboard, "--ray-client-server-port", client,
                       "--node-manager-port", node_manager, "--object-manager-port", object_manager,
                       "--dashboard-agent-grpc-port", agent_grpc, "--dashboard-agent-listen-port", agent_http,
                       "--runtime-env-agent-port", runtime_env, "--metrics-export-port", metrics]

    def user_env(self, extra: dict | None = None) -> dict:
        """The environment of a user of this cluster: our HOME, the venv's `python` first on PATH, no PYTHONPATH
        (a submitted job imports the project from its uploaded working dir) and no other cluster's address."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "RAY_ADDRESS") and not k.startswith("RAY_AUTH")}
        env.update(HOME=str(self.home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                   RAY_USAGE_STATS_ENABLED="0",
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # nothing to drain for: stop at once on SIGTERM
        env.update(extra or {})
        return env

    def start(self, timeout: float = 180, attempts: int = 3) -> "RayHead":
        """Start the head; a start that fails (a port taken meanwhile by another process) is retried on new ports."""
        for attempt in range(attempts):
            if attempt:
                self._pick_ports()
            cmd = [RAY, "start", "--head", "--block", "--temp-dir", str(self.temp_dir), "--num-cpus",
                   str(self.num_cpus), "--object-store-memory", str(self.object_store_memory), "--dashboard-host",
                   "127.0.0.1", "--include-dashboard", "true", "--disable-usage-stats", *map(str, self._ports)]
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            deadline = time.monotonic() + timeout
            while not self._dashboard_up():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            else:
                return self
            self.stop(remove_temp_dir=False)
        self.stop()
        raise RuntimeError(f"ray start --head did not come up:\n{self.log.read_text()[-4000:]}")

    def _dashboard_up(self) -> bool:
        """The job server answers (a 401 of a cluster with token auth is an answer too)."""
        import urllib.error
        import urllib.request

        try:
            with closing(urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)) as reply:
                return reply.status == 200
        except urllib.error.HTTPError as err:
            return err.code in (401, 403)
        except OSError:
            return False

    def ray_cli(self, *args: str, env: dict | None = None, timeout: float = 300, check: bool = True
                ) -> subprocess.CompletedProcess:
        """`ray <args>` as a user of this cluster (RAY_ADDRESS = its dashboard)."""
        env = {**(env or self.env), "RAY_ADDRESS": self.dashboard_url}
        result = subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
        return result

    def our_pids(self) -> list[int]:
        """Processes of this node: their command line names our private temp dir."""
        import psutil

        marker = str(self.temp_dir)
        pids = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(marker in part for part in proc.info["cmdline"] or ()):
                    pids.append(proc.info["pid"])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return [pid for pid in pids if pid != os.getpid()]

    def stop(self, remove_temp_dir: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the node's processes on SIGTERM
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for _ in range(3):
            pids = self.our_pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1.0)
        if remove_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
