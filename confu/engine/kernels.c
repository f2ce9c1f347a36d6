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
 * Build: cc -O3 -mavx2 -mfma [-mavx512f [-mavx512bw -mavx512vnni]] -fopenmp -shared -fPIC
 * (confu/engine/quant.py, once per machine). The int8 kernels at the end (the target's under numerics "q8",
 * the draft head's) need AVX512-VNNI.
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
/* The first min(count, 16) lanes: a row's last, partial vector of 16. */
static inline __mmask16 first_lanes(int count) {
    return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
}
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

/* ---- The draft head's kernel (lossy: a draft's numerics only change what it proposes, never the output) ----
 * int8 weights with one scale per output channel, int8 activations with one scale per row:
 *   out[r, n] = (sum_k xq[r, k] * wq[n, k]) * (sw[n] * sx[r]),  xq = round(x / sx), sx = max_k |x[r, k]| / 127.
 * AVX512-VNNI's vpdpbusd multiplies 4 unsigned bytes by 4 signed ones and adds them to a 32-bit lane, 64
 * products an instruction (16 fp32 FMAs do 16): activations go in as xq + 128 (1..255), and 128 * sum_k wq[n, k]
 * (`wsum`) comes off the integer sum. The weights are stored [N/16][K/4][16 outputs][4 k], so one 64-byte load
 * holds 4 consecutive k of 16 outputs, multiplied by 4 activation bytes broadcast to every lane: no horizontal
 * sums. Integer sums are exact, so a row's result never depends on the tiling or the other rows.
 * `w` is padded with zero outputs to a multiple of 16 (`sw`, `wsum` are not); K must be a multiple of 16. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <stdlib.h>
#include <string.h>
#define I8_ROWS 8 /* activation rows per tile */
#define I8_COLS 2 /* blocks of 16 outputs per tile */

static void i8_quantize_rows(const float* x, int M, int K, uint8_t* xq, float* sx) {
    for (int r = 0; r < M; r++) {
        const float* row = x + (long)r * K;
        __m512 mx = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
        const float amax = _mm512_reduce_max_ps(mx);
        sx[r] = amax / 127.0f;
        const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
        for (int k = 0; k < K; k += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), inv)); /* round to nearest even */
            q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            _mm_storeu_si128((__m128i*)(xq + (long)r * K + k), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, _mm512_set1_epi32(128))));
        }
    }
}

#define I8_TILE(C, R)                                                                                       \
static void i8_tile_##C##_##R(const uint8_t* xq, int K, const int8_t* w, long block_bytes, __m512i* out) { \
    __m512i acc[C][R];                                                                                      \
    for (int c = 0; c < C; c++)                                                                             \
        for (int r = 0; r < R; r++) acc[c][r] = _mm512_setzero_si512();                                     \
    for (int g = 0; g < K / 4; g++) {                                                                       \
        __m512i wv[C];                                                                                      \
        for (int c = 0; c < C; c++) wv[c] = _mm512_loadu_si512(w + c * block_bytes + 64L * g);            \
        for (int r = 0; r < R; r++) {                                                                       \
            int32_t four;                                                                                   \
            memcpy(&four, xq + (long)r * K + 4 * g, 4);                                                     \
            const __m512i xb = _mm512_set1_epi32(four);                                                     \
            for (int c = 0; c < C; c++) acc[c][r] = _mm512_dpbusd_epi32(acc[c][r], xb, wv[c]);              \
        }                                                                                                   \
    }                                                                                                       \
    for (int c = 0; c < C; c++)                                                                             \
        for (int r = 0; r < R; r++) out[c * I8_ROWS + r] = acc[c][r];                                       \
}
#define I8_TILES(C) I8_TILE(C, 1) I8_TILE(C, 2) I8_TILE(C, 3) I8_TILE(C, 4) I8_TILE(C, 5) I8_TILE(C, 6)     \
    I8_TILE(C, 7) I8_TILE(C, 8)
