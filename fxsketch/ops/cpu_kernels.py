"""Fused CPU loops for the quantized saves (the group range, the stochastic-rounding pack and the
unpack) and for lean ReLU (output and 1-bit mask; the gradient from the mask), each in one pass
over the tensor, compiled from the C below once per machine.

The torch path of :mod:`fxsketch.ops.quant` runs six elementwise passes per block and draws its
uniforms from torch's generator: on a 2-core CPU it packed a 16x256x56x56 BatchNorm input in 63 ms
and unpacked it in 34 ms (the BatchNorm's own forward and backward: 104 ms), which priced the
quantized norms above replaying them. These loops do the same arithmetic, operation for operation
in fp32 (no fused multiply-add, ``-ffp-contract=off``), so their codes and dequantized values
are bit for bit the torch path's (``tests/test_cpu_kernels.py``); ``tools/bench_quant_pack.py``
times both.

The uniforms of both paths come from a counter-based hash, not a generator: element ``i`` of the
packed order takes 16 bits of ``mix32((i >> 1) + key)`` (low half for even ``i``, high half for
odd), ``key`` from the op's seed. The codes then do not depend on the block sizes or the thread
count.

Compiled with the C compiler ``$CC`` (else ``cc`` or ``gcc``) into ``$FXSKETCH_CACHE/kernels`` (default
``~/.cache/fxsketch/kernels``), keyed by the source, the compiler and the CPU. Where there is no
compiler, or ``FXSKETCH_CPU_KERNELS=0``, :func:`library` is None and the ops take the torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .probes import mix32

__all__ = ["library", "available", "group_range", "pack", "unpack", "mix32_key", "serves", "bn_sums", "bn_dx", "relu_mask", "relu_backward"]

log = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>

/* lowbias32, as the probes hash (fxsketch.ops.probes.mix32) */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}

/* x viewed as (L, M, T), contiguous; the statistics are (L, T); every loop below walks runs of
   elements that share one row of statistics (T > 1) or one statistic (T == 1). */

#define LANES 16   /* independent minima/maxima per row (T == 1): the loop vectorizes */
#define WRAP_T 16  /* rows of statistics shorter than this are kept on the stack (and packed by
                      pack_wrap, below) */

/* The row's statistics in locals, not through lo/step, which the compiler must assume alias x
   (a store and a reload per element; docs/quant.md, "Short rows and single statistics"). */
void fx_range(const float *x, float *lo, float *step, int64_t L, int64_t M, int64_t T,
              float levels, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t l = 0; l < L; l++) {
        float *mn = lo + l * T, *mx = step + l * T;
        const float *restrict row = x + l * M * T;
        if (T == 1) {
            float a[LANES], b[LANES];
            int64_t m = 0;
            for (int k = 0; k < LANES; k++) { a[k] = row[0]; b[k] = row[0]; }
            for (; m + LANES <= M; m += LANES)
                for (int k = 0; k < LANES; k++) {
                    float v = row[m + k];
                    a[k] = v < a[k] ? v : a[k];
                    b[k] = v > b[k] ? v : b[k];
                }
            for (; m < M; m++) {
                float v = row[m];
                a[0] = v < a[0] ? v : a[0];
                b[0] = v > b[0] ? v : b[0];
            }
            for (int k = 1; k < LANES; k++) {
                a[0] = a[k] < a[0] ? a[k] : a[0];
                b[0] = b[k] > b[0] ? b[k] : b[0];
            }
            mn[0] = a[0]; mx[0] = b[0];
        } else if (T < WRAP_T) {
            float a[WRAP_T], b[WRAP_T];
            for (int64_t t = 0; t < T; t++) { a[t] = row[t]; b[t] = row[t]; }
            for (int64_t m = 0; m < M; m++) {
                const float *r = row + m * T;
                for (int64_t t = 0; t < T; t++) {
                    float v = r[t];
                    a[t] = v < a[t] ? v : a[t];
                    b[t] = v > b[t] ? v : b[t];
                }
            }
            for (int64_t t = 0; t < T; t++) { mn[t] = a[t]; mx[t] = b[t]; }
        } else {
            float *restrict rn = mn, *restrict rx = mx;
            for (int64_t t = 0; t < T; t++) { rn[t] = row[t]; rx[t] = row[t]; }
            for (int64_t m = 0; m < M; m++) {
                const float *r = row + m * T;
                for (int64_t t = 0; t < T; t++) {
                    float v = r[t];
                    rn[t] = v < rn[t] ? v : rn[t];
                    rx[t] = v > rx[t] ? v : rx[t];
                }
            }
        }
        for (int64_t t = 0; t < T; t++) {
            float s = (mx[t] - mn[t]) / levels;
            mx[t] = s > 0.0f ? s : 1.0f;
        }
    }
}

#define CHUNK 16384  /* elements per task: even, so a 4-bit byte never spans two tasks */

static inline int64_t run_end(int64_t i, int64_t e, int64_t M, int64_t T) {
    int64_t l = i / (M * T), stop = T == 1 ? (l + 1) * M : i + (T - i % T);
    return stop < e ? stop : e;
}

/* codes of x[i0 .. i0 + len) into dst[0 .. len): o, v point at the run's statistics, os 0 (one
   statistic for the run) or 1 (one per element). */
static inline void pack_run(const float *restrict x, const float *restrict o, const float *restrict v,
                            int64_t os, uint8_t *restrict dst, int64_t i0, int64_t len, uint32_t key,
                            float levels) {
    for (int64_t k = 0; k < len; k++) {
        int64_t j = i0 + k;
        uint32_t h = mix32((uint32_t)(j >> 1) + key);
        /* no branches (gcc then vectorizes): the half of h by shift, the clamp as two selects */
        float u = (float)((h >> ((uint32_t)(j & 1) << 4)) & 0xFFFFu) * (1.0f / 65536.0f);
        float y = (x[k] - o[os * k]) * v[os * k] + u;
        y = y > 0.0f ? y : 0.0f;
        y = y < levels ? y : levels;
        dst[k] = (uint8_t)(int)y;  /* truncation: the floor, y >= 0 */
    }
}

/* pack_run for a short row of statistics (T < WRAP_T: a 3-channel image channels_last): one run
   spans many rows, the statistic's index wrapping at T (runs of T elements cost a call and a
   division each). The same codes as pack_run. */

static inline void pack_wrap(const float *restrict x, const float *restrict o, const float *restrict v,
                             int64_t T, int64_t t, uint8_t *restrict dst, int64_t i0, int64_t len,
                             uint32_t key, float levels) {
    for (int64_t k = 0; k < len; k++) {
        int64_t j = i0 + k;
        uint32_t h = mix32((uint32_t)(j >> 1) + key);
        float u = (float)((h >> ((uint32_t)(j & 1) << 4)) & 0xFFFFu) * (1.0f / 65536.0f);
        float y = (x[k] - o[t]) * v[t] + u;
        y = y > 0.0f ? y : 0.0f;
        y = y < levels ? y : levels;
        dst[k] = (uint8_t)(int)y;
        t = t + 1 == T ? 0 : t + 1;
    }
}

static inline int64_t block_end(int64_t i, int64_t e, int64_t M, int64_t T) {
    int64_t stop = (i / (M * T) + 1) * M * T;
    return stop < e ? stop : e;
}

void fx_pack(const float *x, const float *off, const float *inv, uint8_t *out, int64_t L,
             int64_t M, int64_t T, uint32_t key, float levels, int bits, int threads) {
    int64_t n = L * M * T, tasks = (n + CHUNK - 1) / CHUNK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < tasks; c++) {
        uint8_t codes[CHUNK];
        int64_t s = c * CHUNK, e = s + CHUNK < n ? s + CHUNK : n;
        uint8_t *dst = bits == 8 ? out + s : codes;
        for (int64_t i = s; i < e;) {
            int64_t stop = T > 1 && T < WRAP_T ? block_end(i, e, M, T) : run_end(i, e, M, T), l = i / (M * T);
            if (T == 1)
                pack_run(x + i, off + l, inv + l, 0, dst + (i - s), i, stop - i, key, levels);
            else if (T < WRAP_T)
                pack_wrap(x + i, off + l * T, inv + l * T, T, i % T, dst + (i - s), i, stop - i, key, levels);
            else
                pack_run(x + i, off + l * T + i % T, inv + l * T + i % T, 1, dst + (i - s), i, stop - i, key, levels);
            i = stop;
        }
        if (bits == 4) {
            int64_t count = e - s;
            for (int64_t p = 0; 2 * p < count; p++) {
                uint8_t hi = 2 * p + 1 < count ? codes[2 * p + 1] : 0;
                out[s / 2 + p] = (uint8_t)(codes[2 * p] | (hi << 4));
            }
        }
    }
}

static inline void unpack_run(const uint8_t *restrict codes, const float *restrict lo,
                              const float *restrict step, int64_t os, float *restrict out, int64_t i0,
                              int64_t len, int bits) {
    if (bits == 8) {
        for (int64_t k = 0; k < len; k++)
            out[k] = (float)codes[i0 + k] * step[os * k] + lo[os * k];
    } else {
        for (int64_t k = 0; k < len; k++) {
            int64_t j = i0 + k;
            uint8_t q = (codes[j >> 1] >> (4 * (j & 1))) & 15;
            out[k] = (float)q * step[os * k] + lo[os * k];
        }
    }
}

static inline void unpack_wrap(const uint8_t *restrict codes, const float *restrict lo,
                               const float *restrict step, int64_t T, int64_t t, float *restrict out,
                               int64_t i0, int64_t len, int bits) {
    for (int64_t k = 0; k < len; k++) {
        int64_t j = i0 + k;
        uint8_t q = bits == 8 ? codes[j] : (codes[j >> 1] >> (4 * (j & 1))) & 15;
        out[k] = (float)q * step[t] + lo[t];
        t = t + 1 == T ? 0 : t + 1;
    }
}

void fx_unpack(const uint8_t *codes, const float *lo, const float *step, float *out, int64_t L,
               int64_t M, int64_t T, int bits, int threads) {
    int64_t n = L * M * T, tasks = (n + CHUNK - 1) / CHUNK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < tasks; c++) {
        int64_t s = c * CHUNK, e = s + CHUNK < n ? s + CHUNK : n;
        for (int64_t i = s; i < e;) {
            int64_t stop = T > 1 && T < WRAP_T ? block_end(i, e, M, T) : run_end(i, e, M, T), l = i / (M * T);
            if (T == 1)
                unpack_run(codes, lo + l, step + l, 0, out + i, i, stop - i, bits);
            else if (T < WRAP_T)
                unpack_wrap(codes, lo + l * T, step + l * T, T, i % T, out + i, i, stop - i, bits);
            else
                unpack_run(codes, lo + l * T + i % T, step + l * T + i % T, 1, out + i, i, stop - i, bits);
            i = stop;
        }
    }
}

/* Quantized BatchNorm backward (fxsketch.ops.quant): X = lo + q step is read from the codes as
   it is used, never written out. The codes lie in the packing's (L, M, T) layout, dY and dX in
   the same; element (l, m, t) belongs to channel t (T == C: channels_last) or l % C (T == 1).
   Sums are taken in fp32 over blocks of SUM_BLOCK rows (T > 1) or elements (T == 1), then
   added in fp64. */

#define SUM_BLOCK 1024

static inline float code_at(const uint8_t *codes, int64_t j, int bits) {
    return bits == 8 ? (float)codes[j] : (float)((codes[j >> 1] >> (4 * (j & 1))) & 15);
}

/* codes j .. j + n - 1 as floats into dst: 4-bit codes a byte (two codes) at a time, which the
   compiler vectorizes (code_at's per-element shift does not); the same values as code_at */
#define DECODE 256
static inline void decode4(const uint8_t *codes, int64_t j, int64_t n, float *dst) {
    int64_t k = 0;
    if (n > 0 && (j & 1)) { dst[0] = (float)(codes[j >> 1] >> 4); k = 1; }
    const uint8_t *c = codes + ((j + k) >> 1);
    for (; k + 2 <= n; k += 2, c++) { dst[k] = (float)(*c & 15); dst[k + 1] = (float)(*c >> 4); }
    if (k < n) dst[k] = (float)(*c & 15);
}

/* one row l: sdy[c] += sum dy, sdx[c] += sum dy (x - mean) */
static inline void bn_sums_row(const uint8_t *codes, const float *lo, const float *step, const float *dy,
                               const float *mean, double *sdy, double *sdx, float *buf, int64_t l,
                               int64_t M, int64_t T, int64_t C, int bits) {
    const float *g = dy + l * M * T;
    int64_t j0 = l * M * T;
    if (T == 1) {
        int64_t c = l % C;
        float st = step[l], off = lo[l] - mean[c];
        for (int64_t a = 0; a < M; a += SUM_BLOCK) {
            int64_t e = a + SUM_BLOCK < M ? a + SUM_BLOCK : M;
            float ady[8] = {0}, adx[8] = {0}, q[SUM_BLOCK];
            if (bits == 4)
                decode4(codes, j0 + a, e - a, q);
            else
                for (int64_t m = a; m < e; m++) q[m - a] = (float)codes[j0 + m];
            int64_t m = a;
            for (; m + 8 <= e; m += 8)
                for (int k = 0; k < 8; k++) {
                    float gv = g[m + k], x = q[m + k - a] * st + off;
                    ady[k] += gv; adx[k] += gv * x;
                }
            for (; m < e; m++) {
                float gv = g[m], x = q[m - a] * st + off;
                ady[0] += gv; adx[0] += gv * x;
            }
            for (int k = 0; k < 8; k++) { sdy[c] += ady[k]; sdx[c] += adx[k]; }
        }
        return;
    }
    float *ady = buf, *adx = buf + T, *st = buf + 2 * T, *off = buf + 3 * T;
    for (int64_t t = 0; t < T; t++) { st[t] = step[l * T + t]; off[t] = lo[l * T + t] - mean[t]; }
    for (int64_t a = 0; a < M; a += SUM_BLOCK) {
        int64_t e = a + SUM_BLOCK < M ? a + SUM_BLOCK : M;
        for (int64_t t = 0; t < T; t++) { ady[t] = 0.0f; adx[t] = 0.0f; }
        for (int64_t m = a; m < e; m++) {
            const float *gr = g + m * T;
            int64_t jr = j0 + m * T;
            if (bits == 4) {
                float q[DECODE];
                for (int64_t t0 = 0; t0 < T; t0 += DECODE) {
                    int64_t n = T - t0 < DECODE ? T - t0 : DECODE;
                    decode4(codes, jr + t0, n, q);
                    for (int64_t u = 0; u < n; u++) {
                        int64_t t = t0 + u;
                        float x = q[u] * st[t] + off[t];
                        ady[t] += gr[t]; adx[t] += gr[t] * x;
                    }
                }
                continue;
            }
            for (int64_t t = 0; t < T; t++) {
                float x = code_at(codes, jr + t, bits) * st[t] + off[t];
                ady[t] += gr[t]; adx[t] += gr[t] * x;
            }
        }
        for (int64_t t = 0; t < T; t++) { sdy[t] += ady[t]; sdx[t] += adx[t]; }
    }
}

/* part[p][0 .. C): sum of dY per channel over part p's rows, part[p][C .. 2C): sum of dY (X - mean);
   buf: parts x 4T floats of scratch */
void fx_bn_sums(const uint8_t *codes, const float *lo, const float *step, const float *dy,
                const float *mean, double *part, float *buf, int64_t L, int64_t M, int64_t T,
                int64_t C, int bits, int parts) {
    #pragma omp parallel for num_threads(parts) schedule(static)
    for (int64_t p = 0; p < parts; p++) {
        double *sdy = part + p * 2 * C, *sdx = sdy + C;
        for (int64_t c = 0; c < 2 * C; c++) sdy[c] = 0.0;
        for (int64_t l = L * p / parts; l < L * (p + 1) / parts; l++) {
            if (bits == 8)
                bn_sums_row(codes, lo, step, dy, mean, sdy, sdx, buf + p * 4 * T, l, M, T, C, 8);
            else
                bn_sums_row(codes, lo, step, dy, mean, sdy, sdx, buf + p * 4 * T, l, M, T, C, 4);
        }
    }
}

static inline void bn_dx_row(const uint8_t *codes, const float *lo, const float *step, const float *dy,
                             const float *k, const float *a, const float *b, float *dx, int64_t l,
                             int64_t M, int64_t T, int64_t C, int bits) {
    int64_t j0 = l * M * T;
    const float *g = dy + j0;
    float *o = dx + j0;
    if (T == 1) {
        int64_t c = l % C;
        float st = step[l], lv = lo[l], kc = k[c], ac = a[c], bc = b[c];
        float q[DECODE];
        for (int64_t m0 = 0; m0 < M; m0 += DECODE) {
            int64_t n = M - m0 < DECODE ? M - m0 : DECODE;
            if (bits == 4)
                decode4(codes, j0 + m0, n, q);
            else
                for (int64_t u = 0; u < n; u++) q[u] = (float)codes[j0 + m0 + u];
            for (int64_t u = 0; u < n; u++) {
                int64_t m = m0 + u;
                float x = q[u] * st + lv, v = g[m] * kc;
                v = v + x * ac;
                o[m] = v + bc;
            }
        }
        return;
    }
    const float *st = step + l * T, *lv = lo + l * T;
    float q[DECODE];
    for (int64_t m = 0; m < M; m++)
        for (int64_t t0 = 0; t0 < T; t0 += DECODE) {
            int64_t n = T - t0 < DECODE ? T - t0 : DECODE, i0 = m * T + t0;
            if (bits == 4)
                decode4(codes, j0 + i0, n, q);
            else
                for (int64_t u = 0; u < n; u++) q[u] = (float)codes[j0 + i0 + u];
            for (int64_t u = 0; u < n; u++) {
                int64_t t = t0 + u, i = i0 + u;
                float x = q[u] * st[t] + lv[t], v = g[i] * k[t];
                v = v + x * a[t];
                o[i] = v + b[t];
            }
        }
}

/* dX = (dY k[c] + X a[c]) + b[c], in the order of torch's mul, addcmul_, add_ */
void fx_bn_dx(const uint8_t *codes, const float *lo, const float *step, const float *dy, const float *k,
              const float *a, const float *b, float *dx, int64_t L, int64_t M, int64_t T, int64_t C,
              int bits, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t l = 0; l < L; l++) {
        if (bits == 8)
            bn_dx_row(codes, lo, step, dy, k, a, b, dx, l, M, T, C, 8);
        else
            bn_dx_row(codes, lo, step, dy, k, a, b, dx, l, M, T, C, 4);
    }
}

/* Lean ReLU (fxsketch.ops.lean): the output and the packed 1-bit gradient mask in one pass, and
   the backward from the mask. Element i is bit i % 8 of byte i / 8; a last byte's pad bits are 0.
   torch's rules: relu keeps -0.0 and NaN (out = x < 0 ? 0 : x) and passes the gradient where
   not (x <= 0); leaky_relu passes it where x > 0 (out = x > 0 ? x : x * slope). out may be x.
   With AVX2, 8 elements per step (a compare, its sign bits as the mask byte, a select); the
   scalar loop gives the same bits. */

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define RCHUNK 65536  /* elements per task: a multiple of 8, so tasks write whole mask bytes */

static inline uint8_t relu_bits(const float *x, float *out, int64_t count, float slope, int leaky) {
    uint8_t m = 0;
    for (int64_t k = 0; k < count; k++) {
        float v = x[k];
        int keep = leaky ? v > 0.0f : !(v <= 0.0f);
        m |= (uint8_t)(keep << k);
        out[k] = leaky ? (v > 0.0f ? v : v * slope) : (v < 0.0f ? 0.0f : v);
    }
    return m;
}

static inline void relu_grad(const float *g, uint8_t m, float *out, int64_t count, float slope, int leaky) {
    for (int64_t k = 0; k < count; k++)
        out[k] = (m >> k) & 1 ? g[k] : (leaky ? g[k] * slope : 0.0f);
}

void fx_relu_mask(const float *x, float *out, uint8_t *mask, int64_t n, float slope, int leaky,
                  int threads) {
    int64_t tasks = (n + RCHUNK - 1) / RCHUNK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < tasks; c++) {
        int64_t s = c * RCHUNK, e = s + RCHUNK < n ? s + RCHUNK : n, b = s;
#if defined(__AVX2__)
        const __m256 zero = _mm256_setzero_ps(), k = _mm256_set1_ps(slope);
        for (; b + 8 <= e; b += 8) {
            __m256 v = _mm256_loadu_ps(x + b), keep, o;
            if (leaky) {
                keep = _mm256_cmp_ps(v, zero, _CMP_GT_OQ);
                o = _mm256_blendv_ps(_mm256_mul_ps(v, k), v, keep);
            } else {
                keep = _mm256_cmp_ps(v, zero, _CMP_NLE_UQ);
                o = _mm256_andnot_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ), v);  /* +0 where v < 0 */
            }
            mask[b >> 3] = (uint8_t)_mm256_movemask_ps(keep);
            _mm256_storeu_ps(out + b, o);
        }
#else
        for (; b + 8 <= e; b += 8) mask[b >> 3] = relu_bits(x + b, out + b, 8, slope, leaky);
#endif
        if (b < e) mask[b >> 3] = relu_bits(x + b, out + b, e - b, slope, leaky);
    }
}

void fx_relu_backward(const float *g, const uint8_t *mask, float *out, int64_t n, float slope,
                      int leaky, int threads) {
    int64_t tasks = (n + RCHUNK - 1) / RCHUNK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < tasks; c++) {
        int64_t s = c * RCHUNK, e = s + RCHUNK < n ? s + RCHUNK : n, i = s;
#if defined(__AVX2__)
        const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        const __m256 k = _mm256_set1_ps(slope);
        for (; i + 8 <= e; i += 8) {
            __m256i m = _mm256_and_si256(_mm256_set1_epi32(mask[i >> 3]), bit);
            __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(m, bit)), v = _mm256_loadu_ps(g + i);
            _mm256_storeu_ps(out + i, leaky ? _mm256_blendv_ps(_mm256_mul_ps(v, k), v, keep)
                                            : _mm256_and_ps(keep, v));
        }
#else
        for (; i + 8 <= e; i += 8) relu_grad(g + i, mask[i >> 3], out + i, 8, slope, leaky);
#endif
        if (i < e) relu_grad(g + i, mask[i >> 3], out + i, e - i, slope, leaky);
    }
}
"""

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
"""No -ffast-math and no contraction: the loops must round as torch's separate ops do."""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        model = next((ln for ln in info.splitlines() if ln.startswith("model name")), "")
        return model + flags
    except OSError:
        return platform.processor() + platform.machine()


