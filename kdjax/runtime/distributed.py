"""Starting JAX's multi-controller runtime: one process per host, all chips global.

Called by main.py before anything touches jax devices. Three cases:

  explicit   config.distributed.* or $KDJAX_COORDINATOR_ADDRESS,
             $KDJAX_NUM_PROCESSES, $KDJAX_PROCESS_ID (any cluster, and the
             tests' local processes); config fields win over the environment.
  Cloud TPU  TPU chips on the PCI bus: `jax.distributed.initialize()` with no
             arguments, which reads the slice's workers from the VM metadata.
  neither    one process; nothing to start.

A coordinator that cannot be reached fails within
config.distributed.initialization_timeout seconds with a message naming the
address and what to check, instead of jax's default 5-minute wait. The check
is ours (a TCP probe before jax.distributed.initialize): jax's client aborts
the process from C++ when its connect times out, with no Python error to
catch.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import socket
import time
from typing import Mapping

import jax
from absl import logging
from jax.experimental import multihost_utils

from kdjax.core import errors
from kdjax.core.config import fail

ENV_ADDRESS = "KDJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "KDJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "KDJAX_PROCESS_ID"
DEFAULT_TIMEOUT_SECONDS = 60

# PCI ids of Cloud TPU chips (vendor Google). Google's gVNIC shares the vendor
# id, so the device id must match too. Mirrors jax._src.hardware_utils.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063",
                    "0x006f", "0x0076")


class DistributedInitError(errors.KdjaxError, RuntimeError):
  """The distributed runtime could not start; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to call jax.distributed.initialize; `auto` = no args (Cloud TPU)."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS
  auto: bool = False


def tpu_chips_present() -> bool:
  """True on a Cloud TPU VM: TPU chips on the PCI bus (no network query)."""
  for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor_path) as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor_path), "device")) as f:
        if f.read().strip() in _TPU_PCI_DEVICES:
          return True
    except OSError:
      continue
  return False


