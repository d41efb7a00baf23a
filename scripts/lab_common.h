// Shared by the kernel labs' C drivers (scripts/fused_lab.c,
// scripts/projection_lab.c): the clock, the caches flushed, the pairs'
// ratios reported, the two sides' outputs compared.
#ifndef BIFURC_LAB_COMMON_H
#define BIFURC_LAB_COMMON_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

// Reads `n` bytes of `fl` a line at a time: what a run reads is then
// past the caches.
static void flush_caches(const char *fl, long n) {
  static volatile long sink;
  long acc = 0;
  for (long i = 0; i < n; i += 64) acc += fl[i];
  sink += acc;
}

// Runs `pairs` pairs of `run(0, ctx)` (side A) and `run(1, ctx)` (side
// B) in turn, A first in even pairs and B in odd ones, the caches flushed
// (`fl`, `n` bytes) before each run; keeps each side's best time (s) and
// each pair's ratio B / A.
static void time_pairs(long pairs, void (*run)(int, void *), void *ctx, const char *fl, long n, double best[2],
                       double *ratio) {
  best[0] = best[1] = 1e30;
  for (long p = 0; p < pairs; p++) {
    double t[2];
    for (int o = 0; o < 2; o++) {
      int which = (p & 1) ? 1 - o : o;
      flush_caches(fl, n);
      double t0 = now();
      run(which, ctx);
      t[which] = now() - t0;
      if (t[which] < best[which]) best[which] = t[which];
    }
    ratio[p] = t[1] / t[0];
  }
}

// Sorts the pairs' ratios B / A and prints their median and quartiles.
static void report_pairs(double *ratio, long pairs) {
  qsort(ratio, pairs, sizeof(double), by_value);
  printf("B / A median %.3f (quartiles %.3f %.3f)\n", ratio[pairs / 2], ratio[pairs / 4], ratio[(3 * pairs) / 4]);
}

// Prints the largest difference of the sides' `n` outputs; 0 when it
// is within `tol` of the largest output, else 1 (a NaN fails).
static int compare_outputs(const float *a, const float *b, long n, double tol) {
  double diff = 0, big = 0;
  for (long i = 0; i < n; i++) {
    double d = fabs((double)a[i] - b[i]);
    if (!(d <= diff)) diff = d;
    if (fabs(a[i]) > big) big = fabs(a[i]);
  }
  printf("largest output difference %.3g (largest output %.3g)\n", diff, big);
  return diff <= tol * big ? 0 : 1;
}

#endif
