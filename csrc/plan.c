/* How a kernel cuts an array into tiles and spreads them over threads (see common.h). */
#include "common.h"

/*
 * bytes_per_value: bytes of input a kernel reads per value and wants cached between its
 * passes (x for the forward pass; x and grad_out for the backward pass). segment_columns:
 * when inner == 1, the fewest columns a tile may have (below). tile_multiple: tiles are
 * whole multiples of this many channels of shape (the columns of one channel of a spread
 * view, common.h). Eval, a single pass, goes by position (kernels/forward.inc).
 */
fbn_plan fbn_make_plan(fbn_shape shape, size_t bytes_per_value, int64_t segment_columns,
                       int64_t tile_multiple, fbn_pass pass)
{
    const int64_t C = shape.channels, M = shape.outer * shape.inner;
    fbn_plan plan = {fbn_threads_for(C * M, pass), 0, 0, 0};
    /* Narrow rows are walked as wide rows, whose per-column arrays must be wrapped, as they
       are by position (kernels/tiles.inc: view_rows). */
    if (pass == FBN_PASS_EVAL || C * M == 0 || (shape.inner == 1 && fbn_wide_columns(C)))
        return plan;
    /* A spread view that fits the cores' L2 caches together is read from cache by the second
       pass anyway, and its tiles of whole channels would be narrow and uneven: (600, 64, 3)
       took 2.2x as long by channel. But not with few rows of wide tiles (a segment or more
       per thread): by position, the merge of the parts' statistics per column, serial, costs
       as much as the rows. Float32, 2 threads, paired runs, by channel: (4, 4096, 8)
       training forward 0.51x the time, backward 0.46x; (16, 512, 16) 0.62-0.68x and
       0.84x; (32, 256, 12) 0.77-0.80x and 0.73-0.87x; with 64 rows, (64, 128, 20)
       training forward 1.2x. */
    if (tile_multiple > 1 && (M >= 64 || C / plan.nparts < segment_columns) &&
        C * M * (int64_t)bytes_per_value <= fbn_tile_budget_bytes() * plan.nparts)
        return plan;

    /* When inner == 1 a tile's rows are strided: each row segment must be long enough, or
       reading by position, whole rows at a time, is faster. How long, the callers measured
       (kernels/forward.inc, backward.inc). */
    int64_t granule = shape.inner == 1 ? (C < segment_columns ? C : segment_columns) : 1;
    granule = (granule + tile_multiple - 1) / tile_multiple * tile_multiple;
    const int64_t channel_bytes = M * (int64_t)bytes_per_value;
    int64_t fit = fbn_tile_budget_bytes() / (channel_bytes > 0 ? channel_bytes : 1);
    fit -= fit % granule;
    /* Where not even one granule stays in L2, the forward passes stream by position. The
       backward goes a channel at a time all the same along runs of 32 KiB or more of x and
       of grad_out (L3_RUN_BYTES of both): its second pass reads the channel again from L3
       rather than from memory. Float32, paired runs against by position, one thread:
       (8, 64, 16000) 0.50x the time, (32, 64, 112, 112) 0.48x, (64, 16, 8192) 0.67x,
       (4, 32, 65536) 0.56x, 16 MB channels (32, 16, 65536) 0.61x, (1, 4, 2000000) 0.85x,
       float64 (64, 16, 4096) 0.65x; 2 threads 0.45-0.94x. Shorter runs, a few lines read
       far apart, went faster by position: (768, 16, 256) 1.19x the time on one thread,
       1.41x on two, (8191, 2, 96) 1.43x; with runs of 16 KiB, (128, 16, 4096) took 0.88x
       on one thread, 1.12x on two. The training forward gained nothing
       ((32, 64, 112, 112) 0.98x, float64 (8, 64, 16000) 1.10x). */
    if (fit < granule) {
        enum { L3_RUN_BYTES = 2 * 32 * 1024 };
        if (pass != FBN_PASS_BACKWARD || shape.inner * (int64_t)bytes_per_value < L3_RUN_BYTES)
            return plan;
        fit = granule;
    }

    /* A whole number of tiles per thread, then tiles of equal size. */
    int64_t tiles = (C + fit - 1) / fit;
    tiles = (tiles + plan.nparts - 1) / plan.nparts * plan.nparts;
    int64_t per_tile = (C + tiles - 1) / tiles;
    per_tile = (per_tile + granule - 1) / granule * granule;
    tiles = (C + per_tile - 1) / per_tile;

    /* Whole tiles per thread must not leave a core idle for long: the busiest thread may
       do at most 25% more than an even share, else split by position. */
    int64_t busiest = (tiles + plan.nparts - 1) / plan.nparts;
    if (plan.nparts > 1 && 4 * busiest * plan.nparts > 5 * tiles)
        return plan;
    plan.by_channel = 1;
    plan.channels_per_tile = per_tile;
    return plan;
}
