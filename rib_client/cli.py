"""rib-remote (also: rib remote): the RIB service from the command line, through rib_client.RibClient.

The service's address and key come from --url/--api-key or RIB_URL/RIB_API_KEY.
Answers are JSON on stdout (results: one JSON line per image); progress bars go to stderr.
Exit codes: 0 success, 2 bad usage, 3 the API refused the request (4xx; the message says what to
fix), 1 anything else (the service failed or is unreachable, or a waited-for job did not end done).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from rib_client.client import ApiError, RibClient, WaitTimeoutError
from rib_client.models import Accepted

EXIT_FAILED, EXIT_REFUSED = 1, 3


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object given inline, or ``@file.json``."""
    value = json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _records(path: str) -> list[dict[str, Any]]:
    """Inline bulk-job records from a JSON list or a JSONL file (one ``{"id", "image", "labels"}`` a line)."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _print(body: BaseModel) -> None:
    print(body.model_dump_json(indent=1))


def _settings(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for name in ("rib", "refine"):
        p.add_argument(f"--{name}", type=_json_object, help=f"{name} settings overriding the service's defaults "
                       "(a JSON object, or @file.json)")
    return p


def _waiting(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--wait", action="store_true", help="wait for the job to end, with a progress bar on stderr, "
                   "and print its final status")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds (exit 1)")
    return p


def _follow(c: RibClient, args: argparse.Namespace, job_id: str, pipeline: bool) -> int:
    status = c.wait(job_id, pipeline=pipeline, timeout=args.timeout, progress=True)
    _print(status)
    return 0 if status.state == "done" else EXIT_FAILED


def _submitted(c: RibClient, args: argparse.Namespace, accepted: Accepted, pipeline: bool) -> int:
    """The accepted job, or with ``--wait`` its final status (one JSON document on stdout either way)."""
    if args.wait:
        return _follow(c, args, accepted.job_id, pipeline)
    _print(accepted)
    return 0


def cmd_upload(c: RibClient, args: argparse.Namespace) -> int:
    labels = [name.strip() for value in args.labels for name in value.split(",")]
    accepted = c.submit_upload(args.image, labels, image_id=args.image_id, rib=args.rib, refine=args.refine)
    return _submitted(c, args, accepted, False)


def cmd_job(c: RibClient, args: argparse.Namespace) -> int:
    images = _records(args.images) if args.images else None
    accepted = c.submit_job(manifest_uri=args.manifest, images=images, rib=args.rib, refine=args.refine)
    return _submitted(c, args, accepted, False)


def cmd_pipeline(c: RibClient, args: argparse.Namespace) -> int:
    accepted = c.submit_pipeline(args.manifest, classifier_uri=args.classifier_uri,
                                 val_manifest_uri=args.val_manifest_uri, classifier=args.classifier, rib=args.rib,
                                 refine=args.refine, deeplab=args.deeplab)
    return _submitted(c, args, accepted, True)


def cmd_status(c: RibClient, args: argparse.Namespace) -> int:
    _print(c.status(args.job_id, pipeline=args.pipeline))
    return 0


def cmd_wait(c: RibClient, args: argparse.Namespace) -> int:
    return _follow(c, args, args.job_id, args.pipeline)


def cmd_results(c: RibClient, args: argparse.Namespace) -> int:
    for item in c.results(args.job_id, pipeline=args.pipeline, page_size=args.page_size):
        print(item.model_dump_json())
    return 0


def cmd_export(c: RibClient, args: argparse.Namespace) -> int:
    path = c.export(args.job_id, args.format, args.out, pipeline=args.pipeline,
                    image_url_prefix=args.image_url_prefix)
    print(path)
    return 0


def cmd_cancel(c: RibClient, args: argparse.Namespace) -> int:
    _print(c.cancel(args.job_id, pipeline=args.pipeline))
    return 0


Command = Callable[[RibClient, argparse.Namespace], int]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="rib-remote", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--url", default=os.environ.get("RIB_URL", "http://127.0.0.1:8000"),
                     help="the API's base URL (default: RIB_URL, else http://127.0.0.1:8000)")
    top.add_argument("--api-key", default=os.environ.get("RIB_API_KEY", ""), help="default: RIB_API_KEY")
    sub = top.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Command, help_: str, job: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        if job:
            p.add_argument("job_id")
            p.add_argument("--pipeline", action="store_true", help="a pipeline job (default: an upload or bulk job)")
        return p

    p = _waiting(_settings(add("upload", cmd_upload, "one image and its class names")))
    p.add_argument("image", help="the image file")
    p.add_argument("--labels", action="append", required=True, help="class names, comma-separated or repeated")
    p.add_argument("--image-id", help="result folder name (default: the file name)")
    p = _waiting(_settings(add("job", cmd_job, "a bulk job: a manifest on S3 or inline records")))
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--manifest", help="s3:// URI of a JSONL manifest")
    given.add_argument("--images", help='local JSON list or JSONL file of {"id", "image" (s3:// URI), "labels"}')
    p = _waiting(_settings(add("pipeline", cmd_pipeline, "a data set through every stage (classifier, maps, "
                               "refinement, DeepLab with --deeplab)")))
    p.add_argument("manifest", help="s3:// URI of the data set's manifest")
    p.add_argument("--classifier-uri", help="start from this checkpoint instead of training a classifier")
    p.add_argument("--val-manifest-uri", help="labelled manifest the classifier is scored on")
    p.add_argument("--classifier", type=_json_object, help="classifier training settings (JSON object)")
    p.add_argument("--deeplab", type=_json_object, help="train DeepLab too, with these settings ('{}': defaults)")
    add("status", cmd_status, "a job's status", job=True)
    p = add("wait", cmd_wait, "wait for a job to end (progress bar on stderr), print its status", job=True)
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 1)")
    p = add("results", cmd_results, "every image's result, one JSON line each", job=True)
    p.add_argument("--page-size", type=int, default=100, help="images per request (1 to 1000)")
    p = add("export", cmd_export, "download the job's export (one zip)", job=True)
    p.add_argument("--format", required=True, help="coco, labelstudio or voc")
    p.add_argument("--out", required=True, help="the zip file to write, or a folder for <job>-<format>.zip")
    p.add_argument("--image-url-prefix", help="Label Studio: a task's image URL is this + the image's file name")
    add("cancel", cmd_cancel, "cancel a job (images or stages not started are skipped)", job=True)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with RibClient(args.url, args.api_key) as c:
            return args.fn(c, args)
    except ApiError as e:
        print(f"rib-remote {args.command}: {e}", file=sys.stderr)
        return EXIT_REFUSED if 400 <= e.status_code < 500 else EXIT_FAILED
    except (WaitTimeoutError, httpx.HTTPError, OSError, ValueError) as e:
        print(f"rib-remote {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
