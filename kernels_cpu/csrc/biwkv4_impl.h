/* Bi-WKV4 forward and backward for one compute type. Included by biwkv4.c with
 *   R       the compute type (float or double), VR its 32-byte vector, VL lanes per vector
 *   SFX     the symbol suffix (f32, f64)
 *   VEXP    vector exp in R, VMAX vector max
 *   BUDGET  the largest L |w| inside one chunk
 * Carries are float64 in both instantiations. See biwkv4.c for the numerics. */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SFX)
#define NV (CB / VL)
#define rblk FN(rblk)

/* Longest chunk: a power of two <= 64 and <= T with L * wmax <= BUDGET (at least 1). */
int64_t FN(biwkv4_chunk_len)(double wmax, int64_t T)
{
    int64_t L = 1;
    while (2 * L <= 64 && 2 * L <= T && 2.0 * (double)L * wmax <= BUDGET)
        L *= 2;
    return L;
}

/* A block of CB lanes of R. Loads and stores of a task's channels: full blocks go straight
 * to memory; the last, partial block of a row goes through a padded copy. */
typedef struct { VR v[NV]; } rblk;

static inline __attribute__((always_inline)) rblk FN(r_ld)(const R *p, int nl, R pad)
{
    rblk x;
    if (nl == CB) {
        VEC(NV, x, ((const VRU *)p)[q_]);
    } else {
        R t[CB];
        for (int l = 0; l < CB; l++)
            t[l] = l < nl ? p[l] : pad;
        VEC(NV, x, ((const VRU *)t)[q_]);
    }
    return x;
}
static inline __attribute__((always_inline)) void FN(r_st)(R *p, rblk x, int nl)
{
    if (nl == CB) {
        for (int q_ = 0; q_ < NV; q_++)
            ((VRU *)p)[q_] = x.v[q_];
    } else {
        R t[CB];
        for (int q_ = 0; q_ < NV; q_++)
            ((VRU *)t)[q_] = x.v[q_];
        for (int l = 0; l < nl; l++)
            p[l] = t[l];
    }
}
static inline rblk FN(r_bc)(R s)
{
    const VR zero = {0};
    rblk x;
    VEC(NV, x, zero + s);
    return x;
}
static inline dblk FN(r_to_d)(rblk x)
{
    R t[CB];
    double d[CB];
    FN(r_st)(t, x, CB);
    for (int l = 0; l < CB; l++)
        d[l] = (double)t[l];
    return d_ld(d);
}
static inline rblk FN(d_to_r)(dblk x)
{
    R t[CB];
    double d[CB];
    d_st(d, x);
    for (int l = 0; l < CB; l++)
        t[l] = (R)d[l];
    return FN(r_ld)(t, CB, (R)0);
}
/* Rows of a task are C elements apart, so every token is a new cache line: each loop fetches
 * the rows of the chunk it will visit next (read: PF_R, write: PF_W) while it works. */
#define PF_R(p, t) do { if ((t) >= 0 && (t) < T) __builtin_prefetch((p) + (t) * C, 0, 3); } while (0)
#define PF_W(p, t) do { if ((t) >= 0 && (t) < T) __builtin_prefetch((p) + (t) * C, 1, 3); } while (0)
#define LD(p) FN(r_ld)((p), nl, (R)0)
#define ST(p, x) FN(r_st)((p), (x), nl)
#define TOD FN(r_to_d)
#define TOR FN(d_to_r)
#define ZERO FN(r_bc)((R)0)

/* Per-channel constants of a block: e^{-w} and e^{u} in R; w, e^{u} in float64; max(u, 0). */
#define LANE_SETUP(J, c0)                                                                \
    const rblk w_ = FN(r_ld)((const R *)(J)->w + (c0), nl, (R)0);                        \
    const rblk u_ = FN(r_ld)((const R *)(J)->u + (c0), nl, (R)0);                        \
    const dblk w64 = TOD(w_);                                                            \
    dblk t64_;                                                                           \
    VEC(NVD, t64_, -E(w64));                                                             \
    const rblk dec = TOR(d_exp(t64_));                                                   \
    const dblk eu64 = d_exp(TOD(u_));                                                    \
    const rblk eu = TOR(eu64);                                                           \
    const VR zero_ = {0};                                                                \
    rblk up;                                                                             \
    VEC(NV, up, VMAX(E(u_), zero_));

