"""The SSD forward kernels in Pallas **Mosaic GPU** (Hopper: TMA + wgmma), one warpgroup per program.

- `chunk_out_mosaic`, grid (chunk, head, batch): the chunk output
      y = ((C B^T) o L) (x dt) + exp(s) * (C h_c^T) + D x,   L_ij = exp(s_i - s_j) [i >= j]
  TMA copies of the x, B, C tiles (swizzled SMEM), of the incoming state h_c (P x N) and of the
  dt, s, D vectors; wgmma G = C B^T (Q x Q) and C h_c^T (Q x P) issued together; in registers
  M = G * L * dt_j (dt folded into M's columns, so x is used straight from SMEM) and the
  off-chunk term scaled by exp(s_i); wgmma acc += M @ x (M from registers, 16-bit), + D x; y
  cast to x.dtype and written through SMEM by a TMA store.
- `chunk_statepass_mosaic`, grid (dstate block, head, batch): the chunk states
      S_c = (x dt)^T (B exp(s_end - s)) = x^T (w * B),   w = dt exp(s_end - s) (`state_weights`)
  fused with the state pass, h_{c+1} = exp(s_end,c) h_c + S_c: one program walks all chunks of
  a sequence with h in the wgmma accumulator and the next chunks' tiles prefetched (TMA slots);
  it writes only the h_c the output kernel needs (x.dtype) and the final state.
  `segmented_statepass` runs it as a two-level walk where programs are few.

float32 inputs use tf32 wgmma, which takes A only from SMEM and both operands K-major: x (and
for the state kernel B) arrive transposed from XLA, M goes through SMEM, D x is added in XLA,
and the chunk is 64 long (the f32 tiles of a 128 chunk exceed shared memory).

Mosaic GPU lowering semantics: the kernels lower under both Lane and Warpgroup semantics (jax
0.10 and 0.11.2), pinned by `semantics=` (default `hopper.DEFAULT_SEMANTICS`) rather than left
to jax's default, which became Warpgroup in jax 0.11. Warpgroup layout inference fails ("Layout
inference failed to find a solution") when one SMEM buffer is loaded twice in two layouts; the
s vector therefore has two buffers (see the s_col_smem comment).

The combining module is `pallas_mosaic` (the differentiable forward with its backward);
`hopper` holds the hardware budget. Imports without a GPU.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dimba_jax.ssd import hopper
from dimba_jax.ssd.hopper import DEFAULT_SEMANTICS

# --------------------------------------------------------------------------------------------
# The Mosaic GPU chunk-output kernel.
# --------------------------------------------------------------------------------------------


SLAB = 64  # rows per consumer warpgroup of the two-warpgroup chunk output


class OutTile(NamedTuple):
    """One chunk's operands of the chunk output in shared memory, and how to wait for them.

    x (q, P), b and c (q, N), h (P, N): 16-bit tiles (x transposed, (P, q), for tf32); s, s_col,
    dt (q,) and d (P,) float32 vectors (s twice, one copy per register layout: see
    `chunk_out_mosaic`'s loads). ready(name) waits for the TMA load of the named operand
    ("x", "b", "c", "h", "s", "s_col", "dt", "d")."""
    x: Any
    b: Any
    c: Any
    h: Any
    s: Any
    s_col: Any
    dt: Any
    d: Any
    ready: Callable[[str], None]


# The chunk output's TMA loads, in issue order.
_OUT_OPERANDS = ("c", "b", "h", "s", "s_col", "dt", "x", "d")


def _out_sources(x_ref, b_ref, c_ref, dt_ref, s_ref, h_ref, d_ref, *, ci, hi, bi, gi, rows,
                 tf32=False) -> dict:
    """The HBM slices that the chunk output loads for tile (chunk ci, head hi, batch bi; group
    gi, rows the chunk's positions), by operand name (`OutTile`'s fields). s comes twice: it
    is read along rows (s_i) and along columns (s_j), two register layouts, and two loads of
    one SMEM buffer are merged by CSE into one value that Warpgroup layout inference cannot
    relayout to both, so the column copy gets its own buffer. tf32 x arrives transposed,
    (batch, nheads, P, Lp): a (P, q) tile."""
    x = x_ref.at[bi, hi, pl.ds(0, x_ref.shape[2]), rows] if tf32 else x_ref.at[bi, rows, hi]
    return dict(c=c_ref.at[bi, rows, gi], b=b_ref.at[bi, rows, gi], h=h_ref.at[bi, hi, ci],
                s=s_ref.at[bi, hi, rows], s_col=s_ref.at[bi, hi, rows],
                dt=dt_ref.at[bi, hi, rows], x=x, d=d_ref.at[hi])


def _out_front(plgpu, t: OutTile, r0, nrows, w, *, p, cdt, interpret):
    """Rows [r0, r0 + nrows) of M = ((C B^T) o L) dt_j over columns [0, w), rounded to cdt, and
    of the off-chunk term exp(s_i) (C h^T): (nrows, w), (nrows, P) in registers (WGMMA layout).
    Returns once x's load is in too (the caller's next product reads it)."""
    f32 = jnp.float32
    wgmma_layout = plgpu.Layout.WGMMA
    row = wgmma_layout.reduce(1)
    col = wgmma_layout.reduce(0)
    load = hopper.smem_loader(plgpu, interpret)
    sl, k = pl.ds(r0, nrows), pl.ds(0, w)
    t.ready("c")
    t.ready("b")
    t.ready("h")

    def products(g_acc, off_acc):
        plgpu.wgmma(g_acc, t.c.at[sl], t.b.at[k].transpose((1, 0)))  # C B^T
        plgpu.wgmma(off_acc, t.c.at[sl], t.h.transpose((1, 0)))       # C h^T
        return g_acc[...], off_acc[...]

    # The Mosaic GPU interpreter (CPU tests) runs TMA copies, barriers and the elementwise
    # math, but its wgmma takes neither transposed operands nor A in registers, and it has no
    # plgpu.load / layouts: there the products are plain dots.
    if interpret:
        c_val = t.c.at[sl][...]
        nt = (((1,), (1,)), ((), ()))
        g = lax.dot_general(c_val, t.b.at[k][...], nt, preferred_element_type=f32)
        off = lax.dot_general(c_val, t.h[...], nt, preferred_element_type=f32)
    else:
        g, off = pl.run_scoped(products, plgpu.ACC((nrows, w), f32), plgpu.ACC((nrows, p), f32))
    t.ready("s")
    t.ready("dt")
    t.ready("s_col")
    s_i = load(t.s.at[sl], row)
    s_j = load(t.s_col.at[k], col)
    dt_j = load(t.dt.at[k], col)

    def iota(dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, (nrows, w), dim)
        return plgpu.broadcasted_iota(jnp.int32, (nrows, w), dim, layout=wgmma_layout)

    i_idx = iota(0) + r0 if r0 else iota(0)
    j_idx = iota(1)
    diff = (lax.broadcast_in_dim(s_i, (nrows, w), [0])
            - lax.broadcast_in_dim(s_j, (nrows, w), [1]))
    decay = jnp.exp(jnp.where(i_idx >= j_idx, diff, -jnp.inf))
    m = (g * decay * lax.broadcast_in_dim(dt_j, (nrows, w), [1])).astype(cdt)
    y0 = off * lax.broadcast_in_dim(jnp.exp(s_i), (nrows, p), [0])
    t.ready("x")
    return m, y0


def _out_rows_16bit(plgpu, t: OutTile, r0, nrows, w, *, p, cdt, interpret):
    """16-bit x: rows [r0, r0 + nrows) of y = y0 + M (x) + D x, float32 (nrows, P) in
    registers (WGMMA layout); every read of the tile's operands is complete on return."""
    f32 = jnp.float32
    wgmma_layout = plgpu.Layout.WGMMA
    load = hopper.smem_loader(plgpu, interpret)
    sl, k = pl.ds(r0, nrows), pl.ds(0, w)
    m, y0 = _out_front(plgpu, t, r0, nrows, w, p=p, cdt=cdt, interpret=interpret)
    if interpret:  # the interpreter's wgmma takes no A in registers: same product
        y = y0 + jnp.dot(m, t.x.at[k][...], preferred_element_type=f32)
    else:  # accumulate M (x) straight onto the off-chunk term
        def intra_init(acc_ref):
            plgpu.wgmma(acc_ref, m, t.x.at[k])                          # y0 + M (x)

        y = pl.run_state(intra_init)(plgpu.ACC.init(y0))
    t.ready("d")
    d_p = load(t.d, wgmma_layout.reduce(0))
    xr = load(t.x.at[sl], wgmma_layout).astype(f32)
    return y + xr * lax.broadcast_in_dim(d_p, (nrows, p), [1])