def _build(cc: str) -> ctypes.CDLL:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE, " ".join(FLAGS), version, _cpu_id()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("FXSKETCH_CACHE", Path.home() / ".cache" / "fxsketch")) / "kernels"
    so = root / f"quant_{key}.so"
    if not so.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            src, obj = Path(tmp) / "quant.c", Path(tmp) / "quant.so"
            src.write_text(SOURCE)
            for omp in (["-fopenmp"], []):  # without OpenMP the loops run on one thread
                done = subprocess.run([cc, *FLAGS, *omp, str(src), "-o", str(obj)], capture_output=True, text=True)
                if done.returncode == 0:
                    break
            else:
                raise RuntimeError(done.stderr.strip()[-500:])
            obj.replace(so)  # atomic: a concurrent process loads the old or the new file
    lib = ctypes.CDLL(str(so))
    i64, f32, i32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    lib.fx_range.argtypes = [ptr, ptr, ptr, i64, i64, i64, f32, i32]
    lib.fx_pack.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_uint32, f32, i32, i32]
    lib.fx_unpack.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i32, i32]
    lib.fx_bn_sums.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32, i32]
    lib.fx_bn_dx.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32, i32]
    lib.fx_relu_mask.argtypes = [ptr, ptr, ptr, i64, f32, i32, i32]
    lib.fx_relu_backward.argtypes = [ptr, ptr, ptr, i64, f32, i32, i32]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled loops, or None (no C compiler, a failed build, or ``FXSKETCH_CPU_KERNELS=0``)."""
    global _lib, _tried
    if os.environ.get("FXSKETCH_CPU_KERNELS", "1") == "0":
        return None
    with _lock:
        if not _tried:
            _tried = True
            cc = _compiler()
            try:
                _lib = _build(cc) if cc else None
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning("fxsketch: the fused CPU loops did not build (%s); quantized saves "
                            "and lean ReLU take the slower torch path", e)
            if cc is None:
                log.info("fxsketch: no C compiler; quantized saves and lean ReLU take the torch path")
    return _lib


def available(t: torch.Tensor) -> bool:
    """Whether the loops serve ``t`` (real or fake): an fp32 CPU tensor, the library built."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and library() is not None