/* ---------------------------------------------------------------------------------------
 * Forward of one task (batch row b, channels c0 .. c0+nl-1).
 * carry: per chunk 6 dblk: the left carry entering it (anchor, num, den), its maximum m, and
 *        its right-view totals (num, den) in units e^{m}.
 * buf:   4 * L rblk; xs: T rblk (e^{k - m} of every token, from pass 1 to pass 2).
 * Writes y (B, T, C), and when den/unit are given the denominator of every token in units
 * e^{U_n} (B, T, C) and the units U_n (B, N, C).
 * ------------------------------------------------------------------------------------- */
static inline __attribute__((always_inline)) void
FN(fwd_block)(const job_t *J, int64_t b, int64_t c0, const int nl, dblk *carry, rblk *buf,
              rblk *xs)
{
    const int64_t T = J->T, C = J->C, L = J->L, N = J->N;
    const R *k = (const R *)J->k + b * T * C + c0;
    const R *v = (const R *)J->v + b * T * C + c0;
    R *y = (R *)J->y_out + b * T * C + c0;
    R *den = J->den ? (R *)J->den + b * T * C + c0 : NULL;
    R *unit = J->unit ? (R *)J->unit + b * N * C + c0 : NULL;
    LANE_SETUP(J, c0)
    const int64_t PD = L > 32 ? L : 32;   /* prefetch distance in rows */
    rblk *Xn = buf, *Xd = buf + L, *Sn = buf + 2 * L, *Sd = buf + 3 * L;

    /* pass 1, left to right: the left carry entering each chunk, the chunks' right views */
    dblk a = d_bc(NEG_ANCHOR), Pn = d_bc(0.0), Pd = d_bc(0.0);
    for (int64_t n = 0; n < N; n++) {
        const int64_t t0 = n * L, Ln = (T - t0) < L ? (T - t0) : L;
        dblk *cs = carry + n * 6;
        rblk m = LD(k + t0 * C);
        for (int64_t j = 1; j < Ln; j++) {
            rblk kj = LD(k + (t0 + j) * C);
            VEC(NV, m, VMAX(E(m), E(kj)));
        }
        VEC(NV, m, E(m) + E(up));
        rblk tn = ZERO, td = ZERO, rn = ZERO, rd = ZERO;
        for (int64_t j = 0; j < Ln; j++) {
            rblk kj = LD(k + (t0 + j) * C), vj = LD(v + (t0 + j) * C), x, xn;
            PF_R(k, t0 + PD + j);
            PF_R(v, t0 + PD + j);
            VEC(NV, x, VEXP(E(kj) - E(m)));
            VEC(NV, xn, E(x) * E(vj));
            Xn[j] = xn;
            Xd[j] = x;
            xs[t0 + j] = x;
            VEC(NV, tn, E(tn) * E(dec) + E(xn));
            VEC(NV, td, E(td) * E(dec) + E(x));
        }
        for (int64_t j = Ln - 1; j >= 0; j--) {
            VEC(NV, rn, E(rn) * E(dec) + E(Xn[j]));
            VEC(NV, rd, E(rd) * E(dec) + E(Xd[j]));
        }
        dblk m64 = TOD(m), Lw;
        cs[0] = a;
        cs[1] = Pn;
        cs[2] = Pd;
        cs[3] = m64;
        cs[4] = TOD(rn);
        cs[5] = TOD(rd);
        VEC(NVD, Lw, (double)Ln * E(w64));
        d_carry_fwd(&a, &Pn, &Pd, Lw, m64, TOD(tn), TOD(td));
    }

    /* pass 2, right to left: y, with the right carry built as it goes */
    dblk bq = d_bc(NEG_ANCHOR), Qn = d_bc(0.0), Qd = d_bc(0.0);
    for (int64_t n = N - 1; n >= 0; n--) {
        const int64_t t0 = n * L, Ln = (T - t0) < L ? (T - t0) : L;
        const dblk *cs = carry + n * 6;
        dblk Ud, fl, fr, t1, t2, t3, t4, s64;
        VEC(NVD, Ud, vmax_f64(vmax_f64(E(cs[3]), E(cs[0])), E(bq)));
        const rblk U = TOR(Ud);
        Ud = TOD(U);   /* the unit as R rounds it, used consistently */
        VEC(NVD, s64, E(cs[3]) - E(Ud));
        const rblk s = TOR(d_exp(s64));   /* e^{m - U} <= 1: pass 1's terms in units U */
        VEC(NVD, fl, E(cs[0]) - E(Ud));
        VEC(NVD, fr, E(bq) - E(Ud));
        fl = d_exp(fl);
        fr = d_exp(fr);
        VEC(NVD, t1, E(cs[1]) * E(fl));
        VEC(NVD, t2, E(cs[2]) * E(fl));
        VEC(NVD, t3, E(Qn) * E(fr));
        VEC(NVD, t4, E(Qd) * E(fr));
        rblk sn = TOR(t1), sd = TOR(t2), rn = TOR(t3), rd = TOR(t4);
        if (unit)
            ST(unit + n * C, U);
        for (int64_t j = 0; j < Ln; j++) {
            rblk vj = LD(v + (t0 + j) * C), x, xn;
            PF_R(v, t0 - PD + j);
            PF_W(y, t0 - PD + j);
            if (den)
                PF_W(den, t0 - PD + j);
            VEC(NV, x, E(xs[t0 + j]) * E(s));
            VEC(NV, xn, E(x) * E(vj));
            Sn[j] = sn;
            Sd[j] = sd;
            Xn[j] = xn;
            Xd[j] = x;
            VEC(NV, sn, E(sn) * E(dec) + E(xn));
            VEC(NV, sd, E(sd) * E(dec) + E(x));
        }
        for (int64_t j = Ln - 1; j >= 0; j--) {
            rblk num, dd, yj;
            VEC(NV, num, E(Sn[j]) + E(rn) + E(eu) * E(Xn[j]));
            VEC(NV, dd, E(Sd[j]) + E(rd) + E(eu) * E(Xd[j]));
            VEC(NV, yj, E(num) / E(dd));
            ST(y + (t0 + j) * C, yj);
            if (den)
                ST(den + (t0 + j) * C, dd);
            VEC(NV, rn, E(rn) * E(dec) + E(Xn[j]));
            VEC(NV, rd, E(rd) * E(dec) + E(Xd[j]));
        }
        /* the chunk enters the right carry with its own-unit totals from pass 1: in units U_n
         * its terms may underflow where they are negligible here but dominant further left */
        dblk Lw;
        VEC(NVD, Lw, (double)Ln * E(w64));
        d_carry_fwd(&bq, &Qn, &Qd, Lw, cs[3], cs[4], cs[5]);
    }
}

