"""The systemd units and the Kubernetes DaemonSet of ``containerd_config/``, as far as they can
be run on a machine where systemd is not PID 1 and there is no Kubernetes:

* ``systemd-analyze verify`` accepts every unit and the containerd drop-in (with Debian's
  containerd.service), with no warning. ``verify`` insists that the ExecStart binary exists,
  and ``/opt/turbofs`` is not installed here, so it checks a copy whose
  ``/opt/turbofs/bin/turbofs`` is this checkout's ``turbofs``; nothing else is changed.
* Each service's ``ExecStart`` (and ``ExecStartPre``, honouring ``-``), taken from the unit
  file and split as systemd does, is started as written, with only what cannot be used here
  redirected: the binary (as above), the config file the unit names (a copy of
  ``containerd_config/etc/turbofs/config.toml`` whose paths point into a temporary folder,
  and, for the registry, a free port) and the registry's ``--storage`` (the unit's
  StateDirectory). Then the service must answer: the snapshotter on its socket (gRPC), the
  registry on ``/v2/``; and it must stop on SIGTERM. What systemd itself would add
  (DynamicUser, ProtectSystem, KillMode, Restart) is not exercised, except that the registry
  runs as an unprivileged user, as DynamicUser would run it.
* The DaemonSet file parses as YAML and agrees with the files it embeds or refers to: the
  same snapshotter unit and drop-in, the same socket, state folders and proxy plugin as the
  config files; ``node.sh`` passes ``sh -n`` and shellcheck.
"""

from __future__ import annotations

import configparser
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from tests import process_fixtures
from tests.registry_fixtures import free_port
from turbofs.proto import SNAPSHOTS, unary_stream
from turbofs.proto import snapshots_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = REPO_ROOT / "containerd_config"
UNITS = CONFIG / "etc/systemd/system"
NODE_CONFIG = CONFIG / "etc/turbofs/config.toml"
CONTAINERD_CONFIG = CONFIG / "etc/containerd/config.toml"
DAEMONSET = CONFIG / "kubernetes/turbofs-node.yaml"
INSTALLED_BINARY = "/opt/turbofs/bin/turbofs"
INSTALLED_CONFIG = "/etc/turbofs/config.toml"
SERVICES = ("turbofs-snapshotter.service", "turbofs-registry.service")
DROP_IN = "containerd.service.d/turbofs.conf"


def _turbofs_binary() -> str:
    path = Path(sys.executable).with_name("turbofs")
    if not path.exists():
        pytest.skip(f"{path} is missing (pip install -e . into the venv)")
    return str(path)


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys may repeat), comments dropped."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def _command(value: str) -> tuple[list[str], bool]:
    """An Exec*= line as systemd runs it: (argv, failure ignored). Handles the ``-``, ``@``,
    ``:``, ``+`` and ``!`` prefixes as far as this needs (``@`` is not used by our units)."""
    ignore = False
    while value and value[0] in "-@:+!":
        if value[0] == "@":
            raise AssertionError(f"{value!r}: the @ prefix is not expected in turbofs' units")
        ignore = ignore or value[0] == "-"
        value = value[1:]
    return shlex.split(value), ignore


def _verify_copy(tmp: Path) -> Path:
    """The units and the drop-in under ``tmp``, with the installed binary replaced."""
    binary = _turbofs_binary()
    for path in UNITS.rglob("*"):
        if path.is_file():
            dest = tmp / path.relative_to(UNITS)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(path.read_text().replace(INSTALLED_BINARY, binary))
    return tmp


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    units = _verify_copy(tmp_path)
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"}  # ours first, then the defaults
    names = [*SERVICES]
    if Path("/lib/systemd/system/containerd.service").exists():
        names.append("containerd.service")  # Debian's unit, with our drop-in
    for name in names:
        arg = str(units / name) if (units / name).exists() else name
        proc = subprocess.run(["systemd-analyze", "verify", "--man=no", arg], capture_output=True, text=True,
                              env=env, cwd=units, timeout=60, check=False)
        assert proc.returncode == 0 and not proc.stderr.strip() and not proc.stdout.strip(), (name, proc.stderr)
    # the check bites: a key systemd does not know is reported
    bad = units / "turbofs-bad.service"
    bad.write_text((units / SERVICES[0]).read_text().replace("[Service]", "[Service]\nKillMod=process"))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(bad)], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert "KillMod" in proc.stderr


