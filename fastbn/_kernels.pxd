# The C kernels of csrc/fastbn.h, as Cython sees them. Everything here runs without the GIL.
from libc.stdint cimport int64_t

cdef extern from "fastbn.h" nogil:
    ctypedef struct fbn_shape:
        int64_t outer
        int64_t channels
        int64_t inner

    enum:
        FBN_OK
        FBN_NO_MEMORY
        FBN_PARALLEL_MIN_ELEMENTS
        FBN_ONE_PASS_PARALLEL_MIN_ELEMENTS
        FBN_BACKWARD_PARALLEL_MIN_ELEMENTS
        FBN_SHARED_PARALLEL_MIN_ELEMENTS
        FBN_SHARED_ONE_PASS_PARALLEL_MIN_ELEMENTS

    int fbn_moments_f32(const float *x, fbn_shape shape, double *mean, double *m2)
    int fbn_moments_f64(const double *x, fbn_shape shape, double *mean, double *m2)
    int fbn_forward_train_f32(const float *x, float *y, fbn_shape shape, const float *weight,
                              const float *bias, double eps, double *mean, double *var,
                              float *batch_mean, float *invstd)
    int fbn_forward_train_f64(const double *x, double *y, fbn_shape shape, const double *weight,
                              const double *bias, double eps, double *mean, double *var,
                              double *batch_mean, double *invstd)
    void fbn_mean_invstd_f32(const double *mean, const double *var, double eps,
                             int64_t channels, float *batch_mean, float *invstd)
    void fbn_mean_invstd_f64(const double *mean, const double *var, double eps,
                             int64_t channels, double *batch_mean, double *invstd)
    int fbn_forward_eval_f32(const float *x, float *y, fbn_shape shape, const float *running_mean,
                             const float *running_var, const float *weight, const float *bias,
                             double eps)
    int fbn_forward_eval_f64(const double *x, double *y, fbn_shape shape,
                             const double *running_mean, const double *running_var,
                             const double *weight, const double *bias, double eps)
    int fbn_backward_f32(const float *grad_out, const float *x, float *grad_x, fbn_shape shape,
                         const float *mean, const float *invstd, const float *weight, int training,
                         float *grad_weight, float *grad_bias)
    int fbn_backward_f64(const double *grad_out, const double *x, double *grad_x, fbn_shape shape,
                         const double *mean, const double *invstd, const double *weight,
                         int training, double *grad_weight, double *grad_bias)

    int fbn_openmp_enabled()
    int fbn_get_num_threads()
    void fbn_set_num_threads(int num_threads)
    const char *fbn_simd_level()
    const char *fbn_build_flags()
    void fbn_copy(void *dst, const void *src, int64_t elements, int64_t itemsize)


# Internal helpers, exposed to the tests of the 64-bit index arithmetic.
cdef extern from "common.h" nogil:
    ctypedef struct fbn_tile:
        int64_t c0, c1, m0, m1

    ctypedef struct fbn_spans:
        pass

    fbn_spans fbn_spans_of(fbn_shape shape, fbn_tile tile)
    int fbn_next_span(fbn_shape shape, fbn_spans *spans, int64_t *at, int64_t *n)
    void fbn_split(int64_t n, int part, int nparts, int64_t *begin, int64_t *end)

    ctypedef enum fbn_pass:
        FBN_PASS_EVAL
        FBN_PASS_TRAINING_FORWARD
        FBN_PASS_BACKWARD

    ctypedef enum fbn_pace:
        FBN_ONE_CORE
        FBN_CHUNKED_ROWS
        FBN_L3_SPEED

    int fbn_stream_output(int64_t output_bytes, fbn_pass kernel_pass, fbn_pace pace)

    int fbn_threads_for(int64_t elements, fbn_pass kernel_pass)
