/* DELLA's per-row ranks by magnitude and its rank-based drop; see cpu_kernels.py for the contract. */
#include "kernels.h"

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
static int sort_by_buckets(const int32_t *keys, const int32_t *columns, int64_t c, int32_t lowest,
                           int32_t highest, int64_t buckets, int32_t *sorted, int32_t *order, int32_t *start) {
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
    int32_t largest = sorted[0]; /* of the keys placed so far, held in a register: most keys (equal ones in a
                                  * bucket, a bucket's first) stay where they are, and comparing each with the
                                  * key stored just before would chain every step through a store and a load */
    for (int64_t i = 1; i < c; i++) {
        int32_t k = sorted[i];
        if (k >= largest) {
            largest = k;
            continue;
        }
        int32_t column = order[i];
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

/* The compaction of a row: keys[0, c) = the nonzero |bits| with columns[0, c) their columns, zero_columns[0, z)
 * the columns of the zeros, each in column order; sets the smallest and largest key; returns c. Branch-free:
 * a zero and a nonzero are equally likely in places. The arrays hold n + 16 ints (the vector version stores
 * whole vectors past the ends). */
typedef int64_t (*CompactFn)(const int32_t *bits, int64_t n, int32_t *keys, int32_t *columns,
                             int32_t *zero_columns, int32_t *lowest, int32_t *highest);

static int64_t compact_row(const int32_t *bits, int64_t n, int32_t *keys, int32_t *columns, int32_t *zero_columns,
                           int32_t *lowest, int32_t *highest) {
    int64_t c = 0, z = 0;
    int32_t low = ABS_MASK, high = 0;
    for (int64_t j = 0; j < n; j++) {
        const int32_t k = bits[j] & ABS_MASK, is_zero = k == 0;
        keys[c] = k;
        columns[c] = (int32_t)j;
        zero_columns[z] = (int32_t)j;
        c += !is_zero;
        z += is_zero;
        low = is_zero || k > low ? low : k;
        high = k > high ? k : high;
    }
    *lowest = low;
    *highest = high;
    return c;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* compact_row with AVX-512: 16 entries a step, compressed in registers (a compressing store to memory is
 * slow on several CPUs), stored whole. */
__attribute__((target("avx512f"))) static int64_t compact_row_avx512(
        const int32_t *bits, int64_t n, int32_t *keys, int32_t *columns, int32_t *zero_columns, int32_t *lowest,
        int32_t *highest) {
    const __m512i abs_mask = _mm512_set1_epi32(ABS_MASK), step = _mm512_set1_epi32(16);
    __m512i column = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i low = _mm512_set1_epi32(ABS_MASK), high = _mm512_setzero_si512();
    int64_t c = 0, z = 0, j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512i k = _mm512_and_si512(_mm512_loadu_si512(bits + j), abs_mask);
        const __mmask16 nonzero = _mm512_test_epi32_mask(k, k);
        _mm512_storeu_si512(keys + c, _mm512_maskz_compress_epi32(nonzero, k));
        _mm512_storeu_si512(columns + c, _mm512_maskz_compress_epi32(nonzero, column));
        _mm512_storeu_si512(zero_columns + z, _mm512_maskz_compress_epi32((__mmask16)~nonzero, column));
        const int count = __builtin_popcount(nonzero);
        c += count;
        z += 16 - count;
        low = _mm512_mask_min_epi32(low, nonzero, low, k);
        high = _mm512_max_epi32(high, k);
        column = _mm512_add_epi32(column, step);
    }
    int32_t tail_low, tail_high;
    const int64_t tail = compact_row(bits + j, n - j, keys + c, columns + c, zero_columns + z, &tail_low,
                                     &tail_high);
    for (int64_t i = 0; i < tail; i++) columns[c + i] += (int32_t)j;
    for (int64_t i = 0; i < n - j - tail; i++) zero_columns[z + i] += (int32_t)j;
    const int32_t vector_low = _mm512_reduce_min_epi32(low), vector_high = _mm512_reduce_max_epi32(high);
    *lowest = tail_low < vector_low ? tail_low : vector_low;
    *highest = tail_high > vector_high ? tail_high : vector_high;
    return c + tail;
}

/* DISTMERGE_NO_AVX512=1 takes the portable loop (the tests compare the two). */
static CompactFn compaction(void) {
    const char *off = getenv("DISTMERGE_NO_AVX512");
    if (off != NULL && *off != '\0' && *off != '0') return compact_row;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") ? compact_row_avx512 : compact_row;
}
#else
static CompactFn compaction(void) { return compact_row; }
#endif

/* rank_of[j] for one row: zeros first (in column order), then the other keys sorted. `scratch` holds 6 arrays
 * of n + 16 ints and `start` the bucket counts. */
static void rank_row(CompactFn compact, const int32_t *bits, int64_t n, int32_t *scratch, int32_t *start,
                     int32_t *rank_of) {
    const int64_t stride = n + 16;
    int32_t *keys = scratch, *columns = scratch + stride, *sorted = scratch + 2 * stride;
    int32_t *order = scratch + 3 * stride, *zero_columns = scratch + 4 * stride;
    int32_t lowest, highest;
    const int64_t c = compact(bits, n, keys, columns, zero_columns, &lowest, &highest);
    for (int64_t i = 0; i < n - c; i++) rank_of[zero_columns[i]] = (int32_t)i;
    if (c == 0) return;
    int64_t buckets = 16;
    while (buckets < c) buckets *= 2;
    if (sort_by_buckets(keys, columns, c, lowest, highest, buckets, sorted, order, start))
        order = sort_by_radix(keys, columns, c, sorted, order);
    const int32_t zeros = (int32_t)(n - c);
    for (int64_t i = 0; i < c; i++) rank_of[order[i]] = zeros + (int32_t)i;
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

/* Row r of the task vector into `out`: the bf16 model x minus bf16 base (bf16_deltas' bits). */
HOT static void tau_row(const void *x, const uint16_t *base, int64_t start, int64_t n, float *out) {
    bf16_tau_tile(x, base, start, n, out);
}

/* DELLA per row of tau [rows, n]: keep entry j of rank r where its number < keep_prob[r], divided by
 * keep_prob[r]. tau is x itself (fp32), or with `base`, the bf16 model x minus base, formed row by row; the
 * numbers are uniform[r * n + j], or when `uniform` is NULL, number position + r * n + j of stream `key`,
 * drawn row by row. Only the output is stored: no fp32 task vector, no random numbers. Returns -1 when
 * scratch memory is not available. */
int della_rows(const void *x, const uint16_t *base, const float *uniform, uint64_t key, int64_t position,
               const float *keep_prob, int64_t rows, int64_t n, float *out) {
    int64_t buckets = 16;
    while (buckets < n) buckets *= 2;
    const int64_t stride = n + 16, staged = (base != NULL ? n : 0) + (uniform == NULL ? n : 0);
    int32_t *scratch = malloc((6 * (size_t)stride + (size_t)buckets + (size_t)staged) * sizeof(int32_t));
    if (!scratch) return -1;
    int32_t *rank_of = scratch + 5 * stride, *start = scratch + 6 * stride;
    float *tau_staged = (float *)(start + buckets), *drawn = tau_staged + (base != NULL ? n : 0);
    const CompactFn compact = compaction();
    for (int64_t r = 0; r < rows; r++) {
        const float *tau = (const float *)x + r * n, *u = drawn;
        if (base != NULL) {
            tau_row(x, base, r * n, n, tau_staged);
            tau = tau_staged;
        }
        if (uniform != NULL)
            u = uniform + r * n;
        else
            uniform_fill(key, position + r * n, n, drawn);
        /* ranks in column order, then one pass in column order that vectorizes: the keep probabilities are
         * gathered from a small table, the row, the random numbers and the output stream. */
        rank_row(compact, (const int32_t *)tau, n, scratch, start, rank_of);
        keep_by_rank(tau, u, keep_prob, rank_of, n, out + r * n);
    }
    free(scratch);
    return 0;
}
