"""Tests for launch/tpu.py: the gcloud command lines it would run.

No test calls gcloud or touches the network: subprocess is replaced by a
recorder, and commands are checked through --dry-run output and the builders.
The remote shell scripts (run, setup) are also executed or syntax-checked by a
local bash with a fake $HOME, so their quoting is tested, not just read.
"""

import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("kdjax_launch_tpu",
                                               REPO / "launch" / "tpu.py")
tpu = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tpu  # dataclasses look the module up.
_spec.loader.exec_module(tpu)

_REAL_RUN = subprocess.run
_REAL_AOT_AVAILABLE = tpu._aot_available
BASE = ["--name=kd", "--zone=us-west4-a"]


@pytest.fixture(autouse=True)
def no_gcloud(monkeypatch):
  """Records instead of running; clears the KDJAX_TPU_* defaults."""
  calls = []

  def fake_run(cmd, *args, **kwargs):
    calls.append(list(cmd))
    return subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(tpu.subprocess, "run", fake_run)
  for var in tpu._ENV.values():
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(tpu, "_aot_available", lambda: False)
  return calls


def dry(capsys, *argv):
  """Runs main(argv + --dry-run); returns the printed argv lists."""
  code = tpu.main([*argv, "--dry-run"])
  out = capsys.readouterr().out
  assert code == 0, out
  return [shlex.split(line) for line in out.splitlines()]


def remote(cmd):
  """The --command=... value of a gcloud ssh argv."""
  (value,) = [x[len("--command="):] for x in cmd if x.startswith("--command=")]
  return value


# -- create -----------------------------------------------------------------


def test_create_single_host_on_demand(capsys, no_gcloud):
  code = tpu.main(["create", *BASE, "--accelerator-type=v5litepod-8",
                   "--dry-run"])
  out = capsys.readouterr().out
  assert code == 0
  assert out == ("gcloud compute tpus tpu-vm create kd --zone=us-west4-a "
                 "--accelerator-type=v5litepod-8 "
                 "--version=v2-alpha-tpuv5-lite\n")
  assert no_gcloud == []  # Dry run: nothing executed.


def test_create_spot_multi_host_with_project(capsys):
  (cmd,) = dry(capsys, "create", *BASE, "--type=v4-32", "--spot",
               "--project=my-proj")
  assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert "--spot" in cmd and "--reserved" not in cmd
  assert "--version=tpu-ubuntu2204-base" in cmd
  assert cmd[-1] == "--project=my-proj"


def test_create_queued_resource(capsys):
  (cmd,) = dry(capsys, "create", *BASE, "--type=v5litepod-16", "--queued",
               "--spot", "--valid-until-duration=6h")
  assert cmd == [
      "gcloud", "compute", "tpus", "queued-resources", "create", "kd-qr",
      "--node-id=kd", "--zone=us-west4-a", "--accelerator-type=v5litepod-16",
      "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
      "--valid-until-duration=6h"]


def test_create_queued_reserved_custom_id(capsys):
  (cmd,) = dry(capsys, "create", *BASE, "--type=v6e-8", "--queued",
               "--reserved", "--queued-resource-id=myqr")
  assert cmd[5] == "myqr"
  assert "--reserved" in cmd and "--spot" not in cmd
  assert "--runtime-version=v2-alpha-tpuv6e" in cmd


def test_create_spot_and_reserved_conflict():
  with pytest.raises(SystemExit):
    tpu.main(["create", *BASE, "--type=v4-8", "--spot", "--reserved"])


def test_create_requires_type_and_reads_env(capsys, monkeypatch):
  with pytest.raises(SystemExit):
    tpu.main(["create", *BASE, "--dry-run"])
  assert "KDJAX_TPU_TYPE" in capsys.readouterr().err
  monkeypatch.setenv("KDJAX_TPU_TYPE", "v5p-8")
  monkeypatch.setenv("KDJAX_TPU_NAME", "envname")
  monkeypatch.setenv("KDJAX_TPU_ZONE", "us-east5-a")
  (cmd,) = dry(capsys, "create")
  assert cmd[5:] == ["envname", "--zone=us-east5-a",
                     "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5"]


