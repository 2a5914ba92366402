"""Where this runner process stands in a sharded, possibly multi-host run: its rows, its arrays, its share of I/O.

    hosts = hosts_lib.start(mesh="data:2,fsdp:2,tensor:2")                   # one host, 8 devices
    hosts = hosts_lib.start(mesh="data:-1", distributed=True)                # every host of a TPU slice, same command
    hosts = hosts_lib.start(mesh="data:4", coordinator="10.0.0.1:1234", num_processes=2, process_id=0)

JAX's multi-controller model (`../shared/SCALE_PERF.md` C.4, big_vision's evaluators): every process runs the same
program on the same sequence of global batches. A global batch of B rows is split over the mesh's batch axes
(data x fsdp); each process encodes only the rows its own devices hold (`local_rows`: read from the batch sharding,
so the split is deterministic and follows the devices), and `assemble` builds the global arrays from those local
rows. The large array (pixel_values) stays a global array of local shards; the small per-row arrays (token ids,
masks, image sizes, CLIP text embeddings) are gathered to every process, so every host makes the same host-side
checks and static shapes. Outputs come back with `fetch` (`multihost_utils.process_allgather` for arrays no process
holds whole).

Results: only process 0 (`writer`) opens results.jsonl; which batches are finished is read there and broadcast
(`done_flags`), so every process skips the same batches and runs the same programs; the rows of a batch are written
once by process 0, after the whole batch is gathered. A host that dies takes the job down (collectives fail); the
rerun finds the batches process 0 wrote and redoes the rest: rows are never duplicated (the log skips known keys)
and a batch cut short is recomputed whole.
"""

import contextlib
import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from models import sharding

__all__ = ["Hosts", "start", "mesh_context", "fetch", "SINGLE"]


@dataclasses.dataclass(frozen=True)
class Hosts:
  """This process's place: the mesh (None: one device, no sharding), its index and the process count."""
  mesh: Any = None
  index: int = 0
  count: int = 1

  @property
  def writer(self) -> bool:
    """Process 0 writes results, tables and pictures."""
    return self.index == 0

  def check_batch(self, batch_size: int):
    """ValueError naming --batch_size when the mesh's batch axes do not divide it."""
    if self.mesh is not None and batch_size % sharding.batch_divisor(self.mesh):
      raise ValueError(f"--batch_size={batch_size} does not split over the mesh's data x fsdp = "
                       f"{sharding.batch_divisor(self.mesh)} devices; use a multiple of "
                       f"{sharding.batch_divisor(self.mesh)}")

  def _batch_sharding(self, ndim: int) -> NamedSharding:
    return NamedSharding(self.mesh, sharding.batch_spec(ndim))

  def local_rows(self, batch_size: int) -> list[int]:
    """The rows of a global batch of `batch_size` that this process's devices hold (all rows without a mesh)."""
    if self.mesh is None:
      return list(range(batch_size))
    index_map = self._batch_sharding(1).addressable_devices_indices_map((batch_size,))
    rows = set()
    for (rows_slice,) in index_map.values():
      rows.update(range(*rows_slice.indices(batch_size)))
    return sorted(rows)

  def global_array(self, local: np.ndarray, batch_size: int) -> jax.Array:
    """The global batch-sharded array whose rows `local_rows(batch_size)` are `local` (in that order)."""
    rows = self.local_rows(batch_size)
    if len(local) != len(rows):
      raise ValueError(f"this process holds rows {rows} of the batch, got {len(local)} local rows")
    where = {r: i for i, r in enumerate(rows)}
    shape = (batch_size,) + tuple(local.shape[1:])

    def shard(index):
      picked = [where[r] for r in range(*index[0].indices(batch_size))]
      return local[picked][(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback(shape, self._batch_sharding(local.ndim), shard)

  def assemble(self, local: Mapping[str, np.ndarray], batch_size: int) -> dict[str, Any]:
    """A batch of local rows -> pixel_values as a global array, every other (small, per-row) array whole on every
    process. Without a mesh the arrays are returned as they are."""
    if self.mesh is None:
      return dict(local)
    out = {}
    for name, value in local.items():
      value = np.asarray(value)
      if name == "pixel_values":
        out[name] = self.global_array(value, batch_size)
      elif self.count == 1:
        out[name] = value
      else:
        out[name] = fetch(self.global_array(value, batch_size))
    return out

  def max(self, value: int) -> int:
    """The largest `value` over the processes (static shapes every process must agree on)."""
    if self.count == 1:
      return int(value)
    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int64))))

  def done_flags(self, log, keys: Sequence[Sequence[str]]) -> list[bool]:
    """For each batch (its row keys), whether process 0's log holds every row; the same answer on every process."""
    flags = np.asarray([bool(log is not None and all(log.done(k) for k in batch)) for batch in keys], bool)
    if self.count > 1:
      flags = np.asarray(multihost_utils.broadcast_one_to_all(flags, is_source=self.writer), bool)
    return flags.tolist()


SINGLE = Hosts()


def fetch(x) -> np.ndarray:
  """A (possibly global) array as numpy, whole, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def start(mesh: str | None = None, *, distributed: bool = False, coordinator: str | None = None,
          num_processes: int | None = None, process_id: int | None = None) -> Hosts:
  """Joins the processes (`jax.distributed.initialize`: explicitly with a coordinator address, or discovered on
  Cloud TPU / Slurm / Kubernetes with `distributed`) and builds the mesh; the caller runs under
  `with jax.set_mesh(hosts.mesh)`. Call before any other use of the devices. Several processes need a mesh (default
  data:-1, every device on the batch).

  Raises ValueError naming the flag for an incomplete process description, a coordinator address that is not
  host:port, or a mesh that does not fit.
  """
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together (all three, or "
                       "--distributed to discover them)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
    _check_address(coordinator)
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif distributed:
    jax.distributed.initialize()
  count = jax.process_count()
  if mesh is None and count > 1:
    mesh = "data:-1"
  made = sharding.make_mesh(mesh) if mesh is not None else None
  return Hosts(mesh=made, index=jax.process_index(), count=count)


def _check_address(address: str):
  """ValueError naming --coordinator_address unless it reads host:port (jax.distributed fails inside on others)."""
  host, _, port = address.rpartition(":")
  bare_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
  if not host or bare_ipv6 or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator_address={address!r} must read host:port (e.g. 10.0.0.1:1234, [::1]:1234), "
                     "the port in 1..65535")


def mesh_context(hosts: Hosts):
  """`jax.set_mesh(hosts.mesh)` as a context (nothing without a mesh): traced programs see the mesh inside it."""
  return contextlib.nullcontext() if hosts.mesh is None else jax.set_mesh(hosts.mesh)
