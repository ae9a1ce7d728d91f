"""What a decode step's all-reduces cost between the GPUs of this machine (Chapter 9).

    NCCL_NVLS_ENABLE=0 python benchmarks/allreduce_latency.py --model llama3-8b

A tensor-parallel decoder layer all-reduces one hidden vector per token twice (after attention, after
the MLP), and the embedding once more: 2 x layers + 1 all-reduces a step (65 for Llama-3-8B), of
batch x hidden_size bf16 values each. One process per GPU (NCCL, --world-size of them) measures, for
each --batch and each method (NCCL's all-reduce, and on GPUs the engine's one-shot all-reduce over
symmetric memory, `mini_infer.parallel.communicator`): one all-reduce launched from Python (eager, mean
of 200 after 20 warm-up calls), and a step's all-reduces captured in one CUDA graph, as the engine's
decode graphs hold them (mean of 50 replays). Appends one row per batch size and method to
results/tp_allreduce.jsonl. `--device cpu` runs NCCL's path on gloo (no graphs), to check the script
without GPUs.
"""

import json
import socket
import time

import common

WARMUP, CALLS, REPLAYS = 20, 200, 50


def measure(rank: int, world_size: int, port: int, args, hidden: int, per_step: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from mini_infer.parallel import communicator

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")

    def nccl(x):
        dist.all_reduce(x)
        return x

    methods = {"nccl": nccl}
    if cuda and communicator.use_one_shot_all_reduce(device, dist.new_group(backend="gloo")):
        methods["one-shot"] = communicator.all_reduce
    rows = []
    for batch in args.batch:
        for method, reduce in methods.items():
            # zeros: the sum stays finite however often it is taken, and the time does not depend on it
            x = torch.zeros(batch, hidden, dtype=torch.bfloat16, device=device)
            if method == "one-shot" and x.numel() * x.element_size() > communicator.MAX_BYTES:
                continue  # all_reduce takes NCCL's path there: no one-shot row
            for _ in range(WARMUP):
                x = reduce(x)
            sync()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(CALLS):
                x = reduce(x)
            sync()
            row = {"batch": batch, "bytes": x.numel() * x.element_size(), "method": method}
            row["allreduce_us"] = round((time.perf_counter() - start) / CALLS * 1e6, 2)
            if cuda:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y = x
                    for _ in range(per_step):
                        y = reduce(y)
                graph.replay()
                sync()
                dist.barrier()
                start = time.perf_counter()
                for _ in range(REPLAYS):
                    graph.replay()
                sync()
                step = (time.perf_counter() - start) / REPLAYS
                row["step_us_graph"] = round(step * 1e6, 1)
                row["graph_allreduce_us"] = round(step / per_step * 1e6, 2)
                del graph
                sync()
            rows.append(row)
    if rank == 0:
        queue.put(rows)
    communicator.stop_one_shot_all_reduce()
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parser():
    ap = common.parser(__doc__, ("allreduce",))
    ap.set_defaults(allreduce_out=common.RESULTS / "tp_allreduce.jsonl")
    ap.add_argument("--world-size", type=int, default=2, help="processes, one GPU each")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256], help="tokens per all-reduce")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.device == "cuda" and common.gpu_missing(__file__):
        return
    import torch.multiprocessing as mp

    config = json.loads((common.model_dir(args.model) / "config.json").read_text())
    hidden, per_step = config["hidden_size"], 2 * config["num_hidden_layers"] + 1
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        measure,
        args=(args.world_size, free_port(), args, hidden, per_step, queue),
        nprocs=args.world_size,
        start_method="spawn",
    )
    for row in queue.get():
        row = {
            "model": args.model,
            "world_size": args.world_size,
            "hidden_size": hidden,
            "allreduces_per_step": per_step,
            **row,
        }
        if args.device == "cuda":
            common.append_row(row, args.allreduce_out)
        else:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
