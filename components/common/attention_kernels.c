/* Causal self-attention of packed rows in float32 on x86 CPUs with AVX2, forward and backward
 * (components/common/fast_attention.py builds this file and calls it).
 *
 * A row holds several examples one after another (their lengths in `lengths`); each token
 * attends to the tokens of its own example up to itself. Queries are [tokens, heads, dim],
 * keys and values [tokens, kv_heads, dim] (heads sharing a key and value: grouped-query
 * attention, head h reads kv head h / (heads / kv_heads)), all contiguous.
 *
 * The work is cut into (example, head, block of QUERY_BLOCK queries); a block's queries see
 * the keys up to its last query, so little of the masked upper triangle is computed. Each
 * block takes a few small matrix products (`gemm`: 6 x 16 register tiles, AVX2 FMA) over a
 * strip of scores it keeps in the thread's scratch (at most QUERY_BLOCK x the example's
 * length), and an exact softmax over it (no online rescaling: a strip holds every key the
 * block sees). Forward: S = scale Q K^T, P = softmax(S) (masked), O = P V, and the log-sum-exp
 * of each row for the backward. Backward: P again from S and the log-sum-exp, dP = dO V^T,
 * dS = P (dP - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO; the key and value
 * gradients of the blocks of one thread add up in its own buffer, summed at the end; the blocks
 * go to the threads in a fixed round robin, so the sums, and a run, repeat exactly.
 *
 * A shared prefix (`prefix` > 0 tokens): the row's first example is a prefix that every other
 * example continues (examples that start with the same tokens, stored once). Its tokens attend
 * causally within it; every other example's tokens attend to all of it, then to their own
 * tokens up to themselves. A block's strip then holds the prefix's keys first, then its own;
 * the prefix's key and value gradients add up over every example that sees it.
 */
#include "avx2_math.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define QUERY_BLOCK 48 /* queries per work item: a multiple of the tile's 6 rows */
#define TILE_ROWS 6
#define TILE_COLS 16

static void *checked_malloc(size_t bytes) {
    void *memory = malloc(bytes ? bytes : 1);
    if (!memory) abort();
    return memory;
}

static inline __m256i tail_mask(int64_t count) { /* the first count (0..8) lanes */
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), lanes);
}

/* C[rows x 16 (or `cols` < 16)] = (accumulate ? C : 0) + alpha A B for `rows` <= 6, where
 * A[i][k] = a[i * a_row + k * a_col] and B is row-major (ldb). `rows` and `full` are constants
 * where this is inlined, so each shape compiles to its own loop. */
static inline __attribute__((always_inline)) void tile(
        const int rows, const int full, int64_t cols, int64_t depth, float alpha,
        const float *a, int64_t a_row, int64_t a_col, const float *b, int64_t ldb,
        float *c, int64_t ldc, int accumulate) {
    __m256 acc[TILE_ROWS][2];
    __m256i mask0 = tail_mask(cols < 8 ? cols : 8), mask1 = tail_mask(cols > 8 ? cols - 8 : 0);
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < depth; k++) {
        const float *b_row = b + k * ldb;
        __m256 b0 = full ? _mm256_loadu_ps(b_row) : _mm256_maskload_ps(b_row, mask0);
        __m256 b1 = full ? _mm256_loadu_ps(b_row + 8) : _mm256_maskload_ps(b_row + 8, mask1);
        const float *a_k = a + k * a_col;
        for (int r = 0; r < rows; r++) {
            __m256 a_value = _mm256_broadcast_ss(a_k + r * a_row);
            acc[r][0] = _mm256_fmadd_ps(a_value, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a_value, b1, acc[r][1]);
        }
    }
    __m256 scale = _mm256_set1_ps(alpha);
    for (int r = 0; r < rows; r++) {
        float *c_row = c + r * ldc;
        __m256 v0 = _mm256_mul_ps(acc[r][0], scale), v1 = _mm256_mul_ps(acc[r][1], scale);
        if (full) {
            if (accumulate) {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(c_row));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(c_row + 8));
            }
            _mm256_storeu_ps(c_row, v0);
            _mm256_storeu_ps(c_row + 8, v1);
        } else {
            if (accumulate) {
                v0 = _mm256_add_ps(v0, _mm256_maskload_ps(c_row, mask0));
                v1 = _mm256_add_ps(v1, _mm256_maskload_ps(c_row + 8, mask1));
            }
            _mm256_maskstore_ps(c_row, mask0, v0);
            _mm256_maskstore_ps(c_row + 8, mask1, v1);
        }
    }
}