/* ---------------------------------------------------------------------------------------
 * Backward of one task. Reads k, v, y, den, unit (from the forward) and gy; writes gk, gv and
 * the task's gw, gu partials (gw_part, gu_part at (b, c)).
 * carry: per chunk 5 dblk: the left carry entering it (anchor, E_q, E_r, D_q, D_r).
 * buf:   5 * L rblk; zs: 2 T rblk (z of every token, from pass 1 to pass 2).
 * E: decayed sums of z = (q, r) = (gy / D, gy y / D); D: the same weighted by the distance
 * exponent (for gw); D_{j+1} = e^{-w} (D_j + E_j), E_{j+1} = e^{-w} E_j + z_j.
 * ------------------------------------------------------------------------------------- */
static inline __attribute__((always_inline)) void
FN(bwd_block)(const job_t *J, int64_t b, int64_t c0, const int nl, dblk *carry, rblk *buf,
              rblk *zs)
{
    const int64_t T = J->T, C = J->C, L = J->L, N = J->N;
    const int64_t off = b * T * C + c0;
    const R *k = (const R *)J->k + off, *v = (const R *)J->v + off, *y = (const R *)J->y + off;
    const R *den = (const R *)J->den + off, *gy = (const R *)J->gy + off;
    const R *unit = (const R *)J->unit + b * N * C + c0;
    R *gk = (R *)J->gk + off, *gv = (R *)J->gv + off;
    LANE_SETUP(J, c0)
    (void)up;
    const int64_t PD = L > 32 ? L : 32;   /* prefetch distance in rows */
    rblk *bEq = buf, *bEr = buf + L, *bZq = buf + 2 * L, *bZr = buf + 3 * L, *bX = buf + 4 * L;

    /* pass 1, left to right: left carries of z in units e^{-U_n} */
    dblk c = d_bc(NEG_ANCHOR), EL[2] = {d_bc(0.0), d_bc(0.0)}, DL[2] = {d_bc(0.0), d_bc(0.0)};
    for (int64_t n = 0; n < N; n++) {
        const int64_t t0 = n * L, Ln = (T - t0) < L ? (T - t0) : L;
        dblk *cs = carry + n * 5;
        rblk eq = ZERO, er = ZERO, dq = ZERO, dr = ZERO;
        for (int64_t j = 0; j < Ln; j++) {
            const int64_t o = (t0 + j) * C;
            rblk gj = LD(gy + o), dj = FN(r_ld)(den + o, nl, (R)1), yj = LD(y + o), z, zr;
            PF_R(gy, t0 + PD + j);
            PF_R(den, t0 + PD + j);
            PF_R(y, t0 + PD + j);
            VEC(NV, z, E(gj) / E(dj));
            VEC(NV, zr, E(z) * E(yj));
            zs[2 * (t0 + j)] = z;
            zs[2 * (t0 + j) + 1] = zr;
            VEC(NV, dq, E(dec) * (E(dq) + E(eq)));
            VEC(NV, dr, E(dec) * (E(dr) + E(er)));
            VEC(NV, eq, E(eq) * E(dec) + E(z));
            VEC(NV, er, E(er) * E(dec) + E(zr));
        }
        cs[0] = c;
        cs[1] = EL[0];
        cs[2] = EL[1];
        cs[3] = DL[0];
        cs[4] = DL[1];
        dblk negU = TOD(FN(r_ld)(unit + n * C, nl, (R)0)), Lw;
        const dblk e[2] = {TOD(eq), TOD(er)}, d[2] = {TOD(dq), TOD(dr)};
        VEC(NVD, negU, -E(negU));
        VEC(NVD, Lw, (double)Ln * E(w64));
        d_carry_bwd(&c, EL, DL, (double)Ln, Lw, negU, e, d);
    }

    /* pass 2, right to left: gk, gv and the gw, gu sums */
    dblk cr = d_bc(NEG_ANCHOR), ER[2] = {d_bc(0.0), d_bc(0.0)}, DR[2] = {d_bc(0.0), d_bc(0.0)};
    dblk accw = d_bc(0.0), accu = d_bc(0.0);
    for (int64_t n = N - 1; n >= 0; n--) {
        const int64_t t0 = n * L, Ln = (T - t0) < L ? (T - t0) : L;
        const dblk *cs = carry + n * 5;
        /* this chunk's unit for z: V_n = max(carry anchors, -U_n) */
        dblk negU = TOD(FN(r_ld)(unit + n * C, nl, (R)0)), Vd, sc64, fl, fr, t[8];
        VEC(NVD, negU, -E(negU));
        VEC(NVD, Vd, vmax_f64(vmax_f64(E(cs[0]), E(cr)), E(negU)));
        const rblk V = TOR(Vd);
        Vd = TOD(V);
        VEC(NVD, sc64, E(negU) - E(Vd));
        VEC(NVD, fl, E(cs[0]) - E(Vd));
        VEC(NVD, fr, E(cr) - E(Vd));
        const rblk sc = TOR(d_exp(sc64));
        fl = d_exp(fl);
        fr = d_exp(fr);
        VEC(NVD, t[0], E(cs[1]) * E(fl));
        VEC(NVD, t[1], E(cs[2]) * E(fl));
        VEC(NVD, t[2], E(cs[3]) * E(fl));
        VEC(NVD, t[3], E(cs[4]) * E(fl));
        VEC(NVD, t[4], E(ER[0]) * E(fr));
        VEC(NVD, t[5], E(ER[1]) * E(fr));
        VEC(NVD, t[6], E(DR[0]) * E(fr));
        VEC(NVD, t[7], E(DR[1]) * E(fr));
        rblk eq = TOR(t[0]), er = TOR(t[1]), dq = TOR(t[2]), dr = TOR(t[3]);
        rblk rq = TOR(t[4]), rr = TOR(t[5]), sq = TOR(t[6]), sr = TOR(t[7]);
        rblk tq = ZERO, tr = ZERO, uq = ZERO, ur = ZERO, aw = ZERO, au = ZERO;
        for (int64_t j = 0; j < Ln; j++) {
            const int64_t o = (t0 + j) * C;
            rblk kj = LD(k + o), vj = LD(v + o), z0 = zs[2 * (t0 + j)], zr0 = zs[2 * (t0 + j) + 1];
            PF_R(k, t0 - PD + j);
            PF_R(v, t0 - PD + j);
            PF_W(gk, t0 - PD + j);
            PF_W(gv, t0 - PD + j);
            rblk z, zr, x;                      /* z0, zr0 in units e^{-U_n} */
            VEC(NV, z, E(z0) * E(sc));          /* units e^{V_n} */
            VEC(NV, zr, E(zr0) * E(sc));
            VEC(NV, x, VEXP(E(kj) + E(V)));
            bEq[j] = eq;
            bEr[j] = er;
            bZq[j] = z0;
            bZr[j] = zr0;
            bX[j] = x;
            VEC(NV, aw, E(aw) + E(x) * (E(vj) * E(dq) - E(dr)));
            VEC(NV, dq, E(dec) * (E(dq) + E(eq)));
            VEC(NV, dr, E(dec) * (E(dr) + E(er)));
            VEC(NV, eq, E(eq) * E(dec) + E(z));
            VEC(NV, er, E(er) * E(dec) + E(zr));
        }
        for (int64_t j = Ln - 1; j >= 0; j--) {
            const int64_t o = (t0 + j) * C;
            rblk vj = LD(v + o), x = bX[j], z0 = bZq[j], zr0 = bZr[j], z, zr, Fq, Fr, g;
            VEC(NV, z, E(z0) * E(sc));
            VEC(NV, zr, E(zr0) * E(sc));
            VEC(NV, aw, E(aw) + E(x) * (E(vj) * E(sq) - E(sr)));
            VEC(NV, au, E(au) + E(x) * (E(vj) * E(z) - E(zr)));
            VEC(NV, Fq, E(bEq[j]) + E(rq) + E(eu) * E(z));
            VEC(NV, Fr, E(bEr[j]) + E(rr) + E(eu) * E(zr));
            VEC(NV, g, E(x) * E(Fq));
            ST(gv + o, g);
            VEC(NV, g, E(x) * (E(vj) * E(Fq) - E(Fr)));
            ST(gk + o, g);
            VEC(NV, sq, E(dec) * (E(sq) + E(rq)));
            VEC(NV, sr, E(dec) * (E(sr) + E(rr)));
            VEC(NV, rq, E(rq) * E(dec) + E(z));
            VEC(NV, rr, E(rr) * E(dec) + E(zr));
            /* the chunk's right-view totals for the carry, in units e^{-U_n}: in units e^{V_n}
             * they could underflow where they matter further left */
            VEC(NV, uq, E(dec) * (E(uq) + E(tq)));
            VEC(NV, ur, E(dec) * (E(ur) + E(tr)));
            VEC(NV, tq, E(tq) * E(dec) + E(z0));
            VEC(NV, tr, E(tr) * E(dec) + E(zr0));
        }
        dblk aw64 = TOD(aw), au64 = TOD(au), Lw;
        const dblk e[2] = {TOD(tq), TOD(tr)}, d[2] = {TOD(uq), TOD(ur)};
        VEC(NVD, accw, E(accw) + E(aw64));
        VEC(NVD, accu, E(accu) + E(au64));
        VEC(NVD, Lw, (double)Ln * E(w64));
        d_carry_bwd(&cr, ER, DR, (double)Ln, Lw, negU, e, d);
    }
    double gw[CB], gu[CB];
    VEC(NVD, accw, -E(accw));
    VEC(NVD, accu, E(accu) * E(eu64));
    d_st(gw, accw);
    d_st(gu, accu);
    for (int l = 0; l < nl; l++) {
        J->gw_part[b * C + c0 + l] = gw[l];
        J->gu_part[b * C + c0 + l] = gu[l];
    }
}

