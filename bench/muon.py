"""Muon's optimizer step across processes: its time and the bytes each process sends to the others,
per layout, against DDP with every process orthogonalizing every matrix (what sharing the work replaces) and
against AdamW. Run it under torchrun; each layout builds a GPT, gives every parameter the same whole gradient
in every layout, and times train.py's own optimizer (tritongpt.optim.build_optimizer) stepping it.

    torchrun --standalone --nproc_per_node=2 bench/muon.py --out bench/results/muon/cpu
    torchrun --standalone --nproc_per_node=2 bench/muon.py --quick

--check instead runs a few steps per layout and writes, per rank, how far the weights are from the same
steps in one process alone, a checksum of the weights, and how many Newton-Schulz runs this rank did
(tests/test_muon_distributed.py runs it so).
"""
import json
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: E402

from bench import common  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tritongpt import optim, parallelism  # noqa: E402
from tritongpt.metrics import synchronize  # noqa: E402

# (layout, optimizer): "ddp_unshared" is DDP's replicas with each process orthogonalizing every matrix
CASES = [("ddp", "adamw"), ("ddp_unshared", "muon"), ("ddp", "muon"), ("fsdp", "muon"), ("tp", "muon"),
         ("fsdp_tp", "muon")]


def layout_fits(layout: str, world: int) -> bool:
    return layout != "fsdp_tp" or (world % 2 == 0 and world >= 4)


def tensor_parallel_of(layout: str, world: int) -> int:
    return {"tp": world, "fsdp_tp": 2}.get(layout, 1)


def build(config: GPTConfig, layout: str, optimizer: str, world: int,
          device: torch.device = torch.device("cpu")) -> tuple[GPT, torch.optim.Optimizer]:
    """A GPT from seed 0 in `layout` on `device`, and its optimizer as train.py builds it."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    replica_group = dist.group.WORLD if layout == "ddp" and world > 1 else None
    if layout in ("fsdp", "tp", "fsdp_tp"):
        shape, names = ((world // 2, 2), ("data", "tensor")) if layout == "fsdp_tp" else ((world,), (layout,))
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
        if layout != "fsdp":
            parallelism.apply_tensor_parallel(model, mesh["tensor"] if layout == "fsdp_tp" else mesh)
        if layout != "tp":
            data_mesh = mesh["data"] if layout == "fsdp_tp" else mesh
            for block in model.transformer.h:
                fully_shard(block, mesh=data_mesh)
            fully_shard(model, mesh=data_mesh)
    opt = optim.build_optimizer(model, optimizer, 1e-3, 0.1, (0.9, 0.95), device.type, muon_lr=0.05,
                                muon_momentum=0.9, replica_group=replica_group)
    return model, opt


def set_gradients(model: GPT, step: int, tensor_parallel: int) -> None:
    """The same whole gradient of each parameter in every layout and process, laid out as the parameter."""
    for name, param in model.named_parameters():
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) + step)
        grad = torch.randn(param.shape, generator=generator).to(param.device)
        if name.endswith("c_attn.weight") and tensor_parallel > 1:
            grad = parallelism.qkv_to_rank_order(grad, tensor_parallel)
        if isinstance(param, DTensor):
            grad = distribute_tensor(grad, param.device_mesh, param.placements, src_data_rank=None)
        param.grad = grad


def bytes_written() -> int | None:
    """What this process has written through write-family system calls, sockets included (Linux's
    /proc/self/io, all threads): over a step with no file I/O, the bytes gloo sent to the other processes.
    None where there is no /proc."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    except OSError:
        return None