@pytest.fixture
def node_dir() -> Iterator[Path]:
    """A short temporary folder (unix socket paths), readable by an unprivileged user."""
    base = Path(tempfile.mkdtemp(prefix="tfs-units-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _node_config(base: Path, port: int) -> Path:
    """containerd_config's turbofs config with every path moved under ``base``."""
    table = tomllib.loads(NODE_CONFIG.read_text())
    text = NODE_CONFIG.read_text()
    for section in ("snapshotter", "daemon", "registry"):
        for value in table[section].values():
            if isinstance(value, str) and value.startswith("/"):
                text = text.replace(json.dumps(value), json.dumps(str(base) + value))
    text = re.sub(r"(?m)^port = \d+$", f"port = {port}", text)
    path = base / INSTALLED_CONFIG.lstrip("/")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def _exec_lines(unit: dict[str, dict[str, list[str]]], key: str, config: Path, **flags: str) -> list[tuple[list[str], bool]]:
    out = []
    for value in unit["Service"].get(key, []):
        argv, ignore = _command(value)
        argv = [_turbofs_binary() if a == INSTALLED_BINARY else str(config) if a == INSTALLED_CONFIG else a for a in argv]
        for flag, new in flags.items():
            argv[argv.index(flag) + 1] = new
        out.append((argv, ignore))
    return out


def _start(unit_name: str, config: Path, log: Path, *, user: str | None = None, **flags: str) -> subprocess.Popen[bytes]:
    unit = _unit((UNITS / unit_name).read_text())
    for argv, ignore in _exec_lines(unit, "ExecStartPre", config, **flags):
        rc = subprocess.run(argv, capture_output=True, timeout=60, check=False).returncode if shutil.which(argv[0]) else 127
        assert ignore or rc == 0, f"{unit_name}: ExecStartPre {argv} failed ({rc})"
    ((argv, _),) = _exec_lines(unit, "ExecStart", config, **flags)
    env = None
    if user is not None:  # what DynamicUser= does, roughly: an unprivileged user
        pw = pwd.getpwnam(user)
        argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *argv]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/"}
    return process_fixtures.spawn(argv, log, env=env, capture_stdout=True)


def _wait(cond: Any, what: str, proc: subprocess.Popen[bytes], log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the service exited ({proc.returncode}):\n{process_fixtures.log_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{process_fixtures.log_tail(log)}")
        time.sleep(0.1)


def test_snapshotter_unit_starts_and_answers(node_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the snapshotter runs as root")
    config = _node_config(node_dir, free_port())
    settings = tomllib.loads(config.read_text())["snapshotter"]
    sock = Path(settings["address"])
    proc = _start("turbofs-snapshotter.service", config, node_dir / "snapshotter.log")
    try:
        line = process_fixtures.first_line(proc, time.monotonic() + 30, "turbofs-snapshotter", node_dir / "snapshotter.log")
        assert line == f"turbofs snapshotter listening on unix:{sock} (root {settings['root']})"
        assert oct(sock.stat().st_mode & 0o777) == "0o600"  # containerd (root) only
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            listed = unary_stream(channel, SNAPSHOTS, "List", pb.ListSnapshotsResponse)(pb.ListSnapshotsRequest(), timeout=30)
            assert [info for batch in listed for info in batch.info] == []
        assert (Path(settings["root"]) / "metadata.db").exists()
    finally:
        rc = process_fixtures.stop(proc)
    assert rc == 0 and not sock.exists(), process_fixtures.log_tail(node_dir / "snapshotter.log")


def test_registry_unit_starts_and_answers(node_dir: Path) -> None:
    port = free_port()
    config = _node_config(node_dir, port)
    storage = node_dir / "var/lib/turbofs-registry"  # the unit's StateDirectory
    storage.mkdir(parents=True)
    user = "nobody" if os.geteuid() == 0 and shutil.which("setpriv") else None
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(storage, pw.pw_uid, pw.pw_gid)
        for d in (config.parent, config.parent.parent):
            d.chmod(0o755)
        config.chmod(0o644)
    log = node_dir / "registry.log"
    proc = _start("turbofs-registry.service", config, log, user=user, **{"--storage": str(storage)})
    try:
        line = process_fixtures.first_line(proc, time.monotonic() + 30, "turbofs-registry", log)
        assert f"listening on http://127.0.0.1:{port}" in line, line
        assert httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=10).status_code == 200
        if user is not None:
            assert any(p.stat().st_uid == pwd.getpwnam(user).pw_uid for p in storage.rglob("*")) or not any(storage.iterdir())
    finally:
        rc = process_fixtures.stop(proc)
    assert rc == 0, process_fixtures.log_tail(log)


# -- the DaemonSet -----------------------------------------------------------------------------


def _yaml_documents(path: Path) -> list[Any]:
    """The documents of a YAML file."""
    return list(yaml.safe_load_all(path.read_text()))


def test_daemonset_agrees_with_the_units_and_config(tmp_path: Path) -> None:
    docs = {f"{d['kind']}/{d['metadata']['name']}": d for d in _yaml_documents(DAEMONSET)}
    assert set(docs) == {"Namespace/turbofs-system", "ConfigMap/turbofs-node", "DaemonSet/turbofs-node-on",
                         "DaemonSet/turbofs-node-off"}
    files: dict[str, str] = docs["ConfigMap/turbofs-node"]["data"]
    assert set(files) == {"config.toml", "turbofs-snapshotter.service", "containerd-turbofs.conf", "node.sh"}

    # the embedded units are the repository's (comments aside)
    assert _unit(files["turbofs-snapshotter.service"]) == _unit((UNITS / "turbofs-snapshotter.service").read_text())
    assert _unit(files["containerd-turbofs.conf"]) == _unit((UNITS / DROP_IN).read_text())

    # the embedded config: every value it sets is the repository's
    node = tomllib.loads(NODE_CONFIG.read_text())
    embedded = tomllib.loads(files["config.toml"])
    for section, values in embedded.items():
        for key, value in values.items():
            assert node[section][key] == value, f"[{section}] {key}: {value!r} in the DaemonSet, {node[section][key]!r} in {NODE_CONFIG}"
    sn = node["snapshotter"]
    containerd = tomllib.loads(CONTAINERD_CONFIG.read_text())
    assert containerd["proxy_plugins"]["turbofs"] == {"type": "snapshot", "address": sn["address"]}
    cri = containerd["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert (cri["snapshotter"], cri["disable_snapshot_annotations"]) == ("turbofs", False)

    # node.sh: the same socket, folders, files and unit names
    script = files["node.sh"]
    assert f"SOCK={sn['address']}" in script.splitlines()
    assert f"--run-dir {sn['run_dir']}" in script and f"{sn['root']}/mounts/" in script
    assert f"rm -rf {sn['root']} {sn['run_dir']} /etc/systemd/system/turbofs-snapshotter.service" in script
    exec_start = _unit(files["turbofs-snapshotter.service"])["Service"]["ExecStart"][0]
    assert _command(exec_start)[0][:3] == [INSTALLED_BINARY, "--config", INSTALLED_CONFIG]
    assert "/opt/turbofs/bin/turbofs umount" in script and "/etc/turbofs/config.toml" in script
    for name in ("config.toml", "turbofs-snapshotter.service", "containerd-turbofs.conf"):
        assert f"$STAGE/files/{name}" in script
    assert "/etc/systemd/system/containerd.service.d/turbofs.conf" in script
    (tmp_path / "node.sh").write_text(script)
    assert subprocess.run(["sh", "-n", str(tmp_path / "node.sh")], capture_output=True, check=False).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-s", "sh", str(tmp_path / "node.sh")], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, proc.stdout

    # both DaemonSets: the ConfigMap mounted at /files, the host at /host, node.sh run through nsenter
    for name, arg in (("DaemonSet/turbofs-node-on", "on"), ("DaemonSet/turbofs-node-off", "off")):
        spec = docs[name]["spec"]["template"]["spec"]
        assert spec["hostPID"] is True and spec["nodeSelector"] == {"turbofs.io/node": arg}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["files"]["configMap"]["name"] == "turbofs-node" and volumes["host"]["hostPath"]["path"] == "/"
        pods = spec.get("initContainers", []) + spec["containers"]
        (runner,) = [c for c in pods if "node.sh" in " ".join(c.get("args", []))]
        assert runner["securityContext"]["privileged"] is True
        assert {m["name"]: m["mountPath"] for m in runner["volumeMounts"]} == {"host": "/host", "files": "/files"}
        text = runner["args"][0]
        assert f"nsenter --target 1 --mount --uts --ipc --net --pid -- /bin/sh /var/lib/turbofs/node/files/node.sh {arg}" in text
        assert "/host/var/lib/turbofs/node/files" in text and "STAGE=/var/lib/turbofs/node" in script
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(files["turbofs-snapshotter.service"])
    assert parser["Service"]["KillMode"] == "process"