def test_unknown_accelerator_type_is_refused(capsys):
  assert tpu.main(["create", *BASE, "--type=v5e-8", "--dry-run"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "v5litepod-8" in captured.err


@pytest.mark.parametrize("name,generation,hosts,runtime,topology", [
    ("v5litepod-8", "v5e", 1, "v2-alpha-tpuv5-lite", "v5e:2x4"),
    ("v5litepod-16", "v5e", 4, "v2-alpha-tpuv5-lite", "v5e:4x4"),
    ("v4-8", "v4", 1, "tpu-ubuntu2204-base", "v4:2x2x1"),
    ("v4-32", "v4", 4, "tpu-ubuntu2204-base", "v4:2x2x4"),
    ("v5p-8", "v5p", 1, "v2-alpha-tpuv5", "v5p:2x2x1"),
    ("v6e-8", "v6e", 1, "v2-alpha-tpuv6e", "v6e:2x4"),
    ("v6e-256", "v6e", 64, "v2-alpha-tpuv6e", "v6e:16x16"),
    ("v2-32", "v2", 4, "tpu-ubuntu2204-base", None),
])
def test_accelerator_table(name, generation, hosts, runtime, topology):
  accel = tpu.parse_accelerator(name)
  assert (accel.generation, accel.hosts, accel.runtime_version,
          accel.topology) == (generation, hosts, runtime, topology)
  assert accel.multi_host == (hosts > 1)


# -- the ahead-of-time check hook ---------------------------------------------


def test_preflight_skipped_without_aot_module(capsys):
  lines = dry(capsys, "create", *BASE, "--type=v5litepod-8",
              "--config=configs/fashion_mnist.py")
  assert len(lines) == 1 and lines[0][0] == "gcloud"


def test_preflight_runs_aot_check_first(capsys, monkeypatch, no_gcloud):
  monkeypatch.setattr(tpu, "_aot_available", lambda: True)
  check, create = dry(capsys, "create", *BASE, "--type=v5litepod-8",
                      "--config=configs/fashion_mnist.py", "--preset=smoke",
                      "--config.train.batch_size=256")
  assert check[1:] == ["-m", "kdjax.main",
                       "--config=configs/fashion_mnist.py:smoke",
                       "--config.mode=aot_check",
                       "--config.aot.topology=v5e:2x4",
                       "--config.train.batch_size=256"]
  assert create[0] == "gcloud"
  # --skip-check drops it.
  lines = dry(capsys, "create", *BASE, "--type=v5litepod-8", "--skip-check",
              "--config=configs/fashion_mnist.py")
  assert [c[0] for c in lines] == ["gcloud"]
  # A failing check (config does not fit) stops create: no VM is paid for.
  monkeypatch.setattr(tpu.subprocess, "run", lambda cmd, **kw: (
      no_gcloud.append(cmd), subprocess.CompletedProcess(cmd, 3))[1])
  assert tpu.main(["create", *BASE, "--type=v5litepod-8",
                   "--config=configs/fashion_mnist.py"]) == 3
  assert [c[0] for c in no_gcloud] == [sys.executable]


def test_aot_available_reflects_the_tree():
  expected = (REPO / "kdjax" / "aot.py").exists() or (
      REPO / "kdjax" / "aot" / "__init__.py").exists()
  assert _REAL_AOT_AVAILABLE() == expected


# -- setup --------------------------------------------------------------------


def _setup_version_in_setup_py():
  text = (REPO / "setup.py").read_text()
  return re.search(r'"jax==([^"]+)"', text).group(1)


def test_setup_from_git_installs_pinned_jax_tpu(capsys):
  (cmd,) = dry(capsys, "setup", *BASE,
               "--source=https://github.com/example/kdjax.git", "--ref=v0.1")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "kd"]
  assert "--worker=all" in cmd
  script = remote(cmd)
  words = shlex.split(script)
  pinned = _setup_version_in_setup_py()
  assert pinned == "0.10.2"
  assert f"-m pip install -q 'jax[tpu]=={pinned}';" in script
  # With the 'gcs' extra (gcsfs): gs:// workdirs.
  assert "-m pip install -q -e '.[gcs]';" in script
  assert "apt-get -o DPkg::Lock::Timeout=300 install -y -qq libjemalloc2" in script
  assert ("git clone --depth=1 --branch=v0.1 "
          "https://github.com/example/kdjax.git") in script
  # jax 0.10 needs Python >= 3.11; the venv is made with it.
  assert "--python=3.11" in words
  subprocess_syntax_check(script)


def test_setup_from_local_path_copies_to_all_workers(capsys, tmp_path):
  rm, copy, install = dry(capsys, "setup", *BASE, f"--source={tmp_path}")
  assert remote(rm) == 'rm -rf "$HOME/kdjax"'
  assert copy == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tmp_path),
                  "kd:kdjax", "--zone=us-west4-a", "--worker=all",
                  "--recurse"]
  assert "git clone" not in remote(install)
  assert "--worker=all" in install