def check(config: GPTConfig, layout: str, out: Path, steps: int = 3) -> None:
    """Steps in `layout` against the same steps alone: writes <out>.<rank>.json."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tensor_parallel = tensor_parallel_of(layout, world)
    calls = []
    newton_schulz = optim.newton_schulz
    optim.newton_schulz = lambda *args, **kwargs: calls.append(1) or newton_schulz(*args, **kwargs)
    model, opt = build(config, layout, "muon", world)
    for step in range(steps):
        set_gradients(model, step, tensor_parallel)
        opt.step()
    optim.newton_schulz = newton_schulz
    alone, alone_opt = build(config, "ddp_unshared", "muon", world)  # the same steps, nothing shared
    for step in range(steps):
        set_gradients(alone, step, 1)
        alone_opt.step()
    expected = dict(alone.named_parameters())
    report = {"ns_calls": len(calls), "matrices": len(optim.block_matrices(alone)), "max_relative_error": 0.0,
              "checksums": {}}
    for name, param in model.named_parameters():
        whole = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        if name.endswith("c_attn.weight") and tensor_parallel > 1:
            whole = parallelism.qkv_to_canonical(whole, tensor_parallel)
        error = ((whole - expected[name]).norm() / expected[name].norm()).item()
        report["max_relative_error"] = max(report["max_relative_error"], error)
        report["checksums"][name] = whole.double().sum().item()
    Path(f"{out}.{rank}.json").write_text(json.dumps(report))


def time_case(config: GPTConfig, layout: str, optimizer: str, steps: int, device: torch.device) -> dict:
    """Median milliseconds of one optimizer step over `steps` (after 2 warm-up steps), and what this process
    sent to the others in one step (counted for gloo's sockets only: NCCL's transfers make no system calls)."""
    world = dist.get_world_size()
    tensor_parallel = tensor_parallel_of(layout, world)
    model, opt = build(config, layout, optimizer, world, device)
    times = []
    for step in range(steps + 2):
        set_gradients(model, step, tensor_parallel)
        synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        synchronize(device)
        dist.barrier()  # the step ends when the slowest process's does
        times.append(time.perf_counter() - start)
    set_gradients(model, 0, tensor_parallel)
    dist.barrier()
    before = bytes_written()
    opt.step()
    after = bytes_written()
    counted = before is not None and device.type == "cpu"
    sent = torch.tensor([after - before if counted else -1.0], dtype=torch.float64, device=device)
    dist.all_reduce(sent, op=dist.ReduceOp.MAX)
    return {"layout": layout, "optimizer": optimizer, "processes": world,
            "step_ms": 1000 * statistics.median(times[2:]), "sent_MiB": None if sent < 0 else sent.item() / 2**20}


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--check", metavar="LAYOUT", help="write the equality report of LAYOUT instead of timing")
    p.add_argument("--check_out", type=Path, help="--check's output prefix (<prefix>.<rank>.json)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    args = p.parse_args()
    if args.check and args.check_out is None:
        p.error("--check needs --check_out, where each rank writes its report")
    device = torch.device(common.device_and_dtype(args)[0] if not args.check else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    torch.set_num_threads(1)  # the processes share the machine's cores
    if args.check:
        config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, bias=False)
        check(config, args.check, args.check_out)
    else:
        config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, bias=False) if args.quick \
            else GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=64, vocab_size=65, bias=False)
        steps = 2 if args.quick else args.steps
        rows = [time_case(config, layout, optimizer, steps, device)
                for layout, optimizer in CASES if layout_fits(layout, world)]
        baseline = next(row["step_ms"] for row in rows if row["layout"] == "ddp_unshared")
        for row in rows:
            row["vs_ddp_unshared"] = baseline / row["step_ms"]
        if dist.get_rank() == 0:
            settings = {"model": f"{config.n_layer} layers, {config.n_embd} wide ({len(optim.block_matrices(GPT(config)))} "
                                 "Muon matrices)", "backend": dist.get_backend(), "dtype": "float32", "timed steps": steps}
            notes = [f"launched as `torchrun --standalone --nproc_per_node={world} bench/muon.py ...`",
                     "ddp_unshared: DDP replicas, each process orthogonalizing every matrix (before sharing)",
                     "step_ms: the median over the timed steps, from a barrier before to a barrier after",
                     "sent_MiB: what one optimizer step sent from a process to the others (gloo's socket writes, "
                     "counted by Linux in /proc/self/io), the most of any process"]
            common.report("muon", "Muon's optimizer step across processes", rows,
                          ["layout", "optimizer", "processes", "step_ms", "vs_ddp_unshared", "sent_MiB"],
                          settings, notes, args.out)
    dist.barrier()  # no process leaves while another is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
