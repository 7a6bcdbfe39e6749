"""Worker script for tests/test_distributed.py: FP4-compiled training under DDP and FSDP2.

Two ways to run it:

    # one process, the whole global batch: the reference loss curves
    python tests/dist_worker.py single --out DIR

    # two processes over gloo on CPU: a DDP run, then an FSDP2 run (which saves
    # a distributed checkpoint mid-run), on the same global batch
    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/dist_worker.py dist --out DIR

Every run trains the tiny LLaMA (float64, no autocast; ``--layers`` blocks, 2
by default) for STEPS steps of plain SGD on one fixed global batch, compiled
with ``--backend`` (``fp4_aot_eager`` by default, or ``fp4``: the product
backend, Inductor included), once per entry of CONFIGS. Each rank of a
distributed run takes a contiguous equal share of the global batch. Results
land in DIR/<config>/: a JSON file per process (loss curve, what fp4compile
reported) and the final full (gathered) parameters, for the test to compare.

    # the product backend on a one-block model, FSDP2 only (what the test runs
    # with Inductor; --modes ddp,fsdp2 adds the DDP run, with --ddp-bucket-mb 25
    # for one bucket)
    python tests/dist_worker.py single --out DIR --layers 1
    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/dist_worker.py dist --out DIR --backend fp4 --layers 1 --modes fsdp2 --no-checkpoint

Then, to print (and with --json write) how far each distributed run is from one
process, the figures docs/distributed.md quotes:

    python tests/dist_worker.py compare --out DIR [--layers N] [--json FILE]

Inside every process the script asserts that fp4compile.reports() shows
exactly the expected linear layers quantized: a run that silently fell back to
high precision (say, because the pass no longer recognised DDP's or FSDP2's
parameters as weights) fails here, whatever its losses. With ``--backend fp4``
it also asserts that the CPU lowering ran on every site and that Inductor's
generated code holds the quantization (the OCC top-k, the E5M2 gradient casts).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Runnable as a plain script from any working directory: the package is the
# repository root's fp4compile/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fp4compile  # noqa: E402  (registers the fp4 backends)
from fp4compile.training.models.llama import Llama, preset  # noqa: E402
from tests.code_markers import occ_thresholds_in_code  # noqa: E402

STEPS = 4
GLOBAL_BATCH = 4  # sequences, split evenly across the ranks
SEQ_LEN = 32
# Plain SGD: each update is proportional to its gradient, so float-level
# differences in the gradient reduction stay float-level in the parameters
# (Adam's first steps are about lr * sign(g), which amplifies them).
LR = 0.5
MODEL_SEED = 0
DATA_SEED = 1234
CKPT_STEP = 2  # the FSDP2 run saves a distributed checkpoint after this many steps
CKPT_CONFIG = "paper"

# "paper" is the shipped recipe. Its backward GEMMs cast dY to E5M2 with one
# power-of-two scale per tensor taken over the *local* dY (one rank's half of
# the batch); dividing by a power of two is exact, so the E5M2 codes do not
# depend on how the batch is split.
CONFIGS = {
    "paper": {"recipe": "paper"},
}

# The linear layers of one tiny-LLaMA block, by name relative to the block.
BLOCK_LINEARS = tuple(
    f"{m}.weight"
    for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
)
# Whole-model graphs (one process, DDP) name them in full. lm_head stays in
# high precision everywhere (the recipe's default skip list).
TINY_LAYERS = preset("tiny").n_layers


def model_linears(n_layers: int = TINY_LAYERS) -> tuple[str, ...]:
    """The quantized weights of a whole-model graph of the tiny LLaMA with `n_layers` blocks."""
    return tuple(f"layers.{i}.{name}" for i in range(n_layers) for name in BLOCK_LINEARS)


MODEL_LINEARS = model_linears()


def global_batch() -> torch.Tensor:
    """The fixed global batch, LongTensor [GLOBAL_BATCH, SEQ_LEN + 1] of bytes, used at every step."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    return torch.randint(0, 256, (GLOBAL_BATCH, SEQ_LEN + 1), generator=gen)


