#!/usr/bin/env python3
"""Run kdjax on Cloud TPU VMs: create, setup, run, logs, fetch-results, stop, status, delete.

Every gcloud command line is built by `gcloud()` below and nowhere else; each
subcommand builds a list of argv lists and `execute()` either runs them in
order or, with --dry-run, prints them (shell-quoted, one per line) without
running anything. The builders are pure functions of the parsed arguments, so
tests/launch/test_launch.py checks them without gcloud or a network.

Usage, from the repository root (see launch/README.md for the walkthrough):

  python launch/tpu.py create --name=kd --zone=us-west4-a \\
      --accelerator-type=v5litepod-8 --spot
  python launch/tpu.py setup  --name=kd --zone=us-west4-a
  python launch/tpu.py run    --name=kd --zone=us-west4-a \\
      --accelerator-type=v5litepod-8 \\
      --config=configs/fashion_mnist.py --preset=smoke \\
      --run-name=fmnist --workdir=gs://BUCKET/kdjax/fmnist \\
      --config.FIELD=VALUE
  python launch/tpu.py logs   --name=kd --zone=us-west4-a --run-name=fmnist
  python launch/tpu.py fetch-results --name=kd --zone=us-west4-a \\
      --run-name=fmnist --workdir=gs://BUCKET/kdjax/fmnist
                                              # -> kdjax-results/fmnist/
  python launch/tpu.py delete --name=kd --zone=us-west4-a

The workdir (checkpoints, metrics, TensorBoard, the report) is best a Cloud
Storage path gs://BUCKET/PATH: every worker reaches it, and it outlives the
VM (setup installs kdjax with its 'gcs' extra, gcsfs). Otherwise it is a path
on the workers: on one host the default is ~/kdjax-runs/RUN_NAME on the VM's
disk; a multi-host slice needs an absolute path on a filesystem mounted at
that path on every worker (e.g. Filestore).

--name, --zone, --project and --accelerator-type default to the environment
variables KDJAX_TPU_NAME, KDJAX_TPU_ZONE, KDJAX_TPU_PROJECT and KDJAX_TPU_TYPE.

Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import pathlib
import posixpath
import re
import shlex
import subprocess
import sys
from typing import Optional, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# The chip table is kdjax's (standard library only, no jax needed here).
sys.path.insert(0, str(REPO_ROOT))
from kdjax.core import tpu_chips  # pylint: disable=g-import-not-at-top,wrong-import-position

GCLOUD = "gcloud"  # The executable; referenced only by gcloud().

# Layout on every worker, relative to the remote $HOME.
REMOTE_REPO = "kdjax"  # The source tree (cloned or copied).
REMOTE_VENV = "kdjax-venv"  # The Python environment kdjax is installed in.
REMOTE_LOGS = "kdjax-logs"  # <run-name>.log and <run-name>.pid per worker.
REMOTE_RUNS = "kdjax-runs"  # Default single-host workdirs: ~/kdjax-runs/<run-name>.
LOCAL_RESULTS = "kdjax-results"  # fetch-results default: ./kdjax-results/<run-name>.
REPORT_GLOB = "report.*"  # report.json, report.md, report.png (kdjax.run.report).
# setup installs kdjax with this extra: gcsfs, for gs:// workdirs.
KDJAX_EXTRAS = "gcs"

# jax 0.10 needs Python >= 3.11; the TPU VM images ship Python 3.10, so setup
# makes a virtualenv with uv (which fetches a Python build when needed).
DEFAULT_PYTHON = "3.11"
FALLBACK_JAX_VERSION = "0.10.2"  # Used only if setup.py cannot be read.

# The run step preloads jemalloc when it is installed: glibc malloc maps and
# unmaps every large temporary each step (benchmarks/README.md); without
# jemalloc the run goes on with the default allocator.
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
)
MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"

# Default runtime (VM image) per TPU generation, from the one chip table.
RUNTIME_VERSIONS = {g: c.runtime_version for g, c in tpu_chips.CHIPS.items()}

_ENV = {
    "name": "KDJAX_TPU_NAME",
    "zone": "KDJAX_TPU_ZONE",
    "project": "KDJAX_TPU_PROJECT",
    "accelerator_type": "KDJAX_TPU_TYPE",
}


class LaunchError(Exception):
  """A problem with the arguments; the message says what to change."""


# --------------------------------------------------------------------------
# TPU types
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A Cloud TPU accelerator type such as v5litepod-16 or v4-32."""

  name: str
  generation: str  # v2, v3, v4, v5e, v5p, v6e
  size: int  # The number in the type's name.

  @property
  def chips(self) -> int:
    return tpu_chips.chips_in_type(self.generation, self.size)

  @property
  def hosts(self) -> int:
    """Number of TPU VM workers (processes in a kdjax run)."""
    if tpu_chips.CHIPS[self.generation].type_counts_cores:
      return max(1, self.chips // 4)
    return 1 if self.chips <= 8 else self.chips // 4

  @property
  def multi_host(self) -> bool:
    return self.hosts > 1

  @property
  def runtime_version(self) -> str:
    return RUNTIME_VERSIONS[self.generation]

  @property
  def topology(self) -> Optional[str]:
    """Topology name for the AOT check, e.g. 'v5e:2x4', 'v4:2x2x1'."""
    return tpu_chips.topology(self.generation, self.chips)


def parse_accelerator(name: str) -> Accelerator:
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name or "")
  # v5e types are spelled v5litepod-N: the chip table's prefix, not the name.
  generation = tpu_chips.generation_of_prefix(m.group(1)) if m else None
  if generation is None:
    hint = ""
    if m and m.group(1) == "v5e":
      hint = f" (v5e types are spelled v5litepod-N, e.g. v5litepod-{m.group(2)})"
    raise LaunchError(
        f"unknown --accelerator-type={name!r}{hint}; expected one of "
        + ", ".join(f"{c.type_prefix}-N" for c in tpu_chips.CHIPS.values())
        + ", e.g. v5litepod-8 (one host), v5litepod-16 or v4-32 (multi-host)")
  return Accelerator(name, generation, int(m.group(2)))


