/* fastbn's kernels for float: each template in kernels/ expanded with T = float. */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define T float
#define FBN_EXPORT(name) name##_f32
/* square root in T: eval computes its per-channel constants in the element type */
#define SQRT_T sqrtf

#include "kernels/loops.inc"
#include "kernels/forward.inc"
#include "kernels/backward.inc"
