"""The CLI's newcomer traps of issue 10 (items 10-14, 18, 19), each against the real CLI or a
real `dynaroute serve`: what it refuses, with which exit code and message, before or without
Ray; and that the servers it does start serve.

Ray clusters started here get their own token, temp dir and session, so that the tests end
exactly the processes they started."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dynaroute.bundle import Bundle
from dynaroute.client import Client
from dynaroute.data import load_digits_splits
from tests.integration.test_cluster import RayNode, _free_port, _pids_in_session, _pids_mentioning
from tests.serving import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray's address and auth settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV}
    return {**env, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", **extra}


def cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dynaroute", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or clean_env(), timeout=timeout_s)


def serve_cli(bundle: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`dynaroute serve` expected to refuse: it must exit by itself, well inside the limit."""
    return cli("serve", str(bundle), "--port", "0", "--metrics-port", "0", "--ray-num-cpus", "1", *args, env=env)


@pytest.fixture(scope="module")
def example() -> np.ndarray:
    return load_digits_splits().test.x[0]


@pytest.fixture(scope="module")
def token_head() -> Iterator[tuple[str, dict[str, str]]]:
    """A one-node Ray cluster with token authentication on (its own token): its address and
    the environment of a process that holds the token."""
    base = Path(tempfile.mkdtemp(prefix="drh", dir="/tmp"))  # short: Ray's socket paths
    token = base / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    port = _free_port()
    head = RayNode(base / "head", env, "--head", "--port", str(port), "--include-dashboard=false",
                   "--ray-client-server-port", str(_free_port()))  # fmt: skip
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        head.stop()
        shutil.rmtree(base, ignore_errors=True)


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("dynaroute serve: ")]
    assert errors, out[-3000:]
    return errors[-1]


# ---- item 14: a bad bundle or placement is refused before Ray starts -----------------------


def test_bad_bundle_or_placement_is_refused_before_ray(digits_bundle_dir: Path, tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"actors": [{"name": "a", "subnets": ["w9-d9-p0"]}]}))
    cases = [
        ((str(tmp_path / "no-such-bundle"),), "does not exist"),
        ((str(digits_bundle_dir), "--placement", str(tmp_path / "no-such.json")), "no-such.json"),
        ((str(digits_bundle_dir), "--placement", str(unknown)), "unknown subnets ['w9-d9-p0']"),
    ]
    for args, message in cases:
        done = serve_cli(Path(args[0]), *args[1:])
        assert done.returncode == 2, done.stdout + done.stderr
        assert message in _one_line_error(done)
        assert "Ray" not in done.stdout + done.stderr  # no Ray was started (it logs when it is)


# ---- item 13: a placement that no node can hold --------------------------------------------


def test_placement_no_node_can_hold_is_refused_at_once(digits_bundle_dir: Path) -> None:
    # The deploy example asks for GPUs and a worker's `gpu_node` resource; a local Ray has
    # neither, and never will, so waiting (here up to 600 s) would be pointless.
    placement = REPO / "deploy" / "ray" / "placement.json"
    done = serve_cli(digits_bundle_dir, "--placement", str(placement), "--ready-timeout-s", "600")
    assert done.returncode == 1
    error = _one_line_error(done)
    assert "actor 'large' asks for CPU 1, GPU 0.5, gpu_node 0.01" in error, error
    assert "no node of the Ray cluster can hold" in error and "nodes: CPU 1" in error, error


# ---- items 12 and 13 on a joined cluster -----------------------------------------------------


def test_ray_address_errors_are_one_line_and_fast(
    digits_bundle_dir: Path, tmp_path: Path, token_head: tuple[str, dict[str, str]]
) -> None:
    address, token_env = token_head
    # A token-auth cluster, joined without RAY_AUTH_MODE=token: say what to set, at once.
    done = serve_cli(digits_bundle_dir, "--ray-address", address)
    assert done.returncode == 1
    error = _one_line_error(done)
    assert f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token" in error, error

    # Nothing listening there (a stopped head): no minutes of retries.
    dead = f"127.0.0.1:{_free_port()}"
    done = serve_cli(digits_bundle_dir, "--ray-address", dead)
    assert done.returncode == 1
    assert f"no Ray cluster answers at {dead}" in _one_line_error(done)

    # With the token, a placement that needs a node the cluster does not have: said at once,
    # waited for up to --ready-timeout-s (a worker may still join), then one line.
    placement = tmp_path / "node2.json"
    subnets = [s["name"] for s in Bundle.load(digits_bundle_dir).subnet_infos]
    placement.write_text(json.dumps({"actors": [{"name": "remote", "subnets": subnets, "resources": {"node2": 0.01}}]}))
    done = serve_cli(digits_bundle_dir, "--ray-address", address, "--placement", str(placement),
                     "--ready-timeout-s", "2", env=token_env)  # fmt: skip
    assert done.returncode == 1
    assert "no node of the Ray cluster can hold actor 'remote' asks for CPU 0.25, node2 0.01; waiting up to 2 s" in (
        done.stderr
    ), done.stderr[-3000:]
    assert "actor 'remote' asks for CPU 0.25, node2 0.01" in _one_line_error(done)


