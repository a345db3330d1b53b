/* fastbn's kernels for float: each template in kernels/ expanded with T = float. */
#include <math.h>

#include "common.h"

#define T float
#define FBN_EXPORT(name) name##_f32
/* square root in T: eval computes its per-channel constants in the element type */
#define SQRT_T sqrtf

#ifdef FBN_STREAMING
/* The vector types of the loops in vectors (kernels/avx512.inc) for this type, in AVX-512
   and in AVX2, the suffix of their intrinsics, and AVX2's mask of a vector's first `count`
   lanes. */
#include <immintrin.h>
#define FBN_AVX512_VEC __m512
#define FBN_AVX512_MASK __mmask16
#define FBN_AVX2_VEC __m256
#define FBN_AVX2_FIRST(count) _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(count)), \
                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
#define FBN_AVX2_MASK_AS_VEC _mm256_castsi256_ps
#define FBN_VEC_SUFFIX ps
#endif

#include "kernels/loops.inc"
#include "kernels/avx512.inc"
#include "kernels/columns.inc"
#include "kernels/tiles.inc"
#include "kernels/forward.inc"
#include "kernels/backward.inc"
