"""Quantizers for GGUF's K-quant blocks (Q4_K, Q5_K, Q6_K) and THE entry point that quantizes a float tensor to
any written GGUF block type.

gguf-py only dequantizes K-quants, so these are written here, vectorised over every sub-block of a tensor at once
(numpy, float32 like ggml). The block layouts are ggml's (ggml-common.h); the search for each sub-block's scale
follows the published llama.cpp reference (ggml-quants.c, without an importance matrix). Sums run in ggml's order
(the fits compare near-equal errors), so without the refinement below the blocks are byte for byte ggml's
(tests/test_kquants.py compiles ggml-quants.c and compares).

- Q4_K / Q5_K: 256 values as 8 sub-blocks of 32, each `d * sc * q - dmin * m` with 6-bit `sc`, `m` and 4/5-bit
  `q`; a sub-block's (scale, minimum) is the best weighted least-squares fit over a grid of trial scales
  (weights `rms(x) + |x|`), then the eight pairs are quantized to 6 bits against the block's float16 d/dmin.
  Optionally (refine=True) one step beyond the reference: the 6-bit codes are then chosen among their neighbours
  (+-1 each) to minimise the same weighted error the fit minimised, the rounded codes first, so no sub-block ends
  worse than the reference's rounding by that measure (not the default: see quantize).
- Q6_K: 256 values as 16 sub-blocks of 16, `d * sc * (q - 32)` with int8 `sc` and 6-bit `q`; each sub-block's
  scale is the best of 19 trial scales under x^2 weights.

Tested per type against ggml's and gguf-py's dequantizers, and by llama-server and transformers running the files.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .ggml_types import QUANT_SIZES, GGMLType

QK_K = 256
_CHUNK = 1024  # super-blocks per pass: temporaries of 256K values stay in cache (1.4x faster than 16M at once)
_EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS: a group below it is all zeros


def _rint(x: np.ndarray) -> np.ndarray:
    # ggml's nearest_int rounds half to even, as np.rint does.
    return np.rint(x)


def _sum(x: np.ndarray) -> np.ndarray:
    """Sum over the last axis in order, in float32, as ggml's loops add: the trial fits compare near-equal errors,
    so a different summation order picks a different fit now and then."""
    return np.cumsum(x, axis=-1, dtype=np.float32)[..., -1]


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 -> float16 (round to nearest even, as GGML_FP32_TO_FP16) and back, plus the raw float16."""
    h = x.astype(np.float16)
    return h.astype(np.float32), h