#define I8_LIST(C)                                                                                          \
    {0, i8_tile_##C##_1, i8_tile_##C##_2, i8_tile_##C##_3, i8_tile_##C##_4, i8_tile_##C##_5, i8_tile_##C##_6, \
     i8_tile_##C##_7, i8_tile_##C##_8}
typedef void (*i8_tile_fn)(const uint8_t*, int, const int8_t*, long, __m512i*);
I8_TILES(1) I8_TILES(2)
static const i8_tile_fn I8[I8_COLS][I8_ROWS + 1] = {I8_LIST(1), I8_LIST(2)};

/* x: M x K float32; w: the layout above; sw: N float32; wsum: N int32; out: M x N. */
void i8_matmul(const float* x, int M, int K, const int8_t* w, const float* sw, const int32_t* wsum, int N,
               float* out) {
    uint8_t* xq = malloc((size_t)M * K);
    float* sx = malloc(sizeof(float) * M);
    i8_quantize_rows(x, M, K, xq, sx);
    const int blocks = (N + 15) / 16, tiles = (blocks + I8_COLS - 1) / I8_COLS;
    const int chunks = (M + I8_ROWS - 1) / I8_ROWS;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        const int b0 = t * I8_COLS, C = blocks - b0 < I8_COLS ? blocks - b0 : I8_COLS;
        int row = 0;
        for (int ch = 0; ch < chunks; ch++) {
            const int R = (M - row) / (chunks - ch);
            __m512i acc[I8_COLS * I8_ROWS];
            I8[C - 1][R](xq + (long)row * K, K, w + (long)b0 * 16 * K, 16L * K, acc);
            for (int c = 0; c < C; c++) {
                const int n = (b0 + c) * 16;
                const __mmask16 keep = first_lanes(N - n);
                const __m512i offset = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(keep, wsum + n), 7); /* 128 * wsum */
                const __m512 scale = _mm512_maskz_loadu_ps(keep, sw + n);
                for (int r = 0; r < R; r++) {
                    const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[c * I8_ROWS + r], offset));
                    _mm512_mask_storeu_ps(out + (long)(row + r) * N + n, keep,
                                          _mm512_mul_ps(v, _mm512_mul_ps(scale, _mm512_set1_ps(sx[row + r]))));
                }
            }
            row += R;
        }
    }
    free(xq);
    free(sx);
}
/* ---- Target kernels with llama.cpp's numerics (opt-in: `numerics="q8"`) ----
 * The GGUF weights exactly as above, but the activations rounded to 8 bits per block of 32, as llama.cpp
 * does for its quantized matmuls (its Q8_1 / Q8_0 activation blocks, here with float32 scales):
 *   xq = round(x / dx), dx = max |x_block| / 127, sx = dx * sum(xq)
 *   Q4_1: out = sum_g dw_g * dx_g * (q . xq)_g + mw_g * sx_g        Q8_0: out = sum_g dw_g * dx_g * (q . xq)_g
 * Each block's dot product is exact integer arithmetic (vpdpbusd: 64 byte products an instruction, 4 times the
 * fp32 FMA rate, which bounds a verify pass of more than a few rows on a CPU), then one float FMA per block
 * adds it to the output in the order of K. Rounding x changes the model's numerics (by about what llama.cpp
 * changes them), so plain and speculative decoding must both run them; a row's result never depends on the
 * other rows of the call. Weights are stored [N/16][K/32][j][16 outputs][4 bytes], so one 64-byte vector holds
 * 4 consecutive k of 16 outputs: Q4_1 as nibbles (low: k = 4j.., high: k = 16 + 4j..), j < 4; Q8_0 as bytes
 * (k = 4j..), j < 8, with the per-block sums of q (`wsum`) to undo the +128 that makes activations unsigned. */
#define A8_ROWS 16 /* activation rows per tile */

/* Per row and block of 32: int8 values (signed), the scale dx and dx * sum(xq). */
static void a8_quantize_rows(const float* x, int M, int K, int8_t* xq, float* dx, float* sx) {
    const int groups = K >> 5;
    for (int r = 0; r < M; r++)
        for (int g = 0; g < groups; g++) {
            const float* b = x + (long)r * K + 32 * g;
            const __m512 lo = _mm512_loadu_ps(b), hi = _mm512_loadu_ps(b + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            const float d = amax / 127.0f;
            const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
            const __m512i ql = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qh = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
            int8_t* out = xq + (long)r * K + 32 * g;
            _mm_storeu_si128((__m128i*)out, _mm512_cvtepi32_epi8(ql));
            _mm_storeu_si128((__m128i*)(out + 16), _mm512_cvtepi32_epi8(qh));
            dx[(long)r * groups + g] = d;
            sx[(long)r * groups + g] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(ql, qh));
        }
}

