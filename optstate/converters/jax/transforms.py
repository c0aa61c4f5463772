"""Optax transforms that reproduce torch.optim's formulas where stock Optax only approximates them.

Each transform is only the *scaler* of its optimizer. The caller chains everything else around
it, in torch's order:

    chain(scale(-1.0) if maximize,                  # torch negates the gradient first
          add_decayed_weights(wd) if coupled L2,   # torch: grad = grad + wd * param
          <scaler>,
          add_decayed_weights(wd) if decoupled,    # torch: param *= 1 - lr * wd
          scale_by_learning_rate(lr))

so every update returned here is the direction that torch multiplies by ``-lr``. Each transform
keeps a state type of its own (fields as in the stock Optax state it mirrors), so that a converter
finding states by type never takes a stock state, made by a different formula, for a torch-exact
one.

>>> import jax.numpy as jnp, optax
>>> tx = optax.chain(scale_by_amsgrad_torch(), optax.scale_by_learning_rate(1e-3))
>>> type(tx.init({"w": jnp.zeros(2)})[0]).__name__
'ScaleByAmsgradTorchState'

Scalars derived from the step (bias corrections, NAdam's momentum schedule, Adafactor's decay)
are computed in float64 when ``jax_enable_x64`` is on, because torch computes them as Python
floats; Optax computes some of them in float32, which is one of the gaps closed here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "FactoredTorchState",
    "ScaleByAmsgradTorchState",
    "ScaleByLrDecayTorchState",
    "ScaleByMuonTorchState",
    "ScaleByNadamTorchState",
    "ScaleByRAdamTorchState",
    "ScaleByRStdDevTorchState",
    "ScaleByRelativeStepTorchState",
    "ScaleByRmsTorchState",
    "ScaleByRssTorchState",
    "scale_by_adafactor_torch",
    "scale_by_amsgrad_torch",
    "scale_by_lr_decay_torch",
    "scale_by_muon_torch",
    "scale_by_nadam_torch",
    "scale_by_radam_torch",
    "scale_by_relative_step_torch",
    "scale_by_rms_torch",
    "scale_by_rss_torch",
]


# Each torch-exact transform keeps its own state type, with the fields of the stock Optax state it
# mirrors: a converter finds states by type, so a stock state (a different formula) is never taken
# for a torch-exact one.
class ScaleByAmsgradTorchState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in Optax's states
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates  # max of the raw second moment (torch's max_exp_avg_sq)


class ScaleByRssTorchState(NamedTuple):
    sum_of_squares: optax.Updates


class ScaleByRAdamTorchState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in Optax's states
    mu: optax.Updates
    nu: optax.Updates


class FactoredTorchState(NamedTuple):
    """State of :func:`scale_by_adafactor_torch`, laid out as stock Optax's ``FactoredState``.

    For a parameter with ``ndim >= 2`` of shape ``[..., n, m]``: ``v_row`` = torch ``row_var``
    squeezed on its last axis (shape ``[..., n]``), ``v_col`` = torch ``col_var`` squeezed on its
    second-last axis (shape ``[..., m]``), and ``v`` is a ``(1,)`` zero placeholder. For
    ``ndim <= 1``: ``v`` = torch ``variance`` (the parameter's shape), and ``v_row`` and ``v_col``
    are ``(1,)`` zero placeholders, as in Optax. ``count`` = torch ``step``; the schedule's
    ``ScaleByScheduleState.count`` must equal it too.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in Optax's states
    v_row: optax.Updates
    v_col: optax.Updates
    v: optax.Updates


class ScaleByRmsTorchState(NamedTuple):
    nu: optax.Updates


class ScaleByRStdDevTorchState(NamedTuple):
    mu: optax.Updates
    nu: optax.Updates


# Counter-only states name their field after what they count: on disk (Orbax keeps no type names)
# a plain `count` would look like an LR schedule's.
class ScaleByLrDecayTorchState(NamedTuple):
    lr_decay_count: jax.Array


class ScaleByRelativeStepTorchState(NamedTuple):
    relative_step_count: jax.Array


def scale_by_rms_torch(alpha: float = 0.99, eps: float = 1e-8, centered: bool = False) -> optax.GradientTransformation:
    """torch RMSprop's ``g / (sqrt(square_avg [- grad_avg**2]) + eps)``.

    Stock :func:`optax.scale_by_rms` / :func:`optax.scale_by_stddev` compute this with
    ``eps_in_sqrt=False, bias_correction=False, initial_scale=0`` (their default puts eps inside the
    square root, 3.7e-5 off torch); this wraps them so the state says which formula made it.

    >>> type(scale_by_rms_torch(centered=True).init(jnp.zeros(2))).__name__
    'ScaleByRStdDevTorchState'
    """
    kwargs = dict(decay=alpha, eps=eps, initial_scale=0.0, eps_in_sqrt=False, bias_correction=False)
    inner = optax.scale_by_stddev(**kwargs) if centered else optax.scale_by_rms(**kwargs)
    stock, exact = (
        (optax.ScaleByRStdDevState, ScaleByRStdDevTorchState)
        if centered
        else (optax.ScaleByRmsState, ScaleByRmsTorchState)
    )

    def update_fn(updates, state, params=None):
        updates, inner_state = inner.update(updates, stock(**state._asdict()), params)
        return updates, exact(**inner_state._asdict())

    return optax.GradientTransformation(lambda params: exact(**inner.init(params)._asdict()), update_fn)


def _scale_by_count(factor: Callable[[jax.Array], jax.Array], state_type: type) -> optax.GradientTransformation:
    """Multiply updates by ``factor(count)`` (count = updates taken so far), then count one more."""

    def update_fn(updates, state, params=None):
        del params
        count = state[0]
        scale = factor(count)
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state_type(optax.safe_increment(count))

    return optax.GradientTransformation(lambda params: state_type(jnp.zeros([], jnp.int32)), update_fn)


def scale_by_lr_decay_torch(lr_decay: float) -> optax.GradientTransformation:
    """torch Adagrad's ``clr = lr / (1 + (step - 1) * lr_decay)``, without the lr.

    Its own count: an LR scheduler's count is the optimizer's, this one is the parameter's step.

    >>> tx = scale_by_lr_decay_torch(1.0)
    >>> updates, state = tx.update(jnp.ones(2), tx.init(jnp.ones(2)))  # step 1: lr / (1 + 0)
    >>> tx.update(jnp.ones(2), state)[0].tolist()  # step 2: lr / (1 + 1)
    [0.5, 0.5]
    """
    return _scale_by_count(lambda count: 1 / (1 + _step(count) * lr_decay), ScaleByLrDecayTorchState)


def scale_by_relative_step_torch(lr: float) -> optax.GradientTransformation:
    """torch Adafactor's step size ``min(lr, 1 / sqrt(step))``; use it in place of the learning rate.

    >>> tx = scale_by_relative_step_torch(lr=0.5)
    >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0].tolist()  # step 1: -min(0.5, 1)
    [-0.5, -0.5]
    """
    return _scale_by_count(
        lambda count: -jnp.minimum(lr, 1 / jnp.sqrt(_step(count) + 1)), ScaleByRelativeStepTorchState
    )


def _step(count: jax.Array) -> jax.Array:
    """torch's ``step`` as the float torch uses (a Python float, hence float64 under x64)."""
    return count.astype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _lerp(start: jax.Array, end: jax.Array, weight: Any) -> jax.Array:
    """``torch.lerp(start, end, weight)``.

    torch switches formula at ``|weight| = 0.5`` so that ``weight == 1`` returns ``end`` exactly;
    Optax's ``b * m + (1 - b) * g`` rounds differently.
    """
    small = start + weight * (end - start)
    large = end - (end - start) * (1 - weight)
    return jnp.where(jnp.abs(weight) < 0.5, small, large).astype(start.dtype)


def _update_moments(updates, mu, nu, b1, b2):
    """torch Adam's ``exp_avg.lerp_(g, 1 - b1)`` and ``exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)``."""
    mu = jax.tree.map(lambda g, m: _lerp(m, g, 1 - b1), updates, mu)
    nu = jax.tree.map(lambda g, v: (v * b2 + (1 - b2) * g * g).astype(v.dtype), updates, nu)
    return mu, nu


def scale_by_amsgrad_torch(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Rescale updates as ``torch.optim.Adam(amsgrad=True)`` (and ``AdamW(amsgrad=True)``) do.

    torch keeps the running maximum of the *raw* second moment and bias-corrects the maximum::

        max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq)
        denom = sqrt(max_exp_avg_sq) / sqrt(1 - b2**t) + eps
        update = (exp_avg / (1 - b1**t)) / denom

    :func:`optax.scale_by_amsgrad` instead takes the maximum of the *bias-corrected* second
    moment, so its ``nu_max`` is not torch's ``max_exp_avg_sq`` (not even up to a factor) and the
    two algorithms diverge (~3e-2 after 10 steps).

    The state is :class:`ScaleByAmsgradTorchState` with ``count`` = torch ``step``, ``mu`` =
    ``exp_avg``, ``nu`` = ``exp_avg_sq`` and ``nu_max`` = ``max_exp_avg_sq``.

    Args:
      b1: torch ``betas[0]``.
      b2: torch ``betas[1]``.
      eps: torch ``eps``, added outside the square root.

    Returns:
      A :class:`optax.GradientTransformation`.

    >>> state = scale_by_amsgrad_torch().init({"w": jnp.zeros(2)})
    >>> int(state.count), state.nu_max["w"].shape
    (0, (2,))
    """

    def init_fn(params):
        return ScaleByAmsgradTorchState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
            nu_max=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        step = _step(count)
        bias_correction1 = 1 - b1**step
        bias_correction2_sqrt = jnp.sqrt(1 - b2**step)
        mu, nu = _update_moments(updates, state.mu, state.nu, b1, b2)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)

        def direction(m, v_max):
            denom = jnp.sqrt(v_max) / bias_correction2_sqrt.astype(v_max.dtype) + eps
            return (m / bias_correction1.astype(m.dtype)) / denom

        updates = jax.tree.map(direction, mu, nu_max)
        return updates, ScaleByAmsgradTorchState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_rss_torch(
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
) -> optax.GradientTransformation:
    """Rescale updates as ``torch.optim.Adagrad`` does: ``sum += g * g; g / (sqrt(sum) + eps)``.

    :func:`optax.scale_by_rss` puts ``eps`` *inside* the square root (``g * rsqrt(sum + eps)``),
    which differs by ~eps / (2 sum**1.5): 4e-12 with torch's default eps 1e-10, 4e-5 with 1e-3.
    Like torch, and unlike Optax, a zero accumulator with ``eps=0`` gives NaN rather than 0.

    torch's ``lr_decay`` is not part of the scaler: chain :func:`scale_by_lr_decay_torch` after it,
    whose ``lr_decay_count`` is torch's ``step``.

    The state is :class:`ScaleByRssTorchState` with ``sum_of_squares`` = torch ``sum``.

    Args:
      initial_accumulator_value: torch ``initial_accumulator_value`` (default 0, Optax's is 0.1).
      eps: torch ``eps`` (default 1e-10, Optax's is 1e-7), added outside the square root.

    Returns:
      A :class:`optax.GradientTransformation`.

    >>> tx = scale_by_rss_torch(eps=0.0)
    >>> updates, state = tx.update(jnp.full(2, 2.0), tx.init(jnp.zeros(2)))
    >>> updates.tolist(), state.sum_of_squares.tolist()
    ([1.0, 1.0], [4.0, 4.0])
    """

    def init_fn(params):
        return ScaleByRssTorchState(sum_of_squares=optax.tree.full_like(params, initial_accumulator_value))

    def update_fn(updates, state, params=None):
        del params
        sum_of_squares = jax.tree.map(lambda g, s: s + g * g, updates, state.sum_of_squares)
        updates = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, sum_of_squares)
        return updates, ScaleByRssTorchState(sum_of_squares=sum_of_squares)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByNadamTorchState(NamedTuple):
    """State of :func:`scale_by_nadam_torch`, field for field torch NAdam's per-parameter state."""

    count: jax.Array  # type: ignore[assignment]  # torch `step`; an int32 scalar, like every Optax count
    mu_product: jax.Array  # torch `mu_product`, the product of mu_1..mu_t; scalar.
    mu: optax.Updates  # torch `exp_avg`.
    nu: optax.Updates  # torch `exp_avg_sq`.


def scale_by_nadam_torch(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    momentum_decay: float = 4e-3,
    mu_product_dtype: Any | None = jnp.float64,
) -> optax.GradientTransformation:
    """Rescale updates as ``torch.optim.NAdam`` does, momentum schedule included.

    torch (``_single_tensor_nadam``), with ``t`` the step after incrementing::

        mu_t      = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
        mu_next   = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
        mu_product *= mu_t                                   # stored, dtype see below
        denom = sqrt(exp_avg_sq / (1 - b2**t)) + eps
        update = (1 - mu_t) / (1 - mu_product) * g / denom
               + mu_next / (1 - mu_product * mu_next) * exp_avg / denom

    :func:`optax.nadam` / ``scale_by_adam(nesterov=True)`` has no momentum schedule and no
    ``mu_product``; it equals torch only for ``momentum_decay=inf`` (5e-2 apart at the default
    4e-3). ``decoupled_weight_decay`` is the caller's ``add_decayed_weights`` after this transform.

    ``mu_product``: torch stores it as a 0-d tensor per parameter (equal across parameters that
    share a step count) in torch's *default* dtype, i.e. **float32** unless
    ``torch.set_default_dtype(torch.float64)`` was in effect, whatever the parameter dtype. The
    rounding of that product changes the parameters by ~1e-9 over a few steps, so pass
    ``mu_product_dtype=jnp.float32`` to continue a state made under torch's float32 default. The
    product is rounded to that dtype as torch does (``mu_t`` cast first, then multiplied), and then
    read back as a float64 scalar, as torch's ``.item()`` does.

    Args:
      b1: torch ``betas[0]``.
      b2: torch ``betas[1]``.
      eps: torch ``eps``, added outside the square root.
      momentum_decay: torch ``momentum_decay`` (``psi``).
      mu_product_dtype: dtype in which ``mu_product`` is kept (float64 by default; canonicalized when
        the state is initialized, so float32 where x64 is off then).

    Returns:
      A :class:`optax.GradientTransformation` with state :class:`ScaleByNadamTorchState`.

    >>> state = scale_by_nadam_torch(mu_product_dtype=jnp.float32).init(jnp.zeros(2))
    >>> float(state.mu_product), state.mu_product.dtype.name
    (1.0, 'float32')
    """

    def init_fn(params):
        # Canonicalized when the state is made, not when the transform is: x64 may be turned on in between
        # (optstate builds a float64 template under jax.enable_x64 from a transform made outside it).
        return ScaleByNadamTorchState(
            count=jnp.zeros([], jnp.int32),
            mu_product=jnp.ones([], jax.dtypes.canonicalize_dtype(mu_product_dtype)),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        step = _step(count)
        bias_correction2 = 1 - b2**step
        mu_product, coef_grad, coef_mu = _nadam_momentum_schedule(step, state.mu_product, b1, momentum_decay)
        mu, nu = _update_moments(updates, state.mu, state.nu, b1, b2)

        def direction(g, m, v):
            denom = jnp.sqrt(v / bias_correction2.astype(v.dtype)) + eps
            return (coef_grad.astype(g.dtype) * g) / denom + (coef_mu.astype(m.dtype) * m) / denom

        updates = jax.tree.map(direction, updates, mu, nu)
        return updates, ScaleByNadamTorchState(count=count, mu_product=mu_product, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _nadam_momentum_schedule(
    step: jax.Array, mu_product: jax.Array, b1: float, momentum_decay: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """torch NAdam's momentum schedule at ``step``: the new ``mu_product``, and the coefficients of the
    gradient and of the first moment in the update."""
    mu_t = b1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    # torch multiplies its stored tensor in place by a Python float, which rounds mu_t to the
    # tensor's dtype first.
    mu_product = mu_product * mu_t.astype(mu_product.dtype)
    mu_product_value = mu_product.astype(step.dtype)
    coef_grad = (1.0 - mu_t) / (1.0 - mu_product_value)
    coef_mu = mu_next / (1.0 - mu_product_value * mu_next)
    return mu_product, coef_grad, coef_mu


def scale_by_radam_torch(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Rescale updates as ``torch.optim.RAdam`` does.

    torch (``_single_tensor_radam``), with ``t`` the step after incrementing::

        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho_t > 5:
            rect = sqrt((rho_t - 4) (rho_t - 2) rho_inf / ((rho_inf - 4) (rho_inf - 2) rho_t))
            update = exp_avg / (1 - b1**t) * sqrt(1 - b2**t) / (sqrt(exp_avg_sq) + eps) * rect
        else:
            update = exp_avg / (1 - b1**t)

    :func:`optax.scale_by_radam` adds ``eps`` to the *bias-corrected* ``sqrt(nu_hat)``, so its
    effective eps is ``eps * sqrt(1 - b2**t)`` of torch's (5e-8 apart at eps 1e-8; equal only for
    eps=0), and it rectifies at ``rho_t >= 5`` where torch needs ``> 5``.
    ``decoupled_weight_decay`` is the caller's ``add_decayed_weights`` after this transform.

    The state is :class:`ScaleByRAdamTorchState` with ``count`` = torch ``step``, ``mu`` =
    ``exp_avg`` and ``nu`` = ``exp_avg_sq``.

    Args:
      b1: torch ``betas[0]``.
      b2: torch ``betas[1]``.
      eps: torch ``eps``, added to the uncorrected ``sqrt(exp_avg_sq)``.

    Returns:
      A :class:`optax.GradientTransformation`.

    >>> tx = scale_by_radam_torch(b1=0.5)
    >>> tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))[0].tolist()  # rho_1 <= 5: the bias-corrected mean
    [1.0, 1.0]
    """
    rho_inf = 2 / (1 - b2) - 1

    def init_fn(params):
        return ScaleByRAdamTorchState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        step = _step(count)
        bias_correction1 = 1 - b1**step
        bias_correction2 = 1 - b2**step
        rectify, rect = _radam_rectification(step, bias_correction2, b2, rho_inf)
        adaptive_numerator = jnp.sqrt(bias_correction2)
        mu, nu = _update_moments(updates, state.mu, state.nu, b1, b2)

        def direction(m, v):
            m_hat = m / bias_correction1.astype(m.dtype)
            adaptive = adaptive_numerator.astype(v.dtype) / (jnp.sqrt(v) + eps)
            return jnp.where(rectify, m_hat * adaptive * rect.astype(m.dtype), m_hat)

        updates = jax.tree.map(direction, mu, nu)
        return updates, ScaleByRAdamTorchState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _radam_rectification(
    step: jax.Array, bias_correction2: jax.Array, b2: float, rho_inf: float
) -> tuple[jax.Array, jax.Array]:
    """torch RAdam's variance rectification at ``step``: whether it applies (``rho_t > 5``), and its factor."""
    rho_t = rho_inf - 2 * step * (b2**step) / bias_correction2
    rectify = rho_t > 5.0
    # The unselected branch is still evaluated; keep its sqrt argument finite and positive.
    rho_safe = jnp.where(rectify, rho_t, rho_inf)
    rect = jnp.sqrt((rho_safe - 4) * (rho_safe - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_safe))
    return rectify, rect


@dataclasses.dataclass
class _AdafactorLeaf:
    """Per-parameter result; a plain dataclass so that ``jax.tree.map`` does not descend into it."""

    update: jax.Array
    v_row: jax.Array
    v_col: jax.Array
    v: jax.Array


def scale_by_adafactor_torch(
    beta2_decay: float = -0.8,
    eps1: float | None = None,
    eps2: float = 1e-3,
    d: float = 1.0,
) -> optax.GradientTransformation:
    """Rescale updates as ``torch.optim.Adafactor`` does, except for the relative step size.

    torch (``_single_tensor_adafactor``), with ``t`` the step after incrementing::

        beta2_t = t ** beta2_decay                       # weight of the new statistic
        alpha = max(eps2, rms(param)) * min(lr, 1 / sqrt(t))
        if param.dim() > 1:                              # factor the LAST two dims
            row_var.lerp_(mean(g*g, dim=-1, keepdim), beta2_t)       # [..., n, 1]
            col_var.lerp_(mean(g*g, dim=-2, keepdim), beta2_t)       # [..., 1, m]
            var = row_var @ col_var / max(mean(row_var, dim=-2), eps1)
        else:
            variance.lerp_(g*g, beta2_t); var = variance
        u = g / sqrt(max(var, eps1**2))
        param -= alpha / max(1, rms(u) / d) * u

    This transform returns ``max(eps2, rms(param)) * u / max(1, rms(u) / d)``, so it needs
    ``params``. The caller supplies the relative step ``min(lr, 1 / sqrt(t))`` and torch's
    decoupled weight decay, which is scaled by ``lr`` and not by the relative step, after it::

        chain(scale(-1.0) if maximize,
              scale_by_adafactor_torch(beta2_decay, eps1, eps2, d),
              scale_by_relative_step_torch(lr),      # in place of scale_by_learning_rate
              add_decayed_weights(-lr * weight_decay))

    Stock :func:`optax.adafactor` gets close with ``min_dim_size_to_factor=1``,
    ``decay_rate=-beta2_decay`` and ``weight_decay_rate=lr * wd``, but computes the decay in
    float32 (1.5e-8 apart), adds ``epsilon`` to ``g*g``, normalizes by the mean of whichever
    statistic lies along the smaller dimension and factors the two *largest* dims, not the last
    two. ``eps1=None`` means ``finfo(param.dtype).eps`` for each parameter; torch takes it from
    the first parameter of the group and reuses it for the rest, which differs only when a group
    mixes dtypes.

    Args:
      beta2_decay: torch ``beta2_decay`` (negative; Optax's ``decay_rate`` is its negation).
      eps1: torch ``eps[0]``, clamp for the variance estimate; ``None`` is the dtype's eps.
      eps2: torch ``eps[1]``, lower bound for the parameter RMS.
      d: torch ``d``, the clipping threshold on the RMS of the unscaled update.

    Returns:
      A :class:`optax.GradientTransformation` that requires ``params``, with state
      :class:`FactoredTorchState`.

    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    >>> state = scale_by_adafactor_torch().init(params)
    >>> state.v_row["w"].shape, state.v_col["w"].shape, state.v["b"].shape
    ((4,), (3,), (3,))
    """

    def init_fn(params):
        return _factored_state(jnp.zeros([], jnp.int32), jax.tree.map(_adafactor_init_leaf, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_adafactor_torch needs `params` in update(): torch scales by the parameter RMS")
        count = optax.safe_increment(state.count)
        beta2_t = _step(count) ** beta2_decay

        def update_leaf(g, v_row, v_col, v, param):
            return _adafactor_update_leaf(g, v_row, v_col, v, param, beta2_t, eps1, eps2, d)

        leaves = jax.tree.map(update_leaf, updates, state.v_row, state.v_col, state.v, params)
        return jax.tree.map(lambda o: o.update, leaves), _factored_state(count, leaves)

    return optax.GradientTransformation(init_fn, update_fn)


def _adafactor_init_leaf(param: jax.Array) -> _AdafactorLeaf:
    """One parameter's statistics before the first step: factored for a matrix (or a stack of them),
    whole for a vector, with Optax's ``(1,)`` placeholder in the fields it does not use."""
    placeholder = jnp.zeros((1,), param.dtype)
    if param.ndim > 1:
        return _AdafactorLeaf(
            update=placeholder,
            v_row=jnp.zeros(param.shape[:-1], param.dtype),
            v_col=jnp.zeros(param.shape[:-2] + param.shape[-1:], param.dtype),
            v=placeholder,
        )
    return _AdafactorLeaf(placeholder, placeholder, placeholder, jnp.zeros_like(param))


def _factored_state(count: jax.Array, leaves: Any) -> FactoredTorchState:
    """The state of a tree of per-parameter results."""
    return FactoredTorchState(
        count=count,
        v_row=jax.tree.map(lambda o: o.v_row, leaves),
        v_col=jax.tree.map(lambda o: o.v_col, leaves),
        v=jax.tree.map(lambda o: o.v, leaves),
    )


def _adafactor_update_leaf(
    g: jax.Array,
    v_row: jax.Array,
    v_col: jax.Array,
    v: jax.Array,
    param: jax.Array,
    beta2_t: jax.Array,
    eps1: float | None,
    eps2: float,
    d: float,
) -> _AdafactorLeaf:
    """One parameter's step: its statistics updated, and ``max(eps2, rms(param)) * u / max(1, rms(u) / d)``."""
    dtype = param.dtype
    floor = jnp.finfo(dtype).eps if eps1 is None else eps1
    v_row, v_col, v, var = _adafactor_variance(g, v_row, v_col, v, beta2_t.astype(dtype), floor)
    # torch reduces through .item(), i.e. in float64 from the parameter-dtype norm.
    param_rms = jnp.linalg.norm(param).astype(beta2_t.dtype) / param.size**0.5
    scale = jnp.maximum(eps2, param_rms)
    # torch's rsqrt_ is 1 / sqrt, which jax.lax.rsqrt need not round the same way.
    u = g * (1.0 / jnp.sqrt(jnp.maximum(var, floor * floor)))
    u_rms = jnp.linalg.norm(u).astype(beta2_t.dtype) / (u.size**0.5 * d)
    clip = jnp.maximum(1.0, u_rms)
    return _AdafactorLeaf((scale / clip).astype(dtype) * u, v_row, v_col, v)


def _adafactor_variance(
    g: jax.Array, v_row: jax.Array, v_col: jax.Array, v: jax.Array, weight: jax.Array, floor: Any
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The statistics ``(v_row, v_col, v)`` moved towards ``g * g`` by ``weight``, and the variance
    estimate they give: for a matrix, the outer product of the row and column means over the mean
    of the rows; for a vector, the statistic itself."""
    if g.ndim > 1:
        # torch squares a norm rather than averaging g*g; keep its rounding.
        v_row = _lerp(v_row, jnp.square(jnp.linalg.norm(g, axis=-1)) / g.shape[-1], weight)
        v_col = _lerp(v_col, jnp.square(jnp.linalg.norm(g, axis=-2)) / g.shape[-2], weight)
        row_mean = jnp.maximum(jnp.mean(v_row, axis=-1), floor)[..., None, None]
        return v_row, v_col, v, v_row[..., :, None] * v_col[..., None, :] / row_mean
    v = _lerp(v, g * g, weight)
    return v_row, v_col, v, v


class ScaleByMuonTorchState(NamedTuple):
    """State of :func:`scale_by_muon_torch`, field for field torch Muon's per-parameter state.

    torch keeps no ``step`` for Muon, so there is no ``count`` here either.
    """

    momentum_buffer: optax.Updates  # torch `momentum_buffer`, in the gradient's dtype.


_MUON_ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def _check_muon_arguments(
    momentum: float, ns_coefficients: tuple[float, ...], ns_steps: int, adjust_lr_fn: str | None
) -> None:
    """Refuse what ``torch.optim.Muon`` refuses, with torch's messages."""
    if adjust_lr_fn not in _MUON_ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
    if not momentum >= 0.0:
        raise ValueError(f"momentum should be >= 0 but is: {momentum}")
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")


def _check_matrix(x: jax.Array) -> None:
    """Refuse a parameter that is not 2-D, as torch's Muon does."""
    if x.ndim != 2:
        raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: {x.shape}")


def _muon_lr_ratio(adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """torch ``_adjust_lr(lr, adjust_lr_fn, shape) / lr``, a Python float from the static shape."""
    a, b = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, a / b))
    return 0.2 * math.sqrt(max(a, b))


def _zeropower_via_newtonschulz_torch(g, ns_coefficients, ns_steps, eps, dtype):
    """torch's ``_zeropower_via_newtonschulz`` with the cast to bfloat16 replaced by ``dtype``.

    Intermediate matrices are rounded to ``dtype`` where torch's are; below float32 the products
    accumulate in float32 (``torch.addmm``'s ``beta * C + alpha * A @ B`` rounded once to bf16).
    """
    a, b, c = ns_coefficients
    dtype = jnp.dtype(dtype)
    acc = jnp.promote_types(dtype, jnp.float32)

    def mm(x, y):
        return jnp.matmul(x, y, preferred_element_type=acc)

    x = g.astype(dtype)
    transpose = g.shape[0] > g.shape[1]
    if transpose:
        x = x.T
    # torch: ortho_grad.div_(ortho_grad.norm().clamp(min=eps)), the norm rounded to dtype.
    norm = jnp.linalg.norm(x.astype(acc)).astype(dtype)
    norm = jnp.maximum(norm, jnp.asarray(eps, dtype))
    x = (x.astype(acc) / norm.astype(acc)).astype(dtype)

    def iteration(_, x):
        gram = mm(x, x.T).astype(dtype)
        # torch.addmm(gram, gram, gram, beta=b, alpha=c)
        gram_update = (b * gram.astype(acc) + c * mm(gram, gram)).astype(dtype)
        # torch.addmm(x, gram_update, x, beta=a)
        return (a * x.astype(acc) + mm(gram_update, x)).astype(dtype)

    x = jax.lax.fori_loop(0, ns_steps, iteration, x)
    if transpose:
        x = x.T
    return x


def scale_by_muon_torch(
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    ns_dtype: Any | None = None,
) -> optax.GradientTransformation:
    """Rescale updates as ``torch.optim.Muon`` does, learning-rate adjustment included.

    torch (``_single_tensor_muon``), for each 2-D parameter of shape ``(A, B)``::

        buf.lerp_(g, 1 - momentum)                       # buf = momentum * buf + (1 - momentum) * g
        u = g.lerp(buf, momentum) if nesterov else buf
        u = NS(u)                                        # see below, in bfloat16
        param *= 1 - lr * weight_decay
        param -= lr * ratio * u
        ratio = sqrt(max(1, A / B))                      # adjust_lr_fn None / "original"
              = 0.2 * sqrt(max(A, B))                    # adjust_lr_fn "match_rms_adamw"

    ``NS`` casts to bfloat16, transposes when ``A > B``, divides by ``max(‖X‖_F, eps)`` and runs
    ``ns_steps`` quintic iterations ``G = X X^T; X = a X + (b G + c G G) X``, then transposes back.

    This transform returns ``ratio * NS(u)`` in the gradient's dtype. Weight decay is decoupled
    and scaled by the *unadjusted* lr, so the caller chains::

        chain(scale_by_muon_torch(...),
              add_decayed_weights(weight_decay),          # torch: param *= 1 - lr * wd
              scale_by_learning_rate(lr))

    How close it gets:

    * ``ns_dtype=jnp.float64`` (or any float dtype) runs Newton–Schulz in that dtype. Against a
      torch whose Newton–Schulz is patched to float64 the trajectories agree to ~1e-15 (float64
      params, 10 steps): the mapping of every other part is exact.
    * ``ns_dtype=None`` (the default) casts to bfloat16 where torch does, accumulating products in
      float32 and rounding to bfloat16 after every matrix operation as torch's CPU kernels do. It
      is **not guaranteed** bit-identical to stock torch: the bf16 matmul kernels (oneDNN in
      torch, Eigen in XLA) may accumulate in a different order, and a one-ulp difference
      (2**-8 relative) in an intermediate is carried through the iteration. Measured on CPU
      (torch 2.13, jax 0.10.2): for small matrices (up to 16x16 tried) the Newton–Schulz output
      was bit-identical and 10-step float64 trajectories agreed to ~1e-15; for 64x32 to 256x128
      some entries of the output differed by 1-3 bf16 ulps (up to 6e-3 on entries of size ~0.1-1),
      i.e. up to ``lr * ratio * 6e-3`` per step in the parameters. Other hardware (GPU, TPU) will
      differ more. For comparison, a float64 Newton–Schulz is ~1e-3 away from stock torch after 10
      steps at lr 0.02.

    Not reproduced: for **bfloat16 parameters with** ``nesterov=False`` torch's ``grad.bfloat16()``
    returns the momentum buffer itself, and the in-place ``div_`` then normalizes torch's stored
    ``momentum_buffer`` to unit Frobenius norm every step (a torch aliasing bug). This transform
    keeps the unnormalized buffer.

    Unlike :func:`optax.contrib.muon` this has no bias correction of the momentum, uses torch's
    ``max(‖X‖, eps)`` rather than ``‖X‖ + eps``, and orthogonalizes in torch's ``(out, in)``
    layout. Like torch, it rejects parameters that are not 2-D (torch users put those in another
    optimizer; use :func:`optax.partition` for that).

    The state is :class:`ScaleByMuonTorchState` with ``momentum_buffer`` = torch
    ``momentum_buffer``.

    Args:
      momentum: torch ``momentum``.
      nesterov: torch ``nesterov``.
      ns_coefficients: torch ``ns_coefficients`` ``(a, b, c)``.
      eps: torch ``eps``, the lower bound of the Frobenius norm.
      ns_steps: torch ``ns_steps`` (must be below 100, as in torch).
      adjust_lr_fn: torch ``adjust_lr_fn``: ``None`` or ``"original"``, or ``"match_rms_adamw"``.
      ns_dtype: dtype of the Newton–Schulz iteration; ``None`` is torch's bfloat16.

    Returns:
      A :class:`optax.GradientTransformation` with state :class:`ScaleByMuonTorchState`.

    >>> tx = scale_by_muon_torch(ns_dtype=jnp.float32)
    >>> updates, state = tx.update(jnp.eye(2), tx.init(jnp.zeros((2, 2))))
    >>> updates.shape, state.momentum_buffer.shape
    ((2, 2), (2, 2))
    """
    _check_muon_arguments(momentum, ns_coefficients, ns_steps, adjust_lr_fn)
    dtype = jnp.bfloat16 if ns_dtype is None else jax.dtypes.canonicalize_dtype(ns_dtype)

    def init_fn(params):
        jax.tree.map(_check_matrix, params)
        return ScaleByMuonTorchState(momentum_buffer=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        jax.tree.map(_check_matrix, updates)
        buf = jax.tree.map(lambda g, m: _lerp(m, g, 1 - momentum), updates, state.momentum_buffer)

        def direction(g, m):
            u = _lerp(g, m, momentum) if nesterov else m
            o = _zeropower_via_newtonschulz_torch(u, ns_coefficients, ns_steps, eps, dtype)
            return o.astype(g.dtype) * _muon_lr_ratio(adjust_lr_fn, g.shape)

        updates = jax.tree.map(direction, updates, buf)
        return updates, ScaleByMuonTorchState(momentum_buffer=buf)

    return optax.GradientTransformation(init_fn, update_fn)
