"""Production: secrets have no defaults and DATABASE_URL must be given; a secret (or the wallet
id) still holding a template's placeholder, or too weak, stops the process naming it."""

import os

from config.env import ConfigurationError, placeholder_check, secret_strength_check

if not os.environ.get("DATABASE_URL"):
    raise ConfigurationError("DATABASE_URL: required in production but not set")
if not os.environ.get("DJANGO_SECRET_KEY"):
    raise ConfigurationError("DJANGO_SECRET_KEY: required in production but not set")

from config.settings.base import *  # noqa: F403
from config.settings.base import SECRET_SETTINGS, env_secret

DEBUG = False
SECRETS_REQUIRED = True
# Every missing secret is named before any weak one (all are read first).
for _name in SECRET_SETTINGS:
    globals()[_name] = env_secret(_name, required=True)
# Django's own rule for SECRET_KEY (security.W009) asks for 50 characters.
secret_strength_check("DJANGO_SECRET_KEY", SECRET_KEY, min_length=50)  # noqa: F405
for _name in SECRET_SETTINGS:
    secret_strength_check(_name, globals()[_name])
placeholder_check("CIRCLE_WALLET_ID", CIRCLE_WALLET_ID)  # noqa: F405
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
