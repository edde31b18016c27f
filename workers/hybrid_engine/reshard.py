"""Resharding the actor's weights from the training layout to the generation layout.

Two paths with the same input and the same output (the rank's generation shard, a dict of
global parameter name -> tensor in the generation layout):

* :class:`MicroDPReshard` (the 3D-HybridEngine): a bucketed all-gather inside the rank's
  micro-DP group (:meth:`Layout.micro_dp_group`). The rank's own training shard is *part of* the
  generation shard: a tensor whose generation shard equals the training shard (``tp == tg``, or a
  replicated norm) is used as is; otherwise the training tensor's storage is released and its
  values live on only inside the generation tensor until :meth:`to_training` puts them back.
  Extra memory per rank at the peak::

      extra <= (generation shard - training shard) + bucket        (bucket = send + receive buffers)

  (own tensors are moved largest first; one larger than the receive buffer is cloned while little
  else is allocated, which keeps it under the bound unless it outweighs the rest of the shard).
* :class:`NaiveReshard` (the baseline): all-gather the *full* model inside the training
  model-parallel group on every rank, then slice the generation shard out of it (views where the
  slice is contiguous in the layout, a copy for the gated ``fc1``). Extra memory: the full model.

The input is a list of :class:`ShardSpec` (name global over pipeline stages, local tensor, TP
split dim, gated flag). A generation shard of a TP-split tensor is the concatenation along
``tp_dim`` of the training shards of TP ranks ``j*k .. j*k+k-1``, except for the gated fc1
(``gated=True``): training TP rank r holds ``cat(gate_r, up_r)``, and generation rank j needs
``cat(gate_{jk..jk+k-1}, up_{jk..jk+k-1})``, so each training shard is split in halves that land
in two places. QKV needs nothing special: megatron's KV groups are contiguous along dim 0.

Accounting (:class:`ReshardStats`): ``bytes_sent`` is what a ring all-gather sends per rank
(``(s-1) * chunk`` per round, padding included), ``peak_extra_bytes`` counts the buffers this
module allocates minus the training storage it releases (exact, not sampled).
"""
from __future__ import annotations

import dataclasses
import math
import time
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .groups import Layout

__all__ = ["ShardSpec", "ReshardStats", "MicroDPReshard", "NaiveReshard", "gen_slice"]

_DEFAULT_BUCKET = 16 << 20


@dataclasses.dataclass
class ShardSpec:
    """One training tensor of this rank. ``name`` is global (same on every stage that holds it);
    ``tp_dim`` is the dim split over training TP ranks (None: replicated); ``gated``: the fc1
    ``cat(gate_r, up_r)`` layout along ``tp_dim``."""

    name: str
    tensor: torch.Tensor
    tp_dim: Optional[int] = None
    gated: bool = False
    releasable: bool = True  # False: storage shared with other tensors (e.g. megatron's distributed-
    # optimizer param buffer); the values are then copied, not moved, and the copy counts as extra


@dataclasses.dataclass
class ReshardStats:
    """Numbers of the last transition (bytes per rank)."""

    to_gen_s: float = 0.0
    to_train_s: float = 0.0
    bytes_sent: int = 0          # ring all-gather volume sent by this rank, padding included
    payload_bytes: int = 0       # useful bytes this rank is the source of, times their receivers
    rounds: int = 0
    bucket_bytes: int = 0        # send + receive buffers
    train_bytes: int = 0         # this rank's training shard
    gen_bytes: int = 0           # this rank's generation shard
    peak_extra_bytes: int = 0    # max over time of (allocated here - released training storage)
    end_extra_bytes: int = 0     # the same after the transition, during generation

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Meter:
    def __init__(self):
        self.now = self.peak = 0

    def add(self, nbytes: int):
        self.now += nbytes
        self.peak = max(self.peak, self.now)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _rows(view: torch.Tensor) -> torch.Tensor:
    """``view`` (a ``narrow`` of a contiguous tensor) as a 2-D view whose row-major order is the
    view's flat order: the rows are the dims before the narrowed one. Never copies (``view`` raises
    rather than copy)."""
    i, expected = view.dim(), 1
    while i > 0 and (view.shape[i - 1] == 1 or view.stride(i - 1) == expected):
        expected *= view.shape[i - 1]
        i -= 1
    return view.view(math.prod(view.shape[:i]), -1)