# -- Q4_K / Q5_K ---------------------------------------------------------------------------------------------
def _fit_affine(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of x (n, 32): (scale, -minimum, levels) of the best weighted fit x ~ scale * l - minimum, l in
    0..nmax, over trial inverse scales (nmax + rmin + rdelta * i) / (max - min), i = 0..nstep."""
    xmin = np.minimum(x.min(-1), 0).astype(np.float32)
    xmax = x.max(-1)
    span = xmax - xmin
    flat = span == 0
    span = np.where(flat, np.float32(1), span)
    sum_w = _sum(w)
    sum_x = _sum(w * x)
    shifted = x - xmin[:, None]

    iscale = np.float32(nmax) / span
    scale = np.float32(1) / iscale
    levels = np.clip(_rint(iscale[:, None] * shifted), 0, nmax)
    best = _sum(w * np.square(scale[:, None] * levels + xmin[:, None] - x))
    mins = xmin.copy()
    for i in range(nstep + 1):
        # As in the reference, each trial grid starts from the best minimum found so far, not the data's.
        shifted = x - mins[:, None]
        trial = np.float32(rmin) + np.float32(rdelta) * np.float32(i) + np.float32(nmax)
        lv = np.clip(_rint((trial / np.where(flat, np.float32(1), xmax - mins))[:, None] * shifted), 0, nmax)
        wl = w * lv
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * lv), _sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, np.float32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # a minimum above zero is not representable: refit the scale alone
        this_min = np.where(positive, np.float32(0), this_min)
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, np.float32(1)), this_scale)
        err = _sum(w * np.square(this_scale[:, None] * lv + this_min[:, None] - x))
        better = ok & (err < best)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mins = np.where(better, this_min, mins)
        levels = np.where(better[:, None], lv, levels)
    scale = np.where(flat, np.float32(0), scale)
    mins = np.where(flat, xmin, mins)
    levels = np.where(flat[:, None], np.float32(0), levels)
    return scale.astype(np.float32), (-mins).astype(np.float32), levels


def _affine_superblocks(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, refine: bool):
    """x (nb, 256) -> (d, dmin) float16 (nb,), 6-bit sc and m (nb, 8) uint8, levels (nb, 256) uint8."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av = np.sqrt(_sum(np.square(sub)) / np.float32(32))
    w = av[:, None] + np.abs(sub)
    scales, mins, fitted = _fit_affine(sub, w, nmax, rmin, rdelta, nstep)
    fitted = fitted.reshape(nb, 8, 32)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(-1), 0)
    max_min = np.maximum(mins.max(-1), 0)
    inv_scale = np.where(max_scale > 0, np.float32(63) / np.where(max_scale > 0, max_scale, 1), 0).astype(np.float32)
    inv_min = np.where(max_min > 0, np.float32(63) / np.where(max_min > 0, max_min, 1), 0).astype(np.float32)
    ls = np.clip(_rint(inv_scale[:, None] * scales), 0, 63)
    lm = np.clip(_rint(inv_min[:, None] * mins), 0, 63)
    d, d16 = _f16((max_scale / np.float32(63)).astype(np.float32))
    dmin, dmin16 = _f16((max_min / np.float32(63)).astype(np.float32))

    xs = x.reshape(nb, 8, 32)
    ws = w.reshape(nb, 8, 32)

    def levels_and_error(sc: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        step = d[:, None] * sc  # (nb, 8)
        off = dmin[:, None] * m
        nz = step != 0
        lv = np.clip(_rint((xs + off[..., None]) / np.where(nz, step, 1)[..., None]), 0, nmax)
        lv = np.where(nz[..., None], lv, fitted)  # a zero scale decodes to -off whatever the levels: ggml's
        err = (ws * np.square(step[..., None] * lv - off[..., None] - xs)).sum(-1)
        return lv, err

    levels, best = levels_and_error(ls, lm)
    for dsc in (-1, 0, 1) if refine else ():
        for dm in (-1, 0, 1):
            if dsc == 0 and dm == 0:
                continue
            sc, m = np.clip(ls + dsc, 0, 63), np.clip(lm + dm, 0, 63)
            lv, err = levels_and_error(sc, m)
            better = err < best
            best = np.where(better, err, best)
            ls, lm = np.where(better, sc, ls), np.where(better, m, lm)
            levels = np.where(better[..., None], lv, levels)
    return d16, dmin16, ls.astype(np.uint8), lm.astype(np.uint8), levels.reshape(nb, QK_K).astype(np.uint8)


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit (scale, min) pairs -> ggml's 12 bytes: bytes 0-3 sc0-3 (+ high bits of sc4-7), 4-7 m0-3
    (+ high bits of m4-7), 8-11 low nibbles of sc4-7 | low nibbles of m4-7 << 4."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return out


def _low_nibbles(levels: np.ndarray) -> np.ndarray:
    """Levels (nb, 256) -> 128 bytes: each 64-value chunk as 32 bytes, value j low nibble, value j+32 high."""
    q = levels.reshape(-1, 4, 2, 32) & 0x0F
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128).astype(np.uint8)


def _quantize_q4_k(x: np.ndarray, refine: bool) -> np.ndarray:
    d16, dmin16, sc, m, levels = _affine_superblocks(x, 15, -1.0, 0.1, 20, refine)
    return np.concatenate([d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2),
                           _pack_scales(sc, m), _low_nibbles(levels)], axis=1)


def _quantize_q5_k(x: np.ndarray, refine: bool) -> np.ndarray:
    d16, dmin16, sc, m, levels = _affine_superblocks(x, 31, -0.5, 0.1, 15, refine)
    high = (levels.reshape(-1, 4, 2, 32) >> 4) & 1  # chunk c: bit 2c for value j, bit 2c+1 for value j+32
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None, None] + np.arange(2, dtype=np.uint8)[None, None, :, None]
    qh = (high << shifts).sum(axis=(1, 2)).astype(np.uint8)  # (nb, 32)
    return np.concatenate([d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2),
                           _pack_scales(sc, m), qh, _low_nibbles(levels)], axis=1)


