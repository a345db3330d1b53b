/* fastbn's kernels for float: each template in kernels/ expanded with T = float. */
#include <math.h>

#include "common.h"

#define T float
#define FBN_EXPORT(name) name##_f32
/* square root in T: eval computes its per-channel constants in the element type */
#define SQRT_T sqrtf

#ifdef FBN_STREAMING
/* The vector operations of the AVX-512 loops (kernels/avx512.inc), in AVX-512 for this type. */
#include <immintrin.h>
#define FBN_VEC __m512
#define FBN_MASK __mmask16
#define FBN_VEC_LANES 16
#define FBN_VEC_SET1 _mm512_set1_ps
#define FBN_VEC_LOAD _mm512_loadu_ps
#define FBN_VEC_MASK_LOAD _mm512_maskz_loadu_ps
#define FBN_VEC_MASK_STORE _mm512_mask_storeu_ps
#define FBN_VEC_STORE _mm512_storeu_ps
#define FBN_VEC_STREAM _mm512_stream_ps
#endif

#include "kernels/loops.inc"
#include "kernels/avx512.inc"
#include "kernels/columns.inc"
#include "kernels/tiles.inc"
#include "kernels/forward.inc"
#include "kernels/backward.inc"
