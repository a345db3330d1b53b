/*
 * Threads, fork safety and what this build and CPU provide.
 *
 * Every OpenMP construct of fastbn is in this file: kernels describe their work as parts
 * (fbn_threads_for says how many) and fbn_run_parts runs them. That keeps these rules in
 * one place:
 *  - small jobs never enter a parallel region (it costs microseconds);
 *  - while several threads call kernels, only large jobs do, and none while another call's
 *    threads run (libgomp gives every calling thread a pool of its own);
 *  - a child forked after the parent used OpenMP never does: GNU libgomp's thread pool
 *    does not survive fork() and a parallel region in the child hangs.
 */
#include "common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <unistd.h>
#define FBN_HAVE_PTHREADS 1
#endif

#include <stdlib.h>
#include <string.h>

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && !defined(__STDC_NO_ATOMICS__)
#include <stdatomic.h>
typedef atomic_int fbn_shared_int;
#define FBN_HAVE_ATOMICS 1
#else
typedef volatile int fbn_shared_int;
#endif

/* 0 until set_num_threads: then OpenMP's own default (OMP_NUM_THREADS, threadpoolctl). */
static fbn_shared_int requested_threads = 0;
/* Set in a child forked after this process ran a parallel region. */
static fbn_shared_int in_forked_child = 0;
/* Parallel regions running now (fbn_run_parts). */
static fbn_shared_int running_teams = 0;

int fbn_openmp_enabled(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

void fbn_set_num_threads(int num_threads)
{
    requested_threads = num_threads > 0 ? num_threads : 0;
}

int fbn_get_num_threads(void)
{
#ifdef _OPENMP
    if (in_forked_child)
        return 1;
    int requested = requested_threads;
    return requested > 0 ? requested : omp_get_max_threads();
#else
    return 1;
#endif
}

/*
 * Threads calling kernels large enough for threads. libgomp keeps a pool of threads for
 * every thread that starts a parallel region, as long as that thread lives; with more
 * pooled threads than cores they sleep, instead of spinning, between regions and at their
 * barriers, and waking them costs tens of microseconds per region; and a team's threads
 * spin after each region, on a core another caller wants. So while more than one thread
 * calls, as in a service answering from a pool of threads, kernels take threads only for
 * large jobs (fastbn.h: FBN_SHARED_*). A thread counts from its first such call until it
 * ends. Needs pthreads and C11 atomics; without them every thread counts as the only one.
 */
#if defined(_OPENMP) && defined(FBN_HAVE_PTHREADS) && defined(FBN_HAVE_ATOMICS)
static fbn_shared_int calling_threads = 0;
static pthread_key_t caller_key; /* set (non-NULL) in a thread counted there */
static int caller_key_made = 0;
static pthread_once_t caller_key_once = PTHREAD_ONCE_INIT;

static void forget_caller(void *counted)
{
    (void)counted;
    atomic_fetch_sub(&calling_threads, 1);
}

/* A forked child has the forking thread alone. */
static void recount_callers_in_child(void)
{
    calling_threads = pthread_getspecific(caller_key) != NULL;
}

static void make_caller_key(void)
{
    caller_key_made = pthread_key_create(&caller_key, forget_caller) == 0 &&
                      pthread_atfork(NULL, NULL, recount_callers_in_child) == 0;
}

/* Counts the calling thread (once) and says whether other threads are counted too. */
static int callers_shared(void)
{
    pthread_once(&caller_key_once, make_caller_key);
    if (!caller_key_made)
        return 0;
    if (pthread_getspecific(caller_key) == NULL &&
        pthread_setspecific(caller_key, &caller_key) == 0)
        atomic_fetch_add(&calling_threads, 1);
    return atomic_load(&calling_threads) > 1;
}
#else
static int callers_shared(void) { return 0; }
#endif

static void count_teams(int change)
{
#ifdef FBN_HAVE_ATOMICS
    atomic_fetch_add(&running_teams, change);
#else
    (void)change;
#endif
}

/* Whether another call's threads are running: then a call takes its calling thread alone,
   as those keep the cores busy already (a call on one thread does not count: a small call
   in another thread would take threads from a large one). */
static int team_running(void)
{
#ifdef FBN_HAVE_ATOMICS
    return atomic_load(&running_teams) > 0;
#else
    return 0;
#endif
}

int fbn_threads_for(int64_t elements, fbn_pass pass)
{
    static const int64_t alone[] = {[FBN_PASS_EVAL] = FBN_ONE_PASS_PARALLEL_MIN_ELEMENTS,
                                    [FBN_PASS_TRAINING_FORWARD] = FBN_PARALLEL_MIN_ELEMENTS,
                                    [FBN_PASS_BACKWARD] = FBN_BACKWARD_PARALLEL_MIN_ELEMENTS};
    static const int64_t shared[] = {
        [FBN_PASS_EVAL] = FBN_SHARED_ONE_PASS_PARALLEL_MIN_ELEMENTS,
        [FBN_PASS_TRAINING_FORWARD] = FBN_SHARED_PARALLEL_MIN_ELEMENTS,
        [FBN_PASS_BACKWARD] = FBN_SHARED_PARALLEL_MIN_ELEMENTS};
    if (elements < alone[pass])
        return 1;
    const int64_t min_elements = callers_shared() ? shared[pass] : alone[pass];
    if (elements < min_elements || team_running())
        return 1;
    int threads = fbn_get_num_threads();
    /* Every thread gets at least half the serial threshold, or it costs more than it saves. */
    int64_t useful = elements / (min_elements / 2);
    return useful < threads ? (int)useful : threads;
}

#ifdef FBN_HAVE_PTHREADS
static void mark_forked_child(void) { in_forked_child = 1; }
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, mark_forked_child); }
#endif