#define TILE_CASE(R) case R: \
    if (full) tile(R, 1, cols, depth, alpha, a_tile, a_row, a_col, b_tile, ldb, c_tile, ldc, accumulate); \
    else tile(R, 0, cols, depth, alpha, a_tile, a_row, a_col, b_tile, ldb, c_tile, ldc, accumulate); \
    break;

/* C[m x n] = (accumulate ? C : 0) + alpha A[m x depth] B[depth x n] (A strided as in `tile`). */
static void gemm(int64_t m, int64_t n, int64_t depth, float alpha,
                 const float *a, int64_t a_row, int64_t a_col, const float *b, int64_t ldb,
                 float *c, int64_t ldc, int accumulate) {
    for (int64_t j = 0; j < n; j += TILE_COLS) {
        int64_t cols = n - j < TILE_COLS ? n - j : TILE_COLS;
        int full = cols == TILE_COLS;
        for (int64_t i = 0; i < m; i += TILE_ROWS) {
            int rows = (int)(m - i < TILE_ROWS ? m - i : TILE_ROWS);
            const float *a_tile = a + i * a_row;
            const float *b_tile = b + j;
            float *c_tile = c + i * ldc + j;
            switch (rows) {
                TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
            }
        }
    }
}

/* The transposes of the examples' keys (or values): out[e's offset * kv_heads * dim + (g * dim +
 * d) * length + t] = x[(start + t) * kv_heads * dim + g * dim + d], so that a score strip's
 * product reads a key's dims down a column. */
static void transpose_heads(const float *x, float *out, const int64_t *starts,
                            const int64_t *lengths, int64_t examples, int64_t kv_heads,
                            int64_t dim) {
    #pragma omp for schedule(dynamic) collapse(2)
    for (int64_t e = 0; e < examples; e++)
        for (int64_t g = 0; g < kv_heads; g++) {
            int64_t length = lengths[e], start = starts[e];
            float *o = out + start * kv_heads * dim + g * dim * length;
            for (int64_t t = 0; t < length; t++)
                for (int64_t d = 0; d < dim; d++)
                    o[d * length + t] = x[(start + t) * kv_heads * dim + g * dim + d];
        }
}

typedef struct {
    int64_t example, head, first; /* first query of the block */
    int64_t cost; /* the keys its last query sees */
} WorkItem;

typedef struct {
    int64_t start, length; /* the example's first token in the row, its length */
    int64_t rows; /* the block's queries */
    int64_t keys; /* the example's own keys they see: 0 .. first + rows */
    int64_t shared; /* the shared prefix's keys they see before their own (0: none) */
    int64_t width; /* a row of its strip: shared + keys */
    int64_t kv_head;
} Block;

static inline Block block_of(WorkItem w, const int64_t *starts, const int64_t *lengths,
                             int64_t group, int64_t prefix) {
    Block b = {starts[w.example], lengths[w.example], 0, 0, w.example ? prefix : 0, 0,
               w.head / group};
    b.rows = b.length - w.first < QUERY_BLOCK ? b.length - w.first : QUERY_BLOCK;
    b.keys = w.first + b.rows;
    b.width = b.shared + b.keys;
    return b;
}

/* Every (example, head, query block), the costliest (most keys) first. */
static WorkItem *work_items(const int64_t *lengths, int64_t examples, int64_t heads,
                            int64_t prefix, int64_t *count) {
    int64_t n = 0;
    for (int64_t e = 0; e < examples; e++)
        n += heads * ((lengths[e] + QUERY_BLOCK - 1) / QUERY_BLOCK);
    WorkItem *items = checked_malloc(n * sizeof(WorkItem));
    int64_t i = 0;
    for (int64_t e = 0; e < examples; e++)
        for (int64_t first = 0; first < lengths[e]; first += QUERY_BLOCK)
            for (int64_t h = 0; h < heads; h++)
                items[i++] = (WorkItem){e, h, first, (e ? prefix : 0) + first};
    /* sort by keys seen, descending: dynamic scheduling then balances */
    for (int64_t a = 1; a < n; a++) {
        WorkItem item = items[a];
        int64_t b = a;
        while (b > 0 && items[b - 1].cost < item.cost) { items[b] = items[b - 1]; b--; }
        items[b] = item;
    }
    *count = n;
    return items;
}

