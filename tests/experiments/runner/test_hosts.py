"""`hosts.start`'s flag checks: an explicit multi-process launch is refused before jax.distributed is touched."""

import jax
import pytest
from absl import app

import runner_helpers


@pytest.fixture
def no_distributed(monkeypatch):
  """jax.distributed.initialize replaced by a call that fails the test (a bad address must never reach it)."""
  def initialize(*args, **kwargs):
    raise AssertionError(f"jax.distributed.initialize{args} was called")
  monkeypatch.setattr(jax.distributed, "initialize", initialize)


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.1:", "10.0.0.1:http", "host:70000", "::1", ":1234"])
def test_a_coordinator_address_without_a_port_is_a_flag_error(no_distributed, address):
  with pytest.raises(app.UsageError, match=r"--coordinator_address=.* must read host:port"):
    runner_helpers.run_main(f"--coordinator_address={address}", "--num_processes=2", "--process_id=0")


def test_a_well_formed_address_reaches_jax_distributed(no_distributed):
  with pytest.raises(AssertionError, match=r"initialize\('\[::1\]:1234', 2, 0\)"):
    runner_helpers.run_main("--coordinator_address=[::1]:1234", "--num_processes=2", "--process_id=0")
