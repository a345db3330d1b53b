/* fastbn's kernels for double: each template in kernels/ expanded with T = double. */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define T double
#define FBN_EXPORT(name) name##_f64
/* square root in T: eval computes its per-channel constants in the element type */
#define SQRT_T sqrt

#include "kernels/loops.inc"
#include "kernels/forward.inc"
#include "kernels/backward.inc"
