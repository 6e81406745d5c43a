/* Corolla's CPU kernels for decode steps: a few rows of activations times a weight matrix, reading the weights once
 * at the speed memory delivers them (PyTorch's general matrix products reach about half of it for one row).
 *
 *   y[r, o] = scale[o] * sum_i x[r, i] * w[o, i]  (+ bias[o])
 *
 * w is row-major [out, in], float32 or int8 (then scale is its per-output-channel scale; for float32 scale is NULL).
 * x and y are float32 with row strides. Sums run in float32. Built by corolla/models/cpu_kernels.py with
 * -O3 -march=native on the machine that runs it: AVX-512 or AVX2 with FMA kernels where the CPU has them, else a plain
 * loop (vectorized by the compiler as it can; packed weights are then slow to rebuild: see packing_pays() in Python).
 *
 * Packed float32 weights (corolla/models/packing.py): float32 values that lie exactly on a grid, stored as the grid's
 * codes. Each weight is rebuilt exactly (the products below are exact in float32), then summed as the float32 kernel
 * sums it, in the same order: a packed call returns the same bits as the float32 call on the unpacked weights.
 *   PACKED_Q4A  w[o, i] = d[o, i/32] * q + m[o, i/32], q in 0..15: byte j of each run of 16 holds, for the block of
 *               32 weights it belongs to, q_j in its low and q_{j+16} in its high four bits
 *   PACKED_Q8S  w[o, i] = d[o, i/32] * q, q int8
 *   PACKED_BF16 w[o, i] is a bfloat16 value (the upper half of its float32 bits)
 * Packed weights have in % 32 == 0; d and m are float32 [out, in/32] holding float16 values.
 */
#include <stddef.h>
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define SIMD_512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define SIMD_256 1
#endif
#if defined(SIMD_512) || defined(SIMD_256)
#include <immintrin.h>

/* the sum of eight lanes (AVX, which AVX-512 CPUs have too) */
static inline float sum_lanes(__m256 v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

/* The weights of the output channel PREFETCH_BYTES ahead (and its scales) are asked for before each channel: with
 * the hardware prefetcher alone, one row times the embedded model's packed head (49152 x 576, Q8_0) took 5.1 ms
 * with the AVX2 kernels (AMD EPYC, Zen 3; median of five runs) where reading its bytes takes 3.1; asking 4 KB
 * ahead, 3.5 ms. With the AVX-512 kernels (Zen 4, median of 200 calls, alternating runs): 2.33-2.62 ms without,
 * 1.69-1.75 with. Prefetches change no result. */
#define PREFETCH_BYTES 4096
static inline void prefetch_bytes(const void *start, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)start + b, _MM_HINT_T0);
}
/* channel o + ahead's weights (row_bytes each, from w) and scales (scale_bytes each, from ds and ms, either NULL) */
#define PREFETCH_CHANNEL(w, row_bytes, ds, ms, scale_bytes, ahead)                                                 \
    do {                                                                                                          \
        if (o + (ahead) < out) {                                                                                  \
            prefetch_bytes((const char *)(w) + (o + (ahead)) * (row_bytes), row_bytes);                           \
            if (ds) prefetch_bytes((const char *)(ds) + (o + (ahead)) * (scale_bytes), scale_bytes);              \
            if (ms) prefetch_bytes((const char *)(ms) + (o + (ahead)) * (scale_bytes), scale_bytes);              \
        }                                                                                                         \
    } while (0)
#define CHANNELS_AHEAD(row_bytes) ((row_bytes) <= 0 || (row_bytes) >= PREFETCH_BYTES ? 1 : (PREFETCH_BYTES + (row_bytes) - 1) / (row_bytes))

/* Every row of x against output channel o, in blocks of ROWS_PER_PASS rows and one block of the rest: BLOCK(WTYPE,
 * LOAD, R) is ROW_BLOCK or a macro of its shape. Each block reads (and rebuilds) the weights again, so a call costs
 * about the same per row as separate calls once it has more rows than one block. A row's sums run in the same order
 * whatever block it is in, so a session's results do not depend on the sessions batched with it. */
