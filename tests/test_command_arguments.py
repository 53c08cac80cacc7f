"""The management commands' arguments (an outside review's findings): an integer flag is
bounded to what the code and PostgreSQL take, free text is printable, storable text, a reason
that must be written is written, a name is a name. Each refusal is argparse's error naming the
flag (exit 2 from the command line; CommandError "Error: argument ..." through call_command) or
a CommandError naming it, never a traceback, and nothing is written before it."""

import argparse
import re
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command, load_command_class
from django.core.management.base import CommandError
from django.utils import timezone

from cutover.models import BackfillRun, OperatorAudit, PhaseAudit, PhaseState
from gateway.commands import (
    PG_INTEGER_MAX,
    ascii_word,
    bounded_int,
    positive_int,
    reason_text,
    written_reason,
)
from gateway.models import ApiClient
from onchain.inbox import notification_receive
from onchain.management.commands.onchain import MAX_POLL_HOURS
from onchain.models import CircleNotification, DepositAddress
from onchain.sandbox import CircleSandbox
from tests.cutover.factories import database_url, legacy_user, phase_set
from tests.test_configuration import manage

ADDRESS = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # EIP-55's first test vector
COMMITS = pytest.mark.django_db(transaction=True)
CUSTODY_OPEN = ("cutover", "custody", "open", "--currency", "USDC", "--reported", "0")
ADDRESS_REMOVE = ("onchain", "address", "remove", "--address", ADDRESS, "--chain", "ETH")