def pinned_jax_version() -> str:
  """The jax version pinned in setup.py (so the TPU install matches it)."""
  try:
    text = (REPO_ROOT / "setup.py").read_text()
  except OSError:
    return FALLBACK_JAX_VERSION
  m = re.search(r"""["']jax==([0-9][^"']*)["']""", text)
  return m.group(1) if m else FALLBACK_JAX_VERSION


# --------------------------------------------------------------------------
# Command builders (pure: argparse.Namespace -> argv lists)
# --------------------------------------------------------------------------


def gcloud(*args: str, project: Optional[str] = None) -> list[str]:
  """The one place a gcloud command line is built."""
  cmd = [GCLOUD, *args]
  if project:
    cmd.append(f"--project={project}")
  return cmd


def _tpu_vm(a, verb: str, *args: str) -> list[str]:
  return gcloud("compute", "tpus", "tpu-vm", verb, *args, project=a.project)


def _queued(a, verb: str, *args: str) -> list[str]:
  return gcloud("compute", "tpus", "queued-resources", verb, *args,
                project=a.project)


def ssh(a, remote_command: str, worker: str = "all") -> list[str]:
  """Runs a shell command line on the given worker(s) of the TPU VM."""
  return _tpu_vm(a, "ssh", a.name, f"--zone={a.zone}", f"--worker={worker}",
                 f"--command={remote_command}")


def scp(a, src: str, dst: str, worker: str = "all",
        recurse: bool = False) -> list[str]:
  """Copies files; the remote side is written NAME:PATH (PATH from $HOME)."""
  extra = ["--recurse"] if recurse else []
  return _tpu_vm(a, "scp", src, dst, f"--zone={a.zone}", f"--worker={worker}",
                 *extra)


def qr_id(a) -> str:
  return a.queued_resource_id or f"{a.name}-qr"


