"""Resharding benchmark: 3D-HybridEngine (micro-DP all-gather) vs the naive full gather, side by side.

Runs itself on ``--world`` gloo ranks (subprocesses on this machine). Every rank holds its
training shard of a Qwen2-shaped model in megatron's layout (fused per-group qkv with bias,
gated fc1 ``cat(gate_r, up_r)``, row-parallel proj/fc2, replicated norms, vocab-parallel
embedding and output layer), sharded for each training layout; for each generation size tg both
paths reshard it ``--reps`` times (after one warm-up) and report, per rank:

* ``to_gen`` / ``to_train``: seconds for train -> generation layout and back (median);
* bytes sent: a ring all-gather's volume, padding included (and the useful payload);
* peak extra memory: the buffers allocated minus training storage released (exact accounting),
  the bound ``gen - train + bucket``, and an RSS cross-check (peak RSS during the transition minus
  RSS before, sampled every millisecond with glibc's mmap threshold fixed so freed buffers return).

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.reshard --out /tmp/reshard.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

LAYOUTS = [(2, 2, (1, 2)), (1, 4, (1, 2, 4))]   # (pp, tp, tgs) on 4 ranks


def _shape(args):
    return dict(layers=args.layers, hidden=args.hidden, ffn=args.ffn, vocab=args.vocab, heads=args.heads,
                kv_heads=args.kv_heads)


def full_model(d, seed=0):
    """name -> (tensor, tp_dim, gated, layer or None) of a Qwen2-shaped model in megatron naming."""
    import torch
    g = torch.Generator().manual_seed(seed)
    h, hd = d["hidden"], d["hidden"] // d["heads"]
    qkv = (d["heads"] + 2 * d["kv_heads"]) * hd
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    m = {"embedding.word_embeddings.weight": (rnd(d["vocab"], h), 0, False, "first"),
         "decoder.final_layernorm.weight": (rnd(h), None, False, "last"),
         "output_layer.weight": (rnd(d["vocab"], h), 0, False, "last")}
    for i in range(d["layers"]):
        p = f"decoder.layers.{i}."
        m.update({p + "input_layernorm.weight": (rnd(h), None, False, i),
                  p + "self_attention.linear_qkv.weight": (rnd(qkv, h), 0, False, i),
                  p + "self_attention.linear_qkv.bias": (rnd(qkv), 0, False, i),
                  p + "self_attention.linear_proj.weight": (rnd(h, h), 1, False, i),
                  p + "pre_mlp_layernorm.weight": (rnd(h), None, False, i),
                  p + "mlp.linear_fc1.weight": (rnd(2 * d["ffn"], h), 0, True, i),
                  p + "mlp.linear_fc2.weight": (rnd(h, d["ffn"]), 1, False, i)})
    return m


def train_shards(model, lay, rank, layers):
    import torch
    from hybridflow.workers.hybrid_engine import ShardSpec, gen_slice
    pp_rank, _, tp_rank = lay.train_coords(rank)
    out = []
    for name, (t, dim, gated, where) in model.items():
        held = {"first": pp_rank == 0, "last": pp_rank == lay.pp - 1}.get(where)
        if held is None:
            held = where * lay.pp // layers == pp_rank
        if held:
            out.append(ShardSpec(name, gen_slice(t, dim, gated, lay.tp, tp_rank).clone(memory_format=torch.contiguous_format),
                                 dim, gated))
    return out


class RSSPeak:
    """Peak resident set size (bytes) of this process while active, sampled every ``period`` s."""

    def __init__(self, period=0.001):
        self.period, self.page = period, os.sysconf("SC_PAGE_SIZE")

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _rank_main(args):
    import torch
    import torch.distributed as dist
    from datetime import timedelta

    from hybridflow.workers.hybrid_engine import Layout, MicroDPReshard, NaiveReshard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    d = _shape(args)
    rows = []
    for pp, tp, tgs in LAYOUTS:
        if pp * tp > world:
            continue
        for tg in tgs:
            lay = Layout(pp, tp, world // (pp * tp), tg)
            for cls in (MicroDPReshard, NaiveReshard):
                model = full_model(d)
                shards = train_shards(model, lay, rank, d["layers"])
                del model
                eng = cls(lay, bucket_bytes=args.bucket_mb << 20)
                to_gen, to_train, rss = [], [], []
                for rep in range(args.reps + 1):
                    dist.barrier()
                    with RSSPeak() as mem:
                        gen = eng.to_generation(shards)
                    del gen
                    dist.barrier()
                    eng.to_training()
                    if rep:
                        to_gen.append(eng.stats.to_gen_s)
                        to_train.append(eng.stats.to_train_s)
                        rss.append(mem.peak - mem.base)
                s = eng.stats.as_dict()
                s.update(to_gen_s=statistics.median(to_gen), to_train_s=statistics.median(to_train),
                         rss_extra_bytes=max(rss), path="micro-dp" if cls is MicroDPReshard else "naive",
                         pp=pp, tp=tp, dp=lay.dp, tg=tg, rank=rank,
                         group=lay.micro_dp_size if cls is MicroDPReshard else pp * tp)
                rows.append(s)
                del shards, eng
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        with open(args.rank_out, "w") as f:
            json.dump([r for per in gathered for r in per], f)
    dist.barrier()
    dist.destroy_process_group()


def _launch(args):
    from hybridflow.worker import rendezvous_server

    store, store_env = rendezvous_server()  # served from here until the ranks are done
    procs = []
    for rank in range(args.world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.world), **store_env,
                   OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   MALLOC_MMAP_THRESHOLD_="131072")  # big buffers are mmapped and returned on free
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.reshard", "--as-rank", *sys.argv[1:]],
                                      env=env))
    for p in procs:
        if p.wait(timeout=args.timeout) != 0:
            for q in procs:
                q.kill()
            raise SystemExit(f"a rank failed (exit {p.returncode})")
    del store


def _table(rows):
    mb = lambda b: b / 1e6  # noqa: E731
    by = {}
    for r in rows:
        by.setdefault((r["pp"], r["tp"], r["tg"], r["path"]), []).append(r)
    out = ["| train (pp,tp) → tg | path | group | to_gen s | to_train s | MB sent/rank | peak extra MB/rank "
           "| bound MB | RSS extra MB | peak vs naive |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (pp, tp, tg, path), rs in sorted(by.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2], kv[0][3] != "micro-dp")):
        peak = max(r["peak_extra_bytes"] for r in rs)
        naive_peak = max(r["peak_extra_bytes"] for r in by[(pp, tp, tg, "naive")])
        bound = max(r["gen_bytes"] - r["train_bytes"] + r["bucket_bytes"] for r in rs)
        bound_s = f"{mb(bound):.1f}" if path == "micro-dp" else "-"
        out.append(f"| ({pp},{tp}) → {tg} | {path} | {rs[0]['group']} | {max(r['to_gen_s'] for r in rs):.3f} "
                   f"| {max(r['to_train_s'] for r in rs):.3f} | {mb(max(r['bytes_sent'] for r in rs)):.1f} "
                   f"| {mb(peak):.1f} | {bound_s} | {mb(max(r['rss_extra_bytes'] for r in rs)):.1f} "
                   f"| {peak / naive_peak:.2f} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--bucket-mb", type=int, default=4, help="send + receive buffers per all-gather, MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out", default=None, help="write every number (per rank) to this JSON file")
    ap.add_argument("--as-rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.as_rank:
        return _rank_main(args)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        args.rank_out = os.path.join(tmp, "rows.json")
        sys.argv += ["--rank-out", args.rank_out]
        start = time.time()
        _launch(args)
        with open(args.rank_out) as f:
            rows = json.load(f)
    model_bytes = sum(t.numel() * 4 for t, *_ in full_model(_shape(args)).values())
    print(f"model: {model_bytes / 1e6:.1f} MB fp32 ({_shape(args)}), world {args.world}, "
          f"bucket {args.bucket_mb} MiB, {args.reps} reps, wall {time.time() - start:.0f} s")
    print(_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model_bytes": model_bytes, "shape": _shape(args), "world": args.world,
                       "bucket_mb": args.bucket_mb, "reps": args.reps, "machine": {
                           "cpus": os.cpu_count(), "python": platform.python_version(),
                           "loadavg": os.getloadavg()}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
