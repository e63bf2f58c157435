"""Collect what `benchmarks/gpu_check.sh` produced into OUT/summary.json (and print it).

Inputs in OUT: junit.xml (pytest -m gpu), metrics.jsonl (differences the GPU tests measured),
exports/modiff/profile/<engine>-b4.json (modiff-trt profile) and the *.cmd dry-run commands.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """GPU, driver-facing versions and the Python stack, as far as they can be read."""
    info: dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001 - the summary records what it could not read
        info["torch"] = f"unavailable: {exc}"
    for module in ("tensorrt", "onnxruntime"):
        try:
            info[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001
            info[module] = f"unavailable: {exc}"
    return info


def tests(junit: Path) -> list[dict[str, Any]]:
    """One entry per test case: name, outcome (passed/failed/error/skipped), seconds, message."""
    if not junit.is_file():
        return []
    rows = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome, message = ("failed" if tag == "failure" else tag), element.get("message", "")[:500]
        rows.append(
            {"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message}
        )
    return rows


def profiles(out: Path, results: list[str]) -> dict[str, Any]:
    """Per engine: how the profile run ended, its parsed numbers and the dry-run command."""
    found = {}
    for item in results:
        engine, _, status = item.partition("=")
        entry: dict[str, Any] = {
            "status": "skipped: no trtexec on PATH or no plan"
            if status == "skipped"
            else ("passed" if status == "0" else f"failed (exit {status})")
        }
        parsed = out / "exports" / "modiff" / "profile" / f"{engine}-b4.json"
        if parsed.is_file():
            entry["result"] = json.loads(parsed.read_text())
        command = out / f"profile-{engine}.cmd"
        if command.is_file():
            entry["dry_run_output"] = command.read_text().strip().splitlines()[-1:]
        found[engine] = entry
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pytest-rc", type=int, required=True)
    parser.add_argument("--profile", nargs="*", default=[], help="ENGINE=RC or ENGINE=skipped")
    parser.add_argument("--seconds", type=int, required=True)
    args = parser.parse_args()
    metrics = args.out / "metrics.jsonl"
    cases = tests(args.out / "junit.xml")
    prof = profiles(args.out, args.profile)
    summary = {
        "machine": machine(),
        "seconds": args.seconds,
        "pytest": {"exit_code": args.pytest_rc, "tests": cases},
        "metrics": [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else [],
        "profile": prof,
    }
    ran_ok = args.pytest_rc == 0 and any(case["outcome"] == "passed" for case in cases)
    summary["passed"] = ran_ok and not any(p["status"].startswith("failed") for p in prof.values())
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
