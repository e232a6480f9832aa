"""Throwaway RabbitMQ nodes of their own, for tests that must not touch the shared broker.

A node booted here has its own name (``taskq-<kind>-<random>@localhost``), Erlang cookie,
data/log directories, config file, empty plugin list and ports (its listeners and Erlang
distribution).  The main node (``rabbit@localhost``) is never contacted, stopped or
reconfigured.

* :class:`RabbitNode` is the generic part: environment, boot, readiness, crash, stop, a
  watchdog.  ``tls_broker.py`` builds its TLS-only node on it.
* :class:`AmqpNode` is a plain-AMQP node (``listeners.tcp.default = 127.0.0.1:<port>``, user
  ``guest``/``guest`` on vhost ``/``), for tests that crash the broker: :meth:`RabbitNode.kill`
  SIGKILLs the Erlang VM and :meth:`RabbitNode.start` boots it again on the same data
  directory, so durable queues and persistent messages are recovered (and RabbitMQ marks every
  recovered message ``redelivered``).  ``amqp_node()`` is its context manager.

On exit a node is stopped with SIGTERM (RabbitMQ shuts down gracefully on it) and its files are
deleted; if the test process dies without cleaning up, a small watchdog process does the same
for whichever boot of the node is current.

When the machine cannot run a node (no RabbitMQ, the node does not boot) the first boot calls
``on_unavailable`` with the reason and the tail of the node's logs: :func:`unavailable` skips
the test, except under ``CI=true``, where a RabbitMQ test must not be skipped and it fails
instead.  A later boot (after :meth:`RabbitNode.kill`) that fails raises :class:`NodeError`:
by then the machine has shown it can run a node, so that is a real failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import NoReturn

import amqp
import pytest

HOST = "localhost"
BIND = "127.0.0.1"
# The distro wrapper in /usr/sbin re-runs the scripts as the rabbitmq user through su, which
# loses our HOME (so our cookie) and cannot read root's temp dirs: use the real scripts.
RABBITMQ_BIN_DIRS = ("/usr/lib/rabbitmq/bin",)

OnUnavailable = Callable[[str], NoReturn]


class NodeError(RuntimeError):
    """A node that booted before failed later (to boot again, or to answer rabbitmqctl)."""


def unavailable(reason: str) -> NoReturn:
    """This machine can't run a node: skip, but fail under CI=true (no skipping there)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}\n(CI=true: a RabbitMQ test must not be skipped)", pytrace=False)
    pytest.skip(reason)