static inline __m512i bcast4(const int8_t* p, int32_t flip) {
    int32_t four;
    memcpy(&four, p, 4);
    return _mm512_set1_epi32(four ^ flip);
}

/* One row's block g against 16 outputs: the integer dot products (two chains, for latency), then the float step. */
static inline __m512 a8_row_q4_1(__m512 acc, const int8_t* xr, const __m512i* wl, const __m512i* wh, __m512 d,
                                 __m512 m, float dx, float sx) {
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    for (int j = 0; j < 4; j++) {
        s0 = _mm512_dpbusd_epi32(s0, wl[j], bcast4(xr + 4 * j, 0));
        s1 = _mm512_dpbusd_epi32(s1, wh[j], bcast4(xr + 16 + 4 * j, 0));
    }
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc);
    return _mm512_fmadd_ps(m, _mm512_set1_ps(sx), acc);
}
static inline __m512 a8_row_q8_0(__m512 acc, const int8_t* xr, const __m512i* wv, __m512i off, __m512 d, float dx) {
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    for (int j = 0; j < 4; j++) {
        s0 = _mm512_dpbusd_epi32(s0, bcast4(xr + 4 * j, (int32_t)0x80808080), wv[j]);
        s1 = _mm512_dpbusd_epi32(s1, bcast4(xr + 16 + 4 * j, (int32_t)0x80808080), wv[4 + j]);
    }
    const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), off);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc);
}

/* One tile: 16 outputs (block `w` of the layout) against R activation rows. `aux`: Q4_1's minimums (float) or
 * Q8_0's block sums of q (int32). */
#define A8_TILE(R)                                                                                          \
static void a8_q4_1_tile_##R(const int8_t* xq, const float* dx, const float* sx, int K, const uint8_t* w,  \
                             const float* dw, const void* aux, float* out, long ldo, __mmask16 keep) {     \
    const int groups = K >> 5;                                                                              \
    const __m512i low = _mm512_set1_epi8(0x0F);                                                             \
    __m512 acc[R];                                                                                          \
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                                               \
    for (int g = 0; g < groups; g++) {                                                                      \
        __m512i wl[4], wh[4];                                                                               \
        for (int j = 0; j < 4; j++) {                                                                       \
            const __m512i v = _mm512_loadu_si512(w + 256L * g + 64 * j);                                    \
            wl[j] = _mm512_and_si512(v, low);                                                               \
            wh[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);                                         \
        }                                                                                                   \
        const __m512 d = _mm512_loadu_ps(dw + 16 * g), m = _mm512_loadu_ps((const float*)aux + 16 * g);     \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)                                                \
            acc[r] = a8_row_q4_1(acc[r], xq + (long)r * K + 32 * g, wl, wh, d, m, dx[(long)r * groups + g], \
                                 sx[(long)r * groups + g]);                                                 \
    }                                                                                                       \
    for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(out + r * ldo, keep, acc[r]);                         \
}                                                                                                           \
static void a8_q8_0_tile_##R(const int8_t* xq, const float* dx, const float* sx, int K, const uint8_t* w,  \
                             const float* dw, const void* aux, float* out, long ldo, __mmask16 keep) {     \
    (void)sx;                                                                                               \
    const int groups = K >> 5;                                                                              \
    __m512 acc[R];                                                                                          \
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                                               \
    for (int g = 0; g < groups; g++) {                                                                      \
        __m512i wv[8];                                                                                      \
        for (int j = 0; j < 8; j++) wv[j] = _mm512_loadu_si512(w + 512L * g + 64 * j);                      \
        const __m512i off = _mm512_slli_epi32(_mm512_loadu_si512((const int32_t*)aux + 16 * g), 7);        \
        const __m512 d = _mm512_loadu_ps(dw + 16 * g);                                                      \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)                                                \
            acc[r] = a8_row_q8_0(acc[r], xq + (long)r * K + 32 * g, wv, off, d, dx[(long)r * groups + g]);  \
    }                                                                                                       \
    for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(out + r * ldo, keep, acc[r]);                         \
}
A8_TILE(1) A8_TILE(2) A8_TILE(3) A8_TILE(4) A8_TILE(5) A8_TILE(6) A8_TILE(7) A8_TILE(8) A8_TILE(9) A8_TILE(10)
A8_TILE(11) A8_TILE(12) A8_TILE(13) A8_TILE(14) A8_TILE(15) A8_TILE(16)
typedef void (*a8_tile_fn)(const int8_t*, const float*, const float*, int, const uint8_t*, const float*,
                           const void*, float*, long, __mmask16);
