"""The fused conv prologue (`fused_conv`'s module docstring has the math) as Mosaic GPU
(Hopper) kernels: the forward (`conv_fwd_mosaic`: both directions' depthwise conv + bias +
SiLU, written where the SSD reads them: x_cat, B_cat, C_cat, backward halves in scan time) and
the backward's first kernel (`conv_bwd_g_mosaic`: g = dout * silu'(a) and the weight and bias
sums).

Grid (column tile j of xBC, w columns; row block of q rows; batch row). A program reads two
(q + K - 1, w) row blocks of xBC into shared memory by TMA, each a q-row block plus a halo of
K - 1 rows (zeros past either end of the sequence):

    forward:  original rows [t0 - (K-1), t0 + q)          (its outputs: rows t0 + i)
    backward: original rows [L - t0 - q, L - t0 + K - 1)   (its outputs: scan rows t0 + i,
              original rows L - 1 - t0 - i)

and forms each direction's (q, w) pre-activation from K row-shifted slices of its block
(static offsets), float32, in the reference's order (bias, then the taps k = 0 .. K-1), the
backward one in original time (an anti-causal conv over its block). The forward kernel stores
the forward half by one TMA and the backward half row by row in reverse, q TMA stores of one
row in a loop, which is the flip; dt_cat is not written here (the caller's jnp, a (b, L, 2H)
concatenate). The backward kernel reads the backward half's cotangent the same way reversed
(q one-row TMA loads), so all its products are in original time, and writes both halves of g
in original time, one TMA each.

Shapes: xbc (b, L, W) holding xBC at columns [xo, xo + C), C = H*P + 2*G*N; weights (K, C)
and biases (C,) float32; outputs (b, L, nd*H*P), (b, L, nd*G*N) x 2 in `dtype`, nd = 1 (the
causal mixer: the forward half only) or 2. Constraints (`size_error`): L a multiple of
64 (`ROWS`; the forward's q is 64, or 32 or 16 on small grids: `fwd_rows`), w = the largest
power of two <= 128 dividing both H*P and G*N, at least 64 columns compiled (TMA boxes and
shared-memory rows 128-byte aligned), xBC's columns 16-byte aligned.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dimba_jax.ssd import hopper

ROWS = 64  # q: time rows per program (a multiple of `_rows_layout`'s 1024 / w rows per tile)
MIN_FWD_ROWS = 16  # the fewest rows per program of the forward (`fwd_rows`)
SUB = 16  # rows per step of the backward's first kernel (a multiple of its layout's tile rows)
MAX_COLS = 128  # w: columns per program, at most


def tile_cols(d_inner: int, gn: int) -> int:
    """w: the largest power of two <= MAX_COLS dividing both regions' widths (H*P, G*N)."""
    w = 1
    while w * 2 <= MAX_COLS and d_inner % (w * 2) == 0 and gn % (w * 2) == 0:
        w *= 2
    return w


def _rows_layout(plgpu, w: int, vec: int = 8):
    """The (q, w) register layout of the kernels' tiles: each thread holds `vec` consecutive
    columns of a row (8: one 16-byte vector of 16-bit data), a warp's lanes span the w columns
    (w / vec lanes) and 32 * vec / w rows, the 4 warps of the warpgroup stack such row groups,
    so a warp reads whole contiguous rows of an unswizzled shared-memory tile without bank
    conflicts; (w,) vectors of the reduced layout broadcast along the rows. vec = 4 (float32
    vectors of 16 bytes) is what Mosaic's sums across warps take (`jnp.sum(axis=0)`)."""
    from jax.experimental.mosaic.gpu import fragmented_array as fa  # pylint: disable=g-import-not-at-top
    lanes_rows = 32 * vec // w
    if lanes_rows == 1:  # a warp's lanes span one row
        tiling = fa.Tiling(((4, w), (vec,)))
        return plgpu.Layout.TILED(tiling, warp_dims=(-3,), lane_dims=(-2,), vector_dim=-1)
    tiling = fa.Tiling(((4 * lanes_rows, w), (lanes_rows, w), (vec,)))
    return plgpu.Layout.TILED(tiling, warp_dims=(-5,), lane_dims=(-3, -2), vector_dim=-1)


