/* Bi-WKV4 (Vision-RWKV Eq. 5) on the CPU: exact, O(T), forward and analytic backward.
 *
 *   l(t,i) = k_i - (|t-i| - 1) w  (i != t),   l(t,t) = u + k_t,   y_t = sum_i softmax_i(l(t,.)) v_i
 *
 * Layout: k, v, y, gy, gk, gv are (B, T, C) contiguous; w, u are (C,). One task is one batch
 * row b and a block of CB adjacent channels; it walks all T tokens in chunks of L, the inner
 * loops running over the CB channels (contiguous in memory, so they vectorise). Tasks are
 * spread over pthreads by a fixed rule, and nothing is reduced across tasks except gw/gu, which
 * are summed over b afterwards in a fixed order: results are bitwise independent of the number
 * of threads.
 *
 * Numerics (the anchoring of reference.biwkv4_scan, with its own task layout and carries):
 * - inside a chunk, exponentials are anchored at a per-chunk, per-channel unit U_n =
 *   max(max_j k_j + max(u, 0), left carry's anchor, right carry's anchor); every local term
 *   e^{k_j - U_n} is <= 1 and the decay across a chunk is bounded (L |w| <= BUDGET), so the
 *   in-chunk recurrences S <- e^{-w} S + X run in the compute type without overflow, and the
 *   denominator of every position stays within e^{+-2 BUDGET} of 1 (never 0/0);
 * - the carries between chunks are float64 (value, anchor) pairs combined with e^{-L w}
 *   computed in float64, so the float32 rounding does not accumulate with T;
 * - the right-hand sums are their own scans, never a total minus a prefix;
 * - the backward uses q = gy / D, r = gy y / D (D the full denominator) scanned the same way,
 *   in a per-chunk unit V_n = max(left carry anchor, right carry anchor, -U_n), plus
 *   distance-weighted scans for gw; no EPS anywhere.
 *
 * Compiled at first use by kernels_cpu/_build.py (cc -O3 -march=native, no -ffast-math: the
 * vectoriser may not reorder a channel's arithmetic).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CB 16              /* channels per task: one 64-byte line of float32 per token */
#define NEG_ANCHOR (-1e300) /* anchor of an empty carry: every exp of it is 0 */

/* 32-byte vectors (GCC/Clang vector extensions: AVX registers on x86-64, pairs of NEON
 * registers on AArch64). A task's CB channels are CB / lanes such vectors. */
typedef float vf32 __attribute__((vector_size(32)));
typedef int32_t vi32 __attribute__((vector_size(32)));
typedef double vf64 __attribute__((vector_size(32)));
typedef int64_t vi64 __attribute__((vector_size(32)));
/* the same with element alignment, for unaligned loads and stores of tensor rows */
typedef float vf32u __attribute__((vector_size(32), aligned(4), may_alias));
typedef double vf64u __attribute__((vector_size(32), aligned(8), may_alias));

static inline vf32 vsel_f32(vi32 m, vf32 a, vf32 b) { return (vf32)((m & (vi32)a) | (~m & (vi32)b)); }
static inline vf64 vsel_f64(vi64 m, vf64 a, vf64 b) { return (vf64)((m & (vi64)a) | (~m & (vi64)b)); }
static inline vf32 vmax_f32(vf32 a, vf32 b) { return vsel_f32(a > b, a, b); }
static inline vf64 vmax_f64(vf64 a, vf64 b) { return vsel_f64(a > b, a, b); }

/* exp, branch-free: Cody-Waite reduction, Taylor polynomial on |r| <= ln2/2 (degree 7 for
 * float: truncation 5e-9 relative; degree 13 for double: 5e-18), 2^n from exponent bits.
 * Returns 0 below -87.3 (float) / -708 (double) instead of a denormal, saturates above. */
