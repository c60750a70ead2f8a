/* Int8 kernels for decoding on x86 CPUs with AVX2 or AVX-512 (components/common/c_kernels.py
 * builds this file twice, once per instruction set: the sections under __AVX512F__ are the
 * AVX-512 variant's; components/common/fast_decode.py and packed_prefill.py call the layer
 * blocks).
 *
 * Weights: int8 with one float scale per block of 32 weights of a row (as llama.cpp's Q8_0),
 * stored in groups of 4 rows with their blocks interleaved (group g, block b, row r at
 * ((g * blocks + b) * 4 + r) * 32; its scale at (g * blocks + b) * 4 + r), so that a group
 * streams from memory as one run. Inputs and outputs stay float32: each weight is converted to
 * float as it is read and multiplied in float (weight-only quantization), so a row's result
 * does not depend on the other rows of a batch beyond float rounding.
 *
 * int8_linear: one linear layer. int8_decoder_layer: a whole Llama decoder layer for one new
 * token per row (RMSNorm, projections, rotary embedding, the key/value cache write, attention,
 * SiLU gate, residual adds) in one OpenMP region, so that a decode step costs one call per layer
 * instead of dozens of tensor operations. int8_prefill_layer: the same layer for the new tokens
 * of prompts, each attending to its own prompt's cache up to its position. The key/value cache
 * holds float16 numbers (as llama.cpp's does by default): a decode step of many rows reads it
 * all, and memory bandwidth decides that part of its speed.
 *
 * Each variant adds a row's products in one fixed order whatever the batch (the AVX-512 one in
 * 16 lanes, the AVX2 one in 8): a row's result does not depend on its batch within a variant,
 * and the two variants agree up to float rounding.
 */
#include "avx2_math.h"
#ifdef __AVX512F__
#include "avx512_math.h"
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32
#define GROUP 4

/* An int8 weight matrix: n output rows (a multiple of 4) of k inputs (a multiple of 32). */
typedef struct {
    const int8_t *weight;
    const float *scale; /* one per block of 32 weights of a row, in the weights' order */
    const float *bias; /* NULL: none */
    int64_t n, k;
} Int8Matrix;

static void *checked_malloc(size_t bytes) {
    void *memory = malloc(bytes ? bytes : 1);
    if (!memory) abort();
    return memory;
}

/* 8 weights as floats. */
static inline __m256 load_weights(const int8_t *w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
}

#define MANY_ROWS 4 /* from this many rows on, multiply converts each weight group once */
static void multiply_few_rows(const Int8Matrix *w, const float *x, int64_t x_stride,
                              int64_t rows, float *y, int64_t y_stride);

#ifdef __AVX512F__
/* The AVX-512 variant: 16 lanes, 32 registers. */
#define CONVERTED_ROWS 6 /* rows multiply_converted takes at once */

/* Rows m..m+R-1 of y for the 4 output rows j0..j0+3 whose weights, converted to float, are
 * wf (4 x k, row after row). R <= 6: 24 accumulators, 6 inputs and a weight fit in the 32
 * registers. Lane l of a row's accumulator adds the products of inputs c = l mod 16 in order of
 * c, as in few_rows_group, so both give the same bits. */
