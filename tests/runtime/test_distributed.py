"""kdjax.runtime.distributed in this process: settings from config fields and
the environment, the coordinator port check (several real processes:
tests/e2e/test_multihost.py)."""

import socket

import pytest

from kdjax.core import config as config_lib
from kdjax.runtime import distributed
from conftest import load_config


def _digits(data_dir, **changes):
  config = load_config("digits", "tiny")
  config.data.data_dir = data_dir
  return config_lib.set_fields(config, changes)


def test_distributed_settings_from_fields_and_environment():
  none = distributed.resolve(None, environ={}, on_tpu=False)
  assert none is None
  env = {distributed.ENV_ADDRESS: "10.0.0.2:8476",
         distributed.ENV_NUM_PROCESSES: "4", distributed.ENV_PROCESS_ID: "3"}
  s = distributed.resolve(None, environ=env, on_tpu=False)
  assert (s.coordinator_address, s.num_processes, s.process_id) == (
      "10.0.0.2:8476", 4, 3)
  # Config fields win over the environment.
  config = _digits("", **{"distributed.process_id": 1})
  assert distributed.resolve(config.distributed, environ=env,
                             on_tpu=False).process_id == 1
  # A Cloud TPU VM: jax.distributed.initialize() with no arguments.
  config.distributed.process_id = -1
  assert distributed.resolve(config.distributed, environ={}, on_tpu=True).auto
  # ... unless told there is one process.
  config.distributed.num_processes = 1
  assert distributed.resolve(config.distributed, environ={}, on_tpu=True) is None
  with pytest.raises(distributed.DistributedInitError,
                     match="config.distributed.process_id is not"):
    distributed.resolve(None, environ={distributed.ENV_ADDRESS: "h:1",
                                       distributed.ENV_NUM_PROCESSES: "2"})
  with pytest.raises(distributed.DistributedInitError, match="needs a port"):
    distributed.resolve(None, environ=dict(env, **{
        distributed.ENV_ADDRESS: "10.0.0.2"}))
  with pytest.raises(distributed.DistributedInitError,
                     match="no coordinator address"):
    distributed.resolve(None, environ={distributed.ENV_NUM_PROCESSES: "2",
                                       distributed.ENV_PROCESS_ID: "1"})


def test_coordinator_port_in_use_is_named_before_jax_starts():
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(distributed.DistributedInitError,
                       match=f"port {port} is already in use"):
      distributed._check_coordinator(distributed.Settings(  # pylint: disable=protected-access
          f"127.0.0.1:{port}", num_processes=2, process_id=0))
    # A peer only needs something listening there.
    distributed._check_coordinator(distributed.Settings(  # pylint: disable=protected-access
        f"127.0.0.1:{port}", num_processes=2, process_id=1, timeout_seconds=5))