def test_setup_rejects_missing_source(capsys, tmp_path):
  assert tpu.main(["setup", *BASE, f"--source={tmp_path}/nope",
                   "--dry-run"]) == 2
  assert "neither a git URL nor a local directory" in capsys.readouterr().err


def subprocess_syntax_check(script):
  bash = shutil.which("bash")
  if bash is None:
    pytest.skip("no bash")
  proc = _REAL_RUN([bash, "-n", "-c", script], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


# -- run ----------------------------------------------------------------------

RUN = ["run", *BASE, "--type=v4-32", "--config=configs/fashion_mnist.py",
       "--preset=smoke"]


RUN1 = ["run", *BASE, "--type=v5litepod-8", "--config=configs/fashion_mnist.py"]


def run_dry(capsys, *argv):
  """Like dry() for run; returns (argv lists, stderr)."""
  code = tpu.main([*argv, "--dry-run"])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  return [shlex.split(l) for l in captured.out.splitlines()], captured.err


def workdir_word(cmd):
  """The --workdir=... word of kdjax.main in a run ssh argv (remote shell)."""
  (word,) = [w for w in shlex.split(remote(cmd)) if w.startswith("--workdir=")]
  return word


def test_run_multi_host_on_all_workers_warns_about_shared_storage(capsys):
  (cmd,), err = run_dry(capsys, *RUN, "--workdir=/mnt/shared/kd/fmnist")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "kd"]
  assert "--worker=all" in cmd
  script = remote(cmd)
  assert "setsid nohup" in script
  assert f"MALLOC_CONF={tpu.MALLOC_CONF}" in script
  assert tpu.MALLOC_CONF == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
  assert "libjemalloc.so.2" in script
  assert '>> "$HOME/kdjax-logs/run.log" 2>&1' in script
  assert workdir_word(cmd) == "--workdir=/mnt/shared/kd/fmnist"
  # Accepted, with a warning that it must be one filesystem on every worker.
  assert "warning" in err and "shared storage" in err
  assert "all 4 workers" in err and "Orbax" in err
  subprocess_syntax_check(script)


@pytest.mark.parametrize("argv", [RUN, RUN1], ids=["multi-host", "one-host"])
def test_run_takes_a_gcs_workdir_on_any_slice(capsys, argv):
  (cmd,), err = run_dry(capsys, *argv, "--workdir=gs://bucket/kd/fmnist")
  assert "--worker=all" in cmd
  assert workdir_word(cmd) == "--workdir=gs://bucket/kd/fmnist"
  # Shared by every worker and outlives the VM: neither note applies ...
  assert "warning" not in err and "own disk" not in err
  # ... but the VM must be allowed to write it, which kdjax checks first.
  assert "roles/storage.objectUser" in err and "launch/tpu.py logs" in err
  subprocess_syntax_check(remote(cmd))


@pytest.mark.parametrize("argv", [RUN, RUN1], ids=["multi-host", "one-host"])
@pytest.mark.parametrize("workdir", ["s3://b/x", "gs://bucket", "gs://",
                                     "gs:///x"])
