"""Production: secrets have no defaults and DATABASE_URL must be given; a secret (or the wallet
id) still holding a template's placeholder, or too weak, stops the process naming it."""

import os

from config.env import (
    ConfigurationError,
    env_choice,
    env_int,
    placeholder_check,
    secret_strength_check,
)

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

# One JSON object per line for the log shipper (LOG_FORMAT=plain to read a pod's log by eye).
LOG_FORMAT = env_choice("LOG_FORMAT", "json", ("json", "plain"))
LOGGING["handlers"]["console"]["formatter"] = LOG_FORMAT  # noqa: F405

# `manage.py check --deploy` passes with these (tests/test_configuration.py). TLS ends at the
# load balancer, which says so in X-Forwarded-Proto (it must overwrite what a client sends).
# Plain HTTP is redirected to HTTPS, except the paths the cluster asks over HTTP on the pod's
# port: the kubelet's probes and Prometheus's scrape.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = True
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
# HSTS: a browser (the admin console) keeps to HTTPS for this long. An hour by default, short
# enough to undo a mistake; raise it (31536000, a year) once every name of the service answers
# over HTTPS. 0 turns HSTS off (and check --deploy then says so).
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 3600)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True  # names under the service's own host name only
SILENCED_SYSTEM_CHECKS = [
    # security.W021 asks for SECURE_HSTS_PRELOAD. Browsers preload a whole registrable domain,
    # submitted by its owner from the apex with a year's max-age, and it is slow to take back:
    # the domain owner's decision, not this service's. On the service's host name (a
    # subdomain) the directive does nothing.
    "security.W021",
]
# The admin's CSS and scripts, served by the web itself from what collectstatic wrote to
# STATIC_ROOT (at the image's build; on a systemd host, in the deploy steps): after the HTTPS
# redirect, before anything that would open a session or a database connection.
MIDDLEWARE.insert(  # noqa: F405
    MIDDLEWARE.index("django.middleware.security.SecurityMiddleware") + 1,  # noqa: F405
    "whitenoise.middleware.WhiteNoiseMiddleware",
)
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