static inline void multiply_converted(const float *wf, int64_t k, const float *x,
                                      int64_t x_stride, int64_t m, const int R, const float *bias,
                                      int64_t j0, float *y, int64_t y_stride) {
    __m512 acc[CONVERTED_ROWS][GROUP];
    for (int i = 0; i < R; i++)
        for (int r = 0; r < GROUP; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += 16) {
        __m512 in[CONVERTED_ROWS];
        for (int i = 0; i < R; i++) in[i] = _mm512_loadu_ps(x + (m + i) * x_stride + c);
        for (int r = 0; r < GROUP; r++) {
            __m512 weights = _mm512_loadu_ps(wf + r * k + c);
            for (int i = 0; i < R; i++) acc[i][r] = _mm512_fmadd_ps(weights, in[i], acc[i][r]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int r = 0; r < GROUP; r++)
            y[(m + i) * y_stride + j0 + r] =
                horizontal_sum16(acc[i][r]) + (bias ? bias[j0 + r] : 0.0f);
}

/* Rows m..m+R-1 (R <= 3) of y for weight group `group` of w, each weight converted to float
 * and scaled as it is read (the products multiply_converted takes from its buffer). */
static inline void few_rows_group(const Int8Matrix *w, int64_t group, const float *x,
                                  int64_t x_stride, int64_t m, const int R, float *y,
                                  int64_t y_stride) {
    int64_t blocks = w->k / BLOCK;
    const int8_t *wg = w->weight + group * GROUP * w->k;
    __m512 acc[3][GROUP];
    for (int i = 0; i < R; i++)
        for (int r = 0; r < GROUP; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *wb = wg + b * GROUP * BLOCK;
        const float *scales = w->scale + (group * blocks + b) * GROUP;
        for (int c = 0; c < BLOCK; c += 16) {
            __m512 in[3];
            for (int i = 0; i < R; i++)
                in[i] = _mm512_loadu_ps(x + (m + i) * x_stride + b * BLOCK + c);
            for (int r = 0; r < GROUP; r++) {
                __m512 weights = _mm512_mul_ps(load_weights16(wb + r * BLOCK + c),
                                               _mm512_set1_ps(scales[r]));
                for (int i = 0; i < R; i++)
                    acc[i][r] = _mm512_fmadd_ps(weights, in[i], acc[i][r]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int r = 0; r < GROUP; r++) {
            int64_t j = group * GROUP + r;
            y[(m + i) * y_stride + j] =
                horizontal_sum16(acc[i][r]) + (w->bias ? w->bias[j] : 0.0f);
        }
}

/* y for rows < MANY_ROWS: every weight group read once, for all the rows. */
static void multiply_few_rows(const Int8Matrix *w, const float *x, int64_t x_stride,
                              int64_t rows, float *y, int64_t y_stride) {
    #pragma omp for schedule(static)
    for (int64_t group = 0; group < w->n / GROUP; group++) {
        if (rows == 1) few_rows_group(w, group, x, x_stride, 0, 1, y, y_stride);
        else if (rows == 2) few_rows_group(w, group, x, x_stride, 0, 2, y, y_stride);
        else few_rows_group(w, group, x, x_stride, 0, 3, y, y_stride);
    }
}

#else
/* The AVX2 variant: 8 lanes, 16 registers. */
#define CONVERTED_ROWS 3 /* rows multiply_converted takes at once */

/* Rows m..m+R-1 of y for the 4 output rows j0..j0+3 whose weights, converted to float, are
 * wf (4 x k, row after row). R <= 3: 12 accumulators, 3 inputs and a weight fill the 16 AVX2
 * registers. The lanes add in the same order as in multiply_few_rows, so both give the same
 * bits. */
static inline void multiply_converted(const float *wf, int64_t k, const float *x,
                                      int64_t x_stride, int64_t m, const int R, const float *bias,
                                      int64_t j0, float *y, int64_t y_stride) {
    __m256 acc[CONVERTED_ROWS][GROUP];
    for (int i = 0; i < R; i++)
        for (int r = 0; r < GROUP; r++) acc[i][r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < k; c += 8) {
        __m256 in[CONVERTED_ROWS];
        for (int i = 0; i < R; i++) in[i] = _mm256_loadu_ps(x + (m + i) * x_stride + c);
        for (int r = 0; r < GROUP; r++) {
            __m256 weights = _mm256_loadu_ps(wf + r * k + c);
            for (int i = 0; i < R; i++) acc[i][r] = _mm256_fmadd_ps(weights, in[i], acc[i][r]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int r = 0; r < GROUP; r++)
            y[(m + i) * y_stride + j0 + r] =
                horizontal_sum(acc[i][r]) + (bias ? bias[j0 + r] : 0.0f);
}

static void multiply_few_rows(const Int8Matrix *w, const float *x, int64_t x_stride,
                              int64_t rows, float *y, int64_t y_stride) {
    int64_t blocks = w->k / BLOCK;
    #pragma omp for schedule(static)
    for (int64_t group = 0; group < w->n / GROUP; group++) {
        const int8_t *wg = w->weight + group * GROUP * w->k;
        for (int64_t m = 0; m < rows; m += 2) {
            const float *x0 = x + m * x_stride;
            const float *x1 = m + 1 < rows ? x0 + x_stride : x0; /* an odd last row: twice */
            __m256 acc[2][GROUP];
            for (int r = 0; r < GROUP; r++) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
            for (int64_t b = 0; b < blocks; b++) {
                const int8_t *wb = wg + b * GROUP * BLOCK;
                const float *scales = w->scale + (group * blocks + b) * GROUP;
                for (int c = 0; c < BLOCK; c += 8) {
                    __m256 in0 = _mm256_loadu_ps(x0 + b * BLOCK + c);
                    __m256 in1 = _mm256_loadu_ps(x1 + b * BLOCK + c);
                    for (int r = 0; r < GROUP; r++) {
                        __m256 weights = _mm256_mul_ps(load_weights(wb + r * BLOCK + c),
                                                       _mm256_broadcast_ss(scales + r));
                        acc[0][r] = _mm256_fmadd_ps(weights, in0, acc[0][r]);
                        acc[1][r] = _mm256_fmadd_ps(weights, in1, acc[1][r]);
                    }
                }
            }
            for (int64_t i = 0; i < 2 && m + i < rows; i++)
                for (int r = 0; r < GROUP; r++) {
                    int64_t j = group * GROUP + r;
                    y[(m + i) * y_stride + j] =
                        horizontal_sum(acc[i][r]) + (w->bias ? w->bias[j] : 0.0f);
                }
        }
    }
}

#endif

/* multiply_converted for `count` rows (1..CONVERTED_ROWS), each count a constant the compiler
 * unrolls for. */
static void multiply_converted_rows(const float *wf, int64_t k, const float *x,
                                    int64_t x_stride, int64_t m, int64_t count, const float *bias,
                                    int64_t j0, float *y, int64_t y_stride) {
    switch (count) {
    case 1: multiply_converted(wf, k, x, x_stride, m, 1, bias, j0, y, y_stride); break;
    case 2: multiply_converted(wf, k, x, x_stride, m, 2, bias, j0, y, y_stride); break;
    case 3: multiply_converted(wf, k, x, x_stride, m, 3, bias, j0, y, y_stride); break;
#if CONVERTED_ROWS > 3
    case 4: multiply_converted(wf, k, x, x_stride, m, 4, bias, j0, y, y_stride); break;
    case 5: multiply_converted(wf, k, x, x_stride, m, 5, bias, j0, y, y_stride); break;
    case 6: multiply_converted(wf, k, x, x_stride, m, 6, bias, j0, y, y_stride); break;
#endif
    }
}

/* y[m, j] = x[m] . w[j] + bias[j] for rows x of w->k floats (x_stride apart), rows of y
 * y_stride apart. Shares its output rows among the threads of the enclosing OpenMP region
 * (ends with its barrier). From MANY_ROWS rows on, each group of 4 weight rows is converted to
 * float once, into a buffer of the thread's, and every row multiplies it, CONVERTED_ROWS at a
 * time; fewer rows convert each weight as they read it (a decode step of one request reads the
 * weights once, and memory bandwidth decides its speed). */
#define ROW_CHUNK 48 /* rows multiplied by each converted group in turn: 48 x 1536 floats, 288 KB */
static void multiply(const Int8Matrix *w, const float *x, int64_t x_stride, int64_t rows,
                     float *y, int64_t y_stride) {
    if (rows < MANY_ROWS) {
        multiply_few_rows(w, x, x_stride, rows, y, y_stride);
        return;
    }
    int64_t blocks = w->k / BLOCK;
    /* 64-byte aligned: its loads never straddle two cache lines */
    float *wf = aligned_alloc(64, sizeof(float) * (size_t)(GROUP * w->k));
    if (!wf) abort();
    for (int64_t first = 0; first < rows; first += ROW_CHUNK) { /* its inputs stay in cache */
        int64_t last = first + ROW_CHUNK < rows ? first + ROW_CHUNK : rows;
        #pragma omp for schedule(static)
        for (int64_t group = 0; group < w->n / GROUP; group++) {
            /* the group's weights times their block's scale, as floats (the same bits in
             * both variants) */
            const int8_t *wg = w->weight + group * GROUP * w->k;
            const float *scales = w->scale + group * blocks * GROUP;
            for (int64_t b = 0; b < blocks; b++)
                for (int r = 0; r < GROUP; r++) {
                    __m256 scale = _mm256_broadcast_ss(scales + b * GROUP + r);
                    for (int c = 0; c < BLOCK; c += 8)
                        _mm256_storeu_ps(wf + r * w->k + b * BLOCK + c,
                                         _mm256_mul_ps(load_weights(wg + (b * GROUP + r) * BLOCK + c),
                                                       scale));
                }
            for (int64_t m = first; m < last; m += CONVERTED_ROWS)
                multiply_converted_rows(wf, w->k, x, x_stride, m,
                                        last - m < CONVERTED_ROWS ? last - m : CONVERTED_ROWS,
                                        w->bias, group * GROUP, y, y_stride);
        }
    }
    free(wf);
}

/* transformers' LlamaRMSNorm of one row: weight * (x / sqrt(mean(x^2) + eps)). */
static void rms_norm(const float *x, const float *weight, float eps, int64_t d, float *out) {
    float sum = 0.0f;
    for (int64_t i = 0; i < d; i++) sum += x[i] * x[i];
    float inverse = 1.0f / sqrtf(sum / (float)d + eps);
    for (int64_t i = 0; i < d; i++) out[i] = weight[i] * (x[i] * inverse);
}

/* Rotary embedding of one head in place, transformers' layout (rotate_half: the first half of
 * the dimensions pairs with the second). */
static void rotate(float *head, const float *cos, const float *sin, int64_t head_dim) {
    int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; i++) {
        float first = head[i], second = head[i + half];
        head[i] = first * cos[i] - second * sin[i];
        head[i + half] = second * cos[i + half] + first * sin[i + half];
    }
}

/* y = x w^T + bias for x: rows x k floats, y: rows x n. */
void int8_linear(const float *x, int64_t rows, int64_t k, const int8_t *weight,
                 const float *scale, const float *bias, float *y, int64_t n, int threads) {
    Int8Matrix w = {weight, scale, bias, n, k};
    #pragma omp parallel num_threads(threads)
    multiply(&w, x, k, rows, y, n);
}

/* A Llama decoder layer's weights and shapes (fast_decode.py fills one per layer). */
typedef struct {
    Int8Matrix qkv;     /* query, key and value projections, their rows stacked */
    Int8Matrix output;  /* attention output projection */
    Int8Matrix gate_up; /* gate rows then up rows, inner each */
    Int8Matrix down;
    const float *input_norm, *post_attention_norm;
    float input_eps, post_attention_eps, attention_scale;
    int64_t hidden_size, head_dim, query_heads, kv_heads, inner;
} DecoderLayer;

/* The sums of 8 vectors' lanes as one vector: lane i holds the sum of v[i]'s lanes. */
static inline __m256 lane_sums(const __m256 v[8]) {
    __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
    __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                         _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

/* Rows first..first + count - 1 of head_dim float16 numbers each (from: row 0) as floats, into
 * `to` (row 0 of `to` is row `first`); rows before row 0 become zeros. */
static void to_float(const uint16_t *from, int64_t first, int64_t count, int64_t head_dim,
                     float *to) {
    int64_t skipped = first < 0 ? -first : 0;
    memset(to, 0, sizeof(float) * (size_t)(skipped * head_dim));
    for (int64_t i = skipped * head_dim; i < count * head_dim; i += 8)
        _mm256_storeu_ps(to + i, _mm256_cvtph_ps(
            _mm_loadu_si128((const __m128i *)(from + first * head_dim + i))));
}

/* Room attend needs for its scores: the positions 0..length, rounded up to a multiple of 8. */
static inline int64_t score_room(int64_t length) { return (length + 1 + 7) / 8 * 8; }

/* Softmax attention of the `heads` query heads that share one key/value head (head_dim
 * apart in queries and out), over positions 0..length of its keys and values (float16, as the
 * cache keeps them), skipping the positions whose mask is 0 (mask NULL: none); scores: heads x
 * score_room(length) floats of room; scratch: ATTEND_BLOCK x head_dim floats of room.
 *
 * Positions go by blocks of 8 counted back from the newest (the oldest block starts before
 * position 0, with weight 0 there), so that a position falls in the same lane of a vector
 * however many padding positions come before it: a row left padded in a batch gets the same
 * bits as the row alone. Keys are converted to float a block at a time, into scratch, and the
 * block's 8 scores of each head come out as one vector; each head's output, 64 dimensions at a
 * time, adds up the weighted values in order of position, ATTEND_BLOCK positions converted at a
 * time. */
#define ATTEND_BLOCK 32 /* a multiple of 8 */
static void attend(const float *queries, int64_t heads, const uint16_t *keys,
                   const uint16_t *values, int64_t length, const int64_t *mask, int64_t head_dim,
                   float scale, float *scores, float *out, float *scratch) {
    int64_t positions = length + 1, room = score_room(length), lead = room - positions;
    /* scores[h * room + lead + t]: position t's score, then its weight; the lead ones: none */
    for (int64_t b = 0; b < room; b += 8) {
        to_float(keys, b - lead, 8, head_dim, scratch);
        for (int64_t h = 0; h < heads; h++) {
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t d = 0; d < head_dim; d += 8) {
                __m256 query = _mm256_loadu_ps(queries + h * head_dim + d);
                for (int i = 0; i < 8; i++)
                    acc[i] = _mm256_fmadd_ps(query, _mm256_loadu_ps(scratch + i * head_dim + d),
                                             acc[i]);
            }
            _mm256_storeu_ps(scores + h * room + b,
                             _mm256_mul_ps(lane_sums(acc), _mm256_set1_ps(scale)));
        }
    }
    for (int64_t h = 0; h < heads; h++) {
        float *p = scores + h * room;
        for (int64_t i = 0; i < lead; i++) p[i] = -INFINITY;
        if (mask)
            for (int64_t t = 0; t < positions; t++)
                if (!mask[t]) p[lead + t] = -INFINITY;
        __m256 top = _mm256_set1_ps(-INFINITY), total = _mm256_setzero_ps();
        for (int64_t i = 0; i < room; i += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(p + i));
        top = _mm256_max_ps(top, _mm256_permute2f128_ps(top, top, 1));
        top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, 0x4e));
        top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, 0xb1)); /* in every lane */
        for (int64_t i = 0; i < room; i += 8) { /* masked positions (-inf) weigh exactly 0 */
            __m256 score = _mm256_loadu_ps(p + i);
            __m256 kept = _mm256_cmp_ps(score, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            __m256 weight = _mm256_and_ps(exp8(_mm256_sub_ps(score, top)), kept);
            _mm256_storeu_ps(p + i, weight);
            total = _mm256_add_ps(total, weight);
        }
        __m256 totals = _mm256_set1_ps(horizontal_sum(total));
        for (int64_t i = 0; i < room; i += 8)
            _mm256_storeu_ps(p + i, _mm256_div_ps(_mm256_loadu_ps(p + i), totals));
    }
    for (int64_t t0 = 0; t0 < positions; t0 += ATTEND_BLOCK) {
        int64_t count = positions - t0 < ATTEND_BLOCK ? positions - t0 : ATTEND_BLOCK;
        to_float(values + t0 * head_dim, 0, count, head_dim, scratch);
        for (int64_t h = 0; h < heads; h++) {
            const float *p = scores + h * room + lead + t0;
            for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
                int64_t chunks = head_dim - d0 < 64 ? (head_dim - d0) / 8 : 8;
                float *o = out + h * head_dim + d0;
                __m256 acc[8];
                for (int64_t c = 0; c < chunks; c++)
                    acc[c] = t0 ? _mm256_loadu_ps(o + 8 * c) : _mm256_setzero_ps();
                for (int64_t t = 0; t < count; t++) {
                    if (p[t] == 0.0f) continue; /* masked */
                    __m256 weight = _mm256_set1_ps(p[t]);
                    for (int64_t c = 0; c < chunks; c++)
                        acc[c] = _mm256_fmadd_ps(
                            weight, _mm256_loadu_ps(scratch + t * head_dim + d0 + 8 * c), acc[c]);
                }
                for (int64_t c = 0; c < chunks; c++) _mm256_storeu_ps(o + 8 * c, acc[c]);
            }
        }
    }
}

/* One decoder layer for one new token per row, hidden (rows x hidden_size) updated in place:
 * h = rms_norm(hidden); q, k, v = projections of h, rotary embedding (cos, sin: rows x
 * head_dim) on q and k; row m's k and v written, as float16, at position lengths[m] of its
 * caches keys[m] and values[m] (kv_heads x capacity x head_dim float16 numbers each); once every
 * row's are written (rows may share caches: the tokens of a prompt, each at its position), row
 * m's queries attend over positions 0..lengths[m] of its caches, masked by mask + m *
 * mask_stride (0 = padding) unless mask is NULL; hidden += output(attention);
 * h = rms_norm(hidden); hidden += down(silu(gate(h)) * up(h)). */
static void decoder_layer(const DecoderLayer *layer, float *hidden, int64_t rows,
                          const float *cos, const float *sin, uint16_t *const *keys,
                          uint16_t *const *values, const int64_t *lengths, int64_t capacity,
                          const int64_t *mask, int64_t mask_stride, int threads) {
    int64_t d = layer->hidden_size, head_dim = layer->head_dim, n = layer->qkv.n;
    int64_t query_width = layer->query_heads * head_dim, kv_width = layer->kv_heads * head_dim;
    int64_t group = layer->query_heads / layer->kv_heads, inner = layer->inner, longest = 0;
    for (int64_t m = 0; m < rows; m++) longest = lengths[m] > longest ? lengths[m] : longest;
    int64_t room = group * score_room(longest); /* scores of a task */
    float *normed = checked_malloc(sizeof(float) * (size_t)(rows * d));
    float *qkv = checked_malloc(sizeof(float) * (size_t)(rows * n));
    float *attention = checked_malloc(sizeof(float) * (size_t)(rows * query_width));
    float *scores = checked_malloc(sizeof(float) * (size_t)(rows * layer->kv_heads * room));
    float *update = checked_malloc(sizeof(float) * (size_t)(rows * d));
    float *gate_up = checked_malloc(sizeof(float) * (size_t)(rows * 2 * inner));
    #pragma omp parallel num_threads(threads)
    {
        float *scratch = checked_malloc(sizeof(float) * (size_t)(ATTEND_BLOCK * head_dim));
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < rows; m++)
            rms_norm(hidden + m * d, layer->input_norm, layer->input_eps, d, normed + m * d);
        multiply(&layer->qkv, normed, d, rows, qkv, n);
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < rows * layer->kv_heads; task++) {
            /* a key/value head of a row and the query heads that share it: rotary embedding
             * and the cache write */
            int64_t m = task / layer->kv_heads, head = task % layer->kv_heads;
            const float *row_cos = cos + m * head_dim, *row_sin = sin + m * head_dim;
            float *queries = qkv + m * n + head * group * head_dim;
            float *key = qkv + m * n + query_width + head * head_dim;
            for (int64_t h = 0; h < group; h++)
                rotate(queries + h * head_dim, row_cos, row_sin, head_dim);
            rotate(key, row_cos, row_sin, head_dim);
            int64_t at = (head * capacity + lengths[m]) * head_dim;
            for (int64_t i = 0; i < head_dim; i += 8) {
                _mm_storeu_si128((__m128i *)(keys[m] + at + i),
                                 _mm256_cvtps_ph(_mm256_loadu_ps(key + i),
                                                 _MM_FROUND_TO_NEAREST_INT));
                _mm_storeu_si128((__m128i *)(values[m] + at + i),
                                 _mm256_cvtps_ph(_mm256_loadu_ps(key + kv_width + i),
                                                 _MM_FROUND_TO_NEAREST_INT));
            }
        }
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < rows * layer->kv_heads; task++) {
            int64_t m = task / layer->kv_heads, head = task % layer->kv_heads;
            int64_t cached = head * capacity * head_dim;
            attend(qkv + m * n + head * group * head_dim, group, keys[m] + cached,
                   values[m] + cached, lengths[m], mask ? mask + m * mask_stride : NULL,
                   head_dim, layer->attention_scale, scores + task * room,
                   attention + m * query_width + head * group * head_dim, scratch);
        }
        free(scratch);
        multiply(&layer->output, attention, query_width, rows, update, d);
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < rows; m++) {
            float *h = hidden + m * d;
            for (int64_t i = 0; i < d; i++) h[i] += update[m * d + i];
            rms_norm(h, layer->post_attention_norm, layer->post_attention_eps, d, normed + m * d);
        }
        multiply(&layer->gate_up, normed, d, rows, gate_up, 2 * inner);
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < rows; m++) {
            float *g = gate_up + m * 2 * inner;
            for (int64_t i = 0; i < inner; i += 8) { /* inner: a multiple of 32 */
                __m256 gate = _mm256_loadu_ps(g + i);
                __m256 sigmoid = _mm256_div_ps(_mm256_set1_ps(1.0f),
                    _mm256_add_ps(_mm256_set1_ps(1.0f),
                                  exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate))));
                _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_mul_ps(gate, sigmoid),
                                                      _mm256_loadu_ps(g + inner + i)));
            }
        }
        multiply(&layer->down, gate_up, 2 * inner, rows, update, d);
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < rows; m++)
            for (int64_t i = 0; i < d; i++) hidden[m * d + i] += update[m * d + i];
    }
    free(normed);
    free(qkv);
    free(attention);
    free(scores);
    free(update);
    free(gate_up);
}

