"""Settings shared by every environment. Differences come from the environment, read once through
config.env and validated here: a missing or malformed variable stops the process naming it."""

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from celery.schedules import crontab

from config.env import (
    ConfigurationError,
    aws_secret_id,
    env,
    env_bool,
    env_choice,
    env_decimal,
    env_directory,
    env_duration,
    env_ed25519_public_key,
    env_fraction,
    env_int,
    env_list,
    env_mapping,
    env_pattern,
    env_secret,
    env_url,
)
from cutover.phases import UnknownFlagCombination, phase_from_flags

BASE_DIR = Path(__file__).resolve().parent.parent.parent

DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="insecure-development-key-not-for-production")
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "ledger",
    "gateway",
    "cutover",
    "django_celery_beat",
    "treasury",
    "onchain",
    "custody",
    "aws",
    "rehearsal",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "gateway.api.CorrelationIdMiddleware",
    "gateway.errors.MethodNotAllowedAsJson",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "gateway.console_boundary.ConsoleInputBoundary",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "config.urls"
CSRF_FAILURE_VIEW = "gateway.errors.csrf_failure"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "config" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "onchain.context_processors.buffer_alert",
                "config.context_processors.rollout_state",
            ],
        },
    },
]

# Without DATABASE_URL the project points at its own embedded PostgreSQL: the Unix socket of the
# cluster in .embedded-pg/ that `rehearse` and `bench` start and stop themselves
# (rehearsal/embedded_db.py; a test holds the two to the same URL). Nothing else starts it.
EMBEDDED_DATABASE = env.str("DATABASE_URL", default="") == ""
EMBEDDED_DATABASE_URL = f"postgres://postgres@/ledger?host={BASE_DIR / '.embedded-pg' / 'run'}"
DATABASE_URL = env_url(
    "DATABASE_URL",
    default=EMBEDDED_DATABASE_URL,
    schemes=("postgres", "postgresql", "pgsql"),
)
DATABASES = {
    "default": env.db_url_config(DATABASE_URL, engine="django_prometheus.db.backends.postgresql")
}
DATABASES["default"]["CONN_MAX_AGE"] = env_int("DB_CONN_MAX_AGE", 60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# Django turns psycopg's prepared statements off (for transaction-mode poolers, which this
# service does not use); a threshold no query reaches keeps the ORM unprepared while the hot
# statements that ask for it (prepare=True: the posting and the balance path) are prepared.
DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = 2**31 - 1
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
# Where collectstatic writes and the production web serves from (WhiteNoise). The image collects
# at build under these settings, so the storage is set here: hashed names (cached for good by
# browsers) and gzip copies, listed in a manifest that the production settings read.
STATIC_ROOT = env.str("DJANGO_STATIC_ROOT", default=str(BASE_DIR / "staticfiles"))
if not Path(STATIC_ROOT).is_absolute():
    raise ConfigurationError(f"DJANGO_STATIC_ROOT: {STATIC_ROOT!r} is not an absolute path")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# Every process (web, Celery worker and beat, commands) logs to stderr: LOG_FORMAT=json is one
# JSON object per line for a log shipper (production's default), plain a line for a person
# (the default here). Each line carries the request's or task's correlation id, the actor and
# the phase where they are known (gateway/log_context.py).
LOG_FORMAT = env_choice("LOG_FORMAT", "plain", ("json", "plain"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "gateway.log_context.LogContextFilter"}},
    "formatters": {
        "plain": {
            "()": "gateway.log_context.PlainFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s "
            "[%(correlation_id)s %(actor)s %(phase)s]",
            "defaults": {"correlation_id": "-", "actor": "-", "phase": "-"},
        },
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(levelname)s %(name)s %(message)s",
            "rename_fields": {"levelname": "level", "name": "logger"},
            "timestamp": "time",  # ISO 8601, UTC
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context"],
        }
    },
    "root": {
        "handlers": ["console"],
        "level": env_choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
    },
    # boto3 says at INFO where it found credentials, for every client (aws/ makes one a minute).
    "loggers": {"botocore": {"level": "WARNING"}},
}

# prometheus_client reads this variable itself: when set, every process of a host (gunicorn and
# Celery workers, commands) writes its metrics there and /metrics adds them up, so a counter
# bumped in a Celery worker is visible to the scrape. Checked here so a wrong path is named.
PROMETHEUS_MULTIPROC_DIR = env_directory("PROMETHEUS_MULTIPROC_DIR")