def _copy_range(view2d: torch.Tensor, start: int, end: int, flat: torch.Tensor, into_view: bool):
    """Copy elements [start, end) of ``view2d``'s row-major order to (or from) 1-D ``flat``."""
    width = view2d.shape[1]
    pos, off = start, 0
    while pos < end:
        r, c = divmod(pos, width)
        if c == 0 and end - pos >= width:  # a block of whole rows
            n_rows = (end - pos) // width
            a, b = view2d[r:r + n_rows], flat[off:off + n_rows * width].view(n_rows, width)
            n = n_rows * width
        else:
            n = min(width - c, end - pos)
            a, b = view2d[r, c:c + n], flat[off:off + n]
        (a.copy_(b) if into_view else b.copy_(a))
        pos, off = pos + n, off + n


@dataclasses.dataclass
class _Seg:
    """One piece (or one half of a gated piece) of a generation tensor: where it sits, as a
    ``narrow`` (dim, start, length; length 0 = the whole tensor). The source packs it from the same
    place of its own generation tensor, where its training values already are."""

    name: str
    tp_rank: Optional[int]
    dst: Tuple[int, int, int]   # narrow of the destination tensor
    numel: int


def gen_slice(full: torch.Tensor, tp_dim: Optional[int], gated: bool, parts: int, index: int) -> torch.Tensor:
    """Shard ``index`` of ``parts`` of a full tensor in megatron's TP layout (the reference slicing:
    plain contiguous split, or for gated fc1 ``cat(gate_i, up_i)``)."""
    if tp_dim is None:
        return full
    if gated:
        gate, up = full.chunk(2, dim=tp_dim)
        return torch.cat([gate.chunk(parts, tp_dim)[index], up.chunk(parts, tp_dim)[index]], dim=tp_dim)
    return full.chunk(parts, dim=tp_dim)[index]