/* decoder_layer for a decode step: row m's caches are rows m of key_cache and value_cache (rows x
 * kv_heads x capacity x head_dim float16 numbers), its new token at position `length` of them;
 * mask: rows x (length + 1), 0 = padding, or NULL. */
void int8_decoder_layer(const DecoderLayer *layer, float *hidden, int64_t rows, const float *cos,
                        const float *sin, uint16_t *key_cache, uint16_t *value_cache,
                        int64_t capacity, int64_t length, const int64_t *mask, int threads) {
    uint16_t **keys = checked_malloc(sizeof(uint16_t *) * (size_t)rows);
    uint16_t **values = checked_malloc(sizeof(uint16_t *) * (size_t)rows);
    int64_t *lengths = checked_malloc(sizeof(int64_t) * (size_t)rows);
    for (int64_t m = 0; m < rows; m++) {
        keys[m] = key_cache + m * layer->kv_heads * capacity * layer->head_dim;
        values[m] = value_cache + m * layer->kv_heads * capacity * layer->head_dim;
        lengths[m] = length;
    }
    decoder_layer(layer, hidden, rows, cos, sin, keys, values, lengths, capacity, mask,
                  length + 1, threads);
    free(keys);
    free(values);
    free(lengths);
}

/* decoder_layer for a prefill: the rows are prompts' tokens; keys[t] and values[t] are the
 * caches of token t's prompt (kv_heads x capacity x head_dim float16 numbers, the prompt's
 * reused start already in them), positions[t] its position there. Each token attends to its
 * prompt's positions up to its own. */
void int8_prefill_layer(const DecoderLayer *layer, float *hidden, int64_t tokens,
                        const float *cos, const float *sin, uint16_t *const *keys,
                        uint16_t *const *values, const int64_t *positions, int64_t capacity,
                        int threads) {
    decoder_layer(layer, hidden, tokens, cos, sin, keys, values, positions, capacity, NULL, 0,
                  threads);
}