# Feature flags (seed 001 "Configuration"). They seed the first phase state; after that the
# state lives in the database and changes only through the cutover service.
USE_LEDGER_INTEGRATION = env_bool("USE_LEDGER_INTEGRATION", False)
LEDGER_SHADOW_MODE = env_bool("LEDGER_SHADOW_MODE", False)
LEDGER_STRICT_MODE = env_bool("LEDGER_STRICT_MODE", False)
BALANCE_SOURCE = env_choice("BALANCE_SOURCE", "legacy", ("legacy", "ledger"))
USE_ENHANCED_BALANCE_SERVICE = env_bool("USE_ENHANCED_BALANCE_SERVICE", False)
try:
    # Where a new database starts; afterwards the phase lives in the database.
    INITIAL_PHASE = phase_from_flags(
        (
            USE_LEDGER_INTEGRATION,
            LEDGER_SHADOW_MODE,
            LEDGER_STRICT_MODE,
            BALANCE_SOURCE,
            USE_ENHANCED_BALANCE_SERVICE,
        )
    ).value
except UnknownFlagCombination as exc:
    raise ConfigurationError(str(exc)) from None

# Gates between phases (seed 001 Phase 4): how long a phase must run and what it must show.
CUTOVER_SHADOW_MIN_DURATION = env_duration("CUTOVER_SHADOW_MIN_DURATION", "48h")
CUTOVER_READ_SWITCH_MIN_DURATION = env_duration("CUTOVER_READ_SWITCH_MIN_DURATION", "48h")
CUTOVER_STRICT_MIN_DURATION = env_duration("CUTOVER_STRICT_MIN_DURATION", "72h")
CUTOVER_MIN_WRITE_SUCCESS_RATE = env_fraction("CUTOVER_MIN_WRITE_SUCCESS_RATE", "0.999")
CUTOVER_READ_P99_BUDGET_MS = env_int("CUTOVER_READ_P99_BUDGET_MS", 500, minimum=1)
CUTOVER_RECONCILE_INTERVAL = env_duration("CUTOVER_RECONCILE_INTERVAL", "15m")
# A reconciliation run is split into chunks of about this many users, which workers take in
# parallel; the run's leader task sends up to RECONCILE_FANOUT - 1 more tasks to its queue, so
# that that many workers may help (cutover.reconciliation).
RECONCILE_CHUNK_USERS = env_int("RECONCILE_CHUNK_USERS", 100_000, minimum=1)
RECONCILE_FANOUT = env_int("RECONCILE_FANOUT", 16, minimum=1)
# A backfill run is split into user ranges of about this many users, each with its own
# checkpoint, which processes and workers take in parallel; its leader task sends up to
# BACKFILL_FANOUT - 1 more tasks to its queue (cutover.backfill).
BACKFILL_RANGE_USERS = env_int("BACKFILL_RANGE_USERS", 10_000, minimum=1)
BACKFILL_FANOUT = env_int("BACKFILL_FANOUT", 16, minimum=1)
# Phase 5: the legacy store is archived only after this long in cutover ("after 90 days").
CUTOVER_LEGACY_ARCHIVE_AFTER = env_duration("CUTOVER_LEGACY_ARCHIVE_AFTER", "90d")
# The system buffers against what Circle and Due report (custody reconciliation).
CUSTODY_RECONCILE_INTERVAL = env_duration("CUSTODY_RECONCILE_INTERVAL", "15m")
# Balance API: how long an Idempotency-Key is remembered, and how long a request holds it.
IDEMPOTENCY_KEY_TTL = env_duration("IDEMPOTENCY_KEY_TTL", "24h")
IDEMPOTENCY_LOCK_TIMEOUT = env_duration("IDEMPOTENCY_LOCK_TIMEOUT", "30s")

ENABLE_TREASURY_SCHEDULER = env_bool("ENABLE_TREASURY_SCHEDULER", False)
ENABLE_ONCHAIN_ENGINE = env_bool("ENABLE_ONCHAIN_ENGINE", False)