#define A8_LIST(KIND)                                                                                       \
    {0, KIND##_tile_1, KIND##_tile_2, KIND##_tile_3, KIND##_tile_4, KIND##_tile_5, KIND##_tile_6,           \
     KIND##_tile_7, KIND##_tile_8, KIND##_tile_9, KIND##_tile_10, KIND##_tile_11, KIND##_tile_12,           \
     KIND##_tile_13, KIND##_tile_14, KIND##_tile_15, KIND##_tile_16}
static const a8_tile_fn A8[2][A8_ROWS + 1] = {A8_LIST(a8_q8_0), A8_LIST(a8_q4_1)};

/* x: M x K float32; w, dw, mw (Q4_1; NULL for Q8_0), wsum (Q8_0; NULL for Q4_1): the layout above for N
 * outputs padded to a multiple of 16; out: M x N. K must be a multiple of 32. */
void a8_matmul(const float* x, int M, int K, const uint8_t* w, const float* dw, const float* mw,
               const int32_t* wsum, int N, float* out) {
    const int groups = K >> 5, blocks = (N + 15) / 16, chunks = (M + A8_ROWS - 1) / A8_ROWS;
    const long wblock = (mw ? 256L : 512L) * groups;
    int8_t* xq = malloc((size_t)M * K);
    float* dx = malloc(sizeof(float) * M * groups);
    float* sx = malloc(sizeof(float) * M * groups);
    a8_quantize_rows(x, M, K, xq, dx, sx);
#pragma omp parallel for schedule(static)
    for (int c = 0; c < blocks; c++) {
        const int n = 16 * c;
        const __mmask16 keep = first_lanes(N - n);
        const long s = (long)c * 16 * groups;
        int row = 0;
        for (int ch = 0; ch < chunks; ch++) {
            const int R = (M - row) / (chunks - ch);
            A8[mw != 0][R](xq + (long)row * K, dx + (long)row * groups, sx + (long)row * groups, K, w + c * wblock,
                           dw + s, mw ? (const void*)(mw + s) : (const void*)(wsum + s), out + (long)row * N + n, N,
                           keep);
            row += R;
        }
    }
    free(xq);
    free(dx);
    free(sx);
}
int i8_vnni(void) { return 1; }
#else
int i8_vnni(void) { return 0; }
#endif

/* ---- Row-invariant attention (AVX-512 builds) ----
 * out[i, h] = sum_j p_j v_j / sum_j p_j over the keys j that row i may see (mask[i, j] != 0), in key order,
 * with p_j = exp(s_j - max s), s_j = scale * (q[i, h] . k_j). The arithmetic depends only on the sequence of
 * visible (k_j, v_j): masked keys are skipped, not multiplied by zero, and nothing depends on the other rows or
 * on where the visible keys sit in the buffer. So a tree node's row gives the very bits a one-token step over
 * the same prefix gives (SDPA does not: its blocked reductions change with the row count and the masked keys),
 * which keeps speculative decoding token-identical to plain decoding even under numerics that round
 * activations (a difference of one ulp can move an 8-bit rounding, and then a logit). D: a multiple of 16, at
 * most 256. q[i, h, :] at q + i * q_row + h * q_head; k_j of KV head g at k + g * kv_head + j * kv_pos (v
 * alike); out[i, h, :] at out + (i * H + h) * D. Query head h reads KV head h / (H / KV). */
#ifdef __AVX512F__
#include <math.h>
#include <stdlib.h>
/* exp(x) for x <= 0 (Cephes' single-precision polynomial on x - n ln 2, scaled by 2^n). */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

void attend_rows(const float* q, long q_row, long q_head, const float* k, const float* v, long kv_head, long kv_pos,
                 const uint8_t* mask, int n, int T, int H, int KV, int D, float scale, float* out) {
    const int group = H / KV, parts = D / 16;
#pragma omp parallel
    {
        float* score = malloc(sizeof(float) * (T + 16));
        int* seen = malloc(sizeof(int) * (T + 16));
#pragma omp for schedule(static)
        for (int task = 0; task < n * H; task++) {
            const int i = task / H, h = task % H, g = h / group;
            const float* qi = q + i * q_row + h * q_head;
            const float* kg = k + g * kv_head;
            const float* vg = v + g * kv_head;
            __m512 qv[16];
            for (int p = 0; p < parts; p++) qv[p] = _mm512_loadu_ps(qi + 16 * p);
            int count = 0;
            float top = -INFINITY;
            for (int j = 0; j < T; j++) {
                if (!mask[(long)i * T + j]) continue;
                const float* kj = kg + j * kv_pos;
                __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kj));
                for (int p = 1; p < parts; p++) acc = _mm512_fmadd_ps(qv[p], _mm512_loadu_ps(kj + 16 * p), acc);
                const float s = _mm512_reduce_add_ps(acc) * scale;
                score[count] = s;
                seen[count++] = j;
                top = s > top ? s : top;
            }
            __m512 acc[16];
            for (int p = 0; p < parts; p++) acc[p] = _mm512_setzero_ps();
            __m512 total = _mm512_setzero_ps();
            for (int c = 0; c < count; c += 16) {
                const __mmask16 live = first_lanes(count - c);
                const __m512 e = _mm512_maskz_mov_ps(
                    live, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, score + c), _mm512_set1_ps(top))));
                total = _mm512_add_ps(total, e);
                _mm512_storeu_ps(score + c, e);
                for (int t = c; t < c + 16 && t < count; t++) {
                    const float* vj = vg + seen[t] * kv_pos;
                    const __m512 w = _mm512_set1_ps(score[t]);
                    for (int p = 0; p < parts; p++) acc[p] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vj + 16 * p), acc[p]);
                }
            }
            const __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(total));
            float* o = out + ((long)i * H + h) * D;
            for (int p = 0; p < parts; p++) _mm512_storeu_ps(o + 16 * p, _mm512_div_ps(acc[p], sum));
        }
        free(score);
        free(seen);
    }
}
int attend_rows_built(void) { return 1; }

