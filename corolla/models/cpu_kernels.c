/* Corolla's CPU kernels for decode steps: a few rows of activations times a weight matrix, reading the weights once
 * at the speed memory delivers them (PyTorch's general matrix products reach about half of it for one row).
 *
 *   y[r, o] = scale[o] * sum_i x[r, i] * w[o, i]  (+ bias[o])
 *
 * w is row-major [out, in], float32 or int8 (then scale is its per-output-channel scale; for float32 scale is NULL).
 * x and y are float32 with row strides. Sums run in float32. Built by corolla/models/cpu_kernels.py with
 * -O3 -march=native on the machine that runs it; without AVX-512 a plain loop (vectorized by the compiler) runs.
 */
#include <stddef.h>
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
static inline __m512 load_weights_f32(const float *w, int64_t i, __mmask16 mask) {
    return _mm512_maskz_loadu_ps(mask, w + i);
}
static inline __m512 load_weights_i8(const int8_t *w, int64_t i, __mmask16 mask) {
    __m128i bytes = _mm_maskz_loadu_epi8(mask, w + i);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}

/* One output channel at a time, so the weights are read as one sequential stream (the hardware prefetcher's best
 * case: measured 17-21 GB/s here, against 14 GB/s reading four channels side by side). Each 64 weights are loaded
 * (and converted) once and multiplied with up to four rows of x; four sums of sixteen lanes per row hide the
 * multiply-adds' latency. R, the rows of the block, is a constant in each expansion, so the sums stay in registers. */
#define FULL ((__mmask16)0xFFFF)
#define ROW_BLOCK(WTYPE, LOAD, R)                                                                                  \
    do {                                                                                                          \
        __m512 acc[R][4];                                                                                         \
        for (int r = 0; r < R; r++)                                                                               \
            for (int k = 0; k < 4; k++) acc[r][k] = _mm512_setzero_ps();                                          \
        int64_t i = 0;                                                                                            \
        for (; i < main_end; i += 64) {                                                                           \
            __m512 w0 = LOAD(wo, i, FULL), w1 = LOAD(wo, i + 16, FULL);                                            \
            __m512 w2 = LOAD(wo, i + 32, FULL), w3 = LOAD(wo, i + 48, FULL);                                       \
            for (int r = 0; r < R; r++) {                                                                         \
                const float *xr = x + (block + r) * x_stride + i;                                                 \
                acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[r][0]);                                  \
                acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[r][1]);                             \
                acc[r][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xr + 32), acc[r][2]);                             \
                acc[r][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xr + 48), acc[r][3]);                             \
            }                                                                                                     \
        }                                                                                                         \
        for (; i < in; i += 16) {                                                                                 \
            __mmask16 mask = in - i >= 16 ? FULL : (__mmask16)((1u << (in - i)) - 1);                             \
            __m512 w0 = LOAD(wo, i, mask);                                                                        \
            for (int r = 0; r < R; r++)                                                                           \
                acc[r][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, x + (block + r) * x_stride + i),      \
                                            acc[r][0]);                                                           \
        }                                                                                                         \
        for (int r = 0; r < R; r++) {                                                                             \
            float v = _mm512_reduce_add_ps(                                                                       \
                _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));         \
            v = scale ? v * scale[o] : v;                                                                         \
            y[(block + r) * y_stride + o] = bias ? v + bias[o] : v;                                               \
        }                                                                                                         \
    } while (0)

#define DEFINE_KERNEL(NAME, WTYPE, LOAD)                                                                          \
    static void NAME(const float *x, int64_t x_stride, const WTYPE *w, int64_t in, int64_t out, const float *scale, \
                     const float *bias, float *y, int64_t y_stride, int64_t rows) {                                \
        const int64_t main_end = in - in % 64;                                                                    \
        for (int64_t o = 0; o < out; o++) {                                                                       \
            const WTYPE *wo = w + o * in;                                                                         \
            int64_t block = 0;                                                                                    \
            for (; block + 4 <= rows; block += 4) ROW_BLOCK(WTYPE, LOAD, 4);                                      \
            switch (rows - block) {                                                                               \
            case 3: ROW_BLOCK(WTYPE, LOAD, 3); break;                                                             \
            case 2: ROW_BLOCK(WTYPE, LOAD, 2); break;                                                             \
            case 1: ROW_BLOCK(WTYPE, LOAD, 1); break;                                                             \
            default: break;                                                                                       \
            }                                                                                                     \
        }                                                                                                         \
    }
DEFINE_KERNEL(linear_f32_impl, float, load_weights_f32)
DEFINE_KERNEL(linear_i8_impl, int8_t, load_weights_i8)

#else /* no AVX-512: sixteen partial sums per output, which the compiler vectorizes for the CPU it builds for */

