# What other Cython modules of fastbn call in fastbn/_core.pyx directly, without a Python
# call: the layer's eval call (fastbn/_layer_call.pyx).
cimport numpy as cnp

cdef cnp.ndarray _eval_forward(object x, object running_mean, object running_var,
                               object weight, object bias, object eps, object axis,
                               object out, bint one_example=*)
cdef bint _overlap(cnp.ndarray a, cnp.ndarray b) noexcept
