"""Matmuls for mixed precision: bfloat16 inputs, float32 accumulation.

`einsum_f32(eq, a, b)` multiplies a and b as they are (bfloat16 under the
bfloat16 compute policy) and returns the float32 accumulation, for the
places where the result feeds something that wants float32: attention
scores and the softmax, the probabilities x values sum before its
division, the vocabulary logits. A plain `preferred_element_type=float32`
einsum would do the forward the same, but its backward pass multiplies the
float32 cotangent with the bfloat16 operand, a float32 matmul in disguise;
here the cotangent is cast to the operands' dtype first, so the backward
matmuls run in bfloat16 too (what every other matmul of the model does).
In float32 the cast is the identity and this is the plain einsum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)


def _forward(equation, a, b):
  return einsum_f32(equation, a, b), (a, b)


def _backward(equation, residuals, cotangent):
  a, b = residuals
  _, pullback = jax.vjp(lambda x, y: jnp.einsum(equation, x, y), a, b)
  return pullback(cotangent.astype(jnp.result_type(a, b)))


einsum_f32.defvjp(_forward, _backward)
