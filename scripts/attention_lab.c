// The fused context attention, prototyped in C, against the CPU step's
// own three kernels (context q·K, the softmax written over the scores,
// context w·V) of one layer, linked from the module the cpu_step bench
// dumps: scripts/attention-lab.sh builds and runs it (see there, and
// docs/DESIGN.md, "Lowering": the fused kernel not yet built).
//
//   attention_lab M_C ROUNDS   (threads: OMP_NUM_THREADS)
//
// b = 32 rows, 16 heads of 64, f32, the decode part empty (m_d = 0) and
// the new token's score far below the others (-300: its weight e^-37).
// Each round runs each side REPS times, K and V flushed from the caches
// (a 512 MiB pass) before every run, and prints both sides' best and
// mean ms; at the end, the largest difference of the two outputs.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

// The step's kernels (names given by the script: QK, SM, WV).
void QK(int64_t, int64_t, int64_t, int64_t, const float *, const float *, float *, int64_t, int64_t);
void SM(int64_t, int64_t, int64_t, float *, float *, float *, int64_t, int64_t);
void WV(int64_t, int64_t, int64_t, int64_t, const float *, const float *, float *, int64_t, int64_t);

#define B 32
#define H 16
#define D 64
#define CHUNK 1024
#define REPS 6
static const float SCALE = 0.125f;  // 1/sqrt(D), as the softmax applies it

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// e^x for x <= 0: range reduction, a degree-6 polynomial, a scaling.
static inline __m512 vexp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// One item: a head's positions z0..z1 (a multiple of 16), 32 rows in the
// lanes (two tiles of 16), q packed [D][32]. Writes per row its D
// unnormalized outputs, its max and its sum (part[32][D + 2]).
static void fused_item(const float *qp, const float *k, const float *v, long z0, long z1, float *part) {
  __attribute__((aligned(64))) float o[D][32];
  __attribute__((aligned(64))) float e[16][32];
  __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, l0 = _mm512_setzero_ps(), l1 = l0;
  memset(o, 0, sizeof o);
  for (long p0 = z0; p0 < z1; p0 += 16) {
    const float *kb = k + p0 * D, *vb = v + p0 * D;
    __m512 s0[16], s1[16];
    // q·K: two passes of 8 positions x both tiles, each K element
    // broadcast once for two FMAs; the next block's K (first pass) and V
    // (second) prefetched a line a step.
    for (int half = 0; half < 2; half++) {
      __m512 a[8], b[8];
      for (int i = 0; i < 8; i++) a[i] = b[i] = _mm512_setzero_ps();
      for (int d = 0; d < D; d++) {
        __m512 q0 = _mm512_load_ps(qp + d * 32), q1 = _mm512_load_ps(qp + d * 32 + 16);
        _mm_prefetch((const char *)((half ? vb : kb) + 16 * D + d * 16), _MM_HINT_T0);
        for (int i = 0; i < 8; i++) {
          __m512 x = _mm512_set1_ps(kb[(half * 8 + i) * D + d]);
          a[i] = _mm512_fmadd_ps(q0, x, a[i]);
          b[i] = _mm512_fmadd_ps(q1, x, b[i]);
        }
      }
      for (int i = 0; i < 8; i++) {
        s0[half * 8 + i] = _mm512_mul_ps(a[i], _mm512_set1_ps(SCALE));
        s1[half * 8 + i] = _mm512_mul_ps(b[i], _mm512_set1_ps(SCALE));
      }
    }
    // The online softmax, a row a lane: the block's max, the old sums'
    // rescaling, the block's exps (kept in a slot for the w·V).
    __m512 n0 = m0, n1 = m1;
    for (int i = 0; i < 16; i++) n0 = _mm512_max_ps(n0, s0[i]), n1 = _mm512_max_ps(n1, s1[i]);
    __m512 al0 = vexp(_mm512_sub_ps(m0, n0)), al1 = vexp(_mm512_sub_ps(m1, n1));
    __m512 sum0 = _mm512_setzero_ps(), sum1 = sum0;
    for (int i = 0; i < 16; i++) {
      __m512 e0 = vexp(_mm512_sub_ps(s0[i], n0)), e1 = vexp(_mm512_sub_ps(s1[i], n1));
      sum0 = _mm512_add_ps(sum0, e0), sum1 = _mm512_add_ps(sum1, e1);
      _mm512_store_ps(e[i], e0), _mm512_store_ps(e[i] + 16, e1);
    }
    l0 = _mm512_fmadd_ps(l0, al0, sum0), l1 = _mm512_fmadd_ps(l1, al1, sum1), m0 = n0, m1 = n1;
    // w·V: 8 head elements x both tiles at a time, each V element
    // broadcast once for two FMAs.
    for (int dc = 0; dc < D; dc += 8) {
      __m512 a[8], b[8];
      for (int i = 0; i < 8; i++) {
        a[i] = _mm512_mul_ps(_mm512_load_ps(o[dc + i]), al0);
        b[i] = _mm512_mul_ps(_mm512_load_ps(o[dc + i] + 16), al1);
      }
      for (int p = 0; p < 16; p++) {
        __m512 e0 = _mm512_load_ps(e[p]), e1 = _mm512_load_ps(e[p] + 16);
        for (int i = 0; i < 8; i++) {
          __m512 x = _mm512_set1_ps(vb[p * D + dc + i]);
          a[i] = _mm512_fmadd_ps(e0, x, a[i]);
          b[i] = _mm512_fmadd_ps(e1, x, b[i]);
        }
      }
      for (int i = 0; i < 8; i++) _mm512_store_ps(o[dc + i], a[i]), _mm512_store_ps(o[dc + i] + 16, b[i]);
    }
  }
  __attribute__((aligned(64))) float mm[32], ll[32];
  _mm512_store_ps(mm, m0), _mm512_store_ps(mm + 16, m1), _mm512_store_ps(ll, l0), _mm512_store_ps(ll + 16, l1);
  for (int r = 0; r < 32; r++) {
    for (int d = 0; d < D; d++) part[r * (D + 2) + d] = o[d][r];
    part[r * (D + 2) + D] = mm[r], part[r * (D + 2) + D + 1] = ll[r];
  }
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s M_C ROUNDS\n", argv[0]);
    return 2;
  }
  long mc = atol(argv[1]);
  int rounds = atoi(argv[2]);
  if (mc < 16 || mc % 16 != 0 || rounds < 1) {
    fprintf(stderr, "M_C: a multiple of 16 from 16; ROUNDS: at least 1\n");
    return 2;
  }
  long items = (mc + CHUNK - 1) / CHUNK;
  float *q = aligned_alloc(64, B * H * D * 4), *k = aligned_alloc(64, H * mc * D * 4), *v = aligned_alloc(64, H * mc * D * 4);
  float *s = aligned_alloc(64, (size_t)B * H * mc * 4), *out = aligned_alloc(64, B * H * D * 4), *fused = aligned_alloc(64, B * H * D * 4);
  float *qp = aligned_alloc(64, H * D * 32 * 4), *parts = aligned_alloc(64, (size_t)H * items * 32 * (D + 2) * 4);
  float dec[1], fresh[B * H];
  srand(1);
  for (long i = 0; i < B * H * D; i++) q[i] = (rand() / (float)RAND_MAX - 0.5f) * 2;
  for (long i = 0; i < H * mc * D; i++) k[i] = (rand() / (float)RAND_MAX - 0.5f) * 2, v[i] = rand() / (float)RAND_MAX;
  long flush = 512L << 20;
  char *f = malloc(flush);
  memset(f, 1, flush);
  volatile long sink = 0;
  for (int round = 0; round < rounds; round++) {
    double best[2] = {1e9, 1e9}, sum[2] = {0, 0};
    for (int side = 0; side < 2; side++) {
      for (int rep = 0; rep < REPS; rep++) {
        long acc = 0;
        for (long i = 0; i < flush; i += 64) acc += f[i];
        sink += acc;
        double t = now();
        if (side == 0) {
          for (int i = 0; i < B * H; i++) fresh[i] = -300.f;
          int n = omp_get_max_threads();
#pragma omp parallel for schedule(static, 1)
          for (int p = 0; p < n; p++) QK(B, mc, 0, mc, k, q, s, p, n);
#pragma omp parallel for schedule(static, 1)
          for (int p = 0; p < n; p++) SM(B, mc, 0, s, dec, fresh, p, n);
#pragma omp parallel for schedule(static, 1)
          for (int p = 0; p < n; p++) WV(B, mc, 0, mc, v, s, out, p, n);
        } else {
          for (int h = 0; h < H; h++)
            for (int d = 0; d < D; d++)
              for (int b = 0; b < B; b++) qp[(h * D + d) * 32 + b] = q[(b * H + h) * D + d];
#pragma omp parallel for schedule(static) collapse(2)
          for (int h = 0; h < H; h++)
            for (long it = 0; it < items; it++) {
              long z0 = it * CHUNK, z1 = z0 + CHUNK < mc ? z0 + CHUNK : mc;
              fused_item(qp + h * D * 32, k + (long)h * mc * D, v + (long)h * mc * D, z0, z1, parts + ((long)h * items + it) * 32 * (D + 2));
            }
#pragma omp parallel for schedule(static)
          for (int row = 0; row < B * H; row++) {
            int b = row / H, h = row % H;
            float mx = -INFINITY, l = 0, o[D] = {0};
            for (long it = 0; it < items; it++) mx = fmaxf(mx, parts[(((long)h * items + it) * 32 + b) * (D + 2) + D]);
            for (long it = 0; it < items; it++) {
              const float *p = parts + (((long)h * items + it) * 32 + b) * (D + 2);
              float w = expf(p[D] - mx);
              l += p[D + 1] * w;
              for (int d = 0; d < D; d++) o[d] += p[d] * w;
            }
            for (int d = 0; d < D; d++) fused[row * D + d] = o[d] / l;
          }
        }
        t = now() - t;
        best[side] = t < best[side] ? t : best[side];
        sum[side] += t;
      }
    }
    printf("round %d, m_c %ld, %d threads: kernels %.2f ms best (%.2f mean), fused %.2f (%.2f)\n", round + 1, mc,
           omp_get_max_threads(), best[0] * 1e3, sum[0] / REPS * 1e3, best[1] * 1e3, sum[1] / REPS * 1e3);
  }
  double diff = 0, most = 0;
  for (long i = 0; i < B * H * D; i++) diff = fmax(diff, fabs(out[i] - fused[i])), most = fmax(most, fabs(out[i]));
  printf("largest difference of the outputs: %.3e (largest output %.3f)\n", diff, most);
  return diff <= 1e-4 * most ? 0 : 1;
}