def chunk_out_mosaic(x, b, c, dt, s, hprev, d, *, q, hpg, interpret=False,
                      semantics: str = DEFAULT_SEMANTICS, warpgroups: int = 1):
    """Chunk-output stage on Hopper.

    Args:
      x: (batch, Lp, nheads, P) bf16/f16, Lp a multiple of q; float32 x comes transposed,
        (batch, nheads, P, Lp), and then D is NOT applied (the caller adds D x).
      b, c: (batch, Lp, ngroups, N), x.dtype.
      dt, s: (batch, nheads, Lp) float32 (processed dt; chunk-local cumsum of dt*A).
      hprev: (batch, nheads, Lp // q, P, N) x.dtype, the state entering each chunk.
      d: (nheads, P) float32 skip weight.
      q: chunk length (64 or 128).  hpg: heads per group.
      interpret: run in the Mosaic GPU interpreter (any device; slow, for tests).
      semantics: Mosaic GPU lowering semantics, "lane" (what the kernel is written for) or
        "warpgroup" (jax 0.11's default; a diagnostic, see `hopper.compiler_params`).
      warpgroups: 1, or 2 (16-bit x at q = 128; else one): two consumer warpgroups per
        program, warpgroup k computing the chunk's rows [64 k, 64 k + 64) over the columns the
        causal mask keeps ([0, 64 k + 64)), so its G, M and accumulators are 64 rows tall and
        the two slabs' wgmmas overlap. Warpgroup 0 issues the TMA loads; each stores its rows.
    Returns:
      y: (batch, Lp, nheads, P) x.dtype.
    """
    if warpgroups not in (1, 2):
        raise ValueError(f"chunk_out_mosaic: warpgroups must be 1 or 2, got {warpgroups!r}")
    plgpu = hopper.mosaic_gpu()
    tf32 = jnp.dtype(x.dtype) == jnp.dtype(jnp.float32)
    if tf32:
        bsz, nh, p, lp = x.shape
    else:
        bsz, lp, nh, p = x.shape
    n = b.shape[-1]
    nc = lp // q
    cdt = x.dtype
    if tf32 or q != 2 * SLAB:
        warpgroups = 1
    f32 = jnp.float32

    def ssd_chunk_out(x_ref, b_ref, c_ref, dt_ref, s_ref, h_ref, d_ref, y_ref,
             x_smem, b_smem, c_smem, h_smem, s_smem, s_col_smem, dt_smem, d_smem, bars,
             *extra_smem):
        ci = lax.axis_index("chunk")
        hi = lax.axis_index("head")
        bi = lax.axis_index("batch")
        gi = lax.div(hi, jnp.array(hpg, hi.dtype))
        rows = pl.ds(ci * q, q)
        barrier = dict(c=0, b=1, h=2, s=3, dt=4, x=5, d=6, s_col=7)
        tile = OutTile(x=x_smem, b=b_smem, c=c_smem, h=h_smem, s=s_smem, s_col=s_col_smem,
                       dt=dt_smem, d=d_smem,
                       ready=lambda name: plgpu.barrier_wait(bars.at[barrier[name]]))

        def issue_loads():
            src = _out_sources(x_ref, b_ref, c_ref, dt_ref, s_ref, h_ref, d_ref, ci=ci, hi=hi,
                               bi=bi, gi=gi, rows=rows, tf32=tf32)
            for name in _OUT_OPERANDS:
                plgpu.copy_gmem_to_smem(src[name], getattr(tile, name), bars.at[barrier[name]])

        def rows_16bit(r0, nrows, w, y_smem):
            """16-bit x: rows [r0, r0 + nrows) of y, stored by TMA."""
            sl = pl.ds(r0, nrows)
            y = _out_rows_16bit(plgpu, tile, r0, nrows, w, p=p, cdt=cdt, interpret=interpret)
            y_smem.at[sl][...] = y.astype(cdt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(y_smem.at[sl], y_ref.at[bi, pl.ds(ci * q + r0, nrows), hi])
            plgpu.wait_smem_to_gmem(0)

        if warpgroups == 2:  # warpgroup k: rows [64 k, 64 k + 64) over columns [0, 64 k + 64)
            wg = lax.axis_index("wg")

            @pl.when(wg == 0)
            def _():
                issue_loads()
                rows_16bit(0, SLAB, SLAB, extra_smem[0])

            @pl.when(wg == 1)
            def _():
                rows_16bit(SLAB, SLAB, q, extra_smem[0])

            return
        issue_loads()
        if not tf32:
            rows_16bit(0, q, q, extra_smem[0])
            return
        # tf32 wgmma: A only from SMEM and both operands K-major, so M goes through SMEM and x
        # is read as the transpose of its (P, q) tile. D x is added by the caller.
        m, y0 = _out_front(plgpu, tile, 0, q, q, p=p, cdt=cdt, interpret=interpret)
        m_smem, y_smem = extra_smem
        if interpret:
            y = y0 + jnp.dot(m, x_smem[...].T, preferred_element_type=f32)
        else:
            m_smem[...] = m
            plgpu.commit_smem()

            def intra_tf32(acc_ref):
                plgpu.wgmma(acc_ref, m_smem, x_smem.transpose((1, 0)))

            y = pl.run_state(intra_tf32)(plgpu.ACC.init(y0))
        y_smem[...] = y
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_smem, y_ref.at[bi, rows, hi])
        plgpu.wait_smem_to_gmem(0)
        plgpu.barrier_wait(bars.at[6])

    x_tile = (p, q) if tf32 else (q, p)
    scratch = [
        plgpu.SMEM(x_tile, cdt, transforms=hopper.smem_transforms(plgpu, x_tile[1], cdt)),
        plgpu.SMEM((q, n), cdt, transforms=hopper.smem_transforms(plgpu, n, cdt)),
        plgpu.SMEM((q, n), cdt, transforms=hopper.smem_transforms(plgpu, n, cdt)),
        plgpu.SMEM((p, n), cdt, transforms=hopper.smem_transforms(plgpu, n, cdt)),
        plgpu.SMEM((q,), f32),  # s (rows)
        plgpu.SMEM((q,), f32),  # s (columns)
        plgpu.SMEM((q,), f32),  # dt
        plgpu.SMEM((p,), f32),
        plgpu.Barrier(num_barriers=8),
    ]
    if tf32:  # M and y tiles
        scratch += [plgpu.SMEM((q, q), f32, transforms=hopper.smem_transforms(plgpu, q, f32)),
                    plgpu.SMEM((q, p), f32, transforms=hopper.smem_transforms(plgpu, p, f32))]
    else:  # y tile
        scratch += [plgpu.SMEM((q, p), cdt, transforms=hopper.smem_transforms(plgpu, p, cdt))]
    y_shape = (bsz, lp, nh, p)
    threads = {"num_threads": 2, "thread_name": "wg"} if warpgroups == 2 else {}
    return hopper.kernel_call(
        plgpu, ssd_chunk_out, jax.ShapeDtypeStruct(y_shape, cdt), scratch,
        grid=(nc, nh, bsz), grid_names=("chunk", "head", "batch"), **threads,
        **({"interpret": hopper.interpret_params()} if interpret
           else {"compiler_params": hopper.compiler_params(plgpu, semantics)}),
    )(x, b, c, dt, s, hprev, d)