void fbn_run_parts(fbn_part_body body, void *context, int nparts)
{
#ifdef _OPENMP
    if (nparts > 1) {
#ifdef FBN_HAVE_PTHREADS
        pthread_once(&atfork_once, register_atfork);
#endif
        count_teams(1);
#pragma omp parallel num_threads(nparts)
        {
            /* OpenMP may give fewer threads than asked (nested regions, thread limits):
               the threads it gives then share out every part. */
            int team = omp_get_num_threads();
            for (int part = omp_get_thread_num(); part < nparts; part += team)
                body(context, part, nparts);
        }
        count_teams(-1);
        return;
    }
#endif
    for (int part = 0; part < nparts; ++part)
        body(context, part, nparts);
}

/*
 * The benchmark's memory floor (fastbn/bench): a copy of `elements` values split over the
 * threads a kernel over them would use, run as the kernels run. A copy split over Python
 * threads paid ~40 us to hand each part over, as long as the whole copy of 4 MB.
 */
typedef struct {
    char *dst;
    const char *src;
    int64_t bytes;
} copy_job;

static void copy_part(void *context, int part, int nparts)
{
    const copy_job *job = context;
    int64_t begin, end;
    fbn_split(job->bytes, part, nparts, &begin, &end);
    memcpy(job->dst + begin, job->src + begin, (size_t)(end - begin));
}

void fbn_copy(void *dst, const void *src, int64_t elements, int64_t itemsize)
{
    copy_job job = {dst, src, elements * itemsize};
    /* split as eval, a pass of one read and one write, splits its work */
    fbn_run_parts(copy_part, &job, fbn_threads_for(elements, FBN_PASS_EVAL));
}

/*
 * Scratch. A block of more than a few hundred KiB from malloc is often mapped fresh from
 * the OS at every call (glibc maps large blocks and unmaps or trims them when freed), and
 * the OS zeroes each page at first touch: 55 us to 0.45 ms per MB on the development
 * machine, half the time of a (64, 512, 7, 7) training forward with out=. So the last block
 * given back is kept (one block, of at most FBN_SCRATCH_KEEP_BYTES) for the next call it is
 * large enough for. Lock-free: a call that finds no block kept, or too small a one,
 * allocates its own.
 */
#define FBN_SCRATCH_KEEP_BYTES ((size_t)64 << 20)

