"""Production: secrets have no defaults and DATABASE_URL must be given."""

import os

from config.env import ConfigurationError

if not os.environ.get("DATABASE_URL"):
    raise ConfigurationError("DATABASE_URL: required in production but not set")
if not os.environ.get("DJANGO_SECRET_KEY"):
    raise ConfigurationError("DJANGO_SECRET_KEY: required in production but not set")

from config.settings.base import *  # noqa: F403
from config.settings.base import env_secret

DEBUG = False
SECRETS_REQUIRED = True
CIRCLE_API_KEY = env_secret("CIRCLE_API_KEY", required=True)
CIRCLE_WEBHOOK_SECRET = env_secret("CIRCLE_WEBHOOK_SECRET", required=True)
DUE_API_KEY = env_secret("DUE_API_KEY", required=True)
DUE_API_SECRET = env_secret("DUE_API_SECRET", required=True)
ADMIN_TOKEN = env_secret("ADMIN_TOKEN", required=True)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
