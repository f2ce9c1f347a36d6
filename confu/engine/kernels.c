/* CPU kernels for weight-only quantized linear layers: out (M x N) = x (M x K) @ W^T.
 *
 * W is stored the way GGUF stores it, in blocks of 32 along K:
 *   Q4_1: w = d * q + m, q in 0..15 (two per byte: byte j of a block holds q[j] low and q[j + 16] high)
 *   Q8_0: w = d * q,     q in -127..127
 * d and m are float32 copies of the file's fp16 values, so the dequantised weight is exactly the float32
 * value the GGUF loader produces: the products d * q are exact and so is their sum with m.
 *
 * Small M is the case that matters (decoding, verifying a small tree, drafting). The work is cut into register
 * tiles of NB weight rows x R activation rows: each weight vector is dequantised once per tile and each
 * activation vector loaded once per tile, so a tile does NB * R fused multiply-adds per NB dequantisations
 * and R loads. M is split into near-equal chunks of at most MAX_ROWS rows (one dequantisation per chunk).
 *
 * Every output element is one dot product accumulated in a vector of LANES partial sums, in the order of K,
 * then reduced in a fixed order: its value depends on K and the lane width only, never on M, the tile or the
 * thread count. So a row's result does not depend on which other rows share the call (this keeps contemplate
 * rows from moving ordinary ones). The lane width is 16 where the compiler targets AVX-512 and 8 with AVX2;
 * one build uses one width for every call, so plain and speculative decoding share their numerics.
 *
 * Build: cc -O3 -mavx2 -mfma [-mavx512f] -fopenmp -shared -fPIC (confu/engine/quant.py, once per
 * machine).
 */
#include <immintrin.h>
#include <stdint.h>

#ifdef __AVX512F__
#define LANES 16
#define MAX_ROWS 12
typedef __m512 vec;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vset1(x) _mm512_set1_ps(x)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vsum(v) _mm512_reduce_add_ps(v)
/* 16 weights of a Q4_1 block: part 0 = the low nibbles of its 16 bytes (weights 0..15), part 1 the high ones. */
static inline vec q4_1_part(const uint8_t* q, int p, vec d, vec m) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)q));
    b = p ? _mm512_srli_epi32(b, 4) : _mm512_and_si512(b, _mm512_set1_epi32(0x0F));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), d, m);
}
static inline vec q8_0_part(const int8_t* q, int p, vec d) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16 * p)))), d);
}
#else
#define LANES 8
#define MAX_ROWS 6
typedef __m256 vec;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vset1(x) _mm256_set1_ps(x)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float vsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
/* 8 weights of a Q4_1 block: parts 0, 1 = low nibbles of bytes 0..7, 8..15; parts 2, 3 = their high nibbles. */
static inline vec q4_1_part(const uint8_t* q, int p, vec d, vec m) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8 * (p & 1))));
    b = p >= 2 ? _mm256_srli_epi32(b, 4) : _mm256_and_si256(b, _mm256_set1_epi32(0x0F));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(b), d, m);
}
static inline vec q8_0_part(const int8_t* q, int p, vec d) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8 * p)))), d);
}
#endif

#define PARTS (32 / LANES)
#define NB 2 /* weight rows per tile */

/* A tile: weight rows n0..n0+NBT-1 against activation rows x[0..R-1] (NBT, R fixed at compile time, so the
 * accumulators stay in registers). Q4_1: `row_bytes` = K / 2, `m` the block minimums; Q8_0: K, m unused. */
