/* One token's projection on a CPU: y = W x with W (N, K) in bf16, fp16 or fp32 (as the checkpoint
 * stores it), x (K) in bf16 or fp32, y (N) in bf16 or fp32 (the activations' dtype).
 *
 * Decoding at batch 1 reads every weight once per token and does two flops per weight read, so it
 * is bound by how fast a core pulls weights out of memory, not by arithmetic. Two things set that
 * speed here:
 *   - one row at a time, read front to back, while each line of the next row is prefetched into
 *     L2 (not L1): the core's own stream prefetcher follows the row, and the next row's lines, and
 *     their pages' translations, are on their way before the loads that need them. Measured on an
 *     AMD EPYC with AVX-512 BF16, 2 threads: 35 GB/s for bf16 and fp32 alike, where four rows with
 *     the next four prefetched into L1 read 27 GB/s (BENCHMARKS.md, "CPU inference");
 *   - LANES running sums, one per column modulo LANES, added together once at the row's end: the
 *     compiler turns them into vector registers, and no sum crosses lanes inside the loop.
 * x is read in its own dtype, once per row: at 8192 columns (w2) an fp32 x is 32 KB, all of a core's
 * L1, and the weight's lines evict it; a bf16 x is half that, and w2 reads at 33 GB/s, not 26.5.
 * Each weight is widened to fp32 as it is loaded (exact for all three types), products are summed in
 * fp32 and a bf16 y is rounded once, as torch.mv's bf16 kernel does; the order of the sums is fixed
 * by this code (no -ffast-math), so a result depends on the kind of CPU (the AVX-512 BF16 loop sums
 * in its own order), never on the compiler.
 *
 * Plain C, vectorised by the compiler (cpu_gemv.py builds it with -O3 -march=native: AVX2 or AVX-512
 * on x86, NEON on Arm, from this one source), but for one loop written with intrinsics where the CPU
 * has AVX-512 BF16 (bf16 weights into bf16 activations, below); OpenMP splits the rows between the
 * threads torch uses.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 32  /* running sums per row: 64 bytes of bf16, one cache line, per step */

enum { W_BF16 = 0, W_F16 = 1, W_F32 = 2 };  /* the weight's type, as cpu_gemv.py names it */
static const int64_t BYTES[] = {2, 2, 4};

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;  /* bf16 is the top half of an fp32 */
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x0040);  /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);  /* round to nearest, ties to even */
    return (uint16_t)(bits >> 16);
}

/* fp16 without branches, so that the compiler vectorises it on every CPU (it does not vectorise
 * _Float16's own conversion on x86 without AVX-512 FP16): the exponent and mantissa bits moved into
 * fp32's places read as a number 2^112 too small, normal or subnormal alike, and one multiply
 * rebiases it; infinity and NaN (exponent all ones) are put back by a select. */
static inline float f16_to_float(uint16_t h) {
    uint32_t magnitude = (uint32_t)(h & 0x7fffu) << 13, sign = (uint32_t)(h & 0x8000u) << 16, bits;
    float f;
    memcpy(&f, &magnitude, 4);
    f *= 0x1p112f;
    memcpy(&bits, &f, 4);
    bits = (h & 0x7c00u) == 0x7c00u ? 0x7f800000u | magnitude : bits;
    bits |= sign;
    memcpy(&f, &bits, 4);
    return f;
}

/* Weight i of W as fp32. `type` is a constant wherever this is inlined (see rows_of_y), so the
 * switch folds away and each loop is compiled for one type. */
static inline __attribute__((always_inline)) float weight(const void *W, int type, int64_t i) {
    switch (type) {
    case W_BF16: return bf16_to_float(((const uint16_t *)W)[i]);
    case W_F16: return f16_to_float(((const uint16_t *)W)[i]);
    default: return ((const float *)W)[i];
    }
}

/* Activation k of x (bf16 or fp32) as fp32; x_bf16 is a constant wherever this is inlined. */
static inline __attribute__((always_inline)) float activation(const void *x, int x_bf16, int64_t k) {
    return x_bf16 ? bf16_to_float(((const uint16_t *)x)[k]) : ((const float *)x)[k];
}

/* One row's sum from its LANES running sums and the columns past the last whole step. */
static inline __attribute__((always_inline)) float row_total(const float *lanes, const void *w, int type,
                                                             const void *x, int x_bf16, int64_t from, int64_t K) {
    float total = 0.0f;
    for (int l = 0; l < LANES; l++) total += lanes[l];
    for (int64_t k = from; k < K; k++) total += weight(w, type, k) * activation(x, x_bf16, k);
    return total;
}

