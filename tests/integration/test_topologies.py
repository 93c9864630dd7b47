"""The whole lifecycle, with exact numbers, on standalone Redis, Sentinel and Cluster.

The same `beam serve` binary is pointed at each topology by configuration only
(BEAM_REDIS_MODE and friends, see tests/support/stack.py) and driven over both REST and
gRPC: the answers must be identical to the grain. On Cluster, every key of a customer
shares one hash tag, so one customer's scripts touch one slot, while different customers
spread over the masters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from redis.cluster import key_slot

from beam.admin.v1 import admin_pb2, admin_pb2_grpc
from beam.balance.v1 import balance_pb2 as pb
from beam.balance.v1 import balance_pb2_grpc as pb_grpc
from beam.constants import customer_keys, holds_seq_key
from tests.support.rest import Rest, rest_client
from tests.support.stack import ServiceProcess, Stores, Tenant

pytestmark = pytest.mark.topology


@pytest.fixture
async def rest(topology_service: ServiceProcess, topology_tenant: Tenant) -> AsyncIterator[Rest]:
    async with rest_client(topology_service, topology_tenant) as client:
        yield client


@pytest.fixture
async def channel(topology_service: ServiceProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(topology_service.grpc_target) as channel:
        yield channel


async def test_lifecycle_over_rest_with_exact_numbers(rest: Rest) -> None:
    await rest.post("/v1/customers", {"customer_id": "cus", "initial_balance_grains": 100_000_000})
    assert await rest.get("/v1/balance/cus") == {
        "balance": "100000000", "reserved": "0", "available": "100000000",
    }  # fmt: skip
    check = await rest.post("/v1/balance/check", {
        "customer_id": "cus", "request_id": "r1", "estimated_grains": 50_000,
        "buffer_multiplier": 1.2, "metadata": {"model": "gpt-4"},
    })  # fmt: skip
    token = check.pop("request_token")
    assert token.startswith("v1.")
    check.pop("hold_expires_at_unix_ms")
    assert check == {
        "approved": True, "remaining_balance": "99940000", "rejection_reason": "",
        "reserved_grains": "60000", "max_affordable_completion_tokens": "1666666",
        "replayed": False, "granted_completion_tokens": "0",
    }  # fmt: skip
    deduct = await rest.post("/v1/balance/deduct", {
        "customer_id": "cus", "request_id": "r1", "request_token": token,
        "tokens_consumed": 50, "model": "gpt-4", "is_completion": True,
    })  # fmt: skip
    assert deduct == {
        "success": True, "remaining_balance": "99940000", "error_code": "",
        "consumed_grains": "3000", "reserved_grains": "60000",
        "covered_completion_tokens": "1000",
    }  # fmt: skip
    # 1000 more completion tokens = 63000 consumed: the hold grows by 3000.
    grow = await rest.post("/v1/balance/deduct", {
        "customer_id": "cus", "request_id": "r1", "request_token": token,
        "tokens_consumed": 1_000, "is_completion": True, "sequence_number": 2,
    })  # fmt: skip
    assert (grow["consumed_grains"], grow["reserved_grains"], grow["remaining_balance"]) == (
        "63000", "63000", "99937000",
    )  # fmt: skip
    final = await rest.post("/v1/balance/finalize", {
        "customer_id": "cus", "request_id": "r1", "status": "COMPLETED_SUCCESS",
        "actual_prompt_tokens": 234, "actual_completion_tokens": 487,
        "total_actual_cost_grains": 48_700, "model": "gpt-4",
    })  # fmt: skip
    assert final == {
        "success": True, "refunded_grains": "14300", "final_balance": "99951300",
        "charged_grains": "48700", "overage_grains": "0", "replayed": False,
    }  # fmt: skip
    assert await rest.get("/v1/balance/cus") == {
        "balance": "99951300", "reserved": "0", "available": "99951300",
    }  # fmt: skip
    request = await rest.get("/v1/requests/r1")
    assert {k: request[k] for k in ("status", "model", "reserved_grains", "consumed_grains",
                                    "actual_cost_grains", "refunded_grains", "prompt_tokens",
                                    "completion_tokens")} == {
        "status": "completed", "model": "gpt-4", "reserved_grains": "63000",
        "consumed_grains": "63000", "actual_cost_grains": "48700", "refunded_grains": "14300",
        "prompt_tokens": "234", "completion_tokens": "487",
    }  # fmt: skip
    # A stream that runs out of money: 99951300 available, hold of 1 grain at gpt-4 prices.
    small = await rest.post("/v1/customers", {"customer_id": "small",
                                               "initial_balance_grains": 10_000})  # fmt: skip
    assert small["available"] == "10000"
    check = await rest.post("/v1/balance/check", {
        "customer_id": "small", "request_id": "r2", "estimated_grains": 6_000,
        "buffer_multiplier": 1.0, "metadata": {"model": "gpt-4"},
    })  # fmt: skip
    kill = await rest.post("/v1/balance/deduct", {
        "customer_id": "small", "request_id": "r2", "request_token": check["request_token"],
        "tokens_consumed": 200, "is_completion": True, "sequence_number": 1,
    })  # fmt: skip
    # 200 x 60 = 12000 > 10000: the hold takes all 10000 and the stream must stop; the
    # hold pays for 166 of the 200 tokens delivered.
    assert kill == {
        "success": False, "remaining_balance": "0", "error_code": "INSUFFICIENT_BALANCE",
        "consumed_grains": "10000", "reserved_grains": "10000",
        "covered_completion_tokens": "166",
    }  # fmt: skip
    final = await rest.post("/v1/balance/finalize", {
        "customer_id": "small", "request_id": "r2", "status": "KILLED_INSUFFICIENT_BALANCE",
        "actual_completion_tokens": 170,
    })  # fmt: skip
    assert (final["charged_grains"], final["refunded_grains"], final["final_balance"]) == (
        "10200", "0", "-200",
    )  # fmt: skip
    assert final["overage_grains"] == "200"


async def test_lifecycle_over_grpc_gives_the_same_numbers(
    channel: grpc.aio.Channel, topology_tenant: Tenant
) -> None:
    metadata = (("authorization", f"Bearer {topology_tenant.keys['admin']}"),)
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    created = await admin.CreateCustomer(
        admin_pb2.CreateCustomerRequest(customer_id="cus", initial_balance_grains=100_000_000),
        metadata=metadata,
    )
    assert (created.balance, created.available) == (100_000_000, 100_000_000)
    stub = pb_grpc.BalanceServiceStub(channel)
    check = await stub.CheckBalance(
        pb.CheckBalanceRequest(
            customer_id="cus", request_id="r1", estimated_grains=50_000, buffer_multiplier=1.2,
            metadata=pb.RequestMetadata(model="gpt-4"),
        ),
        metadata=metadata,
    )  # fmt: skip
    assert (check.approved, check.reserved_grains, check.remaining_balance) == (
        True, 60_000, 99_940_000,
    )  # fmt: skip
    assert check.max_affordable_completion_tokens == 1_666_666
    deduct = await stub.DeductTokens(
        pb.DeductTokensRequest(
            customer_id="cus", request_id="r1", request_token=check.request_token,
            tokens_consumed=50, model="gpt-4", is_completion=True,
        ),
        metadata=metadata,
    )  # fmt: skip
    assert (deduct.success, deduct.consumed_grains, deduct.remaining_balance) == (
        True, 3_000, 99_940_000,
    )  # fmt: skip
    final = await stub.FinalizeRequest(
        pb.FinalizeRequestRequest(
            customer_id="cus", request_id="r1", status=pb.COMPLETED_SUCCESS,
            actual_prompt_tokens=234, actual_completion_tokens=487,
            total_actual_cost_grains=48_700, model="gpt-4",
        ),
        metadata=metadata,
    )  # fmt: skip
    assert (final.success, final.refunded_grains, final.final_balance, final.charged_grains) == (
        True, 11_300, 99_951_300, 48_700,
    )  # fmt: skip
    balance = await stub.GetBalance(pb.GetBalanceRequest(customer_id="cus"), metadata=metadata)
    assert (balance.balance, balance.reserved, balance.available) == (99_951_300, 0, 99_951_300)
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.CheckBalance(
            pb.CheckBalanceRequest(
                customer_id="cus", request_id="r2", estimated_grains=10, buffer_multiplier=1.0,
                metadata=pb.RequestMetadata(model="no-such-model"),
            ),
            metadata=metadata,
        )  # fmt: skip
    assert unknown.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert ("beam-reason", "UNKNOWN_MODEL") in tuple(unknown.value.trailing_metadata() or ())
    report = await admin.VerifyIntegrity(admin_pb2.VerifyIntegrityRequest(), metadata=metadata)
    assert (report.ok, report.customers_checked) == (True, 1)


def _customer_per_master(stores: Stores, tenant: str) -> dict[int, str]:
    """For each master, a customer id whose hash tag falls in that master's slots."""
    owners: dict[int, tuple[int, int]] = {}
    with stores.redis.nodes[0].client() as client:
        for first, last, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            owners[int(master[1])] = (int(first), int(last))
    chosen: dict[int, str] = {}
    for index in range(1_000):  # bounded; each id lands on a given master with p ~ 1/3
        customer_id = f"spread-{index}"
        slot = key_slot(customer_keys(tenant, customer_id)[0].encode())
        for port, (first, last) in owners.items():
            if first <= slot <= last and port not in chosen:
                chosen[port] = customer_id
        if len(chosen) == len(owners):
            break
    return chosen


