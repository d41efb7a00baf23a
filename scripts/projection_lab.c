// A weight projection of the CPU step (`x @ Wᵀ` from W kept in panels,
// src/lower/cpu/panels.rs), two builds of it side by side, timed in
// pairs: scripts/projection-lab.sh builds and runs it (see there).
//
//   projection_lab IN OUT PAIRS [DTYPE] [ROWS]   (threads: OMP_NUM_THREADS)
//
// b = ROWS (32 unless given) rows of IN inputs, OUT outputs (a multiple of 64), in DTYPE (f32,
// or bf16 or f16: W, x and the output); W in panels `[OUT / 64, IN, 64]`. Each pair runs both sides once, in turn (A
// first in even pairs, B first in odd ones), W flushed from the caches (a
// 128 MiB pass) before every run, as the step finds it (its weights are
// more than the caches hold). Prints both sides' best, the median and
// quartiles of B / A over the pairs, and the largest difference of the
// two outputs (failing past 1e-5 of the largest output in f32, 8e-3 in
// bf16 or f16: a bf16 output's rounding is 2^-9 of it).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lab_common.h"

typedef float F;
typedef int64_t I;

// The kernels take W, x and the output as pointers to their elements
// (f32 or bf16).
void A_proj(I, I, I, const void *, const void *, void *, I, I);
void B_proj(I, I, I, const void *, const void *, void *, I, I);

// The rows of x (b).
static long B = 32;



// W, x and each side's output, for `time_pairs`.
struct operands {
  const void *w, *x;
  void *ys[2];
};

// The element types: f32, bf16 (the top half of an f32), f16.
enum kind { F32, BF16, F16 };

// `n` random values in [-0.5, 0.5] as `kind`.
static void fill(void *to, long n, enum kind kind) {
  for (long i = 0; i < n; i++) {
    F f = rand() / (F)RAND_MAX - 0.5f;
    if (kind == F32) {
      ((F *)to)[i] = f;
    } else if (kind == BF16) {
      uint32_t u;
      memcpy(&u, &f, 4);
      ((uint16_t *)to)[i] = (uint16_t)(u >> 16);
    } else {
      _Float16 h = (_Float16)f;
      memcpy(&((uint16_t *)to)[i], &h, 2);
    }
  }
}

// `n` elements of DTYPE widened to f32 into `out`.
static void widen(const void *from, F *out, long n, enum kind kind) {
  for (long i = 0; i < n; i++) {
    if (kind == F32) {
      out[i] = ((const F *)from)[i];
    } else if (kind == BF16) {
      uint32_t u = (uint32_t)((const uint16_t *)from)[i] << 16;
      memcpy(&out[i], &u, 4);
    } else {
      _Float16 h;
      memcpy(&h, &((const uint16_t *)from)[i], 2);
      out[i] = (F)h;
    }
  }
}

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
  const char *dtype = argc > 4 ? argv[4] : "f32";
  if (argc > 5) B = atol(argv[5]);
  int known = !strcmp(dtype, "f32") || !strcmp(dtype, "bf16") || !strcmp(dtype, "f16");
  enum kind kind = !strcmp(dtype, "f32") ? F32 : !strcmp(dtype, "bf16") ? BF16 : F16;
  int size = kind == F32 ? 4 : 2;
  if (in < 1 || out < 64 || out % 64 != 0 || pairs < 1 || !known || B < 1) {
    fprintf(stderr, "usage: projection_lab IN OUT PAIRS [f32|bf16|f16] [ROWS] (OUT a multiple of 64)\n");
    return 2;
  }
  void *w = aligned_alloc(64, in * out * size), *x = aligned_alloc(64, B * in * size);
  void *ys[2] = {aligned_alloc(64, B * out * size), aligned_alloc(64, B * out * size)};
  F *wide[2] = {malloc(B * out * sizeof(F)), malloc(B * out * sizeof(F))};
  long flush = 128L << 20;
  char *fl = malloc(flush);
  double *ratio = malloc(pairs * sizeof(double));
  if (!w || !x || !ys[0] || !ys[1] || !wide[0] || !wide[1] || !fl || !ratio) {
    fprintf(stderr, "projection_lab: out of memory\n");
    return 1;
  }
  srand(1);
  fill(w, in * out, kind);
  fill(x, B * in, kind);
  for (long i = 0; i < flush; i++) fl[i] = 1;
  struct operands ops = {w, x, {ys[0], ys[1]}};
  double best[2];
  time_pairs(pairs, side, &ops, fl, flush, best, ratio);
  printf("%ld -> %ld, %s, %d threads, %ld pairs: A best %.3f ms, B best %.3f ms; ", in, out, dtype,
         omp_get_max_threads(), pairs, best[0] * 1e3, best[1] * 1e3);
  report_pairs(ratio, pairs);
  widen(ys[0], wide[0], B * out, kind);
  widen(ys[1], wide[1], B * out, kind);
  return compare_outputs(wide[0], wide[1], B * out, kind == F32 ? 1e-5 : 8e-3);
}