#define ROWS_PER_PASS 4
#define FOR_ROW_BLOCKS(BLOCK, WTYPE, LOAD)                                                                        \
    do {                                                                                                          \
        int64_t block = 0;                                                                                        \
        for (; block + ROWS_PER_PASS <= rows; block += ROWS_PER_PASS) BLOCK(WTYPE, LOAD, ROWS_PER_PASS);          \
        switch (rows - block) {                                                                                   \
        case 3: BLOCK(WTYPE, LOAD, 3); break;                                                                     \
        case 2: BLOCK(WTYPE, LOAD, 2); break;                                                                     \
        case 1: BLOCK(WTYPE, LOAD, 1); break;                                                                     \
        default: break;                                                                                           \
        }                                                                                                         \
    } while (0)
#endif

#if defined(SIMD_512)
#define CHUNK 64 /* columns per step of the main loop: four vectors of sixteen */
/* Only packed q8s and bf16 weights are asked for ahead here (the head, above). q4a weights are rebuilt at about the
 * multiply-add peak, and asking for them ahead made those products 3-6% slower (the embedded model's projections,
 * one and four rows); int8 weights took twice as long with (one row times 49152 x 576: 2.4-2.7 ms against 1.2-1.4),
 * float32 the same either way. */
#define PREFETCH_DENSE_CHANNEL(w, row_bytes, ds, ms, scale_bytes, ahead) ((void)0)
#define PREFETCH_Q4A_CHANNEL(w, row_bytes, ds, ms, scale_bytes, ahead) ((void)0)
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
        for (; i < main_end; i += CHUNK) {                                                                        \
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

/* Packed weights: sixteen weights at a multiple of 16, rebuilt exactly; in % 32 == 0, so no load needs a mask.
 * q4a: the 16 values a block can hold are built once per block (d * code + m for codes 0..15, one fused multiply-add:
 * d * code is exact, so it rounds once, as the unpacked weights did) and each weight picked from them by its code
 * (a permute reads the low four bits of each lane's index, so the high code needs only a shift). */
static inline void load_q4a_block(const uint8_t *q, const float *d, const float *m, int64_t block, __m512 *low,
                                  __m512 *high) {
    const __m512 codes = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 table = _mm512_fmadd_ps(codes, _mm512_set1_ps(d[block]), _mm512_set1_ps(m[block]));
    __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + block * 16)));
    *low = _mm512_permutexvar_ps(index, table);
    *high = _mm512_permutexvar_ps(_mm512_srli_epi32(index, 4), table);
}
static inline __m512 load_q8s(const int8_t *q, const float *d, int64_t i) {
    __m128i bytes = _mm_loadu_si128((const __m128i *)(q + i));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), _mm512_set1_ps(d[i >> 5]));  // exact
}
static inline __m512 load_bf16(const uint16_t *w, int64_t i) {
    __m256i halves = _mm256_loadu_si256((const __m256i *)(w + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}
#define LOAD_Q8S(wo, i, mask) load_q8s(wo, d_o, i)
#define LOAD_BF16(wo, i, mask) load_bf16(wo, i)
/* ROW_BLOCK's sums in ROW_BLOCK's order, with each q4a block (two runs of 16) decoded once (ROW_BLOCK's shape:
 * WTYPE and LOAD are unused) */
#define ROW_BLOCK_Q4A(WTYPE, LOAD, R)                                                                             \
    do {                                                                                                          \
        __m512 acc[R][4];                                                                                         \
        for (int r = 0; r < R; r++)                                                                               \
            for (int k = 0; k < 4; k++) acc[r][k] = _mm512_setzero_ps();                                          \
        int64_t i = 0;                                                                                            \
        for (; i < main_end; i += CHUNK) {                                                                        \
            __m512 w0, w1, w2, w3;                                                                                \
            load_q4a_block(wo, d_o, m_o, i >> 5, &w0, &w1);                                                       \
            load_q4a_block(wo, d_o, m_o, (i >> 5) + 1, &w2, &w3);                                                 \
            for (int r = 0; r < R; r++) {                                                                         \
                const float *xr = x + (block + r) * x_stride + i;                                                 \
                acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[r][0]);                                  \
                acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[r][1]);                             \
                acc[r][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xr + 32), acc[r][2]);                             \
                acc[r][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xr + 48), acc[r][3]);                             \
            }                                                                                                     \
        }                                                                                                         \
        if (i < in) { /* one block of 32 left: ROW_BLOCK's tail adds its two runs into the first sum */          \
            __m512 w0, w1;                                                                                        \
            load_q4a_block(wo, d_o, m_o, i >> 5, &w0, &w1);                                                       \
            for (int r = 0; r < R; r++) {                                                                         \
                const float *xr = x + (block + r) * x_stride + i;                                                 \
                acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[r][0]);                                  \
                acc[r][0] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[r][0]);                             \
            }                                                                                                     \
        }                                                                                                         \
        for (int r = 0; r < R; r++) {                                                                             \
            float v = _mm512_reduce_add_ps(                                                                       \
                _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));         \
            y[(block + r) * y_stride + o] = bias ? v + bias[o] : v;                                               \
        }                                                                                                         \
    } while (0)