def test_sigterm_ends_a_serve_waiting_for_a_node(
    digits_bundle_dir: Path, tmp_path: Path, token_head: tuple[str, dict[str, str]]
) -> None:
    """While `serve` waits for a node that can hold its placement, SIGTERM still ends it."""
    address, token_env = token_head
    placement = tmp_path / "node2.json"
    subnets = [s["name"] for s in Bundle.load(digits_bundle_dir).subnet_infos]
    placement.write_text(json.dumps({"actors": [{"name": "remote", "subnets": subnets, "resources": {"node2": 1}}]}))
    cmd = [sys.executable, "-m", "dynaroute", "serve", str(digits_bundle_dir), "--port", "0", "--metrics-port", "0",
           "--ray-address", address, "--placement", str(placement), "--ready-timeout-s", "600"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=token_env)
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the test's timeout; ends if the process exits
            lines.append(line)
            if "waiting up to 600 s" in line:
                break
        assert "waiting up to 600 s" in lines[-1], "".join(lines)[-3000:]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode is not None and "Traceback" not in rest, rest[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- items 10 and 19: a local serve starts its own Ray, on loopback only ---------------------


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket that one of `pids` holds."""
    addresses: dict[str, str] = {}  # socket inode -> local address
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))  # the kernel's 32-bit words
            addresses[fields[9]] = str(ipaddress.ip_address(raw))
    found = []
    for pid in pids:
        try:
            links = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            m = re.fullmatch(r"socket:\[(\d+)\]", link)
            if m and m.group(1) in addresses:
                found.append((pid, addresses[m.group(1)]))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def test_local_serve_starts_its_own_ray_on_loopback(
    digits_bundle_dir: Path, example: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RAY_ADDRESS names a stopped cluster, as after a `ray start --head` that has gone: a plain
    # ray.init() would retry it for minutes. Without --ray-address, serve ignores it.
    for name in RAY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")
    server = ServerProcess.start(digits_bundle_dir, timeout_s=240)
    try:
        family = _descendants(server.proc.pid)
        names = {(Path(f"/proc/{p}/comm").read_text().strip() if Path(f"/proc/{p}").exists() else "") for p in family}
        assert "gcs_server" in names and "raylet" in names, names  # its own Ray, started by it
        sockets = _listening(family | {server.proc.pid})
        assert len(sockets) >= 4, sockets  # gRPC, metrics, GCS, raylet at least
        assert all(_is_loopback(a) for _, a in sockets), [s for s in sockets if not _is_loopback(s[1])]
        with Client(server.grpc_address, timeout_s=30) as client:
            assert client.infer(example, quality=0.5).outputs.confidence > 0
    finally:
        assert server.stop() == 0
    assert "serving model=" in server.output()


# ---- item 11: start-head.sh joins its own head ---------------------------------------------


def test_start_head_gateway_joins_its_own_head(
    digits_bundle_dir: Path, example: np.ndarray, tmp_path: Path, token_head: tuple[str, dict[str, str]]
) -> None:
    """Another cluster (token_head) runs on the machine, as another job's would: the gateway
    that start-head.sh starts joins the head the script started, and serves."""
    home = tmp_path / "home"
    home.mkdir()
    temp = Path(tempfile.mkdtemp(prefix="drs", dir="/tmp"))
    ray_port, grpc_port = _free_port(), _free_port()
    ports = {"--dashboard-agent-listen-port": _free_port(), "--runtime-env-agent-port": _free_port(),
             "--ray-client-server-port": _free_port(), "--dashboard-agent-grpc-port": _free_port()}  # fmt: skip
    env = clean_env(
        HOME=str(home),  # the script's token goes to $HOME/.ray, not the machine's
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        RAY_PORT=str(ray_port), GATEWAY_PORT=str(grpc_port), METRICS_PORT=str(_free_port()),
        RAY_METRICS_PORT=str(_free_port()), HEAD_NUM_CPUS="1", LOG=str(tmp_path / "gateway.log"),
        RAY_START_ARGS=f"--temp-dir {temp} --include-dashboard=false --disable-usage-stats "
        + " ".join(f"{k} {v}" for k, v in ports.items()),
    )  # fmt: skip
    script = subprocess.Popen(
        ["bash", str(REPO / "deploy" / "ray" / "start-head.sh"), str(digits_bundle_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    gateway = None
    try:
        out, _ = script.communicate(timeout=400)
        log = (tmp_path / "gateway.log").read_text(errors="replace") if (tmp_path / "gateway.log").exists() else ""
        assert script.returncode == 0, out[-3000:] + log[-3000:]
        m = re.search(r"gateway pid (\d+) serving on 127\.0\.0\.1:(\d+)", out)
        assert m, out[-3000:]
        gateway = int(m.group(1))
        argv = Path(f"/proc/{gateway}/cmdline").read_bytes().split(b"\0")
        assert b"--ray-address" in argv and argv[argv.index(b"--ray-address") + 1] == f"127.0.0.1:{ray_port}".encode()
        with Client(f"127.0.0.1:{grpc_port}", timeout_s=30) as client:
            assert client.infer(example, quality=0.5).outputs.confidence > 0
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
        if gateway is not None:
            os.kill(gateway, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while Path(f"/proc/{gateway}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        # The head `ray start` left running: every process of the script's session or temp dir.
        deadline = time.monotonic() + 30
        while (left := set(_pids_in_session(script.pid)) | set(_pids_mentioning(str(temp)))) and (
            time.monotonic() < deadline
        ):
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"processes of start-head.sh's cluster are still running: {left}"


# ---- item 18: infer and train refuse what they cannot use; files; pipes --------------------


def infer(server: ServerProcess, *args: str, **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
    return cli("infer", "--address", server.grpc_address, *args, **kwargs)


def test_infer_refuses_a_json_tensor_that_is_not_an_array(digits_server, tmp_path: Path, example) -> None:  # noqa: ANN001
    (tmp_path / "obj.json").write_text(json.dumps({"x": example.tolist()}))
    (tmp_path / "ragged.json").write_text(json.dumps([[1.0, 2.0], [3.0]]))
    for name, message in (("obj.json", "got an object"), ("ragged.json", "nested lists of one shape")):
        done = infer(digits_server, "--tensor", str(tmp_path / name))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "expected a JSON array of numbers" in done.stderr and message in done.stderr, done.stderr
    # The server keeps serving.
    (tmp_path / "x.json").write_text(json.dumps(example.tolist()))
    done = infer(digits_server, "--tensor", str(tmp_path / "x.json"))
    assert done.returncode == 0 and done.stdout.startswith("label: "), done.stderr


def test_infer_json_prints_int64_fields_as_numbers(digits_server, digits_bundle_dir: Path, tmp_path: Path,  # noqa: ANN001
                                                   example) -> None:  # noqa: ANN001
    np.save(tmp_path / "x.npy", example)
    done = infer(digits_server, "--tensor", str(tmp_path / "x.npy"), "--json")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert isinstance(reply["outputs"]["label"], int)
    for key in ("router_flops", "expert_flops", "total_flops", "full_flops"):
        assert isinstance(reply["cost"][key], int) and reply["cost"][key] >= 0, (key, reply["cost"])
    assert reply["cost"]["full_flops"] == Bundle.load(digits_bundle_dir).full_flops


def test_infer_into_a_closed_pipe_exits_quietly(digits_server, tmp_path: Path, example) -> None:  # noqa: ANN001
    np.save(tmp_path / "x.npy", example)
    cmd = [sys.executable, "-m", "dynaroute", "infer", "--address", digits_server.grpc_address,
           "--tensor", str(tmp_path / "x.npy")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    proc.stdout.close()  # as `| head` does once it has read enough: every write now fails (EPIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_train_refuses_options_of_the_other_task(tmp_path: Path) -> None:
    done = cli("train", "digits", "--out", str(tmp_path / "b"), "--data", str(tmp_path), "--max-length", "32")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--data, --max-length do not apply to `train digits`" in done.stderr
    done = cli("train", "sst2", "--out", str(tmp_path / "b"), "--paths", "2")
    assert done.returncode == 2 and "--paths do not apply to `train sst2`" in done.stderr, done.stderr
    done = cli("train", "--data", str(tmp_path / "d.csv"), "--out", str(tmp_path / "b"), "--max-length", "32")
    assert done.returncode == 2 and "--max-length do not apply to tabular data" in done.stderr, done.stderr
    done = cli("train", "--data", str(tmp_path / "d.tsv"), "--text-column", "t", "--out", str(tmp_path / "b"),
               "--hidden", "8")
    assert done.returncode == 2 and "--hidden do not apply to text data" in done.stderr, done.stderr
    assert not (tmp_path / "b").exists()


def test_bundle_weights_are_readable_by_others(digits_bundle_dir: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    files = sorted(digits_bundle_dir.glob("*.safetensors"))
    assert files
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, (f.name, oct(f.stat().st_mode))
