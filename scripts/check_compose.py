#!/usr/bin/env python3
"""Static checks of docker-compose.yml and the Dockerfile it builds.

No Docker engine is needed: the compose file, the Dockerfile, .dockerignore,
the workspace's Cargo.toml files and the mounted Prometheus/Grafana configs
are read and cross-checked.

Usage:
    python3 scripts/check_compose.py [COMPOSE_FILE] [--project-dir DIR]

COMPOSE_FILE defaults to docker-compose.yml at the repository root. Relative
paths in it are resolved against DIR, which defaults to the compose file's
own directory (as `docker compose` does); pass --project-dir to check a copy
kept elsewhere against the repository.

Prints one line per check (`ok   ...` or `FAIL ...`) and ends with
`N passed, M failed`; exits 1 if any check failed.

Needs Python 3.11+ (tomllib) and PyYAML (`pip install pyyaml`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

try:
    import yaml
except ImportError:
    yaml = None

REPO_ROOT = Path(__file__).resolve().parent.parent

# depends_on conditions docker compose accepts.
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# restart policies under which a one-shot service can finish for good.
ONE_SHOT_RESTARTS = {None, "no", "on-failure"}
# Container directories whose files are treated as the image's executables.
BIN_DIRS = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin")


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str, why: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"ok   {what}")
        else:
            self.failed += 1
            print(f"FAIL {what}" + (f": {why}" if why else ""))
        return ok

    def summary(self) -> int:
        print(f"{self.passed} passed, {self.failed} failed")
        return 1 if self.failed else 0


# ---------------------------------------------------------------------------
# Compose variable interpolation (${VAR}, ${VAR:-default}, ${VAR-default},
# ${VAR:?err}, ${VAR?err}, ${VAR:+alt}, $VAR, $$).
# ---------------------------------------------------------------------------
_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def load_dotenv(project_dir: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    path = project_dir / ".env"
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip("'\"")
    return env


def interpolate(value, env: dict[str, str]):
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group("escaped"):
                return "$"
            name = m.group("braced") or m.group("named")
            op, arg = m.group("op"), m.group("arg") or ""
            current = env.get(name)
            if op in (":-", ":?"):
                return current if current else (arg if op == ":-" else "")
            if op in ("-", "?"):
                return current if current is not None else (arg if op == "-" else "")
            if op == ":+":
                return arg if current else ""
            if op == "+":
                return arg if current is not None else ""
            return current or ""
        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def image_pinned(ref: str) -> tuple[bool, str]:
    """A reference is pinned when it has a digest, or a tag other than latest."""
    if not ref or not ref.strip():
        return False, "empty image reference"
    if "$" in ref:
        return False, f"unresolved variable in {ref!r}"
    if "@sha256:" in ref:
        return True, ""
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return False, f"{ref!r} has no tag (means latest)"
    tag = last.split(":", 1)[1]
    if not tag:
        return False, f"{ref!r} has an empty tag"
    if tag == "latest":
        return False, f"{ref!r} uses the floating tag latest"
    return True, ""


def inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def service_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, _, val = str(item).partition("=")
            out[key] = val
        return out
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command_words(cmd) -> list[str]:
    if cmd is None:
        return []
    if isinstance(cmd, list):
        return [str(c) for c in cmd]
    try:
        return shlex.split(str(cmd))
    except ValueError:
        return str(cmd).split()


def parse_volume(entry) -> tuple[str, str | None, str | None]:
    """Returns (kind, source, target) with kind in bind|volume|anonymous|tmpfs|other."""
    if isinstance(entry, dict):
        kind = entry.get("type", "volume")
        source, target = entry.get("source"), entry.get("target")
        if kind == "volume" and not source:
            return "anonymous", None, target
        return kind, source, target
    text = str(entry)
    parts = text.split(":")
    if len(parts) == 1:
        return "anonymous", None, parts[0]
    source, target = parts[0], parts[1]
    if source.startswith((".", "/", "~")):
        return "bind", source, target
    return "volume", source, target


# ---------------------------------------------------------------------------
# Dockerfile parsing
# ---------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and buf):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        line = (buf + stripped).strip()
        buf = ""
        if not line:
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    if buf.strip():
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def split_copy_args(args: str) -> tuple[dict[str, str], list[str], str] | None:
    """COPY/ADD arguments as (flags, sources, destination); None if unparsable."""
    flags: dict[str, str] = {}
    rest = args.strip()
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        key, _, val = flag[2:].partition("=")
        flags[key] = val
        rest = rest.lstrip()
    try:
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(words, list) or len(words) < 2:
        return None
    return flags, [str(w) for w in words[:-1]], str(words[-1])


def dockerignore_patterns(context: Path) -> list[tuple[bool, re.Pattern]]:
    path = context / ".dockerignore"
    patterns = []
    if not path.is_file():
        return patterns
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:].strip()
        line = os.path.normpath(line.lstrip("/")).replace(os.sep, "/")
        regex = ""
        i = 0
        while i < len(line):
            c = line[i]
            if line.startswith("**", i):
                regex += ".*"
                i += 2
                if i < len(line) and line[i] == "/":
                    i += 1
                    regex = regex[:-2] + "(?:.*/)?"
                continue
            if c == "*":
                regex += "[^/]*"
            elif c == "?":
                regex += "[^/]"
            else:
                regex += re.escape(c)
            i += 1
        patterns.append((negate, re.compile(f"^{regex}$")))
    return patterns


def ignored(rel: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker semantics: a path is excluded if it or a parent matches; last match wins."""
    rel = os.path.normpath(rel).replace(os.sep, "/")
    if rel in (".", ""):
        return False
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in patterns:
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