TREASURY_SCHEDULER_INTERVAL = env_duration("TREASURY_SCHEDULER_INTERVAL", "5m")
TREASURY_MONITOR_INTERVAL = env_duration("TREASURY_MONITOR_INTERVAL", "1m")
TREASURY_CONVERSION_TIMEOUT = env_duration("TREASURY_CONVERSION_TIMEOUT", "30m")
# How long after a conversion completes the monitor still asks the provider about it (hourly),
# for a refund whose webhook never came: an ACH payout can be returned for up to 60 days.
TREASURY_REFUND_WATCH = env_duration("TREASURY_REFUND_WATCH", "60d")
# Conversion jobs: how often a submission is tried (backoff base * 2^(n-1)) before the job
# fails, and how many failures in a row make a provider unhealthy (the next one gets jobs).
TREASURY_SUBMIT_MAX_ATTEMPTS = env_int("TREASURY_SUBMIT_MAX_ATTEMPTS", 5, minimum=1)
TREASURY_SUBMIT_BACKOFF = env_duration("TREASURY_SUBMIT_BACKOFF", "30s")
TREASURY_PROVIDER_FAILURE_LIMIT = env_int("TREASURY_PROVIDER_FAILURE_LIMIT", 3, minimum=1)
# How much less than 1:1 a completed conversion may pay and still be posted (the provider's fee
# or spread, as a fraction: 0.01 = 1 %); more is disputed, for an operator. At most 0.1: a
# conversion that loses more is no fee.
TREASURY_CONVERSION_TOLERANCE = env_fraction("TREASURY_CONVERSION_TOLERANCE", "0.01")
if Decimal("0.1") < TREASURY_CONVERSION_TOLERANCE:
    raise ConfigurationError(
        f"TREASURY_CONVERSION_TOLERANCE: expected a fraction from 0 to 0.1, got "
        f"{TREASURY_CONVERSION_TOLERANCE}"
    )
ONCHAIN_DEPOSIT_POLL_INTERVAL = env_duration("ONCHAIN_DEPOSIT_POLL_INTERVAL", "30s")
# How far back each poll asks Circle for inbound transfers (longer outages: `onchain poll`).
ONCHAIN_DEPOSIT_POLL_LOOKBACK = env_duration("ONCHAIN_DEPOSIT_POLL_LOOKBACK", "2h")
ONCHAIN_BUFFER_ALERT_THRESHOLD = env_decimal("ONCHAIN_BUFFER_ALERT_THRESHOLD", "5000.0")

# Secrets: optional in development, required by config.settings.production (which reads each
# of SECRET_SETTINGS again and checks its strength).
SECRET_SETTINGS = (
    "CIRCLE_API_KEY",
    "CIRCLE_WEBHOOK_SECRET",
    "DUE_API_KEY",
    "DUE_API_SECRET",
    "ADMIN_TOKEN",
    "METRICS_TOKEN",
)
SECRETS_REQUIRED = False
CIRCLE_API_KEY = env_secret("CIRCLE_API_KEY", required=SECRETS_REQUIRED)
CIRCLE_WEBHOOK_SECRET = env_secret("CIRCLE_WEBHOOK_SECRET", required=SECRETS_REQUIRED)
DUE_API_KEY = env_secret("DUE_API_KEY", required=SECRETS_REQUIRED)
DUE_API_SECRET = env_secret("DUE_API_SECRET", required=SECRETS_REQUIRED)
ADMIN_TOKEN = env_secret("ADMIN_TOKEN", required=SECRETS_REQUIRED)
# Prometheus scrapes /metrics with `Authorization: Bearer <METRICS_TOKEN>`; unset, /metrics
# answers nobody (401/403), as the internal endpoints do without ADMIN_TOKEN.
METRICS_TOKEN = env_secret("METRICS_TOKEN", required=SECRETS_REQUIRED)
# Where AWS Secrets Manager keeps each of them when AWS_SECRETS_PREFIX is set (none otherwise):
# what the settings read there, and what `manage.py aws provision` creates when absent.
AWS_SECRET_IDS = {name: aws_secret_id(name) for name in SECRET_SETTINGS if aws_secret_id(name)}

# AWS (aws/: CloudWatch, CloudWatch Logs, Secrets Manager). boto3 finds the credentials its
# usual way (instance or pod role); the region and, for a local server such as moto, the
# endpoint are the variables boto3 reads, checked here. Unset, boto3 resolves them itself.
AWS_ENDPOINT_URL = env_url("AWS_ENDPOINT_URL", default=None, schemes=("https", "http"))
AWS_DEFAULT_REGION = env.str("AWS_DEFAULT_REGION", default="") or None

