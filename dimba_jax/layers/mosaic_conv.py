"""The fused conv prologue's forward (`fused_conv`'s module docstring has the math) as one
Mosaic GPU (Hopper) kernel: both directions' depthwise conv + bias + SiLU, written where the
SSD reads them (x_cat, B_cat, C_cat; backward halves in scan time).

Grid (column tile j of xBC, w columns; row block of q rows; batch row). A program reads two
(q + K - 1, w) row blocks of xBC into shared memory by TMA, each a q-row block plus a halo of
K - 1 rows (zeros past either end of the sequence):

    forward:  original rows [t0 - (K-1), t0 + q)          (its outputs: rows t0 + i)
    backward: original rows [L - t0 - q, L - t0 + K - 1)   (its outputs: scan rows t0 + i,
              original rows L - 1 - t0 - i)

and forms each direction's (q, w) pre-activation from K row-shifted slices of its block
(static offsets), float32, in the reference's order (bias, then the taps k = 0 .. K-1). The
forward half is stored by one TMA; the backward half is computed in original time (an
anti-causal conv over its block) and stored row by row in reverse, q TMA stores of one row,
which is the flip. dt_cat is not written here (the caller's jnp, a (b, L, 2H) concatenate).

Shapes: xbc (b, L, W) holding xBC at columns [xo, xo + C), C = H*P + 2*G*N; weights (K, C)
and biases (C,) float32; outputs (b, L, nd*H*P), (b, L, nd*G*N) x 2 in `dtype`, nd = 1 (the
causal mixer: the forward half only) or 2. Constraints (`size_error`): L a multiple of
q = 64, w = the largest power of two <= 128 dividing both H*P and G*N, at least 64 columns
compiled (TMA boxes and shared-memory rows 128-byte aligned), xBC's columns 16-byte aligned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dimba_jax.ssd import hopper

ROWS = 64  # q: time rows per program (a multiple of `_rows_layout`'s 1024 / w rows per tile)
MAX_COLS = 128  # w: columns per program, at most


def tile_cols(d_inner: int, gn: int) -> int:
    """w: the largest power of two <= MAX_COLS dividing both regions' widths (H*P, G*N)."""
    w = 1
    while w * 2 <= MAX_COLS and d_inner % (w * 2) == 0 and gn % (w * 2) == 0:
        w *= 2
    return w


def _rows_layout(plgpu, w: int):
    """The (q, w) register layout of the kernel's tiles: each thread holds 8 consecutive
    columns of a row (one 16-byte vector of 16-bit data), a warp's lanes span the w columns
    (w / 8 lanes) and 256 / w rows, the 4 warps of the warpgroup stack such row groups, so a
    warp reads whole contiguous rows of an unswizzled shared-memory tile without bank
    conflicts; (w,) vectors of the reduced layout broadcast along the rows."""
    from jax.experimental.mosaic.gpu import fragmented_array as fa  # pylint: disable=g-import-not-at-top
    lanes_rows = 256 // w
    tiling = fa.Tiling(((4 * lanes_rows, w), (lanes_rows, w), (8,)))
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