/* strip[r][j] = alpha a_r . x_j for a block's `rows` rows a_r (of queries, or of output
 * gradients) and the keys (or values) x_j it sees: the shared prefix's first (from
 * `prefix_transposed`, a column per token of the prefix), then the example's own (from
 * `own_transposed`, a column per token of the example). */
static void block_products(Block b, const float *a, int64_t a_row, const float *prefix_transposed,
                           const float *own_transposed, int64_t dim, float alpha, float *strip) {
    if (b.shared)
        gemm(b.rows, b.shared, dim, alpha, a, a_row, 1, prefix_transposed, b.shared, strip,
             b.width, 0);
    gemm(b.rows, b.keys, dim, alpha, a, a_row, 1, own_transposed, b.length, strip + b.shared,
         b.width, 0);
}

/* out[rows x dim] = (accumulate ? out : 0) + alpha strip x for a block's strip (probabilities,
 * or score gradients) and the rows x_j of the keys (or values) it sees, the shared prefix's
 * first. */
static void block_strip_times(Block b, const float *strip, const float *prefix_rows,
                              const float *own_rows, int64_t kv_row, int64_t dim, float alpha,
                              float *out, int64_t out_row, int accumulate) {
    if (b.shared)
        gemm(b.rows, dim, b.shared, alpha, strip, b.width, 1, prefix_rows, kv_row, out,
             out_row, accumulate);
    gemm(b.rows, dim, b.keys, alpha, strip + b.shared, b.width, 1, own_rows, kv_row, out,
         out_row, accumulate || b.shared);
}

/* d_x[j] += alpha strip^T a for the keys (or values) a block sees, the shared prefix's first:
 * the gradients of keys (from score gradients and queries) or of values (from probabilities
 * and output gradients). */
static void block_strip_transposed_times(Block b, const float *strip, const float *a,
                                         int64_t a_row, int64_t dim, float alpha,
                                         float *d_prefix_rows, float *d_own_rows,
                                         int64_t kv_row) {
    if (b.shared)
        gemm(b.shared, dim, b.rows, alpha, strip, 1, b.width, a, a_row, d_prefix_rows, kv_row, 1);
    gemm(b.keys, dim, b.rows, alpha, strip + b.shared, 1, b.width, a, a_row, d_own_rows, kv_row,
         1);
}

/* Softmax probabilities of a block's scores, in place: row r keeps keys 0..first + r (the
 * others become 0; `first` counts a shared prefix's keys too). With lse (forward) each row's
 * log-sum-exp is written there; with given_lse (backward) the probabilities are
 * exp(score - given_lse[r]). */
static void block_probabilities(float *strip, int64_t rows, int64_t keys, int64_t first,
                                float *lse, int64_t lse_stride, const float *given_lse) {
    for (int64_t r = 0; r < rows; r++) {
        float *s = strip + r * keys;
        int64_t seen = first + r + 1;
        float shift;
        if (given_lse) {
            shift = given_lse[r * lse_stride];
        } else {
            __m256 top = _mm256_set1_ps(-INFINITY);
            int64_t j = 0;
            for (; j + 8 <= seen; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + j));
            float top_value = -INFINITY;
            float lanes[8];
            _mm256_storeu_ps(lanes, top);
            for (int l = 0; l < 8; l++) top_value = lanes[l] > top_value ? lanes[l] : top_value;
            for (; j < seen; j++) top_value = s[j] > top_value ? s[j] : top_value;
            shift = top_value;
        }
        __m256 shift8 = _mm256_set1_ps(shift), total = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= seen; j += 8) {
            __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift8));
            total = _mm256_add_ps(total, p);
            _mm256_storeu_ps(s + j, p);
        }
        if (j < seen) {
            __m256i mask = tail_mask(seen - j);
            __m256 p = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(s + j, mask), shift8)),
                                     _mm256_castsi256_ps(mask));
            total = _mm256_add_ps(total, p);
            _mm256_maskstore_ps(s + j, mask, p);
            j = seen;
        }
        memset(s + seen, 0, (keys - seen) * sizeof(float));
        if (!given_lse) {
            float sum = horizontal_sum(total);
            __m256 inverse = _mm256_set1_ps(1.0f / sum);
            for (int64_t i = 0; i + 8 <= seen; i += 8)
                _mm256_storeu_ps(s + i, _mm256_mul_ps(_mm256_loadu_ps(s + i), inverse));
            for (int64_t i = seen & ~(int64_t)7; i < seen; i++) s[i] /= sum;
            lse[r * lse_stride] = shift + logf(sum);
        }
    }
}