/* Rows [first, last) of W x into y (fp32). */
static inline __attribute__((always_inline)) void rows_of_y(const void *W, int type, const void *x, int x_bf16,
                                                            float *y, int64_t K, int64_t first, int64_t last) {
    const char *bytes = (const char *)W;
    int64_t steps_end = K / LANES * LANES, row_bytes = K * BYTES[type], step_bytes = LANES * BYTES[type];
    for (int64_t n = first; n < last; n++) {
        const char *w = bytes + n * row_bytes, *next = w + row_bytes;
        int prefetch = n + 1 < last;  /* the next row is this thread's too */
        float lanes[LANES] = {0};
        for (int64_t k0 = 0; k0 < steps_end; k0 += LANES) {
            if (prefetch)
                for (int64_t b = 0; b < step_bytes; b += 64) __builtin_prefetch(next + k0 * BYTES[type] + b, 0, 2);
            for (int l = 0; l < LANES; l++) lanes[l] += weight(w, type, k0 + l) * activation(x, x_bf16, k0 + l);
        }
        y[n] = row_total(lanes, w, type, x, x_bf16, steps_end, K);
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
/* bf16 W and bf16 x on a CPU with AVX-512 BF16 (Zen 4 and later, Intel since Cooper Lake): vdpbf16ps
 * multiplies 32 pairs of bf16 straight from the loaded lines and adds each pair's two products into
 * one fp32 sum, one instruction where the plain loop spends seven (widen W and x, each in two halves,
 * then two FMAs). Widened, the plain loop keeps a core busy enough to fall behind memory when memory
 * is fast: over a 1B model's weights in decoding order, on an AMD EPYC with 2 threads, in a minute
 * when a loop that only reads them ran at 48.2 GB/s, the plain loop read 41.0 and this one 47.2 (in
 * slow minutes all three sit at the same 33). The products of two bf16 are exact in fp32, so only
 * the order of the fp32 sums differs from the plain loop; the instruction treats subnormal inputs as
 * zero, which no trained weight or activation near 1e-38 notices. Two sums, each a line per step,
 * hide its latency. */
static void rows_bf16_bf16_dot(const void *W, const void *x, float *y, int64_t K, int64_t first, int64_t last) {
    const uint16_t *xs = (const uint16_t *)x;
    int64_t steps_end = K / 64 * 64;
    for (int64_t n = first; n < last; n++) {
        const uint16_t *w = (const uint16_t *)W + n * K, *next = w + K;
        int prefetch = n + 1 < last;
        __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
        for (int64_t k = 0; k < steps_end; k += 64) {
            if (prefetch) {
                _mm_prefetch((const char *)(next + k), _MM_HINT_T1);
                _mm_prefetch((const char *)(next + k + 32), _MM_HINT_T1);
            }
            sum0 = _mm512_dpbf16_ps(sum0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(xs + k));
            sum1 = _mm512_dpbf16_ps(sum1, (__m512bh)_mm512_loadu_si512(w + k + 32),
                                    (__m512bh)_mm512_loadu_si512(xs + k + 32));
        }
        float total = _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
        for (int64_t k = steps_end; k < K; k++) total += bf16_to_float(w[k]) * bf16_to_float(xs[k]);
        y[n] = total;
    }
}
#define ROWS_BF16_BF16 rows_bf16_bf16_dot
#else
#define ROWS_BF16_BF16 rows_bf16_bf16
#endif

/* One copy of the loops per weight type and activation type, each compiled with both known. */
typedef void (*rows_fn)(const void *, const void *, float *, int64_t, int64_t, int64_t);
#define ROWS_FOR(name, w_type, x_bf16) \
    static __attribute__((unused)) void name(const void *W, const void *x, float *y, int64_t K, int64_t a, \
                                             int64_t b) { \
        rows_of_y(W, w_type, x, x_bf16, y, K, a, b); \
    }
ROWS_FOR(rows_bf16_f32, W_BF16, 0)
ROWS_FOR(rows_bf16_bf16, W_BF16, 1)
ROWS_FOR(rows_f16_f32, W_F16, 0)
ROWS_FOR(rows_f16_bf16, W_F16, 1)
ROWS_FOR(rows_f32_f32, W_F32, 0)
ROWS_FOR(rows_f32_bf16, W_F32, 1)
static const rows_fn ROWS_OF[3][2] = {{rows_bf16_f32, ROWS_BF16_BF16}, {rows_f16_f32, rows_f16_bf16},
                                      {rows_f32_f32, rows_f32_bf16}};

/* y = W x for `count` weights W[0], W[1], ... of N[0], N[1], ... rows and K columns each, their
 * products one after another in y, on `threads` threads: the threads split all the rows between them
 * at once, each taking one contiguous band, so that the projections of one input (a block's wq, wk
 * and wv; its w1 and w3) cost one parallel region, not three. w_type: W_BF16, W_F16 or W_F32, the
 * same for all; x_bf16 / y_bf16: 1 if x / y are bf16, 0 if fp32. Returns 0, -1 if out of memory,
 * -2 for an unknown w_type. */
int gemv_many(int count, const void *const *W, const int64_t *N, int w_type, const void *x, int x_bf16, void *y,
              int y_bf16, int64_t K, int threads) {
    if (w_type < W_BF16 || w_type > W_F32) return -2;
    rows_fn rows = ROWS_OF[w_type][x_bf16 ? 1 : 0];
    int64_t total = 0;
    for (int i = 0; i < count; i++) total += N[i];
    float *yf = y_bf16 ? malloc((size_t)(total ? total : 1) * sizeof(float)) : (float *)y;
    if (!yf) return -1;
    #pragma omp parallel num_threads(threads)
    {
        int64_t t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), T = omp_get_num_threads();
#endif
        int64_t per = (total + T - 1) / T;
        int64_t first = t * per < total ? t * per : total, last = first + per < total ? first + per : total;
        for (int64_t i = 0, start = 0; i < count; start += N[i], i++) {  /* this band's rows of each weight */
            int64_t a = first > start ? first : start, b = last < start + N[i] ? last : start + N[i];
            if (a < b) rows(W[i], x, yf + start, K, a - start, b - start);
        }
        if (y_bf16)
            for (int64_t n = first; n < last; n++) ((uint16_t *)y)[n] = float_to_bf16(yf[n]);
    }
    if (y_bf16) free(yf);
    return 0;
}

/* y = W x for one weight W (N, K): gemv_many with one. */
int gemv(const void *W, int w_type, const void *x, int x_bf16, void *y, int y_bf16, int64_t N, int64_t K,
         int threads) {
    return gemv_many(1, &W, &N, w_type, x, x_bf16, y, y_bf16, K, threads);
}
