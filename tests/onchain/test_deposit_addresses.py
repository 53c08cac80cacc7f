"""Deposit addresses: registered through the service, the `onchain address` command, the API and
the admin; one user per chain and address, EVM compared case-insensitively (EIP-55 accepted and
checked), others exactly; a registration credits the deposits parked for its address, once."""

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from io import StringIO

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, connection, connections, transaction

from cutover.actors import Actor
from cutover.exceptions import OperatorNotPermitted
from cutover.models import BalanceMutation, OperatorAudit
from cutover.operators import api_client_issue
from gateway.exceptions import ApiClientRefused
from onchain.addresses import deposit_address_add, deposit_address_remove
from onchain.chains import address_validate
from onchain.exceptions import AddressInvalid, DepositAddressTaken, DepositAddressUnknown
from onchain.inbox import notification_receive
from onchain.models import CircleNotification, DepositAddress
from onchain.sandbox import CircleSandbox
from tests.cutover.factories import OPERATOR as CLI_OPERATOR
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.onchain.factories import balances

pytestmark = pytest.mark.django_db
# The inbox applies a deposit in a durable transaction wrapped by strict_failure_recorded, which
# must run outside any transaction: the tests that deliver one commit for real.
COMMITS = pytest.mark.django_db(transaction=True)

# EIP-55's own test vectors (https://eips.ethereum.org/EIPS/eip-55).
CHECKSUMMED = [
    "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
    "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
    "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
    "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
]
ADDRESS = CHECKSUMMED[0]
SOLANA = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV"
OPERATOR = Actor("operator")


@pytest.fixture
def circle(settings):
    with CircleSandbox() as running:
        settings.CIRCLE_API_BASE_URL = running.base_url
        settings.CIRCLE_API_KEY = "sandbox-key"
        yield running


@pytest.fixture
def owner():
    user_id = legacy_user("0")
    ledger_balance_set(user_id, "0")
    return user_id


def add(address=ADDRESS, chain="ETH", user_id=None, **kwargs):
    return deposit_address_add(
        address=address,
        chain=chain,
        user_id=user_id or legacy_user("0"),
        actor=kwargs.pop("actor", OPERATOR),
        reason=kwargs.pop("reason", "test"),
        **kwargs,
    )


def deposit(circle, address, transfer_id="t-1", amount="25.50") -> str:
    """Circle notifies a completed deposit to `address`; the inbox's outcome."""
    body = CircleSandbox.transfer_notification(
        notification_type="transfers.completed",
        transfer_id=transfer_id,
        address=address,
        amount=amount,
    )
    return notification_receive(body=body, signature=circle.sign(body), key_id=circle.key_id).status


# The chain's rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("address", CHECKSUMMED)
def test_an_eip55_address_is_accepted_and_stored_in_lower_case(address):
    assert address_validate(chain="ETH", address=address) == address.lower()
    assert address_validate(chain="BASE", address=address.upper().replace("0X", "0x")) == (
        address.lower()
    )


@pytest.mark.parametrize("address", CHECKSUMMED)
def test_a_mixed_case_address_with_a_wrong_checksum_is_refused(address):
    letter = next(i for i, c in enumerate(address) if i > 1 and c.isalpha())
    typo = address[:letter] + address[letter].swapcase() + address[letter + 1 :]
    with pytest.raises(AddressInvalid, match="EIP-55") as refused:
        address_validate(chain="ETH", address=typo)
    assert refused.value.field == "address"


@pytest.mark.parametrize(
    ("chain", "address", "field", "message"),
    [
        ("DOGE", ADDRESS, "chain", "chain must be one of"),
        ("ETH", "0x" + "a" * 39, "address", "40 hexadecimal digits"),
        ("ETH", ADDRESS + "\x00", "address", "NUL"),
        ("SOL", SOLANA + "\x00", "address", "NUL"),
        ("SOL", " " + SOLANA, "address", "without spaces"),
        ("SOL", "x" * 129, "address", "1..128 characters"),
        ("SOL", "", "address", "1..128 characters"),
        ("ETH", None, "address", "1..128 characters"),
    ],
)
def test_a_malformed_address_is_refused_naming_the_field_and_nothing_is_written(
    chain, address, field, message
):
    with pytest.raises(AddressInvalid, match=message) as refused:
        add(address=address, chain=chain)
    assert refused.value.field == field
    assert not DepositAddress.objects.exists() and not OperatorAudit.objects.exists()