#elif defined(SIMD_256) /* AVX2 and FMA (no AVX-512): the same kernels eight lanes wide */
/* One output channel at a time (one sequential stream of weights); each 32 weights are loaded (and converted or
 * rebuilt) once as four vectors of eight and multiplied with up to four rows of x, into two sums of eight lanes per
 * row (four rows' sums and the weights fit the sixteen registers). */
#define CHUNK 32 /* four vectors of eight */
#define PREFETCH_DENSE_CHANNEL PREFETCH_CHANNEL
#define PREFETCH_Q4A_CHANNEL PREFETCH_CHANNEL
static inline __m256 load_weights_f32(const float *w, int64_t i) { return _mm256_loadu_ps(w + i); }
static inline __m256 load_weights_i8(const int8_t *w, int64_t i) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i))));
}
#define CHUNK_FMAS(R)                                                                                             \
    for (int r = 0; r < R; r++) {                                                                                 \
        const float *xr = x + (block + r) * x_stride + i;                                                         \
        acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[r][0]);                                          \
        acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[r][1]);                                      \
        acc[r][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[r][0]);                                     \
        acc[r][1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[r][1]);                                     \
    }
/* the weights' tail (in % 32 columns; packed weights have none): eight at a time into the first sum, then one by one */
#define ROW_BLOCK(WTYPE, LOAD, R)                                                                                  \
    do {                                                                                                          \
        __m256 acc[R][2];                                                                                         \
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();                                  \
        int64_t i = 0;                                                                                            \
        for (; i < main_end; i += CHUNK) {                                                                        \
            __m256 w0 = LOAD(wo, i), w1 = LOAD(wo, i + 8), w2 = LOAD(wo, i + 16), w3 = LOAD(wo, i + 24);          \
            CHUNK_FMAS(R)                                                                                         \
        }                                                                                                         \
        for (; i + 8 <= in; i += 8) {                                                                             \
            __m256 w0 = LOAD(wo, i);                                                                              \
            for (int r = 0; r < R; r++)                                                                           \
                acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (block + r) * x_stride + i), acc[r][0]);      \
        }                                                                                                         \
        for (int r = 0; r < R; r++) {                                                                             \
            const float *xr = x + (block + r) * x_stride;                                                         \
            float v = sum_lanes(_mm256_add_ps(acc[r][0], acc[r][1]));                                             \
            for (int64_t t = i; t < in; t++) v += (float)wo[t] * xr[t];                                           \
            v = scale ? v * scale[o] : v;                                                                         \
            y[(block + r) * y_stride + o] = bias ? v + bias[o] : v;                                               \
        }                                                                                                         \
    } while (0)

/* Packed weights, rebuilt exactly eight at a time and summed as ROW_BLOCK sums float32 weights (in % 32 == 0).
 * q4a: a block of 32 is two runs of eight bytes; their low four bits are weights 0-15 and their high four 16-31,
 * each d * code + m in one fused multiply-add (d * code is exact, so it rounds once, as the unpacked weights did). */