# Circle: where its API is (the shipped sandbox in development and tests), how long a call may
# take, and the largest webhook body accepted.
CIRCLE_API_BASE_URL = env_url(
    "CIRCLE_API_BASE_URL", default="https://api.circle.com", schemes=("https", "http")
).rstrip("/")
CIRCLE_HTTP_TIMEOUT = env_duration("CIRCLE_HTTP_TIMEOUT", "5s").total_seconds()
CIRCLE_WEBHOOK_MAX_BYTES = env_int("CIRCLE_WEBHOOK_MAX_BYTES", 65536, minimum=1024)
# Circle Mint v1 notifications come through Amazon SNS: the topics we subscribed to (Circle
# publishes from us-east-1 and us-west-2; these defaults are Circle's sandbox topics), and the
# `scheme://host[:port]` a signing certificate or a subscription confirmation URL must match.
CIRCLE_SNS_TOPIC_ARNS = frozenset(
    env_list(
        "CIRCLE_SNS_TOPIC_ARNS",
        "arn:aws:sns:us-east-1:908968368384:sandbox_platform-notifications-topic,"
        "arn:aws:sns:us-west-2:908968368384:sandbox_platform-notifications-topic",
    )
)
CIRCLE_SNS_URL_PATTERN = env_pattern(
    "CIRCLE_SNS_URL_PATTERN", r"https://sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?"
)
# Programmable Wallets notifications name no currency, only a token id: the ones we credit
# (`<tokenId>=USDC,...`); a token not listed is refused and recorded, never credited.
CIRCLE_WALLETS_TOKENS = env_mapping("CIRCLE_WALLETS_TOKENS", "", ("USDC",))
# How long a signing key id Circle does not know (or an SNS certificate URL that failed) is
# answered without asking again.
CIRCLE_UNKNOWN_KEY_TTL = env_duration("CIRCLE_UNKNOWN_KEY_TTL", "5m")
# Fetches of signing material we do not hold (Circle key ids, SNS certificate URLs), however
# many worker processes: at most this many per CIRCLE_KEY_FETCH_WINDOW; over it a delivery is
# a 503 (the sender redelivers) and nothing is fetched. The window is a minute, a setting only
# so that tests can shorten it.
CIRCLE_KEY_FETCHES_PER_MINUTE = env_int("CIRCLE_KEY_FETCHES_PER_MINUTE", 10, minimum=1)
CIRCLE_KEY_FETCH_WINDOW = timedelta(minutes=1)
# Withdrawals: the Circle wallet they are sent from; the outbox worker's pace, its backoff
# (base * 2^(attempt-1), capped) and how many sends fail before a withdrawal is dead.
CIRCLE_WALLET_ID = env.str("CIRCLE_WALLET_ID", default="1000000001")
ONCHAIN_WITHDRAWAL_SEND_INTERVAL = env_duration("ONCHAIN_WITHDRAWAL_SEND_INTERVAL", "5s")
ONCHAIN_WITHDRAWAL_BACKOFF = env_duration("ONCHAIN_WITHDRAWAL_BACKOFF", "2s")
ONCHAIN_WITHDRAWAL_BACKOFF_MAX = env_duration("ONCHAIN_WITHDRAWAL_BACKOFF_MAX", "10m")
ONCHAIN_WITHDRAWAL_MAX_ATTEMPTS = env_int("ONCHAIN_WITHDRAWAL_MAX_ATTEMPTS", 8, minimum=1)

# Due (conversion provider): where its API is (the shipped sandbox in development and tests),
# how long one call may take and how many times a call is tried on 5xx or timeout.
DUE_API_BASE_URL = env_url(
    "DUE_API_BASE_URL", default="https://api.due.network", schemes=("https", "http")
).rstrip("/")
DUE_HTTP_TIMEOUT = env_duration("DUE_HTTP_TIMEOUT", "5s").total_seconds()
# Which of our Due accounts acts (`Due-Account-Id`; unset: the API key's own), where Due pays a
# conversion into each currency (recipients registered at Due once: our bank account for USD,
# our wallet for USDC) and the rail each currency moves on.
DUE_ACCOUNT_ID = env.str("DUE_ACCOUNT_ID", default="")
DUE_RECIPIENTS = {
    "USD": env.str("DUE_RECIPIENT_USD", default=""),
    "USDC": env.str("DUE_RECIPIENT_USDC", default=""),
}
DUE_RAILS = {
    "USD": env.str("DUE_RAIL_USD", default="ach"),
    "USDC": env.str("DUE_RAIL_USDC", default="ethereum"),
}
# Due's webhooks are signed with Ed25519 by a key pair of the webhook endpoint's own: its public
# key (PEM), as Due's `POST /v1/webhook_endpoints` answered it. Unset, every webhook is a 503
# (Due redelivers; the monitor's polls settle jobs meanwhile).
DUE_WEBHOOK_PUBLIC_KEY = env_ed25519_public_key("DUE_WEBHOOK_PUBLIC_KEY")


