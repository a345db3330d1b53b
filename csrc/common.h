/*
 * What the kernels share: the work plan (how an array is cut into tiles and threads),
 * Chan's exact merge of moments, and run-time ISA dispatch for the hot loops.
 * Internal to csrc/; Python never sees these.
 */
#ifndef FASTBN_COMMON_H
#define FASTBN_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fastbn.h"

/*
 * Run-time ISA dispatch: the compiler builds the hot loops once per ISA level and the
 * loader picks the best the CPU has (ifunc). The wheel is built for baseline x86-64, so
 * this is how AVX2 and AVX-512 machines get their vector width.
 */
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute) && \
    !defined(FBN_NO_DISPATCH)
#if __has_attribute(target_clones)
#define FBN_DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FBN_CLONES 1
#endif
#endif
#ifndef FBN_DISPATCH
#define FBN_DISPATCH
#endif

/*
 * `#pragma omp simd`: vectorize this loop. GCC and Clang honour it without OpenMP threads
 * (-fopenmp-simd); MSVC's /openmp is OpenMP 2.0, which has no simd, so there the loops are
 * left to the auto-vectorizer.
 */
#if defined(__GNUC__) || defined(__clang__)
#define FBN_PRAGMA(text) _Pragma(#text)
#define FBN_SIMD FBN_PRAGMA(omp simd)
#else
#define FBN_SIMD
#endif

/* Contiguous elements processed per two-pass moments chunk: a chunk stays in L1. */
#define FBN_L1_BYTES (32 * 1024)
/*
 * Streaming stores: an output much larger than the cache is written around it, so that the
 * memory system does not first read every line of it (read-for-ownership): a third less
 * traffic for the normalize pass. x86-64 built with GCC or Clang, in AVX-512 or AVX2 vectors
 * (kernels/avx512.inc, vectors.inc), which in AVX-512 also serve the normalize pass over
 * rows that starts at a cache line and the other loops there. Without dispatch
 * (FBN_NO_DISPATCH) the CPU is taken to be what the compiler targets (-march).
 */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FBN_STREAMING 1
#endif
/* Whether the CPU runs the AVX-512 loops; whether it runs the AVX2 streaming loops instead
   (it runs the x86-64-v3 clones, with AVX2 and FMA, and has no AVX-512) (runtime.c). */
int fbn_has_avx512(void);
int fbn_has_avx2(void);
/* How far per-column arrays may be wrapped (continued by their first values,
   kernels/columns.inc): a wide row of narrow rows (below) and a vector's values (16 at
   most) past it. */
#define FBN_WRAP 256

/* Data of one tile that the second pass of a kernel expects to find in L2: most of this
   core's L2 (runtime.c), or FBN_L2_DEFAULT_BYTES where the system does not say. */
int64_t fbn_tile_budget_bytes(void);
#define FBN_L2_DEFAULT_BYTES (512 * 1024)
/*
 * Reductions over rows (inner == 1) keep their per-column sums in registers: they walk a
 * block of rows one group of FBN_GROUP columns at a time, down the block. Sums kept in
 * memory instead cost a load and a store per vector per row, which made the moments pass
 * compute-bound at twice the time of a read of x. Along runs (inner > 1), FBN_GROUP lanes.
 * 16 values: two AVX-512 vectors of double per sum; 32 cost short runs 12% more to set up
 * and fold, and gained nothing on long ones.
 */
#define FBN_GROUP 16
/*
 * Narrow rows: rows (inner == 1) of fewer than FBN_NARROW columns leave vectors idle and
 * pay a loop per few values: (131072, 8) float32 moments took 4.4x the time of a copy,
 * (61680, 17) eval 2.3x. The loops walk them as wide rows of fbn_wide_columns(cols)
 * columns, several rows side by side (kernels/tiles.inc: view_rows): whole groups where
 * such a row fits in FBN_WRAP columns (else its last group is a part: kernels/loops.inc,
 * group_around), and at least FBN_NARROW values ((131072, 8) float32 eval took 1.25x the
 * time with 16, backward 1.10x). 0: rows of FBN_NARROW columns or more, walked as they are.
 */
#define FBN_NARROW 64

static inline int64_t fbn_wide_columns(int64_t cols)
{
    if (cols <= 0 || cols >= FBN_NARROW)
        return 0;
    int64_t wide = cols;
    while (wide % FBN_GROUP != 0 && wide + cols <= FBN_WRAP)
        wide += cols;
    while (wide < FBN_NARROW)
        wide *= 2;
    return wide;
}

/* Bytes of x per block of rows: a block and the one prefetched after it stay in L2. */
#define FBN_BLOCK_BYTES (128 * 1024)

