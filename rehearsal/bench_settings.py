"""The settings of the benchmark's gunicorn: the product's, routing rehearsal.bench_urls (the
product's URLs and the floor of `bench webhooks`)."""

from config.settings.base import *  # noqa: F403

ROOT_URLCONF = "rehearsal.bench_urls"