static inline __m256 q4a_weights(__m256i codes, __m256 d, __m256 m) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes), d, m);
}
#define ROW_BLOCK_Q4A(WTYPE, LOAD, R)                                                                             \
    do {                                                                                                          \
        __m256 acc[R][2];                                                                                         \
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();                                  \
        const __m256i low_bits = _mm256_set1_epi32(15);                                                           \
        for (int64_t i = 0; i < in; i += CHUNK) { /* in % 32 == 0: no tail */                             \
            const uint8_t *q = wo + (i >> 5) * 16;                                                                \
            const __m256 d = _mm256_set1_ps(d_o[i >> 5]), m = _mm256_set1_ps(m_o[i >> 5]);                        \
            __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));                               \
            __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));                         \
            __m256 w0 = q4a_weights(_mm256_and_si256(b0, low_bits), d, m);                                        \
            __m256 w1 = q4a_weights(_mm256_and_si256(b1, low_bits), d, m);                                        \
            __m256 w2 = q4a_weights(_mm256_srli_epi32(b0, 4), d, m), w3 = q4a_weights(_mm256_srli_epi32(b1, 4), d, m); \
            CHUNK_FMAS(R)                                                                                         \
        }                                                                                                         \
        for (int r = 0; r < R; r++) {                                                                             \
            float v = sum_lanes(_mm256_add_ps(acc[r][0], acc[r][1]));                                             \
            y[(block + r) * y_stride + o] = bias ? v + bias[o] : v;                                               \
        }                                                                                                         \
    } while (0)
static inline __m256 load_q8s(const int8_t *q, const float *d, int64_t i) {
    return _mm256_mul_ps(load_weights_i8(q, i), _mm256_set1_ps(d[i >> 5]));  // exact
}
static inline __m256 load_bf16(const uint16_t *w, int64_t i) {
    __m256i halves = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(halves, 16));
}
#define LOAD_Q8S(wo, i) load_q8s(wo, d_o, i)
#define LOAD_BF16(wo, i) load_bf16(wo, i)
#else /* no AVX-512: sixteen partial sums per output, which the compiler vectorizes for the CPU it builds for */
#define ROWS_PER_PASS 0 /* each row is its own pass over weights in cache: no batch size is known to be best */

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

/* Packed weights, rebuilt exactly by VALUE(k) (the weight at column i + k) and summed as above. */
static inline float value_q4a(const uint8_t *q, const float *d, const float *m, int64_t i) {
    const uint8_t byte = q[(i >> 5) * 16 + (i & 15)];
    return d[i >> 5] * (float)((i & 16) ? byte >> 4 : byte & 15) + m[i >> 5];
}
#define VALUE_Q4A(wo, i) value_q4a(wo, d_o, m_o, i)
#define VALUE_Q8S(wo, i) (d_o[(i) >> 5] * (float)(wo)[i])
#define VALUE_BF16(wo, i) bf16_value((wo)[i])
static inline float bf16_value(uint16_t bits) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)bits << 16};
    return v.f;
}

#define DEFINE_PACKED_KERNEL(NAME, QTYPE, QROW, VALUE)                                                            \
    static void NAME(const float *x, int64_t x_stride, const QTYPE *w, const float *ds, const float *ms,          \
                     int64_t in, int64_t out, const float *bias, float *y, int64_t y_stride, int64_t rows) {      \
        for (int64_t o = 0; o < out; o++) {                                                                       \
            const QTYPE *wo = w + o * (QROW);                                                                     \
            const float *d_o = ds ? ds + o * (in / 32) : NULL, *m_o = ms ? ms + o * (in / 32) : NULL;             \
            (void)d_o, (void)m_o;                                                                                 \
            for (int64_t r = 0; r < rows; r++) {                                                                  \
                const float *xr = x + r * x_stride;                                                               \
                float acc[16] = {0};                                                                              \
                for (int64_t i = 0; i < in; i += 16)                                                              \
                    for (int k = 0; k < 16; k++) acc[k] += VALUE(wo, i + k) * xr[i + k];                          \
                float v = 0;                                                                                      \
                for (int k = 0; k < 16; k++) v += acc[k];                                                         \
                y[r * y_stride + o] = bias ? v + bias[o] : v;                                                     \
            }                                                                                                     \
        }                                                                                                         \
    }
#define LOAD_Q4A VALUE_Q4A
#define LOAD_Q8S VALUE_Q8S
#define LOAD_BF16 VALUE_BF16
#endif

