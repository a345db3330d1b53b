/*
 * fastbn's C kernels: batch normalization over C-contiguous arrays.
 *
 * Every array is seen as a 3-D block (outer, channels, inner): the channel axis in the
 * middle, everything before it folded into `outer`, everything after it into `inner`.
 * NCHW with the channel axis 1 is (N, C, H*W); (N, C) and channels-last input have inner == 1.
 * Sizes and indices are 64-bit throughout.
 *
 * Each kernel exists for float (suffix _f32) and double (_f64); both are expanded from one
 * template in kernels/. Per-channel statistics are accumulated in double for both.
 * Optional per-channel arrays (weight, bias) may be NULL: weight 1, bias 0.
 * Kernels return FBN_OK, or FBN_NO_MEMORY when their scratch space cannot be allocated
 * (nothing has been written then). They never call into Python and hold no locks.
 */
#ifndef FASTBN_H
#define FASTBN_H

#include <stdint.h>

typedef struct {
    int64_t outer;
    int64_t channels;
    int64_t inner;
} fbn_shape;

enum { FBN_OK = 0, FBN_NO_MEMORY = 1 };

#define FBN_DECLARE_KERNELS(T, SUFFIX)                                                        \
    /* Per-channel mean and m2 = sum of squared deviations (count = outer*inner). */          \
    int fbn_moments_##SUFFIX(const T *x, fbn_shape shape, double *mean, double *m2);          \
    /* Training forward: y normalized with the batch statistics, which go out as the mean   \
       and biased var in double, and as the mean and invstd = 1 / sqrt(var + eps) in T       \
       (batch_mean, invstd). Either pair may be NULL (both of it): not wanted. */            \
    int fbn_forward_train_##SUFFIX(const T *x, T *y, fbn_shape shape, const T *weight,        \
                                   const T *bias, double eps, double *mean, double *var,      \
                                   T *batch_mean, T *invstd);                                 \
    /* The mean and invstd = 1 / sqrt(var + eps) in T of `channels` float64 means and        \
       biased variances, as fbn_forward_train gives them (vectorized). */                    \
    void fbn_mean_invstd_##SUFFIX(const double *mean, const double *var, double eps,          \
                                  int64_t channels, T *batch_mean, T *invstd);                \
    /* Eval forward: y normalized with the running statistics. */                             \
    int fbn_forward_eval_##SUFFIX(const T *x, T *y, fbn_shape shape, const T *running_mean,   \
                                  const T *running_var, const T *weight, const T *bias,       \
                                  double eps);                                                \
    /* Backward. training != 0: mean/invstd are batch statistics (depend on x);              \
       training == 0: they are constants. grad_weight and grad_bias are always written.      \
       grad_x may be grad_out or x (in place), but must not overlap them otherwise. */       \
    int fbn_backward_##SUFFIX(const T *grad_out, const T *x, T *grad_x, fbn_shape shape,      \
                              const T *mean, const T *invstd, const T *weight, int training,  \
                              T *grad_weight, T *grad_bias);

FBN_DECLARE_KERNELS(float, f32)
FBN_DECLARE_KERNELS(double, f64)

/* Below these many elements a kernel runs on the calling thread: an OpenMP region costs
   microseconds, more than it saves on a small job. Where two threads start to gain depends
   on the kernel (2 cores, float32, one and two threads alternated call by call, rows of 64,
   256 and 1024 columns and runs of 49 and 196 values): eval, one pass, took 0.70-0.75x the
   time on two threads at 32K values (0.92-1.08x at 16K); the backward 0.49-0.88x at 16K;
   the training forward, two passes with a merge of the parts' moments between them, lost
   on some layouts up to 64K (rows of 1024 columns 1.46x at 64K in one series, 0.79x in
   another). */
#define FBN_PARALLEL_MIN_ELEMENTS (64 * 1024)          /* training forward, moments */
#define FBN_ONE_PASS_PARALLEL_MIN_ELEMENTS (32 * 1024) /* eval forward, fbn_copy */
#define FBN_BACKWARD_PARALLEL_MIN_ELEMENTS (16 * 1024)
/* While more than one thread calls kernels this large (runtime.c), threads pay from far
   larger jobs: called from a pool of Python threads after the main thread had used threads,
   float32 NCHW, two threads against one: eval 1.04-1.05x the time at 3.2M values, 0.67-0.74x
   at 6.4M; the training forward 0.98-1.09x at 200-400K and 0.76x at 800K, the backward
   1.06-1.11x and 0.76x. */
#define FBN_SHARED_PARALLEL_MIN_ELEMENTS (1024 * 1024)               /* training, backward */
#define FBN_SHARED_ONE_PASS_PARALLEL_MIN_ELEMENTS (4 * 1024 * 1024)  /* eval forward, copy */

/* Threads (runtime.c). set_num_threads(0) returns to the OpenMP default. */
int fbn_openmp_enabled(void);
int fbn_get_num_threads(void);
void fbn_set_num_threads(int num_threads);

/* dst = src, `elements` values of `itemsize` bytes, split over the threads a kernel over
   them would use: the benchmark's memory-bandwidth floor (runtime.c). */
void fbn_copy(void *dst, const void *src, int64_t elements, int64_t itemsize);

/* What the build and the CPU give: "avx512", "avx2" or "baseline"; the compiler flags. */
const char *fbn_simd_level(void);
const char *fbn_build_flags(void);

#endif
