/* Definitions shared by the kernel sources (kernels.c, combine_kernels.c, della_kernels.c,
 * random_kernels.c): one library is built from them all. */
#ifndef DISTMERGE_KERNELS_H
#define DISTMERGE_KERNELS_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ABS_MASK 0x7FFFFFFF /* clearing the sign bit is torch.abs on an fp32 bit pattern, NaN included */
#define NUM_BINS 65536
#define TILE 2048

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HOT __attribute__((target_clones("avx2", "default")))
/* Loops of 64-bit multiplies (the random numbers): AVX-512 has them as one instruction, AVX2 needs five;
 * ~1.7x faster where the CPU has it. */
#define HOT_WIDE __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define HOT
#define HOT_WIDE
#endif

/* |x| as torch computes it: the sign bit cleared (NaN stays NaN, -0.0 becomes +0.0). */
static inline float fabs_bits(float x) {
    union { float f; uint32_t u; } v = {x};
    v.u &= ABS_MASK;
    return v.f;
}

/* Widening bf16 to fp32 is exact: the bf16 bits are the upper half of the fp32 pattern (NaN and -0.0 kept,
 * as torch's .to(float32)). bf16_delta fuses the widening with the subtraction of theta0 in one pass. */
static inline float bf16_value(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

/* out[0, len) = model[start + i].float() - base[start + i].float(): a tile of a task vector from bf16 inputs,
 * the bits of bf16_deltas' (both widenings exact, one fp32 subtraction). */
static inline __attribute__((always_inline)) void bf16_tau_tile(const void *model, const uint16_t *base,
                                                                int64_t start, int64_t len, float *out) {
    const uint16_t *x = (const uint16_t *)model + start, *b = base + start;
    for (int64_t i = 0; i < len; i++) out[i] = bf16_value(x[i]) - bf16_value(b[i]);
}

/* The entries [start, start + len) of a task vector as fp32 bit patterns: x's own (x is tau in fp32), or with
 * `base` (x is the bf16 model) formed into `staged`. Kernels over one task vector take it this way. */
static inline __attribute__((always_inline)) const int32_t *tau_tile(const void *x, const uint16_t *base,
                                                                     int64_t start, int64_t len, float *staged) {
    if (base == NULL) return (const int32_t *)x + start;
    bf16_tau_tile(x, base, start, len, staged);
    return (const int32_t *)staged;
}

/* Spans of this many entries: a branch-free count over a span, which vectorizes, decides whether to walk it
 * entry by entry. */
#define SCAN 32

/* Zero the entries with |x| == value numbered outside [low, high) among those, in flat order. A branch-free
 * count over each span of SCAN entries, which vectorizes, decides the span: none equal, or all its equal
 * entries numbered inside [low, high), leaves it; all outside zeroes them with a vectorized select; only a
 * span across low or high is walked one entry at a time (the count makes that walk serial). A band edge of a
 * bf16 task vector can have 5% of the entries equal to it: most spans hold one, few straddle. */
static inline __attribute__((always_inline)) int64_t drop_equal_numbered(float *out, const float *x, int64_t n,
                                                                           float value, int64_t low, int64_t high,
                                                                           int64_t seen) {
    for (int64_t start = 0; start < n; start += SCAN) {
        const int64_t end = start + SCAN < n ? start + SCAN : n;
        int32_t count = 0;
        for (int64_t i = start; i < end; i++) count += fabs_bits(x[i]) == value;
        if (!count) continue;
        if (seen + count <= low || seen >= high) {
            for (int64_t i = start; i < end; i++) out[i] = fabs_bits(x[i]) == value ? 0.0f : out[i];
        } else if (seen < low || seen + count > high) {
            int64_t number = seen;
            for (int64_t i = start; i < end; i++) {
                if (fabs_bits(x[i]) == value) {
                    if (number < low || number >= high) out[i] = 0.0f;
                    number++;
                }
            }
        }
        seen += count;
    }
    return seen;  /* the equal entries numbered so far: where the next span's numbering goes on */
}

/* --- counter-based random numbers (see rng.py) ----------------------------------------------------------
 * Number j of the stream with key k: the 64-bit word mix(k + (j / 2 + 1) * GAMMA) (SplitMix64's output
 * function on a Weyl sequence), low 32 bits for even j, high 32 for odd j; the number is (word >> 8) * 2^-24,
 * uniform in [0, 1) with 24 random bits, exactly numpy's float32 construction. Each number depends only on
 * (key, j): no state to jump, and the loop over j vectorizes. */
#define GAMMA 0x9E3779B97F4A7C15ULL

static inline uint64_t splitmix_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* u[0, len) = numbers [position, position + len) of stream `key`; len <= TILE. Two loops over stack buffers,
 * both vectorized: the 64-bit words, then the numbers from their 32-bit halves. */
static inline __attribute__((always_inline)) void tile_uniform(uint64_t key, int64_t position, int64_t len,
                                                               float *u) {
    uint64_t raw[TILE / 2 + 1];
    const int64_t first = position >> 1, skip = position & 1, steps = (len + skip + 1) >> 1;
    for (int64_t q = 0; q < steps; q++) raw[q] = splitmix_mix(key + (uint64_t)(first + q + 1) * GAMMA);
    const uint32_t *words = (const uint32_t *)raw + skip;  /* little-endian: low half first */
    for (int64_t i = 0; i < len; i++) u[i] = (float)(int32_t)(words[i] >> 8) * 0x1p-24f;
}

/* random_kernels.c: out[0, n) = numbers [position, position + n) of stream `key`. */
void uniform_fill(uint64_t key, int64_t position, int64_t n, float *out);

#endif
