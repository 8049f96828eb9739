/* Attention in bf16 on CPUs with AVX512-BF16 (see mcpft/cpu_attention.py for why): a prefill chunk's, causal, and
 * one decoded position's (`mcpft_decode_attention`, further down).
 *
 * Prefill: flash-attention order (online softmax over blocks of keys, nothing of size queries x keys in memory),
 * laid out so that every vector holds 16 queries: scores S^T[key][query] come from `vdpbf16ps` with the query block
 * packed as bf16 pairs along the head dimension and one key's pair broadcast; P.V comes from `vdpbf16ps` again with
 * the probabilities packed as pairs of keys and the values transposed into pairs of keys. The softmax's row maxima
 * and sums are then plain element-wise vector operations over keys. Accumulation is fp32 throughout.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QB 32 /* queries a block: two vectors of 16 */
#define KB 64 /* keys a block */
#define MAX_DIM 256
#define SPLIT 256 /* keys a decoding split */
#define MAX_GROUP 16 /* query heads a kv head */

typedef uint16_t bf16;

static inline bf16 to_bf16(float x) { /* round to nearest even */
    uint32_t bits;
    memcpy(&bits, &x, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (bf16)(bits >> 16);
}

/* Two fp32 vectors -> one vector of bf16 pairs (lo[l], hi[l]) per lane, rounded to nearest even. */
static inline __m512i pack_pairs(__m512 lo, __m512 hi) {
    const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    __m512i a = _mm512_castps_si512(lo), b = _mm512_castps_si512(hi);
    a = _mm512_add_epi32(a, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(a, 16), one)));
    b = _mm512_add_epi32(b, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(b, 16), one)));
    return _mm512_or_si512(_mm512_srli_epi32(a, 16), _mm512_and_si512(b, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* exp(x) for x <= 0 (relative error ~2e-7); very negative x (masked scores) gives 0. */
static inline __m512 exp_nonpositive(__m512 x) {
    __m512 t = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(-150.0f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f)); /* |f| <= ln2/2 */
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline float sum8(__m256 x) {
    __m128 four = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

/* values [keys][dim] (row stride `stride`) -> pairs [dim][key pairs], zero past `keys`; in tiles of 16 pairs, so
 * that the 32 rows being read stay in L1 while each dimension's 16 pairs are written in one line. */
static void transpose_value_pairs(const bf16 *values, long stride, int keys, int dim, int pairs, uint32_t *out) {
    for (int p0 = 0; p0 < pairs; p0 += 16)
        for (int d = 0; d < dim; d++)
            for (int p = p0; p < p0 + 16 && p < pairs; p++) {
                int j = 2 * p;
                uint32_t lo = j < keys ? values[(long)j * stride + d] : 0;
                uint32_t hi = j + 1 < keys ? values[(long)(j + 1) * stride + d] : 0;
                out[(long)d * pairs + p] = lo | (hi << 16);
            }
}

/* One block of up to QB queries of one head, over keys 0..last key it sees. */
static void attend_block(const bf16 *q, long q_stride, int rows, int first_position, const bf16 *keys,
                         long k_stride, const uint32_t *value_pairs, int pairs, int dim, float scale, bf16 *out,
                         long out_stride) {
    uint32_t qpack[MAX_DIM / 2][QB] __attribute__((aligned(64)));
    float scores[KB][QB] __attribute__((aligned(64)));
    uint32_t probs[KB / 2][QB] __attribute__((aligned(64)));
    float acc[MAX_DIM][QB] __attribute__((aligned(64)));
    const int half = dim / 2;
    for (int p = 0; p < half; p++)
        for (int i = 0; i < QB; i++)
            qpack[p][i] = i < rows ? ((const uint32_t *)(q + (long)i * q_stride))[p] : 0;
    memset(acc, 0, sizeof(float) * QB * dim);
    __m512 max0 = _mm512_set1_ps(-1e30f), max1 = max0, sum0 = _mm512_setzero_ps(), sum1 = sum0;
    const __m512 vscale = _mm512_set1_ps(scale);
    const int last_position = first_position + rows - 1; /* the last query's position: it sees keys 0..this */
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i pos0 = _mm512_add_epi32(lane, _mm512_set1_epi32(first_position));
    const __m512i pos1 = _mm512_add_epi32(pos0, _mm512_set1_epi32(16));
    for (int k0 = 0; k0 <= last_position; k0 += KB) {
        const int kn = last_position + 1 - k0 < KB ? last_position + 1 - k0 : KB;
        /* S^T = K Q^T, eight keys at a time */
        for (int j = 0; j < KB; j += 8) {
            __m512 s[8][2];
            for (int r = 0; r < 8; r++) s[r][0] = s[r][1] = _mm512_setzero_ps();
            const uint32_t *krow[8];
            for (int r = 0; r < 8; r++) {
                int key = k0 + j + r < k0 + kn ? k0 + j + r : k0 + kn - 1; /* past the end: any valid row, masked */
                krow[r] = (const uint32_t *)(keys + (long)key * k_stride);
            }
            for (int p = 0; p < half; p++) {
                __m512bh q0 = (__m512bh)_mm512_load_si512(qpack[p]);
                __m512bh q1 = (__m512bh)_mm512_load_si512(qpack[p] + 16);
                for (int r = 0; r < 8; r++) {
                    __m512bh kb = (__m512bh)_mm512_set1_epi32((int)krow[r][p]);
                    s[r][0] = _mm512_dpbf16_ps(s[r][0], q0, kb);
                    s[r][1] = _mm512_dpbf16_ps(s[r][1], q1, kb);
                }
            }
            for (int r = 0; r < 8; r++) {
                __m512i key = _mm512_set1_epi32(k0 + j + r);
                __mmask16 hide0 = _mm512_cmpgt_epi32_mask(key, pos0), hide1 = _mm512_cmpgt_epi32_mask(key, pos1);
                if (j + r >= kn) hide0 = hide1 = 0xFFFF;
                _mm512_store_ps(scores[j + r], _mm512_mask_blend_ps(hide0, _mm512_mul_ps(s[r][0], vscale),
                                                                   _mm512_set1_ps(-INFINITY)));
                _mm512_store_ps(scores[j + r] + 16, _mm512_mask_blend_ps(hide1, _mm512_mul_ps(s[r][1], vscale),
                                                                        _mm512_set1_ps(-INFINITY)));
            }
        }
        /* online softmax: new maxima, rescale what was accumulated, probabilities as pairs of keys */
        __m512 new0 = max0, new1 = max1;
        for (int j = 0; j < KB; j++) {
            new0 = _mm512_max_ps(new0, _mm512_load_ps(scores[j]));
            new1 = _mm512_max_ps(new1, _mm512_load_ps(scores[j] + 16));
        }
        __m512 alpha0 = exp_nonpositive(_mm512_sub_ps(max0, new0));
        __m512 alpha1 = exp_nonpositive(_mm512_sub_ps(max1, new1));
        max0 = new0, max1 = new1;
        sum0 = _mm512_mul_ps(sum0, alpha0), sum1 = _mm512_mul_ps(sum1, alpha1);
        for (int j = 0; j < KB; j += 2) {
            __m512 a0 = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(scores[j]), max0));
            __m512 a1 = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(scores[j] + 16), max1));
            __m512 b0 = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(scores[j + 1]), max0));
            __m512 b1 = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(scores[j + 1] + 16), max1));
            sum0 = _mm512_add_ps(sum0, _mm512_add_ps(a0, b0));
            sum1 = _mm512_add_ps(sum1, _mm512_add_ps(a1, b1));
            _mm512_store_si512(probs[j / 2], pack_pairs(a0, b0));
            _mm512_store_si512(probs[j / 2] + 16, pack_pairs(a1, b1));
        }
        /* O^T = alpha O^T + V^T P^T, eight dimensions at a time */
        const int block_pairs = (kn + 1) / 2;
        for (int d = 0; d < dim; d += 8) {
            __m512 o[8][2];
            for (int r = 0; r < 8; r++) {
                o[r][0] = _mm512_mul_ps(_mm512_load_ps(acc[d + r]), alpha0);
                o[r][1] = _mm512_mul_ps(_mm512_load_ps(acc[d + r] + 16), alpha1);
            }
            const uint32_t *vrow = value_pairs + (long)d * pairs + k0 / 2;
            for (int p = 0; p < block_pairs; p++) {
                __m512bh p0 = (__m512bh)_mm512_load_si512(probs[p]);
                __m512bh p1 = (__m512bh)_mm512_load_si512(probs[p] + 16);
                for (int r = 0; r < 8; r++) {
                    __m512bh vb = (__m512bh)_mm512_set1_epi32((int)vrow[(long)r * pairs + p]);
                    o[r][0] = _mm512_dpbf16_ps(o[r][0], p0, vb);
                    o[r][1] = _mm512_dpbf16_ps(o[r][1], p1, vb);
                }
            }
            for (int r = 0; r < 8; r++) {
                _mm512_store_ps(acc[d + r], o[r][0]);
                _mm512_store_ps(acc[d + r] + 16, o[r][1]);
            }
        }
    }
    float inv[QB] __attribute__((aligned(64)));
    _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), sum0));
    _mm512_store_ps(inv + 16, _mm512_div_ps(_mm512_set1_ps(1.0f), sum1));
    for (int i = 0; i < rows; i++)
        for (int d = 0; d < dim; d++) out[(long)i * out_stride + d] = to_bf16(acc[d][i] * inv[i]);
}

