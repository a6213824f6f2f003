"""Real OpenStack services for tests: RabbitMQ, Glance, Cinder, tgtd.

:func:`start_services` (and the session fixture ``openstack`` in
``tests/openstack/conftest.py``) starts, in a temporary directory and on
loopback ports of their own:

- tgtd (``-C`` control port of its own, so Cinder's ``tgt-admin`` and
  ``tgtadm`` calls, through small wrappers on PATH, reach this one and no
  system tgtd);
- epmd and RabbitMQ (Debian's rabbitmq-server, run as root with its own
  node name, data and log directories);
- Glance (``gunicorn glance.wsgi.api:application``; sqlite, file store,
  no auth);
- Cinder: ``cinder-api``, ``cinder-scheduler`` and ``cinder-volume`` with
  sqlite, ``auth_strategy = noauth`` and vmthunder's file-backed driver
  (vmthunder/cinder/file_driver.py) on Cinder's tgtadm target helper;

all from ``.venv-openstack`` (scripts/install-openstack.sh). Each runs in
a process group of its own and :meth:`Services.close` ends every group
(SIGTERM, then SIGKILL), deletes every target tgtd still has and stops it,
pass or fail. Root is needed (tgtd; cinder-volume runs its privileged
helpers through a ``sudo`` stand-in that just runs the command).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
VENV = os.path.join(REPO, ".venv-openstack")
VENV_BIN = os.path.join(VENV, "bin")
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
HOST = "127.0.0.1"
PROJECT = "vmthunder"
USER = "vmthunder-tests"
BACKEND = "file-1"


class ServiceError(RuntimeError):
    pass


def missing() -> str | None:
    """Why the services cannot run here, or None."""
    if os.geteuid() != 0:
        return "the OpenStack services test needs root (tgtd, cinder-volume)"
    if not os.access(os.path.join(VENV_BIN, "cinder-volume"), os.X_OK):
        return (f"{VENV} missing: made by scripts/install-openstack.sh "
                "(scripts/install.sh runs it unless "
                "VMTHUNDER_SKIP_OPENSTACK=1)")
    for tool in ("tgtd", "tgtadm", "tgt-admin", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} not installed; run scripts/install.sh"
    if not os.access(RABBITMQ_SERVER, os.X_OK) or shutil.which("epmd") \
            is None and not os.path.exists("/usr/lib/erlang/bin/epmd"):
        return "rabbitmq-server not installed; run scripts/install.sh"
    return None


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, log: str,
              timeout: float, host: str = HOST) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited ({proc.returncode}) before "
                               f"listening on {port}: {tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise ServiceError(f"{what} did not listen on {port} within "
                       f"{timeout:g} s: {tail(log)}")


def tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"


@dataclasses.dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: str
    popen_env: dict


@dataclasses.dataclass
class Services:
    """What is running; ``cinder_url`` is the v3 endpoint (no project in
    URLs with noauth). ``host``: the address tgtd's portal, Cinder's API
    and Glance listen on (RabbitMQ stays on loopback)."""

    base: str
    host: str = HOST
    procs: list[Proc] = dataclasses.field(default_factory=list)
    tgt_port: int = 0
    tgt_control: int = 0
    rabbit_port: int = 0
    glance_port: int = 0
    cinder_port: int = 0
    timings: dict = dataclasses.field(default_factory=dict)
    env: dict = dataclasses.field(default_factory=dict)

    @property
    def cinder_url(self) -> str:
        return f"http://{self.host}:{self.cinder_port}/v3"

    @property
    def glance_url(self) -> str:
        return f"http://{self.host}:{self.glance_port}"

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.tgt_port}"

    @property
    def volumes_dir(self) -> str:
        return os.path.join(self.base, "cinder", "file-volumes")

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def logs(self, n: int = 4000) -> str:
        return "\n".join(f"--- {p.name} ({p.log})\n{tail(p.log, n)}"
                         for p in self.procs)

    # -- processes --------------------------------------------------------

    def spawn(self, name: str, argv: list[str], *, env: dict | None = None,
              cwd: str | None = None) -> Proc:
        log = os.path.join(self.base, "logs", f"{name}.log")
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=cwd or self.base,
                env=env or self.env, start_new_session=True)
        proc = Proc(name, popen, log, env or self.env)
        self.procs.append(proc)
        return proc

    def stop_proc(self, proc: Proc, timeout: float = 15) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout``."""
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever of the group is left (workers, privsep helpers).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(10)

    def restart(self, name: str, *, crash: bool = False) -> Proc:
        """Stop service ``name`` (``crash``: SIGKILL, no clean stop) and
        start it again with the same command, in the same place in the
        stop order."""
        old = self.proc(name)
        if crash:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(old.popen.pid, signal.SIGKILL)
        self.stop_proc(old)
        index = self.procs.index(old)
        new = self.spawn(name, list(old.popen.args), env=old.popen_env)
        self.procs.remove(new)
        self.procs[index] = new
        return new

    def crash_tgtd(self) -> None:
        """SIGKILL tgtd and start it again on the same portal and control
        port, with no targets (as after a storage node's reboot)."""
        self.restart("tgtd", crash=True)
        deadline = time.monotonic() + 15
        while self.tgtadm("--lld", "iscsi", "--mode", "portal", "--op",
                          "show", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise ServiceError(f"tgtd did not come back: "
                                   f"{tail(self.proc('tgtd').log)}")
            time.sleep(0.1)

    # -- tgtd ---------------------------------------------------------------

    def tgtadm(self, *args: str, check: bool = True
               ) -> subprocess.CompletedProcess:
        proc = subprocess.run(["tgtadm", "-C", str(self.tgt_control), *args],
                              capture_output=True, text=True, timeout=20)
        if check and proc.returncode != 0:
            raise ServiceError(f"tgtadm {' '.join(args)}: "
                               f"{proc.stderr.strip()}")
        return proc

    def targets(self) -> dict[int, str]:
        """tid -> IQN of every target tgtd has."""
        out = self.tgtadm("--lld", "iscsi", "--mode", "target", "--op",
                          "show", check=False).stdout
        return {int(m.group(1)): m.group(2) for m in re.finditer(
            r"^Target (\d+): (\S+)$", out, re.M)}

    def close_tgtd(self) -> None:
        """Delete every target (sessions dropped first), stop tgtd."""
        deadline = time.monotonic() + 15
        for tid in self.targets():
            self.tgtadm("--lld", "iscsi", "--mode", "target", "--op",
                        "update", "--tid", str(tid), "--name", "state",
                        "--value", "offline", check=False)
            while self.tgtadm("--lld", "iscsi", "--mode", "target", "--op",
                              "delete", "--force", "--tid", str(tid),
                              check=False).returncode != 0 \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
        self.tgtadm("--mode", "system", "--op", "delete", "--force",
                    check=False)

    def close(self) -> None:
        """Stop everything started, in reverse order; pass or fail."""
        for proc in reversed(self.procs):
            if proc.name == "tgtd":
                with contextlib.suppress(Exception):
                    self.close_tgtd()
            with contextlib.suppress(Exception):
                self.stop_proc(proc)


def _write(path: str, text: str, mode: int = 0o644) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip())
    os.chmod(path, mode)
    return path