/* Each example's first token in the row (a new array), the row's tokens and its longest
 * example. */
static int64_t *example_starts(const int64_t *lengths, int64_t examples, int64_t *tokens,
                               int64_t *longest) {
    int64_t *starts = checked_malloc(examples * sizeof(int64_t));
    *tokens = *longest = 0;
    for (int64_t e = 0; e < examples; e++) {
        starts[e] = *tokens;
        *tokens += lengths[e];
        *longest = lengths[e] > *longest ? lengths[e] : *longest;
    }
    return starts;
}

/* output = attention(query, key, value) [tokens, heads, dim]; lse [tokens, heads]. */
void causal_attention_forward(const float *query, const float *key, const float *value,
                              const int64_t *lengths, int64_t examples, int64_t prefix,
                              int64_t heads, int64_t kv_heads, int64_t dim, float scale,
                              float *output, float *lse, int threads) {
    int64_t tokens, longest, *starts = example_starts(lengths, examples, &tokens, &longest);
    float *k_transposed = checked_malloc(tokens * kv_heads * dim * sizeof(float));
    int64_t count, group = heads / kv_heads, q_row = heads * dim, kv_row = kv_heads * dim;
    WorkItem *items = work_items(lengths, examples, heads, prefix, &count);
    #pragma omp parallel num_threads(threads)
    {
        transpose_heads(key, k_transposed, starts, lengths, examples, kv_heads, dim);
        float *strip = checked_malloc(QUERY_BLOCK * (prefix + longest) * sizeof(float));
        #pragma omp for schedule(dynamic)
        for (int64_t i = 0; i < count; i++) {
            WorkItem w = items[i];
            Block b = block_of(w, starts, lengths, group, prefix);
            int64_t q_offset = (b.start + w.first) * q_row + w.head * dim;
            block_products(b, query + q_offset, q_row, k_transposed + b.kv_head * dim * prefix,
                           k_transposed + b.start * kv_row + b.kv_head * dim * b.length, dim,
                           scale, strip);
            block_probabilities(strip, b.rows, b.width, b.shared + w.first,
                                lse + (b.start + w.first) * heads + w.head, heads, NULL);
            block_strip_times(b, strip, value + b.kv_head * dim,
                              value + b.start * kv_row + b.kv_head * dim, kv_row, dim, 1.0f,
                              output + q_offset, q_row, 0);
        }
        free(strip);
    }
    free(items);
    free(k_transposed);
    free(starts);
}

/* The gradients of causal_attention_forward's inputs, given its output and lse and the
 * gradient of its output. */