#define TILE(KIND, NBT, R)                                                                                  \
static void KIND##_tile_##NBT##_##R(const float* x, int K, const uint8_t* q, long row_bytes, const float* d, \
                                     const float* m, float* out, int N) {                                  \
    const int groups = K >> 5;                                                                              \
    vec acc[NBT][R];                                                                                        \
    for (int b = 0; b < NBT; b++)                                                                           \
        for (int r = 0; r < R; r++) acc[b][r] = vzero();                                                    \
    for (int g = 0; g < groups; g++) {                                                                      \
        vec dv[NBT], mv[NBT];                                                                               \
        for (int b = 0; b < NBT; b++) {                                                                     \
            dv[b] = vset1(d[(long)b * groups + g]);                                                         \
            mv[b] = vset1(KIND##_MIN(m, (long)b * groups + g));                                             \
        }                                                                                                   \
        for (int p = 0; p < PARTS; p++) {                                                                   \
            vec w[NBT];                                                                                     \
            for (int b = 0; b < NBT; b++) w[b] = KIND##_PART(q + b * row_bytes, g, p, dv[b], mv[b]);       \
            for (int r = 0; r < R; r++) {                                                                   \
                vec xv = vload(x + (long)r * K + 32 * g + LANES * p);                                       \
                for (int b = 0; b < NBT; b++) acc[b][r] = vfma(w[b], xv, acc[b][r]);                        \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    for (int b = 0; b < NBT; b++)                                                                           \
        for (int r = 0; r < R; r++) out[(long)r * N + b] = vsum(acc[b][r]);                                 \
}

#define q4_1_MIN(m, i) ((m)[i])
#define q8_0_MIN(m, i) 0.0f
#define q4_1_PART(q, g, p, dv, mv) q4_1_part((q) + 16 * (g), p, dv, mv)
#define q8_0_PART(q, g, p, dv, mv) q8_0_part((const int8_t*)(q) + 32 * (g), p, dv)

#define TILES(KIND, NBT)                                                                                    \
    TILE(KIND, NBT, 1) TILE(KIND, NBT, 2) TILE(KIND, NBT, 3) TILE(KIND, NBT, 4) TILE(KIND, NBT, 5)         \
    TILE(KIND, NBT, 6) TILES_WIDE(KIND, NBT)
#if MAX_ROWS > 6
#define TILES_WIDE(KIND, NBT)                                                                               \
    TILE(KIND, NBT, 7) TILE(KIND, NBT, 8) TILE(KIND, NBT, 9) TILE(KIND, NBT, 10) TILE(KIND, NBT, 11)       \
    TILE(KIND, NBT, 12)
#define WIDE_LIST(KIND, NBT)                                                                                \
    , KIND##_tile_##NBT##_7, KIND##_tile_##NBT##_8, KIND##_tile_##NBT##_9, KIND##_tile_##NBT##_10,          \
        KIND##_tile_##NBT##_11, KIND##_tile_##NBT##_12
#else
#define TILES_WIDE(KIND, NBT)
#define WIDE_LIST(KIND, NBT)
#endif
#define TILE_LIST(KIND, NBT)                                                                                \
    {0, KIND##_tile_##NBT##_1, KIND##_tile_##NBT##_2, KIND##_tile_##NBT##_3, KIND##_tile_##NBT##_4,         \
     KIND##_tile_##NBT##_5, KIND##_tile_##NBT##_6 WIDE_LIST(KIND, NBT)}

typedef void (*tile_fn)(const float*, int, const uint8_t*, long, const float*, const float*, float*, int);

TILES(q4_1, 2) TILES(q4_1, 1) TILES(q8_0, 2) TILES(q8_0, 1)
static const tile_fn Q4_1[2][MAX_ROWS + 1] = {TILE_LIST(q4_1, 1), TILE_LIST(q4_1, 2)};
static const tile_fn Q8_0[2][MAX_ROWS + 1] = {TILE_LIST(q8_0, 1), TILE_LIST(q8_0, 2)};

/* Tiles of NB weight rows (one of 1 row at an odd end) split over the threads; each against the M activation
 * rows in near-equal chunks of at most MAX_ROWS. `row_bytes` is one weight row's size in `q`; `m` may be NULL. */
static void tiled_matmul(const tile_fn kernel[2][MAX_ROWS + 1], long row_bytes, const float* x, int M, int K,
                         const uint8_t* q, const float* d, const float* m, int N, float* out) {
    const int groups = K >> 5, chunks = (M + MAX_ROWS - 1) / MAX_ROWS, tiles = (N + NB - 1) / NB;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        const int n = t * NB, nbt = N - n < NB ? N - n : NB;
        int row = 0;
        for (int c = 0; c < chunks; c++) {
            int R = (M - row) / (chunks - c);
            kernel[nbt - 1][R](x + (long)row * K, K, q + n * row_bytes, row_bytes, d + (long)n * groups,
                               m ? m + (long)n * groups : 0, out + (long)row * N + n, N);
            row += R;
        }
    }
}

/* x: M x K row-major; q: N x K/2 bytes; d, m: N x K/32; out: M x N. K must be a multiple of 32. */
void q4_1_matmul(const float* x, int M, int K, const uint8_t* q, const float* d, const float* m, int N,
                 float* out) {
    tiled_matmul(Q4_1, K / 2, x, M, K, q, d, m, N, out);
}

/* x: M x K; q: N x K int8; d: N x K/32; out: M x N. */
void q8_0_matmul(const float* x, int M, int K, const int8_t* q, const float* d, int N, float* out) {
    tiled_matmul(Q8_0, K, x, M, K, (const uint8_t*)q, d, 0, N, out);
}

/* The lane width of this build (8: AVX2, 16: AVX-512): it decides the summation order, so it is reported. */
int kernel_lanes(void) { return LANES; }