def command(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def refused_by_argparse(flag: str, *args: str) -> str:
    """The command's refusal through call_command: argparse's error naming `flag`."""
    with pytest.raises(CommandError) as refused:
        command(*args)
    message = str(refused.value)
    assert message.startswith(f"Error: argument {flag}: "), message
    assert "\n" not in message
    return message


@pytest.fixture
def circle(settings):
    with CircleSandbox() as running:
        settings.CIRCLE_API_BASE_URL = running.base_url
        settings.CIRCLE_API_KEY = "sandbox-key"
        yield running


def deliver(circle, transfer_id: str, *, address: str = ADDRESS, wallet_id=None) -> str:
    """A completed deposit notified by Circle (to another wallet: refused); its notification id."""
    body = CircleSandbox.transfer_notification(
        transfer_id=transfer_id,
        address=address,
        amount="25.50",
        **({"wallet_id": wallet_id} if wallet_id else {}),
    )
    notification_receive(body=body, signature=circle.sign(body), key_id=circle.key_id)
    return CircleNotification.objects.get(transfer_id=transfer_id).notification_id


def inbox() -> list[tuple]:
    return list(
        CircleNotification.objects.order_by("id").values_list(
            "notification_id", "status", "attempts", "error"
        )
    )


# The argument types ------------------------------------------------------------------------


def test_a_bounded_int_takes_its_range_in_ascii_digits_only():
    port = bounded_int(1, 65_535)
    assert (port("1"), port("65535"), port("08099")) == (1, 65_535, 8099)
    refused = ("0", "65536", "-1", "+5", "1_000", " 5", "\u0665", "5.0", "", "9" * 5000, "\udce9")
    for value in refused:
        with pytest.raises(argparse.ArgumentTypeError, match=r"from 1 to 65,535"):
            port(value)
    assert positive_int(str(PG_INTEGER_MAX)) == PG_INTEGER_MAX
    with pytest.raises(argparse.ArgumentTypeError, match="invalid positive_int value: '0'"):
        positive_int("0")


def test_text_types_refuse_what_postgresql_cannot_store_and_control_characters():
    assert reason_text("café: ticket #42, l'équipe") == "café: ticket #42, l'équipe"
    assert reason_text("") == ""  # whether a reason is needed is the command's to say
    for value, shown in (
        ("typo\udce9", "byte 0xe9 (not UTF-8) at character 5"),
        ("\udcff\udcfe", "byte 0xff (not UTF-8) at character 1"),
        ("a\x00b", r"'\x00' at character 2"),
        ("a\tb", r"'\t' at character 2"),
        ("line\nline", r"'\n' at character 5"),
        ("lone \ud800", r"'\ud800' at character 6"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"holds {shown}; ")):
            reason_text(value)
    with pytest.raises(argparse.ArgumentTypeError, match="1,001 characters, at most 1,000"):
        reason_text("x" * 1001)
    name = ascii_word(100)
    assert name("payments-eu_2") == "payments-eu_2"
    for value in ("", " ", "a b", "a\tb", "é", "x" * 101, "x\udce9", "a\x00"):
        with pytest.raises(argparse.ArgumentTypeError, match="1 to 100 printable ASCII"):
            name(value)


def test_a_reason_must_say_something():
    assert written_reason("onboarding", "adding a deposit address") == "onboarding"
    for blank in ("", " ", "   "):
        with pytest.raises(CommandError, match=r"^adding a deposit address needs a written"):
            written_reason(blank, "adding a deposit address")


# 1. Integer flags are bounded ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "args", "range_"),
    [
        ("--hours", ("onchain", "poll", "--hours", "9" * 26), "1 to 8,784"),
        ("--hours", ("onchain", "poll", "--hours", "8785"), "1 to 8,784"),
        ("--port", ("onchain", "sandbox", "--port", "99999"), "1 to 65,535"),
        ("--port", ("onchain", "sandbox", "--port", "0"), "1 to 65,535"),
        ("--port", ("treasury", "sandbox", "--port", "65536"), "1 to 65,535"),
        ("--clients", ("bench", "posting", "--clients", "4", "9" * 26), "1 to 1,000"),
        ("--senders", ("bench", "webhooks", "--senders", "1001"), "1 to 1,000"),
        ("--seconds", ("bench", "reads", "--seconds", "9" * 26), "1 to 86,400"),
        ("--rps", ("bench", "backfill", "--rps", "9" * 26), "1 to 100,000"),
        ("--old-users", ("bench", "backfill", "--old-users", "-1"), "0 to 2,147,483,647"),
        ("--workers", ("bench", "reconcile", "--workers", "1", "65"), "1 to 64"),
        ("--users", ("bench", "gates", "--users", "3000000000"), "1 to 2,147,483,647"),
        ("--workers", ("rehearse", "--workers", "65"), "1 to 64"),
        ("--chunk-size", ("cutover", "backfill", "--chunk-size", "3000000000"), "2,147,483,647"),
        ("--range-users", ("cutover", "backfill", "--range-users", "3000000000"), "2,147,483,647"),
        ("--helpers", ("cutover", "backfill", "--helpers", "1001"), "0 to 1,000"),
        ("--limit", ("onchain", "send", "--limit", "3000000000"), "1 to 2,147,483,647"),
        ("withdrawal", ("onchain", "resend", str(2**63)), "9,223,372,036,854,775,807"),
    ],
)
@pytest.mark.django_db
def test_an_integer_flag_out_of_its_range_is_refused_naming_it(flag, args, range_):
    message = refused_by_argparse(flag, *args)
    assert range_ in message
    assert not BackfillRun.objects.exists()


@pytest.mark.django_db
def test_the_bounds_themselves_are_taken():
    poll = parser("onchain").parse_args(["poll", "--hours", str(MAX_POLL_HOURS)])
    assert poll.hours == MAX_POLL_HOURS
    # ... and a look-back that long is a time (the overflow was timedelta's).
    assert timezone.now() - timedelta(hours=poll.hours) > timezone.now() - timedelta(days=367)
    backfill = parser("cutover").parse_args(["backfill", "--chunk-size", str(PG_INTEGER_MAX)])
    assert backfill.chunk_size == PG_INTEGER_MAX
    assert parser("onchain").parse_args(["sandbox", "--port", "65535"]).port == 65_535


def parser(name: str):
    return load_command_class(name, name).create_parser("manage.py", name)


@COMMITS
def test_chunk_size_beyond_postgresql_s_integer_is_refused_before_a_run_opens():
    legacy_user("5")
    url = database_url()
    result = manage("cutover", "backfill", "--chunk-size", "3000000000", DATABASE_URL=url)
    assert result.returncode == 2, result.stderr
    assert "argument --chunk-size: invalid positive_int value: '3000000000'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not BackfillRun.objects.exists()