def build_model(n_layers: int = TINY_LAYERS) -> Llama:
    # float64: FP4 rounding is a step function, so a float32 summation-order
    # difference (the all-reduce sums in another order than one process's GEMM)
    # can flip a code next to a threshold and move the curve chaotically; in
    # float64 such differences are ~1e-16 and the comparison means something.
    torch.manual_seed(MODEL_SEED)
    return Llama(dataclasses.replace(preset("tiny"), n_layers=n_layers)).double()


def quantized_report(tag: str, expected) -> dict:
    """Summarise fp4compile.reports(); fail unless exactly the `expected` weights were quantized."""
    reports = fp4compile.reports()
    quantized = sorted({s.weight_name for r in reports for s in r.quantized})
    summary = {"graphs": len(reports), "quantized": quantized, "summaries": [r.summary() for r in reports]}
    assert quantized == sorted(expected), f"[{tag}] expected {sorted(expected)} quantized, got {summary}"
    return summary


def check_product_backend(tag: str, backend: str, code: list[str]) -> dict:
    """With backend "fp4": the CPU lowering ran on every quantized site, and the code holds the quantization.

    `code` is Inductor's generated Python for every graph compiled during the
    run (`run_and_get_code`). A compile that silently fell back to the plain
    model would have no OCC thresholds and no E5M2 cast in it.
    """
    if backend != "fp4":
        return {}
    from fp4compile.lowering.cpu import LOWERING_NAME

    lowerings = sorted({s.lowering for r in fp4compile.reports() for s in r.quantized})
    found = {
        "modules": len(code),
        "lowerings": lowerings,
        "occ_thresholds": any(occ_thresholds_in_code(text) for text in code),
        "e5m2_cast": any("Float8_e5m2" in text for text in code),
    }
    assert lowerings == [LOWERING_NAME], f"[{tag}] sites lowered as {lowerings}"
    assert found["occ_thresholds"] and found["e5m2_cast"], f"[{tag}] generated code lacks the quantization: {found}"
    return found


def run_and_get_code(backend: str, fn):
    """fn() and, for the Inductor backend, the code Inductor generated meanwhile (else [])."""
    if backend != "fp4":
        return fn(), []
    from torch._inductor.utils import run_and_get_code as inductor_run_and_get_code

    return inductor_run_and_get_code(fn)


