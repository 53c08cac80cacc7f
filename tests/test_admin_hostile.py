"""The admin is the operators' console, and an operator's browser (or whoever holds a staff
session) can send it anything: every registered model's list, change, history and delete pages
and every action, given ids that are not ids, NUL bytes and lone surrogates in the search box and
the filters, answer a 4xx or a page with an error message, never a 500, and change nothing."""

from urllib.parse import quote

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.urls import reverse

from config.cockpit_admin import FORMS
from cutover.models import PhaseState
from gateway.commands import REASON_MAX_LENGTH
from ledger.models import Entry
from onchain.models import Withdrawal

pytestmark = pytest.mark.django_db

HOSTILE_IDS = ["abc", "\x00", "1\x00", "1e5", "-1", "99999999999999999999999", "\ud800", ""]
HOSTILE_TEXT = ["%00", "a%00b", "%ED%A0%80", "%FF", "a" * 5000]
MODELS = sorted(admin.site._registry.items(), key=lambda item: item[0]._meta.label)


def _rows_everywhere() -> dict[str, int]:
    """Every table's row count: what a refused request must leave as it was. Not the alerts'
    states (a console page records whether the buffer alert it shows fires, by design), nor
    celery beat's reload marker (its enable/disable actions touch it, also for a well-formed id
    of no task)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT relname FROM pg_stat_user_tables WHERE schemaname = 'public' "
            "AND relname NOT IN ('django_session', 'cutover_alert_states', "
            "'django_celery_beat_periodictasks') ORDER BY relname"
        )
        tables = [row[0] for row in cursor.fetchall()]
        counts = {}
        for table in tables:
            cursor.execute(f'SELECT count(*) FROM "{table}"')
            counts[table] = cursor.fetchone()[0]
    return counts


@pytest.fixture
def console() -> Client:
    client = Client(raise_request_exception=False)
    client.force_login(get_user_model().objects.create_superuser("op", password="a-long-pw-1"))
    return client


def _quoted(text: str) -> str:
    """`text` percent-encoded as a browser would, an unpaired surrogate as its raw UTF-8 bytes
    (which no encoder produces, so nothing but a hostile sender sends)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def _form(fields: dict[str, str]) -> str:
    return "&".join(f"{_quoted(name)}={_quoted(value)}" for name, value in fields.items())


def _changelist(model) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


@pytest.mark.parametrize(("model", "model_admin"), MODELS, ids=[m._meta.label for m, _ in MODELS])
def test_hostile_pages_answer_without_a_server_error(console, model, model_admin):
    url = _changelist(model)
    before = _rows_everywhere()
    pages = [f"{url}?q={text}" for text in HOSTILE_TEXT]
    pages += [f"{url}?{query}" for query in ("id__exact=abc", "id__exact=%00", "o=abc", "p=abc")]
    pages += [f"{url}?{f}=%00" for f in model_admin.get_list_filter(None) if isinstance(f, str)]
    for object_id in HOSTILE_IDS:
        pages += [f"{url}{_quoted(object_id)}/{page}/" for page in ("change", "history", "delete")]
    answers = {page: console.get(page).status_code for page in pages}
    assert {page: code for page, code in answers.items() if code >= 500} == {}
    assert _rows_everywhere() == before


@pytest.mark.parametrize(("model", "model_admin"), MODELS, ids=[m._meta.label for m, _ in MODELS])
def test_hostile_actions_are_refused_and_change_nothing(console, model, model_admin):
    url = _changelist(model)
    actions = [*(model_admin.actions or ()), "delete_selected", "no_such_action"]
    before = _rows_everywhere()
    answers = {}
    for action in actions:
        name = action if isinstance(action, str) else action.__name__
        for selected in HOSTILE_IDS:
            for confirmed in ({}, {"confirm": "yes", "reason": "hostile"}):
                fields = {"action": name, "_selected_action": selected, "index": "0", **confirmed}
                response = console.post(
                    url, _form(fields), content_type="application/x-www-form-urlencoded"
                )
                answers[(name, selected, bool(confirmed))] = response.status_code
    assert {key: code for key, code in answers.items() if code >= 500} == {}
    assert _rows_everywhere() == before


def test_a_selection_that_is_not_an_id_is_named_and_nothing_is_done(console):
    url = _changelist(Withdrawal)
    response = console.post(
        url, {"action": "cancel", "_selected_action": ["12x"], "index": "0"}, follow=True
    )
    assert response.status_code == 200
    shown = [str(message) for message in response.context["messages"]]
    assert shown == ["_selected_action: '12x' is not the id of a withdrawal; nothing was done."]


def test_a_nul_in_a_filter_is_a_bad_request(console):
    assert console.get(_changelist(Entry) + "?currency=US%00D").status_code == 400
    assert console.get(_changelist(Entry) + "?currency=USD").status_code == 200


@pytest.mark.parametrize("name", list(FORMS))
def test_hostile_cockpit_forms_answer_without_a_server_error(console, name):
    """The cockpit's own forms (phase changes, read share, rollback, kill switch): every field
    given what is not a value of it answers a page, never a 500."""
    url = reverse(
        {
            "advance": "cockpit_advance",
            "force": "cockpit_force",
            "reads": "cockpit_reads",
            "rollback": "cockpit_rollback",
            "kill": "cockpit_kill_switch",
        }[name]
    )
    fields = list(FORMS[name]().fields)
    answers = {}
    for field in fields:
        for value in ["abc", "", "-1", "1e999", "x" * 20000, "\x00", "\ud800"]:
            form = {f"{name}-{other}": "shadow" for other in fields}
            form[f"{name}-{field}"] = value
            response = console.post(
                url, _form(form), content_type="application/x-www-form-urlencoded"
            )
            answers[(field, value[:8])] = response.status_code
    assert {key: code for key, code in answers.items() if code >= 500} == {}


def test_a_console_reason_is_at_most_what_the_commands_take(console):
    """An operator's reason in the console is at most REASON_MAX_LENGTH characters, as the
    commands' --reason: a longer one is refused on the form, the switch left as it was."""
    url = reverse("cockpit_kill_switch")
    longest = {"kill-intent": "engage", "kill-reason": "x" * REASON_MAX_LENGTH}
    page = console.post(url, {**longest, "kill-reason": "x" * (REASON_MAX_LENGTH + 1)})
    assert page.status_code == 400
    assert f"at most {REASON_MAX_LENGTH} characters" in page.content.decode()
    assert PhaseState.objects.get().kill_switch is False
    assert console.post(url, longest).status_code in (200, 302)
    assert PhaseState.objects.get().kill_switch is True