# ---------------------------------------------------------------------------
# Workspace binaries
# ---------------------------------------------------------------------------
def workspace_binaries(project_dir: Path, report: Report) -> set[str]:
    bins: set[str] = set()
    root_toml = project_dir / "Cargo.toml"
    if not report.check(root_toml.is_file(), "workspace Cargo.toml present", f"{root_toml} missing"):
        return bins
    if tomllib is None:
        report.check(False, "tomllib available", "needs Python 3.11+")
        return bins
    try:
        root = tomllib.loads(root_toml.read_text())
    except tomllib.TOMLDecodeError as e:
        report.check(False, "workspace Cargo.toml parses", str(e))
        return bins
    members: list[Path] = []
    for pattern in root.get("workspace", {}).get("members", []):
        matched = sorted(p for p in project_dir.glob(pattern) if p.is_dir())
        members.extend(matched or [project_dir / pattern])
    if "package" in root:
        members.insert(0, project_dir)
    report.check(bool(members), "workspace declares crates", "no [workspace] members and no [package]")
    for crate in members:
        toml_path = crate / "Cargo.toml"
        rel = os.path.relpath(toml_path, project_dir)
        if not report.check(toml_path.is_file(), f"crate Cargo.toml present: {rel}", "missing"):
            continue
        try:
            data = tomllib.loads(toml_path.read_text())
        except tomllib.TOMLDecodeError as e:
            report.check(False, f"crate Cargo.toml parses: {rel}", str(e))
            continue
        name = data.get("package", {}).get("name")
        if name:
            bins.add(name)
        for b in data.get("bin", []):
            if b.get("name"):
                bins.add(b["name"])
        bins.update(p.stem for p in (crate / "src" / "bin").glob("*.rs"))
    return bins