def create_commands(a) -> list[list[str]]:
  accel = parse_accelerator(a.accelerator_type)
  version = a.runtime_version or accel.runtime_version
  capacity = ["--spot"] if a.spot else ["--reserved"] if a.reserved else []
  if a.queued:
    extra = []
    if a.valid_until_duration:
      extra.append(f"--valid-until-duration={a.valid_until_duration}")
    return [_queued(a, "create", qr_id(a), f"--node-id={a.name}",
                    f"--zone={a.zone}", f"--accelerator-type={accel.name}",
                    f"--runtime-version={version}", *capacity, *extra)]
  if a.valid_until_duration:
    raise LaunchError("--valid-until-duration applies to queued resources; "
                      "add --queued or drop it")
  return [_tpu_vm(a, "create", a.name, f"--zone={a.zone}",
                  f"--accelerator-type={accel.name}", f"--version={version}",
                  *capacity)]


def _aot_available() -> bool:
  """True when the ahead-of-time check module kdjax.aot can be imported."""
  root = str(REPO_ROOT)
  added = root not in sys.path
  if added:
    sys.path.insert(0, root)
  try:
    return importlib.util.find_spec("kdjax.aot") is not None
  except ImportError:
    return False
  finally:
    if added:
      sys.path.remove(root)


def check_command(a) -> Optional[list[str]]:
  """The local AOT-compile check run before `create`, or None to skip it.

  Skipped with --skip-check, without --config, or when this script runs
  without the kdjax source beside it (kdjax.aot not found). Otherwise: `python -m kdjax.main --config=...
  --config.mode=aot_check --config.aot.topology=...` plus the same
  --config.* overrides the run will use, from the repository root.
  """
  if a.skip_check:
    return None
  if not a.config:
    _note("no --config given: skipping the ahead-of-time check "
          "(pass the run's --config/--preset to check that it fits)")
    return None
  if not _aot_available():
    _note("kdjax.aot not available: skipping the ahead-of-time check")
    return None
  topology = a.topology or parse_accelerator(a.accelerator_type).topology
  if not topology:
    raise LaunchError(
        f"no default AOT topology for {a.accelerator_type}; pass "
        "--topology=GEN:SHAPE (e.g. v5e:2x4) or --skip-check")
  return [sys.executable, "-m", "kdjax.main", f"--config={config_spec(a)}",
          "--config.mode=aot_check", f"--config.aot.topology={topology}",
          *a.overrides]


def _home(path: str) -> str:
  """A double-quoted shell word for $HOME/path (path has no special chars)."""
  return f'"$HOME/{path}"'


def setup_script(a, git_url: Optional[str]) -> str:
  """The shell command line setup runs on every worker."""
  venv_python = _home(f"{REMOTE_VENV}/bin/python")
  jax_spec = f"jax[tpu]=={a.jax_version}"
  apt = "sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300"
  steps = [
      "set -e",
      f"({apt} update -qq && {apt} install -y -qq libjemalloc2) || "
      "echo 'kdjax setup: libjemalloc2 not installed; runs will use the "
      "default allocator' >&2",
  ]
  if git_url:
    branch = [f"--branch={a.ref}"] if a.ref else []
    steps.append(f"rm -rf {_home(REMOTE_REPO)}")
    steps.append(shlex.join(["git", "clone", "--depth=1", *branch, git_url])
                 + " " + _home(REMOTE_REPO))
  steps += [
      "python3 -m pip install --user -q uv || "
      "python3 -m pip install --user -q --break-system-packages uv",
      f"[ -x {venv_python} ] || python3 -m uv venv --seed "
      f"--python={shlex.quote(a.python)} {_home(REMOTE_VENV)}",
      f"{venv_python} -m pip install -q {shlex.quote(jax_spec)}",
      f"cd {_home(REMOTE_REPO)}",
      f"{venv_python} -m pip install -q -e "
      + shlex.quote(f".[{KDJAX_EXTRAS}]"),
      f"{venv_python} -c "
      + shlex.quote('import jax, kdjax, socket; '
                    'print(socket.gethostname(), "kdjax ready, jax", '
                    'jax.__version__)'),
  ]
  return "; ".join(steps)


def _is_git_url(source: str) -> bool:
  return bool(re.match(r"(https?|git|ssh)://|git@", source)) or (
      source.endswith(".git") and not os.path.isdir(source))