def conv_fwd_mosaic(xbc, ws, bs, *, nheads: int, ngroups: int, d_state: int, xo: int = 0,
                    dtype=None, interpret: bool = False, semantics: str = "lane"):
    """Both directions' conv + SiLU (nd = len(ws)), the module docstring's kernel.

    Args:
      xbc: (b, L, W) bf16 / f16 / f32, xBC at columns [xo, xo + C).
      ws: nd (K, C) float32 conv weights (forward, then backward); bs: nd (C,) float32 biases.
      nheads, ngroups, d_state: H, G, N (C = H*P + 2*G*N).
      xo: xBC's first column in xbc.
      dtype: the outputs' dtype (default xbc.dtype).
      interpret: run in the Mosaic GPU interpreter (any device; tests).
      semantics: Mosaic GPU lowering semantics ("lane"; see `hopper.compiler_params`).
    Returns:
      x (b, L, nd*H*P), bm, cm (b, L, nd*G*N) in `dtype`, direction-major columns.
    """
    plgpu = hopper.mosaic_gpu()
    nd, (k_width, c) = len(ws), ws[0].shape
    bsz, seqlen, _ = xbc.shape
    gn = ngroups * d_state
    d_inner = c - 2 * gn
    error = size_error(seqlen, d_inner, gn, xo, jnp.dtype(xbc.dtype).itemsize, interpret,
                       k_width)
    if error:
        raise ValueError(error)
    q, w, km = ROWS, tile_cols(d_inner, gn), k_width - 1
    nx, ng_tiles = d_inner // w, gn // w
    nt = seqlen // q
    dtype = jnp.dtype(dtype or xbc.dtype)
    f32 = jnp.float32
    rows_layout = _rows_layout(plgpu, w)
    col = rows_layout.reduce(0)
    load = hopper.smem_loader(plgpu, interpret)
    # the (w,) float32 vectors: 8-column vectors are 32 bytes, wider than Mosaic's optimized
    # transfers take; one load per tap and program
    load_vec = hopper.smem_loader(plgpu, interpret, optimized=False)

    def bcast(v):  # (w,) -> (q, w) in rows_layout
        v = lax.broadcast_in_dim(v, (q, w), [1])
        return v if interpret else plgpu.layout_cast(v, rows_layout)

    regions = ((0, nx, d_inner), (nx, ng_tiles, gn), (nx + ng_tiles, ng_tiles, gn))

    def conv_fwd(x_hbm, *refs):
        w_hbm, b_hbm = refs[:nd], refs[nd:2 * nd]
        outs = refs[2 * nd:2 * nd + 3]
        bufs, w_smem, b_smem, o_smem, bars = refs[2 * nd + 3:]
        j, ti, bi = lax.axis_index("col"), lax.axis_index("row"), lax.axis_index("batch")
        t0 = ti * q
        cols = pl.ds(xo + j * w, w)
        # Block starts (original rows) and halos per direction: forward [t0 - km, t0) into
        # buffer rows [0, km), backward [L - t0, L - t0 + km) into rows [q, q + km); in row
        # block 0 both lie outside the sequence: K zero rows (the halo and the block row
        # beside it, which the block's TMA then overwrites) instead.
        main = (t0, seqlen - t0 - q)
        halo = ((0, t0 - km), (q, seqlen - t0))  # (buffer row, first original row)

        @pl.when(ti == 0)
        def _():
            for h in range(nd):
                bufs.at[h, pl.ds(halo[h][0] - (h == 1), k_width)][...] = jnp.zeros(
                    (k_width, w), bufs.dtype)
            plgpu.commit_smem()

        for h in range(nd):
            plgpu.copy_gmem_to_smem(x_hbm.at[bi, pl.ds(main[h], q), cols],
                                    bufs.at[h, pl.ds(km * (h == 0), q)], bars.at[3 * h])
            plgpu.copy_gmem_to_smem(w_hbm[h].at[:, pl.ds(j * w, w)], w_smem.at[h],
                                    bars.at[3 * h + 1])
            plgpu.copy_gmem_to_smem(b_hbm[h].at[pl.ds(j * w, w)], b_smem.at[h],
                                    bars.at[3 * h + 2])

            pl.when(ti > 0)(functools.partial(
                plgpu.copy_gmem_to_smem, x_hbm.at[bi, pl.ds(halo[h][1], km), cols],
                bufs.at[h, pl.ds(halo[h][0], km)], bars.at[3 * nd + h]))

        plgpu.commit_smem()
        for h in range(nd):
            for bar in range(3):
                plgpu.barrier_wait(bars.at[3 * h + bar])
            pl.when(ti > 0)(functools.partial(plgpu.barrier_wait, bars.at[3 * nd + h]))
            acc = bcast(load_vec(b_smem.at[h], col))
            for k in range(k_width):
                # forward: out row i takes buffer row i + k; backward (original time, buffer
                # row r = original row L - t0 - q + r): row r takes buffer row r + km - k
                shift = k if h == 0 else km - k
                xk = load(bufs.at[h, pl.ds(shift, q)], rows_layout).astype(f32)
                acc = acc + xk * bcast(load_vec(w_smem.at[h, k], col))
            o_smem.at[h][...] = jax.nn.silu(acc).astype(dtype)
        plgpu.commit_smem()
        for (first, count, total), out in zip(regions, outs):
            @pl.when((j >= first) & (j < first + count))
            def _(first=first, total=total, out=out):
                for h in range(nd):
                    oc = pl.ds(h * total + (j - first) * w, w)
                    if h == 0:
                        plgpu.copy_smem_to_gmem(o_smem.at[0], out.at[bi, pl.ds(t0, q), oc])
                        continue
                    for i in range(q):  # scan row t0 + i = original row L - 1 - t0 - i
                        plgpu.copy_smem_to_gmem(o_smem.at[h, pl.ds(q - 1 - i, 1)],
                                                out.at[bi, pl.ds(t0 + i, 1), oc])

        plgpu.wait_smem_to_gmem(0)

    out_type = (jax.ShapeDtypeStruct((bsz, seqlen, nd * d_inner), dtype),
                jax.ShapeDtypeStruct((bsz, seqlen, nd * gn), dtype),
                jax.ShapeDtypeStruct((bsz, seqlen, nd * gn), dtype))
    scratch = [plgpu.SMEM((nd, q + km, w), xbc.dtype), plgpu.SMEM((nd, k_width, w), f32),
               plgpu.SMEM((nd, w), f32), plgpu.SMEM((nd, q, w), dtype),
               plgpu.Barrier(num_barriers=4 * nd)]
    name = "bidir_conv_fwd" if nd == 2 else "conv_fwd"
    conv_fwd.__name__ = name
    return hopper.kernel_call(
        plgpu, conv_fwd, out_type, scratch,
        grid=(nx + 2 * ng_tiles, nt, bsz), grid_names=("col", "row", "batch"),
        **({"interpret": hopper.interpret_params()} if interpret
           else {"compiler_params": hopper.compiler_params(plgpu, semantics)}),
    )(xbc, *[wt.astype(f32) for wt in ws], *[b.astype(f32) for b in bs])