typedef union {
    size_t bytes;           /* usable bytes after the header */
    max_align_t alignment;  /* keeps the block after the header aligned as malloc's */
} scratch_header;

#ifdef FBN_HAVE_ATOMICS
static _Atomic(scratch_header *) kept_scratch = NULL;
#endif

void *fbn_scratch_take(size_t bytes)
{
    scratch_header *block = NULL;
#ifdef FBN_HAVE_ATOMICS
    block = atomic_exchange(&kept_scratch, NULL);
    if (block && block->bytes >= bytes)
        return block + 1;
    free(block);
#endif
    if (bytes > SIZE_MAX - sizeof(scratch_header))
        return NULL;
    block = malloc(sizeof(scratch_header) + bytes);
    if (!block)
        return NULL;
    block->bytes = bytes;
    return block + 1;
}

void fbn_scratch_give(void *scratch)
{
    if (!scratch)
        return;
    scratch_header *block = (scratch_header *)scratch - 1;
#ifdef FBN_HAVE_ATOMICS
    if (block->bytes <= FBN_SCRATCH_KEEP_BYTES)
        block = atomic_exchange(&kept_scratch, block); /* keep it; free the one kept before */
#endif
    free(block);
}

/* 7/8 of the L2 cache, leaving room for what else lives there (the output being written,
   the stack). Read once; a race between first callers only computes it twice. */
int64_t fbn_tile_budget_bytes(void)
{
    static fbn_shared_int budget_kib = 0;
    int kib = budget_kib;
    if (kib == 0) {
        long l2 = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
        l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        kib = l2 > 64 * 1024 ? (int)(l2 / 1024 * 7 / 8) : FBN_L2_DEFAULT_BYTES / 1024;
        budget_kib = kib;
    }
    return (int64_t)kib * 1024;
}

#if defined(FBN_STREAMING) && !defined(FBN_NO_DISPATCH)
#define FBN_CPU_DISPATCH 1
#endif

/* Whether the CPU runs the AVX-512 loops (kernels/avx512.inc, FBN_STREAMING). Asked once;
   without dispatch, whether the compiler targets AVX-512. */