def setup_commands(a) -> list[list[str]]:
  if _is_git_url(a.source):
    return [ssh(a, setup_script(a, git_url=a.source))]
  if a.ref:
    raise LaunchError("--ref applies to a git URL --source; a local path is "
                      "copied as it is")
  if not os.path.isdir(a.source):
    raise LaunchError(f"--source={a.source!r} is neither a git URL nor a "
                      "local directory")
  return [
      ssh(a, f"rm -rf {_home(REMOTE_REPO)}"),
      scp(a, os.path.abspath(a.source), f"{a.name}:{REMOTE_REPO}",
          recurse=True),
      ssh(a, setup_script(a, git_url=None)),
  ]


def config_spec(a) -> str:
  """configs/x.py plus ':preset' when one is given."""
  if a.preset:
    if ":" in a.config:
      raise LaunchError(f"--config={a.config} already names a preset; "
                        f"drop --preset={a.preset} or the ':' part")
    return f"{a.config}:{a.preset}"
  return a.config


def default_workdir(run_name: str) -> str:
  return f"~/{REMOTE_RUNS}/{run_name}"


def workdir_of(a) -> str:
  """--workdir, or the single-host default ~/kdjax-runs/RUN_NAME."""
  return a.workdir or default_workdir(a.run_name)


def is_bucket(workdir: str) -> bool:
  return workdir.startswith("gs://")


def check_workdir(a, accel: Optional[Accelerator], warn: bool = True) -> str:
  """Refuses workdirs kdjax cannot use on the workers; returns the workdir.

  accel is None when the slice size is unknown (fetch-results): then only
  the checks that hold for every slice are made. Whether a gs:// bucket
  exists and the VM may write it, kdjax checks when it starts.
  """
  workdir = workdir_of(a)
  if "://" in workdir:
    bucket, _, path = workdir[len("gs://"):].partition("/")
    if not is_bucket(workdir) or not bucket or not path.strip("/"):
      raise LaunchError(
          f"--workdir={workdir}: a URL workdir must be a Cloud Storage path "
          "gs://BUCKET/PATH, e.g. --workdir=gs://BUCKET/kdjax/"
          f"{a.run_name}")
    return workdir
  multi = accel is not None and accel.multi_host
  if multi and a.workdir is None:
    raise LaunchError(
        f"{accel.name} has {accel.hosts} hosts: pass --workdir=gs://BUCKET/"
        "PATH, or an absolute path on a filesystem mounted at that path on "
        "every worker (e.g. a Filestore NFS share); there is no default")
  if multi and not workdir.startswith("/"):
    raise LaunchError(
        f"--workdir={workdir}: {accel.name} has {accel.hosts} hosts, so the "
        "workdir must be gs://BUCKET/PATH or an absolute path (e.g. "
        "/mnt/kdjax/RUN) on a filesystem mounted at that same path on every "
        "worker; a relative or ~ path is each worker's own disk")
  if not (workdir.startswith("/") or workdir == "~"
          or workdir.startswith("~/")):
    raise LaunchError(
        f"--workdir={workdir}: pass an absolute path or ~/PATH (on the "
        f"workers), e.g. --workdir=~/{REMOTE_RUNS}/{a.run_name}; a relative "
        f"path would land in ~/{REMOTE_REPO}, which setup replaces")
  if multi and warn:
    _note(f"warning: --workdir={workdir} must be shared storage mounted at "
          f"this path on all {accel.hosts} workers (e.g. a Filestore NFS "
          "share, or use --workdir=gs://BUCKET/PATH): Orbax checkpoints from "
          "every process must land in one place, and the same run command "
          "must find them after a preemption. This is not checked here.")
  return workdir


def _remote_word(path: str) -> str:
  """A shell word for path on a worker: ~ and ~/x expand to the remote $HOME."""
  if path == "~":
    return '"$HOME"'
  if path.startswith("~/"):
    return '"$HOME"/' + shlex.quote(path[2:])
  return shlex.quote(path)


def _scp_path(path: str) -> str:
  """path as the remote side of scp, where relative means from $HOME."""
  if path == "~":
    return "."
  return path[2:] if path.startswith("~/") else path