async def test_customers_spread_over_cluster_masters_and_each_stays_on_one_slot(
    topology_stores: Stores, topology_tenant: Tenant, rest: Rest
) -> None:
    if topology_stores.topology != "cluster":
        pytest.skip("key placement across masters is a Cluster property")
    chosen = _customer_per_master(topology_stores, topology_tenant.name)
    assert len(chosen) == 3
    for customer_id in chosen.values():
        await rest.post("/v1/customers", {"customer_id": customer_id,
                                           "initial_balance_grains": 1_000})  # fmt: skip
        check = await rest.post("/v1/balance/check", {
            "customer_id": customer_id, "request_id": "open", "estimated_grains": 100,
            "buffer_multiplier": 1.0,
        })  # fmt: skip
        assert check["remaining_balance"] == "900"
    for port, customer_id in chosen.items():
        keys = customer_keys(topology_tenant.name, customer_id, "open")
        slots = {key_slot(k.encode()) for k in keys}
        assert len(slots) == 1  # account, hold sets, hold, done marker: one slot
        (slot,) = slots
        counts = {}
        for node in topology_stores.redis.nodes:
            with node.client() as client:
                counts[node.port] = client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
        # Account hash, open-holds set, the hold itself and the holds counter (hseq) live
        # on the owner only.
        assert counts == {n.port: 4 if n.port == port else 0 for n in topology_stores.redis.nodes}
        seq = holds_seq_key(topology_tenant.name, customer_id)
        assert key_slot(seq.encode()) == slot
    assert (await rest.post("/v1/admin/verify-integrity", {}))["ok"] is True