@pytest.mark.parametrize(
    "args",
    [
        ("onchain", "poll", "--hours", "9" * 26),
        ("onchain", "sandbox", "--port", "99999"),
        ("bench", "posting", "--clients", "9" * 26),
    ],
)
def test_from_the_command_line_an_out_of_range_integer_exits_2_naming_the_flag(args):
    result = manage(*args)
    assert result.returncode == 2, result.stderr
    assert f"error: argument {args[2]}: invalid positive_int value" in result.stderr
    assert "Traceback" not in result.stderr and "OverflowError" not in result.stderr


# 2. Free text: printable, storable, checked before anything is written ------------------------


@COMMITS
def test_a_replay_reason_that_is_not_utf8_leaves_the_refused_row_as_it_was(circle):
    notification_id = deliver(circle, "t-foreign", wallet_id="999")
    before = inbox()
    assert before[0][1] == "refused"
    with pytest.raises(CommandError, match=r"^Error: argument --reason: holds byte 0xe9"):
        command("onchain", "replay", notification_id, "--reason", "typo\udce9")
    # From the command line, the bytes as a shell passes them.
    result = manage(
        "onchain", "replay", notification_id, "--reason", b"typo\xe9", DATABASE_URL=database_url()
    )
    assert result.returncode == 2, result.stderr
    assert "argument --reason: holds byte 0xe9 (not UTF-8)" in result.stderr
    assert "Traceback" not in result.stderr
    assert inbox() == before  # still refused, no attempt counted, no traceback stored
    assert not OperatorAudit.objects.exists()


@COMMITS
def test_an_address_reason_that_is_not_utf8_leaves_the_parked_deposits_parked(circle):
    phase_set("shadow")
    owner = legacy_user("0")
    deliver(circle, "t-early")
    before = inbox()
    assert before[0][1] == "parked"
    add = ("onchain", "address", "add", "--address", ADDRESS, "--chain", "ETH", "--user")
    with pytest.raises(CommandError, match=r"^Error: argument --reason: holds byte 0xff"):
        command(*add, str(owner), "--reason", "\udcff\udcfe")
    result = manage(*add, str(owner), "--reason", b"\xff\xfe", DATABASE_URL=database_url())
    assert result.returncode == 2, result.stderr
    assert "argument --reason: holds byte 0xff (not UTF-8) at character 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert inbox() == before
    assert not DepositAddress.objects.exists() and not OperatorAudit.objects.exists()


@pytest.mark.parametrize(
    ("flag", "args"),
    [
        ("--name", ("--name", "pay\udce9", "--scopes", "read")),
        ("--reason", ("--name", "payments", "--scopes", "read", "--reason", "typo\udce9")),
        ("--reason", ("--name", "payments", "--scopes", "read", "--reason", "a\x00b")),
    ],
)
@pytest.mark.django_db
def test_a_client_with_unstorable_text_is_refused_and_not_created(flag, args):
    refused_by_argparse(flag, "cutover", "client", *args)
    assert not ApiClient.objects.exists() and not OperatorAudit.objects.exists()


@pytest.mark.parametrize(
    ("flag", "args"),
    [
        ("--reason", ("cutover", "killswitch", "on", "--reason", "stop\udce9")),
        ("--reason", ("cutover", "advance", "--to", "shadow", "--force", "--reason", "x\x00")),
        ("--reason", ("cutover", "rollback", "--reason", "line\nbreak")),
        ("--reason", ("cutover", "archive-legacy", "--reason", "\ud800")),
        ("--source", (*CUSTODY_OPEN, "--source", "circle\udce9", "--reason", "opening")),
        ("--queue", ("cutover", "backfill", "--queue", "q\udce9")),
        ("--reason", ("custody", "open", "--reason", "x\udce9")),
        ("--reason", ("onchain", "resend", "1", "--reason", "x\udce9")),
        ("--reason", ("onchain", "cancel", "1", "--reason", "x\udce9")),
        ("--reason", (*ADDRESS_REMOVE, "--reason", "x\udce9")),
        ("notification_id", ("onchain", "replay", "n\udce9")),
        ("--subscriber", ("onchain", "sandbox", "--subscriber", "http://h/\udce9")),
        ("--callback", ("treasury", "sandbox", "--callback", "http://h/\udce9")),
        ("--reuse", ("bench", "reconcile", "--reuse", "bench_\udce9")),
    ],
)
@pytest.mark.django_db
def test_unstorable_text_in_any_command_is_refused_naming_the_flag(flag, args):
    before = written()
    refused_by_argparse(flag, *args)
    assert written() == before


