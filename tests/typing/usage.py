"""Typed use of fastbn's public API: ``mypy --strict`` must accept it (tests/test_typing.py).

Not a test module (pytest collects only test_*.py): tests/test_typing.py type-checks this
file with mypy and also runs it, so the types it asserts are the ones the calls return.
``assert_type`` fails the type check when a call's type is not the one written.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

import fastbn

if TYPE_CHECKING:
    from typing_extensions import assert_type
else:  # at run time: the check is mypy's; typing_extensions is not a dependency

    def assert_type(value, expected_type):
        return value


rng = np.random.default_rng(0)


def functional_float32() -> None:
    x: NDArray[np.float32] = rng.normal(5.0, 3.0, size=(8, 4, 3, 3)).astype(np.float32)
    running_mean = np.zeros(4, np.float32)
    running_var = np.ones(4, np.float32)
    y = fastbn.batch_norm(x, running_mean, running_var, training=True, momentum=0.1)
    assert_type(y, NDArray[np.float32])
    y = fastbn.batch_norm(x, running_mean, running_var, axis=1, out=y)
    y, mean, invstd = fastbn.batch_norm_train(x, eps=1e-3)
    assert_type(mean, NDArray[np.float32])
    grad_x, grad_weight, grad_bias = fastbn.batch_norm_backward(np.ones_like(y), x, mean, invstd)
    assert_type(grad_x, NDArray[np.float32])
    assert_type(grad_bias, NDArray[np.float32])
    assert y.dtype == grad_weight.dtype == np.float32


def functional_float64_channels_last() -> None:
    x = rng.standard_normal((8, 3, 3, 4))
    weight, bias = np.ones(4), np.zeros(4)
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=-1)
    assert_type(y, NDArray[np.float64])
    grads = fastbn.batch_norm_backward(y, x, mean, invstd, weight, training=False, axis=-1)
    assert_type(grads, tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]])


def functional_dtype_unknown(x: NDArray[Any]) -> NDArray[np.floating[Any]]:
    # An array whose dtype the checker does not know is accepted: checked at run time.
    channels = x.shape[1]
    return fastbn.batch_norm(x, np.zeros(channels, x.dtype), np.ones(channels, x.dtype))


def layer() -> float:
    bn = fastbn.BatchNorm(4, momentum=None, dtype=np.float64, debias=False)
    x = rng.standard_normal((16, 4))
    y = bn(x)
    grad_x = bn.backward(np.ones_like(y))
    assert_type(grad_x, NDArray[np.floating[Any]])
    grad_x = bn.backward(np.ones_like(y), out=grad_x)
    if bn.weight is not None and bn.grad_weight is not None:  # None without affine
        bn.weight -= 0.1 * bn.grad_weight
    bn.recalibrate(x[i : i + 4] for i in range(0, 16, 4))
    state = bn.state_dict()
    keys = fastbn.BatchNorm(4, dtype=np.float64).load_state_dict(state, strict=False)
    assert not keys.missing_keys and not keys.unexpected_keys
    evaluated = bn.eval()
    assert_type(evaluated, fastbn.BatchNorm)
    one = bn(x[0])
    linear_weight = rng.standard_normal((4, 6)).astype(np.float32)
    folded_weight, folded_bias = fastbn.fold(linear_weight, None, bn)
    assert_type(folded_weight, NDArray[np.float32])
    assert_type(folded_bias, NDArray[np.float32])
    _, bias64 = fastbn.fold(linear_weight, np.zeros(4), bn)
    assert_type(bias64, NDArray[np.float64])
    return float(one.sum())


def statistics() -> int:
    x = rng.standard_normal((10, 3, 5))
    parts = [fastbn.moments(x[:4]), fastbn.moments(x[4:])]
    total = fastbn.Moments.merge_all(parts)
    assert_type(total, fastbn.Moments)
    assert_type(parts[0] + parts[1], fastbn.Moments)
    assert_type(total.unbiased_var, NDArray[np.float64])
    restored = fastbn.Moments.from_array(total.to_array())
    assert restored == total
    return total.num_features


def threads_and_build() -> str:
    previous = fastbn.get_num_threads()
    assert_type(previous, int)
    fastbn.set_num_threads(1)
    fastbn.set_num_threads(None)
    info = fastbn.build_info()
    assert_type(info["openmp"], bool)
    assert info["openmp"] == fastbn.openmp_enabled()
    return f"{fastbn.__version__} {info['simd']} {info['flags']}"


def main() -> int:
    functional_float32()
    functional_float64_channels_last()
    functional_dtype_unknown(rng.standard_normal((4, 2)))
    layer()
    statistics()
    threads_and_build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