def size_error(seqlen: int, d_inner: int, gn: int, xo: int, itemsize: int,
               interpret: bool, k_width: int = 4) -> str:
    """Why the kernel cannot take these sizes ("" if it can)."""
    if seqlen % ROWS:
        return f"the Mosaic conv needs seqlen a multiple of {ROWS}, got {seqlen}"
    w = tile_cols(d_inner, gn)
    if not interpret and ((w * itemsize) % 128 or (k_width * w) % 128):
        return (f"the Mosaic conv needs H*P ({d_inner}) and G*N ({gn}) to share a power-of-two "
                f"divisor of at least {max(128 // itemsize, -(-128 // k_width))} columns, "
                f"got {w}")
    if not interpret and (xo * itemsize) % 16:
        return f"the Mosaic conv needs xBC's first column 16-byte aligned, got column {xo}"
    return ""


class _Sizes(NamedTuple):
    """The kernels' static sizes: nd directions, K taps, C columns of xBC (d_inner of x, gn of
    B and C each), w columns per program, q rows per program, nt row blocks."""
    nd: int
    k_width: int
    c: int
    d_inner: int
    gn: int
    w: int
    q: int
    nt: int


def column_tiles(d_inner: int, gn: int, w: int) -> int:
    """Column tiles of xBC, w columns each: x's d_inner / w, then B's and C's gn / w each."""
    return d_inner // w + 2 * (gn // w)


