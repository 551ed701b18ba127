"""Real PostgreSQL and nginx for the fleet tests, started in temporary folders.

Both come from Debian's packages (the Makefile installs them). PostgreSQL refuses to run
as root, so under root it runs as `nobody`, with its data dir and socket in a folder that
user owns. nginx runs the configuration rendered from deploy/nginx/loramux.conf.template,
the file the compose example mounts.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from api_helpers import eventually, free_port

REPO = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = REPO / "deploy" / "nginx" / "loramux.conf.template"
UNPRIVILEGED_USER = "nobody"


def find_postgres_bin(name: str) -> str | None:
    """Debian keeps initdb and pg_ctl in /usr/lib/postgresql/<version>/bin, off the PATH."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def find_nginx() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth), as an unprivileged user."""

    def __init__(self) -> None:
        initdb, pg_ctl = find_postgres_bin("initdb"), find_postgres_bin("pg_ctl")
        assert initdb and pg_ctl, "PostgreSQL is not installed (make test installs it)"
        self._initdb, self._pg_ctl = initdb, pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="loramux-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.log = self.root / "postgres.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = [
                "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
            ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql://loramux@127.0.0.1:{self.port}/loramux"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self._as_user, *args],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "LC_ALL": "C.UTF-8"},
            cwd=self.root,
        )
        assert result.returncode == 0, f"{args[0]} failed: {result.stdout}{result.stderr}"

    def start(self) -> Postgres:
        self._run(
            self._initdb, "--pgdata", str(self.data), "--username", "loramux",
            "--auth", "trust", "--encoding", "UTF8", "--no-sync",
        )  # fmt: skip
        self.run_server()
        import psycopg

        with psycopg.connect(
            f"postgresql://loramux@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as connection:
            connection.execute("CREATE DATABASE loramux")
        return self

    def run_server(self) -> None:
        """`pg_ctl start` on the existing data dir (again after `halt`)."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.root} -c fsync=off"
        )
        self._run(
            self._pg_ctl, "--pgdata", str(self.data), "--log", str(self.log),
            "--options", options, "--wait", "--timeout", "120", "start",
        )  # fmt: skip

    def halt(self) -> None:
        """Stop the server at once (as a crash would), keeping its data dir."""
        self._run(self._pg_ctl, "--pgdata", str(self.data), "--mode", "immediate", "--wait", "stop")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [*self._as_user, self._pg_ctl, "--pgdata", str(self.data), "--mode", "immediate",
                 "--wait", "stop"],
                capture_output=True,
                timeout=120,
            )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


def render_nginx_site(upstreams: list[str], listen: str) -> str:
    """The template with its ${LORAMUX_*} variables filled, as the nginx image's envsubst does."""
    values = {
        "LORAMUX_UPSTREAM_SERVERS": " ".join(f"server {u};" for u in upstreams),
        "LORAMUX_NGINX_LISTEN": listen,
    }
    text = NGINX_TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    leftover = re.findall(r"\$\{[A-Z_]+\}", text)
    assert not leftover, leftover
    return text


class Nginx:
    """nginx in the foreground with the rendered site and its files in a temporary folder."""

    def __init__(self, upstreams: list[str]) -> None:
        binary = find_nginx()
        assert binary, "nginx is not installed (make test installs it)"
        self._binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="loramux-nginx-"))
        self.port = free_port()
        site = self.root / "loramux.conf"
        site.write_text(render_nginx_site(upstreams, f"127.0.0.1:{self.port}"))
        temp = {name: self.root / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in temp.values():
            path.mkdir()
            os.chmod(path, 0o777)
        self.access_log = self.root / "access.log"
        (self.root / "nginx.conf").write_text(
            f"""
daemon off;
worker_processes 1;
pid {self.root / "nginx.pid"};
error_log {self.root / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    log_format affinity '$http_loramux_adapter $upstream_addr $status';
    access_log {self.access_log} affinity;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {site};
}}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _args(self) -> list[str]:
        conf = str(self.root / "nginx.conf")
        return [self._binary, "-p", str(self.root), "-e", str(self.root / "error.log"), "-c", conf]

    def check(self) -> str:
        """`nginx -t` on the configuration: its report (raises when invalid)."""
        result = subprocess.run([*self._args(), "-t"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stderr

    def start(self) -> Nginx:
        self.check()
        self.proc = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, stderr=(self.root / "stderr").open("wb")
        )

        def listening() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, (self.root / "error.log").read_text()
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        assert eventually(listening, 30)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)


def scrape(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def request_counts(text: str, status: str = "OK") -> dict[str, float]:
    """`loramux_requests_total` by adapter label, for one status."""
    counts: dict[str, float] = {}
    pattern = re.compile(r"^loramux_requests_total\{([^}]*)\} ([0-9.e+]+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        labels: Mapping[str, str] = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if labels.get("status") == status:
            counts[labels["adapter"]] = counts.get(labels["adapter"], 0.0) + float(match.group(2))
    return counts


def adapter_states(text: str) -> dict[str, float]:
    """`loramux_adapters` by state."""
    return {
        state: float(value)
        for state, value in re.findall(
            r'^loramux_adapters\{state="(\w+)"\} ([0-9.e+]+)$', text, re.M
        )
    }