#if defined(SIMD_512) || defined(SIMD_256)
/* Both vector paths' kernels: ROW_BLOCK (and ROW_BLOCK_Q4A) over whole chunks of CHUNK columns, then the tail */
#define DEFINE_KERNEL(NAME, WTYPE, LOAD)                                                                          \
    static void NAME(const float *x, int64_t x_stride, const WTYPE *w, int64_t in, int64_t out, const float *scale, \
                     const float *bias, float *y, int64_t y_stride, int64_t rows) {                                \
        const int64_t main_end = in - in % CHUNK;                                                                 \
        const int64_t row_bytes = in * (int64_t)sizeof(WTYPE), ahead = CHANNELS_AHEAD(row_bytes);                 \
        (void)row_bytes, (void)ahead;                                                                             \
        for (int64_t o = 0; o < out; o++) {                                                                       \
            const WTYPE *wo = w + o * in;                                                                         \
            PREFETCH_DENSE_CHANNEL(w, row_bytes, (const float *)NULL, (const float *)NULL, 0, ahead);             \
            FOR_ROW_BLOCKS(ROW_BLOCK, WTYPE, LOAD);                                                               \
        }                                                                                                         \
    }
DEFINE_KERNEL(linear_f32_impl, float, load_weights_f32)
DEFINE_KERNEL(linear_i8_impl, int8_t, load_weights_i8)

static void linear_q4a_impl(const float *x, int64_t x_stride, const uint8_t *w, const float *ds, const float *ms,
                            int64_t in, int64_t out, const float *bias, float *y, int64_t y_stride, int64_t rows) {
    const int64_t main_end = in - in % CHUNK;  /* (the AVX2 block, having no tail, reads in instead) */
    (void)main_end;
    const int64_t ahead = CHANNELS_AHEAD(in / 2);
    (void)ahead;
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *wo = w + o * (in / 2);
        const float *d_o = ds + o * (in / 32), *m_o = ms + o * (in / 32);
        PREFETCH_Q4A_CHANNEL(w, in / 2, ds, ms, in / 32 * 4, ahead);
        FOR_ROW_BLOCKS(ROW_BLOCK_Q4A, uint8_t, none);
    }
}
#define HAVE_Q4A_IMPL

/* QROW: codes per output row, in QTYPE units */
#define DEFINE_PACKED_KERNEL(NAME, QTYPE, QROW, LOAD)                                                             \
    static void NAME(const float *x, int64_t x_stride, const QTYPE *w, const float *ds, const float *ms,          \
                     int64_t in, int64_t out, const float *bias, float *y, int64_t y_stride, int64_t rows) {      \
        const int64_t main_end = in - in % CHUNK;                                                                 \
        const float *scale = NULL;                                                                                \
        const int64_t row_bytes = (QROW) * (int64_t)sizeof(QTYPE), ahead = CHANNELS_AHEAD(row_bytes);             \
        (void)row_bytes, (void)ahead;                                                                             \
        for (int64_t o = 0; o < out; o++) {                                                                       \
            const QTYPE *wo = w + o * (QROW);                                                                     \
            const float *d_o = ds ? ds + o * (in / 32) : NULL, *m_o = ms ? ms + o * (in / 32) : NULL;             \
            (void)d_o, (void)m_o;                                                                                 \
            PREFETCH_CHANNEL(w, row_bytes, ds, ms, in / 32 * 4, ahead);                                           \
            FOR_ROW_BLOCKS(ROW_BLOCK, QTYPE, LOAD);                                                               \
        }                                                                                                         \
    }
#endif

#ifndef HAVE_Q4A_IMPL
DEFINE_PACKED_KERNEL(linear_q4a_impl, uint8_t, in / 2, LOAD_Q4A)
#endif
DEFINE_PACKED_KERNEL(linear_q8s_impl, int8_t, in, LOAD_Q8S)
DEFINE_PACKED_KERNEL(linear_bf16_impl, uint16_t, in, LOAD_BF16)

int corolla_kernels_version(void) { return 12; }

/* Rows one pass over the weights serves (FOR_ROW_BLOCKS): batches beyond it gain nothing per row (0: unknown). */
int corolla_rows_per_pass(void) { return ROWS_PER_PASS; }

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

enum { PACKED_Q4A = 1, PACKED_Q8S = 2, PACKED_BF16 = 3 };

