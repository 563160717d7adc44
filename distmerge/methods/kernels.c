/* Fused CPU loops of the merge methods; see cpu_kernels.py for the contract (the torch path's bits).
 *
 * Every function mirrors a torch computation operation by operation in float32: build with
 * -ffp-contract=off (a fused multiply-add rounds once where torch rounds twice) and never -ffast-math.
 * Loops are simple so the compiler vectorizes them; multi-model loops run tile by tile, each step one loop
 * over a tile that stays in L1. Dropped entries are +0.0, as torch's masked selection gives.
 */
#include "kernels.h"

HOT void bf16_delta(const uint16_t *x, const float *theta0, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = bf16_value(x[i]) - theta0[i];
}

/* The executor's inputs from bf16 tensors in one pass: theta0 = base.float() and, per model,
 * taus[m] = models[m].float() - theta0, tile by tile so theta0 is read back from L1 instead of memory. */
HOT void bf16_deltas(const uint16_t *base, const uint16_t *const *models, int64_t count, int64_t n,
                     float *theta0, float *const *taus) {
    for (int64_t start = 0; start < n; start += TILE) {
        const int64_t len = n - start < TILE ? n - start : TILE;
        const uint16_t *b = base + start;
        float *t0 = theta0 + start;
        for (int64_t i = 0; i < len; i++) t0[i] = bf16_value(b[i]);
        for (int64_t m = 0; m < count; m++) {
            const uint16_t *x = models[m] + start;
            float *out = taus[m] + start;
            for (int64_t i = 0; i < len; i++) out[i] = bf16_value(x[i]) - t0[i];
        }
    }
}

/* (delta + target).to(bfloat16) as torch computes it: the fp32 sum rounded to nearest even (overflow to
 * infinity, subnormals kept), NaN as 0xFFFF (torch's vector conversion). The executor's last step: one pass
 * instead of an add and a conversion over the merged tensor. */