def test_run_refuses_other_url_workdirs(capsys, no_gcloud, argv, workdir):
  assert tpu.main([*argv, f"--workdir={workdir}", "--dry-run"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "must be a Cloud Storage path gs://BUCKET/PATH" in captured.err
  assert no_gcloud == []


@pytest.mark.parametrize("workdir,expected", [
    (None, "there is no default"),
    ("runs/kd", "must be gs://BUCKET/PATH or an absolute path"),
    ("~/kdjax-runs/kd", "each worker's own disk"),
])
def test_run_multi_host_needs_a_bucket_or_absolute_workdir(capsys, no_gcloud,
                                                          workdir, expected):
  flags = [] if workdir is None else [f"--workdir={workdir}"]
  assert tpu.main([*RUN, *flags, "--dry-run"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert expected in captured.err and "4 hosts" in captured.err
  assert "Filestore" in captured.err or "absolute" in captured.err
  assert no_gcloud == []


def test_run_single_host_defaults_to_a_local_workdir_and_says_so(capsys):
  (cmd,), err = run_dry(capsys, *RUN1, "--run-name=fm")
  assert "--worker=all" in cmd
  assert workdir_word(cmd) == "--workdir=$HOME/kdjax-runs/fm"
  assert "goes away when the VM is deleted" in err
  assert "fetch-results --run-name=fm" in err
  assert "warning" not in err  # The shared-storage warning is multi-host only.
  (cmd,), err = run_dry(capsys, *RUN1, "--workdir=/data/kd")
  assert workdir_word(cmd) == "--workdir=/data/kd"
  assert "fetch-results --workdir=/data/kd`" in err


def test_run_single_host_refuses_a_relative_workdir(capsys, no_gcloud):
  assert tpu.main([*RUN1, "--workdir=runs/kd", "--dry-run"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "setup replaces" in captured.err
  assert no_gcloud == []


def test_run_passes_overrides_through_quoted(capsys):
  (cmd,) = dry(capsys, *RUN, "--workdir=/mnt/w",
               "--config.optim.learning_rate=3e-4",
               "--config.name=my run; rm -rf /", "--config.note=it's",
               "--config.seed", "7")
  words = shlex.split(remote(cmd))
  start = words.index("kdjax.main")
  assert words[start + 1:start + 7] == [
      "--config=configs/fashion_mnist.py:smoke", "--workdir=/mnt/w",
      "--config.optim.learning_rate=3e-4", "--config.name=my run; rm -rf /",
      "--config.note=it's", "--config.seed=7"]


def test_run_rejects_unknown_arguments_and_double_preset(capsys):
  with pytest.raises(SystemExit):
    tpu.main([*RUN, "--workdir=/mnt/w", "--confg.seed=1"])
  assert tpu.main(["run", *BASE, "--type=v4-8", "--workdir=/mnt/w",
                   "--config=configs/fashion_mnist.py:smoke", "--preset=x",
                   "--dry-run"]) == 2


def _run_script_locally(tmp_path, script, fake_python_body):
  """Runs a run_script() as a worker would, with a fake venv python."""
  home = tmp_path / "home"
  (home / "kdjax").mkdir(parents=True)
  venv_bin = home / "kdjax-venv" / "bin"
  venv_bin.mkdir(parents=True)
  fake = venv_bin / "python"
  fake.write_text("#!/bin/sh\n" + fake_python_body)
  fake.chmod(0o755)
  env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
  proc = _REAL_RUN(["bash", "-c", script], env=env, capture_output=True,
                   text=True, timeout=30)
  return home, proc


def _wait_for(path, timeout=10.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.exists() and path.read_text().strip():
      return path.read_text()
    time.sleep(0.05)
  raise AssertionError(f"{path} was not written")


RECORD_ARGS = ('pwd > "$HOME/cwd"; echo "LD_PRELOAD=$LD_PRELOAD" > "$HOME/env";'
               ' echo "MALLOC_CONF=$MALLOC_CONF" >> "$HOME/env";'
               ' for x in "$@"; do echo "$x"; done > "$HOME/args.tmp";'
               ' echo "to the log"; mv "$HOME/args.tmp" "$HOME/args"\n')


@pytest.mark.parametrize("jemalloc_present,workdir,expected", [
    (False, None, "{home}/kdjax-runs/run"),  # The single-host default.
    (True, "~/runs/it's a dir", "{home}/runs/it's a dir"),
    (False, "/mnt/shared/w", "/mnt/shared/w"),
])
def test_run_script_executes_in_a_real_shell(tmp_path, monkeypatch,
                                             jemalloc_present, workdir,
                                             expected):
  if shutil.which("bash") is None or shutil.which("setsid") is None:
    pytest.skip("needs bash and setsid")
  lib = tmp_path / "lib" / "libjemalloc.so.2"
  if jemalloc_present:  # Any loadable library stands in for jemalloc.
    libc = [p for p in ("/lib/x86_64-linux-gnu/libc.so.6",
                        "/usr/lib/x86_64-linux-gnu/libc.so.6",
                        "/lib/aarch64-linux-gnu/libc.so.6",
                        "/lib64/libc.so.6") if os.path.exists(p)]
    if not libc:
      pytest.skip("no libc.so.6 to stand in for jemalloc")
    lib.parent.mkdir()
    shutil.copy(libc[0], lib)
  monkeypatch.setattr(tpu, "JEMALLOC_PATHS", (str(lib),))
  flags = [] if workdir is None else [f"--workdir={workdir}"]
  a = tpu.parse_args([*RUN1, "--preset=smoke", *flags, "--config.name=a b",
                      "--config.quote=it's"])
  home, proc = _run_script_locally(tmp_path, tpu.run_script(a), RECORD_ARGS)
  assert proc.returncode == 0, proc.stderr
  assert "started on" in proc.stdout
  args = _wait_for(home / "args").splitlines()
  assert args == ["-m", "kdjax.main", "--config=configs/fashion_mnist.py:smoke",
                  "--workdir=" + expected.format(home=home),
                  "--config.name=a b", "--config.quote=it's"]
  assert _wait_for(home / "cwd").strip() == str(home / "kdjax")
  env = _wait_for(home / "env").splitlines()
  if jemalloc_present:
    assert env == [f"LD_PRELOAD={lib}",
                   "MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1"]
  else:  # Silent fallback: no preload, no error.
    assert env == ["LD_PRELOAD=", "MALLOC_CONF="]
    assert proc.stderr == ""
  log = home / "kdjax-logs" / "run.log"
  deadline = time.time() + 10
  while "to the log" not in log.read_text() and time.time() < deadline:
    time.sleep(0.05)
  assert "to the log" in log.read_text()
  assert (home / "kdjax-logs" / "run.pid").read_text().strip().isdigit()


def test_run_script_refuses_a_second_run(tmp_path):
  if shutil.which("bash") is None or shutil.which("setsid") is None:
    pytest.skip("needs bash and setsid")
  a = tpu.parse_args([*RUN, "--workdir=/mnt/w"])
  home, first = _run_script_locally(tmp_path, tpu.run_script(a),
                                    "exec sleep 60\n")
  assert first.returncode == 0, first.stderr
  pid = int((home / "kdjax-logs" / "run.pid").read_text())
  try:
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    second = _REAL_RUN(["bash", "-c", tpu.run_script(a)], env=env,
                       capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert "still running" in second.stderr
    assert int((home / "kdjax-logs" / "run.pid").read_text()) == pid
    # stop's script sends SIGTERM to exactly that process.
    (stop,) = tpu.stop_commands(tpu.parse_args(["stop", *BASE]))
    stopped = _REAL_RUN(["bash", "-c", remote(stop)], env=env,
                        capture_output=True, text=True, timeout=30)
    assert "sent SIGTERM" in stopped.stdout
    deadline = time.time() + 10
    while time.time() < deadline:
      try:
        os.kill(pid, 0)
      except ProcessLookupError:
        break
      time.sleep(0.05)
    else:
      raise AssertionError("the run survived stop")
  finally:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


# -- logs, status, delete -----------------------------------------------------


def test_logs_stream_and_fetch(capsys, tmp_path, no_gcloud):
  (stream,) = dry(capsys, "logs", *BASE)
  assert "--worker=0" in stream
  assert remote(stream) == 'tail -n 100 -F "$HOME/kdjax-logs/run.log"'
  (every,) = dry(capsys, "logs", *BASE, "--worker=all", "--run-name=exp1")
  assert "--worker=all" in every and "[$(hostname)]" in remote(every)
  fetch = dry(capsys, "logs", *BASE, "--type=v4-32", f"--fetch={tmp_path}/l")
  assert [c[5:] for c in fetch] == [
      ["kd:kdjax-logs/run.log", f"{tmp_path}/l/run-worker{i}.log",
       "--zone=us-west4-a", f"--worker={i}"] for i in range(4)]
  assert not (tmp_path / "l").exists()  # Dry run creates nothing.
  assert tpu.main(["logs", *BASE, "--fetch=x", "--dry-run"]) == 2
  assert no_gcloud == []


def test_fetch_results_copies_the_report_from_worker_0(capsys, tmp_path,
                                                      no_gcloud, monkeypatch):
  (cmd,) = dry(capsys, "fetch-results", *BASE, "--run-name=fm")
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                 "kd:kdjax-runs/fm/report.*",
                 os.path.join("kdjax-results", "fm"),
                 "--zone=us-west4-a", "--worker=0"]
  # The same workdir default as run's: what run wrote is what is fetched.
  run_cmd = tpu.run_commands(tpu.parse_args([*RUN1, "--run-name=fm"]))[0]
  assert workdir_word(run_cmd) == "--workdir=$HOME/kdjax-runs/fm"
  (cmd,) = dry(capsys, "fetch-results", *BASE, "--type=v4-32",
               "--workdir=/mnt/shared/kd", f"--dest={tmp_path}/r",
               "--project=p")
  assert cmd[5:] == ["kd:/mnt/shared/kd/report.*", f"{tmp_path}/r",
                     "--zone=us-west4-a", "--worker=0", "--project=p"]
  (cmd,) = dry(capsys, "fetch-results", *BASE, "--workdir=~")
  assert cmd[5] == "kd:./report.*"
  assert not (tmp_path / "r").exists()  # Dry run creates nothing.
  assert no_gcloud == []
  # A bucket workdir is copied from the bucket, not from a worker.
  (cmd,) = dry(capsys, "fetch-results", *BASE, "--type=v4-32",
               "--workdir=gs://b/kd/x/", "--run-name=x", "--project=p")
  assert cmd == ["gcloud", "storage", "cp", "gs://b/kd/x/report.*",
                 os.path.join("kdjax-results", "x"), "--project=p"]
  # Refused like run: other URLs, relative, and ~ on a multi-host slice.
  for flags, message in [(["--workdir=s3://b/x"], "gs://BUCKET/PATH"),
                         (["--workdir=runs/x"], "setup replaces"),
                         (["--type=v4-32"], "there is no default")]:
    assert tpu.main(["fetch-results", *BASE, *flags, "--dry-run"]) == 2, flags
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err, flags
  # For real: makes the destination, then one scp.
  monkeypatch.chdir(tmp_path)
  assert tpu.main(["fetch-results", *BASE]) == 0
  assert (tmp_path / "kdjax-results" / "run").is_dir()
  assert no_gcloud == [["gcloud", "compute", "tpus", "tpu-vm", "scp",
                        "kd:kdjax-runs/run/report.*",
                        os.path.join("kdjax-results", "run"),
                        "--zone=us-west4-a", "--worker=0"]]


def test_readme_first_run_uses_a_bucket_workdir():
  readme = (REPO / "launch" / "README.md").read_text()
  first_run = readme.split("## Your first TPU run")[1].split("\n## ")[0]
  # Each `launch/tpu.py run ...` with its backslash-continued lines.
  run_commands = re.findall(r"launch/tpu\.py run (?:[^\n\\]|\\\n)*",
                            first_run)
  assert run_commands and all(re.search(r"--workdir=(gs://|\$BUCKET/)", c)
                              for c in run_commands), run_commands
  assert "export BUCKET=gs://" in first_run
  assert "gcloud storage buckets create" in first_run
  assert "roles/storage.objectUser" in first_run
  assert "fetch-results" in readme and "Multi-host slices" in readme
  assert "kdjax[gcs]" in readme or ".[gcs]" in readme
  doc = tpu.__doc__
  assert "--workdir=gs://" in doc and "fetch-results" in doc


def test_delete_queued_resource(capsys):
  (cmd,) = dry(capsys, "delete", *BASE, "--queued")
  assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "delete",
                 "kd-qr", "--zone=us-west4-a", "--force"]
  (cmd,) = dry(capsys, "delete", *BASE, "--yes", "--project=p")
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "kd",
                 "--zone=us-west4-a", "--quiet", "--project=p"]


def test_status(capsys):
  (cmd,) = dry(capsys, "status", *BASE, "--queued")
  assert cmd[3:6] == ["queued-resources", "describe", "kd-qr"]


# -- one place, and real execution --------------------------------------------


def test_every_gcloud_command_is_built_in_one_place(capsys, monkeypatch,
                                                    tmp_path):
  monkeypatch.setattr(tpu, "GCLOUD", "fake-gcloud")
  invocations = [
      ["create", *BASE, "--type=v4-32", "--spot"],
      ["create", *BASE, "--type=v4-32", "--queued", "--reserved"],
      ["setup", *BASE, f"--source={tmp_path}"],
      ["setup", *BASE, "--source=git@github.com:example/kdjax.git"],
      [*RUN, "--workdir=/mnt/w"], RUN1, [*RUN, "--workdir=gs://b/w"],
      ["logs", *BASE], ["logs", *BASE, "--type=v4-16", "--fetch=out"],
      ["fetch-results", *BASE], ["fetch-results", *BASE, "--workdir=/x"],
      ["fetch-results", *BASE, "--workdir=gs://b/w"],
      ["stop", *BASE], ["status", *BASE], ["delete", *BASE, "--queued"],
  ]
  for argv in invocations:
    for cmd in dry(capsys, *argv):
      assert cmd[0] == "fake-gcloud", argv


def test_execute_runs_in_order_and_stops_at_failure(monkeypatch, capsys):
  seen = []

  def fake_run(cmd, **kwargs):
    seen.append(cmd)
    return subprocess.CompletedProcess(cmd, 1 if cmd == ["b"] else 0)

  monkeypatch.setattr(tpu.subprocess, "run", fake_run)
  assert tpu.execute([["a"], ["b"], ["c"]], dry_run=False) == 1
  assert seen == [["a"], ["b"]]
  assert "+ a" in capsys.readouterr().err


def test_main_without_dry_run_calls_gcloud_argv(no_gcloud):
  assert tpu.main(["delete", *BASE, "--yes"]) == 0
  assert no_gcloud == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "kd",
                        "--zone=us-west4-a", "--quiet"]]


def test_runs_as_a_script():
  env = {k: v for k, v in os.environ.items() if not k.startswith("KDJAX_")}
  proc = _REAL_RUN([sys.executable, str(REPO / "launch" / "tpu.py"), "status",
                    *BASE, "--dry-run"], capture_output=True, text=True,
                   env=env, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == ("gcloud compute tpus tpu-vm describe kd "
                         "--zone=us-west4-a\n")


def test_launcher_and_aot_share_one_chip_table_without_jax():
  """launch/tpu.py runs on a laptop: it imports kdjax.core.tpu_chips, never jax."""
  code = ("import sys; sys.path.insert(0, 'launch'); import tpu; "
          "from kdjax.core import tpu_chips; "
          "assert tpu.tpu_chips is tpu_chips; "
          "bad = sorted(m for m in ('jax', 'numpy', 'flax') if m in sys.modules); "
          "assert not bad, bad")
  _REAL_RUN([sys.executable, "-c", code], cwd=REPO, check=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