/* q: [heads][count][dim] (strides given); keys, values: [kv_heads][>= end][dim], rows `kv_row_stride` apart and
 * heads `kv_head_stride` apart; out: [count][heads * dim] (row stride `out_stride`). Query i sits at position
 * end - count + i and sees keys 0..its position. Returns 0, or -1 when `dim` is not supported. */
int mcpft_prefill_attention(const bf16 *q, long q_head_stride, long q_row_stride, const bf16 *keys,
                            const bf16 *values, long kv_head_stride, long kv_row_stride, bf16 *out, long out_stride,
                            int heads, int kv_heads, int count, int end, int dim, float scale, int threads) {
    if (dim % 16 != 0 || dim > MAX_DIM || heads % kv_heads != 0 || count > end) return -1;
    const int group = heads / kv_heads, pairs = (end + 1) / 2 + KB / 2; /* slack: a block may read past `end` */
    uint32_t *value_pairs = malloc(sizeof(uint32_t) * (size_t)kv_heads * dim * pairs);
    if (!value_pairs) return -2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int g = 0; g < kv_heads; g++)
        transpose_value_pairs(values + g * kv_head_stride, kv_row_stride, end, dim, pairs,
                              value_pairs + (long)g * dim * pairs);
    const int blocks = (count + QB - 1) / QB, start = end - count;
    /* the last blocks see the most keys: hand them out first */
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int unit = 0; unit < heads * blocks; unit++) {
        int block = blocks - 1 - unit / heads, h = unit % heads, g = h / group;
        int i0 = block * QB, rows = count - i0 < QB ? count - i0 : QB;
        attend_block(q + h * q_head_stride + (long)i0 * q_row_stride, q_row_stride, rows, start + i0,
                     keys + g * kv_head_stride, kv_row_stride, value_pairs + (long)g * dim * pairs, pairs, dim,
                     scale, out + (long)i0 * out_stride + (long)h * dim, out_stride);
    }
    free(value_pairs);
    return 0;
}

