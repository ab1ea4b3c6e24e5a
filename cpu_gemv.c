/* One token's projection on a CPU: y = W x with W (N, K) and x (K) in bf16, y (N) in bf16.
 *
 * Decoding at batch 1 reads every weight once per token and does two flops per weight read, so it
 * is bound by how fast a core pulls weights out of memory, not by arithmetic. Three things set that
 * speed here:
 *   - a few rows at once (ROWS), so each core has several independent streams of loads in flight;
 *   - a prefetch of the next group of rows while this group is summed, so the next rows' lines (and
 *     their pages' translations) are on their way before the loads that need them;
 *   - LANES running sums per row, one per column modulo LANES, added together once at the row's
 *     end: the compiler turns them into vector registers, and no sum crosses lanes inside the loop.
 * Products are summed in fp32 and rounded to bf16 once, as torch.mv's bf16 kernel does; the order
 * of the sums is fixed by this code (no -ffast-math), so a result never depends on the build.
 *
 * Plain C, vectorised by the compiler (cpu_gemv.py builds it with -O3 -march=native); OpenMP splits
 * the rows between the threads torch uses.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ROWS 4    /* rows summed together */
#define LANES 32  /* running sums per row: 64 bytes of bf16, one cache line, per step */

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

/* One row's sum from its LANES running sums and the columns past the last whole step. */
static float row_total(const float *lanes, const uint16_t *w, const float *x, int64_t from, int64_t K) {
    float total = 0.0f;
    for (int l = 0; l < LANES; l++) total += lanes[l];
    for (int64_t k = from; k < K; k++) total += bf16_to_float(w[k]) * x[k];
    return total;
}

/* Rows [first, last) of y; x already in fp32. */
static void rows_of_y(const uint16_t *W, const float *x, uint16_t *y, int64_t K, int64_t first, int64_t last) {
    static const float zeros[LANES];
    int64_t steps_end = K / LANES * LANES;
    int64_t n = first;
    for (; n + ROWS <= last; n += ROWS) {
        const uint16_t *w = W + n * K;
        int prefetch = n + 2 * ROWS <= last;  /* the next group is this thread's too */
        float lanes[ROWS][LANES] = {{0}};
        for (int64_t k0 = 0; k0 < steps_end; k0 += LANES) {
            for (int r = 0; r < ROWS; r++) {
                if (prefetch) __builtin_prefetch(w + (ROWS + r) * K + k0, 0, 3);
                for (int l = 0; l < LANES; l++) lanes[r][l] += bf16_to_float(w[r * K + k0 + l]) * x[k0 + l];
            }
        }
        for (int r = 0; r < ROWS; r++) y[n + r] = float_to_bf16(row_total(lanes[r], w + r * K, x, steps_end, K));
    }
    for (; n < last; n++)  /* the rows left over, one column at a time */
        y[n] = float_to_bf16(row_total(zeros, W + n * K, x, 0, K));
}

/* y = W x on `threads` threads, each taking one contiguous band of rows. Returns 0, or -1 if out of memory. */
int gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t N, int64_t K, int threads) {
    float *xf = malloc((size_t)K * sizeof(float));
    if (!xf) return -1;
    for (int64_t k = 0; k < K; k++) xf[k] = bf16_to_float(x[k]);
    int64_t groups = (N + ROWS - 1) / ROWS;
    #pragma omp parallel num_threads(threads)
    {
        int64_t t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), T = omp_get_num_threads();
#endif
        int64_t per = (groups + T - 1) / T * ROWS;  /* whole groups per thread */
        int64_t first = t * per < N ? t * per : N, last = first + per < N ? first + per : N;
        rows_of_y(W, xf, y, K, first, last);
    }
    free(xf);
    return 0;
}