/* ---- A decoder layer's RMSNorm and SiLU-gated MLP activation, row by row (AVX-512 builds) ----
 * Between its matmuls a transformer layer runs some twenty small tensor ops (a Llama RMSNorm alone is eight:
 * cast, pow, mean, add, rsqrt, mul, cast, mul), and on a CPU each costs microseconds of dispatch, more than its
 * arithmetic at the few rows of a decoding step. `confu/engine/fused.py` swaps the target's norms and gated MLPs
 * for modules that call these; the draft layer's kernels below use them too. Each row is computed on its own,
 * so a row's bits do not depend on the other rows of the call (row invariance, as in the matmuls). */
/* out = x / sqrt(mean(x^2) + eps) * weight, one row of H (a multiple of 16). */
static void rms_norm_row(const float* x, const float* weight, int H, float eps, float* out) {
    __m512 ss = _mm512_setzero_ps();
    for (int k = 0; k < H; k += 16) {
        const __m512 v = _mm512_loadu_ps(x + k);
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)H + eps));
    for (int k = 0; k < H; k += 16)
        _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv), _mm512_loadu_ps(weight + k)));
}

void rms_norm_rows(const float* x, int n, int H, const float* weight, float eps, float* out) {
    for (int r = 0; r < n; r++) rms_norm_row(x + (long)r * H, weight, H, eps, out + (long)r * H);
}

/* silu(g) * u for the n x I halves of gate_up (n x 2I), into out (n x I); I a multiple of 16. */
void silu_mul(const float* gate_up, int n, int I, float* out) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int r = 0; r < n; r++)
        for (int j = 0; j < I; j += 16) {
            const __m512 g = _mm512_loadu_ps(gate_up + (long)r * 2 * I + j);
            const __m512 u = _mm512_loadu_ps(gate_up + (long)r * 2 * I + I + j);
            /* sigmoid from exp(-|g|) <= 1 (no overflow): 1 / (1 + e) for g >= 0, e / (1 + e) below */
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
            const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
            const __m512 sig = _mm512_div_ps(_mm512_mask_blend_ps(negative, one, e), _mm512_add_ps(one, e));
            _mm512_storeu_ps(out + (long)r * I + j, _mm512_mul_ps(_mm512_mul_ps(g, sig), u));
        }
}
int norm_mlp_built(void) { return 1; }
#else
int attend_rows_built(void) { return 0; }
int norm_mlp_built(void) { return 0; }
#endif