def rabbitmq_scripts(on_unavailable: OnUnavailable, label: str) -> tuple[str, str]:
    """The real ``rabbitmq-server`` and ``rabbitmqctl`` scripts (not the su wrappers)."""
    for directory in RABBITMQ_BIN_DIRS:
        server, ctl = Path(directory, "rabbitmq-server"), Path(directory, "rabbitmqctl")
        if os.access(server, os.X_OK) and os.access(ctl, os.X_OK):
            return str(server), str(ctl)
    server_path, ctl_path = shutil.which("rabbitmq-server"), shutil.which("rabbitmqctl")
    if server_path is None or ctl_path is None:
        on_unavailable(f"{label}: rabbitmq-server/rabbitmqctl not found")
    return server_path, ctl_path


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((BIND, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def erl_string(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, pgrp) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    comm = data[data.index("(") + 1 : data.rindex(")")]
    fields = data[data.rindex(")") + 2 :].split()
    return comm, int(fields[1]), int(fields[2])


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, comm) of every live process in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and stat[2] == pgid:
            members.append((int(entry), stat[0]))
    return members


class RabbitNode:
    """One throwaway node: ``start()``, ``kill()`` and ``start()`` again, ``stop()``.

    Subclasses say what it listens on (:meth:`config`) and when it is ready (:meth:`probe`,
    or all of :meth:`wait_ready`); :meth:`after_boot` runs once per boot after that.
    """

    kind = "node"
    label = "RabbitMQ node"

    def __init__(self, work: Path, listeners: Sequence[str], *,
                 on_unavailable: OnUnavailable = unavailable,
                 scripts: tuple[str, str] | None = None) -> None:
        self.work = work
        self.on_unavailable = on_unavailable
        self.server, self.ctl_path = scripts or rabbitmq_scripts(on_unavailable, self.label)
        self.name = f"taskq-{self.kind}-{secrets.token_hex(4)}@{HOST}"
        *listener_ports, dist = free_ports(len(listeners) + 1)
        self.ports = dict(zip(listeners, listener_ports, strict=True))
        self.ports["dist"] = dist
        self.proc: subprocess.Popen[bytes] | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        #: Seconds each boot took, from launching the server script to ready.
        self.boots: list[float] = []
        self.kills = 0
        self.env = self._environment()

    # -- what subclasses say -------------------------------------------------------------------

    def config(self) -> str:
        """The text of rabbitmq.conf."""
        raise NotImplementedError

    def probe(self) -> bool:
        """One readiness check: True when the node serves clients."""
        raise NotImplementedError

    def after_boot(self) -> None:
        """Runs after each boot, once the node is ready."""

    # -- environment ---------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        work = self.work
        home = work / "home"
        home.mkdir(mode=0o700)
        # Our own cookie: the CLI finds it through HOME too.  The main node's cookie is neither
        # needed nor readable (it belongs to the rabbitmq user).
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (work / "enabled_plugins").write_text("[].\n")
        (work / "rabbitmq-env.conf").write_text("")
        (work / "rabbitmq.conf").write_text(self.config())
        # Start from a clean environment: no RABBITMQ_*/ERL_* settings leak in from the caller,
        # and /etc/rabbitmq/rabbitmq-env.conf (NODENAME=rabbit@localhost) is not read.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(home),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_CONF_ENV_FILE=str(work / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(work / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(work / "advanced.config"),  # does not exist
            RABBITMQ_ENABLED_PLUGINS_FILE=str(work / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(work / "mnesia"),
            RABBITMQ_LOG_BASE=str(work / "log"),
            # Default would be 25672, the main node's distribution port.
            RABBITMQ_DIST_PORT=str(self.ports["dist"]),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS=BIND,  # only used if this node has to start epmd itself
            ERL_CRASH_DUMP=str(work / "erl_crash.dump"),
        )
        return env

    # -- start ---------------------------------------------------------------------------------

    def start(self, boot_timeout: float = 60) -> float:
        """Boot the node (again, on the same data after a kill); the seconds it took."""
        if self.proc is not None and self.proc.poll() is None:
            raise NodeError(f"{self.name} is already running")
        began = time.monotonic()
        with open(self.work / "server.out", "ab") as out:
            self.proc = subprocess.Popen(
                [self.server], cwd=self.work, env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        # The watchdog reads the current boot's process group from here.
        (self.work / "node.pgid").write_text(str(self.proc.pid))
        if self.watchdog is None:
            self._start_watchdog()
        self.wait_ready(boot_timeout)
        self.after_boot()
        took = time.monotonic() - began
        self.boots.append(took)
        return took

    @property
    def start_seconds(self) -> float:
        """How long the first boot took."""
        return self.boots[0] if self.boots else 0.0

    def _start_watchdog(self) -> None:
        """If this (test) process dies without cleaning up, stop the node and delete files."""
        # POSIX sh (dash): "kill -TERM -PGID", no "--".
        script = ('while kill -0 "$1" 2>/dev/null; do sleep 1; done; g=$(cat "$2" 2>/dev/null); '
                  'if [ -n "$g" ]; then kill -TERM "-$g" 2>/dev/null; n=0; '
                  'while kill -0 "-$g" 2>/dev/null && [ $n -lt 40 ]; do sleep 0.25; '
                  'n=$((n+1)); done; kill -KILL "-$g" 2>/dev/null; fi; rm -rf -- "$3"')
        self.watchdog = subprocess.Popen(
            ["sh", "-c", script, f"taskq-{self.kind}-watchdog", str(os.getpid()),
             str(self.work / "node.pgid"), str(self.work)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        """Poll :meth:`probe` until the node serves clients; give up after ``timeout``."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self._check_running()
            try:
                if self.probe():
                    return
            except (OSError, amqp.exceptions.AMQPError) as exc:  # not listening yet
                last_error = exc
            time.sleep(0.05)
        self._unavailable(f"node did not become ready within {timeout}s ({last_error!r})")

    def _check_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            self._unavailable(f"node exited with status {self.proc.returncode} during boot")

    def _unavailable(self, reason: str) -> NoReturn:
        message = f"{self.label} {self.name}: {reason}\n{self._log_tail()}"
        if self.boots:  # it booted before: failing now is a failure, not a missing feature
            raise NodeError(message)
        self.on_unavailable(message)

    def _log_tail(self, lines: int = 6) -> str:
        parts = []
        for path in (self.work / "server.out", self.work / "log" / f"{self.name}.log"):
            with suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}:\n" + "\n".join(text))
        return "\n".join(parts)

    # -- while it runs -------------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n <node> ...``; its output (raises NodeError if it fails)."""
        proc = subprocess.run([self.ctl_path, "-n", self.name, *args], cwd=self.work,
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            self._unavailable(f"rabbitmqctl {args[0]} failed ({proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc.stdout

    def settle(self) -> None:
        """Make the node's metadata (queue declarations) durable now: dump Mnesia's log.

        RabbitMQ syncs a queue declaration before it answers, yet on a loaded machine a durable
        queue declared moments after the node's first boot was, in about 1 in 20 tries, gone
        after a SIGKILL that soon after (its confirmed messages with it).  That is RabbitMQ's
        affair, not the client's: a test that means to crash the broker settles it first.
        """
        self.ctl("eval", "mnesia:dump_log().")

    def beam_pid(self) -> int:
        """The OS pid of the node's Erlang VM (beam.smp), from /proc: no CLI, no distribution,
        so it works even when the node does not answer."""
        assert self.proc is not None
        beams = [pid for pid, comm in group_members(self.proc.pid) if comm.startswith("beam")]
        if len(beams) != 1:
            raise NodeError(f"expected one Erlang VM in the node's process group, found "
                            f"{beams} among {group_members(self.proc.pid)}")
        return beams[0]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- crash and stop ------------------------------------------------------------------------

    def kill(self) -> int:
        """Crash the node: SIGKILL its Erlang VM (no clean shutdown); the pid killed.

        Then reap the wrapper script and whatever else the boot left in its process group
        (erl_child_setup exits with its VM).  :meth:`start` boots it again on the same data.
        """
        proc = self.proc
        assert proc is not None
        pid = self.beam_pid()
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=15)  # the wrapper script exits once its VM has
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.kills += 1
        return pid

    def keep_logs(self, directory: Path) -> None:
        """Copy the node's logs (and its console output) to ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        with suppress(OSError):
            shutil.copy(self.work / "server.out", directory / "server.out")
        with suppress(OSError):
            shutil.copytree(self.work / "log", directory / "log", dirs_exist_ok=True)

    def stop(self) -> None:
        """SIGTERM the node's process group (a graceful stop), SIGKILL it if that hangs.

        ``rabbitmqctl stop`` works too, but costs a CLI VM start (~0.6 s) on top of the same
        ~1 s halt, and needs distribution and the cookie to work; a signal does not.
        """
        proc = self.proc
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=wait)
                    break
            # The wrapper script waits for the Erlang VM, but reap anything left in the group.
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self.watchdog is not None:
            self.watchdog.kill()
            self.watchdog.wait()
            self.watchdog = None


class AmqpNode(RabbitNode):
    """A plain-AMQP node on ``127.0.0.1:<port>``: user guest/guest (loopback only), vhost /."""

    kind = "amqp"
    label = "RabbitMQ node"

    def __init__(self, work: Path, *, on_unavailable: OnUnavailable = unavailable) -> None:
        super().__init__(work, ("amqp",), on_unavailable=on_unavailable)

    @property
    def port(self) -> int:
        return self.ports["amqp"]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{BIND}:{self.port}/"

    def config(self) -> str:
        return f"listeners.tcp.default = {BIND}:{self.ports['amqp']}\n"

    def probe(self) -> bool:
        # Listeners start last in RabbitMQ's boot, after queues are recovered: an AMQP
        # connection that opens means the node serves clients.
        self.connect(timeout=2).close()
        return True

    def connect(self, timeout: float = 5) -> amqp.Connection:
        conn = amqp.Connection(f"{BIND}:{self.port}", userid="guest", password="guest",
                               virtual_host="/", connect_timeout=timeout, heartbeat=0)
        try:
            conn.connect()
        except BaseException:
            conn.collect()
            raise
        return conn

    def queue_counts(self, queue: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of a queue by a passive declare; None if it's absent."""
        conn = self.connect()
        try:
            _, ready, consumers = conn.channel().queue_declare(queue, passive=True)
            return ready, consumers
        except amqp.exceptions.NotFound:
            return None
        finally:
            with suppress(Exception):
                conn.close()

    def list_queues(self) -> dict[str, int]:
        """Every queue of vhost / with its messages (ready + unacknowledged), by rabbitmqctl."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "-p", "/", "name", "messages")
        queues = {}
        for line in out.splitlines():
            name, _, messages = line.rpartition("\t")
            if name:
                queues[name] = int(messages)
        return queues


@contextmanager
def amqp_node(base_dir: Path | str | None = None, boot_timeout: float = 60,
              on_unavailable: OnUnavailable = unavailable,
              logs_to: Path | None = None) -> Iterator[AmqpNode]:
    """Boot a throwaway plain-AMQP node; stop it and delete its files on exit (first copying
    its logs to ``logs_to``, if given)."""
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="taskq-node-", dir=base_dir))
        stack.callback(shutil.rmtree, work, True)
        node = AmqpNode(work, on_unavailable=on_unavailable)
        if logs_to is not None:
            stack.callback(node.keep_logs, logs_to)
        stack.callback(node.stop)
        node.start(boot_timeout)
        yield node
