"""SSD chunk backward as a Pallas **Mosaic GPU** kernel (Hopper: TMA + wgmma).

A port of `pallas_gpu._chunk_bwd_call` (the Triton `ssd_chunk_bwd` kernel): for one chunk of Q
positions of one (batch, head) it gives the gradients of the chunk's outputs (y, and the chunk
state S_c reaching later chunks) w.r.t. x, B, C, dt, s and D. Same inputs, outputs, dtypes and
shapes; the math per chunk (s_i the chunk-local cumsum of dt*A, xd = x dt, L_ij = exp(s_i - s_j)
for i >= j, M = (C B^T) o L, e_s = exp(s), e_end = exp(s_end - s), h the incoming state h_c, dS
the gradient reaching S_c):

    dM   = dy xd^T                 w = dM o M            dG = dM o L
    dxd  = M^T dy + e_end o (B dS^T)          dx  = dxd dt + D dy,   ddt = rowsum(dxd o x)
    dC   = dG B + e_s o (dy h)                dB  = dG^T C + e_end o (xd dS)
    ds   = rowsum(w) - colsum(w) + rowsum(dy o e_s (C h^T)) - v + [i = Q-1] sum(v),
           v = e_end o rowsum(xd o (B dS^T))
    dD   = colsum(dy o x)          (this chunk's partial sum)

Data flow. Grid (chunk, head, batch), one warpgroup (128 threads) per program.
  * SMEM (TMA loads, one barrier each, issued in order of first use and each waited for just
    before it): swizzled 16-bit tiles x, dy (Q x P), B, C (Q x N), h (P x N) and dS (P x N);
    float32 vectors s and dt (two copies each, one per register layout: two loads of one
    buffer in two layouts defeat Warpgroup layout inference, see pallas_mosaic's s_col_smem),
    e_end (computed in XLA: one small elementwise pass) and D. dS arrives in float32 (what the
    reverse state pass writes) and is converted to 16 bits in the kernel through a float32
    staging tile, or arrives in x.dtype and is used as is (`smem_plan` picks; see below).
  * The chunk is processed in row slabs of 64 positions (a Python loop: one slab at Q = 64, two
    at Q = 128) so that every accumulator is at most 64 x 128 float32 (64 registers per thread).
    For slab R (rows r of the Q x Q matrices; columns k only where the causal mask is nonzero:
    k < r0 + 64 in orientation 1, k >= r0 in orientation 2, which saves a quarter of the
    Q x Q work at Q = 128):
      wgmma dM_R  = dy_R x^T  (A = dy slab, B = x tile transposed), scaled by dt_k
      wgmma G_R   = C_R B^T   (A = C slab,  B = B tile transposed)  -> M_R = G_R o L_R
      registers: w_R = dM_R o M_R -> rowsum; dG_R = dM_R o L_R rounded to 16 bits
      wgmma dC_R  = e_s o (dy_R h) + dG_R B     (first: A = dy slab, B = h tile; then A = dG_R
                                                 from registers, B = B tile)
      wgmma Y_R   = C_R h^T   (B = h tile transposed) -> rowsum(dy_R o e_s Y_R) for ds
    and the transposed orientation, computed directly instead of transposing registers:
      wgmma dMt_R = x_R dy^T  scaled by dt_r (= dM^T rows R);  Gt_R = B_R C^T -> Mt_R = Gt_R o L^T
      registers: rowsum(dMt_R o Mt_R) = colsum(w) for columns R; dGt_R = dMt_R o L^T (16 bits)
      wgmma dB_R  = (dt e_end) o (x_R dS) + dGt_R C  (A = x slab, B = dS tile; A = dGt_R regs)
      wgmma BS_R  = B_R dS^T  (B = dS tile transposed); dxd_R = e_end o BS_R + Mt_R dy (A = Mt_R
                                                 from registers, B = dy tile)
    Independent products are issued together and waited for once (dM with G, dy h with C h^T,
    dMt with Gt, x dS with B dS^T). No register matrix is ever transposed and no Q x Q matrix
    goes through SMEM; the price is forming C B^T and dy x^T twice (once per orientation).
    Every wgmma accumulates in float32; its 16-bit operands are the tiles as loaded (x, not
    x dt: dt scales the float32 results) and the register matrices M^T, dG, dG^T rounded to
    x.dtype (as in the Triton kernel). Only B-operand transposes are used (16-bit only).
  * Outputs: dx, dB, dC slabs written through 16-bit SMEM staging tiles by TMA stores (the
    next slab waits until they have been read); ddt and ds (float32, Q) gathered in SMEM and
    stored once; dD (float32, P) accumulated over the slabs (a cross-warp column sum) and
    stored once. sum(v) over the chunk is carried from slab to slab to the last position.
    dB and dC leave per head; XLA sums each group's heads (`pallas_gpu.core_backward`).
  * Shared memory (`smem_bytes`, exact against Mosaic GPU's own count): 112,736 bytes at
    Q = 64, P = 64, N = 128 (dB / dC share a staging tile, dS 16-bit: two blocks per SM) and
    212,064 at Q = 128 (dS converted in the kernel; one block per SM).
  * Two consumer warpgroups (`warpgroups=2`, Q = 128; 256 threads per program): warpgroup k
    runs slab k, with its own dx / dB / dC staging tiles (221,288 bytes at P = 64, N = 128, dS
    in 16 bits), so the two slabs' wgmmas and stores overlap instead of following each other.
    Warpgroup 0 issues the TMA loads (both wait on the same barriers), stores its ddt / ds
    rows, and hands its v rows to warpgroup 1 through SMEM and an mbarrier; it makes no
    cross-warp reduction, so the two never use Mosaic's reduction scratch at once. Warpgroup 1
    forms sum(v) and dD (from both slabs' tiles) in the one-warpgroup order: the same bits.

float32 inputs are not supported (tf32 wgmma takes no transposed operands; `supported_bwd`
says so). No seq_idx. Imports without a GPU; lowers for cuda on a CPU-only machine with
`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` (tests/test_ssd_mosaic_bwd.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dimba_jax.ssd import hopper

SLAB = 64  # rows of the Q x Q matrices per wgmma accumulator (one warpgroup's M = 64 tile)
_NUM_BARRIERS = 12  # one per TMA load; 8 bytes each


def smem_bytes(q: int, p: int, n: int, itemsize: int = 2, convert_dstates: bool = True,
               share_staging: bool = False, warpgroups: int = 1) -> int:
    """Shared memory of `chunk_bwd_mosaic`'s kernel in bytes (tiles, staging, vectors, the
    cross-warp reduction scratch, barriers), each buffer aligned as Mosaic GPU allocates it
    (this matched Mosaic GPU's own count exactly at six configurations, jax 0.10.2 and 0.11.2).

    convert_dstates: whether a float32 dS tile is staged in SMEM for in-kernel conversion.
    share_staging: whether the dB and dC slabs share one staging tile.
    warpgroups: consumer warpgroups per program (2: one per 64-row slab, each with its own
      staging tiles, plus the slab-0 -> slab-1 exchange vector and its barrier).
    """
    a = hopper.aligned
    tiles = 2 * a(itemsize * q * p) + 2 * a(itemsize * q * n) + 2 * a(itemsize * p * n)
    staging = a(itemsize * SLAB * p) + (1 if share_staging else 2) * a(itemsize * SLAB * n)
    vectors = a(4 * 5 * q) + a(4 * 2 * q) + a(4 * 2 * p)  # s, dt x2, e_end; ddt, ds; D, dD
    f32_dst = a(4 * p * n) if convert_dstates else 0
    exchange = (a(4 * SLAB) + 8) if warpgroups == 2 else 0
    return (tiles + warpgroups * staging + vectors + f32_dst + exchange
            + hopper.REDUCTION_SCRATCH + 8 * _NUM_BARRIERS)


def smem_plan(q: int, p: int, n: int, itemsize: int,
              dstates_f32: bool) -> tuple[bool, bool, int]:
    """How the kernel lays out shared memory for chunk length q, headdim p, dstate n.

    float32 dS (dstates_f32) is converted in the kernel when that still fits, else in XLA; the
    dB / dC slabs share a staging tile when that is what lets two blocks share an SM (or what
    makes the kernel fit at all). itemsize: bytes per operand item (2 for bf16 / f16).

    Returns:
      (convert_dstates, share_staging, smem bytes); bytes over hopper.SMEM_LIMIT if nothing fits.
    """
    best = None
    for convert in ((True, False) if dstates_f32 else (False,)):
        for share in (False, True):
            need = smem_bytes(q, p, n, itemsize, convert, share)
            if need > hopper.SMEM_LIMIT:
                continue
            key = (need <= hopper.TWO_BLOCKS_SMEM, convert, not share)  # occupancy, fewer bytes moved
            if best is None or key > best[0]:
                best = (key, (convert, share, need))
    if best is None:
        return False, True, smem_bytes(q, p, n, itemsize, False, True)
    return best[1]


def warpgroups_fit(q: int, p: int, n: int, itemsize: int) -> bool:
    """Whether the two-warpgroup kernel takes chunk length q, headdim p, dstate n: two 64-row
    slabs (q = 128) and, with per-head dB / dC, dS in 16 bits and separate staging per
    warpgroup, within shared memory (221,288 bytes at P 64, N 128: one block per SM)."""
    return q == 2 * SLAB and smem_bytes(q, p, n, itemsize, convert_dstates=False,
                                        warpgroups=2) <= hopper.SMEM_LIMIT


def supported_bwd(*, x, b, q: int) -> tuple[bool, str]:
    """Whether `chunk_bwd_mosaic` handles these operands.

    Args:
      x: (batch, Lp, nheads, P) array or anything with .shape and .dtype.
      b: (batch, Lp, ngroups, N) likewise.
      q: chunk length.
    Returns:
      (True, "") or (False, reason naming the dtype / size / SMEM limit that fails).
    """
    why = hopper.tile_operand_reason(
        "backward kernel", x, b, q,
        float32_note=" (float32 is not supported: tf32 wgmma takes no transposed operands)")
    if why:
        return False, why
    p, n = x.shape[-1], b.shape[-1]
    _, _, need = smem_plan(q, p, n, jnp.dtype(x.dtype).itemsize, dstates_f32=False)
    if need > hopper.SMEM_LIMIT:
        return False, (f"mosaic SSD backward kernel tiles need {need} bytes of shared memory "
                       f"(block_len {q}, headdim {p}, dstate {n}); limit {hopper.SMEM_LIMIT}")
    return True, ""


def _end_decay(s, q):
    """e_end = exp(s_end - s) per position, s_end the chunk's last s.

    s: (batch, nheads, Lp) float32, Lp a multiple of q.  Returns (batch, nheads, Lp) float32.
    """
    bsz, nh, lp = s.shape
    sc = s.reshape(bsz, nh, lp // q, q)
    return jnp.exp(sc[..., -1:] - sc).reshape(bsz, nh, lp)


def chunk_bwd_mosaic(x, b, c, dt, s, dy, hprev, dstates, d, *, q, hpg, interpret=False,
                      semantics: str = hopper.DEFAULT_SEMANTICS, warpgroups: int = 1):
    """Chunk backward on Hopper; drop-in for `pallas_gpu._chunk_bwd_call(..., seg=None)`.

    Args:
      x: (batch, Lp, nheads, P) bfloat16/float16, Lp a multiple of q.
      b, c: (batch, Lp, ngroups, N), cast to x.dtype.
      dt, s: (batch, nheads, Lp) float32 (processed dt; chunk-local cumsum of dt * A).
      dy: (batch, Lp, nheads, P), cast to x.dtype (as the Triton kernel does).
      hprev: (batch, nheads, Lp // q, P, N), the state entering each chunk (cast to x.dtype).
      dstates: (batch, nheads, Lp // q, P, N) float32 (or x.dtype), dL/dS_c of each chunk state.
      d: (nheads, P) float32 skip weight.
      q: chunk length, 64 or 128.  hpg: heads per group.
      interpret: run in the Mosaic GPU interpreter (any device; products as plain dots).
      semantics: Mosaic GPU lowering semantics, "lane" or "warpgroup" (pinned, see
        `pallas_mosaic._compiler_params`).
      warpgroups: 1, or 2: two consumer warpgroups per program, one per 64-row slab, where
        `warpgroups_fit` (else one); float32 dS is then rounded to x.dtype in XLA. The same
        bits as one warpgroup.
    Returns:
      dx: (batch, Lp, nheads, P) x.dtype;
      db, dc: (batch, Lp, nheads, N) x.dtype per head (sum over a group's heads outside);
      ddt, ds: (batch, nheads, Lp) float32 (ds without the state pass's d s_end term);
      dd: (batch, nheads, Lp // q, P) float32, this chunk's partial sums of dD.
    Raises:
      ValueError for unsupported dtypes / sizes (see `supported_bwd`) or inconsistent shapes.
    """
    ok, why = supported_bwd(x=x, b=b, q=q)
    if not ok:
        raise ValueError(f"chunk_bwd_mosaic: {why}")
    bsz, lp, nh, p = x.shape
    g, n = b.shape[2], b.shape[3]
    nc = lp // q
    cdt = x.dtype
    if nh != g * hpg or c.shape != b.shape or b.shape[:2] != (bsz, lp):
        raise ValueError(f"chunk_bwd_mosaic: inconsistent shapes x {x.shape}, B {b.shape}, "
                         f"C {c.shape}, heads per group {hpg}")
    if (dy.shape != x.shape or hprev.shape != (bsz, nh, nc, p, n)
            or dstates.shape != hprev.shape or d.shape != (nh, p)
            or dt.shape != (bsz, nh, lp) or s.shape != dt.shape):
        raise ValueError(f"chunk_bwd_mosaic: inconsistent shapes dy {dy.shape}, hprev "
                         f"{hprev.shape}, dstates {dstates.shape}, D {d.shape}, dt {dt.shape}, "
                         f"s {s.shape} for x {x.shape}, q {q}")
    if semantics not in ("lane", "warpgroup"):
        raise ValueError(f"semantics must be 'lane' or 'warpgroup', got {semantics!r}")
    if warpgroups not in (1, 2):
        raise ValueError(f"chunk_bwd_mosaic: warpgroups must be 1 or 2, got {warpgroups!r}")
    dst_f32 = jnp.dtype(dstates.dtype) != jnp.dtype(cdt)
    itemsize = jnp.dtype(cdt).itemsize
    if warpgroups == 2 and warpgroups_fit(q, p, n, itemsize):
        convert, share = False, False
    else:
        warpgroups = 1
        convert, share, _ = smem_plan(q, p, n, itemsize, dst_f32)
    # float32 dS: converted in the kernel (its float32 tile staged in SMEM) where that fits,
    # else here in XLA (one extra pass over dstates).
    dstates = dstates.astype(jnp.float32 if convert else cdt)
    kernel = _build_kernel(bsz=bsz, lp=lp, nh=nh, p=p, n=n, q=q, hpg=hpg, cdt=cdt,
                           convert=convert, share_staging=share, interpret=interpret,
                           semantics=semantics, warpgroups=warpgroups)
    f32 = jnp.float32
    args = (x, b.astype(cdt), c.astype(cdt), dt.astype(f32), s.astype(f32),
            _end_decay(s.astype(f32), q), dy.astype(cdt), hprev.astype(cdt), dstates,
            d.astype(f32))
    return kernel(*args)


def _build_kernel(*, bsz, lp, nh, p, n, q, hpg, cdt, convert, share_staging, interpret,
                  semantics, warpgroups=1):
    """The plgpu.kernel callable of `chunk_bwd_mosaic` (arguments x, b, c, dt, s, e_end, dy,
    hprev, dstates, d; outputs dx, db_h, dc_h, ddt, ds, dd).

    convert: dstates arrive in float32 and are converted in the kernel (else in cdt).
    share_staging: the dB and dC slabs go through one SMEM staging tile (saves SLAB x N
      16-bit items; dB waits until the dC store has read it).
    warpgroups: 1, or 2 (q = 128, per-head dB / dC, dS in cdt, separate staging: see
      `warpgroups_fit`): one consumer warpgroup per 64-row slab, each with its own staging.
    """
    plgpu = hopper.mosaic_gpu()
    nc = lp // q
    f32 = jnp.float32
    wgmma_layout = plgpu.Layout.WGMMA
    row = wgmma_layout.reduce(1)  # vector indexed by the slab row r
    col = wgmma_layout.reduce(0)  # vector indexed by the column (position k, or P / N index)
    nslab = q // SLAB

    load = hopper.smem_loader(plgpu, interpret)

    def iota(shape, dim, layout=wgmma_layout):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=layout)

    def products(*specs):
        """Independent products a @ b (b^T if trans_b), float32, issued together as wgmmas and
        waited for once. specs: (a SMEM ref (16-bit), b SMEM ref, out shape, trans_b)."""
        if interpret:  # the interpreter's wgmma takes no transposed operands: plain dots
            return tuple(
                lax.dot_general(a[...], bref[...], (((1,), (1 if tb else 0,)), ((), ())),
                                preferred_element_type=f32)
                for a, bref, _, tb in specs)

        def issue(*accs):
            for acc, (a, bref, _, tb) in zip(accs, specs):
                plgpu.wgmma(acc, a, bref.transpose((1, 0)) if tb else bref)
            return tuple(acc[...] for acc in accs)

        return pl.run_scoped(issue, *(plgpu.ACC(shape, f32) for _, _, shape, _ in specs))

    def acc_product(init, a, b_ref):
        """init + a @ b_ref, float32; a: 16-bit register array (WGMMA layout), b_ref: SMEM."""
        if interpret:  # the interpreter's wgmma takes no A in registers: a plain dot
            return init + jnp.dot(a, b_ref[...], preferred_element_type=f32)

        def product(acc_ref):
            plgpu.wgmma(acc_ref, a, b_ref)

        return pl.run_state(product)(plgpu.ACC.init(init))

    def rows_bcast(v, shape):
        return lax.broadcast_in_dim(v, shape, [0])

    def cols_bcast(v, shape):
        return lax.broadcast_in_dim(v, shape, [1])

    def ssd_chunk_bwd(x_ref, b_ref, c_ref, dt_ref, s_ref, ee_ref, dy_ref, h_ref, dst_ref, d_ref,
             dx_ref, db_ref, dc_ref, ddt_ref, ds_ref, dd_ref,
             x_smem, dy_smem, b_smem, c_smem, h_smem, dst_smem, vin, vout, pvec, dx_st, dc_st,
             bars, *extra):
        ci = lax.axis_index("chunk")
        hi = lax.axis_index("head")
        bi = lax.axis_index("batch")
        gi = lax.div(hi, jnp.array(hpg, hi.dtype))
        rows = pl.ds(ci * q, q)
        # Vectors share three buffers (each SMEM buffer takes >= 1 KB). vin rows: s and dt
        # twice each, one copy per register layout (two loads of one buffer in two layouts
        # defeat Warpgroup layout inference; see pallas_mosaic's s_col_smem), and e_end.
        s_row, s_col, dt_row, dt_col, ee_row = (vin.at[k] for k in range(5))
        ddt_st, ds_st = vout.at[0], vout.at[1]
        d_smem, dd_st = pvec.at[0], pvec.at[1]
        extra = list(extra)
        db_st = dc_st if share_staging else extra.pop(0)
        dst32 = extra.pop(0) if convert else None
        if warpgroups == 2:  # slab 1's staging tiles, the slab-0 v vector and its barrier
            staging = [(dx_st, dc_st, db_st), tuple(extra[:3])]
            v_xch, xbar = extra[3], extra[4]
        else:
            staging = [(dx_st, dc_st, db_st)] * nslab
        # TMA loads in the order of first use, each waited for just before it (the first slab
        # computes while the later tiles arrive).
        loads = [(dy_ref.at[bi, rows, hi], dy_smem), (x_ref.at[bi, rows, hi], x_smem),
                 (dt_ref.at[bi, hi, rows], dt_col), (c_ref.at[bi, rows, gi], c_smem),
                 (b_ref.at[bi, rows, gi], b_smem), (s_ref.at[bi, hi, rows], s_row),
                 (s_ref.at[bi, hi, rows], s_col), (h_ref.at[bi, hi, ci], h_smem),
                 (d_ref.at[hi], d_smem), (dt_ref.at[bi, hi, rows], dt_row),
                 (ee_ref.at[bi, hi, rows], ee_row),
                 (dst_ref.at[bi, hi, ci], dst32 if convert else dst_smem)]

        def issue_loads():
            for k, (src, dst) in enumerate(loads):
                plgpu.copy_gmem_to_smem(src, dst, bars.at[k])

        bar_of = [dst for _, dst in loads]

        def waiter():
            """ready(*smems): wait (once per warpgroup) for the TMA loads into these buffers."""
            waited = set()

            def ready(*smems):
                for ref in smems:
                    k = next(i for i, r in enumerate(bar_of) if r is ref)
                    if k not in waited:
                        plgpu.barrier_wait(bars.at[k])
                        waited.add(k)

            return ready

        def store(val, st, dst_ref_slice):
            st[...] = val
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(st, dst_ref_slice)

        def decay(sl, r0, c0, width, transposed):
            """Rows R of L (or, if transposed, of L^T), columns [c0, c0 + width): (SLAB, width)
            float32. Built where used (iotas, s rows / columns reloaded from SMEM) so that no
            (SLAB, width) temporaries stay live across the products in between."""
            shape = (SLAB, width)
            s_r = load(s_row.at[sl], row)
            s_k = load(s_col.at[pl.ds(c0, width)], col)
            i_idx = iota(shape, 0) + r0
            j_idx = iota(shape, 1) + c0
            diff = rows_bcast(s_r, shape) - cols_bcast(s_k, shape)   # s_r - s_k
            if transposed:  # (L^T)_rk = L_kr = exp(s_k - s_r), k >= r
                return jnp.exp(jnp.where(j_idx >= i_idx, -diff, -jnp.inf))
            return jnp.exp(jnp.where(i_idx >= j_idx, diff, -jnp.inf))

        def slab(si, ready, dd=True):
            """Slab si (rows r0 = 64 si ...): dC, dB and dx rows stored, ddt rows into ddt_st.
            Returns the ds rows without the chunk's sum(v) term and the v rows ((SLAB,)
            float32 each), and with dd colsum(dy o x) over the slab's rows ((P,) float32: a
            cross-warp reduction), else None."""
            dx_st, dc_st, db_st = staging[si]
            r0 = si * SLAB
            sl = pl.ds(r0, SLAB)
            out_rows = pl.ds(ci * q + r0, SLAB)

            # Orientation 1: rows R of dM, M, dG -> dC_R, rowsum(w), the off-chunk ds term.
            # L_R is zero beyond column r0 + SLAB (causal), so only columns [0, r0 + SLAB) of
            # the (SLAB, q) products are formed.
            w1 = r0 + SLAB
            k1 = pl.ds(0, w1)
            ready(dy_smem, x_smem, c_smem, b_smem)
            dm, g = products((dy_smem.at[sl], x_smem.at[k1], (SLAB, w1), True),   # dy_R x^T
                             (c_smem.at[sl], b_smem.at[k1], (SLAB, w1), True))    # C_R B^T
            ready(dt_col, s_row, s_col)
            dm = dm * cols_bcast(load(dt_col.at[k1], col), (SLAB, w1))            # dy_R xd^T
            lmask = decay(sl, r0, 0, w1, transposed=False)
            rs_w = jnp.sum(dm * (g * lmask), axis=1)
            dg = (dm * lmask).astype(cdt)
            ready(h_smem)
            dyh, y_off = products((dy_smem.at[sl], h_smem, (SLAB, n), False),  # dy_R h
                                  (c_smem.at[sl], h_smem, (SLAB, p), True))   # C_R h^T
            es_r = jnp.exp(load(s_row.at[sl], row))
            dc = acc_product(dyh * rows_bcast(es_r, (SLAB, n)), dg, b_smem.at[k1])
            dy_r = load(dy_smem.at[sl], wgmma_layout).astype(f32)
            t_off = es_r * jnp.sum(dy_r * y_off, axis=1)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last slab's stores read
            store(dc.astype(cdt), dc_st, dc_ref.at[bi, out_rows, hi])

            # Orientation 2: rows R of dM^T, M^T, dG^T -> dB_R, dxd_R, colsum(w) for columns R.
            # (L^T)_R is zero before column r0: only columns [r0, q) are formed.
            w2 = q - r0
            k2 = pl.ds(r0, w2)
            dmt, gt = products((x_smem.at[sl], dy_smem.at[k2], (SLAB, w2), True),  # x_R dy^T
                               (b_smem.at[sl], c_smem.at[k2], (SLAB, w2), True))   # B_R C^T
            ready(dt_row)
            dt_r = load(dt_row.at[sl], row)
            dmt = dmt * rows_bcast(dt_r, (SLAB, w2))                      # xd_R dy^T
            ltmask = decay(sl, r0, r0, w2, transposed=True)
            mt = gt * ltmask
            cs_w = jnp.sum(dmt * mt, axis=1)
            dgt = (dmt * ltmask).astype(cdt)
            mt16 = mt.astype(cdt)
            ready(ee_row, dst32 if convert else dst_smem)
            if convert and si == 0:  # float32 dS -> 16-bit tile, 64 rows at a time
                for p0 in range(0, p, SLAB):
                    part = load(dst32.at[pl.ds(p0, SLAB)], wgmma_layout)
                    dst_smem.at[pl.ds(p0, SLAB)][...] = part.astype(cdt)
                plgpu.commit_smem()
            ee_r = load(ee_row.at[sl], row)
            xds, bs = products((x_smem.at[sl], dst_smem, (SLAB, n), False),  # x_R dS
                               (b_smem.at[sl], dst_smem, (SLAB, p), True))   # B_R dS^T
            db = acc_product(xds * rows_bcast(dt_r * ee_r, (SLAB, n)), dgt, c_smem.at[k2])
            if share_staging:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the dC store has read it
            store(db.astype(cdt), db_st, db_ref.at[bi, out_rows, hi])
            bs = bs * rows_bcast(ee_r, (SLAB, p))                        # e_end o (B dS^T)
            dxd = acc_product(bs, mt16, dy_smem.at[k2])                    # + M^T dy
            x_r = load(x_smem.at[sl], wgmma_layout).astype(f32)
            dy_r = load(dy_smem.at[sl], wgmma_layout).astype(f32)
            ready(d_smem)
            dx = dxd * rows_bcast(dt_r, (SLAB, p)) + cols_bcast(load(d_smem, col), (SLAB, p)) * dy_r
            store(dx.astype(cdt), dx_st, dx_ref.at[bi, out_rows, hi])

            v = dt_r * jnp.sum(x_r * bs, axis=1)       # e_end o rowsum(xd o (B dS^T))
            ddt_st.at[sl][...] = jnp.sum(dxd * x_r, axis=1)
            return rs_w - cs_w + t_off - v, v, jnp.sum(dy_r * x_r, axis=0) if dd else None

        def dd_rows(si):
            """colsum(dy o x) over slab si's rows, from the tiles: (P,) float32."""
            sl = pl.ds(si * SLAB, SLAB)
            x_r = load(x_smem.at[sl], wgmma_layout).astype(f32)
            dy_r = load(dy_smem.at[sl], wgmma_layout).astype(f32)
            return jnp.sum(dy_r * x_r, axis=0)

        def with_last(ds_r, v_total):
            """ds rows of the chunk's last slab: its last position collects sum(v)."""
            last = iota((SLAB,), 0, row) == SLAB - 1
            return ds_r + jnp.where(last, v_total, 0.0)

        if warpgroups == 1:
            issue_loads()
            ready = waiter()
            dd_acc = None
            v_total = None
            for si in range(nslab):
                sl = pl.ds(si * SLAB, SLAB)
                ds_r, v, dd_r = slab(si, ready)
                v_sum = jnp.sum(v, axis=0)
                v_total = v_sum if v_total is None else v_total + v_sum
                ds_st.at[sl][...] = with_last(ds_r, v_total) if si == nslab - 1 else ds_r
                dd_acc = dd_r if dd_acc is None else dd_acc + dd_r
            dd_st[...] = dd_acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ddt_st, ddt_ref.at[bi, hi, rows])
            plgpu.copy_smem_to_gmem(ds_st, ds_ref.at[bi, hi, rows])
            plgpu.copy_smem_to_gmem(dd_st, dd_ref.at[bi, hi, ci])
            plgpu.wait_smem_to_gmem(0)
            return

        # Two warpgroups, one per slab. Warpgroup 0 issues the loads, stores its slab's rows
        # and hands its v rows to warpgroup 1 through SMEM (v_xch, barrier xbar); it makes no
        # cross-warp reduction, so the two never share Mosaic's reduction scratch at once.
        # Warpgroup 1 forms every sum (sum(v) over the chunk, dD over both slabs) after the
        # barrier, in the one-warpgroup kernel's order (the same bits).
        wg = lax.axis_index("wg")

        @pl.when(wg == 0)
        def _():
            issue_loads()
            ds_r, v, _ = slab(0, waiter(), dd=False)  # its dD sum: warpgroup 1's to form
            sl = pl.ds(0, SLAB)
            ds_st.at[sl][...] = ds_r
            v_xch[...] = v
            plgpu.commit_smem()
            plgpu.barrier_arrive(xbar.at[0])
            plgpu.copy_smem_to_gmem(ddt_st.at[sl], ddt_ref.at[bi, hi, pl.ds(ci * q, SLAB)])
            plgpu.copy_smem_to_gmem(ds_st.at[sl], ds_ref.at[bi, hi, pl.ds(ci * q, SLAB)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _():
            ds_r, v, dd_1 = slab(1, waiter())
            plgpu.barrier_wait(xbar.at[0])
            v_total = jnp.sum(load(v_xch, row), axis=0) + jnp.sum(v, axis=0)
            sl = pl.ds(SLAB, SLAB)
            ds_st.at[sl][...] = with_last(ds_r, v_total)
            dd_st[...] = dd_rows(0) + dd_1
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ddt_st.at[sl], ddt_ref.at[bi, hi, pl.ds(ci * q + SLAB, SLAB)])
            plgpu.copy_smem_to_gmem(ds_st.at[sl], ds_ref.at[bi, hi, pl.ds(ci * q + SLAB, SLAB)])
            plgpu.copy_smem_to_gmem(dd_st, dd_ref.at[bi, hi, ci])
            plgpu.wait_smem_to_gmem(0)

    tr = functools.partial(hopper.smem_transforms, plgpu)
    scratch = [
        plgpu.SMEM((q, p), cdt, transforms=tr(p, cdt)),      # x
        plgpu.SMEM((q, p), cdt, transforms=tr(p, cdt)),      # dy
        plgpu.SMEM((q, n), cdt, transforms=tr(n, cdt)),      # B
        plgpu.SMEM((q, n), cdt, transforms=tr(n, cdt)),      # C
        plgpu.SMEM((p, n), cdt, transforms=tr(n, cdt)),      # h
        plgpu.SMEM((p, n), cdt, transforms=tr(n, cdt)),      # dS (16-bit)
        plgpu.SMEM((5, q), f32),                             # s, s, dt, dt, e_end
        plgpu.SMEM((2, q), f32),                             # ddt, ds
        plgpu.SMEM((2, p), f32),                             # D, dD
        plgpu.SMEM((SLAB, p), cdt, transforms=tr(p, cdt)),   # dx slab
        plgpu.SMEM((SLAB, n), cdt, transforms=tr(n, cdt)),   # dC (if shared, dB) slab
        plgpu.Barrier(num_barriers=_NUM_BARRIERS),
    ]
    if not share_staging:
        scratch.append(plgpu.SMEM((SLAB, n), cdt, transforms=tr(n, cdt)))  # dB slab
    if convert:
        scratch.append(plgpu.SMEM((p, n), f32, transforms=tr(n, f32)))  # dS float32
    if warpgroups == 2:  # slab 1's dx, dC, dB staging; slab 0's v rows and their barrier
        scratch += [plgpu.SMEM((SLAB, p), cdt, transforms=tr(p, cdt)),
                    plgpu.SMEM((SLAB, n), cdt, transforms=tr(n, cdt)),
                    plgpu.SMEM((SLAB, n), cdt, transforms=tr(n, cdt)),
                    plgpu.SMEM((SLAB,), f32),
                    plgpu.Barrier(num_barriers=1)]
    tail = (jax.ShapeDtypeStruct((bsz, nh, lp), f32),
            jax.ShapeDtypeStruct((bsz, nh, lp), f32),
            jax.ShapeDtypeStruct((bsz, nh, nc, p), f32))
    dx_type = jax.ShapeDtypeStruct((bsz, lp, nh, p), cdt)
    out_type = (dx_type,
                jax.ShapeDtypeStruct((bsz, lp, nh, n), cdt),
                jax.ShapeDtypeStruct((bsz, lp, nh, n), cdt),
                *tail)
    threads = {"num_threads": 2, "thread_name": "wg"} if warpgroups == 2 else {}
    return hopper.kernel_call(
        plgpu, ssd_chunk_bwd, out_type, scratch,
        grid=(nc, nh, bsz), grid_names=("chunk", "head", "batch"), **threads,
        **({"interpret": hopper.interpret_params()} if interpret
           else {"compiler_params": hopper.compiler_params(plgpu, semantics)}),
    )