# ---------------------------------------------------------------------------
# Dockerfile checks
# ---------------------------------------------------------------------------
def check_dockerfile(dockerfile: Path, context: Path, project_dir: Path, report: Report,
                     workspace_bins: set[str] | None) -> set[str]:
    """Checks one Dockerfile; returns the basenames it puts into bin directories."""
    label = os.path.relpath(dockerfile, project_dir)
    instructions = dockerfile_instructions(dockerfile.read_text())
    patterns = dockerignore_patterns(context)
    stages: set[str] = set()
    args: set[str] = set()
    image_bins: set[str] = set()
    stage_bins: list[str] = []
    uses_locked = False

    for instr, rest in instructions:
        if instr == "ARG":
            args.add(rest.split("=", 1)[0].strip())
        elif instr == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = words[0] if words else ""
            if len(words) >= 3 and words[1].lower() == "as":
                alias = words[2]
            else:
                alias = None
            if base in stages or base == "scratch" or "$" in base:
                pass  # a previous stage, scratch, or an ARG-chosen base
            else:
                ok, why = image_pinned(base)
                report.check(ok, f"{label}: base image {base} pinned to a tag", why)
            if alias:
                stages.add(alias)
        elif instr == "RUN" and "cargo" in rest and "--locked" in rest:
            uses_locked = True
        elif instr in ("COPY", "ADD"):
            parsed = split_copy_args(rest)
            if parsed is None:
                report.check(False, f"{label}: {instr} {rest} parses", "cannot parse")
                continue
            flags, sources, dest = parsed
            from_stage = flags.get("from")
            dest_dir = dest.rstrip("/") if (dest.endswith("/") or len(sources) > 1) else os.path.dirname(dest)
            dest_names = (
                [os.path.basename(s.rstrip("/")) for s in sources]
                if (dest.endswith("/") or len(sources) > 1)
                else [os.path.basename(dest)]
            )
            in_bin = dest_dir in BIN_DIRS
            if from_stage:
                if in_bin:
                    image_bins.update(dest_names)
                    if from_stage in stages:
                        stage_bins.extend(os.path.basename(s.rstrip("/")) for s in sources)
                continue
            if in_bin:
                image_bins.update(dest_names)
            for src in sources:
                if instr == "ADD" and re.match(r"^(https?|git)[:@]", src):
                    continue
                what = f"{label}: {instr} source {src} exists in build context"
                if "$" in src:
                    report.check(False, what, "unresolved variable")
                    continue
                target = context / src
                if not inside(target, context):
                    report.check(False, what, "points outside the build context")
                    continue
                if src.strip() in (".", "./"):
                    report.check(context.is_dir(), what, "build context missing")
                    continue
                matches = glob.glob(str(target)) if any(c in src for c in "*?[") else (
                    [str(target)] if target.exists() else [])
                if not report.check(bool(matches), what, f"{os.path.relpath(target, project_dir)} not found"):
                    continue
                rels = [os.path.relpath(m, context) for m in matches]
                kept = [r for r in rels if not ignored(r, patterns)]
                report.check(bool(kept), f"{label}: {instr} source {src} not excluded by .dockerignore",
                             "every match is excluded")

    if uses_locked:
        lock = project_dir / "Cargo.lock"
        report.check(lock.is_file(), f"{label}: Cargo.lock present (cargo runs with --locked)",
                     "missing: `cargo build --locked` would fail")
    if workspace_bins is not None:
        report.check(bool(stage_bins), f"{label}: copies binaries from a build stage into a bin directory",
                     "no COPY --from=<stage> ... /usr/local/bin/")
        for b in stage_bins:
            report.check(b in workspace_bins, f"{label}: binary {b} is declared by a workspace crate",
                         f"known: {', '.join(sorted(workspace_bins)) or 'none'}")
    return image_bins


# ---------------------------------------------------------------------------
# Config files mounted into Prometheus and Grafana
# ---------------------------------------------------------------------------
def check_prometheus(path: Path, services: dict, project_dir: Path, report: Report) -> None:
    label = os.path.relpath(path, project_dir)
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        report.check(False, f"{label} parses", str(e))
        return
    targets: list[tuple[str, str, str]] = []
    for job in cfg.get("scrape_configs") or []:
        name = job.get("job_name", "?")
        for sc in job.get("static_configs") or []:
            for t in sc.get("targets") or []:
                host, _, port = str(t).rpartition(":")
                targets.append((name, host, port))
        for dc in job.get("dns_sd_configs") or []:
            for n in dc.get("names") or []:
                targets.append((name, str(n), str(dc.get("port", ""))))
    report.check(bool(targets), f"{label}: has scrape targets", "none found")
    for job, host, port in targets:
        if host in ("localhost", "127.0.0.1"):
            continue
        what = f"{label}: job {job} target {host}:{port} is a compose service"
        if not report.check(host in services, what, f"no service named {host!r}"):
            continue
        metrics_addr = service_env(services[host]).get("METRICS_ADDR")
        if metrics_addr:
            served = metrics_addr.rpartition(":")[2]
            report.check(served == port, f"{label}: job {job} port {port} matches {host} METRICS_ADDR",
                         f"{host} serves metrics on {metrics_addr}")


