"""BatchNorm's call, in C: the layer's hot path, eval with its running statistics.

:class:`LayerCall` is the base of :class:`fastbn.BatchNorm`. It holds, in C slots, the
attributes that an eval call reads, so that ``bn(x)`` goes from the call to the kernel
without running Python code (a single example in eval mode: 0.8 -> 0.5 µs). Every other
call, and any call the fast path cannot take as it is, goes to the layer's Python
``_forward``, which checks and explains.
"""

cimport cython
cimport numpy as cnp

from fastbn._core cimport _eval_forward, _overlap

cnp.import_array()

# The forward call's context when it wrote its output over x (out=x): x is gone
# (fastbn/layer.py reads it).
OVERWRITTEN = object()


@cython.auto_pickle(False)  # BatchNorm pickles its own state, these slots included
cdef class LayerCall:
    """The attributes of a BatchNorm that its eval call reads, and the call."""

    cdef public object weight, bias, running_mean, running_var
    cdef public object eps, axis, training, debias
    # What backward needs of the last forward call: x alone after an eval call with the
    # plain running statistics (fastbn/layer.py: _Context for the others).
    cdef public object _context

    def __call__(self, x, out=None):
        # Eval with the plain running statistics: straight to the kernel, a batch or one
        # example as a 1-D array (no views made of it). Any failure takes the general
        # path, which explains it.
        cdef cnp.ndarray y
        cdef bint one_example
        if not self.training and not self.debias and self.running_mean is not None:
            try:
                one_example = cnp.PyArray_NDIM(<cnp.ndarray?>x) == 1
                if not one_example or self.axis == 1 or self.axis == -1:
                    y = _eval_forward(x, self.running_mean, self.running_var, self.weight,
                                      self.bias, self.eps, self.axis, out, one_example)
                    overwritten = out is not None and _overlap(y, <cnp.ndarray>x)
                    self._context = OVERWRITTEN if overwritten else x
                    return y
            except (TypeError, ValueError):
                pass
        return self._forward(x, out)