/* ---- The draft head's decoder layer in two calls (AVX512-VNNI builds; `confu/engine/draft_kernel.py`) ----
 * A draft level is a handful of small-row matmuls and about seventy small tensor ops between them, and each op
 * costs microseconds of dispatch on a CPU (more than its arithmetic at a few rows). These two functions are
 * `DraftLayer.qkv` and `DraftLayer.attend` as written in `confu/engine/draft.py`, on the int8 weights of
 * `i8_matmul`, the attention of `attend_rows` and the exp of the attention kernel. Lossy like the int8 draft
 * weights: a draft's numerics change what it proposes, never what the target emits. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
typedef struct {
    const int8_t* w;
    const float* scale;
    const int32_t* sum;
} i8_weight;

typedef struct {
    int hidden, heads, kv_heads, head_dim, intermediate;
    float eps;
    const float *embed_norm, *hidden_norm, *post_norm, *inv_freq;
    i8_weight qkv, o, gate_up, down; /* q, k, v outputs stacked; gate then up outputs stacked */
} draft_layer;

static void i8_apply(const i8_weight* w, const float* x, int M, int K, int N, float* out) {
    i8_matmul(x, M, K, w->w, w->scale, w->sum, N, out);
}

/* Rotary embedding on the halves of one head vector: (x1 cos - x2 sin, x2 cos + x1 sin). */
static void rope_head(const float* x, const float* cs, const float* sn, int half, float* out) {
    for (int j = 0; j < half; j++) {
        const float x1 = x[j], x2 = x[half + j];
        out[j] = x1 * cs[j] - x2 * sn[j];
        out[half + j] = x2 * cs[j] + x1 * sn[j];
    }
}

/* emb, hidden: n x H; pos: n; q out (heads, n, D), k and v out (kv_heads, n, D), q and k rotated. */
void draft_qkv(const draft_layer* L, const float* emb, const float* hidden, const int64_t* pos, int n, float* q,
               float* k, float* v) {
    const int H = L->hidden, D = L->head_dim, half = D / 2, NQ = L->heads * D, NKV = L->kv_heads * D;
    const int N = NQ + 2 * NKV;
    float* x = malloc(sizeof(float) * n * 2 * H);
    float* y = malloc(sizeof(float) * n * N);
    float* cs = malloc(sizeof(float) * half);
    float* sn = malloc(sizeof(float) * half);
    for (int r = 0; r < n; r++) {
        rms_norm_row(emb + (long)r * H, L->embed_norm, H, L->eps, x + (long)r * 2 * H);
        rms_norm_row(hidden + (long)r * H, L->hidden_norm, H, L->eps, x + (long)r * 2 * H + H);
    }
    i8_apply(&L->qkv, x, n, 2 * H, N, y);
    for (int r = 0; r < n; r++) {
        for (int j = 0; j < half; j++) {
            const float angle = (float)pos[r] * L->inv_freq[j];
            cs[j] = cosf(angle);
            sn[j] = sinf(angle);
        }
        const float* yr = y + (long)r * N;
        for (int h = 0; h < L->heads; h++) rope_head(yr + h * D, cs, sn, half, q + ((long)h * n + r) * D);
        for (int h = 0; h < L->kv_heads; h++) {
            rope_head(yr + NQ + h * D, cs, sn, half, k + ((long)h * n + r) * D);
            memcpy(v + ((long)h * n + r) * D, yr + NQ + NKV + h * D, sizeof(float) * D);
        }
    }
    free(x);
    free(y);
    free(cs);
    free(sn);
}

/* hidden: n x H; q: (heads, n, D) contiguous; keys / values as `attend_rows` reads them, T positions; mask: n x T;
 * shift: NULL or rows of H added after attention, `shift_row` floats apart (0: one row for all); out: n x H. */
