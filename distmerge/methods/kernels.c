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
#define SCAN 32
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

HOT void drop_equal_outside(float *out, const float *x, int64_t n, float value, int64_t low, int64_t high) {
    drop_equal_numbered(out, x, n, value, low, high, 0);
}

/* keep_at_least's value of one entry: itself where |v| >= threshold, else +0.0 (NaN is dropped). */
static inline float trim_entry(float v, int trim, float threshold) {
    return trim && !(fabs_bits(v) >= threshold) ? 0.0f : v;
}

/* How combine sparsifies each tau as it reads it: nothing, TIES's trim, DARE's random drop or the breadcrumbs
 * band. */
typedef struct {
    const float *thresholds; /* trim: keep_at_least(tau_m, thresholds[m]); NULL: no trim */
    const uint64_t *keys;    /* DARE: stream keys[m] decides the drop (uniform < density); NULL: no drop */
    int64_t position;        /* flat index of entry 0 in the whole tensor: where the streams start */
    float density;
    const float *factors;    /* survivors * factors[m], or / factors[m] when divide (inverse_p: the density) */
    int divide;
    /* band: keep band[2m + 1] <= |tau_m| <= band[2m] (NULL: no band); then of the entries whose |tau_m| is
     * edges[2m + e] (NaN: none), those numbered outside ranges[4m + 2e], ranges[4m + 2e + 1]) in flat order
     * are dropped (sparsify.breadcrumbs_band's tie-breaking, by drop_equal_numbered). */
    const float *band;
    const float *edges;
    const int64_t *ranges;
} Sparsify;

/* The band's value of one tile of tau_m in `out` (which may be t itself); seen[2m + e] counts the entries
 * equal to each edge so far. */
static inline void band_tile(const float *t, const Sparsify *s, int64_t m, int64_t len, float *out, int64_t *seen) {
    const float top = s->band[2 * m], bottom = s->band[2 * m + 1];
    for (int64_t i = 0; i < len; i++) {
        float v = t[i], a = fabs_bits(v);
        out[i] = (a <= top && a >= bottom) ? v : 0.0f;
    }
    for (int e = 0; e < 2; e++) {
        const float value = s->edges[2 * m + e];
        const int64_t *range = s->ranges + 4 * m + 2 * e;
        /* An edge is kept whole by the band, so `out` still holds its entries: the numbering reads it. */
        if (value == value) seen[2 * m + e] = drop_equal_numbered(out, out, len, value, range[0], range[1], seen[2 * m + e]);
    }
}

/* DARE's value of one tile of tau_m in `out`: sparsify.dare_drop's bits ((u < d ? x : +0.0) * f or / f). */
static inline void dare_tile(const float *t, const Sparsify *s, int64_t m, int64_t start, int64_t len,
                             float *out) {
    float u[TILE];
    tile_uniform(s->keys[m], s->position + start, len, u);
    const float f = s->factors[m], d = s->density;
    if (s->divide) for (int64_t i = 0; i < len; i++) { float v = t[i]; out[i] = (u[i] < d ? v : 0.0f) / f; }
    else for (int64_t i = 0; i < len; i++) { float v = t[i]; out[i] = (u[i] < d ? v : 0.0f) * f; }
}

/* consensus.combine(...) * scale: weighted sum ('sum') or TIES sign election + disjoint mean ('ties').
 * The first model is always multiplied by its weight (as weighted_sum does); later ones only when their
 * weight is not 1 (unit[m] == 0). taus[m] is tau_m in fp32, or with `base`, model m in bf16: its tau is then
 * formed tile by tile (bf16_tau_tile), never stored whole. Each tau is sparsified as `s` says, entry by entry as
 * it is read (a DARE or band tile once, into `tiles`): the bits of combining the sparsified tensors
 * (keep_at_least's, dare's, the band's) without writing and reading them back. Returns 1 when the tiles find
 * no memory, else 0. */