# The service ---------------------------------------------------------------------------------


def test_adding_an_address_stores_it_once_audited_and_the_same_again_changes_nothing(owner):
    added = add(address=ADDRESS, user_id=owner, reason="new wallet")
    assert added.created and added.replayed == {}
    row = DepositAddress.objects.get()
    assert (row.address, row.chain, row.user_id, row.currency) == (
        ADDRESS.lower(),
        "ETH",
        owner,
        "USDC",
    )
    audit = OperatorAudit.objects.get()
    assert (audit.action, audit.target, audit.reason) == (
        "deposit_address.add",
        f"deposit_address:ETH:{ADDRESS.lower()}",
        "new wallet",
    )
    assert audit.after == {"user_id": str(owner), "currency": "USDC"}
    again = add(address=ADDRESS.lower(), user_id=owner)
    assert not again.created and again.address.pk == row.pk
    assert DepositAddress.objects.count() == 1 and OperatorAudit.objects.count() == 1


def test_one_user_per_chain_and_address_whatever_the_case(owner):
    add(address=ADDRESS, user_id=owner)
    for variant in (ADDRESS, ADDRESS.lower(), "0x" + ADDRESS[2:].upper()):
        with pytest.raises(DepositAddressTaken, match="registered for another user"):
            add(address=variant)
    # The same EVM address on another chain is its own registration (one key, an account on
    # every EVM chain): registered for whom the operator says.
    elsewhere = add(address=ADDRESS, chain="BASE")
    assert elsewhere.created and elsewhere.address.user_id != owner
    assert DepositAddress.objects.count() == 2


@COMMITS
def test_concurrent_registrations_of_one_address_leave_one_owner():
    users = [legacy_user("0") for _ in range(4)]
    barrier = threading.Barrier(len(users) * 2)

    def register(user_id):
        barrier.wait()
        try:
            return add(address=ADDRESS, user_id=user_id).address.user_id
        except DepositAddressTaken:
            return None
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=len(users) * 2) as pool:
        owners = list(pool.map(register, users * 2))  # each user twice, all at once
    row = DepositAddress.objects.get()
    assert {owner for owner in owners if owner is not None} == {row.user_id}
    assert owners.count(row.user_id) == 2  # its own second request is no change, not refused
    assert OperatorAudit.objects.filter(action="deposit_address.add").count() == 1


def test_other_chains_compare_addresses_exactly(owner):
    add(address=SOLANA, chain="SOL", user_id=owner)
    other = add(address=SOLANA.lower(), chain="SOL")
    assert other.created
    assert set(DepositAddress.objects.values_list("address", flat=True)) == {
        SOLANA,
        SOLANA.lower(),
    }


def test_postgresql_holds_the_lower_case_form_and_the_uniqueness(owner):
    add(address=ADDRESS, user_id=owner)
    for address in (ADDRESS, "0x" + ADDRESS[2:].upper()):  # a raw insert of a case variant
        with pytest.raises(IntegrityError, match="chk_evm_lower_case"), transaction.atomic():
            DepositAddress.objects.create(address=address, chain="ETH", user_id=uuid.uuid4())
    with pytest.raises(IntegrityError, match="uniq_chain_address"), transaction.atomic():
        DepositAddress.objects.create(address=ADDRESS.lower(), chain="ETH", user_id=uuid.uuid4())
    assert DepositAddress.objects.count() == 1


