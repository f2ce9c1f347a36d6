/* CPU kernels for weight-only quantized linear layers: out (M x N) = x (M x K) @ W^T.
 *
 * W is stored the way GGUF stores it, in blocks of 32 along K:
 *   Q4_1: w = d * q + m, q in 0..15 (two per byte: byte j of a block holds q[j] low and q[j + 16] high)
 *   Q8_0: w = d * q,     q in -127..127
 * d and m are float32 copies of the file's fp16 values, so the dequantised weight is exactly the float32
 * value the GGUF loader produces: the products d * q are exact and so is their sum with m.
 *
 * Small M is the case that matters (decoding, verifying a small tree): every weight row is read from memory
 * once and dequantised once into AVX2 registers, then multiplied against up to 8 activation rows. Larger M is
 * split into near-equal chunks of at most 8 rows that reuse the row from L1. Each output element is one fp32
 * dot product whose summation order depends on K only, never on M or on the thread count, so a row's result
 * does not depend on which other rows share the call (this keeps contemplate rows from moving ordinary ones).
 *
 * Build: cc -O3 -mavx2 -mfma -fopenmp -shared -fPIC (confu/engine/quant.py does it once per machine).
 */
#include <immintrin.h>
#include <stdint.h>

#define MAX_ROWS 8

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* One Q4_1 weight row against R activation rows (R fixed at compile time, so the accumulators stay in registers). */
#define Q4_1_ROW(R)                                                                                    \
static void q4_1_row_##R(const float* x, int K, const uint8_t* q, const float* d, const float* m,      \
                         float* out, int N) {                                                         \
    __m256 acc[R];                                                                                     \
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                                          \
    const __m128i low4 = _mm_set1_epi8(0x0F);                                                          \
    for (int g = 0; g < (K >> 5); g++) {                                                               \
        __m128i bytes = _mm_loadu_si128((const __m128i*)(q + 16 * g));                                 \
        __m128i lo = _mm_and_si128(bytes, low4);                                                       \
        __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);                                    \
        __m256 dv = _mm256_set1_ps(d[g]), mv = _mm256_set1_ps(m[g]);                                   \
        __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};                     \
        for (int p = 0; p < 4; p++) {                                                                  \
            __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[p])), dv, mv);     \
            for (int r = 0; r < R; r++)                                                                \
                acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (long)r * K + 32 * g + 8 * p), acc[r]); \
        }                                                                                              \
    }                                                                                                  \
    for (int r = 0; r < R; r++) out[(long)r * N] = hsum(acc[r]);                                       \
}

/* One Q8_0 weight row against R activation rows (the Q4_1 signature, `m` unused, so one driver serves both). */
#define Q8_0_ROW(R)                                                                                    \
static void q8_0_row_##R(const float* x, int K, const uint8_t* bytes, const float* d, const float* m,   \
                         float* out, int N) {                                                         \
    const int8_t* q = (const int8_t*)bytes;                                                            \
    (void)m;                                                                                           \
    __m256 acc[R];                                                                                     \
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                                          \
    for (int g = 0; g < (K >> 5); g++) {                                                               \
        __m256 dv = _mm256_set1_ps(d[g]);                                                              \
        for (int p = 0; p < 4; p++) {                                                                  \
            __m128i b = _mm_loadl_epi64((const __m128i*)(q + 32 * g + 8 * p));                         \
            __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), dv);                 \
            for (int r = 0; r < R; r++)                                                                \
                acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (long)r * K + 32 * g + 8 * p), acc[r]); \
        }                                                                                              \
    }                                                                                                  \
    for (int r = 0; r < R; r++) out[(long)r * N] = hsum(acc[r]);                                       \
}

Q4_1_ROW(1) Q4_1_ROW(2) Q4_1_ROW(3) Q4_1_ROW(4) Q4_1_ROW(5) Q4_1_ROW(6) Q4_1_ROW(7) Q4_1_ROW(8)
Q8_0_ROW(1) Q8_0_ROW(2) Q8_0_ROW(3) Q8_0_ROW(4) Q8_0_ROW(5) Q8_0_ROW(6) Q8_0_ROW(7) Q8_0_ROW(8)

typedef void (*row_fn)(const float*, int, const uint8_t*, const float*, const float*, float*, int);
static const row_fn Q4_1[MAX_ROWS + 1] = {0, q4_1_row_1, q4_1_row_2, q4_1_row_3, q4_1_row_4,
                                          q4_1_row_5, q4_1_row_6, q4_1_row_7, q4_1_row_8};
static const row_fn Q8_0[MAX_ROWS + 1] = {0, q8_0_row_1, q8_0_row_2, q8_0_row_3, q8_0_row_4,
                                          q8_0_row_5, q8_0_row_6, q8_0_row_7, q8_0_row_8};

/* Weight rows split over the threads; each against the M activation rows in near-equal chunks of at most
 * MAX_ROWS. `row_bytes` is one weight row's size in `q`; `m` may be NULL (Q8_0). */
static void blocked_matmul(const row_fn* kernel, long row_bytes, const float* x, int M, int K, const uint8_t* q,
                           const float* d, const float* m, int N, float* out) {
    const int groups = K >> 5, chunks = (M + MAX_ROWS - 1) / MAX_ROWS;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        int row = 0;
        for (int c = 0; c < chunks; c++) {
            int R = (M - row) / (chunks - c);
            kernel[R](x + (long)row * K, K, q + n * row_bytes, d + (long)n * groups, m ? m + (long)n * groups : 0,
                      out + (long)row * N + n, N);
            row += R;
        }
    }
}

/* x: M x K row-major; q: N x K/2 bytes; d, m: N x K/32; out: M x N. K must be a multiple of 32. */
void q4_1_matmul(const float* x, int M, int K, const uint8_t* q, const float* d, const float* m, int N,
                 float* out) {
    blocked_matmul(Q4_1, K / 2, x, M, K, q, d, m, N, out);
}

/* x: M x K; q: N x K int8; d: N x K/32; out: M x N. */
void q8_0_matmul(const float* x, int M, int K, const int8_t* q, const float* d, int N, float* out) {
    blocked_matmul(Q8_0, K, x, M, K, (const uint8_t*)q, d, 0, N, out);
}