def written() -> tuple:
    """What a refused control must leave as it was: the phase, the kill switch, the audits."""
    state = PhaseState.objects.get(pk=1)
    return (
        state.phase,
        state.kill_switch,
        PhaseAudit.objects.count(),
        OperatorAudit.objects.count(),
        BackfillRun.objects.count(),
        ApiClient.objects.count(),
    )


# 3. A reason is written, a name is a name --------------------------------------------------


@pytest.mark.parametrize("reason", ["", " ", "   "])
@pytest.mark.django_db
def test_an_address_change_needs_a_written_reason_as_the_kill_switch_does(reason):
    owner = legacy_user("0")
    add = ("onchain", "address", "add", "--address", ADDRESS, "--chain", "ETH")
    with pytest.raises(CommandError, match=r"^adding a deposit address needs a written --reason"):
        command(*add, "--user", str(owner), "--reason", reason)
    assert not DepositAddress.objects.exists() and not OperatorAudit.objects.exists()

    command(*add, "--user", str(owner), "--reason", "onboarding")
    remove = ("onchain", "address", "remove", "--address", ADDRESS, "--chain", "ETH")
    with pytest.raises(CommandError, match=r"^removing a deposit address needs a written --reason"):
        command(*remove, "--reason", reason)
    assert DepositAddress.objects.count() == 1
    assert list(OperatorAudit.objects.values_list("action", "reason")) == [
        ("deposit_address.add", "onboarding")
    ]
    # The kill switch, the model followed: the same words, a CommandError, nothing changed.
    with pytest.raises(CommandError, match=r"^the kill switch needs a written --reason"):
        command("cutover", "killswitch", "on", "--reason", reason)
    assert PhaseState.objects.get(pk=1).kill_switch is False


@pytest.mark.parametrize(
    "name",
    ["", " ", "pay\tments", "pay ments", "x" * 101, "paiement-é"],
)
@pytest.mark.django_db
def test_a_client_name_is_1_to_100_printable_ascii_characters(name):
    message = refused_by_argparse("--name", "cutover", "client", "--name", name, "--scopes", "read")
    assert "expected 1 to 100 printable ASCII characters without spaces" in message
    assert not ApiClient.objects.exists() and not OperatorAudit.objects.exists()


@pytest.mark.django_db
def test_a_client_name_of_100_characters_is_taken():
    command("cutover", "client", "--name", "x" * 100, "--scopes", "read", "--json")
    assert ApiClient.objects.get().name == "x" * 100


# 4. --user of `address list` ------------------------------------------------------------------


@pytest.mark.parametrize("user", ["", "abc", " "])
@pytest.mark.django_db
def test_address_list_refuses_a_user_that_is_not_a_uuid_alike(user):
    with pytest.raises(CommandError, match=r"^--user: not a UUID$"):
        command("onchain", "address", "list", "--user", user)


@pytest.mark.django_db
def test_address_list_without_user_lists_everyone():
    owner = legacy_user("0")
    command("onchain", "address", "add", "--address", ADDRESS, "--chain", "ETH", "--user",
            str(owner), "--reason", "onboarding")  # fmt: skip
    assert str(owner) in command("onchain", "address", "list")
    assert str(owner) in command("onchain", "address", "list", "--user", str(owner))


# Help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("cutover", "backfill"),
        ("cutover", "client"),
        ("onchain", "poll"),
        ("onchain", "sandbox"),
        ("treasury", "sandbox"),
        ("bench", "posting"),
        ("bench", "backfill"),
        ("rehearse",),
    ],
)
def test_help_still_prints(args):
    result = manage(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