HOT_WIDE int combine(const void *const *taus, const uint16_t *base, int64_t models, const float *weights,
                     const uint8_t *unit, const Sparsify *s, int ties, float scale, int64_t n, float *out) {
    const int trim = s->thresholds != NULL, drop = s->keys != NULL, band = s->band != NULL;
    const int staged = drop || band || base != NULL;
    float total[TILE], denominator[TILE];
    float *tiles = staged ? malloc(sizeof(float) * TILE * models) : NULL;
    int64_t *seen = band ? calloc(2 * models, sizeof(int64_t)) : NULL;
    if ((staged && tiles == NULL) || (band && seen == NULL)) {
        free(tiles);
        return 1;
    }
    float min_weight = weights[0];
    for (int64_t m = 1; m < models; m++) min_weight = weights[m] < min_weight ? weights[m] : min_weight;
    for (int64_t start = 0; start < n; start += TILE) {
        int64_t len = n - start < TILE ? n - start : TILE;
        if (base != NULL) for (int64_t m = 0; m < models; m++) bf16_tau_tile(taus[m], base, start, len, tiles + m * TILE);
        if (drop || band) for (int64_t m = 0; m < models; m++) {
            const float *t = base != NULL ? tiles + m * TILE : (const float *)taus[m] + start;
            if (drop) dare_tile(t, s, m, start, len, tiles + m * TILE);
            else band_tile(t, s, m, len, tiles + m * TILE, seen);
        }
#define TAU(m) (staged ? tiles + (m) * TILE : (const float *)taus[m] + start)
        const float *first = TAU(0);
        const float th0 = trim ? s->thresholds[0] : 0.0f;
        for (int64_t i = 0; i < len; i++) total[i] = trim_entry(first[i], trim, th0) * weights[0];
        for (int64_t m = 1; m < models; m++) {
            const float *t = TAU(m);
            float w = weights[m], th = trim ? s->thresholds[m] : 0.0f;
            if (unit[m]) for (int64_t i = 0; i < len; i++) total[i] += trim_entry(t[i], trim, th);
            else for (int64_t i = 0; i < len; i++) total[i] += trim_entry(t[i], trim, th) * w;
        }
        float *o = out + start;
        if (!ties) {
            for (int64_t i = 0; i < len; i++) o[i] = total[i] * scale;
            continue;
        }
        for (int64_t i = 0; i < len; i++)  /* torch.sign: 0 for 0, -0.0 and NaN */
            total[i] = (0.0f < total[i] ? 1.0f : 0.0f) - (total[i] < 0.0f ? 1.0f : 0.0f);
        for (int64_t m = 0; m < models; m++) {
            const float *t = TAU(m);
            float w = weights[m], count = unit[m] ? 1.0f : w, th = trim ? s->thresholds[m] : 0.0f;
            int u = unit[m];
            for (int64_t i = 0; i < len; i++) {
                float v = trim_entry(t[i], trim, th);
                int agree = v * total[i] > 0.0f;
                float part = agree ? (u ? v : v * w) : 0.0f;
                float counted = agree ? count : 0.0f;
                o[i] = m == 0 ? part : o[i] + part;
                denominator[i] = m == 0 ? counted : denominator[i] + counted;
            }
        }
#undef TAU
        if (min_weight > 0.0f) {
            for (int64_t i = 0; i < len; i++)
                o[i] = o[i] / (denominator[i] > min_weight ? denominator[i] : min_weight) * scale;
        } else {
            for (int64_t i = 0; i < len; i++)
                o[i] = (denominator[i] == 0.0f ? 0.0f : o[i] / denominator[i]) * scale;
        }
    }
    free(tiles);
    free(seen);
    return 0;
}

/* RAM: w_i tau_i (tau_i when w_i is 1) is active where its |.| > epsilon; count = active models per entry. */
static inline float weighted(const float *t, int64_t i, float w, int u) { return u ? t[i] : t[i] * w; }

static void active_counts(const float *const *taus, int64_t models, const float *weights,
                          const uint8_t *unit, float epsilon, int64_t start, int64_t len, int32_t *count) {
    for (int64_t m = 0; m < models; m++) {
        const float *t = taus[m] + start;
        float w = weights[m];
        int u = unit[m];
        for (int64_t i = 0; i < len; i++) {
            int32_t active = fabs_bits(weighted(t, i, w, u)) > epsilon;
            count[i] = m == 0 ? active : count[i] + active;
        }
    }
}

HOT void ram_overlap_counts(const float *const *taus, int64_t models, const float *weights,
                            const uint8_t *unit, float epsilon, int64_t n, int64_t *shared, int64_t *unique) {
    int32_t count[TILE];
    for (int64_t start = 0; start < n; start += TILE) {
        int64_t len = n - start < TILE ? n - start : TILE;
        active_counts(taus, models, weights, unit, epsilon, start, len, count);
        for (int64_t m = 0; m < models; m++) {
            const float *t = taus[m] + start;
            float w = weights[m];
            int u = unit[m];
            int64_t s = 0, q = 0;
            for (int64_t i = 0; i < len; i++) {
                int active = fabs_bits(weighted(t, i, w, u)) > epsilon;
                s += active && count[i] >= 2;
                q += active && count[i] == 1;
            }
            shared[m] += s;
            unique[m] += q;
        }
    }
}