/* Lane r of the result is the sum of the lanes of x[r], for 16 vectors: a transposing tree of shuffles and adds. */
static inline __m512 sum16x16(__m512 x[16]) {
    __m512 half[8], quarter[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: (x0+x2, y0+y2, x1+x3, y1+y3) of x = x[2i], y = x[2i+1] */
        half[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]),
                                _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: that lane's sums of four vectors */
        __m512d a = _mm512_castps_pd(half[2 * i]), b = _mm512_castps_pd(half[2 * i + 1]);
        quarter[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quarter[0], quarter[1], 0x88),
                               _mm512_shuffle_f32x4(quarter[0], quarter[1], 0xDD));
    __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quarter[2], quarter[3], 0x88),
                                _mm512_shuffle_f32x4(quarter[2], quarter[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xDD));
}

/* 32 bf16 of a row from `d` on; past `dim` zeros (a head_dim that is an odd multiple of 16). */
static inline __m512i load32(const bf16 *row, int d, int dim) {
    return dim - d >= 32 ? _mm512_loadu_si512(row + d) : _mm512_maskz_loadu_epi16(0xFFFF, row + d);
}

#define SLOTS 4 /* query heads handled together when summing the values */

/* One decoded position's attention for the `group` query heads of one kv head over keys first..first+n-1: the
 * running maximum, the sum of exponentials and the unnormalised output per head (fp32, in `acc`), for merging
 * across splits of the keys (flash-decoding). Scores: 16 keys at a time, one vector of partial sums per key,
 * summed across lanes by `sum16x16`. Values: two keys' rows interleaved into bf16 pairs, so `vdpbf16ps` weighs both
 * by their probabilities at once; the interleaving permutes the dimensions, undone when `acc` is written. */