/* Output columns [first, last) of a group of packed matrices (see corolla_linear_packed). */
static void packed_columns(int kind, const float *x, int64_t x_stride, int64_t in, int64_t rows, int64_t count,
                           const void *const *ws, const float *const *ds, const float *const *ms, const int64_t *outs,
                           const float *const *biases, float *y, int64_t y_stride, int64_t first, int64_t last) {
    const int64_t blocks = in / 32;
    int64_t start = 0;
    for (int64_t j = 0; j < count && start < last; start += outs[j], j++) {
        int64_t lo = first > start ? first : start, hi = last < start + outs[j] ? last : start + outs[j];
        if (lo >= hi) continue;
        const int64_t skip = lo - start;
        const float *bias = biases && biases[j] ? biases[j] + skip : NULL;
        const float *d = ds && ds[j] ? ds[j] + skip * blocks : NULL, *m = ms && ms[j] ? ms[j] + skip * blocks : NULL;
        if (kind == PACKED_Q4A)
            linear_q4a_impl(x, x_stride, (const uint8_t *)ws[j] + skip * (in / 2), d, m, in, hi - lo, bias, y + lo,
                            y_stride, rows);
        else if (kind == PACKED_Q8S)
            linear_q8s_impl(x, x_stride, (const int8_t *)ws[j] + skip * in, d, m, in, hi - lo, bias, y + lo, y_stride,
                            rows);
        else
            linear_bf16_impl(x, x_stride, (const uint16_t *)ws[j] + skip * in, d, m, in, hi - lo, bias, y + lo,
                             y_stride, rows);
    }
}

/* A group of packed matrices of one kind (PACKED_*), as corolla_linear_f32 computes the unpacked ones; ds and ms
 * (the grids' steps and offsets, each float32 [out_j, in/32]) may be NULL where the kind has none. */
void corolla_linear_packed(int kind, const float *x, int64_t x_stride, int64_t in, int64_t rows, int64_t count,
                           const void *const *ws, const float *const *ds, const float *const *ms,
                           const int64_t *outs, const float *const *biases, float *y, int64_t y_stride, int threads) {
    PARALLEL_COLUMNS(packed_columns(kind, x, x_stride, in, rows, count, ws, ds, ms, outs, biases, y, y_stride, first,
                                    last));
}

/* Attention of decode steps: several sessions, one new token each, no mask (every cached token is visible).
 * Session s's new token has its queries (rotated) in q[s * q_stride + h * d] for heads h < heads, its key (rotated)
 * in k[s * k_stride + g * d] and its value in v[s * v_stride + g * d] for key/value heads g < kv_heads. Its cache
 * is keys[s] and values[s], each [kv_heads, capacities[s], d] float32, with room at position positions[s]: the new
 * key and value are written there, then each head attends to positions 0..positions[s] (query head h reads
 * key/value head h / (heads / kv_heads)): softmax(scale * q.k) over them, weighting the values, in float32.
 * out[s * out_stride + h * d] receives each head's result. scratch: threads x heads / kv_heads x (longest
 * positions[s] + 1) floats. */
static inline float dot(const float *a, const float *b, int64_t n) {
#if defined(SIMD_512)
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    float sum = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
#elif defined(SIMD_256)
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = sum_lanes(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
#else
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
#endif
}

#if defined(SIMD_256)
/* AVX2: four positions' dot products at once (four independent chains instead of one: an FMA's latency is four
 * cycles), each summed in the order dot() sums it, so every score is the one dot() gives. */
static void scores_of(const float *q, const float *keys, int64_t length, int64_t d, float scale, float *scores) {
    int64_t j = 0;
    if (d % 8 == 0)
        for (; j + 4 <= length; j += 4) {
            const float *k0 = keys + j * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            for (int64_t i = 0; i < d; i += 8) {
                const __m256 qi = _mm256_loadu_ps(q + i);
                a0 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k0 + i), a0);
                a1 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k1 + i), a1);
                a2 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k2 + i), a2);
                a3 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k3 + i), a3);
            }
            scores[j] = scale * sum_lanes(a0), scores[j + 1] = scale * sum_lanes(a1);
            scores[j + 2] = scale * sum_lanes(a2), scores[j + 3] = scale * sum_lanes(a3);
        }
    for (; j < length; j++) scores[j] = scale * dot(q, keys + j * d, d);
}

