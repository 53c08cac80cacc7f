"""The one environment reader. Every value is validated when settings load; a bad value stops
the process with a message naming the variable (manage.py and wsgi print it without a traceback)."""

import os
import re
from datetime import timedelta
from decimal import Decimal, InvalidOperation

import environ
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from django.core.exceptions import ImproperlyConfigured

env = environ.Env()

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigurationError(ImproperlyConfigured):
    """A missing or malformed environment variable."""


def env_bool(name: str, default: bool) -> bool:
    raw = env.str(name, default=None)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{name}: expected true or false, got {raw!r}")


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.str(name, default=default).strip()
    if value not in choices:
        raise ConfigurationError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def env_duration(name: str, default: str) -> timedelta:
    """Durations are written like the seed's: 30s, 1m, 5m, 30m, 1h (or 250ms, 90d)."""
    raw = env.str(name, default=default).strip()
    match = _DURATION.match(raw)
    if not match or int(match.group(1)) == 0:
        raise ConfigurationError(
            f"{name}: expected a positive duration such as 30s, 5m, 1h or 90d, got {raw!r}"
        )
    return timedelta(seconds=int(match.group(1)) * _DURATION_UNITS[match.group(2)])


def env_decimal(name: str, default: str) -> Decimal:
    raw = env.str(name, default=default).strip()
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ConfigurationError(f"{name}: expected a decimal number, got {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise ConfigurationError(f"{name}: expected a non-negative decimal number, got {raw!r}")
    return value


def env_fraction(name: str, default: str) -> Decimal:
    value = env_decimal(name, default)
    if value > 1:
        raise ConfigurationError(f"{name}: expected a fraction from 0 to 1, got {value}")
    return value


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = env.str(name, default=str(default)).strip()
    if not re.fullmatch(r"-?\d+", raw) or int(raw) < minimum:
        raise ConfigurationError(f"{name}: expected a whole number >= {minimum}, got {raw!r}")
    return int(raw)


def env_url(name: str, default: str | None, schemes: tuple[str, ...]) -> str | None:
    raw = env.str(name, default=default)
    if raw is None:
        return None
    if raw.split("://", 1)[0] not in schemes or "://" not in raw:
        raise ConfigurationError(
            f"{name}: expected a URL starting with {' or '.join(s + '://' for s in schemes)}, "
            f"got {raw!r}"
        )
    return raw


def env_ed25519_public_key(name: str) -> str:
    """A PEM Ed25519 public key (`\\n` accepted for its line breaks, as one-line environment
    files write them), or empty when unset."""
    raw = env.str(name, default="").strip().replace("\\n", "\n")
    if not raw:
        return ""
    try:
        key = load_pem_public_key(raw.encode())
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError(
            f"{name}: expected a PEM Ed25519 public key (-----BEGIN PUBLIC KEY-----...)"
        )
    return raw


def env_list(name: str, default: str) -> tuple[str, ...]:
    """A comma-separated list (spaces around items ignored, empty items dropped)."""
    return tuple(item.strip() for item in env.str(name, default=default).split(",") if item.strip())


def env_mapping(name: str, default: str, values: tuple[str, ...]) -> dict[str, str]:
    """`key=value,key=value`, each value one of `values`."""
    mapping = {}
    for item in env_list(name, default):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not key or not equals or value not in values:
            raise ConfigurationError(
                f"{name}: expected key=value items with a value in {', '.join(values)}, "
                f"got {item!r}"
            )
        mapping[key] = value
    return mapping


def env_pattern(name: str, default: str) -> re.Pattern:
    raw = env.str(name, default=default)
    try:
        return re.compile(raw)
    except re.error as exc:
        raise ConfigurationError(f"{name}: not a regular expression ({exc}): {raw!r}") from None


def env_directory(name: str) -> str | None:
    """A directory this process must be able to write to, when set (set but empty is refused:
    prometheus_client would take it for the working directory)."""
    if name not in os.environ:
        return None
    raw = os.environ[name].strip()
    if not os.path.isdir(raw) or not os.access(raw, os.W_OK):
        raise ConfigurationError(
            f"{name}: {raw!r} is not a directory this process can write to (or leave it unset)"
        )
    return raw


def aws_secret_id(name: str) -> str:
    """Where AWS Secrets Manager keeps a secret: AWS_SECRETS_PREFIX + its name in kebab case
    (seed 001's names: `stack-service/circle-api-key` for CIRCLE_API_KEY); empty when no prefix
    is set, and then no secret is read from AWS."""
    prefix = env.str("AWS_SECRETS_PREFIX", default="")
    return prefix + name.lower().replace("_", "-") if prefix else ""


def env_secret(name: str, required: bool) -> str:
    """A secret from the environment or, when AWS_SECRETS_PREFIX is set and the variable is
    not, from AWS Secrets Manager under `aws_secret_id(name)`."""
    value = env.str(name, default="")
    secret_id = aws_secret_id(name)
    if not value and secret_id:
        value = _aws_secret(name, secret_id)
    if required and not value:
        where = f" (nor in AWS Secrets Manager as {secret_id})" if secret_id else ""
        raise ConfigurationError(f"{name}: required in this environment but not set{where}")
    return value


def _aws_secret(name: str, secret_id: str) -> str:
    import boto3  # only where secrets come from AWS: it costs the others a slower start
    from botocore.exceptions import BotoCoreError, ClientError

    global _secrets_client
    try:
        if _secrets_client is None:
            _secrets_client = boto3.client("secretsmanager")
        return _secrets_client.get_secret_value(SecretId=secret_id).get("SecretString", "")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            return ""
        raise ConfigurationError(f"{name}: AWS Secrets Manager {secret_id}: {exc}") from None
    except BotoCoreError as exc:
        raise ConfigurationError(f"{name}: AWS Secrets Manager {secret_id}: {exc}") from None


_secrets_client = None

# What a value left from a template looks like (deploy/env.example ships such values on purpose).
_PLACEHOLDERS = (
    "change-me",
    "changeme",
    "change_me",
    "replace-me",
    "replaceme",
    "example",
    "placeholder",
    "insecure",
    "dummy",
    "your-",
    "xxxx",
)
SECRET_MIN_LENGTH = 16
SECRET_MIN_DISTINCT = 8


def secret_strength_check(name: str, value: str, min_length: int = SECRET_MIN_LENGTH) -> None:
    """Production refuses a secret that is a template's placeholder or too weak to guess at:
    shorter than `min_length` or made of fewer than SECRET_MIN_DISTINCT different characters."""
    placeholder_check(name, value)
    if len(value) < min_length:
        raise ConfigurationError(
            f"{name}: too short for a secret ({len(value)} characters, at least {min_length})"
        )
    if len(set(value)) < SECRET_MIN_DISTINCT:
        raise ConfigurationError(
            f"{name}: too weak for a secret (fewer than {SECRET_MIN_DISTINCT} different characters)"
        )


def placeholder_check(name: str, value: str) -> None:
    """Production refuses a setting still holding a template's placeholder."""
    lowered = value.lower()
    for placeholder in _PLACEHOLDERS:
        if placeholder in lowered:
            raise ConfigurationError(
                f"{name}: looks like a placeholder (contains {placeholder!r}); set the real value"
            )