def _int(value, name: str, source: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedInitError(
        f"{source} {name}={value!r} is not an integer.") from None


def resolve(dist_config, environ: Mapping[str, str] | None = None,
            on_tpu: bool | None = None) -> Settings | None:
  """The settings to initialise with, or None for a single-process run.

  `dist_config` is config.distributed (or None). Fields left at their
  defaults ('' / 0 / -1) fall back to the KDJAX_* environment variables.
  """
  environ = os.environ if environ is None else environ
  get = (lambda k, d: dist_config.get(k, d)) if dist_config is not None else (
      lambda k, d: d)
  timeout = int(get("initialization_timeout", DEFAULT_TIMEOUT_SECONDS))
  if timeout <= 0:
    raise DistributedInitError(
        f"config.distributed.initialization_timeout={timeout} must be > 0 "
        "seconds.")

  address = get("coordinator_address", "") or environ.get(ENV_ADDRESS, "")
  num = get("num_processes", 0)
  if not num and environ.get(ENV_NUM_PROCESSES):
    num = _int(environ[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES, "$")
  pid = get("process_id", -1)
  if pid < 0 and environ.get(ENV_PROCESS_ID):
    pid = _int(environ[ENV_PROCESS_ID], ENV_PROCESS_ID, "$")

  if address:
    missing = [name for name, v in (("num_processes", num > 0),
                                    ("process_id", pid >= 0)) if not v]
    if missing:
      raise DistributedInitError(
          f"A coordinator address ({address!r}) is set but "
          + " and ".join(f"config.distributed.{m}" for m in missing)
          + " is not: set both (or $" + ENV_NUM_PROCESSES + " and $"
          + ENV_PROCESS_ID + ") on every process, process_id 0 on the "
          "coordinator's host.")
    if ":" not in address:
      raise DistributedInitError(
          f"config.distributed.coordinator_address={address!r} needs a port: "
          "host:port of process 0, e.g. 10.0.0.2:8476.")
    if not 0 <= pid < num:
      raise DistributedInitError(
          f"config.distributed.process_id={pid} must be in [0, num_processes="
          f"{num}).")
    if num == 1:
      return None
    return Settings(address, num, pid, timeout)
  if num > 1 or pid > 0:
    raise DistributedInitError(
        f"num_processes={num}, process_id={pid} but no coordinator address: "
        f"set config.distributed.coordinator_address (or ${ENV_ADDRESS}) to "
        "host:port of process 0.")
  if num == 1:
    return None  # Explicitly one process, even on a TPU VM.
  if on_tpu is None:
    on_tpu = tpu_chips_present()
  if on_tpu and get("auto_on_tpu", True):
    return Settings(timeout_seconds=timeout, auto=True)
  return None


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  try:
    return host.strip("[]"), int(port)
  except ValueError:
    raise DistributedInitError(
        f"config.distributed.coordinator_address={address!r}: the port "
        f"{port!r} is not a number.") from None


_WHAT_TO_CHECK = (
    "Check that: process 0 is running (started first or at about the same "
    "time); the address is process 0's host:port and reachable from this "
    "host (firewall, VPC rules); every process got the same num_processes "
    "and a distinct process_id. For a slow start raise "
    "--config.distributed.initialization_timeout.")


def _check_coordinator(settings: Settings) -> None:
  """Fails with a clear message if process 0's coordinator cannot be reached.

  Process 0 checks that it can bind the port; the others wait (up to the
  timeout) until something listens there.
  """
  host, port = _split_address(settings.coordinator_address)
  where = (f"coordinator {settings.coordinator_address} (process "
           f"{settings.process_id} of {settings.num_processes})")
  try:
    socket.getaddrinfo(host, port)
  except socket.gaierror as e:
    raise DistributedInitError(
        f"Could not resolve the host of {where}: {e}. {_WHAT_TO_CHECK}"
        ) from None
  if settings.process_id == 0:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      # As gRPC does: a previous run's TIME_WAIT connections do not count.
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        s.bind(("", port))
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          raise DistributedInitError(
              f"Process 0 cannot start the {where}: port {port} is already in "
              "use on this host (another run?). Stop it or pick another port "
              "in coordinator_address, the same on every process.") from None
    return
  deadline = time.time() + settings.timeout_seconds
  last_error: Exception | None = None
  while time.time() < deadline:
    try:
      with socket.create_connection(
          (host, port), timeout=max(min(2.0, deadline - time.time()), 0.1)):
        return
    except OSError as e:
      last_error = e
      time.sleep(0.25)
  raise DistributedInitError(
      f"Could not reach the {where} within {settings.timeout_seconds}s "
      f"({type(last_error).__name__}: {last_error}). {_WHAT_TO_CHECK}")


def initialize(dist_config) -> bool:
  """Starts jax.distributed if this run spans several processes.

  `dist_config`: config.distributed (None when the config has none).
  Returns True if it was started here. Must run before any jax device use.
  """
  if jax.distributed.is_initialized():
    return False
  settings = resolve(dist_config)
  if settings is None:
    return False
  where = ("the Cloud TPU slice's coordinator (from the VM metadata)"
           if settings.auto else
           f"coordinator {settings.coordinator_address} as process "
           f"{settings.process_id} of {settings.num_processes}")
  if not settings.auto:
    _check_coordinator(settings)
  logging.info(
      "Starting jax.distributed with %s (timeout %ds). If this process then "
      "aborts with DEADLINE_EXCEEDED, not every process reached the "
      "coordinator in time. %s", where, settings.timeout_seconds,
      _WHAT_TO_CHECK)
  try:
    if settings.auto:
      jax.distributed.initialize(
          initialization_timeout=settings.timeout_seconds)
    else:
      jax.distributed.initialize(
          coordinator_address=settings.coordinator_address,
          num_processes=settings.num_processes,
          process_id=settings.process_id,
          initialization_timeout=settings.timeout_seconds)
  except Exception as e:  # jax raises XlaRuntimeError, ValueError, ...
    raise DistributedInitError(
        f"Could not join {where} within {settings.timeout_seconds}s "
        f"({type(e).__name__}: {str(e).strip()[:300]}). {_WHAT_TO_CHECK}"
        ) from e
  logging.info("jax.distributed up: process %d of %d, %d local / %d global "
               "devices.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op alone)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def validate(dist_config) -> None:
  """config.distributed (absent = single host)."""
  if dist_config is None:
    return
  if dist_config.initialization_timeout <= 0:
    fail("distributed.initialization_timeout",
         dist_config.initialization_timeout, "must be > 0 seconds")
  if dist_config.num_processes < 0:
    fail("distributed.num_processes", dist_config.num_processes,
         "must be >= 0 (0 = from the environment or auto)")
  if (dist_config.num_processes
      and not -1 <= dist_config.process_id < dist_config.num_processes):
    fail("distributed.process_id", dist_config.process_id,
         f"must be in [0, num_processes={dist_config.num_processes})")
