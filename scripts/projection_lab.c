// A weight projection of the CPU step (`x @ Wᵀ` from W kept in panels,
// src/lower/cpu/panels.rs), two builds of it side by side, timed in
// pairs: scripts/projection-lab.sh builds and runs it (see there).
//
//   projection_lab IN OUT PAIRS   (threads: OMP_NUM_THREADS)
//
// b = 32 rows of IN inputs, OUT outputs (a multiple of 64), f32; W in
// panels `[OUT / 64, IN, 64]`. Each pair runs both sides once, in turn (A
// first in even pairs, B first in odd ones), W flushed from the caches (a
// 128 MiB pass) before every run, as the step finds it (its weights are
// more than the caches hold). Prints both sides' best, the median and
// quartiles of B / A over the pairs, and the largest difference of the
// two outputs (failing past 1e-5 of the largest output).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "lab_common.h"

typedef float F;
typedef int64_t I;

void A_proj(I, I, I, const F *, const F *, F *, I, I);
void B_proj(I, I, I, const F *, const F *, F *, I, I);

#define B 32



// W, x and each side's output, for `time_pairs`.
struct operands {
  const F *w, *x;
  F *ys[2];
};

// A side's projection, in parts on the threads (as the step's pool runs
// it).
static void side(int which, void *ctx) {
  struct operands *o = ctx;
  int n = omp_get_max_threads();
#pragma omp parallel for schedule(static, 1)
  for (int part = 0; part < n; part++) {
    if (which == 0) {
      A_proj(B, 64, 16, o->w, o->x, o->ys[0], part, n);
    } else {
      B_proj(B, 64, 16, o->w, o->x, o->ys[1], part, n);
    }
  }
}

int main(int argc, char **argv) {
  long in = argc > 1 ? atol(argv[1]) : 0, out = argc > 2 ? atol(argv[2]) : 0, pairs = argc > 3 ? atol(argv[3]) : 0;
  if (in < 1 || out < 64 || out % 64 != 0 || pairs < 1) {
    fprintf(stderr, "usage: projection_lab IN OUT PAIRS (OUT a multiple of 64)\n");
    return 2;
  }
  F *w = aligned_alloc(64, in * out * 4), *x = aligned_alloc(64, B * in * 4);
  F *ys[2] = {aligned_alloc(64, B * out * 4), aligned_alloc(64, B * out * 4)};
  long flush = 128L << 20;
  char *fl = malloc(flush);
  if (!w || !x || !ys[0] || !ys[1] || !fl) {
    fprintf(stderr, "projection_lab: out of memory\n");
    return 1;
  }
  srand(1);
  for (long i = 0; i < in * out; i++) w[i] = rand() / (F)RAND_MAX - 0.5f;
  for (long i = 0; i < B * in; i++) x[i] = rand() / (F)RAND_MAX - 0.5f;
  for (long i = 0; i < flush; i++) fl[i] = 1;
  struct operands ops = {w, x, {ys[0], ys[1]}};
  double best[2], *ratio = malloc(pairs * sizeof(double));
  if (!ratio) {
    fprintf(stderr, "projection_lab: out of memory\n");
    return 1;
  }
  time_pairs(pairs, side, &ops, fl, flush, best, ratio);
  printf("%ld -> %ld, %d threads, %ld pairs: A best %.3f ms, B best %.3f ms; ", in, out, omp_get_max_threads(), pairs,
         best[0] * 1e3, best[1] * 1e3);
  report_pairs(ratio, pairs);
  return compare_outputs(ys[0], ys[1], B * out, 1e-5);
}