static inline vf32 vexp_f32(vf32 x)
{
    const vf32 zero = {0};
    const vf32 lo = zero - 87.3f, hi = zero + 88.3f;
    vf32 xc = vmax_f32(x, lo);
    xc = vsel_f32(xc > hi, hi, xc);
    vf32 t = xc * 1.44269504088896341f + 12582912.0f; /* 1.5 * 2^23: rounds to an integer */
    vf32 n = t - 12582912.0f;
    vf32 scale = (vf32)(((vi32)t - 0x4B400000 + 127) << 23);
    vf32 r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf32 p = r * 1.9841270e-4f + 1.3888889e-3f;
    p = p * r + 8.3333333e-3f;
    p = p * r + 4.1666667e-2f;
    p = p * r + 1.6666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return vsel_f32(x < lo, zero, p * scale);
}

static inline vf64 vexp_f64(vf64 x)
{
    const vf64 zero = {0};
    const vf64 lo = zero - 708.0, hi = zero + 709.0;
    vf64 xc = vmax_f64(x, lo);
    xc = vsel_f64(xc > hi, hi, xc);
    vf64 t = xc * 1.4426950408889634 + 6755399441055744.0; /* 1.5 * 2^52 */
    vf64 n = t - 6755399441055744.0;
    vf64 scale = (vf64)(((vi64)t - INT64_C(0x4338000000000000) + 1023) << 52);
    vf64 r = xc - n * 0.6931471803691238;
    r = r - n * 1.9082149292705877e-10;
    vf64 p = r * (1.0 / 6227020800.0) + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    return vsel_f64(x < lo, zero, p * scale);
}

/* Blocks of CB float64 lanes, for the per-chunk carry arithmetic. */
#define NVD (CB / 4)
typedef struct { vf64 v[NVD]; } dblk;
#define VEC(n, out, expr) for (int q_ = 0; q_ < (n); q_++) (out).v[q_] = (expr)
#define E(x) ((x).v[q_])

static inline dblk d_ld(const double *p)
{
    dblk x;
    VEC(NVD, x, ((const vf64u *)p)[q_]);
    return x;
}
static inline void d_st(double *p, dblk x)
{
    for (int q_ = 0; q_ < NVD; q_++)
        ((vf64u *)p)[q_] = x.v[q_];
}
static inline dblk d_bc(double s)
{
    const vf64 zero = {0};
    dblk x;
    VEC(NVD, x, zero + s);
    return x;
}
static inline dblk d_exp(dblk x)
{
    VEC(NVD, x, vexp_f64(E(x)));
    return x;
}
static inline dblk d_max(dblk a, dblk b)
{
    VEC(NVD, a, vmax_f64(E(a), E(b)));
    return a;
}

/* Moves the binary exponent of a forward carry's denominator pd into its anchor a (exact:
 * pn and pd are scaled by a power of two), so that anchors stay tight bounds of the carries'
 * size: a unit U_n = max(...) built from a loose anchor would make the local terms
 * underflow. An empty carry (pd = 0) is left alone. */
static inline void d_renorm(dblk *a, dblk *pn, dblk *pd)
{
    for (int q_ = 0; q_ < NVD; q_++) {
        vi64 bits = (vi64)pd->v[q_];
        vi64 e = ((bits >> 52) & 0x7ff) - 1023;
        vi64 ok = (pd->v[q_] > 0.0) & (e > -1000) & (e < 1000);
        e = e & ok;
        vf64 s = (vf64)((1023 - e) << 52);
        pn->v[q_] *= s;
        pd->v[q_] *= s;
        a->v[q_] += __builtin_convertvector(e, vf64) * 0.6931471805599453;
    }
}


/* The common step of every carry update: a carry anchored at *a, decayed by Lw = Ln w, meets a
 * chunk anchored at anc; the new anchor is the larger of the two, f1 and f2 (<= 1) bring the
 * old carry and the chunk into it. */
static inline void d_anchor(dblk *a, dblk Lw, dblk anc, dblk *f1, dblk *f2)
{
    dblk a2;
    VEC(NVD, a2, vmax_f64(E(*a) - E(Lw), E(anc)));
    VEC(NVD, *f1, E(*a) - E(Lw) - E(a2));
    VEC(NVD, *f2, E(anc) - E(a2));
    *f1 = d_exp(*f1);
    *f2 = d_exp(*f2);
    *a = a2;
}