def _provider_base_urls(raw: list[str]) -> dict[str, str]:
    urls = {}
    for entry in raw:
        code, _, url = (part.strip() for part in entry.partition("="))
        if not code or url.split("://", 1)[0] not in ("https", "http") or "://" not in url:
            raise ConfigurationError(
                f"TREASURY_PROVIDER_BASE_URLS: expected code=https://host,..., got {entry!r}"
            )
        urls[code] = url.rstrip("/")
    return urls


# Where each other conversion provider (speaking Due's wire format) is, by its code:
# `backup=https://...,other=https://...`. Hosts come from here, never from the database.
TREASURY_PROVIDER_BASE_URLS = _provider_base_urls(
    env.list("TREASURY_PROVIDER_BASE_URLS", default=[])
)
DUE_HTTP_ATTEMPTS = env_int("DUE_HTTP_ATTEMPTS", 3, minimum=1)

# Ledger posting: how many times a serialization failure or deadlock is retried.
LEDGER_POSTING_MAX_ATTEMPTS = env_int("LEDGER_POSTING_MAX_ATTEMPTS", 3, minimum=1)

CELERY_BROKER_URL = env_url(
    "CELERY_BROKER_URL", default="redis://127.0.0.1:6379/0", schemes=("redis", "rediss", "amqp")
)
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=None)
# Delivery: at least once (README, "Celery's delivery caveats"; each task says its own choice and
# time limits). A message is acknowledged when its task ends; a task whose process died is put
# back; one that raised or passed its hard time limit is acknowledged, recorded as failed.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TASK_ACKS_ON_FAILURE = True
CELERY_TASK_ACKS_ON_TIMEOUT = True
# One message reserved per worker process: none waits unacknowledged behind another task.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Redis gives an unacknowledged message to another worker after this long, running it twice:
# it must exceed every task's hard time limit plus its longest countdown (tested).
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
# A message started this many times without finishing (its process killed each time) is dead:
# recorded for an operator (admin: Task deliveries; ALERT log; celery_task_deliveries_dead_total)
# and never run again.
TASK_DELIVERY_MAX_ATTEMPTS = env_int("TASK_DELIVERY_MAX_ATTEMPTS", 3, minimum=1)
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BEAT_SCHEDULE = {
    "cutover-reconcile": {
        "task": "cutover.reconcile",
        "schedule": CUTOVER_RECONCILE_INTERVAL.total_seconds(),
    },
    "custody-reconcile": {
        "task": "custody.reconcile",
        "schedule": CUSTODY_RECONCILE_INTERVAL.total_seconds(),
    },
    "onchain-withdrawals-send": {
        "task": "onchain.withdrawals_send",
        "schedule": ONCHAIN_WITHDRAWAL_SEND_INTERVAL.total_seconds(),
    },
    "onchain-transfers-poll": {
        "task": "onchain.transfers_poll",
        "schedule": ONCHAIN_DEPOSIT_POLL_INTERVAL.total_seconds(),
    },
    "treasury-settlement-cycle": {
        "task": "treasury.settlement_cycle",
        "schedule": TREASURY_SCHEDULER_INTERVAL.total_seconds(),
    },
    "treasury-monitor": {
        "task": "treasury.monitor",
        "schedule": TREASURY_MONITOR_INTERVAL.total_seconds(),
    },
    # Seed 001's CloudWatch metrics, at the start of every minute: the alarms' periods are
    # minutes (the buffer's is one), so each minute gets its data point.
    "aws-metrics-publish": {
        "task": "aws.metrics_publish",
        "schedule": crontab(minute="*"),
    },
}
# Schedules live in the database (django-celery-beat): operators see and change them in the
# admin; the entries above are written there when beat starts.
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