/* The elementwise loops over rows (normalize, grad_x) read a constant per column, from
   three or four arrays: they go a chunk of FBN_CHUNK_BYTES of each array at a time, so that
   the chunk's constants stay in L1 while the rows go by. (256, 1024) float64 eval: 0.62x
   the time of whole rows. */
#define FBN_CHUNK_BYTES 4096

/* Rows per block, for rows of `row_bytes` (of all the arrays read): FBN_BLOCK_BYTES, but at
   least 8 rows, or very wide rows (a spread view: common.h) pay a merge per row. */
static inline int64_t fbn_block_rows(int64_t row_bytes)
{
    const int64_t rows = FBN_BLOCK_BYTES / row_bytes;
    return rows < 8 ? 8 : rows;
}

/* FBN_INLINE forces inlining where a helper's loop bounds must become constants in its
   caller. FBN_PREFETCH asks for a line into L2, not L1 (prefetcht1): what is asked for is
   read a block later, and lines pulled into L1 that early only crowd out the ones in use.
   Against prefetcht0, paired runs: NCHW float32 train + backward 0.91-0.93x the time,
   float64 0.95x, (256, 1024) float64 moments on one thread 0.90x, the rest level. */
#if defined(__GNUC__) || defined(__clang__)
#define FBN_INLINE static inline __attribute__((always_inline))
#define FBN_PREFETCH(address) __builtin_prefetch(address, 0, 2)
#else
#define FBN_INLINE static inline
#define FBN_PREFETCH(address) ((void)(address))
#endif

/*
 * Walking a block column group by column group defeats the hardware prefetchers, which
 * follow ascending streams (and some machines read interleaved streams from memory at a
 * third of the speed of one). So while it walks a block, a reduction asks for the next
 * block's lines in plain row-major order, a group's bytes per step (`step`): as many steps
 * as the walk takes, so the next block has arrived when the walk ends.
 */
typedef struct {
    const char *row;       /* next row to ask for */
    int64_t offset;        /* bytes of it asked for so far */
    int64_t row_bytes;     /* bytes of each row in the block (its columns) */
    int64_t stride_bytes;  /* from one row to the next */
    int64_t rows_left;     /* rows of the block not yet asked for */
} fbn_ahead;

static inline void fbn_ahead_step(fbn_ahead *ahead, int64_t step)
{
    if (ahead->rows_left == 0)
        return;
    for (int64_t line = 0; line < step; line += 64)
        FBN_PREFETCH(ahead->row + ahead->offset + line);
    ahead->offset += step;
    if (ahead->offset >= ahead->row_bytes) {
        ahead->offset = 0;
        ahead->row += ahead->stride_bytes;
        --ahead->rows_left;
    }
}

/*
 * Chan, Golub & LeVeque: fold partial moments (count_b, mean_b, m2_b) into
 * (count, mean, m2). Exact in exact arithmetic, and stable: no E[x^2] - E[x]^2.
 */
static inline void fbn_merge_moments(double *count, double *mean, double *m2, double count_b,
                                     double mean_b, double m2_b)
{
    if (count_b == 0)
        return;
    double n = *count + count_b;
    double delta = mean_b - *mean;
    double share_b = count_b / n;
    *mean += delta * share_b;
    *m2 += m2_b + delta * delta * *count * share_b;
    *count = n;
}

/* A rectangle of work: channels [c0, c1) and, within each channel, the flat positions
   [m0, m1) of its outer*inner values (position m is outer index m / inner, inner index
   m % inner). */
typedef struct {
    int64_t c0, c1, m0, m1;
} fbn_tile;

/*
 * The spans of a tile's positions [m0, m1) in memory order, one outer index at a time:
 * fbn_next_span sets the offset of channel 0's values at that outer index (*at; channel c's
 * run of *n contiguous values starts at *at + c * inner) and the run length *n, and returns
 * 0 when no span is left. One division where the walk starts, none per span.
 */
typedef struct {
    int64_t m, m1; /* the next span's first position, the end */
    int64_t at, i; /* its offset (as *at) and inner index */
} fbn_spans;

static inline fbn_spans fbn_spans_of(fbn_shape shape, fbn_tile tile)
{
    const int64_t o = tile.m0 / shape.inner, i = tile.m0 - o * shape.inner;
    const fbn_spans spans = {tile.m0, tile.m1, o * shape.channels * shape.inner + i, i};
    return spans;
}

static inline int fbn_next_span(fbn_shape shape, fbn_spans *spans, int64_t *at, int64_t *n)
{
    if (spans->m >= spans->m1)
        return 0;
    const int64_t left = shape.inner - spans->i;
    *n = left < spans->m1 - spans->m ? left : spans->m1 - spans->m;
    *at = spans->at;
    spans->m += *n;
    spans->at += shape.channels * shape.inner - spans->i; /* the next outer index */
    spans->i = 0;
    return 1;
}