def serves(device, dtype) -> bool:
    """Whether the loops run ops on ``device`` in ``dtype``: fp32 on the CPU, the library built. A
    meta device counts as the CPU (a meta model is planned as a CPU step)."""
    return torch.device(device).type in ("cpu", "meta") and dtype == torch.float32 and library() is not None


def mix32_key(seed: int) -> int:
    """The 32-bit key of the hash from a 64-bit seed (both halves mixed in)."""
    s = int(seed) & (2 ** 64 - 1)
    return mix32((s & 0xFFFFFFFF) ^ mix32(s >> 32))


def _p(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def group_range(x3: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, step) of contiguous fp32 ``x3`` (L, M, T) per (L, T): minimum and (max - min) / levels,
    1 where constant."""
    L, M, T = x3.shape
    lo = torch.empty(L, T, dtype=torch.float32)
    step = torch.empty(L, T, dtype=torch.float32)
    library().fx_range(_p(x3), _p(lo), _p(step), L, M, T, float(levels), torch.get_num_threads())
    return lo, step


def pack(x3: torch.Tensor, off: torch.Tensor, inv: torch.Tensor, out: torch.Tensor, key: int, bits: int) -> None:
    """Writes the codes of ``x3`` (L, M, T) into flat uint8 ``out``: floor((x - off) inv + u) clamped
    to [0, 2**bits - 1], u = r / 2**16 from the hash (``off`` has the half-level offset in it)."""
    L, M, T = x3.shape
    library().fx_pack(_p(x3), _p(off), _p(inv), _p(out), L, M, T, key, float((1 << bits) - 1), bits,
                      torch.get_num_threads())


def unpack(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, out3: torch.Tensor, bits: int) -> None:
    """Writes lo + q step into contiguous fp32 ``out3`` (L, M, T)."""
    L, M, T = out3.shape
    library().fx_unpack(_p(codes), _p(lo), _p(step), _p(out3), L, M, T, bits, torch.get_num_threads())


def bn_sums(codes, lo, step, dy3, mean, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of dY, sum of dY (X - mean)) per channel (fp64), X = lo + q step of the codes in the
    (L, M, T) layout of contiguous fp32 ``dy3``; ``mean`` fp32 per channel (C); the channel of
    (l, m, t) is t (T == C) or l % C (T == 1)."""
    L, M, T = dy3.shape
    C = mean.numel()
    parts = max(1, min(torch.get_num_threads(), L))
    part = torch.empty(parts, 2, C, dtype=torch.float64)
    buf = torch.empty(parts, 4 * T, dtype=torch.float32)
    library().fx_bn_sums(_p(codes), _p(lo), _p(step), _p(dy3), _p(mean), _p(part), _p(buf), L, M, T, C,
                         bits, parts)
    sums = part.sum(0)
    return sums[0], sums[1]


def bn_dx(codes, lo, step, dy3, k, a, b, out3, bits: int) -> None:
    """Writes (dY k + X a) + b into contiguous fp32 ``out3`` (L, M, T), per channel fp32 ``k``,
    ``a``, ``b`` (C), X from the codes as in :func:`bn_sums`."""
    L, M, T = dy3.shape
    library().fx_bn_dx(_p(codes), _p(lo), _p(step), _p(dy3), _p(k), _p(a), _p(b), _p(out3), L, M, T,
                       k.numel(), bits, torch.get_num_threads())


def bn_workspace_nbytes(channels: int, tail: int) -> int:
    """Bytes the fused BatchNorm backward allocates besides dX, dW and dB: :func:`bn_sums`' fp64
    partial sums and fp32 row scratch per thread, and a dozen per-channel vectors (the fp64 sums and
    coefficients of :func:`fxsketch.ops.quant._fused_bn_backward`, their fp32 casts)."""
    parts = torch.get_num_threads()
    return parts * (16 * channels + 16 * tail) + 96 * channels


def relu_mask(x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor, slope: float | None) -> None:
    """Writes relu (``slope`` None) or leaky_relu of flat contiguous fp32 ``x`` into ``out`` (may
    be ``x``) and the packed gradient mask into uint8 ``mask`` ((n + 7) // 8 bytes)."""
    library().fx_relu_mask(_p(x), _p(out), _p(mask), x.numel(), float(slope or 0.0), slope is not None,
                           torch.get_num_threads())


def relu_backward(grad: torch.Tensor, mask: torch.Tensor, out: torch.Tensor, slope: float | None) -> None:
    """Writes the gradient of relu (leaky_relu) into flat contiguous fp32 ``out``: ``grad`` where
    the mask bit is set, else 0 (``grad * slope``)."""
    library().fx_relu_backward(_p(grad), _p(mask), _p(out), grad.numel(), float(slope or 0.0),
                               slope is not None, torch.get_num_threads())


# The loops' arithmetic in torch, for tests: the same bits, op for op.

def reference_bits(first: int, count: int, key: int) -> torch.Tensor:
    """The 16 random bits (int64) of elements first .. first + count - 1 as the loops draw them: the
    low half of ``mix32((i >> 1) + key)`` for even i, the high half for odd."""
    i = torch.arange(first, first + count, dtype=torch.int64)
    a = mix32(((i >> 1) + key) & 0xFFFFFFFF)
    return (a >> ((i & 1) * 16)) & 0xFFFF


def reference_pack(x3: torch.Tensor, off: torch.Tensor, inv: torch.Tensor, key: int, bits: int) -> torch.Tensor:
    """What :func:`pack` writes, computed by torch ops."""
    L, M, T = x3.shape
    r = reference_bits(0, x3.numel(), key).view(L, M, T)
    t = (x3 - off.view(L, 1, T)) * inv.view(L, 1, T)
    t = t.add(r, alpha=1.0 / 65536).clamp(0, (1 << bits) - 1).to(torch.uint8).flatten()
    if bits == 8:
        return t
    t = torch.cat([t, t.new_zeros(t.numel() % 2)]).view(-1, 2)
    return t[:, 0] | (t[:, 1] << 4)