# --------------------------------------------------------------------------------------------
# The persistent chunk output: one program per SM walking its tiles, the next ones' loads in
# flight.
# --------------------------------------------------------------------------------------------

PERSISTENT_SLOTS = 2  # tiles in flight per program of the persistent chunk output


def persistent_smem_bytes(q: int, p: int, n: int, itemsize: int = 2,
                          slots: int = PERSISTENT_SLOTS) -> int:
    """Shared memory of `chunk_out_persistent_mosaic` in bytes: `slots` copies of the x, B, C,
    h tiles and of the s, s, dt, D vectors; one y staging tile; the barriers (each buffer
    aligned as Mosaic GPU allocates it, `hopper.aligned`)."""
    a = hopper.aligned
    tiles = a(slots * itemsize * q * p) + 2 * a(slots * itemsize * q * n) + a(
        slots * itemsize * p * n)
    vectors = 3 * a(slots * 4 * q) + a(slots * 4 * p)
    return tiles + vectors + a(itemsize * q * p) + 8 * (len(_OUT_OPERANDS) * slots + slots)


def persistent_error(x, b, q: int, slots: int = PERSISTENT_SLOTS) -> str:
    """Why `chunk_out_persistent_mosaic` cannot take these operands ("" if it can): 16-bit x
    (batch, Lp, nheads, P) at chunk 128 (its two warpgroups take one 64-row slab each), the
    Mosaic tiles' sizes, and its slots of tiles within shared memory."""
    why = hopper.tile_operand_reason("persistent chunk output", x, b, q)
    if why:
        return why
    if q != 2 * SLAB:
        return f"the persistent chunk output needs block_len {2 * SLAB}, got {q}"
    need = persistent_smem_bytes(q, x.shape[-1], b.shape[-1], jnp.dtype(x.dtype).itemsize,
                                 slots)
    if need > hopper.SMEM_LIMIT:
        return (f"the persistent chunk output needs {need} bytes of shared memory at headdim "
                f"{x.shape[-1]}, dstate {b.shape[-1]}, {slots} slots; limit {hopper.SMEM_LIMIT}")
    return ""


