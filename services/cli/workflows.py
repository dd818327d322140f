"""`runs workflows`, `runs workflow NAME` and `runs register FILE`: the workflow registry (runs.v1.WorkflowService).

`register` validates the file locally with shared.workflow first, so a broken spec is reported
with every violation before anything is sent; the API validates again and keeps the last word.
`workflow` prints the spec as YAML in the file form, so its output can be edited and registered.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from google.protobuf import json_format

from services.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    UNARY_DEADLINE_SECONDS,
    Api,
    CliError,
    cell,
    collect_pages,
    dumps,
    format_table,
    iso_time,
    out,
    plain_numbers,
    positive_int,
    print_page,
    to_dict,
)
from shared.gen.runs.v1 import workflow_service_pb2
from shared.workflow import SpecError, from_proto_dict, load_spec_text, spec_to_dict, to_proto_dict

MAX_SPEC_BYTES = 4 * 1024 * 1024  # far above any sane spec; the API refuses big messages anyway


def add_parsers(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add `workflows`, `workflow` and `register` through `add(name, help)`."""
    lst = add("workflows", "List the workflows you can start (the latest version of each).")
    lst.add_argument(
        "--page-size", type=positive_int, default=0, metavar="N", help="workflows per page [server default]"
    )
    lst.add_argument("--page-token", default="", metavar="TOKEN", help="continue from this page token")
    lst.add_argument("--all", action="store_true", help="follow next_page_token until the last page")

    get = add("workflow", "Show a workflow's spec as YAML (--json: the Workflow message).")
    get.add_argument("name", metavar="NAME")
    get.add_argument("--version", type=positive_int, default=0, metavar="N", help="this version [the latest]")

    register = add(
        "register",
        "Register a workflow spec from a YAML or JSON file ('-': stdin); the same spec again keeps its version.",
    )
    register.add_argument("file", metavar="FILE")


# --- the spec's file form ----------------------------------------------------------------------


def spec_file_form(spec: workflow_service_pb2.WorkflowSpec) -> dict[str, Any]:
    """A WorkflowSpec as the YAML/JSON file would say it (change requests as lists, whole numbers plain)."""
    data = plain_numbers(from_proto_dict(json_format.MessageToDict(spec, preserving_proto_field_name=True)))
    for step in data.get("steps", []):
        for name in ("input", "args"):  # proto maps keep no order: show them sorted; leave out empty ones
            if isinstance(step.get(name), dict):
                step[name] = dict(sorted(step[name].items()))
                if not step[name]:
                    del step[name]
        cache = step.get("cache")
        if isinstance(cache, dict) and cache.get("scope") == "none" and not cache.get("ttl_seconds"):
            del step["cache"]  # the default, said out loud
    return dict(data)


class _SpecDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as `|` blocks and quotes what YAML 1.2 reads as numbers.

    The spec loader reads YAML 1.2 core scalars, where `0o17` is an integer; PyYAML's YAML 1.1
    rules would write that string bare.
    """


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_SpecDumper.add_representer(str, _represent_str)
# The YAML 1.2 numbers the spec loader reads (shared/workflow/spec.py) beyond YAML 1.1's: quote them.
_SpecDumper.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^0o[0-7]+$"), ["0"])
_SpecDumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+.0123456789"),
)


def spec_yaml(data: dict[str, Any]) -> str:
    """The file form as YAML, keys in the schema's order."""
    return str(yaml.dump(data, Dumper=_SpecDumper, sort_keys=False, allow_unicode=True, width=120))


def format_workflow(workflow: workflow_service_pb2.Workflow) -> str:
    """A workflow as YAML comments (name, version, hash, origin) followed by its spec as YAML."""
    origin = "built-in" if workflow.builtin else f"registered by {workflow.created_by or 'no key (auth off)'}"
    header = [
        f"# {workflow.name} version {workflow.version}, {origin}, {iso_time(workflow, 'created_at')}",
        f"# spec sha256 {workflow.spec_hash}",
    ]
    return "\n".join(header) + "\n" + spec_yaml(spec_file_form(workflow.spec)).rstrip("\n")


