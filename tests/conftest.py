"""Suite-wide test setup."""

import gc
import importlib.util
import os

# Before jax is imported. libtpu (the `tpu` extra) only compiles for TPU slices here: it must never ask the cloud
# metadata server, and no TPU client may start (it would look for TPU chips and hosts); the suite runs on the CPU.
os.environ["TPU_SKIP_MDS_QUERY"] = "1"
_LIBTPU = importlib.util.find_spec("libtpu") is not None
if _LIBTPU:
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"    # compile-only: no chips to share, so no lock on them

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Eight simulated CPU devices for the sharding tests (meshes data:8, data:2,fsdp:2,tensor:2, ...); every other test
# runs on the default device as before. Set before any backend starts (measured: no change in the suite's speed).
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees a test module's compiled XLA programs once it is done.

  A whole-suite run otherwise keeps thousands of CPU executables alive, each holding memory mappings, until the
  process reaches the kernel's limit on mappings (vm.max_map_count, 65530 on this machine) and XLA crashes while
  compiling the next program.
  """
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture
def float32_matmul():
  """Full float32 matmuls for one test, as the parity references compute (a module takes it for every test with
  `pytestmark = pytest.mark.usefixtures("float32_matmul")`)."""
  with jax.default_matmul_precision("float32"):
    yield


def pytest_addoption(parser):
  parser.addoption("--tpu", action="store_true",
                   help="also run the tests marked tpu (TPU compiles through libtpu: bash scripts/venv.sh tpu)")


def pytest_collection_modifyitems(config, items):
  """Tests marked tpu are deselected (counted in pytest's 'deselected') unless --tpu is given; with --tpu and no
  libtpu the run stops at once: they are never skipped silently."""
  if config.getoption("--tpu"):
    if not _LIBTPU:
      raise pytest.UsageError("--tpu: libtpu is not installed in this environment (bash scripts/venv.sh tpu)")
    return
  kept, dropped = [], []
  for item in items:
    (dropped if item.get_closest_marker("tpu") else kept).append(item)
  if dropped:
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept
