"""The command line in CI jobs and on shared hosts, run as subprocesses: one state directory
shared with the library, environment variables, jobs that queue for a state directory,
signals, the daemon it talks to, buildx's prune options, log-friendly progress, logging,
completion and registry credentials from helpers."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest

from pyctrd_cache import CachePolicy, Manager
from pyctrd_cache.client import DEFAULT_ADDRESS
from pyctrd_cache.oci import import_path
from tests.cli_runs import Cli, one_line_error
from tests.fix_containerd import Daemon, Managers
from tests.registry_fix import (
    PASSWORD,
    USER,
    Registry,
    ScriptedRegistry,
    TLSRegistry,
    _containerd_binary,
)

_ENV_VARS = (
    "CONTAINERD_ADDRESS",
    "CONTAINERD_NAMESPACE",
    "CONTAINERD_SNAPSHOTTER",
    "PYCTRD_CACHE_STATE_DIR",
    "PYCTRD_CACHE_LOCK_TIMEOUT",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS}
    env.update(extra)
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyctrd_cache", *args]


def run_env(
    env: Mapping[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args), env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def cli(daemon: Daemon, namespace: str, tmp_path: pathlib.Path) -> Cli:
    return Cli(daemon, namespace, tmp_path / "state")


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hello").write_text("hello\n")
    (root / "data.bin").write_bytes(os.urandom(200_000))
    return root


def imported(cm: Manager, tree: pathlib.Path, description: str) -> str:
    ref = import_path(cm, tree, description=description, cache_policy=CachePolicy.RETAIN)
    with ref:
        return ref.id


def cli_args(cli: Cli, *args: str) -> list[str]:
    return command(
        "--address",
        cli.daemon.address,
        "--namespace",
        cli.namespace,
        "--state-dir",
        str(cli.state),
        "--progress",
        "quiet",
        *args,
    )


# One state, one meaning.


def test_the_library_and_the_command_line_share_one_state_directory(
    managers: Managers, cli: Cli, tree: pathlib.Path
) -> None:
    cm = managers.open(cli.state)
    made_by_script = imported(cm, tree, "script")
    cm.close()
    assert [r["id"] for r in cli.json("ls")["records"]] == [made_by_script]

    made_by_cli = cli.ok("import", str(tree), "--description", "cli").strip()
    cm = managers.open(cli.state)
    assert {r.info.id for r in cm.records()} == {made_by_script, made_by_cli}
    assert not (cli.state / "cache").exists()


def test_a_store_in_the_old_command_line_place_moves_up(
    managers: Managers, cli: Cli, tree: pathlib.Path
) -> None:
    cm = managers.open(cli.state / "cache")
    old = imported(cm, tree, "made before the move")
    manager_id = (cli.state / "cache" / "manager-id").read_text()
    cm.close()

    moved = cli("ls", "--format", "json")
    assert moved.returncode == 0, moved.stderr
    assert moved.stderr == (
        f"pyctrd-cache: moved the metadata store {cli.state / 'cache' / 'metadata.db'} "
        f"up to {cli.state / 'metadata.db'}\n"
    )
    assert [r["id"] for r in json.loads(moved.stdout)["records"]] == [old]
    assert not (cli.state / "cache").exists()
    assert (cli.state / "manager-id").read_text() == manager_id
    cm = managers.open(cli.state)
    with cm.get(old) as ref, ref.mount() as root:
        assert (root / "etc" / "hello").read_text() == "hello\n"


def test_two_stores_in_both_places_are_refused_not_merged(
    managers: Managers, cli: Cli, tree: pathlib.Path
) -> None:
    for state in (cli.state, cli.state / "cache"):
        cm = managers.open(state)
        imported(cm, tree, str(state))
        cm.close()
    one_line_error(cli("ls"), "two metadata stores", str(cli.state / "cache"))
    assert (cli.state / "cache" / "metadata.db").exists()


def test_environment_variables_as_the_ecosystem_uses_them(
    daemon: Daemon, namespace: str, tmp_path: pathlib.Path, tree: pathlib.Path
) -> None:
    env = clean_env(
        CONTAINERD_ADDRESS=daemon.address,
        CONTAINERD_NAMESPACE=namespace,
        CONTAINERD_SNAPSHOTTER="native",
        PYCTRD_CACHE_STATE_DIR=str(tmp_path / "from-env"),
    )
    out = run_env(env, "info", "--format", "json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["address"], info["namespace"], info["snapshotter"]) == (
        daemon.address,
        namespace,
        "native",
    )
    out = run_env(env, "--progress", "quiet", "import", str(tree))
    assert out.returncode == 0, out.stderr
    record = out.stdout.strip()
    assert (tmp_path / "from-env" / "metadata.db").exists()
    with Manager.open(
        daemon.address, namespace=namespace, snapshotter="native", state_dir=tmp_path / "from-env"
    ) as cm:
        assert [r.info.id for r in cm.records()] == [record]
        cm.prune()

    help_text = run_env(clean_env(), "--help").stdout
    for variable in _ENV_VARS:
        assert f"${variable}" in help_text, variable


# Jobs that run at the same time.


def _stderr_line_with(process: subprocess.Popen[str], fragment: str, timeout: float) -> str:
    """The first line of the process's stderr that holds `fragment`."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.2)
        if not ready:
            if process.poll() is not None:
                break
            continue
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if fragment in line:
            return line
    raise AssertionError(f"no stderr line with {fragment!r} in {seen}")