/* out[i] += sum over j of weights[j] * values[j][i], in order of j (one fused multiply-add per term, as the compiler
 * makes of the plain loop): 64 columns at a time held in eight registers across all positions, then eight, then one.
 * The sums start from out as it is (zeros, or the sums of the positions before), so weighing the positions in runs
 * gives the same bits as weighing them all at once. */
static void weigh_values(const float *weights, const float *values, int64_t length, int64_t d, float *out) {
    int64_t c = 0;
    for (; c + 64 <= d; c += 64) {
        __m256 acc[8];
        for (int u = 0; u < 8; u++) acc[u] = _mm256_loadu_ps(out + c + 8 * u);
        for (int64_t j = 0; j < length; j++) {
            const __m256 w = _mm256_set1_ps(weights[j]);
            const float *vj = values + j * d + c;
            for (int u = 0; u < 8; u++) acc[u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 8 * u), acc[u]);
        }
        for (int u = 0; u < 8; u++) _mm256_storeu_ps(out + c + 8 * u, acc[u]);
    }
    for (; c + 8 <= d; c += 8) {
        __m256 acc = _mm256_loadu_ps(out + c);
        for (int64_t j = 0; j < length; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(weights[j]), _mm256_loadu_ps(values + j * d + c), acc);
        _mm256_storeu_ps(out + c, acc);
    }
    for (; c < d; c++) {
        float sum = out[c];
        for (int64_t j = 0; j < length; j++) sum = fmaf(weights[j], values[j * d + c], sum);
        out[c] = sum;
    }
}
#else
static void scores_of(const float *q, const float *keys, int64_t length, int64_t d, float scale, float *scores) {
    for (int64_t j = 0; j < length; j++) scores[j] = scale * dot(q, keys + j * d, d);
}

static void weigh_values(const float *weights, const float *values, int64_t length, int64_t d, float *out) {
    for (int64_t j = 0; j < length; j++) {
        const float weight = weights[j];
        const float *vj = values + j * d;
        for (int64_t i = 0; i < d; i++) out[i] += weight * vj[i];
    }
}
#endif

#if defined(SIMD_512) || defined(SIMD_256)
/* e^x for x <= 0, eight lanes: x = n ln2 + r with n an integer and |r| <= ln2/2 (ln2 in two parts, so that n ln2 is
 * exact enough), e^r by its Taylor series to r^7 (the next term is below 5e-9, a tenth of float32's rounding step),
 * times 2^n built in the exponent bits: within 1 ulp of expf (11 million points of [-87.3, 0] checked). Below
 * -87.33, where e^x is no longer a normal float, it gives 0 where expf gives a subnormal: a softmax weight under
 * 1e-38 beside a largest one of 1. NaN stays NaN. (AVX-512 builds use it too: their CPUs have AVX2.) */
static inline __m256 exp_nonpositive(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.33f);
    const __m256 under = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_max_ps(lowest, x); /* maxps returns its second operand when either is NaN: a NaN x stays NaN */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x); /* ln2's first 16 bits: n * it is exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.4286068203094172e-06f), r);  /* and the rest of ln2 */
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);                           /* 1/7!, then Horner down to 1/2! */
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f))); /* 1 + r + r^2 (...) */
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

/* scores[j] = e^(scores[j] - their largest), eight at a time; returns their sum */
static float softmax_weights(float *scores, int64_t length) {
    float top = -INFINITY;
    int64_t j = 0;
    if (length >= 8) {
        __m256 most = _mm256_loadu_ps(scores);
        for (j = 8; j + 8 <= length; j += 8) most = _mm256_max_ps(most, _mm256_loadu_ps(scores + j));
        __m128 half = _mm_max_ps(_mm256_castps256_ps128(most), _mm256_extractf128_ps(most, 1));
        half = _mm_max_ps(half, _mm_movehl_ps(half, half));
        top = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
    }
    for (; j < length; j++) top = scores[j] > top ? scores[j] : top;
    const __m256 shift = _mm256_set1_ps(top);
    __m256 sums = _mm256_setzero_ps();
    for (j = 0; j + 8 <= length; j += 8) {
        const __m256 w = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + j), shift));
        _mm256_storeu_ps(scores + j, w);
        sums = _mm256_add_ps(sums, w);
    }
    float total = sum_lanes(sums);
    for (; j < length; j++) {
        scores[j] = expf(scores[j] - top);
        total += scores[j];
    }
    return total;
}
#else
static float softmax_weights(float *scores, int64_t length) {
    float top = -INFINITY;
    for (int64_t j = 0; j < length; j++) top = scores[j] > top ? scores[j] : top;
    float total = 0.0f;
    for (int64_t j = 0; j < length; j++) {
        scores[j] = expf(scores[j] - top);
        total += scores[j];
    }
    return total;
}
#endif