def run_script(a) -> str:
  """The shell command line run starts on every worker."""
  log = _home(f"{REMOTE_LOGS}/{a.run_name}.log")
  pid = _home(f"{REMOTE_LOGS}/{a.run_name}.pid")
  command = " ".join([
      _home(f"{REMOTE_VENV}/bin/python"),
      shlex.join(["-m", "kdjax.main", f"--config={config_spec(a)}"]),
      "--workdir=" + _remote_word(workdir_of(a)),
      *(shlex.quote(o) for o in a.overrides)])
  jemalloc = (
      "for f in " + " ".join(shlex.quote(p) for p in JEMALLOC_PATHS)
      + '; do if [ -f "$f" ]; then export LD_PRELOAD="$f${LD_PRELOAD:+:$LD_PRELOAD}"'
      f" MALLOC_CONF={MALLOC_CONF}; break; fi; done")
  return "; ".join([
      "set -e",
      f"cd {_home(REMOTE_REPO)}",
      f"mkdir -p {_home(REMOTE_LOGS)}",
      f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
      f'echo "kdjax ({a.run_name}) is still running on $(hostname) '
      f'(pid $(cat {pid})); stop it first: launch/tpu.py stop" >&2; exit 1; fi',
      jemalloc,
      f'echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) '
      f'LD_PRELOAD=${{LD_PRELOAD:-none}}" >> {log}',
      # One statement: a ';' may not follow '&'.
      f"setsid nohup {command} >> {log} 2>&1 < /dev/null & echo $! > {pid}",
      f'echo "kdjax ({a.run_name}) started on $(hostname), pid $(cat {pid}), '
      f'log ~/{REMOTE_LOGS}/{a.run_name}.log"',
  ])


def run_commands(a) -> list[list[str]]:
  accel = parse_accelerator(a.accelerator_type)
  workdir = check_workdir(a, accel)
  if not accel.multi_host and not is_bucket(workdir):
    _note(f"workdir {workdir} is on the VM's own disk, which goes away when "
          "the VM is deleted (a preempted spot VM cannot be restarted): "
          "copy the report with `launch/tpu.py fetch-results"
          + ("" if a.workdir is None else f" --workdir={workdir}")
          + ("" if a.run_name == "run" else f" --run-name={a.run_name}")
          + "` before `delete`")
  if is_bucket(workdir):
    _note(f"kdjax first checks that the VM may write {workdir} (its service "
          "account needs e.g. roles/storage.objectUser on the bucket); if "
          "not, the run stops at once and `launch/tpu.py logs"
          + ("" if a.run_name == "run" else f" --run-name={a.run_name}")
          + "` says why")
  return [ssh(a, run_script(a), worker="all")]


def logs_commands(a) -> list[list[str]]:
  remote_log = f"{REMOTE_LOGS}/{a.run_name}.log"
  if a.fetch is None:
    worker = a.worker or "0"
    tail = f"tail -n {a.lines} -F {_home(remote_log)}"
    if not worker.isdigit():  # Several workers: say which line is whose.
      tail += ' | sed -u "s/^/[$(hostname)] /"'
    return [ssh(a, tail, worker=worker)]
  if a.worker is None or a.worker == "all":
    if not a.accelerator_type:
      raise LaunchError("logs --fetch needs --accelerator-type (or "
                        "KDJAX_TPU_TYPE) to know the number of workers, "
                        "or --worker=N for one worker")
    workers = range(parse_accelerator(a.accelerator_type).hosts)
  elif a.worker.isdigit():
    workers = [int(a.worker)]
  else:
    raise LaunchError(f"logs --fetch takes --worker=N or --worker=all, "
                      f"not {a.worker!r}")
  return [scp(a, f"{a.name}:{remote_log}",
              os.path.join(a.fetch, f"{a.run_name}-worker{i}.log"),
              worker=str(i)) for i in workers]


