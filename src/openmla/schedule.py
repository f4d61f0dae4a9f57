"""Host-side split-KV schedule, computed in ``plan()`` from host copies of the lengths.

The batch's KV is cut into *pieces* (request, token range). Automatic mode sizes pieces so the
whole batch makes about ``waves`` pieces per SM (long requests get many pieces, short ones stay
whole); a pinned split count (``num_splits``) cuts every request into exactly that many pieces,
possibly empty. Batch-invariant mode (``deterministic``) cuts every request at multiples of
``deterministic_chunk(num_heads)`` tokens (shorter for very long requests:
``deterministic_request_chunk``), so a request's pieces depend on its own length (and the SM
count) only. Piece
boundaries are always multiples of ``block_n`` (the decode kernel relies on
it to address a block through one page id when the page size allows). A request cut into one piece writes its output directly; the pieces of a split
request write fp32 partials that the merge kernel combines.

Arrays (all int32, padded with -1 to a capacity that depends only on the batch size, the split
count and the device, so a CUDA graph captured once survives re-planning):

``work_req[w], work_kv_begin[w], work_kv_end[w], work_part_row[w]``
    one entry per decode program column; ``work_part_row = -1`` writes the final output.
``work_num_parts[w], work_part_base[w]``
    for a request of 2..INLINE_MERGE_MAX pieces: its piece count and first partial row (the
    decode's last piece merges); 0 otherwise.
``tok_num_parts[t]``  pieces of query token ``t``'s request when the merge kernel merges it
                      (more than INLINE_MERGE_MAX pieces), else 0 (also for padding rows).
``tok_part_row[t]``   partial row of token ``t``, head 0, piece 0; piece ``j`` is
                      ``tok_part_stride[t] = qo_len * H`` rows further.
"""

from __future__ import annotations

from dataclasses import dataclass

from openmla.config import DEFAULT_SCHEDULE, INLINE_MERGE_MAX, ScheduleConfig, deterministic_chunk

# A batch whose requests alone give this fraction of the target programs is not split.
FILL_FRACTION = 0.9

# The TileLang kernel holds a whole SM (one 384-thread program, ~225 KB of shared memory): one
# wave of pieces, and every split request merged by the merge kernel.
TILELANG_SCHEDULE = ScheduleConfig(waves=1, min_chunk=256)
# The kv_as_m kernel (below 64 heads) holds an SM too (~165-185 KB of shared memory); in
# batch-invariant mode its pieces are 2048 tokens, so W1's 4K requests still fill the SMs with
# two pieces each (1024-token pieces ran 3.9 waves on W6: 0.83x of the default, H200).
KV_AS_M_SCHEDULE = ScheduleConfig(waves=1, min_chunk=256, det_chunk_scale=2)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Schedule:
    work_req: list[int]
    work_kv_begin: list[int]
    work_kv_end: list[int]
    work_part_row: list[int]
    work_num_parts: list[int]
    work_part_base: list[int]
    tok_part_row: list[int]
    tok_num_parts: list[int]
    tok_part_stride: list[int]
    part_rows: int  # fp32 partial rows used in the workspace
    split_requests: int
    merge_kernel_tokens: int  # query tokens the separate merge kernel handles
    merge_kernel_pieces: int  # the most pieces the merge kernel merges for one token

    @property
    def num_pieces(self) -> int:
        return sum(1 for r in self.work_req if r >= 0)


def work_capacity(batch_size: int, num_splits: int | None, num_sms: int, row_blocks: int,
                  sched: ScheduleConfig = DEFAULT_SCHEDULE, deterministic_pieces: int | None = None) -> int:
    """Upper bound on the pieces of any plan with this batch size: fixes the decode grid.

    In deterministic mode the pieces grow with the lengths: ``deterministic_pieces`` (this
    plan's count) is rounded up to a multiple of 64, and at least ``batch + 8 * SMs`` is kept so
    a CUDA graph captured on a first plan fits later plans with longer requests.
    """
    if num_splits is not None:
        return max(1, batch_size * num_splits)
    if deterministic_pieces is not None:
        return max(cdiv(max(deterministic_pieces, 1), 64) * 64, batch_size + 8 * num_sms)
    return batch_size + _target_pieces(num_sms, row_blocks, sched)


