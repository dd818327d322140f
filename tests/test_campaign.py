"""The sample workflow workflows/campaign.build.v1.yaml: it validates, and its scripts build the five files.

Pure: no server. `build` plays the worker's part of the shell contract by hand (a fresh working
directory per step, upstream artifacts fetched into it by name, RUNS_INPUT holding the resolved
tool input, RUNS_OUTPUT becoming `output.result`, artifacts collected by glob), with the input
resolved through the spec's own selectors, so the selectors and the scripts are checked together.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from shared.gen.runs.v1 import workflow_service_pb2
from shared.workflow import (
    WorkflowSpec,
    from_proto_dict,
    load_spec_text,
    order,
    parse_spec,
    resolve_input,
    run_context,
    sinks,
    spec_to_dict,
    spec_version_hash,
    to_proto_dict,
    upstream,
)

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "workflows" / "campaign.build.v1.yaml"
RUN_INPUT = {"product": "Acme Rockets", "audience": "coyotes", "color": "#d9480f"}
ARTIFACTS = {
    "brief": ["brief.txt"],
    "copy": ["copy.txt"],
    "images": ["hero.svg"],
    "landing_page": ["index.html"],
    "bundle": ["campaign.zip"],
}


@pytest.fixture(scope="module")
def spec() -> WorkflowSpec:
    return load_spec_text(SPEC_PATH.read_text(), "yaml")


def run_step(spec: WorkflowSpec, key: str, run_input: Any, results: dict[str, Any], base: Path) -> dict[str, Any]:
    """Run one shell step as the worker would; returns {"output", "artifacts"} (artifacts' uri: a local path)."""
    step = spec.step(key)
    assert step.tool == "shell"
    tool_input = resolve_input(step, run_context(run_input, results, upstream(spec, key)))
    workdir = base / key / "work"
    workdir.mkdir(parents=True)
    inputs = tool_input.get("inputs", [])
    for artifact in inputs.values() if isinstance(inputs, dict) else inputs:
        target = workdir / artifact["name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact["uri"], target)
    input_path, output_path = base / key / "input.json", base / key / "output.json"
    input_path.write_text(json.dumps(tool_input))
    command = tool_input["command"]
    assert command[:2] == ["python3", "-c"], "the sample's steps are Python one-liners"
    env = {**os.environ, "RUNS_INPUT": str(input_path), "RUNS_OUTPUT": str(output_path),
           "RUNS_RUN_ID": "01TESTRUN", "RUNS_STEP_KEY": key}
    done = subprocess.run(
        [sys.executable, *command[1:]], cwd=workdir, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"step {key} failed:\n{done.stderr}"
    output: dict[str, Any] = {"exit_code": 0, "stdout": done.stdout, "stderr": done.stderr, "truncated": False}
    if output_path.exists():
        output["result"] = json.loads(output_path.read_text())
    kept = base / key / "artifacts"
    artifacts: list[dict[str, Any]] = []
    for pattern in tool_input.get("artifacts", []):
        matches = sorted(p for p in workdir.glob(pattern) if p.is_file())
        assert matches, f"step {key}: artifacts pattern {pattern!r} matched no file (the shell tool fails then)"
        for path in matches:
            name = path.relative_to(workdir).as_posix()
            if name in {a["name"] for a in artifacts}:
                continue
            (kept / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, kept / name)
            data = path.read_bytes()
            artifacts.append(
                {"name": name, "uri": str(kept / name), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            )
    return {"output": output, "artifacts": artifacts}


def build(spec: WorkflowSpec, run_input: Any, base: Path) -> dict[str, dict[str, Any]]:
    """Every step in the DAG's order; returns each step's {"output", "artifacts"}."""
    results: dict[str, dict[str, Any]] = {}
    for key in order(spec):
        results[key] = run_step(spec, key, run_input, results, base)
    return results


def artifact_bytes(results: dict[str, Any], key: str, name: str) -> bytes:
    found = [a for a in results[key]["artifacts"] if a["name"] == name]
    assert len(found) == 1, f"{key} has no artifact {name!r}"
    return Path(found[0]["uri"]).read_bytes()


# --- the spec ----------------------------------------------------------------------------------


def test_the_sample_is_a_valid_spec_with_the_expected_shape(spec: WorkflowSpec) -> None:
    assert spec.name == "campaign.build"
    assert order(spec) == ["brief", "copy", "images", "landing_page", "bundle"]
    assert {s.key: list(s.depends_on) for s in spec.steps} == {
        "brief": [],
        "copy": ["brief"],
        "images": ["brief"],
        "landing_page": ["copy", "images"],
        "bundle": ["landing_page"],
    }
    assert sinks(spec) == ["bundle"]
    assert spec.change_requests == {"brief_update": ("brief",), "copy_update": ("copy",), "image_update": ("images",)}
    for step in spec.steps:
        assert step.tool == "shell"
        assert (step.retry.max_attempts, step.retry.backoff_seconds) == (2, 0.5)
        assert step.timeout_seconds is not None and step.timeout_seconds > 0


def test_the_sample_survives_the_proto_form_with_the_same_version_hash(spec: WorkflowSpec) -> None:
    """What `runs register` sends (to_proto_dict -> WorkflowSpec) is what the file says."""
    message = json_format.ParseDict(to_proto_dict(spec_to_dict(spec)), workflow_service_pb2.WorkflowSpec())
    back = parse_spec(from_proto_dict(json_format.MessageToDict(message, preserving_proto_field_name=True)))
    assert back == spec
    assert spec_version_hash(back) == spec_version_hash(spec)


# --- the scripts -------------------------------------------------------------------------------


def test_the_steps_build_five_artifacts(spec: WorkflowSpec, tmp_path: Path) -> None:
    results = build(spec, RUN_INPUT, tmp_path)
    assert {key: [a["name"] for a in r["artifacts"]] for key, r in results.items()} == ARTIFACTS

    brief = results["brief"]["output"]["result"]
    assert brief == {
        "product": "Acme Rockets",
        "audience": "coyotes",
        "color": "#d9480f",
        "headline": "Acme Rockets, made for coyotes",
    }
    assert "product: Acme Rockets" in artifact_bytes(results, "brief", "brief.txt").decode()

    copy = results["copy"]["output"]["result"]
    assert copy["headline"] == brief["headline"] and "Acme Rockets" in copy["cta"]
    assert artifact_bytes(results, "copy", "copy.txt").decode().split("\n\n")[0] == brief["headline"]

    svg = artifact_bytes(results, "images", "hero.svg").decode()
    assert svg.startswith("<svg ") and 'fill="#d9480f"' in svg and ">Acme Rockets</text>" in svg

    page = artifact_bytes(results, "landing_page", "index.html").decode()
    assert page.startswith("<!doctype html>")
    assert svg in page, "the page embeds the SVG"
    assert f"<h1>{html.escape(copy['headline'])}</h1>" in page and html.escape(copy["body"]) in page
    assert results["landing_page"]["output"]["result"] == {"title": copy["headline"], "bytes": len(page.encode())}

    with zipfile.ZipFile(Path(next(a["uri"] for a in results["bundle"]["artifacts"]))) as z:
        assert z.namelist() == ["brief.txt", "copy.txt", "hero.svg", "index.html"]
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert z.read("index.html").decode() == page
        assert z.testzip() is None
    assert results["bundle"]["output"]["result"] == {"files": ["brief.txt", "copy.txt", "hero.svg", "index.html"]}


def test_the_bundle_is_deterministic(spec: WorkflowSpec, tmp_path: Path) -> None:
    first = build(spec, RUN_INPUT, tmp_path / "one")
    second = build(spec, RUN_INPUT, tmp_path / "two")
    digests = [{(k, a["name"]): a["sha256"] for k, r in res.items() for a in r["artifacts"]} for res in (first, second)]
    assert digests[0] == digests[1]
    other = build(spec, {**RUN_INPUT, "color": "#000000"}, tmp_path / "three")
    assert other["bundle"]["artifacts"][0]["sha256"] != first["bundle"]["artifacts"][0]["sha256"]


def test_color_is_optional_and_markup_in_the_input_is_escaped(spec: WorkflowSpec, tmp_path: Path) -> None:
    results = build(spec, {"product": "<Rockets & Co>", "audience": "\"everyone\""}, tmp_path)
    assert results["brief"]["output"]["result"]["color"] == "#0b7285"
    svg = artifact_bytes(results, "images", "hero.svg").decode()
    assert "&lt;Rockets &amp; Co&gt;" in svg and "<Rockets" not in svg
    page = artifact_bytes(results, "landing_page", "index.html").decode()
    assert "<Rockets" not in page and "&lt;Rockets &amp; Co&gt;" in page
