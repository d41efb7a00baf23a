// Layer 0's context attention of the CPU step, two builds of it side by
// side, timed in pairs: scripts/fused-lab.sh builds and runs it (see
// there, and docs/DESIGN.md, "Lowering").
//
//   fused_lab M_C PAIRS   (threads: OMP_NUM_THREADS)
//
// A side is the step's fused kernel and its merge (A_qk, A_merge), or,
// with -DB_THREE, side B is the step's three kernels (B_qk: the q·K,
// B_sm: the softmax written over the scores, B_wv: the w·V). b = 32 rows,
// 16 heads of 64, f32, m_d = 16 decode scores. Each pair runs both sides
// once, in turn (A first in even pairs, B first in odd ones), K and V
// flushed from the caches (a 128 MiB pass) before every run: on a shared
// machine whose speed drifts, the ratio of a pair's two times is steadier
// than either side's own times. Prints both sides' best, the median and
// quartiles of B / A over the pairs, and the largest difference of the
// two outputs (failing past 1e-4 of the largest output).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "lab_common.h"

typedef float F;
typedef int64_t I;

void A_qk(I, I, I, I, const F *, const F *, const F *, F *, I, I);
void A_merge(I, I, I, F *, F *, const F *, F *, I, I);
#ifdef B_THREE
void B_qk(I, I, I, I, const F *, const F *, F *, I, I);
void B_sm(I, I, I, F *, F *, F *, I, I);
void B_wv(I, I, I, I, const F *, const F *, F *, I, I);
#else
void B_qk(I, I, I, I, const F *, const F *, const F *, F *, I, I);
void B_merge(I, I, I, F *, F *, const F *, F *, I, I);
#endif

#define B 32
#define H 16
#define D 64
#define MD 16
// Items a KV head of the partials, at most (the plan's are 8).
#define ITEMS 64



// Buffers of one run: the context's K and V, q, the decode part's scores
// and the new token's (rewritten by the softmax: refilled each run), the
// fused kernel's partials or the three kernels' scores, the output.
struct run {
  const F *k, *v, *q;
  F *dec, *fresh, *scratch, *out;
  long mc;
};

// The kernels of a side, each in parts on the threads (as the step's
// pool runs them).
#define PARTS(call)                                             \
  do {                                                          \
    int n_ = omp_get_max_threads();                             \
    _Pragma("omp parallel for schedule(static, 1)") for (int p_ = 0; p_ < n_; p_++) call; \
  } while (0)

static void side(int which, struct run *r) {
  for (long i = 0; i < B * H * MD; i++) r->dec[i] = 0.1f;
  for (long i = 0; i < B * H; i++) r->fresh[i] = 0.2f;
  long mc = r->mc;
  if (which == 0) {
    PARTS(A_qk(B, mc, MD, mc, r->k, r->v, r->q, r->scratch, p_, n_));
    PARTS(A_merge(B, mc, MD, r->dec, r->fresh, r->scratch, r->out, p_, n_));
    return;
  }
#ifdef B_THREE
  PARTS(B_qk(B, mc, MD, mc, r->k, r->q, r->scratch, p_, n_));
  PARTS(B_sm(B, mc, MD, r->scratch, r->dec, r->fresh, p_, n_));
  PARTS(B_wv(B, mc, MD, mc, r->v, r->scratch, r->out, p_, n_));
#else
  PARTS(B_qk(B, mc, MD, mc, r->k, r->v, r->q, r->scratch, p_, n_));
  PARTS(B_merge(B, mc, MD, r->dec, r->fresh, r->scratch, r->out, p_, n_));
#endif
}

// Both sides' runs, for `time_pairs`.
struct runs {
  struct run side[2];
};

static void side_of(int which, void *ctx) { side(which, &((struct runs *)ctx)->side[which]); }

int main(int argc, char **argv) {
  long mc = argc > 1 ? atol(argv[1]) : 8192, pairs = argc > 2 ? atol(argv[2]) : 40;
  if (mc < 1 || pairs < 1) {
    fprintf(stderr, "usage: fused_lab M_C PAIRS (both at least 1)\n");
    return 2;
  }
  long kv = (long)H * mc * D, scratch = (long)B * H * mc;
  if (scratch < (long)ITEMS * B * H * (D + 2)) scratch = (long)ITEMS * B * H * (D + 2);
  F *k = aligned_alloc(64, kv * 4), *v = aligned_alloc(64, kv * 4), *q = aligned_alloc(64, B * H * D * 4);
  F *outs[2], *scratches[2];
  for (int s = 0; s < 2; s++) {
    outs[s] = aligned_alloc(64, B * H * D * 4);
    scratches[s] = aligned_alloc(64, scratch * 4);
  }
  F *dec = aligned_alloc(64, B * H * MD * 4), *fresh = aligned_alloc(64, B * H * 4);
  long flush = 128L << 20;
  char *fl = malloc(flush);
  if (!k || !v || !q || !outs[0] || !outs[1] || !scratches[0] || !scratches[1] || !dec || !fresh || !fl) {
    fprintf(stderr, "fused_lab: out of memory\n");
    return 1;
  }
  srand(1);
  for (long i = 0; i < kv; i++) {
    k[i] = rand() / (F)RAND_MAX - 0.5f;
    v[i] = rand() / (F)RAND_MAX;
  }
  for (long i = 0; i < B * H * D; i++) q[i] = rand() / (F)RAND_MAX - 0.5f;
  for (long i = 0; i < flush; i++) fl[i] = 1;
  struct runs both = {{{k, v, q, dec, fresh, scratches[0], outs[0], mc}, {k, v, q, dec, fresh, scratches[1], outs[1], mc}}};
  double best[2], *ratio = malloc(pairs * sizeof(double));
  if (!ratio) {
    fprintf(stderr, "fused_lab: out of memory\n");
    return 1;
  }
  time_pairs(pairs, side_of, &both, fl, flush, best, ratio);
  printf("m_c %ld, %d threads, %ld pairs: A best %.2f ms, B best %.2f ms; ", mc, omp_get_max_threads(), pairs,
         best[0] * 1e3, best[1] * 1e3);
  report_pairs(ratio, pairs);
  return compare_outputs(outs[0], outs[1], B * H * D, 1e-4);
}