/* ---------------------------------------------------------------------------------------
 * Task loops and entry points.
 * ------------------------------------------------------------------------------------- */
#define TASK_LOOP(block, ncarry, nbuf, ntok)                                                     \
    const int64_t nblk = (J->C + CB - 1) / CB, ntask = J->B * nblk;                          \
    dblk *carry = (dblk *)aligned_alloc(64, sizeof(dblk) * (size_t)J->N * (ncarry));         \
    rblk *buf = (rblk *)aligned_alloc(64, sizeof(rblk) * (size_t)J->L * (nbuf));             \
    rblk *tok = (rblk *)aligned_alloc(64, sizeof(rblk) * (size_t)J->T * (ntok));             \
    if (!carry || !buf || !tok) {                                                            \
        *failed = 1;                                                                         \
        free(carry);                                                                         \
        free(buf);                                                                           \
        free(tok);                                                                           \
        return;                                                                              \
    }                                                                                        \
    for (int64_t t = tid; t < ntask; t += J->nthreads) {                                     \
        const int64_t b = t / nblk, c0 = (t % nblk) * CB;                                    \
        const int64_t nl = J->C - c0 < CB ? J->C - c0 : CB;                                  \
        if (nl == CB)                                                                        \
            block(J, b, c0, CB, carry, buf, tok);                                            \
        else                                                                                 \
            block(J, b, c0, (int)nl, carry, buf, tok);                                       \
    }                                                                                        \
    free(carry);                                                                             \
    free(buf);                                                                               \
    free(tok);