def test_a_second_job_runs_beside_the_first_and_waits_only_for_an_exclusive_holder(
    managers: Managers, cli: Cli, tree: pathlib.Path
) -> None:
    holder = managers.open(cli.state)
    record = imported(holder, tree, "held")
    held = holder.get(record)
    # No queueing behind an open manager: the job runs at once and sees the handle.
    quick = cli("--lock-timeout", "0", "ls")
    assert quick.returncode == 0, quick.stderr
    assert quick.stdout.split()[0] == record
    assert "in-use" in quick.stdout.split()
    held.release()
    holder.close()

    # A process holding the directory exclusively (as a single-process version does while
    # open) is waited for.
    fd = os.open(cli.state / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, f"{os.getpid()} old pyctrd-cache\n".encode(), 0)
        one_line_error(cli("--lock-timeout", "0", "ls"), "is in use", f"pid {os.getpid()}")
        waiting = subprocess.Popen(
            cli_args(cli, "--lock-timeout", "60s", "ls"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = _stderr_line_with(waiting, "waiting up to 60s", timeout=60)
            assert f"pid {os.getpid()}" in line
            assert waiting.poll() is None
            fcntl.flock(fd, fcntl.LOCK_UN)
            stdout, stderr = waiting.communicate(timeout=60)
        finally:
            waiting.kill()
            waiting.wait()
    finally:
        os.close(fd)
    assert waiting.returncode == 0, stderr
    assert stdout.split()[0] == record


def test_two_jobs_on_one_state_directory_both_succeed(cli: Cli, tree: pathlib.Path) -> None:
    jobs = [
        subprocess.Popen(
            cli_args(cli, "import", str(tree), "--description", f"job {n}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    ids = []
    for job in jobs:
        stdout, stderr = job.communicate(timeout=120)
        assert job.returncode == 0, stderr
        ids.append(stdout.strip())
    assert sorted(r["id"] for r in cli.json("ls")["records"]) == sorted(ids)


def _daemon_processes(root: pathlib.Path) -> list[int]:
    """Processes whose command line names `root` (the private containerd's config)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(root) in cmdline and "containerd" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_pull_stops_the_private_daemon_and_leaves_no_record(
    daemon: Daemon,
    scripted_registry: ScriptedRegistry,
    tmp_path: pathlib.Path,
    signum: int,
    status: int,
) -> None:
    binary = _containerd_binary(daemon)
    assert binary is not None
    asked = threading.Event()
    release = threading.Event()

    def stall(handler: Any) -> None:
        asked.set()
        release.wait(120)

    scripted_registry.routes["team/app/manifests/1"] = stall
    state = tmp_path / "state"
    base = ["--embedded", "--containerd-binary", binary, "--state-dir", str(state)]
    pulling = subprocess.Popen(
        command(*base, "pull", scripted_registry.ref("team/app:1"), "--insecure"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert asked.wait(60), "the command never asked the registry"
        assert _daemon_processes(state / "containerd"), "no private containerd ran"
        pulling.send_signal(signum)
        stdout, stderr = pulling.communicate(timeout=60)
    finally:
        release.set()
        pulling.kill()
        pulling.wait()
    assert pulling.returncode == status, stderr
    assert stdout == ""
    assert _daemon_processes(state / "containerd") == []
    after = run_env(clean_env(), *base, "ls", "--format", "json")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["records"] == []


# Never the wrong daemon in silence.


def test_a_default_socket_that_does_not_answer_is_an_error(tmp_path: pathlib.Path) -> None:
    """In a mount namespace of its own, a socket at the default address that accepts and
    never answers: the command fails naming it, and starts no private daemon."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed for this test")
    inner = textwrap.dedent(
        f"""
        import json, socket, subprocess, sys
        s = socket.socket(socket.AF_UNIX)
        s.bind({DEFAULT_ADDRESS!r})
        s.listen(16)
        done = subprocess.run(
            {command("--state-dir", str(tmp_path / "state"), "du", "--format", "json")!r},
            capture_output=True, text=True, timeout=150,
        )
        print(json.dumps([done.returncode, done.stdout, done.stderr]))
        """
    )
    script = (
        f"mount -t tmpfs tmpfs /run && mkdir -p {os.path.dirname(DEFAULT_ADDRESS)} && "
        f"exec {sys.executable} -c {_shell_quote(inner)}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    returncode, stdout, stderr = json.loads(done.stdout)
    assert returncode == 1
    assert stdout == ""
    assert "private containerd" not in stderr
    assert stderr.startswith("pyctrd-cache: error: ")
    assert DEFAULT_ADDRESS in stderr
    assert not (tmp_path / "state" / "containerd").exists()


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def test_every_json_document_names_its_daemon(cli: Cli, tree: pathlib.Path) -> None:
    record = cli.ok("import", str(tree)).strip()
    for args in (["info"], ["du"], ["ls"], ["inspect", record], ["prune", "--all"]):
        document = json.loads(cli.ok(*args, "--format", "json"))
        cli.check_daemon(document["daemon"])


# Parity with buildx and buildctl.


def _three_records(managers: Managers, cli: Cli, tree: pathlib.Path) -> list[tuple[str, int]]:
    """Three unused records, oldest first, with their sizes."""
    cm = managers.open(cli.state)
    ids = []
    for n in range(3):
        ref = import_path(cm, tree, description=f"r{n}")
        with ref:
            ref.finalize()
            ids.append(ref.id)
        time.sleep(0.01)
    sizes = {u.id: u.size for u in cm.disk_usage()}
    cm.close()
    return [(i, sizes[i]) for i in ids]


@pytest.mark.parametrize("option", ["--reserved-space", "--keep-storage", "--max-used-space"])
def test_prune_keeps_the_most_recent_records_within_the_size(
    managers: Managers, cli: Cli, tree: pathlib.Path, option: str
) -> None:
    records = _three_records(managers, cli, tree)
    newest_size = records[-1][1]
    removed = cli.json("prune", option, f"{newest_size}B")["removed"]
    assert [r["id"] for r in removed] == [records[0][0], records[1][0]]
    assert [r["id"] for r in cli.json("ls")["records"]] == [records[2][0]]


def test_prune_verbose_ls_quiet_and_inspect_table(
    managers: Managers, cli: Cli, tree: pathlib.Path
) -> None:
    records = _three_records(managers, cli, tree)
    assert cli.ok("ls", "-q").split() == [r[0] for r in records]
    table = cli.ok("inspect", records[0][0], "--format", "table").splitlines()
    assert f"Id:             {records[0][0]}" in table
    assert "Description:    r0" in table
    verbose = cli.ok("prune", "-v", "--filter", "description==r1").splitlines()
    assert f"ID:             {records[1][0]}" in verbose
    assert "Description:    r1" in verbose
    assert verbose[-1].split()[0] == "Total:"


def test_help_describes_sizes_as_buildx_reads_them() -> None:
    out = run_env(clean_env(), "prune", "--help")
    assert out.returncode == 0
    assert "10GB is 10GiB" in " ".join(out.stdout.split())


# Progress for logs, logging, completion.


def test_progress_plain_writes_one_line_per_layer_event(cli: Cli, tree: pathlib.Path) -> None:
    record = cli.ok("import", str(tree)).strip()
    layout = cli.state.parent / "layout"
    args = cli_args(cli, "--progress", "plain", "export", record, "--oci-layout", str(layout))
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr
    lines = out.stderr.splitlines()
    assert any(" done " in line and line.endswith("/s") for line in lines), lines


def test_debug_shows_the_library_log(cli: Cli, tree: pathlib.Path) -> None:
    cli.ok("import", str(tree))
    quiet = cli("prune", "--all")
    assert quiet.returncode == 0
    assert "pyctrd_cache" not in quiet.stderr
    cli.ok("import", str(tree))
    debug = cli("--debug", "prune", "--all")
    assert debug.returncode == 0, debug.stderr
    assert "DEBUG pyctrd_cache.manager: asking containerd to collect garbage" in debug.stderr


def test_completion_script_names_the_commands() -> None:
    out = run_env(clean_env(), "completion", "bash")
    assert out.returncode == 0, out.stderr
    for word in ("prune", "--reserved-space", "--lock-timeout", "--progress"):
        assert word in out.stdout


# Private registries: credential helpers and podman's auth file.


@pytest.fixture
def helper_bin(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory with `docker-credential-pyctrdtest`, which answers for one host only and
    logs each host it was asked about."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-pyctrdtest"
    helper.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import json, os, sys
            host = sys.stdin.read().strip()
            with open(os.path.join(os.path.dirname(__file__), "asked"), "a") as log:
                log.write(host + "\\n")
            if sys.argv[1:] != ["get"] or host != os.environ["PYCTRD_TEST_HELPER_HOST"]:
                print("credentials not found in native keychain")
                sys.exit(1)
            print(json.dumps({{"ServerURL": host, "Username": {USER!r},
                              "Secret": os.environ["PYCTRD_TEST_HELPER_SECRET"]}}))
            """
        )
    )
    helper.chmod(0o755)
    return bin_dir


def _push_env(tmp_path: pathlib.Path, bin_dir: pathlib.Path, **extra: str) -> dict[str, str]:
    return clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        DOCKER_CONFIG=str(tmp_path / "docker"),
        REGISTRY_AUTH_FILE=str(tmp_path / "no-auth.json"),
        **extra,
    )


@pytest.mark.parametrize("key", ["credHelpers", "credsStore"])
def test_push_with_credentials_from_a_helper(
    cli: Cli,
    tree: pathlib.Path,
    basic_registry: Registry,
    tmp_path: pathlib.Path,
    helper_bin: pathlib.Path,
    key: str,
) -> None:
    record = cli.ok("import", str(tree)).strip()
    (tmp_path / "docker").mkdir()
    config: dict[str, Any] = (
        {"credHelpers": {basic_registry.host: "pyctrdtest"}}
        if key == "credHelpers"
        else {"credsStore": "pyctrdtest"}
    )
    (tmp_path / "docker" / "config.json").write_text(json.dumps(config))
    target = basic_registry.ref(f"team/helper-{key.lower()}:1")
    base = cli_args(cli, "push", record, target, "--insecure")[3:]

    wrong = run_env(
        _push_env(
            tmp_path,
            helper_bin,
            PYCTRD_TEST_HELPER_HOST=basic_registry.host,
            PYCTRD_TEST_HELPER_SECRET="wrong",
        ),
        *base,
    )
    one_line_error(wrong, target)
    right = run_env(
        _push_env(
            tmp_path,
            helper_bin,
            PYCTRD_TEST_HELPER_HOST=basic_registry.host,
            PYCTRD_TEST_HELPER_SECRET=PASSWORD,
        ),
        *base,
    )
    assert right.returncode == 0, right.stderr
    assert right.stdout.startswith("sha256:")
    assert basic_registry.host in (helper_bin / "asked").read_text().split()
    assert PASSWORD not in right.stderr + wrong.stderr


def test_push_with_credentials_from_podmans_auth_file(
    cli: Cli, tree: pathlib.Path, basic_registry: Registry, tmp_path: pathlib.Path
) -> None:
    import base64

    record = cli.ok("import", str(tree)).strip()
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {basic_registry.host: {"auth": encoded}}}))
    target = basic_registry.ref("team/authfile:1")
    base = cli_args(cli, "push", record, target, "--insecure")[3:]
    env = clean_env(DOCKER_CONFIG=str(tmp_path / "no-docker"))
    one_line_error(run_env(env, *base), target)
    env["REGISTRY_AUTH_FILE"] = str(auth_file)
    pushed = run_env(env, *base)
    assert pushed.returncode == 0, pushed.stderr


# TLS: the system's trust store, an extra CA file, plain HTTP for a host the user names.


def test_https_registry_needs_its_ca_unless_the_system_trusts_it(
    cli: Cli, tree: pathlib.Path, tls_registry: TLSRegistry
) -> None:
    record = cli.ok("import", str(tree)).strip()
    target = tls_registry.registry.ref("team/tls:1")
    refused = cli("push", record, target)
    one_line_error(refused, "CERTIFICATE_VERIFY_FAILED")
    pushed = cli("push", record, target, "--ca-file", str(tls_registry.ca_file))
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.startswith("sha256:")
    one_line_error(cli("push", record, target, "--ca-file", str(tree / "etc" / "hello")), "CA file")


def test_plain_http_only_for_a_host_the_user_names(
    cli: Cli, tree: pathlib.Path, elsewhere_registry: Registry
) -> None:
    record = cli.ok("import", str(tree)).strip()
    target = elsewhere_registry.ref("team/plain:1")
    one_line_error(cli("push", record, target, "--insecure"), "only on loopback hosts")
    pushed = cli("push", record, target, "--plain-http")
    assert pushed.returncode == 0, pushed.stderr
    pulled = cli("pull", target, "--plain-http")
    assert pulled.returncode == 0, pulled.stderr
