/* Fused CPU selective scan, compiled on first use by scan_native.py (once per scalar type: -DSCAN_DOUBLE selects
 * double, float otherwise).
 *
 * Channels are scanned in blocks of BLOCK lanes that share B and C, so a block's state is an (N, BLOCK) plane and every
 * inner loop runs over contiguous lanes. The hot loops are written with explicit vectors of VL lanes (GCC / clang
 * vector extensions, any target): for each vector of lanes the loop over the N states runs inside, so the sums over n
 * (y_t, and the backward's du / ddelta terms) stay in registers and each step is one fused pass (decay, state update,
 * output).
 *
 * Forward: a task is one (batch, group, block); only y, the last state and one checkpoint per CHUNK steps are written.
 * Backward: a task is one (batch, group, part of the group's blocks); chunks are visited in reverse, a chunk's decays
 * and states are recomputed from its checkpoint and the adjoint is swept back through them. dB and dC (sums over the
 * group's channels) are accumulated per part in (CHUNK, N, BLOCK) planes, summed over the lanes once per chunk into
 * the part's own (L, N) buffer, and the parts are summed by the caller: race-free and deterministic.
 *
 * Every step multiplies by exp(delta * A) directly (no exp(-cumsum) closed form), so any delta / A is stable.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32 /* lanes per block: 4 AVX2 float vectors */
#define CHUNK 16 /* steps between checkpoints */

