"""This process's place in a run: joining torchrun's process group (each process on its own GPU), the
share of the micro-batches each data rank runs, and stopping every rank together on SIGTERM or Ctrl-C.
"""
import gc
import os
import signal
import sys
from dataclasses import dataclass

import torch

# -----------------------------------------------------------------------------
# Processes and devices


@dataclass
class Distributed:
    """This process's place in the run: rank 0 of 1 without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    restart_count: int = 0  # torchrun's restarts of the workers after a failure

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or torch.distributed.is_initialized()

    @property
    def master(self) -> bool:
        return self.rank == 0  # prints, logs and writes the checkpoint files


def setup_distributed(device: str, backend: str, env: dict | None = None) -> Distributed:
    """Join the process group when run under torchrun (RANK is set), each process on its own GPU."""
    env = os.environ if env is None else env
    restart_count = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if "RANK" not in env:
        return Distributed(device=torch.device(device), restart_count=restart_count)
    rank, local_rank, world_size = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend=backend if device.startswith("cuda") else "gloo")
    # torchrun counts restarts per node, and one whose workers were restarted because another node's failed
    # may count none: restarted anywhere is restarted everywhere
    restarts = torch.tensor(restart_count, device=device)
    torch.distributed.all_reduce(restarts, op=torch.distributed.ReduceOp.MAX)
    return Distributed(rank, local_rank, world_size, torch.device(device), int(restarts))


def teardown_distributed(dist: Distributed) -> None:
    """Leave the process group. Free the models and optimizers (FSDP's state) before calling this:
    gloo work objects they hold can abort the process if destroyed during interpreter shutdown
    (seen on CPU with torch 2.13, one exit in ~15)."""
    if torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def per_rank_accumulation(gradient_accumulation_steps: int, world_size: int) -> int:
    """Each process runs its share of the micro-batches, so the global batch stays the same."""
    if gradient_accumulation_steps % world_size != 0:
        raise ValueError(
            f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by the {world_size} "
            f"processes; pick a multiple of {world_size} so the global batch stays the same"
        )
    return gradient_accumulation_steps // world_size


# -----------------------------------------------------------------------------
# Stopping on a signal


class StopSignal:
    """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) asks the run to stop after the current step,
    saving a checkpoint first; a second Ctrl-C aborts at once."""

    EXIT_CODES = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def install(self) -> "StopSignal":
        for signum in self.EXIT_CODES:
            self.previous[signum] = signal.signal(signum, self.handle)
        self.previous_excepthook = sys.excepthook
        sys.excepthook = self.excepthook
        return self

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        sys.excepthook = self.previous_excepthook

    def handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            # the second Ctrl-C: no more waiting. An exception, not an exit, so that a file being written
            # is deleted on the way out (atomic_open) and the last whole checkpoint stays.
            raise KeyboardInterrupt
        self.received = signum
        name = signal.Signals(signum).name
        print(f"\n{name} received: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def excepthook(self, kind, value, traceback) -> None:
        if kind is KeyboardInterrupt and self.received is not None:
            print("aborted by a second Ctrl-C: nothing more was saved; the last checkpoint is whole",
                  file=sys.stderr)
            return
        self.previous_excepthook(kind, value, traceback)

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES.get(self.received, 1)


def agree_to_stop(stop: bool, device: torch.device, world_size: int) -> bool:
    """True on every rank when any rank wants to stop, so all stop after the same step (the save is
    collective)."""
    if world_size == 1:
        return stop
    flag = torch.tensor(int(stop), device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