/* What a kernel does over the array: eval, one pass; the training forward (or moments
   alone), statistics then y; the backward. */
typedef enum { FBN_PASS_EVAL, FBN_PASS_TRAINING_FORWARD, FBN_PASS_BACKWARD } fbn_pass;

/* How a pass written through the cache would run: on one core; on several threads over rows
   walked a chunk of columns at a time (kernels/tiles.inc); on several threads at the speed
   of L3 where its arrays stay there. */
typedef enum { FBN_ONE_CORE, FBN_CHUNKED_ROWS, FBN_L3_SPEED } fbn_pace;

/* Whether `pass` streams its output of `output_bytes`, and in which vectors (runtime.c). */
int fbn_stream_output(int64_t output_bytes, fbn_pass pass, fbn_pace pace);
/* What fbn_stream_output answers when a pass streams: the vectors to stream in (else 0). */
enum { FBN_STREAM_AVX512 = 1, FBN_STREAM_AVX2 = 2 };

/*
 * How a kernel spreads over threads. by_channel: each part owns whole channels, in tiles
 * small enough that a second pass over a tile reads cache, so the tile is finished in one
 * go. Otherwise every part takes a slice of positions for all channels and keeps partial
 * results, merged afterwards: this keeps every core busy when channels are few.
 */
typedef struct {
    int nparts;
    int by_channel;
    int64_t channels_per_tile; /* by_channel only */
    int64_t tile_shift;        /* by_channel: tiles after the first start this many channels
                                  past a multiple of channels_per_tile, the first taking them
                                  (kernels/backward.inc: align_tiles) */
} fbn_plan;

fbn_plan fbn_make_plan(fbn_shape shape, size_t bytes_per_value, int64_t segment_columns,
                       int64_t tile_multiple, fbn_pass pass);

/*
 * Spreading: where a channel's runs are short (inner > 1 but small), per-run loops spend
 * more on each run than on its values. The kernels then see the array as rows of C * inner
 * columns, (outer, C * inner, 1), channel c spread over columns [c * inner, (c + 1) * inner):
 * statistics are gathered per column and folded per channel, and per-channel constants are
 * spread over their columns. The price is a constant per column, read with every value: it
 * pays where rows are many. fbn_spread gives the columns per channel, inner or 1 (no
 * spreading), for values of `value_bytes` in `pass`. Measured (2 cores, AVX-512): the
 * reductions gain 2-70x up to inner = 16; on runs shorter than four vectors (256 bytes),
 * from 32 rows on (training forward of float32 (32, 1024, 40) 0.6x the time, (32, 512, 49)
 * 0.84x, float64 (32, 256, 20) 0.45x; backward 0.5-1.0x; with 16 rows float64
 * (16, 256, 28) took 1.1x in training forward and 1.27x in backward). The training
 * forward also gains on runs up to 64 values with 64 rows or more; the backward, whose
 * runs cost less since each walk over them is one dispatched function, mostly loses there
 * (paired runs, 2 threads, against not spreading: float32 (128, 64, 64) 1.3x the time,
 * (512, 9, 64) 1.6x, float64 (64, 95, 49) 1.27x, but float64 (512, 14, 40) 0.74x). Eval,
 * a single pass with less overhead per run, gains on runs of one vector (64 bytes) with 8
 * rows or more (float32 (64, 256, 9) and (16, 2048, 12) took 0.4-0.5x the time spread, (8,
 * 4096, 8) 0.45x; (4, 4096, 8) 1.2x), and on runs shorter than two with 64 rows or more
 * (float32 (64, 256, 28) 0.72x, float64 (64, 256, 10) 0.69x; float32 (32, 1024, 28)
 * 1.05x, (8, 2048, 28) 2x). It loses on longer ones (float32 (64, 512, 32) 1.2x; float64
 * (64, 512, 24) 1.4x).
 * Where the backward streams grad_x (`streamed`: its arrays are larger than the caches),
 * it also spreads runs shorter than 512 bytes from 32 rows on: by channel, each run is a
 * few lines read far from the last and a stream of its own with ordinary stores at both
 * ends; spread, a tile's rows are long and stream whole. Paired runs against not
 * spreading, 2 threads: float64 (64, 512, 7, 7) 0.63x the time, (128, 512, 7, 7) 0.68x,
 * float32 (64, 512, 10, 10) 0.70x, (256, 256, 8, 8) 0.78x, (640, 64, 9, 9) 0.79x; one
 * thread 0.57-0.70x, (32, 512, 7, 7) float64 0.59x. Runs of 512 bytes to 1 KiB gained
 * less (0.78-0.96x) and float64 (32, 256, 120) on one thread took 1.26x. The forward
 * passes gain nothing from it: (64, 512, 10, 10) training forward took 1.38x the time.
 */