def fwd_rows(batch: int, seqlen: int, ncols: int, min_programs: int) -> int:
    """q of the forward kernel: ROWS, halved (down to MIN_FWD_ROWS) while batch x row blocks x
    column tiles stays under the grid target `min_programs`. At batch 1 (the sampler) the base
    mixer has 14 column tiles x 16 row blocks = 224 programs at 64 rows, all resident at once,
    so a call lasts as long as one program, whose backward half is q one-row TMA stores in a
    loop (the flip); at 16 rows, 896 programs of 16 such stores each."""
    q = ROWS
    while q > MIN_FWD_ROWS and batch * (seqlen // q) * ncols < min_programs:
        q //= 2
    return q


def _sizes(xbc, ws, ngroups, d_state, xo, interpret, min_programs: int = 1) -> _Sizes:
    nd, (k_width, c) = len(ws), ws[0].shape
    bsz, seqlen = xbc.shape[:2]
    gn = ngroups * d_state
    d_inner = c - 2 * gn
    error = size_error(seqlen, d_inner, gn, xo, jnp.dtype(xbc.dtype).itemsize, interpret,
                       k_width)
    if error:
        raise ValueError(error)
    w = tile_cols(d_inner, gn)
    q = fwd_rows(bsz, seqlen, column_tiles(d_inner, gn, w), min_programs)
    return _Sizes(nd, k_width, c, d_inner, gn, w, q, seqlen // q)


def _regions(sz: _Sizes):
    """(first column tile, tile count, region width) of x, B and C: column tile j of xBC lies in
    the region with first <= j < first + count, at column (j - first) * w of that region."""
    nx, ng = sz.d_inner // sz.w, sz.gn // sz.w
    return ((0, nx, sz.d_inner), (nx, ng, sz.gn), (nx + ng, ng, sz.gn))


class _Program:
    """What both kernels do in their program (column tile j, row block ti, batch row bi, and
    with `split` one direction): the TMA loads of a direction's xBC row block
    (`start_loads`) and of its weight and bias tiles, its float32 pre-activation from them
    (`pre`) in the reference's order, and the row stores of its outputs (`store_rows`).

    split: False = one program per (j, ti, bi) does every direction (loads all issued first);
    True = the column grid axis is nd times longer, its programs each do one direction with
    half the shared memory (more programs in flight per SM). Buffers have one slot per
    direction a program does: bufs (slots, q + K - 1, w) in xbc's dtype; w_smem (slots, K, w)
    and b_smem (slots, w) float32; bars: 4 * slots one-arrival barriers (block, weights, bias
    per slot, then one halo each)."""

    def __init__(self, plgpu, sz: _Sizes, seqlen: int, xo: int, interpret: bool, vec: int = 8,
                 split: bool = False):
        self.plgpu, self.sz, self.seqlen, self.xo = plgpu, sz, seqlen, xo
        self.interpret, self.split = interpret, bool(split) and sz.nd > 1
        self.slots = 1 if self.split else sz.nd
        self.ncols = column_tiles(sz.d_inner, sz.gn, sz.w)
        self.layout = _rows_layout(plgpu, sz.w, vec)
        self.col = self.layout.reduce(0)
        self.load = hopper.smem_loader(plgpu, interpret)
        # the (w,) float32 vectors: 8-column vectors are 32 bytes, wider than Mosaic's optimized
        # transfers take; one load per tap and program
        self.load_vec = hopper.smem_loader(plgpu, interpret, optimized=False)

    def scratch(self, dtype):
        plgpu, sz, n = self.plgpu, self.sz, self.slots
        f32 = jnp.float32
        return [plgpu.SMEM((n, sz.q + sz.k_width - 1, sz.w), dtype),
                plgpu.SMEM((n, sz.k_width, sz.w), f32), plgpu.SMEM((n, sz.w), f32),
                plgpu.Barrier(num_barriers=4 * n)]

    def ids(self):
        """(column tile j, row block ti, batch row bi) of this program."""
        c = lax.axis_index("col")
        j = c % self.ncols if self.split else c
        return j, lax.axis_index("row"), lax.axis_index("batch")

    def for_directions(self, start, body):
        """start(h, slot) issues direction h's loads, body(h, slot) waits for them and does its
        work: every direction's loads first, then each body (one program for all), or (split)
        the program's one direction, chosen by its column index."""
        if not self.split:
            for h in range(self.sz.nd):
                start(h, h)
            for h in range(self.sz.nd):
                body(h, h)
            return
        direction = lax.axis_index("col") // self.ncols
        for h in range(self.sz.nd):
            @pl.when(direction == h)
            def _(h=h):
                start(h, 0)
                body(h, 0)

    def start_loads(self, h, slot, x_hbm, w_hbm, b_hbm, bufs, w_smem, b_smem, bars):
        """Starts direction h's loads into `slot`: forward block original rows
        [t0 - (K-1), t0 + q) into buffer rows [0, q + K - 1), backward block
        [L - t0 - q, L - t0 + K - 1) likewise; the halo rows past either end of the sequence are
        zeros (row block 0: K zero rows, the halo and the block row beside it, which the
        block's TMA then overwrites: Mosaic stores need 128-element multiples)."""
        plgpu, sz, seqlen = self.plgpu, self.sz, self.seqlen
        q, km, w = sz.q, sz.k_width - 1, sz.w
        j, ti, bi = self.ids()
        t0 = ti * q
        cols = pl.ds(self.xo + j * w, w)
        main = (t0, seqlen - t0 - q)[h]
        halo_row, halo_src = ((0, t0 - km), (q, seqlen - t0))[h]  # buffer row, original row

        @pl.when(ti == 0)
        def _():
            bufs.at[slot, pl.ds(halo_row - (h == 1), sz.k_width)][...] = jnp.zeros(
                (sz.k_width, w), bufs.dtype)
            plgpu.commit_smem()

        plgpu.copy_gmem_to_smem(x_hbm.at[bi, pl.ds(main, q), cols],
                                bufs.at[slot, pl.ds(km * (h == 0), q)], bars.at[3 * slot])
        plgpu.copy_gmem_to_smem(w_hbm[h].at[:, pl.ds(j * w, w)], w_smem.at[slot],
                                bars.at[3 * slot + 1])
        plgpu.copy_gmem_to_smem(b_hbm[h].at[pl.ds(j * w, w)], b_smem.at[slot],
                                bars.at[3 * slot + 2])
        pl.when(ti > 0)(functools.partial(
            plgpu.copy_gmem_to_smem, x_hbm.at[bi, pl.ds(halo_src, km), cols],
            bufs.at[slot, pl.ds(halo_row, km)], bars.at[3 * self.slots + slot]))

    def wait(self, slot, bars):
        """Waits for a slot's block, halo, weights and bias."""
        ti = lax.axis_index("row")
        for bar in range(3):
            self.plgpu.barrier_wait(bars.at[3 * slot + bar])
        pl.when(ti > 0)(functools.partial(self.plgpu.barrier_wait,
                                          bars.at[3 * self.slots + slot]))

    def bcast(self, v, rows=None):  # (w,) -> (rows, w) (default q rows) in the rows layout
        v = lax.broadcast_in_dim(v, (rows or self.sz.q, self.sz.w), [1])
        return v if self.interpret else self.plgpu.layout_cast(v, self.layout)

    def tap(self, h, slot, k, bufs, r0=0, rows=None):
        """Direction h's tap k at the block's rows [r0, r0 + rows) (default all q), float32:
        forward out row i takes buffer row i + k; backward (original time, buffer row r =
        original row L - t0 - q + r): row r takes buffer row r + (K-1) - k."""
        shift = k if h == 0 else self.sz.k_width - 1 - k
        return self.load(bufs.at[slot, pl.ds(r0 + shift, rows or self.sz.q)],
                         self.layout).astype(jnp.float32)

    def pre(self, h, slot, bufs, w_smem, b_smem, r0=0, rows=None, taps=None):
        """Direction h's float32 pre-activation at rows [r0, r0 + rows) (default all q):
        bias + sum_k w[k] * tap k (taps: those K taps if already loaded)."""
        acc = self.bcast(self.load_vec(b_smem.at[slot], self.col), rows)
        for k in range(self.sz.k_width):
            tap = self.tap(h, slot, k, bufs, r0, rows) if taps is None else taps[k]
            acc = acc + tap * self.bcast(self.load_vec(w_smem.at[slot, k], self.col), rows)
        return acc

    def store_rows(self, src, dst, h, t0):
        """Direction h's (q, w) SMEM rows `src` to HBM at scan rows [t0, t0 + q), dst(rows) the
        HBM view of those rows: one TMA forward; backward rows are in original time in `src`
        (scan row t0 + i = its row q - 1 - i), so q one-row TMAs in reverse (the flip)."""
        if h == 0:
            self.plgpu.copy_smem_to_gmem(src, dst(pl.ds(t0, self.sz.q)))
            return
        @pl.loop(0, self.sz.q)  # a loop, not q unrolled copies: the kernel compiles q x faster
        def _(i):
            self.plgpu.copy_smem_to_gmem(src.at[pl.ds(self.sz.q - 1 - i, 1)],
                                         dst(pl.ds(t0 + i, 1)))

    def call(self, body, name, out_type, scratch, args, semantics, reduction_scratch_bytes=0):
        body.__name__ = name if self.sz.nd == 2 else name.removeprefix("bidir_")
        plgpu, sz = self.plgpu, self.sz
        return hopper.kernel_call(
            plgpu, body, out_type, scratch,
            grid=(self.ncols * (sz.nd if self.split else 1), sz.nt, args[0].shape[0]),
            grid_names=("col", "row", "batch"),
            **({"interpret": hopper.interpret_params()} if self.interpret
               else {"compiler_params": hopper.compiler_params(plgpu, semantics,
                                                                reduction_scratch_bytes)}),
        )(*args)


def conv_fwd_mosaic(xbc, ws, bs, *, ngroups: int, d_state: int, xo: int = 0,
                    dtype=None, interpret: bool = False, semantics: str = "lane",
                    split: bool = False, min_programs: int = 1):
    """Both directions' conv + SiLU (nd = len(ws)), the module docstring's forward kernel.

    Args:
      xbc: (b, L, W) bf16 / f16 / f32, xBC at columns [xo, xo + C).
      ws: nd (K, C) float32 conv weights (forward, then backward); bs: nd (C,) float32 biases.
      ngroups, d_state: G, N (C = H*P + 2*G*N, read off the weights).
      xo: xBC's first column in xbc.
      dtype: the outputs' dtype (default xbc.dtype).
      interpret: run in the Mosaic GPU interpreter (any device; tests).
      semantics: Mosaic GPU lowering semantics ("lane"; see `hopper.compiler_params`).
      split: one direction per program (`_Program`).
      min_programs: the grid target that sets the rows per program (`fwd_rows`; 1 = ROWS).
    Returns:
      x (b, L, nd*H*P), bm, cm (b, L, nd*G*N) in `dtype`, direction-major columns.
    """
    plgpu = hopper.mosaic_gpu()
    sz = _sizes(xbc, ws, ngroups, d_state, xo, interpret, min_programs)
    bsz, seqlen, _ = xbc.shape
    nd, q, w = sz.nd, sz.q, sz.w
    dtype = jnp.dtype(dtype or xbc.dtype)
    prog = _Program(plgpu, sz, seqlen, xo, interpret, split=split)
    regions = _regions(sz)

    def conv_fwd(x_hbm, *refs):
        w_hbm, b_hbm = refs[:nd], refs[nd:2 * nd]
        outs = refs[2 * nd:2 * nd + 3]
        bufs, w_smem, b_smem, bars, o_smem = refs[2 * nd + 3:]
        j, ti, bi = prog.ids()

        def start(h, slot):
            prog.start_loads(h, slot, x_hbm, w_hbm, b_hbm, bufs, w_smem, b_smem, bars)

        def body(h, slot):
            prog.wait(slot, bars)
            o_smem.at[slot][...] = jax.nn.silu(prog.pre(h, slot, bufs, w_smem,
                                                        b_smem)).astype(dtype)
            plgpu.commit_smem()
            for (first, count, total), out in zip(regions, outs):
                @pl.when((j >= first) & (j < first + count))
                def _(first=first, total=total, out=out):
                    oc = pl.ds(h * total + (j - first) * w, w)
                    prog.store_rows(o_smem.at[slot], lambda rows: out.at[bi, rows, oc], h,
                                    ti * q)

        prog.for_directions(start, body)
        plgpu.wait_smem_to_gmem(0)

    out_type = (jax.ShapeDtypeStruct((bsz, seqlen, nd * sz.d_inner), dtype),
                jax.ShapeDtypeStruct((bsz, seqlen, nd * sz.gn), dtype),
                jax.ShapeDtypeStruct((bsz, seqlen, nd * sz.gn), dtype))
    scratch = prog.scratch(xbc.dtype) + [plgpu.SMEM((prog.slots, q, w), dtype)]
    return prog.call(conv_fwd, "bidir_conv_fwd", out_type, scratch,
                     (xbc, *[wt.astype(jnp.float32) for wt in ws],
                      *[b.astype(jnp.float32) for b in bs]), semantics)


def dsilu(a):
    """silu'(a) = sig(a) * (1 + a * (1 - sig(a))) (both conv backwards' g, here and in
    `fused_conv`)."""
    sig = jax.nn.sigmoid(a)
    return sig * (1.0 + a * (1.0 - sig))


def conv_bwd_g_mosaic(xbc, ws, bs, dx, dbm, dcm, *, ngroups: int, d_state: int, xo: int = 0,
                      interpret: bool = False, semantics: str = "lane", split: bool = True):
    """The conv backward's first kernel ("bidir_conv_bwd_g"; `fused_conv`'s module docstring has
    the math): g = dout * silu'(a) of both directions from the recomputed pre-activations, and
    the programs' partial sums of the weight and bias gradients.

    Per program, besides the forward's loads: the cotangents' forward half at rows
    [t0, t0 + q) by one TMA and the backward half at scan rows t0 + q - 1 - r into buffer row r
    (original time) by q one-row TMAs, so every product is formed in original time; both
    halves of g are stored in original time, one TMA each. SUB rows at a time (few registers
    per thread), the weight and bias sums elementwise over the steps and reduced across rows
    once per program.

    Args:
      xbc, ws, bs, xo, interpret, semantics, split: as `conv_fwd_mosaic` (split on by default
        here: this kernel's ~113 KB of shared memory a program halves).
      dx (b, L, nd*H*P), dbm, dcm (b, L, nd*G*N): the cotangents of the forward's outputs.
    Returns:
      g (b, L, nd, C) in xbc's dtype ([g_f[t] | g_b[L-1-t]]: both halves in original time) and
      (b, L/q, nd, K + 1, C) float32 partial sums over each program's q rows of
      [dw_0 .. dw_{K-1}; dbias] per direction, from the float32 g.
    """
    plgpu = hopper.mosaic_gpu()
    sz = _sizes(xbc, ws, ngroups, d_state, xo, interpret)
    bsz, seqlen, _ = xbc.shape
    nd, q, w, k_width, c = sz.nd, sz.q, sz.w, sz.k_width, sz.c
    f32 = jnp.float32
    prog = _Program(plgpu, sz, seqlen, xo, interpret, vec=4, split=split)
    regions = _regions(sz)

    def conv_bwd_g(x_hbm, *refs):
        w_hbm, b_hbm = refs[:nd], refs[nd:2 * nd]
        d_hbm = refs[2 * nd:2 * nd + 3]
        g_hbm, dw_hbm = refs[2 * nd + 3:2 * nd + 5]
        bufs, w_smem, b_smem, bars, d_smem, g_smem, dw_smem, d_bars, rev_bar = refs[2 * nd + 5:]
        j, ti, bi = prog.ids()
        t0 = ti * q

        def start(h, slot):
            prog.start_loads(h, slot, x_hbm, w_hbm, b_hbm, bufs, w_smem, b_smem, bars)
            for (first, count, total), d_ref in zip(regions, d_hbm):
                @pl.when((j >= first) & (j < first + count))
                def _(first=first, total=total, d_ref=d_ref):
                    dc = pl.ds(h * total + (j - first) * w, w)
                    if h == 0:
                        plgpu.copy_gmem_to_smem(d_ref.at[bi, pl.ds(t0, q), dc],
                                                d_smem.at[slot], d_bars.at[slot])
                        return

                    @pl.loop(0, q)
                    def _(r):
                        plgpu.copy_gmem_to_smem(d_ref.at[bi, pl.ds(t0 + q - 1 - r, 1), dc],
                                                d_smem.at[slot, pl.ds(r, 1)], rev_bar.at[0])

        def body(h, slot):
            prog.wait(slot, bars)
            plgpu.barrier_wait(d_bars.at[slot] if h == 0 else rev_bar.at[0])
            sums = [jnp.zeros((SUB, w), f32)] * (k_width + 1)
            for r0 in range(0, q, SUB):
                taps = [prog.tap(h, slot, k, bufs, r0, SUB) for k in range(k_width)]
                dout = prog.load(d_smem.at[slot, pl.ds(r0, SUB)], prog.layout).astype(f32)
                g = dout * dsilu(prog.pre(h, slot, bufs, w_smem, b_smem, r0, SUB, taps))
                g_smem.at[slot, pl.ds(r0, SUB)][...] = g.astype(g_smem.dtype)
                sums = [s + g * t for s, t in zip(sums, taps)] + [sums[-1] + g]
            for k in range(k_width + 1):
                dw_smem.at[slot, k][...] = jnp.sum(sums[k], axis=0)
            plgpu.commit_smem()
            cols = pl.ds(j * w, w)
            plgpu.copy_smem_to_gmem(g_smem.at[slot],
                                    g_hbm.at[bi, pl.ds((t0, seqlen - t0 - q)[h], q), h, cols])
            plgpu.copy_smem_to_gmem(dw_smem.at[slot], dw_hbm.at[bi, ti, h, :, cols])

        prog.for_directions(start, body)
        plgpu.wait_smem_to_gmem(0)

    out_type = (jax.ShapeDtypeStruct((bsz, seqlen, nd, c), xbc.dtype),
                jax.ShapeDtypeStruct((bsz, sz.nt, nd, k_width + 1, c), f32))
    n = prog.slots
    scratch = prog.scratch(xbc.dtype) + [
        plgpu.SMEM((n, q, w), dx.dtype), plgpu.SMEM((n, q, w), xbc.dtype),
        plgpu.SMEM((n, k_width + 1, w), f32), plgpu.Barrier(num_barriers=n),
        plgpu.Barrier(num_arrivals=q, num_barriers=1)]
    return prog.call(conv_bwd_g, "bidir_conv_bwd_g", out_type, scratch,
                     (xbc, *[wt.astype(f32) for wt in ws], *[b.astype(f32) for b in bs],
                      dx, dbm, dcm), semantics,
                     # jnp.sum(axis=0) of a (SUB, w) float32 tile: 8 row groups of (w,) partials
                     reduction_scratch_bytes=8 * w * 4)