# -- Q6_K ----------------------------------------------------------------------------------------------------
def _fit_symmetric(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x (n, 16): (scale, levels + nmax) of the best x^2-weighted fit x ~ scale * l, l in -nmax..nmax-1,
    over 19 trial scales around the one that maps the largest magnitude to -nmax."""
    idx = np.abs(x).argmax(-1)
    peak = np.take_along_axis(x, idx[:, None], -1)[:, 0]
    zero = np.abs(peak) < _EPS
    peak = np.where(zero, np.float32(1), peak)
    w = np.square(x)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        wx = w * x
        return lv, _sum(wx * lv), _sum(w * lv * lv)

    levels, sumlx, suml2 = trial(np.float32(-nmax) / peak)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, 1), np.float32(0)).astype(np.float32)
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        lv, slx, sl2 = trial(-(np.float32(nmax) + np.float32(0.1) * np.float32(i)) / peak)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        new_scale = slx / np.where(sl2 > 0, sl2, 1)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * slx, best)
        levels = np.where(better[:, None], lv, levels)
    scale = np.where(zero, np.float32(0), scale)
    levels = np.where(zero[:, None], np.float32(-nmax), levels)
    return scale.astype(np.float32), levels + nmax


def _quantize_q6_k(x: np.ndarray, refine: bool) -> np.ndarray:
    del refine  # the reference's search alone: its blocks are ggml's
    nb = x.shape[0]
    scales, levels = _fit_symmetric(x.reshape(nb * 16, 16), 32)
    scales, levels = scales.reshape(nb, 16), levels.reshape(nb, 16, 16)
    idx = np.abs(scales).argmax(-1)
    max_scale = np.take_along_axis(scales, idx[:, None], -1)[:, 0]
    empty = np.abs(max_scale) < _EPS
    iscale = np.float32(-128) / np.where(empty, np.float32(1), max_scale)
    d, d16 = _f16(np.float32(1) / iscale)
    sc = np.minimum(127, _rint(iscale[:, None] * scales))  # int8 scale codes, -128..127
    step = d[:, None] * sc
    nz = step != 0
    xs = x.reshape(nb, 16, 16)
    lv = np.clip(_rint(xs / np.where(nz, step, 1)[..., None]), -32, 31) + 32
    levels = np.where(nz[..., None], lv, levels).reshape(nb, QK_K).astype(np.uint8)
    # ggml's layout: per 128-value half, ql holds values l, l+32 (low nibbles) and l+64, l+96 (high nibbles) of
    # 64 bytes, qh holds bits 4-5 of the four values l, l+32, l+64, l+96 in 32 bytes.
    q = levels.reshape(nb, 2, 4, 32)
    ql = np.concatenate([(q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4),
                         (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)], axis=2).reshape(nb, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    sc8 = sc.astype(np.int8).view(np.uint8)
    out = np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), sc8, d16.view(np.uint8).reshape(-1, 2)], axis=1)
    out[empty] = 0
    return out


_K_QUANTIZERS = {GGMLType.Q4_K: _quantize_q4_k, GGMLType.Q5_K: _quantize_q5_k, GGMLType.Q6_K: _quantize_q6_k}


def quantize(values: np.ndarray, qtype: int, *, refine: bool = False, threads: int | None = None) -> np.ndarray:
    """THE quantizer of a float tensor (rows, cols) to GGUF blocks of `qtype` (rows, bytes per row), uint8.

    Q4_K/Q5_K/Q6_K are this module's; the 32-value types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are gguf-py's reference
    quantizers, which write the same bytes as ggml's. The default writes the bytes of ggml's reference quantizer
    (llama-quantize's without an importance matrix); refine=True adds the Q4_K/Q5_K scale-code refinement, which
    lowers the weighted error of every block but did not lower the KL divergence of SmolLM2-135M's Q4_K_M
    (0.04937 against 0.04929 nats, p99 0.2141 against 0.2155: docs/formats.md), so it is not the default.
    threads: K-quant chunks quantized at once (numpy releases the GIL in its loops); default: the usable CPUs.
    """
    qtype = GGMLType(int(qtype))
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim == 1:
        values = values[None, :]
    rows, cols = values.shape[0], int(np.prod(values.shape[1:]))
    block, size = QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"rows of {cols} values do not fill {qtype.name} blocks of {block}")
    quantizer = _K_QUANTIZERS.get(qtype)
    if quantizer is None:
        import gguf

        return np.ascontiguousarray(gguf.quants.quantize(values.reshape(rows, cols),
                                                         gguf.GGMLQuantizationType(int(qtype)))).reshape(rows, -1)
    flat = values.reshape(-1, QK_K)
    out = np.empty((flat.shape[0], size), dtype=np.uint8)

    def run(start: int) -> None:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out[start:start + _CHUNK] = quantizer(flat[start:start + _CHUNK], refine)

    starts = range(0, flat.shape[0], _CHUNK)
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = min(threads, len(starts))
    if threads <= 1:
        for start in starts:
            run(start)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, starts))
    return out.reshape(rows, -1)


__all__ = ["quantize"]