def train(compiled, params_module, rank: int, world: int, on_step=None) -> list[float]:
    """SGD on this rank's share of the global batch; returns the global (mean) loss per step."""
    optimizer = torch.optim.SGD(params_module.parameters(), lr=LR)
    share = GLOBAL_BATCH // world
    local = global_batch()[rank * share:(rank + 1) * share]
    losses = []
    for step in range(STEPS):
        logits = compiled(local[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), local[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Every rank holds as many tokens, so the global mean loss is the mean of
        # the ranks' losses: what one process computes on the whole batch. The
        # loss comes out of the forward pass, before any gradient reduction.
        value = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(value)
            value /= world
        losses.append(value.item())
        if on_step is not None:
            on_step(step + 1)
    return losses


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_single(out: Path, backend: str, options: dict, n_layers: int) -> dict:
    fp4compile.reset()
    model = build_model(n_layers)
    compiled = torch.compile(model, backend=backend, options=options)
    losses, code = run_and_get_code(backend, lambda: train(compiled, model, rank=0, world=1))
    torch.save(_params(model), out / "single_params.pt")
    return {"losses": losses, "report": quantized_report("single", model_linears(n_layers)),
            "inductor": check_product_backend("single", backend, code)}


def run_ddp(out: Path, backend: str, options: dict, rank: int, world: int, n_layers: int, bucket_mb: float) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    fp4compile.reset()
    model = build_model(n_layers)
    # Small gradient buckets, so that dynamo's DDPOptimizer splits the graph at
    # bucket boundaries into several pieces, as it does for any real model, and
    # the pass has to find the weights in each piece. DDPOptimizer requires the
    # first bucket to be no larger than the others and reads its cap from this
    # module constant (1 MiB, more than this whole model). `bucket_mb` 25 (DDP's
    # default) keeps the tiny model in one bucket: one graph, one Inductor compile.
    torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = min(int(bucket_mb * 2**20), 2**20)
    ddp = DDP(model, bucket_cap_mb=bucket_mb)
    # Compile the DDP wrapper (the order PyTorch recommends).
    compiled = torch.compile(ddp, backend=backend, options=options)
    losses, code = run_and_get_code(backend, lambda: train(compiled, ddp, rank, world))
    report = quantized_report(f"ddp rank {rank}", model_linears(n_layers))
    torch.save(_params(model), out / f"ddp_params_rank{rank}.pt")
    return {"losses": losses, "report": report, "inductor": check_product_backend(f"ddp rank {rank}", backend, code)}


def run_fsdp2(
    out: Path, backend: str, options: dict, rank: int, world: int, n_layers: int, save_checkpoint: bool
) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    fp4compile.reset()
    model = build_model(n_layers)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters()), "fully_shard left parameters unsharded"
    compiled = torch.compile(model, backend=backend, options=options)
    full_options = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def checkpoint(step: int) -> None:
        if not save_checkpoint or step != CKPT_STEP:
            return
        # The sharded state dict (DTensors): each rank writes its own shards.
        dcp.save(get_model_state_dict(model), checkpoint_id=str(out / "fsdp_dcp"))
        # The gathered full tensors at the same moment, for the test to compare.
        full = get_model_state_dict(model, options=full_options)
        if rank == 0:
            torch.save(full, out / "fsdp_full_at_ckpt.pt")

    losses, code = run_and_get_code(backend, lambda: train(compiled, model, rank, world, on_step=checkpoint))
    # Under FSDP2 the root forward's loop over the blocks breaks the graph at
    # every FSDP module (dynamo skips FSDP2's hooks, and a graph break inside a
    # loop makes it run that whole frame eagerly), so what gets compiled is each
    # block's forward: one graph, guarded on the block's code, that both blocks
    # run. Its weight names are relative to the block. The root's own matmul
    # (lm_head) runs eagerly: in high precision, as the recipe's skip list
    # wants here, but whatever the recipe says (see docs/distributed.md).
    report = quantized_report(f"fsdp2 rank {rank}", BLOCK_LINEARS)
    # Weights are quantized per output row of the *full* (all-gathered) weight:
    # the captured graph's weight operand has the unsharded [out, in] shape, not
    # the [out / world, in] shard this rank stores.
    block = build_model(1).layers[0]
    shapes = {s.weight_name: tuple(s.weight_shape) for r in fp4compile.reports() for s in r.quantized}
    for name, shape in shapes.items():
        full_shape = tuple(block.get_parameter(name).shape)
        local_shape = tuple(model.layers[0].get_parameter(name).to_local().shape)
        assert shape == full_shape != local_shape, (
            f"[fsdp2 rank {rank}] {name} quantized with shape {shape}; full {full_shape}, local shard {local_shape}"
        )
    full = get_model_state_dict(model, options=full_options)
    if rank == 0:
        torch.save(full, out / "fsdp_params.pt")
    return {"losses": losses, "report": report, "quantized_weight_shapes": {k: list(v) for k, v in shapes.items()},
            "inductor": check_product_backend(f"fsdp2 rank {rank}", backend, code)}


def compare(out: Path, n_layers: int) -> dict:
    """How far each distributed run is from one process: the figures the test bounds.

    Per config and mode: the largest relative difference of the loss curve from
    one process's, the same at the first step (the forward only), and the
    largest relative norm difference of a tensor's update (final - initial)
    from one process's; plus how far the FP4 curve is from the high-precision one.
    """
    initial = build_model(n_layers).state_dict()
    high_precision = torch.tensor(json.loads((out / "high_precision.json").read_text())["losses"], dtype=torch.float64)
    figures = {}
    for config in CONFIGS:
        if not (out / config / "single.json").exists():
            continue
        single = json.loads((out / config / "single.json").read_text())
        ref = torch.tensor(single["losses"], dtype=torch.float64)
        single_params = torch.load(out / config / "single_params.pt")
        rank0 = json.loads((out / config / "dist_rank0.json").read_text())
        figures[config] = {"fp4_vs_high_precision_loss_rel": ((ref - high_precision).abs() / ref).max().item()}
        for mode, params_file in (("ddp", "ddp_params_rank0.pt"), ("fsdp2", "fsdp_params.pt")):
            if mode not in rank0:  # a run with --modes leaving it out
                continue
            losses = torch.tensor(rank0[mode]["losses"], dtype=torch.float64)
            params = torch.load(out / config / params_file)
            updates = {
                name: ((params[name] - initial[name]) - (final - initial[name])).norm().item()
                / (final - initial[name]).norm().clamp_min(1e-12).item()
                for name, final in single_params.items()
            }
            worst = max(updates, key=updates.get)
            figures[config][mode] = {
                "loss_rel_max": ((losses - ref).abs() / ref).max().item(),
                "first_loss_rel": abs(losses[0] - ref[0]).item() / ref[0].item(),
                "update_rel_max": updates[worst],
                "update_rel_max_tensor": worst,
                "seconds": rank0["seconds"][mode],
                "graphs": rank0[mode]["report"]["graphs"],
            }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["single", "dist", "compare"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backend", default="fp4_aot_eager")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--layers", type=int, default=TINY_LAYERS, help="transformer blocks of the tiny LLaMA")
    parser.add_argument("--ddp-bucket-mb", type=float, default=0.1,
                        help="DDP gradient bucket size; 0.1 splits the tiny model's graph into several pieces")
    parser.add_argument("--no-checkpoint", action="store_true", help="no distributed checkpoint in the FSDP2 run")
    parser.add_argument("--modes", default="ddp,fsdp2", help="dist: the wrappers to run, of ddp,fsdp2 (default: both)")
    parser.add_argument("--json", type=Path, default=None, help="compare: also write the figures here")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or not set(modes) <= {"ddp", "fsdp2"}:
        parser.error(f"--modes takes ddp and/or fsdp2, got {args.modes!r}")
    if args.mode == "compare":
        figures = compare(args.out, args.layers)
        print(json.dumps(figures, indent=1))
        if args.json is not None:
            args.json.write_text(json.dumps(figures, indent=1) + "\n")
        return
    # One thread per process: two ranks share two cores, and the one-process
    # reference uses the same GEMM threading as each rank.
    torch.set_num_threads(1)

    if args.mode == "single":
        for name in args.configs:
            out = args.out / name
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            result = run_single(out, args.backend, CONFIGS[name], args.layers)
            result["seconds"] = time.perf_counter() - t0
            (out / "single.json").write_text(json.dumps(result, indent=1))
        # Control: the same training uncompiled, in high precision. The FP4 curves must
        # be measurably apart from it, or comparing curves could not tell a run
        # that silently fell back to high precision from one that did not.
        plain = build_model(args.layers)
        control = {"losses": train(plain, plain, rank=0, world=1)}
        (args.out / "high_precision.json").write_text(json.dumps(control, indent=1))
        return

    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert GLOBAL_BATCH % world == 0
    try:
        for name in args.configs:
            out = args.out / name
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint = name == CKPT_CONFIG and not args.no_checkpoint
            runners = {
                "ddp": lambda: run_ddp(out, args.backend, CONFIGS[name], rank, world, args.layers,
                                       args.ddp_bucket_mb),
                "fsdp2": lambda: run_fsdp2(out, args.backend, CONFIGS[name], rank, world, args.layers,
                                           save_checkpoint),
            }
            result = {"world": world, "seconds": {}}
            for mode in (m for m in runners if m in modes):  # DDP first, whatever the order in --modes
                t0 = time.perf_counter()
                result[mode] = runners[mode]()
                dist.barrier()
                result["seconds"][mode] = time.perf_counter() - t0
            (out / f"dist_rank{rank}.json").write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
