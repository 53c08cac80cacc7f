"""Who performs an operator action: an admin user (Django permissions) or a shell operator
(the command line is trusted like a superuser; the OS user is recorded)."""

import getpass
from dataclasses import dataclass

from cutover.exceptions import OperatorNotPermitted


@dataclass(frozen=True)
class Actor:
    name: str
    user: object | None = None  # a django.contrib.auth user, or None for the command line

    @classmethod
    def command_line(cls) -> "Actor":
        return cls(name=f"cli:{getpass.getuser()}")

    @classmethod
    def for_user(cls, user) -> "Actor":
        return cls(name=f"admin:{user.get_username()}", user=user)

    def require(self, permission: str) -> None:
        if self.user is not None and not self.user.has_perm(permission):
            raise OperatorNotPermitted(f"{self.name} lacks the permission {permission}")