#ifdef SCAN_DOUBLE
typedef double scalar;
typedef int64_t bits_t;
#else
typedef float scalar;
typedef int32_t bits_t;
#endif
#define VBYTES 32
#define VL ((int)(VBYTES / sizeof(scalar)))
typedef scalar vec __attribute__((vector_size(VBYTES)));
typedef bits_t ivec __attribute__((vector_size(VBYTES)));
static inline vec vload(const scalar *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(scalar *p, vec v) { memcpy(p, &v, sizeof v); }
static inline vec vsplat(scalar s) { return (vec){0} + s; }

/* exp(x): x = k ln2 + r with |r| <= ln2/2, a Taylor polynomial for exp(r) (degree 12 for double, truncation < 2e-16;
 * degree 7 for float, < 1e-8, below float rounding), and 2^k assembled in the exponent bits. x is clamped first
 * (double [-708, 710], float [-87, 89]): below the range the result is exp(low) (~3e-308 / ~1.6e-38), an absolute
 * error far below any state change; near the top k reaches the maximum exponent, whose bits are inf, so overflow gives
 * inf. The clamps are written so that NaN passes them, and NaN stays NaN. */
static inline vec vexp(vec x) {
#ifdef SCAN_DOUBLE
  const scalar low = -708.0, high = 710.0, log2e = 1.4426950408889634, magic = 6755399441055744.0;
  const scalar ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
#else
  const scalar low = -87.0f, high = 89.0f, log2e = 1.44269504f, magic = 12582912.0f;
  const scalar ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
#endif
  ivec below = x < vsplat(low), above = x > vsplat(high);
  vec xi = (vec)((below & (ivec)vsplat(low)) | (~below & (ivec)x));
  xi = (vec)((above & (ivec)vsplat(high)) | (~above & (ivec)xi));
  vec k = (xi * log2e + magic) - magic;
  vec r = (xi - k * ln2_hi) - k * ln2_lo;
#ifdef SCAN_DOUBLE
  vec p = vsplat(1.0 / 479001600.0);
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
  ivec bits = (__builtin_convertvector(k, ivec) + 1023) << 52;
#else
  vec p = vsplat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  ivec bits = (__builtin_convertvector(k, ivec) + 127) << 23;
#endif
  return p * (vec)bits;
}

/* out[k][w] = src[row0 + w][t0 + k] for w < width; lanes >= width are zero. src rows have `length` steps.
 * Each row is a separate stream that the hardware prefetchers do not follow, so the segment this task reads next
 * (t0 + next_offset, one chunk later or earlier) is prefetched now. */
static void load_block(const scalar *restrict src, int64_t row0, int64_t width, int64_t length, int64_t t0,
                       int64_t steps, int64_t next_offset, scalar *restrict out) {
  memset(out, 0, sizeof(scalar) * CHUNK * BLOCK);
  const int prefetch = t0 + next_offset >= 0 && t0 + next_offset < length;
  for (int64_t w = 0; w < width; w++) {
    const scalar *row = src + (row0 + w) * length + t0;
    if (prefetch) __builtin_prefetch(row + next_offset);
    for (int64_t k = 0; k < steps; k++) out[k * BLOCK + w] = row[k];
  }
}

static void store_block(const scalar *restrict values, int64_t row0, int64_t width, int64_t length, int64_t t0,
                        int64_t steps, scalar *restrict dst) {
  for (int64_t w = 0; w < width; w++) {
    scalar *row = dst + (row0 + w) * length + t0;
    for (int64_t k = 0; k < steps; k++) row[k] = values[k * BLOCK + w];
  }
}

/* out[n][w] = A[d0 + w][n]; lanes >= width get 0 (decay 1, which keeps their zero state zero). */
static void load_A(const scalar *restrict A, int64_t d0, int64_t width, int64_t n_state, scalar *restrict out) {
  memset(out, 0, sizeof(scalar) * n_state * BLOCK);
  for (int64_t w = 0; w < width; w++)
    for (int64_t n = 0; n < n_state; n++) out[n * BLOCK + w] = A[(d0 + w) * n_state + n];
}

/* dt, ut: the block's delta and u for steps t0..t0+steps-1 (see load_block); dtu = dt * u. */
static void load_chunk_inputs(const scalar *restrict delta, const scalar *restrict u, int64_t row0, int64_t width,
                              int64_t length, int64_t t0, int64_t steps, int64_t next_offset, scalar *restrict dt,
                              scalar *restrict ut, scalar *restrict dtu) {
  load_block(delta, row0, width, length, t0, steps, next_offset, dt);
  load_block(u, row0, width, length, t0, steps, next_offset, ut);
  for (int64_t i = 0; i < steps * BLOCK; i++) dtu[i] = dt[i] * ut[i];
}

/* One step of the recurrence for VL lanes of one state: h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t. Shared by the
 * forward and the backward's recomputation, so both compute the same states. */
static inline vec advance(vec h_prev, vec dt_v, vec A_v, vec dtu_v, scalar b_n, vec *decay) {
  *decay = vexp(dt_v * A_v);
  return *decay * h_prev + dtu_v * b_n;
}

/* u, delta, y: (batch, dim, length); A: (dim, N); Bt, Ct: (batch, groups, length, N); last_state: (batch, dim, N);
 * checkpoints: (batch, groups, blocks_per_group, n_chunks, N, BLOCK), written when save_checkpoints.
 * Runs tasks [task_begin, task_end) of batch * groups * blocks_per_group. Returns 0, or -1 when out of memory. */
static int scan_forward_tasks(const scalar *u, const scalar *delta, const scalar *A, const scalar *Bt,
                              const scalar *Ct, int64_t batch, int64_t dim, int64_t length, int64_t n_state,
                              int64_t groups, int save_checkpoints, scalar *y, scalar *last_state, scalar *checkpoints,
                              int64_t task_begin, int64_t task_end) {
  const int64_t group_size = dim / groups, blocks_per_group = (group_size + BLOCK - 1) / BLOCK;
  const int64_t n_chunks = (length + CHUNK - 1) / CHUNK, plane = n_state * BLOCK;
  scalar *buffer = malloc(sizeof(scalar) * (4 * CHUNK * BLOCK + 2 * plane));
  if (!buffer) return -1;
  scalar *restrict dt = buffer, *restrict ut = dt + CHUNK * BLOCK, *restrict dtu = ut + CHUNK * BLOCK;
  scalar *restrict yb = dtu + CHUNK * BLOCK, *restrict Ab = yb + CHUNK * BLOCK, *restrict h = Ab + plane;
  for (int64_t task = task_begin; task < task_end; task++) {
    const int64_t b = task / (groups * blocks_per_group), g = (task / blocks_per_group) % groups;
    const int64_t d0 = g * group_size + (task % blocks_per_group) * BLOCK;
    const int64_t width = (g + 1) * group_size - d0 < BLOCK ? (g + 1) * group_size - d0 : BLOCK;
    const scalar *Bg = Bt + (b * groups + g) * length * n_state, *Cg = Ct + (b * groups + g) * length * n_state;
    scalar *ck = checkpoints + task * n_chunks * plane;  /* tasks are numbered like the checkpoint blocks */
    load_A(A, d0, width, n_state, Ab);
    memset(h, 0, sizeof(scalar) * plane);
    for (int64_t c = 0; c < n_chunks; c++) {
      const int64_t t0 = c * CHUNK, steps = length - t0 < CHUNK ? length - t0 : CHUNK;
      if (save_checkpoints) memcpy(ck + c * plane, h, sizeof(scalar) * plane);  /* state before step t0 */
      load_chunk_inputs(delta, u, b * dim + d0, width, length, t0, steps, CHUNK, dt, ut, dtu);
      for (int64_t k = 0; k < steps; k++) {
        const scalar *restrict dt_k = dt + k * BLOCK, *restrict dtu_k = dtu + k * BLOCK;
        const scalar *B_t = Bg + (t0 + k) * n_state, *C_t = Cg + (t0 + k) * n_state;
        for (int v = 0; v < BLOCK; v += VL) {  /* y_t for VL lanes accumulates over n in a register */
          const vec dt_v = vload(dt_k + v), dtu_v = vload(dtu_k + v);
          vec y_v = vsplat(0);
          for (int64_t n = 0; n < n_state; n++) {
            vec decay;
            const vec hv = advance(vload(h + n * BLOCK + v), dt_v, vload(Ab + n * BLOCK + v), dtu_v, B_t[n], &decay);
            vstore(h + n * BLOCK + v, hv);
            y_v += hv * C_t[n];
          }
          vstore(yb + k * BLOCK + v, y_v);
        }
      }
      store_block(yb, b * dim + d0, width, length, t0, steps, y);
    }
    for (int64_t w = 0; w < width; w++)
      for (int64_t n = 0; n < n_state; n++) last_state[(b * dim + d0 + w) * n_state + n] = h[n * BLOCK + w];
  }
  free(buffer);
  return 0;
}

/* Adjoint sweep. dy: (batch, dim, length); dlast: (batch, dim, N); checkpoints from scan_forward; du, ddelta:
 * (batch, dim, length); dA_per_batch: (batch, dim, N); dB_parts, dC_parts: (batch, groups, parts_per_group, length, N).
 * Runs tasks [task_begin, task_end) of batch * groups * parts_per_group. Returns 0, or -1 when out of memory. */
static int scan_backward_tasks(const scalar *u, const scalar *delta, const scalar *A, const scalar *Bt,
                               const scalar *Ct, const scalar *dy, const scalar *dlast, const scalar *checkpoints,
                               int64_t batch, int64_t dim, int64_t length, int64_t n_state, int64_t groups,
                               int64_t parts_per_group, scalar *du, scalar *ddelta, scalar *dA_per_batch,
                               scalar *dB_parts, scalar *dC_parts, int64_t task_begin, int64_t task_end) {
  const int64_t group_size = dim / groups, blocks_per_group = (group_size + BLOCK - 1) / BLOCK;
  const int64_t blocks_per_part = (blocks_per_group + parts_per_group - 1) / parts_per_group;
  const int64_t n_chunks = (length + CHUNK - 1) / CHUNK, plane = n_state * BLOCK;
  const int64_t row = CHUNK * BLOCK;
  scalar *buffer = malloc(sizeof(scalar) * (6 * row + plane + (CHUNK + 1) * plane + 3 * CHUNK * plane +
                                            2 * blocks_per_part * plane));
  if (!buffer) return -1;
  scalar *restrict dt = buffer, *restrict ut = dt + row, *restrict dtu = ut + row, *restrict dyt = dtu + row;
  scalar *restrict sum_Agah = dyt + row, *restrict sum_gB = sum_Agah + row, *restrict Ab = sum_gB + row;
  scalar *restrict states = Ab + plane, *restrict decays = states + (CHUNK + 1) * plane;
  scalar *restrict dB_acc = decays + CHUNK * plane, *restrict dC_acc = dB_acc + CHUNK * plane;
  scalar *restrict adjoint = dC_acc + CHUNK * plane, *restrict grad_A = adjoint + blocks_per_part * plane;
  for (int64_t task = task_begin; task < task_end; task++) {
    const int64_t b = task / (groups * parts_per_group), g = (task / parts_per_group) % groups;
    const int64_t part = task % parts_per_group, first_block = part * blocks_per_part;
    int64_t n_blocks = blocks_per_group - first_block < blocks_per_part ? blocks_per_group - first_block
                                                                          : blocks_per_part;
    if (n_blocks < 0) n_blocks = 0;
    const scalar *Bg = Bt + (b * groups + g) * length * n_state, *Cg = Ct + (b * groups + g) * length * n_state;
    scalar *dB_out = dB_parts + ((b * groups + g) * parts_per_group + part) * length * n_state;
    scalar *dC_out = dC_parts + ((b * groups + g) * parts_per_group + part) * length * n_state;
    /* adjoint carried into a chunk from the future (a_{t+1} g_{t+1}, dlast at the end), one plane per block */
    memset(adjoint, 0, sizeof(scalar) * 2 * blocks_per_part * plane);  /* and grad_A */
    for (int64_t j = 0; j < n_blocks; j++) {
      const int64_t d0 = g * group_size + (first_block + j) * BLOCK;
      const int64_t width = (g + 1) * group_size - d0 < BLOCK ? (g + 1) * group_size - d0 : BLOCK;
      for (int64_t w = 0; w < width; w++)
        for (int64_t n = 0; n < n_state; n++)
          adjoint[j * plane + n * BLOCK + w] = dlast[(b * dim + d0 + w) * n_state + n];
    }
    for (int64_t c = n_chunks - 1; c >= 0; c--) {
      const int64_t t0 = c * CHUNK, steps = length - t0 < CHUNK ? length - t0 : CHUNK;
      memset(dB_acc, 0, sizeof(scalar) * 2 * CHUNK * plane);  /* and dC_acc */
      for (int64_t j = 0; j < n_blocks; j++) {
        const int64_t blk = first_block + j, d0 = g * group_size + blk * BLOCK;
        const int64_t width = (g + 1) * group_size - d0 < BLOCK ? (g + 1) * group_size - d0 : BLOCK;
        const scalar *ck = checkpoints + ((b * groups + g) * blocks_per_group + blk) * n_chunks * plane;
        scalar *restrict adj_j = adjoint + j * plane, *restrict gA_j = grad_A + j * plane;
        load_chunk_inputs(delta, u, b * dim + d0, width, length, t0, steps, -CHUNK, dt, ut, dtu);
        load_block(dy, b * dim + d0, width, length, t0, steps, -CHUNK, dyt);
        load_A(A, d0, width, n_state, Ab);
        /* recompute the chunk's decays and states from its checkpoint */
        memcpy(states, ck + c * plane, sizeof(scalar) * plane);
        for (int64_t k = 0; k < steps; k++) {
          const scalar *B_t = Bg + (t0 + k) * n_state;
          for (int v = 0; v < BLOCK; v += VL) {
            const vec dt_v = vload(dt + k * BLOCK + v), dtu_v = vload(dtu + k * BLOCK + v);
            for (int64_t n = 0; n < n_state; n++) {
              const int64_t o = k * plane + n * BLOCK + v;
              vec decay;
              vstore(states + plane + o, advance(vload(states + o), dt_v, vload(Ab + n * BLOCK + v), dtu_v, B_t[n],
                                                 &decay));
              vstore(decays + o, decay);
            }
          }
        }
        /* g_t = adjoint_{t+1} + dy_t C_t; adjoint_t = a_t g_t; gah_t = g_t a_t h_{t-1} feeds dA and ddelta; the sums
         * over n (sum_n A g a h_{t-1} and sum_n g B) stay in registers and give du and ddelta directly */
        for (int64_t k = steps - 1; k >= 0; k--) {
          const scalar *B_t = Bg + (t0 + k) * n_state, *C_t = Cg + (t0 + k) * n_state;
          for (int v = 0; v < BLOCK; v += VL) {
            const vec dy_v = vload(dyt + k * BLOCK + v), dt_v = vload(dt + k * BLOCK + v);
            const vec dtu_v = vload(dtu + k * BLOCK + v);
            vec sum_Agah_v = vsplat(0), sum_gB_v = vsplat(0);
            for (int64_t n = 0; n < n_state; n++) {
              const int64_t o = n * BLOCK + v, ko = k * plane + o;
              const vec g = vload(adj_j + o) + dy_v * C_t[n];
              const vec ag = vload(decays + ko) * g;
              const vec gah = ag * vload(states + ko);
              vstore(adj_j + o, ag);
              sum_Agah_v += vload(Ab + o) * gah;
              vstore(gA_j + o, vload(gA_j + o) + dt_v * gah);
              sum_gB_v += g * B_t[n];
              vstore(dB_acc + ko, vload(dB_acc + ko) + g * dtu_v);
              vstore(dC_acc + ko, vload(dC_acc + ko) + dy_v * vload(states + plane + ko));
            }
            /* du = dt sum_n g B ; ddelta = sum_n A g a h_{t-1} + u sum_n g B */
            vstore(sum_gB + k * BLOCK + v, dt_v * sum_gB_v);
            vstore(sum_Agah + k * BLOCK + v, sum_Agah_v + vload(ut + k * BLOCK + v) * sum_gB_v);
          }
        }
        store_block(sum_gB, b * dim + d0, width, length, t0, steps, du);
        store_block(sum_Agah, b * dim + d0, width, length, t0, steps, ddelta);
      }
      for (int64_t k = 0; k < steps; k++)
        for (int64_t n = 0; n < n_state; n++) {
          const scalar *dB_kn = dB_acc + k * plane + n * BLOCK, *dC_kn = dC_acc + k * plane + n * BLOCK;
          scalar sb = dB_kn[0], sc = dC_kn[0];
          for (int w = 1; w < BLOCK; w++) {
            sb += dB_kn[w];
            sc += dC_kn[w];
          }
          dB_out[(t0 + k) * n_state + n] = sb;
          dC_out[(t0 + k) * n_state + n] = sc;
        }
    }
    for (int64_t j = 0; j < n_blocks; j++) {
      const int64_t d0 = g * group_size + (first_block + j) * BLOCK;
      const int64_t width = (g + 1) * group_size - d0 < BLOCK ? (g + 1) * group_size - d0 : BLOCK;
      for (int64_t w = 0; w < width; w++)
        for (int64_t n = 0; n < n_state; n++)
          dA_per_batch[(b * dim + d0 + w) * n_state + n] = grad_A[j * plane + n * BLOCK + w];
    }
  }
  free(buffer);
  return 0;
}

/* Entry points: the tasks [0, n_tasks) split into one contiguous range per thread. Built with OpenMP, the ranges run
 * in OpenMP's thread pool, which is torch's own when torch uses GNU OpenMP (the library is found by its soname), so
 * torch's workers, still spinning after its last parallel op, pick the work up instead of competing with extra
 * threads for the cores. Without OpenMP the caller passes one range per call and runs the calls on its own threads. */
int scan_block(void) { return BLOCK; }
int scan_chunk(void) { return CHUNK; }

int scan_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

/* The task range [begin, end) split into `threads` contiguous parts: part i starts here. */
static inline int64_t part_start(int64_t begin, int64_t end, int i, int threads) {
  return begin + (end - begin) * i / threads;
}

/* With one thread there is no parallel region at all: an OpenMP pool inherited through fork() must not be touched. */
int scan_forward(const scalar *u, const scalar *delta, const scalar *A, const scalar *Bt, const scalar *Ct,
                 int64_t batch, int64_t dim, int64_t length, int64_t n_state, int64_t groups, int save_checkpoints,
                 scalar *y, scalar *last_state, scalar *checkpoints, int64_t task_begin, int64_t task_end,
                 int threads) {
  if (threads <= 1)
    return scan_forward_tasks(u, delta, A, Bt, Ct, batch, dim, length, n_state, groups, save_checkpoints, y,
                              last_state, checkpoints, task_begin, task_end);
  int failed = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : failed)
#endif
  for (int i = 0; i < threads; i++)
    failed |= scan_forward_tasks(u, delta, A, Bt, Ct, batch, dim, length, n_state, groups, save_checkpoints, y,
                                 last_state, checkpoints, part_start(task_begin, task_end, i, threads),
                                 part_start(task_begin, task_end, i + 1, threads)) != 0;
  return failed ? -1 : 0;
}

