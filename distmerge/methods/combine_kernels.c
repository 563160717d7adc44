/* combine, the merge's fused loop (sparsify each task vector as it is read, then sum or TIES), and RAM's
 * loops; see cpu_kernels.py for the contract and kernels.c for the rules that keep the bits. */
#include "kernels.h"

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
 * formed tile by tile (tau_tile), never stored whole. Each tau is sparsified as `s` says, entry by entry as
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
        if (staged) for (int64_t m = 0; m < models; m++) {
            float *tile = tiles + m * TILE;
            const float *t = (const float *)tau_tile(taus[m], base, start, len, tile);
            if (drop) dare_tile(t, s, m, start, len, tile);
            else if (band) band_tile(t, s, m, len, tile, seen);
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