class _Gather:
    """Bucketed all-gather of TP pieces inside one group (shared by both paths).

    Every member ends with the tensors covering training TP ranks ``wanted`` (all stages)."""

    def __init__(self, group, members: List[int], rank: int, layout: Layout, bucket_bytes: int, timeout: float):
        self.group, self.members, self.rank, self.layout = group, members, rank, layout
        self.me = members.index(rank)
        self.bucket_bytes, self.timeout = bucket_bytes, timeout
        self.plan = None

    def _make_plan(self, shards: Sequence[ShardSpec], wanted: range):
        local = [(s.name, tuple(s.tensor.shape), str(s.tensor.dtype).replace("torch.", ""), s.tp_dim, s.gated)
                 for s in shards]
        tp_rank = self.layout.train_coords(self.rank)[2]
        metas: List = [None] * len(self.members)
        if len(self.members) > 1:
            dist.all_gather_object(metas, (tp_rank, local), group=self.group)
        else:
            metas = [(tp_rank, local)]
        info: Dict[str, tuple] = {}
        holders: Dict[Tuple[str, Optional[int]], List[int]] = {}
        for m, (t, entries) in enumerate(metas):
            for name, shape, dtype, dim, gated in entries:
                prev = info.setdefault(name, (shape, dtype, dim, gated))
                if prev != (shape, dtype, dim, gated):
                    raise ValueError(f"hybrid engine: tensor {name!r} has shape/dtype/split {prev} on one rank "
                                     f"and {(shape, dtype, dim, gated)} on another")
                holders.setdefault((name, None if dim is None else t), []).append(m)
        k = len(wanted)
        load = [0] * len(self.members)
        streams: Dict[str, List[List[_Seg]]] = {}   # dtype -> per source member, its segments in order
        receive: Dict[Tuple[str, Optional[int]], bool] = {}
        receivers: Dict[Tuple[str, Optional[int]], int] = {}
        out_shapes: Dict[str, Tuple[tuple, str, Optional[int], bool]] = {}
        for name in sorted(info):
            shape, dtype, dim, gated = info[name]
            gshape = list(shape)
            if dim is not None:
                gshape[dim] *= k
            out_shapes[name] = (tuple(gshape), dtype, dim, gated)
            for i, t in enumerate([None] if dim is None else wanted):
                key = (name, t)
                if key not in holders:
                    raise ValueError(f"hybrid engine: no rank of the group holds {name!r} for training TP rank {t}")
                hs = holders[key]
                receive[key] = self.me not in hs
                receivers[key] = len(self.members) - len(hs)
                if len(hs) == len(self.members):
                    continue
                numel = math.prod(shape)
                src = min(hs, key=lambda m: (load[m], m))
                load[src] += numel
                per = streams.setdefault(dtype, [[] for _ in self.members])[src]
                if dim is None:
                    per.append(_Seg(name, t, (0, 0, 0), numel))
                elif gated:
                    h = shape[dim] // 2
                    per.append(_Seg(name, t, (dim, i * h, h), numel // 2))
                    per.append(_Seg(name, t, (dim, k * h + i * h, h), numel // 2))
                else:
                    per.append(_Seg(name, t, (dim, i * shape[dim], shape[dim]), numel))
        self.plan = dict(streams=streams, receive=receive, receivers=receivers, shapes=out_shapes, wanted=wanted,
                         signature=[(s.name, tuple(s.tensor.shape)) for s in shards])

    def run(self, shards: Sequence[ShardSpec], wanted: range, reuse_own: bool, meter: _Meter,
            stats: ReshardStats) -> Tuple[Dict[str, torch.Tensor], List[Tuple[ShardSpec, int, Tuple]]]:
        """Return (generation tensors covering ``wanted``, released training tensors). Collective."""
        if self.plan is None or self.plan["wanted"] != wanted:
            self._make_plan(shards, wanted)
        elif self.plan["signature"] != [(s.name, tuple(s.tensor.shape)) for s in shards]:
            raise RuntimeError("hybrid engine: the training tensors changed names or shapes since the first "
                               "reshard; build a new resharder")
        plan, s = self.plan, len(self.members)
        mine = {sp.name: sp for sp in shards}
        tp_rank = self.layout.train_coords(self.rank)[2]
        k = len(wanted)
        dev = shards[0].tensor.device if shards else torch.device("cpu")
        # per dtype stream: per-member totals; chunk = the bucket's share, never more than needed
        totals = {d: [sum(seg.numel for seg in segs) for segs in per] for d, per in plan["streams"].items()}
        bufs, chunks = {}, {}
        for dtype, tot in totals.items():
            if max(tot) == 0:
                continue
            dt = getattr(torch, dtype)
            chunk = max(1, min(self.bucket_bytes // ((s + 1) * torch.empty(0, dtype=dt).element_size()), max(tot)))
            chunks[dtype] = chunk
            bufs[dtype] = (torch.empty(chunk, dtype=dt, device=dev), torch.empty(s, chunk, dtype=dt, device=dev))
            meter.add(_nbytes(bufs[dtype][0]) + _nbytes(bufs[dtype][1]))
        if bufs:
            stats.bucket_bytes = sum(_nbytes(a) + _nbytes(b) for a, b in bufs.values())

        out: Dict[str, torch.Tensor] = {}
        released: List[Tuple[ShardSpec, int, Tuple]] = []
        # 1. own tensors first: alias when the generation shard is the training shard, otherwise move
        #    the values into the new generation tensor (staged through the receive buffer, so the
        #    training storage is released before the generation tensor is allocated). Largest first:
        #    a tensor larger than the receive buffer is cloned instead, and that transient copy then
        #    falls while little else is allocated, under the final level (gen - train + bucket)
        order = sorted(plan["shapes"], key=lambda n: -mine[n].tensor.numel() if n in mine else 0)
        for name in order:
            gshape, dtype, dim, gated = plan["shapes"][name]
            sp = mine.get(name)
            if sp is None or (dim is not None and tp_rank not in wanted):
                continue
            if reuse_own and (dim is None or k == 1):  # the generation shard *is* the training shard
                out[name] = sp.tensor
                continue
            i = 0 if dim is None else wanted.index(tp_rank)
            extra_tmp = 0
            if reuse_own and sp.releasable:  # move: the training storage is released, the values live on in `gen`
                stage = bufs[dtype][1] if dtype in bufs else None
                numel = sp.tensor.numel()
                if stage is not None and stage.numel() >= numel:
                    src = stage.view(-1)[:numel].view(sp.tensor.shape)
                    src.copy_(sp.tensor)
                else:
                    src = sp.tensor.detach().clone()
                    extra_tmp = _nbytes(src)
                    meter.add(extra_tmp)
                released.append((sp, i, tuple(sp.tensor.shape)))
                freed = _nbytes(sp.tensor)
                sp.tensor.data = torch.empty(0, dtype=sp.tensor.dtype, device=sp.tensor.device)
                meter.add(-freed)
            else:
                src = sp.tensor.detach()
            gen = torch.empty(gshape, dtype=getattr(torch, dtype), device=dev)
            meter.add(_nbytes(gen))
            self._place(gen, src, dim, gated, i, k)
            del src
            meter.add(-extra_tmp)
            out[name] = gen
        # 2. tensors this rank does not hold (or holds only partly): allocate
        for name, (gshape, dtype, dim, gated) in plan["shapes"].items():
            if name not in out:
                out[name] = torch.empty(gshape, dtype=getattr(torch, dtype), device=dev)
                meter.add(_nbytes(out[name]))
        # 3. rounds of all-gather per dtype stream
        for dtype, per_member in plan["streams"].items():
            if dtype not in bufs:
                continue
            send, recv, chunk = *bufs[dtype], chunks[dtype]
            offsets = [self._offsets(segs) for segs in per_member]
            total = [o[-1] if o else 0 for o in offsets]
            rounds = -(-max(total) // chunk)
            views = [recv[m] for m in range(s)]
            for r in range(rounds):
                lo, hi = r * chunk, (r + 1) * chunk
                self._pack(per_member[self.me], offsets[self.me], lo, hi, out, send)
                work = dist.all_gather(views, send, group=self.group, async_op=True)
                work.wait(timeout=timedelta(seconds=self.timeout))
                for m in range(s):
                    if m != self.me:
                        self._unpack(per_member[m], offsets[m], lo, hi, recv[m], plan["receive"], out)
            stats.rounds += rounds
            stats.bytes_sent += rounds * (s - 1) * chunk * send.element_size()
            stats.payload_bytes += sum(seg.numel * plan["receivers"][(seg.name, seg.tp_rank)]
                                       for seg in per_member[self.me]) * send.element_size()
        for a, b in bufs.values():
            meter.add(-_nbytes(a) - _nbytes(b))
        bufs.clear()
        return out, released

    @staticmethod
    def _place(gen, local, dim, gated, i, k):
        if dim is None:
            gen.copy_(local)
        elif gated:
            h = local.shape[dim] // 2
            gen.narrow(dim, i * h, h).copy_(local.narrow(dim, 0, h))
            gen.narrow(dim, k * h + i * h, h).copy_(local.narrow(dim, h, h))
        else:
            n = local.shape[dim]
            gen.narrow(dim, i * n, n).copy_(local)

    @staticmethod
    def _offsets(segs: List[_Seg]) -> List[int]:
        acc, out = 0, [0]
        for seg in segs:
            acc += seg.numel
            out.append(acc)
        return out

    @staticmethod
    def _view(t: torch.Tensor, spec: Tuple[int, int, int]) -> torch.Tensor:
        dim, start, length = spec
        return t if length == 0 else t.narrow(dim, start, length)

    def _pack(self, segs, offsets, lo, hi, out, send):
        # the source's own piece already sits at its place in its generation tensor (moved or aliased)
        for n, seg in enumerate(segs):
            a, b = max(offsets[n], lo), min(offsets[n + 1], hi)
            if a < b:
                view = _rows(self._view(out[seg.name], seg.dst))
                _copy_range(view, a - offsets[n], b - offsets[n], send[a - lo:b - lo], into_view=False)

    def _unpack(self, segs, offsets, lo, hi, buf, receive, out):
        for n, seg in enumerate(segs):
            a, b = max(offsets[n], lo), min(offsets[n + 1], hi)
            if a < b and receive[(seg.name, seg.tp_rank)]:
                view = _rows(self._view(out[seg.name], seg.dst))
                _copy_range(view, a - offsets[n], b - offsets[n], buf[a - lo:b - lo], into_view=True)


class _Resharder:
    """Common part of both paths: process groups (created here, collectively, on every rank),
    the state between :meth:`to_generation` and :meth:`to_training`, the stats."""

    def __init__(self, layout: Layout, *, bucket_bytes: int = _DEFAULT_BUCKET, timeout: float = 300.0):
        if not dist.is_initialized():
            raise RuntimeError("hybrid engine: torch.distributed is not initialised")
        if dist.get_world_size() != layout.world:
            raise ValueError(f"hybrid engine: layout pp*tp*dp={layout.world} != world size {dist.get_world_size()}")
        if bucket_bytes < 1024:
            raise ValueError(f"hybrid engine: bucket_bytes={bucket_bytes} is too small (>= 1024)")
        self.layout, self.rank = layout, dist.get_rank()
        mine, group = None, None
        for ranks in self._group_lists():   # every rank creates every group, in the same order
            pg = dist.new_group(ranks, timeout=timedelta(seconds=timeout)) if len(ranks) > 1 else None
            if self.rank in ranks:
                mine, group = ranks, pg
        self.group_ranks = mine
        self._gather = _Gather(group, mine, self.rank, layout, bucket_bytes, timeout)
        self.stats = ReshardStats()
        self._gen: Optional[Dict[str, torch.Tensor]] = None

    def _group_lists(self) -> List[List[int]]:
        raise NotImplementedError

    @property
    def in_generation(self) -> bool:
        return self._gen is not None

    @torch.no_grad()
    def to_generation(self, shards: Sequence[ShardSpec]) -> Dict[str, torch.Tensor]:
        """This rank's generation shard (global name -> tensor in the ``tg`` layout). Collective
        over the group; call :meth:`to_training` before the next training step."""
        if self._gen is not None:
            raise RuntimeError("hybrid engine: already in the generation layout; call to_training() first")
        start, meter = time.perf_counter(), _Meter()
        stats = ReshardStats(train_bytes=sum(_nbytes(s.tensor) for s in shards))
        self._gen = self._to_generation(list(shards), meter, stats)
        stats.gen_bytes = sum(_nbytes(t) for t in self._gen.values())
        stats.peak_extra_bytes, stats.end_extra_bytes = meter.peak, meter.now
        stats.to_gen_s = time.perf_counter() - start
        self.stats, self._meter = stats, meter
        return self._gen

    @torch.no_grad()
    def to_training(self) -> None:
        """Give the training tensors their storage back and release every generation buffer.
        Drop other references to the generation tensors first (e.g. a generation model's
        parameters), or their memory stays alive."""
        if self._gen is None:
            raise RuntimeError("hybrid engine: to_training() without a preceding to_generation()")
        start = time.perf_counter()
        self._to_training()
        self._gen = None
        self.stats.to_train_s = time.perf_counter() - start


class MicroDPReshard(_Resharder):
    """The 3D-HybridEngine path: all-gather inside the micro-DP group (see the module docstring)."""

    def _group_lists(self):
        return self.layout.micro_dp_groups()

    def _to_generation(self, shards, meter, stats):
        wanted = self.layout.train_tp_ranks_of_gen_shard(self.layout.gen_tp_rank(self.rank))
        out, self._released = self._gather.run(shards, wanted, True, meter, stats)
        return out

    def _to_training(self):
        gen, meter = self._gen, self._meter
        own = {sp.name for sp, _, _ in self._released}
        for name in [n for n in gen if n not in own]:
            del gen[name]  # aliases of training tensors or received buffers: drop the reference
        k = self.layout.k
        for sp, i, shape in self._released:
            full = gen.pop(sp.name)
            dim = 0 if sp.tp_dim is None else sp.tp_dim
            new = torch.empty(shape, dtype=full.dtype, device=full.device)
            meter.add(_nbytes(new))
            if sp.tp_dim is None:
                new.copy_(full)
            elif sp.gated:
                h = shape[dim] // 2
                new.narrow(dim, 0, h).copy_(full.narrow(dim, i * h, h))
                new.narrow(dim, h, h).copy_(full.narrow(dim, k * h + i * h, h))
            else:
                new.copy_(full.narrow(dim, i * shape[dim], shape[dim]))
            sp.tensor.data = new
            meter.add(-_nbytes(full))
            del full
        self._released = []


class NaiveReshard(_Resharder):
    """The baseline: all-gather the full model inside the training model-parallel group on every
    rank, then slice this rank's generation shard out of it."""

    def _group_lists(self):
        return self.layout.mp_groups()

    def _to_generation(self, shards, meter, stats):
        lay = self.layout
        self._full, _ = self._gather.run(shards, range(lay.tp), False, meter, stats)
        j, out = lay.gen_tp_rank(self.rank), {}
        for name, full in self._full.items():
            _, _, dim, gated = self._gather.plan["shapes"][name]
            if dim is None:
                out[name] = full
            elif gated:
                out[name] = gen_slice(full, dim, True, lay.tg, j)  # a copy: gate and up halves
                meter.add(_nbytes(out[name]))
            else:
                out[name] = full.chunk(lay.tg, dim=dim)[j]       # a view into the full tensor
        return out

    def _to_training(self):
        self._gen.clear()
        self._full = None