/* ram.ram_combine: shared entries (count >= 2) the mean of the active ones, unique entries scales[m] times
 * the active one, inactive entries 0. */
HOT void ram_combine(const float *const *taus, int64_t models, const float *weights, const uint8_t *unit,
                     float epsilon, const float *scales, int64_t n, float *out) {
    int32_t count[TILE];
    float scaled_sum[TILE];
    for (int64_t start = 0; start < n; start += TILE) {
        int64_t len = n - start < TILE ? n - start : TILE;
        float *active_sum = out + start;
        active_counts(taus, models, weights, unit, epsilon, start, len, count);
        for (int64_t i = 0; i < len; i++) active_sum[i] = scaled_sum[i] = 0.0f;
        for (int64_t m = 0; m < models; m++) {
            const float *t = taus[m] + start;
            float w = weights[m], s = scales[m];
            int u = unit[m], scale_unit = s == 1.0f;
            for (int64_t i = 0; i < len; i++) {
                float x = weighted(t, i, w, u);
                float active = fabs_bits(x) > epsilon ? x : 0.0f;
                active_sum[i] += active;
                scaled_sum[i] += scale_unit ? active : active * s;
            }
        }
        for (int64_t i = 0; i < len; i++) {
            float shared_mean = active_sum[i] / (float)(count[i] > 1 ? count[i] : 1);
            active_sum[i] = count[i] >= 2 ? shared_mean : (count[i] == 1 ? scaled_sum[i] : 0.0f);
        }
    }
}

/* DELLA needs each entry's rank by |tau| within its row, ascending, equal magnitudes by column: the order of
 * (31-bit magnitude pattern, column). Zeros (most of a sparse RL vector) rank first, in column order: one
 * branch-free pass gives them their ranks and compacts the other keys with their columns, so only those are
 * sorted (counting every zero into one bucket would chain each increment on the last through memory).
 *
 * sort_by_buckets sorts the c compacted keys in a few passes: keys fall into ~c buckets by
 * (key - smallest) >> shift, a histogram gives each bucket its slots, keys are scattered there in column order
 * and one insertion sort over all of them orders each bucket (keys never move across buckets: every bucket's
 * keys exceed the previous one's; equal keys never swap, so they stay in column order). Returns 0 with
 * order[i] = column of the i-th smallest, or 1 once the insertion sort has moved keys MOVE_BUDGET times per
 * entry (a row whose spread is dominated by outliers crowds many distinct keys into few buckets, where
 * insertion sort goes quadratic): the caller then sorts by radix. Equal keys (bf16 deltas repeat magnitudes)
 * crowd buckets too, but cost no moves. */
#define MOVE_BUDGET 8
static int sort_by_buckets(const int32_t *keys, const int32_t *columns, int64_t c, int64_t buckets,
                           int32_t *sorted, int32_t *order, int32_t *start) {
    int32_t lowest = ABS_MASK, highest = 0;
    for (int64_t i = 0; i < c; i++) {
        int32_t k = keys[i];
        lowest = k < lowest ? k : lowest;
        highest = k > highest ? k : highest;
    }
    int shift = 0;
    while (((uint32_t)(highest - lowest) >> shift) > (uint32_t)(buckets - 1)) shift++;
    memset(start, 0, (size_t)buckets * sizeof(int32_t));
    for (int64_t i = 0; i < c; i++) start[(keys[i] - lowest) >> shift]++;
    int32_t position = 0;
    for (int64_t b = 0; b < buckets; b++) {
        int32_t count = start[b];
        start[b] = position;
        position += count;
    }
    for (int64_t i = 0; i < c; i++) {
        int32_t slot = start[(keys[i] - lowest) >> shift]++;
        sorted[slot] = keys[i];
        order[slot] = columns[i];
    }
    int64_t moves_left = MOVE_BUDGET * c;
    for (int64_t i = 1; i < c; i++) {
        int32_t k = sorted[i], column = order[i];
        int64_t m = i;
        for (; m > 0 && sorted[m - 1] > k; m--) {
            sorted[m] = sorted[m - 1];
            order[m] = order[m - 1];
        }
        sorted[m] = k;
        order[m] = column;
        moves_left -= i - m;
        if (moves_left < 0) return 1;
    }
    return 0;
}

/* The same order by a stable LSD radix sort of the c keys (with their columns, in column order), 8 bits a
 * pass (all four digit histograms from one counting pass, in four interleaved copies so that runs of equal
 * digits do not serialize on one counter). Sorts in place, ping-ponging with the *_next buffers; returns the
 * buffer holding order[i] = column of the i-th smallest. */
