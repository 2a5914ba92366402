"""TPU targets and what a compiled program moves: slice topologies with their chips' HBM, and the collectives of an
HLO text. Plain Python (no libtpu, no jax): `experiments.tpu_compile` reads both around its compiles.

    topo = tpu_targets.parse_topology("v5e:2x4")        # Topology(generation="v5e", dims=(2, 4), chips=8, ...)
    tpu_targets.check_mesh({"data": 1, "fsdp": 8, "tensor": 1}, topo)      # None, or why it does not fit
    found = tpu_targets.collectives(compiled.as_text(), weights)           # counts, and the weights all-gathered

HBM per chip is Google's published capacity in GiB (Cloud TPU system architecture pages): v4 32, v5e 16, v5p 95,
v6e 32. A compiler reserves a little of it (libtpu's v5e limit reads 15.75 GiB in its out-of-memory errors), so
a program within a few hundred MB of the table's number is not known to fit until it compiles.

Devices: libtpu's compile-only topology has one device per chip for v5e, v5p and v6e, and one per TensorCore for v4
(two per chip, each with half the chip's HBM and compute: measured, `v4:2x2x1` gives 8 devices, `core_on_chip` 0
and 1 on each chip's coordinates). A mesh covers the devices; memory and rates below are per device.

Peak rates per chip, the same pages: bf16 FLOP/s v4 275e12, v5e 197e12, v5p 459e12, v6e 918e12; HBM bytes/s v4
1200e9, v5e 819e9, v5p 2765e9, v6e 1640e9. They feed `hlo_cost.program_cost`'s roofline, an estimate for ranking
programs, never a measurement.
"""

import math
import re
from typing import Mapping, NamedTuple

__all__ = ["HBM_BYTES", "PEAK_BF16_FLOPS", "HBM_BYTES_PER_S", "DEVICES_PER_CHIP", "GENERATIONS", "Topology", "parse_topology", "check_mesh", "COLLECTIVES", "Collectives",
           "collectives", "while_loops", "tiled_bytes", "program_bytes"]

GiB = 2**30
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
PEAK_BF16_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
HBM_BYTES_PER_S = {"v4": 1200e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}
DEVICES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 1, "v6e": 1}
GENERATIONS = tuple(HBM_BYTES)
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
# Chip grids: v5e and v6e slices are 2-D (rows x columns of chips), v4 and v5p 3-D (one device per chip, megacore).
_RANK = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}


class Topology(NamedTuple):
  name: str                 # as libtpu spells it: "v5e:2x4", "v5p:2x2x1"
  generation: str           # a key of HBM_BYTES
  dims: tuple[int, ...]     # the chip grid
  chips: int                # chips of the slice
  hbm_bytes: int            # per device
  devices: int              # devices of libtpu's compile-only topology (v4: one per TensorCore, two per chip)
  peak_flops: float         # bf16 FLOP/s per device
  hbm_bytes_per_s: float    # per device


def parse_topology(name: str) -> Topology:
  """"v5e:2x4" -> Topology; ValueError naming the known generations and the expected grid for anything else."""
  generation, sep, grid = str(name).strip().partition(":")
  generation = _ALIASES.get(generation.lower(), generation.lower())
  if not sep or generation not in HBM_BYTES:
    raise ValueError(f"--topology {name!r}: expected GENERATION:GRID with a generation of {', '.join(GENERATIONS)} "
                     f"(e.g. v5e:2x4, v5p:2x2x1)")
  try:
    dims = tuple(int(d) for d in grid.lower().split("x"))
  except ValueError:
    dims = ()
  rank = _RANK[generation]
  if len(dims) != rank or any(d < 1 for d in dims):
    example = "x".join(["2"] * rank)
    raise ValueError(f"--topology {name!r}: a {generation} slice is a {rank}-D grid of chips, e.g. "
                     f"{generation}:{example}")
  per = DEVICES_PER_CHIP[generation]
  return Topology(f"{generation}:{'x'.join(map(str, dims))}", generation, dims, math.prod(dims),
                  HBM_BYTES[generation] // per, math.prod(dims) * per, PEAK_BF16_FLOPS[generation] / per,
                  HBM_BYTES_PER_S[generation] / per)