def _wrappers(s: Services) -> str:
    """bin/ with the stand-ins first on the services' PATH."""
    bindir = os.path.join(s.base, "bin")
    # Root already: run the command; drop sudo's options and a rootwrap
    # (cinder-rootwrap CONFIG) in front of it.
    _write(os.path.join(bindir, "sudo"), """\
        #!/bin/sh
        while [ $# -gt 0 ]; do
            case "$1" in -E|-n|-H) shift;; --) shift; break;; *) break;; esac
        done
        case "$1" in *rootwrap) shift 2;; esac
        exec "$@"
        """, 0o755)
    tgtadm, tgt_admin = shutil.which("tgtadm"), shutil.which("tgt-admin")
    # Every tgtadm call (Cinder's, and tgt-admin's own "tgtadm -C 0")
    # goes to the tests' tgtd, whatever control port it names.
    _write(os.path.join(bindir, "tgtadm"), f"""\
        #!/bin/sh
        skip=
        for a in "$@"; do
            shift
            if [ -n "$skip" ]; then skip=; continue; fi
            case "$a" in -C|--control-port) skip=1; continue;; esac
            set -- "$@" "$a"
        done
        exec {tgtadm} -C {s.tgt_control} "$@"
        """, 0o755)
    # tgt-admin reads this configuration (the targets Cinder writes into
    # volumes_dir), not /etc/tgt/targets.conf.
    conf = _write(os.path.join(s.base, "tgt", "targets.conf"), f"""\
        include {os.path.join(s.base, 'cinder', 'volumes')}/*
        """)
    _write(os.path.join(bindir, "tgt-admin"), f"""\
        #!/bin/sh
        exec {tgt_admin} -C {s.tgt_control} -c {conf} "$@"
        """, 0o755)
    return bindir