static int32_t *sort_by_radix(int32_t *keys, int32_t *order, int64_t c, int32_t *keys_next, int32_t *order_next) {
    int32_t counts[4][4][256]; /* [copy][digit position][digit] */
    int64_t offsets[256];
    memset(counts, 0, sizeof counts);
    for (int64_t i = 0; i < c; i++) {
        int32_t k = keys[i];
        int copy = (int)(i & 3);
        counts[copy][0][k & 255]++;
        counts[copy][1][(k >> 8) & 255]++;
        counts[copy][2][(k >> 16) & 255]++;
        counts[copy][3][(k >> 24) & 255]++;
    }
    for (int pass = 0; pass < 4; pass++) {
        int64_t position = 0;
        int moves = 1;
        for (int d = 0; d < 256; d++) {
            int64_t n = (int64_t)counts[0][pass][d] + counts[1][pass][d] + counts[2][pass][d] + counts[3][pass][d];
            if (n == c) moves = 0; /* every key has this digit: the pass would move nothing */
            offsets[d] = position;
            position += n;
        }
        if (!moves) continue;
        int shift = 8 * pass;
        for (int64_t i = 0; i < c; i++) {
            int64_t slot = offsets[(keys[i] >> shift) & 255]++;
            keys_next[slot] = keys[i];
            order_next[slot] = order[i];
        }
        int32_t *swap = keys; keys = keys_next; keys_next = swap;
        swap = order; order = order_next; order_next = swap;
    }
    return order;
}

/* rank_of[j] for one row: zeros first (in column order), then the other keys sorted. `scratch` holds 5n ints
 * and `start` the bucket counts. */
static void rank_row(const int32_t *bits, int64_t n, int32_t *scratch, int32_t *start, int32_t *rank_of) {
    int32_t *keys = scratch, *columns = scratch + n, *sorted = scratch + 2 * n, *order = scratch + 3 * n;
    int32_t zeros = 0, c = 0;
    for (int64_t j = 0; j < n; j++) { /* branch-free: a zero and a nonzero are equally likely in places */
        int32_t k = bits[j] & ABS_MASK, is_zero = k == 0;
        rank_of[j] = zeros; /* kept for zeros only: the nonzero ranks below overwrite the others */
        zeros += is_zero;
        keys[c] = k;
        columns[c] = (int32_t)j;
        c += !is_zero;
    }
    if (c == 0) return;
    int64_t buckets = 16;
    while (buckets < c) buckets *= 2;
    if (sort_by_buckets(keys, columns, c, buckets, sorted, order, start))
        order = sort_by_radix(keys, columns, c, sorted, order);
    for (int32_t i = 0; i < c; i++) rank_of[order[i]] = zeros + i;
}

/* out[j] = tau[j] / p where uniform[j] < p, else +0.0 (a bit mask: a coin flip as a branch mispredicts every
 * other entry), with p = keep_prob[rank_of[j]]. */
HOT static void keep_by_rank(const float *tau, const float *uniform, const float *keep_prob,
                             const int32_t *rank_of, int64_t n, float *out) {
    uint32_t *out_bits = (uint32_t *)out;
    for (int64_t j = 0; j < n; j++) {
        float p = keep_prob[rank_of[j]], kept = tau[j] / p;
        uint32_t mask = 0u - (uint32_t)(uniform[j] < p), kept_bits;
        memcpy(&kept_bits, &kept, sizeof kept_bits);
        out_bits[j] = kept_bits & mask;
    }
}

/* DELLA per row of tau [rows, n]: keep entry j of rank r where uniform < keep_prob[r], divided by
 * keep_prob[r]. Returns -1 when scratch memory is not available. */
int della_rows(const float *tau, const float *uniform, const float *keep_prob, int64_t rows, int64_t n,
               float *out) {
    int64_t buckets = 16;
    while (buckets < n) buckets *= 2;
    int32_t *scratch = malloc((5 * (size_t)n + (size_t)buckets) * sizeof(int32_t));
    if (!scratch) return -1;
    int32_t *rank_of = scratch + 4 * n, *start = scratch + 5 * n;
    for (int64_t r = 0; r < rows; r++) {
        /* ranks in column order, then one pass in column order that vectorizes: the keep probabilities are
         * gathered from a small table, the row, the random numbers and the output stream. */
        rank_row((const int32_t *)(tau + r * n), n, scratch, start, rank_of);
        keep_by_rank(tau + r * n, uniform + r * n, keep_prob, rank_of, n, out + r * n);
    }
    free(scratch);
    return 0;
}