static inline uint16_t round_bf16(float x) {
    union { float f; uint32_t u; } v = {x};
    uint16_t rounded = (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
    return v.f != v.f ? 0xFFFF : rounded;
}

HOT void add_to_bf16(const float *delta, const float *target, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = round_bf16(delta[i] + target[i]);
}

/* add_to_bf16 with a bf16 target, widened as it is read: the same bits as with target.float(). */
HOT void add_to_bf16_target(const float *delta, const uint16_t *target, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = round_bf16(delta[i] + bf16_value(target[i]));
}

/* Adds to `histogram` (65536) the counts of the upper 16 bits of |tau| (x and base as tau_tile takes them).
 * Zeros (most of a sparse RL vector) would chain every increment of bin 0 on the previous one through memory
 * (~2x slower). When the first tile is mostly zeros, a loop counts zeros in a register behind a branch (well
 * predicted there; on dense input the branch-free loop is faster). */
HOT void high_histogram(const void *x, const uint16_t *base, int64_t n, int64_t *histogram) {
    float staged[TILE];
    int64_t zeros = 0;
    int sparse = -1;
    for (int64_t start = 0; start < n; start += TILE) {
        const int64_t len = n - start < TILE ? n - start : TILE;
        const int32_t *bits = tau_tile(x, base, start, len, staged);
        if (sparse < 0) {
            int64_t first_zeros = 0;
            for (int64_t i = 0; i < len; i++) first_zeros += (bits[i] & ABS_MASK) == 0;
            sparse = 2 * first_zeros >= len;
        }
        if (!sparse) {
            for (int64_t i = 0; i < len; i++) histogram[(bits[i] & ABS_MASK) >> 16]++;
            continue;
        }
        for (int64_t i = 0; i < len; i++) {
            int32_t bin = (bits[i] & ABS_MASK) >> 16;
            if (bin) histogram[bin]++;
            else zeros++;
        }
    }
    histogram[0] += zeros;
}

/* Low-pass histograms of `nb` high bins (1 or 2, a constant once inlined) in one pass over the entries:
 * in_bins[r * NUM_BINS + low] counts the entries of bin r by their low 16 bits, and above[r] those above bin r
 * as radix._bin_histogram counts them (it compares bit patterns relative to the bin's start in int32, so with
 * bin 0 the pattern 0x7FFFFFFF, a NaN, wraps around and counts as below). Few entries fall in a given bin
 * (under 1% of a task vector), so a branch-free scan of SCAN entries, which vectorizes, counts those above each
 * bin and those at a bin's start (low bits 0: every zero of a sparse vector for bin 0, which one by one would
 * chain increments of one counter through memory), and tests for any other in a bin; only spans holding one
 * are walked entry by entry: 0.95-1.4 -> 0.3 ns/entry. Equal bins each get the whole histogram. */
static inline __attribute__((always_inline)) int bins_scan(const int32_t *bits, int64_t count, const int32_t *bins,
                                                           int nb, int64_t *above, int64_t *starts, int64_t *wrapped) {
    int any = 0, ones = 0;
    for (int r = 0; r < nb; r++) {
        const int32_t bin = bins[r], bin_start = bins[r] << 16;
        int32_t over = 0, at_start = 0;
        for (int64_t i = 0; i < count; i++) {
            int32_t m = bits[i] & ABS_MASK;
            over += (m >> 16) > bin;
            at_start += m == bin_start;
            any |= ((m >> 16) == bin) & (m != bin_start);
        }
        above[r] += over;
        starts[r] += at_start;
    }
    for (int64_t i = 0; i < count; i++) ones += (bits[i] & ABS_MASK) == ABS_MASK;
    *wrapped += ones;
    return any;
}

static inline __attribute__((always_inline)) void bins_walk(const int32_t *bits, int64_t count, const int32_t *bins,
                                                            int nb, int64_t *in_bins) {
    for (int64_t i = 0; i < count; i++) {
        int32_t m = bits[i] & ABS_MASK;
        for (int r = 0; r < nb; r++)
            if ((m >> 16) == bins[r] && (m & 0xFFFF)) in_bins[r * NUM_BINS + (m & 0xFFFF)]++;
    }
}

static inline __attribute__((always_inline)) void bins_histogram(const void *x, const uint16_t *base, int64_t n,
                                                                 const int32_t *bins, int nb, int64_t *in_bins,
                                                                 int64_t *above) {
    int64_t over[2] = {0, 0}, starts[2] = {0, 0}, wrapped = 0;
    float staged[TILE];
    for (int64_t start = 0; start < n; start += TILE) {
        const int64_t len = n - start < TILE ? n - start : TILE;
        const int32_t *bits = tau_tile(x, base, start, len, staged);
        for (int64_t span = 0; span < len; span += SCAN) {
            const int64_t count = len - span < SCAN ? len - span : SCAN;
            if (bins_scan(bits + span, count, bins, nb, over, starts, &wrapped))
                bins_walk(bits + span, count, bins, nb, in_bins);
        }
    }
    for (int r = 0; r < nb; r++) {
        in_bins[r * NUM_BINS] += starts[r];
        above[r] = over[r] - (bins[r] == 0 ? wrapped : 0);
    }
}

/* Adds to `in_bin` (65536) the histogram of the low 16 bits of the entries whose upper 16 bits are high_bin
 * and returns how many entries lie above that bin (see bins_histogram). */
HOT int64_t bin_histogram(const void *x, const uint16_t *base, int64_t n, int64_t high_bin, int64_t *in_bin) {
    const int32_t bins[1] = {(int32_t)high_bin};
    int64_t above[1];
    bins_histogram(x, base, n, bins, 1, in_bin, above);
    return above[0];
}

/* bin_histogram for two bins in one pass over the entries (two order statistics of one tensor, such as
 * breadcrumbs' band edges): `in_bins` holds the two histograms one after the other; the two counts are added
 * to `above`. */
HOT void bin_histogram_pair(const void *x, const uint16_t *base, int64_t n, int64_t bin_a, int64_t bin_b,
                            int64_t *in_bins, int64_t *above) {
    const int32_t bins[2] = {(int32_t)bin_a, (int32_t)bin_b};
    int64_t counts[2];
    bins_histogram(x, base, n, bins, 2, in_bins, counts);
    above[0] += counts[0];
    above[1] += counts[1];
}

HOT void keep_at_least(const float *x, int64_t n, float threshold, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = fabs_bits(x[i]) >= threshold ? x[i] : 0.0f;
}

HOT void keep_band(const float *x, int64_t n, float top, float bottom, float *out) {
    for (int64_t i = 0; i < n; i++) {
        float m = fabs_bits(x[i]);
        out[i] = (m <= top && m >= bottom) ? x[i] : 0.0f;
    }
}

HOT void count_equal_magnitudes(const void *x, const uint16_t *base, int64_t n, float first, float second,
                                int64_t *counts) {
    float staged[TILE];
    int64_t a = 0, b = 0;
    for (int64_t start = 0; start < n; start += TILE) {
        const int64_t len = n - start < TILE ? n - start : TILE;
        const int32_t *bits = tau_tile(x, base, start, len, staged);
        for (int64_t i = 0; i < len; i++) {
            union { int32_t i; float f; } m = {bits[i] & ABS_MASK};
            a += m.f == first;
            b += m.f == second;
        }
    }
    counts[0] = a;
    counts[1] = b;
}

/* drop_equal_numbered (kernels.h) over a whole tensor. */
HOT void drop_equal_outside(float *out, const float *x, int64_t n, float value, int64_t low, int64_t high) {
    drop_equal_numbered(out, x, n, value, low, high, 0);
}
