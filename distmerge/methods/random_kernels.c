/* Kernels of the counter-based random numbers (kernels.h, rng.py) and of DARE's exact L1 statistics. */
#include "kernels.h"

/* out[0, n) = numbers [position, position + n) of stream `key` (rng.uniform_like's numbers). */
HOT_WIDE void uniform_fill(uint64_t key, int64_t position, int64_t n, float *out) {
    for (int64_t start = 0; start < n; start += TILE)
        tile_uniform(key, position + start, n - start < TILE ? n - start : TILE, out + start);
}

/* Exact sums of |x| over all entries and over DARE's survivors (number j of stream `key` < density), written
 * to partials[0][.] and partials[1][.] (int64 [2][PARTIAL_SIZE]) as exact.py's canonical partials: the sum in
 * units of 2^-149 as DIGITS 32-bit digits, least significant first, then the NaN and infinity counts.
 * While summing, units[k][e] counts units 2^(max(e, 1) - 150) for e < EXPONENT_SLOTS (past 255 only as the
 * upper half of a window's sum). An entry of biased exponent e (max(e, 1) for subnormals) is its 24-bit
 * integer mantissa m times that unit, so within a tile whose largest exponent is top, the entries with an
 * exponent in [base, base + WINDOW) = [max(top - WINDOW + 1, 1), top] are integers m << (e - base) < 2^52 in
 * units of base: a branch-free vectorized loop adds them in uint64 (a tile of TILE = 2^11 of them stays below
 * 2^63), masked for the survivors; the two sums go to the slots of base (low 32 bits) and base + 32 (the
 * rest). The rare entries below the window (nonzero and 2^-28 smaller than the tile's largest) are added one
 * by one to their own exponent's slot; a tile holding NaN or infinity is walked one by one. Slots grow by
 * under 2^43 a tile: callers pass at most 2^26 entries (exact.py does). */
#define WINDOW 29
#define EXPONENT_SLOTS (256 + 32)
#define NAN_SLOT EXPONENT_SLOTS
#define INF_SLOT (EXPONENT_SLOTS + 1)
#define DARE_SLOTS (EXPONENT_SLOTS + 2)
#define DIGITS 10 /* exact.DIGITS */
#define PARTIAL_SIZE (DIGITS + 2)

/* The canonical partial of one row of slots: sum units[e] << (max(e, 1) - 1) in 32-bit limbs (each limb takes
 * under 300 additions of < 2^32, then carries propagate), the last digit holding the bits above. A sum of at
 * most 2^26 finite floats stays below 2^154, i.e. 2^303 units: the limbs past DIGITS stay zero. */
static void canonical_partial(const int64_t *units, int64_t *partial) {
    uint64_t limbs[DIGITS + 3] = {0};
    for (int e = 0; e < EXPONENT_SLOTS; e++) {
        if (!units[e]) continue;
        const int shift = (e > 1 ? e : 1) - 1, word = shift / 32;
        const unsigned __int128 v = (unsigned __int128)(uint64_t)units[e] << (shift % 32);
        limbs[word] += (uint32_t)v;
        limbs[word + 1] += (uint32_t)(v >> 32);
        limbs[word + 2] += (uint64_t)(v >> 64);
    }
    uint64_t carry = 0;
    for (int k = 0; k < DIGITS + 3; k++) {
        const uint64_t t = limbs[k] + carry;
        limbs[k] = t & 0xFFFFFFFFu;
        carry = t >> 32;
    }
    for (int k = 0; k < DIGITS - 1; k++) partial[k] = (int64_t)limbs[k];
    partial[DIGITS - 1] = (int64_t)(limbs[DIGITS - 1] | limbs[DIGITS] << 32);
    partial[DIGITS] = units[NAN_SLOT];
    partial[DIGITS + 1] = units[INF_SLOT];
}

static void walk_tile(const uint32_t *bits, const float *u, int64_t len, float density, int64_t base,
                      int64_t *units) {
    for (int64_t i = 0; i < len; i++) {
        const uint32_t a = bits[i] & ABS_MASK;
        const int64_t e = a >> 23, kept = u[i] < density;
        int64_t slot, amount;
        if (e == 255) {
            slot = a > 0x7F800000 ? NAN_SLOT : INF_SLOT;
            amount = 1;
        } else {
            slot = e > 1 ? e : 1;
            amount = (a & 0x7FFFFF) | (e ? 0x800000 : 0);
            if (slot >= base || amount == 0) continue;  /* inside the window: summed by the caller */
        }
        units[slot] += amount;
        if (kept) units[DARE_SLOTS + slot] += amount;
    }
}

/* Adds one tile of entries (their fp32 bit patterns, numbers u) to the slots, as described above. */
static inline __attribute__((always_inline)) void abs_partials_tile(const uint32_t *bits, const float *u,
                                                                    int64_t len, float density, int64_t *units) {
    uint32_t largest = 0;
    for (int64_t i = 0; i < len; i++) {
        uint32_t a = bits[i] & ABS_MASK;
        largest = a > largest ? a : largest;
    }
    const int64_t top = largest >> 23;
    if (top == 255) {  /* NaN or infinity: every entry one by one, none in a window */
        walk_tile(bits, u, len, density, 256, units);
        return;
    }
    const int64_t base = top - WINDOW + 1 > 1 ? top - WINDOW + 1 : 1;
    uint64_t all = 0, kept = 0;
    int32_t below = 0;
    for (int64_t i = 0; i < len; i++) {
        const uint32_t a = bits[i] & ABS_MASK, e = a >> 23;
        const uint32_t m = (a & 0x7FFFFF) | (e ? 0x800000 : 0);
        const int32_t shift = (int32_t)(e > 1 ? e : 1) - (int32_t)base;
        const uint64_t v = shift >= 0 ? (uint64_t)m << (shift & 63) : 0;
        below |= (shift < 0) & (m != 0);
        all += v;
        kept += u[i] < density ? v : 0;
    }
    units[base] += all & 0xFFFFFFFF;
    units[base + 32] += all >> 32;
    units[DARE_SLOTS + base] += kept & 0xFFFFFFFF;
    units[DARE_SLOTS + base + 32] += kept >> 32;
    if (below) walk_tile(bits, u, len, density, base, units);
}

/* x is tau in fp32, or with `base`, the model in bf16 (its tau formed tile by tile, as combine does). */
HOT_WIDE void dare_abs_partials(const void *x, const uint16_t *base, int64_t n, uint64_t key, int64_t position,
                                float density, int64_t *partials) {
    int64_t units[2 * DARE_SLOTS] = {0};
    float u[TILE], tau[TILE];
    for (int64_t start = 0; start < n; start += TILE) {
        const int64_t len = n - start < TILE ? n - start : TILE;
        tile_uniform(key, position + start, len, u);
        const uint32_t *bits = (const uint32_t *)tau_tile(x, base, start, len, tau);
        abs_partials_tile(bits, u, len, density, units);
    }
    canonical_partial(units, partials);
    canonical_partial(units + DARE_SLOTS, partials + PARTIAL_SIZE);
}