def fetch_results_commands(a) -> list[list[str]]:
  """Copies WORKDIR/report.* to --dest (default kdjax-results/RUN).

  From the bucket with `gcloud storage cp` for a gs:// workdir (the VM need
  not exist any more), else from worker 0 with scp.
  """
  accel = (parse_accelerator(a.accelerator_type) if a.accelerator_type
           else None)
  workdir = check_workdir(a, accel, warn=False)
  if is_bucket(workdir):
    return [gcloud("storage", "cp",
                   posixpath.join(workdir.rstrip("/"), REPORT_GLOB),
                   dest_of(a), project=a.project)]
  remote = posixpath.join(_scp_path(workdir), REPORT_GLOB)
  return [scp(a, f"{a.name}:{remote}", dest_of(a), worker="0")]


def dest_of(a) -> str:
  return a.dest or os.path.join(LOCAL_RESULTS, a.run_name)


def stop_commands(a) -> list[list[str]]:
  pid = _home(f"{REMOTE_LOGS}/{a.run_name}.pid")
  return [ssh(a, f'if [ -f {pid} ] && kill -TERM "$(cat {pid})" 2>/dev/null; '
                 f'then echo "sent SIGTERM to kdjax ({a.run_name}) on $(hostname)"; '
                 f'else echo "kdjax ({a.run_name}) is not running on '
                 f'$(hostname)"; fi')]


def status_commands(a) -> list[list[str]]:
  if a.queued:
    return [_queued(a, "describe", qr_id(a), f"--zone={a.zone}")]
  return [_tpu_vm(a, "describe", a.name, f"--zone={a.zone}")]


def delete_commands(a) -> list[list[str]]:
  quiet = ["--quiet"] if a.yes else []
  if a.queued:  # --force also deletes the queued resource's node (the VM).
    return [_queued(a, "delete", qr_id(a), f"--zone={a.zone}", "--force",
                    *quiet)]
  return [_tpu_vm(a, "delete", a.name, f"--zone={a.zone}", *quiet)]


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def _note(message: str) -> None:
  print(f"[launch/tpu.py] {message}", file=sys.stderr, flush=True)


def execute(commands: Sequence[Sequence[str]], dry_run: bool,
            cwd: Optional[str] = None) -> int:
  """Runs each command in order, stopping at the first failure.

  With dry_run, prints each command (shlex.join, one per line) instead.
  """
  for cmd in commands:
    line = shlex.join(cmd)
    if dry_run:
      print(line, flush=True)
      continue
    print(f"+ {line}", file=sys.stderr, flush=True)
    try:
      code = subprocess.run(list(cmd), cwd=cwd, check=False).returncode
    except FileNotFoundError:
      _note(f"{cmd[0]} not found: install the Google Cloud CLI "
            "(https://cloud.google.com/sdk/docs/install)")
      return 127
    if code:
      _note(f"exit status {code} from: {line}")
      return code
  return 0


def preflight_check(a) -> int:
  """Hook run by `create` before any VM is paid for.

  Compiles the run's distillation step ahead of time for the target TPU
  topology on this machine (kdjax.aot) and fails when it would not fit.
  Runs nothing when kdjax.aot is not found beside this script, without
  --config, or with --skip-check. Returns the exit status (0 = go ahead).
  """
  cmd = check_command(a)
  if cmd is None:
    return 0
  return execute([cmd], a.dry_run, cwd=str(REPO_ROOT))


def cmd_create(a) -> int:
  commands = create_commands(a)  # Validates arguments before the check.
  code = preflight_check(a)
  if code:
    _note("the ahead-of-time check failed, no VM created "
          "(fix the config, or pass --skip-check)")
    return code
  code = execute(commands, a.dry_run)
  if not code and a.queued and not a.dry_run:
    _note(f"requested; the VM exists once `launch/tpu.py status --queued "
          f"--name={a.name} --zone={a.zone}` shows state ACTIVE")
  return code


def cmd_fetch_results(a) -> int:
  commands = fetch_results_commands(a)
  if not a.dry_run:
    os.makedirs(dest_of(a), exist_ok=True)
  code = execute(commands, a.dry_run)
  if code and not a.dry_run:
    _note(f"no {REPORT_GLOB} copied from {workdir_of(a)}: kdjax writes the "
          "report when a pipeline or evaluate run ends (see `logs`)")
  return code


