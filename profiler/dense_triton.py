"""The dense estimator's two Triton kernels (see dense.py for the definition and the launchers).

Imported only when triton is installed. Pass 1 (`row_stats_kernel`) stores each query's softmax
max and sum flash-style; pass 2 (`distance_bins_kernel`) recomputes the scores tile by tile and
accumulates n_i · P[i, i − d] by distance, in registers, with one atomic add per program.
Pass 2 also gives the tail-window statistics (capture.py) of the last W queries: their
P[i, i − d] summed by distance (without n_i), each row's Σ p ln p and its mass on key 0, in a
second loop over those rows only. Run on the tail rows alone, it is the tail estimator's kernel.
"""
import triton
import triton.language as tl


@triton.jit
def row_stats_kernel(q_ptr, k_ptr, m_ptr, l_ptr, T, H, G, window, row_lo, q_first, qk_scale,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_kb, stride_kh, stride_kt, stride_kd,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    # Pass 1, flash style: online row max m_i and sum l_i of 2^(score·log2 e) over the
    # visible keys of BLOCK_M queries among rows row_lo … T−1 (the stats buffers hold those
    # rows only). Scores are in log2 units (qk_scale has log2 e). q_ptr holds queries
    # q_first … T−1 (q_first <= row_lo): q_base is where row 0 would be.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    q_base = q_ptr + b * stride_qb + h.to(tl.int64) * stride_qh - q_first * stride_qt
    k_base = k_ptr + b * stride_kb + (h // G).to(tl.int64) * stride_kh
    row_start = row_lo + pid_m * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_base + rows[:, None] * stride_qt + dims[None, :] * stride_qd,
                mask=(rows[:, None] < T) & (dims[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    lo = tl.maximum(row_start - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(row_start + BLOCK_M, T)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k_t = tl.load(k_base + cols[None, :] * stride_kt + dims[:, None] * stride_kd,
                      mask=(cols[None, :] < T) & (dims[:, None] < HEAD_DIM), other=0.0)
        if DOT_FP32:
            k_t = k_t.to(tl.float32)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        visible = (cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m = m_new
    row_ok = rows < T
    out = bh * (T - row_lo) + rows - row_lo
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)

@triton.jit
def load_tile(q_base, k_base, rows, keys, row_ok, key_ok, stride_qt, stride_qd, stride_kt, stride_kd,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, MASKED: tl.constexpr):
    # The queries `rows` (ROWS × BLOCK_D) and the keys `keys`, transposed (BLOCK_D × DISTS), of one
    # tile; MASKED loads zeros outside row_ok / key_ok (and always beyond HEAD_DIM).
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    if MASKED:
        q = tl.load(q_base + rows[:, None] * stride_qt + dims[None, :] * stride_qd,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        k_t = tl.load(k_base + keys[None, :] * stride_kt + dims[:, None] * stride_kd,
                      mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
    else:
        q = tl.load(q_base + rows[:, None] * stride_qt + dims[None, :] * stride_qd,
                    mask=dim_ok[None, :], other=0.0)
        k_t = tl.load(k_base + keys[None, :] * stride_kt + dims[:, None] * stride_kd,
                      mask=dim_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        k_t = k_t.to(tl.float32)
    return q, k_t

@triton.jit
def bins_tile(acc, q_base, k_base, m_ptr, l_ptr, bh, i0, d0, T, window, row_lo, m_scale, qk_scale,
              stride_qt, stride_qd, stride_kt, stride_kd,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, DISTS: tl.constexpr,
              PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, EDGE: tl.constexpr, HAS_L: tl.constexpr):
    # One ROWS × DISTS tile of the dense sums: query i0 + r against key i0 − d0 − c, weight
    # n_i · P. EDGE tiles may hold rows outside [row_lo, T), keys before 0 or distances outside
    # [0, window) and are masked; the others (most of them) need no masks.
    r = tl.arange(0, ROWS)
    c = tl.arange(0, DISTS)
    rows = i0 + r
    keys = i0 - d0 - c
    at = bh * (T - row_lo) + rows - row_lo       # the rows' place in the stats buffers
    if EDGE:
        row_ok = (rows < T) & (rows >= row_lo)
        key_ok = (keys >= 0) & (keys < T)
        q, k_t = load_tile(q_base, k_base, rows, keys, row_ok, key_ok, stride_qt, stride_qd, stride_kt,
                           stride_kd, HEAD_DIM, BLOCK_D, DOT_FP32, True)
        m_row = tl.load(m_ptr + at, mask=row_ok, other=0.0)
        if HAS_L:
            l_row = tl.load(l_ptr + at, mask=row_ok, other=1.0)
    else:                                        # rows and keys stand in for the unused masks
        q, k_t = load_tile(q_base, k_base, rows, keys, rows, keys, stride_qt, stride_qd, stride_kt,
                           stride_kd, HEAD_DIM, BLOCK_D, DOT_FP32, False)
        m_row = tl.load(m_ptr + at)
        if HAS_L:
            l_row = tl.load(l_ptr + at)
    s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale - (m_row * m_scale)[:, None]
    if EDGE:
        dist = d0 + r[:, None] + c[None, :]
        visible = row_ok[:, None] & key_ok[None, :] & (dist >= 0) & (dist < window)
        s = tl.where(visible, s, float("-inf"))
    factor = tl.minimum(rows + 1, window).to(tl.float32)
    if HAS_L:
        factor = factor / l_row
    return acc + tl.exp2(s) * factor[:, None]

@triton.jit
def tail_tile(acc, q_base, k_base, m_ptr, l_ptr, rowstat_ptr, bh, BH, i0, d0, T, row_lo, tail_lo, m_scale,
              qk_scale, stride_qt, stride_qd, stride_kt, stride_kd,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, DISTS: tl.constexpr,
              PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, HAS_L: tl.constexpr):
    # One ROWS × DISTS tile of the tail window (rows tail_lo … T−1, causal, no sliding window):
    # adds P[i, i − d] / W to acc; adds each row's part of Σ p ln p to rowstat[0] (atomics) and
    # stores its P on key 0 to rowstat[1] (one tile holds that pair: no atomics).
    r = tl.arange(0, ROWS)
    c = tl.arange(0, DISTS)
    rows = i0 + r
    keys = i0 - d0 - c
    row_ok = (rows < T) & (rows >= tail_lo)
    key_ok = (keys >= 0) & (keys < T)
    q, k_t = load_tile(q_base, k_base, rows, keys, row_ok, key_ok, stride_qt, stride_qd, stride_kt, stride_kd,
                       HEAD_DIM, BLOCK_D, DOT_FP32, True)
    at = bh * (T - row_lo) + rows - row_lo
    m_row = tl.load(m_ptr + at, mask=row_ok, other=0.0) * m_scale
    if HAS_L:
        m_row += tl.log2(tl.load(l_ptr + at, mask=row_ok, other=1.0))   # 2^(s − m) / l = 2^(s − m − log2 l)
    s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale - m_row[:, None]    # log2 P
    dist = d0 + r[:, None] + c[None, :]
    visible = row_ok[:, None] & key_ok[None, :] & (dist >= 0)
    s = tl.where(visible, s, float("-inf"))
    p = tl.exp2(s)
    width = T - tail_lo                  # W, the tail rows
    slot = bh * width + rows - tail_lo
    plogp = tl.sum(p * tl.where(visible, s, 0.0), axis=1) * 0.6931471805599453
    tl.atomic_add(rowstat_ptr + slot, plogp, mask=row_ok, sem="relaxed")
    key0 = r * 0 + i0 - d0               # the column of key 0, the same for every row
    tl.store(rowstat_ptr + BH * width + slot, tl.sum(tl.where(keys[None, :] == 0, p, 0.0), axis=1),
             mask=row_ok & (key0 >= 0) & (key0 < DISTS))
    return acc + p / width

@triton.jit
def distance_bins_kernel(q_ptr, k_ptr, m_ptr, l_ptr, out_ptr, tail_ptr, rowstat_ptr,
                         T, H, G, window, row_lo, q_first, tail_lo, m_scale, qk_scale,
                         stride_qb, stride_qh, stride_qt, stride_qd,
                         stride_kb, stride_kh, stride_kt, stride_kd,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         ROWS: tl.constexpr, DISTS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
                         PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                         DENSE: tl.constexpr, TAIL: tl.constexpr, HAS_L: tl.constexpr):
    # Pass 2 over queries row_lo … T−1: P[i, j] = 2^(s·log2 e − m_i·m_scale) / l_i from the
    # row statistics (m in log2 units with m_scale = 1 and l from pass 1, or a natural-log
    # logsumexp with m_scale = log2 e and no l). DENSE: n_i · P summed by distance into out.
    # TAIL: the tail window's statistics for rows tail_lo … T−1 (see tail_tile) into tail and
    # rowstat. q_ptr holds queries q_first … T−1 (q_first <= row_lo; rows below row_lo are
    # masked, never read). Programs take ROWS_PER_PROGRAM queries from the multiple of ROWS at
    # or below row_lo, in tiles of ROWS rows starting at multiples i0 of ROWS. Tile row r, column c
    # pairs query i0 + r with key i0 − d0 − c, i.e. distance d0 + r + c whatever i0 is, so the
    # weights accumulate in registers and reach memory once per program (ROWS·DISTS atomics),
    # not once per (query, key) pair. Each visible pair (i, d) lands in exactly one program:
    # r = i mod ROWS and d0 the multiple of DISTS in (d − r − DISTS, d − r], hence d0 starts
    # at −DISTS.
    pid_d = tl.program_id(0)
    pid_q = tl.program_id(1)
    bh = tl.program_id(2)
    d0 = (pid_d - 1) * DISTS
    q_lo = row_lo // ROWS * ROWS + pid_q * ROWS_PER_PROGRAM
    start = tl.maximum(q_lo, d0)          # a query i < d0 sees no key at distance ≥ d0
    end = tl.minimum(q_lo + ROWS_PER_PROGRAM, T)
    if start < end:
        b = (bh // H).to(tl.int64)
        h = bh % H
        q_base = q_ptr + b * stride_qb + h.to(tl.int64) * stride_qh - q_first * stride_qt
        k_base = k_ptr + b * stride_kb + (h // G).to(tl.int64) * stride_kh
        dist = d0 + tl.arange(0, ROWS)[:, None] + tl.arange(0, DISTS)[None, :]
        if DENSE:
            # Tiles i0 in [mid_lo, mid_hi) need no masks: every distance in [0, window), every
            # key ≥ 0 (i0 ≥ d0 + DISTS − 1; d0 + DISTS is the first multiple of ROWS there) and
            # every row in [row_lo, T). The edge tiles before and after them are masked.
            mid_lo = end
            mid_hi = end
            if (d0 >= 0) & (d0 + ROWS + DISTS - 2 < window):
                first_whole = (row_lo + ROWS - 1) // ROWS * ROWS
                mid_lo = tl.minimum(tl.maximum(tl.maximum(start, d0 + DISTS), first_whole), end)
                mid_hi = tl.maximum(mid_lo, tl.minimum(end, T - ROWS + 1))
            resume = mid_lo + (mid_hi - mid_lo + ROWS - 1) // ROWS * ROWS
            acc = tl.zeros([ROWS, DISTS], tl.float32)
            for i0 in range(start, mid_lo, ROWS):
                acc = bins_tile(acc, q_base, k_base, m_ptr, l_ptr, bh, i0, d0, T, window, row_lo, m_scale,
                                qk_scale, stride_qt, stride_qd, stride_kt, stride_kd,
                                HEAD_DIM, BLOCK_D, ROWS, DISTS, PRECISION, DOT_FP32, True, HAS_L)
            for i0 in range(mid_lo, mid_hi, ROWS):
                acc = bins_tile(acc, q_base, k_base, m_ptr, l_ptr, bh, i0, d0, T, window, row_lo, m_scale,
                                qk_scale, stride_qt, stride_qd, stride_kt, stride_kd,
                                HEAD_DIM, BLOCK_D, ROWS, DISTS, PRECISION, DOT_FP32, False, HAS_L)
            for i0 in range(resume, end, ROWS):
                acc = bins_tile(acc, q_base, k_base, m_ptr, l_ptr, bh, i0, d0, T, window, row_lo, m_scale,
                                qk_scale, stride_qt, stride_qd, stride_kt, stride_kd,
                                HEAD_DIM, BLOCK_D, ROWS, DISTS, PRECISION, DOT_FP32, True, HAS_L)
            tl.atomic_add(out_ptr + bh * T + dist, acc, mask=(dist >= 0) & (dist < window), sem="relaxed")
        if TAIL:
            tail_start = tl.maximum(start, tail_lo // ROWS * ROWS)
            if tail_start < end:
                BH = tl.num_programs(2)
                acc_tail = tl.zeros([ROWS, DISTS], tl.float32)
                for i0 in range(tail_start, end, ROWS):
                    acc_tail = tail_tile(acc_tail, q_base, k_base, m_ptr, l_ptr, rowstat_ptr, bh, BH, i0, d0, T,
                                         row_lo, tail_lo, m_scale, qk_scale, stride_qt, stride_qd, stride_kt,
                                         stride_kd, HEAD_DIM, BLOCK_D, ROWS, DISTS, PRECISION, DOT_FP32, HAS_L)
                tl.atomic_add(tail_ptr + bh * T + dist, acc_tail, mask=(dist >= 0) & (dist < T), sem="relaxed")
