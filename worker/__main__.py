"""``python -m worker [--training] [celery worker options]``: a Celery worker on the queue the settings
name (``RIB_IMAGE_QUEUE``, or ``RIB_TRAINING_QUEUE`` with ``--training``), one task at a time."""

from __future__ import annotations

import argparse

from contract.settings import get_settings
from worker.celery_app import app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--training", action="store_true", help="consume the training queue")
    args, celery_options = parser.parse_known_args(argv)
    s = get_settings()
    queue = s.training_queue if args.training else s.image_queue
    app.worker_main(["worker", "-Q", queue, "--concurrency", "1", "--prefetch-multiplier", "1",
                     "--loglevel", "INFO", *celery_options])


if __name__ == "__main__":
    main()