/* Positions a group's heads go through together: their keys (or values) stay in the first-level cache from the first
 * head to the last, so the grouped heads read each key and value from further away once instead of once each. */
#define POSITIONS_PER_RUN 16

/* The group query heads q, q + d, ... that share one key/value head (grouped-query attention), over its keys and
 * values at positions 0..length-1: each head's scores, softmax and weighted values, exactly as a head alone (every
 * score, weight and sum is computed in the same order), writing head h's result to out + h * d. scores: group x
 * length floats. */
static void attend_group(const float *q, int64_t group, const float *keys, const float *values, int64_t length,
                         int64_t d, float scale, float *scores, float *out) {
    for (int64_t j = 0; j < length; j += POSITIONS_PER_RUN) { /* a multiple of four: scores_of's blocks stay put */
        const int64_t run = length - j < POSITIONS_PER_RUN ? length - j : POSITIONS_PER_RUN;
        for (int64_t h = 0; h < group; h++) scores_of(q + h * d, keys + j * d, run, d, scale, scores + h * length + j);
    }
    float inverses[group];
    for (int64_t h = 0; h < group; h++) {
        inverses[h] = 1.0f / softmax_weights(scores + h * length, length);
        for (int64_t i = 0; i < d; i++) out[h * d + i] = 0.0f;
    }
    for (int64_t j = 0; j < length; j += POSITIONS_PER_RUN) {
        const int64_t run = length - j < POSITIONS_PER_RUN ? length - j : POSITIONS_PER_RUN;
        for (int64_t h = 0; h < group; h++) weigh_values(scores + h * length + j, values + j * d, run, d, out + h * d);
    }
    for (int64_t h = 0; h < group; h++)
        for (int64_t i = 0; i < d; i++) out[h * d + i] *= inverses[h];
}

void corolla_decode_attention(int64_t sessions, int64_t heads, int64_t kv_heads, int64_t d, const float *q,
                              int64_t q_stride, const float *k, int64_t k_stride, const float *v, int64_t v_stride,
                              float *const *keys, float *const *values, const int64_t *capacities,
                              const int64_t *positions, float scale, float *out, int64_t out_stride, float *scratch,
                              int threads) {
    for (int64_t s = 0; s < sessions; s++)
        for (int64_t g = 0; g < kv_heads; g++) {
            const int64_t at = (g * capacities[s] + positions[s]) * d;
            for (int64_t i = 0; i < d; i++) {
                keys[s][at + i] = k[s * k_stride + g * d + i];
                values[s][at + i] = v[s * v_stride + g * d + i];
            }
        }
    const int64_t group = heads / kv_heads;
    int64_t longest = 0, work = 0;  // scores of one group of heads: scratch + thread * group * longest
    for (int64_t s = 0; s < sessions; s++) {
        longest = positions[s] + 1 > longest ? positions[s] + 1 : longest;
        work += (positions[s] + 1) * heads * d;
    }
    (void)threads, (void)work;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1 && work > (1 << 16))
#endif
    {
#ifdef _OPENMP
        float *scores = scratch + omp_get_thread_num() * group * longest;
#pragma omp for schedule(static)
#else
        float *scores = scratch;
#endif
        for (int64_t task = 0; task < sessions * kv_heads; task++) {
            const int64_t s = task / kv_heads, g = task % kv_heads;
            const int64_t offset = g * capacities[s] * d;
            attend_group(q + s * q_stride + g * group * d, group, keys[s] + offset, values[s] + offset,
                         positions[s] + 1, d, scale, scores, out + s * out_stride + g * group * d);
        }
    }
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
