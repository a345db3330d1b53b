/* fastbn's kernels for float: each template in kernels/ expanded with T = float. */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define T float
#define FBN_EXPORT(name) name##_f32

#include "kernels/loops.inc"
#include "kernels/forward.inc"
#include "kernels/backward.inc"
