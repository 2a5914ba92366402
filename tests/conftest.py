"""Suite-wide test setup."""

import gc

import jax
import pytest

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