static void decode_split(const bf16 *q, int group, const bf16 *keys, const bf16 *values, long row_stride, int first,
                         int n, int dim, float scale, float *max_out, float *sum_out, float *acc) {
    float scores[MAX_GROUP][SPLIT] __attribute__((aligned(64)));
    uint32_t probs[MAX_GROUP + SLOTS][SPLIT / 2] __attribute__((aligned(64)));
    const int vectors = (dim + 31) / 32;
    for (int j0 = 0; j0 < n; j0 += 16) { /* a tile of 16 keys is read from memory once, then from L1 for each head */
        const bf16 *row[16];
        for (int r = 0; r < 16; r++) row[r] = keys + (long)(first + (j0 + r < n ? j0 + r : n - 1)) * row_stride;
        for (int h = 0; h < group; h++) {
            __m512 s[16];
            for (int r = 0; r < 16; r++) s[r] = _mm512_setzero_ps();
            for (int v = 0; v < vectors; v++) {
                __m512bh qv = (__m512bh)load32(q + (long)h * dim, 32 * v, dim);
                for (int r = 0; r < 16; r++) s[r] = _mm512_dpbf16_ps(s[r], qv, (__m512bh)load32(row[r], 32 * v, dim));
            }
            _mm512_store_ps(scores[h] + j0, _mm512_mul_ps(sum16x16(s), _mm512_set1_ps(scale)));
        }
    }
    for (int h = 0; h < group; h++) {
        float top = -INFINITY;
        for (int j = 0; j < n; j++) top = scores[h][j] > top ? scores[h][j] : top;
        __m512 sum = _mm512_setzero_ps(), vtop = _mm512_set1_ps(top);
        const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int j = 0; j < n; j += 32) { /* keys past n (the last vector's tail) get probability 0 */
            __mmask16 in0 = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(n - j));
            __mmask16 in1 = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(n - j - 16));
            __m512 e0 = _mm512_maskz_mov_ps(in0, exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(scores[h] + j), vtop)));
            __m512 e1 = _mm512_maskz_mov_ps(in1, exp_nonpositive(
                _mm512_sub_ps(_mm512_load_ps(scores[h] + (j + 16 < SPLIT ? j + 16 : j)), vtop)));
            sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
            /* pairs (p[j+2l], p[j+2l+1]): from the two vectors' even and odd lanes */
            const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
            _mm512_store_si512(probs[h] + j / 2, pack_pairs(_mm512_permutex2var_ps(e0, even, e1),
                                                            _mm512_permutex2var_ps(e0, odd, e1)));
        }
        max_out[h] = top, sum_out[h] = _mm512_reduce_add_ps(sum);
    }
    for (int h = group; h < group + SLOTS; h++) memset(probs[h], 0, sizeof(probs[h]));
    const int pairs = (n + 1) / 2;
    for (int h0 = 0; h0 < group; h0 += SLOTS)
        for (int v0 = 0; v0 < vectors; v0 += 2) { /* 64 dimensions at a time: whole rows of SmolLM2's heads */
            const int width = vectors - v0 < 2 ? vectors - v0 : 2;
            __m512 lo[2][SLOTS], hi[2][SLOTS];
            for (int v = 0; v < 2; v++)
                for (int t = 0; t < SLOTS; t++) lo[v][t] = hi[v][t] = _mm512_setzero_ps();
            for (int p = 0; p < pairs; p++) {
                int j = first + 2 * p, k = 2 * p + 1 < n ? j + 1 : j; /* an odd last key pairs with itself, weight 0 */
                __m512bh w[SLOTS];
                for (int t = 0; t < SLOTS; t++) w[t] = (__m512bh)_mm512_set1_epi32((int)probs[h0 + t][p]);
                for (int v = 0; v < width; v++) {
                    __m512i a = load32(values + (long)j * row_stride, 32 * (v0 + v), dim);
                    __m512i b = load32(values + (long)k * row_stride, 32 * (v0 + v), dim);
                    __m512bh low = (__m512bh)_mm512_unpacklo_epi16(a, b);
                    __m512bh high = (__m512bh)_mm512_unpackhi_epi16(a, b);
                    for (int t = 0; t < SLOTS; t++) {
                        lo[v][t] = _mm512_dpbf16_ps(lo[v][t], low, w[t]);
                        hi[v][t] = _mm512_dpbf16_ps(hi[v][t], high, w[t]);
                    }
                }
            }
            for (int v = 0; v < width; v++)
                for (int t = 0; t < SLOTS && h0 + t < group; t++) {
                    float l[16], u[16];
                    _mm512_storeu_ps(l, lo[v][t]);
                    _mm512_storeu_ps(u, hi[v][t]);
                    float *out = acc + (long)(h0 + t) * dim + 32 * (v0 + v);
                    for (int i = 0; i < 16 && 32 * (v0 + v) + 8 * (i / 4) + (i % 4) < dim; i++) {
                        out[8 * (i / 4) + (i % 4)] = l[i]; /* lane i holds dimensions 8(i/4) + i%4 and that + 4 */
                        out[8 * (i / 4) + 4 + (i % 4)] = u[i];
                    }
                }
        }
}