def test_registering_needs_the_permissions():
    clerk = User.objects.create_user("clerk", password="a-long-password-1")
    with pytest.raises(OperatorNotPermitted, match="add_depositaddress"):
        add(actor=Actor.for_user(clerk))
    clerk.user_permissions.add(Permission.objects.get(codename="add_depositaddress"))
    clerk = User.objects.get(pk=clerk.pk)  # permissions are cached on the instance
    # It applies parked money: the replay's permission too.
    with pytest.raises(OperatorNotPermitted, match="change_circlenotification"):
        add(actor=Actor.for_user(clerk))
    clerk.user_permissions.add(Permission.objects.get(codename="change_circlenotification"))
    assert add(actor=Actor.for_user(User.objects.get(pk=clerk.pk))).created
    with pytest.raises(OperatorNotPermitted, match="delete_depositaddress"):
        deposit_address_remove(
            address=ADDRESS, chain="ETH", actor=Actor.for_user(clerk), reason="r"
        )
    assert DepositAddress.objects.count() == 1


@COMMITS
def test_removing_is_audited_and_later_deposits_are_parked(circle, owner):
    phase_set("shadow")
    add(address=ADDRESS, user_id=owner)
    removed = deposit_address_remove(
        address=ADDRESS.upper().replace("0X", "0x"), chain="ETH", actor=OPERATOR, reason="closed"
    )
    assert removed.user_id == owner and not DepositAddress.objects.exists()
    audit = OperatorAudit.objects.get(action="deposit_address.remove")
    assert (audit.before, audit.after, audit.reason) == (
        {"user_id": str(owner), "currency": "USDC"},
        {},
        "closed",
    )
    with pytest.raises(DepositAddressUnknown, match="no deposit address"):
        deposit_address_remove(address=ADDRESS, chain="ETH", actor=OPERATOR, reason="again")
    assert deposit(circle, ADDRESS) == "parked"
    assert balances(owner) == (Decimal(0), Decimal(0))


@COMMITS
def test_a_deposit_names_the_address_in_any_case_and_credits_its_user(circle, owner):
    phase_set("shadow")
    add(address=ADDRESS.lower(), user_id=owner)
    assert deposit(circle, ADDRESS, transfer_id="t-checksummed") == "processed"
    assert deposit(circle, ADDRESS.lower(), transfer_id="t-lower") == "processed"
    assert balances(owner) == (Decimal("51"), Decimal("51"))


@COMMITS
def test_registering_credits_the_deposits_parked_for_the_address_once(circle, owner):
    phase_set("shadow")
    assert deposit(circle, ADDRESS, transfer_id="t-early") == "parked"
    assert deposit(circle, CHECKSUMMED[1], transfer_id="t-someone-else") == "parked"
    early = CircleNotification.objects.get(transfer_id="t-early").notification_id
    added = add(address=ADDRESS.lower(), user_id=owner, reason="user opened a wallet")
    assert added.replayed == {early: "processed"}
    assert balances(owner) == (Decimal("25.5"), Decimal("25.5"))
    assert BalanceMutation.objects.filter(reference="circle:transfer:t-early").count() == 1
    replay = OperatorAudit.objects.get(action="notification.replay")
    assert replay.target == f"notification:{early}" and "user opened a wallet" in replay.reason
    assert CircleNotification.objects.get(transfer_id="t-someone-else").status == "parked"
    again = add(address=ADDRESS, user_id=owner)  # nothing left parked for it: nothing twice
    assert not again.created and again.replayed == {}
    assert balances(owner) == (Decimal("25.5"), Decimal("25.5"))


# The command ---------------------------------------------------------------------------------


def command(*args) -> str:
    out = StringIO()
    call_command("onchain", "address", *args, stdout=out)
    return out.getvalue()


@COMMITS
def test_the_command_adds_lists_and_removes(circle, owner):
    phase_set("shadow")
    deposit(circle, ADDRESS)
    out = command(
        "add", "--address", ADDRESS, "--chain", "ETH", "--user", str(owner), "--reason", "r"
    )
    assert f"ETH:{ADDRESS.lower()} registered for {owner}" in out
    assert "parked notification" in out and ": processed" in out
    assert balances(owner) == (Decimal("25.5"), Decimal("25.5"))
    listed = json.loads(command("list", "--user", str(owner), "--json"))
    assert [(row["chain"], row["address"]) for row in listed] == [("ETH", ADDRESS.lower())]
    assert command("list", "--user", str(uuid.uuid4()), "--json").strip() == "[]"
    out = command("remove", "--address", ADDRESS, "--chain", "ETH", "--reason", "closed")
    assert "removed" in out and not DepositAddress.objects.exists()


