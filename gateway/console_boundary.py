"""The admin console's input boundary: what a staff session's browser (or whoever holds one)
puts in a list's filters and search, a form or an action's selection is checked before a view
runs a query with it. Django checks a model form's fields itself; it does not check a changelist
filter's value, nor the ids an action is given, and PostgreSQL refuses what Django passes on:
each was a 500 (found by walking every registered model with hostile input,
tests/test_admin_hostile.py).

- A NUL character or an unpaired surrogate in any query or form value (or name): 400, before the
  view. PostgreSQL stores neither in text.
- An action's `_selected_action` that is not an id of the list's model (not a number, out of
  the column's range, not a UUID): the list again with an error naming the field, nothing done.
"""

from django.contrib import messages
from django.core.exceptions import BadRequest, ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect

from gateway.boundary import unstorable
from gateway.errors import ADMIN_PREFIX

SELECTED = "_selected_action"  # django.contrib.admin.helpers.ACTION_CHECKBOX_NAME


class ConsoleInputBoundary:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith(ADMIN_PREFIX):
            for name, values in (*request.GET.lists(), *request.POST.lists()):
                if unstorable(name) or any(unstorable(value) for value in values):
                    raise BadRequest(f"{name!r} holds a NUL character or an unpaired surrogate")
        return self.get_response(request)

    def process_view(self, request: HttpRequest, view, args, kwargs) -> HttpResponse | None:
        # Django's admin marks each model's views with their ModelAdmin.
        model_admin = getattr(view, "model_admin", None)
        if model_admin is None or request.method != "POST" or SELECTED not in request.POST:
            return None
        key = model_admin.model._meta.pk
        for value in request.POST.getlist(SELECTED):
            try:
                key.run_validators(key.to_python(value))
            except ValidationError:
                messages.error(
                    request,
                    f"{SELECTED}: {value!r} is not the id of a "
                    f"{model_admin.model._meta.verbose_name}; nothing was done.",
                )
                return HttpResponseRedirect(request.get_full_path())
        return None
