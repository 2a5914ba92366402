"""The cost of a compiled program from its optimized HLO text, with every loop's trip count applied.

XLA's own `compiled.cost_analysis()` counts a `while` body once whatever its trip count (a 10-step `lax.scan` of a
matmul reports a tenth of the unrolled flops), so for programs built from layer scans and greedy `lax.scan`s its
flops, bytes and `optimal_seconds` are per trip, not per program. This module reads the partitioned, optimized HLO
(`compiled.as_text()`, one chip's program) and counts again:

    cost = hlo_cost.program_cost(compiled.as_text(), peak_flops=197e12, hbm_bytes_per_s=819e9)
    cost.flops, cost.hbm_bytes, cost.seconds, cost.trips     # per chip; loops applied

- flops: 2 x multiply-adds of every `dot` and `convolution` (TPU programs express matmuls as convolutions), counting
  only the window taps that fall inside the (unpadded) input, so a convolution that batches by padding its window is
  not over-counted; elementwise arithmetic is not counted (it is a few per cent of a transformer's and runs on the
  vector units beside the MXU).
- hbm_bytes: for every kernel (each instruction of the entry computation, a loop body or a branch, a fusion being one
  kernel): its operands read and its result written, as XLA's cost analysis counts them: an operand a fusion only
  slices counts as the slice (a layer's weights taken from the stacked parameters inside the layer loop), an in-place
  `dynamic-update-slice` writes its update only. Collectives are counted apart (`collective_bytes`, their results).
- seconds: the roofline of each kernel, max(flops / peak, bytes / bandwidth), summed: a lower bound of the time on the
  chip with no overlap of kernels and no cost for collectives, for ranking programs, not a measurement.
- Each computation is weighted by how many times it runs: a while body by its trip count (the loop's
  `known_trip_count` where XLA wrote it, else read from its condition, `counter < N`, with the counter's start from
  the loop's initial tuple and its step from the body), recursively for nested loops. A loop whose count cannot be
  read counts once and is counted in `unknown_trips`; each branch of a conditional counts as if it ran
  (`branch_flops` says how much that is).

Plain Python over the text: no jax, no libtpu (tests run it on XLA:CPU programs and on libtpu's).
"""

import math
import re
from typing import NamedTuple

__all__ = ["Cost", "program_cost", "array_bytes"]

_ITEMSIZE = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
# Ops that move no data of their own (views, tuple plumbing, control flow whose bodies are counted themselves).
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency", "domain"}
_COLLECTIVE = re.compile(r"^(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute|collective-broadcast)"
                         r"(-start|-done)?$")
_SLICING = {"dynamic-slice", "slice", "gather"}


def _size(dtype: str) -> float:
  if dtype.startswith("f8") or dtype.startswith("f4"):
    return 1
  return _ITEMSIZE.get(dtype, 0)          # token[] and unknown element types move nothing countable


def array_bytes(shape_text: str) -> float:
  """Bytes of every array in an HLO shape (an array or a tuple of them), logical sizes (no tile padding)."""
  return sum(math.prod(int(d) for d in dims.split(",") if d) * _size(t) for t, dims in _ARRAY.findall(shape_text))


def _dims(shape_text: str) -> tuple[int, ...]:
  m = _ARRAY.search(shape_text)
  return tuple(int(d) for d in m.group(2).split(",") if d) if m else ()


class _Instr(NamedTuple):
  name: str
  shape: str
  op: str
  operands: tuple[str, ...]
  attrs: str
  root: bool
  literal: str        # the text between the parentheses (a constant's value)


def _split_operands(rest: str) -> tuple[str, str]:
  """'a, b), attr=...' -> ('a, b', 'attr=...'): the operand list up to its closing parenthesis."""
  depth = 1
  for i, ch in enumerate(rest):
    if ch == "(":
      depth += 1
    elif ch == ")":
      depth -= 1
      if depth == 0:
        return rest[:i], rest[i + 1:]
  return rest, ""


