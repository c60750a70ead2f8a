/* AVX-512 helpers for the AVX-512 variant of the int8 kernels (int8_kernels.c built with
 * -mavx512f -mavx512bw -mavx512vl -mavx512dq: c_kernels.py). */
#ifndef TUNEPIPE_AVX512_MATH_H
#define TUNEPIPE_AVX512_MATH_H

#include "avx2_math.h"
#include <immintrin.h>
#include <stdint.h>

/* The sum of 16 lanes in a fixed order: the two halves lane by lane, then horizontal_sum's. */
static inline float horizontal_sum16(__m512 v) {
    return horizontal_sum(_mm256_add_ps(_mm512_castps512_ps256(v),
                                        _mm512_extractf32x8_ps(v, 1)));
}

/* 16 int8 weights as floats (exact). */
static inline __m512 load_weights16(const int8_t *w) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
}

#endif