def cmd_logs(a) -> int:
  commands = logs_commands(a)
  if a.fetch is not None and not a.dry_run:
    os.makedirs(a.fetch, exist_ok=True)
  try:
    return execute(commands, a.dry_run)
  except KeyboardInterrupt:
    return 0


HANDLERS = {
    "create": cmd_create,
    "setup": lambda a: execute(setup_commands(a), a.dry_run),
    "run": lambda a: execute(run_commands(a), a.dry_run),
    "logs": cmd_logs,
    "fetch-results": cmd_fetch_results,
    "stop": lambda a: execute(stop_commands(a), a.dry_run),
    "status": lambda a: execute(status_commands(a), a.dry_run),
    "delete": lambda a: execute(delete_commands(a), a.dry_run),
}

# Which subcommands take --config.* overrides and which flags they need.
_TAKES_OVERRIDES = ("create", "run")
_REQUIRED = {
    "create": ("name", "zone", "accelerator_type"),
    "setup": ("name", "zone"),
    "run": ("name", "zone", "accelerator_type"),
    "logs": ("name", "zone"),
    "fetch-results": ("name", "zone"),
    "stop": ("name", "zone"),
    "status": ("name", "zone"),
    "delete": ("name", "zone"),
}


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  env = {k: os.environ.get(v) or None for k, v in _ENV.items()}

  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  common.add_argument("--name", default=env["name"],
                      help="TPU VM name [$KDJAX_TPU_NAME]")
  common.add_argument("--zone", default=env["zone"],
                      help="zone, e.g. us-west4-a [$KDJAX_TPU_ZONE]")
  common.add_argument("--project", default=env["project"],
                      help="GCP project; default: gcloud's configured one "
                      "[$KDJAX_TPU_PROJECT]")
  common.add_argument("--dry-run", action="store_true",
                      help="print the commands (one per line), run nothing")

  accel = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  accel.add_argument("--accelerator-type", "--type", dest="accelerator_type",
                     default=env["accelerator_type"],
                     help="e.g. v5litepod-8 (1 host), v5litepod-16, v4-32 "
                     "[$KDJAX_TPU_TYPE]")

  queued = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  queued.add_argument("--queued", action="store_true",
                      help="the VM is (to be) made through a queued resource")
  queued.add_argument("--queued-resource-id", default=None,
                      help="queued resource id (default: NAME-qr)")

  config = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  config.add_argument("--config", help="config file, e.g. "
                      "configs/fashion_mnist.py (relative to the repo root)")
  config.add_argument("--preset", help="preset passed as --config=FILE:PRESET")

  run_name = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  run_name.add_argument("--run-name", default="run", type=_run_name,
                        help="names the per-worker log ~/kdjax-logs/RUN.log")

  parser = argparse.ArgumentParser(
      prog="launch/tpu.py", allow_abbrev=False,
      description=__doc__.split("\n\n")[0],
      epilog="See launch/README.md. --config.FIELD=VALUE overrides are "
      "passed through by create (to the check) and run.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("create", parents=[common, accel, queued, config],
                     allow_abbrev=False,
                     help="create a TPU VM (on-demand, spot or queued)")
  p.add_argument("--runtime-version", help="TPU VM image; default per "
                 "generation: " + ", ".join(
                     f"{g} {v}" for g, v in RUNTIME_VERSIONS.items()))
  capacity = p.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true",
                        help="spot capacity: cheaper, may be preempted")
  capacity.add_argument("--reserved", action="store_true",
                        help="use the project's reservation")
  p.add_argument("--valid-until-duration",
                 help="queued only: give up waiting after this long, e.g. 6h")
  p.add_argument("--skip-check", action="store_true",
                 help="skip the ahead-of-time compile check")
  p.add_argument("--topology", help="AOT check topology, e.g. v5e:2x4 "
                 "(default: from the accelerator type)")

  p = sub.add_parser("setup", parents=[common], allow_abbrev=False,
                     help="install kdjax, jax[tpu] and jemalloc on all workers")
  p.add_argument("--source", default=str(REPO_ROOT),
                 help="git URL to clone, or local directory to copy "
                 "(default: this checkout)")
  p.add_argument("--ref", help="branch or tag of a git --source")
  p.add_argument("--jax-version", default=pinned_jax_version(),
                 help="jax[tpu] version (default: the pin in setup.py)")
  p.add_argument("--python", default=DEFAULT_PYTHON,
                 help="Python version of the remote virtualenv")

  p = sub.add_parser("run", parents=[common, accel, config, run_name],
                     allow_abbrev=False,
                     help="start a run on all workers in the background")
  p.add_argument("--workdir", default=None,
                 help="where checkpoints, metrics and the report go: "
                 "gs://BUCKET/PATH (recommended: outlives the VM), or a path "
                 f"on the workers; default on one host: ~/{REMOTE_RUNS}/"
                 "RUN_NAME on the VM's disk; multi-host: required, gs:// or "
                 "absolute on a filesystem mounted at that path on every "
                 "worker")

  p = sub.add_parser("logs", parents=[common, accel, run_name],
                     allow_abbrev=False,
                     help="stream (default) or --fetch the per-worker logs")
  p.add_argument("--worker", default=None,
                 help="stream: worker index or 'all' (default 0); "
                 "fetch: index or 'all' (default all)")
  p.add_argument("--lines", type=int, default=100,
                 help="stream: lines of history to show first")
  p.add_argument("--fetch", metavar="DIR", default=None,
                 help="copy logs to DIR/RUN-workerI.log instead of streaming")

  p = sub.add_parser("fetch-results", parents=[common, accel, run_name],
                     allow_abbrev=False,
                     help="copy WORKDIR/report.* (bucket or worker 0) "
                     "to here")
  p.add_argument("--workdir", default=None,
                 help="the run's --workdir; gs:// is copied from the bucket "
                 f"(default: ~/{REMOTE_RUNS}/RUN_NAME, run's single-host "
                 "default)")
  p.add_argument("--dest", metavar="DIR", default=None,
                 help=f"local directory (default: {LOCAL_RESULTS}/RUN_NAME)")

  sub.add_parser("stop", parents=[common, run_name], allow_abbrev=False,
                 help="send SIGTERM to the run on all workers")
  sub.add_parser("status", parents=[common, queued], allow_abbrev=False,
                 help="describe the VM or queued resource")
  p = sub.add_parser("delete", parents=[common, queued], allow_abbrev=False,
                     help="delete the VM (and its queued resource)")
  p.add_argument("--yes", action="store_true",
                 help="do not ask for confirmation (gcloud --quiet)")
  return parser


