"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A tfds data dir shared by the session; shipped datasets prepare on first use."""
  path = tmp_path_factory.mktemp("tfds")
  os.environ["TFDS_DATA_DIR"] = str(path)
  return str(path)


@pytest.fixture
def digits_config(data_dir):
  """The real digits config at its 'tiny' preset, unlocked for edits."""
  import digits  # pylint: disable=g-import-not-at-top
  config = digits.get_config("tiny")
  config.data.data_dir = data_dir
  return config