#define DEFINE_KERNEL(NAME, WTYPE)                                                                                \
    static void NAME(const float *x, int64_t x_stride, const WTYPE *w, int64_t in, int64_t out, const float *scale, \
                     const float *bias, float *y, int64_t y_stride, int64_t rows) {                                \
        for (int64_t o = 0; o < out; o++) {                                                                       \
            const WTYPE *wo = w + o * in;                                                                         \
            for (int64_t r = 0; r < rows; r++) {                                                                  \
                const float *xr = x + r * x_stride;                                                               \
                float acc[16] = {0};                                                                              \
                int64_t i = 0;                                                                                    \
                for (; i + 16 <= in; i += 16)                                                                     \
                    for (int k = 0; k < 16; k++) acc[k] += (float)wo[i + k] * xr[i + k];                          \
                for (; i < in; i++) acc[0] += (float)wo[i] * xr[i];                                               \
                float v = 0;                                                                                      \
                for (int k = 0; k < 16; k++) v += acc[k];                                                         \
                v = scale ? v * scale[o] : v;                                                                     \
                y[r * y_stride + o] = bias ? v + bias[o] : v;                                                     \
            }                                                                                                     \
        }                                                                                                         \
    }
DEFINE_KERNEL(linear_f32_impl, float)
DEFINE_KERNEL(linear_i8_impl, int8_t)
#endif

int corolla_kernels_version(void) { return 4; }

/* Output columns [first, last) of a group: matrix j owns columns [start_j, start_j + outs[j]). */
#define RUN_COLUMNS(IMPL, SCALE_OF)                                                                               \
    do {                                                                                                          \
        int64_t start = 0;                                                                                        \
        for (int64_t j = 0; j < count && start < last; start += outs[j], j++) {                                   \
            int64_t lo = first > start ? first : start, hi = last < start + outs[j] ? last : start + outs[j];      \
            if (lo >= hi) continue;                                                                               \
            const float *scale = SCALE_OF(j);                                                                     \
            const float *bias = biases && biases[j] ? biases[j] + (lo - start) : NULL;                            \
            IMPL(x, x_stride, ws[j] + (lo - start) * in, in, hi - lo, scale ? scale + (lo - start) : NULL, bias,   \
                 y + lo, y_stride, rows);                                                                         \
        }                                                                                                         \
    } while (0)

/* Split a group's columns among `threads` OpenMP threads (the process's runtime: PyTorch's own libgomp), each a
 * contiguous run of whole cache lines of weights; small groups run on the calling thread. */
#ifdef _OPENMP
#include <omp.h>
#define PARALLEL_COLUMNS(RUN)                                                                                     \
    do {                                                                                                          \
        int64_t total = 0;                                                                                        \
        for (int64_t j = 0; j < count; j++) total += outs[j];                                                     \
        if (threads <= 1 || total * in < (1 << 18)) {                                                             \
            int64_t first = 0, last = total;                                                                      \
            RUN;                                                                                                  \
        } else {                                                                                                  \
            _Pragma("omp parallel num_threads(threads)") {                                                        \
                int64_t n = omp_get_num_threads(), t = omp_get_thread_num();                                      \
                int64_t share = ((total + n - 1) / n + 15) / 16 * 16;                                             \
                int64_t first = t * share < total ? t * share : total;                                            \
                int64_t last = first + share < total ? first + share : total;                                     \
                RUN;                                                                                              \
            }                                                                                                     \
        }                                                                                                         \
    } while (0)
#else
#define PARALLEL_COLUMNS(RUN)                                                                                     \
    do {                                                                                                          \
        (void)threads;                                                                                            \
        int64_t total = 0;                                                                                        \
        for (int64_t j = 0; j < count; j++) total += outs[j];                                                     \
        int64_t first = 0, last = total;                                                                          \
        RUN;                                                                                                      \
    } while (0)
#endif

#define NO_SCALE(j) ((const float *)NULL)
#define SCALE_J(j) (scales[j])

/* Several weight matrices that read the same x (q, k and v; gate and up), their outputs side by side in y:
 * matrix j writes columns [sum of outs[<j], + outs[j]). biases (or its entries) and scales may be NULL. */
void corolla_linear_f32(const float *x, int64_t x_stride, int64_t in, int64_t rows, int64_t count,
                        const float *const *ws, const int64_t *outs, const float *const *biases, float *y,
                        int64_t y_stride, int threads) {
    PARALLEL_COLUMNS(RUN_COLUMNS(linear_f32_impl, NO_SCALE));
}

void corolla_linear_i8(const float *x, int64_t x_stride, int64_t in, int64_t rows, int64_t count,
                       const int8_t *const *ws, const int64_t *outs, const float *const *scales,
                       const float *const *biases, float *y, int64_t y_stride, int threads) {
    PARALLEL_COLUMNS(RUN_COLUMNS(linear_i8_impl, SCALE_J));
}

/* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, in float32 (transformers' RMS norm for float32 states). */
void corolla_rms_norm(const float *x, int64_t x_stride, int64_t rows, int64_t n, const float *weight, float eps,
                      float *y, int64_t y_stride) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *yr = y + r * y_stride;
        float sum = 0.0f;
        for (int64_t i = 0; i < n; i++) sum += xr[i] * xr[i];
        float inverse = 1.0f / sqrtf(sum / (float)n + eps);
        for (int64_t i = 0; i < n; i++) yr[i] = weight[i] * (xr[i] * inverse);
    }
}