static void FN(fwd_thread)(const job_t *J, int tid, int *failed) { TASK_LOOP(FN(fwd_block), 6, 4, 1) }
static void FN(bwd_thread)(const job_t *J, int tid, int *failed) { TASK_LOOP(FN(bwd_block), 5, 5, 2) }

/* y = Bi-WKV4(w, u, k, v); den (B, T, C) and unit (B, N, C) are written when not NULL (the
 * backward needs them). Returns 0, or -1 when scratch memory could not be allocated. */
int FN(biwkv4_fwd)(const R *w, const R *u, const R *k, const R *v, R *y, R *den, R *unit,
                   int64_t B, int64_t T, int64_t C, int64_t L, int nthreads)
{
    job_t J;
    memset(&J, 0, sizeof J);
    J.w = w; J.u = u; J.k = k; J.v = v; J.y_out = y; J.den = den; J.unit = unit;
    J.B = B; J.T = T; J.C = C; J.L = L; J.N = (T + L - 1) / L; J.nthreads = nthreads;
    return run_threads(&J, FN(fwd_thread));
}

/* gk, gv (B, T, C) and gw, gu (C,) in float64, summed over b in order. gw_part, gu_part:
 * (B, C) float64 scratch. Returns 0 or -1 (no memory). */
int FN(biwkv4_bwd)(const R *w, const R *u, const R *k, const R *v, const R *y, const R *den,
                   const R *unit, const R *gy, R *gk, R *gv, double *gw, double *gu,
                   double *gw_part, double *gu_part, int64_t B, int64_t T, int64_t C, int64_t L,
                   int nthreads)
{
    job_t J;
    memset(&J, 0, sizeof J);
    J.w = w; J.u = u; J.k = k; J.v = v; J.y = y; J.den = (void *)den; J.unit = (void *)unit;
    J.gy = gy; J.gk = gk; J.gv = gv; J.gw_part = gw_part; J.gu_part = gu_part;
    J.B = B; J.T = T; J.C = C; J.L = L; J.N = (T + L - 1) / L; J.nthreads = nthreads;
    int rc = run_threads(&J, FN(bwd_thread));
    if (rc)
        return rc;
    for (int64_t c = 0; c < C; c++) {
        double sw = 0.0, su = 0.0;
        for (int64_t b = 0; b < B; b++) {
            sw += gw_part[b * C + c];
            su += gu_part[b * C + c];
        }
        gw[c] = sw;
        gu[c] = su;
    }
    return 0;
}

#undef TASK_LOOP
#undef LANE_SETUP
#undef LD
#undef PF_R
#undef PF_W
#undef ST
#undef TOD
#undef TOR
#undef ZERO
#undef rblk
#undef NV
#undef CAT_
#undef CAT
#undef FN
#undef R
#undef SFX
#undef VR
#undef VRU
#undef VL
#undef VEXP
#undef VMAX
#undef BUDGET