def _deterministic_chunk(num_heads: int, sched: ScheduleConfig) -> int:
    return deterministic_chunk(num_heads) * sched.det_chunk_scale


# Batch-invariant mode: a request longer than LONG_REQUEST_CHUNKS chunks is cut into pieces for
# at least LONG_REQUEST_SM_SHARE of the SMs (shorter pieces, multiples of block_n), whatever
# else is in the batch. A long request's pieces set a skewed batch's time: W7's 128K request at
# 2048 tokens made 64 pieces for 132 SMs, 0.84x of the default mode (H200); its 31 short
# requests fill the SMs left over. The cut depends on the request's length and the SM count.
LONG_REQUEST_CHUNKS = 32
LONG_REQUEST_SM_SHARE = 0.75


def deterministic_request_chunk(length: int, chunk: int, num_sms: int, block_n: int) -> int:
    """Batch-invariant mode's piece length for a request of ``length`` tokens."""
    if length <= LONG_REQUEST_CHUNKS * chunk:
        return chunk
    pieces = max(1, int(num_sms * LONG_REQUEST_SM_SHARE))
    return min(chunk, cdiv(cdiv(length, pieces), block_n) * block_n)


def deterministic_pieces(qo_lens: list[int], kv_lens: list[int], num_heads: int, num_sms: int, block_n: int,
                         sched: ScheduleConfig = DEFAULT_SCHEDULE) -> int:
    chunk = _deterministic_chunk(num_heads, sched)
    return sum(max(1, cdiv(n, deterministic_request_chunk(n, chunk, num_sms, block_n)))
               for q, n in zip(qo_lens, kv_lens) if q)