def _parse(text: str) -> tuple[dict[str, list[_Instr]], str]:
  comps: dict[str, list[_Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      m = _HEADER.match(line)
      if m and not line.startswith("HloModule"):
        current = m.group("name")
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is None:
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    operands, attrs = _split_operands(m.group("rest"))
    comps[current].append(_Instr(m.group("name"), m.group("shape"), m.group("op"),
                                 tuple(re.findall(r"%([\w.\-]+)", operands)), attrs,
                                 line.lstrip().startswith("ROOT"), operands))
  return comps, entry


def _called(instr: _Instr) -> list[tuple[str, str]]:
  """(role, computation) of every computation an instruction calls: body / condition / branch / fused / applied."""
  out = []
  for key, role in (("body", "body"), ("condition", "condition"), ("calls", "fused"), ("to_apply", "applied")):
    out += [(role, c) for c in re.findall(key + r"=%([\w.\-]+)", instr.attrs)]
  for key in ("branch_computations", "called_computations"):
    m = re.search(key + r"=\{([^}]*)\}", instr.attrs)
    if m:
      out += [("branch", c) for c in re.findall(r"%([\w.\-]+)", m.group(1))]
  if instr.op == "call":
    out = [("branch" if role == "applied" else role, c) for role, c in out]
  return out


def _constant(instr: _Instr | None) -> int | None:
  if instr is None or instr.op != "constant":
    return None
  m = re.fullmatch(r"\s*(-?\d+)\s*", instr.literal)
  return int(m.group(1)) if m else None


def _trip_count(loop: _Instr, comps, by_name) -> int | None:
  """Trips of a while loop: its backend_config's known_trip_count, else `counter < N` in its condition with the
  counter's start read from the loop's initial tuple (0 when it is not a constant there) and its step from the body."""
  m = re.search(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', loop.attrs)
  if m:
    return int(m.group(1))
  cond = re.search(r"condition=%([\w.\-]+)", loop.attrs)
  body = re.search(r"body=%([\w.\-]+)", loop.attrs)
  if not cond or cond.group(1) not in comps:
    return None
  local = {i.name: i for i in comps[cond.group(1)]}
  root = next((i for i in comps[cond.group(1)] if i.root), None)
  if root is None or root.op != "compare" or len(root.operands) != 2:
    return None
  direction = re.search(r"direction=(\w+)", root.attrs)
  a, b = (local.get(o) for o in root.operands)
  counter, bound, d = a, _constant(b), direction.group(1) if direction else ""
  if bound is None:                                 # N > counter
    counter, bound, d = b, _constant(a), {"GT": "LT", "GE": "LE"}.get(d, "")
  if bound is None or counter is None or counter.op != "get-tuple-element" or d not in ("LT", "LE"):
    return None
  index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
  start = 0
  init = by_name.get(loop.operands[0]) if loop.operands else None
  if init is not None and init.op == "tuple" and index < len(init.operands):
    value = _constant(by_name.get(init.operands[index]))
    start = 0 if value is None else value
  step = 1
  if body and body.group(1) in comps:
    blocal = {i.name: i for i in comps[body.group(1)]}
    broot = next((i for i in comps[body.group(1)] if i.root), None)
    if broot is not None and broot.op == "tuple" and index < len(broot.operands):
      nxt = blocal.get(broot.operands[index])
      if nxt is not None and nxt.op == "add":
        steps = [_constant(blocal.get(o)) for o in nxt.operands]
        step = next((s for s in steps if s), 1)
  span = bound - start + (1 if d == "LE" else 0)
  return max(0, -(-span // max(step, 1)))


def _conv_flops(instr: _Instr, by_name) -> float:
  """2 x the multiply-adds of a convolution, counting only window taps inside the unpadded input."""
  lhs, rhs = (by_name.get(o) for o in instr.operands[:2])
  if lhs is None or rhs is None:
    return 0.0
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
  if not labels:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  lhs_d, rhs_d, out_d = _dims(lhs.shape), _dims(rhs.shape), _dims(instr.shape)
  window = re.search(r"window=\{([^}]*)\}", instr.attrs)
  fields = dict(re.findall(r"(\w+)=([\w\-x]+)", window.group(1))) if window else {}
  spatial = [c for c in out_l if c.isdigit()]

  def field(name, k, default):
    v = fields.get(name)
    return default if v is None else v.split("x")[k]

  taps = 1
  for k, c in enumerate(sorted(spatial, key=int)):
    size = rhs_d[rhs_l.index(c)]
    n_in, n_out = lhs_d[lhs_l.index(c)], out_d[out_l.index(c)]
    stride, lhs_dil, rhs_dil = (int(field(f, k, 1)) for f in ("stride", "lhs_dilate", "rhs_dilate"))
    pad_lo = int(field("pad", k, "0_0").split("_")[0])
    extent = (n_in - 1) * lhs_dil + 1
    valid = 0
    for t in range(size):           # outputs o whose input index o * stride - pad_lo + t * rhs_dil is inside
      shift = t * rhs_dil - pad_lo
      if lhs_dil == 1:
        lo, hi = max(0, -(shift // stride)), min(n_out - 1, (extent - 1 - shift) // stride)
        valid += max(0, hi - lo + 1)
      else:
        valid += sum(0 <= o * stride + shift < extent and (o * stride + shift) % lhs_dil == 0 for o in range(n_out))
    taps *= valid
  batch_feature = out_d[out_l.index("b")] * out_d[out_l.index("f")]
  in_features = rhs_d[rhs_l.index("i")]
  return 2.0 * batch_feature * taps * in_features


def _dot_flops(instr: _Instr, by_name) -> float:
  lhs = by_name.get(instr.operands[0]) if instr.operands else None
  if lhs is None:
    return 0.0
  m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
  dims = _dims(lhs.shape)
  contract = math.prod(dims[int(i)] for i in m.group(1).split(",") if i) if m else 1
  return 2.0 * math.prod(_dims(instr.shape)) * contract


def _aliased(instr: _Instr) -> dict[int, int]:
  """{output tuple index: operand index} of a fusion's output_to_operand_aliasing (outputs computed in place)."""
  m = re.search(r"output_to_operand_aliasing=\{(.*?)\}\s*(?:,\s*[a-z_]+=|$)", instr.attrs)
  if not m:
    return {}
  return {int(o or 0): int(k) for o, k in re.findall(r"\{(\d*)\}:\s*\((\d+),", m.group(1))}


def _read_bytes(comps, fused_name: str, index: int, full: float, depth: int = 0) -> float:
  """Bytes a fused computation reads of its parameter `index` (whole size `full`): only the slices when every use
  (through bitcasts and nested fusions) slices it, nothing when it is only passed through, an operand of a collective
  (counted apart) or the buffer of an in-place update; else all of it."""
  fused = comps.get(fused_name, [])
  param = next((i.name for i in fused if i.op == "parameter" and i.literal.strip() == str(index)), None)
  if param is None or depth > 8:
    return full
  users: dict[str, list[_Instr]] = {}
  for i in fused:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  total, stack, seen = 0.0, [param], set()
  while stack:
    name = stack.pop()
    if name in seen:
      continue
    seen.add(name)
    for u in users.get(name, []):
      if u.op in ("bitcast", "get-tuple-element"):
        stack.append(u.name)
      elif u.op in ("tuple",) or _COLLECTIVE.match(u.op):
        continue
      elif u.op == "dynamic-update-slice" and u.operands[0] == name:
        continue
      elif u.op in _SLICING and u.operands[0] == name:
        total += array_bytes(u.shape)
      elif u.op == "fusion" and re.search(r"calls=%([\w.\-]+)", u.attrs):
        inner = re.search(r"calls=%([\w.\-]+)", u.attrs).group(1)
        total += sum(_read_bytes(comps, inner, k, full, depth + 1) for k, o in enumerate(u.operands) if o == name)
      else:
        return full
  return min(total, full)


def _fusion_bytes(instr: _Instr, comps, by_name) -> float:
  """Operands read and results written by one fusion kernel (`_read_bytes` for each operand). An output computed in
  place counts its update (a dynamic-update-slice's) or nothing when it is an operand passed through. An operand
  updated in place (aliased to an output) counts its slices only: an in-place elementwise update of a whole buffer
  would be under-counted (inference programs update caches and collective buffers by slices)."""
  name = re.search(r"calls=%([\w.\-]+)", instr.attrs).group(1)
  fused = comps[name]
  local = {i.name: i for i in fused}

  def source(n):               # through bitcasts and copies to what computes it
    i = local.get(n)
    while i is not None and i.op in ("bitcast", "copy") and i.operands:
      i = local.get(i.operands[0])
    return i

  def written(n, shape):
    i = source(n)
    if i is not None and (i.op in ("parameter", "custom-call") or _COLLECTIVE.match(i.op)):
      return 0.0          # passed through, or a collective's result (collective_bytes; an async one's custom-call)
    if i is not None and i.op == "dynamic-update-slice" and len(i.operands) > 1 and i.operands[1] in local:
      return array_bytes(local[i.operands[1]].shape)
    return array_bytes(shape) if shape is not None else 0.0

  root = next((i for i in fused if i.root), None)
  total = 0.0
  if root is not None and root.op == "tuple":
    total += sum(written(e, local[e].shape if e in local else None) for e in root.operands)
  elif root is not None:
    total += written(root.name, root.shape)
  aliased = set(_aliased(instr).values())
  for k, operand in enumerate(instr.operands):
    full = array_bytes(by_name[operand].shape) if operand in by_name else 0.0
    read = _read_bytes(comps, name, k, full)
    total += read if not (k in aliased and read == full) else 0.0
  return total


def _kernel_bytes(instr: _Instr, comps, by_name) -> float:
  if instr.op == "fusion":
    fused = re.search(r"calls=%([\w.\-]+)", instr.attrs)
    if fused and fused.group(1) in comps:
      return _fusion_bytes(instr, comps, by_name)
  if instr.op in ("dynamic-slice", "slice"):
    return 2 * array_bytes(instr.shape)
  if instr.op == "dynamic-update-slice" and len(instr.operands) > 1 and instr.operands[1] in by_name:
    return 2 * array_bytes(by_name[instr.operands[1]].shape)
  return array_bytes(instr.shape) + sum(array_bytes(by_name[o].shape) for o in instr.operands if o in by_name)


def _channel(instr: _Instr) -> str:
  m = re.search(r"channel_id=(\d+)", instr.attrs)
  return m.group(1) if m else instr.name


def _collective_result(instr: _Instr) -> float:
  """Bytes a collective delivers: its largest result array (an async start's tuple holds operand and result)."""
  arrays = [array_bytes(f"{t}[{d}]") for t, d in _ARRAY.findall(instr.shape)]
  return max(arrays) if arrays else 0.0


class Cost(NamedTuple):
  flops: float                   # dot and convolution flops, loops applied
  hbm_bytes: float               # kernels' operands read + results written, loops applied
  collective_bytes: float        # results of the collectives, loops applied
  seconds: float                 # sum of each kernel's roofline max(flops / peak, bytes / bandwidth), loops applied
  loops: int                     # while instructions
  trips: tuple[int, ...]         # each loop's trip count as read (unknown ones count once)
  unknown_trips: int             # loops whose count could not be read
  branch_flops: float            # flops inside conditional branches (each branch counted as if it ran)
  top: tuple[tuple[float, float, float, str, str], ...] = ()   # (seconds, flops, bytes, computation, kernel), largest


def program_cost(hlo_text: str, peak_flops: float = 1.0, hbm_bytes_per_s: float = 1.0, top: int = 0) -> Cost:
  """The loop-aware cost of one chip's optimized HLO module (see the module docstring)."""
  comps, entry = _parse(hlo_text)
  if entry not in comps:
    raise ValueError("HLO text has no ENTRY computation (pass compiled.as_text() of one module)")
  by_name = {i.name: i for body in comps.values() for i in body}
  # Roles: kernel-level computations (entry, loop bodies and conditions, branches) have their instructions as
  # kernels; fused computations add flops to the kernel that calls them; applied ones (reducers) are scalar.
  weight: dict[str, float] = {entry: 1.0}
  kind = {entry: "kernels"}
  trips, unknown, branches = [], 0, set()
  order, seen = [], set()

  def visit(c):
    if c in seen or c not in comps:
      return
    seen.add(c)
    for instr in comps[c]:
      for _, child in _called(instr):
        visit(child)
    order.append(c)
  visit(entry)
  for c in reversed(order):           # callers before callees
    w = weight.get(c, 0.0)
    for instr in comps[c]:
      n = None
      if instr.op == "while":
        n = _trip_count(instr, comps, by_name)
        trips.append(n if n is not None else 1)
        unknown += n is None
      for role, child in _called(instr):
        factor = {"body": n if n is not None else 1, "condition": (n if n is not None else 1) + 1}.get(role, 1)
        weight[child] = weight.get(child, 0.0) + w * factor
        kind.setdefault(child, {"fused": "fused", "applied": "applied"}.get(role, "kernels"))
        if role == "branch" and instr.op == "conditional":
          branches.add(child)

  flops_of: dict[str, float] = {}

  def comp_flops(c):          # flops of one run of a fused computation, nested fusions included
    if c not in flops_of:
      flops_of[c] = sum(_own_flops(i) for i in comps.get(c, ()))
    return flops_of[c]

  def _own_flops(i):
    if i.op == "convolution":
      return _conv_flops(i, by_name)
    if i.op == "dot":
      return _dot_flops(i, by_name)
    if i.op == "fusion" or (i.op == "custom-call" and "calls=" in i.attrs):
      return sum(comp_flops(child) for role, child in _called(i) if role == "fused")
    return 0.0

  collectives_of: dict[str, dict[str, float]] = {}

  def comp_collectives(c):   # {channel: result bytes} of the collectives inside a fused computation, nested included
    if c not in collectives_of:
      found = {}
      for i in comps.get(c, ()):
        if _COLLECTIVE.match(i.op):
          found[_channel(i)] = _collective_result(i)
        for r, ch in _called(i):
          if r == "fused":
            found.update(comp_collectives(ch))
      collectives_of[c] = found
    return collectives_of[c]

  flops = hbm = coll = seconds = in_branches = 0.0
  kernels = []
  for c in order:
    if kind.get(c) != "kernels":
      continue
    w = weight.get(c, 0.0)
    channels: dict[str, float] = {}     # an async collective's start and done (and their fusions) are one transfer
    for instr in comps[c]:
      if instr.op in _FREE or (instr.op.endswith("-done") and not _COLLECTIVE.match(instr.op)) or (
          instr.op == "custom-call" and "AllocateBuffer" in instr.attrs):
        continue
      if _COLLECTIVE.match(instr.op):
        channels[_channel(instr)] = _collective_result(instr)
        continue
      moved = {}
      for role, child in _called(instr):
        if role == "fused":
          moved.update(comp_collectives(child))
      if moved:                         # a fusion around a collective: an async start or done, a collective matmul
        channels.update(moved)
        if not _own_flops(instr):
          continue
      f = _own_flops(instr)
      b = _kernel_bytes(instr, comps, by_name)
      flops += w * f
      in_branches += w * f if c in branches else 0.0
      hbm += w * b
      seconds += w * max(f / peak_flops, b / hbm_bytes_per_s)
      if top:
        kernels.append((w * max(f / peak_flops, b / hbm_bytes_per_s), w * f, w * b, c, instr.name))
    coll += w * sum(channels.values())
  kernels.sort(reverse=True)
  return Cost(flops, hbm, coll, seconds, len(trips), tuple(trips), unknown, in_branches, tuple(kernels[:top]))