int fbn_has_avx512(void)
{
#ifdef FBN_CPU_DISPATCH
    static fbn_shared_int has_avx512 = -1; /* -1: not asked yet */
    int answer = has_avx512;
    if (answer < 0) {
        __builtin_cpu_init();
        answer = __builtin_cpu_supports("avx512f") ? 1 : 0;
        has_avx512 = answer;
    }
    return answer;
#elif defined(FBN_STREAMING) && defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* Whether the CPU runs the AVX2 streaming loops (vectors.inc): it has AVX2 and FMA, and so
   runs the x86-64-v3 clones of the portable loops (FBN_CLONES), whose results the AVX2 loops
   match, but no AVX-512. Asked once; without dispatch, whether the compiler targets AVX2
   and FMA but not AVX-512. */
int fbn_has_avx2(void)
{
#if defined(FBN_CPU_DISPATCH) && defined(FBN_CLONES)
    static fbn_shared_int has_avx2 = -1; /* -1: not asked yet */
    int answer = has_avx2;
    if (answer < 0) {
        __builtin_cpu_init();
        answer = !fbn_has_avx512() && __builtin_cpu_supports("avx2") &&
                 __builtin_cpu_supports("fma");
        has_avx2 = answer;
    }
    return answer;
#elif defined(FBN_STREAMING) && defined(FBN_NO_DISPATCH) && defined(__AVX2__) && \
    defined(__FMA__)
    return !fbn_has_avx512();
#else
    return 0;
#endif
}

/* A pass's output is streamed, on CPUs with AVX-512 or AVX2, from the size for the pass
   and its pace below: on one core, one core's traffic with L3 (a read for ownership and a
   write-back of every line of y) is the bottleneck; on several threads smaller arrays stay
   in L3 together, and the next layer finds the output there. (Fixed sizes: the L3 size
   the system reports is unreliable in virtual machines, 320 MiB for a 32 MiB cache here.)
   Measured on 2 cores, against writing through the cache:
   - Eval at L3's speed from 18 MiB: with outputs of 12.8-17.6 MB, eval through the cache
     took 0.47-0.97x the time of streaming, in every layout (float32 (16, 64, 56, 56)
     0.50-0.83x, (64, 256, 14, 14) 0.47-0.80x, (16, 56, 56, 64) channels-last 0.50-0.97x,
     (3200, 1024) 0.58-0.92x, (22, 64, 56, 56) 0.64-0.76x); from 19 MB, 0.8-1.3x.
   - The training forward at L3's speed from 12 MiB: from 16 MB streaming took 0.72-1.0x
     the time ((96, 256, 14, 14) 0.72-0.79x, (20, 56, 56, 64) channels-last 0.90x,
     (24, 64, 56, 56) 0.90-0.96x) but for rows ((4000, 1024) 1.04-1.19x); at 12.8 MB it
     depends on the layout: (64, 256, 14, 14) 0.88-0.90x, (16, 64, 56, 56) 1.11-1.25x,
     (3200, 1024) 1.22-1.28x, (16, 56, 56, 64) 1.9-2.1x; at 9.6-10.5 MB, 1.1-1.8x.
   - The forward passes over rows walked in chunks (several threads) from 10 MiB: with
     outputs of 8.4-9.4 MB, through the cache eval took 0.44-0.91x the time of streaming
     (float32 (256, 8192) 0.49-0.81x, (64, 32768) 0.46x, (1640, 1280) 0.62-0.91x,
     (64, 2048, 4, 4), spread to rows of 32768, 0.47-0.66x, float64 (512, 2048)
     0.59-0.62x) and the training forward 0.66-1.0x; at 10.5 MB ((2048, 1280),
     (1024, 2560)) streaming took 0.73-1.43x the time as the host's load changed, at
     11.5 MB 0.89-1.28x, from 12.6 MB 0.66-1.0x (the training forward 0.82-0.97x).
   - The backward at L3's speed from 8 MiB of grad_x (x, grad_out and grad_x come to 24
     MiB): (16, 3, 224, 224) float32 took 1.16x the time without.
   - On one core, from 8 MiB, where without it (2048, 1280) eval took 2.2x the time,
     (9600, 256) 1.12x, the training forward 1.04-1.66x. The backward on one core from
     6 MiB: streamed, it took 0.74-0.88x the time at 6.5-8 MB (float32 (1600, 1024) 0.76x,
     (10, 64, 56, 56) 0.76x, float64 (5, 64, 56, 56) 0.74x, (875, 1000) 0.88x), 0.97-0.98x
     at 6 MB, 1.01-1.04x at 5 MB. */
int fbn_stream_output(int64_t output_bytes, fbn_pass pass, fbn_pace pace)
{
    enum { MiB = 1024 * 1024 };
    static const int64_t smallest[][3] = {
        /* eval, training forward, backward (which takes no chunked pace) */
        [FBN_ONE_CORE] = {8 * MiB, 8 * MiB, 6 * MiB},
        [FBN_CHUNKED_ROWS] = {10 * MiB, 10 * MiB, 8 * MiB},
        [FBN_L3_SPEED] = {18 * MiB, 12 * MiB, 8 * MiB},
    };
    const int vectors = fbn_has_avx512() ? FBN_STREAM_AVX512
                        : fbn_has_avx2() ? FBN_STREAM_AVX2
                                         : 0;
    return output_bytes >= smallest[pace][pass] ? vectors : 0;
}

const char *fbn_simd_level(void)
{
#if defined(FBN_NO_DISPATCH)
    return "baseline (built with FBN_NO_DISPATCH)";
#elif defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return "avx512 (x86-64-v4)";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return "avx2 (x86-64-v3)";
    return "baseline (x86-64)";
#else
    return "baseline (compiler default)";
#endif
}

#ifndef FBN_BUILD_FLAGS
#define FBN_BUILD_FLAGS "unknown"
#endif

const char *fbn_build_flags(void) { return FBN_BUILD_FLAGS; }
