/* One token's projection on a CPU: y = W x with W (N, K) in bf16, fp16 or fp32 (as the checkpoint
 * stores it), x (K) in bf16 or fp32, y (N) in bf16 or fp32 (the activations' dtype). At the end of
 * the file, decode_blocks: a whole one-token decoding step's blocks around these products.
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
 * by this code (no -ffast-math, and -ffp-contract=off: no product fused into a sum), so a result
 * depends on the kind of CPU (the AVX-512 BF16 loop sums in its own order), never on the compiler.
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
#define INLINE static inline __attribute__((always_inline))  /* compiled into each caller, constants and all */

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
INLINE float weight(const void *W, int type, int64_t i) {
    switch (type) {
    case W_BF16: return bf16_to_float(((const uint16_t *)W)[i]);
    case W_F16: return f16_to_float(((const uint16_t *)W)[i]);
    default: return ((const float *)W)[i];
    }
}

/* Activation k of x (bf16 or fp32) as fp32; x_bf16 is a constant wherever this is inlined. */
INLINE float activation(const void *x, int x_bf16, int64_t k) {
    return x_bf16 ? bf16_to_float(((const uint16_t *)x)[k]) : ((const float *)x)[k];
}

/* One row's sum from its LANES running sums and the columns past the last whole step. */
INLINE float row_total(const float *lanes, const void *w, int type, const void *x, int x_bf16, int64_t from,
                       int64_t K) {
    float total = 0.0f;
    for (int l = 0; l < LANES; l++) total += lanes[l];
    for (int64_t k = from; k < K; k++) total += weight(w, type, k) * activation(x, x_bf16, k);
    return total;
}

/* Rows [first, last) of W x into y (fp32); the rows before `ahead` are worth prefetching (this
 * thread's next chunk is likely to start where this one ends). */