def check_grafana(provisioning: Path, services: dict, project_dir: Path, report: Report) -> None:
    files = sorted(provisioning.glob("datasources/*.y*ml"))
    report.check(bool(files), f"{os.path.relpath(provisioning, project_dir)}: has datasources/*.yml",
                 "no provisioned datasource")
    for f in files:
        label = os.path.relpath(f, project_dir)
        try:
            cfg = yaml.safe_load(f.read_text()) or {}
        except yaml.YAMLError as e:
            report.check(False, f"{label} parses", str(e))
            continue
        for ds in cfg.get("datasources") or []:
            m = re.match(r"^https?://([^/:]+)", str(ds.get("url", "")))
            host = m.group(1) if m else ""
            report.check(host in services or host == "localhost",
                         f"{label}: datasource {ds.get('name')} url host {host!r} is a compose service",
                         f"url {ds.get('url')!r}")


# ---------------------------------------------------------------------------
# Compose checks
# ---------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compose", nargs="?", default=str(REPO_ROOT / "docker-compose.yml"))
    parser.add_argument("--project-dir", default=None)
    opts = parser.parse_args(argv)

    report = Report()
    if yaml is None:
        report.check(False, "PyYAML importable", "PyYAML is missing: run `pip install pyyaml`")
        return report.summary()

    compose_path = Path(opts.compose).resolve()
    project_dir = Path(opts.project_dir).resolve() if opts.project_dir else compose_path.parent
    if not report.check(compose_path.is_file(), f"compose file {compose_path} exists"):
        return report.summary()
    try:
        raw = yaml.safe_load(compose_path.read_text())
    except yaml.YAMLError as e:
        report.check(False, "compose file parses as YAML", str(e).replace("\n", " "))
        return report.summary()
    env = {**load_dotenv(project_dir), **os.environ}
    doc = interpolate(raw, env) if isinstance(raw, dict) else raw
    services = doc.get("services") if isinstance(doc, dict) else None
    if not report.check(isinstance(services, dict) and bool(services), "compose file has services"):
        return report.summary()

    declared_volumes = set((doc.get("volumes") or {}).keys())
    top_files = {kind: doc.get(kind) or {} for kind in ("configs", "secrets")}
    for kind, entries in top_files.items():
        for name, spec in entries.items():
            if isinstance(spec, dict) and "file" in spec:
                p = project_dir / spec["file"]
                report.check(p.exists() and inside(p, project_dir),
                             f"{kind[:-1]} {name}: file {spec['file']} exists in the repo", "missing")

    workspace_bins: set[str] | None = None
    checked_dockerfiles: dict[Path, set[str]] = {}
    host_ports: dict[str, str] = {}
    prometheus_files: list[Path] = []
    grafana_dirs: list[Path] = []

    for name, svc in services.items():
        if not isinstance(svc, dict):
            report.check(False, f"service {name}: is a mapping")
            continue
        image, build = svc.get("image"), svc.get("build")
        report.check(bool(image or build), f"service {name}: has image or build", "neither is set")
        if image:
            ok, why = image_pinned(str(image))
            report.check(ok, f"service {name}: image {image} pinned to a tag", why)

        image_bins: set[str] | None = None
        if build:
            spec = {"context": build} if isinstance(build, str) else dict(build)
            context = (project_dir / str(spec.get("context", "."))).resolve()
            if report.check(context.is_dir(), f"service {name}: build context {spec.get('context', '.')} exists",
                            f"{context} is not a directory"):
                if "dockerfile_inline" in spec:
                    report.check(True, f"service {name}: inline Dockerfile")
                else:
                    dockerfile = (context / str(spec.get("dockerfile", "Dockerfile"))).resolve()
                    if report.check(dockerfile.is_file(),
                                    f"service {name}: Dockerfile {os.path.relpath(dockerfile, project_dir)} exists",
                                    "missing"):
                        if dockerfile not in checked_dockerfiles:
                            if workspace_bins is None:
                                workspace_bins = workspace_binaries(project_dir, report)
                            checked_dockerfiles[dockerfile] = check_dockerfile(
                                dockerfile, context, project_dir, report, workspace_bins)
                        image_bins = checked_dockerfiles[dockerfile]

        # The command's program must be something the built image installs.
        words = command_words(svc.get("command"))
        entrypoint = command_words(svc.get("entrypoint"))
        if image_bins is not None and words and not entrypoint:
            prog = words[0]
            report.check(os.path.basename(prog) in image_bins,
                         f"service {name}: command {prog} is installed by its Dockerfile",
                         f"image bin dirs hold: {', '.join(sorted(image_bins)) or 'nothing'}")

        for entry in as_list(svc.get("volumes")):
            kind, source, target = parse_volume(entry)
            if kind == "bind":
                host = Path(os.path.expanduser(source))
                host = host if host.is_absolute() else project_dir / host
                ok = host.exists() and inside(host, project_dir)
                why = "outside the repository" if host.exists() else "missing"
                report.check(ok, f"service {name}: bind mount {source} exists in the repo", why)
                if ok and target:
                    if host.is_file() and target.endswith("prometheus.yml"):
                        prometheus_files.append(host)
                    if host.is_dir() and target.rstrip("/") == "/etc/grafana/provisioning":
                        grafana_dirs.append(host)
            elif kind == "volume":
                report.check(source in declared_volumes,
                             f"service {name}: named volume {source} declared", "not under top-level volumes:")

        for entry in as_list(svc.get("env_file")):
            path, required = (entry.get("path"), entry.get("required", True)) if isinstance(entry, dict) \
                else (entry, True)
            p = project_dir / str(path)
            report.check((p.is_file() and inside(p, project_dir)) or not required,
                         f"service {name}: env_file {path} exists in the repo", "missing")

        for kind in ("configs", "secrets"):
            for ref in as_list(svc.get(kind)):
                src = ref.get("source") if isinstance(ref, dict) else ref
                report.check(src in top_files[kind], f"service {name}: {kind[:-1]} {src} declared",
                             f"not under top-level {kind}:")

        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            condition = (spec or {}).get("condition", "service_started")
            if not report.check(dep in services, f"service {name}: depends_on {dep} is a defined service",
                                "no such service"):
                continue
            report.check(condition in CONDITIONS, f"service {name}: depends_on {dep} condition {condition} valid",
                         f"expected one of {sorted(CONDITIONS)}")
            target = services[dep] if isinstance(services[dep], dict) else {}
            if condition == "service_healthy":
                hc = target.get("healthcheck") or {}
                report.check(bool(hc.get("test")) and not hc.get("disable"),
                             f"service {name}: {dep} (service_healthy) has a healthcheck", "none defined")
            if condition == "service_completed_successfully":
                restart = target.get("restart")
                report.check(restart in ONE_SHOT_RESTARTS,
                             f"service {name}: {dep} (service_completed_successfully) is one-shot",
                             f"restart: {restart} never lets it complete")

        for port in as_list(svc.get("ports")):
            if isinstance(port, dict):
                published = str(port.get("published", ""))
                ip = str(port.get("host_ip", ""))
            else:
                parts = str(port).split(":")
                published = parts[-2] if len(parts) >= 2 else ""
                ip = parts[-3] if len(parts) >= 3 else ""
            if not published:
                continue
            key = f"{ip}:{published}" if ip else published
            owner = host_ports.get(key)
            report.check(owner is None, f"service {name}: host port {key} not used by another service",
                         f"also published by {owner}")
            host_ports.setdefault(key, name)

    for p in prometheus_files:
        check_prometheus(p, services, project_dir, report)
    for d in grafana_dirs:
        check_grafana(d, services, project_dir, report)

    return report.summary()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