void draft_attend(const draft_layer* L, const float* hidden, const float* q, const float* keys, const float* values,
                  long kv_head, long kv_pos, const uint8_t* mask, int n, int T, const float* shift, long shift_row,
                  float* out) {
    const int H = L->hidden, D = L->head_dim, NQ = L->heads * D, I = L->intermediate;
    float* attn = malloc(sizeof(float) * n * NQ);
    float* h = malloc(sizeof(float) * n * H);
    float* x = malloc(sizeof(float) * n * H);
    float* gu = malloc(sizeof(float) * n * 2 * I);
    float* act = malloc(sizeof(float) * n * I);
    attend_rows(q, D, (long)n * D, keys, values, kv_head, kv_pos, mask, n, T, L->heads, L->kv_heads, D,
                1.0f / sqrtf((float)D), attn);
    i8_apply(&L->o, attn, n, NQ, H, h);
    for (int r = 0; r < n; r++) {
        float* hr = h + (long)r * H;
        for (int j = 0; j < H; j++) hr[j] += hidden[(long)r * H + j];
        if (shift)
            for (int j = 0; j < H; j++) hr[j] += shift[r * shift_row + j];
        rms_norm_row(hr, L->post_norm, H, L->eps, x + (long)r * H);
    }
    i8_apply(&L->gate_up, x, n, H, 2 * I, gu);
    silu_mul(gu, n, I, act);
    i8_apply(&L->down, act, n, I, H, out);
    for (long j = 0; j < (long)n * H; j++) out[j] += h[j];
    free(attn);
    free(h);
    free(x);
    free(gu);
    free(act);
}

/* Per row of x (n x V): the k largest entries (ties: the lower index first) as log-probabilities x_i - logsumexp(x),
 * best first, into vals / idx (n x k). A draft level's log_softmax and topk in one pass over the logits. */
void top_log_probs(const float* x, int n, int V, int k, float* vals, int64_t* idx);

/* A draft level's children: the final norm of the layer outputs x (n x H), the int8 lm_head (V outputs), then
 * `top_log_probs`; each draft id i becomes the target id i + d2t[i]. */
void draft_top_children(const float* x, int n, int H, const float* norm, float eps, const int8_t* w, const float* sw,
                        const int32_t* wsum, int V, const float* bias, const int64_t* d2t, int k, float* vals,
                        int64_t* ids) {
    float* normed = malloc(sizeof(float) * n * H);
    float* logits = malloc(sizeof(float) * n * V);
    for (int r = 0; r < n; r++) rms_norm_row(x + (long)r * H, norm, H, eps, normed + (long)r * H);
    i8_matmul(normed, n, H, w, sw, wsum, V, logits);
    if (bias) /* a ConFu head's future logits (NULL: none) */
        for (int r = 0; r < n; r++)
            for (int i = 0; i < V; i++) logits[(long)r * V + i] += bias[i];
    top_log_probs(logits, n, V, k, vals, ids);
    for (long j = 0; j < (long)n * k; j++)
        if (ids[j] >= 0) ids[j] += d2t[ids[j]]; /* -1: fewer than k comparable logits (NaN) */
    free(normed);
    free(logits);
}

void top_log_probs(const float* x, int n, int V, int k, float* vals, int64_t* idx) {
#pragma omp parallel for schedule(static) if (n > 1)
    for (int r = 0; r < n; r++) {
        const float* row = x + (long)r * V;
        float* best = vals + (long)r * k;
        int64_t* at = idx + (long)r * k;
        for (int j = 0; j < k; j++) {
            best[j] = -INFINITY;
            at[j] = -1;
        }
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int i = 0; i < V; i += 16) {
            const __mmask16 live = first_lanes(V - i);
            top = _mm512_mask_max_ps(top, live, top, _mm512_maskz_loadu_ps(live, row + i));
        }
        const float m = _mm512_reduce_max_ps(top);
        __m512 total = _mm512_setzero_ps();
        for (int i = 0; i < V; i += 16) {
            const __mmask16 live = first_lanes(V - i);
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, row + i), _mm512_set1_ps(m)));
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(live, e));
        }
        const float lse = m + logf(_mm512_reduce_add_ps(total));
        for (int i = 0; i < V; i += 16) {
            const __mmask16 live = first_lanes(V - i);
            __mmask16 above = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, row + i),
                                                      _mm512_set1_ps(best[k - 1]), _CMP_GT_OQ);
            while (above) {
                const int lane = __builtin_ctz(above);
                above &= above - 1;
                const float value = row[i + lane];
                if (!(value > best[k - 1])) continue;  /* the threshold rose within this vector */
                int j = k - 1;
                for (; j > 0 && value > best[j - 1]; j--) {
                    best[j] = best[j - 1];
                    at[j] = at[j - 1];
                }
                best[j] = value;
                at[j] = i + lane;
            }
        }
        for (int j = 0; j < k; j++) best[j] -= lse;
    }
}
int draft_layer_built(void) { return 1; }
#else
int draft_layer_built(void) { return 0; }
#endif

/* The lane width of this build (8: AVX2, 16: AVX-512): it decides the summation order, so it is reported. */
int kernel_lanes(void) { return LANES; }