/* q: [heads][dim] (contiguous), one position that sees keys 0..end-1; keys, values as for the prefill; out:
 * [heads * dim]. Returns 0, or -1 when the shapes are not supported. */
int mcpft_decode_attention(const bf16 *q, const bf16 *keys, const bf16 *values, long kv_head_stride,
                           long kv_row_stride, bf16 *out, int heads, int kv_heads, int end, int dim, float scale,
                           int threads) {
    if (dim % 16 != 0 || dim > MAX_DIM || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP || end < 1)
        return -1;
    const int group = heads / kv_heads, splits = (end + SPLIT - 1) / SPLIT, units = kv_heads * splits;
    float *part = malloc(sizeof(float) * (size_t)units * group * (dim + 2));
    if (!part) return -2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int unit = 0; unit < units; unit++) {
        int g = unit / splits, first = (unit % splits) * SPLIT, n = end - first < SPLIT ? end - first : SPLIT;
        float *base = part + (long)unit * group * (dim + 2);
        decode_split(q + (long)g * group * dim, group, keys + g * kv_head_stride, values + g * kv_head_stride,
                     kv_row_stride, first, n, dim, scale, base, base + group, base + 2 * group);
    }
    for (int h = 0; h < heads; h++) {
        int g = h / group, r = h % group;
        float top = -INFINITY, total = 0, o[MAX_DIM] = {0};
        for (int s = 0; s < splits; s++) {
            float m = part[((long)(g * splits + s)) * group * (dim + 2) + r];
            top = m > top ? m : top;
        }
        for (int s = 0; s < splits; s++) {
            float *base = part + ((long)(g * splits + s)) * group * (dim + 2);
            float w = expf(base[r] - top);
            total += w * base[group + r];
            for (int d = 0; d < dim; d++) o[d] += w * base[2 * group + (long)r * dim + d];
        }
        for (int d = 0; d < dim; d++) out[(long)h * dim + d] = to_bf16(o[d] / total);
    }
    free(part);
    return 0;
}