int scan_backward(const scalar *u, const scalar *delta, const scalar *A, const scalar *Bt, const scalar *Ct,
                  const scalar *dy, const scalar *dlast, const scalar *checkpoints, int64_t batch, int64_t dim,
                  int64_t length, int64_t n_state, int64_t groups, int64_t parts_per_group, scalar *du,
                  scalar *ddelta, scalar *dA_per_batch, scalar *dB_parts, scalar *dC_parts, int64_t task_begin,
                  int64_t task_end, int threads) {
  if (threads <= 1)
    return scan_backward_tasks(u, delta, A, Bt, Ct, dy, dlast, checkpoints, batch, dim, length, n_state, groups,
                               parts_per_group, du, ddelta, dA_per_batch, dB_parts, dC_parts, task_begin, task_end);
  int failed = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : failed)
#endif
  for (int i = 0; i < threads; i++)
    failed |= scan_backward_tasks(u, delta, A, Bt, Ct, dy, dlast, checkpoints, batch, dim, length, n_state, groups,
                                  parts_per_group, du, ddelta, dA_per_batch, dB_parts, dC_parts,
                                  part_start(task_begin, task_end, i, threads),
                                  part_start(task_begin, task_end, i + 1, threads)) != 0;
  return failed ? -1 : 0;
}
