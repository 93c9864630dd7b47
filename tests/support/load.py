"""A load worker process: concurrent request lifecycles against Beam over gRPC.

Why a separate process: "no overspend" must hold for any interleaving of calls from any
number of clients and service replicas. One asyncio loop in the test process would
serialize the clients; several worker processes, each with hundreds of lifecycles in
flight and spreading its calls over every replica, make the interleavings real.

Protocol (stdin/stdout, one JSON document per line):
  parent -> worker  a list of plans (see ``Plan``), run concurrently
  worker -> parent  {"ready": true} once its channels are connected
  parent -> worker  "go" (a barrier: every worker starts at once)
  worker -> parent  {"results": [...]} one entry per lifecycle, then exits

Each lifecycle is CheckBalance, then (if approved) the plan's DeductTokens calls, each
with a sequence number, then FinalizeRequest with the cost the stream was charged
(``consumed_grains`` of the last deduct, i.e. what the provider would bill for the tokens
that were delivered; no provider overage). Call ``i`` of a lifecycle goes to replica
``(worker + lifecycle + i) % replicas``, so one request's calls cross replicas.
Every wait is bounded (``call_timeout_seconds``); a failed call is recorded, not retried.

The parent side is ``run_workers``: it starts the workers, waits until all are connected,
releases them together and collects their results.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from beam.balance.v1 import balance_pb2 as pb
from beam.balance.v1 import balance_pb2_grpc as pb_grpc

_COMPLETED = pb.RequestStatus.Value("COMPLETED_SUCCESS")
_KILLED = pb.RequestStatus.Value("KILLED_INSUFFICIENT_BALANCE")


@dataclass
class Plan:
    targets: list[str]
    api_key: str
    customer_id: str
    request_prefix: str
    count: int
    worker: int = 0
    model: str = "cheap"
    estimated_grains: int = 1000
    buffer_multiplier: float = 1.0
    # Completion tokens of each deduct of an approved request, in order.
    deduct_tokens: list[int] = field(default_factory=list)
    call_timeout_seconds: float = 30.0


@dataclass
class Lifecycle:
    request_id: str
    approved: bool = False
    rejection_reason: str = ""
    reserved_grains: int = 0
    deducts: list[dict[str, Any]] = field(default_factory=list)
    killed: bool = False
    charged_reported: int = 0
    finalize: dict[str, Any] | None = None
    error: str = ""


async def _lifecycle(
    stubs: list[pb_grpc.BalanceServiceStub], plan: Plan, index: int, metadata: Any
) -> Lifecycle:
    rid = f"{plan.request_prefix}-w{plan.worker}-{index}"
    out = Lifecycle(rid)
    calls = 0

    def stub() -> pb_grpc.BalanceServiceStub:
        nonlocal calls
        chosen = stubs[(plan.worker + index + calls) % len(stubs)]
        calls += 1
        return chosen

    timeout = plan.call_timeout_seconds
    try:
        check = await stub().CheckBalance(
            pb.CheckBalanceRequest(
                customer_id=plan.customer_id,
                request_id=rid,
                estimated_grains=plan.estimated_grains,
                buffer_multiplier=plan.buffer_multiplier,
                metadata=pb.RequestMetadata(model=plan.model),
            ),
            metadata=metadata,
            timeout=timeout,
        )
        out.approved = check.approved
        out.rejection_reason = check.rejection_reason
        out.reserved_grains = check.reserved_grains
        if not check.approved:
            return out
        consumed = 0
        for sequence, tokens in enumerate(plan.deduct_tokens, start=1):
            deduct = await stub().DeductTokens(
                pb.DeductTokensRequest(
                    customer_id=plan.customer_id,
                    request_id=rid,
                    request_token=check.request_token,
                    tokens_consumed=tokens,
                    model=plan.model,
                    is_completion=True,
                    sequence_number=sequence,
                ),
                metadata=metadata,
                timeout=timeout,
            )
            consumed = deduct.consumed_grains
            out.deducts.append(
                {
                    "success": deduct.success,
                    "error_code": deduct.error_code,
                    "consumed_grains": deduct.consumed_grains,
                    "reserved_grains": deduct.reserved_grains,
                    "remaining_balance": deduct.remaining_balance,
                }
            )
            if not deduct.success:
                out.killed = True
                break
        out.charged_reported = consumed
        final = await stub().FinalizeRequest(
            pb.FinalizeRequestRequest(
                customer_id=plan.customer_id,
                request_id=rid,
                status=_KILLED if out.killed else _COMPLETED,
                total_actual_cost_grains=consumed,
                model=plan.model,
                request_token=check.request_token,
            ),
            metadata=metadata,
            timeout=timeout,
        )
        out.finalize = {
            "success": final.success,
            "charged_grains": final.charged_grains,
            "refunded_grains": final.refunded_grains,
            "overage_grains": final.overage_grains,
            "final_balance": final.final_balance,
            "replayed": final.replayed,
        }
    except grpc.aio.AioRpcError as error:
        out.error = f"{error.code().name}: {error.details()}"
    return out


async def run(plans: list[Plan], wait_for_go: Any) -> list[Lifecycle]:
    targets = sorted({t for plan in plans for t in plan.targets})
    channels = {target: grpc.aio.insecure_channel(target) for target in targets}
    try:
        for channel in channels.values():
            await asyncio.wait_for(channel.channel_ready(), timeout=30)
        work = []
        for plan in plans:
            stubs = [pb_grpc.BalanceServiceStub(channels[t]) for t in plan.targets]
            metadata = (("authorization", f"Bearer {plan.api_key}"),)
            work += [(stubs, plan, index, metadata) for index in range(plan.count)]
        await wait_for_go()
        return list(await asyncio.gather(*(_lifecycle(*args) for args in work)))
    finally:
        for channel in channels.values():
            await channel.close()


def run_workers(workers: list[list[Plan]], timeout_seconds: float = 120.0) -> list[Lifecycle]:
    """Start one process per plan list, release them together, return every lifecycle."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "service")])}
    processes = []
    try:
        for plans in workers:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.load"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=root,
                env=env,
                text=True,
            )
            assert process.stdin is not None
            process.stdin.write(json.dumps([asdict(p) for p in plans]) + "\n")
            process.stdin.flush()
            processes.append(process)
        deadline = time.monotonic() + timeout_seconds
        for process in processes:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
            line = process.stdout.readline() if ready else ""
            assert json.loads(line or "{}").get("ready"), f"worker not ready: {line!r}"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        results: list[Lifecycle] = []
        for process in processes:
            out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert process.returncode == 0, f"worker failed with {process.returncode}"
            results += [Lifecycle(**r) for r in json.loads(out)["results"]]
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def main() -> None:
    plans = [Plan(**p) for p in json.loads(sys.stdin.readline())]

    async def wait_for_go() -> None:
        print(json.dumps({"ready": True}), flush=True)
        line = await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), timeout=120)
        if line.strip() != "go":
            raise SystemExit(f"expected 'go', got {line!r}")

    results = asyncio.run(run(plans, wait_for_go))
    print(json.dumps({"results": [asdict(r) for r in results]}), flush=True)


if __name__ == "__main__":
    main()
