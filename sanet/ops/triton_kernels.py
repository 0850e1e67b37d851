"""Triton kernels for Shuffle Attention on CUDA: SA alone or as a block tail (BN -> SA -> + -> ReLU).

The launchers (tiling, argument checks, the ``sanet::sa_forward``/``sa_backward`` ops on CUDA)
are in ``triton_sa.py``.

Same per-channel form and the same op contract as the CPU kernel (SA-NET.md section 5;
``sanet/ops/sa_op.py``): every (n, c) plane gets ``z * sigmoid(A (x - mean) + B)`` with
``z = a_c x + b_c`` (BatchNorm folded in, or the identity), written to the shuffled channel,
plus the shortcut and the ReLU. Statistics are computed in fp32 from any input dtype and
stored as float64, like the CPU kernel's.

A program owns ``ROWS`` whole planes. Planes of up to ``triton_sa._MAX_TILE`` elements are loaded once
into registers (``SINGLE``): statistics, gate and output without another read. Larger planes
are walked in ``BLOCK``-sized chunks, one pass per reduction.

Kernels:

* ``_sa_fwd``: statistics of x per plane (or read them, ``STATS_IN``), then the output.
  Training BatchNorm runs it twice: statistics only (``STATS_ONLY``), :func:`_batch_merge`
  for the batch statistics, then the output.
* ``_sa_bwd``: phase 1, per plane, the sums the gate parameters need (S1, S2) and dL/dz;
  it writes dL/dx directly unless BatchNorm is in training mode, whose backward needs sums
  over the batch first (``_batch_merge``, then phase 2).
* ``_param_grads``: the six gate parameters' gradients from S1, S2 (one launch).

The kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (set before importing
triton), which is how the test suite checks them on machines without a GPU.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - triton ships with CUDA builds of torch on Linux
    _HAS_TRITON = False

if _HAS_TRITON:

    @triton.jit
    def _rows(C, M, NC, HALF, ROWS: tl.constexpr):
        # Planes of this program: index, validity, channel, input and output plane offsets.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = rows < NC
        ch = rows % C
        n = rows // C
        oc = 2 * (ch % HALF) + ch // HALF  # the 2-group channel shuffle
        return rows, rmask, ch, rows.to(tl.int64) * M, (n * C + oc).to(tl.int64) * M

    @triton.jit
    def _chunk(ptr, base, start, cols, rmask, M):
        # Elements [start, start + BLOCK) of each of the program's planes, as fp32, and the mask.
        cm = rmask[:, None] & ((start + cols) < M)[None, :]
        return tl.load(ptr + base[:, None] + start + cols[None, :], mask=cm, other=0.0).to(tl.float32), cm

    @triton.jit
    def _bn_affine(ch, rmask, bw, bb, bm, bv, bn_eps, HAS_BN: tl.constexpr, HAS_BW: tl.constexpr,
                   HAS_BB: tl.constexpr):
        # BatchNorm as z = a x + b per channel (statistics bm, bv: running or batch), and
        # its mean and 1/std (for its backward).
        if HAS_BN:
            mean = tl.load(bm + ch, mask=rmask, other=0.0).to(tl.float32)
            invstd = 1.0 / tl.sqrt(tl.load(bv + ch, mask=rmask, other=1.0).to(tl.float32) + bn_eps)
            w = invstd
            if HAS_BW:
                w = tl.load(bw + ch, mask=rmask, other=1.0).to(tl.float32) * invstd
            b = -mean * w
            if HAS_BB:
                b += tl.load(bb + ch, mask=rmask, other=0.0).to(tl.float32)
        else:
            mean = tl.zeros_like(ch).to(tl.float32)
            invstd = mean + 1.0
            w = invstd
            b = mean
        return w, b, mean, invstd

    @triton.jit
    def _gate(ch, rmask, mx, vx, a, b, cw, cb, sw, sb, gw, gb, eps, CG, CC):
        # Gate sigmoid(Ax (x - mx) + Bc) of each plane (SA-NET.md section 5): z = a x + b,
        # channel branch Bc = cw mean(z) + cb, spatial branch GroupNorm(z) inside the
        # affine. Centred on the plane mean: exact on one-pixel planes, where rz ~ 1/sqrt(eps).
        j = (ch % CG) % CC
        spatial = (ch % CG) >= CC
        pcw = tl.load(cw + j, mask=rmask, other=0.0).to(tl.float32)
        pcb = tl.load(cb + j, mask=rmask, other=0.0).to(tl.float32)
        psw = tl.load(sw + j, mask=rmask, other=0.0).to(tl.float32)
        psb = tl.load(sb + j, mask=rmask, other=0.0).to(tl.float32)
        pgw = tl.load(gw + j, mask=rmask, other=0.0).to(tl.float32)
        pgb = tl.load(gb + j, mask=rmask, other=0.0).to(tl.float32)
        mz = a * mx + b
        rz = 1.0 / tl.sqrt(a * a * vx + eps)
        kz = tl.where(spatial, psw * pgw * rz, 0.0)  # d(gate argument) / dz
        bc = tl.where(spatial, psw * pgb + psb, pcw * mz + pcb)
        return kz, bc, mz, rz, spatial, pcw

    @triton.jit
    def _gate_arg(k, xc, bc):
        # k * (x - mean) + bc, with no slope term where k is 0 (the channel branch, or
        # sweight = 0), as the C++ kernel: an inf in the plane makes x - mean inf or NaN
        # there, and 0 * inf would turn the whole plane's gate NaN.
        return tl.where(k[:, None] == 0.0, 0.0, k[:, None] * xc) + bc[:, None]

    @triton.jit
    def _fwd_tile(xv, mx, a, b, kz, bc, sc, obase, cols, mask, HAS_SC: tl.constexpr, RELU: tl.constexpr):
        z = a[:, None] * xv + b[:, None]
        y = z * tl.sigmoid(_gate_arg(kz * a, xv - mx[:, None], bc))
        if HAS_SC:
            y += tl.load(sc + obase[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if RELU:
            y = tl.maximum(y, 0.0)
        return y

    @triton.jit
    def _sa_fwd(x, sc, out, pm, pv, cw, cb, sw, sb, gw, gb, bw, bb, bm, bv,
                NC, C, M, CG, CC, HALF, eps, bn_eps,
                HAS_BN: tl.constexpr, HAS_BW: tl.constexpr, HAS_BB: tl.constexpr,
                HAS_SC: tl.constexpr, RELU: tl.constexpr, STATS_IN: tl.constexpr,
                STATS_ONLY: tl.constexpr, SINGLE: tl.constexpr, ROWS: tl.constexpr,
                BLOCK: tl.constexpr):
        rows, rmask, ch, base, obase = _rows(C, M, NC, HALF, ROWS)
        cols = tl.arange(0, BLOCK)
        # Statistics of x per plane (two-pass variance).
        if SINGLE:
            xv, mask = _chunk(x, base, 0, cols, rmask, M)
        if STATS_IN:
            mx = tl.load(pm + rows, mask=rmask, other=0.0).to(tl.float32)
            vx = tl.load(pv + rows, mask=rmask, other=0.0).to(tl.float32)
        else:
            if SINGLE:
                mx = tl.sum(xv, axis=1) / M
                d = tl.where(mask, xv - mx[:, None], 0.0)
                vx = tl.sum(d * d, axis=1) / M
            else:
                acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
                for start in range(0, M, BLOCK):
                    v, _ = _chunk(x, base, start, cols, rmask, M)
                    acc += v
                mx = tl.sum(acc, axis=1) / M
                acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
                for start in range(0, M, BLOCK):
                    v, cm = _chunk(x, base, start, cols, rmask, M)
                    d = tl.where(cm, v - mx[:, None], 0.0)
                    acc += d * d
                vx = tl.sum(acc, axis=1) / M
            tl.store(pm + rows, mx.to(tl.float64), mask=rmask)
            tl.store(pv + rows, vx.to(tl.float64), mask=rmask)
        if not STATS_ONLY:
            a, b, _, _ = _bn_affine(ch, rmask, bw, bb, bm, bv, bn_eps, HAS_BN, HAS_BW, HAS_BB)
            kz, bc, _, _, _, _ = _gate(ch, rmask, mx, vx, a, b, cw, cb, sw, sb, gw, gb, eps, CG, CC)
            if SINGLE:
                y = _fwd_tile(xv, mx, a, b, kz, bc, sc, obase, cols, mask, HAS_SC, RELU)
                tl.store(out + obase[:, None] + cols[None, :], y.to(out.dtype.element_ty), mask=mask)
            else:
                for start in range(0, M, BLOCK):
                    v, cm = _chunk(x, base, start, cols, rmask, M)
                    y = _fwd_tile(v, mx, a, b, kz, bc, sc, obase + start, cols, cm, HAS_SC, RELU)
                    tl.store(out + obase[:, None] + start + cols[None, :], y.to(out.dtype.element_ty), mask=cm)

    @triton.jit
    def _upstream(grad, out, gpre, obase, cols, mask, RELU: tl.constexpr, STORE: tl.constexpr):
        # Gradient at the SA (+ shortcut) output: through the ReLU, whose mask is out > 0.
        go = tl.load(grad + obase[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if RELU:
            o = tl.load(out + obase[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            go = tl.where(o > 0.0, go, 0.0)
            if STORE:
                tl.store(gpre + obase[:, None] + cols[None, :], go.to(gpre.dtype.element_ty), mask=mask)
        return go

    @triton.jit
    def _gate_grad(go, xv, mx, a, b, kz, bc, mask):
        # x - mean x (0 in padding), the gate s and gu = dL/du (u: the gate argument).
        xc = tl.where(mask, xv - mx[:, None], 0.0)
        s = tl.sigmoid(_gate_arg(kz * a, xc, bc))
        gu = go * (a[:, None] * xv + b[:, None]) * s * (1.0 - s)
        return xc, s, gu

    @triton.jit
    def _grad_z(go, xc, s, gu, a, kgu, k0, kc, mask):
        # dL/dz = go * s + kgu * gu + k0 + kc * (z - mean z): the gate's own derivative plus
        # its statistics' (GroupNorm's backward, or the pooled mean's).
        gz = go * s + kgu[:, None] * gu + k0[:, None] + (kc * a)[:, None] * xc
        return tl.where(mask, gz, 0.0)

    @triton.jit
    def _sa_bwd(grad, x, out, gpre, gx, pm, pv, s1, s2, sg, sgx, cw, cb, sw, sb, gw, gb, bw, bb, bm, bv,
                tsg, tsgx, NC, C, M, CG, CC, HALF, eps, bn_eps, NM,
                HAS_BN: tl.constexpr, HAS_BW: tl.constexpr, HAS_BB: tl.constexpr,
                BN_TRAIN: tl.constexpr, PHASE: tl.constexpr, RELU_MASK: tl.constexpr,
                FROM_GPRE: tl.constexpr, SINGLE: tl.constexpr, ROWS: tl.constexpr,
                BLOCK: tl.constexpr):
        # Phase 1 applies the ReLU mask (RELU_MASK) and writes gpre; phase 2 reads gpre
        # (FROM_GPRE) where there is a ReLU.
        rows, rmask, ch, base, obase = _rows(C, M, NC, HALF, ROWS)
        cols = tl.arange(0, BLOCK)
        mx = tl.load(pm + rows, mask=rmask, other=0.0).to(tl.float32)
        vx = tl.load(pv + rows, mask=rmask, other=0.0).to(tl.float32)
        a, b, bmean, binv = _bn_affine(ch, rmask, bw, bb, bm, bv, bn_eps, HAS_BN, HAS_BW, HAS_BB)
        kz, bc, mz, rz, spatial, pcw = _gate(ch, rmask, mx, vx, a, b, cw, cb, sw, sb, gw, gb, eps, CG, CC)
        up = grad
        if FROM_GPRE:
            up = gpre
        if SINGLE:
            xv, mask = _chunk(x, base, 0, cols, rmask, M)
            go = _upstream(up, out, gpre, obase, cols, mask, RELU_MASK, True)
            xc, s, gu = _gate_grad(go, xv, mx, a, b, kz, bc, mask)  # once, for sums and dL/dz
        if PHASE == 1:
            # per-plane sum(gu) and sum(gu * (z - mean z))
            if SINGLE:
                t1 = tl.sum(gu, axis=1)
                tc = tl.sum(gu * xc, axis=1) * a
            else:
                t1 = tl.zeros([ROWS], dtype=tl.float32)
                tc = tl.zeros([ROWS], dtype=tl.float32)
                for start in range(0, M, BLOCK):
                    v, cm = _chunk(x, base, start, cols, rmask, M)
                    g = _upstream(up, out, gpre, obase + start, cols, cm, RELU_MASK, True)
                    vc, _, vgu = _gate_grad(g, v, mx, a, b, kz, bc, cm)
                    t1 += tl.sum(vgu, axis=1)
                    tc += tl.sum(vgu * vc, axis=1) * a
            st2 = tl.where(spatial, rz * tc, t1 * mz)  # sum(gu * zhat), or sum(gu) * mean(z)
            tl.store(s1 + rows, t1.to(tl.float64), mask=rmask)
            tl.store(s2 + rows, st2.to(tl.float64), mask=rmask)
        else:
            t1 = tl.load(s1 + rows, mask=rmask, other=0.0).to(tl.float32)
            st2 = tl.load(s2 + rows, mask=rmask, other=0.0).to(tl.float32)
        # GroupNorm's backward is exactly 0 on a one-pixel plane (gu equals its mean); as a
        # difference of terms scaled by 1/sqrt(eps) it would only be 0 up to rounding.
        kgu = tl.where(M > 1, kz, 0.0)
        k0 = tl.where(spatial, -kgu * t1 / M, pcw * t1 / M)
        kc = tl.where(spatial, -kgu * st2 * rz / M, 0.0)
        if PHASE == 2:
            # Training BatchNorm: gx = a (gz - mean(gz) - xhat mean(gz xhat)), from the sums
            # over the batch (tsg = sum gz, tsgx = sum gz xhat).
            cg = tl.load(tsg + ch, mask=rmask, other=0.0).to(tl.float32)
            cgx = tl.load(tsgx + ch, mask=rmask, other=0.0).to(tl.float32)
            k1 = -a * cg / NM
            k2 = -a * binv * cgx / NM
        if SINGLE:
            gz = _grad_z(go, xc, s, gu, a, kgu, k0, kc, mask)
            if PHASE == 1:
                if HAS_BN:
                    tl.store(sg + rows, tl.sum(gz, axis=1).to(tl.float64), mask=rmask)
                    xb = tl.where(mask, xv - bmean[:, None], 0.0)
                    tl.store(sgx + rows, tl.sum(gz * xb, axis=1).to(tl.float64), mask=rmask)
                if not BN_TRAIN:
                    tl.store(gx + base[:, None] + cols[None, :], (a[:, None] * gz).to(gx.dtype.element_ty), mask=mask)
            else:
                g = a[:, None] * gz + k1[:, None] + k2[:, None] * (xv - bmean[:, None])
                tl.store(gx + base[:, None] + cols[None, :], g.to(gx.dtype.element_ty), mask=mask)
        else:
            tg = tl.zeros([ROWS], dtype=tl.float32)
            tgx = tl.zeros([ROWS], dtype=tl.float32)
            for start in range(0, M, BLOCK):
                v, cm = _chunk(x, base, start, cols, rmask, M)
                g = _upstream(up, out, gpre, obase + start, cols, cm, RELU_MASK, False)
                vc, vs, vgu = _gate_grad(g, v, mx, a, b, kz, bc, cm)
                gz = _grad_z(g, vc, vs, vgu, a, kgu, k0, kc, cm)
                if PHASE == 1:
                    if HAS_BN:
                        tg += tl.sum(gz, axis=1)
                        tgx += tl.sum(gz * tl.where(cm, v - bmean[:, None], 0.0), axis=1)
                    if not BN_TRAIN:
                        gxv = a[:, None] * gz
                        tl.store(gx + base[:, None] + start + cols[None, :], gxv.to(gx.dtype.element_ty), mask=cm)
                else:
                    gxv = a[:, None] * gz + k1[:, None] + k2[:, None] * (v - bmean[:, None])
                    tl.store(gx + base[:, None] + start + cols[None, :], gxv.to(gx.dtype.element_ty), mask=cm)
            if PHASE == 1 and HAS_BN:
                tl.store(sg + rows, tg.to(tl.float64), mask=rmask)
                tl.store(sgx + rows, tgx.to(tl.float64), mask=rmask)

    @triton.jit
    def _batch_merge(p, q, out_a, out_b, var, N, C, eps, VAR: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_C: tl.constexpr):
        # Per channel over the batch, in float64. VAR: (p, q) = per-plane (mean, variance)
        # -> batch mean and biased variance (exact merge of equal-size planes). Else the sum
        # of p and the sum of q divided by sqrt(var + eps). out_a and out_b are float32 or
        # float64 (a direct float64 -> bf16 conversion is not supported everywhere).
        chs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = chs < C
        ns = tl.arange(0, BLOCK_N)
        ta = tl.zeros([BLOCK_C], dtype=tl.float64)
        tb = tl.zeros([BLOCK_C], dtype=tl.float64)
        for start in range(0, N, BLOCK_N):
            m = ((start + ns) < N)[:, None] & cmask[None, :]
            offs = (start + ns)[:, None].to(tl.int64) * C + chs[None, :]
            ta += tl.sum(tl.load(p + offs, mask=m, other=0.0), axis=0)
            tb += tl.sum(tl.load(q + offs, mask=m, other=0.0), axis=0)
        if VAR:
            mean = ta / N
            tb = tl.zeros([BLOCK_C], dtype=tl.float64)
            for start in range(0, N, BLOCK_N):
                m = ((start + ns) < N)[:, None] & cmask[None, :]
                offs = (start + ns)[:, None].to(tl.int64) * C + chs[None, :]
                d = tl.load(p + offs, mask=m, other=0.0) - mean[None, :]
                tb += tl.sum(tl.where(m, tl.load(q + offs, mask=m, other=0.0) + d * d, 0.0), axis=0)
            ta = mean
            tb = tb / N
        else:
            tb = tb / tl.sqrt(tl.load(var + chs, mask=cmask, other=1.0).to(tl.float64) + eps)
        tl.store(out_a + chs, ta.to(out_a.dtype.element_ty), mask=cmask)
        tl.store(out_b + chs, tb.to(out_b.dtype.element_ty), mask=cmask)

    @triton.jit
    def _running_update(bmean, bvar, rm, rv, nbt, C, momentum, unbias, CUMULATIVE: tl.constexpr,
                        BLOCK: tl.constexpr):
        # nn.BatchNorm's running statistics, one program: num_batches_tracked += 1, then
        # r = (1 - f) r + f batch (unbiased variance), f = momentum or 1 / num_batches_tracked.
        # Stored through fp32 unless float64 (as in _param_grads: the interpreter turns a
        # direct float64 -> bf16 conversion into 0).
        count = tl.load(nbt) + 1
        tl.store(nbt, count)
        f = momentum
        if CUMULATIVE:
            f = 1.0 / count.to(tl.float64)
        for start in range(0, C, BLOCK):
            chs = start + tl.arange(0, BLOCK)
            m = chs < C
            old_m = tl.load(rm + chs, mask=m, other=0.0)
            old_v = tl.load(rv + chs, mask=m, other=0.0)
            new_m = old_m + f * (tl.load(bmean + chs, mask=m, other=0.0) - old_m)
            new_v = old_v + f * (tl.load(bvar + chs, mask=m, other=0.0) * unbias - old_v)
            if rm.dtype.element_ty != tl.float64:
                new_m = new_m.to(tl.float32)
            if rv.dtype.element_ty != tl.float64:
                new_v = new_v.to(tl.float32)
            tl.store(rm + chs, new_m.to(rm.dtype.element_ty), mask=m)
            tl.store(rv + chs, new_v.to(rv.dtype.element_ty), mask=m)

    @triton.jit
    def _param_grads(s1, s2, sw, gw, gb, gp, R, C, CG, CC, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
        # The six gate parameters' gradients (rows of gp: cweight, cbias, sweight, sbias,
        # gn.weight, gn.bias) from the per-plane sums, summed over samples and groups.
        # One program (BLOCK_J >= CC): tiles of BLOCK_R (sample, group) rows accumulate
        # element-wise and are reduced once at the end.
        js = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
        jmask = js < CC
        rs = tl.arange(0, BLOCK_R)
        a1c = tl.zeros([BLOCK_R, BLOCK_J], dtype=tl.float64)
        a2c = tl.zeros([BLOCK_R, BLOCK_J], dtype=tl.float64)
        a1s = tl.zeros([BLOCK_R, BLOCK_J], dtype=tl.float64)
        a2s = tl.zeros([BLOCK_R, BLOCK_J], dtype=tl.float64)
        for start in range(0, R, BLOCK_R):  # R = N * G (sample, group) pairs
            r = start + rs
            m = (r < R)[:, None] & jmask[None, :]
            offs = (r // (C // CG)).to(tl.int64)[:, None] * C + (r % (C // CG))[:, None] * CG + js[None, :]
            a1c += tl.load(s1 + offs, mask=m, other=0.0)
            a2c += tl.load(s2 + offs, mask=m, other=0.0)
            a1s += tl.load(s1 + offs + CC, mask=m, other=0.0)
            a2s += tl.load(s2 + offs + CC, mask=m, other=0.0)
        t1c = tl.sum(a1c, axis=0)
        t2c = tl.sum(a2c, axis=0)
        t1s = tl.sum(a1s, axis=0)
        t2s = tl.sum(a2s, axis=0)
        psw = tl.load(sw + js, mask=jmask, other=0.0).to(tl.float64)
        pgw = tl.load(gw + js, mask=jmask, other=0.0).to(tl.float64)
        pgb = tl.load(gb + js, mask=jmask, other=0.0).to(tl.float64)
        # gp is float32 or float64 (param_grads_dtype); the caller casts each row to its
        # parameter's dtype (a direct float64 -> bf16 conversion is not supported everywhere:
        # the interpreter returns 0).
        ty = gp.dtype.element_ty
        tl.store(gp + js, t2c.to(ty), mask=jmask)
        tl.store(gp + CC + js, t1c.to(ty), mask=jmask)
        tl.store(gp + 2 * CC + js, (pgw * t2s + pgb * t1s).to(ty), mask=jmask)
        tl.store(gp + 3 * CC + js, t1s.to(ty), mask=jmask)
        tl.store(gp + 4 * CC + js, (psw * t2s).to(ty), mask=jmask)
        tl.store(gp + 5 * CC + js, (psw * t1s).to(ty), mask=jmask)