def _run_name(value: str) -> str:
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
    raise argparse.ArgumentTypeError(
        f"{value!r}: use letters, digits, '.', '_' and '-'")
  return value


def _collect_overrides(extras: list[str]) -> tuple[list[str], list[str]]:
  """Splits leftover arguments into --config.* overrides and the rest."""
  overrides, rest = [], []
  i = 0
  while i < len(extras):
    arg = extras[i]
    if arg.startswith("--config.") and len(arg) > len("--config."):
      if "=" in arg:
        overrides.append(arg)
      elif i + 1 < len(extras):  # --config.x VALUE
        overrides.append(f"{arg}={extras[i + 1]}")
        i += 1
      else:
        rest.append(arg)
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = build_parser()
  a, extras = parser.parse_known_args(argv)
  overrides, rest = _collect_overrides(extras)
  if rest or (overrides and a.command not in _TAKES_OVERRIDES):
    parser.error(f"{a.command}: unrecognized arguments: "
                 + " ".join(rest + (overrides if not rest else [])))
  a.overrides = overrides
  for field in _REQUIRED[a.command]:
    if not getattr(a, field):
      flag = "--" + field.replace("_", "-")
      parser.error(f"{a.command}: {flag} is required (or set {_ENV[field]})")
  if a.command == "run" and not a.config:
    parser.error("run: --config is required, e.g. "
                 "--config=configs/fashion_mnist.py")
  return a


def main(argv: Optional[Sequence[str]] = None) -> int:
  a = parse_args(argv)
  try:
    return HANDLERS[a.command](a)
  except LaunchError as e:
    print(f"launch/tpu.py {a.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
