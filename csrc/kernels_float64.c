/* fastbn's kernels for double: each template in kernels/ expanded with T = double. */
#include <math.h>

#include "common.h"

#define T double
#define FBN_EXPORT(name) name##_f64
/* square root in T: eval computes its per-channel constants in the element type */
#define SQRT_T sqrt

#ifdef FBN_STREAMING
/* The vector types of the loops in vectors (kernels/avx512.inc) for this type, in AVX-512
   and in AVX2, the suffix of their intrinsics, and AVX2's mask of a vector's first `count`
   lanes. */
#include <immintrin.h>
#define FBN_AVX512_VEC __m512d
#define FBN_AVX512_MASK __mmask8
#define FBN_AVX2_VEC __m256d
#define FBN_AVX2_FIRST(count) _mm256_cmpgt_epi64(_mm256_set1_epi64x(count), \
                          _mm256_setr_epi64x(0, 1, 2, 3))
#define FBN_AVX2_MASK_AS_VEC _mm256_castsi256_pd
#define FBN_VEC_SUFFIX pd
/* The backward's sums join each vector of grad_out from the two whole lines it straddles
   where grad_out's rows start at another offset within a line than x's (avx512.inc:
   group_grad_sums_joined). Not for float, whose sums convert every value to double, which
   bounds them rather than the loads: (4096, 256) float32 took 1.12x the time joined. */
#define FBN_JOIN_DY 1
#endif

#include "kernels/loops.inc"
#include "kernels/avx512.inc"
#include "kernels/columns.inc"
#include "kernels/tiles.inc"
#include "kernels/forward.inc"
#include "kernels/backward.inc"
