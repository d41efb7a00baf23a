// A C prototype of packing x for the weight projections (docs/DESIGN.md,
// "Lowering"): the narrow tile of the step's projections (6 rows of x ×
// 16 outputs, 12 accumulators; src/lower/emit/registers.rs) reading x
// packed per tile, `[tile][IN][6]` (BLIS's packed A: one stream of x a
// tile instead of 6), against reading it as the step does, row by row
// `[row][IN]`. Not the compiled kernel: the same loop written in C (here
// 1.05-1.11x packed; the compiled kernel edited the same way gained
// about 2%, so packing was not built).
//
//   gcc -O3 -march=native scripts/packed_x_lab.c -o /tmp/packed_x_lab
//   OMP_NUM_THREADS=1 /tmp/packed_x_lab IN OUT PAIRS    (IN 2816, OUT 1024: the MLP's down projection)
//
// 36 rows (6 whole tiles) of IN inputs, OUT outputs (a multiple of 64),
// f32, W in panels `[OUT / 64, IN, 64]` walked panel, stripe of 16, tile,
// as the step walks them; one thread. Side A packs x (its time counted)
// and reads it packed; side B reads x as rows. Timed in pairs
// (lab_common.h), W flushed before each run; prints both sides' best, the
// median and quartiles of B / A (above 1: packed faster), and the largest
// difference of the outputs (the same sums in the same order: 0).
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>

#include "lab_common.h"

#define ROWS 36
#define TILE 6
#define PANEL 64

// One tile: `acc[r] += x(r, k) · W[k][0..16]` over k, x(r, k) at
// `x[r · rs + k · ks]`; W's stripe rows `ws` floats apart; the 6 × 16
// outputs stored `os` floats apart.
static void tile(const float *x, long rs, long ks, long in, const float *w, long ws, float *out, long os) {
  __m256 a[TILE][2];
  for (int r = 0; r < TILE; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (long k = 0; k < in; k++) {
    __m256 w0 = _mm256_load_ps(w + k * ws), w1 = _mm256_load_ps(w + k * ws + 8);
    const float *xk = x + k * ks;
#pragma GCC unroll 6
    for (int r = 0; r < TILE; r++) {
      __m256 b = _mm256_broadcast_ss(xk + r * rs);
      a[r][0] = _mm256_fmadd_ps(b, w0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(b, w1, a[r][1]);
    }
  }
  for (int r = 0; r < TILE; r++) {
    _mm256_storeu_ps(out + r * os, a[r][0]);
    _mm256_storeu_ps(out + r * os + 8, a[r][1]);
  }
}

struct operands {
  long in, out;
  const float *w, *x;
  float *packed, *ys[2];
};

// Side 0 packs x and reads it packed, side 1 reads x as rows.
static void side(int which, void *ctx) {
  struct operands *o = ctx;
  long in = o->in, out = o->out, tiles = ROWS / TILE;
  if (which == 0) {
    for (long t = 0; t < tiles; t++)
      for (long k = 0; k < in; k++)
        for (int r = 0; r < TILE; r++) o->packed[(t * in + k) * TILE + r] = o->x[(t * TILE + r) * in + k];
  }
  for (long p = 0; p < out / PANEL; p++)
    for (long s = 0; s < PANEL / 16; s++) {
      const float *w = o->w + p * in * PANEL + s * 16;
      for (long t = 0; t < tiles; t++) {
        float *y = o->ys[which] + t * TILE * out + p * PANEL + s * 16;
        if (which == 0) {
          tile(o->packed + t * in * TILE, 1, TILE, in, w, PANEL, y, out);
        } else {
          tile(o->x + t * TILE * in, in, 1, in, w, PANEL, y, out);
        }
      }
    }
}

int main(int argc, char **argv) {
  long in = argc > 1 ? atol(argv[1]) : 0, out = argc > 2 ? atol(argv[2]) : 0, pairs = argc > 3 ? atol(argv[3]) : 0;
  if (in < 1 || out < PANEL || out % PANEL != 0 || pairs < 1) {
    fprintf(stderr, "usage: packed_x_lab IN OUT PAIRS (OUT a multiple of %d)\n", PANEL);
    return 2;
  }
  long flush = 128L << 20;
  float *w = aligned_alloc(64, in * out * 4), *x = aligned_alloc(64, ROWS * in * 4);
  float *packed = aligned_alloc(64, ROWS * in * 4);
  float *ys[2] = {aligned_alloc(64, ROWS * out * 4), aligned_alloc(64, ROWS * out * 4)};
  char *fl = malloc(flush);
  double *ratio = malloc(pairs * sizeof(double));
  if (!w || !x || !packed || !ys[0] || !ys[1] || !fl || !ratio) {
    fprintf(stderr, "packed_x_lab: out of memory\n");
    return 1;
  }
  srand(1);
  for (long i = 0; i < in * out; i++) w[i] = (float)rand() / RAND_MAX - 0.5f;
  for (long i = 0; i < ROWS * in; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
  for (long i = 0; i < flush; i++) fl[i] = (char)i;
  struct operands o = {in, out, w, x, packed, {ys[0], ys[1]}};
  double best[2];
  time_pairs(pairs, side, &o, fl, flush, best, ratio);
  printf("%ld -> %ld, %d rows, %ld pairs: A (x packed) best %.3f ms, B (x as rows) best %.3f ms; ", in, out, ROWS,
         pairs, best[0] * 1e3, best[1] * 1e3);
  report_pairs(ratio, pairs);
  return compare_outputs(ys[0], ys[1], ROWS * out, 0.0);
}