def _start_tgtd(s: Services) -> None:
    for _ in range(20):
        s.tgt_port = free_port(s.host)
        s.tgt_control = 20000 + int.from_bytes(os.urandom(2), "big") % 10000
        if os.path.exists(f"/var/run/tgtd/socket.{s.tgt_control}"):
            continue
        proc = s.spawn("tgtd", ["tgtd", "-f", "--iscsi",
                                f"portal={s.host}:{s.tgt_port}",
                                "-C", str(s.tgt_control)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.popen.poll() is None:
            portals = s.tgtadm("--lld", "iscsi", "--mode", "portal",
                               "--op", "show", check=False)
            if portals.returncode == 0:
                if f"Portal: {s.portal}," in portals.stdout:
                    return
                break
            time.sleep(0.05)
        s.close_tgtd()
        s.stop_proc(proc)
        s.procs.remove(proc)
    raise ServiceError("tgtd did not start")


def _start_rabbitmq(s: Services) -> None:
    root = os.path.join(s.base, "rabbitmq")
    for d in ("mnesia", "log", "home"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    s.rabbit_port = free_port()
    epmd_port = free_port()
    plugins = _write(os.path.join(root, "enabled_plugins"), "[].\n")
    env = dict(s.env, HOME=os.path.join(root, "home"),
               ERL_EPMD_PORT=str(epmd_port), ERL_EPMD_ADDRESS=HOST,
               RABBITMQ_NODENAME=f"vmt{s.rabbit_port}@localhost",
               RABBITMQ_NODE_IP_ADDRESS=HOST,
               RABBITMQ_NODE_PORT=str(s.rabbit_port),
               RABBITMQ_DIST_PORT=str(free_port()),
               # Erlang distribution on loopback too, not every interface.
               RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                   "-kernel inet_dist_use_interface {127,0,0,1}"),
               RABBITMQ_MNESIA_BASE=os.path.join(root, "mnesia"),
               RABBITMQ_LOG_BASE=os.path.join(root, "log"),
               RABBITMQ_ENABLED_PLUGINS_FILE=plugins,
               RABBITMQ_CONFIG_FILE=os.path.join(root, "rabbitmq"),
               RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(root,
                                                          "advanced.config"),
               RABBITMQ_CONF_ENV_FILE=os.path.join(root, "rabbitmq-env.conf"))
    # Our own epmd in the foreground, in our process group, so nothing of
    # Erlang outlives the test.
    epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
    s.spawn("epmd", [epmd, "-port", str(epmd_port), "-address", HOST],
            env=env)
    proc = s.spawn("rabbitmq", [RABBITMQ_SERVER], env=env)
    wait_port(s.rabbit_port, proc.popen, "RabbitMQ", proc.log, 60)


def _start_glance(s: Services, py: str) -> None:
    conf_dir = os.path.join(s.base, "glance")
    data = {d: os.path.join(conf_dir, d)
            for d in ("images", "staging", "tasks", "cache")}
    for d in data.values():
        os.makedirs(d, exist_ok=True)
    s.glance_port = free_port(s.host)
    shutil.copy(os.path.join(VENV, "etc", "glance", "glance-api-paste.ini"),
                conf_dir)
    _write(os.path.join(conf_dir, "glance-api.conf"), f"""\
        [DEFAULT]
        enabled_backends = fs:file
        image_cache_dir = {data['cache']}
        log_file = {os.path.join(s.base, 'logs', 'glance-api.app.log')}
        debug = False
        [database]
        connection = sqlite:///{conf_dir}/glance.sqlite
        [glance_store]
        default_backend = fs
        [fs]
        filesystem_store_datadir = {data['images']}
        [os_glance_staging_store]
        filesystem_store_datadir = {data['staging']}
        [os_glance_tasks_store]
        filesystem_store_datadir = {data['tasks']}
        [paste_deploy]
        flavor =
        [oslo_policy]
        enforce_new_defaults = False
        enforce_scope = False
        """)
    env = dict(s.env, OS_GLANCE_CONFIG_DIR=conf_dir)
    t0 = time.monotonic()
    subprocess.run([os.path.join(VENV_BIN, "glance-manage"),
                    "--config-dir", conf_dir, "db_sync"],
                   env=env, check=True, capture_output=True, timeout=300,
                   cwd=s.base)
    s.timings["glance_db_sync"] = round(time.monotonic() - t0, 1)
    proc = s.spawn("glance-api", [
        os.path.join(VENV_BIN, "gunicorn"), "--workers", "1",
        "--bind", f"{s.host}:{s.glance_port}", "--timeout", "300",
        "glance.wsgi.api:application"], env=env)
    wait_port(s.glance_port, proc.popen, "glance-api (gunicorn)", proc.log,
              120, s.host)


def _cinder_conf(s: Services) -> str:
    root = os.path.join(s.base, "cinder")
    for d in ("volumes", "file-volumes", "locks", "coordination"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    shutil.copy(os.path.join(VENV, "etc", "cinder", "api-paste.ini"), root)
    policy = _write(os.path.join(root, "policy.yaml"), """\
        "volume:multiattach_bootable_volume": ""
        "volume:multiattach": ""
        """)
    s.cinder_port = free_port(s.host)
    return _write(os.path.join(root, "cinder.conf"), f"""\
        [DEFAULT]
        state_path = {root}
        auth_strategy = noauth
        transport_url = rabbit://guest:guest@{HOST}:{s.rabbit_port}/
        osapi_volume_listen = {s.host}
        osapi_volume_listen_port = {s.cinder_port}
        osapi_volume_workers = 1
        api_paste_config = {root}/api-paste.ini
        enabled_backends = {BACKEND}
        glance_api_servers = {s.glance_url}
        my_ip = {s.host}
        host = vmthunder-tests
        log_dir = {os.path.join(s.base, 'logs')}
        debug = True
        report_interval = 30
        periodic_interval = 5
        scheduler_driver_init_wait_time = 1
        rpc_response_timeout = 60
        image_conversion_dir = {root}/conversion
        [database]
        connection = sqlite:///{root}/cinder.sqlite
        [oslo_concurrency]
        lock_path = {root}/locks
        [coordination]
        backend_url = file://{root}/coordination
        [oslo_policy]
        policy_file = {policy}
        enforce_new_defaults = False
        enforce_scope = False
        [oslo_messaging_notifications]
        driver = noop
        [{BACKEND}]
        volume_driver = vmthunder.cinder.file_driver.FileVolumeDriver
        volume_backend_name = {BACKEND}
        vmthunder_file_volumes_dir = {root}/file-volumes
        target_helper = tgtadm
        target_protocol = iscsi
        target_ip_address = {s.host}
        target_port = {s.tgt_port}
        volumes_dir = {root}/volumes
        """)


def _start_cinder(s: Services) -> None:
    conf = _cinder_conf(s)
    args = ["--config-file", conf]
    t0 = time.monotonic()
    proc = subprocess.run([os.path.join(VENV_BIN, "cinder-manage"), *args,
                           "db", "sync"], env=s.env, capture_output=True,
                          text=True, timeout=300, cwd=s.base)
    if proc.returncode != 0:
        raise ServiceError(f"cinder-manage db sync: {proc.stderr[-3000:]}")
    s.timings["cinder_db_sync"] = round(time.monotonic() - t0, 1)
    # Write-ahead log: readers no longer block the writer, so a request's
    # read-then-write (a quota reservation) rarely meets the services'
    # heartbeats' writes (in rollback-journal mode such a meeting is an
    # immediate "database is locked" and an HTTP 500, seen here). Rarely
    # is not never (an attachment's connection failed so in a CI run):
    # the heartbeats are every 30 s (report_interval above, well under
    # the 60 s service_down_time), and attach retries a server error.
    import sqlite3
    with contextlib.closing(sqlite3.connect(
            os.path.join(s.base, "cinder", "cinder.sqlite"))) as db:
        db.execute("PRAGMA journal_mode=WAL")
    api = s.spawn("cinder-api", [os.path.join(VENV_BIN, "cinder-api"),
                                 *args])
    s.spawn("cinder-volume", [os.path.join(VENV_BIN, "cinder-volume"),
                              *args])
    wait_port(s.cinder_port, api.popen, "cinder-api", api.log, 120, s.host)
    # The scheduler asks every volume service for its capabilities when
    # it starts; a volume service that starts later reports them only
    # with its periodic task (every 60 s). So: volume first.
    _wait_cinder_ready(s, 240, want={"cinder-volume"})
    s.spawn("cinder-scheduler", [os.path.join(VENV_BIN, "cinder-scheduler"),
                                 *args])
    _wait_cinder_ready(s, 240)


def _wait_cinder_ready(s: Services, timeout: float,
                       want: set | None = None) -> None:
    """Until the services ``want`` are up, or (None) until the scheduler
    knows the volume backend's pool. A request
    cast before the scheduler's queue exists is lost (a volume would stay
    'creating' for ever), and one scheduled before the backend reported
    its capabilities fails: on a loaded machine both start slowly."""
    import json
    import urllib.request
    deadline = time.monotonic() + timeout
    headers = {"X-Auth-Token": f"{USER}:{PROJECT}",
               "OpenStack-API-Version": "volume 3.0"}
    last = ""
    while time.monotonic() < deadline:
        for proc in s.procs:
            if not proc.name.startswith("cinder-"):
                continue
            if proc.popen.poll() is not None:
                raise ServiceError(f"{proc.name} exited "
                                   f"({proc.popen.returncode}): "
                                   f"{tail(proc.log)}")
        try:
            req = urllib.request.Request(
                f"{s.cinder_url}/os-services", headers=headers)
            with urllib.request.urlopen(req, timeout=10) as r:
                up = {x["binary"] for x in json.load(r)["services"]
                      if x["state"] == "up" and x["status"] == "enabled"}
            if want is not None:
                if want <= up:
                    return
                last = f"services up: {sorted(up)}"
                time.sleep(0.5)
                continue
            req = urllib.request.Request(
                f"{s.cinder_url}/scheduler-stats/get_pools",
                headers=headers)
            with urllib.request.urlopen(req, timeout=10) as r:
                pools = [p["name"] for p in json.load(r)["pools"]]
            if {"cinder-scheduler", "cinder-volume"} <= up and any(
                    p.endswith(f"@{BACKEND}#{BACKEND}") for p in pools):
                return
            last = f"services up: {sorted(up)}, pools: {pools}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise ServiceError(f"Cinder not ready within {timeout:g} s ({last})")


def start_services(base: str, host: str = HOST) -> Services:
    """Start everything under ``base``, tgtd's portal, Cinder and Glance
    on ``host`` (an address of this namespace: loopback, or one that
    hosts in network namespaces reach); on failure what started is
    stopped and the error carries the logs."""
    os.makedirs(os.path.join(base, "logs"), exist_ok=True)
    s = Services(base, host)
    t_all = time.monotonic()
    try:
        path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        s.env = {k: v for k, v in os.environ.items()
                 if not k.startswith(("PYTHON", "VIRTUAL_ENV", "OS_"))}
        s.env["PYTHONDONTWRITEBYTECODE"] = "1"
        for step, start in (("tgtd", _start_tgtd),
                            ("rabbitmq", _start_rabbitmq)):
            t0 = time.monotonic()
            if step == "rabbitmq":
                s.env["PATH"] = f"{_wrappers(s)}:{VENV_BIN}:{path}"
            start(s)
            s.timings[step] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        _start_glance(s, sys.executable)
        s.timings["glance"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        _start_cinder(s)
        s.timings["cinder"] = round(time.monotonic() - t0, 1)
    except BaseException as exc:
        logs = s.logs()
        s.close()
        if isinstance(exc, Exception):
            raise ServiceError(f"{exc}\n{logs}") from exc
        raise
    s.timings["all"] = round(time.monotonic() - t_all, 1)
    return s
