"""SSD backward state pass as one Pallas **Mosaic GPU** kernel (Hopper: TMA + wgmma).

The reverse mirror of `pallas_mosaic.chunk_statepass_mosaic`. It fuses the two Triton kernels
that `pallas_gpu.core_backward` runs before the chunk backward:

  1. the "dout" chunk states: dhprev_c = dy_c^T (w_c * C_c), w = exp(s) (s the chunk-local
     cumsum of dt * A; `pallas_gpu._chunk_state_kernel`, mode "dout");
  2. the reverse state pass: dh = dfin; for c = nc-1 .. 0:
         dS[c] = dh,   dsend[c] = dec_c <h_c, dh>,   dh <- dhprev_c + dec_c dh;   dh0 = dh
     (`pallas_gpu._state_pass_bwd_kernel`; dec_c = exp(s at the end of chunk c), h_c = hprev[c]).

so that neither dhprev (b, h, nc, P, N) float32 nor a float32 dS ever reaches HBM: dS is
written once, in x.dtype by default (what the Mosaic chunk backward reads).

Data flow. Grid (dstate column block, head, batch), one warpgroup per program, walking the
chunks in reverse with dh (P x nb float32) in the wgmma accumulator:
  * TMA loads per chunk (a ring of `prefetch` slots, 2 by default, up to 4 where shared memory
    fits: the walk is latency bound at long sequences with few programs): the dy tile (Q x P),
    the C column block (Q x nb), w (Q), dec_c repeated over P (a row vector of the
    accumulator's layout) and the h_c block (P x nb, x.dtype). Chunk c - prefetch + 1 is
    requested while chunk c is computed.
  * Per chunk: dy * w (rows) in registers, back to SMEM in x.dtype, and one wgmma
    dh <- (dec_c dh) + (dy w)^T C (A = the scaled dy tile transposed, 16-bit only; Triton's
    kernel rounds w * C to 16 bits, this one dy * w: same error scale). While it runs
    (`overlap`, default): dS[c] = dh (the old dh) through a double-buffered SMEM tile by TMA
    store, and the P row sums dec_c * sum_n(h_c * dh) through a double-buffered SMEM vector by
    TMA store (the caller sums them over P; the column blocks stay separate partials: the
    dsend contract of core_backward).
  * The float32 dfin block is TMA-loaded into an SMEM tile that later stages dh0 out.

float32 inputs are not supported (the transposed A operand needs 16-bit wgmma; `supported_rev`
says so and the caller keeps the Triton kernels). No seq_idx. Imports without a GPU; lowers
for cuda on a CPU-only machine (tests/test_ssd_mosaic_rev.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dimba_jax.ssd import hopper
from dimba_jax.ssd import pallas_mosaic_fwd as _fwd

DEFAULT_PREFETCH = 2  # TMA load slots (chunks in flight); 3-4 fit at small column blocks
MAX_PREFETCH = 4


def smem_bytes(q: int, p: int, nb: int, itemsize: int = 2, prefetch: int = DEFAULT_PREFETCH,
               dstates_itemsize: int = 2) -> int:
    """Shared memory of `_dout_statepass_mosaic`'s kernel in bytes: `prefetch` slots of the dy,
    C, w, dec and h_c loads; the scaled dy tile; two slots of the dS tile and of the dsend
    vector; the float32 dfin / dh0 tile; barriers and Mosaic's reduction scratch. Each buffer
    is counted as Mosaic GPU aligns it (1024 bytes)."""
    a = hopper.aligned
    k = prefetch
    loads = (a(k * itemsize * q * p) + a(k * itemsize * q * nb) + a(k * 4 * q) + a(k * 4 * p)
             + a(k * itemsize * p * nb))
    stores = a(2 * dstates_itemsize * p * nb) + a(2 * 4 * p)
    return (loads + a(itemsize * q * p) + stores + a(4 * p * nb) + hopper.REDUCTION_SCRATCH
            + 8 * (5 * k + 1))


def deepest_prefetch(q: int, p: int, nb: int, itemsize: int = 2, dstates_itemsize: int = 2,
                     cap: int = MAX_PREFETCH) -> int:
    """The most load slots (2..cap) whose tiles fit in shared memory (0 if not even 2 fit)."""
    for k in range(cap, 1, -1):
        if smem_bytes(q, p, nb, itemsize, k, dstates_itemsize) <= hopper.SMEM_LIMIT:
            return k
    return 0


def rev_block_cols(q: int, p: int, n: int, itemsize: int, programs: int,
                   prefetch: int = DEFAULT_PREFETCH, dstates_itemsize: int = 2) -> int:
    """dstate columns per program: as `pallas_mosaic.statepass_block_cols` (the widest block
    whose float32 accumulator fits, narrowed to 64 when the batch x heads x column-block
    programs would not fill two waves of SMs or the tiles exceed shared memory)."""
    nb = _fwd.state_block_cols(p, n)
    if (programs * (n // nb) < 2 * hopper.NUM_SMS
            or smem_bytes(q, p, nb, itemsize, prefetch, dstates_itemsize) > hopper.SMEM_LIMIT):
        nb = 64
    return nb


def supported_rev(*, x, b, q: int, prefetch: int = DEFAULT_PREFETCH,
                  dstates_dtype=None) -> tuple[bool, str]:
    """Whether `_dout_statepass_mosaic` handles these operands.

    Args:
      x: (batch, Lp, nheads, P) array (or anything with .shape and .dtype), the dtype of dy.
      b: (batch, Lp, ngroups, N) likewise (C has B's shape).
      q: chunk length.  prefetch: TMA load slots.
      dstates_dtype: dtype of the dS output (default x.dtype; float32 allowed).
    Returns:
      (True, "") or (False, reason naming the dtype / size / SMEM limit that fails).
    """
    why = hopper.tile_operand_reason(
        "reverse state pass", x, b, q, max_dstate=256,
        float32_note=" (float32 is not supported: the transposed dy operand needs 16-bit wgmma)")
    if why:
        return False, why
    p = x.shape[-1]
    dst = jnp.dtype(dstates_dtype or x.dtype)
    if dst not in (jnp.dtype(x.dtype), jnp.dtype(jnp.float32)):
        return False, f"mosaic SSD reverse state pass writes dS in {x.dtype} or float32, got {dst}"
    if not 2 <= prefetch <= MAX_PREFETCH:
        return False, (f"mosaic SSD reverse state pass needs prefetch in [2, {MAX_PREFETCH}], "
                       f"got {prefetch}")
    need = smem_bytes(q, p, 64, jnp.dtype(x.dtype).itemsize, prefetch, dst.itemsize)
    if need > hopper.SMEM_LIMIT:
        return False, (f"mosaic SSD reverse state pass tiles need {need} bytes of shared memory "
                       f"(block_len {q}, headdim {p}, prefetch {prefetch}); limit {hopper.SMEM_LIMIT}")
    return True, ""


def _dout_statepass_mosaic(dy, c, w, dec, hprev, dfin, *, q, hpg, dstates_dtype=None,
                           block_cols=None, prefetch=DEFAULT_PREFETCH, overlap: bool = True,
                           segments=1, interpret=False,
                           semantics: str = hopper.DEFAULT_SEMANTICS):
    """The dout chunk states and the reverse state pass in one kernel (see the module doc).

    Args:
      dy: (batch, Lp, nheads, P) bfloat16/float16, Lp a multiple of q.
      c: (batch, Lp, ngroups, N), cast to dy.dtype.
      w: (batch, nheads, Lp) float32, exp(s) with s the chunk-local cumsum of dt * A.
      dec: (batch, nheads, Lp // q) float32, exp(s at each chunk's end).
      hprev: (batch, nheads, Lp // q, P, N), the state entering each chunk (cast to dy.dtype).
      dfin: (batch, nheads, P, N) float32, the gradient of the final state.
      q: chunk length, 64 or 128.  hpg: heads per group.
      dstates_dtype: dtype of dS (default dy.dtype; float32 allowed).
      block_cols: dstate columns per program (default `rev_block_cols`).
      prefetch: TMA load slots, 2..4 (None: the most that fit in shared memory).
      overlap: issue the dS / dsend work of a chunk while its wgmma runs (False: before it,
        the plain order; a fallback and a comparison for the GPU probe).
      segments: a two-level walk for long sequences with few programs, as the forward's
        `pallas_mosaic.segmented_statepass`: (1) each of `segments` equal runs of chunks
        walked from dh = 0 at its right end, without stores, giving its left-end dh E_s;
        (2) in XLA, the dh entering each segment from the right, G_{S-1} = dfin,
        G_{s-1} = D_s G_s + E_s (D_s the product of the segment's chunk decays); (3) every
        segment walked again from G_s, storing dS and dsend. None picks
        `pallas_mosaic.statepass_segments`; it must divide Lp // q.
      interpret: run in the Mosaic GPU interpreter (products as plain dots).
      semantics: Mosaic GPU lowering semantics, "lane" or "warpgroup".
    Returns:
      dstates: (batch, nheads, Lp // q, P, N) dstates_dtype, dS[c] = dL/dS_c = dh_{c+1};
      dsend: (batch, nheads, nblk, Lp // q) float32, per column block partial sums of
        dec_c <h_c, dh_{c+1}> (sum over axis 2 for the gradient of s at each chunk's end);
      dh0: (batch, nheads, P, N) float32, the gradient of the initial state.
    Raises:
      ValueError for unsupported dtypes / sizes (`supported_rev`) or inconsistent shapes.
    """
    cdt = jnp.dtype(dy.dtype)
    dst_dtype = jnp.dtype(dstates_dtype or cdt)
    bsz, lp, nh, p = dy.shape
    g, n = c.shape[2], c.shape[3]
    nc = lp // max(q, 1)
    itemsize = cdt.itemsize
    if prefetch is None:
        nb0 = int(block_cols or rev_block_cols(q, p, n, itemsize, bsz * nh, 2,
                                               dst_dtype.itemsize))
        prefetch = deepest_prefetch(q, p, nb0, itemsize, dst_dtype.itemsize) or 2
    ok, why = supported_rev(x=dy, b=c, q=q, prefetch=prefetch, dstates_dtype=dst_dtype)
    if not ok:
        raise ValueError(f"_dout_statepass_mosaic: {why}")
    if (nh != g * hpg or c.shape[:2] != (bsz, lp) or w.shape != (bsz, nh, lp)
            or dec.shape != (bsz, nh, nc) or hprev.shape != (bsz, nh, nc, p, n)
            or dfin.shape != (bsz, nh, p, n)):
        raise ValueError(f"_dout_statepass_mosaic: inconsistent shapes dy {dy.shape}, C "
                         f"{c.shape}, w {w.shape}, dec {dec.shape}, hprev {hprev.shape}, dfin "
                         f"{dfin.shape}, heads per group {hpg}, q {q}")
    if semantics not in ("lane", "warpgroup"):
        raise ValueError(f"semantics must be 'lane' or 'warpgroup', got {semantics!r}")
    nb = int(block_cols or rev_block_cols(q, p, n, itemsize, bsz * nh, prefetch,
                                          dst_dtype.itemsize))
    if n % nb or nb % 64:
        raise ValueError(f"block_cols must be a multiple of 64 dividing dstate {n}, got {nb}")
    need = smem_bytes(q, p, nb, itemsize, prefetch, dst_dtype.itemsize)
    if need > hopper.SMEM_LIMIT:
        raise ValueError(f"_dout_statepass_mosaic: block_cols {nb} with prefetch {prefetch} "
                         f"needs {need} bytes of shared memory; limit {hopper.SMEM_LIMIT}")
    f32 = jnp.float32
    nseg = int(segments or _fwd.statepass_segments(bsz * nh * (n // nb), nc))
    if nseg < 1 or nc % nseg:
        raise ValueError(f"_dout_statepass_mosaic: segments must be >= 1 and divide the {nc} "
                         f"chunks, got {segments}")
    build = functools.partial(_build_kernel, bsz=bsz, nc=nc, nh=nh, p=p, n=n, nb=nb, q=q,
                              hpg=hpg, cdt=cdt, dst_dtype=dst_dtype, prefetch=prefetch,
                              overlap=overlap, interpret=interpret, semantics=semantics)
    dec = dec.astype(f32)
    dec_rows = jnp.broadcast_to(dec[..., None], (bsz, nh, nc, p))
    ins = (dy, c.astype(cdt), w.astype(f32), dec_rows, hprev.astype(cdt))
    if nseg == 1:
        dstates, dsend_rows, dh0 = build(segments=1, write_outputs=True)(*ins, dfin.astype(f32))
        return dstates, jnp.sum(dsend_rows, axis=-1), dh0
    zeros = jnp.zeros((bsz, nseg, nh, p, n), f32)
    _, _, ends = build(segments=nseg, write_outputs=False)(*ins, zeros)  # E_s, (b, S, h, P, N)
    seg_decay = jnp.prod(dec.reshape(bsz, nh, nseg, nc // nseg), axis=-1)  # D_s, (b, h, S)
    starts = [dfin.astype(f32)]  # G_{S-1}, G_{S-2}, ..., G_0
    for si in range(nseg - 1, 0, -1):
        starts.append(seg_decay[:, :, si, None, None] * starts[-1] + ends[:, si])
    dstates, dsend_rows, dh0s = build(segments=nseg, write_outputs=True)(
        *ins, jnp.stack(starts[::-1], axis=1))
    return dstates, jnp.sum(dsend_rows, axis=-1), dh0s[:, 0]


def _build_kernel(*, bsz, nc, nh, p, n, nb, q, hpg, cdt, dst_dtype, prefetch, overlap,
                  interpret, semantics, segments=1, write_outputs=True):
    """The plgpu.kernel callable (arguments dy, c, w, dec_rows (b, h, nc, P), hprev, dfin;
    outputs dstates, dsend rows (b, h, nblk, nc, P) float32, dh0). With segments S > 1, dfin
    and dh0 are per segment, (b, S, h, P, N): each program walks one segment's chunks from its
    dfin. write_outputs=False skips the h_c loads and the dS / dsend stores (those outputs are
    then small placeholders)."""
    plgpu = hopper.mosaic_gpu()
    nblk = n // nb
    nseg = int(segments)
    ncs = nc // nseg  # chunks per segment
    f32 = jnp.float32
    k_slots = prefetch
    wgmma_layout = plgpu.Layout.WGMMA
    row = wgmma_layout.reduce(1)  # (P,) vector along the rows of dh; (q,) along dy's rows
    load = hopper.smem_loader(plgpu, interpret)

    def ssd_rev_statepass(dy_ref, c_ref, w_ref, dec_ref, hp_ref, dfin_ref, dst_ref, dse_ref, dh0_ref,
             dy_smem, c_smem, w_smem, dec_smem, hp_smem, dyw_smem, ds_smem, dse_smem, h_smem,
             dy_bars, c_bars, w_bars, dec_bars, hp_bars, h_bar):
        ni = lax.axis_index("col")
        hi = lax.axis_index("head")
        bsi = lax.axis_index("batch")  # batch x segment
        bi = lax.div(bsi, jnp.array(nseg, bsi.dtype))
        si = lax.rem(bsi, jnp.array(nseg, bsi.dtype))
        c_last = si * ncs + ncs - 1  # the segment's last chunk: where its walk starts
        gi = lax.div(hi, jnp.array(hpg, hi.dtype))
        cols = pl.ds(ni * nb, nb)
        dfin_at = dfin_ref.at[bi, si, hi] if nseg > 1 else dfin_ref.at[bi, hi]
        dh0_at = dh0_ref.at[bi, si, hi] if nseg > 1 else dh0_ref.at[bi, hi]

        def fetch(i, slot):  # the tiles of step i (chunk c_last - i) into load slot `slot`
            ch = c_last - i
            rows = pl.ds(ch * q, q)
            plgpu.copy_gmem_to_smem(dy_ref.at[bi, rows, hi], dy_smem.at[slot], dy_bars.at[slot])
            plgpu.copy_gmem_to_smem(w_ref.at[bi, hi, rows], w_smem.at[slot], w_bars.at[slot])
            if write_outputs:
                plgpu.copy_gmem_to_smem(hp_ref.at[bi, hi, ch, pl.ds(0, p), cols],
                                        hp_smem.at[slot], hp_bars.at[slot])
            plgpu.copy_gmem_to_smem(dec_ref.at[bi, hi, ch], dec_smem.at[slot], dec_bars.at[slot])
            plgpu.copy_gmem_to_smem(c_ref.at[bi, rows, gi, cols], c_smem.at[slot],
                                    c_bars.at[slot])

        plgpu.copy_gmem_to_smem(dfin_at.at[pl.ds(0, p), cols], h_smem, h_bar.at[0])
        for i in range(min(k_slots - 1, ncs)):  # fill all slots but one
            fetch(i, i)
        plgpu.barrier_wait(h_bar.at[0])
        dh_init = load(h_smem, wgmma_layout)

        def step(i, dh):
            ch = c_last - i
            slot = lax.rem(i, k_slots)
            sslot = lax.rem(i, 2)

            @pl.when(i + k_slots - 1 < ncs)
            def _prefetch():  # into the slot step i - 1 read (its readers have finished)
                fetch(i + k_slots - 1, lax.rem(i + k_slots - 1, k_slots))

            def side_outputs():
                """dS[ch] = dh and the dsend rows of chunk ch, stored by TMA. Issued while the
                wgmma below runs. The stores of step i - 2 (same store slot, two bulk groups
                per step) must have read their SMEM."""
                plgpu.wait_smem_to_gmem(2, wait_read_only=True)
                ds_smem.at[sslot][...] = dh.astype(dst_dtype)
                plgpu.barrier_wait(hp_bars.at[slot])
                hpv = load(hp_smem.at[slot], wgmma_layout).astype(f32)
                dse_smem.at[sslot][...] = decv * jnp.sum(hpv * dh, axis=1)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(ds_smem.at[sslot],
                                        dst_ref.at[bi, hi, ch, pl.ds(0, p), cols])
                plgpu.copy_smem_to_gmem(dse_smem.at[sslot], dse_ref.at[bi, hi, ni, ch])

            # dh <- dec dh + (dy w)^T C.
            plgpu.barrier_wait(dy_bars.at[slot])
            plgpu.barrier_wait(w_bars.at[slot])
            dyv = load(dy_smem.at[slot], wgmma_layout).astype(f32)
            wv = load(w_smem.at[slot], row)
            dyw_smem[...] = (dyv * lax.broadcast_in_dim(wv, (q, p), [0])).astype(cdt)
            plgpu.commit_smem()
            plgpu.barrier_wait(dec_bars.at[slot])
            decv = load(dec_smem.at[slot], row)
            dh_dec = dh * lax.broadcast_in_dim(decv, (p, nb), [0])
            plgpu.barrier_wait(c_bars.at[slot])
            if write_outputs and (interpret or not overlap):
                side_outputs()
            if interpret:  # the interpreter's wgmma takes no transposed operands: a plain dot
                return dh_dec + lax.dot_general(dyw_smem[...], c_smem.at[slot][...],
                                                (((0,), (0,)), ((), ())),
                                                preferred_element_type=f32)

            def update(acc_ref):
                plgpu.wgmma(acc_ref, dyw_smem.transpose((1, 0)), c_smem.at[slot])
                if overlap and write_outputs:
                    side_outputs()  # while the wgmma runs (run_state waits for it at the end)

            return pl.run_state(update)(plgpu.ACC.init(dh_dec))

        dh0 = lax.fori_loop(0, ncs, step, dh_init)
        hopper.store_tile_last(plgpu, h_smem, dh0, dh0_at.at[pl.ds(0, p), cols])

    tr = functools.partial(hopper.smem_transforms, plgpu)
    k = k_slots
    scratch = [
        plgpu.SMEM((k, q, p), cdt, transforms=tr(p, cdt)),          # dy
        plgpu.SMEM((k, q, nb), cdt, transforms=tr(nb, cdt)),        # C column block
        plgpu.SMEM((k, q), f32),                                    # w = exp(s)
        plgpu.SMEM((k, p), f32),                                    # dec (over the rows)
        plgpu.SMEM((k, p, nb), cdt, transforms=tr(nb, cdt)),        # h_c block
        plgpu.SMEM((q, p), cdt, transforms=tr(p, cdt)),             # dy * w
        plgpu.SMEM((2, p, nb), dst_dtype, transforms=tr(nb, dst_dtype)),  # dS out
        plgpu.SMEM((2, p), f32),                                    # dsend rows out
        plgpu.SMEM((p, nb), f32, transforms=tr(nb, f32)),           # dfin in, dh0 out
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=1),
    ]
    seg_dims = (nseg,) if nseg > 1 else ()
    if write_outputs:
        out_type = (jax.ShapeDtypeStruct((bsz, nh, nc, p, n), dst_dtype),
                    jax.ShapeDtypeStruct((bsz, nh, nblk, nc, p), f32))
    else:  # placeholders, never written
        out_type = (jax.ShapeDtypeStruct((1, 1, 1, p, nb), dst_dtype),
                    jax.ShapeDtypeStruct((1, 1, 1, 1, p), f32))
    out_type += (jax.ShapeDtypeStruct((bsz, *seg_dims, nh, p, n), f32),)
    return hopper.kernel_call(
        plgpu, ssd_rev_statepass, out_type, scratch,
        grid=(nblk, nh, bsz * nseg), grid_names=("col", "head", "batch"),
        **({"interpret": hopper.interpret_params()} if interpret
           else {"compiler_params": hopper.compiler_params(plgpu, semantics)}),
    )


def auto_prefetch(bsz: int, nh: int, q: int, p: int, n: int, itemsize: int = 2) -> int:
    """Load slots for the dispatcher's calls: the deepest ring that fits where the walk is
    latency bound (fewer programs than two per SM: long sequences, few heads; 0.49 vs 0.57-0.60
    ms at 130m-L32k on the H200, `mosaic_rev_stage_h200.md`), else DEFAULT_PREFETCH (deeper
    rings were no faster, or slower, with many programs)."""
    nb = rev_block_cols(q, p, n, itemsize, bsz * nh, DEFAULT_PREFETCH, itemsize)
    if bsz * nh * (n // nb) < 2 * hopper.NUM_SMS:
        return deepest_prefetch(q, p, nb, itemsize, itemsize) or DEFAULT_PREFETCH
    return DEFAULT_PREFETCH


def state_bwd_fn(semantics: str = hopper.DEFAULT_SEMANTICS, prefetch=None, segments=None):
    """The fused kernel as `pallas_gpu.core_backward`'s `state_bwd` argument:
    state_bwd(dy, c, dt, s, hprev, dec, dfin, seg, *, q, hpg, interpret) ->
    (dstates (b, h, nc, P, N) dy.dtype, dsend (b, h, nblk, nc) float32, dh0 (b, h, P, N) f32).
    prefetch None: `auto_prefetch`; segments None: `pallas_mosaic.statepass_segments`.
    """

    def state_bwd(dy, c, dt, s, hprev, dec, dfin, seg, *, q, hpg, interpret):
        del dt
        if seg is not None:
            raise ValueError("the Mosaic GPU reverse state pass does not support seq_idx")
        bsz, _, nh, p = dy.shape
        pf = prefetch or auto_prefetch(bsz, nh, q, p, c.shape[-1], jnp.dtype(dy.dtype).itemsize)
        return _dout_statepass_mosaic(dy, c, jnp.exp(s.astype(jnp.float32)), dec, hprev, dfin,
                                      q=q, hpg=hpg, prefetch=pf, segments=segments,
                                      interpret=interpret, semantics=semantics)

    return state_bwd