#define FBN_SPREAD_MAX_COLUMNS (64 * 1024)

static inline int64_t fbn_spread(fbn_shape shape, fbn_pass pass, size_t value_bytes,
                                 int streamed)
{
    if (shape.inner <= 1 || shape.channels > FBN_SPREAD_MAX_COLUMNS / shape.inner)
        return 1;
    const int64_t run_bytes = shape.inner * (int64_t)value_bytes;
    const int reductions = shape.inner <= 16 || (run_bytes < 256 && shape.outer >= 32);
    int spreads;
    switch (pass) {
    case FBN_PASS_EVAL:
        spreads = (run_bytes <= 64 && shape.outer >= 8) || (run_bytes < 128 && shape.outer >= 64);
        break;
    case FBN_PASS_TRAINING_FORWARD:
        spreads = reductions || (shape.inner <= 64 && shape.outer >= 64);
        break;
    default:
        spreads = reductions || (streamed && run_bytes < 512 && shape.outer >= 32);
    }
    return spreads ? shape.inner : 1;
}

/* The shape the kernels walk: the rows of columns when spreading. */
static inline fbn_shape fbn_spread_view(fbn_shape shape, int64_t spread)
{
    if (spread > 1) {
        shape.channels *= spread;
        shape.inner = 1;
    }
    return shape;
}

/* The slice [begin, end) of [0, n) that part `part` of `nparts` owns. */
static inline void fbn_split(int64_t n, int part, int nparts, int64_t *begin, int64_t *end)
{
    int64_t base = n / nparts, extra = n % nparts;
    *begin = part * base + (part < extra ? part : extra);
    *end = *begin + base + (part < extra);
}

/* fbn_split of n values of `value_bytes` each stored from `data`, each cut moved back to the
   start of the cache line it falls in, so that no two parts write to one line. */
static inline void fbn_split_lines(int64_t n, int part, int nparts, const void *data,
                                   size_t value_bytes, int64_t *begin, int64_t *end)
{
    const int64_t per_line = 64 / (int64_t)value_bytes;
    const int64_t first_line =
        (int64_t)((64 - (uintptr_t)data % 64) % 64) / (int64_t)value_bytes;
    int64_t *cuts[2] = {begin, end};
    fbn_split(n, part, nparts, begin, end);
    for (int k = 0; k < 2; ++k) {
        const int64_t cut = *cuts[k];
        if (cut > 0 && cut < n) {
            const int64_t back = ((cut - first_line) % per_line + per_line) % per_line;
            *cuts[k] = cut - back > 0 ? cut - back : 0;
        }
    }
}

/* The tile a by_channel part owns: tile index t of the plan. */
static inline fbn_tile fbn_channel_tile(fbn_shape shape, const fbn_plan *plan, int64_t t)
{
    fbn_tile tile;
    tile.c0 = t == 0 ? 0 : t * plan->channels_per_tile + plan->tile_shift;
    tile.c1 = (t + 1) * plan->channels_per_tile + plan->tile_shift;
    if (tile.c1 > shape.channels)
        tile.c1 = shape.channels;
    tile.m0 = 0;
    tile.m1 = shape.outer * shape.inner;
    return tile;
}

static inline int64_t fbn_tile_count(fbn_shape shape, const fbn_plan *plan)
{
    const int64_t after_shift = shape.channels - plan->tile_shift;
    return (after_shift + plan->channels_per_tile - 1) / plan->channels_per_tile;
}

/* Working memory for one kernel call (runtime.c): at least `bytes`, aligned as malloc's, or
   NULL when out of memory; give it back when the call ends. The runtime keeps the last block
   given back for the next call, so that repeated calls do not map and zero fresh pages. */
void *fbn_scratch_take(size_t bytes);
void fbn_scratch_give(void *scratch);

/* Threads available to a kernel doing `pass` over `elements` values: 1 below its threshold
   (fastbn.h: FBN_*PARALLEL_MIN_ELEMENTS, higher while several threads call kernels), while
   another call's threads run, and in a child process forked after OpenMP was used
   (runtime.c). Moments alone count as the training forward, a copy as eval. */
int fbn_threads_for(int64_t elements, fbn_pass pass);

/* Calls body(context, part, nparts) for every part, on nparts threads when nparts > 1. */
typedef void (*fbn_part_body)(void *context, int part, int nparts);
void fbn_run_parts(fbn_part_body body, void *context, int nparts);

#endif