void causal_attention_backward(const float *query, const float *key, const float *value,
                               const float *output, const float *lse, const float *d_output,
                               const int64_t *lengths, int64_t examples, int64_t prefix,
                               int64_t heads, int64_t kv_heads, int64_t dim, float scale,
                               float *d_query, float *d_key, float *d_value, int threads) {
    int64_t tokens, longest, *starts = example_starts(lengths, examples, &tokens, &longest);
    int64_t count, group = heads / kv_heads, q_row = heads * dim, kv_row = kv_heads * dim;
    int64_t kv_size = tokens * kv_row;
    float *k_transposed = checked_malloc(kv_size * sizeof(float));
    float *v_transposed = checked_malloc(kv_size * sizeof(float));
    float *row_dot = checked_malloc(tokens * heads * sizeof(float)); /* rowsum(dO O) */
    if (threads < 1) threads = 1;
    /* each thread's key and value gradients; thread 0 writes d_key and d_value directly */
    float *partial = checked_malloc((size_t)(threads > 1 ? threads - 1 : 0) * 2 * kv_size
                                    * sizeof(float));
    WorkItem *items = work_items(lengths, examples, heads, prefix, &count);
    #pragma omp parallel num_threads(threads)
    {
        int thread = omp_get_thread_num(), team = omp_get_num_threads();
        float *my_d_key = thread ? partial + (thread - 1) * 2 * kv_size : d_key;
        float *my_d_value = thread ? my_d_key + kv_size : d_value;
        memset(my_d_key, 0, kv_size * sizeof(float));
        memset(my_d_value, 0, kv_size * sizeof(float));
        transpose_heads(key, k_transposed, starts, lengths, examples, kv_heads, dim);
        transpose_heads(value, v_transposed, starts, lengths, examples, kv_heads, dim);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens * heads; t++) {
            const float *o = output + t * dim, *d_o = d_output + t * dim;
            __m256 sum = _mm256_setzero_ps();
            int64_t d = 0;
            for (; d + 8 <= dim; d += 8)
                sum = _mm256_fmadd_ps(_mm256_loadu_ps(o + d), _mm256_loadu_ps(d_o + d), sum);
            float total = horizontal_sum(sum);
            for (; d < dim; d++) total += o[d] * d_o[d];
            row_dot[t] = total;
        }
        float *probabilities = checked_malloc(QUERY_BLOCK * (prefix + longest) * sizeof(float));
        float *d_scores = checked_malloc(QUERY_BLOCK * (prefix + longest) * sizeof(float));
        /* round robin over the items (sorted by cost: balanced), the same every call: each
         * thread adds the same items into its gradient buffers in the same order, so the
         * gradients are the same from run to run (a resumed run repeats an uninterrupted one) */
        #pragma omp for schedule(static, 1)
        for (int64_t i = 0; i < count; i++) {
            WorkItem w = items[i];
            Block b = block_of(w, starts, lengths, group, prefix);
            int64_t q_offset = (b.start + w.first) * q_row + w.head * dim;
            int64_t prefix_offset = b.kv_head * dim, kv_offset = b.start * kv_row + prefix_offset;
            int64_t prefix_transposed = b.kv_head * dim * prefix;
            int64_t own_transposed = b.start * kv_row + b.kv_head * dim * b.length;
            const float *q = query + q_offset, *d_o = d_output + q_offset;
            block_products(b, q, q_row, k_transposed + prefix_transposed,
                           k_transposed + own_transposed, dim, scale, probabilities);
            block_probabilities(probabilities, b.rows, b.width, b.shared + w.first, NULL, heads,
                                lse + (b.start + w.first) * heads + w.head);
            /* dP = dO V^T, then dS = P (dP - rowsum(dO O)) */
            block_products(b, d_o, q_row, v_transposed + prefix_transposed,
                           v_transposed + own_transposed, dim, 1.0f, d_scores);
            for (int64_t r = 0; r < b.rows; r++) {
                float dot_value = row_dot[(b.start + w.first + r) * heads + w.head];
                __m256 dot = _mm256_set1_ps(dot_value);
                float *p = probabilities + r * b.width, *ds = d_scores + r * b.width;
                int64_t j = 0;
                for (; j + 8 <= b.width; j += 8)
                    _mm256_storeu_ps(ds + j, _mm256_mul_ps(_mm256_loadu_ps(p + j),
                                     _mm256_sub_ps(_mm256_loadu_ps(ds + j), dot)));
                for (; j < b.width; j++) ds[j] = p[j] * (ds[j] - dot_value);
            }
            block_strip_times(b, d_scores, key + prefix_offset, key + kv_offset, kv_row, dim,
                              scale, d_query + q_offset, q_row, 0);
            block_strip_transposed_times(b, d_scores, q, q_row, dim, scale,
                                         my_d_key + prefix_offset, my_d_key + kv_offset, kv_row);
            block_strip_transposed_times(b, probabilities, d_o, q_row, dim, 1.0f,
                                         my_d_value + prefix_offset, my_d_value + kv_offset,
                                         kv_row);
        }
        free(probabilities);
        free(d_scores);
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int64_t x = 0; x < kv_size; x++)
            for (int t = 1; t < team; t++) {
                d_key[x] += partial[(t - 1) * 2 * kv_size + x];
                d_value[x] += partial[(t - 1) * 2 * kv_size + kv_size + x];
            }
    }
    free(partial);
    free(items);
    free(row_dot);
    free(v_transposed);
    free(k_transposed);
    free(starts);
}