/* Advances a forward carry over a chunk of Ln tokens: a (anchor) with pn, pd (numerator,
 * denominator in units e^{a}) becomes the old carry decayed by e^{-Ln w} plus the chunk's own
 * totals tn, td (units e^{m}), anchored at the larger of the two and renormalised. */
static inline void d_carry_fwd(dblk *a, dblk *pn, dblk *pd, dblk Lw, dblk m, dblk tn, dblk td)
{
    dblk f1, f2;
    d_anchor(a, Lw, m, &f1, &f2);
    VEC(NVD, *pn, E(*pn) * E(f1) + E(tn) * E(f2));
    VEC(NVD, *pd, E(*pd) * E(f1) + E(td) * E(f2));
    d_renorm(a, pn, pd);
}

/* The same for a backward carry: anchor c; Es = (E_q, E_r) decayed sums of q and r, Ds the
 * same weighted by the distance exponent; the chunk's totals e, d in units e^{anc}. Over Ln
 * tokens the old distances grow by Ln: D <- e^{-Ln w} (D + Ln E) + d. */
static inline void d_carry_bwd(dblk *c, dblk Es[2], dblk Ds[2], double Ln, dblk Lw, dblk anc,
                               const dblk e[2], const dblk d[2])
{
    dblk f1, f2;
    d_anchor(c, Lw, anc, &f1, &f2);
    for (int i = 0; i < 2; i++) {
        VEC(NVD, Ds[i], (E(Ds[i]) + Ln * E(Es[i])) * E(f1) + E(d[i]) * E(f2));
        VEC(NVD, Es[i], E(Es[i]) * E(f1) + E(e[i]) * E(f2));
    }
}

/* One call's arguments (pointers typed by the instantiation that reads them). */
typedef struct {
    const void *w, *u, *k, *v, *y, *gy;
    void *y_out, *den, *unit, *gk, *gv;
    double *gw_part, *gu_part; /* (B, C) partials of the backward */
    int64_t B, T, C, L, N;
    int nthreads;
} job_t;

typedef struct {
    const job_t *job;
    int tid;
    int failed;
    void (*run)(const job_t *, int, int *);
} worker_t;

static void *worker_main(void *arg)
{
    worker_t *wk = (worker_t *)arg;
    wk->run(wk->job, wk->tid, &wk->failed);
    return NULL;
}

/* Runs run(job, tid) for tid = 0..nthreads-1 (tid 0 on the calling thread). Returns 0, or -1
 * when scratch memory could not be allocated. */
static int run_threads(const job_t *job, void (*run)(const job_t *, int, int *))
{
    int nt = job->nthreads < 1 ? 1 : job->nthreads;
    worker_t wk[256];
    pthread_t th[256];
    int started[256];
    if (nt > 256)
        nt = 256;
    for (int i = 0; i < nt; i++) {
        wk[i].job = job;
        wk[i].tid = i;
        wk[i].failed = 0;
        wk[i].run = run;
        started[i] = 0;
    }
    for (int i = 1; i < nt; i++)
        started[i] = pthread_create(&th[i], NULL, worker_main, &wk[i]) == 0;
    run(job, 0, &wk[0].failed);
    for (int i = 1; i < nt; i++) {
        if (started[i])
            pthread_join(th[i], NULL);
        else /* could not start a thread: do its share here (same tasks, same results) */
            run(job, i, &wk[i].failed);
    }
    int failed = 0;
    for (int i = 0; i < nt; i++)
        failed |= wk[i].failed;
    return failed ? -1 : 0;
}

#define R float
#define SFX f32
#define VR vf32
#define VRU vf32u
#define VL 8
#define VEXP vexp_f32
#define VMAX vmax_f32
#define BUDGET 16.0
#include "biwkv4_impl.h"   /* #undefs these parameters at its end */

#define R double
#define SFX f64
#define VR vf64
#define VRU vf64u
#define VL 4
#define VEXP vexp_f64
#define VMAX vmax_f64
#define BUDGET 256.0
#include "biwkv4_impl.h"   /* #undefs these parameters at its end */

/* version of the C interface; kernels_cpu/_build.py checks it */
int biwkv4_cpu_abi(void) { return 1; }