def format_workflows_table(workflows: Sequence[workflow_service_pb2.Workflow]) -> str:
    """Workflows as a table, one line each."""
    if not workflows:
        return "no workflows"
    return format_table(
        ("NAME", "VERSION", "STEPS", "BUILTIN", "CREATED_AT", "DESCRIPTION"),
        (
            (
                w.name,
                str(w.version),
                str(len(w.spec.steps)),
                "yes" if w.builtin else "no",
                iso_time(w, "created_at"),
                cell(w.spec.description),
            )
            for w in workflows
        ),
    )


# --- reading a spec file -----------------------------------------------------------------------


def _read_text(path: str) -> str:
    """The file's text ('-': stdin); CliError (exit 2) when it cannot be read."""
    try:
        if path == "-":
            text = sys.stdin.read(MAX_SPEC_BYTES + 1)
        else:
            with Path(path).open(encoding="utf-8") as f:
                text = f.read(MAX_SPEC_BYTES + 1)
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise CliError([f"error: cannot read {path}: {reason}"], EXIT_USAGE) from None
    if len(text) > MAX_SPEC_BYTES:
        raise CliError([f"error: {path} is larger than {MAX_SPEC_BYTES // (1024 * 1024)} MiB"], EXIT_USAGE)
    return text


def spec_format(path: str, text: str) -> Literal["yaml", "json"]:
    """json for a .json file (or, from stdin or without a known suffix, text starting with '{'), else yaml."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    return "json" if text.lstrip().startswith("{") else "yaml"


def _unwrap_workflow_document(text: str) -> str:
    """A `runs workflow --json` document's spec in the file form, as JSON text; other text unchanged."""
    try:
        data = json.loads(text)
    except ValueError:
        return text  # load_spec_text reports it
    if isinstance(data, dict) and "steps" not in data and isinstance(data.get("spec"), dict):
        return json.dumps(from_proto_dict(data["spec"]))
    return text


def load_spec_file(path: str) -> dict[str, Any]:
    """The file's spec, validated locally, in the file form; CliError listing every violation."""
    text = _read_text(path)
    fmt = spec_format(path, text)
    if fmt == "json":
        text = _unwrap_workflow_document(text)
    try:
        spec = load_spec_text(text, fmt)
    except SpecError as error:
        lines = [f"error: {path} is not a valid workflow spec ({len(error.violations)} problems):"]
        if len(error.violations) == 1:
            lines[0] = f"error: {path} is not a valid workflow spec:"
        lines += [f"  {violation}" for violation in error.violations]
        raise CliError(lines, EXIT_USAGE) from None
    return spec_to_dict(spec)


# --- commands ----------------------------------------------------------------------------------


def cmd_list(api: Api, args: argparse.Namespace) -> int:
    """`runs workflows`: one page of workflows, or every page with --all."""

    def fetch(token: str) -> tuple[Sequence[workflow_service_pb2.Workflow], str]:
        request = workflow_service_pb2.ListWorkflowsRequest(page_size=args.page_size, page_token=token)
        response = api.workflows.ListWorkflows(request, timeout=UNARY_DEADLINE_SECONDS)
        return response.workflows, response.next_page_token

    found, token = collect_pages(fetch, args.page_token, args.all)
    document = {"workflows": [to_dict(w) for w in found], "next_page_token": token}
    print_page(args, document, format_workflows_table(found), "runs workflows")
    return EXIT_OK


def cmd_get(api: Api, args: argparse.Namespace) -> int:
    """`runs workflow NAME`: the spec of the latest (or --version N) version."""
    request = workflow_service_pb2.GetWorkflowRequest(name=args.name, version=args.version)
    workflow = api.workflows.GetWorkflow(request, timeout=UNARY_DEADLINE_SECONDS).workflow
    out(dumps(to_dict(workflow)) if args.json else format_workflow(workflow))
    return EXIT_OK


def cmd_register(api: Api, args: argparse.Namespace) -> int:
    """`runs register FILE`: validate locally, register, print the name and version and whether it is new."""
    workflow = api.client.register_workflow(load_spec_file(args.file))
    if args.json:
        out(dumps({"workflow": to_dict(workflow.proto), "created": workflow.created}))
    else:
        state = "created" if workflow.created else "unchanged (this spec was registered before)"
        out(f"{workflow.name} version {workflow.version}: {state}")
    return EXIT_OK


COMMANDS: dict[str, Callable[[Api, argparse.Namespace], int]] = {
    "workflows": cmd_list,
    "workflow": cmd_get,
    "register": cmd_register,
}