INLINE void rows_of_y(const void *W, int type, const void *x, int x_bf16, float *y, int64_t K, int64_t first,
                      int64_t last, int64_t ahead) {
    const char *bytes = (const char *)W;
    int64_t steps_end = K / LANES * LANES, row_bytes = K * BYTES[type], step_bytes = LANES * BYTES[type];
    for (int64_t n = first; n < last; n++) {
        const char *w = bytes + n * row_bytes, *next = w + row_bytes;
        int prefetch = n + 1 < ahead;
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
static void rows_bf16_bf16_dot(const void *W, const void *x, float *y, int64_t K, int64_t first, int64_t last,
                               int64_t ahead) {
    const uint16_t *xs = (const uint16_t *)x;
    int64_t steps_end = K / 64 * 64;
    for (int64_t n = first; n < last; n++) {
        const uint16_t *w = (const uint16_t *)W + n * K, *next = w + K;
        int prefetch = n + 1 < ahead;
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
typedef void (*rows_fn)(const void *, const void *, float *, int64_t, int64_t, int64_t, int64_t);
#define ROWS_FOR(name, w_type, x_bf16) \
    static __attribute__((unused)) void name(const void *W, const void *x, float *y, int64_t K, int64_t a, \
                                             int64_t b, int64_t ahead) { \
        rows_of_y(W, w_type, x, x_bf16, y, K, a, b, ahead); \
    }
ROWS_FOR(rows_bf16_f32, W_BF16, 0)
ROWS_FOR(rows_bf16_bf16, W_BF16, 1)
ROWS_FOR(rows_f16_f32, W_F16, 0)
ROWS_FOR(rows_f16_bf16, W_F16, 1)
ROWS_FOR(rows_f32_f32, W_F32, 0)
ROWS_FOR(rows_f32_bf16, W_F32, 1)
static const rows_fn ROWS_OF[3][2] = {{rows_bf16_f32, ROWS_BF16_BF16}, {rows_f16_f32, rows_f16_bf16},
                                      {rows_f32_f32, rows_f32_bf16}};

enum { MAX_THREADS = 256, CHUNK_BYTES = 128 << 10 };

/* Rows [first, last) of the weights laid end to end (W[0]'s N[0] rows, then W[1]'s, ...) into yf,
 * prefetching up to row `ahead` (the end of the band). */
static void rows_of_weights(rows_fn rows, int count, const void *const *W, const int64_t *N, const void *x, float *yf,
                            int64_t K, int64_t first, int64_t last, int64_t ahead) {
    for (int64_t i = 0, start = 0; i < count; start += N[i], i++) {
        int64_t a = first > start ? first : start, b = last < start + N[i] ? last : start + N[i];
        int64_t c = ahead < start + N[i] ? ahead : start + N[i];
        if (a < b) rows(W[i], x, yf + start, K, a - start, b - start, c - start);
    }
}

/* y = W x for `count` weights W[0], W[1], ... of N[0], N[1], ... rows and K columns each, their
 * products one after another in y, on `threads` threads: the threads split all the rows between them
 * at once (a band each, shared out in chunks below), so that the projections of one input (a block's
 * wq, wk and wv; its w1 and w3) cost one parallel region, not three. w_type: W_BF16, W_F16 or W_F32, the
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
    /* Each thread owns a band of rows and takes it a chunk (about CHUNK_BYTES of weights) at a time;
     * a thread done with its band takes the chunks left in the others'. Bands alone left one thread
     * idle while the other finished, 4-9 ms of a 1B model's 85 ms bf16 step (65 calls) on an AMD EPYC
     * VM whose two cores do not get memory evenly. */
    int bands = threads < 1 ? 1 : (threads < MAX_THREADS ? threads : MAX_THREADS);
    int64_t chunk = CHUNK_BYTES / (K * BYTES[w_type]), per = (total + bands - 1) / bands, next[MAX_THREADS];
    chunk = chunk < 1 ? 1 : chunk;
    for (int b = 0; b < bands; b++) next[b] = b * per < total ? b * per : total;
    #pragma omp parallel num_threads(bands)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), T = omp_get_num_threads();  /* fewer than asked, if OpenMP says so */
#endif
        for (int i = 0; i < bands; i++) {  /* its own band first, then the others' */
            int band = (t + i) % bands;
            int64_t end = (band + 1) * per < total ? (band + 1) * per : total, first;
            while ((first = __atomic_fetch_add(&next[band], chunk, __ATOMIC_RELAXED)) < end)
                rows_of_weights(rows, count, W, N, x, yf, K, first, first + chunk < end ? first + chunk : end, end);
        }
        if (y_bf16) {  /* once every row is done, each thread rounds a share of y */
            #pragma omp barrier
            int64_t share = (total + T - 1) / T, first = t * share < total ? t * share : total;
            int64_t last = first + share < total ? first + share : total;
            for (int64_t n = first; n < last; n++) ((uint16_t *)y)[n] = float_to_bf16(yf[n]);
        }
    }
    if (y_bf16) free(yf);
    return 0;
}

/* y = W x for one weight W (N, K): gemv_many with one. */
int gemv(const void *W, int w_type, const void *x, int x_bf16, void *y, int y_bf16, int64_t N, int64_t K,
         int threads) {
    return gemv_many(1, &W, &N, w_type, x, x_bf16, y, y_bf16, K, threads);
}

/* -----------------------------------------------------------------------------------------------
 * A whole decoding step's blocks for one token at batch 1: model.Transformer._blocks' loop in one call.
 *
 * Around its products, a block's step is some eighty small PyTorch operations (two norms, RoPE, the
 * cache writes, one query's attention, SwiGLU, the residual adds, casts and views), each a few
 * microseconds of dispatch for almost no arithmetic: 7-11 ms of a 1B model's 65 ms step on a CPU.
 * Here they are a few loops between the same products. The arithmetic is the PyTorch path's, in
 * its order where an order is given, and every value is rounded to the activations' dtype (bf16 or
 * fp32) exactly where that path rounds it: after each norm's scaling and again after its weight,
 * after each projection, after RoPE, after the attention, after SiLU, after the gate's product and
 * after each residual add. Sums (the norm's mean of squares, the dot products, the softmax's total)
 * run in fp32 in this code's order, so a bf16 result can differ from PyTorch's by one rounding
 * where a sum lands next to a bf16 boundary; an fp32 one by a few units in the last place.
 * Compiled with -ffp-contract=off (cpu_gemv.py), so that a*b - c*d is two products and a
 * difference, as PyTorch's vectorised operations compute it, never a fused multiply-add.
 */
#include <math.h>

/* Every helper below takes x_bf16 (the activations' dtype) as an argument and is inlined where it is
 * a constant: decode_blocks runs one copy of its loop for bf16 activations and one for fp32, each
 * compiled with the dtype known, so that the loops are vectorised instead of testing it per value. */

INLINE void set_activation(void *x, int x_bf16, int64_t k, float v) {
    if (x_bf16) ((uint16_t *)x)[k] = float_to_bf16(v);
    else ((float *)x)[k] = v;
}

/* v rounded to the activations' dtype and read back: what storing it in a tensor of that dtype does. */
INLINE float rounded(int x_bf16, float v) { return x_bf16 ? bf16_to_float(float_to_bf16(v)) : v; }

/* e^x for fp32 without branches, so that loops over it vectorise (the C library's expf does not):
 * x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so that n ln2 is exact), e^r by its Taylor
 * series to r^7 (the first term left out is under 6e-9 of the result, a tenth of fp32's step), and
 * 2^n put into the exponent bits. Within 2 units in the last place of the correctly rounded e^x
 * (tests/test_cpu_gemv.py checks all of [-87, 88] against float64), as PyTorch's own vectorised exp
 * is within 1; below -87.3 it is 0, above 88.7 infinity; NaN stays NaN. */
INLINE float exp_f32(float x) {
    float clamped = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    /* n = clamped / ln2 rounded to the nearest integer: adding and taking away 1.5 * 2^23 does it in
     * the default rounding mode, and vectorises where roundevenf does not */
    float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = (clamped - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    float e = p * scale;
    e = x < -87.3f ? 0.0f : (x > 88.7f ? INFINITY : e);
    return x != x ? x : e;
}

/* model.rms_norm: x / sqrt(mean(x^2) + eps), rounded, times the weight (of type w_type), rounded. */
INLINE void rms_norm_row(const void *x, int x_bf16, const void *w, int w_type, void *out, int64_t n, float eps) {
    float lanes[LANES] = {0}, squares = 0.0f;
    int64_t steps_end = n / LANES * LANES;
    for (int64_t k0 = 0; k0 < steps_end; k0 += LANES)
        for (int l = 0; l < LANES; l++) {
            float v = activation(x, x_bf16, k0 + l);
            lanes[l] += v * v;
        }
    for (int l = 0; l < LANES; l++) squares += lanes[l];
    for (int64_t k = steps_end; k < n; k++) squares += activation(x, x_bf16, k) * activation(x, x_bf16, k);
    float scale = 1.0f / sqrtf(squares / (float)n + eps);
    for (int64_t k = 0; k < n; k++)
        set_activation(out, x_bf16, k, rounded(x_bf16, activation(x, x_bf16, k) * scale) * weight(w, w_type, k));
}

/* x += out, rounded: a residual add. */
INLINE void add_into(void *x, const void *out, int x_bf16, int64_t n) {
    for (int64_t k = 0; k < n; k++) set_activation(x, x_bf16, k, activation(x, x_bf16, k) + activation(out, x_bf16, k));
}

/* model.apply_rope on `heads` heads of head_dim values each, in place: each pair (x0, x1) turned by
 * the position's angle, whose cos and sin lie side by side in `rope` (head_dim/2 pairs). */
INLINE void rope_heads(void *x, int x_bf16, const float *rope, int64_t heads, int64_t head_dim) {
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < head_dim / 2; i++) {
            int64_t k = h * head_dim + 2 * i;
            float x0 = activation(x, x_bf16, k), x1 = activation(x, x_bf16, k + 1), c = rope[2 * i], s = rope[2 * i + 1];
            set_activation(x, x_bf16, k, x0 * c - x1 * s);
            set_activation(x, x_bf16, k + 1, x0 * s + x1 * c);
        }
}

/* One key/value head's attention for its group of query heads (`group` heads of head_dim, one after
 * another in q and out) over `keys` positions (rows of head_dim in the cache): scores q.k times scale,
 * softmax (e^(s - max), times 1/sum, as PyTorch's softmax), then the weighted sum of the values,
 * rounded once. The keys go KEY_BLOCK at a time, widened to fp32 and turned on their side (side[d]:
 * the block's d-th values, one vector), so that a block's scores are one vector, with no sum across
 * a vector's lanes; a block serves the whole group (Llama 3's four query heads a key/value head).
 * scratch: ATTEND_SCRATCH floats, 64-byte aligned. */
enum { KEY_BLOCK = 16 };
typedef float key_block __attribute__((vector_size(KEY_BLOCK * sizeof(float))));  /* GCC's and clang's vectors */
#define ATTEND_SCRATCH(group, head_dim, keys) \
    (((head_dim) * KEY_BLOCK + (group) * ((keys) + 2 * (head_dim)) + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK)

INLINE void attend_group(const void *q, const void *k, const void *v, void *out, int x_bf16, int64_t group,
                         int64_t head_dim, int64_t keys, float scale, float *scratch) {
    key_block *side = (key_block *)scratch;
    float *qf = scratch + head_dim * KEY_BLOCK, *acc = qf + group * head_dim, *scores = acc + group * head_dim;
    for (int64_t d = 0; d < group * head_dim; d++) qf[d] = activation(q, x_bf16, d), acc[d] = 0.0f;
    for (int64_t t0 = 0; t0 < keys; t0 += KEY_BLOCK) {
        int64_t block = keys - t0 < KEY_BLOCK ? keys - t0 : KEY_BLOCK;
        for (int64_t b = 0; b < KEY_BLOCK; b++)  /* a short last block is padded with zeros */
            for (int64_t d = 0; d < head_dim; d++)
                side[d][b] = b < block ? activation(k, x_bf16, (t0 + b) * head_dim + d) : 0.0f;
        for (int64_t j = 0; j < group; j++) {
            const float *qj = qf + j * head_dim;
            key_block sums[4] = {{0}}, dots;  /* four running sums, d modulo 4: one would wait on each add */
            for (int64_t d = 0; d < head_dim; d += 4)  /* head_dim is a multiple of 4 (decode_blocks) */
                for (int i = 0; i < 4; i++) sums[i] += qj[d + i] * side[d + i];
            dots = (sums[0] + sums[1]) + (sums[2] + sums[3]);
            for (int64_t b = 0; b < block; b++) scores[j * keys + t0 + b] = dots[b] * scale;
        }
    }
    for (int64_t j = 0; j < group; j++) {
        float *s = scores + j * keys, top = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < keys; t++) top = s[t] > top ? s[t] : top;
        for (int64_t t = 0; t < keys; t++) s[t] = exp_f32(s[t] - top);
        for (int64_t t = 0; t < keys; t++) total += s[t];
        float inverse = 1.0f / total;
        for (int64_t t = 0; t < keys; t++) s[t] *= inverse;
    }
    float *row = scratch;
    for (int64_t t = 0; t < keys; t++) {
        for (int64_t d = 0; d < head_dim; d++) row[d] = activation(v, x_bf16, t * head_dim + d);
        for (int64_t j = 0; j < group; j++) {
            float p = scores[j * keys + t], *a = acc + j * head_dim;
            for (int64_t d = 0; d < head_dim; d++) a[d] += p * row[d];
        }
    }
    for (int64_t d = 0; d < group * head_dim; d++) set_activation(out, x_bf16, d, acc[d]);
}

/* Every key/value head with its group of query heads, the key/value heads split between the threads.
 * Not inlined: OpenMP outlines its region before the dtype is known, so the dtype is chosen by which
 * copy of attend_group is passed. */
typedef void (*attend_fn)(const void *, const void *, const void *, void *, int64_t, int64_t, int64_t, float,
                          float *);
static void attend_bf16(const void *q, const void *k, const void *v, void *o, int64_t g, int64_t d, int64_t n,
                        float s, float *w) {
    attend_group(q, k, v, o, 1, g, d, n, s, w);
}
static void attend_f32(const void *q, const void *k, const void *v, void *o, int64_t g, int64_t d, int64_t n,
                       float s, float *w) {
    attend_group(q, k, v, o, 0, g, d, n, s, w);
}
static void attend_heads(attend_fn attend, const char *q, const char *cache_k, const char *cache_v, char *out,
                         size_t element, int64_t n_kv_heads, int64_t group, int64_t head_dim, int64_t cache_len,
                         int64_t keys, float scale, float *scratch, int threads) {
    int64_t per_head = ATTEND_SCRATCH(group, head_dim, keys);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < n_kv_heads; g++) {
        size_t kv_head = (size_t)(g * cache_len * head_dim) * element, at = (size_t)(g * group * head_dim) * element;
        attend(q + at, cache_k + kv_head, cache_v + kv_head, out + at, group, head_dim, keys, scale,
               scratch + g * per_head);
    }
}

/* The pointers of one block, in this order, in decode_blocks' `block` array. */
enum { P_ATTENTION_NORM, P_WQ, P_WK, P_WV, P_WO, P_FFN_NORM, P_W1, P_W2, P_W3, P_CACHE_K, P_CACHE_V, P_COUNT };

INLINE int blocks_of(int n_layers, const void *const *block, int w_type, int norm_type, const int x_bf16, void *x,
                     const float *rope, int64_t pos, int64_t cache_len, int64_t dim, int64_t n_heads,
                     int64_t n_kv_heads, int64_t head_dim, int64_t hidden, float eps, float scale, int threads) {
    int64_t q_size = n_heads * head_dim, kv_size = n_kv_heads * head_dim, keys = pos + 1, group = n_heads / n_kv_heads;
    size_t element = x_bf16 ? 2 : 4;
    /* scratch, in 4-byte units: the normed x, q k v, the attention's output, the block's output, w1 x and
     * w3 x, the gate; then each head's attention scratch */
    int64_t sizes[] = {n_kv_heads * ATTEND_SCRATCH(group, head_dim, keys), dim, q_size + 2 * kv_size, q_size, dim,
                       2 * hidden, hidden};
    int64_t total = 0;
    for (int i = 0; i < 7; i++) total += sizes[i];
    float *scratch = aligned_alloc(64, (size_t)(total + KEY_BLOCK) / KEY_BLOCK * KEY_BLOCK * sizeof(float));
    if (!scratch) return -1;
    float *heads = scratch;  /* first: each attention's scratch starts on a 64-byte boundary */
    void *normed = heads + sizes[0], *qkv = (float *)normed + dim, *attended = (float *)qkv + sizes[2],
         *out = (float *)attended + q_size, *up = (float *)out + dim, *gate = (float *)up + 2 * hidden;
    int status = 0;
    for (int layer = 0; layer < n_layers && status == 0; layer++) {
        const void *const *p = block + (int64_t)layer * P_COUNT;
        char *cache_k = (char *)p[P_CACHE_K], *cache_v = (char *)p[P_CACHE_V];

        /* attention: norm, the three projections, RoPE on q and k, k and v into the cache, each query
         * head over slots 0..pos, wo, the residual */
        rms_norm_row(x, x_bf16, p[P_ATTENTION_NORM], norm_type, normed, dim, eps);
        const void *wqkv[3] = {p[P_WQ], p[P_WK], p[P_WV]};
        int64_t rows[3] = {q_size, kv_size, kv_size};
        status = gemv_many(3, wqkv, rows, w_type, normed, x_bf16, qkv, x_bf16, dim, threads);
        if (status) break;
        rope_heads(qkv, x_bf16, rope, n_heads + n_kv_heads, head_dim);
        for (int64_t g = 0; g < n_kv_heads; g++) {
            size_t slot = (size_t)((g * cache_len + pos) * head_dim) * element, row = (size_t)head_dim * element;
            memcpy(cache_k + slot, (char *)qkv + (q_size + g * head_dim) * element, row);
            memcpy(cache_v + slot, (char *)qkv + (q_size + kv_size + g * head_dim) * element, row);
        }
        attend_heads(x_bf16 ? attend_bf16 : attend_f32, qkv, cache_k, cache_v, attended, element, n_kv_heads, group,
                     head_dim, cache_len, keys, scale, heads, threads);
        status = gemv_many(1, &p[P_WO], &dim, w_type, attended, x_bf16, out, x_bf16, q_size, threads);
        if (status) break;
        add_into(x, out, x_bf16, dim);

        /* feed-forward: norm, w1 and w3, silu(w1 x) * w3 x (each rounded), w2, the residual */
        rms_norm_row(x, x_bf16, p[P_FFN_NORM], norm_type, normed, dim, eps);
        const void *w13[2] = {p[P_W1], p[P_W3]};
        int64_t hidden_rows[2] = {hidden, hidden};
        status = gemv_many(2, w13, hidden_rows, w_type, normed, x_bf16, up, x_bf16, dim, threads);
        if (status) break;
        for (int64_t k = 0; k < hidden; k++) {
            float a = activation(up, x_bf16, k);
            set_activation(gate, x_bf16, k, rounded(x_bf16, a / (1.0f + exp_f32(-a))) * activation(up, x_bf16, hidden + k));
        }
        status = gemv_many(1, &p[P_W2], &dim, w_type, gate, x_bf16, out, x_bf16, hidden, threads);
        if (status) break;
        add_into(x, out, x_bf16, dim);
    }
    free(scratch);
    return status;
}

/* x (dim), one token's hidden state in bf16 or fp32 (x_bf16), through n_layers blocks in place, at
 * position pos. block: P_COUNT pointers per layer (above): its weights, all of w_type but for the
 * norms' (norm_type), and its KV cache's first row, (n_kv_heads, cache_len, head_dim) in x's dtype,
 * into whose slot pos the token's key and value are written; attention runs over slots 0..pos.
 * rope: the position's (head_dim/2, 2) cos and sin. Returns 0, -1 if out of memory, -2 for an
 * unknown w_type or norm_type or a head_dim not a multiple of 4. */
int decode_blocks(int n_layers, const void *const *block, int w_type, int norm_type, int x_bf16, void *x,
                  const float *rope, int64_t pos, int64_t cache_len, int64_t dim, int64_t n_heads, int64_t n_kv_heads,
                  int64_t head_dim, int64_t hidden, float eps, float scale, int threads) {
    if (w_type < W_BF16 || w_type > W_F32 || norm_type < W_BF16 || norm_type > W_F32 || head_dim % 4) return -2;
    if (x_bf16)
        return blocks_of(n_layers, block, w_type, norm_type, 1, x, rope, pos, cache_len, dim, n_heads, n_kv_heads,
                         head_dim, hidden, eps, scale, threads);
    return blocks_of(n_layers, block, w_type, norm_type, 0, x, rope, pos, cache_len, dim, n_heads, n_kv_heads,
                     head_dim, hidden, eps, scale, threads);
}

/* e^x for each of n values (exp_f32, for tests/test_cpu_gemv.py to check against float64). */
void exp_many(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = exp_f32(x[i]);
}
