"""SSD chunk output in 64-row slabs, a Pallas **Mosaic GPU** kernel (Hopper: TMA + wgmma).

A drop-in for `pallas_mosaic._chunk_out_mosaic` at chunk q = 128 with 16-bit inputs (same
arguments, shapes, math and output): for one chunk of Q positions of one (batch, head),

    y = ((C B^T) o L) (x dt) + exp(s) o (C h_c^T) + D x,   L_ij = exp(s_i - s_j) [i >= j],

written in x.dtype. Why: at q = 128 the whole-chunk kernel's shared memory (x, B, C, h_c, y
tiles: 118,848 bytes at P = 64, N = 128) lets only one block (one warpgroup) run per SM, so
nothing overlaps one program's loads with another's products; on the H200 it took 359 us at
1.3b-L2k against 178 us at q = 64 (two blocks per SM).

Design: one program per chunk (grid (chunk, head, batch), one warpgroup), the chunk's output
in two row slabs of 64 positions (a Python loop), the way `pallas_mosaic_bwd` splits its Q x Q
work:
  * TMA loads in halves, each with its own barrier, issued in order of first use: C, B, x rows
    [0, 64), h_c, s (two copies, one per register layout: see pallas_mosaic's s_col_smem), dt,
    D, then C, B, x rows [64, 128). Slab 0 needs only the first halves, so its products run
    while the second halves arrive.
  * Slab R (rows r0 .. r0 + 63) forms only the columns k < r0 + 64 of C B^T (L is zero beyond:
    causal), i.e. (64 x 64) for slab 0 and (64 x 128) for slab 1, a quarter less Q x Q work
    than the whole-chunk kernel: wgmma G_R = C_R B_{<}^T and Y_R = C_R h_c^T issued together;
    in registers M_R = G_R o L_R o dt_k (16 bits) and y0_R = exp(s_R) o Y_R; wgmma
    y_R = y0_R + M_R x_{<} (M from registers); + D x_R; y_R through one 16-bit (64 x P) SMEM
    staging tile (slab 1 waits until slab 0's store has read it) and a TMA store.
  * Every accumulator is at most 64 x 128 float32 (64 registers per thread), half the whole
    kernel's (128 x 128) C B^T.
  * Shared memory (`smem_bytes`, exact against Mosaic GPU's allocation: buffers aligned to
    1024 bytes, 8 bytes per barrier, no reduction scratch since the kernel has no reductions):
    x (q x P), B, C (q x N), h_c (P x N), the s / s / dt vectors, D, the y slab. 109,656 bytes
    at q = 128, P = 64, N = 128, bf16: under `TWO_BLOCKS_SMEM` (115,712), so two blocks share
    an SM; the reads of HBM are exactly the whole-chunk kernel's.

Chosen over one program per slab (grid (slab x chunk, head, batch)): that reads h_c twice and
B, x 1.5 times (and needs per-slab-static tile shapes, so two code paths selected at run time),
while this keeps the whole kernel's bytes and still gets two blocks per SM.

Limits (`supported_slab` says which applies): bfloat16 / float16 only (float32 uses the tf32
kernel of pallas_mosaic), headdim and dstate 64 or 128, q 64 (one slab: the whole kernel's
math with its tiles) or 128. Imports without a GPU; lowers for cuda on a CPU-only machine
(`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`, tests/test_ssd_mosaic_out.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dimba_jax.ssd import pallas_mosaic as _mos

SLAB = 64  # rows of the chunk per slab (one warpgroup's M = 64 wgmma tile)
_SMEM_LIMIT = _mos._SMEM_LIMIT  # 220 KB
# Two blocks per SM need at most half of the H100 / H200's 228 KB of shared memory per SM each,
# less the 1 KB the hardware reserves per block.
TWO_BLOCKS_SMEM = 228 * 1024 // 2 - 1024


def _num_barriers(q: int) -> int:
    """One barrier per TMA load: C, B, x per slab, then h_c, s (rows), s (columns), dt, D."""
    return 3 * (q // SLAB) + 5


def _aligned(nbytes: int) -> int:
    """Bytes one SMEM scratch buffer occupies (Mosaic GPU aligns each to 1024)."""
    return -(-nbytes // 1024) * 1024


def smem_bytes(q: int, p: int, n: int, itemsize: int = 2) -> int:
    """Shared memory of `_chunk_out_slab_mosaic`'s kernel in bytes, as Mosaic GPU allocates it
    (each buffer aligned to 1024 bytes, then 8 bytes per barrier; checked against Mosaic GPU's
    own count in tests/test_ssd_mosaic_out.py).

    Args:
      q: chunk length.  p: headdim.  n: dstate.  itemsize: bytes per operand item (2).
    Returns:
      bytes (int).
    """
    a = _aligned
    tiles = a(itemsize * q * p) + 2 * a(itemsize * q * n) + a(itemsize * p * n)  # x, B, C, h_c
    vectors = a(4 * 3 * q) + a(4 * p)  # s (rows), s (columns), dt; D
    staging = a(itemsize * SLAB * p)  # the y slab
    return tiles + vectors + staging + 8 * _num_barriers(q)


def supported_slab(*, x, b, q: int) -> tuple[bool, str]:
    """Whether `_chunk_out_slab_mosaic` handles these operands.

    Args:
      x: (batch, Lp, nheads, P) array or anything with .shape and .dtype.
      b: (batch, Lp, ngroups, N) likewise.
      q: chunk length.
    Returns:
      (True, "") or (False, reason naming the dtype / size / SMEM limit that fails).
    """
    why = _mos.tile_operand_reason("slab output kernel", x, b, q,
                                   float32_note=" (float32 uses pallas_mosaic's tf32 kernel)")
    if why:
        return False, why
    p, n = x.shape[-1], b.shape[-1]
    need = smem_bytes(q, p, n, jnp.dtype(x.dtype).itemsize)
    if need > _SMEM_LIMIT:
        return False, (f"mosaic SSD slab output kernel tiles need {need} bytes of shared memory "
                       f"(block_len {q}, headdim {p}, dstate {n}); limit {_SMEM_LIMIT}")
    return True, ""


def _chunk_out_slab_mosaic(x, b, c, dt, s, hprev, d, *, q, hpg, interpret=False,
                           semantics: str = _mos.DEFAULT_SEMANTICS):
    """Chunk-output stage on Hopper in 64-row slabs; drop-in for
    `pallas_mosaic._chunk_out_mosaic` with 16-bit inputs.

    Args:
      x: (batch, Lp, nheads, P) bfloat16/float16, Lp a multiple of q.
      b, c: (batch, Lp, ngroups, N), x.dtype.
      dt, s: (batch, nheads, Lp) float32 (processed dt; chunk-local cumsum of dt*A).
      hprev: (batch, nheads, Lp // q, P, N) x.dtype, the state entering each chunk.
      d: (nheads, P) float32 skip weight.
      q: chunk length (128: two slabs; 64: one).  hpg: heads per group.
      interpret: run in the Mosaic GPU interpreter (any device; products as plain dots).
      semantics: Mosaic GPU lowering semantics, "lane" or "warpgroup" (pinned, see
        `pallas_mosaic._compiler_params`).
    Returns:
      y: (batch, Lp, nheads, P) x.dtype.
    Raises:
      ValueError for unsupported dtypes / sizes (see `supported_slab`) or inconsistent shapes.
    """
    ok, why = supported_slab(x=x, b=b, q=q)
    if not ok:
        raise ValueError(f"_chunk_out_slab_mosaic: {why}")
    bsz, lp, nh, p = x.shape
    g, n = b.shape[2], b.shape[3]
    nc = lp // q
    if nh != g * hpg or c.shape != b.shape or b.shape[:2] != (bsz, lp):
        raise ValueError(f"_chunk_out_slab_mosaic: inconsistent shapes x {x.shape}, B {b.shape}, "
                         f"C {c.shape}, heads per group {hpg}")
    if (hprev.shape != (bsz, nh, nc, p, n) or d.shape != (nh, p)
            or dt.shape != (bsz, nh, lp) or s.shape != dt.shape):
        raise ValueError(f"_chunk_out_slab_mosaic: inconsistent shapes hprev {hprev.shape}, "
                         f"D {d.shape}, dt {dt.shape}, s {s.shape} for x {x.shape}, q {q}")
    if semantics not in ("lane", "warpgroup"):
        raise ValueError(f"semantics must be 'lane' or 'warpgroup', got {semantics!r}")
    cdt = x.dtype
    f32 = jnp.float32
    kernel = _build_kernel(bsz=bsz, lp=lp, nh=nh, p=p, n=n, q=q, hpg=hpg, cdt=cdt,
                           interpret=interpret, semantics=semantics)
    return kernel(x, b.astype(cdt), c.astype(cdt), dt.astype(f32), s.astype(f32),
                  hprev.astype(cdt), d.astype(f32))


def _build_kernel(*, bsz, lp, nh, p, n, q, hpg, cdt, interpret, semantics):
    """The plgpu.kernel callable of `_chunk_out_slab_mosaic` (arguments x, b, c, dt, s, hprev,
    d; output y)."""
    plgpu = _mos._plgpu()
    nc = lp // q
    nslab = q // SLAB
    f32 = jnp.float32
    wgmma_layout = plgpu.Layout.WGMMA
    row = wgmma_layout.reduce(1)  # vector indexed by the slab row i
    col = wgmma_layout.reduce(0)  # vector indexed by the column (position j, or P index)
    load = _mos.smem_loader(plgpu, interpret)

    def iota(shape, dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=wgmma_layout)

    def products(*specs):
        """Independent products a @ b^T (float32) of 16-bit SMEM refs, issued together as
        wgmmas (b transposed) and waited for once. specs: (a ref, b ref, out shape)."""
        if interpret:  # the interpreter's wgmma takes no transposed operands: plain dots
            nt = (((1,), (1,)), ((), ()))
            return tuple(lax.dot_general(a[...], bref[...], nt, preferred_element_type=f32)
                         for a, bref, _ in specs)

        def issue(*accs):
            for acc, (a, bref, _) in zip(accs, specs):
                plgpu.wgmma(acc, a, bref.transpose((1, 0)))
            return tuple(acc[...] for acc in accs)

        return pl.run_scoped(issue, *(plgpu.ACC(shape, f32) for _, _, shape in specs))

    def acc_product(init, a, b_ref):
        """init + a @ b_ref (float32); a: 16-bit register array (WGMMA layout), b_ref: SMEM."""
        if interpret:  # the interpreter's wgmma takes no A in registers: a plain dot
            return init + jnp.dot(a, b_ref[...], preferred_element_type=f32)

        def product(acc_ref):
            plgpu.wgmma(acc_ref, a, b_ref)

        return pl.run_state(product)(plgpu.ACC.init(init))

    def body(x_ref, b_ref, c_ref, dt_ref, s_ref, h_ref, d_ref, y_ref,
             x_smem, b_smem, c_smem, h_smem, vin, d_smem, y_st, bars):
        ci = lax.axis_index("chunk")
        hi = lax.axis_index("head")
        bi = lax.axis_index("batch")
        gi = lax.div(hi, jnp.array(hpg, hi.dtype))
        rows = pl.ds(ci * q, q)
        # s is needed along rows (s_i) and along columns (s_j), two register layouts: one SMEM
        # copy per layout (two loads of one buffer in two layouts defeat Warpgroup layout
        # inference; see pallas_mosaic's s_col_smem).
        s_row, s_col, dt_col = vin.at[0], vin.at[1], vin.at[2]

        def half(k):  # rows of slab k: in HBM, in the chunk's SMEM tiles
            return pl.ds(ci * q + k * SLAB, SLAB), pl.ds(k * SLAB, SLAB)

        loads = []  # (name, source, destination) in order of first use
        for k in range(nslab):
            src, dst = half(k)
            loads += [(f"c{k}", c_ref.at[bi, src, gi], c_smem.at[dst]),
                      (f"b{k}", b_ref.at[bi, src, gi], b_smem.at[dst])]
            if k == 0:
                loads += [("h", h_ref.at[bi, hi, ci], h_smem),
                          ("s_row", s_ref.at[bi, hi, rows], s_row),
                          ("s_col", s_ref.at[bi, hi, rows], s_col),
                          ("dt", dt_ref.at[bi, hi, rows], dt_col)]
            loads.append((f"x{k}", x_ref.at[bi, src, hi], x_smem.at[dst]))
            if k == 0:
                loads.append(("d", d_ref.at[hi], d_smem))
        barrier = {}
        for k, (name, src, dst) in enumerate(loads):
            plgpu.copy_gmem_to_smem(src, dst, bars.at[k])
            barrier[name] = k
        waited = set()

        def ready(*names):
            """Wait (once per kernel) for the TMA loads of these names."""
            for name in names:
                if name not in waited:
                    plgpu.barrier_wait(bars.at[barrier[name]])
                    waited.add(name)

        for si in range(nslab):
            r0 = si * SLAB
            sl = pl.ds(r0, SLAB)
            width = r0 + SLAB  # L is zero in columns >= r0 + SLAB of these rows (causal)
            kk = pl.ds(0, width)
            earlier = [str(k) for k in range(si + 1)]
            ready(f"c{si}", *("b" + k for k in earlier), "h")
            gmat, y_off = products((c_smem.at[sl], b_smem.at[kk], (SLAB, width)),   # C_R B^T
                                   (c_smem.at[sl], h_smem, (SLAB, p)))              # C_R h^T
            ready("s_row", "s_col", "dt")
            shape = (SLAB, width)
            s_i = load(s_row.at[sl], row)
            s_j = load(s_col.at[kk], col)
            dt_j = load(dt_col.at[kk], col)
            i_idx = iota(shape, 0) + r0
            j_idx = iota(shape, 1)
            diff = lax.broadcast_in_dim(s_i, shape, [0]) - lax.broadcast_in_dim(s_j, shape, [1])
            decay = jnp.exp(jnp.where(i_idx >= j_idx, diff, -jnp.inf))
            m = (gmat * decay * lax.broadcast_in_dim(dt_j, shape, [1])).astype(cdt)
            y0 = y_off * lax.broadcast_in_dim(jnp.exp(s_i), (SLAB, p), [0])
            ready(*("x" + k for k in earlier))
            y = acc_product(y0, m, x_smem.at[kk])                       # y0 + M_R (x)
            ready("d")
            x_r = load(x_smem.at[sl], wgmma_layout).astype(f32)
            y = y + x_r * lax.broadcast_in_dim(load(d_smem, col), (SLAB, p), [1])
            if si:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last slab's store read
            y_st[...] = y.astype(cdt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(y_st, y_ref.at[bi, pl.ds(ci * q + r0, SLAB), hi])
        plgpu.wait_smem_to_gmem(0)

    tr = functools.partial(_mos._smem_transforms, plgpu)
    scratch = [
        plgpu.SMEM((q, p), cdt, transforms=tr(p, cdt)),      # x
        plgpu.SMEM((q, n), cdt, transforms=tr(n, cdt)),      # B
        plgpu.SMEM((q, n), cdt, transforms=tr(n, cdt)),      # C
        plgpu.SMEM((p, n), cdt, transforms=tr(n, cdt)),      # h_c
        plgpu.SMEM((3, q), f32),                             # s (rows), s (columns), dt
        plgpu.SMEM((p,), f32),                               # D
        plgpu.SMEM((SLAB, p), cdt, transforms=tr(p, cdt)),   # y slab
        plgpu.Barrier(num_barriers=_num_barriers(q)),
    ]
    return _mos._kernel_call(
        plgpu, body, jax.ShapeDtypeStruct((bsz, lp, nh, p), cdt), scratch,
        grid=(nc, nh, bsz), grid_names=("chunk", "head", "batch"),
        **({"interpret": _mos._interpret_params()} if interpret
           else {"compiler_params": _mos._compiler_params(plgpu, semantics)}),
    )