def test_the_command_s_json_is_the_registration_the_operator_made(owner):
    add_args = ["--address", ADDRESS, "--chain", "ETH", "--user", str(owner)]
    added = json.loads(command("add", *add_args, "--reason", "onboarding", "--json"))
    created_at = added.pop("created_at")
    assert added == {
        "chain": "ETH",
        "address": ADDRESS.lower(),
        "user_id": str(owner),
        "currency": "USDC",
        "created": True,
        "replayed": {},
    }
    assert created_at == DepositAddress.objects.get().created_at.isoformat()
    again = json.loads(command("add", *add_args, "--reason", "again", "--json"))
    assert again["created"] is False
    removed = json.loads(
        command("remove", "--address", ADDRESS, "--chain", "ETH", "--reason", "closed", "--json")
    )
    assert (removed["address"], removed["removed"]) == (ADDRESS.lower(), True)
    assert not DepositAddress.objects.exists()
    assert list(OperatorAudit.objects.order_by("id").values_list("action", "actor")) == [
        ("deposit_address.add", CLI_OPERATOR),
        ("deposit_address.remove", CLI_OPERATOR),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--address", ADDRESS + "\x00", "--chain", "ETH", "--user", "U"], "--user: not a UUID"),
        (["--address", ADDRESS + "\x00", "--chain", "ETH"], "--address: .*NUL"),
        (["--address", ADDRESS, "--chain", "DOGE"], "--chain: chain must be one of"),
        (["--address", ADDRESS, "--chain", "ETH", "--currency", "EURC"], "--currency: "),
    ],
)
def test_the_command_names_the_flag_it_refuses(owner, args, message):
    if "--user" not in args:
        args = [*args, "--user", str(owner)]
    with pytest.raises(CommandError, match=message):
        command("add", *args, "--reason", "r")
    assert not DepositAddress.objects.exists()


def test_the_command_refuses_another_users_address_and_an_unknown_removal(owner):
    add(address=ADDRESS, user_id=owner)
    with pytest.raises(CommandError, match="registered for another user"):
        command("add", "--address", ADDRESS, "--chain", "ETH", "--user", str(uuid.uuid4()),
                "--reason", "r")  # fmt: skip
    with pytest.raises(CommandError, match="no deposit address"):
        command("remove", "--address", ADDRESS, "--chain", "BASE", "--reason", "r")


# The API -------------------------------------------------------------------------------------


@pytest.fixture
def registrar():
    return api_client_issue(name="onboarding", scopes=["addresses"], actor=OPERATOR)[1]


def post(client, user_id, token, body, key="k-1"):
    response = client.post(
        f"/api/v1/users/{user_id}/deposit-addresses",
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
    )
    return response.status_code, response.json()


