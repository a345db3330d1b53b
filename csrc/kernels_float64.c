/* fastbn's kernels for double: each template in kernels/ expanded with T = double. */
#include <math.h>

#include "common.h"

#define T double
#define FBN_EXPORT(name) name##_f64
/* square root in T: eval computes its per-channel constants in the element type */
#define SQRT_T sqrt

#ifdef FBN_STREAMING
/* The vector operations of the AVX-512 loops (kernels/avx512.inc), in AVX-512 for this type. */
#include <immintrin.h>
#define FBN_VEC __m512d
#define FBN_MASK __mmask8
#define FBN_VEC_LANES 8
#define FBN_VEC_SET1 _mm512_set1_pd
#define FBN_VEC_LOAD _mm512_loadu_pd
#define FBN_VEC_MASK_LOAD _mm512_maskz_loadu_pd
#define FBN_VEC_MASK_STORE _mm512_mask_storeu_pd
#define FBN_VEC_STORE _mm512_storeu_pd
#define FBN_VEC_STREAM _mm512_stream_pd
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