def check_mesh(sizes: Mapping[str, int], topology: Topology) -> str | None:
  """Why a mesh of `sizes` ({axis: size}) cannot cover `topology`'s devices, or None when it does exactly."""
  devices = math.prod(sizes.values())
  if devices != topology.devices:
    axes = " x ".join(f"{a} {s}" for a, s in sizes.items())
    unit = "chips" if topology.devices == topology.chips else f"devices ({topology.chips} chips, two TensorCores each)"
    return (f"mesh {axes} has {devices} devices, the {topology.name} slice {topology.devices} {unit}; the axis sizes "
            "must multiply to the device count")
  return None


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# An instruction line of HLO text: "%name = SHAPE op(", SHAPE an array "bf16[8,128]{1,0:T(8,128)}" or a tuple of
# them (the async "-start" forms return (operand, result, ...)). "-done" halves are not counted: one per start.
_INSTRUCTION = re.compile(r"=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


class Collectives(NamedTuple):
  counts: dict[str, int]                # every name of COLLECTIVES -> instructions in the text
  weight_gathers: tuple[str, ...]       # weights whose whole shape an all-gather returns (sorted, once each)


def _squeeze(dims: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(d for d in dims if d != 1)


def collectives(hlo_text: str, weights: Mapping[str, tuple[str, tuple[int, ...]]] = ()) -> Collectives:
  """Counts the collective instructions of an HLO text (`compiled.as_text()`: the partitioned program) and names the
  weights an all-gather gathers whole.

  weights: {name: (dtype as HLO writes it, "bf16" / "f32", whole shape)}; pass a stacked parameter's per-layer shape
  as a second entry to catch FSDP's gather of one layer. A gather matches a weight when its result (or, for the async
  form, any array of its result tuple) has the weight's dtype and shape up to size-1 dimensions. A gather that
  reshapes the weight on the way is not matched (none seen here); an activation of a weight's exact shape would be.
  """
  counts = dict.fromkeys(COLLECTIVES, 0)
  by_shape: dict[tuple[str, tuple[int, ...]], list[str]] = {}
  for name, (dtype, shape) in dict(weights).items():
    by_shape.setdefault((dtype, _squeeze(tuple(shape))), []).append(name)
  gathered = set()
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.search(line)
    if not m:
      continue
    counts[m.group("op")] += 1
    if m.group("op") != "all-gather":
      continue
    for dtype, dims in _ARRAY.findall(m.group("shape")):
      shape = _squeeze(tuple(int(d) for d in dims.split(",") if d))
      gathered.update(by_shape.get((dtype, shape), ()))
  return Collectives(counts, tuple(sorted(gathered)))


def while_loops(hlo_text: str) -> int:
  """While instructions in an HLO text. XLA's cost analysis counts a loop's body once, whatever its trip count
  (measured on libtpu 0.0.42.1: a 10-step `lax.scan` of a matmul reports a tenth of the unrolled flops), so the flops,
  bytes and optimal_seconds of a program with loops (the layer scans) are those of one trip of each loop."""
  return len(re.findall(r"\swhile\(", hlo_text))


def tiled_bytes(shape: tuple[int, ...], itemsize: int, major_to_minor: tuple[int, ...] = (),
                tiling: tuple[tuple[int, ...], ...] = ()) -> int:
  """Bytes of an array of `shape` in a TPU layout (`compiled.input_formats`' Layout: the dimensions in
  `major_to_minor` order, the minor ones rounded up to the first tile, e.g. (8, 128) for float32): what XLA's memory
  analysis counts for it. A float32[32, 32] argument takes 32 x 128 x 4 bytes, a float32 scalar 512."""
  dims = [shape[i] for i in major_to_minor] if major_to_minor else list(shape)
  tile = tiling[0] if tiling else ()
  dims = [1] * (len(tile) - len(dims)) + dims      # a scalar in a (128,) tile takes 128 elements
  for k, t in enumerate(tile):
    i = len(dims) - len(tile) + k
    dims[i] = -(-dims[i] // t) * t
  return math.prod(dims) * itemsize


def program_bytes(argument: int, output: int, temp: int, alias: int) -> int:
  """Per-chip bytes a program holds at once by XLA's memory analysis: arguments + outputs + temporaries, less the
  outputs that reuse a donated argument's buffer."""
  return argument + output + temp - alias