def _target_pieces(num_sms: int, row_blocks: int, sched: ScheduleConfig) -> int:
    return max(1, num_sms * sched.waves // row_blocks)


def _fit_chunk(lengths: list[int], target: int, block_n: int, low: int) -> int:
    """The smallest chunk (a multiple of ``block_n``, at least ``low``) that cuts ``lengths`` into
    at most ``target`` pieces: the pieces then run in one wave, no short stub trails it (W7's
    1024-token requests cut at 640 made 267 pieces for 264 slots; cut at 672, 258)."""
    def pieces(c: int) -> int:
        return sum(max(1, cdiv(n, c)) for n in lengths)

    lo = cdiv(max(low, 1), block_n)  # in units of block_n
    if pieces(lo * block_n) <= target:
        return lo * block_n
    hi = max(lo, cdiv(max(lengths, default=1), block_n))  # one piece a request
    while lo < hi:
        mid = (lo + hi) // 2
        if pieces(mid * block_n) <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo * block_n


def _cut(length: int, chunk: int, parts: int) -> list[tuple[int, int]]:
    return [(min(j * chunk, length), min((j + 1) * chunk, length)) for j in range(parts)]


def build_schedule(
    qo_lens: list[int],
    kv_lens: list[int],
    num_heads: int,
    block_n: int,
    row_blocks: int,
    num_sms: int,
    part_rows_capacity: int,
    capacity: int,
    token_capacity: int,
    num_splits: int | None = None,
    sched: ScheduleConfig = DEFAULT_SCHEDULE,
    deterministic: bool = False,
    inline_merge_max: int = INLINE_MERGE_MAX,
) -> Schedule:
    """Cut the batch into pieces; raises ValueError when a pinned split count does not fit."""
    batch = len(kv_lens)
    rows = [q * num_heads for q in qo_lens]
    if num_splits is not None:
        splits = [num_splits if rows[b] else 0 for b in range(batch)]
        chunks = [cdiv(cdiv(kv_lens[b], num_splits), block_n) * block_n for b in range(batch)]
        if _partial_rows(splits, rows) > part_rows_capacity:
            raise ValueError(
                f"num_splits={num_splits} needs {_partial_rows(splits, rows)} partial rows, the "
                f"workspace holds {part_rows_capacity}: give a larger float_workspace_buffer"
            )
    elif deterministic:
        chunk = _deterministic_chunk(num_heads, sched)
        chunks = [deterministic_request_chunk(n, chunk, num_sms, block_n) for n in kv_lens]
        splits = [max(1, cdiv(kv_lens[b], chunks[b])) if rows[b] else 0 for b in range(batch)]
        if _partial_rows(splits, rows) > part_rows_capacity:
            raise ValueError(
                f"deterministic mode needs {_partial_rows(splits, rows)} partial rows, the workspace "
                f"holds {part_rows_capacity}: give a larger float_workspace_buffer")
    else:
        total_kv = sum(kv_lens[b] for b in range(batch) if rows[b])
        active = sum(1 for b in range(batch) if rows[b])
        if active * row_blocks >= FILL_FRACTION * num_sms * sched.waves:
            # the requests alone fill the GPU: splitting only adds merge work (W3 at 128 heads
            # cut 8192 tokens into 8000 + 192 before this rule)
            chunk = max((kv_lens[b] for b in range(batch) if rows[b]), default=1)
        else:
            target = _target_pieces(num_sms, row_blocks, sched)
            chunk = _fit_chunk([kv_lens[b] for b in range(batch) if rows[b]], target, block_n,
                               max(sched.min_chunk, cdiv(total_kv, target)))
        chunk = cdiv(max(chunk, 1), block_n) * block_n
        while True:
            splits = [max(1, cdiv(kv_lens[b], chunk)) if rows[b] else 0 for b in range(batch)]
            if _partial_rows(splits, rows) <= part_rows_capacity:
                break
            chunk *= 2
        # full chunks plus a stub, not near-equal pieces: longest-first, the stubs fill the last
        # wave (equal thirds of W6's requests measured 254 us against 215 us, H100)
        chunks = [chunk] * batch

    # (length, request, begin, end, part row, inline-merge piece count, request base row)
    pieces: list[tuple[int, int, int, int, int, int, int]] = []
    tok_part_row: list[int] = []
    tok_num_parts: list[int] = []
    tok_part_stride: list[int] = []
    next_row = 0
    for b in range(batch):
        split = splits[b] > 1
        by_kernel = split and splits[b] > inline_merge_max
        base = next_row
        for i in range(qo_lens[b]):
            tok_part_row.append(base + i * num_heads if by_kernel else -1)
            tok_num_parts.append(splits[b] if by_kernel else 0)
            tok_part_stride.append(rows[b] if by_kernel else 0)
        if splits[b] == 0:
            continue
        cuts = _cut(kv_lens[b], chunks[b], splits[b]) if split else [(0, kv_lens[b])]
        inline = splits[b] if split and not by_kernel else 0
        for j, (lo, hi) in enumerate(cuts):
            pieces.append((hi - lo, b, lo, hi, base + j * rows[b] if split else -1, inline, base))
        if split:
            next_row += splits[b] * rows[b]
    if len(pieces) > capacity:
        raise ValueError(f"the plan needs {len(pieces)} work items, the grid holds {capacity}")
    pieces.sort(key=lambda p: -p[0])  # longest first: the tail of the grid gets short pieces
    pad = capacity - len(pieces)
    tok_pad = token_capacity - len(tok_num_parts)
    if tok_pad < 0:
        raise ValueError(f"{len(tok_num_parts)} query tokens exceed the planned capacity {token_capacity}")
    return Schedule(
        work_req=[p[1] for p in pieces] + [-1] * pad,
        work_kv_begin=[p[2] for p in pieces] + [0] * pad,
        work_kv_end=[p[3] for p in pieces] + [0] * pad,
        work_part_row=[p[4] for p in pieces] + [-1] * pad,
        work_num_parts=[p[5] for p in pieces] + [0] * pad,
        work_part_base=[p[6] for p in pieces] + [0] * pad,
        tok_part_row=tok_part_row + [-1] * tok_pad,
        tok_num_parts=tok_num_parts + [0] * tok_pad,
        tok_part_stride=tok_part_stride + [0] * tok_pad,
        part_rows=next_row,
        split_requests=sum(1 for s in splits if s > 1),
        merge_kernel_tokens=sum(1 for n in tok_num_parts if n),
        merge_kernel_pieces=max(tok_num_parts, default=0),
    )


def _partial_rows(splits: list[int], rows: list[int]) -> int:
    return sum(s * r for s, r in zip(splits, rows) if s > 1)