@COMMITS
def test_a_privileged_client_registers_an_address_and_its_parked_deposit_is_credited(
    client, circle, owner, registrar
):
    phase_set("shadow")
    deposit(circle, ADDRESS)
    body = {"address": ADDRESS, "chain": "ETH"}
    status, answer = post(client, owner, registrar, body)
    assert status == 201
    assert (answer["address"], answer["chain"], answer["user_id"], answer["currency"]) == (
        ADDRESS.lower(),
        "ETH",
        str(owner),
        "USDC",
    )
    assert list(answer["replayed"].values()) == ["processed"]
    assert post(client, owner, registrar, body) == (status, answer)  # the same key: replayed
    status, again = post(client, owner, registrar, body, key="k-2")  # registered already
    assert status == 200 and again["replayed"] == {}
    assert balances(owner) == (Decimal("25.5"), Decimal("25.5"))
    audit = OperatorAudit.objects.get(action="deposit_address.add")
    assert audit.actor == "api:onboarding"
    status, taken = post(client, uuid.uuid4(), registrar, body, key="k-3")
    assert status == 409 and taken["error"]["code"] == "address_taken"
    assert taken["error"]["field"] == "address"
    response = client.get(
        f"/api/v1/users/{owner}/deposit-addresses",
        headers={"Authorization": f"Bearer {registrar}"},
    )
    assert response.status_code == 200
    assert [row["address"] for row in response.json()["deposit_addresses"]] == [ADDRESS.lower()]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"address": ADDRESS + "\x00", "chain": "ETH"}, "address"),
        ({"address": "x" * 500, "chain": "SOL"}, "address"),
        ({"address": ADDRESS[:-1] + ADDRESS[-1].swapcase(), "chain": "ETH"}, "address"),
        ({"address": ADDRESS, "chain": "DOGE"}, "chain"),
        ({"address": ADDRESS, "chain": "ETH", "currency": "EURC"}, "currency"),
        ({"chain": "ETH"}, "address"),
    ],
)
def test_the_api_refuses_a_bad_field_with_400_and_writes_nothing(
    client, owner, registrar, body, field
):
    status, answer = post(client, owner, registrar, body)
    assert (status, answer["error"]["field"]) == (400, field)
    assert not DepositAddress.objects.exists()
    # Refused before the key was claimed: the same key may carry the corrected request.
    assert post(client, owner, registrar, {"address": ADDRESS, "chain": "ETH"})[0] == 201


def test_the_api_needs_the_addresses_scope_which_a_users_own_client_never_holds(client, owner):
    reader = api_client_issue(name="reader", scopes=["read"], actor=OPERATOR)[1]
    status, answer = post(client, owner, reader, {"address": ADDRESS, "chain": "ETH"})
    assert (status, answer["error"]["scope"]) == (403, "addresses")
    assert not DepositAddress.objects.exists()
    with pytest.raises(ApiClientRefused, match="may not register deposit addresses"):
        api_client_issue(name="app", scopes=["addresses"], user_id=owner, actor=OPERATOR)
    with (
        pytest.raises(IntegrityError, match="user_never_addresses"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(
            "INSERT INTO cutover_api_clients (name, token_sha256, user_id, scopes, active)"
            " VALUES ('app', 'x', %s, ARRAY['addresses'], true)",
            [owner],
        )


# The admin -----------------------------------------------------------------------------------


@COMMITS
def test_the_admin_adds_through_the_service_and_removes_with_a_reason(client, circle, owner):
    phase_set("shadow")
    deposit(circle, ADDRESS)
    admin = User.objects.create_superuser("root", password="a-long-password-1")
    client.force_login(admin)
    form = {"address": ADDRESS, "chain": "ETH", "user_id": str(owner), "currency": "USDC"}
    response = client.post("/admin/onchain/depositaddress/add/", {**form, "reason": "ticket 7"})
    assert response.status_code == 302, response.content.decode()[:2000]
    row = DepositAddress.objects.get()
    assert row.address == ADDRESS.lower()
    assert OperatorAudit.objects.get(action="deposit_address.add").actor == "admin:root"
    assert balances(owner) == (Decimal("25.5"), Decimal("25.5"))  # the parked deposit
    typo = {**form, "address": ADDRESS[:-1] + ADDRESS[-1].swapcase(), "reason": "r"}
    response = client.post("/admin/onchain/depositaddress/add/", typo)
    assert response.status_code == 200 and "EIP-55" in response.content.decode()
    taken = {**form, "user_id": str(uuid.uuid4()), "reason": "r"}
    response = client.post("/admin/onchain/depositaddress/add/", taken)
    assert response.status_code == 200 and "already exists" in response.content.decode()
    changelist = "/admin/onchain/depositaddress/"
    assert ADDRESS.lower() in client.get(changelist, {"q": ADDRESS}).content.decode()
    action = {"action": "remove", "_selected_action": [row.pk]}
    confirm = client.post(changelist, action)
    assert confirm.status_code == 200 and "reason" in confirm.content.decode()
    client.post(changelist, {**action, "confirmed": "yes", "reason": "wallet closed"})
    assert not DepositAddress.objects.exists()
    assert OperatorAudit.objects.get(action="deposit_address.remove").reason == "wallet closed"