def chunk_out_persistent_mosaic(x, b, c, dt, s, hprev, d, *, q, hpg, interpret=False,
                                semantics: str = DEFAULT_SEMANTICS, programs: int | None = None,
                                slots: int = PERSISTENT_SLOTS):
    """`chunk_out_mosaic(..., warpgroups=2)` as a persistent kernel: the same y, bit for bit.

    The (chunk, head, batch) tiles, chunk fastest (the launch order of `chunk_out_mosaic`'s
    grid), are dealt round-robin to `programs` programs (default: one per SM, at most one per
    tile). A program walks its tiles with two consumer warpgroups, warpgroup k computing rows
    [64 k, 64 k + 64) of each tile as `chunk_out_mosaic` does (`_out_rows_16bit`), and keeps the
    loads of its next `slots` - 1 tiles in flight: warpgroup 0 issues every TMA load, the first
    `slots` tiles' up front and each later tile's into the slot of the tile `slots` before it
    once both warpgroups have arrived on that slot's barrier (their last read of it done).
    Each warpgroup stores its y rows from its own half of one staging tile, waiting for its
    previous store to have read it. Where `chunk_out_mosaic` runs one program per tile and one
    block per SM (its tiles take 118,848 bytes at P 64, N 128), so that a program's loads,
    products and store follow each other, here a tile's loads overlap the tiles before it.

    Args: as `chunk_out_mosaic` for 16-bit x (batch, Lp, nheads, P) (`persistent_error`
    says what it takes); programs: how many programs (default hopper.NUM_SMS, at most the
    tile count); slots: tiles in flight per program, >= 2.
    Returns: y (batch, Lp, nheads, P) x.dtype.
    Raises: ValueError (one line) for operands it does not take or slots < 2.
    """
    why = persistent_error(x, b, q, slots)
    if why:
        raise ValueError(why)
    if slots < 2:
        raise ValueError(f"chunk_out_persistent_mosaic: slots must be >= 2, got {slots}")
    plgpu = hopper.mosaic_gpu()
    bsz, lp, nh, p = x.shape
    n = b.shape[-1]
    nc = lp // q
    cdt = x.dtype
    f32 = jnp.float32
    ntiles = nc * nh * bsz
    nprog = max(1, min(int(programs or hopper.NUM_SMS), ntiles))
    k = int(slots)
    nops = len(_OUT_OPERANDS)

    def ssd_chunk_out_persistent(x_ref, b_ref, c_ref, dt_ref, s_ref, h_ref, d_ref, y_ref,
                                 x_smem, b_smem, c_smem, h_smem, s_smem, s_col_smem, dt_smem,
                                 d_smem, y_smem, load_bars, free_bars):
        pid = lax.axis_index("prog")
        wg = lax.axis_index("wg")
        ntl = lax.div(ntiles - 1 - pid, nprog) + 1  # this program's tiles: pid, pid + nprog, ...

        def coords(j):
            t = pid + j * nprog
            return lax.rem(t, nc), lax.rem(lax.div(t, nc), nh), lax.div(t, nc * nh)

        slots = OutTile(x=x_smem, b=b_smem, c=c_smem, h=h_smem, s=s_smem, s_col=s_col_smem,
                        dt=dt_smem, d=d_smem, ready=None)  # (k, ...) buffers, a tile per slot

        def fetch(j, slot):
            ci, hi, bi = coords(j)
            src = _out_sources(x_ref, b_ref, c_ref, dt_ref, s_ref, h_ref, d_ref, ci=ci, hi=hi,
                               bi=bi, gi=lax.div(hi, jnp.array(hpg, hi.dtype)),
                               rows=pl.ds(ci * q, q))
            for i, name in enumerate(_OUT_OPERANDS):
                plgpu.copy_gmem_to_smem(src[name], getattr(slots, name).at[slot],
                                        load_bars.at[i * k + slot])

        def walk(si):
            """Warpgroup si's rows [64 si, 64 si + 64) of each of the program's tiles."""
            r0 = si * SLAB
            sl = pl.ds(r0, SLAB)

            def step(j, carry):
                slot = lax.rem(j, k)
                ci, hi, bi = coords(j)
                tile = slots._replace(
                    **{name: getattr(slots, name).at[slot] for name in _OUT_OPERANDS},
                    ready=lambda name: plgpu.barrier_wait(
                        load_bars.at[_OUT_OPERANDS.index(name) * k + slot]))
                y = _out_rows_16bit(plgpu, tile, r0, SLAB, r0 + SLAB, p=p, cdt=cdt,
                                    interpret=interpret)
                plgpu.barrier_arrive(free_bars.at[slot])  # this warpgroup's reads of the slot done
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # its last y store has read
                y_smem.at[sl][...] = y.astype(cdt)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(y_smem.at[sl], y_ref.at[bi, pl.ds(ci * q + r0, SLAB), hi])
                if si == 0:
                    @pl.when(j + k < ntl)
                    def _refill():
                        plgpu.barrier_wait(free_bars.at[slot])  # both warpgroups are done with it
                        fetch(j + k, slot)
                return carry

            lax.fori_loop(0, ntl, step, 0)
            if si == 0:  # the last tiles' slot releases, never waited for above
                for back in range(k, 0, -1):
                    @pl.when(ntl - back >= 0)
                    def _drain():
                        plgpu.barrier_wait(free_bars.at[lax.rem(ntl - back, k)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 0)
        def _():
            for j0 in range(k):
                @pl.when(j0 < ntl)
                def _first():
                    fetch(j0, j0)

            walk(0)

        @pl.when(wg == 1)
        def _():
            walk(1)

    tr = functools.partial(hopper.smem_transforms, plgpu)
    scratch = [
        plgpu.SMEM((k, q, p), cdt, transforms=tr(p, cdt)),    # x
        plgpu.SMEM((k, q, n), cdt, transforms=tr(n, cdt)),    # B
        plgpu.SMEM((k, q, n), cdt, transforms=tr(n, cdt)),    # C
        plgpu.SMEM((k, p, n), cdt, transforms=tr(n, cdt)),    # h
        plgpu.SMEM((k, q), f32),                              # s (rows)
        plgpu.SMEM((k, q), f32),                              # s (columns; see OutTile)
        plgpu.SMEM((k, q), f32),                              # dt
        plgpu.SMEM((k, p), f32),                              # D
        plgpu.SMEM((q, p), cdt, transforms=tr(p, cdt)),       # y staging, a half per warpgroup
        plgpu.Barrier(num_barriers=nops * k),                 # loads: operand i, slot j at i k + j
        plgpu.Barrier(num_arrivals=2, num_barriers=k),        # a slot's reads done, both warpgroups
    ]
    return hopper.kernel_call(
        plgpu, ssd_chunk_out_persistent, jax.ShapeDtypeStruct((bsz, lp, nh, p), cdt), scratch,
        grid=(nprog,), grid_names=("prog",), num_threads=2, thread_name="wg",
        **({"interpret": hopper.interpret_params()} if interpret
           else {"compiler_params": hopper.compiler_params(plgpu, semantics)}),
    )(x, b, c, dt, s, hprev, d)


# --------------------------------------------------------------------------------------------
# Chunk-state operands.
# --------------------------------------------------------------------------------------------

_STATE_ACC_ITEMS = 64 * 256  # f32 accumulator items per program: 128 registers per thread


def state_block_cols(p: int, n: int) -> int:
    """dstate columns of S_c one program computes: all n when the (p, n) float32 accumulator
    fits in 128 registers per thread of the warpgroup, else the widest multiple-of-64 divisor
    of n that does (the remaining column blocks are further programs)."""
    for k in range(n // 64, 0, -1):
        if (n // 64) % k == 0 and p * 64 * k <= _STATE_ACC_ITEMS:
            return 64 * k
    return 64



def state_weights(dt, s, q):
    """w_t = dt_t * exp(s_end - s_t), the per-position weight of the chunk states.

    Args:
      dt, s: (batch, nheads, Lp) float32, Lp a multiple of q (s the chunk-local cumsum of dt*A).
    Returns:
      (batch, nheads, Lp) float32.
    """
    bsz, nh, lp = s.shape
    sc = s.reshape(bsz, nh, lp // q, q)
    return (dt.reshape(sc.shape) * jnp.exp(sc[..., -1:] - sc)).reshape(bsz, nh, lp)


def _state_operand_dims(x: jax.Array, b: jax.Array):
    """(tf32, batch, Lp, nheads, P, N) of the chunk-state kernels' x / B operands.

    16-bit operands come as x (batch, Lp, nheads, P), B (batch, Lp, ngroups, N); float32 (tf32)
    ones pre-transposed as x (batch, nheads, P, Lp), B (batch, ngroups, N, Lp).
    """
    tf32 = jnp.dtype(x.dtype) == jnp.dtype(jnp.float32)
    if tf32:
        bsz, nh, p, lp = x.shape
        return tf32, bsz, lp, nh, p, b.shape[2]
    bsz, lp, nh, p = x.shape
    return tf32, bsz, lp, nh, p, b.shape[-1]


# --------------------------------------------------------------------------------------------
# The Mosaic GPU chunk-state + state-pass kernel.
# --------------------------------------------------------------------------------------------


def statepass_block_cols(q: int, p: int, n: int, itemsize: int, programs: int) -> int:
    """dstate columns per program of the fused state kernel: as `state_block_cols`, narrowed
    to 64 when the (batch x heads x column blocks) programs would not fill two waves of SMs
    (each program walks all chunks of its sequence, so programs are the only parallelism) or
    when the wider tiles exceed shared memory."""
    nb = state_block_cols(p, n)
    if (programs * (n // nb) < 2 * hopper.NUM_SMS
            or statepass_smem_bytes(q, p, nb, itemsize) > hopper.SMEM_LIMIT):
        nb = 64
    return nb


def statepass_smem_bytes(q: int, p: int, nb: int, itemsize: int, slots: int = 2) -> int:
    """Shared memory of the fused state kernel: `slots` slots of x, B, w, decay; the scaled x
    tile; two slots of the outgoing h_c tile; one float32 h tile (initial / final state)."""
    loads = slots * (itemsize * (q * p + q * nb) + 4 * (q + p))
    return loads + itemsize * q * p + 2 * itemsize * p * nb + 4 * p * nb


MAX_STATEPASS_SLOTS = 4


def statepass_slots(q: int, p: int, nb: int, itemsize: int) -> int:
    """TMA slots (chunks in flight) of the fused state kernel: the walk over the chunks is
    sequential, so a step waits on the load of its chunk unless it was issued several steps
    earlier. As many as fit (up to MAX_STATEPASS_SLOTS) without losing the blocks per SM that
    two slots allow (two blocks where two slots fit in half an SM's shared memory)."""
    limit = (hopper.TWO_BLOCKS_SMEM if statepass_smem_bytes(q, p, nb, itemsize) <= hopper.TWO_BLOCKS_SMEM
             else hopper.SMEM_LIMIT)
    slots = 2
    while (slots < MAX_STATEPASS_SLOTS
           and statepass_smem_bytes(q, p, nb, itemsize, slots + 1) <= limit):
        slots += 1
    return slots


def chunk_statepass_mosaic(x, b, w, dec, h0, *, q, hpg, hprev_dtype, block_cols=None,
                            slots=None, segments=1, write_hprev=True, interpret=False,
                            semantics: str = DEFAULT_SEMANTICS):
    """Chunk states and the state pass in one kernel: h_0 = h0, h_{c+1} = dec_c h_c + S_c with
    S_c = x_c^T (w_c * B_c), the states never leaving the chip.

    One program per (dstate column block, head, batch), one warpgroup, walking the chunks in
    order with h in the wgmma accumulator (h_{c+1} = wgmma(acc = dec_c h_c, (x w)^T, B)). The
    x / B / w / decay tiles of chunks c + 1 .. c + slots - 1 are in flight (TMA, `slots`
    buffers) while chunk c is computed; each h_c is written (x.dtype, TMA store from a double-buffered SMEM tile) for the
    output kernel and the backward. 16-bit inputs take x^T straight from x's (q, P) tile (wgmma
    transposes 16-bit operands); tf32 takes no transposed operand (both must be K-major, K = q),
    so float32 x and B arrive transposed: x (batch, nheads, P, Lp), B (batch, ngroups, N, Lp).

    Args:
      x: (batch, Lp, nheads, P) bf16/f16, or float32 transposed to (batch, nheads, P, Lp).
      b: (batch, Lp, ngroups, N) x.dtype, or float32 transposed to (batch, ngroups, N, Lp).
      w: (batch, nheads, Lp) float32, `state_weights(dt, s, q)`.
      dec: (batch, nheads, Lp // q, P) float32, exp(s at the chunk's end) repeated over P.
      h0: (batch, nheads, P, N) float32 initial states.
      q: chunk length.  hpg: heads per group.  hprev_dtype: dtype of the h_c output.
      block_cols: dstate columns per program (default `statepass_block_cols`).
      slots: TMA buffers of the chunk inputs, >= 2 (default `statepass_slots`).
      segments: the chunks are cut into this many equal segments (it must divide Lp // q),
        walked by separate programs, each from its own initial state: h0 is then
        (batch, segments, nheads, P, N) and `final` (batch, segments, nheads, P, N), the state
        at each segment's end (`segmented_statepass` combines them).
      write_hprev: False skips the h_c stores (hprev is then a (1, 1, 1, P, block_cols)
        placeholder).
    Returns:
      hprev: (batch, nheads, Lp // q, P, N) hprev_dtype, the state entering each chunk;
      final: (batch, nheads, P, N) float32 (per segment: see `segments`).
    """
    plgpu = hopper.mosaic_gpu()
    tf32, bsz, lp, nh, p, n = _state_operand_dims(x, b)
    nc = lp // q
    nb = int(block_cols or statepass_block_cols(q, p, n, jnp.dtype(x.dtype).itemsize, bsz * nh))
    if n % nb or nb % 64:
        raise ValueError(f"block_cols must be a multiple of 64 dividing dstate {n}, got {nb}")
    nblk = n // nb
    itemsize = jnp.dtype(x.dtype).itemsize
    k = int(slots or statepass_slots(q, p, nb, itemsize))
    if k < 2:
        raise ValueError(f"slots must be >= 2, got {k}")
    nseg = int(segments)
    if nseg < 1 or nc % nseg:
        raise ValueError(f"segments must be >= 1 and divide the {nc} chunks, got {segments}")
    ncs = nc // nseg  # chunks per segment
    cdt = x.dtype
    f32 = jnp.float32
    wgmma_layout = plgpu.Layout.WGMMA
    w_layout = wgmma_layout.reduce(0) if tf32 else wgmma_layout.reduce(1)
    row = wgmma_layout.reduce(1)  # (P,) vector along the rows of h

    load = hopper.smem_loader(plgpu, interpret)

    def ssd_chunk_statepass(x_ref, b_ref, w_ref, dec_ref, h0_ref, hp_ref, fin_ref,
             x_smem, b_smem, w_smem, dec_smem, xw_smem, hp_smem, h_smem,
             x_bars, b_bars, w_bars, dec_bars, h_bar):
        ni = lax.axis_index("col")
        hi = lax.axis_index("head")
        bsi = lax.axis_index("batch")  # batch x segment
        bi = lax.div(bsi, jnp.array(nseg, bsi.dtype))
        si = lax.rem(bsi, jnp.array(nseg, bsi.dtype))
        c_first = si * ncs  # the segment's first chunk
        gi = lax.div(hi, jnp.array(hpg, hi.dtype))
        cols = pl.ds(ni * nb, nb)
        h0_at = h0_ref.at[bi, si, hi] if nseg > 1 else h0_ref.at[bi, hi]
        fin_at = fin_ref.at[bi, si, hi] if nseg > 1 else fin_ref.at[bi, hi]

        def fetch(c, slot):  # c counts the segment's chunks; cg is the chunk's global index
            cg = c_first + c
            rows = pl.ds(cg * q, q)
            if tf32:
                plgpu.copy_gmem_to_smem(x_ref.at[bi, hi, pl.ds(0, p), rows], x_smem.at[slot],
                                        x_bars.at[slot])
                plgpu.copy_gmem_to_smem(b_ref.at[bi, gi, cols, rows], b_smem.at[slot],
                                        b_bars.at[slot])
            else:
                plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hi], x_smem.at[slot], x_bars.at[slot])
                plgpu.copy_gmem_to_smem(b_ref.at[bi, rows, gi, cols], b_smem.at[slot],
                                        b_bars.at[slot])
            plgpu.copy_gmem_to_smem(w_ref.at[bi, hi, rows], w_smem.at[slot], w_bars.at[slot])
            plgpu.copy_gmem_to_smem(dec_ref.at[bi, hi, cg], dec_smem.at[slot], dec_bars.at[slot])

        plgpu.copy_gmem_to_smem(h0_at.at[pl.ds(0, p), cols], h_smem, h_bar.at[0])
        for c0 in range(k - 1):  # chunks 0 .. k - 2 in flight before the walk starts
            if c0 < ncs:
                fetch(c0, c0)
        plgpu.barrier_wait(h_bar.at[0])
        h_init = load(h_smem, wgmma_layout)

        def step(c, h):
            slot = lax.rem(c, k)
            ahead = c + k - 1

            @pl.when(ahead < ncs)
            def _prefetch():  # into the slot chunk c - 1 used; its readers have finished
                fetch(ahead, lax.rem(ahead, k))

            plgpu.barrier_wait(x_bars.at[slot])
            plgpu.barrier_wait(w_bars.at[slot])
            plgpu.barrier_wait(dec_bars.at[slot])
            xv = load(x_smem.at[slot], wgmma_layout).astype(f32)
            wv = load(w_smem.at[slot], w_layout)
            decv = load(dec_smem.at[slot], row)
            if tf32:
                xw = xv * lax.broadcast_in_dim(wv, (p, q), [1])
            else:
                xw = xv * lax.broadcast_in_dim(wv, (q, p), [0])
            xw_smem[...] = xw.astype(cdt)
            if write_hprev:
                # h_c out: the TMA store of chunk c - 2 (same h slot) must have read its tile.
                hslot = lax.rem(c, 2)
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                hp_smem.at[hslot][...] = h.astype(hprev_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(hp_smem.at[hslot],
                                        hp_ref.at[bi, hi, c_first + c, pl.ds(0, p), cols])
            h_dec = h * lax.broadcast_in_dim(decv, (p, nb), [0])
            plgpu.barrier_wait(b_bars.at[slot])
            if interpret:
                if tf32:
                    s_c = lax.dot_general(xw_smem[...], b_smem.at[slot][...],
                                          (((1,), (1,)), ((), ())), preferred_element_type=f32)
                else:
                    s_c = lax.dot_general(xw_smem[...], b_smem.at[slot][...],
                                          (((0,), (0,)), ((), ())), preferred_element_type=f32)
                return h_dec + s_c

            def update(acc_ref):
                if tf32:
                    plgpu.wgmma(acc_ref, xw_smem, b_smem.at[slot].transpose((1, 0)))
                else:
                    plgpu.wgmma(acc_ref, xw_smem.transpose((1, 0)), b_smem.at[slot])

            return pl.run_state(update)(plgpu.ACC.init(h_dec))

        h_fin = lax.fori_loop(0, ncs, step, h_init)
        hopper.store_tile_last(plgpu, h_smem, h_fin, fin_at.at[pl.ds(0, p), cols])

    x_tile = (p, q) if tf32 else (q, p)
    b_tile = (nb, q) if tf32 else (q, nb)
    tr = functools.partial(hopper.smem_transforms, plgpu)
    scratch = [
        plgpu.SMEM((k, *x_tile), cdt, transforms=tr(x_tile[1], cdt)),
        plgpu.SMEM((k, *b_tile), cdt, transforms=tr(b_tile[1], cdt)),
        plgpu.SMEM((k, q), f32),
        plgpu.SMEM((k, p), f32),
        plgpu.SMEM(x_tile, cdt, transforms=tr(x_tile[1], cdt)),
        plgpu.SMEM((2, p, nb), hprev_dtype, transforms=tr(nb, hprev_dtype)),
        plgpu.SMEM((p, nb), f32, transforms=tr(nb, f32)),
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=1),
    ]
    seg_dims = (nseg,) if nseg > 1 else ()
    if h0.shape != (bsz, *seg_dims, nh, p, n):
        raise ValueError(f"h0 must be {(bsz, *seg_dims, nh, p, n)} for {nseg} segment(s), "
                         f"got {h0.shape}")
    hprev_shape = (bsz, nh, nc, p, n) if write_hprev else (1, 1, 1, p, nb)  # unused if not written
    out_type = (jax.ShapeDtypeStruct(hprev_shape, hprev_dtype),
                jax.ShapeDtypeStruct((bsz, *seg_dims, nh, p, n), f32))
    return hopper.kernel_call(
        plgpu, ssd_chunk_statepass, out_type, scratch,
        grid=(nblk, nh, bsz * nseg), grid_names=("col", "head", "batch"),
        **({"interpret": hopper.interpret_params()} if interpret
           else {"compiler_params": hopper.compiler_params(plgpu, semantics)}),
    )(x, b, w, dec, h0)


MAX_STATEPASS_SEGMENTS = 8
_MIN_SEGMENT_CHUNKS = 8


def statepass_segments(programs: int, nc: int) -> int:
    """Segments of the two-level state walk (`segmented_statepass`): the walk is sequential in
    the chunks, so with fewer programs than two per SM the chunks are cut into segments walked
    in parallel. The largest power of two (up to MAX_STATEPASS_SEGMENTS) that divides nc, keeps
    at least _MIN_SEGMENT_CHUNKS chunks per segment and programs x segments within two per SM."""
    seg = 1
    while (seg * 2 <= MAX_STATEPASS_SEGMENTS and nc % (seg * 2) == 0
           and nc // (seg * 2) >= _MIN_SEGMENT_CHUNKS and programs * seg * 2 <= 2 * hopper.NUM_SMS):
        seg *= 2
    return seg


def segmented_statepass(x, b, w, dec, h0, *, q, hpg, hprev_dtype, segments=None,
                         interpret=False, semantics: str = DEFAULT_SEMANTICS):
    """`chunk_statepass_mosaic` as a two-level walk for long sequences with few programs.

    With S = segments > 1: (1) every segment's end state from a zero start (the kernel without
    h_c stores, S programs per (column block, head, batch)); (2) in XLA, the state entering each
    segment, H_0 = h0, H_{s+1} = D_s H_s + E_s (E_s the segment's end state from zero, D_s the
    product of its chunk decays; S small steps); (3) the kernel again, each segment from H_s,
    writing every h_c. Twice the reads of x and B, in exchange for S times the parallelism of a
    walk whose steps wait on each other. Same arguments and returns as `chunk_statepass_mosaic`
    (h0 (batch, nheads, P, N)); segments None picks `statepass_segments`.
    """
    tf32, bsz, lp, nh, p, n = _state_operand_dims(x, b)
    nc = lp // q
    nb = statepass_block_cols(q, p, n, jnp.dtype(x.dtype).itemsize, bsz * nh)
    nseg = int(segments or statepass_segments(bsz * nh * (n // nb), nc))
    kw = dict(q=q, hpg=hpg, hprev_dtype=hprev_dtype, block_cols=nb, interpret=interpret,
              semantics=semantics)
    if nseg == 1:
        return chunk_statepass_mosaic(x, b, w, dec, h0, **kw)
    zeros = jnp.zeros((bsz, nseg, nh, p, n), jnp.float32)
    _, ends = chunk_statepass_mosaic(x, b, w, dec, zeros, segments=nseg, write_hprev=False,
                                      **kw)
    seg_decay = jnp.prod(dec[..., 0].reshape(bsz, nh, nseg, nc // nseg), axis=-1)  # (b, h, S)
    starts = [h0.astype(jnp.float32)]
    for si in range(nseg - 1):
        starts.append(seg_decay[:, :, si, None, None] * starts[-1] + ends[:, si])
    hprev, fins = chunk_statepass_mosaic(x, b, w, dec, jnp.stack(starts, axis=1),
                                          segments=nseg, **kw)
    return hprev, fins[:, -1]


def rechunk_cumsum(s: jax.Array, q: int, q_new: int) -> jax.Array:
    """Chunk-local cumulative sums at chunk q turned into those at chunk q_new (q_new divides q).

    s: (b, h, Lp) float32, restarting at every multiple of q. Returns the same sums restarting at
    every multiple of q_new: each q_new-piece minus the running sum at the end of the piece
    before it inside the same q-chunk.
    """
    if q_new == q:
        return s
    bsz, nh, lp = s.shape
    k = q // q_new
    pieces = s.reshape(bsz, nh, lp // q, k, q_new)
    ends = pieces[..., -1]  # (b, h, nc, k): running sum at the end of each piece
    before = jnp.concatenate([jnp.zeros_like(ends[..., :1]), ends[..., :-1]], axis=-1)
    return (pieces - before[..., None]).reshape(bsz, nh, lp)
